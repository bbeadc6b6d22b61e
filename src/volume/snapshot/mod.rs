//! Snapshots: frozen, persisted roots of the block map.
//!
//! Taking a snapshot writes a checkpoint and keeps its block-map root and
//! changed-bitmap root under a name; the live changed bitmap then starts
//! afresh. Nothing is copied, so the cost is that of one checkpoint
//! (bounded by the dirty pages, not by the volume's size).
//!
//! **Which blocks a snapshot holds.** Generations only grow, so a snapshot
//! is also a point in generation order: its `birth` is the first
//! generation handed out after it. A block (data block or map/changed page)
//! that the live state drops while its generation is below the newest
//! snapshot's birth was live when that snapshot was taken, so that snapshot
//! still references it: the block stays counted in its segment and goes
//! into the **held table** (generation -> current location) instead of
//! being freed. A block is referenced by a contiguous run of snapshots (those
//! taken while it was live), so deleting a snapshot frees exactly the
//! blocks of its trees that neither neighbour (the previous snapshot, and
//! the next one or the live state) shares: subtrees with the same
//! generation at the same position are identical and are skipped whole.
//!
//! **Reading and moving held blocks.** Snapshot trees are never rewritten.
//! Pointers in them keep the location a block had when the snapshot was
//! taken; a held block's current location is in the held table, and a
//! block still live is where the live map says (the cleaner may have moved
//! it). The cleaner moves held blocks verbatim (same ciphertext, generation
//! and MAC: seals depend on the logical address, not the location) and
//! updates the held table, which the next checkpoint makes durable, before
//! the old segment can be reused.
//!

mod ops;

use std::collections::HashSet;

use super::checkpoint::Checkpoints;
use super::ctx::page_tag;
use super::ctx::Ctx;
use super::format::{Block, Entry, SnapMeta, SnapRecord, TreeId, TreePtr};
use super::format::{LEAF_PAYLOAD, TREE_PTR_LEN};
use super::geometry::Geometry;
use super::log::Log;
use super::tree::{PageKey, PageSource, Shape, Trees, FANOUT};
use super::usage::{Held, Usage};
use crate::crypto::Mac;
use crate::volume::{Generation, Result, SnapshotId, VolumeError};
use crate::BLOCK_SIZE;

pub use ops::Unshared;

/// Changed-bitmap roots a list may hold before they are merged into one.
pub const MAX_CHANGED_ROOTS: usize = 16;
/// Cached pages per snapshot's map tree.
const SNAP_CACHE_PAGES: usize = 256;

/// What `snapshot list` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub name: String,
    pub created_sec: i64,
    pub created_nsec: u32,
    pub allocated_blocks: u64,
    /// Blocks that deleting it would free: held by no other snapshot and
    /// not by the live volume.
    pub unique_blocks: u64,
}

/// A snapshot in memory: its record and a cache of its map tree.
pub struct Snap {
    pub rec: SnapRecord,
    pub trees: Trees,
}

/// Reads a snapshot's pages from wherever they are now: the held table
/// knows where the cleaner moved a block that only snapshots reference.
pub struct HeldSource<'a> {
    pub(crate) ctx: &'a Ctx<'a>,
    pub held: &'a Held,
}

impl PageSource for HeldSource<'_> {
    fn load_page(&self, key: PageKey, ptr: &TreePtr) -> Result<Box<Block>> {
        self.ctx.load_page(key, &self.held.resolve_ptr(*ptr))
    }
}

/// The snapshots of a volume and where their metadata is stored.
pub struct Snapshots {
    geo: Geometry,
    /// Oldest first.
    pub list: Vec<Snap>,
    /// Ids are never reused.
    pub next_id: u64,
    /// Changed bitmaps of deleted snapshots, handed to the next snapshot.
    pub live_changed: Vec<TreePtr>,
    /// Where the snapshot metadata is (all its pages), and its root and
    /// leaf count as the checkpoint names them.
    pub meta_pages: Vec<TreePtr>,
    pub meta_root: (TreePtr, u32),
    /// The list changed since the metadata was last written.
    pub meta_dirty: bool,
}

impl Snapshots {
    /// No snapshots.
    pub fn new(geo: Geometry) -> Snapshots {
        Snapshots {
            geo,
            list: Vec::new(),
            next_id: 1,
            live_changed: Vec::new(),
            meta_pages: Vec::new(),
            meta_root: (TreePtr::ABSENT, 0),
            meta_dirty: false,
        }
    }

