//! Paged copy-on-write radix trees over 4 KiB pages, behind a bounded cache.
//!
//! Every piece of volume metadata (the block map, the bitmaps, segment
//! usage) is an array of fixed-size items cut into 4 KiB leaf pages. Interior
//! pages hold 128 [`TreePtr`]s (location, generation, MAC) to their
//! children, and the root pointer lives in the checkpoint: the trees form a
//! Merkle tree under the authenticated checkpoint.
//!
//! Invariants:
//! - a dirty page's ancestors are dirty and cached (dirty pages are pinned);
//! - a clean cached page's `ptr` equals the pointer its parent (or the root)
//!   holds for it;
//! - when a page is first dirtied, its old on-disk copy is reported as
//!   superseded exactly once, so segment usage stays exact.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use super::format::{Block, TreeId, TreePtr, TREE_PTR_LEN};
use crate::volume::Result;
use crate::BLOCK_SIZE;

/// Children per interior page.
pub const FANOUT: u64 = (BLOCK_SIZE / TREE_PTR_LEN) as u64;
const FANOUT_BITS: u32 = FANOUT.trailing_zeros();

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageKey {
    pub tree: TreeId,
    pub level: u8,
    pub index: u64,
}

impl PageKey {
    pub fn leaf(tree: TreeId, index: u64) -> PageKey {
        PageKey {
            tree,
            level: 0,
            index,
        }
    }

    fn parent(&self) -> PageKey {
        PageKey {
            tree: self.tree,
            level: self.level + 1,
            index: self.index >> FANOUT_BITS,
        }
    }

    fn slot(&self) -> usize {
        (self.index & (FANOUT - 1)) as usize * TREE_PTR_LEN
    }
}

/// How many leaves a tree has and how many interior levels sit above them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub leaves: u64,
    pub depth: u8,
}

impl Shape {
    pub fn new(leaves: u64) -> Shape {
        let mut depth = 0;
        let mut span = 1u64;
        while span < leaves {
            span = span.saturating_mul(FANOUT);
            depth += 1;
        }
        Shape { leaves, depth }
    }
}

/// Loads and authenticates one page from the device.
pub trait PageSource {
    fn load_page(&self, key: PageKey, ptr: &TreePtr) -> Result<Box<Block>>;
}

struct Cached {
    data: Box<Block>,
    ptr: TreePtr,
    dirty: bool,
    used: u64,
}

pub struct Trees {
    roots: [TreePtr; 5],
    shapes: [Shape; 5],
    /// Keyed by page position, which the volume chooses (never a caller):
    /// a fast non-keyed hash is safe here and is most of a lookup's cost.
    cache: FxHashMap<PageKey, Cached>,
    dirty: BTreeSet<PageKey>,
    capacity: usize,
    tick: u64,
}

impl Trees {
    pub fn new(roots: [TreePtr; 5], shapes: [Shape; 5], capacity_pages: usize) -> Trees {
        Trees {
            roots,
            shapes,
            cache: FxHashMap::default(),
            dirty: BTreeSet::new(),
            capacity: capacity_pages.max(64),
            tick: 0,
        }
    }

    pub fn roots(&self) -> [TreePtr; 5] {
        self.roots
    }

    pub fn shape(&self, tree: TreeId) -> Shape {
        self.shapes[tree as usize]
    }

    pub fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    pub fn cached_count(&self) -> usize {
        self.cache.len()
    }

    fn is_root(&self, key: &PageKey) -> bool {
        key.level == self.shapes[key.tree as usize].depth
    }

    /// The pointer that currently names `key`'s on-disk copy, and whether
    /// the cached copy is dirty (then the on-disk copy is already superseded).
    pub fn current_ptr(&mut self, src: &dyn PageSource, key: PageKey) -> Result<(TreePtr, bool)> {
        if let Some(c) = self.cache.get(&key) {
            return Ok((c.ptr, c.dirty));
        }
        Ok((self.ptr_from_parent(src, key)?, false))
    }

    fn ptr_from_parent(&mut self, src: &dyn PageSource, key: PageKey) -> Result<TreePtr> {
        if self.is_root(&key) {
            return Ok(self.roots[key.tree as usize]);
        }
        let parent = self.get(src, key.parent())?;
        Ok(TreePtr::decode(&parent[key.slot()..]))
    }

    fn load(&mut self, src: &dyn PageSource, key: PageKey) -> Result<()> {
        self.tick += 1;
        if let Some(c) = self.cache.get_mut(&key) {
            c.used = self.tick;
            return Ok(());
        }
        let ptr = self.ptr_from_parent(src, key)?;
        let data = if ptr.is_absent() {
            Box::new([0u8; BLOCK_SIZE])
        } else {
            src.load_page(key, &ptr)?
        };
        self.cache.insert(
            key,
            Cached {
                data,
                ptr,
                dirty: false,
                used: self.tick,
            },
        );
        Ok(())
    }

