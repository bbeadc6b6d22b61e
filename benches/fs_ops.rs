//! The file system's own cost per metadata operation, without FUSE: what
//! the daemon spends on each request it is sent (a program, not a timed
//! test).
//!
//!     cargo bench --bench fs_ops -- [--dir DIR] [--files 10000]
//!
//! Runs on a volume file in DIR (default target/fsops) the operations the
//! kernel sends for `scripts/bench.sh`'s metadata workloads: CREATE, WRITE
//! of 4 KiB, SETATTR of the times (the kernel's writeback cache sends it at
//! close), SETXATTR of an ACL and WRITE of 16 KiB (`cp -a`), READ of 16 KiB
//! (`tar c`), LOOKUP, GETATTR and UNLINK, for FILES files in 100
//! directories. Prints microseconds per operation. Compare with the
//! time per request the kernel sees (`scripts/fuse-requests.sh`): the rest
//! is the round trip through the kernel.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use lsvfs::crypto::{MasterKey, KEY_LEN};
use lsvfs::device::FileDevice;
use lsvfs::fs::format::Time;
use lsvfs::fs::{Fs, SetAttr};
use lsvfs::volume::{self, CreateOptions, KeySlot, Options, Volume, KEY_SLOTS};
use lsvfs::BLOCK_SIZE;
use zeroize::Zeroizing;

use lsvfs::fs::{Ino, ROOT_INO as ROOT};
const DIRS: usize = 100;

/// The file system's own cost per metadata operation.
#[derive(clap::Parser)]
struct Args {
    /// Directory for the volume file.
    #[arg(long, default_value = "target/fsops")]
    dir: PathBuf,
    /// Files to create, in 100 directories.
    #[arg(long, default_value_t = 10_000)]
    files: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let Args { dir, files, .. } = <Args as clap::Parser>::parse();
    std::fs::create_dir_all(&dir).expect("creating the benchmark directory");
    let path = dir.join("fsops.vol");
    let _ = std::fs::remove_file(&path);

    let master = MasterKey::from_bytes(Zeroizing::new([0x44; KEY_LEN]));
    let dev = FileDevice::create(&path).expect("creating the volume file");
    volume::create(
        &dev,
        &master,
        [9; 16],
        [KeySlot::EMPTY; KEY_SLOTS],
        &CreateOptions {
            logical_blocks: 4 << 20, // 16 GiB, sparse
            segment_blocks: 1024,
        },
    )
    .expect("creating the volume");
    drop(dev);
    let open = || {
        Volume::open(
            Arc::new(FileDevice::open(&path, true).expect("opening the volume file")),
            &master,
            Options::default(),
        )
        .expect("opening the volume")
    };
    let v = open();
    Fs::format(&v, 0, 0).expect("formatting");
    let fs = Fs::mount(v).expect("mounting");
    fs.set_kernel_times(true);

    let per_dir = files.div_ceil(DIRS);
    let mut dirs = Vec::with_capacity(DIRS);
    for d in 0..DIRS {
        let name = format!("d{d:03}");
        let (ino, _) = fs
            .create_node(ROOT, name.as_bytes(), libc::S_IFDIR | 0o755, 0o022, 0, 0, 0)
            .expect("mkdir");
        dirs.push(ino);
    }
    let names: Vec<(Ino, Vec<u8>)> = (0..files)
        .map(|i| (dirs[i / per_dir], format!("f{:05}", i).into_bytes()))
        .collect();
    let data = vec![0x5au8; BLOCK_SIZE];
    let mut inos = Vec::with_capacity(files);

    let report = |name: &str, t: Instant| {
        let us = t.elapsed().as_secs_f64() * 1e6 / files as f64;
        println!("{name:<28} {us:>8.1} us/op");
    };
    let t = Instant::now();
    for (parent, name) in &names {
        let (ino, _) = fs
            .create_node(*parent, name, libc::S_IFREG | 0o644, 0o022, 0, 0, 0)
            .expect("create");
        inos.push(ino);
    }
    report("create", t);
    let t = Instant::now();
    for &ino in &inos {
        fs.write_data(ino, 0, &data, false).expect("write");
    }
    report("write 4 KiB", t);
    let t = Instant::now();
    for (i, &ino) in inos.iter().enumerate() {
        let now = Time {
            sec: 1_800_000_000 + i as i64,
            nsec: 0,
        };
        let a = SetAttr {
            mtime: Some(now),
            ctime: Some(now),
            ..SetAttr::default()
        };
        fs.setattr(ino, a).expect("setattr");
    }
    report("setattr (times)", t);
    // What `cp -a` adds: the copied ACL (here one equivalent to the mode,
    // as cp sets it on a file without an ACL) and 16 KiB files (the
    // average in /usr/include); what `tar c` reads back.
    let acl = [
        2u8, 0, 0, 0, 1, 0, 6, 0, 255, 255, 255, 255, 4, 0, 4, 0, 255, 255, 255, 255, 32, 0, 4, 0,
        255, 255, 255, 255,
    ];
    let t = Instant::now();
    for &ino in &inos {
        fs.setxattr(ino, b"system.posix_acl_access", &acl, 0)
            .expect("setxattr");
    }
    report("setxattr (ACL)", t);
    let data16 = vec![0xa5u8; 4 * BLOCK_SIZE];
    let t = Instant::now();
    for &ino in &inos {
        fs.write_data(ino, 0, &data16, false).expect("write");
    }
    report("write 16 KiB", t);
    let t = Instant::now();
    for &ino in &inos {
        let got = fs.read_data(ino, 0, data16.len()).expect("read");
        assert_eq!(got.len(), data16.len(), "read back 16 KiB");
    }
    report("read 16 KiB", t);
    let t = Instant::now();
    for (parent, name) in &names {
        fs.lookup(*parent, name).expect("lookup");
    }
    report("lookup", t);
    let t = Instant::now();
    for &ino in &inos {
        fs.getattr(ino).expect("getattr");
    }
    report("getattr", t);
    let t = Instant::now();
    for (parent, name) in &names {
        fs.unlink(*parent, name).expect("unlink");
    }
    report("unlink", t);
    fs.unmount().expect("unmounting");
    let _ = std::fs::remove_file(&path);
}
