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

use zeroize::Zeroize;

use super::ctx::{payload_seal, with_seal, Ctx};
use super::format::{Entry, TreeId, ENTRIES_PER_RECORD, TREES};
use super::geometry::usable_per_segment;
use super::log::open_summary;
use super::state::State;
use super::tree::PageKey;
use crate::crypto::{Mac, Tag};
use crate::device::read_exact_at;
use crate::volume::{Generation, Result, SegmentId, VolumeError};
use crate::BLOCK_SIZE;

/// Victims cleaned between two checkpoints when space runs short.
const CLEAN_BATCH: usize = 32;

impl State {
    /// Blocks a checkpoint of `pages` dirty pages writes: the pages, the
    /// usage pages their placement dirties, and one summary per tree level
    /// (plus one per 100 pages).
    fn checkpoint_blocks(&self, pages: u64) -> u64 {
        let levels: u64 = TREES
            .iter()
            .map(|t| self.trees.shape(*t).depth as u64 + 1)
            .sum();
        let meta = self.snaps.meta_pages_needed(&self.usage.held);
        pages + meta + 4 + levels + (pages + meta).div_ceil(ENTRIES_PER_RECORD as u64)
    }

    /// Segments `blocks` of log may take from the current head: a new
    /// segment can leave the tail of the previous one unused.
    fn segments_for(&self, blocks: u64) -> u64 {
        let usable = usable_per_segment(self.geo.seg_blocks);
        blocks.div_ceil(usable) + 1
    }

    /// Segments a checkpoint of `pages` dirty pages may need.
    pub fn checkpoint_segments(&self, pages: u64) -> u64 {
        self.segments_for(self.checkpoint_blocks(pages))
    }

    /// Whether appending `entries` fits together with the checkpoint that
    /// will write every dirty page. Ordinary appends must leave the whole
    /// reserve after both, so the cleaner can always run; privileged ones
    /// (which free space) may use the reserve. The plan depends on the log
    /// head, which a checkpoint moves, so it is made afresh each time.
    fn fits(&self, entries: &[Entry], new_pages: u64, privileged: bool) -> bool {
        let needed = self.log.segments_needed(entries);
        let checkpoint = self.checkpoint_segments(self.trees.dirty_count() as u64 + new_pages);
        // Ordinary writes leave the reserve; appends that free space may use
        // it but must leave room to clean the worst victim afterwards.
        let keep = if privileged {
            self.room_to_clean(self.worth())
        } else {
            self.geo.reserve
        };
        self.log.available() >= needed + checkpoint + keep
            && (privileged || self.log.user_available() >= needed)
    }

    /// Makes sure appending `entries` can proceed and still be
    /// checkpointed, checkpointing and cleaning as required. Fails with
    /// NoSpace, with nothing written, when the live data leaves no room.
    pub fn ensure_space(&mut self, ctx: &Ctx, entries: &[Entry], privileged: bool) -> Result<()> {
        let new_pages = self.pages_touched(entries);
        if self.fits(entries, new_pages, privileged) {
            return Ok(());
        }
        // Segments emptied by overwrites and trims since the last checkpoint
        // become free with the next one, and it leaves no page dirty.
        self.checkpoint(ctx)?;
        let mut rounds = 0;
        while !self.fits(entries, new_pages, privileged) && rounds < 4 * self.log.extent.max(16) {
            rounds += 1;
            if self.clean_batch(ctx)? == 0 {
                break;
            }
            self.checkpoint(ctx)?;
        }
        if self.fits(entries, new_pages, privileged) {
            return Ok(());
        }
        if self.log.growth_blocked {
            // The host may have freed space since: let the next segment
            // allocation try growing the backing file again.
            self.log.growth_blocked = false;
            if self.fits(entries, new_pages, privileged) {
                return Ok(());
            }
        }
        Err(VolumeError::NoSpace(format!(
            "the volume is full ({} of {} logical blocks in use, {} free segments); delete or trim data",
            self.allocated,
            self.geo.logical_blocks,
            self.log.available()
        )))
    }

    /// Cleans victims while the space they consume leaves room for the
    /// checkpoint that frees them: many victims per checkpoint, so the
    /// checkpoint's own writes are paid once per batch.
    pub fn clean_batch(&mut self, ctx: &Ctx) -> Result<usize> {
        let mut n = 0;
        while n < CLEAN_BATCH {
            let Some(victim) = self.pick_victim() else {
                break;
            };
            if self.log.available() < self.room_to_clean(self.usage.live(victim)) {
                break;
            }
            self.clean_one(ctx, victim)?;
            n += 1;
        }
        Ok(n)
    }

