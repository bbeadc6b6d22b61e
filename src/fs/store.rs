//! Logical block allocation and the volume-backed node store.
//!
//! The allocator's truth is the volume's allocated bitmap: a logical block
//! is in use exactly when it is mapped. Blocks are allocated by writing
//! (or zeroing) them and freed by trimming them, in the same volume transaction as the
//! operation that needs it, so allocation can never leak across a crash.
//! At mount the free extents are rebuilt from the bitmap.

use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use super::btree::{Node, NodeStore};
use crate::fs::{FsError, Result};
use crate::volume::{Lba, Transaction, Volume};
use crate::BLOCK_SIZE;

/// Runs of consecutive block addresses, as (first, count).
#[derive(Default)]
pub(super) struct Runs(pub(super) Vec<(u64, u64)>);

impl Runs {
    pub(super) fn push(&mut self, lba: u64) {
        match self.0.last_mut() {
            Some((first, n)) if *first + *n == lba => *n += 1,
            _ => self.0.push((lba, 1)),
        }
    }
}

/// Free logical blocks, as extents (start -> length).
pub struct Allocator {
    free: BTreeMap<u64, u64>,
    free_blocks: u64,
    /// Blocks freed by committed operations that a read started earlier
    /// may still be about to read: not handed out again until
    /// `release_quarantined` (when no such read is left).
    quarantined: Vec<u64>,
}

impl Allocator {
    /// Everything in `first..limit` that `allocated` (sorted runs) leaves free.
    pub fn from_allocated(first: u64, limit: u64, allocated: &[(u64, u64)]) -> Allocator {
        let mut free = BTreeMap::new();
        let mut at = first;
        for &(s, n) in allocated {
            if s > at {
                free.insert(at, s - at);
            }
            at = at.max(s + n);
        }
        if at < limit {
            free.insert(at, limit - at);
        }
        let free_blocks = free.values().sum();
        Allocator {
            free,
            free_blocks,
            quarantined: Vec::new(),
        }
    }

    /// Free blocks, counting those in quarantine (they are free on disk).
    pub fn free_blocks(&self) -> u64 {
        self.free_blocks + self.quarantined.len() as u64
    }

    pub fn has_quarantine(&self) -> bool {
        !self.quarantined.is_empty()
    }

    /// Whether most of the free space is in quarantine.
    pub fn mostly_quarantined(&self) -> bool {
        self.quarantined.len() as u64 > self.free_blocks
    }

    /// Makes quarantined blocks allocatable again. The caller guarantees
    /// that no read which looked up blocks before they were freed is still
    /// running.
    pub fn release_quarantined(&mut self) {
        let mut q = std::mem::take(&mut self.quarantined);
        // As runs: a large delete frees long runs of adjacent blocks.
        q.sort_unstable();
        let mut i = 0;
        while i < q.len() {
            let mut n = 1;
            while i + n < q.len() && q[i + n] == q[i] + n as u64 {
                n += 1;
            }
            self.release_run(q[i], n as u64);
            i += n;
        }
    }

    /// One free block, the lowest at or after `hint` if any (else the lowest).
    pub fn alloc(&mut self, hint: u64) -> Option<u64> {
        self.alloc_run(hint, 1).map(|(at, _)| at)
    }

    /// Up to `max` (at least 1) adjacent free blocks: from `hint` if it is
    /// free, else from the start of the first free run after it (else the
    /// lowest). Returns the first block and how many.
    pub fn alloc_run(&mut self, hint: u64, max: u64) -> Option<(u64, u64)> {
        debug_assert!(max >= 1);
        let (&start, &len) = self
            .free
            .range(..=hint)
            .next_back()
            .filter(|(s, l)| **s + **l > hint)
            .or_else(|| self.free.range(hint..).next())
            .or_else(|| self.free.iter().next())?;
        let at = if start <= hint && hint < start + len {
            hint
        } else {
            start
        };
        let n = max.min(start + len - at);
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        if at + n < start + len {
            self.free.insert(at + n, start + len - at - n);
        }
        self.free_blocks -= n;
        Some((at, n))
    }

    /// Returns a block, merging it with its neighbours.
    pub fn release(&mut self, block: u64) {
        self.release_run(block, 1);
    }

    /// Returns `n` adjacent blocks from `first`, merging them with their
    /// neighbours.
    pub fn release_run(&mut self, first: u64, n: u64) {
        let mut start = first;
        let mut len = n;
        if let Some((&s, &l)) = self.free.range(..first).next_back() {
            debug_assert!(s + l <= first, "double free of block {first}");
            if s + l == first {
                self.free.remove(&s);
                start = s;
                len += l;
            }
        }
        debug_assert!(
            self.free.range(first..first + n).next().is_none(),
            "double free in {first}+{n}"
        );
        if let Some(&l) = self.free.get(&(first + n)) {
            self.free.remove(&(first + n));
            len += l;
        }
        self.free.insert(start, len);
        self.free_blocks += n;
    }
}