    pub fn get(&mut self, src: &dyn PageSource, key: PageKey) -> Result<&Block> {
        self.load(src, key)?;
        Ok(&self.cache[&key].data)
    }

    /// True if the page does not exist: it has no on-disk copy and is not
    /// dirty in memory, so it reads as all zeros.
    pub fn is_absent(&mut self, src: &dyn PageSource, key: PageKey) -> Result<bool> {
        if let Some(c) = self.cache.get(&key) {
            return Ok(!c.dirty && c.ptr.is_absent());
        }
        Ok(self.ptr_from_parent(src, key)?.is_absent())
    }

    /// The page, to modify. It and its ancestors become dirty; each on-disk
    /// copy that stops being current is passed to `superseded`.
    pub fn get_mut(
        &mut self,
        src: &dyn PageSource,
        key: PageKey,
        superseded: &mut dyn FnMut(TreeId, TreePtr),
    ) -> Result<&mut Block> {
        self.load(src, key)?;
        let mut k = key;
        loop {
            self.load(src, k)?;
            let c = self.cache.get_mut(&k).expect("just loaded");
            if c.dirty {
                break;
            }
            c.dirty = true;
            if !c.ptr.is_absent() {
                superseded(k.tree, c.ptr);
            }
            self.dirty.insert(k);
            if self.is_root(&k) {
                break;
            }
            k = k.parent();
        }
        Ok(&mut self.cache.get_mut(&key).expect("loaded").data)
    }

    /// Dirty pages of one tree level, in index order.
    pub fn dirty_at(&self, tree: TreeId, level: u8) -> Vec<PageKey> {
        let lo = PageKey {
            tree,
            level,
            index: 0,
        };
        let hi = PageKey {
            tree,
            level,
            index: u64::MAX,
        };
        self.dirty.range(lo..=hi).copied().collect()
    }

    /// The cached content of a page (it must be cached, e.g. dirty).
    pub fn cached(&self, key: &PageKey) -> &Block {
        &self.cache[key].data
    }

    /// Records that a dirty page now lives at `ptr`: it becomes clean and
    /// its parent (dirty by invariant) or the root points at it.
    pub fn set_written(&mut self, key: PageKey, ptr: TreePtr) {
        let c = self.cache.get_mut(&key).expect("written page is cached");
        c.ptr = ptr;
        c.dirty = false;
        self.dirty.remove(&key);
        if self.is_root(&key) {
            self.roots[key.tree as usize] = ptr;
        } else {
            let parent = self
                .cache
                .get_mut(&key.parent())
                .expect("parent of a dirty page is cached");
            debug_assert!(parent.dirty, "parent of a dirty page is dirty");
            ptr.encode(&mut parent.data[key.slot()..]);
        }
    }

    /// Evicts least recently used clean pages down to 3/4 of capacity.
    pub fn evict(&mut self) {
        if self.cache.len() <= self.capacity {
            return;
        }
        let mut clean: Vec<(u64, PageKey)> = self
            .cache
            .iter()
            .filter(|(_, c)| !c.dirty)
            .map(|(k, c)| (c.used, *k))
            .collect();
        clean.sort_unstable();
        let excess = self.cache.len().saturating_sub(self.capacity * 3 / 4);
        for (_, k) in clean.into_iter().take(excess) {
            self.cache.remove(&k);
        }
    }

    /// Calls `f` for every page of `tree` that exists (on disk or in
    /// memory), parents before children, with its pointer and whether it is
    /// dirty. Pages are read through the cache.
    pub fn visit(
        &mut self,
        src: &dyn PageSource,
        tree: TreeId,
        f: &mut dyn FnMut(PageKey, TreePtr, bool, &Block),
    ) -> Result<()> {
        let depth = self.shapes[tree as usize].depth;
        let root = PageKey {
            tree,
            level: depth,
            index: 0,
        };
        let mut stack = vec![root];
        let mut visited = 0usize;
        while let Some(k) = stack.pop() {
            visited += 1;
            if visited % 1024 == 0 {
                // Walking a large tree must not pull all of it into memory.
                self.evict();
            }
            if self.is_absent(src, k)? {
                continue;
            }
            let (ptr, dirty) = self.current_ptr(src, k)?;
            let data = self.get(src, k)?;
            f(k, ptr, dirty, data);
            if k.level > 0 {
                let leaves = self.shapes[tree as usize].leaves;
                let first_child = k.index << FANOUT_BITS;
                let span_bits = FANOUT_BITS * (k.level as u32 - 1);
                for i in (0..FANOUT).rev() {
                    let child = PageKey {
                        tree,
                        level: k.level - 1,
                        index: first_child + i,
                    };
                    if (child.index << span_bits) < leaves {
                        stack.push(child);
                    }
                }
            }
        }
        Ok(())
    }

