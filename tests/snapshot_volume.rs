//! Volume-level snapshots against a model: every snapshot keeps reading
//! exactly what the volume held when it was taken, through overwrites,
//! trims, the cleaner, deletions of other snapshots, clean closes and
//! crashes; space comes back when snapshots go.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{block, create, open, Rng};
use lsvfs::device::{MemDevice, RecordedOp};
use lsvfs::volume::{Lba, SnapshotId, Transaction, Volume, VolumeError};
use lsvfs::BLOCK_SIZE;

type Model = Vec<Option<u64>>;

fn read_all(v: &Volume, n: u64) -> Vec<u8> {
    let mut buf = vec![0u8; n as usize * BLOCK_SIZE];
    v.read(Lba(0), &mut buf).expect("read");
    buf
}

fn expect(model: &Model) -> Vec<u8> {
    let mut out = Vec::with_capacity(model.len() * BLOCK_SIZE);
    for (lba, m) in model.iter().enumerate() {
        match m {
            // Version 0: a zeroed block.
            Some(ver) if *ver > 0 => out.extend_from_slice(&block(lba as u64, *ver)),
            _ => out.extend_from_slice(&[0u8; BLOCK_SIZE]),
        }
    }
    out
}

fn verify(v: &Volume, live: &Model, snaps: &BTreeMap<String, (SnapshotId, Model)>, when: &str) {
    let n = live.len() as u64;
    assert!(
        read_all(v, n) == expect(live),
        "{when}: live volume differs"
    );
    for (name, (id, model)) in snaps {
        let view = v.snapshot_view(*id).expect("view");
        let got = read_all(&view, n);
        if got != expect(model) {
            let bad: Vec<usize> = (0..model.len())
                .filter(|&i| {
                    got[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]
                        != expect(model)[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]
                })
                .take(8)
                .collect();
            panic!("{when}: snapshot {name} differs at blocks {bad:?}");
        }
    }
    let r = v.check().expect("check");
    assert!(r.is_clean(), "{when}: check: {:?}", r.problems);
    let allocated = live.iter().filter(|m| m.is_some()).count() as u64;
    assert_eq!(
        v.stats().unwrap().allocated_blocks,
        allocated,
        "{when}: allocated blocks (zeroed ones included)"
    );
    let names: Vec<String> = v
        .snapshot_names()
        .unwrap()
        .into_iter()
        .map(|(_, n, _, _)| n)
        .collect();
    let want: Vec<String> = {
        let mut w: Vec<(SnapshotId, String)> =
            snaps.iter().map(|(n, (id, _))| (*id, n.clone())).collect();
        w.sort();
        w.into_iter().map(|(_, n)| n).collect()
    };
    assert_eq!(names, want, "{when}: snapshot list");
}

/// Commits; when the volume is full, deletes the oldest snapshot (as a
/// user would) and tries again. Full with no snapshot left is a failure:
/// the live data alone always fits.
fn commit_or_make_room(
    v: &Volume,
    t: Transaction,
    snaps: &mut BTreeMap<String, (SnapshotId, Model)>,
) {
    let mut t = Some(t);
    loop {
        let txn = t.take().unwrap();
        let copy = txn.clone();
        match v.commit(txn) {
            Ok(()) => return,
            Err(VolumeError::NoSpace(why)) => {
                let oldest = snaps
                    .iter()
                    .min_by_key(|(_, (id, _))| *id)
                    .map(|(n, _)| n.clone())
                    .unwrap_or_else(|| panic!("full without snapshots: {why}"));
                v.snapshot_delete(&oldest).unwrap();
                snaps.remove(&oldest);
                t = Some(copy);
            }
            Err(e) => panic!("commit: {e}"),
        }
    }
}

/// One rekey step; when the volume is too full to move a segment, deletes
/// the oldest snapshot (as a user would) and tries again.
fn rekey_step_or_make_room(v: &Volume, snaps: &mut BTreeMap<String, (SnapshotId, Model)>) -> bool {
    loop {
        match v.rekey_step() {
            Ok(more) => return more,
            Err(VolumeError::NoSpace(why)) => {
                let oldest = snaps
                    .iter()
                    .min_by_key(|(_, (id, _))| *id)
                    .map(|(n, _)| n.clone())
                    .unwrap_or_else(|| panic!("rekey: full without snapshots: {why}"));
                v.snapshot_delete(&oldest).unwrap();
                snaps.remove(&oldest);
            }
            Err(e) => panic!("rekey step: {e}"),
        }
    }
}

