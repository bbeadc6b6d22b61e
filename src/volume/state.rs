//! The mutable state of an open volume: segment usage, the metadata trees,
//! the log head, and the operations that change them (apply a record,
//! write a checkpoint).

use std::collections::{BTreeSet, HashMap};

use super::format::{
    page_addr, Checkpoint, Entry, LogPos, MapEntry, TreeId, TreePtr, CHECKPOINT_BLOCKS,
    CHECKPOINT_MAC_AT, DATA_START, MAP_ENTRIES_PER_PAGE, MAP_ENTRY_LEN,
};
use super::tree::{PageKey, Shape, Trees, FANOUT};
use super::Ctx;
use crate::crypto::{BlockKind, Mac, Tag};
use crate::{Error, Result, BLOCK_SIZE};

/// Bits per bitmap leaf page.
pub const BITS_PER_PAGE: u64 = (BLOCK_SIZE * 8) as u64;
/// Segment-usage counters (u32) per leaf page.
pub const USAGE_PER_PAGE: u64 = (BLOCK_SIZE / 4) as u64;
/// Generations reserved durably at a time (see `alloc_gens`).
const GEN_RESERVE: u64 = 1 << 32;

/// Live-block accounting per segment.
///
/// `live[s]` counts the blocks of segment `s` that the current (in-memory)
/// state references, except pages of the segment-usage tree itself, which
/// are counted in `usage_pages` so that writing the usage tree never
/// changes the counts it stores.
pub struct Usage {
    pub live: Vec<u32>,
    pub usage_pages: HashMap<u64, u32>,
    pub dirty_leaves: BTreeSet<u64>,
    seg_blocks: u64,
    /// Blocks only snapshots reference: generation -> location. They stay
    /// counted in `live` (see `snapshot.rs`).
    pub held: HashMap<u64, u64>,
    pub held_dirty: bool,
    /// The newest snapshot's birth (0 without snapshots): a map or changed
    /// page, or a data block, that the live state drops with a generation
    /// below it is held, not freed.
    pub retain_below: u64,
}

impl Usage {
    pub fn new(seg_blocks: u64) -> Usage {
        Usage {
            live: Vec::new(),
            usage_pages: HashMap::new(),
            dirty_leaves: BTreeSet::new(),
            seg_blocks,
            held: HashMap::new(),
            held_dirty: false,
            retain_below: 0,
        }
    }

    /// The live state stops referencing a block: it is held if the newest
    /// snapshot references it, else its space is released.
    pub fn dropped(&mut self, gen: u64, pba: u64) {
        if gen < self.retain_below {
            self.held.insert(gen, pba);
            self.held_dirty = true;
        } else {
            self.dec(pba);
        }
    }

    pub fn segment_of(&self, pba: u64) -> u64 {
        (pba - DATA_START) / self.seg_blocks
    }

    pub fn live(&self, seg: u64) -> u64 {
        self.live.get(seg as usize).copied().unwrap_or(0) as u64
            + self.usage_pages.get(&seg).copied().unwrap_or(0) as u64
    }

    fn slot(&mut self, seg: u64) -> &mut u32 {
        if self.live.len() <= seg as usize {
            self.live.resize(seg as usize + 1, 0);
        }
        self.dirty_leaves.insert(seg / USAGE_PER_PAGE);
        &mut self.live[seg as usize]
    }

    pub fn inc(&mut self, pba: u64) {
        let s = self.segment_of(pba);
        *self.slot(s) += 1;
    }

    pub fn dec(&mut self, pba: u64) {
        let s = self.segment_of(pba);
        let c = self.slot(s);
        debug_assert!(*c > 0, "segment {s} usage underflow");
        *c = c.saturating_sub(1);
    }

    pub fn superseded(&mut self, tree: TreeId, ptr: TreePtr) {
        if matches!(tree, TreeId::Map | TreeId::Changed) {
            // Pages snapshots can share.
            self.dropped(ptr.gen, ptr.pba);
        } else if tree == TreeId::SegmentUsage {
            let s = self.segment_of(ptr.pba);
            let c = self.usage_pages.entry(s).or_insert(0);
            *c = c.saturating_sub(1);
        } else {
            self.dec(ptr.pba);
        }
    }

    fn written(&mut self, tree: TreeId, pba: u64) {
        if tree == TreeId::SegmentUsage {
            *self.usage_pages.entry(self.segment_of(pba)).or_insert(0) += 1;
        } else {
            self.inc(pba);
        }
    }
}

