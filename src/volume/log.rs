//! The log: records appended to segments, and reading them back.
//!
//! A record is a summary block followed by its payload blocks, inside one
//! segment. Records are chained: each summary carries the MAC of the one
//! before it, so recovery follows exactly the chain that was written and
//! never mistakes a stale record (from an earlier use of a segment, or from
//! a write that never became durable) for a live one.

use std::collections::BTreeSet;

use super::checkpoint::Checkpoints;
use super::ctx::{payload_seal, Ctx};
use super::format::{
    decode_entries, encode_entries, Block, Entry, LogPos, SummaryHead, ENTRIES_PER_RECORD,
    FLAG_COMMIT, SUMMARY_BODY_AT, SUMMARY_MAC_AT,
};
use super::geometry::Geometry;
use crate::crypto::{BlockKind, GenKeys, Mac, Tag};
use crate::device::read_exact_at;
use crate::volume::{Result, SegmentId, VolumeError};
use crate::BLOCK_SIZE;

/// The log head and the segments: which are in use, free, or emptied by
/// the cleaner, and how far the backing file has grown.
pub struct Log {
    pub geo: Geometry,
    /// Where the next record goes.
    pub head: LogPos,
    /// Segments that hold nothing live and may be reused by the log.
    pub free: BTreeSet<SegmentId>,
    /// Segments ever used: the log grows the backing file up to `extent`.
    pub extent: u64,
    /// Segments the cleaner emptied; they become free at the next checkpoint.
    pub cleaned: BTreeSet<SegmentId>,
    /// The backing device refused to grow (the host filesystem is full):
    /// only free segments count as available until growing works again.
    pub growth_blocked: bool,
    /// Log blocks written since the last checkpoint.
    pub blocks_since_checkpoint: u64,
    /// The device's flush count when the log last took a segment (none
    /// yet since the volume was opened).
    flushes_at_take: Option<u64>,
    /// The segment the log took last: the next free one above it is
    /// taken next, so that the log runs forward through the backing file.
    cursor: SegmentId,
}

/// A segment is prepared ([`Device::prepare`]) when the device was flushed
/// at least once per this many blocks while the log filled the one before:
/// small commits, each made durable (an fsync after every write). Writing
/// a 4 MiB segment of zeros then costs less than the 64 host journal
/// commits it saves. A writer of large runs flushes rarely, and its data
/// overwrites the zeros in the page cache before they reach the disk, so
/// preparing its segments would only cost it CPU.
///
/// [`Device::prepare`]: crate::device::Device::prepare
const PREPARE_BLOCKS_PER_FLUSH: u64 = 16;

/// One record as laid out by [`plan`]: a range of entries and its place.
struct Placed {
    /// The record starts a fresh segment.
    switch_before: bool,
    entries: std::ops::Range<usize>,
    n_payload: usize,
    payload_start: usize,
}

/// A record read back from a segment.
pub struct Record {
    pub head: SummaryHead,
    pub entries: Vec<Entry>,
    pub mac: Mac,
}

impl Log {
    /// Starts at a checkpoint's log head.
    pub fn new(geo: Geometry, head: LogPos, extent: u64) -> Log {
        Log {
            geo,
            head,
            free: BTreeSet::new(),
            extent,
            cleaned: BTreeSet::new(),
            growth_blocked: false,
            blocks_since_checkpoint: 0,
            flushes_at_take: None,
            cursor: head.next_segment,
        }
    }

    fn growth(&self) -> u64 {
        if self.growth_blocked {
            0
        } else {
            self.geo.max_segments - self.extent
        }
    }

    /// Segments the log can still take: free ones plus room to grow.
    pub fn available(&self) -> u64 {
        self.free.len() as u64 + self.growth()
    }

    /// Segments ordinary writes can take: all but the reserve.
    pub fn user_available(&self) -> u64 {
        (self.free.len() as u64).saturating_sub(self.geo.reserve) + self.growth()
    }

    /// Whether segment `s` is where the log writes now or next.
    pub fn is_head(&self, s: SegmentId) -> bool {
        s == self.head.segment || s == self.head.next_segment
    }

    /// Every segment the log has ever used.
    pub fn segments(&self) -> impl Iterator<Item = SegmentId> {
        (0..self.extent).map(SegmentId)
    }

