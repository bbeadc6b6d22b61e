//! How long a file lives, through the real kernel FUSE mount: an inode
//! outlives its last name until its last close and the kernel's last
//! FORGET, so sync, fsync and snapshots never fail because a file was
//! deleted, renamed over or truncated before them; and nothing is left
//! behind once the mount ends.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mounted::{lsvfs, ok, Mounted};

const BIN: &str = env!("CARGO_BIN_EXE_lsvfs");

/// syncfs(2) on the file system holding `path`.
fn syncfs(path: &Path) -> std::io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `lsvfs check` on the unmounted volume: clean, and the number of
/// orphans it reports.
fn check_orphans(m: &Mounted) -> u64 {
    let c = ok(&["check", "v.vol", "--key-file", "k"], m.p());
    assert!(c.contains("v.vol: clean"), "{c}");
    let line = c
        .lines()
        .find(|l| l.starts_with("file system:"))
        .unwrap_or_else(|| panic!("no file-system line in {c}"));
    line.rsplit(", ")
        .next()
        .and_then(|w| w.strip_suffix(" orphans"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no orphan count in {line:?}"))
}

/// The bug: `rm b` then `lsvfs snapshot create M s2` failed with "syncfs
/// on M: No such file or directory", exit 1. The kernel still held the
/// unlinked inode (its lookup count was not zero) and wrote its times back
/// during the snapshot's syncfs; the daemon had already freed the inode at
/// unlink and answered ENOENT, and syncfs returned the error.
#[test]
fn a_snapshot_right_after_rm_succeeds() {
    let m = Mounted::with_size("256M");
    m.sh("echo keep > b");
    ok(&["snapshot", "create", "m", "s1"], m.p());
    m.sh("rm b");
    let out = ok(&["snapshot", "create", "m", "s2"], m.p());
    assert!(out.contains("snapshot s2 taken"), "{out}");
    assert_eq!(m.sh("cat .snapshots/s1/b"), "keep\n");
    assert!(!m.m().join(".snapshots/s2/b").exists());
    // And every time, not only the first: files written and removed
    // between snapshots, some of them still open.
    for round in 0..10 {
        let held = File::create(m.m().join(format!("held{round}"))).unwrap();
        m.sh(&format!(
            "echo {round} > f{round} && touch -d @1000 f{round} && rm f{round} held{round}"
        ));
        ok(&["snapshot", "create", "m", &format!("r{round}")], m.p());
        drop(held);
    }
    m.unmount();
    assert_eq!(check_orphans(&m), 0);
}

/// The same bug through `mkdir .snapshots/x`, which answered ENOENT
/// ("mkdir: cannot create directory") after an rm.
#[test]
fn mkdir_in_snapshots_right_after_rm_succeeds() {
    let m = Mounted::with_size("256M");
    m.sh("echo keep > b && mkdir .snapshots/s1 && rm b");
    m.sh("mkdir .snapshots/s2");
    assert_eq!(m.sh("ls .snapshots"), "s1\ns2\n");
    assert_eq!(m.sh("cat .snapshots/s1/b"), "keep\n");
    m.unmount_and_check();
}

/// A file replaced by rename while another process still has it open
/// with unwritten pages: syncfs must write those pages back to the old
/// inode (now an orphan), not fail; the new name holds the new file.
#[test]
fn rename_over_a_file_with_dirty_pages_then_syncfs() {
    let m = Mounted::with_size("256M");
    let mut old = File::create(m.m().join("a")).unwrap();
    old.write_all(&vec![b'o'; 300_000]).unwrap();
    fs::write(m.m().join("b"), "new").unwrap();
    fs::rename(m.m().join("b"), m.m().join("a")).unwrap();
    syncfs(&m.m()).expect("syncfs after a rename over a dirty file");
    // The replaced file still works through its descriptor.
    old.write_all(b"tail").unwrap();
    old.sync_all().expect("fsync of the replaced file");
    assert_eq!(fs::read_to_string(m.m().join("a")).unwrap(), "new");
    drop(old);
    syncfs(&m.m()).expect("syncfs after the last close");
    // The same with the old file closed but its times not yet written
    // back, and with a truncate before.
    for i in 0..20 {
        m.sh(&format!(
            "head -c 50000 /dev/urandom > c{i} && truncate -s 100 c{i} && echo n > d{i} && mv d{i} c{i}"
        ));
        syncfs(&m.m()).expect("syncfs after truncate and rename over");
    }
    ok(&["snapshot", "create", "m", "after"], m.p());
    assert_eq!(m.sh("cat .snapshots/after/c7"), "n\n");
    m.unmount();
    assert_eq!(check_orphans(&m), 0);
}

/// An open file unlinked with dirty pages: it keeps working as on ext4
/// (write, read, fstat with nlink 0, fchmod, ftruncate, xattrs), and after
/// the last close, syncfs and a snapshot succeed and its space comes back.
#[test]
fn unlink_of_an_open_file_with_dirty_pages_then_close_and_syncfs() {
    let m = Mounted::with_size("256M");
    let path = m.m().join("f");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(&vec![7u8; 8 << 20]).unwrap();
    fs::remove_file(&path).unwrap();
    assert!(!path.exists());
    f.write_all(b"after unlink").unwrap();
    let st = f.metadata().unwrap();
    assert_eq!(st.nlink(), 0);
    assert_eq!(st.len(), (8 << 20) + 12);
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap();
    assert_eq!(f.metadata().unwrap().mode() & 0o777, 0o600);
    let name = std::ffi::CString::new("user.k").unwrap();
    // SAFETY: valid descriptor, name and value buffers for the calls.
    unsafe {
        assert_eq!(
            libc::fsetxattr(f.as_raw_fd(), name.as_ptr(), b"v".as_ptr().cast(), 1, 0),
            0,
            "fsetxattr on an unlinked file: {}",
            std::io::Error::last_os_error()
        );
        let mut buf = [0u8; 8];
        let n = libc::fgetxattr(f.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), 8);
        assert_eq!(n, 1, "fgetxattr: {}", std::io::Error::last_os_error());
        assert_eq!(buf[0], b'v');
    }
    syncfs(&m.m()).expect("syncfs while the unlinked file is open");
    f.set_len(5 << 20).unwrap();
    f.seek(SeekFrom::Start(4 << 20)).unwrap();
    let mut b = vec![0u8; 4];
    f.read_exact(&mut b).unwrap();
    assert_eq!(b, [7u8; 4]);
    let free_open = fs2_free(&m.m());
    f.sync_all().unwrap();
    drop(f);
    syncfs(&m.m()).expect("syncfs after the last close of an unlinked file");
    ok(&["snapshot", "create", "m", "s"], m.p());
    // The kernel sends RELEASE after close returns: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs2_free(&m.m()) < free_open + (4 << 20) {
        assert!(
            Instant::now() < deadline,
            "the unlinked file's blocks are free after its last close"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m.unmount();
    assert_eq!(check_orphans(&m), 0);
}

fn fs2_free(dir: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(dir).unwrap();
    s.blocks_available() * s.fragment_size()
}

/// `sync -f` right after an unlink failed with ENOENT every time, for the
/// same reason as the snapshots above. 1,000 create/write/unlink cycles
/// (some files unlinked while open), with `sync` and snapshots right after
/// some unlinks and all the time from other processes: every sync and
/// snapshot succeeds, `lsvfs check` is clean, and no orphan is left after
/// unmount.
#[test]
fn a_thousand_unlinks_under_sync_and_snapshots() {
    let m = Mounted::with_size("512M");
    let stop = Arc::new(AtomicBool::new(false));
    let mnt = m.m();
    let syncer = {
        let stop = stop.clone();
        let mnt = mnt.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let st = Command::new("sync").arg("-f").arg(&mnt).status().unwrap();
                assert!(st.success(), "sync -f failed: {st}");
                let st = Command::new("sync").status().unwrap();
                assert!(st.success(), "sync failed: {st}");
                n += 1;
            }
            n
        })
    };
    let snapper = {
        let stop = stop.clone();
        let dir = m.p().to_path_buf();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("s{n}");
                let out = lsvfs(&["snapshot", "create", "m", &name], &dir);
                assert!(
                    out.status.success(),
                    "snapshot {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                if n >= 2 {
                    ok(&["snapshot", "delete", "m", &format!("s{}", n - 2)], &dir);
                }
                n += 1;
            }
            n
        })
    };
    let mut open = Vec::new();
    for i in 0..1000 {
        let p = mnt.join(format!("f{}", i % 37));
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![i as u8; 1000 + (i * 97) % 20000])
            .unwrap();
        if i % 3 == 0 {
            f.sync_data().unwrap();
        }
        if i % 10 == 0 {
            fs::remove_file(&p).unwrap();
            open.push(f); // closed later, after its name is long gone
        } else {
            drop(f);
            fs::remove_file(&p).unwrap();
        }
        // Right after an unlink, as well as whenever the other process
        // gets to it.
        if i % 10 == 5 {
            let st = Command::new("sync").arg("-f").arg(&mnt).status().unwrap();
            assert!(st.success(), "sync -f right after an unlink: {st}");
        }
        if i % 100 == 50 {
            ok(&["snapshot", "create", "m", &format!("main{i}")], m.p());
        }
        if open.len() > 5 {
            open.remove(0);
        }
    }
    drop(open);
    stop.store(true, Ordering::Relaxed);
    let syncs = syncer.join().expect("every sync succeeded");
    let snaps = snapper.join().expect("every snapshot succeeded");
    assert!(syncs > 0 && snaps > 0, "syncs {syncs}, snapshots {snaps}");
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0);
    m.unmount();
    assert_eq!(check_orphans(&m), 0, "no orphan left after unmount");
}