pub struct State {
    pub trees: Trees,
    pub usage: Usage,
    /// Segments that hold nothing live and may be reused by the log.
    pub free: BTreeSet<u64>,
    /// Segments ever used: the log grows the backing file up to `extent`.
    pub extent: u64,
    pub head: LogPos,
    pub next_gen: u64,
    /// Every generation below it may have been used; it is durable in the
    /// latest checkpoint slot before any generation near it is handed out.
    pub gen_limit: u64,
    pub allocated: u64,
    pub changed_since: u64,
    pub key_gen: u32,
    pub last_checkpoint: Checkpoint,
    pub log_blocks_since_checkpoint: u64,
    /// Segments the cleaner emptied; they become free at the next checkpoint.
    pub cleaned: BTreeSet<u64>,
    pub poisoned: bool,
    /// The backing device refused to grow (the host filesystem is full):
    /// only free segments count as available until growing works again.
    pub growth_blocked: bool,
    pub seg_blocks: u64,
    pub max_segments: u64,
    pub logical_blocks: u64,
    /// Segments kept back from ordinary writes for checkpoints and the cleaner.
    pub reserve: u64,
    /// Dirty metadata pages that force a checkpoint.
    pub dirty_limit: u64,
    /// Snapshots, oldest first.
    pub snaps: Vec<super::snapshot::Snap>,
    pub snap_next_id: u64,
    /// Changed bitmaps of deleted snapshots, handed to the next snapshot.
    pub live_changed: Vec<TreePtr>,
    /// Where the snapshot metadata is (all its pages), and its root and
    /// leaf count as the checkpoint names them.
    pub meta_pages: Vec<TreePtr>,
    pub meta_root: (TreePtr, u32),
    pub snap_meta_dirty: bool,
}

/// The trees' shapes for a volume geometry.
pub fn shapes(logical_blocks: u64, max_segments: u64) -> [Shape; 5] {
    let bitmap = Shape::new(logical_blocks.div_ceil(BITS_PER_PAGE));
    [
        Shape::new(logical_blocks.div_ceil(MAP_ENTRIES_PER_PAGE as u64)),
        bitmap,
        bitmap,
        bitmap,
        Shape::new(max_segments.div_ceil(USAGE_PER_PAGE)),
    ]
}

impl State {
    pub fn pba_of(&self, seg: u64, offset: u64) -> u64 {
        DATA_START + seg * self.seg_blocks + offset
    }

    fn growth(&self) -> u64 {
        if self.growth_blocked {
            0
        } else {
            self.max_segments - self.extent
        }
    }

    /// Segments the log can still take: free ones plus room to grow.
    pub fn available(&self) -> u64 {
        self.free.len() as u64 + self.growth()
    }

    /// Segments ordinary writes can take: all but the reserve.
    pub fn user_available(&self) -> u64 {
        (self.free.len() as u64).saturating_sub(self.reserve) + self.growth()
    }

    /// Hands out `n` fresh generations. Before any generation at or past the
    /// durable limit is used, a higher limit is made durable, so that after a
    /// crash no generation (and so no XTS tweak) is ever used twice, even by
    /// writes that never became durable.
    pub fn alloc_gens(&mut self, ctx: &Ctx, n: u64) -> Result<u64> {
        if self.next_gen > u64::MAX / 2 {
            // 2^63 block writes: unreachable in practice, checked so that a
            // (MAC-valid) checkpoint can never make the counter wrap.
            return Err(Error::Corrupted(
                "the write generation counter is exhausted".into(),
            ));
        }
        if self.next_gen + n > self.gen_limit {
            let mut c = self.last_checkpoint.clone();
            c.seq += 1;
            c.gen_limit = self.next_gen + n + GEN_RESERVE;
            self.write_checkpoint_block(ctx, &c)?;
            self.gen_limit = c.gen_limit;
            self.last_checkpoint = c;
        }
        let base = self.next_gen;
        self.next_gen += n;
        Ok(base)
    }

    fn write_checkpoint_block(&mut self, ctx: &Ctx, c: &Checkpoint) -> Result<()> {
        let slot = (c.seq % 2) as usize;
        let mut b = c.encode_body(ctx.header);
        let mac = ctx.keys.mac(
            Tag::new(BlockKind::Checkpoint, slot as u64, c.seq),
            &b[..CHECKPOINT_MAC_AT],
        );
        b[CHECKPOINT_MAC_AT..].copy_from_slice(&mac.0);
        let off = CHECKPOINT_BLOCKS[slot] * BLOCK_SIZE as u64;
        let r = ctx.dev.write_at(&b[..], off).and_then(|_| ctx.dev.flush());
        r.map_err(|e| {
            self.poisoned = true;
            Error::io("writing a checkpoint", e)
        })
    }

    // ------------------------------------------------------------ block map

    pub fn lookup(&mut self, ctx: &Ctx, lba: u64) -> Result<MapEntry> {
        let key = PageKey::leaf(TreeId::Map, lba / MAP_ENTRIES_PER_PAGE as u64);
        let slot = (lba % MAP_ENTRIES_PER_PAGE as u64) as usize * MAP_ENTRY_LEN;
        Ok(MapEntry::decode(&self.trees.get(ctx, key)?[slot..]))
    }

