//! FUSE over io_uring through the real kernel: a mount negotiates it where
//! the kernel offers it and serves every request through its queues, says
//! which transport serves it, serves over /dev/fuse when asked or when the
//! kernel does not offer it, and refuses `--transport uring` then, saying
//! how to turn it on. One test: it flips the kernel's module parameter,
//! which other mounts in this binary must not see.

mod common;

use std::fs;
use std::path::Path;

use common::mounted::{lsvfs, ok, sh_in};

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Puts the module parameter back as it was.
struct Param(String);

impl Param {
    fn set(on: bool) {
        fs::write(PARAM, if on { "1" } else { "0" }).expect("setting fuse.enable_uring (as root)");
    }
}

impl Drop for Param {
    fn drop(&mut self) {
        Param::set(self.0.trim() == "Y");
    }
}

/// Detaches a mount left by a failed assertion.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `lsvfs info`'s transport line for the (mounted) volume in `dir`.
fn transport(dir: &Path) -> String {
    let o = lsvfs(&["info", "v.vol"], dir);
    let info = String::from_utf8_lossy(&o.stdout).to_string();
    info.lines()
        .find(|l| l.starts_with("transport:"))
        .unwrap_or_else(|| panic!("no transport line in info:\n{info}"))
        .to_string()
}

/// The requests the queues answered, from the transport line.
fn ring_requests(line: &str) -> u64 {
    let n = line
        .rsplit(": ")
        .next()
        .filter(|_| line.contains("requests through its queues: "))
        .unwrap_or_else(|| panic!("no request count in {line:?}"));
    n.trim().parse().unwrap()
}

/// Whether this is Linux `major.minor` or later.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut n = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|x| x.parse::<u32>().ok());
    (n.next().unwrap_or(0), n.next().unwrap_or(0)) >= (major, minor)
}

