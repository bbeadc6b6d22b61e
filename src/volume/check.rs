//! Consistency check: authenticates every metadata page and data block and
//! cross-checks the counters and bitmaps against the block map.

use std::collections::HashMap;

use super::format::{MapEntry, TreeId, DATA_START, MAP_ENTRIES_PER_PAGE, MAP_ENTRY_LEN, TREES};
use super::state::State;
use super::tree::PageKey;
use super::Ctx;
use crate::crypto::{BlockKind, Tag};
use crate::device::read_exact_at;
use crate::{Result, BLOCK_SIZE};

/// What `check` found. Problems are described for a person to read.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub pages: u64,
    pub data_blocks: u64,
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Whether the data block `e` names for `lba` reads back and authenticates.
pub(super) fn data_block_authentic(ctx: &Ctx, buf: &mut [u8], lba: u64, e: &MapEntry) -> bool {
    read_exact_at(ctx.dev, buf, e.pba * BLOCK_SIZE as u64).is_ok()
        && ctx
            .keys
            .mac(Tag::new(BlockKind::Data, lba, e.gen), buf)
            .ct_eq(&e.mac)
}

impl State {
    pub fn check(&mut self, ctx: &Ctx) -> Result<CheckReport> {
        let mut r = CheckReport::default();
        let mut live = vec![0u64; self.extent as usize];
        let mut usage_pages: HashMap<u64, u64> = HashMap::new();
        let mut map_leaves = Vec::new();
        let mut bits = [0u64; 5];
        let end = ctx.header.end_block();
        for tree in TREES {
            let mut bad_ptrs = Vec::new();
            let res = self.trees.visit(ctx, tree, &mut |k, ptr, dirty, data| {
                r.pages += 1;
                if !dirty && !ptr.is_absent() {
                    let seg = (ptr.pba - DATA_START) / self.seg_blocks;
                    if seg >= live.len() as u64 {
                        bad_ptrs.push(format!(
                            "{tree:?} page {k:?} lies in segment {seg}, past the extent"
                        ));
                    } else if tree == TreeId::SegmentUsage {
                        *usage_pages.entry(seg).or_insert(0) += 1;
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
                let lba = leaf * MAP_ENTRIES_PER_PAGE as u64 + i as u64;
                mapped += 1;
                if lba >= self.logical_blocks {
                    r.problems.push(format!(
                        "map entry for block {lba} lies past the end of the volume"
                    ));
                    continue;
                }
                if e.pba < DATA_START || e.pba >= end {
                    r.problems.push(format!(
                        "logical block {lba} points outside the volume (block {})",
                        e.pba
                    ));
                    continue;
                }
                let seg = (e.pba - DATA_START) / self.seg_blocks;
                match live.get_mut(seg as usize) {
                    Some(c) => *c += 1,
                    None => r.problems.push(format!(
                        "logical block {lba} lies in segment {seg}, past the extent"
                    )),
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
                r.data_blocks += 1;
                if !data_block_authentic(ctx, &mut buf, lba, &e) {
                    r.problems.push(format!(
                        "logical block {lba} (stored at block {}) fails authentication",
                        e.pba
                    ));
                }
            }
        }
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
        for pba in self.held_locations() {
            let seg = (pba - DATA_START) / self.seg_blocks;
            match live.get_mut(seg as usize) {
                Some(c) => *c += 1,
                None => r.problems.push(format!(
                    "a block held for snapshots lies in segment {seg}, past the extent"
                )),
            }
        }
        for s in 0..self.extent {
            let want = live[s as usize];
            let have = self.usage.live.get(s as usize).copied().unwrap_or(0) as u64;
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
            if self.free.contains(&s) && want + up > 0 {
                r.problems.push(format!(
                    "segment {s} is free but holds {} live blocks",
                    want + up
                ));
            }
        }
        Ok(r)
    }
}