/// fallocate through the kernel: preallocation takes space at once (st_blocks,
/// statfs) and reads as zeros; FALLOC_FL_ZERO_RANGE (which answered EINVAL,
/// then EOPNOTSUPP) zeroes a range, partial blocks and pages the kernel has
/// cached included, with and without KEEP_SIZE; PUNCH_HOLE frees. The
/// kernel's FUSE client itself refuses COLLAPSE_RANGE and INSERT_RANGE
/// with EOPNOTSUPP (fuse_file_fallocate passes only KEEP_SIZE, PUNCH_HOLE
/// and ZERO_RANGE to a FUSE server), which programs fall back on.
#[test]
fn fallocate_modes_through_the_kernel() {
    const KEEP_SIZE: libc::c_int = 0x01;
    const PUNCH_HOLE: libc::c_int = 0x02;
    const COLLAPSE_RANGE: libc::c_int = 0x08;
    const ZERO_RANGE: libc::c_int = 0x10;
    const INSERT_RANGE: libc::c_int = 0x20;
    let m = Mounted::with_size("2G");
    let falloc = |f: &fs::File, mode: libc::c_int, off: i64, len: i64| {
        // SAFETY: a valid descriptor; fallocate takes plain integers.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let statfs_used = |p: &std::path::Path| {
        let s = nix::sys::statvfs::statvfs(p).unwrap();
        (s.blocks() - s.blocks_free()) * s.fragment_size()
    };
    let used_before = statfs_used(&m.m());
    let big = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.m().join("big"))
        .unwrap();
    falloc(&big, 0, 0, 1 << 30).unwrap();
    let md = big.metadata().unwrap();
    assert_eq!(md.len(), 1 << 30);
    assert!(md.blocks() * 512 >= 1 << 30, "st_blocks {}", md.blocks());
    let used = statfs_used(&m.m()) - used_before;
    assert!(
        used >= 1 << 30,
        "statfs counts the preallocated GiB: {used}"
    );
    let mut buf = vec![1u8; 1 << 20];
    big.read_exact_at(&mut buf, 700 << 20).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    drop(big);

    let orig: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
    fs::write(m.m().join("f"), &orig).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.m().join("f"))
        .unwrap();
    // Cached pages, partial blocks at both ends.
    let mut want = orig.clone();
    falloc(&f, ZERO_RANGE, 5000, 100_000).unwrap();
    want[5000..105_000].fill(0);
    let mut got = vec![0u8; want.len()];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got == want, "ZERO_RANGE through the page cache");
    // Past the end: grows the file, or with KEEP_SIZE only allocates.
    falloc(&f, ZERO_RANGE, 290_000, 20_000).unwrap();
    want[290_000..].fill(0);
    want.resize(310_000, 0);
    assert_eq!(f.metadata().unwrap().len(), 310_000);
    falloc(&f, ZERO_RANGE | KEEP_SIZE, 300_000, 100_000).unwrap();
    want[300_000..].fill(0);
    assert_eq!(f.metadata().unwrap().len(), 310_000);
    falloc(&f, PUNCH_HOLE | KEEP_SIZE, 150_001, 50_000).unwrap();
    want[150_001..200_001].fill(0);
    for (mode, name) in [(COLLAPSE_RANGE, "COLLAPSE"), (INSERT_RANGE, "INSERT")] {
        let e = falloc(&f, mode, 0, 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{name}: {e}");
    }
    drop(f);
    // What a new open reads, and (after the unmount) what is on disk.
    assert!(fs::read(m.m().join("f")).unwrap() == want);
    m.unmount_and_check();
    m.mount();
    assert!(fs::read(m.m().join("f")).unwrap() == want);
    m.unmount_and_check();
}

/// `lsvfs unmount` ran fusermount3 even as root and failed where fuse3 is
/// not installed, although the mount itself worked. As root it unmounts
/// with umount2(2) and needs no helper.
#[test]
fn unmount_as_root_needs_no_fusermount3() {
    let m = Mounted::with_size("256M");
    m.sh("echo x > f");
    let o = Command::new(BIN)
        .args(["unmount", "m"])
        .current_dir(m.p())
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("unmounted"));
    assert_eq!(check_orphans(&m), 0);
}
