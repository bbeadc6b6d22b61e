//! Snapshots through the real kernel FUSE mount: `.snapshots/NAME` read by
//! ordinary programs (ls, stat, cp -a, tar, find, diff -r, getfattr), every
//! kind of write refused with EROFS, stable inode numbers, the control
//! socket and mkdir/rmdir, remounts, kill -9, and space coming back.

mod common;

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::mounted::{as_nobody, as_nobody_with, lsvfs, ok, sh_in, Mounted};

const BIN: &str = env!("CARGO_BIN_EXE_lsvfs");

/// A small tree with every kind of thing a snapshot must keep.
fn populate(m: &Mounted) {
    m.sh(
        "mkdir -p d/sub e && printf hello > d/a.txt && head -c 300000 /dev/urandom > d/sub/big \
         && truncate -s 10M d/sparse && printf x | dd of=d/sparse bs=1 seek=5000000 conv=notrunc 2>/dev/null \
         && ln -s sub/big d/link && ln d/a.txt e/hard && : > d/empty && mkfifo d/fifo \
         && chmod 640 d/a.txt && chmod 1777 e && setfattr -n user.tag -v snapshot-me d/a.txt \
         && touch -d '2001-02-03 04:05:06.789' d/sub",
    );
}

/// `find` listing with type, mode, owner, size, mtime (ns), link target and
/// link count, sorted: what `cp -a` and `tar` preserve.
fn listing(dir: &Path) -> String {
    let out = sh_in(
        dir,
        "find . -printf '%p %y %m %U %G %s %T@ %l %n\\n' | LC_ALL=C sort",
    );
    // Directory sizes are not part of what is compared.
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            if f[1] == "d" {
                format!("{} d {} {} {} - {}", f[0], f[2], f[3], f[4], f[6])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn hashes(dir: &Path) -> String {
    sh_in(
        dir,
        "find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum",
    )
}

#[test]
fn a_snapshot_keeps_the_old_tree_byte_for_byte_and_restores_with_cp() {
    let m = Mounted::with_size("512M");
    populate(&m);
    let before_list = listing(&m.m());
    let before_hash = hashes(&m.m());
    let out = ok(&["snapshot", "create", "m", "before"], m.p());
    assert!(out.contains("snapshot before taken"), "{out}");
    let snap = m.m().join(".snapshots/before");

    // Change, delete and rename things in the live tree.
    m.sh(
        "printf changed > d/a.txt && rm d/sub/big && mv d/empty d/renamed && rm -r e \
         && chmod 600 d/sparse && setfattr -x user.tag d/a.txt && printf more >> d/renamed \
         && mkdir new && head -c 100000 /dev/urandom > new/f",
    );
    assert_ne!(listing(&m.m()), before_list, "the live tree changed");
    assert_eq!(listing(&snap), before_list, "the snapshot's tree");
    assert_eq!(hashes(&snap), before_hash, "the snapshot's file contents");
    assert_eq!(
        fs::read_link(snap.join("d/link")).unwrap(),
        Path::new("sub/big")
    );
    let x = sh_in(&snap, "getfattr --only-values -n user.tag d/a.txt");
    assert_eq!(x, "snapshot-me");
    // Programs that walk it: tar, diff -r against a copy.
    let outside = m.p().join("copy");
    sh_in(m.p(), "cp -a m/.snapshots/before copy");
    assert_eq!(listing(&outside), before_list, "cp -a of the snapshot");
    sh_in(
        m.p(),
        "diff -r --no-dereference -x fifo copy m/.snapshots/before",
    );
    let tarred = sh_in(
        m.p(),
        "tar -C m/.snapshots/before -cf - . | tar -tvf - | wc -l",
    );
    assert!(tarred.trim().parse::<u32>().unwrap() >= 10, "{tarred}");

    // Restore a deleted file and a changed one with cp.
    m.sh("cp -a .snapshots/before/d/sub/big d/sub/big && cp .snapshots/before/d/a.txt d/a.txt");
    assert_eq!(fs::read(m.m().join("d/a.txt")).unwrap(), b"hello");
    assert_eq!(
        fs::read(m.m().join("d/sub/big")).unwrap(),
        fs::read(snap.join("d/sub/big")).unwrap()
    );
    // `check` walks the snapshot's file system as well as the live one.
    m.unmount();
    let c = ok(&["check", "v.vol", "--key-file", "k"], m.p());
    assert!(c.contains("snapshot before: 10 inodes"), "{c}");
    assert!(c.contains("v.vol: clean"), "{c}");
}

fn erofs<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        other => panic!("{what} in a snapshot: want EROFS, got {other:?}"),
    }
}

