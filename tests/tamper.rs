//! Tampering and bad input: every change to the backing store reads as an
//! error (EIO for data), never as wrong data, and bad volumes never panic.

mod common;

use std::sync::Arc;

use common::{block, create, master, mem_volume, open, opts, VOLUME_ID};
use lsvfs::crypto::{Kek, MasterKey, KEY_LEN};
use lsvfs::device::{Device, MemDevice};
use lsvfs::keys::KeysError;
use lsvfs::volume::VolumeError;
use lsvfs::volume::{self, CreateOptions, KeySlot, Lba, Volume, KEY_SLOTS};
use lsvfs::{keys, BLOCK_SIZE};
use zeroize::Zeroizing;

const B: u64 = BLOCK_SIZE as u64;

/// A volume with blocks 0..32 written (version 1) and closed cleanly.
fn written() -> Arc<MemDevice> {
    let dev = mem_volume(1024, 64);
    let v = open(dev.clone());
    let mut data = Vec::new();
    for l in 0..32 {
        data.extend_from_slice(&block(l, 1));
    }
    v.write(Lba(0), &data).unwrap();
    v.close().unwrap();
    dev
}

fn locate(dev: &Arc<MemDevice>, lba: u64) -> u64 {
    let v = open(dev.clone());
    let p = v.locate(Lba(lba)).unwrap().expect("mapped");
    v.close().unwrap();
    p
}

fn read_block(v: &Volume, lba: u64) -> Result<Vec<u8>, VolumeError> {
    let mut b = vec![0u8; BLOCK_SIZE];
    v.read(Lba(lba), &mut b).map(|_| b)
}

fn patch(dev: &MemDevice, offset: u64, bytes: &[u8]) {
    dev.write_at(bytes, offset).unwrap();
}

fn peek(dev: &MemDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    dev.read_at(&mut b, offset).unwrap();
    b
}

#[test]
fn flipped_bit_reads_as_integrity_error() {
    let dev = written();
    let pba = locate(&dev, 7);
    let mut b = peek(&dev, pba * B + 1000, 1);
    b[0] ^= 0x10;
    patch(&dev, pba * B + 1000, &b);
    let v = open(dev.clone());
    let e = read_block(&v, 7).unwrap_err();
    assert!(matches!(e, VolumeError::Integrity(_)), "{e}");
    assert_eq!(e.errno(), libc::EIO);
    assert!(e.to_string().contains("logical block 7"), "{e}");
    // Neighbours still read, alone and in a multi-block read that includes 7.
    assert_eq!(read_block(&v, 6).unwrap(), block(6, 1));
    let mut many = vec![0u8; 16 * BLOCK_SIZE];
    assert!(v.read(Lba(0), &mut many).is_err());
    assert!(!v.check().unwrap().is_clean());
}

#[test]
fn swapped_blocks_read_as_integrity_errors() {
    let dev = written();
    let (a, b) = (locate(&dev, 3), locate(&dev, 20));
    let (ba, bb) = (peek(&dev, a * B, BLOCK_SIZE), peek(&dev, b * B, BLOCK_SIZE));
    patch(&dev, a * B, &bb);
    patch(&dev, b * B, &ba);
    let v = open(dev);
    assert!(matches!(read_block(&v, 3), Err(VolumeError::Integrity(_))));
    assert!(matches!(read_block(&v, 20), Err(VolumeError::Integrity(_))));
    assert_eq!(read_block(&v, 4).unwrap(), block(4, 1));
}

#[test]
fn older_copy_of_a_block_reads_as_integrity_error() {
    let dev = written();
    let old_at = locate(&dev, 9);
    let old = peek(&dev, old_at * B, BLOCK_SIZE);
    let v = open(dev.clone());
    v.write(Lba(9), &block(9, 2)).unwrap();
    v.close().unwrap();
    let new_at = locate(&dev, 9);
    assert_ne!(old_at, new_at);
    patch(&dev, new_at * B, &old);
    let v = open(dev);
    assert!(matches!(read_block(&v, 9), Err(VolumeError::Integrity(_))));
}

