//! Space: the cleaner keeps a full volume writable within its documented
//! bound, trims give space back, a full backing device gives ENOSPC and
//! recovers, and memory stays bounded by the cache on huge thin volumes.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;

use common::{block, create, master, mem_volume, open, opts, Rng};
use lsvfs::device::{Device, FileDevice, MemDevice};
use lsvfs::volume::VolumeError;
use lsvfs::volume::{Lba, Options, Volume};
use lsvfs::BLOCK_SIZE;

fn file_volume(
    dir: &tempfile::TempDir,
    logical: u64,
    seg: u32,
) -> (std::path::PathBuf, Arc<dyn Device>) {
    let path = dir.path().join("v.vol");
    let dev = FileDevice::create(&path).unwrap();
    create(&dev, logical, seg);
    drop(dev);
    let dev: Arc<dyn Device> = Arc::new(FileDevice::open(&path, true).unwrap());
    (path, dev)
}

fn write_run(
    v: &Volume,
    model: &mut [u64],
    lba: u64,
    n: u64,
    version: &mut u64,
) -> Result<(), VolumeError> {
    let mut data = Vec::with_capacity(n as usize * BLOCK_SIZE);
    let mut next = Vec::new();
    for l in lba..lba + n {
        *version += 1;
        data.extend_from_slice(&block(l, *version));
        next.push((l, *version));
    }
    v.write(Lba(lba), &data)?;
    for (l, ver) in next {
        model[l as usize] = ver;
    }
    Ok(())
}

fn verify_all(v: &Volume, model: &[u64]) {
    let mut buf = vec![0u8; BLOCK_SIZE];
    for (l, ver) in model.iter().enumerate() {
        v.read(Lba(l as u64), &mut buf).unwrap();
        if *ver == 0 {
            assert!(buf.iter().all(|b| *b == 0), "block {l}");
        } else {
            assert!(buf == block(l as u64, *ver), "block {l} version {ver}");
        }
    }
}

fn overwrite_10x_at_80_percent(background: bool) {
    let dir = tempfile::tempdir().unwrap();
    let logical = 8192u64; // 32 MiB
    let (path, dev) = file_volume(&dir, logical, 64);
    let v = Volume::open(
        dev,
        &master(),
        Options {
            background,
            ..opts()
        },
    )
    .unwrap();
    let bound = v.header().end_block() * BLOCK_SIZE as u64;
    let fill = logical * 8 / 10;
    let mut model = vec![0u64; logical as usize];
    let mut version = 0;
    for lba in (0..fill).step_by(64) {
        write_run(&v, &mut model, lba, 64.min(fill - lba), &mut version).unwrap();
    }
    let mut rng = Rng(42);
    let mut written = 0;
    let mut max_len = 0;
    while written < 10 * fill {
        let n = rng.below(16) + 1;
        let lba = rng.below(fill - n);
        write_run(&v, &mut model, lba, n, &mut version)
            .unwrap_or_else(|e| panic!("after {written} blocks of overwrites: {e}"));
        written += n;
        max_len = max_len.max(std::fs::metadata(&path).unwrap().len());
    }
    eprintln!(
        "10x overwrite at 80%: backing file peaked at {} bytes, bound {} bytes, logical {} bytes",
        max_len,
        bound,
        logical * BLOCK_SIZE as u64
    );
    assert!(
        max_len <= bound,
        "backing file grew to {max_len}, past the bound {bound}"
    );
    verify_all(&v, &model);
    assert!(v.check().unwrap().is_clean());
    v.close().unwrap();
}

#[test]
fn cleaner_sustains_10x_random_overwrites_at_80_percent() {
    overwrite_10x_at_80_percent(false);
}

#[test]
fn cleaner_with_background_thread() {
    overwrite_10x_at_80_percent(true);
}

#[test]
fn volume_can_be_filled_completely_and_rewritten() {
    let dev = mem_volume(2048, 64);
    let v = open(dev.clone());
    let mut model = vec![0u64; 2048];
    let mut version = 0;
    for lba in (0..2048).step_by(128) {
        write_run(&v, &mut model, lba, 128, &mut version).unwrap();
    }
    let mut rng = Rng(7);
    for _ in 0..800 {
        let n = rng.below(8) + 1;
        write_run(&v, &mut model, rng.below(2048 - n), n, &mut version).unwrap();
    }
    verify_all(&v, &model);
    assert!(dev.len().unwrap() <= v.header().end_block() * BLOCK_SIZE as u64);
}