/// The changes of completed operations that are not in the volume's log
/// yet (a deferred commit). An operation that changes only metadata, or
/// writes a little data into blocks new to its file
/// ([`VolumeStore::defer_data`]), adds its changes here instead of
/// committing them; the next transaction that commits carries them all
/// (the next other operation that writes data, a sync, or an explicit
/// commit), so the log holds every operation up to some point, never part
/// of one, in their order.
#[derive(Default)]
pub struct Pending {
    /// Changed nodes, the newest version of each.
    nodes: FxHashMap<u64, Arc<Node>>,
    /// Data blocks small writes into new blocks left to the commit (see
    /// [`VolumeStore::defer_data`]): their blocks are also in `allocated`.
    /// Shared with reads, which look here before the volume; an entry
    /// leaves only after its commit, or when its block is freed.
    data: Unwritten,
    /// Blocks the log maps that pending operations freed (nodes and
    /// data): trimmed by the commit, and handed out again only after it.
    freed: BTreeSet<u64>,
    /// Blocks pending operations took for new nodes. They hold nothing in
    /// the log yet: one freed again before the commit goes straight back.
    allocated: HashSet<u64>,
}

/// Decoded metadata nodes by block address (a fast hash: the addresses
/// are the allocator's, never chosen by a caller).
pub type NodeCache = FxHashMap<u64, Arc<Node>>;

/// Plaintext of data blocks written but not committed yet, by logical block.
pub type Unwritten = Arc<parking_lot::RwLock<FxHashMap<u64, Box<[u8]>>>>;

impl Pending {
    /// Whether no change is waiting.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.freed.is_empty() && self.allocated.is_empty()
    }

    /// Data blocks waiting.
    pub fn data_blocks(&self) -> usize {
        self.data.read().len()
    }

    /// The data blocks waiting, as reads see them.
    pub fn unwritten(&self) -> Unwritten {
        self.data.clone()
    }

    /// Changed nodes waiting.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Blocks freed by pending operations: free once committed.
    pub fn freed_blocks(&self) -> u64 {
        self.freed.len() as u64
    }
}

/// When [`VolumeStore::finish`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// An operation with nothing in its transaction (metadata only, or
    /// data it left to wait: [`VolumeStore::defer_data`]) joins the
    /// pending changes (see [`Pending`]); one with data in it commits
    /// them with its own.
    Defer,
    /// The operation's changes, if it has any, are committed with the
    /// pending ones; an operation that changed nothing writes nothing.
    IfChanged,
    /// The pending changes and the operation's are committed.
    Now,
}

/// Nodes read from the volume, with one operation's changes staged over
/// the changes still pending from earlier operations.
pub struct VolumeStore<'a> {
    volume: &'a Volume,
    alloc: &'a mut Allocator,
    cache: &'a mut NodeCache,
    pending: &'a mut Pending,
    staged: FxHashMap<u64, Arc<Node>>,
    allocated: Vec<u64>,
    freed: BTreeSet<u64>,
    /// Data blocks freed by this operation (never nodes: neither staged
    /// nor cached), in the order freed.
    freed_data: Vec<u64>,
    /// Whole data blocks this operation wrote into blocks it allocated,
    /// which may wait for the commit (see [`VolumeStore::defer_data`]).
    data: Vec<(u64, Vec<u8>)>,
    /// Changes wait only while the volume has room for this many more
    /// blocks (see [`VolumeStore::waiting_needs_room`]); 0: no check.
    wait_room: u64,
}

/// Clean nodes kept in memory between operations.
pub const NODE_CACHE: usize = 8192;

impl<'a> VolumeStore<'a> {
    pub fn new(
        volume: &'a Volume,
        alloc: &'a mut Allocator,
        cache: &'a mut NodeCache,
        pending: &'a mut Pending,
    ) -> Self {
        VolumeStore {
            volume,
            alloc,
            cache,
            pending,
            staged: FxHashMap::default(),
            allocated: Vec::new(),
            freed: BTreeSet::new(),
            freed_data: Vec::new(),
            data: Vec::new(),
            wait_room: 0,
        }
    }

