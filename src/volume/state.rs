//! The mutable state of an open volume: the parts it is made of, and the
//! operations that need several of them (apply a record, write a
//! checkpoint).
//!
//! | part | type | owns |
//! |------|------|------|
//! | geometry | [`Geometry`] | sizes fixed at creation |
//! | log | [`Log`] | the log head, free and cleaned segments, the extent |
//! | checkpoints | [`Checkpoints`] | the last durable checkpoint, write generations |
//! | trees | [`Trees`] | the block map, the bitmaps and segment usage, cached |
//! | usage | [`Usage`] | live blocks per segment, the held table |
//! | snapshots | [`Snapshots`] | the snapshot list and its stored metadata |

use std::collections::BTreeSet;
use std::sync::Arc;

use super::checkpoint::{Checkpoints, Landing};
use super::ctx::{page_tag, Ctx};
use super::format::{
    Checkpoint, Entry, MapEntry, TreeId, TreePtr, MAP_ENTRIES_PER_PAGE, MAP_ENTRY_LEN,
};
use super::geometry::{Geometry, BITS_PER_PAGE};
use super::log::Log;
use super::snapshot::Snapshots;
use super::tree::{PageKey, Trees, FANOUT};
use super::usage::Usage;
use crate::crypto::Mac;
use crate::volume::{Generation, Lba, Result, SegmentId, VolumeError};
use crate::BLOCK_SIZE;

/// Freed segments discarded on the host per hold of the volume's lock
/// (see [`State::discard_some`]), at most.
pub const DISCARD_BATCH: usize = 16;
/// How long one hold of the volume's lock goes on discarding: after the
/// first discard, no more once this much time has passed. Idle, a
/// discard takes about 0.3 ms; beside a busy writer (dbench, 4 clients)
/// 1-2 ms, and 16 of them held every operation for 20-25 ms.
const DISCARD_HOLD: std::time::Duration = std::time::Duration::from_millis(2);

/// A rekey in progress.
#[derive(Clone, Debug, Default)]
pub struct RekeyPass {
    /// Segments still to look at, lowest first.
    pub todo: BTreeSet<SegmentId>,
    /// Segments there were to look at when the pass began.
    pub total: u64,
    /// Segments cleaned since the last checkpoint.
    pub since_checkpoint: u64,
    /// Look at each segment's records before cleaning it: a pass begun
    /// again at an open may meet segments an earlier run already sealed.
    /// A pass begun with a new generation cleans every segment it lists,
    /// all of them written before that generation.
    pub check_each: bool,
    /// Rounds of the final recheck so far (see `rekey_recheck`).
    pub rechecks: u32,
}

pub struct State {
    pub geo: Geometry,
    pub log: Log,
    pub ckpt: Checkpoints,
    pub trees: Trees,
    pub usage: Usage,
    pub snaps: Snapshots,
    /// Logical blocks mapped.
    pub allocated: u64,
    /// The checkpoint the changed bitmap starts at.
    pub changed_since: u64,
    /// This process has written a checkpoint (of the version it writes,
    /// [`super::format::CHECKPOINT_VERSION`]) since opening the volume.
    pub checkpointed: bool,
    /// Blocks the cleaner found under an older key generation that failed
    /// authentication, and so left sealed as they were (see `cleaner.rs`).
    pub unsealed: u64,
    /// A rekey in progress (`rekey.rs`).
    pub rekey: Option<RekeyPass>,
    /// The rekey policy and the blocks sealed under the current key
    /// generation (see [`Checkpoint`]).
    pub rekey_after_secs: u64,
    pub rekey_after_bytes: u64,
    pub sealed_blocks: u64,
    /// Segments [`State::refresh_reserve`] allocated on the host and has
    /// not discarded since: allocating them again would only cost a host
    /// call (about a millisecond on ext4) under the volume lock at every
    /// checkpoint.
    reserve_on_host: BTreeSet<SegmentId>,
    /// Freed segments not yet discarded on the host (see
    /// [`State::discard_some`]).
    undiscarded: BTreeSet<SegmentId>,
    /// What the checkpoint in flight frees when it lands.
    releasing: Option<Release>,
}