    /// Sets the map entry of `lba` and keeps usage, counts and bitmaps exact.
    /// `changed` is false only for the cleaner's relocations, which move a
    /// block rather than drop it.
    fn map_set(&mut self, ctx: &Ctx, lba: u64, new: MapEntry, changed: bool) -> Result<()> {
        let key = PageKey::leaf(TreeId::Map, lba / MAP_ENTRIES_PER_PAGE as u64);
        let slot = (lba % MAP_ENTRIES_PER_PAGE as u64) as usize * MAP_ENTRY_LEN;
        let State { trees, usage, .. } = self;
        let page = trees.get_mut(ctx, key, &mut |t, p| usage.superseded(t, p))?;
        let old = MapEntry::decode(&page[slot..]);
        new.encode(&mut page[slot..]);
        if old.is_mapped() {
            if changed {
                usage.dropped(old.gen, old.pba);
            } else {
                usage.dec(old.pba);
            }
        }
        if new.is_mapped() {
            usage.inc(new.pba);
        }
        match (old.is_mapped(), new.is_mapped()) {
            (false, true) => {
                self.allocated += 1;
                self.set_bit(ctx, TreeId::Allocated, lba, true)?;
            }
            (true, false) => {
                self.allocated -= 1;
                self.set_bit(ctx, TreeId::Allocated, lba, false)?;
            }
            _ => {}
        }
        if changed {
            self.set_bit(ctx, TreeId::Changed, lba, true)?;
        }
        if new.is_mapped() {
            self.set_bit(ctx, TreeId::KeyGen, lba, new.key_gen & 1 == 1)?;
        }
        Ok(())
    }