/// Random writes and trims, snapshots taken and deleted at random, the
/// cleaner forced often (16-block segments), reopened after clean closes
/// and after crashes (abandon: no checkpoint, the log is replayed).
fn model_run(seed: u64, steps: usize) {
    const RANGE: u64 = 192;
    let mut rng = Rng(seed);
    let dev = Arc::new(MemDevice::new());
    create(&*dev, 512, 16);
    let mut v = open(dev.clone());
    let mut live: Model = vec![None; RANGE as usize];
    let mut snaps: BTreeMap<String, (SnapshotId, Model)> = BTreeMap::new();
    let mut version = 0u64;
    let mut next_name = 0;
    let mut rekeys = 0;
    for step in 0..steps {
        match rng.below(24) {
            0..=11 => {
                let mut t = Transaction::new();
                for _ in 0..rng.below(3) + 1 {
                    let lba = rng.below(RANGE);
                    let n = (rng.below(12) + 1).min(RANGE - lba);
                    let kind = rng.below(10);
                    if kind < 2 {
                        t.trim(Lba(lba), n);
                        for l in lba..lba + n {
                            live[l as usize] = None;
                        }
                    } else if kind == 2 {
                        // Zeroed: allocated, reading as zeros, stored nowhere.
                        t.zero(Lba(lba), n);
                        for l in lba..lba + n {
                            live[l as usize] = Some(0);
                        }
                    } else {
                        version += 1;
                        let mut data = Vec::new();
                        for l in lba..lba + n {
                            data.extend_from_slice(&block(l, version));
                            live[l as usize] = Some(version);
                        }
                        t.write(Lba(lba), data);
                    }
                }
                commit_or_make_room(&v, t, &mut snaps);
            }
            12..=13 if snaps.len() < 8 => {
                next_name += 1;
                let name = format!("s{next_name}");
                let id = v.snapshot_create(&name).expect("snapshot");
                snaps.insert(name, (id, live.clone()));
            }
            14 => {
                if !snaps.is_empty() {
                    let k = rng.below(snaps.len() as u64) as usize;
                    let name = snaps.keys().nth(k).unwrap().clone();
                    v.snapshot_delete(&name).expect("delete");
                    snaps.remove(&name);
                }
            }
            15..=16 => {
                v.clean(4).expect("clean");
            }
            17 => {
                v.close().expect("close");
                v = open(dev.clone());
            }
            18 => {
                // A crash: committed transactions are in the log (MemDevice
                // keeps every write), the checkpoint is older.
                v.flush().unwrap();
                v.abandon();
                v = open(dev.clone());
            }
            19 => {
                v.checkpoint().expect("checkpoint");
            }
            20 => {
                // A new key generation, while the last rekey may still run.
                if !v.rekey_status().unwrap().in_progress() {
                    let h = lsvfs::volume::read_header(&*dev).unwrap();
                    let (entry, secret) =
                        lsvfs::volume::new_key_generation(&h, &common::master()).unwrap();
                    v.rekey_start(entry, &secret).expect("rekey start");
                    rekeys += 1;
                }
            }
            _ => {
                for _ in 0..rng.below(4) + 1 {
                    if !rekey_step_or_make_room(&v, &mut snaps) {
                        break;
                    }
                }
            }
        }
        verify(&v, &live, &snaps, &format!("seed {seed} step {step}"));
    }
    // The last rekey finishes: every block, held ones too, is sealed under
    // the newest key generation, and the older ones are gone.
    while rekey_step_or_make_room(&v, &mut snaps) {}
    let st = v.rekey_status().unwrap();
    assert!(rekeys > 0, "seed {seed}: the run started no rekey");
    assert_eq!(st.generations, vec![st.current], "seed {seed}: {st:?}");
    assert_eq!(st.retired_below, st.current, "seed {seed}: {st:?}");
    let h = lsvfs::volume::read_header(&*dev).unwrap();
    assert!(
        h.key_gens.iter().all(|g| g.key_gen == st.current),
        "seed {seed}: an older generation's secret is still in the header"
    );
    verify(&v, &live, &snaps, &format!("seed {seed} after the rekey"));
    // Deleting every snapshot returns the volume to holding only live data.
    let names: Vec<String> = snaps.keys().cloned().collect();
    for n in names {
        v.snapshot_delete(&n).unwrap();
        snaps.remove(&n);
        verify(&v, &live, &snaps, "final deletes");
    }
    let st = v.stats().unwrap();
    assert_eq!(st.held_blocks, 0, "nothing held without snapshots");
    let allocated = live.iter().filter(|m| m.is_some()).count() as u64;
    assert_eq!(
        st.allocated_blocks, allocated,
        "zeroed blocks are allocated"
    );
    v.close().unwrap();
    let v = open(dev);
    verify(&v, &live, &snaps, "reopened at the end");
}

