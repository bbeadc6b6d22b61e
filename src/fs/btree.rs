//! The metadata B+tree: sorted byte-string keys to byte-string values, in
//! 4 KiB nodes stored in volume blocks.
//!
//! The file system keeps everything but file data here (inodes, directory
//! entries, xattrs, extents), under keys that start with the inode number
//! in big-endian, so one inode's items sort together and a directory's
//! entries can be found by name without scanning.
//!
//! Atomicity comes from the volume: the tree stages every node it changes
//! (and every node it frees) in a [`NodeStore`], and the caller commits
//! them in the same volume transaction as the rest of the operation. Nodes
//! are therefore updated in place; no copy-on-write is needed.
//!
//! Invariants:
//! - every key in a branch's child `i` is `>= keys[i-1]` and `< keys[i]`;
//! - leaves hold 1 or more entries, except an empty tree's root leaf;
//! - a branch holds 1 or more children (the root may be reduced to a leaf).

use std::sync::Arc;

use crate::fs::{FsError, Posix, Result};
use crate::BLOCK_SIZE;

/// Largest key, in bytes (an inode number, a kind and a 255-byte name fit).
pub const MAX_KEY: usize = 300;
/// Largest value, in bytes. Two maximal entries fit in a node.
pub const MAX_VALUE: usize = 1700;

const MAGIC: [u8; 2] = *b"BT";
const HEADER: usize = 8;

/// A key or value inside a node: shared, so that copying a node to change
/// it (every write does) copies pointers, not every entry.
pub type Bytes = Arc<[u8]>;

/// A decoded node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Leaf(Vec<(Bytes, Bytes)>),
    /// `keys.len() + 1 == children.len()`.
    Branch {
        keys: Vec<Bytes>,
        children: Vec<u64>,
    },
}

// Node layout (4096 bytes, little endian):
// | 0 magic "BT" | 2 level u8 (0 = leaf) | 3 reserved | 4 count u16 | 6 reserved u16 |
// leaf entries:   | klen u16 | vlen u16 | key | value |
// branch:         | child0 u64 | then per key: | klen u16 | key | child u64 |

