//! lsvfs as the host mounts file systems: `mount -t lsvfs`, fstab entries
//! through the mount.lsvfs helper, `umount` through umount.fuse.lsvfs, and
//! read-only mounts that leave the backing file's bytes as they were.
//! Everything goes through the real mount(8), umount(8) and kernel FUSE.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::mounted::{info_blocks, lsvfs, ok, sh_in, try_sh, Mounted};

const BIN: &str = env!("CARGO_BIN_EXE_lsvfs");

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The helpers mount(8) and umount(8) look for, linked to the binary under
/// test for as long as this lives; whatever was there before (an installed
/// package's links) is put back afterwards.
struct Helpers {
    saved: Vec<(PathBuf, Option<PathBuf>)>,
}

impl Helpers {
    fn install() -> Helpers {
        let mut saved = Vec::new();
        for name in ["mount.lsvfs", "umount.fuse.lsvfs"] {
            let link = Path::new("/sbin").join(name);
            let before = fs::read_link(&link).ok();
            assert!(
                before.is_some() || !link.exists(),
                "{} is a file, not a link; not replacing it",
                link.display()
            );
            let tmp = link.with_extension("lsvfs-test");
            let _ = fs::remove_file(&tmp);
            std::os::unix::fs::symlink(BIN, &tmp).unwrap();
            fs::rename(&tmp, &link).unwrap();
            saved.push((link, before));
        }
        Helpers { saved }
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        for (link, before) in &self.saved {
            match before {
                Some(target) => {
                    let tmp = link.with_extension("lsvfs-test");
                    let _ = fs::remove_file(&tmp);
                    let _ = std::os::unix::fs::symlink(target, &tmp);
                    let _ = fs::rename(&tmp, link);
                }
                None => {
                    let _ = fs::remove_file(link);
                }
            }
        }
    }
}

/// The mountinfo line of the mount on `dir`, if any.
fn mountinfo(dir: &Path) -> Option<String> {
    let dir = fs::canonicalize(dir).ok()?;
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == dir.to_str())
        .map(String::from)
}

fn sha256(path: &Path) -> String {
    sh_in(Path::new("/"), &format!("sha256sum {}", path.display()))
}

/// A new volume `name`.vol with its key file `name`.key and mountpoint
/// `name`, in `dir`.
fn new_volume(dir: &Path, name: &str) {
    ok(&["keygen", &format!("{name}.key")], dir);
    ok(
        &[
            "create",
            &format!("{name}.vol"),
            "--size",
            "256M",
            "--key-file",
            &format!("{name}.key"),
        ],
        dir,
    );
    fs::create_dir(dir.join(name)).unwrap();
}