/// Writes LBAs 0..8192 (32 MiB), 1,024 blocks per write, and checkpoints.
fn write_8192_blocks(v: &Volume) {
    let data: Vec<u8> = (0..8192).flat_map(|l| block(l, 1)).collect();
    for (i, c) in data.chunks(1024 * BLOCK_SIZE).enumerate() {
        v.write(Lba(i as u64 * 1024), c).unwrap();
    }
    v.checkpoint().unwrap();
}

#[test]
fn trim_releases_space_in_the_volume_and_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let (path, dev) = file_volume(&dir, 16384, 256);
    let v = Volume::open(dev, &master(), opts()).unwrap();
    write_8192_blocks(&v);
    let host_full = std::fs::metadata(&path).unwrap().blocks() * 512;
    let live_full = v.stats().unwrap().live_blocks;
    v.trim(Lba(0), 8192).unwrap();
    v.clean(1000).unwrap();
    let s = v.stats().unwrap();
    let host_after = std::fs::metadata(&path).unwrap().blocks() * 512;
    eprintln!(
        "trim: live blocks {live_full} -> {}, host bytes {host_full} -> {host_after}",
        s.live_blocks
    );
    assert_eq!(s.allocated_blocks, 0);
    assert!(v.allocated_runs().unwrap().is_empty());
    assert!(
        s.live_blocks < 16,
        "{} blocks still live after trimming everything",
        s.live_blocks
    );
    assert!(
        host_after < host_full / 4,
        "host space {host_full} -> {host_after}"
    );
    let mut b = vec![1u8; BLOCK_SIZE];
    v.read(Lba(100), &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0));
}

/// A device whose discards each take 10 ms, as a hole punch can on a host
/// busy writing back (1-2 ms seen beside dbench, 0.3 ms idle).
struct SlowDiscards {
    dev: Arc<MemDevice>,
    discards: std::sync::atomic::AtomicU64,
}

impl Device for SlowDiscards {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.dev.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.dev.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.dev.len()
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.dev.allocate(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        std::thread::sleep(std::time::Duration::from_millis(10));
        self.discards
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dev.discard(offset, len)
    }
    fn fixed_size(&self) -> bool {
        self.dev.fixed_size()
    }
    fn flushes(&self) -> u64 {
        self.dev.flushes()
    }
}

/// The discards of freed segments go a short while per hold of the
/// volume's lock: a read beside a long run of slow discards waits for
/// about one of them, not for a batch (16 of them held every operation
/// 20-25 ms beside dbench; here they would hold it 160 ms).
#[test]
fn slow_discards_hold_up_a_reader_for_one_discard_at_a_time() {
    use std::sync::atomic::Ordering::Relaxed;
    let dev = Arc::new(SlowDiscards {
        dev: mem_volume(16384, 64),
        discards: Default::default(),
    });
    let v = Arc::new(Volume::open(dev.clone(), &master(), opts()).unwrap());
    write_8192_blocks(&v);
    v.write(Lba(9000), &block(9000, 1)).unwrap();
    v.trim(Lba(0), 8192).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (v, stop, dev) = (v.clone(), stop.clone(), dev.clone());
        std::thread::spawn(move || {
            let mut b = vec![0u8; BLOCK_SIZE];
            let (mut worst, mut most) = (std::time::Duration::ZERO, 0);
            while !stop.load(Relaxed) {
                let (t, before) = (std::time::Instant::now(), dev.discards.load(Relaxed));
                v.read(Lba(9000), &mut b).unwrap();
                worst = worst.max(t.elapsed());
                most = most.max(dev.discards.load(Relaxed) - before);
                assert!(b == block(9000, 1));
            }
            (worst, most)
        })
    };
    let before = dev.discards.load(Relaxed);
    // Frees the trimmed segments and discards them, a batch at a time.
    v.clean(1000).unwrap();
    stop.store(true, Relaxed);
    let (worst, most) = reader.join().unwrap();
    let n = dev.discards.load(Relaxed) - before;
    eprintln!(
        "{n} discards beside the reader; one read waited {worst:?} and for {most} discards at most"
    );
    assert!(n >= 64, "only {n} segments discarded beside the reader");
    // One read may wait out a hold, and more if it loses the lock to the
    // next hold a few times on a busy machine; a batch of 16 is 16.
    assert!(most <= 8, "a read waited for {most} discards");
    assert!(
        worst < std::time::Duration::from_millis(120),
        "a read waited {worst:?} beside {n} discards of 10 ms"
    );
}