    /// Lets this operation's changes wait (a [`Commit::Defer`]) only while
    /// the volume has room for `blocks` more (`Volume::room_to_wait`);
    /// otherwise it commits them at once, so that near a full volume the
    /// operation that needs space is the one told there is none. Checked
    /// only when there are changes to leave waiting: a read never takes
    /// the volume's lock for it.
    pub fn waiting_needs_room(mut self, blocks: u64) -> Self {
        self.wait_room = blocks;
        self
    }

    /// Adds the pending and staged node writes and frees to `txn`, commits
    /// it, and makes the changes visible to later operations. On failure
    /// nothing changed: blocks allocated by this operation go back to the
    /// allocator, and what was pending still is.
    pub fn commit(self, txn: Transaction) -> Result<()> {
        self.finish(txn, Commit::Now)
    }

    /// Ends the operation as `when` says: its changes join the pending
    /// ones (see [`Pending`]) and nothing is written, or it commits as
    /// [`VolumeStore::commit`].
    pub fn finish(mut self, txn: Transaction, when: Commit) -> Result<()> {
        let own_changes = !(self.staged.is_empty()
            && self.freed.is_empty()
            && self.freed_data.is_empty()
            && self.data.is_empty());
        if txn.is_empty() && !own_changes && (when != Commit::Now || self.pending.is_empty()) {
            return Ok(());
        }
        let gone = self.take_frees();
        if when == Commit::Defer
            && txn.is_empty()
            && (self.wait_room == 0 || self.volume.room_to_wait(self.wait_room))
        {
            self.merge_into_pending(&gone);
            return Ok(());
        }
        // Data that waited goes first, then this operation's own, so that
        // a later write of the same block wins (a transaction applies in
        // order). Blocks freed meanwhile are not written.
        let mut data_txn = Transaction::new();
        {
            let waiting = self.pending.data.read();
            let mut blocks: Vec<u64> = waiting
                .keys()
                .copied()
                .filter(|lba| gone.binary_search(lba).is_err())
                .collect();
            blocks.sort_unstable();
            let mut runs = Runs::default();
            for &lba in &blocks {
                runs.push(lba);
            }
            for (first, n) in runs.0 {
                let mut run = Vec::with_capacity(n as usize * BLOCK_SIZE);
                for lba in first..first + n {
                    run.extend_from_slice(&waiting[&lba]);
                }
                data_txn.write(Lba(first), run);
            }
        }
        for (lba, data) in self.data.drain(..) {
            data_txn.write(Lba(lba), data);
        }
        data_txn.append(txn);
        let mut txn = data_txn;
        // Freed blocks that only pending operations had taken were never
        // written: they go straight back after the commit, untrimmed.
        let (unwritten, mut trims): (Vec<u64>, Vec<u64>) = gone
            .iter()
            .copied()
            .partition(|lba| self.pending.allocated.contains(lba));
        for (lba, node) in &self.pending.nodes {
            if !self.staged.contains_key(lba) && gone.binary_search(lba).is_err() {
                txn.write(Lba(*lba), node.encode());
            }
        }
        for (lba, node) in &self.staged {
            txn.write(Lba(*lba), node.encode());
        }
        // Freed blocks go out as runs: one trim entry per run of adjacent
        // blocks (the volume prices each entry by the map pages it may touch).
        trims.extend(&self.pending.freed);
        trims.sort_unstable();
        // Freed by this operation and a pending one too (damaged
        // metadata): trimmed, and handed out later, once.
        trims.dedup();
        let mut runs = Runs::default();
        for &lba in &trims {
            runs.push(lba);
        }
        for (start, n) in runs.0 {
            txn.trim(Lba(start), n);
        }
        self.volume.commit(txn)?;
        // Only now, with the volume holding it, may a read miss a block
        // here; the map itself stays (reads hold it).
        let waiting = std::mem::take(&mut *self.pending.data.write());
        let nodes = std::mem::take(&mut self.pending.nodes);
        self.pending.freed.clear();
        self.pending.allocated.clear();
        for lba in &trims {
            self.cache.remove(lba);
        }
        for lba in unwritten {
            self.give_back_unwritten(lba, waiting.contains_key(&lba));
        }
        self.alloc.quarantined.extend(trims);
        if self.cache.len() + nodes.len() + self.staged.len() > NODE_CACHE {
            self.cache.clear();
        }
        for (lba, node) in nodes {
            if gone.binary_search(&lba).is_err() {
                self.cache.insert(lba, node);
            }
        }
        self.cache.extend(self.staged.drain());
        self.allocated.clear();
        Ok(())
    }