#[test]
fn snapshots_match_the_model_through_cleaning_and_crashes() {
    for seed in 1..=4 {
        model_run(seed * 7919, 220);
    }
}

#[test]
fn snapshot_names_are_checked_and_unique() {
    let dev = Arc::new(MemDevice::new());
    create(&*dev, 256, 16);
    let v = open(dev.clone());
    v.snapshot_create("a").unwrap();
    assert!(v.snapshot_create("a").is_err(), "a second snapshot named a");
    for bad in ["", ".", "..", "a/b", "x\0y"] {
        assert!(v.snapshot_create(bad).is_err(), "name {bad:?} accepted");
    }
    assert!(v.snapshot_create(&"n".repeat(256)).is_err());
    v.snapshot_create(&"n".repeat(255)).unwrap();
    assert!(v.snapshot_delete("nope").is_err());
    let view = v.snapshot_view(SnapshotId(1)).unwrap();
    assert!(
        view.write(Lba(0), &block(0, 1)).is_err(),
        "a snapshot view is read-only"
    );
    v.snapshot_delete("a").unwrap();
    let mut b = vec![0u8; BLOCK_SIZE];
    assert!(
        view.read(Lba(0), &mut b).is_err(),
        "a deleted snapshot reads as gone"
    );
}

/// The changed bitmap of each snapshot names exactly the blocks written or
/// trimmed since the previous one; deleting the one between merges them.
#[test]
fn each_snapshot_records_what_changed_since_the_previous() {
    let dev = Arc::new(MemDevice::new());
    create(&*dev, 4096, 16);
    let v = open(dev.clone());
    v.write(Lba(10), &block(10, 1)).unwrap();
    v.snapshot_create("a").unwrap();
    v.write(Lba(20), &[block(20, 1), block(21, 1)].concat())
        .unwrap();
    v.snapshot_create("b").unwrap();
    v.trim(Lba(10), 1).unwrap();
    v.write(Lba(3000), &block(3000, 1)).unwrap();
    v.snapshot_create("c").unwrap();
    assert_eq!(v.snapshot_changed_runs("b").unwrap(), vec![(20, 2)]);
    assert_eq!(
        v.snapshot_changed_runs("c").unwrap(),
        vec![(10, 1), (3000, 1)]
    );
    v.snapshot_delete("b").unwrap();
    assert_eq!(
        v.snapshot_changed_runs("c").unwrap(),
        vec![(10, 1), (20, 2), (3000, 1)],
        "c now counts from a"
    );
    v.close().unwrap();
    let v = open(dev);
    assert_eq!(
        v.snapshot_changed_runs("c").unwrap(),
        vec![(10, 1), (20, 2), (3000, 1)]
    );
    assert!(v.check().unwrap().is_clean());
}