#[test]
fn older_copy_of_a_map_page_is_detected() {
    // Overwrite block 5; the checkpoint then writes a new map leaf (and
    // bitmap and usage pages) into fresh blocks. Replace each freshly
    // written block with each block of the old image (the old map leaf
    // among them): no combination may return wrong data, and some must be
    // caught (those that swapped in an old map page).
    let dev = written();
    let before = dev.image();
    let v = open(dev.clone());
    v.write(Lba(5), &block(5, 2)).unwrap();
    v.close().unwrap();
    let after = dev.image();
    let data_at = locate(&dev, 5) as usize;
    let start = volume::format::DATA_START as usize;
    let blk = |img: &[u8], i: usize| img[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].to_vec();
    let nonzero = |img: &[u8], i: usize| {
        img.len() >= (i + 1) * BLOCK_SIZE && blk(img, i).iter().any(|b| *b != 0)
    };
    let fresh: Vec<usize> = (start..after.len() / BLOCK_SIZE)
        .filter(|i| *i != data_at && nonzero(&after, *i) && !nonzero(&before, *i))
        .collect();
    let old: Vec<usize> = (start..before.len() / BLOCK_SIZE)
        .filter(|i| nonzero(&before, *i))
        .collect();
    assert!(!fresh.is_empty() && !old.is_empty());
    let mut caught = 0;
    for &x in &fresh {
        for &y in &old {
            let d = Arc::new(MemDevice::from_image(after.clone()));
            d.write_at(&blk(&before, y), (x * BLOCK_SIZE) as u64)
                .unwrap();
            let res = Volume::open(d, &master(), opts()).and_then(|v| {
                let mut b = vec![0u8; 6 * BLOCK_SIZE];
                v.read(Lba(0), &mut b)?;
                Ok(b)
            });
            match res {
                Ok(b) => {
                    let mut want = Vec::new();
                    for l in 0..6 {
                        want.extend_from_slice(&block(l, if l == 5 { 2 } else { 1 }));
                    }
                    assert!(b == want, "old block {y} placed at {x} returned wrong data");
                }
                Err(e) => {
                    assert!(
                        matches!(e, VolumeError::Integrity(_) | VolumeError::Corrupted(_)),
                        "{e:?}"
                    );
                    caught += 1;
                }
            }
        }
    }
    eprintln!(
        "stale-page trials: {} fresh x {} old, {caught} caught",
        fresh.len(),
        old.len()
    );
    assert!(caught > 0, "no stale metadata page was detected");
}

#[test]
fn truncated_backing_store_gives_clear_errors() {
    let full = written().image();
    for len in [
        0,
        100,
        BLOCK_SIZE,
        2 * BLOCK_SIZE + 7,
        4 * BLOCK_SIZE,
        300 * BLOCK_SIZE,
        full.len() - BLOCK_SIZE,
    ] {
        let d = Arc::new(MemDevice::from_image(full[..len].to_vec()));
        match Volume::open(d, &master(), opts()) {
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.is_empty());
                assert!(
                    matches!(
                        e,
                        VolumeError::NotAVolume(_)
                            | VolumeError::Corrupted(_)
                            | VolumeError::Integrity(_)
                    ),
                    "len {len}: {e:?}"
                );
            }
            Ok(v) => {
                // Whatever opens must not return wrong data.
                for l in 0..32 {
                    if let Ok(b) = read_block(&v, l) {
                        assert_eq!(b, block(l, 1), "len {len} block {l}");
                    }
                }
            }
        }
    }
}

#[test]
fn garbage_and_foreign_files_are_not_volumes() {
    let mut junk = vec![0u8; 1 << 20];
    let mut x = 99u64;
    for b in junk.iter_mut() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        *b = (x >> 33) as u8;
    }
    for img in [junk, vec![0u8; 1 << 20], b"#!/bin/sh\necho hi\n".to_vec()] {
        let d = MemDevice::from_image(img);
        let e = volume::read_header(&d).unwrap_err();
        assert!(matches!(e, VolumeError::NotAVolume(_)), "{e:?}");
    }
}

