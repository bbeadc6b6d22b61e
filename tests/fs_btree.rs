//! The metadata B+tree on a real volume: operations committed as volume
//! transactions, reopened cleanly and after kills, with the allocator
//! rebuilt from the volume's allocated bitmap. Contents must match a model,
//! and the allocated blocks must be exactly the tree's nodes (nothing
//! leaked, nothing lost).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::{mem_volume, open, Rng};
use lsvfs::device::MemDevice;
use lsvfs::fs::btree::{BTree, Node, NodeStore};
use lsvfs::fs::store::{Allocator, Commit, NodeCache, Pending, VolumeStore};
use lsvfs::volume::{Lba, Transaction, Volume};
use lsvfs::BLOCK_SIZE;

const LOGICAL: u64 = 8192;

struct Fs {
    v: Volume,
    alloc: Allocator,
    cache: NodeCache,
    pending: Pending,
    tree: BTree,
}

fn mount(v: Volume) -> Fs {
    let mut b = vec![0u8; BLOCK_SIZE];
    v.read(Lba(0), &mut b).unwrap();
    let root = u64::from_le_bytes(b[..8].try_into().unwrap());
    let alloc = Allocator::from_allocated(1, LOGICAL, &v.allocated_runs().unwrap());
    Fs {
        v,
        alloc,
        cache: NodeCache::default(),
        pending: Pending::default(),
        tree: BTree { root },
    }
}

fn superblock(root: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    b[..8].copy_from_slice(&root.to_le_bytes());
    b
}

fn reachable(fs: &mut Fs) -> BTreeSet<u64> {
    let mut store = VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache, &mut fs.pending);
    let mut seen = BTreeSet::new();
    let mut stack = vec![fs.tree.root];
    while let Some(lba) = stack.pop() {
        assert!(seen.insert(lba), "node {lba} reachable twice");
        if let Node::Branch { children, .. } = &*store.read(lba).unwrap() {
            stack.extend(children);
        }
    }
    seen
}

/// Commits what is pending, then compares the tree with the model and the
/// volume's allocated blocks with the tree's nodes.
fn check(fs: &mut Fs, model: &BTreeMap<Vec<u8>, Vec<u8>>) {
    VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache, &mut fs.pending)
        .commit(Transaction::new())
        .unwrap();
    assert!(fs.pending.is_empty(), "a commit leaves nothing pending");
    let tree = BTree { root: fs.tree.root };
    let mut store = VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache, &mut fs.pending);
    let all = tree
        .range(&mut store, &[0], &[0xff; 16], usize::MAX)
        .unwrap();
    let want: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert!(all == want, "tree contents differ from the model");
    drop(store);
    let mut used: BTreeSet<u64> = BTreeSet::new();
    for (s, n) in fs.v.allocated_runs().unwrap() {
        used.extend(s..s + n);
    }
    let mut nodes = reachable(fs);
    nodes.insert(0);
    assert_eq!(
        used, nodes,
        "allocated blocks are not exactly the superblock and the tree's nodes"
    );
    // The allocator's free blocks are exactly the others (block 0 is never
    // handed out): none lost, none twice.
    assert_eq!(
        fs.alloc.free_blocks(),
        LOGICAL - used.len() as u64,
        "the allocator's free count"
    );
}

