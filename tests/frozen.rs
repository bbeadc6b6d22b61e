//! Frozen images: a small volume written by format version 1, committed
//! under tests/images/ and never regenerated. Every build must still open
//! it, recover its log tail, and read exactly what was written.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use common::{block, master, open};
use lsvfs::device::MemDevice;
use lsvfs::volume::{self, CreateOptions, KeySlot, Transaction, KEY_SLOTS};
use lsvfs::BLOCK_SIZE;

const V1: &str = "tests/images/v1.vol.gz";

/// What the v1 image holds: (lba, version) per block, 0 = unmapped.
fn expected() -> Vec<u64> {
    let mut m = vec![0u64; 64];
    m[..12].fill(1);
    m[4..8].fill(2);
    m[9] = 0;
    m[10] = 0;
    m[40] = 3; // only in the log tail, after the last checkpoint
    m[41] = 3;
    m
}

#[test]
#[ignore = "run once to create a new format version's image; never regenerate an existing one"]
fn generate_v1_image() {
    assert!(
        !Path::new(V1).exists(),
        "{V1} exists; frozen images are never regenerated"
    );
    let dev = Arc::new(MemDevice::new());
    volume::create(
        &*dev,
        &master(),
        *b"lsvfs-frozen-v1!",
        [KeySlot::EMPTY; KEY_SLOTS],
        &CreateOptions {
            logical_blocks: 64,
            segment_blocks: 16,
        },
    )
    .unwrap();
    let v = open(dev.clone());
    v.write(0, &(0..12).flat_map(|l| block(l, 1)).collect::<Vec<u8>>())
        .unwrap();
    v.checkpoint().unwrap();
    let mut t = Transaction::new();
    t.write(4, (4..8).flat_map(|l| block(l, 2)).collect())
        .trim(9, 2);
    v.commit(t).unwrap();
    v.checkpoint().unwrap();
    v.write(40, &[block(40, 3), block(41, 3)].concat()).unwrap();
    v.flush().unwrap();
    let img = dev.image();
    v.abandon();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&img).unwrap();
    std::fs::write(V1, gz.finish().unwrap()).unwrap();
}

#[test]
fn format_v1_image_still_opens_and_reads() {
    let mut img = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(V1).unwrap())
        .read_to_end(&mut img)
        .unwrap();
    let dev = Arc::new(MemDevice::from_image(img));
    let v = open(dev);
    assert_eq!(
        v.recovery().transactions,
        1,
        "the image's log tail holds one transaction"
    );
    let mut buf = vec![0u8; BLOCK_SIZE];
    for (l, ver) in expected().into_iter().enumerate() {
        v.read(l as u64, &mut buf).unwrap();
        if ver == 0 {
            assert!(buf.iter().all(|b| *b == 0), "block {l}");
        } else {
            assert_eq!(buf, block(l as u64, ver), "block {l}");
        }
    }
    assert!(v.check().unwrap().is_clean());
}