/// Bytes the host holds for the backing file.
fn host_bytes(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Discards still queued at a crash are lost with it, and the host keeps
/// the freed segments' bytes. The next open asks the host which free
/// segments still hold data and discards them. The crash's leftovers are
/// made here by writing over the discarded segments again (what the log
/// once wrote there), which leaves the backing file as a crash before
/// the discards would.
#[test]
fn free_segments_the_host_still_holds_are_discarded_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let (path, dev) = file_volume(&dir, 16384, 256);
    let v = Volume::open(dev.clone(), &master(), opts()).unwrap();
    write_8192_blocks(&v);
    let written = dev.data_ranges().expect("a file's data ranges");
    v.trim(Lba(0), 8192).unwrap();
    v.clean(1000).unwrap();
    v.close().unwrap();
    let kept = dev.data_ranges().expect("a file's data ranges");
    drop(dev);
    let trimmed = host_bytes(&path);

    // Every 4 KiB that held data before the trim and is a hole now.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let junk = vec![0xa5u8; BLOCK_SIZE];
    for r in &written {
        for at in r.clone().step_by(BLOCK_SIZE) {
            if !kept.iter().any(|k| k.contains(&at)) {
                file.write_all_at(&junk, at).unwrap();
            }
        }
    }
    file.sync_all().unwrap();
    drop(file);
    let left = host_bytes(&path);
    assert!(
        left >= trimmed + (24 << 20),
        "the simulated crash left {left} bytes on the host against {trimmed}"
    );

    let dev: Arc<dyn Device> = Arc::new(FileDevice::open(&path, true).unwrap());
    let v = Volume::open(dev, &master(), opts()).unwrap();
    v.checkpoint().unwrap();
    let reopened = host_bytes(&path);
    eprintln!("host bytes: trimmed {trimmed}, after the crash {left}, reopened {reopened}");
    // The open's own checkpoint writes a few blocks into a new segment.
    assert!(
        reopened <= trimmed + (1 << 20),
        "free segments kept on the host: {reopened} bytes against {trimmed} before the crash"
    );
    let mut b = vec![1u8; BLOCK_SIZE];
    v.read(Lba(100), &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0));
    v.close().unwrap();
}

/// After writing 8,192 blocks and trimming them, in the given (first
/// LBA, count) pieces one after the other (cleaning after each): the bytes the host holds,
/// and the most it should: the reserve, the log's head segment and the
/// one chosen next, and what lies before the first segment.
fn host_bytes_after_trims(trims: &[(u64, u64)]) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (path, dev) = file_volume(&dir, 16384, 256);
    let v = Volume::open(dev, &master(), opts()).unwrap();
    write_8192_blocks(&v);
    for &(first, count) in trims {
        v.trim(Lba(first), count).unwrap();
        v.clean(1000).unwrap();
    }
    let s = v.stats().unwrap();
    let most = (s.reserve_segments + 2) * s.segment_blocks * BLOCK_SIZE as u64
        + lsvfs::volume::format::DATA_START * BLOCK_SIZE as u64;
    v.close().unwrap();
    (host_bytes(&path), most)
}

/// The reserve is the lowest free segments, kept allocated on the host.
/// Freeing segments below it moves it down, and the segments it leaves
/// are free like any other: they must be discarded like any other. Both
/// orders of trims move it: trimming the data written last first frees
/// high segments, the reserve takes the lowest of them, and trimming the
/// rest frees lower ones.
#[test]
fn segments_the_reserve_leaves_are_discarded() {
    for trims in [vec![(0, 8192)], vec![(4096, 4096), (0, 4096)]] {
        let (held, most) = host_bytes_after_trims(&trims);
        eprintln!("trims {trims:?}: the host holds {held} bytes, at most {most} expected");
        assert!(
            held <= most,
            "after trims {trims:?} the host holds {held} bytes, more than the reserve and the \
             log's head: {most}"
        );
    }
}

