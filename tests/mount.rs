//! The file system through a real kernel FUSE mount, driven by the `lsvfs`
//! binary and by ordinary programs: std::fs, syscalls, cp, diff, tar, and
//! kill -9 of the mount daemon. Needs /dev/fuse and fusermount3 (fuse3);
//! CI runs as root with both installed.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Mounted {
    dir: tempfile::TempDir,
}

fn lsvfs(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lsvfs"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run lsvfs")
}

fn ok(args: &[&str], cwd: &Path) -> String {
    let o = lsvfs(args, cwd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "lsvfs {args:?}: {text}");
    text
}

impl Mounted {
    fn new() -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("m")).unwrap();
        ok(&["keygen", "k"], dir.path());
        ok(
            &["create", "v.vol", "--size", "2G", "--key-file", "k"],
            dir.path(),
        );
        let m = Mounted { dir };
        m.mount();
        m
    }
    fn p(&self) -> &Path {
        self.dir.path()
    }
    fn m(&self) -> PathBuf {
        self.dir.path().join("m")
    }
    fn mount(&self) {
        ok(&["mount", "v.vol", "m", "--key-file", "k"], self.p());
    }
    fn unmount(&self) {
        ok(&["unmount", "m"], self.p());
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(self.m())
            .status();
    }
}

fn errno_of(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn posix_basics_through_the_kernel() {
    let t = Mounted::new();
    let m = t.m();
    fs::write(m.join("a"), b"hello").unwrap();
    assert_eq!(fs::read(m.join("a")).unwrap(), b"hello");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.join("a"))
        .unwrap();
    f.write_all(b" world").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read_to_string(m.join("a")).unwrap(), "hello world");

    // Directories and their errors.
    fs::create_dir_all(m.join("d/e/f")).unwrap();
    assert_eq!(
        errno_of(fs::create_dir(m.join("d")).unwrap_err()),
        libc::EEXIST
    );
    assert_eq!(
        errno_of(fs::remove_dir(m.join("d")).unwrap_err()),
        libc::ENOTEMPTY
    );
    let long = "x".repeat(256);
    assert_eq!(
        errno_of(fs::write(m.join(&long), b"").unwrap_err()),
        libc::ENAMETOOLONG
    );
    fs::write(m.join("x".repeat(255)), b"255").unwrap();
    assert_eq!(fs::metadata(m.join("d")).unwrap().nlink(), 3);

    // Rename over an existing file, as editors do.
    fs::write(m.join("new"), b"new contents").unwrap();
    fs::rename(m.join("new"), m.join("a")).unwrap();
    assert_eq!(fs::read(m.join("a")).unwrap(), b"new contents");
    assert!(!m.join("new").exists());

    // Links.
    std::os::unix::fs::symlink("a", m.join("sym")).unwrap();
    assert_eq!(fs::read_link(m.join("sym")).unwrap(), Path::new("a"));
    assert_eq!(fs::read(m.join("sym")).unwrap(), b"new contents");
    fs::hard_link(m.join("a"), m.join("hard")).unwrap();
    assert_eq!(fs::metadata(m.join("a")).unwrap().nlink(), 2);

    // chmod, truncate both ways, sparse file past 4 GiB.
    fs::set_permissions(m.join("a"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(
        fs::metadata(m.join("a")).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.join("a"))
        .unwrap();
    f.set_len(3).unwrap();
    f.set_len(10).unwrap();
    drop(f);
    assert_eq!(fs::read(m.join("a")).unwrap(), b"new\0\0\0\0\0\0\0");
    let mut big = fs::File::create(m.join("big")).unwrap();
    big.seek(SeekFrom::Start(5 << 30)).unwrap();
    big.write_all(b"end").unwrap();
    drop(big);
    let md = fs::metadata(m.join("big")).unwrap();
    assert_eq!(md.len(), (5 << 30) + 3);
    assert!(
        md.blocks() <= 16,
        "a sparse file should hold one block, has {}",
        md.blocks()
    );

    // xattrs, through the syscalls.
    let path = CString::new(m.join("a").as_os_str().as_bytes()).unwrap();
    let name = CString::new("user.test").unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"v1".as_ptr().cast(), 2, 0) };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
    let mut buf = [0u8; 16];
    // SAFETY: as above.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(&buf[..n as usize], b"v1");

    // An unlinked file that is still open keeps its data.
    let mut open = fs::File::open(m.join("hard")).unwrap();
    fs::remove_file(m.join("hard")).unwrap();
    fs::remove_file(m.join("a")).unwrap();
    let mut s = String::new();
    open.read_to_string(&mut s).unwrap();
    assert_eq!(s.as_bytes(), b"new\0\0\0\0\0\0\0");
    drop(open);

    // Everything survives a remount.
    t.unmount();
    t.mount();
    assert_eq!(fs::read(t.m().join("x".repeat(255))).unwrap(), b"255");
    assert!(t.m().join("d/e/f").is_dir());
    assert!(!t.m().join("a").exists());
    assert_eq!(
        fs::metadata(t.m().join("big")).unwrap().len(),
        (5 << 30) + 3
    );
    t.unmount();
    let c = ok(&["check", "v.vol", "--key-file", "k"], t.p());
    assert!(c.contains("file system: ") && c.contains("clean"), "{c}");
}