#[test]
fn btree_on_a_volume_survives_reopens_and_kills() {
    let dev = mem_volume(LOGICAL, 64);
    let v = open(dev.clone());
    let mut alloc = Allocator::from_allocated(1, LOGICAL, &[]);
    let mut cache = NodeCache::default();
    let mut pending = Pending::default();
    let tree = {
        let mut store = VolumeStore::new(&v, &mut alloc, &mut cache, &mut pending);
        let t = BTree::create(&mut store).unwrap();
        let mut txn = Transaction::new();
        txn.write(Lba(0), superblock(t.root));
        store.commit(txn).unwrap();
        t
    };
    let mut fs = Fs {
        v,
        alloc,
        cache,
        pending,
        tree,
    };
    let mut dev = dev;
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    // The model as of the last commit: what a kill leaves.
    let mut committed = model.clone();
    let mut deferred = 0u32;
    let mut rng = Rng(2024);
    for round in 0..400 {
        // One operation = a batch of inserts and removes in one transaction.
        let mut next = model.clone();
        let old_root = fs.tree.root;
        let mut store = VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache, &mut fs.pending);
        for _ in 0..rng.below(12) + 1 {
            let k = format!(
                "{:08}-{}",
                rng.below(3000),
                "n".repeat(rng.below(120) as usize)
            )
            .into_bytes();
            if rng.below(3) == 0 {
                assert_eq!(fs.tree.remove(&mut store, &k).unwrap(), next.remove(&k));
            } else {
                let v = vec![(round % 251) as u8; rng.below(900) as usize];
                assert_eq!(
                    fs.tree.insert(&mut store, &k, &v).unwrap(),
                    next.insert(k, v)
                );
            }
        }
        if rng.below(8) == 0 {
            // The operation fails: nothing it did stays, and what earlier
            // operations left pending is still there.
            drop(store);
            fs.tree.root = old_root;
            continue;
        }
        let mut txn = Transaction::new();
        if fs.tree.root != old_root {
            txn.write(Lba(0), superblock(fs.tree.root));
        }
        // Half the operations may wait (only those that leave the
        // superblock alone do): their changes join the pending ones.
        let defer = rng.below(2) == 0;
        let commits = !defer || !txn.is_empty();
        let when = if defer { Commit::Defer } else { Commit::Now };
        store.finish(txn, when).unwrap();
        deferred += u32::from(!commits);
        model = next;
        if commits {
            committed = model.clone();
        }
        match rng.below(40) {
            0 => {
                check(&mut fs, &model);
                committed = model.clone();
                fs.v.close().unwrap();
                fs = mount(open(dev.clone()));
                check(&mut fs, &model);
            }
            1 => {
                // A kill: what is pending is lost, all of it.
                let img = dev.image();
                fs.v.abandon();
                dev = Arc::new(MemDevice::from_image(img));
                fs = mount(open(dev.clone()));
                model = committed.clone();
                check(&mut fs, &model);
            }
            _ => {}
        }
    }
    assert!(deferred > 50, "only {deferred} operations were deferred");
    check(&mut fs, &model);
    assert!(
        model.len() > 500,
        "the workload should leave a multi-level tree ({} keys)",
        model.len()
    );
}

/// A node that one deferred operation took and a later one freed, before
/// any commit, goes straight back to the allocator: it was never written,
/// so there is nothing to trim. A failed operation leaves the pending
/// changes as they were.
#[test]
fn a_node_freed_before_its_first_commit_goes_straight_back() {
    let dev = mem_volume(LOGICAL, 64);
    let v = open(dev.clone());
    let mut fs = mount(v);
    let before = fs.alloc.free_blocks();
    let new_node = |fs: &mut Fs| {
        let mut store = VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache, &mut fs.pending);
        let lba = store.alloc().unwrap();
        store.write(lba, Node::Leaf(Vec::new()));
        store.finish(Transaction::new(), Commit::Defer).unwrap();
        lba
    };
    let a = new_node(&mut fs);
    assert_eq!(fs.pending.nodes(), 1);
    assert_eq!(fs.alloc.free_blocks(), before - 1);
    // An operation that changed nothing (a read) leaves the pending
    // changes alone, even when it may not defer: it cannot fail for them.
    let mut store = VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache, &mut fs.pending);
    store.read(a).unwrap();
    store.finish(Transaction::new(), Commit::IfChanged).unwrap();
    assert_eq!(
        fs.pending.nodes(),
        1,
        "a read committed the pending changes"
    );
    // Freed by an operation that fails: still pending, still taken.
    let mut store = VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache, &mut fs.pending);
    store.free(a);
    drop(store);
    assert_eq!(fs.pending.nodes(), 1);
    assert_eq!(fs.alloc.free_blocks(), before - 1);
    // Freed by one that completes: back at once, nothing left pending.
    let mut store = VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache, &mut fs.pending);
    store.free(a);
    store.finish(Transaction::new(), Commit::Defer).unwrap();
    assert!(fs.pending.is_empty(), "nothing pending");
    assert_eq!(fs.alloc.free_blocks(), before, "the block went back");
    // Freed after it was committed: trimmed by the next commit, and out of
    // the volume's map then.
    let b = new_node(&mut fs);
    let store = VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache, &mut fs.pending);
    store.commit(Transaction::new()).unwrap();
    assert!(fs
        .v
        .allocated_runs()
        .unwrap()
        .iter()
        .any(|&(s, n)| (s..s + n).contains(&b)));
    let mut store = VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache, &mut fs.pending);
    store.free(b);
    store.finish(Transaction::new(), Commit::Defer).unwrap();
    assert_eq!(fs.pending.freed_blocks(), 1);
    let store = VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache, &mut fs.pending);
    store.commit(Transaction::new()).unwrap();
    assert!(!fs
        .v
        .allocated_runs()
        .unwrap()
        .iter()
        .any(|&(s, n)| (s..s + n).contains(&b)));
    assert_eq!(fs.alloc.free_blocks(), before, "free again (in quarantine)");
}
