//! Keys out of core dumps, swap and other processes' reach: a real mount
//! daemon run by an unprivileged user, holding a volume's keys, is not
//! dumpable (its /proc entries belong to root, and the same user cannot
//! read its memory or environment), keeps its keys in locked memory, and a
//! core of it taken as root holds none of the keys: not the key file's
//! KEK, not the master key, not the XTS or MAC keys derived from it.

mod common;

use std::fs;
use std::os::unix::fs::{chown, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lsvfs::crypto::derived_key_bytes;
use lsvfs::{keys, volume};

const BIN: &str = env!("CARGO_BIN_EXE_lsvfs");
const NOBODY: u32 = 65534;

/// Runs lsvfs as uid/gid 65534 in `dir`.
fn as_nobody(dir: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(args)
        .current_dir(dir)
        .env("LSVFS_RUN_DIR", dir.join("run"))
        .output()
        .unwrap()
}

fn ok(o: Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The mount daemon serving `dir/m`.
fn daemon_pid(dir: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for e in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("mount")
                && cmd.contains("--foreground")
                && fs::read_link(format!("/proc/{pid}/cwd")).ok().as_deref() == Some(dir)
            {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "no mount daemon for {dir:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status_field(pid: u32, field: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A volume created and mounted by nobody in a fresh directory, with
/// `hello` written through the mount; unmounted on drop.
struct NobodysMount {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl NobodysMount {
    fn new() -> NobodysMount {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        for d in ["m", "run"] {
            fs::create_dir(dir.join(d)).unwrap();
        }
        for p in [dir.clone(), dir.join("m"), dir.join("run")] {
            chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        // A standard system's udev makes /dev/fuse 0666 so users can mount
        // (fuser opens it directly); some containers leave it 0600.
        let fuse = fs::metadata("/dev/fuse").unwrap();
        if fuse.mode() & 0o006 != 0o006 {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666)).unwrap();
        }
        ok(as_nobody(&dir, &["keygen", "k"]), "keygen");
        ok(
            as_nobody(
                &dir,
                &["create", "v.vol", "--size", "256M", "--key-file", "k"],
            ),
            "create",
        );
        ok(
            as_nobody(&dir, &["mount", "v.vol", "m", "--key-file", "k"]),
            "mount as an unprivileged user",
        );
        let mounted = NobodysMount { _tmp: tmp, dir };
        ok(
            in_shell_as(NOBODY, &mounted.dir, "echo hello > m/hello && cat m/hello"),
            "write as nobody",
        );
        mounted
    }
}

impl Drop for NobodysMount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(self.dir.join("m"))
            .status();
    }
}

/// Runs `cmd` with `sh -c` as uid and gid `uid`, in `dir`.
fn in_shell_as(uid: u32, dir: &Path, cmd: &str) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "sh", "-c", cmd])
        .current_dir(dir)
        .output()
        .unwrap()
}

/// Every readable mapping of process `pid`, read as root through
/// /proc/PID/mem (which, unlike a core dump, includes locked and
/// dump-excluded memory).
fn process_memory(pid: u32) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut all = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.contains("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let a = u64::from_str_radix(a, 16).unwrap();
        let b = u64::from_str_radix(b, 16).unwrap();
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_ok() && mem.read_exact(&mut buf).is_ok() {
            all.extend_from_slice(&buf);
        }
    }
    all
}