/// Segments a checkpoint frees once it is durable: those with nothing
/// live when it was written. Later ones wait for the next checkpoint: it
/// may still point into them.
struct Release {
    seq: u64,
    empty: Vec<SegmentId>,
    cleaned: BTreeSet<SegmentId>,
}

/// Writes `new` over the map entry at the start of `at` and keeps the
/// segment usage and the allocated count exact; returns the old entry.
/// `changed` is false only for the cleaner's relocations, which move a block
/// rather than drop it. The bitmaps are the caller's.
fn replace_entry(
    at: &mut [u8],
    new: MapEntry,
    changed: bool,
    usage: &mut Usage,
    allocated: &mut u64,
) -> MapEntry {
    let old = MapEntry::decode(at);
    new.encode(at);
    if old.is_stored() {
        if changed {
            usage.dropped(old.gen, old.pba, old.key_gen, old.mac);
        } else {
            usage.dec(old.pba);
        }
    }
    if new.is_stored() {
        usage.inc(new.pba);
    }
    match (old.is_mapped(), new.is_mapped()) {
        (false, true) => *allocated += 1,
        (true, false) => *allocated -= 1,
        _ => {}
    }
    old
}

impl State {
    /// The state a checkpoint records (before the log after it is replayed).
    pub fn at_checkpoint(geo: Geometry, ckpt: Checkpoints, cache_pages: usize) -> State {
        let c = &ckpt.last;
        State {
            geo,
            log: Log::new(geo, c.log, c.extent),
            trees: Trees::new(c.roots, geo.shapes(), cache_pages),
            usage: Usage::new(geo),
            snaps: Snapshots::new(geo),
            allocated: c.allocated,
            changed_since: c.changed_since,
            checkpointed: false,
            unsealed: 0,
            rekey: None,
            rekey_after_secs: c.rekey_after_secs,
            rekey_after_bytes: c.rekey_after_bytes,
            sealed_blocks: c.sealed_blocks,
            reserve_on_host: BTreeSet::new(),
            undiscarded: BTreeSet::new(),
            releasing: None,
            ckpt,
        }
    }

    /// Hands out `n` fresh generations (see [`Checkpoints::alloc_gens`]).
    pub fn alloc_gens(&mut self, ctx: &Ctx, n: u64) -> Result<Generation> {
        self.ckpt.alloc_gens(ctx, n)
    }

    /// Appends `entries` to the log (see [`Log::append`]).
    pub fn append(
        &mut self,
        ctx: &Ctx,
        entries: &[Entry],
        payload: &[u8],
        commit: bool,
        privileged: bool,
    ) -> Result<Vec<u64>> {
        let pbas = self
            .log
            .append(ctx, &mut self.ckpt, entries, payload, commit, privileged)?;
        self.sealed_blocks += (payload.len() / BLOCK_SIZE) as u64;
        Ok(pbas)
    }

    // ------------------------------------------------------------ block map

    pub fn lookup(&mut self, ctx: &Ctx, lba: Lba) -> Result<MapEntry> {
        let key = PageKey::leaf(TreeId::Map, lba.0 / MAP_ENTRIES_PER_PAGE as u64);
        let slot = (lba.0 % MAP_ENTRIES_PER_PAGE as u64) as usize * MAP_ENTRY_LEN;
        Ok(MapEntry::decode(&self.trees.get(ctx, key)?[slot..]))
    }

    /// Sets the map entry of `lba` and keeps usage, counts and bitmaps exact.
    /// `changed` is false only for the cleaner's relocations, which move a
    /// block rather than drop it.
    fn map_set(&mut self, ctx: &Ctx, lba: Lba, new: MapEntry, changed: bool) -> Result<()> {
        let key = PageKey::leaf(TreeId::Map, lba.0 / MAP_ENTRIES_PER_PAGE as u64);
        let slot = (lba.0 % MAP_ENTRIES_PER_PAGE as u64) as usize * MAP_ENTRY_LEN;
        let State {
            trees,
            usage,
            allocated,
            ..
        } = self;
        let page = trees.get_mut(ctx, key, &mut |t, p| usage.superseded(t, p))?;
        let old = replace_entry(&mut page[slot..], new, changed, usage, allocated);
        if old.is_mapped() != new.is_mapped() {
            self.set_bit(ctx, TreeId::Allocated, lba, new.is_mapped())?;
        }
        if changed {
            self.set_bit(ctx, TreeId::Changed, lba, true)?;
        }
        if new.is_stored() {
            self.set_bit(ctx, TreeId::KeyGen, lba, new.key_gen & 1 == 1)?;
        }
        Ok(())
    }

