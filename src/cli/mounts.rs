//! The host's mount table, /proc/self/mountinfo, as the commands read it:
//! which volume is mounted where, and a FUSE mount's connection number.
//!
//! A line is `ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [TAGS...] -
//! FSTYPE SOURCE SUPEROPTIONS`; the kernel writes a space, tab, newline or
//! backslash in a path as an octal escape (`\040` for a space). An lsvfs
//! mount's source is `lsvfs:` and the volume's canonical path, as `lsvfs
//! mount` names it.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// One mount, its paths unescaped.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Mount {
    pub major: u32,
    pub minor: u32,
    /// The directory of its file system it shows: `/` unless a bind
    /// mount of a subdirectory.
    pub root: PathBuf,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: OsString,
    /// A FUSE mount's owner (its `user_id=` super option).
    pub owner: Option<u32>,
}

impl Mount {
    /// The volume an lsvfs mount says it serves; None for any other mount.
    /// Anyone may name a FUSE mount `lsvfs:/some/volume`: see
    /// [`Mount::vouched`].
    pub fn volume(&self) -> Option<PathBuf> {
        if !self.fstype.starts_with("fuse") {
            return None;
        }
        let path = self.source.as_bytes().strip_prefix(b"lsvfs:")?;
        Some(PathBuf::from(OsString::from_vec(path.to_vec())))
    }

    /// A FUSE mount's connection number: its minor device number (FUSE's
    /// major is 0); None for any other mount.
    pub fn connection(&self) -> Option<u64> {
        (self.major == 0).then_some(u64::from(self.minor))
    }

    /// Whether its claim to serve `volume` can be believed: the mount is
    /// root's, the caller's, or that of the volume file's owner.
    fn vouched(&self, volume: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        self.owner.is_some_and(|o| {
            o == 0 || o == me || std::fs::metadata(volume).is_ok_and(|m| m.uid() == o)
        })
    }
}

/// The mounts in a mountinfo text, oldest first; a line it cannot read is
/// left out.
pub(super) fn parse(text: &[u8]) -> Vec<Mount> {
    text.split(|&b| b == b'\n')
        .filter_map(|line| {
            let f: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
            // Optional tags come between the sixth field and the "-".
            let sep = 6 + f.get(6..)?.iter().position(|x| *x == b"-")?;
            let (major, minor) = std::str::from_utf8(f.get(2)?).ok()?.split_once(':')?;
            let owner = f.get(sep + 3).and_then(|o| {
                o.split(|&b| b == b',')
                    .find_map(|kv| std::str::from_utf8(kv.strip_prefix(b"user_id=")?).ok())
                    .and_then(|v| v.parse().ok())
            });
            let path = |b: &[u8]| PathBuf::from(OsString::from_vec(unescape(b)));
            Some(Mount {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                root: path(f.get(3)?),
                mountpoint: path(f.get(4)?),
                fstype: String::from_utf8_lossy(f.get(sep + 1)?).into_owned(),
                source: OsString::from_vec(unescape(f.get(sep + 2)?)),
                owner,
            })
        })
        .collect()
}

