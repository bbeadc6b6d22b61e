//! Consistency check: authenticates every metadata page and data block and
//! cross-checks the counters and bitmaps against the block map.

use std::collections::HashMap;

use std::collections::HashSet;

use super::ctx::Ctx;
use super::format::{
    MapEntry, TreeId, TreePtr, DATA_START, MAP_ENTRIES_PER_PAGE, MAP_ENTRY_LEN, TREES,
};
use super::snapshot::Unshared;
use super::state::State;
use super::tree::PageKey;
use crate::volume::{Generation, Lba, Result, SegmentId};
use crate::BLOCK_SIZE;

/// What `check` found. Problems are described for a person to read.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub pages: u64,
    pub data_blocks: u64,
    /// Live blocks that are zeroed: allocated, stored nowhere.
    pub zeroed_blocks: u64,
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Data blocks authenticated between two calls of a check's progress.
const PROGRESS_EVERY: u64 = 4096;

impl State {
    /// Checks every tree page and authenticates every mapped data block;
    /// `progress(done, total)` hears how many data blocks are done.
    pub fn check(&mut self, ctx: &Ctx, progress: &mut dyn FnMut(u64, u64)) -> Result<CheckReport> {
        let mut r = CheckReport::default();
        let mut live = vec![0u64; self.log.extent as usize];
        let mut usage_pages: HashMap<SegmentId, u64> = HashMap::new();
        let mut map_leaves = Vec::new();
        let mut bits = [0u64; 5];
        let end = ctx.header.end_block();
        for tree in TREES {
            let mut bad_ptrs = Vec::new();
            let res = self.trees.visit(ctx, tree, &mut |k, ptr, dirty, data| {
                r.pages += 1;
                if !dirty && !ptr.is_absent() {
                    let seg = (ptr.pba - DATA_START) / self.geo.seg_blocks;
                    if seg >= live.len() as u64 {
                        bad_ptrs.push(format!(
                            "{tree:?} page {k:?} lies in segment {seg}, past the extent"
                        ));
                    } else if tree == TreeId::SegmentUsage {
                        *usage_pages.entry(SegmentId(seg)).or_insert(0) += 1;
                    } else {
                        live[seg as usize] += 1;
                    }
                }
                if k.level == 0 {
                    if tree == TreeId::Map {
                        map_leaves.push(k.index);
                    } else if tree != TreeId::SegmentUsage {
                        bits[tree as usize] +=
                            data.iter().map(|b| b.count_ones() as u64).sum::<u64>();
                    }
                }
            });
            r.problems.extend(bad_ptrs);
            if let Err(e) = res {
                r.problems.push(format!("{tree:?} tree: {e}"));
            }
        }

        let mut mapped = 0u64;
        let total = self.allocated;
        progress(0, total);
        let mut buf = vec![0u8; BLOCK_SIZE];
        for leaf in map_leaves {
            let page = match self.trees.get(ctx, PageKey::leaf(TreeId::Map, leaf)) {
                Ok(p) => Box::new(*p),
                Err(e) => {
                    r.problems.push(format!("map leaf {leaf}: {e}"));
                    continue;
                }
            };
            for i in 0..MAP_ENTRIES_PER_PAGE {
                let e = MapEntry::decode(&page[i * MAP_ENTRY_LEN..]);
                if !e.is_mapped() {
                    continue;
                }
                let lba = Lba(leaf * MAP_ENTRIES_PER_PAGE as u64 + i as u64);
                mapped += 1;
                if mapped % PROGRESS_EVERY == 0 {
                    progress(mapped.min(total), total);
                }
                if lba.0 >= self.geo.logical_blocks {
                    r.problems.push(format!(
                        "map entry for block {lba} lies past the end of the volume"
                    ));
                    continue;
                }
                match self.get_bit(ctx, TreeId::Allocated, lba) {
                    Ok(true) => {}
                    Ok(false) => r.problems.push(format!(
                        "logical block {lba} is mapped but not marked allocated"
                    )),
                    Err(err) => r
                        .problems
                        .push(format!("allocated bitmap at block {lba}: {err}")),
                }
                if e.is_zeroed() {
                    r.zeroed_blocks += 1;
                    continue;
                }
                if e.pba < DATA_START || e.pba >= end {
                    r.problems.push(format!(
                        "logical block {lba} points outside the volume (block {})",
                        e.pba
                    ));
                    continue;
                }
                let seg = (e.pba - DATA_START) / self.geo.seg_blocks;
                match live.get_mut(seg as usize) {
                    Some(c) => *c += 1,
                    None => r.problems.push(format!(
                        "logical block {lba} lies in segment {seg}, past the extent"
                    )),
                }
                r.data_blocks += 1;
                if !ctx.data_block_authentic(&mut buf, lba, &e) {
                    r.problems.push(format!(
                        "logical block {lba} (stored at block {}) fails authentication",
                        e.pba
                    ));
                }
            }
        }
        progress(total, total);
        if mapped != self.allocated {
            r.problems.push(format!(
                "the map has {mapped} blocks but the volume counts {}",
                self.allocated
            ));
        }
        if bits[TreeId::Allocated as usize] != mapped {
            r.problems.push(format!(
                "the allocated bitmap has {} bits set for {mapped} mapped blocks",
                bits[TreeId::Allocated as usize]
            ));
        }
        self.check_snapshots(ctx, &mut r);
        // Blocks only snapshots reference, and the snapshot metadata pages.
        for pba in self.snaps.held_locations(&self.usage.held) {
            let seg = (pba - DATA_START) / self.geo.seg_blocks;
            match live.get_mut(seg as usize) {
                Some(c) => *c += 1,
                None => r.problems.push(format!(
                    "a block held for snapshots lies in segment {seg}, past the extent"
                )),
            }
        }
        for s in self.log.segments() {
            let want = live[s.0 as usize];
            let have = self.usage.live.get(s.0 as usize).copied().unwrap_or(0) as u64;
            if want != have {
                r.problems.push(format!(
                    "segment {s}: usage says {have} live blocks, found {want}"
                ));
            }
            let up = usage_pages.get(&s).copied().unwrap_or(0);
            let have_up = self.usage.usage_pages.get(&s).copied().unwrap_or(0) as u64;
            if up != have_up {
                r.problems.push(format!(
                    "segment {s}: {have_up} usage pages counted, found {up}"
                ));
            }
            if self.log.free.contains(&s) && want + up > 0 {
                r.problems.push(format!(
                    "segment {s} is free but holds {} live blocks",
                    want + up
                ));
            }
        }
        Ok(r)
    }