    pub fn get_bit(&mut self, ctx: &Ctx, tree: TreeId, lba: u64) -> Result<bool> {
        let key = PageKey::leaf(tree, lba / BITS_PER_PAGE);
        let bit = lba % BITS_PER_PAGE;
        Ok(self.trees.get(ctx, key)?[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
    }

    fn set_bit(&mut self, ctx: &Ctx, tree: TreeId, lba: u64, value: bool) -> Result<()> {
        if self.get_bit(ctx, tree, lba)? == value {
            return Ok(());
        }
        let key = PageKey::leaf(tree, lba / BITS_PER_PAGE);
        let bit = lba % BITS_PER_PAGE;
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
                    map.insert(lba / per_map);
                    bits.insert(lba / BITS_PER_PAGE);
                }
                Entry::Trim { count, .. } => {
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
                Entry::Trim { count, .. } => count as u64,
                _ => 1,
            })
            .sum();
        let usage = blocks.min(self.trees.shape(TreeId::SegmentUsage).leaves);
        // Under snapshots every dropped block (and map page) may enter the
        // held table, which the checkpoint writes: 16 bytes each.
        let held = if self.usage.retain_below > 0 {
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
                Entry::Trim { lba, count } => {
                    self.for_each_present_map_leaf(ctx, lba, count as u64, &mut |_, _| Ok(()))?;
                    for t in [TreeId::Allocated, TreeId::Changed] {
                        let first = lba / BITS_PER_PAGE;
                        let last = (lba + count as u64 - 1) / BITS_PER_PAGE;
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
    fn for_each_present_map_leaf(
        &mut self,
        ctx: &Ctx,
        lba: u64,
        count: u64,
        f: &mut dyn FnMut(&mut State, u64) -> Result<()>,
    ) -> Result<()> {
        let per = MAP_ENTRIES_PER_PAGE as u64;
        let end = lba + count;
        let mut leaf = lba / per;
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
                Entry::Write { lba, gen, mac } => {
                    let pba = pbas[p];
                    p += 1;
                    let key_gen = self.key_gen as u16;
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
                Entry::Relocate { lba, gen, mac } => {
                    let pba = pbas[p];
                    p += 1;
                    let old = self.lookup(ctx, lba)?;
                    if old.is_mapped() && old.gen == gen {
                        self.map_set(ctx, lba, MapEntry { pba, mac, ..old }, false)?;
                    }
                }
                Entry::TreePage { .. } => p += 1,
                Entry::Trim { lba, count } => {
                    let per = MAP_ENTRIES_PER_PAGE as u64;
                    let end = lba + count as u64;
                    self.for_each_present_map_leaf(ctx, lba, count as u64, &mut |st, leaf| {
                        let lo = (leaf * per).max(lba);
                        let hi = ((leaf + 1) * per).min(end);
                        for l in lo..hi {
                            if st.lookup(ctx, l)?.is_mapped() {
                                st.map_set(ctx, l, MapEntry::default(), true)?;
                            }
                        }
                        Ok(())
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
        self.write_snap_meta(ctx)?;
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
            for i in 0..USAGE_PER_PAGE {
                let seg = (leaf * USAGE_PER_PAGE + i) as usize;
                let v = usage.live.get(seg).copied().unwrap_or(0);
                page[i as usize * 4..i as usize * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        self.write_tree(ctx, TreeId::SegmentUsage)?;
        debug_assert!(self.trees.dirty_count() == 0);

        ctx.dev.flush().map_err(|e| {
            self.poisoned = true;
            Error::io("flushing before a checkpoint", e)
        })?;
        let c = Checkpoint {
            seq: self.last_checkpoint.seq + 1,
            log: self.head,
            gen_limit: self.gen_limit,
            extent: self.extent,
            allocated: self.allocated,
            changed_since: self.changed_since,
            key_gen: self.key_gen,
            roots: self.trees.roots(),
            snap_meta: self.meta_root.0,
            snap_pages: self.meta_root.1,
        };
        self.write_checkpoint_block(ctx, &c)?;
        self.last_checkpoint = c;
        self.log_blocks_since_checkpoint = 0;
        self.release_segments(ctx);
        Ok(())
    }

    /// After a durable checkpoint, every segment with nothing live (other
    /// than the log head and the pre-chosen next segment) becomes free.
    fn release_segments(&mut self, ctx: &Ctx) {
        let newly: Vec<u64> = (0..self.extent)
            .filter(|&s| {
                self.usage.live(s) == 0
                    && s != self.head.segment
                    && s != self.head.next_segment
                    && !self.free.contains(&s)
            })
            .collect();
        {
            // Readers that looked up a block before it moved may still be
            // reading it: wait for them before the segment can be reused.
            let _no_readers = ctx.reuse.write().unwrap_or_else(|p| p.into_inner());
            self.free.extend(newly.iter().copied());
            self.cleaned.clear();
        }
        self.refresh_reserve(ctx, &newly);
    }

    /// The lowest `reserve` free segments are the reserve. They must be
    /// allocated on the host, so that checkpoints, the cleaner and trims can
    /// run when the host is full: (re)allocate them, and hole-punch only the
    /// newly freed segments outside them. Allocation failures are left for
    /// later; the reserve is then smaller until space returns.
    pub fn refresh_reserve(&mut self, ctx: &Ctx, newly_freed: &[u64]) {
        let keep: BTreeSet<u64> = self
            .free
            .iter()
            .take(self.reserve as usize)
            .copied()
            .collect();
        let seg_bytes = self.seg_blocks * BLOCK_SIZE as u64;
        for &s in &keep {
            let _ = ctx
                .dev
                .allocate(self.pba_of(s, 0) * BLOCK_SIZE as u64, seg_bytes);
        }
        for s in newly_freed.iter().filter(|s| !keep.contains(s)) {
            // Discard is advisory: a failure only means the host keeps the bytes.
            let _ = ctx
                .dev
                .discard(self.pba_of(*s, 0) * BLOCK_SIZE as u64, seg_bytes);
        }
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
            let mut buf = Vec::with_capacity(keys.len() * BLOCK_SIZE);
            let mut tags = Vec::with_capacity(keys.len());
            for (i, k) in keys.iter().enumerate() {
                buf.extend_from_slice(self.trees.cached(k));
                tags.push(Tag::new(
                    BlockKind::TreePage,
                    page_addr(tree, level, k.index),
                    base + i as u64,
                ));
            }
            let mut macs = vec![Mac::default(); keys.len()];
            ctx.engine.seal(ctx.keys, &mut buf, &tags, &mut macs);
            let entries: Vec<Entry> = keys
                .iter()
                .zip(&tags)
                .zip(&macs)
                .map(|((k, t), m)| Entry::TreePage {
                    tree,
                    level,
                    index: k.index,
                    gen: t.gen,
                    mac: *m,
                })
                .collect();
            let pbas = self.append(ctx, &entries, &buf, true, true)?;
            for ((k, t), (m, pba)) in keys.iter().zip(&tags).zip(macs.iter().zip(&pbas)) {
                self.trees.set_written(
                    *k,
                    TreePtr {
                        pba: *pba,
                        gen: t.gen,
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
        if !self.snaps.is_empty() {
            // The live bitmap is the interval after the newest snapshot;
            // clearing it would hide changes from the next snapshot's.
            return Err(Error::InvalidArgument(
                "the changed bitmap belongs to the snapshots; it is reset by taking one".into(),
            ));
        }
        self.checkpoint(ctx)?;
        let base = self.last_checkpoint.seq;
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
        Ok(bit_runs(leaves, self.logical_blocks))
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
