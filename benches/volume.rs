//! Volume engine benchmark (a program, not a timed test).
//!
//!     cargo bench --bench volume -- [--dir DIR] [--mib 1024] [--seconds 10]
//!
//! or `scripts/bench-volume.sh`, which also runs openssl and fio on the same
//! disk for comparison. Prints one `name value unit` line per measurement.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lsvfs::crypto::{BlockKind, CryptoEngine, Mac, MasterKey, Tag, VolumeKeys, KEY_LEN};
use lsvfs::device::{Device, FileDevice};
use lsvfs::volume::{self, CreateOptions, KeySlot, Lba, Options, Volume, KEY_SLOTS};
use lsvfs::BLOCK_SIZE;
use zeroize::Zeroizing;

const MIB: usize = 1 << 20;

fn master() -> MasterKey {
    MasterKey::from_bytes(Zeroizing::new([0x33; KEY_LEN]))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn report(name: &str, value: f64, unit: &str) {
    println!("{name:<40} {value:>12.1} {unit}");
}

fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// Seal (XTS + MAC), XTS-only (one thread) and open (MAC check + XTS
/// decryption, as every read does) throughput of the chunk engine.
fn crypto(threads: usize) -> (f64, f64, f64) {
    let keys = VolumeKeys::derive(&master(), &[1; 16]);
    let engine = CryptoEngine::new(threads, 512 * 1024).unwrap();
    let n = 2048; // 8 MiB batches
    let mut buf = vec![0x5au8; n * BLOCK_SIZE];
    let mut macs = vec![Mac::default(); n];
    let mut gen = 0u64;
    let mut run = |seal: bool| {
        let t = Instant::now();
        let mut bytes = 0usize;
        while t.elapsed() < Duration::from_secs(2) {
            let tags: Vec<Tag> = (0..n as u64)
                .map(|i| Tag::new(BlockKind::Data, i, gen + i, 0))
                .collect();
            gen += n as u64;
            if seal {
                engine.seal(&keys.current(), &mut buf, &tags, &mut macs);
            } else if threads == 1 {
                keys.current().encrypt_blocks(&tags, &mut buf);
            } else {
                return 0.0;
            }
            bytes += buf.len();
        }
        bytes as f64 / t.elapsed().as_secs_f64() / 1e6
    };
    let seal = run(true);
    let xts = run(false);
    // Open: the same batch sealed once, then verified and decrypted
    // (decryption in place turns it into plaintext, so each pass opens a
    // fresh copy of the sealed batch; the copy is timed too, as a read's
    // copy out of the host's page cache is).
    let tags: Vec<Tag> = (0..n as u64)
        .map(|i| Tag::new(BlockKind::Data, i, gen + i, 0))
        .collect();
    engine.seal(&keys.current(), &mut buf, &tags, &mut macs);
    let sealed = buf.clone();
    let t = Instant::now();
    let mut bytes = 0usize;
    while t.elapsed() < Duration::from_secs(2) {
        buf.copy_from_slice(&sealed);
        engine
            .open(&keys, &mut buf, &tags, &macs)
            .expect("the batch just sealed opens");
        bytes += buf.len();
    }
    let open = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
    (seal, xts, open)
}

fn create(path: &Path, logical_blocks: u64) -> Arc<dyn Device> {
    let _ = std::fs::remove_file(path);
    let dev = FileDevice::create(path).unwrap();
    volume::create(
        &dev,
        &master(),
        [7; 16],
        [KeySlot::EMPTY; KEY_SLOTS],
        &CreateOptions {
            logical_blocks,
            segment_blocks: 1024,
        },
    )
    .unwrap();
    drop(dev);
    Arc::new(FileDevice::open(path, true).unwrap())
}

/// Writes `mib` MiB sequentially in 1 MiB transactions, then fdatasync.
fn seq_write(path: &Path, mib: usize) {
    let blocks = (mib * MIB / BLOCK_SIZE) as u64;
    let dev = create(path, blocks * 2);
    let v = Volume::open(dev, &master(), Options::default()).unwrap();
    let chunk = vec![0xc3u8; MIB];
    let t = Instant::now();
    for i in 0..mib as u64 {
        v.write(Lba(i * (MIB / BLOCK_SIZE) as u64), &chunk).unwrap();
    }
    v.flush().unwrap();
    let secs = t.elapsed().as_secs_f64();
    report(
        "engine seq write 1 MiB txns + fdatasync",
        (mib * MIB) as f64 / secs / 1e6,
        "MB/s",
    );
    v.close().unwrap();
}

fn engine(dir: &Path, mib: usize, seconds: u64) {
    let path = dir.join("engine.vol");
    let blocks = (mib * MIB / BLOCK_SIZE) as u64;
    seq_write(&path, mib);

    let dropped = drop_caches();
    let v = Volume::open(
        Arc::new(FileDevice::open(&path, true).unwrap()),
        &master(),
        Options::default(),
    )
    .unwrap();
    let mut buf = vec![0u8; MIB];
    let t = Instant::now();
    for i in 0..mib as u64 {
        v.read(Lba(i * (MIB / BLOCK_SIZE) as u64), &mut buf)
            .unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    report(
        if dropped {
            "engine seq read 1 MiB (cold cache)"
        } else {
            "engine seq read 1 MiB (warm cache)"
        },
        (mib * MIB) as f64 / secs / 1e6,
        "MB/s",
    );

    let mut rng = Rng(12345);
    let block = vec![0x7eu8; BLOCK_SIZE];
    let t = Instant::now();
    let mut ops = 0u64;
    while t.elapsed() < Duration::from_secs(seconds) {
        for _ in 0..256 {
            v.write(Lba(rng.next() % blocks), &block).unwrap();
            ops += 1;
        }
    }
    v.flush().unwrap();
    report(
        "engine random 4 KiB write",
        ops as f64 / t.elapsed().as_secs_f64(),
        "IOPS",
    );

    let mut one = vec![0u8; BLOCK_SIZE];
    let t = Instant::now();
    let mut ops = 0u64;
    while t.elapsed() < Duration::from_secs(seconds) {
        for _ in 0..256 {
            v.read(Lba(rng.next() % blocks), &mut one).unwrap();
            ops += 1;
        }
    }
    report(
        "engine random 4 KiB read",
        ops as f64 / t.elapsed().as_secs_f64(),
        "IOPS",
    );
    v.close().unwrap();
    let _ = std::fs::remove_file(&path);
}

/// 1 TiB sparse volume, 1 GiB written in scattered 1 MiB extents, then
/// closed cleanly (or, with `killed`, abandoned without a final checkpoint,
/// so the reopen replays the log); reopened in a child process whose wall
/// time and peak RSS we read.
fn reopen(dir: &Path, mib: usize, killed: bool) {
    let path = dir.join("sparse.vol");
    let logical = (1u64 << 40) / BLOCK_SIZE as u64;
    let dev = create(&path, logical);
    let v = Volume::open(dev, &master(), Options::default()).unwrap();
    let extent = vec![0x11u8; MIB];
    let mut rng = Rng(777);
    let slots = logical / (MIB / BLOCK_SIZE) as u64;
    for _ in 0..mib {
        let at = (rng.next() % slots) * (MIB / BLOCK_SIZE) as u64;
        v.write(Lba(at), &extent).unwrap();
    }
    if killed {
        v.flush().unwrap();
        v.abandon();
    } else {
        v.close().unwrap();
    }
    let exe = std::env::current_exe().unwrap();
    let t = Instant::now();
    let out = Command::new(exe)
        .arg("--reopen-child")
        .arg(&path)
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "reopen child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let child = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| -> f64 {
        child
            .split_whitespace()
            .skip_while(|w| *w != k)
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("child report")
    };
    let how = if killed { "after kill" } else { "clean" };
    report(
        &format!("reopen 1 TiB sparse, 1 GiB scattered, {how}"),
        secs * 1000.0,
        "ms",
    );
    report(
        &format!("reopen peak RSS, {how}"),
        field("rss_kib") / 1024.0,
        "MiB",
    );
    report(
        &format!("  transactions replayed, {how}"),
        field("replayed"),
        "txns",
    );
    let on_disk = std::fs::metadata(&path).unwrap().len();
    report("  backing file length", on_disk as f64 / MIB as f64, "MiB");
    let _ = std::fs::remove_file(&path);
}

/// Opens, reads a block and closes the volume; prints its own peak RSS and
/// how much log it replayed.
fn reopen_child(path: &Path) {
    let v = Volume::open(
        Arc::new(FileDevice::open(path, true).unwrap()),
        &master(),
        Options::default(),
    )
    .unwrap();
    let replayed = v.recovery().transactions;
    let mut b = vec![0u8; BLOCK_SIZE];
    v.read(Lba(0), &mut b).unwrap();
    v.close().unwrap();
    // SAFETY: getrusage fills the struct we pass and nothing else.
    let rss_kib = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru.ru_maxrss
    };
    println!("rss_kib {rss_kib} replayed {replayed}");
}

