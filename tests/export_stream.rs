//! Export streams at the volume level: a chain of exports (full, then
//! increments, one over a deleted snapshot) restores into a new volume
//! whose every snapshot reads exactly what the source's did; an increment
//! holds only what changed; and every kind of damage to a stream is
//! refused with its own error, before any of its blocks is used.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{block, master, open, Rng};
use lsvfs::crypto::{Kek, MasterKey, KEY_LEN};
use lsvfs::device::{Device, MemDevice};
use lsvfs::error::Class;
use lsvfs::export::{self, ExportError, Holders, Identity, Stream};
use lsvfs::volume::{self, CreateOptions, KeySlot, Lba, SnapshotId, Transaction, Volume};
use lsvfs::BLOCK_SIZE;
use zeroize::Zeroizing;

const BLOCKS: u64 = 2048;

fn read_all(v: &Volume) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCKS as usize * BLOCK_SIZE];
    v.read(Lba(0), &mut buf).expect("read");
    buf
}

/// A source volume with four snapshots taken between random writes,
/// zeroings and trims; "s3" is deleted afterwards, so "s4"'s changes since
/// "s2" span a merged changed bitmap. Returns the volume and every kept
/// snapshot's contents.
fn source() -> (Volume, BTreeMap<String, Vec<u8>>) {
    let dev = common::mem_volume(BLOCKS, 64);
    let v = open(dev);
    let mut rng = Rng(0x5eed);
    let mut kept = BTreeMap::new();
    let mut version = 1;
    for s in 1..=4 {
        // The first round fills half the volume; later ones change little.
        let ops = if s == 1 { 200 } else { 12 };
        for _ in 0..ops {
            let lba = rng.below(BLOCKS - 40);
            let n = 1 + rng.below(if s == 1 { 8 } else { 3 });
            let mut t = Transaction::new();
            match rng.below(10) {
                0 => {
                    t.trim(Lba(lba), n);
                }
                1 => {
                    t.zero(Lba(lba), n);
                }
                _ => {
                    let mut d = Vec::new();
                    for i in 0..n {
                        d.extend_from_slice(&block(lba + i, version));
                    }
                    version += 1;
                    t.write(Lba(lba), d);
                }
            }
            v.commit(t).unwrap();
        }
        v.snapshot_create(&format!("s{s}")).unwrap();
        kept.insert(format!("s{s}"), read_all(&v));
    }
    v.snapshot_delete("s3").unwrap();
    kept.remove("s3");
    (v, kept)
}

fn key_file() -> Kek {
    Kek::from_bytes(Zeroizing::new([0x33; KEY_LEN]))
}

fn holders() -> Holders {
    Holders {
        recipients: vec![],
        key_files: vec![key_file()],
    }
}

fn export_of(v: &Volume, name: &str, since: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    let s = export::export(
        v,
        name,
        since,
        &holders(),
        export::READERS,
        &mut out,
        &mut |_, _| Ok(()),
    )
    .unwrap();
    assert_eq!(s.bytes, out.len() as u64);
    out
}

fn new_target() -> Volume {
    let dev = Arc::new(MemDevice::new());
    let m = MasterKey::from_bytes(Zeroizing::new([0x77; KEY_LEN]));
    volume::create(
        &*dev,
        &m,
        *b"restored-volume!",
        [KeySlot::EMPTY; KEY_SLOTS],
        &CreateOptions {
            logical_blocks: BLOCKS,
            segment_blocks: 64,
        },
    )
    .unwrap();
    Volume::open(dev as Arc<dyn Device>, &m, common::opts()).unwrap()
}

fn restore(v: &Volume, bytes: &[u8], name: &str) -> Result<SnapshotId, ExportError> {
    let s = Stream::open(bytes, name)?;
    let key = s.open_key(&[], &[key_file()])?;
    export::restore_stream(v, s, &key, &mut |_| {}).map(|(id, _)| id)
}

use lsvfs::volume::KEY_SLOTS;