#[test]
fn full_backing_device_gives_enospc_and_recovers() {
    let dev = Arc::new(MemDevice::new());
    create(&*dev, 16384, 64);
    // The device can hold far less than the volume could grow to.
    dev.set_capacity(Some(6 << 20));
    let v = open(dev.clone());
    let mut model = vec![0u64; 16384];
    let mut version = 0;
    let mut lba = 0;
    let err = loop {
        match write_run(&v, &mut model, lba, 32, &mut version) {
            Ok(()) => lba += 32,
            Err(e) => break e,
        }
        assert!(lba < 16384, "the device never filled");
    };
    assert!(matches!(err, VolumeError::NoSpace(_)), "{err:?}");
    assert_eq!(err.errno(), libc::ENOSPC);
    v.flush().unwrap();
    verify_all(&v, &model);
    // Free space inside the volume: trim half of what was written.
    v.trim(Lba(0), lba / 2).unwrap();
    for l in 0..lba / 2 {
        model[l as usize] = 0;
    }
    // Writes work again.
    for i in 0..8 {
        write_run(&v, &mut model, lba / 2 + i * 32, 32, &mut version).unwrap();
    }
    v.flush().unwrap();
    verify_all(&v, &model);
    assert!(v.check().unwrap().is_clean());
    // And after a crash, everything flushed is there.
    let img = dev.image();
    v.abandon();
    let v = open(Arc::new(MemDevice::from_image(img)));
    verify_all(&v, &model);
}

#[test]
fn thin_16_tib_volume_keeps_memory_bounded_by_the_cache() {
    let logical = 1u64 << 32; // 16 TiB
    let dev = mem_volume(logical, 1024);
    let v = Volume::open(
        dev.clone(),
        &master(),
        Options {
            cache_bytes: 256 * BLOCK_SIZE,
            ..opts()
        },
    )
    .unwrap();
    let mut rng = Rng(3);
    let lbas: Vec<u64> = (0..3000).map(|_| rng.below(logical)).collect();
    for l in &lbas {
        v.write(Lba(*l), &block(*l, 1)).unwrap();
        let s = v.stats().unwrap();
        assert!(
            s.cached_pages <= 256 + s.dirty_pages + 64,
            "cache grew to {} pages",
            s.cached_pages
        );
    }
    v.write(Lba(logical - 1), &block(logical - 1, 9)).unwrap();
    v.close().unwrap();
    let v = Volume::open(
        dev.clone(),
        &master(),
        Options {
            cache_bytes: 256 * BLOCK_SIZE,
            ..opts()
        },
    )
    .unwrap();
    let mut b = vec![0u8; BLOCK_SIZE];
    for l in &lbas {
        v.read(Lba(*l), &mut b).unwrap();
        assert_eq!(b, block(*l, 1));
        assert!(v.stats().unwrap().cached_pages <= 256 + 64);
    }
    v.read(Lba(logical - 1), &mut b).unwrap();
    assert_eq!(b, block(logical - 1, 9));
    assert!(matches!(
        v.read(Lba(logical), &mut b),
        Err(VolumeError::OutOfRange { .. })
    ));
    // The backing store holds only what was written, not 16 TiB.
    assert!(
        dev.len().unwrap() < 256 << 20,
        "device is {} bytes",
        dev.len().unwrap()
    );
}

#[test]
fn changed_bitmap_tracks_writes_and_trims_since_reset() {
    let dev = mem_volume(4096, 64);
    let v = open(dev.clone());
    v.write(Lba(10), &[block(10, 1), block(11, 1)].concat())
        .unwrap();
    let since = v.reset_changed().unwrap();
    assert!(v.changed_runs().unwrap().is_empty());
    v.write(
        Lba(100),
        &[block(100, 1), block(101, 1), block(102, 1)].concat(),
    )
    .unwrap();
    v.trim(Lba(11), 1).unwrap();
    v.trim(Lba(3000), 5).unwrap(); // never written: not a change
    assert_eq!(v.changed_runs().unwrap(), vec![(11, 1), (100, 3)]);
    v.close().unwrap();
    let v = open(dev);
    assert_eq!(v.changed_since().unwrap(), since);
    assert_eq!(v.changed_runs().unwrap(), vec![(11, 1), (100, 3)]);
    assert_eq!(v.allocated_runs().unwrap(), vec![(10, 1), (100, 3)]);
    assert_eq!(v.key_generation_bit(Lba(100)).unwrap(), Some(false));
    assert_eq!(v.key_generation_bit(Lba(11)).unwrap(), None);
}

