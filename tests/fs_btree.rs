//! The metadata B+tree on a real volume: operations committed as volume
//! transactions, reopened cleanly and after kills, with the allocator
//! rebuilt from the volume's allocated bitmap. Contents must match a model,
//! and the allocated blocks must be exactly the tree's nodes (nothing
//! leaked, nothing lost).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use common::{mem_volume, open, Rng};
use lsvfs::device::MemDevice;
use lsvfs::fs::btree::{BTree, Node, NodeStore};
use lsvfs::fs::store::{Allocator, VolumeStore};
use lsvfs::volume::{Lba, Transaction, Volume};
use lsvfs::BLOCK_SIZE;

const LOGICAL: u64 = 8192;

struct Fs {
    v: Volume,
    alloc: Allocator,
    cache: HashMap<u64, std::sync::Arc<Node>>,
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
        cache: HashMap::new(),
        tree: BTree { root },
    }
}

fn superblock(root: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    b[..8].copy_from_slice(&root.to_le_bytes());
    b
}

fn reachable(fs: &mut Fs) -> BTreeSet<u64> {
    let mut store = VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache);
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

fn check(fs: &mut Fs, model: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let tree = BTree { root: fs.tree.root };
    let mut store = VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache);
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
}

#[test]
fn btree_on_a_volume_survives_reopens_and_kills() {
    let dev = mem_volume(LOGICAL, 64);
    let v = open(dev.clone());
    let mut alloc = Allocator::from_allocated(1, LOGICAL, &[]);
    let mut cache = HashMap::new();
    let tree = {
        let mut store = VolumeStore::new(&v, &mut alloc, &mut cache);
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
        tree,
    };
    let mut dev = dev;
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut rng = Rng(2024);
    for round in 0..400 {
        // One operation = a batch of inserts and removes in one transaction.
        let mut next = model.clone();
        let old_root = fs.tree.root;
        let mut store = VolumeStore::new(&fs.v, &mut fs.alloc, &mut fs.cache);
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
        let mut txn = Transaction::new();
        if fs.tree.root != old_root {
            txn.write(Lba(0), superblock(fs.tree.root));
        }
        store.commit(txn).unwrap();
        model = next;
        match rng.below(40) {
            0 => {
                fs.v.close().unwrap();
                fs = mount(open(dev.clone()));
                check(&mut fs, &model);
            }
            1 => {
                let img = dev.image();
                fs.v.abandon();
                dev = Arc::new(MemDevice::from_image(img));
                fs = mount(open(dev.clone()));
                check(&mut fs, &model);
            }
            _ => {}
        }
    }
    check(&mut fs, &model);
    assert!(
        model.len() > 500,
        "the workload should leave a multi-level tree ({} keys)",
        model.len()
    );
}
