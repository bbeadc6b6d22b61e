//! Crash harness: power cuts at every flush boundary and at random points
//! between, with torn writes.
//!
//! A workload of transactions runs on an in-memory device that records
//! every write, discard and flush. For each crash point k the harness
//! builds what a disk could hold after a power cut just before operation k:
//! everything up to the last flush is durable; each later write is lost,
//! kept, or torn (each 512-byte sector independently old or new); each
//! later discard happens or not. The volume must then open, pass `check`,
//! hold every transaction acknowledged by a flush, and hold a prefix of the
//! transactions: the state after transaction j for some j between the
//! acknowledged ones and those issued. Nothing half-applied.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{block, create, open, Rng};
use lsvfs::device::{MemDevice, RecordedOp};
use lsvfs::volume::{Lba, Transaction, VolumeError};
use lsvfs::BLOCK_SIZE;

/// The volume's size, and the blocks the workload touches: at most half
/// full, so that any transaction (up to 120 blocks) can be admitted.
const LOGICAL: u64 = 512;
const RANGE: u64 = 256;
const SECTOR: usize = 512;
const SEGMENT_BLOCKS: usize = 16;

struct Recorded {
    base: Vec<u8>,
    ops: Vec<RecordedOp>,
    /// Op count when each transaction's commit returned.
    txn_end: Vec<usize>,
    /// The model after each transaction: `states[j]` is after j transactions.
    states: Vec<Vec<Option<u64>>>,
    /// Snapshot creates and deletes: (op counts when the call began and
    /// returned, name, `Some(j)` for a create after j transactions, None
    /// for a delete).
    snaps: Vec<(usize, usize, String, Option<usize>)>,
}

/// What runs beside the transactions.
#[derive(Clone, Copy, Default)]
struct Beside {
    snapshots: bool,
    rekey: bool,
    /// The volume's background thread, which lands checkpoints (flushes
    /// and writes their slots) while the transactions go on.
    background: bool,
}