impl Node {
    fn encoded_len(&self) -> usize {
        HEADER
            + match self {
                Node::Leaf(es) => es.iter().map(|(k, v)| 4 + k.len() + v.len()).sum::<usize>(),
                Node::Branch { keys, .. } => {
                    8 + keys.iter().map(|k| 2 + k.len() + 8).sum::<usize>()
                }
            }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(BLOCK_SIZE);
        b.extend_from_slice(&MAGIC);
        match self {
            Node::Leaf(es) => {
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(&(es.len() as u16).to_le_bytes());
                b.extend_from_slice(&[0, 0]);
                for (k, v) in es {
                    b.extend_from_slice(&(k.len() as u16).to_le_bytes());
                    b.extend_from_slice(&(v.len() as u16).to_le_bytes());
                    b.extend_from_slice(k);
                    b.extend_from_slice(v);
                }
            }
            Node::Branch { keys, children } => {
                b.extend_from_slice(&[1, 0]);
                b.extend_from_slice(&(keys.len() as u16).to_le_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(&children[0].to_le_bytes());
                for (k, c) in keys.iter().zip(&children[1..]) {
                    b.extend_from_slice(&(k.len() as u16).to_le_bytes());
                    b.extend_from_slice(k);
                    b.extend_from_slice(&c.to_le_bytes());
                }
            }
        }
        debug_assert!(b.len() <= BLOCK_SIZE);
        b.resize(BLOCK_SIZE, 0);
        b
    }

    /// Decodes a node read from block `lba`; any inconsistency is an error
    /// naming the block, never a panic.
    pub fn decode(b: &[u8], lba: u64) -> Result<Node> {
        let bad = |what: &str| FsError::Corrupted(format!("metadata node at block {lba}: {what}"));
        if b.len() != BLOCK_SIZE || b[..2] != MAGIC {
            return Err(bad("not a metadata node"));
        }
        let count = u16::from_le_bytes([b[4], b[5]]) as usize;
        let mut at = HEADER;
        let mut take = |n: usize| -> Result<&[u8]> {
            let s = b
                .get(at..at + n)
                .ok_or_else(|| bad("entry runs past the end"))?;
            at += n;
            Ok(s)
        };
        let u16_of = |s: &[u8]| u16::from_le_bytes([s[0], s[1]]) as usize;
        let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
        let node = match b[2] {
            0 => {
                let mut es = Vec::with_capacity(count);
                for _ in 0..count {
                    let kl = u16_of(take(2)?);
                    let vl = u16_of(take(2)?);
                    if kl > MAX_KEY || vl > MAX_VALUE {
                        return Err(bad("entry too large"));
                    }
                    let k: Bytes = take(kl)?.into();
                    let v: Bytes = take(vl)?.into();
                    es.push((k, v));
                }
                Node::Leaf(es)
            }
            1 => {
                let mut children = vec![u64_of(take(8)?)];
                let mut keys = Vec::with_capacity(count);
                for _ in 0..count {
                    let kl = u16_of(take(2)?);
                    if kl > MAX_KEY {
                        return Err(bad("key too large"));
                    }
                    keys.push(take(kl)?.into());
                    children.push(u64_of(take(8)?));
                }
                Node::Branch { keys, children }
            }
            _ => return Err(bad("unknown node level")),
        };
        let sorted = match &node {
            Node::Leaf(es) => es.windows(2).all(|w| w[0].0 < w[1].0),
            Node::Branch { keys, .. } => keys.windows(2).all(|w| w[0] < w[1]),
        };
        if !sorted {
            return Err(bad("keys out of order"));
        }
        Ok(node)
    }
}

/// Where nodes live: reads see staged changes; writes and frees are staged
/// for the caller's next volume transaction.
pub trait NodeStore {
    /// The node at `lba`, shared with the store's cache: readers borrow it;
    /// writers `take` it instead and `write` the result.
    fn read(&mut self, lba: u64) -> Result<Arc<Node>>;
    /// The node at `lba`, to change and `write` back: a copy of the shared
    /// one. A store that stages writes hands over a node this operation
    /// already changed without copying it (so it must be written back, or
    /// the operation must fail).
    fn take(&mut self, lba: u64) -> Result<Node> {
        Ok(Arc::unwrap_or_clone(self.read(lba)?))
    }
    fn write(&mut self, lba: u64, node: Node);
    /// A block for a new node.
    fn alloc(&mut self) -> Result<u64>;
    fn free(&mut self, lba: u64);
}

/// A B+tree rooted at `root`; the caller persists `root` when it changes.
pub struct BTree {
    pub root: u64,
}

/// What inserting into a subtree did to it.
enum Grew {
    No,
    /// The node split: a new right sibling starting at `key`.
    Split {
        key: Bytes,
        right: u64,
    },
}

/// A node read a moment ago came back as the other kind when taken to be
/// changed: the store is inconsistent.
fn changed_kind(lba: u64) -> FsError {
    FsError::Corrupted(format!(
        "metadata node at block {lba} changed kind within one operation"
    ))
}

fn check_sizes(key: &[u8], value: &[u8]) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY || value.len() > MAX_VALUE {
        return Err(Posix::Invalid.at(format!(
            "metadata entry of {} + {} bytes exceeds the limits ({MAX_KEY} + {MAX_VALUE})",
            key.len(),
            value.len()
        )));
    }
    Ok(())
}

impl BTree {
    /// Creates an empty tree: one empty leaf.
    pub fn create(store: &mut dyn NodeStore) -> Result<BTree> {
        let root = store.alloc()?;
        store.write(root, Node::Leaf(Vec::new()));
        Ok(BTree { root })
    }

    pub fn get(&self, store: &mut dyn NodeStore, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut lba = self.root;
        loop {
            match &*store.read(lba)? {
                Node::Leaf(es) => {
                    return Ok(es
                        .binary_search_by(|(k, _)| k[..].cmp(key))
                        .ok()
                        .map(|i| es[i].1.to_vec()))
                }
                Node::Branch { keys, children } => {
                    lba = children[keys.partition_point(|k| &k[..] <= key)];
                }
            }
        }
    }

    /// Inserts or replaces. Returns the previous value.
    pub fn insert(
        &mut self,
        store: &mut dyn NodeStore,
        key: &[u8],
        value: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        check_sizes(key, value)?;
        let mut old = None;
        if let Grew::Split { key: sep, right } =
            self.insert_at(store, self.root, key, value, &mut old, 0)?
        {
            let root = store.alloc()?;
            store.write(
                root,
                Node::Branch {
                    keys: vec![sep],
                    children: vec![self.root, right],
                },
            );
            self.root = root;
        }
        Ok(old)
    }