#[test]
fn every_kind_of_write_in_a_snapshot_fails_with_erofs() {
    let m = Mounted::with_size("256M");
    populate(&m);
    ok(&["snapshot", "create", "m", "ro"], m.p());
    let s = m.m().join(".snapshots/ro");
    let f = s.join("d/a.txt");
    erofs("create", fs::File::create(s.join("d/new")));
    erofs(
        "open for writing",
        fs::OpenOptions::new().write(true).open(&f),
    );
    erofs(
        "open for append",
        fs::OpenOptions::new().append(true).open(&f),
    );
    erofs(
        "truncate on open",
        fs::OpenOptions::new().write(true).truncate(true).open(&f),
    );
    erofs("unlink", fs::remove_file(&f));
    erofs("rename", fs::rename(&f, s.join("d/b.txt")));
    erofs("rename out", fs::rename(&f, m.m().join("out")));
    erofs(
        "rename in",
        fs::rename(m.m().join("d/a.txt"), s.join("d/in")),
    );
    erofs(
        "chmod",
        fs::set_permissions(&f, fs::Permissions::from_mode(0o777)),
    );
    erofs("chown", std::os::unix::fs::chown(&f, Some(1), Some(1)));
    erofs("mkdir", fs::create_dir(s.join("d/newdir")));
    erofs("rmdir", fs::remove_dir(s.join("d/sub")));
    erofs("link", fs::hard_link(&f, s.join("d/hard2")));
    erofs("symlink", std::os::unix::fs::symlink("x", s.join("d/sym2")));
    let t = |cmd: &str| {
        let o = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(&s)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            !o.status.success() && err.contains("Read-only file system"),
            "{cmd}: {err}"
        );
    };
    t("setfattr -n user.x -v 1 d/a.txt");
    t("setfattr -x user.tag d/a.txt");
    t("truncate -s 0 d/a.txt");
    t("touch -d 2000-01-01 d/a.txt");
    t("mkfifo d/fifo2");
    t("fallocate -l 1M d/sub/big");
    // Nothing changed, and the live tree still takes writes.
    assert_eq!(fs::read(&f).unwrap(), b"hello");
    fs::write(m.m().join("d/a.txt"), b"live").unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"hello");
    // `.snapshots` itself can be neither created, removed nor renamed.
    match fs::create_dir(m.m().join(".snapshots")) {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        other => panic!("mkdir .snapshots: {other:?}"),
    }
    erofs("rmdir .snapshots", fs::remove_dir(m.m().join(".snapshots")));
    erofs(
        "rename .snapshots",
        fs::rename(m.m().join(".snapshots"), m.m().join("x")),
    );
    erofs(
        "create in .snapshots",
        fs::File::create(m.m().join(".snapshots/file")),
    );
    m.unmount_and_check();
}

#[test]
fn snapshots_dir_is_hidden_reachable_and_shown_by_a_mount_option() {
    let m = Mounted::with_size("256M");
    populate(&m);
    ok(&["snapshot", "create", "m", "one"], m.p());
    let root: Vec<String> = fs::read_dir(m.m())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(!root.contains(&".snapshots".to_string()), "{root:?}");
    let found = m.sh("find . | wc -l");
    let in_live = found.trim().parse::<u32>().unwrap();
    assert!(
        in_live < 20,
        "find does not descend into snapshots: {in_live}"
    );
    let du = m.sh("du -s --apparent-size -B1 . | cut -f1");
    assert!(du.trim().parse::<u64>().unwrap() < 20_000_000, "{du}");
    assert_eq!(m.sh("ls .snapshots"), "one\n");
    assert_eq!(m.sh("ls .snapshots/one"), "d\ne\n");
    // mkdir and rmdir under .snapshots create and delete snapshots.
    fs::create_dir(m.m().join(".snapshots/two")).unwrap();
    assert_eq!(m.sh("ls .snapshots"), "one\ntwo\n");
    assert_eq!(m.sh("ls .snapshots/two/d | wc -l").trim(), "6");
    let (ok_nobody, err) = as_nobody(&m.m(), "mkdir .snapshots/three");
    assert!(!ok_nobody, "only root takes snapshots: {err}");
    fs::remove_dir(m.m().join(".snapshots/one")).unwrap();
    assert_eq!(m.sh("ls .snapshots"), "two\n");
    assert!(!m.m().join(".snapshots/one").exists());
    m.unmount();
    ok(
        &["mount", "v.vol", "m", "--key-file", "k", "--show-snapshots"],
        m.p(),
    );
    let root = m.sh("ls -a");
    assert!(root.contains(".snapshots"), "{root}");
    assert_eq!(m.sh("ls .snapshots"), "two\n");
    m.unmount_and_check();
}