    /// Segments that must be available to clean a victim with `live` live
    /// blocks and still write the checkpoint afterwards: the copies of its
    /// live blocks with their summaries, then a checkpoint of the pages dirty
    /// now plus those the victim can dirty (at most one per block).
    pub(super) fn room_to_clean(&self, live: u64) -> u64 {
        let copies = live + live.div_ceil(ENTRIES_PER_RECORD as u64);
        let pages = self.trees.dirty_count() as u64 + live;
        self.segments_for(copies + self.checkpoint_blocks(pages))
    }

    /// Segments with fewer live blocks than this are worth cleaning.
    fn worth(&self) -> u64 {
        self.geo.seg_blocks - self.geo.seg_blocks / 8
    }

    /// The segment with the fewest live blocks that is worth cleaning.
    pub fn pick_victim(&self) -> Option<SegmentId> {
        let worth = self.worth();
        self.log
            .segments()
            .filter(|s| {
                !self.log.is_head(*s) && !self.log.free.contains(s) && !self.log.cleaned.contains(s)
            })
            .map(|s| (self.usage.live(s), s))
            .filter(|(live, _)| *live < worth)
            .min()
            .map(|(_, s)| s)
    }

    /// Cleans one victim segment: copies its live blocks to the log head.
    pub fn clean_one(&mut self, ctx: &Ctx, victim: SegmentId) -> Result<()> {
        self.log.cleaned.insert(victim);
        if self.usage.live(victim) == 0 {
            return Ok(());
        }
        let seg_bytes = self.geo.seg_blocks as usize * BLOCK_SIZE;
        let mut seg = vec![0u8; seg_bytes];
        let start = self.geo.pba_of(victim, 0);
        read_exact_at(ctx.dev, &mut seg, start * BLOCK_SIZE as u64)
            .map_err(|e| VolumeError::io(format!("cleaner reading segment {victim}"), e))?;

        let mut moves: Vec<(Entry, usize)> = Vec::new();
        // Blocks only snapshots hold, moved verbatim: (index in `moves`,
        // generation, old location).
        let mut held_moves: Vec<(usize, Generation, u64)> = Vec::new();
        let mut offset = 0u64;
        while offset < self.geo.seg_blocks {
            let o = offset as usize * BLOCK_SIZE;
            let mut b = Box::new([0u8; BLOCK_SIZE]);
            b.copy_from_slice(&seg[o..o + BLOCK_SIZE]);
            let Some(rec) = open_summary(ctx, &mut b, victim, offset) else {
                break;
            };
            for (i, e) in rec.entries[..rec.head.n_payload as usize]
                .iter()
                .enumerate()
            {
                let pba = start + offset + 1 + i as u64;
                match *e {
                    Entry::Write { lba, gen, .. } | Entry::Relocate { lba, gen, .. } => {
                        let (tag, mac) = payload_seal(e).expect("a write has payload");
                        let cur = self.lookup(ctx, lba)?;
                        let live = cur.pba == pba && cur.gen == gen;
                        if live || self.usage.held.is_at(gen, pba) {
                            if !live {
                                held_moves.push((moves.len(), gen, pba));
                            }
                            moves.push((
                                Entry::Relocate {
                                    lba,
                                    gen,
                                    key_gen: tag.key,
                                    mac,
                                },
                                (offset + 1) as usize + i,
                            ));
                        }
                    }
                    Entry::TreePage {
                        tree: TreeId::SnapMeta,
                        ..
                    } => {
                        if self.snaps.is_meta_page(pba) {
                            // The next checkpoint writes the metadata afresh.
                            self.snaps.meta_dirty = true;
                        }
                    }
                    Entry::TreePage {
                        tree,
                        level,
                        index,
                        gen,
                        ..
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
                        // A page snapshots share (perhaps held just now, as
                        // the live tree let go of it) moves as it is.
                        if self.usage.held.is_at(gen, pba) {
                            held_moves.push((moves.len(), gen, pba));
                            moves.push((*e, (offset + 1) as usize + i));
                        }
                    }
                    Entry::Trim { .. } | Entry::Zero { .. } => {}
                }
            }
            offset += 1 + rec.head.n_payload as u64;
        }
        if moves.is_empty() {
            return Ok(());
        }
        let mut payload = Vec::with_capacity(moves.len() * BLOCK_SIZE);
        for (_, blk) in &moves {
            payload.extend_from_slice(&seg[blk * BLOCK_SIZE..(blk + 1) * BLOCK_SIZE]);
        }
        let sources: Vec<usize> = moves.iter().map(|(_, blk)| *blk).collect();
        let mut entries: Vec<Entry> = moves.into_iter().map(|(e, _)| e).collect();
        if !reseal_all(ctx, &mut entries, &mut payload) {
            // Some block did not open: `payload` is half opened. Start
            // again from the segment, one block at a time.
            for (i, blk) in sources.iter().enumerate() {
                payload[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]
                    .copy_from_slice(&seg[blk * BLOCK_SIZE..(blk + 1) * BLOCK_SIZE]);
            }
        }
        // Whatever an older generation still seals (none after `reseal_all`
        // did them all; some when only some were older).
        self.unsealed += reseal(ctx, &mut entries, &mut payload);
        self.prefetch(ctx, &entries)?;
        let pbas = self.append(ctx, &entries, &payload, true, true)?;
        self.apply(ctx, &entries, &pbas)
            .inspect_err(|_| ctx.poison())?;
        // `apply` ignores these (the live map does not have them): the held
        // table follows them instead, durable with the next checkpoint.
        for (j, gen, old) in held_moves {
            let (tag, mac) = payload_seal(&entries[j]).expect("a moved block has payload");
            self.usage.held_moved(gen, old, pbas[j], tag.key, mac);
        }
        Ok(())
    }
}