#[test]
fn real_programs_copy_compare_archive() {
    let t = Mounted::new();
    let src = Path::new("/usr/include/linux");
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(t.m().join("linux"))
        .status()
        .unwrap();
    assert!(st.success());
    let d = Command::new("diff")
        .arg("-r")
        .arg(src)
        .arg(t.m().join("linux"))
        .output()
        .unwrap();
    assert!(
        d.status.success(),
        "diff -r: {}",
        String::from_utf8_lossy(&d.stdout)
    );
    // tar out of the mount, extract elsewhere, compare.
    let out = t.p().join("out");
    fs::create_dir(&out).unwrap();
    let tar = format!(
        "tar -C {} -cf - linux | tar -C {} -xf -",
        t.m().display(),
        out.display()
    );
    assert!(Command::new("sh")
        .arg("-c")
        .arg(&tar)
        .status()
        .unwrap()
        .success());
    let d = Command::new("diff")
        .arg("-r")
        .arg(src)
        .arg(out.join("linux"))
        .output()
        .unwrap();
    assert!(
        d.status.success(),
        "after tar: {}",
        String::from_utf8_lossy(&d.stdout)
    );
    assert!(Command::new("rm")
        .arg("-rf")
        .arg(t.m().join("linux"))
        .status()
        .unwrap()
        .success());
    assert_eq!(fs::read_dir(t.m()).unwrap().count(), 0);
    t.unmount();
    assert!(ok(&["check", "v.vol", "--key-file", "k"], t.p()).contains("clean"));
}

#[test]
fn kill_dash_nine_keeps_fsynced_files() {
    let t = Mounted::new();
    let mut synced = Vec::new();
    for i in 0..20 {
        let p = t.m().join(format!("f{i}"));
        let mut f = fs::File::create(&p).unwrap();
        f.write_all(&vec![i as u8; 100_000]).unwrap();
        f.sync_all().unwrap();
        synced.push(p);
    }
    // Unsynced work in flight, then kill -9 the daemon.
    for i in 0..20 {
        fs::write(t.m().join(format!("u{i}")), vec![7u8; 50_000]).unwrap();
    }
    let pid = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "pgrep -f 'lsvfs mount .*{}'",
            t.p().join("v.vol").file_name().unwrap().to_str().unwrap()
        ))
        .output()
        .unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&pid.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    let ours: Vec<&String> = pids
        .iter()
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/cmdline"))
                .map(|c| {
                    c.contains("--foreground")
                        && fs::read_link(format!("/proc/{p}/cwd")).ok().as_deref() == Some(t.p())
                })
                .unwrap_or(false)
        })
        .collect();
    assert_eq!(ours.len(), 1, "exactly one daemon for this mount: {pids:?}");
    assert!(Command::new("kill")
        .arg("-9")
        .arg(ours[0])
        .status()
        .unwrap()
        .success());
    let _ = Command::new("fusermount3").arg("-uz").arg(t.m()).status();
    // Wait for the lock to go with the process.
    for _ in 0..100 {
        if lsvfs::device::FileDevice::open(&t.p().join("v.vol"), false).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(ok(&["check", "v.vol", "--key-file", "k"], t.p()).contains("clean"));
    t.mount();
    for (i, p) in synced.iter().enumerate() {
        assert_eq!(
            fs::read(p).unwrap(),
            vec![i as u8; 100_000],
            "{}",
            p.display()
        );
    }
    t.unmount();
}

#[test]
fn second_mount_and_wrong_key_are_refused() {
    let t = Mounted::new();
    fs::create_dir(t.p().join("m2")).unwrap();
    let o = lsvfs(&["mount", "v.vol", "m2", "--key-file", "k"], t.p());
    assert_eq!(
        o.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use"));
    t.unmount();
    ok(&["keygen", "k2"], t.p());
    let o = lsvfs(&["mount", "v.vol", "m", "--key-file", "k2"], t.p());
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The story: `cp -a` sets a directory's mode by writing a minimal POSIX
/// ACL, not by chmod; the file system stored the ACL as an opaque xattr and
/// every copied directory ended up 0700. ACLs now drive the mode, chmod
/// drives the ACL, and default ACLs are inherited, as on ext4.
#[test]
fn posix_acls_and_modes_as_cp_and_setfacl_expect() {
    let t = Mounted::new();
    let src = t.p().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/f"), b"x").unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o751)).unwrap();
    fs::set_permissions(src.join("sub/f"), fs::Permissions::from_mode(0o604)).unwrap();
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(t.m().join("c"))
        .status()
        .unwrap()
        .success());
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        (
            mode(&t.m().join("c")),
            mode(&t.m().join("c/sub")),
            mode(&t.m().join("c/sub/f"))
        ),
        (0o755, 0o751, 0o604)
    );
    let sh = |cmd: &str| {
        let o = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(t.m())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    sh("touch f && chmod 644 f && setfacl -m u:1234:rw f");
    assert_eq!(
        mode(&t.m().join("f")),
        0o664,
        "the group bits show the ACL mask"
    );
    sh("chmod 640 f");
    let acl = sh("getfacl -p f");
    assert!(
        acl.contains("mask::r--") && acl.contains("other::---"),
        "{acl}"
    );
    sh("mkdir d && setfacl -d -m u:55:rx d && mkdir d/sub && touch d/file");
    let inherited = sh("getfacl -p d/sub");
    assert!(
        inherited.contains("user:55:r-x") && inherited.contains("default:user:55:r-x"),
        "{inherited}"
    );
    assert!(sh("getfacl -p d/file").contains("user:55:r-x"));
    t.unmount();
    t.mount();
    assert!(
        sh("getfacl -p d/sub").contains("default:user:55:r-x"),
        "ACLs survive a remount"
    );
}