/// Runs `cmd` as nobody holding CAP_DAC_OVERRIDE, so that the kernel's
/// mode checks pass and the file system's own check is what answers.
fn as_nobody_past_modes(dir: &Path, cmd: &str) -> (bool, String) {
    as_nobody_with(
        dir,
        &["--inh-caps=+dac_override", "--ambient-caps=+dac_override"],
        cmd,
    )
}

/// Taking and deleting snapshots through `.snapshots` is root's alone, by
/// two checks: the kernel's (`.snapshots` is mode 0555, so EACCES) and,
/// for a process that may override modes, lsvfs's own (EPERM for any uid
/// but 0).
#[test]
fn only_root_takes_or_deletes_snapshots_through_the_snapshots_dir() {
    let m = Mounted::with_size("256M");
    populate(&m);
    ok(&["snapshot", "create", "m", "one"], m.p());
    for cmd in ["mkdir .snapshots/two", "rmdir .snapshots/one"] {
        let (done, err) = as_nobody(&m.m(), cmd);
        assert!(!done && err.contains("Permission denied"), "{cmd}: {err}");
        let (done, err) = as_nobody_past_modes(&m.m(), cmd);
        assert!(
            !done && err.contains("Operation not permitted"),
            "{cmd} with CAP_DAC_OVERRIDE: {err}"
        );
    }
    assert_eq!(m.sh("ls .snapshots"), "one\n");
    // Root can do both.
    m.sh("mkdir .snapshots/two && rmdir .snapshots/one");
    assert_eq!(m.sh("ls .snapshots"), "two\n");
    m.unmount_and_check();
}

/// Files in a snapshot keep the modes they had when it was taken: a file
/// that was private stays private there, and (the consequence
/// docs/SECURITY.md D12 states) a file another user could read stays
/// readable to that user in the snapshot after a chmod or rm in the live
/// tree, until the snapshot is deleted.
#[test]
fn files_in_a_snapshot_keep_the_modes_they_had() {
    let m = Mounted::with_size("256M");
    m.sh("echo private > private && chmod 600 private && echo open > open && chmod 644 open");
    ok(&["snapshot", "create", "m", "s"], m.p());
    m.sh("chmod 600 open && chmod 644 private");
    let (read, err) = as_nobody(&m.m(), "cat .snapshots/s/private");
    assert!(!read && err.contains("Permission denied"), "{err}");
    let (read, _) = as_nobody(&m.m(), "cat private");
    assert!(read, "the live file was made readable");
    let (read, err) = as_nobody(&m.m(), "cat open");
    assert!(!read && err.contains("Permission denied"), "{err}");
    let (read, err) = as_nobody(&m.m(), "cat .snapshots/s/open");
    assert!(read, "the snapshot keeps the old mode 0644: {err}");
    m.sh("rm open");
    let (read, err) = as_nobody(&m.m(), "cat .snapshots/s/open");
    assert!(
        read,
        "deleting the live file does not change the snapshot: {err}"
    );
    m.unmount_and_check();
}