/// The rekey's usual case: every moved block is sealed under an older key
/// generation and authentic. Opens and seals them again in place, in
/// parallel batches. Returns false, with `payload` half opened, if a block
/// fails to open (the caller then takes the slow path, [`reseal`]); true,
/// changing nothing, if some block is already sealed under the current
/// generation (then [`reseal`] does the older ones).
fn reseal_all(ctx: &Ctx, entries: &mut [Entry], payload: &mut [u8]) -> bool {
    let current = ctx.keys.current();
    let key_gen = current.key_gen();
    let Some(seals) = entries
        .iter()
        .map(payload_seal)
        .collect::<Option<Vec<(Tag, Mac)>>>()
    else {
        return true;
    };
    if seals.is_empty() || seals.iter().any(|(t, _)| t.key == key_gen) {
        return true;
    }
    let tags: Vec<Tag> = seals.iter().map(|s| s.0).collect();
    let macs: Vec<Mac> = seals.iter().map(|s| s.1).collect();
    if ctx.engine.open(ctx.keys, payload, &tags, &macs).is_err() {
        return false;
    }
    let new_tags: Vec<Tag> = tags.iter().map(|t| Tag { key: key_gen, ..*t }).collect();
    let mut new_macs = vec![Mac::default(); tags.len()];
    ctx.engine.seal(&current, payload, &new_tags, &mut new_macs);
    for (e, m) in entries.iter_mut().zip(new_macs) {
        *e = with_seal(*e, key_gen, m);
    }
    true
}

/// Seals again, under the current key generation, every block in `payload`
/// that an older one seals (a rekey in progress), and updates its entry. A
/// block that fails authentication under its old key is left as it is
/// (moved verbatim): sealing it again would launder the damage. Returns how
/// many were left so.
fn reseal(ctx: &Ctx, entries: &mut [Entry], payload: &mut [u8]) -> u64 {
    let current = ctx.keys.current();
    let key_gen = current.key_gen();
    let old: Vec<(usize, Tag, Mac)> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| payload_seal(e).map(|(t, m)| (i, t, m)))
        .filter(|(_, t, _)| t.key != key_gen)
        .collect();
    if old.is_empty() {
        return 0;
    }
    let block = |i: usize| i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE;
    let mut buf = Vec::with_capacity(old.len() * BLOCK_SIZE);
    for (i, _, _) in &old {
        buf.extend_from_slice(&payload[block(*i)]);
    }
    let tags: Vec<Tag> = old.iter().map(|o| o.1).collect();
    let macs: Vec<Mac> = old.iter().map(|o| o.2).collect();
    // Every block authentic (the usual case): opened in one parallel batch.
    // Otherwise one at a time, keeping the ones that open.
    let opened: Vec<bool> = if ctx.engine.open(ctx.keys, &mut buf, &tags, &macs).is_ok() {
        vec![true; old.len()]
    } else {
        old.iter()
            .enumerate()
            .map(|(j, (i, t, m))| {
                buf[block(j)].copy_from_slice(&payload[block(*i)]);
                ctx.keys.open(*t, &mut buf[block(j)], m).is_ok()
            })
            .collect()
    };
    let keep: Vec<usize> = (0..old.len()).filter(|&j| opened[j]).collect();
    let mut plain = Vec::with_capacity(keep.len() * BLOCK_SIZE);
    let mut new_tags = Vec::with_capacity(keep.len());
    for &j in &keep {
        plain.extend_from_slice(&buf[block(j)]);
        new_tags.push(Tag {
            key: key_gen,
            ..tags[j]
        });
    }
    buf.zeroize();
    let mut new_macs = vec![Mac::default(); keep.len()];
    ctx.engine
        .seal(&current, &mut plain, &new_tags, &mut new_macs);
    for (n, &j) in keep.iter().enumerate() {
        let i = old[j].0;
        payload[block(i)].copy_from_slice(&plain[block(n)]);
        entries[i] = with_seal(entries[i], key_gen, new_macs[n]);
    }
    (old.len() - keep.len()) as u64
}