    /// Segments that may be reused before the first checkpoint after open:
    /// those empty at the checkpoint that the log has not written since.
    pub fn free_after_recovery(
        &mut self,
        empty_at_checkpoint: &[SegmentId],
        touched: &BTreeSet<SegmentId>,
    ) {
        self.free = empty_at_checkpoint
            .iter()
            .copied()
            .filter(|s| !touched.contains(s) && !self.is_head(*s))
            .collect();
    }

    /// Lays out `entries` as records from the current head. Payload entries
    /// must precede other entries within a record, so a payload entry after
    /// a non-payload one starts a new record. Returns the records and the
    /// number of segment switches (each needs one fresh segment).
    fn plan(&self, entries: &[Entry]) -> (Vec<Placed>, u64) {
        let seg = self.geo.seg_blocks;
        let mut offset = self.head.offset as u64;
        let mut switches = 0;
        let mut out = Vec::new();
        let mut i = 0;
        let mut payload_idx = 0;
        while i < entries.len() {
            let needs_payload = entries[i].has_payload();
            let switch_before = offset + if needs_payload { 2 } else { 1 } > seg;
            if switch_before {
                switches += 1;
                offset = 0;
            }
            let room = (seg - offset - 1) as usize;
            let start = i;
            let mut n_payload = 0;
            while i < entries.len() && i - start < ENTRIES_PER_RECORD {
                if entries[i].has_payload() {
                    if n_payload != i - start || n_payload == room {
                        break;
                    }
                    n_payload += 1;
                }
                i += 1;
            }
            out.push(Placed {
                switch_before,
                entries: start..i,
                n_payload,
                payload_start: payload_idx,
            });
            payload_idx += n_payload;
            offset += 1 + n_payload as u64;
        }
        (out, switches)
    }

    /// How many fresh segments appending `entries` would take.
    pub fn segments_needed(&self, entries: &[Entry]) -> u64 {
        self.plan(entries).1
    }

    /// Takes a segment for the log: a free segment above the reserve if
    /// there is one (the next above the one taken last, wrapping round, so
    /// that what is written in turn lies in turn in the backing file and
    /// reads back with the host's read-ahead), else a new one past the
    /// extent (growing the backing file). The reserve (the lowest `reserve` free segments,
    /// kept allocated on the host) is only for `privileged` appends
    /// (checkpoints, the cleaner, trims), and only when the file cannot
    /// grow: so it is there when the host filesystem is full. Space is
    /// reserved on the device before use, so writes into the segment
    /// cannot fail for lack of space. It is prepared (written once with
    /// zeros) when the log's records are being flushed one by one.
    fn take_segment(&mut self, ctx: &Ctx, privileged: bool) -> Result<SegmentId> {
        let seg = self.choose_segment(ctx, privileged)?;
        let flushes = ctx.dev.flushes();
        let often = self.flushes_at_take.is_some_and(|before| {
            flushes.saturating_sub(before) * PREPARE_BLOCKS_PER_FLUSH >= self.geo.seg_blocks
        });
        self.flushes_at_take = Some(flushes);
        if often {
            let bytes = self.geo.seg_blocks * BLOCK_SIZE as u64;
            // The segment holds nothing of value (it is the log's now, to
            // overwrite), so a failure here only costs the speed-up.
            let _ = ctx
                .dev
                .prepare(self.geo.pba_of(seg, 0) * BLOCK_SIZE as u64, bytes);
        }
        Ok(seg)
    }

