//! Model-based property tests: random sequences of transactions (writes,
//! trims and zeroed runs), flushes, checkpoints, cleaning, clean reopens and abrupt reopens,
//! compared block for block against an in-memory model.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::{block, create, open, Rng};
use lsvfs::device::{Device, MemDevice};
use lsvfs::volume::{Lba, Transaction, Volume};
use lsvfs::BLOCK_SIZE;
use proptest::prelude::*;

const LOGICAL: u64 = 600;

#[derive(Debug, Clone, Copy)]
enum Piece {
    Write,
    Trim,
    Zero,
}

#[derive(Debug, Clone)]
enum Op {
    /// A transaction of (what, lba, count) pieces: writes, trims, zeroes.
    Txn(Vec<(Piece, u64, u64)>),
    Flush,
    /// Clears the changed bitmap.
    ResetChanged,
    Checkpoint,
    Clean,
    Reopen,
    /// Reopen from the device as it is, without a checkpoint (process killed).
    Kill,
    Read(u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    let what = prop_oneof![
        4 => Just(Piece::Write),
        2 => Just(Piece::Trim),
        1 => Just(Piece::Zero),
    ];
    // Up to 300 blocks: a trim or zeroed run may cover several map pages
    // (128 entries each) and start or end inside one.
    let piece = (what, 0..LOGICAL, 1u64..300).prop_map(|(w, lba, n)| {
        let n = match w {
            Piece::Write => n % 40 + 1,
            _ => n,
        };
        (w, lba, n.min(LOGICAL - lba))
    });
    prop_oneof![
        10 => prop::collection::vec(piece, 1..4).prop_map(Op::Txn),
        2 => Just(Op::Flush),
        1 => Just(Op::ResetChanged),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Clean),
        1 => Just(Op::Reopen),
        1 => Just(Op::Kill),
        3 => (0..LOGICAL, 1u64..64).prop_map(|(l, n)| Op::Read(l, n.min(LOGICAL - l))),
    ]
}

/// The model: each allocated block's version (0: zeroed, reads as zeros).
fn verify(v: &Volume, model: &BTreeMap<u64, u64>, lba: u64, n: u64) {
    let mut buf = vec![0u8; (n as usize) * BLOCK_SIZE];
    v.read(Lba(lba), &mut buf).expect("read");
    for i in 0..n {
        let got = &buf[i as usize * BLOCK_SIZE..(i as usize + 1) * BLOCK_SIZE];
        match model.get(&(lba + i)) {
            Some(0) => assert!(
                got.iter().all(|b| *b == 0),
                "zeroed block {} should read as zeros",
                lba + i
            ),
            Some(ver) => assert!(
                got == block(lba + i, *ver).as_slice(),
                "block {} differs from version {ver}",
                lba + i
            ),
            None => assert!(
                got.iter().all(|b| *b == 0),
                "block {} should read as zeros",
                lba + i
            ),
        }
    }
}

fn run(ops: Vec<Op>, segment_blocks: u32) {
    let dev = Arc::new(MemDevice::new());
    create(&*dev, LOGICAL, segment_blocks);
    let mut v = open(dev.clone());
    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
    // Blocks written, trimmed while allocated, or zeroed while not zeroed,
    // since the changed bitmap was last reset.
    let mut changed: BTreeSet<u64> = BTreeSet::new();
    let mut version = 0u64;
    let mut dev = dev;
    for op in ops {
        match op {
            Op::Txn(pieces) => {
                let mut t = Transaction::new();
                let mut next = model.clone();
                for (what, lba, n) in pieces {
                    match what {
                        Piece::Write => {
                            let mut data = Vec::with_capacity(n as usize * BLOCK_SIZE);
                            for i in 0..n {
                                version += 1;
                                data.extend_from_slice(&block(lba + i, version));
                                next.insert(lba + i, version);
                                changed.insert(lba + i);
                            }
                            t.write(Lba(lba), data);
                        }
                        Piece::Trim => {
                            t.trim(Lba(lba), n);
                            for i in 0..n {
                                if next.remove(&(lba + i)).is_some() {
                                    changed.insert(lba + i);
                                }
                            }
                        }
                        Piece::Zero => {
                            t.zero(Lba(lba), n);
                            for i in 0..n {
                                if next.insert(lba + i, 0) != Some(0) {
                                    changed.insert(lba + i);
                                }
                            }
                        }
                    }
                }
                v.commit(t).expect("commit");
                model = next;
            }
            Op::Flush => v.flush().expect("flush"),
            Op::ResetChanged => {
                v.reset_changed().expect("reset the changed bitmap");
                changed.clear();
            }
            Op::Checkpoint => v.checkpoint().expect("checkpoint"),
            Op::Clean => {
                v.clean(4).expect("clean");
            }
            Op::Reopen => {
                v.close().expect("close");
                v = open(dev.clone());
            }
            Op::Kill => {
                let image = dev.image();
                v.abandon();
                dev = Arc::new(MemDevice::from_image(image));
                v = open(dev.clone() as Arc<dyn Device>);
            }
            Op::Read(lba, n) => verify(&v, &model, lba, n),
        }
    }
    verify(&v, &model, 0, LOGICAL);
    let report = v.check().expect("check");
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(v.stats().unwrap().allocated_blocks, model.len() as u64);
    // The allocated bitmap agrees with the model.
    let mut from_bitmap = Vec::new();
    for (s, n) in v.allocated_runs().unwrap() {
        from_bitmap.extend(s..s + n);
    }
    assert_eq!(from_bitmap, model.keys().copied().collect::<Vec<_>>());
    // So does the changed bitmap.
    let mut from_changed = Vec::new();
    for (s, n) in v.changed_runs().unwrap() {
        from_changed.extend(s..s + n);
    }
    assert_eq!(from_changed, changed.iter().copied().collect::<Vec<_>>());
    v.close().expect("close");
    let v = open(dev);
    verify(&v, &model, 0, LOGICAL);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn matches_model_small_segments(ops in prop::collection::vec(op(), 1..120)) {
        run(ops, 16);
    }

    #[test]
    fn matches_model_default_geometry(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, 64);
    }
}

/// A long deterministic run that keeps the volume near full so the cleaner
/// and checkpoints run constantly.
#[test]
fn long_random_run_near_full() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut ops = Vec::new();
    for _ in 0..1500 {
        ops.push(match rng.below(40) {
            0 => Op::Reopen,
            1 => Op::Kill,
            2..=4 => Op::Flush,
            5 => Op::Clean,
            6..=8 => {
                let l = rng.below(LOGICAL);
                Op::Read(l, (rng.below(32) + 1).min(LOGICAL - l))
            }
            _ => {
                let l = rng.below(LOGICAL);
                let n = (rng.below(24) + 1).min(LOGICAL - l);
                let what = match rng.below(16) {
                    0 | 1 => Piece::Trim,
                    2 => Piece::Zero,
                    _ => Piece::Write,
                };
                Op::Txn(vec![(what, l, n)])
            }
        });
    }
    run(ops, 16);
}