/// Space: a snapshot holds what the live volume overwrote; deleting it
/// frees exactly that; many snapshots under a rewrite workload never run
/// out of space while live plus snapshot data fits.
#[test]
fn snapshots_hold_and_free_space_and_the_cleaner_keeps_up() {
    const L: u64 = 4096; // 16 MiB
    let dev = Arc::new(MemDevice::new());
    create(&*dev, L, 64);
    let v = open(dev.clone());
    let half = L / 2;
    let mut ver = 1;
    for lba in (0..half).step_by(256) {
        let data: Vec<u8> = (lba..lba + 256).flat_map(|l| block(l, ver)).collect();
        v.write(Lba(lba), &data).unwrap();
    }
    let free0 = v.free_blocks().unwrap();
    v.snapshot_create("full").unwrap();
    // Overwrite a quarter of the volume: the snapshot holds the old copies.
    ver += 1;
    for lba in (0..L / 4).step_by(256) {
        let data: Vec<u8> = (lba..lba + 256).flat_map(|l| block(l, ver)).collect();
        v.write(Lba(lba), &data).unwrap();
    }
    let info = v.snapshot_list().unwrap();
    assert_eq!(info.len(), 1);
    assert!(
        info[0].unique_blocks >= L / 4 && info[0].unique_blocks < L / 4 + 64,
        "the snapshot alone holds the {} overwritten blocks (and a few map pages): {}",
        L / 4,
        info[0].unique_blocks
    );
    let free1 = v.free_blocks().unwrap();
    assert!(
        free1 + L / 4 <= free0 + 128,
        "held blocks are not free: {free0} -> {free1}"
    );
    v.snapshot_delete("full").unwrap();
    let free2 = v.free_blocks().unwrap();
    assert!(
        free2 + 8 >= free0 && free2 > free1 + L / 8,
        "deleting frees them: {free1} -> {free2} (before the snapshot: {free0})"
    );

    // 50 snapshots kept while rewriting a rotating window of 24 blocks
    // before each: live data (L/2) plus what the snapshots hold (50 * 24)
    // is 79% of the volume. The cleaner must keep moving held blocks to
    // make room; 200 rounds rewrite the live data more than twice.
    let mut names = std::collections::VecDeque::new();
    let window = 24;
    let mut cur: Vec<u64> = (0..half).map(|l| if l < L / 4 { 2 } else { 1 }).collect();
    let mut kept: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for round in 0..200u64 {
        ver += 1;
        let start = (round * window) % (half - window);
        for l in start..start + window {
            cur[l as usize] = ver;
        }
        let data: Vec<u8> = (start..start + window)
            .flat_map(|l| block(l, ver))
            .collect();
        v.write(Lba(start), &data)
            .unwrap_or_else(|e| panic!("round {round}: rewrite under snapshots: {e}"));
        let name = format!("r{round}");
        v.snapshot_create(&name)
            .unwrap_or_else(|e| panic!("round {round}: snapshot: {e}"));
        kept.insert(name.clone(), cur.clone());
        names.push_back(name);
        if names.len() > 50 {
            let old = names.pop_front().unwrap();
            v.snapshot_delete(&old).unwrap();
            kept.remove(&old);
        }
    }
    for (id, name, _, _) in v.snapshot_names().unwrap() {
        let view = v.snapshot_view(id).unwrap();
        let mut got = vec![0u8; half as usize * BLOCK_SIZE];
        view.read(Lba(0), &mut got).unwrap();
        for (l, want) in kept[&name].iter().enumerate() {
            assert!(
                got[l * BLOCK_SIZE..(l + 1) * BLOCK_SIZE] == block(l as u64, *want)[..],
                "snapshot {name}, block {l}"
            );
        }
    }
    assert_eq!(v.snapshot_names().unwrap().len(), 50);
    assert!(v.check().unwrap().is_clean());
    let st = v.stats().unwrap();
    assert!(
        st.extent_segments <= st.max_segments,
        "the backing store stays within its bound"
    );
}

/// Creating a snapshot costs a checkpoint, not a copy: the blocks written
/// to the device do not grow with the data held.
#[test]
fn creation_writes_do_not_grow_with_the_volume() {
    let mut written = Vec::new();
    for blocks in [2048u64, 16384] {
        let dev = Arc::new(MemDevice::new());
        create(&*dev, blocks * 2, 256);
        let v = open(dev.clone());
        for lba in (0..blocks).step_by(1024) {
            let data: Vec<u8> = (lba..lba + 1024).flat_map(|l| block(l, 1)).collect();
            v.write(Lba(lba), &data).unwrap();
        }
        v.checkpoint().unwrap();
        dev.record();
        v.snapshot_create("s").unwrap();
        let bytes: usize = dev
            .take_ops()
            .iter()
            .map(|op| match op {
                RecordedOp::Write { data, .. } => data.len(),
                _ => 0,
            })
            .sum();
        written.push(bytes / BLOCK_SIZE);
    }
    assert!(
        written[1] <= written[0] + 4,
        "snapshot creation writes grew with the data: {written:?}"
    );
}

