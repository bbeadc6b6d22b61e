//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod mounted;
pub mod tpm;

use std::sync::Arc;

use lsvfs::crypto::{MasterKey, KEY_LEN};
use lsvfs::device::{Device, MemDevice};
use lsvfs::volume::{self, CreateOptions, KeySlot, Options, Volume, KEY_SLOTS};
use lsvfs::BLOCK_SIZE;
use zeroize::Zeroizing;

pub const VOLUME_ID: [u8; 16] = *b"lsvfs-test-vol-1";

pub fn master() -> MasterKey {
    MasterKey::from_bytes(Zeroizing::new([0x5a; KEY_LEN]))
}

pub fn create(dev: &dyn Device, logical_blocks: u64, segment_blocks: u32) {
    volume::create(
        dev,
        &master(),
        VOLUME_ID,
        [KeySlot::EMPTY; KEY_SLOTS],
        &CreateOptions {
            logical_blocks,
            segment_blocks,
        },
    )
    .expect("create");
}

/// Options for deterministic tests: no background thread, a small cache.
pub fn opts() -> Options {
    Options {
        background: false,
        cache_bytes: 64 * BLOCK_SIZE,
        crypto_threads: 2,
        chunk_bytes: 8 * BLOCK_SIZE,
        checkpoint_blocks: 256,
        ..Options::default()
    }
}

pub fn open(dev: Arc<dyn Device>) -> Volume {
    Volume::open(dev, &master(), opts()).expect("open")
}

pub fn mem_volume(logical_blocks: u64, segment_blocks: u32) -> Arc<MemDevice> {
    let dev = Arc::new(MemDevice::new());
    create(&*dev, logical_blocks, segment_blocks);
    dev
}

/// A POSIX ACL in the kernel's xattr format: owner rwx, `named` users
/// 1000, 1001, … with r-x, group r-x, mask rwx, other r-x (4 + 8 bytes
/// an entry: 2,412 bytes for 296 named users).
pub fn long_acl(named: u32) -> Vec<u8> {
    let mut acl = 2u32.to_le_bytes().to_vec();
    let mut entry = |tag: u16, perm: u16, id: u32| {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    };
    entry(1, 7, u32::MAX);
    for id in 0..named {
        entry(2, 5, 1000 + id);
    }
    entry(4, 5, u32::MAX);
    entry(0x10, 7, u32::MAX);
    entry(0x20, 5, u32::MAX);
    acl
}

/// The content a test writes to `lba` at `version`: every byte depends on
/// both, so a block from the wrong place or the wrong time is caught.
pub fn block(lba: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    b[..8].copy_from_slice(&lba.to_le_bytes());
    b[8..16].copy_from_slice(&version.to_le_bytes());
    let mut x =
        lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) | 1;
    for chunk in b[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    b
}

/// Small deterministic PRNG (xorshift), so failures replay exactly.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A core of the running process `pid`, as a crash would write it (gcore;
/// gdb honours MADV_DONTDUMP, as the kernel does), written in `dir` and
/// read back; the file is removed.
pub fn core_image(pid: &dyn std::fmt::Display, dir: &std::path::Path) -> Vec<u8> {
    let o = std::process::Command::new("gcore")
        .arg("-o")
        .arg(dir.join("core"))
        .arg(pid.to_string())
        .output()
        .unwrap();
    let core = dir.join(format!("core.{pid}"));
    assert!(
        o.status.success() && core.exists(),
        "gcore: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let image = std::fs::read(&core).unwrap();
    std::fs::remove_file(&core).unwrap();
    image
}