/// The story: a transaction that dirties far more metadata pages than the
/// fixed reserve covers (thousands of scattered blocks) was admitted when
/// free space was just above the reserve; the checkpoint after it could
/// then never find room, every later write failed, `close` failed, and the
/// volume could only be opened read-only. Now admission reserves room for
/// the checkpoint of every page the transaction will dirty. Whatever the
/// free space, a commit either succeeds or fails cleanly, and the volume
/// can always be checkpointed, closed and reopened.
#[test]
fn a_transaction_dirtying_many_pages_never_wedges_the_volume() {
    let logical = 1u64 << 20; // 4 GiB: the map has 8192 leaves
    for cap_mib in [20u64, 24, 28, 32, 36, 40, 44] {
        let dev = Arc::new(MemDevice::new());
        create(&*dev, logical, 16);
        dev.set_capacity(Some(cap_mib << 20));
        let v = open(dev.clone());
        let mut model = vec![0u64; 65536];
        let mut version = 0;
        let mut lba = 0;
        while lba < 65536 && write_run(&v, &mut model, lba, 64, &mut version).is_ok() {
            lba += 64;
        }
        v.trim(Lba(0), lba / 3).unwrap();
        for l in 0..lba / 3 {
            model[l as usize] = 0;
        }
        // 3000 blocks, each in its own map leaf.
        let mut t = lsvfs::volume::Transaction::new();
        let mut scattered = Vec::new();
        for i in 0..3000u64 {
            let l = 65536 + i * 128;
            version += 1;
            t.write(Lba(l), block(l, version));
            scattered.push((l, version));
        }
        let committed = match v.commit(t) {
            Ok(()) => true,
            Err(VolumeError::NoSpace(_)) => false,
            Err(e) => panic!("capacity {cap_mib} MiB: {e}"),
        };
        v.close()
            .unwrap_or_else(|e| panic!("capacity {cap_mib} MiB: close failed: {e}"));
        let v = open(dev.clone());
        verify_all(&v, &model);
        let mut b = vec![0u8; BLOCK_SIZE];
        for (l, ver) in scattered.iter().step_by(97) {
            v.read(Lba(*l), &mut b).unwrap();
            if committed {
                assert_eq!(b, block(*l, *ver));
            } else {
                assert!(b.iter().all(|x| *x == 0));
            }
        }
        v.write(Lba(5), &block(5, 1))
            .unwrap_or_else(|e| panic!("capacity {cap_mib} MiB: volume wedged: {e}"));
    }
}

/// A tmpfs of `size` (mount's syntax), the full host file system a volume
/// file is put on; unmounted when dropped. Root only (CI runs as root).
struct SmallHost {
    dir: tempfile::TempDir,
}

