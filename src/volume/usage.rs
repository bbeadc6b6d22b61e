//! Space accounting: how many live blocks each segment holds, and the
//! held table of blocks that only snapshots still reference.

use std::collections::{BTreeSet, HashMap};

use super::ctx::Ctx;
use super::format::{MapEntry, TreeId, TreePtr};
use super::geometry::{Geometry, USAGE_PER_PAGE};
use super::tree::{PageKey, Trees};
use crate::crypto::Mac;
use crate::volume::{Generation, Result, SegmentId};

/// Blocks only snapshots reference: generation -> current location. They
/// stay counted in their segment's usage (see `snapshot.rs`).
#[derive(Default)]
pub struct Held {
    pub table: HashMap<Generation, u64>,
    /// How a held block is sealed now where that is not what the snapshot
    /// trees say: (key generation, MAC) for every held block sealed under a
    /// key generation above 0 (a rekey seals blocks again, and snapshot
    /// trees are never rewritten).
    pub seals: HashMap<Generation, (u16, Mac)>,
    /// Changed since the snapshot metadata was last written.
    pub dirty: bool,
    /// The newest snapshot's birth (0 without snapshots): a map or changed
    /// page, or a data block, that the live state drops with a generation
    /// below it is held, not freed.
    pub retain_below: Generation,
}

impl Held {
    /// Whether the held table names `pba` as the current home of `gen`.
    pub fn is_at(&self, gen: Generation, pba: u64) -> bool {
        self.table.get(&gen) == Some(&pba)
    }

    /// Holds the block `gen` at `pba`, sealed under `key_gen` with `mac`.
    pub fn insert(&mut self, gen: Generation, pba: u64, key_gen: u16, mac: Mac) {
        self.table.insert(gen, pba);
        if key_gen != 0 {
            self.seals.insert(gen, (key_gen, mac));
        } else {
            self.seals.remove(&gen);
        }
        self.dirty = true;
    }

    pub fn remove(&mut self, gen: Generation) -> Option<u64> {
        let r = self.table.remove(&gen);
        self.seals.remove(&gen);
        self.dirty |= r.is_some();
        r
    }

    /// Where and how a page a snapshot tree points at is now, if held.
    pub fn resolve_ptr(&self, ptr: TreePtr) -> TreePtr {
        let mut p = ptr;
        if let Some(&pba) = self.table.get(&ptr.gen) {
            p.pba = pba;
            if let Some(&(key_gen, mac)) = self.seals.get(&ptr.gen) {
                p.key_gen = key_gen;
                p.mac = mac;
            }
        }
        p
    }

    /// Where and how a data block a snapshot's map names is now, if held.
    pub fn resolve(&self, e: MapEntry) -> Option<MapEntry> {
        let pba = *self.table.get(&e.gen)?;
        let (key_gen, mac) = self
            .seals
            .get(&e.gen)
            .copied()
            .unwrap_or((e.key_gen, e.mac));
        Some(MapEntry {
            pba,
            key_gen,
            mac,
            ..e
        })
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }
}

/// Live-block accounting per segment.
///
/// `live[s]` counts the blocks of segment `s` that the current (in-memory)
/// state references, except pages of the segment-usage tree itself, which
/// are counted in `usage_pages` so that writing the usage tree never
/// changes the counts it stores. Held blocks stay counted.
pub struct Usage {
    pub live: Vec<u32>,
    pub usage_pages: HashMap<SegmentId, u32>,
    /// The sum of `live` and `usage_pages`, kept as they change.
    total: u64,
    pub dirty_leaves: BTreeSet<u64>,
    geo: Geometry,
    pub held: Held,
}

impl Usage {
    pub fn new(geo: Geometry) -> Usage {
        Usage {
            live: Vec::new(),
            usage_pages: HashMap::new(),
            total: 0,
            dirty_leaves: BTreeSet::new(),
            geo,
            held: Held::default(),
        }
    }

    /// The live state stops referencing a block: it is held if the newest
    /// snapshot references it, else its space is released.
    pub fn dropped(&mut self, gen: Generation, pba: u64, key_gen: u16, mac: Mac) {
        if gen < self.held.retain_below {
            self.held.insert(gen, pba, key_gen, mac);
        } else {
            self.dec(pba);
        }
    }

    pub fn live(&self, seg: SegmentId) -> u64 {
        self.live.get(seg.0 as usize).copied().unwrap_or(0) as u64
            + self.usage_pages.get(&seg).copied().unwrap_or(0) as u64
    }