    /// Drops a whole tree: every existing on-disk page is reported as
    /// superseded, cached pages are discarded, and the root becomes absent.
    pub fn clear_tree(
        &mut self,
        src: &dyn PageSource,
        tree: TreeId,
        superseded: &mut dyn FnMut(TreeId, TreePtr),
    ) -> Result<()> {
        let mut old = Vec::new();
        self.visit(src, tree, &mut |_, ptr, dirty, _| {
            if !dirty && !ptr.is_absent() {
                old.push(ptr);
            }
        })?;
        for p in old {
            superseded(tree, p);
        }
        self.cache.retain(|k, _| k.tree != tree);
        self.dirty.retain(|k| k.tree != tree);
        self.roots[tree as usize] = TreePtr::ABSENT;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// A page store that hands out pages by pointer, standing in for the
    /// device and the crypto layer.
    struct Store(RefCell<HashMap<u64, Box<Block>>>);

    impl PageSource for Store {
        fn load_page(&self, _key: PageKey, ptr: &TreePtr) -> Result<Box<Block>> {
            Ok(self.0.borrow()[&ptr.pba].clone())
        }
    }

    fn write_all(t: &mut Trees, store: &Store, next: &mut u64) {
        let tree = TreeId::Map;
        for level in 0..=t.shape(tree).depth {
            for k in t.dirty_at(tree, level) {
                *next += 1;
                store.0.borrow_mut().insert(*next, Box::new(*t.cached(&k)));
                t.set_written(
                    k,
                    TreePtr {
                        pba: *next,
                        gen: crate::volume::Generation(*next),
                        ..Default::default()
                    },
                );
            }
        }
    }

    #[test]
    fn copy_on_write_supersedes_each_old_page_once() {
        let store = Store(RefCell::new(HashMap::new()));
        let shapes = [Shape::new(20_000); 5];
        let mut t = Trees::new([TreePtr::ABSENT; 5], shapes, 64);
        assert_eq!(t.shape(TreeId::Map).depth, 3);
        let mut superseded = Vec::new();
        let mut next = 100;
        t.get_mut(&store, PageKey::leaf(TreeId::Map, 19_999), &mut |_, p| {
            superseded.push(p.pba)
        })
        .unwrap()[0] = 7;
        assert!(superseded.is_empty(), "nothing was on disk yet");
        assert_eq!(t.dirty_count(), 4);
        write_all(&mut t, &store, &mut next);
        assert_eq!(t.dirty_count(), 0);
        // Drop the cache entirely: the data must come back from the store.
        let roots = t.roots();
        let mut t = Trees::new(roots, shapes, 64);
        assert_eq!(
            t.get(&store, PageKey::leaf(TreeId::Map, 19_999)).unwrap()[0],
            7
        );
        assert_eq!(t.get(&store, PageKey::leaf(TreeId::Map, 5)).unwrap()[0], 0);
        t.get_mut(&store, PageKey::leaf(TreeId::Map, 19_999), &mut |_, p| {
            superseded.push(p.pba)
        })
        .unwrap()[1] = 8;
        t.get_mut(&store, PageKey::leaf(TreeId::Map, 19_998), &mut |_, p| {
            superseded.push(p.pba)
        })
        .unwrap()[1] = 9;
        superseded.sort();
        assert_eq!(
            superseded,
            vec![101, 102, 103, 104],
            "leaf and 3 ancestors, once each"
        );
        let mut seen = 0;
        t.visit(&store, TreeId::Map, &mut |_, _, _, _| seen += 1)
            .unwrap();
        assert_eq!(seen, 5, "root, 2 interior, 2 leaves (one only in memory)");
    }

    #[test]
    fn eviction_keeps_dirty_pages() {
        let store = Store(RefCell::new(HashMap::new()));
        let mut t = Trees::new([TreePtr::ABSENT; 5], [Shape::new(1 << 20); 5], 64);
        for i in 0..200 {
            t.get_mut(&store, PageKey::leaf(TreeId::Map, i * 1000), &mut |_, _| {})
                .unwrap()[0] = 1;
        }
        let dirty = t.dirty_count();
        t.evict();
        assert_eq!(t.dirty_count(), dirty);
        for i in 0..200 {
            assert_eq!(t.cached(&PageKey::leaf(TreeId::Map, i * 1000))[0], 1);
        }
    }
}
