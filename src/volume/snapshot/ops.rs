//! Snapshot operations over the whole state: create, delete, list, and
//! the walks that find what a snapshot alone holds.

use super::super::ctx::Ctx;
use super::super::format::{check_snapshot_name, Block, MapEntry, TreeId, TreePtr};
use super::super::format::{
    SnapRecord, MAP_ENTRIES_PER_PAGE, MAP_ENTRY_LEN, MAX_SNAPSHOTS, MAX_SNAPSHOT_ID,
};
use super::super::state::{bit_runs, State};
use super::super::tree::{PageKey, Trees, FANOUT};
use super::{HeldSource, SnapshotInfo, MAX_CHANGED_ROOTS};
use crate::volume::{Generation, Lba, Result, SnapshotId, VolumeError};
use crate::BLOCK_SIZE;

/// A page or data block a snapshot walk found unshared.
pub enum Unshared {
    Page(Generation),
    Data(Lba, MapEntry),
}

impl State {
    /// Takes a snapshot of the current state. Durable when it returns.
    /// The caller makes sure no transaction that already took generations
    /// is still to be applied (see `Inner::commits`).
    pub fn snapshot_create(
        &mut self,
        ctx: &Ctx,
        name: &str,
        now: (i64, u32),
    ) -> Result<SnapshotId> {
        check_snapshot_name(name)?;
        if self.snaps.index(name).is_some() {
            return Err(VolumeError::SnapshotExists(format!("snapshot {name:?}")));
        }
        if self.snaps.list.len() >= MAX_SNAPSHOTS {
            return Err(VolumeError::NoSpace(format!(
                "a volume keeps at most {MAX_SNAPSHOTS} snapshots; delete one first"
            )));
        }
        if self.snaps.next_id > MAX_SNAPSHOT_ID {
            return Err(VolumeError::NoSpace(format!(
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
            ctx.poison();
        }
        r
    }

    fn freeze(&mut self, ctx: &Ctx, name: &str, now: (i64, u32)) -> Result<SnapshotId> {
        let roots = self.trees.roots();
        let mut changed = std::mem::take(&mut self.snaps.live_changed);
        let live = roots[TreeId::Changed as usize];
        if !live.is_absent() {
            changed.insert(0, live);
        }
        let rec = SnapRecord {
            id: SnapshotId(self.snaps.next_id),
            name: name.to_string(),
            created_sec: now.0,
            created_nsec: now.1,
            birth: self.ckpt.next_gen,
            checkpoint_seq: self.ckpt.last.seq,
            allocated: self.allocated,
            map: roots[TreeId::Map as usize],
            changed: Vec::new(),
        };
        let id = rec.id;
        self.usage.held.retain_below = rec.birth;
        let snap = self.snaps.new_snap(rec);
        self.snaps.list.push(snap);
        self.snaps.next_id += 1;
        self.snaps.meta_dirty = true;
        // The live changed bitmap starts afresh: its pages now belong to
        // the snapshot (their generations are below its birth: held).
        let State { trees, usage, .. } = self;
        trees.clear_tree(ctx, TreeId::Changed, &mut |t, p| usage.superseded(t, p))?;
        let changed = self.bounded_changed(ctx, changed)?;
        self.snaps.list.last_mut().expect("just pushed").rec.changed = changed;
        self.changed_since = self.ckpt.last.seq;
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
        let mut t = Trees::new([TreePtr::ABSENT; 5], self.geo.shapes(), 64);
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
            self.usage.held.insert(p.gen, p.pba, p.key_gen, p.mac);
        }
        for g in old {
            if let Some(pba) = self.usage.held.remove(g) {
                self.usage.dec(pba);
            }
        }
        self.usage.held.dirty = true;
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
        gen: Generation,
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
            let p = snaps.list[i - 1].trees.current_ptr(&src, key)?.0;
            if !p.is_absent() && p.gen == gen {
                return Ok(true);
            }
        }
        if i + 1 < snaps.list.len() && !next_is_live {
            let p = snaps.list[i + 1].trees.current_ptr(&src, key)?.0;
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
        lba: Lba,
        gen: Generation,
    ) -> Result<bool> {
        if i > 0 && self.snap_lookup(ctx, i - 1, lba)?.gen == gen {
            return Ok(true);
        }
        let e = if i + 1 < self.snaps.list.len() && !next_is_live {
            self.snap_lookup(ctx, i + 1, lba)?
        } else {
            self.lookup(ctx, lba)?
        };
        Ok(e.is_stored() && e.gen == gen)
    }

    /// A snapshot's map entry for `lba` (its stored location may be stale:
    /// see [`State::snap_locate`]).
    pub fn snap_lookup(&mut self, ctx: &Ctx, i: usize, lba: Lba) -> Result<MapEntry> {
        let key = PageKey::leaf(TreeId::Map, lba.0 / MAP_ENTRIES_PER_PAGE as u64);
        let slot = (lba.0 % MAP_ENTRIES_PER_PAGE as u64) as usize * MAP_ENTRY_LEN;
        let State { snaps, usage, .. } = self;
        let src = HeldSource {
            ctx,
            held: &usage.held,
        };
        Ok(MapEntry::decode(
            &snaps.list[i].trees.get(&src, key)?[slot..],
        ))
    }

    /// Where snapshot `i`'s version of `lba` is now: held, live (perhaps
    /// moved by the cleaner), or where the snapshot says.
    pub fn snap_locate(&mut self, ctx: &Ctx, i: usize, lba: Lba) -> Result<MapEntry> {
        let mut e = self.snap_lookup(ctx, i, lba)?;
        if !e.is_stored() {
            return Ok(e);
        }
        if let Some(h) = self.usage.held.resolve(e) {
            e = h;
        } else {
            // Still live: where (and, after a rekey, how) the live map has it.
            let live = self.lookup(ctx, lba)?;
            if live.is_stored() && live.gen == e.gen {
                e = live;
            }
        }
        Ok(e)
    }

    /// Blocks only snapshot `i` holds, as (generation) of pages and data
    /// blocks: its map tree less every subtree and block a neighbour (the
    /// previous snapshot; the next one or the live state) shares.
    fn unique_to(&mut self, ctx: &Ctx, i: usize) -> Result<Vec<Generation>> {
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
    pub(in crate::volume) fn walk_unshared(
        &mut self,
        ctx: &Ctx,
        i: usize,
        next_is_live: bool,
    ) -> Result<Vec<Unshared>> {
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
                for s in &mut self.snaps.list {
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
                snaps.list[i].trees.current_ptr(&src, k)?.0
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
                Box::new(*snaps.list[i].trees.get(&src, k)?)
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
                // A zeroed block holds nothing.
                if !e.is_stored() {
                    continue;
                }
                let lba = Lba(k.index * MAP_ENTRIES_PER_PAGE as u64 + s as u64);
                if !self.neighbour_has_block(ctx, i, next_is_live, lba, e.gen)? {
                    out.push(Unshared::Data(lba, e));
                }
            }
        }
        Ok(out)
    }

    /// Generations of every page of the changed bitmaps `roots`.
    pub(in crate::volume) fn changed_pages(
        &mut self,
        ctx: &Ctx,
        roots: &[TreePtr],
    ) -> Result<Vec<Generation>> {
        let mut out = Vec::new();
        for r in roots {
            let mut t = self.snaps.changed_tree(*r);
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
        let changed = self.snaps.list[i].rec.changed.clone();
        if i == 0 {
            // The oldest: its changes are relative to nothing that exists.
            free.extend(self.changed_pages(ctx, &changed)?);
        }
        let last = self.snaps.list.len() == 1;
        if last {
            // The last one: changes "since the newest snapshot" mean nothing now.
            let rest = self.snaps.live_changed.clone();
            free.extend(self.changed_pages(ctx, &rest)?);
        }
        let r = self.drop_snapshot(ctx, i, free, changed, last);
        if r.is_err() {
            ctx.poison();
        }
        r
    }

    fn drop_snapshot(
        &mut self,
        ctx: &Ctx,
        i: usize,
        free: Vec<Generation>,
        changed: Vec<TreePtr>,
        last: bool,
    ) -> Result<()> {
        let mut missing = 0u64;
        for g in free {
            match self.usage.held.remove(g) {
                Some(pba) => self.usage.dec(pba),
                None => missing += 1,
            }
        }
        if missing > 0 {
            tracing::error!(
                "deleting a snapshot: {missing} of its blocks were not in the held table; `lsvfs check` reports such problems"
            );
        }
        self.usage.held.dirty = true;
        if last {
            self.snaps.live_changed.clear();
        }
        if i > 0 {
            // Its changes now belong to the next interval.
            let mut next = match self.snaps.list.get(i + 1) {
                Some(n) => n.rec.changed.clone(),
                None => self.snaps.live_changed.clone(),
            };
            next.extend(changed);
            let next = self.bounded_changed(ctx, next)?;
            match self.snaps.list.get_mut(i + 1) {
                Some(n) => n.rec.changed = next,
                None => self.snaps.live_changed = next,
            }
        }
        self.snaps.list.remove(i);
        self.usage.held.retain_below = self
            .snaps
            .list
            .last()
            .map_or(Generation(0), |s| s.rec.birth);
        self.snaps.meta_dirty = true;
        self.checkpoint(ctx)
    }

    pub fn snapshot_infos(&mut self, ctx: &Ctx) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::with_capacity(self.snaps.list.len());
        for i in 0..self.snaps.list.len() {
            let mut unique = self.unique_to(ctx, i)?.len() as u64;
            if i == 0 {
                let c = self.snaps.list[0].rec.changed.clone();
                unique += self.changed_pages(ctx, &c)?.len() as u64;
            }
            let r = &self.snaps.list[i].rec;
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
            let mut t = self.snaps.changed_tree(*r);
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
        let roots = self.snaps.list[i].rec.changed.clone();
        let leaves = self.changed_leaves(ctx, &roots)?;
        Ok(bit_runs(leaves, self.geo.logical_blocks))
    }

    /// Runs of blocks written or trimmed since the newest snapshot (since
    /// the volume was made if it has none): the live changed bitmap and
    /// those deleted snapshots left to the live interval.
    pub fn live_changed_runs(&mut self, ctx: &Ctx) -> Result<Vec<(u64, u64)>> {
        let mut runs = self.bitmap_runs(ctx, TreeId::Changed)?;
        let roots = self.snaps.live_changed.clone();
        if !roots.is_empty() {
            let leaves = self.changed_leaves(ctx, &roots)?;
            runs.extend(bit_runs(leaves, self.geo.logical_blocks));
            runs.sort_unstable();
        }
        Ok(runs)
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
            snaps.list[i]
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
}
