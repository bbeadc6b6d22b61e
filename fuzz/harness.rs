//! Opening a volume from arbitrary bytes: shared by the cargo-fuzz target
//! (fuzz/fuzz_targets/open_volume.rs) and the smoke test (tests/fuzz_smoke.rs).
//!
//! Input byte 0 picks the mode:
//! - even: the rest is the whole backing store (exercises header parsing);
//! - odd: the rest is patches (u32 offset LE, u8 value) to a valid volume
//!   that has checkpointed data and an unreplayed log tail, so that the
//!   checkpoint, tree, recovery and cleaner code all see hostile bytes.
//!
//! The only oracle is that nothing panics; tests/tamper.rs checks that no
//! corruption reads as wrong data.

use std::sync::{Arc, OnceLock};

use lsvfs::crypto::{MasterKey, KEY_LEN};
use lsvfs::device::MemDevice;
use lsvfs::volume::{self, CreateOptions, KeySlot, Lba, Options, Volume, KEY_SLOTS};
use lsvfs::BLOCK_SIZE;
use zeroize::Zeroizing;

fn master() -> MasterKey {
    MasterKey::from_bytes(Zeroizing::new([0x42; KEY_LEN]))
}

fn opts() -> Options {
    Options {
        background: false,
        crypto_threads: 1,
        cache_bytes: 64 * BLOCK_SIZE,
        checkpoint_blocks: 64,
        ..Options::default()
    }
}

/// A small valid volume: some data checkpointed, more only in the log.
pub fn base_image() -> &'static [u8] {
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(|| {
        let dev = Arc::new(MemDevice::new());
        volume::create(
            &*dev,
            &master(),
            [9; 16],
            [KeySlot::EMPTY; KEY_SLOTS],
            &CreateOptions {
                logical_blocks: 128,
                segment_blocks: 16,
            },
        )
        .expect("create");
        let v = Volume::open(dev.clone(), &master(), opts()).expect("open");
        for i in 0..24u64 {
            v.write(Lba(i * 5 % 128), &vec![i as u8 + 1; BLOCK_SIZE * 2])
                .expect("write");
        }
        v.checkpoint().expect("checkpoint");
        v.write(Lba(3), &vec![0xaa; BLOCK_SIZE * 3]).expect("write");
        v.trim(Lba(40), 10).expect("trim");
        v.flush().expect("flush");
        v.abandon();
        dev.image()
    })
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let img = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut img = base_image().to_vec();
        for p in rest.chunks_exact(5) {
            let off = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize % img.len();
            img[off] = p[4];
        }
        img
    };
    let dev = Arc::new(MemDevice::from_image(img));
    if volume::read_header(&*dev).is_err() {
        return;
    }
    let Ok(v) = Volume::open(dev, &master(), opts()) else {
        return;
    };
    let mut buf = vec![0u8; 128 * BLOCK_SIZE];
    let _ = v.read(Lba(0), &mut buf);
    for lba in 0..128 {
        let _ = v.read(Lba(lba), &mut buf[..BLOCK_SIZE]);
    }
    let _ = v.check();
    let _ = v.write(Lba(7), &vec![1; BLOCK_SIZE]);
    let _ = v.clean(2);
    let _ = v.close();
}
