//! Rekey: every block sealed again under a new key generation, online.
//!
//! A new key generation takes effect for new blocks at once (see
//! [`crate::crypto::VolumeKeys`]). The blocks older generations seal are
//! moved the way the cleaner moves blocks, and the cleaner seals a block
//! it moves under the current generation whenever an older one sealed it
//! (`cleaner.rs`). So the pass is: close the log head (every record after
//! it is sealed under the new generation), then clean every segment that
//! holds a record sealed under an older generation, live or not, held by
//! snapshots or not. Live tree pages the cleaner meets are rewritten by the
//! next checkpoint, under the current generation; snapshot metadata too.
//!
//! Once no segment holds such a record and both checkpoint slots are sealed
//! under the current generation, nothing an older generation sealed is
//! reachable: their secrets leave the header, and generation 0 (derived
//! from the master key) is marked retired, so blocks they sealed no longer
//! open. A crash at any point leaves every block readable (the older
//! generations stay in the header until the end), and the pass starts over
//! at the next open, skipping the segments already done.

use std::collections::{BTreeMap, BTreeSet};

use super::ctx::Ctx;
use super::format::{MapEntry, TreeId, MAP_ENTRY_LEN};
use super::log::open_summary;
use super::state::{RekeyPass, State};
use super::tree::PageKey;
use crate::device::read_exact_at;
use crate::volume::{Lba, Result, SegmentId, VolumeError};
use crate::BLOCK_SIZE;

/// Where a rekey stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RekeyStatus {
    /// The generation new blocks are sealed under.
    pub current: u16,
    /// Every generation whose keys the volume still holds, ascending.
    pub generations: Vec<u16>,
    /// Generations below it are retired.
    pub retired_below: u16,
    /// Segments left to look at, of how many (0 of 0 when no pass runs).
    pub segments_left: u64,
    pub segments_total: u64,
    /// Blocks under an older generation that fail authentication: they
    /// keep that generation alive (see `lsvfs check`).
    pub unsealed: u64,
    /// The policy: rekey after this long (None: never) or this many bytes
    /// sealed (None: no limit) under one key generation.
    pub after_secs: Option<u64>,
    pub after_bytes: Option<u64>,
    /// How long the current generation has sealed new blocks, and how many
    /// bytes it has sealed (counted since it began, up to the last
    /// checkpoint before a crash).
    pub age_secs: u64,
    pub sealed_bytes: u64,
}

/// The default policy: a key generation is retired after 120 days.
pub const DEFAULT_REKEY_AFTER_SECS: u64 = 120 * 86_400;

impl RekeyStatus {
    /// Why a rekey is due under the policy, if it is (never while one runs).
    pub fn due(&self) -> Option<String> {
        if self.in_progress() {
            return None;
        }
        if let Some(a) = self.after_secs.filter(|a| self.age_secs >= *a) {
            return Some(format!(
                "key generation {} has sealed new blocks for {} s (the policy: {a} s)",
                self.current, self.age_secs
            ));
        }
        if let Some(b) = self.after_bytes.filter(|b| self.sealed_bytes >= *b) {
            return Some(format!(
                "key generation {} has sealed {} bytes (the policy: {b})",
                self.current, self.sealed_bytes
            ));
        }
        None
    }
}

impl RekeyStatus {
    /// Older generations remain.
    pub fn in_progress(&self) -> bool {
        self.generations.iter().any(|g| *g != self.current)
    }
}

/// Segments cleaned between checkpoints during a pass.
const CHECKPOINT_EVERY: u64 = 16;

impl State {
    /// Starts the pass (`resumed`: again, at an open): the head moves to a
    /// fresh segment, and every segment in use before is to be cleaned.
    pub fn rekey_begin(&mut self, ctx: &Ctx, resumed: bool) -> Result<()> {
        self.close_head(ctx)?;
        let todo: BTreeSet<SegmentId> = self
            .log
            .segments()
            .filter(|s| !self.log.is_head(*s) && !self.log.free.contains(s))
            .collect();
        self.rekey = Some(RekeyPass {
            total: todo.len() as u64,
            todo,
            since_checkpoint: 0,
            check_each: resumed,
            rechecks: 0,
        });
        self.checkpoint(ctx)
    }