    /// The blocks this operation freed, nodes and data, sorted, each once
    /// (a block named twice, in damaged metadata, is freed once: twice
    /// would give it to two files later).
    fn take_frees(&mut self) -> Vec<u64> {
        let mut gone: Vec<u64> = std::mem::take(&mut self.freed).into_iter().collect();
        gone.append(&mut self.freed_data);
        gone.sort_unstable();
        gone.dedup();
        gone
    }

    /// Adds this operation's changes, and `gone` (its frees), to the
    /// pending ones.
    fn merge_into_pending(&mut self, gone: &[u64]) {
        for &lba in gone {
            self.pending.nodes.remove(&lba);
            self.cache.remove(&lba);
            if self.pending.allocated.remove(&lba) {
                let was_data = self.pending.data.write().remove(&lba).is_some();
                self.give_back_unwritten(lba, was_data);
            } else {
                self.pending.freed.insert(lba);
            }
        }
        let p = &mut *self.pending;
        for (lba, node) in self.staged.drain() {
            self.cache.remove(&lba);
            p.nodes.insert(lba, node);
        }
        if !self.data.is_empty() {
            let mut waiting = p.data.write();
            for (first, run) in self.data.drain(..) {
                for (k, block) in run.chunks_exact(BLOCK_SIZE).enumerate() {
                    waiting.insert(first + k as u64, block.into());
                }
            }
        }
        p.allocated.extend(self.allocated.drain(..));
    }

    /// Hands back a block that pending operations took and freed before
    /// it was ever written. A data block goes to quarantine, like any
    /// freed data block: a read that looked it up may still be looking
    /// for it among the waiting data, and must not find another file's.
    fn give_back_unwritten(&mut self, lba: u64, data: bool) {
        if data {
            self.alloc.quarantined.push(lba);
        } else {
            self.alloc.release(lba);
        }
    }

    /// Lets `txn`'s writes, whole blocks this operation allocated, wait
    /// for the next commit with the metadata instead of committing now
    /// (see [`Commit::Defer`]): a small file's data then goes into the log
    /// with the directory and inode pages of many files, not with its
    /// own. Reads find the blocks through [`Pending::unwritten`] until
    /// then. Returns the transaction unchanged if it holds anything else.
    pub fn defer_data(&mut self, txn: Transaction) -> std::result::Result<(), Transaction> {
        let writes = txn.into_writes()?;
        for (lba, data) in writes {
            debug_assert_eq!(data.len() % BLOCK_SIZE, 0);
            debug_assert!((0..(data.len() / BLOCK_SIZE) as u64)
                .all(|k| self.allocated.contains(&(lba.0 + k))));
            self.data.push((lba.0, data));
        }
        Ok(())
    }
}

impl Drop for VolumeStore<'_> {
    fn drop(&mut self) {
        // Not committed (or the commit failed): hand back what was taken.
        for lba in self.allocated.drain(..) {
            self.alloc.release(lba);
        }
    }
}

fn used_after_free(lba: u64) -> FsError {
    FsError::Corrupted(format!("metadata node {lba} used after it was freed"))
}

impl VolumeStore<'_> {
    /// The committed node at `lba`, read from the volume (not cached).
    fn load(&self, lba: u64) -> Result<Node> {
        let mut buf = vec![0u8; BLOCK_SIZE];
        self.volume.read(Lba(lba), &mut buf)?;
        Node::decode(&buf, lba)
    }

    /// Frees a data block (see [`NodeStore::free`] for nodes): trimmed when
    /// the operation commits.
    pub fn free_data(&mut self, lba: u64) {
        if !self.give_back_if_new(lba) {
            self.freed_data.push(lba);
        }
    }

    /// A block allocated within this operation, and so never written, goes
    /// straight back to the allocator; says whether `lba` was one.
    fn give_back_if_new(&mut self, lba: u64) -> bool {
        let Some(i) = self.allocated.iter().position(|a| *a == lba) else {
            return false;
        };
        self.allocated.swap_remove(i);
        self.alloc.release(lba);
        true
    }

    /// A block near `hint`, given back if the operation does not commit.
    pub fn alloc_data(&mut self, hint: u64) -> Result<u64> {
        self.alloc_data_run(hint, 1).map(|(lba, _)| lba)
    }

    /// Up to `max` adjacent blocks near `hint` (see
    /// [`Allocator::alloc_run`]), given back if the operation does not
    /// commit: the first and how many.
    pub fn alloc_data_run(&mut self, hint: u64, max: u64) -> Result<(u64, u64)> {
        let (first, n) = self.alloc.alloc_run(hint, max).ok_or_else(|| {
            FsError::NoSpace("the file system has no free block; delete files".into())
        })?;
        self.allocated.extend(first..first + n);
        Ok((first, n))
    }
}