fn record_workload(seed: u64, txns: usize, beside: Beside) -> Recorded {
    let Beside {
        snapshots,
        rekey,
        background,
    } = beside;
    let mut rng = Rng(seed);
    let dev = Arc::new(MemDevice::new());
    create(&*dev, LOGICAL, SEGMENT_BLOCKS as u32);
    let v = match background {
        true => lsvfs::volume::Volume::open(
            dev.clone(),
            &common::master(),
            lsvfs::volume::Options {
                background: true,
                // Checkpoints begun by commits every few transactions.
                checkpoint_blocks: 48,
                ..common::opts()
            },
        )
        .expect("open"),
        false => open(dev.clone()),
    };
    dev.record();
    let base = dev.image();
    let mut model: Vec<Option<u64>> = vec![None; RANGE as usize];
    let mut states = vec![model.clone()];
    let mut txn_end = Vec::new();
    let mut snaps = Vec::new();
    let mut alive: Vec<String> = Vec::new();
    let mut version = 0;
    let (mut rekeys, mut finished) = (0, 0);
    for _ in 0..txns {
        let mut t = Transaction::new();
        for _ in 0..rng.below(3) + 1 {
            let lba = rng.below(RANGE);
            // Up to 40 blocks: larger than a 16-block segment, so one
            // transaction spans several records and segments.
            let n = (rng.below(40) + 1).min(RANGE - lba);
            let kind = rng.below(6);
            if kind == 0 {
                t.trim(Lba(lba), n);
                for l in lba..lba + n {
                    model[l as usize] = None;
                }
            } else if kind == 1 && rng.below(2) == 0 {
                // Zeroed: allocated, reading as zeros (version 0).
                t.zero(Lba(lba), n);
                for l in lba..lba + n {
                    model[l as usize] = Some(0);
                }
            } else {
                let mut data = Vec::new();
                for l in lba..lba + n {
                    version += 1;
                    data.extend_from_slice(&block(l, version));
                    model[l as usize] = Some(version);
                }
                t.write(Lba(lba), data);
            }
        }
        loop {
            match v.commit(t.clone()) {
                Ok(()) => break,
                // Full because snapshots hold old data: drop the oldest.
                Err(VolumeError::NoSpace(_)) if snapshots && !alive.is_empty() => {
                    let name = alive.remove(0);
                    let start = dev.recorded_len();
                    v.snapshot_delete(&name).expect("delete snapshot");
                    snaps.push((start, dev.recorded_len(), name, None));
                }
                Err(e) => panic!("commit: {e}"),
            }
        }
        txn_end.push(dev.recorded_len());
        states.push(model.clone());
        if background && rng.below(2) == 0 {
            // Time for the background thread to land a checkpoint begun
            // by this commit, or to be part way through it at the next.
            std::thread::sleep(std::time::Duration::from_micros(rng.below(1000)));
        }
        match rng.below(10) {
            0..=2 => v.flush().expect("flush"),
            3 => v.checkpoint().expect("checkpoint"),
            4 => {
                v.clean(2).expect("clean");
            }
            5 | 6 if snapshots && alive.len() < 3 => {
                let name = format!("s{}", states.len());
                let start = dev.recorded_len();
                v.snapshot_create(&name).expect("snapshot");
                snaps.push((
                    start,
                    dev.recorded_len(),
                    name.clone(),
                    Some(states.len() - 1),
                ));
                alive.push(name);
            }
            7 | 8 if snapshots && !alive.is_empty() => {
                let name = alive.remove(rng.below(alive.len() as u64) as usize);
                let start = dev.recorded_len();
                v.snapshot_delete(&name).expect("delete snapshot");
                snaps.push((start, dev.recorded_len(), name, None));
            }
            9 if rekey && !v.rekey_status().unwrap().in_progress() => {
                let h = lsvfs::volume::read_header(&*dev).unwrap();
                let (entry, secret) =
                    lsvfs::volume::new_key_generation(&h, &common::master()).unwrap();
                v.rekey_start(entry, &secret).expect("rekey start");
                rekeys += 1;
            }
            _ => {}
        }
        if rekey {
            // The pass runs beside the transactions, a few segments at a time.
            for _ in 0..rng.below(3) {
                let running = v.rekey_status().unwrap().in_progress();
                if !v.rekey_step().expect("rekey step") {
                    finished += running as usize;
                    break;
                }
            }
        }
    }
    if rekey {
        eprintln!("rekeys started: {rekeys}, finished: {finished}");
        assert!(rekeys >= 3 && finished >= 2, "too few rekeys");
    }
    if background {
        let landed = v.stats().unwrap().landed_behind;
        eprintln!("checkpoints landed by the background thread: {landed}");
        assert!(
            landed >= 10,
            "only {landed} checkpoints landed in the background"
        );
    }
    let ops = dev.take_ops();
    v.abandon();
    Recorded {
        base,
        ops,
        txn_end,
        states,
        snaps,
    }
}

/// A segment the log wrote whole with zeros before using it.
fn is_prepared(op: &RecordedOp) -> bool {
    matches!(op, RecordedOp::Write { data, .. }
        if data.len() == SEGMENT_BLOCKS * BLOCK_SIZE && data.iter().all(|b| *b == 0))
}

fn apply(img: &mut Vec<u8>, op: &RecordedOp, rng: Option<&mut Rng>) {
    match op {
        RecordedOp::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            match rng {
                None => img[*offset as usize..end].copy_from_slice(data),
                Some(r) => match r.below(3) {
                    0 => {}
                    1 => img[*offset as usize..end].copy_from_slice(data),
                    _ => {
                        for (i, s) in data.chunks(SECTOR).enumerate() {
                            if r.below(2) == 0 {
                                let o = *offset as usize + i * SECTOR;
                                img[o..o + s.len()].copy_from_slice(s);
                            }
                        }
                    }
                },
            }
        }
        RecordedOp::Discard { offset, len } => {
            if rng.is_none_or(|r| r.below(2) == 0) {
                let end = ((offset + len) as usize).min(img.len());
                if (*offset as usize) < end {
                    img[*offset as usize..end].fill(0);
                }
            }
        }
        RecordedOp::Flush => {}
    }
}

