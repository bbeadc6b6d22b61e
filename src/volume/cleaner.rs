//! The segment cleaner: copies what is still live out of the emptiest
//! segments so whole segments can be reused.
//!
//! Live data blocks are copied as ciphertext, verbatim, with their
//! generation and MAC: the tweak and MAC depend on the logical address and
//! generation, not on the location, so nothing is re-encrypted and no
//! (key, tweak) pair is ever used for different contents. Live metadata
//! pages are simply marked dirty; the next checkpoint rewrites them.
//! Cleaned segments become free at the next checkpoint, once nothing
//! durable refers to them.

use super::format::{Entry, TreeId};
use super::state::State;
use super::tree::PageKey;
use super::Ctx;
use crate::device::read_exact_at;
use crate::{Error, Result, BLOCK_SIZE};

/// Victims cleaned between two checkpoints when space runs short.
const CLEAN_BATCH: usize = 32;

impl State {
    /// Makes sure `needed` segments (plus the reserve) are available,
    /// checkpointing and cleaning as required. Fails with NoSpace when the
    /// live data leaves no room.
    pub fn ensure_space(&mut self, ctx: &Ctx, needed: u64) -> Result<()> {
        let want = needed + self.reserve;
        if self.available() >= want {
            return Ok(());
        }
        // Segments emptied by overwrites and trims since the last checkpoint
        // become free with the next one.
        self.checkpoint(ctx)?;
        let mut rounds = 0;
        while self.available() < want && rounds < 4 * self.extent.max(16) {
            rounds += 1;
            if self.clean_batch(ctx)? == 0 {
                break;
            }
            self.checkpoint(ctx)?;
        }
        if self.available() >= want {
            return Ok(());
        }
        if self.growth_blocked {
            // The host may have freed space since: let the next segment
            // allocation try growing the backing file again.
            self.growth_blocked = false;
            if self.available() >= want {
                return Ok(());
            }
        }
        Err(Error::NoSpace(format!(
            "the volume is full ({} of {} logical blocks in use, {} free segments); delete or trim data",
            self.allocated,
            self.logical_blocks,
            self.available()
        )))
    }

    /// Cleans victims while the space they consume leaves room for the
    /// checkpoint that frees them: many victims per checkpoint, so the
    /// checkpoint's own writes are paid once per batch.
    pub fn clean_batch(&mut self, ctx: &Ctx) -> Result<usize> {
        let mut n = 0;
        while n < CLEAN_BATCH && self.available() >= self.room_to_clean() {
            if !self.clean_one(ctx)? {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Segments that must be free to clean one more victim and still write
    /// the checkpoint afterwards: the victim's live blocks (at most a
    /// segment), the pages dirty now, the pages the victim can dirty (at
    /// most one per block), and one spare.
    fn room_to_clean(&self) -> u64 {
        let usable = self.seg_blocks
            - self
                .seg_blocks
                .div_ceil(super::format::ENTRIES_PER_RECORD as u64 + 1);
        let pages = self.trees.dirty_count() as u64 + self.seg_blocks;
        1 + (pages * 11 / 10).div_ceil(usable) + 1
    }

    /// The segment with the fewest live blocks that is worth cleaning.
    pub fn pick_victim(&self) -> Option<u64> {
        let worth = self.seg_blocks - self.seg_blocks / 8;
        (0..self.extent)
            .filter(|s| {
                *s != self.head.segment
                    && *s != self.head.next_segment
                    && !self.free.contains(s)
                    && !self.cleaned.contains(s)
            })
            .map(|s| (self.usage.live(s), s))
            .filter(|(live, _)| *live < worth)
            .min()
            .map(|(_, s)| s)
    }

    /// Cleans one victim segment. Returns false if no segment is worth it.
    pub fn clean_one(&mut self, ctx: &Ctx) -> Result<bool> {
        let Some(victim) = self.pick_victim() else {
            return Ok(false);
        };
        self.cleaned.insert(victim);
        if self.usage.live(victim) == 0 {
            return Ok(true);
        }
        let seg_bytes = self.seg_blocks as usize * BLOCK_SIZE;
        let mut seg = vec![0u8; seg_bytes];
        let start = self.pba_of(victim, 0);
        read_exact_at(ctx.dev, &mut seg, start * BLOCK_SIZE as u64)
            .map_err(|e| Error::io(format!("cleaner reading segment {victim}"), e))?;

        let mut moves: Vec<(Entry, usize)> = Vec::new();
        let mut offset = 0u64;
        while offset < self.seg_blocks {
            let o = offset as usize * BLOCK_SIZE;
            let mut b = Box::new([0u8; BLOCK_SIZE]);
            b.copy_from_slice(&seg[o..o + BLOCK_SIZE]);
            let Some(rec) = super::log::open_summary(ctx, &mut b, victim, offset) else {
                break;
            };
            for (i, e) in rec.entries[..rec.head.n_payload as usize]
                .iter()
                .enumerate()
            {
                let pba = start + offset + 1 + i as u64;
                match *e {
                    Entry::Write { lba, gen, mac } | Entry::Relocate { lba, gen, mac } => {
                        let cur = self.lookup(ctx, lba)?;
                        if cur.pba == pba && cur.gen == gen {
                            moves.push((
                                Entry::Relocate { lba, gen, mac },
                                (offset + 1) as usize + i,
                            ));
                        }
                    }
                    Entry::TreePage {
                        tree, level, index, ..
                    } => {
                        let key = PageKey { tree, level, index };
                        let (ptr, dirty) = self.trees.current_ptr(ctx, key)?;
                        if !dirty && ptr.pba == pba {
                            let State { trees, usage, .. } = self;
                            trees.get_mut(ctx, key, &mut |t, p| usage.superseded(t, p))?;
                            if tree == TreeId::SegmentUsage && level == 0 {
                                // Its content is rebuilt from the counters.
                                self.usage.dirty_leaves.insert(index);
                            }
                        }
                    }
                    Entry::Trim { .. } => {}
                }
            }
            offset += 1 + rec.head.n_payload as u64;
        }
        if moves.is_empty() {
            return Ok(true);
        }
        let mut payload = Vec::with_capacity(moves.len() * BLOCK_SIZE);
        for (_, blk) in &moves {
            payload.extend_from_slice(&seg[blk * BLOCK_SIZE..(blk + 1) * BLOCK_SIZE]);
        }
        let entries: Vec<Entry> = moves.into_iter().map(|(e, _)| e).collect();
        let pbas = self.append(ctx, &entries, &payload, true)?;
        self.apply(ctx, &entries, &pbas)
            .inspect_err(|_| self.poisoned = true)?;
        Ok(true)
    }
}