    /// Live blocks in segments `0..extent`.
    pub fn total_live(&self, extent: u64) -> u64 {
        let sum = (0..extent).map(|s| self.live(SegmentId(s))).sum();
        debug_assert!(
            extent < self.live.len() as u64 || sum == self.total,
            "live total {} kept, {sum} counted",
            self.total
        );
        sum
    }

    /// Live blocks in every segment, without counting them (kept as the
    /// counters change).
    pub fn live_total(&self) -> u64 {
        self.total
    }

    fn slot(&mut self, seg: SegmentId) -> &mut u32 {
        let i = seg.0 as usize;
        if self.live.len() <= i {
            self.live.resize(i + 1, 0);
        }
        self.dirty_leaves.insert(seg.0 / USAGE_PER_PAGE);
        &mut self.live[i]
    }

    pub fn inc(&mut self, pba: u64) {
        let s = self.geo.segment_of(pba);
        *self.slot(s) += 1;
        self.total += 1;
    }

    pub fn dec(&mut self, pba: u64) {
        let s = self.geo.segment_of(pba);
        let c = self.slot(s);
        debug_assert!(*c > 0, "segment {s} usage underflow");
        if *c > 0 {
            *c -= 1;
            self.total -= 1;
        }
    }

    /// A tree page's on-disk copy stops being current (its page was dirtied).
    pub fn superseded(&mut self, tree: TreeId, ptr: TreePtr) {
        if matches!(tree, TreeId::Map | TreeId::Changed) {
            // Pages snapshots can share.
            self.dropped(ptr.gen, ptr.pba, ptr.key_gen, ptr.mac);
        } else if tree == TreeId::SegmentUsage {
            let s = self.geo.segment_of(ptr.pba);
            let c = self.usage_pages.entry(s).or_insert(0);
            if *c > 0 {
                *c -= 1;
                self.total -= 1;
            }
        } else {
            self.dec(ptr.pba);
        }
    }

    /// A tree page was written at `pba`.
    pub fn written(&mut self, tree: TreeId, pba: u64) {
        if tree == TreeId::SegmentUsage {
            *self
                .usage_pages
                .entry(self.geo.segment_of(pba))
                .or_insert(0) += 1;
            self.total += 1;
        } else {
            self.inc(pba);
        }
    }

    /// A block only snapshots reference moved from `old` to `new` (and is
    /// now sealed under `key_gen` with `mac`).
    pub fn held_moved(&mut self, gen: Generation, old: u64, new: u64, key_gen: u16, mac: Mac) {
        self.dec(old);
        self.inc(new);
        self.held.insert(gen, new, key_gen, mac);
    }

    /// Loads the counters of segments `0..extent` from the usage tree, and
    /// counts the pages of the usage tree itself.
    pub fn load(&mut self, ctx: &Ctx, trees: &mut Trees, extent: u64) -> Result<()> {
        self.live = vec![0; extent as usize];
        for leaf in 0..extent.div_ceil(USAGE_PER_PAGE) {
            let page = trees.get(ctx, PageKey::leaf(TreeId::SegmentUsage, leaf))?;
            for i in 0..USAGE_PER_PAGE {
                let seg = leaf * USAGE_PER_PAGE + i;
                if seg < extent {
                    let o = i as usize * 4;
                    self.live[seg as usize] =
                        u32::from_le_bytes(page[o..o + 4].try_into().expect("4 bytes"));
                }
            }
        }
        let mut pages = Vec::new();
        trees.visit(ctx, TreeId::SegmentUsage, &mut |_, ptr, _, _| {
            pages.push(ptr.pba)
        })?;
        for pba in pages {
            *self
                .usage_pages
                .entry(self.geo.segment_of(pba))
                .or_insert(0) += 1;
        }
        self.total = self.live.iter().map(|&c| c as u64).sum::<u64>()
            + self.usage_pages.values().map(|&c| c as u64).sum::<u64>();
        self.dirty_leaves.clear();
        Ok(())
    }

    /// The counters of usage leaf `leaf`, as its page holds them.
    pub fn leaf_bytes(&self, leaf: u64, page: &mut [u8]) {
        for i in 0..USAGE_PER_PAGE {
            let seg = (leaf * USAGE_PER_PAGE + i) as usize;
            let v = self.live.get(seg).copied().unwrap_or(0);
            page[i as usize * 4..i as usize * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
}