/// Which model state the recovered volume holds, if any.
fn recovered_state(
    v: &lsvfs::volume::Volume,
    states: &[Vec<Option<u64>>],
    lo: usize,
    hi: usize,
) -> Option<usize> {
    let mut buf = vec![0u8; RANGE as usize * BLOCK_SIZE];
    v.read(Lba(0), &mut buf).expect("read after recovery");
    let allocated: BTreeSet<u64> = v
        .allocated_runs()
        .expect("allocated runs after recovery")
        .into_iter()
        .flat_map(|(s, n)| s..s + n)
        .collect();
    let mut got = Vec::with_capacity(RANGE as usize);
    for l in 0..RANGE {
        let b = &buf[l as usize * BLOCK_SIZE..(l as usize + 1) * BLOCK_SIZE];
        if b.iter().all(|x| *x == 0) {
            // Zeros: a zeroed block is allocated, an unmapped one is not.
            got.push(allocated.contains(&l).then_some(0));
        } else {
            assert!(
                allocated.contains(&l),
                "block {l} has data but is not allocated"
            );
            let ver = u64::from_le_bytes(b[8..16].try_into().unwrap());
            assert!(
                b == block(l, ver).as_slice(),
                "block {l} holds bytes no transaction wrote"
            );
            got.push(Some(ver));
        }
    }
    (lo..=hi).rev().find(|j| states[*j] == got)
}

/// Checks the snapshots a recovered volume has: each one that was durably
/// created and not durably deleted is there, nothing else is, and each
/// reads exactly as the volume did when it was taken.
fn check_snapshots(v: &lsvfs::volume::Volume, rec: &Recorded, durable_end: usize, k: usize) {
    let durable = |end: usize| {
        // Durable once the last flush inside the call is.
        rec.ops[..end]
            .iter()
            .rposition(|o| matches!(o, RecordedOp::Flush))
            .is_some_and(|f| f < durable_end)
    };
    let mut must = BTreeSet::new();
    let mut may = BTreeSet::new();
    for (start, end, name, created) in &rec.snaps {
        let began = *start < k;
        match created {
            Some(_) if durable(*end) => {
                must.insert(name.clone());
                may.insert(name.clone());
            }
            Some(_) if began => {
                may.insert(name.clone());
            }
            Some(_) => {}
            None if durable(*end) => {
                must.remove(name);
                may.remove(name);
            }
            None if began => {
                must.remove(name);
            }
            None => {}
        }
    }
    let have = v.snapshot_names().expect("snapshot list");
    let names: BTreeSet<String> = have.iter().map(|(_, n, _, _)| n.clone()).collect();
    for m in &must {
        assert!(
            names.contains(m),
            "crash point {k}: durable snapshot {m} is missing"
        );
    }
    for (id, name, _, _) in have {
        assert!(
            may.contains(&name),
            "crash point {k}: snapshot {name} should not exist"
        );
        let j = rec
            .snaps
            .iter()
            .find_map(|(_, _, n, c)| if *n == name { *c } else { None })
            .expect("created");
        let view = v.snapshot_view(id).unwrap();
        let mut buf = vec![0u8; RANGE as usize * BLOCK_SIZE];
        view.read(Lba(0), &mut buf)
            .expect("read a snapshot after recovery");
        for l in 0..RANGE {
            let b = &buf[l as usize * BLOCK_SIZE..(l as usize + 1) * BLOCK_SIZE];
            let want = match rec.states[j][l as usize] {
                Some(ver) if ver > 0 => block(l, ver),
                _ => vec![0u8; BLOCK_SIZE],
            };
            assert!(
                b == want.as_slice(),
                "crash point {k}: snapshot {name} block {l}"
            );
        }
    }
}

fn run(seed: u64, txns: usize, points: usize) -> (usize, usize, usize) {
    run_with(seed, txns, points, Beside::default())
}

