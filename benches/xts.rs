//! AES-256-XTS throughput on one core, 4 KiB blocks: lsvfs's pipelined
//! mode (src/crypto/xts.rs) against xts-mode's one-piece-at-a-time loop,
//! in the same run, both directions. Compare with
//! `openssl speed -evp aes-256-xts -bytes 4096` (scripts/bench-xts.sh runs
//! all of it, for the native and the portable build).
//!
//!     cargo bench --bench xts -- [--seconds 3]

use std::time::{Duration, Instant};

use aes::cipher::{Array, KeyInit};
use aes::Aes256;
use lsvfs::crypto::Xts;

fn rate(seconds: f64, mut f: impl FnMut(&mut [u8], [u8; 16])) -> f64 {
    let mut buf = vec![0x42u8; 4096];
    let mut bytes = 0u64;
    let mut n = 0u64;
    let start = Instant::now();
    let until = Duration::from_secs_f64(seconds);
    while start.elapsed() < until {
        for _ in 0..256 {
            let mut tweak = [0u8; 16];
            tweak[..8].copy_from_slice(&n.to_le_bytes());
            f(&mut buf, tweak);
            n += 1;
        }
        bytes += 256 * 4096;
    }
    std::hint::black_box(&buf);
    bytes as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let k = |b: u8| Aes256::new_from_slice(&[b; 32]).unwrap();
    let ours = Xts::new(k(1), k(2));
    let reference = xts_mode::Xts128::new(k(1), k(2));
    for (name, value) in [
        (
            "xts encrypt, pipelined (lsvfs)",
            rate(seconds, |b, t| ours.encrypt(b, t)),
        ),
        (
            "xts decrypt, pipelined (lsvfs)",
            rate(seconds, |b, t| ours.decrypt(b, t)),
        ),
        (
            "xts encrypt, xts-mode",
            rate(seconds, |b, t| reference.encrypt_sector(b, Array::from(t))),
        ),
        (
            "xts decrypt, xts-mode",
            rate(seconds, |b, t| reference.decrypt_sector(b, Array::from(t))),
        ),
    ] {
        println!("{name:<40} {value:>10.0} MB/s");
    }
}
