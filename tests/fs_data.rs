//! File data and attributes through the file-system API: contents match a
//! model under random writes, truncates and hole punches across kills;
//! space comes back on unlink; xattrs and setattr behave as POSIX says.

mod common;

use std::sync::Arc;

use common::{long_acl, master, mem_volume, open, opts, Rng};
use lsvfs::device::MemDevice;
use lsvfs::fs::format::Time;
use lsvfs::fs::{
    Fs, Ino, SetAttr, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE, XATTR_CREATE,
    XATTR_REPLACE,
};

use lsvfs::fs::ROOT_INO as ROOT;
const REG: u32 = libc::S_IFREG | 0o644;

fn new_fs(logical: u64) -> (Arc<MemDevice>, Fs) {
    let dev = mem_volume(logical, 256);
    let v = open(dev.clone());
    Fs::format(&v, 0, 0).unwrap();
    (dev, Fs::mount(v).unwrap())
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

#[test]
fn random_io_matches_a_model_across_kills() {
    random_io_across_kills(false, 5);
}

/// The same with the mount's settings (the kernel keeps file times) and a
/// third of the writes large (64 KiB to 1 MiB), half of those past the
/// end of the file, on a block boundary or not: large appends go without
/// the metadata lock (`Fs::appends_unlocked`), in three steps.
#[test]
fn random_large_io_matches_a_model_across_kills() {
    random_io_across_kills(true, 6);
}

fn random_io_across_kills(large: bool, seed: u64) {
    let (mut dev, mut fs) = new_fs(65536);
    fs.set_kernel_times(large);
    let (ino, _) = fs.mknod(ROOT, b"f", REG, 0, 0, 0).unwrap();
    let mut model: Vec<u8> = Vec::new();
    let mut kept = vec![0xa5u8; 64 << 10];
    let mut rng = Rng(seed);
    let (mut appends, mut unlocked) = (0, 0);
    const SPAN: u64 = 3 << 20;
    for step in 0..600 {
        match rng.below(10) {
            0..=5 => {
                let mut off = rng.below(SPAN);
                let mut len = (rng.below(3) * 4096 + rng.below(9000)) as usize + 1;
                if large && rng.below(3) == 0 {
                    len = (64 << 10) + rng.below(1 << 20) as usize;
                    if rng.below(2) == 0 && model.len() < (8 << 20) {
                        let gap = rng.below(3) * 4096 + rng.below(2) * rng.below(4096);
                        off = (model.len() as u64).next_multiple_of(4096) + gap;
                        appends += 1;
                    }
                }
                let data = pattern(step, len);
                fs.write_data(ino, off, &data, false).unwrap();
                let end = off as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            6 => {
                let size = rng.below(SPAN);
                fs.setattr(ino, SetAttr::size(size)).unwrap();
                model.resize(size as usize, 0);
            }
            7 => {
                let off = rng.below(SPAN);
                let len = rng.below(200_000) + 1;
                let mode = [
                    FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE,
                    FALLOC_ZERO_RANGE,
                    FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE,
                    0,
                    FALLOC_KEEP_SIZE,
                ][rng.below(5) as usize];
                fs.fallocate(ino, off, len, mode).unwrap();
                let end = (off + len) as usize;
                if mode & FALLOC_KEEP_SIZE == 0 && model.len() < end {
                    model.resize(end, 0);
                }
                let end = end.min(model.len());
                if mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE) != 0 && (off as usize) < end {
                    model[off as usize..end].fill(0);
                }
            }
            _ => {
                let off = rng.below(SPAN);
                let len = rng.below(100_000) as usize + 1;
                let got = fs.read_data(ino, off, len).unwrap();
                let want = model
                    .get(off as usize..(off as usize + len).min(model.len()))
                    .unwrap_or(&[]);
                assert!(got == want, "step {step}: read {off}+{len} differs");
                // The mount's path: one buffer kept across reads, holding
                // the last read's bytes where this one has holes.
                let span = Fs::read_span(off, len);
                if kept.len() < span {
                    kept.resize(span, 0xa5);
                }
                let r = fs.read_data_into(ino, off, len, &mut kept).unwrap();
                assert!(
                    kept[r] == *want,
                    "step {step}: read {off}+{len} into a used buffer differs"
                );
            }
        }
        if step % 100 == 99 {
            // A kill after every completed operation reached the log (a
            // kill loses what is still pending: see fs_namespace.rs).
            fs.commit_pending().unwrap();
            unlocked += fs.appends_unlocked();
            let img = dev.image();
            drop(fs);
            dev = Arc::new(MemDevice::from_image(img));
            fs = Fs::mount(open(dev.clone())).unwrap();
            fs.set_kernel_times(large);
            assert_eq!(fs.getattr(ino).unwrap().size, model.len() as u64);
            let got = fs.read_data(ino, 0, model.len()).unwrap();
            assert!(got == model, "after the kill at step {step}");
            let report = fs.check().unwrap();
            assert!(
                report.problems.is_empty(),
                "step {step}: {:?}",
                report.problems
            );
        }
    }
    // A buffer short of the blocks the read touches is refused, not
    // overrun or read short.
    let at = 4096 - 10;
    let short = fs.read_data_into(ino, at, 20, &mut [0u8; 4096]);
    assert_eq!(Fs::read_span(at, 20), 8192);
    assert_eq!(short.map_err(|e| e.errno()), Err(libc::EINVAL));
    // Asking for more than the file holds allocates for what it holds.
    assert!(fs.read_data(ino, 0, usize::MAX).unwrap() == model);
    if large {
        unlocked += fs.appends_unlocked();
        assert!(
            unlocked > 10,
            "{unlocked} of {appends} large appends went without the lock"
        );
    }
}

#[test]
fn sparse_large_files_and_fallocate() {
    let (_dev, fs) = new_fs(1 << 24);
    let (ino, _) = fs.mknod(ROOT, b"big", REG, 0, 0, 0).unwrap();
    let at = 5u64 << 30; // past 4 GiB
    fs.write_data(ino, at, b"far away", false).unwrap();
    let i = fs.getattr(ino).unwrap();
    assert_eq!((i.size, i.blocks), (at + 8, 1));
    assert_eq!(fs.read_data(ino, at - 4, 12).unwrap(), b"\0\0\0\0far away");
    assert!(fs
        .read_data(ino, 1 << 30, 8192)
        .unwrap()
        .iter()
        .all(|b| *b == 0));
    // fallocate: mode 0 extends, KEEP_SIZE does not.
    let (f, _) = fs.mknod(ROOT, b"pre", REG, 0, 0, 0).unwrap();
    fs.fallocate(f, 0, 10 * 4096, 0).unwrap();
    assert_eq!(
        (fs.getattr(f).unwrap().size, fs.getattr(f).unwrap().blocks),
        (40960, 10)
    );
    fs.fallocate(f, 40960, 4096, FALLOC_KEEP_SIZE).unwrap();
    assert_eq!(
        (fs.getattr(f).unwrap().size, fs.getattr(f).unwrap().blocks),
        (40960, 11)
    );
    // Punching a hole changes the content: mtime moves (as on ext4).
    let old = lsvfs::fs::format::Time { sec: 1000, nsec: 0 };
    fs.setattr(
        f,
        SetAttr {
            mtime: Some(old),
            ..SetAttr::default()
        },
    )
    .unwrap();
    fs.fallocate(f, 4096, 8192, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE)
        .unwrap();
    assert_eq!(fs.getattr(f).unwrap().blocks, 9);
    assert!(
        fs.getattr(f).unwrap().mtime.sec > old.sec,
        "punch hole sets mtime"
    );
    assert_eq!(
        fs.fallocate(f, 0, 10, FALLOC_PUNCH_HOLE)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    assert_eq!(fs.fallocate(f, 0, 0, 0).unwrap_err().errno(), libc::EINVAL);
}

#[test]
fn unlink_and_truncate_give_space_back() {
    let (_dev, fs) = new_fs(65536);
    let before = fs.statfs().unwrap().free_blocks;
    let (ino, _) = fs.mknod(ROOT, b"f", REG, 0, 0, 0).unwrap();
    fs.write_data(ino, 0, &pattern(1, 1 << 20), false).unwrap();
    assert!(fs.statfs().unwrap().free_blocks <= before - 256);
    fs.setattr(ino, SetAttr::size(4096)).unwrap();
    assert_eq!(fs.getattr(ino).unwrap().blocks, 1);
    // Truncating inside a block zeroes its tail: growing again shows zeros.
    fs.setattr(ino, SetAttr::size(100)).unwrap();
    fs.setattr(ino, SetAttr::size(4096)).unwrap();
    let b = fs.read_data(ino, 0, 4096).unwrap();
    assert_eq!(&b[..100], &pattern(1, 100)[..]);
    assert!(b[100..].iter().all(|x| *x == 0));
    fs.unlink(ROOT, b"f").unwrap();
    assert_eq!(fs.statfs().unwrap().free_blocks, before);
    let used = fs.mapped_blocks().unwrap();
    assert!(
        used < 8,
        "{used} blocks still mapped after deleting the only file"
    );
}

/// Asserts that xattr `name` of `ino` reads back as `want` (without
/// printing 64 KiB values).
fn same(fs: &Fs, ino: Ino, name: &str, want: &[u8]) {
    let got = fs.getxattr(ino, name.as_bytes()).unwrap();
    assert!(
        got == want,
        "{name}: {} bytes read back, {} stored; first difference at {:?}",
        got.len(),
        want.len(),
        got.iter().zip(want).position(|(a, b)| a != b)
    );
}

/// The format version in the superblock (logical block 0) of the file
/// system on `dev`, as committed.
fn fs_version(dev: &MemDevice) -> u32 {
    let v = open(Arc::new(MemDevice::from_image(dev.image())));
    let mut b = vec![0u8; 4096];
    v.read(lsvfs::volume::Lba(0), &mut b).unwrap();
    u32::from_le_bytes(b[8..12].try_into().unwrap())
}

/// xattr values up to the kernel's 64 KiB, stored past one metadata item
/// in pieces: each length round the piece size reads back whole, across a
/// remount; a shorter value, a removal and an unlinked file leave no piece
/// behind (`check` finds a stray one); the superblock says version 2 only
/// once a value has pieces, so that older builds refuse just those file
/// systems; an ACL too long for one item is inherited whole.
#[test]
fn long_xattr_values_are_stored_in_pieces() {
    let (mut dev, mut fs) = new_fs(65536);
    let clean = |fs: &Fs| {
        let r = fs.check().unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    };
    let (ino, _) = fs.mknod(ROOT, b"f", REG, 0, 0, 0).unwrap();
    fs.setxattr(ino, b"user.short", &pattern(1, 1699), 0)
        .unwrap();
    fs.setxattr(ino, b"user.one", &pattern(2, 1700), 0).unwrap();
    fs.sync().unwrap();
    assert_eq!(fs_version(&dev), 1, "no value has pieces yet");
    let lens = [1701, 3399, 3400, 3401, 5000, 65535, 65536];
    for (i, &len) in lens.iter().enumerate() {
        fs.setxattr(
            ino,
            format!("user.l{i}").as_bytes(),
            &pattern(10 + i as u64, len),
            0,
        )
        .unwrap();
    }
    fs.sync().unwrap();
    assert_eq!(fs_version(&dev), 2, "a value in pieces makes it version 2");
    clean(&fs);
    let img = dev.image();
    drop(fs);
    dev = Arc::new(MemDevice::from_image(img));
    fs = Fs::mount(open(dev.clone())).unwrap();
    same(&fs, ino, "user.short", &pattern(1, 1699));
    same(&fs, ino, "user.one", &pattern(2, 1700));
    for (i, &len) in lens.iter().enumerate() {
        same(
            &fs,
            ino,
            &format!("user.l{i}"),
            &pattern(10 + i as u64, len),
        );
    }
    // Shorter, then longer, then removed: only what is stored now is read.
    fs.setxattr(ino, b"user.l6", b"tiny", XATTR_REPLACE)
        .unwrap();
    same(&fs, ino, "user.l6", b"tiny");
    fs.setxattr(ino, b"user.l5", &pattern(30, 1700), XATTR_REPLACE)
        .unwrap();
    same(&fs, ino, "user.l5", &pattern(30, 1700));
    fs.setxattr(ino, b"user.one", &pattern(31, 20_000), XATTR_REPLACE)
        .unwrap();
    same(&fs, ino, "user.one", &pattern(31, 20_000));
    fs.removexattr(ino, b"user.l4").unwrap();
    assert_eq!(
        fs.getxattr(ino, b"user.l4").unwrap_err().errno(),
        libc::ENODATA
    );
    clean(&fs);
    let names = fs.listxattr(ino).unwrap();
    assert_eq!(names.len(), 8, "pieces are not names: {names:?}");

    // A default ACL of 300 entries (2,412 bytes, past one item) is
    // inherited whole by a new file and a new directory.
    let acl = long_acl(296);
    assert!(acl.len() > 1700);
    let (dir, _) = fs
        .mknod(ROOT, b"d", libc::S_IFDIR | 0o755, 0, 0, 0)
        .unwrap();
    fs.setxattr(dir, b"system.posix_acl_default", &acl, 0)
        .unwrap();
    let (sub, _) = fs
        .mknod(dir, b"sub", libc::S_IFDIR | 0o777, 0, 0, 0)
        .unwrap();
    let (child, _) = fs.mknod(dir, b"c", REG, 0, 0, 0).unwrap();
    let inherited = fs.getxattr(sub, b"system.posix_acl_default").unwrap();
    assert!(
        inherited == acl,
        "inherited as the directory's default ACL: {} bytes, {} differ",
        inherited.len(),
        inherited.iter().zip(&acl).filter(|(a, b)| a != b).count()
    );
    for ino in [sub, child] {
        let access = fs.getxattr(ino, b"system.posix_acl_access").unwrap();
        assert_eq!(access.len(), acl.len(), "inherited as the access ACL");
    }
    // chmod rewrites a long access ACL's mask, whole.
    fs.setattr(
        child,
        SetAttr {
            mode: Some(0o640),
            ..SetAttr::default()
        },
    )
    .unwrap();
    let access = fs.getxattr(child, b"system.posix_acl_access").unwrap();
    assert_eq!(access.len(), acl.len());
    // The owner's entry says rw- now; the 296 named users are all there.
    assert_eq!(access[4..12], [1, 0, 6, 0, 255, 255, 255, 255]);
    assert!(access[12..12 + 296 * 8] == acl[12..12 + 296 * 8]);
    clean(&fs);

    // One file's values take at most 8 MiB together: the 129th value of
    // 64 KiB is ENOSPC; a shorter replacement or a removal makes room.
    let (full, _) = fs.mknod(ROOT, b"full", REG, 0, 0, 0).unwrap();
    let big = |i: u32| format!("user.v{i:03}");
    let mut stored = 0;
    let refused = loop {
        match fs.setxattr(
            full,
            big(stored).as_bytes(),
            &pattern(stored as u64, 65536),
            0,
        ) {
            Ok(()) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored <= 200, "no limit on one file's xattr values");
    };
    assert_eq!((stored, refused.errno()), (128, libc::ENOSPC), "{refused}");
    assert!(refused.to_string().contains("8 MiB"), "{refused}");
    fs.setxattr(full, big(0).as_bytes(), &pattern(1, 65536), XATTR_REPLACE)
        .expect("replacing a value with one as long still fits");
    fs.setxattr(full, big(1).as_bytes(), b"short", XATTR_REPLACE)
        .unwrap();
    fs.setxattr(full, big(200).as_bytes(), &pattern(2, 60_000), 0)
        .expect("room made by the shorter value");
    fs.removexattr(full, big(2).as_bytes()).unwrap();
    fs.setxattr(full, big(201).as_bytes(), &pattern(3, 65536), 0)
        .expect("room made by the removal");
    same(&fs, full, &big(127), &pattern(127, 65536));
    clean(&fs);

    // Deleting files frees their pieces with them (`check` reports the
    // xattrs and pieces of an inode that is gone); the full one's 8 MiB
    // go in one transaction.
    fs.unlink(ROOT, b"full").unwrap();
    fs.unlink(ROOT, b"f").unwrap();
    fs.unlink(dir, b"c").unwrap();
    fs.rmdir(dir, b"sub").unwrap();
    for gone in [ino, child, sub, full] {
        let _ = fs.forget(gone, 1);
    }
    fs.sync().unwrap();
    for gone in [ino, child, sub, full] {
        assert_eq!(
            fs.getattr(gone).unwrap_err().errno(),
            libc::ENOENT,
            "inode {gone:?} was freed"
        );
    }
    clean(&fs);
}

#[test]
fn xattrs_and_attributes() {
    let (_dev, fs) = new_fs(65536);
    let (ino, i) = fs
        .mknod(
            ROOT,
            b"f",
            libc::S_IFREG | libc::S_ISUID | libc::S_ISGID | 0o775,
            5,
            6,
            0,
        )
        .unwrap();
    assert_eq!(i.mode & 0o7777, libc::S_ISUID | libc::S_ISGID | 0o775);
    fs.setxattr(ino, b"user.a", b"1", 0).unwrap();
    // An extended ACL (owner rw, user 1234 rw, group r, mask rw, other r).
    let entries = [
        (1u16, 6u16, 0u32),
        (2, 6, 1234),
        (4, 4, 0),
        (0x10, 6, 0),
        (0x20, 4, 0),
    ];
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (t, p, id) in entries {
        acl.extend_from_slice(&t.to_le_bytes());
        acl.extend_from_slice(&p.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    fs.setxattr(ino, b"system.posix_acl_access", &acl, 0)
        .unwrap();
    assert_eq!(
        fs.getattr(ino).unwrap().mode & 0o777,
        0o664,
        "the ACL sets the mode; group bits from the mask"
    );
    let bad = fs.setxattr(
        ino,
        b"system.posix_acl_access",
        &[2, 0, 0, 0, 1, 0, 6, 0],
        0,
    );
    assert_eq!(bad.unwrap_err().errno(), libc::EINVAL);
    let suid = SetAttr {
        mode: Some(libc::S_ISUID | libc::S_ISGID | 0o775),
        ..SetAttr::default()
    };
    fs.setattr(ino, suid).unwrap();
    assert_eq!(
        fs.setxattr(ino, b"user.a", b"2", XATTR_CREATE)
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    assert_eq!(
        fs.setxattr(ino, b"user.b", b"2", XATTR_REPLACE)
            .unwrap_err()
            .errno(),
        libc::ENODATA
    );
    fs.setxattr(ino, b"user.a", b"22", XATTR_REPLACE).unwrap();
    assert_eq!(fs.getxattr(ino, b"user.a").unwrap(), b"22");
    assert_eq!(
        fs.listxattr(ino).unwrap(),
        vec![b"system.posix_acl_access".to_vec(), b"user.a".to_vec()]
    );
    assert_eq!(
        fs.setxattr(ino, b"user.a\0b", b"v", 0).unwrap_err().errno(),
        libc::EINVAL,
        "a name with a NUL (the kernel never sends one)"
    );
    assert_eq!(
        fs.setxattr(ino, b"user.big", &vec![0; 65537], 0)
            .unwrap_err()
            .errno(),
        libc::E2BIG,
        "longer than the kernel's XATTR_SIZE_MAX"
    );
    fs.removexattr(ino, b"user.a").unwrap();
    assert_eq!(
        fs.getxattr(ino, b"user.a").unwrap_err().errno(),
        libc::ENODATA
    );
    assert_eq!(
        fs.removexattr(ino, b"user.a").unwrap_err().errno(),
        libc::ENODATA
    );

    // The names of one file's xattrs fit in what listxattr can return
    // (64 KiB with their NULs); one more name is ENOSPC, as on ext4.
    let names = |fs: &Fs| -> usize { fs.listxattr(ino).unwrap().iter().map(|n| n.len() + 1).sum() };
    let mut added = 0;
    let refused = loop {
        match fs.setxattr(ino, format!("user.n{added:05}").as_bytes(), b"v", 0) {
            Ok(()) => added += 1,
            Err(e) => break e,
        }
        assert!(added < 10_000, "no limit on the xattr names of one file");
    };
    assert_eq!(refused.errno(), libc::ENOSPC, "{refused}");
    assert!(refused.to_string().contains("listxattr"), "{refused}");
    let full = names(&fs);
    assert!(
        (65536 - 13..=65536).contains(&full),
        "{full} bytes of names when the next was refused"
    );
    // At the limit a value is still replaced and a name still removed;
    // then the refused name fits.
    fs.setxattr(ino, b"user.n00000", b"new value", XATTR_REPLACE)
        .unwrap();
    fs.removexattr(ino, b"user.n00001").unwrap();
    let name = format!("user.n{added:05}");
    fs.setxattr(ino, name.as_bytes(), b"v", 0).unwrap();
    assert_eq!(names(&fs), full);
    for i in 0..=added {
        let _ = fs.removexattr(ino, format!("user.n{i:05}").as_bytes());
    }
    assert_eq!(names(&fs), "system.posix_acl_access\0".len());

    // A write by an unprivileged user clears setuid, and setgid when group-executable.
    fs.write_data(ino, 0, b"x", true).unwrap();
    assert_eq!(fs.getattr(ino).unwrap().mode & 0o7777, 0o775);
    // chmod keeps the file type; chown and nanosecond times.
    let t = Time {
        sec: 1_700_000_000,
        nsec: 123_456_789,
    };
    let a = fs
        .setattr(
            ino,
            SetAttr {
                mode: Some(0o600),
                uid: Some(7),
                gid: Some(8),
                atime: Some(t),
                mtime: Some(t),
                size: None,
                ctime: None,
            },
        )
        .unwrap();
    assert_eq!(
        (a.mode, a.uid, a.gid, a.mtime, a.atime),
        (libc::S_IFREG | 0o600, 7, 8, t, t)
    );
    let d = fs
        .mknod(ROOT, b"d", libc::S_IFDIR | 0o755, 0, 0, 0)
        .unwrap()
        .0;
    assert_eq!(
        fs.setattr(d, SetAttr::size(0)).unwrap_err().errno(),
        libc::EISDIR
    );
    assert_eq!(fs.read_data(d, 0, 10).unwrap_err().errno(), libc::EISDIR);
}

#[test]
fn unlinked_open_files_live_until_closed_or_remounted() {
    let (dev, fs) = new_fs(65536);
    let before = fs.statfs().unwrap().free_blocks;
    let (ino, _) = fs.mknod(ROOT, b"tmp", REG, 0, 0, 0).unwrap();
    fs.write_data(ino, 0, &pattern(3, 100_000), false).unwrap();
    fs.open(ino);
    fs.unlink(ROOT, b"tmp").unwrap();
    assert_eq!(fs.lookup(ROOT, b"tmp").unwrap_err().errno(), libc::ENOENT);
    assert_eq!(
        fs.read_data(ino, 0, 100_000).unwrap(),
        pattern(3, 100_000),
        "still readable while open"
    );
    fs.write_data(ino, 100_000, b"more", false).unwrap();
    fs.release(ino).unwrap();
    assert_eq!(fs.getattr(ino).unwrap_err().errno(), libc::ENOENT);
    assert_eq!(fs.statfs().unwrap().free_blocks, before);

    // Killed while an unlinked file is open: the next mount reclaims it.
    let (ino, _) = fs.mknod(ROOT, b"tmp2", REG, 0, 0, 0).unwrap();
    fs.write_data(ino, 0, &pattern(4, 50_000), false).unwrap();
    fs.open(ino);
    fs.unlink(ROOT, b"tmp2").unwrap();
    fs.commit_pending().unwrap();
    let img = dev.image();
    drop(fs);
    let fs = Fs::mount(open(Arc::new(MemDevice::from_image(img)))).unwrap();
    assert_eq!(fs.getattr(ino).unwrap_err().errno(), libc::ENOENT);
    assert_eq!(fs.statfs().unwrap().free_blocks, before);
}

/// Overwrites that allocate nothing keep their new mtime/ctime in memory
/// until the next sync (ext4's `lazytime`): visible at once, stored by
/// `sync`, lost by a crash before it. Anything else stores them at once.
#[test]
fn overwrite_times_are_lazy_until_sync() {
    let (mut dev, mut fs) = new_fs(65536);
    let (ino, _) = fs.mknod(ROOT, b"f", REG, 0, 0, 0).unwrap();
    fs.write_data(ino, 0, &pattern(1, 8192), false).unwrap();
    let stored = fs.getattr(ino).unwrap().mtime;
    let kill = |dev: &mut Arc<MemDevice>, fs: Fs| {
        let img = dev.image();
        drop(fs);
        *dev = Arc::new(MemDevice::from_image(img));
        Fs::mount(open(dev.clone())).unwrap()
    };
    std::thread::sleep(std::time::Duration::from_millis(5));
    fs.write_data(ino, 10, b"overwrite", false).unwrap();
    let lazy = fs.getattr(ino).unwrap();
    assert!(
        (lazy.mtime.sec, lazy.mtime.nsec) > (stored.sec, stored.nsec) && lazy.ctime == lazy.mtime,
        "visible at once"
    );
    fs = kill(&mut dev, fs);
    let i = fs.getattr(ino).unwrap();
    assert_eq!(i.mtime, stored, "a crash before sync keeps the stored time");
    assert_eq!(
        &fs.read_data(ino, 10, 9).unwrap(),
        b"overwrite",
        "the data is stored"
    );

    fs.write_data(ino, 20, b"again", false).unwrap();
    let lazy = fs.getattr(ino).unwrap().mtime;
    fs.sync().unwrap();
    fs = kill(&mut dev, fs);
    assert_eq!(
        fs.getattr(ino).unwrap().mtime,
        lazy,
        "sync stores lazy times"
    );

    // An explicit time set after a lazy one wins, in memory and on disk.
    fs.write_data(ino, 30, b"x", false).unwrap();
    let old = Time {
        sec: 981_173_106,
        nsec: 5,
    };
    fs.setattr(
        ino,
        SetAttr {
            mtime: Some(old),
            ..SetAttr::default()
        },
    )
    .unwrap();
    assert_eq!(fs.getattr(ino).unwrap().mtime, old);
    fs.sync().unwrap();
    fs = kill(&mut dev, fs);
    assert_eq!(fs.getattr(ino).unwrap().mtime, old);

    // A small write into a new block waits for the next commit with size
    // and times, as a create does: a kill before it loses the write
    // whole (size, times and data), a commit stores it whole.
    fs.write_data(ino, 8192, b"tail", false).unwrap();
    assert_eq!(fs.getattr(ino).unwrap().size, 8196);
    assert_eq!(&fs.read_data(ino, 8192, 10).unwrap(), b"tail");
    fs = kill(&mut dev, fs);
    let j = fs.getattr(ino).unwrap();
    assert_eq!(
        (j.size, j.mtime),
        (8192, old),
        "a kill loses the waiting write whole"
    );
    assert_eq!(fs.read_data(ino, 8192, 10).unwrap(), b"");
    fs.write_data(ino, 8192, b"tail", false).unwrap();
    let i2 = fs.getattr(ino).unwrap();
    assert_eq!(i2.size, 8196);
    fs.commit_pending().unwrap();
    fs = kill(&mut dev, fs);
    let j = fs.getattr(ino).unwrap();
    assert_eq!((j.size, j.mtime), (8196, i2.mtime));
    assert_eq!(&fs.read_data(ino, 8192, 10).unwrap(), b"tail");
    // A file unlinked with lazy times pending: sync skips it.
    fs.write_data(ino, 0, b"y", false).unwrap();
    fs.unlink(ROOT, b"f").unwrap();
    fs.sync().unwrap();
    assert!(fs.check().unwrap().problems.is_empty());
}

/// fallocate of a range larger than one transaction may hold goes in steps.
#[test]
fn fallocate_of_a_large_range() {
    let (_dev, fs) = new_fs(1 << 16);
    let (ino, _) = fs.mknod(ROOT, b"f", REG, 0, 0, 0).unwrap();
    fs.write_data(ino, 3 << 20, b"keep", false).unwrap();
    let len = 100u64 << 20;
    fs.fallocate(ino, 0, len, 0).unwrap();
    let i = fs.getattr(ino).unwrap();
    assert_eq!((i.size, i.blocks), (len, len / 4096));
    assert_eq!(&fs.read_data(ino, 3 << 20, 5).unwrap(), b"keep\0");
    assert!(fs
        .read_data(ino, 90 << 20, 1 << 20)
        .unwrap()
        .iter()
        .all(|b| *b == 0));
    fs.fallocate(ino, 4096, len - 8192, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE)
        .unwrap();
    assert_eq!(fs.getattr(ino).unwrap().blocks, 2);
    assert!(fs.check().unwrap().problems.is_empty());
}

/// A long fallocate, alone, runs its steps back to back; while another
/// thread keeps needing the metadata lock, it pauses between steps to leave
/// the lock to it (for as long as a step held it), where a fair hand-over
/// alone let the next step start at once: a process that sends one request
/// at a time (through FUSE, each a round trip) then found a step running at
/// nearly every request. scripts/bench.sh's mixed-load rows measure the
/// effect through a mount.
#[test]
fn a_long_fallocate_pauses_between_steps_only_while_others_wait() {
    let (_dev, fs) = new_fs(1 << 17);
    let (ino, _) = fs.mknod(ROOT, b"alone", REG, 0, 0, 0).unwrap();
    let len = 128u64 << 20; // 32 steps of FALLOC_STEP (1,024 blocks)
    fs.fallocate(ino, 0, len, 0).unwrap();
    assert_eq!(fs.step_pauses(), 0, "paused with no one waiting");

    let (ino, _) = fs.mknod(ROOT, b"shared", REG, 0, 0, 0).unwrap();
    let mut waits = 0u64;
    std::thread::scope(|s| {
        let long = s.spawn(|| fs.fallocate(ino, 0, len, 0).unwrap());
        while !long.is_finished() {
            fs.with_metadata_locked(|| waits += 1).unwrap();
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
    });
    assert_eq!(fs.getattr(ino).unwrap().blocks, len / 4096);
    assert!(
        fs.step_pauses() > 0,
        "no pause in 32 steps while another thread took the lock {waits} times"
    );
}

/// Deleting a file larger than one transaction frees it in steps, through
/// the orphan list; an orphan left by a crash (here: unlinked while open)
/// is freed in steps at the next mount.
#[test]
fn deleting_a_huge_file_frees_it_in_steps() {
    let (mut dev, mut fs) = new_fs(1 << 17);
    let before = fs.statfs().unwrap().free_blocks;
    let big = 200u64 << 20; // 51,200 blocks: over three transactions' worth
    let (a, _) = fs.mknod(ROOT, b"a", REG, 0, 0, 0).unwrap();
    fs.fallocate(a, 0, big, 0).unwrap();
    let (b, _) = fs.mknod(ROOT, b"b", REG, 0, 0, 0).unwrap();
    fs.fallocate(b, 0, big, 0).unwrap();
    assert!(fs.statfs().unwrap().free_blocks <= before - 2 * (big / 4096));
    fs.unlink(ROOT, b"a").unwrap();
    // `b` is open when unlinked; the process dies before closing it.
    fs.open(b);
    fs.unlink(ROOT, b"b").unwrap();
    fs.commit_pending().unwrap();
    let img = dev.image();
    drop(fs);
    dev = Arc::new(MemDevice::from_image(img));
    fs = Fs::mount(open(dev.clone())).unwrap();
    let after = fs.statfs().unwrap().free_blocks;
    assert!(
        after >= before - 16,
        "free {after} of {before} after both deletes"
    );
    assert!(fs.check().unwrap().problems.is_empty());
    assert!(fs.getattr(a).is_err() && fs.getattr(b).is_err());
}

/// Runs `f` on another thread while this one holds the metadata lock (as a
/// writer of another file does across its commit): `f`'s result if it
/// finished within 20 s, None if not (it waited for the lock, or hung).
/// A panic in `f` is passed on.
fn without_the_metadata_lock<T: Send>(fs: &Fs, f: impl FnOnce() -> T + Send) -> Option<T> {
    std::thread::scope(|s| {
        let mut other = None;
        let finished = fs
            .with_metadata_locked(|| {
                let h = s.spawn(f);
                let t0 = std::time::Instant::now();
                while !h.is_finished() && t0.elapsed() < std::time::Duration::from_secs(20) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                let finished = h.is_finished();
                other = Some(h);
                finished
            })
            .unwrap();
        let result = other
            .expect("spawned")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        finished.then_some(result)
    })
}

/// A read of a file looks up its blocks in the file's cached map, not under
/// the metadata lock, which a writer of another file holds across its
/// commit (sealing and writing its blocks).
#[test]
fn reads_do_not_wait_for_the_metadata_lock() {
    let (_dev, fs) = new_fs(65536);
    let (b, _) = fs.mknod(ROOT, b"b", REG, 0, 0, 0).unwrap();
    let data = pattern(9, 100_000);
    fs.write_data(b, 0, &data, false).unwrap();
    fs.open(b);
    assert_eq!(fs.read_data(b, 0, 10).unwrap(), data[..10]);
    let read = without_the_metadata_lock(&fs, || fs.read_data(b, 50_000, 1000).unwrap());
    assert_eq!(
        read.expect("the read waited for the metadata lock"),
        data[50_000..51_000]
    );
    // A change drops the map; the next read sees it.
    fs.write_data(b, 100_000, b"tail", false).unwrap();
    assert_eq!(
        fs.read_data(b, 99_998, 10).unwrap(),
        [&data[99_998..], b"tail"].concat()
    );
    fs.setattr(b, SetAttr::size(10)).unwrap();
    assert_eq!(fs.read_data(b, 0, 100).unwrap(), data[..10]);
    fs.release(b).unwrap();
}

/// statfs answers from the figures each holder of the metadata lock
/// leaves as it lets go, so `df`, and loops that check free space between
/// their operations (stress-ng's do, four times per mkdir and rmdir),
/// never wait for that lock, held across another operation's step or
/// commit. (They still take the volume's own lock, briefly.) The figures
/// still follow each change, and space that a completed operation freed
/// counts as free at once (statfs then commits it, which takes the lock).
#[test]
fn statfs_does_not_wait_for_the_metadata_lock() {
    let (_dev, fs) = new_fs(65536);
    let before = fs.statfs().unwrap();
    let (ino, _) = fs.mknod(ROOT, b"f", REG, 0, 0, 0).unwrap();
    fs.write_data(ino, 0, &pattern(2, 1 << 20), false).unwrap();
    let during = without_the_metadata_lock(&fs, || fs.statfs().unwrap())
        .expect("statfs waited for the metadata lock");
    assert_eq!(during.files, before.files + 1, "{before:?} {during:?}");
    assert!(
        during.free_blocks <= before.free_blocks - 256,
        "{before:?} {during:?}"
    );
    assert_eq!(during, fs.statfs().unwrap());
    fs.unlink(ROOT, b"f").unwrap();
    let after = fs.statfs().unwrap();
    assert_eq!(
        after.free_blocks, before.free_blocks,
        "{before:?} {after:?}"
    );
    // Later changes show too (64 KiB of data, and some metadata).
    let (g, _) = fs.mknod(ROOT, b"g", REG, 0, 0, 0).unwrap();
    fs.write_data(g, 0, &pattern(3, 1 << 16), false).unwrap();
    let now = fs.statfs().unwrap();
    assert_eq!(now.files, before.files + 2, "{before:?} {now:?}");
    assert!(
        (16..=32).contains(&(before.free_blocks - now.free_blocks)),
        "{before:?} {now:?}"
    );
}

/// A read looks up its blocks and then reads them. Blocks freed in between
/// (a truncate) must not be handed to another file until that read is
/// over, or it could return the other file's data.
#[test]
fn blocks_freed_under_a_read_in_flight_are_not_reused_until_it_ends() {
    let (_dev, fs) = new_fs(65536);
    let (a, _) = fs.mknod(ROOT, b"a", REG, 0, 0, 0).unwrap();
    fs.write_data(a, 0, &pattern(1, 64 << 10), false).unwrap();
    let old = fs.file_blocks(a).unwrap();
    assert!(old.iter().all(|b| *b != 0));
    let (b, _) = fs.mknod(ROOT, b"b", REG, 0, 0, 0).unwrap();
    fs.with_read_in_flight(|| {
        fs.setattr(a, SetAttr::size(0)).unwrap();
        fs.write_data(b, 0, &pattern(2, 64 << 10), false).unwrap();
        let reused: Vec<u64> = fs
            .file_blocks(b)
            .unwrap()
            .into_iter()
            .filter(|x| old.contains(x))
            .collect();
        assert!(
            reused.is_empty(),
            "blocks {reused:?} freed under a read were reused"
        );
    })
    .unwrap();
    // With no read in flight, the next operation releases them.
    let (c, _) = fs.mknod(ROOT, b"c", REG, 0, 0, 0).unwrap();
    fs.write_data(c, 0, &pattern(3, 64 << 10), false).unwrap();
    assert!(fs.file_blocks(c).unwrap().iter().any(|x| old.contains(x)));
    assert_eq!(fs.read_data(b, 0, 64 << 10).unwrap(), pattern(2, 64 << 10));
    assert!(fs.check().unwrap().problems.is_empty());
}

/// fallocate takes its space at once without writing or encrypting
/// anything: the blocks are zeroed in the volume (allocated, stored
/// nowhere). Filling the rest of the file system afterwards cannot take
/// that space: every write into the preallocated range still succeeds.
#[test]
fn fallocate_reserves_space_without_writing_and_later_writes_fit() {
    let (_dev, fs) = new_fs(16384);
    let (pre, _) = fs.mknod(ROOT, b"pre", REG, 0, 0, 0).unwrap();
    let len = 16u64 << 20;
    let live_before = fs.volume_stats().unwrap().live_blocks;
    fs.fallocate(pre, 0, len, 0).unwrap();
    let i = fs.getattr(pre).unwrap();
    assert_eq!((i.size, i.blocks), (len, len / 4096));
    let grew = fs.volume_stats().unwrap().live_blocks - live_before;
    assert!(
        grew < 64,
        "preallocating 4,096 blocks stored {grew} blocks (metadata only)"
    );
    let r = fs.volume_check().unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    assert_eq!(r.zeroed_blocks, len / 4096);
    assert!(fs
        .read_data(pre, 0, 1 << 20)
        .unwrap()
        .iter()
        .all(|b| *b == 0));
    // Fill everything else.
    let (hog, _) = fs.mknod(ROOT, b"hog", REG, 0, 0, 0).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut at = 0u64;
    let err = loop {
        match fs.write_data(hog, at, &chunk, false) {
            Ok(_) => at += chunk.len() as u64,
            Err(e) => break e,
        }
    };
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    // Now write the whole preallocated file, partial blocks included.
    for (k, off) in (0..len).step_by(1 << 20).enumerate() {
        let data = pattern(k as u64, (1 << 20) - 100);
        fs.write_data(pre, off + 50, &data, false)
            .unwrap_or_else(|e| panic!("write at {off} into preallocated space: {e}"));
        assert_eq!(fs.read_data(pre, off + 50, data.len()).unwrap(), data);
        assert_eq!(fs.read_data(pre, off, 50).unwrap(), vec![0u8; 50]);
    }
    assert_eq!(fs.getattr(pre).unwrap().blocks, len / 4096);
    let report = fs.check().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// A large truncate frees in steps, each its own short transaction, after
/// a first one that sets the new size and records the truncation. A crash
/// at any point leaves either the old file or the new size, never stale
/// data past it: the next mount finishes freeing what lies past the size.
#[test]
fn a_large_truncate_goes_in_steps_and_a_crash_anywhere_is_finished_at_mount() {
    use lsvfs::device::RecordedOp;
    let (dev, fs) = new_fs(65536);
    let (f, _) = fs.mknod(ROOT, b"f", REG, 0, 0, 0).unwrap();
    let len = 40u64 << 20; // 10,240 blocks: ten truncate steps
    let data = pattern(9, len as usize);
    for (k, piece) in data.chunks(4 << 20).enumerate() {
        fs.write_data(f, k as u64 * (4 << 20), piece, false)
            .unwrap();
    }
    fs.sync().unwrap();
    let base = dev.image();
    dev.record();
    let new_size = 5000u64;
    let i = fs.setattr(f, SetAttr::size(new_size)).unwrap();
    assert_eq!((i.size, i.blocks), (new_size, 2));
    fs.sync().unwrap();
    let ops = dev.take_ops();
    let writes = ops
        .iter()
        .filter(|o| matches!(o, RecordedOp::Write { .. }))
        .count();
    assert!(writes > 10, "the truncate took {writes} device writes");
    drop(fs);
    let mut img = base;
    // Cuts that left the new size with blocks past it still to free.
    let mut unfinished = 0;
    for (k, op) in ops.iter().enumerate() {
        match op {
            RecordedOp::Write { offset, data } => {
                let end = *offset as usize + data.len();
                if img.len() < end {
                    img.resize(end, 0);
                }
                img[*offset as usize..end].copy_from_slice(data);
            }
            RecordedOp::Discard { offset, len } => {
                let end = ((offset + len) as usize).min(img.len());
                if (*offset as usize) < end {
                    img[*offset as usize..end].fill(0);
                }
            }
            RecordedOp::Flush => {}
        }
        if k % 3 != 0 && k + 1 != ops.len() {
            continue;
        }
        let dev = Arc::new(MemDevice::from_image(img.clone()));
        // Read-only first: what the crash left, before a mount finishes it.
        let ro = lsvfs::volume::Volume::open(
            dev.clone(),
            &master(),
            lsvfs::volume::Options {
                read_only: true,
                ..opts()
            },
        )
        .unwrap();
        let left = Fs::mount(ro).unwrap().getattr(f).unwrap();
        if left.size == new_size && left.blocks > 2 {
            unfinished += 1;
        }
        let fs = Fs::mount(open(dev)).unwrap();
        let i = fs.getattr(f).unwrap();
        if i.size == len {
            assert_eq!(i.blocks, len / 4096, "cut {k}: the old file, whole");
            assert!(fs.read_data(f, 0, len as usize).unwrap() == data);
        } else {
            assert_eq!(i.size, new_size, "cut {k}");
            assert_eq!(i.blocks, 2, "cut {k}: the mount freed the rest");
            assert_eq!(
                fs.read_data(f, 0, len as usize).unwrap(),
                &data[..new_size as usize]
            );
            // Growing it again shows zeros, not what was there.
            fs.setattr(f, SetAttr::size(len)).unwrap();
            assert!(fs
                .read_data(f, new_size, (len - new_size) as usize)
                .unwrap()
                .iter()
                .all(|b| *b == 0));
        }
        let r = fs.check().unwrap();
        assert!(r.problems.is_empty(), "cut {k}: {:?}", r.problems);
    }
    assert!(unfinished > 0, "no cut fell between the steps");
}

/// Operations reach the log in order, a write in place too (which commits
/// without the metadata lock): a metadata change still waiting for a
/// commit goes in with it or before it, never after. Here a chmod and a
/// create wait, then an in-place overwrite; a kill right after must not
/// show the overwrite without them. A small overwrite takes the ordinary
/// path, which commits them with its data; one of 64 KiB or more commits
/// them first, in a transaction of their own, then writes without the
/// lock. (With the write in place ignoring them, the kill kept the new
/// bytes and lost the chmod: tried.)
#[test]
fn a_write_in_place_does_not_overtake_pending_metadata() {
    for len in [11usize, 64 << 10, 1 << 20] {
        let (dev, fs) = new_fs(65536);
        fs.set_kernel_times(true);
        let (ino, _) = fs.mknod(ROOT, b"f", REG, 0, 0, 0).unwrap();
        fs.write_data(ino, 0, &pattern(1, (1 << 20) + 8192), false)
            .unwrap();
        fs.sync().unwrap();
        fs.setattr(
            ino,
            SetAttr {
                mode: Some(0o600),
                ..Default::default()
            },
        )
        .unwrap();
        fs.mknod(ROOT, b"g", REG, 0, 0, 0).unwrap();
        let new = pattern(2, len);
        fs.write_data(ino, 100, &new, false).unwrap();
        let img = dev.image();
        drop(fs);
        let fs = Fs::mount(open(Arc::new(MemDevice::from_image(img)))).unwrap();
        // The write commits at once (it holds data), with what waited or
        // after it.
        assert!(
            fs.read_data(ino, 100, len).unwrap() == new,
            "{len} bytes: the overwrite was lost"
        );
        let mode = fs.getattr(ino).unwrap().mode & 0o7777;
        let g = fs.lookup(ROOT, b"g").is_ok();
        assert!(
            mode == 0o600 && g,
            "{len} bytes: the overwrite survived the kill without the chmod and create \
             before it (mode {mode:o}, g {g})"
        );
    }
}

/// A small write into new blocks leaves its data waiting for the next
/// commit, in memory. Every later change to those blocks (a write over
/// part of one, a truncate into one, a hole punched or a range zeroed in
/// them) must start from that data, not from the volume, which has none
/// of it yet; a commit and a kill then keep the result.
#[test]
fn changes_to_blocks_whose_data_waits_start_from_that_data() {
    type Change = fn(&Fs, Ino, &mut Vec<u8>);
    let changes: [(&str, Change); 4] = [
        ("a write over parts of two blocks", |fs, ino, model| {
            let d = pattern(77, 300);
            fs.write_data(ino, 4000, &d, false).unwrap();
            model[4000..4300].copy_from_slice(&d);
        }),
        (
            "a truncate into a block, then growing again",
            |fs, ino, model| {
                fs.setattr(ino, SetAttr::size(5000)).unwrap();
                fs.setattr(ino, SetAttr::size(9000)).unwrap();
                model.truncate(5000);
                model.resize(9000, 0);
            },
        ),
        ("a hole punched in part of a block", |fs, ino, model| {
            fs.fallocate(ino, 100, 50, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE)
                .unwrap();
            model[100..150].fill(0);
        }),
        (
            "a range zeroed over a block and a part",
            |fs, ino, model| {
                fs.fallocate(ino, 4096, 5000, FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE)
                    .unwrap();
                model[4096..9096].fill(0);
            },
        ),
    ];
    for (what, change) in changes {
        let (dev, fs) = new_fs(65536);
        let (ino, _) = fs.mknod(ROOT, b"f", REG, 0, 0, 0).unwrap();
        fs.commit_pending().unwrap();
        let mut model = pattern(9, 3 * 4096 + 100);
        fs.write_data(ino, 0, &model, false).unwrap();
        assert_eq!(fs.waiting_data_blocks(), 4, "{what}: the write waits");
        change(&fs, ino, &mut model);
        let len = model.len();
        assert!(fs.read_data(ino, 0, len + 10).unwrap() == model, "{what}");
        fs.commit_pending().unwrap();
        assert_eq!(fs.waiting_data_blocks(), 0);
        let img = dev.image();
        drop(fs);
        let fs = Fs::mount(open(Arc::new(MemDevice::from_image(img)))).unwrap();
        assert!(
            fs.read_data(ino, 0, len + 10).unwrap() == model,
            "{what}, after a commit and a kill"
        );
        assert!(fs.check().unwrap().problems.is_empty(), "{what}");
    }
}

/// Small files whose data waits for a commit, read by other threads while
/// writers add more, a scratch file's waiting blocks are freed and
/// reused, and commits come at any time: every read of a finished file
/// returns exactly its bytes (never zeros from a block not committed yet,
/// never another file's data from a reused block), and every block read
/// of the scratch file is its own (0xEE) or zeros. (Whether a read ever
/// overlaps the reuse of a scratch block is up to the scheduler: the
/// deterministic case is
/// `blocks_freed_under_a_read_in_flight_are_not_reused_until_it_ends`.)
#[test]
fn reads_of_waiting_data_race_commits_and_reuse() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let (_dev, fs) = new_fs(65536);
    let content = |n: usize| pattern(1000 + n as u64, 1 + (n * 2477) % 20_000);
    let files = std::sync::Mutex::new(Vec::<(Ino, usize)>::new());
    let made = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let reads = AtomicUsize::new(0);
    let (scratch, _) = fs.mknod(ROOT, b"scratch", REG, 0, 0, 0).unwrap();
    std::thread::scope(|s| {
        for w in 0..2 {
            let (fs, files, made) = (&fs, &files, &made);
            s.spawn(move || {
                for k in 0..300 {
                    let n = w * 1000 + k;
                    let name = format!("f{n}");
                    let (ino, _) = fs.mknod(ROOT, name.as_bytes(), REG, 0, 0, 0).unwrap();
                    let data = content(n);
                    fs.write_data(ino, 0, &data, false).unwrap();
                    assert!(fs.read_data(ino, 0, 30_000).unwrap() == data, "file {n}");
                    files.lock().unwrap().push((ino, n));
                    made.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for r in 0..2u64 {
            let (fs, files, stop, reads) = (&fs, &files, &stop, &reads);
            s.spawn(move || {
                let mut rng = Rng(77 + r);
                while !stop.load(Ordering::Relaxed) {
                    if rng.below(4) == 0 {
                        let got = fs.read_data(scratch, 0, 8192).unwrap();
                        for b in got.chunks(4096) {
                            assert!(
                                b.iter().all(|&x| x == 0xEE) || b.iter().all(|&x| x == 0),
                                "scratch: a block of another file"
                            );
                        }
                        continue;
                    }
                    let (ino, n) = {
                        let f = files.lock().unwrap();
                        if f.is_empty() {
                            continue;
                        }
                        f[rng.below(f.len() as u64) as usize]
                    };
                    let got = fs.read_data(ino, 0, 30_000).unwrap();
                    assert!(got == content(n), "file {n}: a read differs");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        {
            let (fs, stop) = (&fs, &stop);
            s.spawn(move || {
                // A scratch file written and truncated again and again:
                // its waiting blocks are freed before their commit.
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    fs.write_data(scratch, 0, &[0xEE; 8192], false).unwrap();
                    fs.setattr(scratch, SetAttr::size(0)).unwrap();
                    if i % 7 == 0 {
                        fs.commit_pending().unwrap();
                    }
                    i += 1;
                }
            });
        }
        while made.load(Ordering::Relaxed) < 600 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(reads.load(Ordering::Relaxed) > 100, "the readers ran");
    assert!(fs.check().unwrap().problems.is_empty());
}

/// Changes wait in memory for a later commit only while the volume has
/// room for them: once what a snapshot holds leaves little space (the
/// file system's own allocator still sees plenty), a small write commits
/// at once, so the write that needs space is the one told there is none.
#[test]
fn near_a_full_volume_small_writes_do_not_wait() {
    const REWRITE_MIB: u64 = 60;
    let (_dev, fs) = new_fs(65536);
    let small = |name: &[u8]| {
        let (ino, _) = fs.mknod(ROOT, name, REG, 0, 0, 0).unwrap();
        fs.write_data(ino, 0, &pattern(3, 100), false).unwrap();
        fs.waiting_data_blocks()
    };
    assert_eq!(small(b"s1"), 1, "with room, a small write waits");
    let (a, _) = fs.mknod(ROOT, b"a", REG, 0, 0, 0).unwrap();
    let mib = 1 << 20;
    for i in 0..100u64 {
        fs.write_data(a, i * mib, &pattern(i, mib as usize), false)
            .unwrap();
    }
    assert_eq!(small(b"s2"), 1, "some 150 MiB free: still waits");
    fs.snapshot_create("before").unwrap();
    for i in 0..REWRITE_MIB {
        fs.write_data(a, i * mib, &pattern(i + 500, mib as usize), false)
            .unwrap();
    }
    // The log still has room (see the next test for when it has not):
    // what is short is what the snapshot holds.
    let st = fs.volume_stats().unwrap();
    let log_room = (st.free_segments + st.max_segments - st.extent_segments) * st.segment_blocks;
    assert!(
        log_room > 32768 + 4096,
        "log room {log_room} blocks: {st:?}"
    );
    assert_eq!(
        small(b"s3"),
        0,
        "the snapshot holds the old copy: the volume is nearly full"
    );
    assert_eq!(
        fs.read_data(a, 5 * mib, 10).unwrap(),
        pattern(505, mib as usize)[..10]
    );
}

/// A file system whose kernel keeps file times (as under FUSE's
/// writeback cache), with one empty file committed.
fn one_file_kernel_times() -> (Arc<MemDevice>, Fs, Ino) {
    let (dev, fs) = new_fs(65536);
    fs.set_kernel_times(true);
    let (ino, _) = fs.mknod(ROOT, b"f", REG, 0, 0, 0).unwrap();
    fs.commit_pending().unwrap();
    (dev, fs, ino)
}

/// Writing a file end to end never loads its block map: a load reads all
/// of the file's chunk items, so one load per write (as when each write
/// that allocated dropped the cached map) made writing a file cost time
/// in the square of its size. An overwrite inside the file (written in
/// place, without the metadata lock) loads it once and keeps it.
#[test]
fn appending_writes_do_not_load_the_file_map() {
    let (_dev, fs, ino) = one_file_kernel_times();
    // 128 KiB a write: too large to wait in memory, so each commits and
    // leaves nothing pending (as the kernel's writeback of a large file).
    let piece: usize = 128 * 1024;
    let at = |k: u64| k * piece as u64;
    let before = fs.map_loads();
    for i in 0..200u64 {
        fs.write_data(ino, at(i), &pattern(i, piece), false)
            .unwrap();
    }
    assert_eq!(fs.map_loads() - before, 0, "appends loaded the map");
    for round in 0..3 {
        fs.write_data(ino, at(5), &pattern(900 + round, piece), false)
            .unwrap();
    }
    assert_eq!(fs.map_loads() - before, 1, "overwrites load it once");
    assert_eq!(
        fs.read_data(ino, at(5), piece).unwrap(),
        pattern(902, piece)
    );
    assert_eq!(
        fs.read_data(ino, at(199), piece).unwrap(),
        pattern(199, piece)
    );
    assert!(fs.check().unwrap().problems.is_empty());
}

/// A file read while it is appended to (a log being followed, a download
/// being played) is loaded once: each operation updates the cached map in
/// place instead of dropping it, where a load reads every chunk item of
/// the file. The reads still see every change: appends (large ones, and
/// one-block ones whose data waits in memory), a hole, truncation both
/// ways (with the freed blocks then taken by another file). A change
/// of the file's privileges still reaches the write path that bypasses
/// the metadata lock: setuid set by chmod and a capability set after the
/// map was cached are both cleared by an unprivileged write, and the
/// writes after that are written in place again.
#[test]
fn a_file_read_while_appended_is_loaded_once() {
    let (_dev, fs, ino) = one_file_kernel_times();
    let piece: usize = 128 * 1024;
    let at = |k: u64| k * piece as u64;
    let mut model: Vec<u8> = Vec::new();
    let before = fs.map_loads();
    for i in 0..200u64 {
        // Every tenth append is one new block, so its data waits for the
        // commit (every append starts on a block boundary).
        let data = if i % 10 == 9 {
            pattern(i, 4096)
        } else {
            pattern(i, piece)
        };
        let off = model.len() as u64;
        fs.write_data(ino, off, &data, false).unwrap();
        if i % 10 == 9 {
            assert!(
                fs.waiting_data_blocks() > 0,
                "the small append {i} did not wait"
            );
        }
        model.extend_from_slice(&data);
        assert_eq!(fs.read_data(ino, off, piece).unwrap(), data, "append {i}");
        let back = (i * 7919) % model.len() as u64;
        assert_eq!(
            fs.read_data(ino, back, 5000).unwrap(),
            model[back as usize..(back as usize + 5000).min(model.len())],
            "after append {i}, at {back}"
        );
    }
    assert_eq!(fs.map_loads() - before, 1, "the reads loaded the map again");
    // A write past the end leaves a hole; truncation cuts and extends.
    let far = model.len() as u64 + 3 * piece as u64 + 123;
    fs.write_data(ino, far, b"tail", false).unwrap();
    model.resize(far as usize, 0);
    model.extend_from_slice(b"tail");
    let hole = far - 2 * piece as u64;
    assert_eq!(
        fs.read_data(ino, hole, piece).unwrap(),
        model[hole as usize..hole as usize + piece]
    );
    let cut = at(50) + 77;
    fs.setattr(ino, SetAttr::size(cut)).unwrap();
    model.truncate(cut as usize);
    assert_eq!(
        fs.read_data(ino, cut - 10, 100).unwrap(),
        model[cut as usize - 10..]
    );
    fs.setattr(ino, SetAttr::size(at(60))).unwrap();
    model.resize(at(60) as usize, 0);
    // Another file takes the blocks the truncation freed: a map that
    // kept their addresses would now read its data.
    let (other, _) = fs.mknod(ROOT, b"other", REG, 0, 0, 0).unwrap();
    for k in 0..200u64 {
        fs.write_data(other, at(k), &pattern(5000 + k, piece), false)
            .unwrap();
    }
    fs.commit_pending().unwrap();
    assert_eq!(
        fs.read_data(ino, at(49), 11 * piece).unwrap(),
        model[at(49) as usize..at(60) as usize]
    );
    assert_eq!(fs.map_loads() - before, 1, "truncation dropped the map");

    // setuid by chmod: the cached map learns it, and an unprivileged
    // write inside the file takes the path that clears it.
    fs.setattr(
        ino,
        SetAttr {
            mode: Some(0o4755),
            ..Default::default()
        },
    )
    .unwrap();
    // Nothing pending, or the write would take the ordinary path anyway.
    fs.commit_pending().unwrap();
    let loads = fs.map_loads();
    fs.write_data(ino, at(1), &pattern(7, piece), true).unwrap();
    assert_eq!(fs.getattr(ino).unwrap().mode & 0o7777, 0o755, "setuid kept");
    // Once setuid is gone, the next unprivileged overwrite is written in
    // place again, without the metadata lock (a map stuck at "privileged"
    // would send every later write of the file through the ordinary path).
    fs.commit_pending().unwrap();
    let in_place = || fs.write_data(ino, at(3), &pattern(9, piece), true).unwrap();
    let unlocked = without_the_metadata_lock(&fs, in_place).is_some();
    assert_eq!(fs.map_loads(), loads, "clearing setuid dropped the map");
    assert!(
        unlocked,
        "after setuid was cleared, an overwrite waited for the metadata lock"
    );
    // A capability set after the map was cached (read just above).
    fs.read_data(ino, 0, 10).unwrap();
    fs.setxattr(ino, b"security.capability", b"caps", 0)
        .unwrap();
    fs.commit_pending().unwrap();
    fs.write_data(ino, at(2), &pattern(8, piece), true).unwrap();
    assert!(
        fs.getxattr(ino, b"security.capability").is_err(),
        "an unprivileged write kept the file's capabilities"
    );
    // Clearing it dropped the map: a read loads it again (a load takes
    // the metadata lock).
    fs.commit_pending().unwrap();
    fs.read_data(ino, 0, 10).unwrap();
    let in_place = || {
        fs.write_data(ino, at(4), &pattern(10, piece), true)
            .unwrap()
    };
    assert!(
        without_the_metadata_lock(&fs, in_place).is_some(),
        "after the capability was cleared, an overwrite waited for the metadata lock"
    );
    model[at(1) as usize..at(2) as usize].copy_from_slice(&pattern(7, piece));
    model[at(2) as usize..at(3) as usize].copy_from_slice(&pattern(8, piece));
    model[at(3) as usize..at(4) as usize].copy_from_slice(&pattern(9, piece));
    model[at(4) as usize..at(5) as usize].copy_from_slice(&pattern(10, piece));
    fs.commit_pending().unwrap();
    for k in 0..60 {
        assert_eq!(
            fs.read_data(ino, at(k), piece).unwrap(),
            model[at(k) as usize..at(k + 1) as usize],
            "piece {k} at the end"
        );
    }
    assert!(fs.check().unwrap().problems.is_empty());
}

/// The other half of that room is the log's: logical space may be plenty
/// while the log is full of old copies that only cleaning gives back. A
/// file overwritten again and again fills it; once the log has less room
/// than the file system's low-space mark (128 MiB) beyond its reserve,
/// small writes commit at once, though more than that is still free.
#[test]
fn with_the_log_full_of_old_copies_small_writes_do_not_wait() {
    let (_dev, fs) = new_fs(65536);
    let (a, _) = fs.mknod(ROOT, b"a", REG, 0, 0, 0).unwrap();
    let mib = 1 << 20;
    let file_mib = 96u64;
    for i in 0..file_mib {
        fs.write_data(a, i * mib, &pattern(i, mib as usize), false)
            .unwrap();
    }
    // The small files exist beforehand: creating them would sometimes
    // change the tree's root, which commits for its own reason.
    let smalls: Vec<_> = (0..40 * file_mib)
        .map(|k| {
            let name = format!("s{k}");
            fs.mknod(ROOT, name.as_bytes(), REG, 0, 0, 0).unwrap().0
        })
        .collect();
    fs.commit_pending().unwrap();
    let mut next = smalls.iter();
    let mut small = || {
        let ino = *next.next().expect("small files left");
        fs.write_data(ino, 0, &pattern(ino.0, 100), false).unwrap();
        fs.waiting_data_blocks()
    };
    assert_eq!(small(), 1, "a fresh log: a small write waits");
    // Overwrite the file round and round (nothing cleans the log in the
    // background here) until small writes stop waiting: two in a row.
    let mut round = 0;
    let mut committed = 0;
    let stopped = loop {
        round += 1;
        assert!(round < 30 * file_mib, "small writes kept waiting");
        let i = round % file_mib;
        fs.write_data(a, i * mib, &pattern(round + 1000, mib as usize), false)
            .unwrap();
        committed = if small() == 0 { committed + 1 } else { 0 };
        if committed == 2 {
            break i;
        }
    };
    // Not for want of logical blocks: more than the low-space mark is free.
    let st = fs.volume_stats().unwrap();
    let free = (st.logical_blocks - st.allocated_blocks).min(65536 - st.live_blocks);
    assert!(free > 32768 + 1024, "{free} blocks free: {st:?}");
    // The log is what is short: past the segments it may still grow
    // into, few are free.
    let log_room = (st.free_segments + st.max_segments - st.extent_segments) * st.segment_blocks;
    assert!(
        log_room < 32768 + 4096,
        "log room {log_room} blocks: {st:?}"
    );
    // What was written reads back, and the volume is whole.
    assert_eq!(
        fs.read_data(a, stopped * mib, 4096).unwrap(),
        pattern(round + 1000, mib as usize)[..4096]
    );
    assert!(fs.check().unwrap().problems.is_empty());
}

/// A large append (the kernel's write-back of a file being written, 1 MiB
/// a request) seals and writes its data without the metadata lock, so
/// that other processes' operations do not wait for it; so does a large
/// overwrite. The volume here makes each commit of 64 blocks or more
/// wait 300 ms before sealing, as a slow, shared CPU stretches the
/// sealing. Creates beside the write must not wait for that. (The
/// ordinary path held the lock across it: creates waited 250 ms and more.)
#[test]
fn a_large_write_leaves_the_metadata_lock_to_others() {
    const DELAY_MS: u64 = 300;
    let dev = mem_volume(65536, 256);
    let v = open(dev.clone());
    Fs::format(&v, 0, 0).unwrap();
    v.delay_large_seals_for_test(DELAY_MS);
    let fs = Fs::mount(v).unwrap();
    fs.set_kernel_times(true);
    let (ino, _) = fs.mknod(ROOT, b"f", REG, 0, 0, 0).unwrap();
    fs.commit_pending().unwrap();
    let data = pattern(4, 1 << 20);
    for what in ["an append", "an overwrite"] {
        let before = fs.appends_unlocked();
        let slowest = std::thread::scope(|s| {
            let writer = s.spawn(|| fs.write_data(ino, 0, &data, false).unwrap());
            // Creates from the time the write is under way until it ends.
            std::thread::sleep(std::time::Duration::from_millis(30));
            let mut slowest = std::time::Duration::ZERO;
            let mut n = 0;
            while !writer.is_finished() {
                let t = std::time::Instant::now();
                let name = format!("{what} {n}");
                fs.mknod(ROOT, name.as_bytes(), REG, 0, 0, 0).unwrap();
                slowest = slowest.max(t.elapsed());
                // Not so many that their own changes commit (and that
                // commit, of many metadata blocks, waits too).
                std::thread::sleep(std::time::Duration::from_millis(1));
                n += 1;
            }
            writer.join().unwrap();
            assert!(n > 0, "{what}: no create ran beside the write");
            slowest
        });
        if what == "an append" {
            assert_eq!(
                fs.appends_unlocked() - before,
                1,
                "{what}: not without the lock"
            );
        }
        assert!(
            slowest < std::time::Duration::from_millis(DELAY_MS / 3),
            "{what}: a create beside it waited {slowest:?}"
        );
        assert_eq!(fs.read_data(ino, 0, 1 << 20).unwrap(), data, "{what}");
    }
    assert!(fs.check().unwrap().problems.is_empty());
}

/// A large append reserves its blocks past the file's size, writes its
/// data without the metadata lock, then sets the size. A crash between
/// the steps leaves the file as before the write: the mount frees what
/// lies past the size (the write's truncation record says to), so a
/// later extension shows zeros there, never the lost write's data, and no
/// block is left over.
#[test]
fn a_crash_inside_a_large_append_leaves_the_file_as_before() {
    for step in [1u8, 2] {
        let (dev, fs, ino) = one_file_kernel_times();
        let old = pattern(5, 3 << 20);
        fs.write_data(ino, 0, &old, false).unwrap();
        fs.sync().unwrap();
        let blocks = fs.getattr(ino).unwrap().blocks;
        fs.stop_large_appends_after(step);
        let new = pattern(6, 1 << 20);
        let end = old.len() + new.len();
        assert!(
            fs.write_data(ino, old.len() as u64, &new, false).is_err(),
            "step {step}: the append did not stop"
        );
        let img = dev.image();
        drop(fs);
        let fs = Fs::mount(open(Arc::new(MemDevice::from_image(img)))).unwrap();
        let i = fs.getattr(ino).unwrap();
        assert_eq!(i.size, old.len() as u64, "step {step}: size");
        assert_eq!(
            i.blocks, blocks,
            "step {step}: blocks past the size were kept"
        );
        assert!(
            fs.read_data(ino, 0, old.len()).unwrap() == old,
            "step {step}"
        );
        let report = fs.check().unwrap();
        assert!(
            report.problems.is_empty(),
            "step {step}: {:?}",
            report.problems
        );
        fs.setattr(ino, SetAttr::size(end as u64)).unwrap();
        assert!(
            fs.read_data(ino, old.len() as u64, new.len())
                .unwrap()
                .iter()
                .all(|b| *b == 0),
            "step {step}: the lost append showed through the extension"
        );
    }
}

/// A large append that fails between its steps (as on a write error)
/// gives back the blocks it reserved at once and drops the file's
/// truncation record: a later extension shows zeros, the next large
/// append goes without the lock again (it would not while a record stood
/// with no append counted), and a mount after it finds the file whole.
#[test]
fn a_failed_large_append_gives_its_blocks_back() {
    let (dev, fs, ino) = one_file_kernel_times();
    let mb = 1usize << 20;
    let old = pattern(7, mb);
    fs.write_data(ino, 0, &old, false).unwrap();
    let blocks = fs.getattr(ino).unwrap().blocks;
    fs.stop_large_appends_after(3);
    assert!(fs
        .write_data(ino, mb as u64, &pattern(8, mb), false)
        .is_err());
    fs.stop_large_appends_after(0);
    let i = fs.getattr(ino).unwrap();
    assert_eq!((i.size, i.blocks), (mb as u64, blocks), "size and blocks");
    let report = fs.check().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    fs.setattr(ino, SetAttr::size(2 * mb as u64)).unwrap();
    assert!(
        fs.read_data(ino, mb as u64, mb)
            .unwrap()
            .iter()
            .all(|b| *b == 0),
        "the failed append showed through the extension"
    );
    let before = fs.appends_unlocked();
    let new = pattern(9, mb);
    fs.write_data(ino, 2 * mb as u64, &new, false).unwrap();
    assert_eq!(
        fs.appends_unlocked() - before,
        1,
        "the next append took the lock"
    );
    fs.sync().unwrap();
    let img = dev.image();
    drop(fs);
    let fs = Fs::mount(open(Arc::new(MemDevice::from_image(img)))).unwrap();
    let mut want = old;
    want.resize(2 * mb, 0);
    want.extend_from_slice(&new);
    assert_eq!(fs.getattr(ino).unwrap().size, 3 * mb as u64);
    assert!(fs.read_data(ino, 0, 3 * mb).unwrap() == want);
    assert!(fs.check().unwrap().problems.is_empty());
}

/// A large append that starts inside a block spans one block more than
/// its length in blocks: it reserves, writes and counts every one of
/// them (the first version counted its length in blocks).
#[test]
fn an_unaligned_large_append_counts_every_block() {
    let (_dev, fs, ino) = one_file_kernel_times();
    let data = pattern(10, 64 << 10);
    let before = fs.appends_unlocked();
    fs.write_data(ino, 8192 + 100, &data, false).unwrap();
    assert_eq!(fs.appends_unlocked() - before, 1, "not without the lock");
    let i = fs.getattr(ino).unwrap();
    assert_eq!((i.size, i.blocks), (8192 + 100 + (64 << 10), 17));
    assert!(fs.read_data(ino, 8192 + 100, 64 << 10).unwrap() == data);
    fs.setattr(ino, SetAttr::size(0)).unwrap();
    assert_eq!(fs.getattr(ino).unwrap().blocks, 0);
    assert!(fs.check().unwrap().problems.is_empty());
}

/// A large append checks that none of its file's blocks was freed
/// between reserving them and writing them without the lock: frees from
/// other files (an `rm` or a truncate beside the writer) leave it on the
/// path without the lock, while a punch through its own reserved blocks
/// sends it back to the locked path, which still writes it whole. (The
/// first version counted every free on the volume, so the append beside
/// another file's truncation took the lock too.)
#[test]
fn only_frees_from_the_appending_file_send_an_append_back_to_the_lock() {
    let (dev, fs, ino) = one_file_kernel_times();
    let mb = 1usize << 20;
    let (other, _) = fs.mknod(ROOT, b"other", REG, 0, 0, 0).unwrap();
    fs.write_data(other, 0, &pattern(1, 4 * mb), false).unwrap();
    fs.commit_pending().unwrap();
    let first = pattern(2, mb);
    fs.write_data(ino, 0, &first, false).unwrap();

    // Another file loses all of its blocks between the steps.
    fs.between_large_append_steps(Some(Arc::new(move |fs: &Fs, _: &[u64]| {
        fs.setattr(other, SetAttr::size(0)).unwrap();
    })));
    let before = fs.appends_unlocked();
    let second = pattern(3, mb);
    fs.write_data(ino, mb as u64, &second, false).unwrap();
    assert_eq!(
        fs.appends_unlocked() - before,
        1,
        "another file's truncation sent the append to the lock"
    );
    assert_eq!(fs.getattr(other).unwrap().blocks, 0);

    // The appending file's reserved blocks are punched out between the
    // steps and handed to a new file: written there by step 2, the
    // append would overwrite that file.
    let (taker, _) = fs.mknod(ROOT, b"taker", REG, 0, 0, 0).unwrap();
    let taken = pattern(5, 8 * mb);
    let reserved = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = reserved.clone();
    let give = taken.clone();
    fs.between_large_append_steps(Some(Arc::new(move |fs: &Fs, lbas: &[u64]| {
        // Once: the new file's write is a large append too.
        fs.between_large_append_steps(None);
        *seen.lock().unwrap() = lbas.to_vec();
        fs.fallocate(
            ino,
            2 * (1 << 20),
            1 << 20,
            FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE,
        )
        .unwrap();
        fs.write_data(taker, 0, &give, false).unwrap();
    })));
    let before = fs.appends_unlocked();
    let third = pattern(4, mb);
    fs.write_data(ino, 2 * mb as u64, &third, false).unwrap();
    assert_eq!(
        fs.appends_unlocked(),
        before,
        "an append wrote blocks that were freed under it"
    );
    let reserved = reserved.lock().unwrap().clone();
    assert_eq!(reserved.len(), 256);
    let held = fs.file_blocks(taker).unwrap();
    assert!(
        held.iter().any(|b| reserved.contains(b)),
        "the new file got none of the punched blocks: the test shows nothing"
    );
    assert!(
        fs.read_data(taker, 0, 8 * mb).unwrap() == taken,
        "the new file was overwritten"
    );
    fs.between_large_append_steps(None);

    let mut want = first;
    want.extend_from_slice(&second);
    want.extend_from_slice(&third);
    let i = fs.getattr(ino).unwrap();
    assert_eq!((i.size, i.blocks), (3 * mb as u64, 3 * 256));
    assert!(fs.read_data(ino, 0, 3 * mb).unwrap() == want);
    let report = fs.check().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    fs.sync().unwrap();
    let img = dev.image();
    drop(fs);
    let fs = Fs::mount(open(Arc::new(MemDevice::from_image(img)))).unwrap();
    assert!(fs.read_data(ino, 0, 3 * mb).unwrap() == want);
    assert!(fs.read_data(taker, 0, 8 * mb).unwrap() == taken);
    assert!(fs.check().unwrap().problems.is_empty());
}