fn run_with(seed: u64, txns: usize, points: usize, beside: Beside) -> (usize, usize, usize) {
    let rec = record_workload(seed, txns, beside);
    if beside.snapshots {
        let creates = rec.snaps.iter().filter(|s| s.3.is_some()).count();
        let deletes = rec.snaps.len() - creates;
        eprintln!("snapshots created: {creates}, deleted: {deletes}");
        assert!(creates >= 10 && deletes >= 5, "too few snapshot events");
    }
    let n = rec.ops.len();
    // Segments the log prepared (wrote whole with zeros) before using them:
    // the cuts below land among those writes too.
    let prepared = rec.ops.iter().filter(|op| is_prepared(op)).count();
    eprintln!("segments prepared: {prepared}");
    assert!(prepared > 0, "the workload prepared no segment");
    let flushes: Vec<usize> = (0..n)
        .filter(|i| matches!(rec.ops[*i], RecordedOp::Flush))
        .collect();
    let mut crash_points: BTreeSet<usize> = BTreeSet::new();
    for f in &flushes {
        crash_points.insert(*f);
        crash_points.insert(f + 1);
    }
    let mut rng = Rng(seed ^ 0xdead_beef);
    while crash_points.len() < points.min(n + 1) {
        crash_points.insert(rng.below(n as u64 + 1) as usize);
    }

    let mut durable = rec.base.clone();
    let mut durable_upto = 0; // ops[..durable_upto] are applied to `durable`
    let (mut checked, mut kept_unflushed, mut lost_unflushed) = (0, 0, 0);
    for &k in &crash_points {
        let last_flush = flushes.iter().rev().find(|f| **f < k).copied();
        let durable_end = last_flush.map_or(0, |f| f + 1);
        while durable_upto < durable_end {
            apply(&mut durable, &rec.ops[durable_upto], None);
            durable_upto += 1;
        }
        let mut img = durable.clone();
        for op in &rec.ops[durable_end..k] {
            apply(&mut img, op, Some(&mut rng));
        }
        let acked = rec
            .txn_end
            .iter()
            .filter(|e| **e <= durable_end.saturating_sub(1))
            .count();
        let issued = rec.txn_end.iter().filter(|e| **e <= k).count();
        let hi = (issued + 1).min(rec.txn_end.len());

        let dev = Arc::new(MemDevice::from_image(img));
        let v = open(dev.clone());
        let j = recovered_state(&v, &rec.states, acked, hi).unwrap_or_else(|| {
            panic!("crash point {k}/{n}: recovered state is not the state after any of transactions {acked}..={hi}")
        });
        if j > acked {
            kept_unflushed += 1;
        } else if issued > acked {
            lost_unflushed += 1;
        }
        let report = v.check().expect("check");
        assert!(report.is_clean(), "crash point {k}: {:?}", report.problems);
        check_snapshots(&v, &rec, durable_end, k);
        if checked % 16 == 0 {
            // The recovered volume keeps working: write, reopen, read back.
            let mut t = Transaction::new();
            t.write(Lba(3), block(3, 1 << 40));
            v.commit(t).expect("commit after recovery");
            v.close().expect("close after recovery");
            let v = open(dev);
            let mut b = vec![0u8; BLOCK_SIZE];
            v.read(Lba(3), &mut b).unwrap();
            assert_eq!(b, block(3, 1 << 40));
        }
        checked += 1;
    }
    (checked, kept_unflushed, lost_unflushed)
}

#[test]
fn power_cut_at_every_flush_and_random_points() {
    let (checked, kept, lost) = run(0x5eed_0001, 160, 1100);
    eprintln!("crash points checked: {checked} (unflushed work kept at {kept}, lost at {lost})");
    assert!(checked >= 1000, "only {checked} crash points");
    // Both outcomes must occur, or the harness is not cutting where it matters.
    assert!(kept > 0 && lost > 0, "kept {kept} lost {lost}");
}

#[test]
fn power_cut_with_snapshots_being_created_and_deleted() {
    let beside = Beside {
        snapshots: true,
        ..Beside::default()
    };
    let (checked, _, _) = run_with(0x5eed_0003, 140, 700, beside);
    assert!(checked >= 600, "only {checked} crash points");
}