/// This process's view of the mounts (empty if /proc cannot be read).
pub(super) fn table() -> Vec<Mount> {
    std::fs::read("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The newest mount on `mountpoint` (a canonical path): the one a path
/// lookup reaches.
pub(super) fn on(table: &[Mount], mountpoint: &Path) -> Option<usize> {
    table.iter().rposition(|m| m.mountpoint == mountpoint)
}

/// The volume mounted on `mountpoint` (a canonical path), if an lsvfs
/// mount is the one there and it can be believed ([`Mount::vouched`]).
pub(super) fn volume_on(mountpoint: &Path) -> Option<PathBuf> {
    let t = table();
    let m = &t[on(&t, mountpoint)?];
    m.volume().filter(|v| m.vouched(v))
}

/// Where the volume at `volume` is mounted, if it is. Of the mounts that
/// say they serve it ([`Mount::vouched`]), of its whole file system (bind
/// mounts and propagated copies show the same source) and alive (a mount
/// whose daemon died answers ENOTCONN until it is unmounted): the oldest
/// whose daemon serves a control socket, else the oldest.
pub(super) fn mountpoint_of(volume: &Path) -> Option<PathBuf> {
    let want = std::fs::canonicalize(volume).ok()?;
    let alive = |m: &Path| {
        std::fs::metadata(m).map_err(|e| e.raw_os_error()).err() != Some(Some(libc::ENOTCONN))
    };
    let mut found = table()
        .into_iter()
        .filter(|m| {
            m.root == Path::new("/")
                && m.volume().as_deref() == Some(want.as_path())
                && m.vouched(&want)
                && alive(&m.mountpoint)
        })
        .map(|m| m.mountpoint)
        .peekable();
    let oldest = found.peek().cloned();
    found.find(|m| socket_path(m).exists()).or(oldest)
}

/// Directory of the mounts' control sockets (`$LSVFS_RUN_DIR`, default
/// /run/lsvfs).
pub(super) fn run_dir() -> PathBuf {
    std::env::var_os("LSVFS_RUN_DIR").map_or_else(|| PathBuf::from("/run/lsvfs"), PathBuf::from)
}

/// The control socket of the mount on `mountpoint` (canonical path).
pub(super) fn socket_path(mountpoint: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(mountpoint.as_os_str().as_encoded_bytes());
    run_dir().join(format!("{}.sock", crate::keys::hex(&d[..16])))
}

/// What a command that takes a mountpoint or a volume works on: `target`
/// itself, unless it is a volume that is mounted: then its mountpoint
/// (the mount holds the volume, and serves the command).
pub(super) fn mount_or_self(target: &Path) -> PathBuf {
    if target.is_dir() {
        return target.to_path_buf();
    }
    mountpoint_of(target).unwrap_or_else(|| target.to_path_buf())
}

/// Makes `umount MOUNTPOINT` (umount(8), as root calls it) run
/// umount.fuse.lsvfs, which waits until the volume is flushed and closed.
/// Given an absolute path and no entry in libmount's utab, umount(8)
/// takes the mount's type from statfs(2), which says only "fuse", and
/// unmounts without a helper: it returns while the daemon still flushes.
/// An utab entry (written by `mount --fake`, with libmount's own format
/// and locking) makes it read the type from the mount table. Root only;
/// without util-linux's mount(8) nothing changes. Returns whether the
/// entry was written.
pub(super) fn register_for_umount(volume: &Path, mountpoint: &Path) -> bool {
    // An entry a crashed mount left on the same path goes first, unless
    // another mount is under this one there (it may be that entry's).
    if table()
        .iter()
        .filter(|m| m.mountpoint == mountpoint)
        .count()
        <= 1
    {
        unregister_for_umount(mountpoint);
    }
    let mut source = OsString::from("lsvfs:");
    source.push(volume);
    let done = quietly(
        std::process::Command::new(util_linux("mount"))
            .args(["--fake", "--internal-only", "--no-canonicalize"])
            .args(["-t", "fuse.lsvfs", "-o", "uhelper=lsvfs"])
            .arg(source)
            .arg(mountpoint),
    );
    if !done {
        tracing::warn!(
            "mount --fake did not record {} in utab: `umount` of its absolute path will not \
             wait for the volume to close (`lsvfs unmount` does)",
            mountpoint.display()
        );
    }
    done
}

/// Drops the utab entry [`register_for_umount`] wrote (umount(8) drops it
/// itself when it unmounts; this is for every other way a mount ends).
pub(super) fn unregister_for_umount(mountpoint: &Path) {
    quietly(
        std::process::Command::new(util_linux("umount"))
            .args(["--fake", "--internal-only", "--no-canonicalize"])
            .arg(mountpoint),
    );
}

/// util-linux's `name` where Debian and others install it, not through
/// PATH (this runs as root).
fn util_linux(name: &str) -> PathBuf {
    ["/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/usr/bin").join(name))
}

/// Runs `cmd` with no input or output; whether it ran and succeeded
/// within 5 s (one that takes longer, waiting on libmount's lock, say,
/// is killed: the mount does not hang on it).
fn quietly(cmd: &mut std::process::Command) -> bool {
    use std::process::Stdio;
    let Ok(mut child) = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Undoes the octal escapes of fstab(5) and mountinfo (`\040` for a
/// space); a backslash not followed by three octal digits stays.
pub(super) fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (field[i], octal) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &[u8] = b"\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
45 22 0:40 / /mnt/a\\040b rw,relatime - fuse.lsvfs lsvfs:/srv/my\\040vol.vol rw,user_id=0
46 22 0:52 / /mnt/ab rw,relatime shared:7 master:2 - fuse.lsvfs lsvfs:/w.vol rw,user_id=0,group_id=0
47 45 0:61 / /mnt/a\\040b rw,relatime - fuse.lsvfs lsvfs:/x\\134y.vol rw,user_id=0
48 22 8:3 / /data rw,relatime - ext4 /dev/sda3 rw
49 22 0:70 / /sshfs rw - fuse.sshfs host:/x rw,user_id=0
50 22 0:71 / /fake rw - fuse.lsvfs lsvfs:/w.vol rw,user_id=4242
51 22 0:52 /sub /bound rw - fuse.lsvfs lsvfs:/w.vol rw,user_id=0
not a mount line
";

    #[test]
    fn paths_are_unescaped_and_the_newest_mount_on_a_path_wins() {
        let t = parse(TABLE);
        assert_eq!(t.len(), 8, "the line that is not a mount is left out");
        let i = on(&t, Path::new("/mnt/a b")).unwrap();
        assert_eq!((t[i].major, t[i].minor), (0, 61));
        assert_eq!(t[i].connection(), Some(61));
        assert_eq!(t[i].volume(), Some(PathBuf::from("/x\\y.vol")));
        let first = &t[1];
        assert_eq!(first.mountpoint, Path::new("/mnt/a b"));
        assert_eq!(first.volume(), Some(PathBuf::from("/srv/my vol.vol")));
        // Optional tags before the separator do not shift the fields.
        let ab = &t[on(&t, Path::new("/mnt/ab")).unwrap()];
        assert_eq!(ab.volume(), Some(PathBuf::from("/w.vol")));
        // Other file systems, FUSE ones included, serve no volume.
        assert_eq!(t[on(&t, Path::new("/data")).unwrap()].volume(), None);
        assert_eq!(t[on(&t, Path::new("/data")).unwrap()].connection(), None);
        assert_eq!(t[on(&t, Path::new("/sshfs")).unwrap()].volume(), None);
        assert_eq!(on(&t, Path::new("/mnt/c")), None);
        // A FUSE mount another user made is not believed, whatever its
        // name, unless that user owns the volume.
        let fake = &t[on(&t, Path::new("/fake")).unwrap()];
        assert_eq!(fake.owner, Some(4242));
        assert!(!fake.vouched(Path::new("/")), "/ is root's, not uid 4242's");
        assert!(t[on(&t, Path::new("/mnt/ab")).unwrap()].vouched(Path::new("/w.vol")));
        // A bind mount of a subdirectory says so.
        let bound = &t[on(&t, Path::new("/bound")).unwrap()];
        assert_eq!(bound.root, Path::new("/sub"));
        assert_eq!(
            t[on(&t, Path::new("/mnt/ab")).unwrap()].root,
            Path::new("/")
        );
        // The escaped form is not a mount point of its own.
        assert_eq!(on(&t, Path::new("/mnt/a\\040b")), None);
    }

    #[test]
    fn unescape_reads_octal_and_keeps_other_backslashes() {
        assert_eq!(unescape(b"a\\040b\\011c"), b"a b\tc");
        assert_eq!(unescape(b"a\\134b\\0"), b"a\\b\\0");
        assert_eq!(unescape(b"\\777"), vec![0o777u32 as u8]);
        assert_eq!(unescape(b"end\\"), b"end\\");
    }
}