/// Names of the threads of the mount daemon running in `dir`.
fn threads(dir: &Path) -> Vec<String> {
    let dir = fs::canonicalize(dir).unwrap();
    let daemons: Vec<_> = fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("mount\0")
                && cmd.contains("--foreground")
                && fs::read_link(e.path().join("cwd")).ok().as_deref() == Some(&*dir)
        })
        .collect();
    assert_eq!(daemons.len(), 1, "one mount daemon in {}", dir.display());
    fs::read_dir(daemons[0].path().join("task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

/// Work that takes every kind of request: names, data both ways (larger
/// than one request), fsync from several processes at once, xattrs,
/// listings, renames over files, a snapshot, deletes; reads past the
/// page cache (O_DIRECT) that start inside a block and end past a READ.
fn workload(m: &Path) {
    sh_in(
        m,
        "set -e
         mkdir -p d/e && echo one > d/a && ln d/a d/h && ln -s a d/s
         head -c 9000000 /dev/urandom > big && cp big d/e/copy && cmp big d/e/copy
         python3 -c 'import os
want = open(\"big\", \"rb\").read()
f = os.open(\"big\", os.O_RDONLY | os.O_DIRECT)
for at, n in [(4000, 100), (4000, 3 << 20), (8192, 1 << 20), (8999990, 100)]:
    assert os.pread(f, n, at) == want[at:at + n], (at, n)'
         setfattr -n user.k -v v d/a && [ \"$(getfattr --only-values -n user.k d/a)\" = v ]
         for i in 1 2 3 4; do python3 -c 'import os,sys
f=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT, 0o644)
for _ in range(50): os.write(f, b\"x\"*4096); os.fsync(f)' f$i & done; wait
         echo two > t && mv t d/a && [ \"$(cat d/a)\" = two ] && [ \"$(readlink d/s)\" = a ]
         fallocate -l 4M d/fa && truncate -s 1M d/fa && [ $(stat -c %s d/fa) = 1048576 ]
         mkdir .snapshots/s1 && cmp big .snapshots/s1/big
         ls -la d d/e >/dev/null && rm -r d/e && rm f1 f2 && [ ! -e d/e ]",
    );
}

#[test]
fn transport_is_negotiated_reported_and_falls_back() {
    let Ok(was) = fs::read_to_string(PARAM) else {
        eprintln!("skipped: this kernel has no FUSE over io_uring ({PARAM} is missing)");
        return;
    };
    let _restore = Param(was);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    fs::create_dir(p.join("m")).unwrap();
    let _unmount = Unmount(p.join("m"));
    ok(&["keygen", "k"], p);
    ok(&["create", "v.vol", "--size", "2G", "--key-file", "k"], p);
    let mount = |extra: &[&str]| {
        let mut args = vec!["mount", "v.vol", "m", "--key-file", "k"];
        args.extend_from_slice(extra);
        lsvfs(&args, p)
    };

    // Offered and asked for: every request after INIT comes through the
    // queues, one pinned thread pair per CPU.
    Param::set(true);
    let o = mount(&["--transport", "uring"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line = transport(p);
    assert!(line.contains("FUSE over io_uring"), "{line}");
    let before = ring_requests(&line);
    workload(&p.join("m"));
    let after = ring_requests(&transport(p));
    assert!(
        after >= before + 300,
        "the workload's requests did not come through the queues: {before} then {after}"
    );
    assert!(threads(p).iter().any(|t| t.starts_with("lsvfs-ring-")));
    ok(&["unmount", "m"], p);
    let c = ok(&["check", "v.vol", "--key-file", "k"], p);
    assert!(c.contains("v.vol: clean"), "{c}");

    // A listing fills each reply as far as the kernel's buffer allows (32
    // KiB for a getdents64 of 32 KiB on Linux 6.16 and later), so the
    // first reply, which comes with attributes (READDIRPLUS), covers a
    // directory of 150 entries, and a stat of each entry after the
    // listing (as `ls -l` and `find` do) needs no LOOKUP. Filled to a
    // page's worth (48 entries), as before, the 102 entries after those
    // each took a LOOKUP. On a fresh mount, so that no entry is cached.
    let o = mount(&["--transport", "uring"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    sh_in(
        &p.join("m"),
        "mkdir list && cd list && touch $(seq -f f%03g 150)",
    );
    ok(&["unmount", "m"], p);
    let o = mount(&["--transport", "uring"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = ring_requests(&transport(p));
    let listed = sh_in(
        &p.join("m"),
        "python3 -c 'import os; print(sum(os.lstat(\"list/\" + n).st_size == 0 for n in os.listdir(\"list\")))'",
    );
    let after = ring_requests(&transport(p));
    assert_eq!(listed.trim(), "150");
    if kernel_at_least(6, 16) {
        assert!(
            after - before < 30,
            "listing 150 entries and a stat of each took {} requests",
            after - before
        );
    } else {
        eprintln!(
            "request count not checked: before Linux 6.16 the kernel asks one page per listing"
        );
    }
    ok(&["unmount", "m"], p);

    // Asked for /dev/fuse: no queues, and the same tree.
    let o = mount(&["-o", "transport=dev"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        transport(p).contains("FUSE over /dev/fuse"),
        "{}",
        transport(p)
    );
    assert!(!threads(p).iter().any(|t| t.starts_with("lsvfs-ring-")));
    sh_in(
        &p.join("m"),
        "cmp big .snapshots/s1/big && [ \"$(cat d/a)\" = two ] && [ $(stat -c %s f3) = 204800 ]",
    );
    ok(&["unmount", "m"], p);

    // Not offered: `uring` is refused with the way out, and nothing stays
    // mounted; `auto` (the default) serves over /dev/fuse.
    Param::set(false);
    let o = mount(&["--transport", "uring"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "mounted without io_uring: {err}");
    assert!(
        err.contains("does not offer FUSE over io_uring") && err.contains("enable_uring"),
        "{err}"
    );
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let m = fs::canonicalize(p.join("m")).unwrap();
    assert!(
        !mounts.contains(&format!(" {} ", m.display())),
        "left mounted:\n{mounts}"
    );
    let o = mount(&["--transport", "auto"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        transport(p).contains("FUSE over /dev/fuse"),
        "{}",
        transport(p)
    );
    sh_in(&p.join("m"), "[ \"$(cat d/a)\" = two ]");
    ok(&["unmount", "m"], p);
}
