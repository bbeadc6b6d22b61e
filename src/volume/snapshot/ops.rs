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
//! **Persistence.** The snapshot list, the held table and the changed
//! bitmaps waiting for the next snapshot are one byte string, cut into
//! sealed pages laid out as a radix tree (docs/FORMAT.md, "Snapshot
//! metadata"); the checkpoint points at its root. It is rewritten by every
//! checkpoint after it changed.

use std::collections::{HashMap, HashSet};

use super::format::{
    check_snapshot_name, page_addr, Block, Entry, MapEntry, TreeId, TreePtr, TREE_PTR_LEN,
};
use super::format::{
    SnapMeta, SnapRecord, LEAF_PAYLOAD, MAP_ENTRIES_PER_PAGE, MAP_ENTRY_LEN, MAX_SNAPSHOTS,
    MAX_SNAPSHOT_ID,
};
use super::state::{shapes, State};
use super::tree::{PageKey, PageSource, Shape, Trees, FANOUT};
use super::Ctx;
use crate::crypto::{BlockKind, Mac, Tag};
use crate::{Error, Result, BLOCK_SIZE};
/// Changed-bitmap roots a list may hold before they are merged into one.
pub const MAX_CHANGED_ROOTS: usize = 16;
/// Cached pages per snapshot's map tree.
const SNAP_CACHE_PAGES: usize = 256;

/// What `snapshot list` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: u64,
    pub name: String,
    pub created_sec: i64,
    pub created_nsec: u32,
    pub allocated_blocks: u64,
    /// Blocks that deleting it would free: held by no other snapshot and
    /// not by the live volume.
    pub unique_blocks: u64,
}

/// A page or data block a snapshot walk found unshared.
enum Unshared {
    Page(u64),
    Data(u64, MapEntry),
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
    pub held: &'a HashMap<u64, u64>,
}

impl PageSource for HeldSource<'_> {
    fn load_page(&self, key: PageKey, ptr: &TreePtr) -> Result<Box<Block>> {
        let mut p = *ptr;
        if let Some(&pba) = self.held.get(&ptr.gen) {
            p.pba = pba;
        }
        self.ctx.load_page(key, &p)
    }
}

// ------------------------------------------------------------ state

impl State {
    pub fn new_snap(&self, rec: SnapRecord) -> Snap {
        let mut roots = [TreePtr::ABSENT; 5];
        roots[TreeId::Map as usize] = rec.map;
        Snap {
            rec,
            trees: Trees::new(
                roots,
                shapes(self.logical_blocks, self.max_segments),
                SNAP_CACHE_PAGES,
            ),
        }
    }

    /// The snapshot metadata as it must be persisted now.
    fn snap_meta(&self) -> SnapMeta {
        SnapMeta {
            next_id: self.snap_next_id,
            snaps: self.snaps.iter().map(|s| s.rec.clone()).collect(),
            live_changed: self.live_changed.clone(),
            held: self.usage.held.clone(),
        }
    }

    /// Pages the snapshot metadata takes when written now.
    pub fn snap_meta_pages(&self) -> u64 {
        if self.snap_next_id <= 1 {
            return 0;
        }
        let bytes = 16
            + self
                .snaps
                .iter()
                .map(|s| 100 + s.rec.name.len() + 32 * s.rec.changed.len())
                .sum::<usize>()
            + 32 * self.live_changed.len()
            + 16 * self.usage.held.len();
        let leaves = bytes.div_ceil(LEAF_PAYLOAD) as u64;
        leaves + leaves.div_ceil(FANOUT - 1) + 1
    }

