//! Opening a volume: choosing the newest valid checkpoint, loading segment
//! usage, and rolling the log forward past the checkpoint.
//!
//! Roll-forward follows the record chain from the checkpoint's log head.
//! A record counts only if its summary authenticates, it carries the
//! expected sequence number and the MAC of its predecessor, and every one of
//! its payload blocks authenticates. Records are applied a transaction at a
//! time, when the COMMIT record arrives; a transaction whose tail is missing
//! (a crash mid-write) is dropped whole, and the log head goes back to where
//! it started. A writable open then erases the dropped transaction's first
//! summary, so the chain can only continue through records written later.

use super::format::{
    Block, Checkpoint, DecodeError, Entry, LogPos, TreeId, CHECKPOINT_BLOCKS, CHECKPOINT_MAC_AT,
};
use super::log::Record;
use super::state::{State, USAGE_PER_PAGE};
use super::tree::PageKey;
use super::Ctx;
use crate::crypto::{BlockKind, Mac, Tag};
use crate::device::read_exact_at;
use crate::{Error, Result, BLOCK_SIZE};

/// What roll-forward found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records replayed (committed transactions only).
    pub records: u64,
    /// Transactions replayed.
    pub transactions: u64,
    /// Records of an incomplete trailing transaction that were dropped.
    pub dropped_records: u64,
    /// Segments the log wrote after the checkpoint (committed or not).
    pub touched: std::collections::BTreeSet<u64>,
    /// Block address of the first dropped record's summary, if any.
    pub dropped_at: Option<u64>,
}

/// Reads both checkpoint slots and returns the newest that authenticates.
pub fn read_checkpoint(ctx: &Ctx) -> Result<Checkpoint> {
    let mut best: Option<Checkpoint> = None;
    let mut why = Vec::new();
    for (slot, blk) in CHECKPOINT_BLOCKS.iter().enumerate() {
        let mut b: Box<Block> = Box::new([0u8; BLOCK_SIZE]);
        if let Err(e) = read_exact_at(ctx.dev, &mut b[..], blk * BLOCK_SIZE as u64) {
            why.push(format!("slot {slot}: {e}"));
            continue;
        }
        let seq = u64::from_le_bytes(b[32..40].try_into().expect("8 bytes"));
        let mac = ctx.keys.mac(
            Tag::new(BlockKind::Checkpoint, slot as u64, seq),
            &b[..CHECKPOINT_MAC_AT],
        );
        if !mac.ct_eq(&Mac(b[CHECKPOINT_MAC_AT..].try_into().expect("16 bytes"))) {
            why.push(format!("slot {slot}: {}", DecodeError::Mac));
            continue;
        }
        match Checkpoint::decode(&b, ctx.header) {
            Ok(c) if c.seq % 2 == slot as u64 => {
                if best.as_ref().is_none_or(|b| c.seq > b.seq) {
                    best = Some(c);
                }
            }
            Ok(c) => why.push(format!(
                "slot {slot}: sequence {} belongs in the other slot",
                c.seq
            )),
            Err(e) => why.push(format!("slot {slot}: {e}")),
        }
    }
    best.ok_or_else(|| Error::Corrupted(format!("no valid checkpoint ({})", why.join("; "))))
}

impl State {
    /// Loads segment usage for the segments in use, and counts the pages of
    /// the usage tree itself.
    pub fn load_usage(&mut self, ctx: &Ctx) -> Result<()> {
        self.usage.live = vec![0; self.extent as usize];
        for leaf in 0..self.extent.div_ceil(USAGE_PER_PAGE) {
            let page = self
                .trees
                .get(ctx, PageKey::leaf(TreeId::SegmentUsage, leaf))?;
            for i in 0..USAGE_PER_PAGE {
                let seg = leaf * USAGE_PER_PAGE + i;
                if seg < self.extent {
                    let o = i as usize * 4;
                    self.usage.live[seg as usize] =
                        u32::from_le_bytes(page[o..o + 4].try_into().expect("4 bytes"));
                }
            }
        }
        let mut pages = Vec::new();
        self.trees
            .visit(ctx, TreeId::SegmentUsage, &mut |_, ptr, _, _| {
                pages.push(ptr.pba)
            })?;
        for pba in pages {
            let s = self.usage.segment_of(pba);
            *self.usage.usage_pages.entry(s).or_insert(0) += 1;
        }
        self.usage.dirty_leaves.clear();
        Ok(())
    }