    pub fn new_snap(&self, rec: SnapRecord) -> Snap {
        let mut roots = [TreePtr::ABSENT; 5];
        roots[TreeId::Map as usize] = rec.map;
        Snap {
            rec,
            trees: Trees::new(roots, self.geo.shapes(), SNAP_CACHE_PAGES),
        }
    }

    /// A changed bitmap by its root, to read (a small cache of its own).
    pub fn changed_tree(&self, root: TreePtr) -> Trees {
        let mut roots = [TreePtr::ABSENT; 5];
        roots[TreeId::Changed as usize] = root;
        Trees::new(roots, self.geo.shapes(), 64)
    }

    /// The snapshot metadata as it must be persisted now.
    fn meta(&self, held: &Held) -> SnapMeta {
        SnapMeta {
            next_id: self.next_id,
            snaps: self.list.iter().map(|s| s.rec.clone()).collect(),
            live_changed: self.live_changed.clone(),
            held: held.table.clone(),
            seals: held.seals.clone(),
        }
    }

    /// Pages the snapshot metadata takes when written now.
    pub fn meta_pages_needed(&self, held: &Held) -> u64 {
        if self.next_id <= 1 {
            return 0;
        }
        let bytes = 16
            + self
                .list
                .iter()
                .map(|s| 100 + s.rec.name.len() + 32 * s.rec.changed.len())
                .sum::<usize>()
            + 32 * self.live_changed.len()
            + 16 * held.len();
        let leaves = bytes.div_ceil(LEAF_PAYLOAD) as u64;
        leaves + leaves.div_ceil(FANOUT - 1) + 1
    }

    /// Writes the snapshot metadata if it changed (during a checkpoint,
    /// after the trees and before segment usage), and releases the old copy.
    pub fn write_meta(
        &mut self,
        ctx: &Ctx,
        log: &mut Log,
        gens: &mut Checkpoints,
        usage: &mut Usage,
    ) -> Result<()> {
        if !self.meta_dirty && !usage.held.dirty {
            return Ok(());
        }
        let meta = self.meta(&usage.held);
        let mut written = Vec::new();
        let (root, leaves) = if meta.is_empty() {
            (TreePtr::ABSENT, 0)
        } else {
            let blob = meta.encode();
            let mut pages: Vec<Box<Block>> = blob
                .chunks(LEAF_PAYLOAD)
                .map(|c| {
                    let mut b: Box<Block> = Box::new([0u8; BLOCK_SIZE]);
                    b[..4].copy_from_slice(&(c.len() as u32).to_le_bytes());
                    b[4..4 + c.len()].copy_from_slice(c);
                    b
                })
                .collect();
            let leaves = pages.len() as u64;
            let mut level = 0u8;
            loop {
                let ptrs = append_meta_pages(ctx, log, gens, level, &pages)?;
                written.extend(ptrs.iter().copied());
                if ptrs.len() == 1 && (level > 0 || leaves == 1) {
                    break (ptrs[0], leaves);
                }
                pages = ptrs
                    .chunks(FANOUT as usize)
                    .map(|c| {
                        let mut b: Box<Block> = Box::new([0u8; BLOCK_SIZE]);
                        for (i, p) in c.iter().enumerate() {
                            p.encode(&mut b[i * TREE_PTR_LEN..]);
                        }
                        b
                    })
                    .collect();
                level += 1;
            }
        };
        for p in std::mem::take(&mut self.meta_pages) {
            usage.dec(p.pba);
        }
        for p in &written {
            usage.inc(p.pba);
        }
        self.meta_pages = written;
        self.meta_root = (root, leaves as u32);
        self.meta_dirty = false;
        usage.held.dirty = false;
        Ok(())
    }