    /// Ends the log head's segment early if anything is in it, so that
    /// every later record starts in a segment of its own (recovery follows
    /// the chain to the next segment when the current one has no record).
    fn close_head(&mut self, ctx: &Ctx) -> Result<()> {
        if self.log.head.offset == 0 {
            return Ok(());
        }
        self.log.close_head(ctx)
    }

    /// Whether segment `s` holds a record that an older key generation
    /// seals, or a block in such a record. Only the records of the
    /// segment's current use count: they start at its first block and
    /// follow each other in sequence. A segment taken again without being
    /// hole-punched (a reserve one) may hold older records after
    /// them, left from its last use and referenced by nothing.
    fn holds_older(&self, ctx: &Ctx, s: SegmentId, current: u16) -> Result<bool> {
        // The log head's segment is in use up to the head; the segment
        // chosen to follow it not yet.
        let end = match s {
            s if s == self.log.head.segment => self.log.head.offset as u64,
            s if s == self.log.head.next_segment => 0,
            _ => self.geo.seg_blocks,
        };
        let mut offset = 0u64;
        let mut next_seq = None;
        while offset < end {
            let at = self.geo.pba_of(s, offset);
            let mut b = Box::new([0u8; BLOCK_SIZE]);
            read_exact_at(ctx.dev, &mut b[..], at * BLOCK_SIZE as u64)
                .map_err(|e| VolumeError::io(format!("rekey reading log block {at}"), e))?;
            let head = super::format::SummaryHead::decode(&b, ctx.header);
            if let (Ok(h), Some(seq)) = (&head, next_seq) {
                if h.seq != seq {
                    return Ok(false);
                }
            }
            if head
                .is_ok_and(|h| h.segment == s && h.offset as u64 == offset && h.key_gen != current)
            {
                return Ok(true);
            }
            let Some(rec) = open_summary(ctx, &mut b, s, offset) else {
                return Ok(false);
            };
            if rec
                .entries
                .iter()
                .filter_map(super::ctx::payload_seal)
                .any(|(t, _)| t.key != current)
            {
                return Ok(true);
            }
            offset += 1 + rec.head.n_payload as u64;
            next_seq = Some(rec.head.seq + 1);
        }
        Ok(false)
    }

    /// Looks at the next segment of the pass and cleans it if an older key
    /// generation seals anything in it. Returns false once none is left
    /// (the caller then finishes the pass).
    pub fn rekey_step(&mut self, ctx: &Ctx) -> Result<bool> {
        let current = ctx.keys.current().key_gen();
        loop {
            let Some(pass) = self.rekey.as_mut() else {
                return Ok(false);
            };
            let Some(s) = pass.todo.pop_first() else {
                return Ok(false);
            };
            if self.log.is_head(s) || self.log.free.contains(&s) || self.log.cleaned.contains(&s) {
                continue;
            }
            if pass.check_each && !self.holds_older(ctx, s, current)? {
                continue;
            }
            // Room to copy its live blocks and checkpoint afterwards, as the
            // cleaner needs; cleaned segments free at the checkpoint.
            let live = self.usage.live(s);
            if self.log.available() < self.room_to_clean(live) + self.geo.reserve {
                // Segments emptied since the last checkpoint free with the
                // next; the emptiest ones are cleaned first if that is not
                // enough (the cleaner seals what it moves under the current
                // generation too).
                self.checkpoint(ctx)?;
                let mut rounds = 0;
                // The pass is work that can wait: it leaves the reserve to
                // what frees space.
                let room = |st: &State| st.room_to_clean(live) + st.geo.reserve;
                while self.log.available() < room(self) && rounds < 4 {
                    rounds += 1;
                    if self.clean_batch(ctx)? == 0 {
                        break;
                    }
                    self.checkpoint(ctx)?;
                }
                if self.log.available() < room(self) {
                    if let Some(p) = self.rekey.as_mut() {
                        p.todo.insert(s);
                    }
                    return Err(VolumeError::NoSpace(format!(
                        "the rekey needs room to move segment {s} ({live} blocks); delete or \
                         trim data, then it goes on by itself"
                    )));
                }
            }
            // The next segment is read while this one is sealed again.
            if let Some(next) = self.rekey.as_ref().and_then(|p| p.todo.first()) {
                let bytes = self.geo.seg_blocks * BLOCK_SIZE as u64;
                ctx.dev
                    .will_need(self.geo.pba_of(*next, 0) * BLOCK_SIZE as u64, bytes);
            }
            self.clean_one(ctx, s)?;
            // Written back now rather than all at once by the next flush,
            // which another process's fsync may be waiting for.
            ctx.dev.write_behind();
            let pass = self.rekey.as_mut().expect("the pass is running");
            pass.since_checkpoint += 1;
            if pass.since_checkpoint >= CHECKPOINT_EVERY {
                pass.since_checkpoint = 0;
                self.checkpoint(ctx)?;
            }
            return Ok(true);
        }
    }