    /// Reads the record at `(segment, offset)` if it is the one the chain
    /// expects next after `pos`, with every payload block authentic.
    fn chained_record(
        &self,
        ctx: &Ctx,
        pos: &LogPos,
        segment: u64,
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
            let at = self.pba_of(segment, offset + 1);
            match read_exact_at(ctx.dev, &mut buf, at * BLOCK_SIZE as u64) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(Error::io(format!("reading log block {at}"), e)),
            }
            for (i, e) in rec.entries[..n].iter().enumerate() {
                let (tag, mac) = match *e {
                    Entry::Write { lba, gen, mac } | Entry::Relocate { lba, gen, mac } => {
                        (Tag::new(BlockKind::Data, lba, gen), mac)
                    }
                    Entry::TreePage {
                        tree,
                        level,
                        index,
                        gen,
                        mac,
                    } => (
                        Tag::new(
                            BlockKind::TreePage,
                            super::format::page_addr(tree, level, index),
                            gen,
                        ),
                        mac,
                    ),
                    Entry::Trim { .. } => unreachable!("payload entries come first"),
                };
                if !ctx
                    .keys
                    .mac(tag, &buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE])
                    .ct_eq(&mac)
                {
                    return Ok(None);
                }
            }
        }
        Ok(Some(rec))
    }

    /// Segments that may be reused before the first checkpoint after open:
    /// those empty at the checkpoint that the log has not written since.
    pub fn free_after_recovery(&mut self, empty_at_checkpoint: &[u64], r: &Recovery) {
        self.free = empty_at_checkpoint
            .iter()
            .copied()
            .filter(|s| {
                !r.touched.contains(s) && *s != self.head.segment && *s != self.head.next_segment
            })
            .collect();
    }

    /// Replays every committed transaction after the checkpoint.
    pub fn roll_forward(&mut self, ctx: &Ctx) -> Result<Recovery> {
        let mut stats = Recovery::default();
        let mut pos = self.head;
        let mut pending: Vec<(Record, u64)> = Vec::new();
        loop {
            let here = if (pos.offset as u64) < self.seg_blocks {
                self.chained_record(ctx, &pos, pos.segment, pos.offset as u64)?
            } else {
                None
            };
            let rec = match here {
                Some(r) => r,
                None => match self.chained_record(ctx, &pos, pos.next_segment, 0)? {
                    Some(r) => {
                        pos.segment = pos.next_segment;
                        pos.offset = 0;
                        r
                    }
                    None => break,
                },
            };
            let at = self.pba_of(pos.segment, pos.offset as u64);
            pos.next_segment = rec.head.next_segment;
            pos.offset += 1 + rec.head.n_payload as u32;
            pos.seq += 1;
            pos.anchor = rec.mac;
            self.extent = self.extent.max(pos.segment + 1).max(pos.next_segment + 1);
            stats.touched.insert(pos.segment);
            let commit = rec.head.commit();
            pending.push((rec, at));
            if commit {
                if self.usage.live.len() < self.extent as usize {
                    self.usage.live.resize(self.extent as usize, 0);
                }
                for (r, at) in pending.drain(..) {
                    let pbas: Vec<u64> = (0..r.head.n_payload as u64).map(|i| at + 1 + i).collect();
                    self.apply(ctx, &r.entries, &pbas)?;
                    self.log_blocks_since_checkpoint += 1 + r.head.n_payload as u64;
                    stats.records += 1;
                }
                stats.transactions += 1;
                self.head = pos;
            }
        }
        stats.dropped_records = pending.len() as u64;
        stats.dropped_at = pending.first().map(|(_, at)| *at);
        Ok(stats)
    }

    /// Erases the first record of a dropped transaction. It carries the
    /// sequence number and chain MAC that the next record will carry; if the
    /// next record were written elsewhere (the next segment), a later
    /// recovery would follow this stale one and lose what came after.
    pub fn erase_dropped(&mut self, ctx: &Ctx, r: &Recovery) -> Result<()> {
        if let Some(at) = r.dropped_at {
            ctx.dev
                .write_at(&[0u8; BLOCK_SIZE], at * BLOCK_SIZE as u64)
                .and_then(|_| ctx.dev.flush())
                .map_err(|e| {
                    Error::io(format!("erasing the dropped log record at block {at}"), e)
                })?;
        }
        Ok(())
    }
}