#[test]
fn inode_numbers_are_stable_and_never_collide() {
    let m = Mounted::with_size("256M");
    populate(&m);
    ok(&["snapshot", "create", "m", "a"], m.p());
    ok(&["snapshot", "create", "m", "b"], m.p());
    let ino = |p: &str| fs::symlink_metadata(m.m().join(p)).unwrap().ino();
    let live = ino("d/a.txt");
    let a = ino(".snapshots/a/d/a.txt");
    let b = ino(".snapshots/b/d/a.txt");
    assert!(live != a && a != b && live != b, "{live} {a} {b}");
    // Hard links in a snapshot share one number.
    assert_eq!(ino(".snapshots/a/e/hard"), a);
    // Every inode in the live tree and both snapshots is distinct across them.
    let all = m.sh("find . .snapshots/a .snapshots/b -printf '%i\\n' | sort | uniq -d | wc -l");
    let dup_links = m.sh(
        "for t in . .snapshots/a .snapshots/b; do find $t -links +1 ! -type d -printf '%i\\n' | sort | uniq -d; done | wc -l",
    );
    assert_eq!(all.trim(), dup_links.trim(), "only hard links repeat");
    let before = (ino(".snapshots/a/d/sub/big"), ino(".snapshots/b"));
    m.unmount();
    m.mount();
    assert_eq!(
        (ino(".snapshots/a/d/sub/big"), ino(".snapshots/b")),
        before,
        "the same numbers after a remount"
    );
    m.unmount_and_check();
}

fn free_bytes(dir: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(dir).unwrap();
    s.blocks_available() as u64 * s.fragment_size() as u64
}

#[test]
fn list_shows_time_and_unique_space_and_delete_frees_it() {
    let m = Mounted::with_size("256M");
    m.sh("head -c 60000000 /dev/urandom > f && sync");
    ok(&["snapshot", "create", "m", "s1"], m.p());
    let free0 = free_bytes(&m.m());
    // Overwrite the file in place: the snapshot now holds the old 60 MB.
    m.sh("head -c 60000000 /dev/urandom | dd of=f conv=notrunc bs=1M 2>/dev/null && sync");
    let free1 = free_bytes(&m.m());
    assert!(
        free1 + 55_000_000 < free0,
        "statfs counts what the snapshot holds: {free0} -> {free1}"
    );
    let out = ok(&["snapshot", "list", "m", "--json"], m.p());
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["name"], "s1");
    let unique = v["unique_blocks"].as_u64().unwrap() * 4096;
    assert!(
        (60_000_000..62_000_000).contains(&unique),
        "s1 alone holds the overwritten data: {unique}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - v["created_sec"].as_i64().unwrap()).abs() < 120);
    let table = ok(&["snapshot", "list", "m"], m.p());
    assert!(
        table.contains("s1") && table.contains("CREATED (UTC)"),
        "{table}"
    );
    ok(&["snapshot", "delete", "m", "s1"], m.p());
    let free2 = free_bytes(&m.m());
    assert!(
        free2 > free1 + 55_000_000,
        "deleting the snapshot frees its space: {free1} -> {free2}"
    );
    let o = lsvfs(&["snapshot", "delete", "m", "s1"], m.p());
    assert!(!o.status.success(), "deleting a missing snapshot fails");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("s1"), "{err}");
    m.unmount_and_check();
}

#[test]
fn a_snapshot_holds_writes_the_kernel_had_not_yet_sent() {
    let m = Mounted::with_size("256M");
    // The writer keeps the file open: its data is only in the kernel's
    // page cache (writeback caching) when the snapshot is requested.
    let cmd = format!(
        "exec 3>held && printf 'written before the snapshot' >&3 && {BIN} snapshot create . s >/dev/null && cat .snapshots/s/held"
    );
    assert_eq!(m.sh(&cmd), "written before the snapshot");
    m.unmount_and_check();
}