/// A held block that was tampered with reads as an integrity error through
/// the snapshot, and `check` names the snapshot.
#[test]
fn a_tampered_held_block_is_an_integrity_error_not_data() {
    let dev = Arc::new(MemDevice::new());
    create(&*dev, 1024, 16);
    let v = open(dev.clone());
    v.write(Lba(5), &block(5, 1)).unwrap();
    let old = v.locate(Lba(5)).unwrap().unwrap();
    let id = v.snapshot_create("t").unwrap();
    v.write(Lba(5), &block(5, 2)).unwrap();
    v.close().unwrap();
    let mut img = dev.image();
    img[old as usize * BLOCK_SIZE + 100] ^= 1;
    let dev = Arc::new(MemDevice::from_image(img));
    let v = open(dev);
    let mut b = vec![0u8; BLOCK_SIZE];
    v.read(Lba(5), &mut b).unwrap();
    assert_eq!(b, block(5, 2), "the live block is intact");
    let view = v.snapshot_view(id).unwrap();
    match view.read(Lba(5), &mut b) {
        Err(VolumeError::Integrity(what)) => assert!(what.contains("logical block 5"), "{what}"),
        other => panic!("want an integrity error, got {other:?}"),
    }
    let r = v.check().unwrap();
    assert!(
        r.problems
            .iter()
            .any(|p| p.contains("snapshot t") && p.contains("block 5")),
        "{:?}",
        r.problems
    );
}

/// Snapshots taken while other threads commit: a transaction that took
/// its generations before a snapshot is applied before it, so nothing it
/// wrote is held for a snapshot that does not have it (no leak), and every
/// snapshot is a transaction boundary of each writer.
#[test]
fn snapshots_taken_during_concurrent_commits_are_consistent_and_leak_nothing() {
    let dev = Arc::new(MemDevice::new());
    create(&*dev, 4096, 64);
    let v = Arc::new(open(dev.clone()));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let v = v.clone();
            std::thread::spawn(move || {
                // Writer w owns blocks w*100 .. w*100+8; each transaction
                // writes all 8 with the same version.
                for ver in 1..=300u64 {
                    let data: Vec<u8> = (0..8).flat_map(|i| block(w * 100 + i, ver)).collect();
                    v.write(Lba(w * 100), &data).unwrap();
                }
            })
        })
        .collect();
    let mut names = Vec::new();
    for n in 0..30 {
        let name = format!("c{n}");
        v.snapshot_create(&name).unwrap();
        names.push(name);
        std::thread::yield_now();
    }
    for w in writers {
        w.join().unwrap();
    }
    for (id, name, _, _) in v.snapshot_names().unwrap() {
        let view = v.snapshot_view(id).unwrap();
        for w in 0..2u64 {
            let mut b = vec![0u8; 8 * BLOCK_SIZE];
            view.read(Lba(w * 100), &mut b).unwrap();
            let ver = u64::from_le_bytes(b[8..16].try_into().unwrap());
            for i in 0..8 {
                let got = &b[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
                let want = if ver == 0 {
                    vec![0u8; BLOCK_SIZE]
                } else {
                    block(w * 100 + i as u64, ver)
                };
                assert!(
                    got == want.as_slice(),
                    "snapshot {name}: writer {w} torn at block {i}"
                );
            }
        }
    }
    let r = v.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    for n in names {
        v.snapshot_delete(&n).unwrap();
    }
    assert_eq!(
        v.stats().unwrap().held_blocks,
        0,
        "nothing held, nothing leaked"
    );
    assert!(v.check().unwrap().is_clean());
}