    fn insert_at(
        &mut self,
        store: &mut dyn NodeStore,
        lba: u64,
        key: &[u8],
        value: &[u8],
        old: &mut Option<Vec<u8>>,
        depth: usize,
    ) -> Result<Grew> {
        if depth > 64 {
            return Err(FsError::Corrupted(format!(
                "metadata tree deeper than 64 levels at block {lba}"
            )));
        }
        // A branch is copied only when its child split: most inserts
        // change one leaf, and copying every node on the way (every key's
        // reference count up, then down) was a fifth of a create's work.
        let child = match &*store.read(lba)? {
            Node::Leaf(_) => None,
            Node::Branch { keys, children } => {
                let i = keys.partition_point(|k| &k[..] <= key);
                Some((i, children[i]))
            }
        };
        let Some((i, child)) = child else {
            let mut node = store.take(lba)?;
            let Node::Leaf(es) = &mut node else {
                return Err(changed_kind(lba));
            };
            match es.binary_search_by(|(k, _)| k[..].cmp(key)) {
                Ok(i) => *old = Some(std::mem::replace(&mut es[i].1, value.into()).to_vec()),
                Err(i) => es.insert(i, (key.into(), value.into())),
            }
            return self.store_or_split(store, lba, node);
        };
        let Grew::Split { key: sep, right } =
            self.insert_at(store, child, key, value, old, depth + 1)?
        else {
            return Ok(Grew::No);
        };
        let mut node = store.take(lba)?;
        let Node::Branch { keys, children } = &mut node else {
            return Err(changed_kind(lba));
        };
        keys.insert(i, sep);
        children.insert(i + 1, right);
        self.store_or_split(store, lba, node)
    }

    /// Writes `node` back at `lba`, splitting it in two by bytes if it no
    /// longer fits in a block.
    fn store_or_split(&mut self, store: &mut dyn NodeStore, lba: u64, node: Node) -> Result<Grew> {
        if node.encoded_len() <= BLOCK_SIZE {
            store.write(lba, node);
            return Ok(Grew::No);
        }
        let half = node.encoded_len() / 2;
        let (left, sep, right) = match node {
            Node::Leaf(mut es) => {
                let mut size = HEADER;
                let mut cut = 0;
                while cut < es.len() - 1 && size < half {
                    size += 4 + es[cut].0.len() + es[cut].1.len();
                    cut += 1;
                }
                let cut = cut.max(1);
                let right = es.split_off(cut);
                let sep = right[0].0.clone();
                (Node::Leaf(es), sep, Node::Leaf(right))
            }
            Node::Branch {
                mut keys,
                mut children,
            } => {
                let mut size = HEADER + 8;
                let mut cut = 0;
                while cut < keys.len() - 1 && size < half {
                    size += 2 + keys[cut].len() + 8;
                    cut += 1;
                }
                let cut = cut.max(1);
                // keys[cut] moves up; its right child starts the new node.
                let right_keys = keys.split_off(cut + 1);
                let sep = keys.pop().expect("cut >= 1");
                let right_children = children.split_off(cut + 1);
                (
                    Node::Branch { keys, children },
                    sep,
                    Node::Branch {
                        keys: right_keys,
                        children: right_children,
                    },
                )
            }
        };
        let right_lba = store.alloc()?;
        store.write(lba, left);
        store.write(right_lba, right);
        Ok(Grew::Split {
            key: sep,
            right: right_lba,
        })
    }

    /// Removes `key`. Returns its value, if it was there. Nodes that become
    /// empty are freed; a root branch left with one child is replaced by it.
    pub fn remove(&mut self, store: &mut dyn NodeStore, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let (old, _) = self.remove_at(store, self.root, key, 0)?;
        loop {
            match &*store.read(self.root)? {
                Node::Branch { keys, children } if keys.is_empty() => {
                    store.free(self.root);
                    self.root = children[0];
                }
                _ => break,
            }
        }
        Ok(old)
    }