#[test]
fn damaged_header_copies() {
    let dev = written();
    // One damaged copy: the other is used.
    patch(&dev, 100, &[0xff]);
    let v = open(dev.clone());
    assert_eq!(read_block(&v, 1).unwrap(), block(1, 1));
    v.close().unwrap();
    // Both damaged: a clear corruption error, not "not a volume".
    patch(&dev, B + 100, &[0xff]);
    let e = volume::read_header(&*dev).unwrap_err();
    assert!(matches!(e, VolumeError::Corrupted(_)), "{e:?}");
    assert!(e.to_string().contains("both header copies"), "{e}");
}

#[test]
fn future_format_version_is_refused_by_name() {
    let dev = written();
    let mut h = volume::read_header(&*dev).unwrap().encode();
    h[8] = 3; // version field; the checksum no longer matters: version is checked first
    patch(&dev, 0, &h[..]);
    patch(&dev, B, &h[..]);
    let e = volume::read_header(&*dev).unwrap_err();
    assert!(
        matches!(e, VolumeError::UnsupportedVersion { want: 2, have: 3 }),
        "{e:?}"
    );
    assert!(e.to_string().contains("want=2 have=3"));
}

#[test]
fn damaged_checkpoint_slot_falls_back_or_fails_clearly() {
    let dev = written();
    let img = dev.image();
    for slot in [2u64, 3] {
        let d = Arc::new(MemDevice::from_image(img.clone()));
        d.write_at(&[0xee; 64], slot * B + 200).unwrap();
        // The other slot is older; opening must either work with correct
        // data or fail with a corruption error naming the checkpoint.
        match Volume::open(d, &master(), opts()) {
            Ok(v) => {
                for l in 0..32 {
                    match read_block(&v, l) {
                        Ok(b) => assert_eq!(b, block(l, 1)),
                        Err(e) => assert!(matches!(
                            e,
                            VolumeError::Integrity(_) | VolumeError::Corrupted(_)
                        )),
                    }
                }
            }
            Err(e) => assert!(
                matches!(e, VolumeError::Corrupted(_) | VolumeError::Integrity(_)),
                "{e:?}"
            ),
        }
    }
    let d = Arc::new(MemDevice::from_image(img));
    d.write_at(&[0xee; 64], 2 * B + 200).unwrap();
    d.write_at(&[0xee; 64], 3 * B + 200).unwrap();
    let e = Volume::open(d, &master(), opts()).err().unwrap();
    assert!(e.to_string().contains("no valid checkpoint"), "{e}");
}

#[test]
fn wrong_key_is_reported_as_wrong_key() {
    let dev = written();
    let other = MasterKey::from_bytes(Zeroizing::new([1; KEY_LEN]));
    let e = Volume::open(dev.clone(), &other, opts()).err().unwrap();
    assert!(matches!(e, VolumeError::WrongKey(_)), "{e:?}");
    assert_eq!(e.errno(), libc::EACCES);

    // Through key slots: the right KEK opens, another does not.
    let kek = Kek::generate().unwrap();
    let mk = MasterKey::generate().unwrap();
    let (_, h) = volume_with_key_file_slot(&kek, &mk);
    assert_eq!(keys::unlock(&h, &kek).unwrap().expose(), mk.expose());
    let e = keys::unlock(&h, &Kek::generate().unwrap()).err().unwrap();
    assert!(matches!(e, KeysError::WrongKey(_)));
    // A slot whose wrapped key was altered does not open either.
    let mut bad = h.clone();
    bad.slots[0].wrapped.0[30] ^= 1;
    assert!(matches!(
        keys::unlock(&bad, &kek),
        Err(KeysError::WrongKey(_))
    ));
}