impl SmallHost {
    fn mount(size: &str) -> SmallHost {
        assert_eq!(
            // SAFETY: geteuid has no preconditions and cannot fail.
            unsafe { libc::geteuid() },
            0,
            "this test mounts a tmpfs and must run as root (CI does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "lsvfs-test"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        SmallHost { dir }
    }
}

impl Drop for SmallHost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// A real full filesystem: the volume's file lives on a 24 MiB tmpfs, so
/// the kernel answers ENOSPC when the host is full. Cycles of "write until
/// full, then trim a third" must never fail a trim (the reserve stays
/// allocated on the host even after it has been used and refilled), writes
/// must work again after each trim, and no acknowledged data may change.
#[test]
fn full_host_filesystem_cycles_of_fill_and_trim() {
    let host = SmallHost::mount("24m");
    let mnt = host.dir.path();
    let path = mnt.join("v.vol");
    let dev = FileDevice::create(&path).unwrap();
    create(&dev, 16384, 64); // 64 MiB logical: more than the host holds
    drop(dev);
    let v = Volume::open(
        Arc::new(FileDevice::open(&path, true).unwrap()),
        &master(),
        opts(),
    )
    .unwrap();
    let mut model = vec![0u64; 16384];
    let mut version = 0;
    let mut rng = Rng(11);
    for cycle in 0..6 {
        let mut writes = 0;
        loop {
            let lba = rng.below(16384 - 16);
            match write_run(&v, &mut model, lba, 16, &mut version) {
                Ok(()) => writes += 1,
                Err(VolumeError::NoSpace(_)) => break,
                Err(e) => panic!("cycle {cycle}: {e}"),
            }
            assert!(writes < 100_000);
        }
        // Trim a third of what is mapped, scattered.
        let mapped: Vec<u64> = (0..16384).filter(|l| model[*l as usize] != 0).collect();
        for l in mapped.iter().step_by(3) {
            v.trim(Lba(*l), 1)
                .unwrap_or_else(|e| panic!("cycle {cycle}: trim failed on a full host: {e}"));
            model[*l as usize] = 0;
        }
        for _ in 0..20 {
            let lba = rng.below(16384 - 16);
            write_run(&v, &mut model, lba, 16, &mut version)
                .unwrap_or_else(|e| panic!("cycle {cycle}: writing after a trim: {e}"));
        }
    }
    v.flush().unwrap();
    verify_all(&v, &model);
    assert!(v.check().unwrap().is_clean());
    v.close().unwrap();
    let v = Volume::open(
        Arc::new(FileDevice::open(&path, true).unwrap()),
        &master(),
        opts(),
    )
    .unwrap();
    verify_all(&v, &model);
}

/// Fills the volume's host (a 24 MiB tmpfs) and trims a third of what is
/// mapped, `cycles` times, writing 16-block runs: trims and the cleaner
/// then append into the reserve.
fn fill_and_trim(v: &Volume, model: &mut [u64], version: &mut u64, rng: &mut Rng, cycles: u32) {
    let n = model.len() as u64;
    for cycle in 0..cycles {
        let mut writes = 0;
        loop {
            match write_run(v, model, rng.below(n - 16), 16, version) {
                Ok(()) => writes += 1,
                Err(VolumeError::NoSpace(_)) => break,
                Err(e) => panic!("cycle {cycle}: {e}"),
            }
            assert!(writes < 100_000);
        }
        trim_third(v, model);
    }
}

fn trim_third(v: &Volume, model: &mut [u64]) {
    let mapped: Vec<usize> = (0..model.len()).filter(|l| model[*l] != 0).collect();
    for &l in mapped.iter().step_by(3) {
        v.trim(Lba(l as u64), 1)
            .unwrap_or_else(|e| panic!("trim on a full host: {e}"));
        model[l] = 0;
    }
}

/// Steps the rekey until it has finished or `steps` were taken; when the
/// full host leaves it no room it says so, and trimming a third of what is
/// mapped lets it go on. Writes go on between the steps. Returns whether
/// it finished.
fn rekey_on_full_host(
    v: &Volume,
    model: &mut [u64],
    version: &mut u64,
    rng: &mut Rng,
    steps: u32,
) -> bool {
    let n = model.len() as u64;
    for _ in 0..steps {
        match v.rekey_step() {
            Ok(true) => {}
            Ok(false) => return true,
            Err(VolumeError::NoSpace(why)) => {
                assert!(why.contains("delete or trim"), "no way out in: {why}");
                trim_third(v, model);
            }
            Err(e) => panic!("rekey step on a full host: {e}"),
        }
        for _ in 0..4 {
            if let Err(e) = write_run(v, model, rng.below(n - 16), 16, version) {
                assert!(matches!(e, VolumeError::NoSpace(_)), "write: {e}");
            }
        }
    }
    false
}

/// A rekey on a full host: the backing file cannot grow, so what the pass
/// moves goes into free segments and the reserve, which the log reuses
/// without punching them. The pass is interrupted while the older key
/// generation still seals blocks (the volume closed and opened again, so
/// that the resumed pass reads every segment's records to find them) and
/// finishes; the older generation is then retired, so a block it still
/// sealed would no longer read. Every block must read back as last
/// written, before and after reopening, and only the new generation may
/// seal anything. (A resumed pass that skips every segment fails it;
/// dropping `holds_older`'s check of the records' sequence does not, so
/// this does not show that check's case.)
#[test]
fn a_rekey_on_a_full_host_interrupted_and_resumed_loses_nothing() {
    let host = SmallHost::mount("24m");
    let path = host.dir.path().join("v.vol");
    let dev = FileDevice::create(&path).unwrap();
    create(&dev, 16384, 64);
    drop(dev);
    let reopen = || {
        Volume::open(
            Arc::new(FileDevice::open(&path, true).unwrap()),
            &master(),
            opts(),
        )
        .unwrap()
    };
    let v = reopen();
    let mut model = vec![0u64; 16384];
    let mut version = 0;
    let mut rng = Rng(23);
    fill_and_trim(&v, &mut model, &mut version, &mut rng, 3);
    let (entry, secret) = lsvfs::volume::new_key_generation(v.header(), &master()).unwrap();
    v.rekey_start(entry, &secret).unwrap();
    assert!(
        !rekey_on_full_host(&v, &mut model, &mut version, &mut rng, 6),
        "the pass should still be running when the volume is closed"
    );
    // The host stays full: the writes between the steps took what the
    // steps freed.
    let before = v.blocks_by_key_gen().unwrap();
    assert!(
        before.get(&0).is_some_and(|n| *n > 0),
        "the older generation should still seal blocks when the pass is interrupted: {before:?}"
    );
    v.close().unwrap();

    let v = reopen();
    verify_all(&v, &model);
    assert!(
        rekey_on_full_host(&v, &mut model, &mut version, &mut rng, 10_000),
        "the rekey never finished"
    );
    let gens = v.blocks_by_key_gen().unwrap();
    assert!(
        gens.keys().all(|g| *g == entry.key_gen),
        "blocks sealed under an older generation after the rekey: {gens:?}"
    );
    verify_all(&v, &model);
    assert!(v.check().unwrap().is_clean());
    v.close().unwrap();
    let v = reopen();
    verify_all(&v, &model);
    assert!(v.check().unwrap().is_clean());
}

/// Segments the log wrote whole with zeros before using them (prepared):
/// their offsets, in the order recorded.
fn prepared_segments(ops: &[lsvfs::device::RecordedOp], seg_bytes: usize) -> Vec<u64> {
    ops.iter()
        .filter_map(|op| match op {
            lsvfs::device::RecordedOp::Write { offset, data }
                if data.len() == seg_bytes && data.iter().all(|b| *b == 0) =>
            {
                Some(*offset)
            }
            _ => None,
        })
        .collect()
}

/// A log whose records are flushed one by one (an fsync after every small
/// write) writes each segment once with zeros before it fills it, so that
/// its flushes overwrite written blocks on the host; a writer of large runs
/// that flushes rarely gets no such writes. Either way, everything written
/// reads back, also after reopening, including segments the cleaner freed
/// and the log prepared again.
#[test]
fn segments_are_prepared_for_flush_per_write_and_not_for_large_runs() {
    const SEG: u32 = 64;
    let seg_bytes = SEG as usize * BLOCK_SIZE;
    let logical = 2048;
    let mut version = 0;

    let dev = mem_volume(logical, SEG);
    let v = open(dev.clone());
    dev.record();
    let mut model = vec![0u64; logical as usize];
    let mut rng = Rng(7);
    for i in 0..3000 {
        write_run(&v, &mut model, rng.below(256), 1, &mut version).unwrap();
        v.flush().unwrap();
        if i % 200 == 199 {
            // Empty segments and free them, so the log reuses some.
            v.clean(8).unwrap();
        }
    }
    let ops = dev.take_ops();
    let prepared = prepared_segments(&ops, seg_bytes);
    // 3,000 records of two blocks fill about 94 segments of 64.
    assert!(prepared.len() >= 50, "prepared {}", prepared.len());
    // Some were segments the log had used before and the cleaner freed.
    let reused = ops
        .iter()
        .enumerate()
        .filter(|(i, op)| {
            let lsvfs::device::RecordedOp::Write { offset, data } = op else {
                return false;
            };
            data.len() == seg_bytes
                && data.iter().all(|b| *b == 0)
                && ops[..*i].iter().any(|o| {
                    matches!(o, lsvfs::device::RecordedOp::Write { offset: o2, data: d2 }
                        if *o2 >= *offset && *o2 < offset + seg_bytes as u64
                            && d2.len() < seg_bytes)
                })
        })
        .count();
    assert!(reused > 0, "no prepared segment had been used before");
    verify_all(&v, &model);
    v.close().unwrap();
    let v = open(dev.clone());
    verify_all(&v, &model);
    assert!(v.check().unwrap().is_clean());
    drop(v);

    // Large runs, flushed every eight: nothing is prepared.
    let dev = mem_volume(logical, SEG);
    let v = open(dev.clone());
    dev.record();
    let mut model = vec![0u64; logical as usize];
    for i in 0..64u64 {
        write_run(&v, &mut model, (i * 48) % 1024, 48, &mut version).unwrap();
        if i % 8 == 7 {
            v.flush().unwrap();
        }
    }
    let ops = dev.take_ops();
    assert_eq!(prepared_segments(&ops, seg_bytes), Vec::<u64>::new());
    verify_all(&v, &model);
}

/// The reserve segments are allocated on the host once, not again at every
/// checkpoint (each allocation is a host call under the volume lock), and
/// a volume whose host is full still checkpoints from them.
#[test]
fn reserve_segments_are_allocated_once_not_at_every_checkpoint() {
    let dev = mem_volume(2048, 64);
    let v = open(dev.clone());
    let mut model = vec![0u64; 2048];
    let mut version = 0;
    write_run(&v, &mut model, 0, 64, &mut version).unwrap();
    v.checkpoint().unwrap();
    let before = dev.allocations();
    assert!(before >= 3, "the reserve was not allocated: {before} calls");
    for i in 0..40 {
        write_run(&v, &mut model, 100 + i, 1, &mut version).unwrap();
        v.checkpoint().unwrap();
    }
    // Only segments that entered the reserve (freed ones below it) and
    // those the log grew into; not the reserve again at each checkpoint.
    let during = dev.allocations() - before;
    assert!(during < 10, "{during} allocations over 40 checkpoints");
    verify_all(&v, &model);
    // The host fills up: checkpoints still run from the reserve.
    dev.set_capacity(Some(dev.len().unwrap()));
    for i in 0..8 {
        v.trim(Lba(100 + i), 1).unwrap();
        model[100 + i as usize] = 0;
        v.checkpoint().unwrap();
    }
    verify_all(&v, &model);
    v.close().unwrap();
    verify_all(&open(dev.clone()), &model);
}

/// Where `lba` lies in the log, as a segment number.
fn segment_of(v: &Volume, lba: u64, seg_blocks: u64) -> u64 {
    let pba = v
        .locate(Lba(lba))
        .unwrap()
        .expect("written block is mapped");
    pba / seg_blocks
}

#[test]
fn reused_segments_are_taken_in_order_so_data_written_in_turn_lies_in_turn() {
    // Fill a volume, trim it all and let the cleaner free its segments;
    // then write again. The log takes freed segments going up from the
    // one it took last, so blocks written one after another lie one after
    // another in the backing file (the host's read-ahead then serves a
    // reader that reads them back in the same order). Taking the highest
    // free segment each time would lay every segment below the last.
    let dir = tempfile::tempdir().unwrap();
    let seg = 64u32;
    let (_path, dev) = file_volume(&dir, 16384, seg);
    let v = Volume::open(dev, &master(), opts()).unwrap();
    let first: Vec<u8> = (0..4096).flat_map(|l| block(l, 1)).collect();
    for (i, c) in first.chunks(256 * BLOCK_SIZE).enumerate() {
        v.write(Lba(i as u64 * 256), c).unwrap();
    }
    v.checkpoint().unwrap();
    v.trim(Lba(0), 4096).unwrap();
    v.clean(1000).unwrap();
    v.checkpoint().unwrap();
    // 32 blocks a transaction, as a copy of small files would write them.
    for lba in (0..2048u64).step_by(32) {
        let data: Vec<u8> = (lba..lba + 32).flat_map(|l| block(l, 2)).collect();
        v.write(Lba(lba), &data).unwrap();
    }
    let segs: Vec<u64> = (0..2048).map(|l| segment_of(&v, l, seg as u64)).collect();
    let mut order = segs.clone();
    order.dedup();
    let downs = order.windows(2).filter(|w| w[1] < w[0]).count();
    assert!(
        order.len() > 20,
        "the writes should span many segments: {order:?}"
    );
    // One step down is allowed: the log wraps round to the lowest free
    // segment once it passes the highest.
    assert!(
        downs <= 1,
        "{downs} steps down in the order the writes took segments: {order:?}"
    );
    let mut buf = vec![0u8; BLOCK_SIZE];
    for l in (0..2048).step_by(97) {
        v.read(Lba(l), &mut buf).unwrap();
        assert!(buf == block(l, 2), "block {l}");
    }
}