    /// [`Log::take_segment`] without preparing the segment.
    fn choose_segment(&mut self, ctx: &Ctx, privileged: bool) -> Result<SegmentId> {
        let bytes = self.geo.seg_blocks * BLOCK_SIZE as u64;
        if let Some(&floor) = self.free.iter().nth(self.geo.reserve as usize) {
            let after = SegmentId(self.cursor.0 + 1).max(floor);
            let seg = self.free.range(after..).next().copied().unwrap_or(floor);
            ctx.dev
                .allocate(self.geo.pba_of(seg, 0) * BLOCK_SIZE as u64, bytes)
                .map_err(|e| VolumeError::io(format!("reserving segment {seg}"), e))?;
            self.free.remove(&seg);
            self.cursor = seg;
            return Ok(seg);
        }
        if !self.growth_blocked && self.extent < self.geo.max_segments {
            let seg = SegmentId(self.extent);
            match ctx
                .dev
                .allocate(self.geo.pba_of(seg, 0) * BLOCK_SIZE as u64, bytes)
            {
                Ok(()) => {
                    self.extent = seg.0 + 1;
                    self.cursor = seg;
                    return Ok(seg);
                }
                Err(e) => {
                    let e = VolumeError::io(format!("reserving segment {seg}"), e);
                    if !e.is_no_space() {
                        return Err(e);
                    }
                    self.growth_blocked = true;
                    if !privileged {
                        return Err(e);
                    }
                }
            }
        }
        if privileged {
            if let Some(seg) = self.free.iter().next().copied() {
                // The reserve is kept allocated, so this normally succeeds.
                ctx.dev
                    .allocate(self.geo.pba_of(seg, 0) * BLOCK_SIZE as u64, bytes)
                    .map_err(|e| VolumeError::io(format!("reserving segment {seg}"), e))?;
                self.free.remove(&seg);
                return Ok(seg);
            }
        }
        Err(VolumeError::NoSpace(if privileged {
            "the volume's log has no free segment; delete or trim data".into()
        } else {
            "only the volume's reserve is left; delete or trim data".into()
        }))
    }

    /// Ends the head segment early: the next record starts the pre-chosen
    /// next segment, and a fresh one is chosen after it. (Recovery, finding
    /// no record where the head was, follows the chain to the next segment.)
    pub fn close_head(&mut self, ctx: &Ctx) -> Result<()> {
        let next = self.take_segment(ctx, true)?;
        self.head.segment = self.head.next_segment;
        self.head.offset = 0;
        self.head.next_segment = next;
        Ok(())
    }

    /// Appends `entries` (with `payload`, one sealed block per payload entry)
    /// as records at the log head; the last record carries COMMIT if
    /// `commit`. Returns the block address of each payload block.
    ///
    /// Every segment the append needs is taken before any record is
    /// written, so running out of space fails cleanly with no record
    /// written. A failed device write poisons the volume.
    pub fn append(
        &mut self,
        ctx: &Ctx,
        gens: &mut Checkpoints,
        entries: &[Entry],
        payload: &[u8],
        commit: bool,
        privileged: bool,
    ) -> Result<Vec<u64>> {
        if ctx.is_poisoned() {
            return Err(VolumeError::PreviousIo);
        }
        let (records, switches) = self.plan(entries);
        debug_assert_eq!(
            payload.len(),
            records.iter().map(|r| r.n_payload).sum::<usize>() * BLOCK_SIZE
        );
        let mut fresh = Vec::with_capacity(switches as usize);
        for _ in 0..switches {
            match self.take_segment(ctx, privileged) {
                Ok(s) => fresh.push(s),
                Err(e) => {
                    // No record was written: hand the segments back (a prepared
                    // one holds zeros, which is as good as what it held).
                    self.free.extend(fresh);
                    return Err(e);
                }
            }
        }
        let mut fresh = fresh.into_iter();
        let base_gen = gens.alloc_gens(ctx, records.len() as u64)?;
        let mut pbas = Vec::with_capacity(payload.len() / BLOCK_SIZE);
        let last = records.len().saturating_sub(1);
        let keys = ctx.keys.current();
        for (ri, r) in records.iter().enumerate() {
            if r.switch_before {
                self.head.segment = self.head.next_segment;
                self.head.offset = 0;
                self.head.next_segment = fresh.next().expect("planned switch has a segment");
            }
            let (segment, offset) = (self.head.segment, self.head.offset as u64);
            let head = SummaryHead {
                seq: self.head.seq,
                gen: base_gen + ri as u64,
                segment,
                next_segment: self.head.next_segment,
                offset: offset as u32,
                n_payload: r.n_payload as u16,
                n_other: (r.entries.len() - r.n_payload) as u16,
                flags: if commit && ri == last { FLAG_COMMIT } else { 0 },
                key_gen: keys.key_gen(),
                prev: self.head.anchor,
            };
            let (block, mac) = seal_summary(&keys, &head, &entries[r.entries.clone()]);
            let at = self.geo.pba_of(segment, offset);
            let body = &payload
                [r.payload_start * BLOCK_SIZE..(r.payload_start + r.n_payload) * BLOCK_SIZE];
            // In address order, so that a device that gathers writes which
            // continue each other (a file's) writes a small record, and a
            // run of them, as one.
            let written = ctx
                .dev
                .write_at(&block[..], at * BLOCK_SIZE as u64)
                .and_then(|_| ctx.dev.write_at(body, (at + 1) * BLOCK_SIZE as u64));
            if let Err(e) = written {
                ctx.poison();
                return Err(VolumeError::io(
                    format!("writing log record {} at block {at}", head.seq),
                    e,
                ));
            }
            pbas.extend((0..r.n_payload as u64).map(|i| at + 1 + i));
            self.head.seq += 1;
            self.head.offset += 1 + r.n_payload as u32;
            self.head.anchor = mac;
            self.blocks_since_checkpoint += 1 + r.n_payload as u64;
        }
        Ok(pbas)
    }