    /// Reads the snapshot metadata a checkpoint names, and the locations of
    /// its pages.
    pub fn read_meta(
        ctx: &Ctx,
        root: TreePtr,
        leaves: u32,
        gen_limit: Generation,
    ) -> Result<(SnapMeta, Vec<TreePtr>)> {
        if root.is_absent() {
            return Ok((SnapMeta::default(), Vec::new()));
        }
        let shape = Shape::new(leaves as u64);
        let mut pages = vec![root];
        let mut level_ptrs = vec![root];
        let mut level = shape.depth;
        while level > 0 {
            let mut next = Vec::new();
            for (i, p) in level_ptrs.iter().enumerate() {
                let b = ctx.load_page(
                    PageKey {
                        tree: TreeId::SnapMeta,
                        level,
                        index: i as u64,
                    },
                    p,
                )?;
                for k in 0..FANOUT as usize {
                    let c = TreePtr::decode(&b[k * TREE_PTR_LEN..]);
                    if c.is_absent() {
                        break;
                    }
                    next.push(c);
                }
            }
            level -= 1;
            if level > 0 && next.len() as u64 > leaves as u64 {
                return Err(VolumeError::Corrupted(
                    "snapshot metadata index is too long".into(),
                ));
            }
            pages.extend(next.iter().copied());
            level_ptrs = next;
        }
        if level_ptrs.len() as u64 != leaves as u64 {
            return Err(VolumeError::Corrupted(format!(
                "snapshot metadata has {} pages, the checkpoint says {leaves}",
                level_ptrs.len()
            )));
        }
        let mut blob = Vec::new();
        for (i, p) in level_ptrs.iter().enumerate() {
            let b = ctx.load_page(PageKey::leaf(TreeId::SnapMeta, i as u64), p)?;
            let n = u32::from_le_bytes(b[..4].try_into().expect("4")) as usize;
            if n == 0 || n > LEAF_PAYLOAD {
                return Err(VolumeError::Corrupted(format!(
                    "snapshot metadata page {i} holds {n} bytes"
                )));
            }
            blob.extend_from_slice(&b[4..4 + n]);
        }
        let meta = SnapMeta::decode(&blob, ctx.header.end_block(), gen_limit)?;
        Ok((meta, pages))
    }

    /// Installs metadata read at open.
    pub fn install(
        &mut self,
        meta: SnapMeta,
        pages: Vec<TreePtr>,
        root: (TreePtr, u32),
        held: &mut Held,
    ) {
        self.next_id = meta.next_id.max(1);
        self.live_changed = meta.live_changed;
        held.table = meta.held;
        held.seals = meta.seals;
        held.retain_below = meta.snaps.last().map_or(Generation(0), |s| s.birth);
        self.list = meta.snaps.into_iter().map(|r| self.new_snap(r)).collect();
        self.meta_pages = pages;
        self.meta_root = root;
    }

    pub fn is_meta_page(&self, pba: u64) -> bool {
        self.meta_pages.iter().any(|p| p.pba == pba)
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|s| s.rec.name == name)
    }

    /// [`Snapshots::index`], or an error naming the missing snapshot.
    pub fn named(&self, name: &str) -> Result<usize> {
        self.index(name)
            .ok_or_else(|| VolumeError::NoSuchSnapshot(format!("snapshot {name:?}")))
    }

    pub fn index_by_id(&self, id: SnapshotId) -> Option<usize> {
        self.list.iter().position(|s| s.rec.id == id)
    }

    /// Every location the held table and the metadata pages occupy (for
    /// the consistency check).
    pub fn held_locations(&self, held: &Held) -> HashSet<u64> {
        held.table
            .values()
            .copied()
            .chain(self.meta_pages.iter().map(|p| p.pba))
            .collect()
    }
}

/// Seals and appends one level of snapshot metadata pages.
fn append_meta_pages(
    ctx: &Ctx,
    log: &mut Log,
    gens: &mut Checkpoints,
    level: u8,
    pages: &[Box<Block>],
) -> Result<Vec<TreePtr>> {
    let base = gens.alloc_gens(ctx, pages.len() as u64)?;
    let gk = ctx.keys.current();
    let mut buf = Vec::with_capacity(pages.len() * BLOCK_SIZE);
    let mut tags = Vec::with_capacity(pages.len());
    for (i, p) in pages.iter().enumerate() {
        buf.extend_from_slice(&p[..]);
        tags.push(page_tag(
            TreeId::SnapMeta,
            level,
            i as u64,
            base + i as u64,
            gk.key_gen(),
        ));
    }
    let mut macs = vec![Mac::default(); pages.len()];
    ctx.engine.seal(&gk, &mut buf, &tags, &mut macs);
    let entries: Vec<Entry> = tags
        .iter()
        .zip(&macs)
        .enumerate()
        .map(|(i, (t, m))| Entry::TreePage {
            tree: TreeId::SnapMeta,
            level,
            index: i as u64,
            gen: Generation(t.gen),
            key_gen: t.key,
            mac: *m,
        })
        .collect();
    let pbas = log.append(ctx, gens, &entries, &buf, true, true)?;
    Ok(pbas
        .iter()
        .zip(tags.iter().zip(&macs))
        .map(|(pba, (t, m))| TreePtr {
            pba: *pba,
            gen: Generation(t.gen),
            key_gen: t.key,
            mac: *m,
        })
        .collect())
}