    /// Before older generations are retired: every segment in use is looked
    /// at again, and those still holding a record or block an older
    /// generation seals become the pass's list (the log head is closed
    /// first if it is one of them). Returns whether any was found. After
    /// three rounds that keep finding some, it fails instead: retiring would
    /// make them unreadable.
    pub fn rekey_recheck(&mut self, ctx: &Ctx, round: u32) -> Result<bool> {
        let current = ctx.keys.current().key_gen();
        let mut left = BTreeSet::new();
        for s in self.log.segments().collect::<Vec<_>>() {
            if !self.log.free.contains(&s)
                && !self.log.cleaned.contains(&s)
                && self.holds_older(ctx, s, current)?
            {
                left.insert(s);
            }
        }
        if left.is_empty() {
            return Ok(false);
        }
        if round >= 3 {
            return Err(VolumeError::Corrupted(format!(
                "the rekey could not seal segments {left:?} under key generation {current}; the \
                 older generations stay; run lsvfs check"
            )));
        }
        if left.iter().any(|s| self.log.is_head(*s)) {
            self.close_head(ctx)?;
        }
        self.rekey = Some(RekeyPass {
            total: left.len() as u64,
            todo: left,
            since_checkpoint: 0,
            check_each: true,
            rechecks: round + 1,
        });
        Ok(true)
    }

    /// Counts, into `n`, the data blocks of the live map in `blocks` blocks
    /// from `lba` by the key generation that seals them (absent map
    /// subtrees are skipped unread).
    pub fn count_by_key_gen(
        &mut self,
        ctx: &Ctx,
        lba: Lba,
        blocks: u64,
        n: &mut BTreeMap<u16, u64>,
    ) -> Result<()> {
        let blocks = blocks.min(self.geo.logical_blocks.saturating_sub(lba.0));
        if blocks == 0 {
            return Ok(());
        }
        self.for_each_present_map_leaf(ctx, lba, blocks, &mut |st, leaf| {
            let page = st.trees.get(ctx, PageKey::leaf(TreeId::Map, leaf))?;
            for e in page.chunks_exact(MAP_ENTRY_LEN).map(MapEntry::decode) {
                if e.is_stored() {
                    *n.entry(e.key_gen).or_default() += 1;
                }
            }
            Ok(())
        })
    }

    /// Counts, into `n`, the blocks only snapshots hold by the key
    /// generation that seals them.
    pub fn count_held_by_key_gen(&self, n: &mut BTreeMap<u16, u64>) {
        let held = &self.usage.held;
        for g in held.table.keys() {
            *n.entry(held.seals.get(g).map_or(0, |s| s.0)).or_default() += 1;
        }
    }

    /// Where the pass stands, as the caller's key ring sees it; `started`
    /// is when the current key generation began (Unix seconds).
    pub fn rekey_status(&self, ctx: &Ctx, retired_below: u16, started: u64) -> RekeyStatus {
        let (left, total) = self
            .rekey
            .as_ref()
            .map_or((0, 0), |p| (p.todo.len() as u64, p.total));
        RekeyStatus {
            current: ctx.keys.current().key_gen(),
            generations: ctx.keys.generations(),
            retired_below,
            segments_left: left,
            segments_total: total,
            unsealed: self.unsealed,
            after_secs: match self.rekey_after_secs {
                0 => Some(DEFAULT_REKEY_AFTER_SECS),
                u64::MAX => None,
                s => Some(s),
            },
            after_bytes: (self.rekey_after_bytes != 0).then_some(self.rekey_after_bytes),
            age_secs: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .saturating_sub(started),
            sealed_bytes: self.sealed_blocks * BLOCK_SIZE as u64,
        }
    }
}