#[test]
fn a_mount_daemon_keeps_its_keys_out_of_dumps_swap_and_other_processes() {
    let mounted = NobodysMount::new();
    let dir = mounted.dir.clone();
    let pid = daemon_pid(&dir);

    // Not dumpable: the kernel gives its /proc entries to root although
    // it runs as nobody, and nobody cannot read its environment.
    assert!(
        status_field(pid, "Uid:").starts_with("65534"),
        "the daemon runs as nobody"
    );
    let owner = fs::metadata(format!("/proc/{pid}/status")).unwrap().uid();
    assert_eq!(
        owner, 0,
        "a dumpable process's /proc entries belong to its user"
    );
    let environ = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(format!("/proc/{pid}/environ"))
        .output()
        .unwrap();
    assert!(
        !environ.status.success(),
        "the same user read the daemon's environment"
    );

    // Keys locked in RAM.
    let locked: u64 = status_field(pid, "VmLck:")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    assert!(
        locked > 0,
        "no locked memory in the daemon (VmLck: {locked} kB)"
    );

    // The keys it holds, computed here from the key file.
    let kek = keys::read_key_file(&dir.join("k")).unwrap();
    // (The daemon holds the volume's lock: read the header bytes directly.)
    let mut block = [0u8; lsvfs::BLOCK_SIZE];
    block.copy_from_slice(&fs::read(dir.join("v.vol")).unwrap()[..lsvfs::BLOCK_SIZE]);
    let header = volume::format::Header::decode(&block).unwrap();
    let master = keys::unlock(&header, &kek).unwrap();
    let derived = derived_key_bytes(&master, &header.volume_id);
    let secrets: [(&str, &[u8]); 5] = [
        ("the key file's KEK", kek.expose()),
        ("the master key", master.expose()),
        ("the first XTS key", &derived[..32]),
        ("the second XTS key", &derived[32..64]),
        ("the MAC key", &derived[64..]),
    ];

    // A core as a crash would write it (gdb honours MADV_DONTDUMP, as the
    // kernel does).
    let image = common::core_image(&pid, &dir);
    // It is a real image of the daemon: it holds the volume's path.
    assert!(
        contains(&image, dir.join("v.vol").to_string_lossy().as_bytes()),
        "the core does not hold the volume path: it is not the daemon's memory"
    );
    for (what, key) in secrets {
        assert!(!contains(&image, key), "{what} is in the core dump");
    }
    // AES-256's first two round keys are the two halves of its key, which
    // AES-NI and VAES hold in vector registers (a core records each
    // thread's) and VAES also spills to the stack, a round key to each
    // lane; BLAKE3 loads its key as two 16-byte rows. So a half can be
    // left where the whole key never is: every half is looked for too.
    for (what, key) in &secrets[2..] {
        for (half, bytes) in ["first", "second"].iter().zip(key.chunks(16)) {
            assert!(
                !contains(&image, bytes),
                "the {half} half of {what} is in the core dump"
            );
        }
    }

    // The master key and the KEK do not outlive the unlock: all of the
    // daemon's memory, locked pages included, read as root, holds the
    // derived keys it needs (which shows that the scan sees key memory)
    // and neither the master key nor the KEK.
    let memory = process_memory(pid);
    assert!(
        contains(&memory, &derived[64..]) || contains(&memory, &derived[..32]),
        "the derived keys are not found in the daemon's memory: the scan is blind"
    );
    for (what, key) in &secrets[..2] {
        assert!(
            !contains(&memory, key),
            "{what} is still in the mount daemon's memory after the unlock"
        );
    }
}

/// A mount made by an unprivileged user serves that user alone: FUSE
/// without `allow_other` refuses every other uid, root included.
#[test]
fn a_users_mount_serves_that_user_alone() {
    let mounted = NobodysMount::new();
    let dir = &mounted.dir;
    ok(
        in_shell_as(NOBODY, dir, "cat m/hello && ls m"),
        "the owner reads",
    );
    for uid in [1u32, 0] {
        let o = in_shell_as(uid, dir, "ls m; stat m/hello; cat m/hello");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "uid {uid} used nobody's mount");
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("hello"),
            "uid {uid} read nobody's file"
        );
        assert!(err.contains("Permission denied"), "uid {uid}: {err}");
    }
}

/// Every systemd unit the project ships forbids core files and locks the
/// process personality: a unit added later is covered by this test too.
#[test]
fn every_shipped_unit_forbids_core_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut units = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if p.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "fuzz" {
                    dirs.push(p);
                }
            } else if name.ends_with(".service") {
                units.push(p);
            }
        }
    }
    assert!(!units.is_empty(), "no unit files found under {root:?}");
    for u in units {
        let text = fs::read_to_string(&u).unwrap();
        let has = |line: &str| text.lines().any(|l| l.trim() == line);
        assert!(has("LimitCORE=0"), "{} lacks LimitCORE=0", u.display());
        assert!(
            has("LockPersonality=yes"),
            "{} lacks LockPersonality=yes",
            u.display()
        );
    }
}