#[test]
fn snapshots_survive_remount_and_kill_9_while_being_taken_and_deleted() {
    let m = Mounted::with_size("512M");
    populate(&m);
    ok(&["snapshot", "create", "m", "kept"], m.p());
    m.unmount();
    m.mount();
    assert_eq!(m.sh("cat .snapshots/kept/d/a.txt"), "hello");
    // Writers with fsync, and a loop that takes and deletes snapshots, then
    // kill -9 of the daemon in the middle.
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(
            "i=0; while [ $i -lt 400 ]; do head -c 65536 /dev/urandom > w$i && sync w$i && echo w$i >> ../synced; i=$((i+1)); done",
        )
        .current_dir(m.m())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut snapper = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "i=0; while [ $i -lt 200 ]; do {BIN} snapshot create . t$i >/dev/null 2>&1 && echo t$i >> ../taken; \
             [ $i -ge 3 ] && rmdir .snapshots/t$((i-3)) 2>/dev/null; i=$((i+1)); done"
        ))
        .current_dir(m.m())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let pid = m.daemon_pid();
    Command::new("kill").args(["-9", &pid]).status().unwrap();
    let _ = writer.wait();
    let _ = snapper.wait();
    let _ = Command::new("fusermount3").arg("-uz").arg(m.m()).status();
    m.mount();
    // Every fsynced file survived.
    let synced = fs::read_to_string(m.p().join("synced")).unwrap_or_default();
    assert!(synced.lines().count() >= 5, "the writer ran: {synced}");
    for f in synced.lines() {
        assert_eq!(fs::metadata(m.m().join(f)).unwrap().len(), 65536, "{f}");
    }
    let c = ok(&["snapshot", "list", "m"], m.p());
    assert!(c.contains("kept"), "{c}");
    assert_eq!(m.sh("cat .snapshots/kept/d/a.txt"), "hello");
    // Every snapshot that is there reads completely.
    m.sh("for s in .snapshots/*; do find $s -type f -exec cat {} + > /dev/null; done");
    let taken = fs::read_to_string(m.p().join("taken")).unwrap_or_default();
    assert!(
        taken.lines().count() >= 2,
        "snapshots were taken before the kill: {taken}"
    );
    m.unmount_and_check();
}

#[test]
fn the_control_socket_refuses_garbage_and_other_users() {
    let m = Mounted::with_size("256M");
    let mp = fs::canonicalize(m.m()).unwrap();
    let sock = control_socket(Path::new("/run/lsvfs"), &mp);
    let mode = fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is root's alone");
    for garbage in [
        &b"not json\n"[..],
        b"{\"op\":\"format\"}\n",
        b"{\"op\":\"create\",\"name\":\"../x\"}\n",
        &[0xffu8; 5000][..],
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(garbage);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        use std::io::Read;
        let _ = s.read_to_string(&mut answer);
        assert!(answer.contains("\"ok\":false"), "{answer}");
    }
    let (ok_nobody, err) = as_nobody(m.p(), &format!("{BIN} snapshot list m"));
    assert!(!ok_nobody, "nobody may not use the control socket: {err}");
    // Still serving.
    ok(&["snapshot", "create", "m", "after"], m.p());
    assert!(m.m().join(".snapshots/after").is_dir());
    m.unmount_and_check();
}

/// The control socket's path for `mountpoint` under `run` (FORMAT.md,
/// "Control socket").
fn control_socket(run: &Path, mountpoint: &Path) -> std::path::PathBuf {
    use sha2::Digest;
    let d = sha2::Sha256::digest(mountpoint.as_os_str().as_encoded_bytes());
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    run.join(format!("{hex}.sock"))
}

/// The mount's own check of its peer's uid, alone: with the run directory
/// opened to 0755 and the socket to 0666 (as a careless admin might),
/// `nobody` reaches the socket and is still refused by its credentials;
/// root is served.
#[test]
fn the_control_socket_refuses_other_users_by_peer_credentials() {
    let m = Mounted::with_size("256M");
    m.unmount();
    let run = m.p().join("run");
    fs::set_permissions(m.p(), fs::Permissions::from_mode(0o755)).unwrap();
    let with_run = |args: &[&str]| {
        let o = Command::new(BIN)
            .args(args)
            .current_dir(m.p())
            .env("LSVFS_RUN_DIR", &run)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stderr).to_string();
        (o.status.success(), text)
    };
    let (mounted, err) = with_run(&["mount", "v.vol", "m", "--key-file", "k"]);
    assert!(mounted, "{err}");
    let sock = control_socket(&run, &fs::canonicalize(m.m()).unwrap());
    fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o666)).unwrap();
    let (listed, err) = as_nobody(
        m.p(),
        &format!(
            "LSVFS_RUN_DIR={} {BIN} snapshot create m by-nobody",
            run.display()
        ),
    );
    assert!(!listed, "nobody took a snapshot");
    assert!(
        err.contains("the snapshot control socket is for root"),
        "{err}"
    );
    assert!(!m.m().join(".snapshots/by-nobody").exists());
    let (created, err) = with_run(&["snapshot", "create", "m", "by-root"]);
    assert!(created, "{err}");
    assert!(m.m().join(".snapshots/by-root").is_dir());
    let (unmounted, err) = with_run(&["unmount", "m"]);
    assert!(unmounted, "{err}");
}