/// Rekeys start and run beside the transactions, with snapshots (whose
/// held blocks are sealed again too): a power cut at any point leaves every
/// block readable, snapshots included, and the pass resumes at the open.
#[test]
fn power_cut_during_rekeys() {
    let beside = Beside {
        snapshots: true,
        rekey: true,
        ..Beside::default()
    };
    let (checked, _, _) = run_with(0x5eed_0004, 140, 700, beside);
    assert!(checked >= 600, "only {checked} crash points");
}

/// Checkpoints begun by transactions and landed by the background thread
/// while later transactions go on (their flush and slot write interleave
/// with the transactions' writes), with snapshots: every cut leaves the
/// state after some transaction, every flushed one included.
#[test]
fn power_cut_while_checkpoints_land_in_the_background() {
    let beside = Beside {
        snapshots: true,
        background: true,
        ..Beside::default()
    };
    let (checked, kept, lost) = run_with(0x5eed_0005, 160, 1000, beside);
    eprintln!("crash points checked: {checked} (unflushed work kept at {kept}, lost at {lost})");
    assert!(checked >= 900, "only {checked} crash points");
}

#[test]
fn power_cut_second_workload() {
    let (checked, _, _) = run(0x5eed_0002, 80, 300);
    assert!(checked >= 300);
}

/// The story: recovery dropped an incomplete transaction whose first record
/// (a trim-only record, one block) sat in the last block of a segment, and
/// reset the log head to that block, leaving the record there. The next
/// transaction did not fit in one block, so it went to the next segment
/// with the same sequence number and chain MAC as the dropped record. A
/// second power cut after a successful flush then let recovery follow the
/// stale record, and the flushed transaction was lost.
#[test]
fn dropped_record_left_at_the_head_does_not_hide_later_flushed_work() {
    let dev = Arc::new(MemDevice::new());
    create(&*dev, LOGICAL, SEGMENT_BLOCKS as u32);
    let v = open(dev.clone());
    let data: Vec<u8> = (0..14).flat_map(|l| block(l, 1)).collect();
    v.write(Lba(0), &data).unwrap();
    v.checkpoint().unwrap();
    // Bring the log head to the last block of its segment with one-block
    // records that change nothing (trims of unwritten blocks), so that
    // recovery has nothing to replay and the open-time checkpoint writes no
    // record that would move the head.
    let img = dev.image();
    let slot = |i: usize| {
        let b = &img[(2 + i) * BLOCK_SIZE..(3 + i) * BLOCK_SIZE];
        (
            u64::from_le_bytes(b[32..40].try_into().unwrap()),
            u32::from_le_bytes(b[56..60].try_into().unwrap()),
        )
    };
    let head_offset = slot(0).max(slot(1)).1;
    for _ in head_offset..15 {
        v.trim(Lba(250), 1).unwrap();
    }
    v.flush().unwrap();
    let before = dev.image();
    dev.record();
    // [trim, write]: a trim-only record in the last block, then the write
    // in the next segment.
    let mut t = Transaction::new();
    t.trim(Lba(0), 1).write(Lba(100), block(100, 2));
    v.commit(t).unwrap();
    let ops = dev.take_ops();
    v.abandon();
    // Power cut: only the first record's writes (summary, then body) landed
    // (and not the zeros of a segment the log prepared).
    let mut img = before;
    let mut writes = ops
        .iter()
        .filter(|o| matches!(o, RecordedOp::Write { .. }) && !is_prepared(o));
    for op in writes.by_ref().take(2) {
        apply(&mut img, op, None);
    }
    let dev = Arc::new(MemDevice::from_image(img));
    let v = open(dev.clone());
    assert_eq!(
        v.recovery().dropped_records,
        1,
        "the setup must leave one dropped record"
    );
    v.write(Lba(200), &block(200, 3)).unwrap();
    v.flush().unwrap();
    let img = dev.image();
    v.abandon();
    let v = open(Arc::new(MemDevice::from_image(img)));
    let mut b = vec![0u8; BLOCK_SIZE];
    v.read(Lba(200), &mut b).unwrap();
    assert_eq!(
        b,
        block(200, 3),
        "a flushed write was lost after the second power cut"
    );
    v.read(Lba(0), &mut b).unwrap();
    assert_eq!(
        b,
        block(0, 1),
        "the dropped transaction's trim must not apply"
    );
}