    /// [`State::map_set`] (a change, not a relocation) of every block in
    /// `lbas`, which lie in one map leaf, whose entry `select` picks: the
    /// leaf, and each bitmap page, read once and written once. A leaf where
    /// nothing is picked is left clean.
    fn map_set_in_leaf(
        &mut self,
        ctx: &Ctx,
        lbas: std::ops::Range<u64>,
        new: MapEntry,
        select: impl Fn(&MapEntry) -> bool,
    ) -> Result<()> {
        const _: () = assert!(MAP_ENTRIES_PER_PAGE == 128, "one u128 bit per entry");
        let per = MAP_ENTRIES_PER_PAGE as u64;
        let leaf = lbas.start / per;
        debug_assert!(lbas.start < lbas.end && lbas.end <= (leaf + 1) * per);
        let key = PageKey::leaf(TreeId::Map, leaf);
        let slot = |l: u64| (l % per) as usize * MAP_ENTRY_LEN;
        // One bit per entry of the leaf (128 of them).
        let mut picked = 0u128;
        let page = self.trees.get(ctx, key)?;
        for l in lbas.clone() {
            if select(&MapEntry::decode(&page[slot(l)..])) {
                picked |= 1 << (l % per);
            }
        }
        if picked == 0 {
            return Ok(());
        }
        let mut mapped_flips = 0u128;
        let State {
            trees,
            usage,
            allocated,
            ..
        } = self;
        let page = trees.get_mut(ctx, key, &mut |t, p| usage.superseded(t, p))?;
        for l in lbas {
            if picked & (1 << (l % per)) == 0 {
                continue;
            }
            let old = replace_entry(&mut page[slot(l)..], new, true, usage, allocated);
            if old.is_mapped() != new.is_mapped() {
                mapped_flips |= 1 << (l % per);
            }
        }
        let base = leaf * per;
        self.set_bits(ctx, TreeId::Allocated, base, mapped_flips, new.is_mapped())?;
        self.set_bits(ctx, TreeId::Changed, base, picked, true)?;
        if new.is_stored() {
            self.set_bits(ctx, TreeId::KeyGen, base, picked, new.key_gen & 1 == 1)?;
        }
        Ok(())
    }

    /// Sets (or clears) the bits `mask` picks among the 128 starting at
    /// `base`, a multiple of 128 (one map leaf's blocks, which one bitmap
    /// page holds). A page whose bits already are so stays clean.
    fn set_bits(
        &mut self,
        ctx: &Ctx,
        tree: TreeId,
        base: u64,
        mask: u128,
        value: bool,
    ) -> Result<()> {
        const _: () = assert!(BITS_PER_PAGE % MAP_ENTRIES_PER_PAGE as u64 == 0);
        debug_assert_eq!(base % MAP_ENTRIES_PER_PAGE as u64, 0);
        if mask == 0 {
            return Ok(());
        }
        let key = PageKey::leaf(tree, base / BITS_PER_PAGE);
        let at = ((base % BITS_PER_PAGE) / 8) as usize;
        let bits = |p: &[u8]| u128::from_le_bytes(p[at..at + 16].try_into().expect("16 bytes"));
        let now = bits(self.trees.get(ctx, key)?);
        let want = if value { now | mask } else { now & !mask };
        if want == now {
            return Ok(());
        }
        let State { trees, usage, .. } = self;
        let page = trees.get_mut(ctx, key, &mut |t, p| usage.superseded(t, p))?;
        page[at..at + 16].copy_from_slice(&want.to_le_bytes());
        Ok(())
    }

