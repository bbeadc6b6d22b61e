//! Runs the fuzz harness (fuzz/harness.rs) on deterministic inputs, so the
//! code the fuzzer drives is exercised by every test run on stable Rust.
//! The real fuzzer: see README ("Fuzzing").

#[path = "../fuzz/harness.rs"]
mod harness;

#[test]
fn fuzz_harness_survives_random_patches_and_images() {
    let base = harness::base_image();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..300 {
        let mut input = vec![1u8];
        for _ in 0..(round % 12 + 1) {
            // Aim half the patches at the metadata region and log head.
            let off = if next() % 2 == 0 {
                next() % (base.len() as u64)
            } else {
                next() % (1 << 21)
            };
            input.extend_from_slice(&(off as u32).to_le_bytes());
            input.push(next() as u8);
        }
        harness::run(&input);
    }
    // Raw images: empty, tiny, a valid header with garbage after it.
    harness::run(&[0]);
    harness::run(&[0, 1, 2, 3]);
    let mut img = vec![0u8];
    img.extend_from_slice(&base[..8192]);
    harness::run(&img);
    img.extend_from_slice(&vec![0xff; 1 << 20]);
    harness::run(&img);
}