/// A socket at the control path that another user serves (an impostor
/// waiting for root to ask a mount for its snapshots) is refused before
/// anything is sent; the same socket served by root is talked to.
#[test]
fn the_snapshot_client_trusts_only_a_socket_served_by_root_or_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    let (run, mp) = (dir.join("run"), dir.join("m"));
    fs::create_dir(&run).unwrap();
    fs::create_dir(&mp).unwrap();
    std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let sock = control_socket(&run, &mp);
    // Serves one connection: records what it received, answers garbage.
    let server = "import socket,sys\n\
        s=socket.socket(socket.AF_UNIX)\n\
        s.bind(sys.argv[1])\n\
        s.listen(1)\n\
        c,_=s.accept()\n\
        c.settimeout(5)\n\
        data=c.recv(4096)\n\
        open(sys.argv[1]+'.got','wb').write(data)\n\
        try:\n c.sendall(b'not the answer of a mount\\n')\n\
        except OSError:\n pass\n";
    for (uid, trusted) in [(65534u32, false), (0, true)] {
        let _ = fs::remove_file(&sock);
        let _ = fs::remove_file(sock.with_extension("sock.got"));
        let mut child = Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .args(["--clear-groups", "/usr/bin/python3", "-c", server])
            .arg(&sock)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the socket did not appear"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let o = Command::new(BIN)
            .args(["snapshot", "list"])
            .arg(&mp)
            .env("LSVFS_RUN_DIR", &run)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "uid {uid}: {err}");
        let got = fs::read(sock.with_extension("sock.got")).unwrap_or_default();
        if trusted {
            assert!(
                err.contains("not valid"),
                "root's socket was talked to: {err}"
            );
            assert!(
                String::from_utf8_lossy(&got).contains("\"op\""),
                "request sent"
            );
        } else {
            assert!(
                err.contains("served by uid 65534") && err.contains("refusing to trust it"),
                "{err}"
            );
            assert!(got.is_empty(), "a request was sent to the impostor");
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// 50 snapshots kept (mkdir new, rmdir oldest) while a file is rewritten a
/// megabyte at a time: live data (40 MB) plus what the snapshots hold
/// (50 MB) fits the 128 MiB volume, so nothing may fail with ENOSPC; the
/// cleaner has to move blocks only snapshots hold. Every snapshot left
/// reads back as it was taken.
#[test]
fn fifty_snapshots_under_a_rewrite_workload_do_not_run_out_of_space() {
    let m = Mounted::with_size("128M");
    m.sh("head -c 41943040 /dev/urandom > f && sync");
    let mut kept = std::collections::VecDeque::new();
    for round in 0..90u64 {
        let at = (round * 7) % 40;
        m.sh(&format!(
            "head -c 1048576 /dev/urandom | dd of=f bs=1M seek={at} conv=notrunc,fsync 2>/dev/null"
        ));
        let name = format!("r{round}");
        fs::create_dir(m.m().join(".snapshots").join(&name))
            .unwrap_or_else(|e| panic!("round {round}: snapshot: {e}"));
        let sum = m.sh("sha256sum < f");
        kept.push_back((name, sum));
        if kept.len() > 50 {
            let (old, _) = kept.pop_front().unwrap();
            fs::remove_dir(m.m().join(".snapshots").join(old)).unwrap();
        }
    }
    assert_eq!(m.sh("ls .snapshots | wc -l").trim(), "50");
    for (name, sum) in &kept {
        assert_eq!(
            &m.sh(&format!("sha256sum < .snapshots/{name}/f")),
            sum,
            "{name}"
        );
    }
    m.unmount_and_check();
}