    pub fn get_bit(&mut self, ctx: &Ctx, tree: TreeId, lba: Lba) -> Result<bool> {
        let key = PageKey::leaf(tree, lba.0 / BITS_PER_PAGE);
        let bit = lba.0 % BITS_PER_PAGE;
        Ok(self.trees.get(ctx, key)?[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
    }

    fn set_bit(&mut self, ctx: &Ctx, tree: TreeId, lba: Lba, value: bool) -> Result<()> {
        if self.get_bit(ctx, tree, lba)? == value {
            return Ok(());
        }
        let key = PageKey::leaf(tree, lba.0 / BITS_PER_PAGE);
        let bit = lba.0 % BITS_PER_PAGE;
        let State { trees, usage, .. } = self;
        let page = trees.get_mut(ctx, key, &mut |t, p| usage.superseded(t, p))?;
        page[(bit / 8) as usize] ^= 1 << (bit % 8);
        Ok(())
    }

    /// About how many metadata pages applying `entries` dirties: map and
    /// bitmap leaves touched, plus their ancestors.
    pub fn pages_touched(&self, entries: &[Entry]) -> u64 {
        let per_map = MAP_ENTRIES_PER_PAGE as u64;
        let mut map = BTreeSet::new();
        let mut bits = BTreeSet::new();
        let mut ranges = 0u64;
        for e in entries {
            match *e {
                Entry::Write { lba, .. } | Entry::Relocate { lba, .. } => {
                    map.insert(lba.0 / per_map);
                    bits.insert(lba.0 / BITS_PER_PAGE);
                }
                Entry::Trim { count, .. } | Entry::Zero { count, .. } => {
                    let n = count as u64;
                    ranges += n.div_ceil(per_map) + 1 + 2 * (n.div_ceil(BITS_PER_PAGE) + 1);
                }
                Entry::TreePage { .. } => {}
            }
        }
        let leaves = map.len() as u64 + 3 * bits.len() as u64 + ranges;
        // Every block that stops being live decrements the usage counter of
        // its segment: at worst one usage leaf per block, at most all of them.
        let blocks: u64 = entries
            .iter()
            .map(|e| match *e {
                Entry::Trim { count, .. } | Entry::Zero { count, .. } => count as u64,
                _ => 1,
            })
            .sum();
        let usage = blocks.min(self.trees.shape(TreeId::SegmentUsage).leaves);
        // Under snapshots every dropped block (and map page) may enter the
        // held table, which the checkpoint writes: 16 bytes each.
        let held = if self.usage.held.retain_below > Generation(0) {
            (blocks + leaves).div_ceil(255) + 1
        } else {
            0
        };
        leaves
            + leaves / (FANOUT - 1)
            + 4 * self.trees.shape(TreeId::Map).depth as u64
            + usage
            + held
    }

    /// Loads every page `apply` will touch, so that once a record is in the
    /// log, applying it cannot fail on a read.
    pub fn prefetch(&mut self, ctx: &Ctx, entries: &[Entry]) -> Result<()> {
        for e in entries {
            match *e {
                Entry::Write { lba, .. } | Entry::Relocate { lba, .. } => {
                    self.lookup(ctx, lba)?;
                    for t in [TreeId::Allocated, TreeId::Changed, TreeId::KeyGen] {
                        self.get_bit(ctx, t, lba)?;
                    }
                }
                Entry::Zero { lba, count } => {
                    let per = MAP_ENTRIES_PER_PAGE as u64;
                    for leaf in lba.0 / per..=(lba.0 + count as u64 - 1) / per {
                        self.trees.get(ctx, PageKey::leaf(TreeId::Map, leaf))?;
                    }
                    for t in [TreeId::Allocated, TreeId::Changed] {
                        let first = lba.0 / BITS_PER_PAGE;
                        let last = (lba.0 + count as u64 - 1) / BITS_PER_PAGE;
                        for leaf in first..=last {
                            self.trees.get(ctx, PageKey::leaf(t, leaf))?;
                        }
                    }
                }
                Entry::Trim { lba, count } => {
                    self.for_each_present_map_leaf(ctx, lba, count as u64, &mut |_, _| Ok(()))?;
                    for t in [TreeId::Allocated, TreeId::Changed] {
                        let first = lba.0 / BITS_PER_PAGE;
                        let last = (lba.0 + count as u64 - 1) / BITS_PER_PAGE;
                        for leaf in first..=last {
                            self.trees.get(ctx, PageKey::leaf(t, leaf))?;
                        }
                    }
                }
                Entry::TreePage { .. } => {}
            }
        }
        Ok(())
    }

    /// Calls `f(first_lba, n)` for each map leaf overlapping the range that
    /// exists, skipping absent subtrees without reading them.
    pub(super) fn for_each_present_map_leaf(
        &mut self,
        ctx: &Ctx,
        lba: Lba,
        count: u64,
        f: &mut dyn FnMut(&mut State, u64) -> Result<()>,
    ) -> Result<()> {
        let per = MAP_ENTRIES_PER_PAGE as u64;
        let end = (lba + count).0;
        let mut leaf = lba.0 / per;
        while leaf * per < end {
            let depth = self.trees.shape(TreeId::Map).depth;
            if depth >= 1 {
                let parent = PageKey {
                    tree: TreeId::Map,
                    level: 1,
                    index: leaf / FANOUT,
                };
                if self.trees.is_absent(ctx, parent)? {
                    leaf = (leaf / FANOUT + 1) * FANOUT;
                    continue;
                }
            }
            let key = PageKey::leaf(TreeId::Map, leaf);
            if !self.trees.is_absent(ctx, key)? {
                self.trees.get(ctx, key)?;
                f(self, leaf)?;
            }
            leaf += 1;
        }
        Ok(())
    }

    /// Applies a record's entries; `pbas` holds the location of each payload
    /// entry, in order. The same code runs at commit time and in recovery.
    pub fn apply(&mut self, ctx: &Ctx, entries: &[Entry], pbas: &[u64]) -> Result<()> {
        let mut p = 0;
        for e in entries {
            match *e {
                Entry::Write {
                    lba,
                    gen,
                    key_gen,
                    mac,
                } => {
                    let pba = pbas[p];
                    p += 1;
                    self.map_set(
                        ctx,
                        lba,
                        MapEntry {
                            pba,
                            key_gen,
                            gen,
                            mac,
                        },
                        true,
                    )?;
                }
                Entry::Relocate {
                    lba,
                    gen,
                    key_gen,
                    mac,
                } => {
                    let pba = pbas[p];
                    p += 1;
                    let old = self.lookup(ctx, lba)?;
                    if old.is_stored() && old.gen == gen {
                        let new = MapEntry {
                            pba,
                            key_gen,
                            mac,
                            ..old
                        };
                        self.map_set(ctx, lba, new, false)?;
                    }
                }
                Entry::TreePage { .. } => p += 1,
                Entry::Zero { lba, count } => {
                    // Zeroing a zeroed block changes nothing (not even
                    // its changed bit).
                    let per = MAP_ENTRIES_PER_PAGE as u64;
                    let end = lba.0 + count as u64;
                    let mut lo = lba.0;
                    while lo < end {
                        let hi = ((lo / per + 1) * per).min(end);
                        self.map_set_in_leaf(ctx, lo..hi, MapEntry::ZEROED, |e| !e.is_zeroed())?;
                        lo = hi;
                    }
                }
                Entry::Trim { lba, count } => {
                    let per = MAP_ENTRIES_PER_PAGE as u64;
                    let end = (lba + count as u64).0;
                    self.for_each_present_map_leaf(ctx, lba, count as u64, &mut |st, leaf| {
                        let lo = (leaf * per).max(lba.0);
                        let hi = ((leaf + 1) * per).min(end);
                        st.map_set_in_leaf(ctx, lo..hi, MapEntry::default(), MapEntry::is_mapped)
                    })?;
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ checkpoint

    /// Writes every dirty page (map and bitmaps first, segment usage last),
    /// then an authenticated checkpoint naming the new roots and the log
    /// head, then frees the segments that nothing references any more.
    ///
    /// If it fails part way, the in-memory state is still consistent: the
    /// pages written so far are simply written early, and the durable
    /// checkpoint still names the old, intact roots.
    pub fn checkpoint(&mut self, ctx: &Ctx) -> Result<()> {
        self.begin_checkpoint(ctx)?;
        self.settle(ctx)?;
        Ok(())
    }

    /// The first half of a checkpoint: lands the one before, if any, then
    /// writes the dirty pages to the log and seals the slot that points at
    /// them. [`State::settle`], or the returned landing from any thread,
    /// makes it durable.
    pub fn begin_checkpoint(&mut self, ctx: &Ctx) -> Result<Arc<Landing>> {
        self.settle(ctx)?;
        for tree in [
            TreeId::Map,
            TreeId::Allocated,
            TreeId::Changed,
            TreeId::KeyGen,
        ] {
            self.write_tree(ctx, tree)?;
        }
        // After the trees (writing them can hold old pages), before usage
        // (writing it changes usage).
        self.snaps
            .write_meta(ctx, &mut self.log, &mut self.ckpt, &mut self.usage)?;
        let leaves: Vec<u64> = std::mem::take(&mut self.usage.dirty_leaves)
            .into_iter()
            .collect();
        for leaf in leaves {
            let State { trees, usage, .. } = self;
            let page = trees.get_mut(
                ctx,
                PageKey::leaf(TreeId::SegmentUsage, leaf),
                &mut |t, p| usage.superseded(t, p),
            )?;
            usage.leaf_bytes(leaf, &mut page[..]);
        }
        self.write_tree(ctx, TreeId::SegmentUsage)?;
        debug_assert!(self.trees.dirty_count() == 0);

        let c = Checkpoint {
            seq: self.ckpt.last.seq + 1,
            log: self.log.head,
            gen_limit: self.ckpt.gen_limit,
            extent: self.log.extent,
            allocated: self.allocated,
            changed_since: self.changed_since,
            key_gen: ctx.keys.current().key_gen() as u32,
            roots: self.trees.roots(),
            snap_meta: self.snaps.meta_root.0,
            snap_pages: self.snaps.meta_root.1,
            rekey_after_secs: self.rekey_after_secs,
            rekey_after_bytes: self.rekey_after_bytes,
            sealed_blocks: self.sealed_blocks,
        };
        let seq = c.seq;
        let landing = self.ckpt.begin(ctx, c)?;
        self.log.blocks_since_checkpoint = 0;
        self.releasing = Some(Release {
            seq,
            empty: self.empty_segments(),
            cleaned: self.log.cleaned.clone(),
        });
        Ok(landing)
    }

    /// Lands the checkpoint in flight, if any, and frees what it let go.
    /// Returns whether one landed.
    pub fn settle(&mut self, ctx: &Ctx) -> Result<bool> {
        let landed = self.ckpt.settle(ctx)?;
        if landed {
            self.checkpointed = true;
        }
        let durable = self.ckpt.last.seq;
        if let Some(r) = self.releasing.take_if(|r| r.seq <= durable) {
            self.release_segments(ctx, r);
        }
        Ok(landed)
    }

    /// [`State::settle`], if the checkpoint in flight has landed already
    /// (nothing to wait for).
    pub fn settle_if_landed(&mut self, ctx: &Ctx) -> Result<bool> {
        match self.ckpt.in_flight() {
            Some(l) if l.done() => self.settle(ctx),
            _ => Ok(false),
        }
    }

    /// Segments with nothing live, other than the log head and the
    /// pre-chosen next segment, not yet free.
    fn empty_segments(&self) -> Vec<SegmentId> {
        self.log.segments().filter(|&s| self.freeable(s)).collect()
    }

    /// `s` holds nothing live, is neither the log head nor the pre-chosen
    /// next segment, and is not free yet.
    fn freeable(&self, s: SegmentId) -> bool {
        self.usage.live(s) == 0 && !self.log.is_head(s) && !self.log.free.contains(&s)
    }

    /// After a durable checkpoint, the segments that were empty when it was
    /// written (and still are) become free.
    fn release_segments(&mut self, ctx: &Ctx, r: Release) {
        let newly: Vec<SegmentId> = r.empty.into_iter().filter(|&s| self.freeable(s)).collect();
        {
            // Readers that looked up a block before it moved may still be
            // reading it: wait for them before the segment can be reused.
            let _no_readers = ctx.reuse.write().unwrap_or_else(|p| p.into_inner());
            self.log.free.extend(newly.iter().copied());
            self.log.cleaned.retain(|s| !r.cleaned.contains(s));
        }
        self.refresh_reserve(ctx, &newly);
    }

    /// The lowest `reserve` free segments are the reserve. They must be
    /// allocated on the host, so that checkpoints, the cleaner and trims can
    /// run when the host is full: allocate those not yet allocated (or
    /// discarded since), and hole-punch the newly freed segments outside
    /// them and those that left them while free (one short batch of those
    /// that wait now, the rest by [`State::discard_some`]).
    /// Allocation failures are left for later; the reserve is then smaller
    /// until space returns.
    pub fn refresh_reserve(&mut self, ctx: &Ctx, newly_freed: &[SegmentId]) {
        let keep = self.reserve();
        let seg_bytes = self.geo.seg_blocks * BLOCK_SIZE as u64;
        // A segment that left the reserve is either the log's again (its
        // discard comes when it is freed next) or free outside it, and
        // then nothing else would ever discard it.
        let left: Vec<SegmentId> = self.reserve_on_host.difference(&keep).copied().collect();
        for s in left {
            self.reserve_on_host.remove(&s);
            if self.log.free.contains(&s) {
                self.undiscarded.insert(s);
            }
        }
        let missing: Vec<SegmentId> = keep.difference(&self.reserve_on_host).copied().collect();
        for s in missing {
            let at = self.geo.pba_of(s, 0) * BLOCK_SIZE as u64;
            if ctx.dev.allocate(at, seg_bytes).is_ok() {
                self.reserve_on_host.insert(s);
            }
        }
        self.undiscarded
            .extend(newly_freed.iter().filter(|s| !keep.contains(s)));
        self.discard_some(ctx, DISCARD_BATCH);
    }

    /// Queues for discard the free segments outside the reserve that the
    /// host still holds written data for, where it can tell (a regular
    /// backing file): those whose discards were still queued at a crash,
    /// or failed. Called at a writable open; the queue drains as any other.
    pub fn queue_stale_discards(&mut self, ctx: &Ctx) {
        let Some(ranges) = ctx.dev.data_ranges() else {
            return;
        };
        let keep = self.reserve();
        let seg_bytes = self.geo.seg_blocks * BLOCK_SIZE as u64;
        let data_start = self.geo.pba_of(SegmentId(0), 0) * BLOCK_SIZE as u64;
        for r in ranges {
            if r.end <= data_start {
                continue;
            }
            let first = r.start.saturating_sub(data_start) / seg_bytes;
            let last = (r.end - data_start).div_ceil(seg_bytes);
            let stale = self
                .log
                .free
                .range(SegmentId(first)..SegmentId(last))
                .filter(|s| !keep.contains(s));
            self.undiscarded.extend(stale);
        }
    }

    /// The reserve: the lowest `reserve` free segments.
    fn reserve(&self) -> BTreeSet<SegmentId> {
        self.log
            .free
            .iter()
            .take(self.geo.reserve as usize)
            .copied()
            .collect()
    }

    /// Discards on the host (punches a hole over) up to `max` of the
    /// freed segments that wait for it, those still free and outside the
    /// reserve; returns how many still wait (some of which may turn out
    /// reused or in the reserve by their turn). Each discard also drops the
    /// host's cached pages of the segment (about 0.3 ms for 4 MiB on
    /// ext4), and all of it holds the volume's lock: freeing a 3 GiB file
    /// discarded 750 segments at once, and every operation waited 250 ms.
    /// So the rest goes a batch at a time, each batch ending after
    /// [`DISCARD_HOLD`] (`Inner::drain_discards`). A
    /// segment the log takes again meanwhile is simply not discarded.
    pub fn discard_some(&mut self, ctx: &Ctx, max: usize) -> usize {
        if self.undiscarded.is_empty() {
            return 0;
        }
        let keep = self.reserve();
        let seg_bytes = self.geo.seg_blocks * BLOCK_SIZE as u64;
        let mut done = 0;
        let began = std::time::Instant::now();
        while done < max && (done == 0 || began.elapsed() < DISCARD_HOLD) {
            let Some(s) = self.undiscarded.pop_first() else {
                break;
            };
            if !self.log.free.contains(&s) || keep.contains(&s) {
                continue;
            }
            // Discard is advisory: a failure only means the host keeps the bytes.
            let _ = ctx
                .dev
                .discard(self.geo.pba_of(s, 0) * BLOCK_SIZE as u64, seg_bytes);
            self.reserve_on_host.remove(&s);
            done += 1;
        }
        self.undiscarded.len()
    }

    /// Seals and appends the dirty pages of one tree, level by level from the
    /// leaves up, pointing each parent at its children's new copies.
    pub(super) fn write_tree(&mut self, ctx: &Ctx, tree: TreeId) -> Result<()> {
        for level in 0..=self.trees.shape(tree).depth {
            let mut keys = self.trees.dirty_at(tree, level);
            // An all-zero page is not written: its pointer becomes absent,
            // which reads as zeros. Trimmed regions free their metadata too.
            keys.retain(|k| {
                if self.trees.cached(k).iter().all(|b| *b == 0) {
                    self.trees.set_written(*k, TreePtr::ABSENT);
                    false
                } else {
                    true
                }
            });
            if keys.is_empty() {
                continue;
            }
            let base = self.alloc_gens(ctx, keys.len() as u64)?;
            let gk = ctx.keys.current();
            let mut buf = Vec::with_capacity(keys.len() * BLOCK_SIZE);
            let mut tags = Vec::with_capacity(keys.len());
            for (i, k) in keys.iter().enumerate() {
                buf.extend_from_slice(self.trees.cached(k));
                tags.push(page_tag(
                    tree,
                    level,
                    k.index,
                    base + i as u64,
                    gk.key_gen(),
                ));
            }
            let mut macs = vec![Mac::default(); keys.len()];
            ctx.engine.seal(&gk, &mut buf, &tags, &mut macs);
            let entries: Vec<Entry> = keys
                .iter()
                .zip(&tags)
                .zip(&macs)
                .map(|((k, t), m)| Entry::TreePage {
                    tree,
                    level,
                    index: k.index,
                    gen: Generation(t.gen),
                    key_gen: t.key,
                    mac: *m,
                })
                .collect();
            let pbas = self.append(ctx, &entries, &buf, true, true)?;
            for ((k, t), (m, pba)) in keys.iter().zip(&tags).zip(macs.iter().zip(&pbas)) {
                self.trees.set_written(
                    *k,
                    TreePtr {
                        pba: *pba,
                        gen: Generation(t.gen),
                        key_gen: t.key,
                        mac: *m,
                    },
                );
                self.usage.written(tree, *pba);
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ changed bitmap

    /// Forgets which blocks changed; from now on only new writes and trims
    /// are recorded. Returns the sequence number of a checkpoint that holds
    /// exactly the state at the reset: the bitmap records every change after
    /// it. The reset is durable when this returns. (If a crash lost it, the
    /// old, larger bitmap would come back: a superset, never too little.)
    pub fn reset_changed(&mut self, ctx: &Ctx) -> Result<u64> {
        if !self.snaps.list.is_empty() {
            // The live bitmap is the interval after the newest snapshot;
            // clearing it would hide changes from the next snapshot's.
            return Err(VolumeError::InvalidArgument(
                "the changed bitmap belongs to the snapshots; it is reset by taking one".into(),
            ));
        }
        self.checkpoint(ctx)?;
        let base = self.ckpt.last.seq;
        let State { trees, usage, .. } = self;
        trees.clear_tree(ctx, TreeId::Changed, &mut |t, p| usage.superseded(t, p))?;
        self.changed_since = base;
        self.checkpoint(ctx)?;
        Ok(base)
    }

    /// Runs of set bits in a bitmap tree, as (first block, count).
    pub fn bitmap_runs(&mut self, ctx: &Ctx, tree: TreeId) -> Result<Vec<(u64, u64)>> {
        let mut leaves = Vec::new();
        self.trees.visit(ctx, tree, &mut |k, _, _, data| {
            if k.level == 0 {
                leaves.push((k.index, Box::new(*data)));
            }
        })?;
        leaves.sort_by_key(|(i, _)| *i);
        Ok(bit_runs(leaves, self.geo.logical_blocks))
    }
}

/// Runs of set bits, as (first block, count), in bitmap leaves given in
/// index order; bits at or past `limit` are ignored.
pub fn bit_runs(
    leaves: impl IntoIterator<Item = (u64, Box<super::format::Block>)>,
    limit: u64,
) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (leaf, data) in leaves {
        for (byte_i, byte) in data.iter().enumerate() {
            if *byte == 0 {
                continue;
            }
            for bit in 0..8 {
                if byte & (1 << bit) == 0 {
                    continue;
                }
                let lba = leaf * BITS_PER_PAGE + byte_i as u64 * 8 + bit;
                if lba >= limit {
                    break;
                }
                match runs.last_mut() {
                    Some((s, n)) if *s + *n == lba => *n += 1,
                    _ => runs.push((lba, 1)),
                }
            }
        }
    }
    runs
}