/// An fstab with two lsvfs volumes, mounted with `mount --fstab F -a`,
/// used, and unmounted with plain `umount`; each `umount` returns only
/// once its volume is closed (`lsvfs check` opens it at once). Bad options
/// fail naming the option, and mount(8)'s own options pass.
#[test]
fn fstab_entries_mount_with_mount_a_and_umount_closes_the_volume() {
    let _helpers = Helpers::install();
    let d = tempfile::tempdir().unwrap();
    let p = fs::canonicalize(d.path()).unwrap();
    new_volume(&p, "data");
    new_volume(&p, "archive");
    // The archive gets a file before it is mounted read-only from fstab.
    ok(
        &[
            "mount",
            "archive.vol",
            "archive",
            "--key-file",
            "archive.key",
        ],
        &p,
    );
    fs::write(p.join("archive/old"), b"kept").unwrap();
    ok(&["unmount", "archive"], &p);

    let fstab = p.join("fstab");
    let at = |f: &str| p.join(f).display().to_string();
    fs::write(
        &fstab,
        format!(
            "# lsvfs volumes\n\
             {} {} lsvfs defaults,_netdev,nofail,x-systemd.requires=network-online.target,key_file={},noexec,nodev 0 0\n\
             {} {} lsvfs ro,key_file={},show_snapshots,comment=backups 0 0\n",
            at("data.vol"),
            at("data"),
            at("data.key"),
            at("archive.vol"),
            at("archive"),
            at("archive.key"),
        ),
    )
    .unwrap();
    let (mounted, out) = try_sh(&p, &format!("mount --fstab {} -a", fstab.display()));
    assert!(mounted, "mount -a: {out}");

    let data = mountinfo(&p.join("data")).expect("data is mounted");
    assert!(data.contains(" - fuse.lsvfs lsvfs:"), "{data}");
    assert!(data.contains("noexec") && data.contains("nodev"), "{data}");
    let archive = mountinfo(&p.join("archive")).expect("archive is mounted");
    assert!(archive.contains(" ro,"), "{archive}");
    // The options took effect: writes, noexec, ro, show_snapshots.
    sh_in(&p, "echo hello > data/f && cp /bin/true data/t && sync");
    let (ran, out) = try_sh(&p, "./data/t");
    assert!(!ran && out.contains("Permission denied"), "noexec: {out}");
    assert_eq!(fs::read(p.join("archive/old")).unwrap(), b"kept");
    let (wrote, out) = try_sh(&p, "touch archive/new");
    assert!(!wrote && out.contains("Read-only file system"), "{out}");
    assert!(sh_in(&p, "ls -a archive").contains(".snapshots"));

    // umount waits for the daemon: the volume opens right after. By an
    // absolute path (as systemd unmounts) too: umount(8) then takes the
    // type from statfs(2), "fuse", unless utab has an entry for the path.
    sh_in(
        &p,
        "dd if=/dev/urandom of=data/big bs=1M count=64 status=none",
    );
    for name in ["data", "archive"] {
        let target = if name == "data" {
            at(name)
        } else {
            name.into()
        };
        let (unmounted, out) = try_sh(&p, &format!("umount {target}"));
        assert!(unmounted, "umount {name}: {out}");
        assert!(mountinfo(&p.join(name)).is_none());
        let c = ok(
            &[
                "check",
                &format!("{name}.vol"),
                "--key-file",
                &format!("{name}.key"),
            ],
            &p,
        );
        assert!(c.contains("clean"), "{c}");
    }
    // The data written through the fstab mount is there.
    let (mounted, out) = try_sh(&p, &format!("mount -T {} {}", fstab.display(), at("data")));
    assert!(mounted, "mount -T: {out}");
    assert_eq!(fs::read(p.join("data/f")).unwrap(), b"hello\n");
    sh_in(&p, "umount data");

    // mount -t with -o on the command line, and bad options named.
    let (mounted, out) = try_sh(
        &p,
        "mount -t lsvfs data.vol data -o key_file=data.key,ro,noatime",
    );
    assert!(mounted, "mount -t lsvfs: {out}");
    assert!(mountinfo(&p.join("data")).unwrap().contains("noatime"));
    sh_in(&p, &format!("umount {}", at("data")));
    ok(&["check", "data.vol", "--key-file", "data.key"], &p);
    // `lsvfs mount`, then umount(8) of the absolute path: the same wait.
    // The mount's utab entry is what makes umount(8) run the helper; it
    // is there while mounted and gone once unmounted, whichever way.
    let utab_has = |what: &str| {
        let utab = fs::read_to_string("/run/mount/utab").unwrap_or_default();
        let escaped = what.replace(' ', "\\040");
        utab.lines()
            .any(|l| l.contains(&format!("TARGET={escaped} ")) && l.contains("uhelper=lsvfs"))
    };
    ok(&["mount", "data.vol", "data", "--key-file", "data.key"], &p);
    assert!(utab_has(&at("data")), "no utab entry while mounted");
    sh_in(
        &p,
        "dd if=/dev/urandom of=data/big bs=1M count=64 status=none",
    );
    sh_in(&p, &format!("umount {}", at("data")));
    ok(&["check", "data.vol", "--key-file", "data.key"], &p);
    assert!(!utab_has(&at("data")), "utab entry left by umount");
    ok(&["mount", "data.vol", "data", "--key-file", "data.key"], &p);
    ok(&["unmount", "data"], &p);
    assert!(!utab_has(&at("data")), "utab entry left by lsvfs unmount");
    ok(&["mount", "data.vol", "data", "--key-file", "data.key"], &p);
    assert!(utab_has(&at("data")));
    sh_in(&p, "pkill -TERM -f '[l]svfs mount data.vol data '");
    let gone = std::time::Instant::now();
    while lsvfs::device::FileDevice::is_held(&p.join("data.vol")).unwrap() {
        assert!(
            gone.elapsed().as_secs() < 30,
            "the daemon did not end on SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!utab_has(&at("data")), "utab entry left after SIGTERM");
    let utab = fs::read_to_string("/run/mount/utab").unwrap_or_default();
    assert!(
        !utab.contains(&at("data")) && !utab.contains(&at("archive")),
        "{utab}"
    );
    for (opts, says) in [
        (
            "key_file=data.key,compress=zstd",
            "unknown mount option \"compress=zstd\"",
        ),
        ("key_file", "\"key_file\" needs a value"),
        ("key_file=data.key,timeout=soon", "timeout=soon"),
        ("key_file=missing.key", "missing.key"),
    ] {
        let (mounted, out) = try_sh(&p, &format!("mount -t lsvfs data.vol data -o {opts}"));
        assert!(!mounted, "-o {opts} mounted");
        assert!(out.contains(says), "-o {opts}: {out}");
        assert!(mountinfo(&p.join("data")).is_none());
    }
    // Sloppy (-s) ignores what lsvfs does not know.
    let (mounted, out) = try_sh(
        &p,
        "mount -s -t lsvfs data.vol data -o key_file=data.key,compress=zstd",
    );
    assert!(mounted, "mount -s: {out}");
    sh_in(&p, "umount data");
}

/// Everything a read-only mount refuses, with the backing file's bytes
/// hashed before and after: every change fails with EROFS (root's
/// included, snapshots included), every read works.
#[test]
fn read_only_mounts_refuse_every_change_and_leave_the_file_unchanged() {
    let m = Mounted::with_size("256M");
    m.sh(
        "mkdir d && echo one > d/f && echo two > g && ln -s g link && \
         setfattr -n user.k -v v g && mkfifo fifo && sync",
    );
    ok(&["snapshot", "create", "m", "s1"], m.p());
    m.unmount();
    let before = sha256(&m.p().join("v.vol"));
    for how in [&["--read-only"][..], &["-o", "ro"][..]] {
        let mut args = vec!["mount", "v.vol", "m", "--key-file", "k"];
        args.extend_from_slice(how);
        ok(&args, m.p());
        assert!(mountinfo(&m.m()).unwrap().contains(" ro,"));
        // Reads work.
        assert_eq!(m.sh("cat d/f g .snapshots/s1/g"), "one\ntwo\ntwo\n");
        assert_eq!(m.sh("getfattr --only-values -n user.k g"), "v");
        for change in [
            "echo x > new",
            "echo x >> g",
            "truncate -s 0 g",
            "rm g",
            "mkdir e",
            "rmdir d",
            "mv g h",
            "ln g hard",
            "ln -s g soft",
            "chmod 600 g",
            "chown 1:1 g",
            "touch g",
            "setfattr -n user.k -v w g",
            "setfattr -x user.k g",
            "mknod n p",
            "fallocate -l 1M g",
            "mkdir .snapshots/s2",
            "rmdir .snapshots/s1",
            "echo x > .snapshots/s1/g",
        ] {
            let (done, out) = try_sh(&m.m(), change);
            assert!(!done, "{change} succeeded on a read-only mount");
            assert!(out.contains("Read-only file system"), "{change}: {out}");
        }
        let o = lsvfs(&["snapshot", "create", "m", "s3"], m.p());
        assert!(!o.status.success());
        assert!(text(&o).contains("read-only"), "{}", text(&o));
        m.sh("sync");
        m.unmount();
        assert_eq!(
            sha256(&m.p().join("v.vol")),
            before,
            "{how:?} changed the file"
        );
    }
    // A read-only mount holds the volume: no writer may open it meanwhile.
    ok(
        &["mount", "v.vol", "m", "--key-file", "k", "--read-only"],
        m.p(),
    );
    let o = lsvfs(&["check", "v.vol", "--key-file", "k"], m.p());
    assert!(
        text(&o).contains("clean"),
        "a reader beside a reader: {}",
        text(&o)
    );
    let o = lsvfs(
        &[
            "write-blocks",
            "v.vol",
            "--key-file",
            "k",
            "--input",
            "/etc/hostname",
        ],
        m.p(),
    );
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    m.unmount();
    assert_eq!(sha256(&m.p().join("v.vol")), before);
}

/// A volume left by a crash (kill -9 after an fsync) mounts read-only: the
/// mount says the log was replayed in memory, the fsynced data is there,
/// and the file's bytes do not change. The next read-write mount stores
/// the replay.
#[test]
fn a_read_only_mount_after_a_crash_replays_in_memory_and_says_so() {
    let m = Mounted::with_size("256M");
    m.sh("echo base > base && sync");
    let pid = m.daemon_pid();
    // coreutils' `sync FILE` fsyncs that file alone.
    m.sh("head -c 300000 /dev/urandom > after && sync after");
    let sum = m.sh("sha256sum after");
    sh_in(
        m.p(),
        &format!("kill -9 {pid}; fusermount3 -uz m; sleep 0.3"),
    );
    let before = sha256(&m.p().join("v.vol"));
    let out = ok(
        &["mount", "v.vol", "m", "--key-file", "k", "--read-only"],
        m.p(),
    );
    assert!(
        out.contains("was not unmounted cleanly") && out.contains("replayed in memory"),
        "{out}"
    );
    assert_eq!(m.sh("cat base"), "base\n");
    assert_eq!(m.sh("sha256sum after"), sum);
    m.unmount();
    assert_eq!(
        sha256(&m.p().join("v.vol")),
        before,
        "the read-only mount wrote"
    );
    // Read-write: the replay is stored, and the next mount has nothing to say.
    m.mount();
    assert_eq!(m.sh("sha256sum after"), sum);
    m.unmount_and_check();
    let out = ok(
        &["mount", "v.vol", "m", "--key-file", "k", "--read-only"],
        m.p(),
    );
    assert!(!out.contains("not unmounted cleanly"), "{out}");
    m.unmount();
}

/// The boot-time mount unit passes `systemd-analyze verify` (with
/// ExecStart pointed at the built binary, since verify checks that the
/// program exists) and runs `lsvfs mount-entry` for its instance's path.
/// What it runs is tested in tests/keyserver.rs
/// (`the_boot_mount_waits_for_the_key_server_and_says_why`).
#[test]
fn the_boot_mount_unit_verifies() {
    let unit = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/lsvfs-mount@.service"
    ))
    .unwrap();
    assert!(unit.contains("\nExecStart=/usr/bin/lsvfs mount-entry %f\n"));
    assert!(unit.contains("\nType=notify\n") && unit.contains("\nRestart=on-failure\n"));
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("lsvfs-mount@srv-data.service");
    fs::write(&path, unit.replace("/usr/bin/lsvfs", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/setup.sh installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("lsvfs")).collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");
}

/// The manual pages and completions the package ships come from the clap
/// definitions: every command has its page, the helpers have section 8
/// pages that list the mount options, and completions know the commands.
#[test]
fn manual_pages_and_completions_cover_every_command() {
    let d = tempfile::tempdir().unwrap();
    ok(&["generate-man", "man"], d.path());
    let page = |name: &str| {
        fs::read_to_string(d.path().join("man").join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    for cmd in [
        "mount",
        "mount-entry",
        "unmount",
        "snapshot-create",
        "check",
        "host-init",
    ] {
        assert!(
            page(&format!("lsvfs-{cmd}.1")).contains(".TH lsvfs-"),
            "{cmd}"
        );
    }
    assert!(page("lsvfs.1").contains("mount\\-entry"));
    let helper = page("mount.lsvfs.8");
    for opt in [
        "key_file=PATH",
        "show_snapshots",
        "allow_other",
        "_netdev",
        "nofail",
    ] {
        assert!(
            helper.contains(&opt.replace('-', "\\-")),
            "mount.lsvfs(8) lacks {opt}"
        );
    }
    assert!(page("umount.fuse.lsvfs.8").contains("waits until the volume is closed"));
    assert!(page("lsvfs-mount.1").contains("read\\-only"));
    for shell in ["bash", "zsh", "fish"] {
        let c = ok(&["completions", shell], d.path());
        assert!(
            c.contains("mount-entry") && c.contains("snapshot"),
            "{shell}"
        );
    }
}

/// `lsvfs mount v.vol v --key-file v.key --foreground FLAGS` in `dir`, with
/// `env` set and stderr to `stderr`; returns once it says it is mounted.
fn mount_in_foreground(
    dir: &Path,
    flags: &[&str],
    env: &[(&str, &str)],
    stderr: fs::File,
) -> std::process::Child {
    let mut daemon = Command::new(BIN)
        .args(["mount", "v.vol", "v", "--key-file", "v.key", "--foreground"])
        .args(flags)
        .current_dir(dir)
        .env_remove("LSVFS_LOG")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(daemon.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert!(ready.starts_with("lsvfs: mounted"), "{ready}");
    daemon
}

/// `lsvfs mount --foreground -v` logs each FUSE request at debug level
/// (fuser's request log, taken in by the logger); without -v nothing below
/// info appears. At trace level the log still holds no key: not the key
/// file's KEK, as hex or as bytes.
#[test]
fn a_verbose_foreground_mount_logs_requests_and_no_key() {
    let d = tempfile::tempdir().unwrap();
    let p = fs::canonicalize(d.path()).unwrap();
    new_volume(&p, "v");
    let kek_hex = fs::read_to_string(p.join("v.key"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    assert_eq!(kek_hex.len(), 64, "a key file holds 32 bytes in hex");
    let kek: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&kek_hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    for (flags, verbose) in [(&[][..], false), (&["-v"][..], true), (&["-vv"][..], true)] {
        let log = fs::File::create(p.join("log")).unwrap();
        let mut daemon = mount_in_foreground(&p, flags, &[], log);
        sh_in(&p, "echo x > v/file && cat v/file && ls -l v >/dev/null");
        sh_in(&p, "umount v");
        assert!(daemon.wait().unwrap().success());
        let log = fs::read(p.join("log")).unwrap();
        let text = String::from_utf8_lossy(&log);
        assert_eq!(
            // fuser logs the requests of /dev/fuse, lsvfs those of the
            // io_uring queues.
            (text.contains("debug: fuser::request: FUSE(")
                || text.contains("debug: lsvfs::fuse::uring: FUSE("))
                && text.contains("LOOKUP name \"file\""),
            verbose,
            "{flags:?}: {text}"
        );
        assert!(!text.contains(&kek_hex), "the KEK in the log");
        assert!(
            !log.windows(kek.len()).any(|w| w == &kek[..]),
            "the KEK's bytes in the log"
        );
    }
}

/// A missing name is answered with a negative entry the kernel keeps for
/// the entry TTL: probing it again (a compiler's include path, a shell's
/// PATH) sends no LOOKUP. Every way of making the name through the mount
/// makes it visible at once, with what was written.
#[test]
fn missing_names_are_cached_and_every_way_of_making_them_shows_at_once() {
    let d = tempfile::tempdir().unwrap();
    let p = fs::canonicalize(d.path()).unwrap();
    new_volume(&p, "v");
    let log = fs::File::create(p.join("log")).unwrap();
    let mut daemon = mount_in_foreground(&p, &["-v"], &[], log);
    // Twenty probes in one shell, well within the 1 s TTL.
    sh_in(
        &p,
        "for i in $(seq 20); do if test -e v/probe; then exit 1; fi; done",
    );
    // Each name is looked up (and found missing) first, then made.
    let made = sh_in(
        &p,
        "for n in file dir link sym fifo moved; do test -e v/$n && echo \"$n exists\"; done
         echo contents > v/file && cat v/file
         mkdir v/dir && test -d v/dir && echo dir
         ln v/file v/link && cat v/link
         ln -s file v/sym && cat v/sym
         mkfifo v/fifo && test -p v/fifo && echo fifo
         echo other > v/tmp && mv v/tmp v/moved && cat v/moved",
    );
    assert_eq!(made, "contents\ndir\ncontents\ncontents\nfifo\nother\n");
    // And unmade: a removed name is missing again, and can be made again.
    let again = sh_in(
        &p,
        "rm v/file && test ! -e v/file && rmdir v/dir && test ! -e v/dir && \
         echo new > v/file && cat v/file",
    );
    assert_eq!(again, "new\n");
    sh_in(&p, "umount v");
    assert!(daemon.wait().unwrap().success());
    let text = fs::read_to_string(p.join("log")).unwrap();
    let probes = text.matches("LOOKUP name \"probe\"").count();
    assert!(
        (1..10).contains(&probes),
        "{probes} LOOKUPs for 20 probes of one missing name"
    );
}

/// `lsvfs check` shows a progress bar while it authenticates data blocks
/// when stderr is a terminal (here `script` gives it one), and only its
/// one-line summaries otherwise.
#[test]
fn check_shows_a_progress_bar_on_a_terminal_and_summaries_elsewhere() {
    let d = tempfile::tempdir().unwrap();
    let p = fs::canonicalize(d.path()).unwrap();
    new_volume(&p, "v");
    sh_in(&p, "head -c 40000000 /dev/urandom > data");
    ok(
        &[
            "write-blocks",
            "v.vol",
            "--key-file",
            "v.key",
            "--input",
            "data",
        ],
        &p,
    );
    let (checked, tty) = try_sh(
        &p,
        &format!("script -qec '{BIN} check v.vol --key-file v.key' /dev/null"),
    );
    assert!(checked, "{tty}");
    assert!(
        tty.contains("authenticating data blocks: [") && tty.contains("/9,766 blocks"),
        "{tty}"
    );
    assert!(tty.contains("v.vol: clean"), "{tty}");
    let plain = ok(&["check", "v.vol", "--key-file", "v.key"], &p);
    assert!(!plain.contains("authenticating"), "{plain}");
    assert!(
        plain.contains("9766 data blocks") && plain.contains("v.vol: clean"),
        "{plain}"
    );
}

/// One journald record: its fields in order.
type Record = Vec<(String, String)>;

/// Journald's socket, bound by the test, with a thread that keeps taking
/// records off it (as journald does: a full socket would block the sender).
struct FakeJournaldSocket {
    records: std::sync::Arc<std::sync::Mutex<Vec<Record>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl FakeJournaldSocket {
    const PATH: &'static str = "/run/systemd/journal/socket";

    /// Binds journald's socket, unless a journald owns it (then None).
    fn bind() -> Option<FakeJournaldSocket> {
        let path = Path::new(Self::PATH);
        if path.exists() {
            return None;
        }
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let socket = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        let records = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, st) = (records.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    r.lock().unwrap().push(journal_fields(&buf[..n]));
                }
            }
        });
        Some(FakeJournaldSocket {
            records,
            stop,
            reader: Some(reader),
        })
    }

    /// The records received so far (taken: the next call returns newer ones).
    fn take(&self) -> Vec<Record> {
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::mem::take(&mut *self.records.lock().unwrap())
    }
}

/// The fields of one record in journald's native protocol: `KEY=value\n`,
/// or `KEY\n`, a 64-bit little-endian length, the value and `\n`.
fn journal_fields(mut b: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while let Some(end) = b.iter().position(|&c| c == b'=' || c == b'\n') {
        let key = String::from_utf8_lossy(&b[..end]).into_owned();
        let value;
        if b[end] == b'=' {
            let nl = b[end..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |i| end + i);
            value = b[end + 1..nl].to_vec();
            b = &b[(nl + 1).min(b.len())..];
        } else {
            let Some(len) = b.get(end + 1..end + 9) else {
                break;
            };
            let len = u64::from_le_bytes(len.try_into().unwrap()) as usize;
            let start = end + 9;
            let Some(v) = b.get(start..start + len) else {
                break;
            };
            value = v.to_vec();
            b = &b[(start + len + 1).min(b.len())..];
        }
        fields.push((key, String::from_utf8_lossy(&value).into_owned()));
    }
    fields
}

fn field<'a>(record: &'a [(String, String)], key: &str) -> Option<&'a str> {
    record
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

impl Drop for FakeJournaldSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(Self::PATH);
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// The journald half of logging, on journald's own socket and protocol
/// (this machine runs no journald, so the test binds its socket): a
/// background mount daemon (whose stderr goes away once mounted) sends its
/// records there, with identifier and priority; a foreground mount whose
/// stderr is the journal ($JOURNAL_STREAM names it, as under systemd) logs
/// there instead of to stderr.
#[test]
fn mount_daemons_and_services_log_to_journald() {
    let Some(journal) = FakeJournaldSocket::bind() else {
        eprintln!("SKIPPED: a journald runs here; this test needs its socket");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let p = fs::canonicalize(d.path()).unwrap();
    new_volume(&p, "v");

    // A background mount at debug level.
    ok(&["mount", "v.vol", "v", "--key-file", "v.key", "-v"], &p);
    sh_in(&p, "ls v/journal-probe-1 2>/dev/null || true");
    ok(&["unmount", "v"], &p);
    let records = journal.take();
    let probe = records
        .iter()
        .find(|r| field(r, "MESSAGE").is_some_and(|m| m.contains("journal-probe-1")))
        .unwrap_or_else(|| panic!("no record of the lookup in {records:?}"));
    assert_eq!(
        field(probe, "SYSLOG_IDENTIFIER"),
        Some("lsvfs"),
        "{probe:?}"
    );
    assert_eq!(
        field(probe, "PRIORITY"),
        Some("7"),
        "debug is priority 7: {probe:?}"
    );

    // A foreground mount whose stderr is the journal stream.
    let log = fs::File::create(p.join("stderr")).unwrap();
    let md = log.metadata().unwrap();
    let journal_stream = format!("{}:{}", md.dev(), md.ino());
    let mut service = mount_in_foreground(&p, &["-v"], &[("JOURNAL_STREAM", &journal_stream)], log);
    sh_in(&p, "ls v/journal-probe-2 2>/dev/null || true");
    sh_in(&p, "umount v");
    assert!(service.wait().unwrap().success());
    let records = journal.take();
    assert!(
        records
            .iter()
            .any(|r| field(r, "MESSAGE").is_some_and(|m| m.contains("journal-probe-2"))),
        "the service's lookup did not reach the journal: {records:?}"
    );
    let stderr = fs::read_to_string(p.join("stderr")).unwrap();
    assert!(
        !stderr.contains("journal-probe-2"),
        "logged to stderr as well as the journal: {stderr}"
    );
}

/// Idle lock. A laptop's volume is left mounted over lunch: `--idle-lock`
/// must unmount it by itself once nothing uses it, closing the volume (and
/// dropping its keys) with the data written before safely in it, but never
/// while a process keeps using it or holds a file open on it.
#[test]
fn an_idle_lock_unmounts_an_unused_mount_but_not_a_used_or_busy_one() {
    use std::time::{Duration, Instant};
    let d = tempfile::tempdir().unwrap();
    let p = fs::canonicalize(d.path()).unwrap();
    new_volume(&p, "v");
    let m = p.join("v");
    ok(
        &[
            "mount",
            "v.vol",
            "v",
            "--key-file",
            "v.key",
            "--idle-lock",
            "3s",
        ],
        &p,
    );
    fs::write(m.join("f"), b"written before the lock").unwrap();
    // Used: a directory listing (which always reaches the file system)
    // every half second keeps it mounted well past the idle time.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(7) {
        assert_eq!(fs::read_dir(&m).unwrap().count(), 1);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(mountinfo(&m).is_some(), "unmounted while in use");
    // Busy: idle, but a file is held open; it stays mounted.
    let held = fs::File::open(m.join("f")).unwrap();
    std::thread::sleep(Duration::from_secs(8));
    assert!(mountinfo(&m).is_some(), "unmounted under an open file");
    // Let go: it unmounts by itself and closes the volume.
    drop(held);
    let t0 = Instant::now();
    while mountinfo(&m).is_some() || lsvfs::device::FileDevice::is_held(&p.join("v.vol")).unwrap() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "still mounted or open 30 s after the last use"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let c = ok(&["check", "v.vol", "--key-file", "v.key"], &p);
    assert!(
        c.contains("(0 transactions in the log") && c.contains("clean"),
        "{c}"
    );
    ok(&["mount", "v.vol", "v", "--key-file", "v.key"], &p);
    assert_eq!(fs::read(m.join("f")).unwrap(), b"written before the lock");
    ok(&["unmount", "v"], &p);
    // A bad duration is refused by name.
    let o = lsvfs(
        &[
            "mount",
            "v.vol",
            "v",
            "--key-file",
            "v.key",
            "-o",
            "idle_lock=soon",
        ],
        &p,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("write a duration such as 15m"),
        "{}",
        text(&o)
    );
}

/// The automount example that brings an idle-locked volume back on the
/// next access: both units pass `systemd-analyze verify` under their
/// shipped names.
#[test]
fn the_idle_lock_automount_units_verify() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/examples");
    let mount = fs::read_to_string(format!("{dir}/srv-data.mount")).unwrap();
    assert!(mount.contains("\nType=lsvfs\n") && mount.contains("idle_lock=15m"));
    let automount = fs::read_to_string(format!("{dir}/srv-data.automount")).unwrap();
    assert!(automount.contains("\nWhere=/srv/data\n"));
    let d = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("srv-data.mount", &mount),
        ("srv-data.automount", &automount),
    ] {
        fs::write(d.path().join(name), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(d.path().join("srv-data.automount"))
        .arg(d.path().join("srv-data.mount"))
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/setup.sh installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("srv-data")).collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");
}

/// `--on-lock-export`: before the idle lock unmounts, a snapshot is taken
/// and exported, the second time incrementally over the first, not at all
/// when nothing changed; the chain restores to the files as they were.
#[test]
fn an_idle_lock_exports_a_snapshot_first_and_the_exports_restore() {
    use std::time::{Duration, Instant};
    let d = tempfile::tempdir().unwrap();
    let p = fs::canonicalize(d.path()).unwrap();
    new_volume(&p, "v");
    fs::create_dir(p.join("out")).unwrap();
    let m = p.join("v");
    let mount = || {
        ok(
            &[
                "mount",
                "v.vol",
                "v",
                "--key-file",
                "v.key",
                "--idle-lock",
                "2s",
                "--on-lock-export",
                "out",
            ],
            &p,
        )
    };
    let wait_unmounted = || {
        let t0 = Instant::now();
        while mountinfo(&m).is_some()
            || lsvfs::device::FileDevice::is_held(&p.join("v.vol")).unwrap()
        {
            assert!(t0.elapsed() < Duration::from_secs(60), "not locked");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let exports = || {
        let mut v: Vec<String> = fs::read_dir(p.join("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let o = lsvfs(
        &[
            "mount",
            "v.vol",
            "v",
            "--key-file",
            "v.key",
            "--on-lock-export",
            "out",
        ],
        &p,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("give --idle-lock too"), "{}", text(&o));

    mount();
    sh_in(&m, "cp -a /usr/include/linux inc && echo one > f && sync");
    wait_unmounted();
    let first = exports();
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first[0].starts_with("idle-") && first[0].ends_with(".lsx"));

    mount();
    sh_in(&m, "echo two > f && rm -r inc/netfilter && sync");
    let want = sh_in(
        &m,
        "find . -path ./.snapshots -prune -o -type f -print0 | sort -z | xargs -0 sha256sum",
    );
    wait_unmounted();
    let both = exports();
    assert_eq!(both.len(), 2, "{both:?}");
    let show = ok(&["export", "show", &format!("out/{}", both[1])], &p);
    assert!(
        show.contains(&first[0].replace(".lsx", "")),
        "an increment over the first: {show}"
    );

    // No file changed: at most a small increment (a mount itself writes a
    // few metadata blocks).
    mount();
    wait_unmounted();
    let all = exports();
    assert!(all.len() <= 3, "{all:?}");
    if let Some(third) = all.get(2) {
        let len = fs::metadata(p.join("out").join(third)).unwrap().len();
        assert!(len < 256 * 1024, "{third}: {len} bytes for no change");
    }

    let files: Vec<String> = all.iter().map(|f| format!("out/{f}")).collect();
    let mut args = vec!["export", "verify"];
    args.extend(files.iter().map(String::as_str));
    ok(&args, &p);
    let mut args = vec!["restore"];
    args.extend(files.iter().map(String::as_str));
    args.extend(["--to", "r.vol", "--key-file", "v.key"]);
    ok(&args, &p);
    fs::create_dir(p.join("r")).unwrap();
    ok(&["mount", "r.vol", "r", "--key-file", "v.key"], &p);
    let got = sh_in(
        &p.join("r"),
        "find . -path ./.snapshots -prune -o -type f -print0 | sort -z | xargs -0 sha256sum",
    );
    ok(&["unmount", "r"], &p);
    assert_eq!(
        got, want,
        "the restored chain differs from the files at the lock"
    );
}

/// A volume on a real block device (a loop device over a file): created
/// without --size (the largest the device holds), mounted, written,
/// snapshotted, killed with kill -9 and mounted again with every fsynced
/// byte; freed space is discarded (BLKDISCARD), which the loop device
/// passes on as holes in its file.
#[test]
fn a_volume_on_a_loop_device_is_sized_to_it_survives_kill_and_discards() {
    struct Loop(String);
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let d = tempfile::tempdir().unwrap();
    let p = fs::canonicalize(d.path()).unwrap();
    let img = p.join("disk.img");
    fs::File::create(&img).unwrap().set_len(512 << 20).unwrap();
    let o = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "losetup (util-linux, root, /dev/loop-control): {}",
        text(&o)
    );
    let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let _loop = Loop(dev.clone());
    ok(&["keygen", "k"], &p);

    // A size that does not fit names the one that does.
    let o = lsvfs(&["create", &dev, "--size", "512M", "--key-file", "k"], &p);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("without --size makes that one"),
        "{}",
        text(&o)
    );
    ok(&["create", &dev, "--key-file", "k"], &p);
    let info = ok(&["info", &dev], &p);
    let logical = info_blocks(&info, "logical size");
    // 512 MiB less the headroom and the metadata: between 300 and 400 MiB.
    assert!(
        (76_800..102_400).contains(&logical),
        "{logical} blocks: {info}"
    );

    fs::create_dir(p.join("m")).unwrap();
    ok(&["mount", &dev, "m", "--key-file", "k"], &p);
    sh_in(
        &p,
        "dd if=/dev/urandom of=m/kept bs=1M count=40 conv=fsync status=none",
    );
    let want = fs::read(p.join("m/kept")).unwrap();
    ok(&["snapshot", "create", "m", "s"], &p);
    sh_in(
        &p,
        "dd if=/dev/urandom of=m/big bs=1M count=150 conv=fsync status=none",
    );
    // This test's daemon: the one serving `dev` from this directory.
    let daemon = Command::new("pgrep")
        .args(["-f", &format!("lsvfs mount {dev} m ")])
        .output()
        .unwrap();
    let ours: Vec<String> = String::from_utf8_lossy(&daemon.stdout)
        .split_whitespace()
        .filter(|pid| fs::read_link(format!("/proc/{pid}/cwd")).ok().as_deref() == Some(&*p))
        .map(String::from)
        .collect();
    assert_eq!(ours.len(), 1, "one daemon: {ours:?}");
    sh_in(&p, &format!("kill -9 {}", ours[0]));
    let killed = std::time::Instant::now();
    // Gone, or a zombie nobody has reaped yet (it holds nothing).
    let alive = |pid: &str| {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
            st.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    };
    while alive(&ours[0]) {
        assert!(
            killed.elapsed().as_secs() < 30,
            "the daemon outlived kill -9"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    sh_in(&p, "fusermount3 -uz m");

    ok(&["mount", &dev, "m", "--key-file", "k"], &p);
    assert_eq!(fs::read(p.join("m/kept")).unwrap(), want);
    assert_eq!(fs::read(p.join("m/.snapshots/s/kept")).unwrap(), want);
    assert_eq!(fs::metadata(p.join("m/big")).unwrap().len(), 150 << 20);
    let before = fs::metadata(&img).unwrap().blocks() * 512;
    fs::remove_file(p.join("m/big")).unwrap();
    ok(&["snapshot", "delete", "m", "s"], &p);
    ok(&["unmount", "m"], &p);
    ok(&["check", &dev, "--key-file", "k"], &p);
    let after = fs::metadata(&img).unwrap().blocks() * 512;
    // The 150 MiB file's segments went back to the loop device's file.
    assert!(
        after + (120 << 20) < before,
        "the image held {before} bytes and still holds {after}"
    );
}