/// A base snapshot kept while a temporary one is taken and deleted again
/// and again: the changed-bitmap lists stay bounded (merged), still cover
/// everything written since the base, and ids are never reused, even after
/// every snapshot is gone and the volume reopened.
#[test]
fn changed_lists_stay_bounded_and_ids_are_never_reused() {
    let dev = Arc::new(MemDevice::new());
    create(&*dev, 100_000, 64);
    let v = open(dev.clone());
    v.snapshot_create("base").unwrap();
    let mut written = Vec::new();
    for round in 0..40u64 {
        let lba = round * 2000 + 7;
        v.write(Lba(lba), &block(lba, round)).unwrap();
        written.push((lba, 1));
        v.snapshot_create("tmp").unwrap();
        v.snapshot_delete("tmp").unwrap();
    }
    let id = v.snapshot_create("final").unwrap();
    assert_eq!(v.snapshot_changed_runs("final").unwrap(), written);
    assert!(v.check().unwrap().is_clean());
    v.close().unwrap();
    let v = open(dev.clone());
    assert_eq!(v.snapshot_changed_runs("final").unwrap(), written);
    v.snapshot_delete("base").unwrap();
    v.snapshot_delete("final").unwrap();
    assert_eq!(v.stats().unwrap().held_blocks, 0);
    v.close().unwrap();
    let v = open(dev);
    let again = v.snapshot_create("again").unwrap();
    assert!(again > id, "id {again} reused (the last was {id})");
    assert!(v.check().unwrap().is_clean());
}

/// A zeroed block is allocated and reads as zeros, but is stored nowhere:
/// zeroing written blocks gives their log space back (or, under a snapshot,
/// leaves it to the snapshot, which still reads the old data), and writing
/// a zeroed block again stores it normally.
#[test]
fn zeroed_blocks_are_allocated_read_as_zeros_and_take_no_log_space() {
    const N: u64 = 256;
    let dev = Arc::new(MemDevice::new());
    create(&*dev, 65536, 64);
    let v = open(dev.clone());
    let mut data = Vec::new();
    for l in 0..N {
        data.extend_from_slice(&block(l, 1));
    }
    v.write(Lba(0), &data).unwrap();
    let written = v.stats().unwrap();
    let id = v.snapshot_create("before").unwrap();
    v.zero(Lba(0), N).unwrap();
    let st = v.stats().unwrap();
    assert_eq!(st.allocated_blocks, written.allocated_blocks);
    assert!(
        st.held_blocks >= N,
        "the snapshot holds the old data (and the map pages it shares): {}",
        st.held_blocks
    );
    assert!(read_all(&v, N).iter().all(|b| *b == 0));
    assert_eq!(v.locate(Lba(7)).unwrap(), None, "stored nowhere");
    assert_eq!(v.key_generation_bit(Lba(7)).unwrap(), None);
    assert!(read_all(&v.snapshot_view(id).unwrap(), N) == data);
    v.snapshot_delete("before").unwrap();
    let st = v.stats().unwrap();
    assert_eq!(st.held_blocks, 0);
    assert!(
        st.live_blocks + N <= written.live_blocks + 8,
        "zeroing gave the log space back: {} live blocks after, {} before",
        st.live_blocks,
        written.live_blocks
    );
    let r = v.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    assert_eq!((r.data_blocks, r.zeroed_blocks), (0, N));
    // Snapshot a zeroed block, then write it: the snapshot reads zeros.
    let id = v.snapshot_create("zeros").unwrap();
    v.write(Lba(3), &block(3, 2)).unwrap();
    let mut b = vec![0u8; BLOCK_SIZE];
    v.snapshot_view(id).unwrap().read(Lba(3), &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0));
    v.read(Lba(3), &mut b).unwrap();
    assert_eq!(b, block(3, 2));
    v.snapshot_delete("zeros").unwrap();
    // Survives a crash (the log replayed) and a clean reopen.
    v.zero(Lba(100), 10).unwrap();
    v.flush().unwrap();
    v.abandon();
    let v = open(dev.clone());
    let r = v.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    assert_eq!((r.data_blocks, r.zeroed_blocks), (1, N - 1));
    assert_eq!(v.stats().unwrap().allocated_blocks, N);
    v.read(Lba(3), &mut b).unwrap();
    assert_eq!(b, block(3, 2));
    // Zeroing more than one transaction may hold is refused as such.
    let mut t = Transaction::new();
    t.zero(Lba(0), 4000);
    t.zero(Lba(0), 30000);
    assert!(matches!(v.commit(t), Err(VolumeError::InvalidArgument(_))));
    v.close().unwrap();
}