#[test]
fn a_chain_restores_every_snapshot_exactly_and_increments_hold_only_the_change() {
    let (src, kept) = source();
    let full = export_of(&src, "s1", None);
    let inc2 = export_of(&src, "s2", Some("s1"));
    let inc4 = export_of(&src, "s4", Some("s2"));
    // Sizes follow the change: s1 wrote ~900 blocks, later rounds ~30.
    assert!(full.len() > 300 * BLOCK_SIZE, "full {}", full.len());
    assert!(inc2.len() < 60 * BLOCK_SIZE, "increment {}", inc2.len());
    assert!(inc4.len() < 120 * BLOCK_SIZE, "increment {}", inc4.len());

    // Keyless verification, and what the headers say.
    for (b, name) in [(&full, "s1"), (&inc2, "s2"), (&inc4, "s4")] {
        let s = Stream::open(&b[..], name).unwrap();
        assert_eq!(s.header().snapshot.name, name);
        let (t, bytes) = s.verify().unwrap();
        assert_eq!(bytes, b.len() as u64);
        assert!(t.chunks >= 1);
    }
    let h4 = Stream::open(&inc4[..], "inc4").unwrap();
    let h2 = Stream::open(&inc2[..], "inc2").unwrap();
    assert_eq!(h4.header().base_link(), Some(h2.header().snapshot_link()));

    let t = new_target();
    for (b, name) in [(&full, "s1"), (&inc2, "s2"), (&inc4, "s4")] {
        restore(&t, b, name).unwrap();
        assert!(read_all(&t) == kept[name], "live after {name}");
    }
    let names = t.snapshot_names().unwrap();
    let src_names = src.snapshot_names().unwrap();
    assert_eq!(names.len(), 3);
    for ((id, n, sec, nsec), (_, sn, ssec, snsec)) in names.iter().zip(&src_names) {
        assert_eq!((n, sec, nsec), (sn, ssec, snsec), "names and times kept");
        let view = t.snapshot_view(*id).unwrap();
        assert!(read_all(&view) == kept[n], "snapshot {n}");
    }
    // Allocation (zeroed blocks included) is what the source's is.
    assert_eq!(
        t.stats().unwrap().allocated_blocks,
        src.stats().unwrap().allocated_blocks
    );
    assert!(t.check().unwrap().is_clean());
}

fn class(e: ExportError) -> Class {
    e.class()
}

#[test]
fn damaged_streams_are_refused_before_their_blocks_are_used() {
    let (src, _) = source();
    let good = export_of(&src, "s2", Some("s1"));
    let full = export_of(&src, "s1", None);
    let mut rng = Rng(7);

    // Truncated anywhere: incomplete (exit 16), never applied.
    for _ in 0..40 {
        let cut = rng.below(good.len() as u64) as usize;
        let e = Stream::open(&good[..cut], "f")
            .and_then(|s| s.verify().map(|_| ()))
            .unwrap_err();
        assert_eq!(class(e), Class::Incomplete, "cut at {cut}");
        let t = new_target();
        assert!(restore(&t, &full[..cut.min(full.len() - 1)], "f").is_err());
        assert!(
            t.snapshot_names().unwrap().is_empty(),
            "cut at {cut}: nothing taken"
        );
    }

    // A flipped bit anywhere: refused by verify (the hash) and by restore
    // (authentication), with nothing taken.
    for _ in 0..60 {
        let i = rng.below(full.len() as u64) as usize;
        let mut bad = full.clone();
        bad[i] ^= 1 << rng.below(8);
        let e = Stream::open(&bad[..], "f")
            .and_then(|s| s.verify())
            .expect_err(&format!("flip at {i} passed verify"));
        // Damaged, never taken for cut short (a length field included).
        assert!(
            matches!(class(e), Class::Corrupt | Class::NotAnExport),
            "flip at {i}"
        );
        let t = new_target();
        let r = restore(&t, &bad, "f");
        assert!(r.is_err(), "flip at {i} restored");
        assert!(t.snapshot_names().unwrap().is_empty());
    }

    // Chunks swapped (a reorder that keeps the length): authentication.
    let frames = frame_offsets(&full);
    assert!(
        frames.len() >= 3,
        "a full export of s1 spans several chunks"
    );
    let (a, b) = (frames[0], frames[1]);
    let mut swapped = full[..a.0].to_vec();
    swapped.extend_from_slice(&full[b.0..b.0 + b.1]);
    swapped.extend_from_slice(&full[a.0..a.0 + a.1]);
    swapped.extend_from_slice(&full[b.0 + b.1..]);
    assert_eq!(swapped.len(), full.len());
    let e = restore(&new_target(), &swapped, "f").unwrap_err();
    assert_eq!(class(e), Class::Corrupt);

    // A chunk dropped from the end, the trailer kept: refused.
    let last = frames[frames.len() - 1];
    let mut dropped = full[..last.0].to_vec();
    dropped.extend_from_slice(&full[last.0 + last.1..]);
    assert!(restore(&new_target(), &dropped, "f").is_err());

    // Bytes after the trailer: refused.
    let mut extended = full.clone();
    extended.push(0);
    assert!(Stream::open(&extended[..], "f").unwrap().verify().is_err());

    // Not an export at all, and a future version: exit 14.
    let e = Stream::open(&b"hello, world, this is text"[..], "f")
        .err()
        .unwrap();
    assert_eq!(class(e), Class::NotAnExport);
    // Short input: text is not an export; the start of one was cut short.
    let e = Stream::open(&b"hi\n"[..], "f").err().unwrap();
    assert_eq!(class(e), Class::NotAnExport);
    for cut in [0, 4, 8, 15] {
        let e = Stream::open(&full[..cut], "f").err().unwrap();
        assert_eq!(class(e), Class::Incomplete, "the first {cut} bytes");
    }

    // A chunk's length field enlarged past the end of the file by one
    // flipped bit, within the largest length allowed: the trailer is still
    // there, so damaged, not cut short.
    let mut enlarged = 0;
    for &(at, frame) in &frames {
        let (len, after) = (frame - 4, full.len() - at - 4);
        let Some(bit) = (0..32).find(|b| {
            let longer = len | 1 << b;
            longer > after && longer <= 1 << 20
        }) else {
            continue;
        };
        enlarged += 1;
        let mut bad = full.clone();
        bad[at + bit / 8] ^= 1 << (bit % 8);
        let e = Stream::open(&bad[..], "f")
            .and_then(|s| s.verify())
            .unwrap_err();
        assert!(
            e.to_string().contains("length field is damaged"),
            "chunk at {at}: {e}"
        );
        assert_eq!(class(e), Class::Corrupt, "chunk at {at}");
    }
    assert!(
        enlarged > 0,
        "no chunk's length could be enlarged past the end"
    );

    let mut future = full.clone();
    future[8] = 9;
    assert_eq!(
        class(Stream::open(&future[..], "f").err().unwrap()),
        Class::NotAnExport
    );

    // A wrong key: exit 5, naming who can open it.
    let s = Stream::open(&full[..], "full.lsx").unwrap();
    let wrong = Kek::from_bytes(Zeroizing::new([0x44; KEY_LEN]));
    let e = s.open_key(&[], &[wrong]).unwrap_err();
    let msg = e.to_string();
    assert_eq!(class(e), Class::WrongKey);
    assert!(
        msg.contains("full.lsx") && msg.contains("key file"),
        "{msg}"
    );
}