    /// Returns the removed value and whether the node at `lba` is now empty
    /// (and was freed).
    fn remove_at(
        &mut self,
        store: &mut dyn NodeStore,
        lba: u64,
        key: &[u8],
        depth: usize,
    ) -> Result<(Option<Vec<u8>>, bool)> {
        if depth > 64 {
            return Err(FsError::Corrupted(format!(
                "metadata tree deeper than 64 levels at block {lba}"
            )));
        }
        // Nodes are copied only to change them (see `insert_at`).
        let at = match &*store.read(lba)? {
            Node::Leaf(es) => match es.binary_search_by(|(k, _)| k[..].cmp(key)) {
                Ok(i) => Ok(i),
                Err(_) => return Ok((None, false)),
            },
            Node::Branch { keys, children } => {
                let i = keys.partition_point(|k| &k[..] <= key);
                Err((i, children[i]))
            }
        };
        let (old, mut node) = match at {
            Ok(i) => {
                let mut node = store.take(lba)?;
                let Node::Leaf(es) = &mut node else {
                    return Err(changed_kind(lba));
                };
                (Some(es.remove(i).1.to_vec()), node)
            }
            Err((i, child)) => {
                let (old, emptied) = self.remove_at(store, child, key, depth + 1)?;
                if !emptied {
                    return Ok((old, false));
                }
                let mut node = store.take(lba)?;
                let Node::Branch { keys, children } = &mut node else {
                    return Err(changed_kind(lba));
                };
                children.remove(i);
                if i > 0 {
                    keys.remove(i - 1);
                } else if !keys.is_empty() {
                    keys.remove(0);
                }
                (old, node)
            }
        };
        let empty = match &node {
            Node::Leaf(es) => es.is_empty(),
            Node::Branch { children, .. } => children.is_empty(),
        };
        if empty {
            if lba != self.root {
                store.free(lba);
                return Ok((old, true));
            }
            node = Node::Leaf(Vec::new());
        }
        store.write(lba, node);
        Ok((old, false))
    }

    /// The greatest key in the tree, if any.
    pub fn last_key(&self, store: &mut dyn NodeStore) -> Result<Option<Vec<u8>>> {
        let mut lba = self.root;
        for _ in 0..64 {
            match &*store.read(lba)? {
                Node::Leaf(es) => return Ok(es.last().map(|(k, _)| k.to_vec())),
                Node::Branch { children, .. } => {
                    lba = *children.last().expect("a branch has children")
                }
            }
        }
        Err(FsError::Corrupted(format!(
            "metadata tree deeper than 64 levels below block {}",
            self.root
        )))
    }