/// Volume engine benchmark.
#[derive(clap::Parser)]
struct Args {
    /// Directory for the volume files.
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
    /// MiB written and read sequentially (and held by the reopened volume).
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Seconds per random-I/O measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Only the sequential write, printed as one line (for bench-volume.sh).
    #[arg(long)]
    seq_write_only: bool,
    /// Only the crypto measurements (no volume on disk).
    #[arg(long)]
    crypto_only: bool,
    /// Internal: reopen the volume at PATH and report (a child process, so
    /// that its peak memory is its own).
    #[arg(long, hide = true, value_name = "PATH")]
    reopen_child: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One core sealing 1 MiB export chunks in each export format version's
/// AEAD (version 1 XChaCha20-Poly1305, version 2 AES-256-GCM), MB/s.
fn export_chunks() -> Vec<(u16, &'static str, f64)> {
    let key = lsvfs::export::ExportKey::generate().unwrap();
    let snap = lsvfs::export::SnapRef {
        id: 1,
        name: "bench".into(),
        created_sec: 0,
        created_nsec: 0,
    };
    let mut header = lsvfs::export::Header {
        version: 1,
        kind: lsvfs::export::Kind::Full,
        export_id: [7; 16],
        volume_id: [1; 16],
        logical_blocks: 1 << 20,
        written: 0,
        snapshot: snap,
        base: None,
        source_key: [0; 32],
        slots: Vec::new(),
    };
    let mut out = Vec::new();
    for v in [1, lsvfs::export::VERSION] {
        header.version = v;
        let cipher = key.chunk_cipher(&header);
        let mut buf = vec![0x5au8; MIB];
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < Duration::from_secs(2) {
            cipher.seal(n, false, &[9; 32], &mut buf).unwrap();
            n += 1;
        }
        let rate = (n as usize * MIB) as f64 / t.elapsed().as_secs_f64() / 1e6;
        out.push((v, header.chunk_aead().name(), rate));
    }
    out
}

/// One core computing a 16-byte MAC of 4 KiB blocks, MB/s: the format's
/// (keyed BLAKE3 over ciphertext, tag and volume id, with the stack wipe
/// that `GenKeys::mac` does after it), and three that aws-lc-rs offers,
/// the block as the associated data of a sealing of nothing: AES-256-GCM
/// (GMAC), AES-256-GCM-SIV (POLYVAL under a synthetic IV) and
/// ChaCha20-Poly1305 (Poly1305 under a key per nonce). What a seal would
/// cost with another MAC; the format uses only the first
/// (docs/PERFORMANCE.md, "Build notes").
fn mac_candidates() -> Vec<(&'static str, f64)> {
    use aws_lc_rs::aead::{
        Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, AES_256_GCM_SIV, CHACHA20_POLY1305,
    };
    let keys = VolumeKeys::derive(&master(), &[1; 16]);
    let current = keys.current();
    let block = vec![0x5au8; BLOCK_SIZE];
    let rate = |mac: &mut dyn FnMut(u64)| {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < Duration::from_secs(2) {
            for _ in 0..256 {
                mac(n);
                n += 1;
            }
        }
        (n as usize * BLOCK_SIZE) as f64 / t.elapsed().as_secs_f64() / 1e6
    };
    let mut out = vec![(
        "BLAKE3 keyed (the format's)",
        rate(&mut |n| {
            std::hint::black_box(current.mac(Tag::new(BlockKind::Data, n, n, 0), &block));
        }),
    )];
    for (name, alg) in [
        ("AES-256-GCM, block as AAD (GMAC)", &AES_256_GCM),
        ("AES-256-GCM-SIV, block as AAD", &AES_256_GCM_SIV),
        ("ChaCha20-Poly1305, block as AAD", &CHACHA20_POLY1305),
    ] {
        let key = LessSafeKey::new(UnboundKey::new(alg, &[7; 32]).unwrap());
        let r = rate(&mut |n| {
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&n.to_le_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&block[..]),
                    &mut [],
                )
                .unwrap();
            let _ = std::hint::black_box(tag);
        });
        out.push((name, r));
    }
    out
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    if let Some(path) = &args.reopen_child {
        reopen_child(path);
        return;
    }
    let (dir, mib) = (args.dir, args.mib);
    if args.seq_write_only {
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("seqwrite.vol");
        seq_write(&path, mib);
        let _ = std::fs::remove_file(&path);
        return;
    }
    let seconds = args.seconds;
    std::fs::create_dir_all(&dir).unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (seal1, xts1, open1) = crypto(1);
    let (sealn, _, openn) = crypto(cpus);
    report("crypto XTS only, 1 thread", xts1, "MB/s");
    report("crypto seal (XTS+MAC), 1 thread", seal1, "MB/s");
    report("crypto open (MAC+XTS), 1 thread", open1, "MB/s");
    report(
        &format!("crypto open (MAC+XTS), {cpus} threads"),
        openn,
        "MB/s",
    );
    report(
        &format!("crypto seal (XTS+MAC), {cpus} threads"),
        sealn,
        "MB/s",
    );
    report("crypto seal scaling 1 -> all threads", sealn / seal1, "x");
    for (name, rate) in mac_candidates() {
        report(&format!("MAC of 4 KiB, 1 thread: {name}"), rate, "MB/s");
        // XTS and the MAC one after the other on one core.
        let seal = 1.0 / (1.0 / xts1 + 1.0 / rate);
        report("  seal with it (XTS + MAC), estimated", seal, "MB/s");
    }
    for (v, name, rate) in export_chunks() {
        report(&format!("export v{v} chunks, {name}"), rate, "MB/s");
    }
    if args.crypto_only {
        return;
    }
    engine(&dir, mib, seconds);
    reopen(&dir, mib, false);
    reopen(&dir, mib, true);
}