/// (offset, length) of every chunk frame, length prefix included.
fn frame_offsets(b: &[u8]) -> Vec<(usize, usize)> {
    let mut at = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    loop {
        let len = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        if len == u32::MAX {
            return out;
        }
        out.push((at, 4 + len as usize));
        at += 4 + len as usize;
    }
}

#[test]
fn a_recipient_opens_an_export_with_its_identity_alone() {
    let dir = tempfile::tempdir().unwrap();
    let id = Identity::generate(&dir.path().join("id")).unwrap();
    let (src, kept) = source();
    let mut out = Vec::new();
    let h = Holders {
        recipients: vec![id.public()],
        key_files: vec![],
    };
    export::export(
        &src,
        "s1",
        None,
        &h,
        export::READERS,
        &mut out,
        &mut |_, _| Ok(()),
    )
    .unwrap();
    let s = Stream::open(&out[..], "f").unwrap();
    // The key file opens nothing here; the identity does.
    assert!(s.open_key(&[], &[key_file()]).is_err());
    let key = s.open_key(std::slice::from_ref(&id), &[]).unwrap();
    let t = new_target();
    export::restore_stream(&t, s, &key, &mut |_| {}).unwrap();
    assert!(read_all(&t) == kept["s1"]);
    // The export never holds the volume's master key, in any form a
    // scan could find.
    let m = master();
    assert!(!out.windows(KEY_LEN).any(|w| w == m.expose()));
    // With no recipient and no key file, the volume slot alone: it opens
    // with the source volume's keys, and nothing else opens it.
    let mut only = Vec::new();
    export::export(
        &src,
        "s1",
        None,
        &Holders::default(),
        1,
        &mut only,
        &mut |_, _| Ok(()),
    )
    .unwrap();
    let s = Stream::open(&only[..], "f").unwrap();
    assert_eq!(s.header().slots.len(), 1);
    assert!(s
        .open_key(std::slice::from_ref(&id), &[key_file()])
        .is_err());
    let h = s.header().clone();
    let other = lsvfs::crypto::VolumeKeys::derive(
        &MasterKey::from_bytes(Zeroizing::new([0x77; KEY_LEN])),
        &h.volume_id,
    );
    assert!(export::open_key(&h, "f", &[], &[], Some(&other)).is_err());
    let ours = lsvfs::crypto::VolumeKeys::derive(&master(), &h.volume_id);
    let key = export::open_key(&h, "f", &[], &[], Some(&ours)).unwrap();
    let t = new_target();
    export::restore_stream(&t, s, &key, &mut |_| {}).unwrap();
    assert!(read_all(&t) == kept["s1"]);
}