    /// Entries with `start <= key < end`, in order, at most `limit` of them.
    pub fn range(
        &self,
        store: &mut dyn NodeStore,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        // Stops at the limit, without reading the leaf after it.
        self.visit(store, start, end, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            out.len() < limit
        })?;
        Ok(out)
    }

    /// Calls `f` with each entry with `start <= key < end`, in order,
    /// until it answers false. Nothing is copied.
    pub fn visit(
        &self,
        store: &mut dyn NodeStore,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        self.visit_at(store, self.root, start, end, f, 0)
            .map(|_| ())
    }

    /// Whether the visit goes on.
    fn visit_at(
        &self,
        store: &mut dyn NodeStore,
        lba: u64,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
        depth: usize,
    ) -> Result<bool> {
        if depth > 64 {
            return Err(FsError::Corrupted(format!(
                "metadata tree deeper than 64 levels at block {lba}"
            )));
        }
        match &*store.read(lba)? {
            Node::Leaf(es) => {
                for (k, v) in es {
                    if &k[..] >= end {
                        return Ok(false);
                    }
                    if &k[..] >= start && !f(k, v) {
                        return Ok(false);
                    }
                }
            }
            Node::Branch { keys, children } => {
                let first = keys.partition_point(|k| &k[..] <= start);
                for i in first..children.len() {
                    if i > 0 && &keys[i - 1][..] >= end {
                        return Ok(false);
                    }
                    if !self.visit_at(store, children[i], start, end, f, depth + 1)? {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    /// An in-memory node store that round-trips every node through its
    /// byte encoding, so encoding bugs show up as test failures.
    #[derive(Default)]
    struct Mem {
        blocks: HashMap<u64, Vec<u8>>,
        next: u64,
        freed: Vec<u64>,
    }

    impl NodeStore for Mem {
        fn read(&mut self, lba: u64) -> Result<Arc<Node>> {
            Node::decode(&self.blocks[&lba], lba).map(Arc::new)
        }
        fn write(&mut self, lba: u64, node: Node) {
            self.blocks.insert(lba, node.encode());
        }
        fn alloc(&mut self) -> Result<u64> {
            self.next += 1;
            Ok(self.freed.pop().unwrap_or(self.next + 1000))
        }
        fn free(&mut self, lba: u64) {
            assert!(self.blocks.remove(&lba).is_some(), "double free of {lba}");
            self.freed.push(lba);
        }
    }

    fn key(i: u32, pad: usize) -> Vec<u8> {
        let mut k = i.to_be_bytes().to_vec();
        k.resize(4 + pad, b'x');
        k
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32, usize, usize),
        Remove(u32, usize),
        Range(u32, u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u32..600, 0usize..200, 0usize..700).prop_map(|(k, p, v)| Op::Insert(k, p, v)),
            3 => (0u32..600, 0usize..200).prop_map(|(k, p)| Op::Remove(k, p)),
            1 => (0u32..600, 0u32..600).prop_map(|(a, b)| Op::Range(a.min(b), a.max(b))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn matches_a_btreemap(ops in prop::collection::vec(op(), 1..600)) {
            let mut store = Mem::default();
            let mut t = BTree::create(&mut store).unwrap();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, pad, vlen) => {
                        let k = key(k, pad);
                        let v = vec![(vlen % 251) as u8; vlen];
                        prop_assert_eq!(t.insert(&mut store, &k, &v).unwrap(), model.insert(k, v));
                    }
                    Op::Remove(k, pad) => {
                        let k = key(k, pad);
                        prop_assert_eq!(t.remove(&mut store, &k).unwrap(), model.remove(&k));
                    }
                    Op::Range(a, b) => {
                        let (s, e) = (key(a, 0), key(b, 0));
                        let got = t.range(&mut store, &s, &e, usize::MAX).unwrap();
                        let want: Vec<_> = model.range(s..e).map(|(k, v)| (k.clone(), v.clone())).collect();
                        prop_assert_eq!(got, want);
                    }
                }
            }
            for (k, v) in &model {
                let got = t.get(&mut store, k).unwrap();
                prop_assert_eq!(got.as_ref(), Some(v));
            }
            prop_assert_eq!(t.last_key(&mut store).unwrap(), model.keys().next_back().cloned());
            let all = t.range(&mut store, &[0], &[0xff; 8], usize::MAX).unwrap();
            prop_assert_eq!(all.len(), model.len());
            // Removing everything frees every node but the root.
            for k in model.keys() {
                t.remove(&mut store, k).unwrap();
            }
            prop_assert_eq!(store.blocks.len(), 1);
            prop_assert_eq!(&*store.read(t.root).unwrap(), &Node::Leaf(Vec::new()));
        }
    }

    #[test]
    fn hundred_thousand_keys_stay_shallow() {
        let mut store = Mem::default();
        let mut t = BTree::create(&mut store).unwrap();
        for i in 0..100_000u32 {
            let mut k = b"dir entry name number ".to_vec();
            k.extend_from_slice(&i.to_be_bytes());
            t.insert(&mut store, &k, &i.to_le_bytes()).unwrap();
        }
        let mut depth = 0;
        let mut lba = t.root;
        while let Node::Branch { children, .. } = &*store.read(lba).unwrap() {
            depth += 1;
            lba = children[0];
        }
        assert!(depth <= 3, "depth {depth} for 100,000 keys");
        let mut k = b"dir entry name number ".to_vec();
        k.extend_from_slice(&77_777u32.to_be_bytes());
        assert_eq!(
            t.get(&mut store, &k).unwrap(),
            Some(77_777u32.to_le_bytes().to_vec())
        );
    }

    #[test]
    fn rejects_oversized_entries_and_garbage_nodes() {
        let mut store = Mem::default();
        let mut t = BTree::create(&mut store).unwrap();
        assert!(t.insert(&mut store, &[1; MAX_KEY + 1], b"v").is_err());
        assert!(t.insert(&mut store, b"k", &[1; MAX_VALUE + 1]).is_err());
        assert!(t.insert(&mut store, b"", b"v").is_err());
        t.insert(&mut store, &[2; MAX_KEY], &[3; MAX_VALUE])
            .unwrap();
        t.insert(&mut store, &[1; MAX_KEY], &[3; MAX_VALUE])
            .unwrap();
        t.insert(&mut store, &[0; MAX_KEY], &[3; MAX_VALUE])
            .unwrap();
        for garbage in [vec![0u8; BLOCK_SIZE], vec![0xff; BLOCK_SIZE], {
            let mut b = Node::Leaf(vec![(b"a"[..].into(), b"b"[..].into())]).encode();
            b[4] = 200; // count past the end
            b
        }] {
            assert!(matches!(
                Node::decode(&garbage, 9),
                Err(FsError::Corrupted(_))
            ));
        }
    }
}