    /// Authenticates what only snapshots reference: for each snapshot, the
    /// pages and data blocks that neither the previous snapshot nor the
    /// live state shares (those were checked there).
    fn check_snapshots(&mut self, ctx: &Ctx, r: &mut CheckReport) {
        let mut buf = vec![0u8; BLOCK_SIZE];
        // Generations snapshots reference that the live state does not:
        // exactly the held table, or space leaks (held, unreferenced) or,
        // worse, a referenced block could be reused (referenced, not held).
        let mut referenced: HashSet<Generation> = HashSet::new();
        let mut lists: Vec<Vec<TreePtr>> = self
            .snaps
            .list
            .iter()
            .map(|s| s.rec.changed.clone())
            .collect();
        lists.push(self.snaps.live_changed.clone());
        for l in lists {
            match self.changed_pages(ctx, &l) {
                Ok(g) => referenced.extend(g),
                Err(e) => r.problems.push(format!("a snapshot's changed bitmap: {e}")),
            }
        }
        for i in 0..self.snaps.list.len() {
            let name = self.snaps.list[i].rec.name.clone();
            let items = match self.walk_unshared(ctx, i, true) {
                Ok(v) => v,
                Err(e) => {
                    r.problems.push(format!("snapshot {name}: {e}"));
                    continue;
                }
            };
            for it in items {
                let (lba, e) = match it {
                    Unshared::Page(g) => {
                        referenced.insert(g);
                        r.pages += 1;
                        continue;
                    }
                    Unshared::Data(lba, e) => (lba, e),
                };
                referenced.insert(e.gen);
                r.data_blocks += 1;
                let e = self.usage.held.resolve(e).unwrap_or(e);
                let pba = e.pba;
                if !ctx.data_block_authentic(&mut buf, lba, &e) {
                    r.problems.push(format!(
                        "snapshot {name}: logical block {lba} (stored at block {pba}) fails authentication"
                    ));
                }
            }
        }
        let unheld = referenced
            .iter()
            .filter(|g| !self.usage.held.table.contains_key(g))
            .count();
        if unheld > 0 {
            r.problems.push(format!(
                "{unheld} blocks that snapshots reference are not in the held table (their space could be reused)"
            ));
        }
        let leaked = self
            .usage
            .held
            .table
            .keys()
            .filter(|g| !referenced.contains(g))
            .count();
        if leaked > 0 {
            r.problems.push(format!(
                "{leaked} held blocks are referenced by no snapshot (space leak)"
            ));
        }
    }
}