/// docs/SECURITY.md A17: an older copy of the whole backing file is
/// authentic, so the volume alone cannot tell it from the current one; the
/// host's record of the newest checkpoint it saw can. Given that record
/// (`Options::newest_seen`, which the mount fills from the sealed store),
/// the older copy is refused as a rollback, naming both checkpoints,
/// before anything is written to it; the current file opens. Without a
/// record (a host with no sealed store) the copy still opens: that part is
/// pinned. The flow through `lsvfs mount` and the sealed store is
/// `tests/keyserver.rs::an_older_copy_of_the_volume_put_back_is_refused_as_a_rollback`.
#[test]
fn a_whole_file_rollback_is_refused_against_the_hosts_record() {
    let dev = written();
    let old_image = dev.image();
    let v = open(dev.clone());
    let mut data = Vec::new();
    for l in 0..32 {
        data.extend_from_slice(&block(l, 2));
    }
    v.write(Lba(0), &data).unwrap();
    let seen = v.close_at().unwrap();

    let with_record = || volume::Options {
        newest_seen: Some(seen),
        ..opts()
    };
    let rolled_back = Arc::new(MemDevice::from_image(old_image.clone()));
    match Volume::open(rolled_back.clone(), &master(), with_record()) {
        Err(e @ VolumeError::Rollback { have, seen: s }) => {
            assert!(have < seen && s == seen, "{e}");
            assert_eq!(e.class().exit_code(), 12);
            assert!(e.to_string().contains("--allow-rollback"), "{e}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("an older copy opened against a newer record"),
    }
    assert!(
        rolled_back.image() == old_image,
        "the refused open wrote nothing"
    );
    let v = Volume::open(dev, &master(), with_record()).unwrap();
    assert_eq!(
        read_block(&v, 7).unwrap(),
        block(7, 2),
        "the current file opens"
    );
    v.close().unwrap();

    // Pinned: without a record the old copy opens, with the old data.
    let v = open(rolled_back);
    assert_eq!(read_block(&v, 7).unwrap(), block(7, 1), "the old data");
    v.close().unwrap();
}

/// A new volume on a memory device, and its header, whose slot 0 opens
/// `mk` with `kek`.
fn volume_with_key_file_slot(kek: &Kek, mk: &MasterKey) -> (MemDevice, volume::Header) {
    let mut slots = [KeySlot::EMPTY; KEY_SLOTS];
    slots[0] = keys::key_file_slot(kek, mk, &VOLUME_ID).unwrap();
    let d = MemDevice::new();
    let h = volume::create(
        &d,
        mk,
        VOLUME_ID,
        slots,
        &CreateOptions {
            logical_blocks: 64,
            segment_blocks: 16,
        },
    )
    .unwrap();
    (d, h)
}

/// KNOWN LIMITATION (docs/SECURITY.md B8): removing a key slot does not
/// revoke the key file against someone who kept a copy of the old header,
/// because the master key does not change. Pinned so that it is turned
/// around when re-keying lands.
#[test]
fn known_limitation_a_removed_key_slot_still_opens_an_old_header() {
    let kek = Kek::generate().unwrap();
    let mk = MasterKey::generate().unwrap();
    let (d, old) = volume_with_key_file_slot(&kek, &mk);
    let mut removed = old.clone();
    removed.slots[0] = KeySlot::EMPTY;
    assert!(keys::unlock(&removed, &kek).is_err(), "the slot is gone");
    // The old header still unwraps the master key that opens the volume today.
    let from_old = keys::unlock(&old, &kek).unwrap();
    assert_eq!(from_old.expose(), mk.expose());
    volume::write_header(&d, &removed).unwrap();
    let v = Volume::open(Arc::new(d), &from_old, opts()).unwrap();
    v.close().unwrap();
}

#[test]
fn random_corruption_never_returns_wrong_data() {
    // Overwrite random blocks of a written volume with garbage, many times:
    // every read either returns the right bytes or an error.
    let img = written().image();
    let mut rng = common::Rng(77);
    for round in 0..60 {
        let mut bad = img.clone();
        for _ in 0..3 {
            let blk = rng.below((bad.len() / BLOCK_SIZE) as u64) as usize;
            let off = blk * BLOCK_SIZE + rng.below(BLOCK_SIZE as u64) as usize;
            let len = (rng.below(64) + 1) as usize;
            for b in &mut bad[off..(off + len).min(blk * BLOCK_SIZE + BLOCK_SIZE)] {
                *b = rng.next() as u8;
            }
        }
        let d = Arc::new(MemDevice::from_image(bad));
        if let Ok(v) = Volume::open(d, &master(), opts()) {
            for l in 0..40 {
                if let Ok(b) = read_block(&v, l) {
                    let want = if l < 32 {
                        block(l, 1)
                    } else {
                        vec![0; BLOCK_SIZE]
                    };
                    assert_eq!(b, want, "round {round} block {l}");
                }
            }
            let _ = v.check();
        }
    }
}

#[test]
fn create_refuses_bad_geometry() {
    let d = MemDevice::new();
    for (logical_blocks, segment_blocks) in
        [(0, 64), (64, 3), (64, 8), (64, 1 << 20), (u64::MAX, 64)]
    {
        let e = volume::create(
            &d,
            &master(),
            VOLUME_ID,
            [KeySlot::EMPTY; KEY_SLOTS],
            &CreateOptions {
                logical_blocks,
                segment_blocks,
            },
        )
        .unwrap_err();
        assert!(matches!(e, VolumeError::InvalidArgument(_)), "{e:?}");
    }
    create(&d, 16, 16);
}

#[test]
fn altered_header_geometry_is_detected() {
    // The header has only a checksum, which anyone can recompute. Its
    // geometry is bound into the MAC'd checkpoint, so changing it (here the
    // segment size, which would misplace every segment) is refused.
    let dev = written();
    let mut h = volume::read_header(&*dev).unwrap();
    h.segment_blocks = 32;
    h.seq += 1;
    volume::write_header(&*dev, &h).unwrap();
    let e = Volume::open(dev, &master(), opts()).err().unwrap();
    assert!(matches!(e, VolumeError::Corrupted(_)), "{e:?}");
    assert!(e.to_string().contains("geometry"), "{e}");
}

/// Runs a rekey to its end (key generation 1 on a fresh volume).
fn rekeyed(dev: &Arc<MemDevice>) {
    let v = open(dev.clone());
    let h = volume::read_header(&**dev).unwrap();
    let (entry, secret) = volume::new_key_generation(&h, &master()).unwrap();
    v.rekey_start(entry, &secret).unwrap();
    while v.rekey_step().unwrap() {}
    v.close().unwrap();
}

/// A block sealed under an older key generation, put back where the map
/// names the newer one (a block relabelled with the wrong generation), is
/// an integrity error, during the rekey and after it.
#[test]
fn a_block_of_another_key_generation_put_back_is_an_integrity_error() {
    let dev = written();
    let old_at = locate(&dev, 5);
    let old = peek(&dev, old_at * B, BLOCK_SIZE);
    // Half way: both generations in the ring.
    let v = open(dev.clone());
    let h = volume::read_header(&*dev).unwrap();
    let (entry, secret) = volume::new_key_generation(&h, &master()).unwrap();
    v.rekey_start(entry, &secret).unwrap();
    while v.rekey_status().unwrap().segments_left > 0 {
        v.rekey_step().unwrap();
    }
    v.checkpoint().unwrap();
    let p = v.locate(Lba(5)).unwrap().unwrap();
    assert_ne!(p, old_at, "block 5 was moved by the rekey");
    patch(&dev, p * B, &old);
    assert!(
        matches!(read_block(&v, 5), Err(VolumeError::Integrity(_))),
        "a generation-0 block read where generation 1 seals it"
    );
    assert_eq!(read_block(&v, 6).unwrap(), block(6, 1));
    v.abandon();

    // After the rekey: generation 0 is retired.
    let dev = written();
    let old_at = locate(&dev, 5);
    let old = peek(&dev, old_at * B, BLOCK_SIZE);
    rekeyed(&dev);
    let new_at = locate(&dev, 5);
    patch(&dev, new_at * B, &old);
    let v = open(dev);
    assert!(matches!(read_block(&v, 5), Err(VolumeError::Integrity(_))));
    assert_eq!(read_block(&v, 6).unwrap(), block(6, 1));
}

/// The header's key generation entries are bound to the volume's key and
/// to their number: a changed secret, a changed number or a checkpoint
/// naming a generation the header lacks is refused, never misread.
#[test]
fn altered_key_generation_entries_are_refused() {
    let dev = written();
    rekeyed(&dev);
    let good = dev.image();
    let h = volume::read_header(&*dev).unwrap();
    assert_eq!(h.key_gens.len(), 1);

    let mut bad = h.clone();
    bad.key_gens[0].wrapped.0[40] ^= 1;
    volume::write_header(&*dev, &bad).unwrap();
    let e = Volume::open(dev.clone(), &master(), opts()).err().unwrap();
    assert!(matches!(e, VolumeError::Corrupted(_)), "{e:?}");
    assert!(e.to_string().contains("key generation 1"), "{e}");

    let dev = Arc::new(MemDevice::from_image(good.clone()));
    let mut bad = h.clone();
    bad.key_gens[0].key_gen = 2;
    bad.retired_below = 2;
    volume::write_header(&*dev, &bad).unwrap();
    let e = Volume::open(dev, &master(), opts()).err().unwrap();
    assert!(e.to_string().contains("key generation 2"), "{e}");

    // The secret dropped (an older header's view): the checkpoints and
    // blocks sealed under generation 1 do not open.
    let dev = Arc::new(MemDevice::from_image(good));
    let bad = volume::Header {
        key_gens: Vec::new(),
        retired_below: 0,
        ..h
    };
    volume::write_header(&*dev, &bad).unwrap();
    let e = Volume::open(dev, &master(), opts()).err().unwrap();
    assert!(e.to_string().contains("no valid checkpoint"), "{e}");
    assert!(
        e.to_string().contains("key generation 1"),
        "the refusal names the generation: {e}"
    );
}

/// A block that fails authentication under its old key generation is never
/// sealed again under the new one (that would launder the damage): the
/// rekey moves it as it is, ends with an error naming the count, and keeps
/// the older generation, so the block still reads as an integrity error
/// and every other block reads back.
#[test]
fn a_damaged_block_is_not_sealed_again_by_a_rekey() {
    let dev = written();
    let pba = locate(&dev, 7);
    let mut b = peek(&dev, pba * B + 100, 1);
    b[0] ^= 0x01;
    patch(&dev, pba * B + 100, &b);
    let v = open(dev.clone());
    let h = volume::read_header(&*dev).unwrap();
    let (entry, secret) = volume::new_key_generation(&h, &master()).unwrap();
    v.rekey_start(entry, &secret).unwrap();
    let e = loop {
        match v.rekey_step() {
            Ok(true) => {}
            Ok(false) => panic!("the rekey finished over a damaged block"),
            Err(e) => break e,
        }
    };
    assert!(matches!(e, VolumeError::Integrity(_)), "{e:?}");
    assert!(e.to_string().contains("1 blocks"), "{e}");
    let st = v.rekey_status().unwrap();
    assert_eq!(st.generations, vec![0, 1], "{st:?}");
    assert!(matches!(read_block(&v, 7), Err(VolumeError::Integrity(_))));
    for l in (0..32).filter(|l| *l != 7) {
        assert_eq!(read_block(&v, l).unwrap(), block(l, 1), "block {l}");
    }
    v.close().unwrap();
    // Reopened, the older generation is still there, and so is the damage.
    let v = open(dev);
    assert!(matches!(read_block(&v, 7), Err(VolumeError::Integrity(_))));
    assert_eq!(read_block(&v, 8).unwrap(), block(8, 1));
}