    /// Reads and authenticates the record at (`segment`, `offset`). Returns
    /// None if there is no valid record there (never written, torn, stale
    /// garbage, or past the end of the device).
    pub fn read_record(
        &self,
        ctx: &Ctx,
        segment: SegmentId,
        offset: u64,
    ) -> Result<Option<Record>> {
        let mut b: Box<Block> = Box::new([0u8; BLOCK_SIZE]);
        let at = self.geo.pba_of(segment, offset);
        match read_exact_at(ctx.dev, &mut b[..], at * BLOCK_SIZE as u64) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(VolumeError::io(format!("reading log block {at}"), e)),
        }
        Ok(open_summary(ctx, &mut b, segment, offset))
    }

    /// Reads the record at `(segment, offset)` if it is the one the chain
    /// expects next after `pos`, with every payload block authentic.
    pub fn chained_record(
        &self,
        ctx: &Ctx,
        pos: &LogPos,
        segment: SegmentId,
        offset: u64,
    ) -> Result<Option<Record>> {
        let Some(rec) = self.read_record(ctx, segment, offset)? else {
            return Ok(None);
        };
        if rec.head.seq != pos.seq || !rec.head.prev.ct_eq(&pos.anchor) {
            return Ok(None);
        }
        let n = rec.head.n_payload as usize;
        if n > 0 {
            let mut buf = vec![0u8; n * BLOCK_SIZE];
            let at = self.geo.pba_of(segment, offset + 1);
            match read_exact_at(ctx.dev, &mut buf, at * BLOCK_SIZE as u64) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(VolumeError::io(format!("reading log block {at}"), e)),
            }
            for (i, e) in rec.entries[..n].iter().enumerate() {
                let (tag, mac) = payload_seal(e).expect("payload entries come first");
                if !ctx
                    .keys
                    .verify(tag, &buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE], &mac)
                {
                    return Ok(None);
                }
            }
        }
        Ok(Some(rec))
    }
}

/// Builds and seals a summary block under `keys` (the head names their
/// generation). Returns it and its MAC.
fn seal_summary(keys: &GenKeys, head: &SummaryHead, entries: &[Entry]) -> (Box<Block>, Mac) {
    let mut b: Box<Block> = Box::new([0u8; BLOCK_SIZE]);
    head.encode(&mut b);
    encode_entries(entries, &mut b);
    let tag = Tag::new(BlockKind::Summary, head.seq, head.gen.0, head.key_gen);
    keys.encrypt(tag, &mut b[SUMMARY_BODY_AT..SUMMARY_MAC_AT]);
    let mac = keys.mac(tag, &b[..SUMMARY_MAC_AT]);
    b[SUMMARY_MAC_AT..].copy_from_slice(&mac.0);
    (b, mac)
}

/// Authenticates and decrypts a summary block read from (`segment`, `offset`).
pub fn open_summary(ctx: &Ctx, b: &mut Block, segment: SegmentId, offset: u64) -> Option<Record> {
    let head = SummaryHead::decode(b, ctx.header).ok()?;
    if head.segment != segment || head.offset as u64 != offset {
        return None;
    }
    let tag = Tag::new(BlockKind::Summary, head.seq, head.gen.0, head.key_gen);
    let keys = ctx.keys.get(head.key_gen)?;
    let mac = keys.mac(tag, &b[..SUMMARY_MAC_AT]);
    if !mac.ct_eq(&Mac(b[SUMMARY_MAC_AT..].try_into().ok()?)) {
        return None;
    }
    keys.decrypt(tag, &mut b[SUMMARY_BODY_AT..SUMMARY_MAC_AT]);
    let entries = decode_entries(b, &head, ctx.header.logical_blocks).ok()?;
    Some(Record { head, entries, mac })
}