impl NodeStore for VolumeStore<'_> {
    fn read(&mut self, lba: u64) -> Result<Arc<Node>> {
        if self.freed.contains(&lba) || self.pending.freed.contains(&lba) {
            return Err(used_after_free(lba));
        }
        if let Some(n) = self
            .staged
            .get(&lba)
            .or_else(|| self.pending.nodes.get(&lba))
            .or_else(|| self.cache.get(&lba))
        {
            return Ok(n.clone());
        }
        let node = Arc::new(self.load(lba)?);
        self.cache.insert(lba, node.clone());
        Ok(node)
    }

    fn take(&mut self, lba: u64) -> Result<Node> {
        // Changed earlier in this operation, or clean in the cache: moved
        // out, not copied (unless a reader still holds it). Copying a
        // cached leaf (every key's and value's reference count up, and
        // down again when the changed leaf replaced it) was a tenth of an
        // unlink's work. A clean node taken and not written back is simply
        // read again from the volume by the next operation.
        if let Some(n) = self.staged.remove(&lba) {
            return Ok(Arc::unwrap_or_clone(n));
        }
        if self.freed.contains(&lba) || self.pending.freed.contains(&lba) {
            return Err(used_after_free(lba));
        }
        // A pending node stays pending until this operation succeeds: it
        // is copied (if this one fails, the earlier ones' change remains).
        if let Some(n) = self.pending.nodes.get(&lba) {
            return Ok(Node::clone(n));
        }
        match self.cache.remove(&lba) {
            Some(n) => Ok(Arc::unwrap_or_clone(n)),
            None => self.load(lba),
        }
    }

    fn write(&mut self, lba: u64, node: Node) {
        self.staged.insert(lba, Arc::new(node));
    }

    fn alloc(&mut self) -> Result<u64> {
        let hint = self.allocated.last().copied().unwrap_or(0);
        let lba = self.alloc.alloc(hint).ok_or_else(|| {
            FsError::NoSpace("the file system has no free block for metadata".into())
        })?;
        self.allocated.push(lba);
        Ok(lba)
    }

    fn free(&mut self, lba: u64) {
        self.staged.remove(&lba);
        if !self.give_back_if_new(lba) {
            self.freed.insert(lba);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_hands_out_each_block_once_and_merges() {
        let mut a = Allocator::from_allocated(1, 100, &[(5, 3), (50, 10)]);
        assert_eq!(a.free_blocks(), 99 - 3 - 10);
        let mut got = BTreeSet::new();
        while let Some(b) = a.alloc(40) {
            assert!(got.insert(b), "block {b} handed out twice");
            assert!(!(5..8).contains(&b) && !(50..60).contains(&b) && b != 0 && b < 100);
        }
        assert_eq!(got.len(), 86);
        for b in got {
            a.release(b);
        }
        assert_eq!(a.free_blocks(), 86);
        assert_eq!(a.free.len(), 3, "released blocks merge back into 3 extents");
    }

    /// Runs come from the hint (or the next free run), never cross a used
    /// block, and go back (through the quarantine too) as runs.
    #[test]
    fn allocator_hands_out_and_takes_back_runs() {
        let mut a = Allocator::from_allocated(1, 100, &[(5, 3), (50, 10)]);
        assert_eq!(a.alloc_run(2, 10), Some((2, 3)), "stops before block 5");
        assert_eq!(a.alloc_run(6, 4), Some((8, 4)), "5..8 is used: from 8");
        assert_eq!(a.alloc_run(48, 100), Some((48, 2)));
        assert_eq!(a.alloc_run(99, 100), Some((99, 1)));
        assert_eq!(a.alloc_run(99, 100), Some((1, 1)), "none after: the lowest");
        assert_eq!(a.free_blocks(), 99 - 13 - 11);
        let mut got = BTreeSet::new();
        while let Some((b, n)) = a.alloc_run(30, 7) {
            assert!((1..=7).contains(&n));
            for x in b..b + n {
                assert!(got.insert(x), "block {x} handed out twice");
                assert!(!(5..8).contains(&x) && !(50..60).contains(&x));
            }
        }
        assert_eq!(a.free_blocks(), 0);
        // Back through the quarantine, in any order: merged into runs.
        a.quarantined.extend(got.iter().rev());
        a.quarantined.extend([2, 3, 4, 8, 9, 10, 11, 48, 49, 99, 1]);
        a.release_quarantined();
        assert_eq!(a.free_blocks(), 99 - 13);
        assert_eq!(a.free.len(), 3, "merged back into 3 extents");
        a.release_run(5, 3);
        assert_eq!(a.free.len(), 2, "a run that fills a gap joins both sides");
    }
}