    /// Writes the snapshot metadata if it changed (during a checkpoint,
    /// after the trees and before segment usage), and releases the old copy.
    pub fn write_snap_meta(&mut self, ctx: &Ctx) -> Result<()> {
        if !self.snap_meta_dirty && !self.usage.held_dirty {
            return Ok(());
        }
        let meta = self.snap_meta();
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
                let ptrs = self.append_meta_pages(ctx, level, &pages)?;
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
            self.usage.dec(p.pba);
        }
        for p in &written {
            self.usage.inc(p.pba);
        }
        self.meta_pages = written;
        self.meta_root = (root, leaves as u32);
        self.snap_meta_dirty = false;
        self.usage.held_dirty = false;
        Ok(())
    }

    fn append_meta_pages(
        &mut self,
        ctx: &Ctx,
        level: u8,
        pages: &[Box<Block>],
    ) -> Result<Vec<TreePtr>> {
        let base = self.alloc_gens(ctx, pages.len() as u64)?;
        let mut buf = Vec::with_capacity(pages.len() * BLOCK_SIZE);
        let mut tags = Vec::with_capacity(pages.len());
        for (i, p) in pages.iter().enumerate() {
            buf.extend_from_slice(&p[..]);
            tags.push(Tag::new(
                BlockKind::TreePage,
                page_addr(TreeId::SnapMeta, level, i as u64),
                base + i as u64,
            ));
        }
        let mut macs = vec![Mac::default(); pages.len()];
        ctx.engine.seal(ctx.keys, &mut buf, &tags, &mut macs);
        let entries: Vec<Entry> = tags
            .iter()
            .zip(&macs)
            .enumerate()
            .map(|(i, (t, m))| Entry::TreePage {
                tree: TreeId::SnapMeta,
                level,
                index: i as u64,
                gen: t.gen,
                mac: *m,
            })
            .collect();
        let pbas = self.append(ctx, &entries, &buf, true, true)?;
        Ok(pbas
            .iter()
            .zip(tags.iter().zip(&macs))
            .map(|(pba, (t, m))| TreePtr {
                pba: *pba,
                gen: t.gen,
                mac: *m,
            })
            .collect())
    }

    /// Reads the snapshot metadata a checkpoint names, and the locations of
    /// its pages.
    pub fn read_snap_meta(
        &self,
        ctx: &Ctx,
        root: TreePtr,
        leaves: u32,
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
                return Err(Error::Corrupted(
                    "snapshot metadata index is too long".into(),
                ));
            }
            pages.extend(next.iter().copied());
            level_ptrs = next;
        }
        if level_ptrs.len() as u64 != leaves as u64 {
            return Err(Error::Corrupted(format!(
                "snapshot metadata has {} pages, the checkpoint says {leaves}",
                level_ptrs.len()
            )));
        }
        let mut blob = Vec::new();
        for (i, p) in level_ptrs.iter().enumerate() {
            let b = ctx.load_page(PageKey::leaf(TreeId::SnapMeta, i as u64), p)?;
            let n = u32::from_le_bytes(b[..4].try_into().expect("4")) as usize;
            if n == 0 || n > LEAF_PAYLOAD {
                return Err(Error::Corrupted(format!(
                    "snapshot metadata page {i} holds {n} bytes"
                )));
            }
            blob.extend_from_slice(&b[4..4 + n]);
        }
        let meta = SnapMeta::decode(&blob, ctx.header.end_block(), self.gen_limit)?;
        Ok((meta, pages))
    }

    /// Installs metadata read at open.
    pub fn install_snap_meta(&mut self, meta: SnapMeta, pages: Vec<TreePtr>, root: (TreePtr, u32)) {
        self.snap_next_id = meta.next_id.max(1);
        self.live_changed = meta.live_changed;
        self.usage.held = meta.held;
        self.usage.retain_below = meta.snaps.last().map_or(0, |s| s.birth);
        self.snaps = meta.snaps.into_iter().map(|r| self.new_snap(r)).collect();
        self.meta_pages = pages;
        self.meta_root = root;
    }

    pub fn is_meta_page(&self, pba: u64) -> bool {
        self.meta_pages.iter().any(|p| p.pba == pba)
    }

    // -------------------------------------------------------- operations

    pub fn snap_index(&self, name: &str) -> Option<usize> {
        self.snaps.iter().position(|s| s.rec.name == name)
    }

    /// [`State::snap_index`], or an error naming the missing snapshot.
    pub fn snap_named(&self, name: &str) -> Result<usize> {
        self.snap_index(name).ok_or_else(|| Error::Fs {
            kind: crate::FsError::NotFound,
            what: format!("snapshot {name:?}"),
        })
    }

    pub fn snap_index_by_id(&self, id: u64) -> Option<usize> {
        self.snaps.iter().position(|s| s.rec.id == id)
    }

    /// Takes a snapshot of the current state. Durable when it returns.
    /// The caller makes sure no transaction that already took generations
    /// is still to be applied (see `Inner::commits`).
    pub fn snapshot_create(&mut self, ctx: &Ctx, name: &str, now: (i64, u32)) -> Result<u64> {
        check_snapshot_name(name)?;
        if self.snap_index(name).is_some() {
            return Err(Error::Fs {
                kind: crate::FsError::Exists,
                what: format!("snapshot {name:?}"),
            });
        }
        if self.snaps.len() >= MAX_SNAPSHOTS {
            return Err(Error::NoSpace(format!(
                "a volume keeps at most {MAX_SNAPSHOTS} snapshots; delete one first"
            )));
        }
        if self.snap_next_id > MAX_SNAPSHOT_ID {
            return Err(Error::NoSpace(format!(
                "this volume has used all {MAX_SNAPSHOT_ID} snapshot ids; copy its data to a new volume"
            )));
        }
        // Room for both checkpoints, leaving the reserve: a full volume
        // refuses the snapshot (nothing changed) rather than fail half-way.
        self.ensure_space(ctx, &[], false)?;
        self.checkpoint(ctx)?;
        // From here on a failure leaves memory ahead of the disk: the volume
        // refuses further work until it is reopened (and recovery finds the
        // state before the snapshot).
        let r = self.freeze(ctx, name, now);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn freeze(&mut self, ctx: &Ctx, name: &str, now: (i64, u32)) -> Result<u64> {
        let roots = self.trees.roots();
        let mut changed = std::mem::take(&mut self.live_changed);
        let live = roots[TreeId::Changed as usize];
        if !live.is_absent() {
            changed.insert(0, live);
        }
        let rec = SnapRecord {
            id: self.snap_next_id,
            name: name.to_string(),
            created_sec: now.0,
            created_nsec: now.1,
            birth: self.next_gen,
            checkpoint_seq: self.last_checkpoint.seq,
            allocated: self.allocated,
            map: roots[TreeId::Map as usize],
            changed: Vec::new(),
        };
        let id = rec.id;
        self.usage.retain_below = rec.birth;
        let snap = self.new_snap(rec);
        self.snaps.push(snap);
        self.snap_next_id += 1;
        self.snap_meta_dirty = true;
        // The live changed bitmap starts afresh: its pages now belong to
        // the snapshot (their generations are below its birth: held).
        let State { trees, usage, .. } = self;
        trees.clear_tree(ctx, TreeId::Changed, &mut |t, p| usage.superseded(t, p))?;
        let changed = self.bounded_changed(ctx, changed)?;
        self.snaps.last_mut().expect("just pushed").rec.changed = changed;
        self.changed_since = self.last_checkpoint.seq;
        self.checkpoint(ctx)?;
        Ok(id)
    }

    /// A list of changed-bitmap roots, merged into one bitmap when it grows
    /// past [`MAX_CHANGED_ROOTS`] (deleting snapshots concatenates lists).
    fn bounded_changed(&mut self, ctx: &Ctx, roots: Vec<TreePtr>) -> Result<Vec<TreePtr>> {
        if roots.len() <= MAX_CHANGED_ROOTS {
            return Ok(roots);
        }
        let leaves = self.changed_leaves(ctx, &roots)?;
        let old = self.changed_pages(ctx, &roots)?;
        let mut t = Trees::new(
            [TreePtr::ABSENT; 5],
            shapes(self.logical_blocks, self.max_segments),
            64,
        );
        for (index, data) in &leaves {
            let page = t.get_mut(ctx, PageKey::leaf(TreeId::Changed, *index), &mut |_, _| {})?;
            page.copy_from_slice(&data[..]);
        }
        // Written by the same code as the live trees' pages.
        std::mem::swap(&mut self.trees, &mut t);
        let written = self.write_tree(ctx, TreeId::Changed);
        std::mem::swap(&mut self.trees, &mut t);
        written?;
        let mut fresh = Vec::new();
        t.visit(ctx, TreeId::Changed, &mut |_, p, _, _| fresh.push(p))?;
        // Only the snapshot list references the new pages: they are held.
        for p in fresh {
            self.usage.held.insert(p.gen, p.pba);
        }
        for g in old {
            if let Some(pba) = self.usage.held.remove(&g) {
                self.usage.dec(pba);
            }
        }
        self.usage.held_dirty = true;
        let root = t.roots()[TreeId::Changed as usize];
        Ok(if root.is_absent() {
            Vec::new()
        } else {
            vec![root]
        })
    }

    /// Whether another tree at `key` holds the page with generation `gen`:
    /// the neighbours of snapshot `i` (previous snapshot; next snapshot or
    /// the live state).
    fn neighbour_has_page(
        &mut self,
        ctx: &Ctx,
        i: usize,
        next_is_live: bool,
        key: PageKey,
        gen: u64,
    ) -> Result<bool> {
        let State {
            snaps,
            usage,
            trees,
            ..
        } = self;
        let src = HeldSource {
            ctx,
            held: &usage.held,
        };
        if i > 0 {
            let p = snaps[i - 1].trees.current_ptr(&src, key)?.0;
            if !p.is_absent() && p.gen == gen {
                return Ok(true);
            }
        }
        if i + 1 < snaps.len() && !next_is_live {
            let p = snaps[i + 1].trees.current_ptr(&src, key)?.0;
            Ok(!p.is_absent() && p.gen == gen)
        } else if key.tree == TreeId::Map {
            let (p, dirty) = trees.current_ptr(ctx, key)?;
            Ok(!dirty && !p.is_absent() && p.gen == gen)
        } else {
            Ok(false)
        }
    }

    fn neighbour_has_block(
        &mut self,
        ctx: &Ctx,
        i: usize,
        next_is_live: bool,
        lba: u64,
        gen: u64,
    ) -> Result<bool> {
        if i > 0 && self.snap_lookup(ctx, i - 1, lba)?.gen == gen {
            return Ok(true);
        }
        let e = if i + 1 < self.snaps.len() && !next_is_live {
            self.snap_lookup(ctx, i + 1, lba)?
        } else {
            self.lookup(ctx, lba)?
        };
        Ok(e.is_mapped() && e.gen == gen)
    }

    /// A snapshot's map entry for `lba` (its stored location may be stale:
    /// see [`State::snap_locate`]).
    pub fn snap_lookup(&mut self, ctx: &Ctx, i: usize, lba: u64) -> Result<MapEntry> {
        let key = PageKey::leaf(TreeId::Map, lba / MAP_ENTRIES_PER_PAGE as u64);
        let slot = (lba % MAP_ENTRIES_PER_PAGE as u64) as usize * MAP_ENTRY_LEN;
        let State { snaps, usage, .. } = self;
        let src = HeldSource {
            ctx,
            held: &usage.held,
        };
        Ok(MapEntry::decode(&snaps[i].trees.get(&src, key)?[slot..]))
    }

    /// Where snapshot `i`'s version of `lba` is now: held, live (perhaps
    /// moved by the cleaner), or where the snapshot says.
    pub fn snap_locate(&mut self, ctx: &Ctx, i: usize, lba: u64) -> Result<MapEntry> {
        let mut e = self.snap_lookup(ctx, i, lba)?;
        if !e.is_mapped() {
            return Ok(e);
        }
        if let Some(&pba) = self.usage.held.get(&e.gen) {
            e.pba = pba;
        } else {
            let live = self.lookup(ctx, lba)?;
            if live.is_mapped() && live.gen == e.gen {
                e.pba = live.pba;
            }
        }
        Ok(e)
    }

    /// Blocks only snapshot `i` holds, as (generation) of pages and data
    /// blocks: its map tree less every subtree and block a neighbour (the
    /// previous snapshot; the next one or the live state) shares.
    fn unique_to(&mut self, ctx: &Ctx, i: usize) -> Result<Vec<u64>> {
        Ok(self
            .walk_unshared(ctx, i, false)?
            .into_iter()
            .map(|b| match b {
                Unshared::Page(g) => g,
                Unshared::Data(_, e) => e.gen,
            })
            .collect())
    }

    /// The pages and data blocks of snapshot `i`'s map that the previous
    /// snapshot does not share, nor the next one (or, with `next_is_live`,
    /// nor the live state). Pages are authenticated as they are read.
    fn walk_unshared(&mut self, ctx: &Ctx, i: usize, next_is_live: bool) -> Result<Vec<Unshared>> {
        let depth = self.trees.shape(TreeId::Map).depth;
        let leaves = self.trees.shape(TreeId::Map).leaves;
        let mut out = Vec::new();
        let mut stack = vec![PageKey {
            tree: TreeId::Map,
            level: depth,
            index: 0,
        }];
        let mut visited = 0u64;
        while let Some(k) = stack.pop() {
            visited += 1;
            if visited % 1024 == 0 {
                for s in &mut self.snaps {
                    s.trees.evict();
                }
                self.trees.evict();
            }
            let ptr = {
                let State { snaps, usage, .. } = self;
                let src = HeldSource {
                    ctx,
                    held: &usage.held,
                };
                snaps[i].trees.current_ptr(&src, k)?.0
            };
            if ptr.is_absent() || self.neighbour_has_page(ctx, i, next_is_live, k, ptr.gen)? {
                continue;
            }
            out.push(Unshared::Page(ptr.gen));
            let page = {
                let State { snaps, usage, .. } = self;
                let src = HeldSource {
                    ctx,
                    held: &usage.held,
                };
                Box::new(*snaps[i].trees.get(&src, k)?)
            };
            if k.level > 0 {
                let span_bits = FANOUT.trailing_zeros() * (k.level as u32 - 1);
                for c in 0..FANOUT {
                    let child = PageKey {
                        tree: TreeId::Map,
                        level: k.level - 1,
                        index: (k.index << FANOUT.trailing_zeros()) + c,
                    };
                    if (child.index << span_bits) < leaves {
                        stack.push(child);
                    }
                }
                continue;
            }
            for s in 0..MAP_ENTRIES_PER_PAGE {
                let e = MapEntry::decode(&page[s * MAP_ENTRY_LEN..]);
                if !e.is_mapped() {
                    continue;
                }
                let lba = k.index * MAP_ENTRIES_PER_PAGE as u64 + s as u64;
                if !self.neighbour_has_block(ctx, i, next_is_live, lba, e.gen)? {
                    out.push(Unshared::Data(lba, e));
                }
            }
        }
        Ok(out)
    }

    /// Authenticates what only snapshots reference: for each snapshot, the
    /// pages and data blocks that neither the previous snapshot nor the
    /// live state shares (those were checked there).
    pub fn check_snapshots(&mut self, ctx: &Ctx, r: &mut super::CheckReport) {
        let mut buf = vec![0u8; BLOCK_SIZE];
        // Generations snapshots reference that the live state does not:
        // exactly the held table, or space leaks (held, unreferenced) or,
        // worse, a referenced block could be reused (referenced, not held).
        let mut referenced: HashSet<u64> = HashSet::new();
        let mut lists: Vec<Vec<TreePtr>> =
            self.snaps.iter().map(|s| s.rec.changed.clone()).collect();
        lists.push(self.live_changed.clone());
        for l in lists {
            match self.changed_pages(ctx, &l) {
                Ok(g) => referenced.extend(g),
                Err(e) => r.problems.push(format!("a snapshot's changed bitmap: {e}")),
            }
        }
        for i in 0..self.snaps.len() {
            let name = self.snaps[i].rec.name.clone();
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
                let pba = self.usage.held.get(&e.gen).copied().unwrap_or(e.pba);
                if !super::check::data_block_authentic(ctx, &mut buf, lba, &MapEntry { pba, ..e }) {
                    r.problems.push(format!(
                        "snapshot {name}: logical block {lba} (stored at block {pba}) fails authentication"
                    ));
                }
            }
        }
        let unheld = referenced
            .iter()
            .filter(|g| !self.usage.held.contains_key(g))
            .count();
        if unheld > 0 {
            r.problems.push(format!(
                "{unheld} blocks that snapshots reference are not in the held table (their space could be reused)"
            ));
        }
        let leaked = self
            .usage
            .held
            .keys()
            .filter(|g| !referenced.contains(g))
            .count();
        if leaked > 0 {
            r.problems.push(format!(
                "{leaked} held blocks are referenced by no snapshot (space leak)"
            ));
        }
    }

    /// A changed bitmap by its root, to read (a small cache of its own).
    fn changed_tree(&self, root: TreePtr) -> Trees {
        let mut roots = [TreePtr::ABSENT; 5];
        roots[TreeId::Changed as usize] = root;
        Trees::new(roots, shapes(self.logical_blocks, self.max_segments), 64)
    }

    /// Generations of every page of the changed bitmaps `roots`.
    fn changed_pages(&mut self, ctx: &Ctx, roots: &[TreePtr]) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for r in roots {
            let mut t = self.changed_tree(*r);
            let src = HeldSource {
                ctx,
                held: &self.usage.held,
            };
            t.visit(&src, TreeId::Changed, &mut |_, p, _, _| out.push(p.gen))?;
        }
        Ok(out)
    }

    /// Deletes snapshot `i` and frees what only it held. Durable when it
    /// returns.
    pub fn snapshot_delete(&mut self, ctx: &Ctx, i: usize) -> Result<()> {
        // Deleting frees space: it may use the reserve (a full volume must
        // still be able to delete).
        self.ensure_space(ctx, &[], true)?;
        // Everything that can fail on a read comes first, while nothing
        // has changed.
        let mut free = self.unique_to(ctx, i)?;
        let changed = self.snaps[i].rec.changed.clone();
        if i == 0 {
            // The oldest: its changes are relative to nothing that exists.
            free.extend(self.changed_pages(ctx, &changed)?);
        }
        let last = self.snaps.len() == 1;
        if last {
            // The last one: changes "since the newest snapshot" mean nothing now.
            let rest = self.live_changed.clone();
            free.extend(self.changed_pages(ctx, &rest)?);
        }
        let r = self.drop_snapshot(ctx, i, free, changed, last);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn drop_snapshot(
        &mut self,
        ctx: &Ctx,
        i: usize,
        free: Vec<u64>,
        changed: Vec<TreePtr>,
        last: bool,
    ) -> Result<()> {
        let mut missing = 0u64;
        for g in free {
            match self.usage.held.remove(&g) {
                Some(pba) => self.usage.dec(pba),
                None => missing += 1,
            }
        }
        if missing > 0 {
            eprintln!(
                "lsvfs: deleting a snapshot: {missing} of its blocks were not in the held table; `lsvfs check` reports such problems"
            );
        }
        self.usage.held_dirty = true;
        if last {
            self.live_changed.clear();
        }
        if i > 0 {
            // Its changes now belong to the next interval.
            let mut next = match self.snaps.get(i + 1) {
                Some(n) => n.rec.changed.clone(),
                None => self.live_changed.clone(),
            };
            next.extend(changed);
            let next = self.bounded_changed(ctx, next)?;
            match self.snaps.get_mut(i + 1) {
                Some(n) => n.rec.changed = next,
                None => self.live_changed = next,
            }
        }
        self.snaps.remove(i);
        self.usage.retain_below = self.snaps.last().map_or(0, |s| s.rec.birth);
        self.snap_meta_dirty = true;
        self.checkpoint(ctx)
    }

    pub fn snapshot_infos(&mut self, ctx: &Ctx) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::with_capacity(self.snaps.len());
        for i in 0..self.snaps.len() {
            let mut unique = self.unique_to(ctx, i)?.len() as u64;
            if i == 0 {
                let c = self.snaps[0].rec.changed.clone();
                unique += self.changed_pages(ctx, &c)?.len() as u64;
            }
            let r = &self.snaps[i].rec;
            out.push(SnapshotInfo {
                id: r.id,
                name: r.name.clone(),
                created_sec: r.created_sec,
                created_nsec: r.created_nsec,
                allocated_blocks: r.allocated,
                unique_blocks: unique,
            });
        }
        Ok(out)
    }

    /// The union of the changed bitmaps `roots`, leaf by leaf.
    fn changed_leaves(
        &mut self,
        ctx: &Ctx,
        roots: &[TreePtr],
    ) -> Result<std::collections::BTreeMap<u64, Box<Block>>> {
        let mut leaves: std::collections::BTreeMap<u64, Box<Block>> = Default::default();
        for r in roots {
            let mut t = self.changed_tree(*r);
            let src = HeldSource {
                ctx,
                held: &self.usage.held,
            };
            t.visit(&src, TreeId::Changed, &mut |k, _, _, data| {
                if k.level == 0 {
                    let l = leaves
                        .entry(k.index)
                        .or_insert_with(|| Box::new([0u8; BLOCK_SIZE]));
                    for (a, b) in l.iter_mut().zip(data.iter()) {
                        *a |= *b;
                    }
                }
            })?;
        }
        Ok(leaves)
    }

    /// Runs of blocks written or trimmed between the snapshot before
    /// snapshot `i` and `i` itself (the union of its changed bitmaps).
    pub fn snapshot_changed_runs(&mut self, ctx: &Ctx, i: usize) -> Result<Vec<(u64, u64)>> {
        let roots = self.snaps[i].rec.changed.clone();
        let leaves = self.changed_leaves(ctx, &roots)?;
        Ok(super::state::bit_runs(leaves, self.logical_blocks))
    }

    /// Runs of logical blocks snapshot `i` maps, as (first block, count).
    pub fn snapshot_allocated_runs(&mut self, ctx: &Ctx, i: usize) -> Result<Vec<(u64, u64)>> {
        let mut leaves = Vec::new();
        {
            let State { snaps, usage, .. } = self;
            let src = HeldSource {
                ctx,
                held: &usage.held,
            };
            snaps[i]
                .trees
                .visit(&src, TreeId::Map, &mut |k, _, _, data| {
                    if k.level == 0 {
                        leaves.push((k.index, Box::new(*data)));
                    }
                })?;
        }
        leaves.sort_by_key(|(i, _)| *i);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (leaf, page) in leaves {
            for s in 0..MAP_ENTRIES_PER_PAGE {
                if !MapEntry::decode(&page[s * MAP_ENTRY_LEN..]).is_mapped() {
                    continue;
                }
                let lba = leaf * MAP_ENTRIES_PER_PAGE as u64 + s as u64;
                match runs.last_mut() {
                    Some((f, n)) if *f + *n == lba => *n += 1,
                    _ => runs.push((lba, 1)),
                }
            }
        }
        Ok(runs)
    }

    /// Whether the held table names `pba` as the current home of `gen`.
    pub fn is_held_at(&self, gen: u64, pba: u64) -> bool {
        self.usage.held.get(&gen) == Some(&pba)
    }

    /// Every location the held table and the metadata pages occupy (for
    /// the consistency check).
    pub fn held_locations(&self) -> HashSet<u64> {
        self.usage
            .held
            .values()
            .copied()
            .chain(self.meta_pages.iter().map(|p| p.pba))
            .collect()
    }
}
