//! Frozen images: one small image for every on-disk format version, written
//! once by an `#[ignore]`d generator, committed under tests/images/ and never
//! regenerated. Every test run must still open each one and read exactly
//! what was written, and must refuse deliberately damaged copies of them with
//! the exit code the README documents.
//!
//! Apart from the version-1 block image (which predates the command line),
//! the tests that run every time drive the `lsvfs` binary only: check, info,
//! a real FUSE mount, snapshots, the sealed store. They do not use the
//! library, whose types may change freely; only the bytes on disk may not
//! (the generators use it to run the cleaner before freezing). Expected
//! trees are written out from the generators' inputs (the same scripts run
//! on the host's own file system), not copied from what lsvfs returned.

mod common;

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;

use common::{block, master, open};
use lsvfs::device::{Device, FileDevice, MemDevice};
use lsvfs::volume::{self, CreateOptions, KeySlot, Lba, Options, Transaction, Volume, KEY_SLOTS};
use lsvfs::BLOCK_SIZE;
use sha2::{Digest, Sha256};

/// Volume format 1 with checkpoint version 1 (before snapshots): a bare
/// block volume (no file system, no key slot) of 64 blocks in 16-block
/// segments, two checkpoints and one committed transaction in the log tail.
const V1: &str = "tests/images/v1.vol.gz";

/// Volume format 1, checkpoint version 2 without snapshot metadata, file
/// system format 1 (superblock version 1 and its metadata B+tree, branch
/// and leaf nodes): a 1 MiB volume in 16-block segments holding every kind
/// of inode: regular files (empty, small, a sparse file with a punched hole,
/// a sparse 2 MiB file with data in three 128-block chunks, preallocated
/// blocks inside and past the end), directories (setgid, sticky), a hard
/// link, symlinks (relative, dangling, an 1800-byte target in two pieces),
/// a FIFO, a socket, character and block device nodes, user and trusted
/// xattrs (empty, binary, 1499 bytes), an access ACL, a default ACL and
/// what inherited it, other owners, setuid. Created with `lsvfs create
/// --keyserver --key-file`, so slot 0 holds [`FS1_KEY`] and the sealed store
/// [`SEALED1`] holds its key for the key server's KEK v1. Cleanly unmounted,
/// then cleaned (see [`clean`] and [`zero_unreferenced_segments`]).
const FS1: &str = "tests/images/fs1.vol.gz";
/// Key file format v1 (`lsvfs keygen`): the recovery key of [`FS1`].
const FS1_KEY: &str = "tests/images/fs1.key";

/// Checkpoint version 2 with snapshot metadata, on a small file system like
/// [`FS1`]'s: snapshots `first` (id 1) and `second` (id 2), a third taken
/// and deleted (id 3, so the next id is 4), blocks only the snapshots hold
/// (an overwritten block, a deleted file, replaced inodes). Cleaned after
/// unmounting, then mounted again for a log tail past the last checkpoint:
/// the transactions of a new file and of an unlink of a file still open,
/// made durable by fsync before the mount was killed with SIGKILL, so the
/// file system also holds an orphan.
const SNAP2: &str = "tests/images/snap2.vol.gz";
/// Key file format v1: the recovery key of [`SNAP2`].
const SNAP2_KEY: &str = "tests/images/snap2.key";

/// Checkpoint version 3 (zeroed blocks) on a small file system: a file
/// preallocated with fallocate (inside and past its end) and partly
/// written, a file with ranges zeroed by FALLOC_FL_ZERO_RANGE (whole and
/// partial blocks), a snapshot `before-zero` that still holds the data a
/// later ZERO_RANGE dropped, and a log tail past the last checkpoint: a
/// preallocation and a zero range made durable by fsync before the mount
/// was killed with SIGKILL (log entries of kind 5 to replay).
const ZERO3: &str = "tests/images/zero3.vol.gz";
/// Key file format v1: the recovery key of [`ZERO3`].
const ZERO3_KEY: &str = "tests/images/zero3.key";

/// Sealed store format v1 (`lsvfs host init`, then `lsvfs create
/// --keyserver`): `host-secret`, `sealed` (host identity, key server URL,
/// pinned CA, and [`FS1`]'s master key wrapped under KEK v1) and the
/// `machine-id` it was sealed against (the tests point
/// `LSVFS_MACHINE_ID_FILE` at it). Opening a volume through it needs the key
/// server that released the KEK, which is not frozen (its database and TLS
/// certificate are its own formats); what is checked offline is that the
/// store opens and decodes on its host, and is refused elsewhere.
const SEALED1: &str = "tests/images/sealed1";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn refuse_overwrite(paths: &[&str]) {
    for p in paths {
        assert!(
            !repo(p).exists(),
            "{p} exists; frozen images are never regenerated"
        );
    }
}

fn gunzip(rel: &str) -> Vec<u8> {
    let mut img = Vec::new();
    flate2::read::GzDecoder::new(fs::File::open(repo(rel)).unwrap())
        .read_to_end(&mut img)
        .unwrap();
    img
}

fn gzip_to(rel: &str, bytes: &[u8]) {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes).unwrap();
    fs::write(repo(rel), gz.finish().unwrap()).unwrap();
}

// ---------------------------------------------------------------------------
// Version 1: the bare block volume.

/// What the v1 image holds: (lba, version) per block, 0 = unmapped.
fn expected() -> Vec<u64> {
    let mut m = vec![0u64; 64];
    m[..12].fill(1);
    m[4..8].fill(2);
    m[9] = 0;
    m[10] = 0;
    m[40] = 3; // only in the log tail, after the last checkpoint
    m[41] = 3;
    m
}

#[test]
#[ignore = "run once to create a new format version's image; never regenerate an existing one"]
fn generate_v1_image() {
    refuse_overwrite(&[V1]);
    let dev = Arc::new(MemDevice::new());
    volume::create(
        &*dev,
        &master(),
        *b"lsvfs-frozen-v1!",
        [KeySlot::EMPTY; KEY_SLOTS],
        &CreateOptions {
            logical_blocks: 64,
            segment_blocks: 16,
        },
    )
    .unwrap();
    let v = open(dev.clone());
    v.write(
        Lba(0),
        &(0..12).flat_map(|l| block(l, 1)).collect::<Vec<u8>>(),
    )
    .unwrap();
    v.checkpoint().unwrap();
    let mut t = Transaction::new();
    t.write(Lba(4), (4..8).flat_map(|l| block(l, 2)).collect())
        .trim(Lba(9), 2);
    v.commit(t).unwrap();
    v.checkpoint().unwrap();
    v.write(Lba(40), &[block(40, 3), block(41, 3)].concat())
        .unwrap();
    v.flush().unwrap();
    let img = dev.image();
    v.abandon();
    gzip_to(V1, &img);
}

// ---------------------------------------------------------------------------
// Header version 2: key generations, a rekey half done.

/// A 128-block volume (16-block segments, master key `common::master()`)
/// written under key generation 0 with a snapshot `before`, then rekeyed to
/// generation 1 and the pass run part way: the header lists generation 1,
/// segments hold blocks of both generations, held blocks carry their key
/// generation and MAC in the held table, and a log tail (after the last
/// checkpoint) holds blocks 30 and 31 under generation 1.
const REKEY2: &str = "tests/images/rekey2.vol.gz";

/// (live, snapshot `before`): each block's version, 0 = unmapped.
fn rekey2_expected() -> (Vec<u64>, Vec<u64>) {
    let mut before = vec![0u64; 128];
    before[..32].fill(1);
    let mut live = before.clone();
    live[8..16].fill(2);
    live[20..24].fill(0);
    live[30] = 3;
    live[31] = 3;
    (live, before)
}

#[test]
#[ignore = "writes tests/images/rekey2.vol.gz once; never rerun"]
fn generate_rekey2_image() {
    refuse_overwrite(&[REKEY2]);
    let dev = Arc::new(MemDevice::new());
    volume::create(
        &*dev,
        &master(),
        *b"lsvfs-frozen-rk2",
        [KeySlot::EMPTY; KEY_SLOTS],
        &CreateOptions {
            logical_blocks: 128,
            segment_blocks: 16,
        },
    )
    .unwrap();
    let v = open(dev.clone());
    v.write(
        Lba(0),
        &(0..32).flat_map(|l| block(l, 1)).collect::<Vec<u8>>(),
    )
    .unwrap();
    v.snapshot_create("before").unwrap();
    let mut t = Transaction::new();
    t.write(Lba(8), (8..16).flat_map(|l| block(l, 2)).collect())
        .trim(Lba(20), 4);
    v.commit(t).unwrap();
    v.checkpoint().unwrap();
    let h = volume::read_header(&*dev).unwrap();
    let (entry, secret) = volume::new_key_generation(&h, &master()).unwrap();
    v.rekey_start(entry, &secret).unwrap();
    assert!(v.rekey_step().unwrap() && v.rekey_step().unwrap());
    let st = v.rekey_status().unwrap();
    assert!(st.in_progress() && st.segments_left > 0, "{st:?}");
    v.checkpoint().unwrap();
    v.write(Lba(30), &[block(30, 3), block(31, 3)].concat())
        .unwrap();
    v.flush().unwrap();
    let img = dev.image();
    v.abandon();
    gzip_to(REKEY2, &img);
}

#[test]
fn header_v2_image_with_a_rekey_half_done_reads_and_finishes_it() {
    let dev = Arc::new(MemDevice::from_image(gunzip(REKEY2)));
    let h = volume::read_header(&*dev).unwrap();
    assert_eq!(
        (
            h.key_gens.iter().map(|g| g.key_gen).collect::<Vec<_>>(),
            h.retired_below
        ),
        (vec![1], 0)
    );
    let (live, before) = rekey2_expected();
    let read_as = |v: &Volume, want: &[u64], what: &str| {
        let mut buf = vec![0u8; BLOCK_SIZE];
        for (l, ver) in want.iter().enumerate() {
            v.read(Lba(l as u64), &mut buf).unwrap();
            if *ver == 0 {
                assert!(buf.iter().all(|b| *b == 0), "{what}: block {l}");
            } else {
                assert_eq!(buf, block(l as u64, *ver), "{what}: block {l}");
            }
        }
    };
    let v = open(dev.clone());
    assert_eq!(v.recovery().transactions, 1, "the log tail");
    read_as(&v, &live, "live");
    let id = v.snapshot_names().unwrap()[0].0;
    read_as(&v.snapshot_view(id).unwrap(), &before, "before");
    assert!(v.rekey_status().unwrap().in_progress());
    while v.rekey_step().unwrap() {}
    let st = v.rekey_status().unwrap();
    assert_eq!((st.generations, st.retired_below), (vec![1], 1));
    assert!(v.check().unwrap().is_clean());
    v.close().unwrap();
    let v = open(dev);
    read_as(&v, &live, "live after the rekey");
    read_as(
        &v.snapshot_view(id).unwrap(),
        &before,
        "before after the rekey",
    );
}

/// Checkpoint version 4: a 64-block volume (master key `common::master()`)
/// with the rekey policy set (30 days, 1 GiB) and 12 blocks written.
const POLICY4: &str = "tests/images/policy4.vol.gz";

#[test]
#[ignore = "writes tests/images/policy4.vol.gz once; never rerun"]
fn generate_policy4_image() {
    refuse_overwrite(&[POLICY4]);
    let dev = Arc::new(MemDevice::new());
    volume::create(
        &*dev,
        &master(),
        *b"lsvfs-frozen-cp4",
        [KeySlot::EMPTY; KEY_SLOTS],
        &CreateOptions {
            logical_blocks: 64,
            segment_blocks: 16,
        },
    )
    .unwrap();
    let v = open(dev.clone());
    v.set_rekey_policy(
        Some(std::time::Duration::from_secs(30 * 86_400)),
        Some(1 << 30),
    )
    .unwrap();
    v.write(
        Lba(0),
        &(0..12).flat_map(|l| block(l, 1)).collect::<Vec<u8>>(),
    )
    .unwrap();
    v.close().unwrap();
    gzip_to(POLICY4, &dev.image());
}

#[test]
fn checkpoint_v4_image_keeps_its_rekey_policy() {
    let dev = Arc::new(MemDevice::from_image(gunzip(POLICY4)));
    let v = open(dev);
    let st = v.rekey_status().unwrap();
    assert_eq!(
        (st.after_secs, st.after_bytes),
        (Some(30 * 86_400), Some(1 << 30))
    );
    assert!(st.sealed_bytes >= 12 * BLOCK_SIZE as u64, "{st:?}");
    let mut buf = vec![0u8; BLOCK_SIZE];
    for l in 0..12 {
        v.read(Lba(l), &mut buf).unwrap();
        assert_eq!(buf, block(l, 1), "block {l}");
    }
    assert!(v.check().unwrap().is_clean());
}

/// File-system format 2 (xattr values longer than one metadata item, in
/// pieces) on a bare 512-block volume in 16-block segments (master key
/// `common::master()`): file `f` with `user.long` (32,768 bytes), `user.edge`
/// (exactly 1,700: one full item, no piece) and `user.over` (1,701: one
/// piece of one byte), each of [`fs2_value`]; directory `d` with a default
/// ACL of 300 entries (2,412 bytes, [`fs2_acl`]) that its file `d/c`
/// inherited as its access ACL.
const FS2: &str = "tests/images/fs2.vol.gz";

/// The bytes of an xattr value of `len` in [`FS2`], by name.
fn fs2_value(name: &str, len: usize) -> Vec<u8> {
    let seed = name
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    (0..len as u64)
        .map(|i| (seed.wrapping_mul(i + 1) >> 7) as u8)
        .collect()
}

/// [`FS2`]'s default ACL: owner rwx, 296 named users r-x, group r-x,
/// mask rwx, other r-x.
fn fs2_acl() -> Vec<u8> {
    common::long_acl(296)
}

const FS2_XATTRS: [(&str, usize); 3] = [
    ("user.long", 32_768),
    ("user.edge", 1700),
    ("user.over", 1701),
];

#[test]
#[ignore = "writes tests/images/fs2.vol.gz once; never rerun"]
fn generate_fs2_image() {
    use lsvfs::fs::{Fs, ROOT_INO};
    refuse_overwrite(&[FS2]);
    let dev = Arc::new(MemDevice::new());
    common::create(&*dev, 512, 16);
    let v = open(dev.clone());
    Fs::format(&v, 0, 0).unwrap();
    let fs = Fs::mount(v).unwrap();
    let (f, _) = fs
        .mknod(ROOT_INO, b"f", libc::S_IFREG | 0o644, 0, 0, 0)
        .unwrap();
    for (name, len) in FS2_XATTRS {
        fs.setxattr(f, name.as_bytes(), &fs2_value(name, len), 0)
            .unwrap();
    }
    let (d, _) = fs
        .mknod(ROOT_INO, b"d", libc::S_IFDIR | 0o755, 0, 0, 0)
        .unwrap();
    fs.setxattr(d, b"system.posix_acl_default", &fs2_acl(), 0)
        .unwrap();
    fs.mknod(d, b"c", libc::S_IFREG | 0o666, 0, 0, 0).unwrap();
    fs.unmount().unwrap();
    gzip_to(FS2, &dev.image());
}

#[test]
fn fs_format_2_image_reads_its_long_xattrs_and_a_newer_version_is_refused() {
    use lsvfs::fs::{Fs, ROOT_INO};
    let img = gunzip(FS2);
    let fs = Fs::mount(open(Arc::new(MemDevice::from_image(img.clone())))).unwrap();
    let (f, _) = fs.lookup(ROOT_INO, b"f").unwrap();
    for (name, len) in FS2_XATTRS {
        let got = fs.getxattr(f, name.as_bytes()).unwrap();
        assert!(
            got == fs2_value(name, len),
            "{name}: {} bytes read",
            got.len()
        );
    }
    let (d, _) = fs.lookup(ROOT_INO, b"d").unwrap();
    assert!(fs.getxattr(d, b"system.posix_acl_default").unwrap() == fs2_acl());
    let (c, _) = fs.lookup(d, b"c").unwrap();
    let access = fs.getxattr(c, b"system.posix_acl_access").unwrap();
    assert_eq!(access.len(), fs2_acl().len(), "d/c inherited the long ACL");
    let r = fs.check().unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    drop(fs);

    // The same superblock saying version 3: refused by its version.
    let dev = Arc::new(MemDevice::from_image(img));
    let v = open(dev.clone());
    let mut sb = vec![0u8; BLOCK_SIZE];
    v.read(Lba(0), &mut sb).unwrap();
    assert_eq!(sb[8..12], 2u32.to_le_bytes(), "the image is version 2");
    sb[8..12].copy_from_slice(&3u32.to_le_bytes());
    let mut t = Transaction::new();
    t.write(Lba(0), sb);
    v.commit(t).unwrap();
    let e = Fs::mount(v).err().expect("version 3 mounted").to_string();
    assert!(e.contains("want=2 have=3"), "{e}");
}

#[test]
fn format_v1_image_still_opens_and_reads() {
    let dev = Arc::new(MemDevice::from_image(gunzip(V1)));
    let v = open(dev);
    assert_eq!(
        v.recovery().transactions,
        1,
        "the image's log tail holds one transaction"
    );
    let mut buf = vec![0u8; BLOCK_SIZE];
    for (l, ver) in expected().into_iter().enumerate() {
        v.read(Lba(l as u64), &mut buf).unwrap();
        if ver == 0 {
            assert!(buf.iter().all(|b| *b == 0), "block {l}");
        } else {
            assert_eq!(buf, block(l as u64, ver), "block {l}");
        }
    }
    assert!(v.check().unwrap().is_clean());
}

// ---------------------------------------------------------------------------
// Running the binary.

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run_in(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lsvfs"));
    c.args(args).current_dir(dir);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run lsvfs")
}

/// Asserts that `o` succeeded; returns its stdout and stderr.
fn succeeded(o: &Output, what: &str) -> String {
    assert!(o.status.success(), "{what}: {}", text(o));
    text(o)
}

/// Asserts that `o` failed with exit `code` and said `needle`.
fn failed(o: &Output, code: i32, needle: &str, what: &str) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(code), "{what}: {t}");
    assert!(t.contains(needle), "{what}: {needle:?} missing from {t:?}");
    assert!(!t.contains("panicked"), "{what}: {t}");
}

fn sh(dir: &Path, script: &str) {
    let o = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{script}: {}", text(&o));
}

/// A decompressed frozen image in a temporary directory: `v.vol`, its key
/// file `k` (mode 0600, as `lsvfs` demands; git keeps 0644) and a mount
/// point `m`.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new(image: &str, key: &str) -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("v.vol"), gunzip(image)).unwrap();
        fs::set_permissions(dir.path().join("v.vol"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::copy(repo(key), dir.path().join("k")).unwrap();
        fs::set_permissions(dir.path().join("k"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::create_dir(dir.path().join("m")).unwrap();
        Scratch { dir }
    }

    fn p(&self) -> &Path {
        self.dir.path()
    }

    fn m(&self) -> PathBuf {
        self.p().join("m")
    }

    fn vol(&self) -> PathBuf {
        self.p().join("v.vol")
    }

    fn image(&self) -> Vec<u8> {
        fs::read(self.vol()).unwrap()
    }

    fn set_image(&self, img: &[u8]) {
        fs::write(self.vol(), img).unwrap();
    }

    fn lsvfs(&self, args: &[&str]) -> Output {
        run_in(self.p(), args, &[])
    }

    fn ok(&self, args: &[&str]) -> String {
        succeeded(&self.lsvfs(args), &format!("lsvfs {args:?}"))
    }

    fn fails(&self, args: &[&str], code: i32, needle: &str) {
        failed(&self.lsvfs(args), code, needle, &format!("lsvfs {args:?}"));
    }

    fn check(&self) -> String {
        let out = self.ok(&["check", "v.vol", "--key-file", "k"]);
        assert!(out.contains("v.vol: clean"), "{out}");
        out
    }

    fn check_fails(&self, code: i32, needle: &str) {
        self.fails(&["check", "v.vol", "--key-file", "k"], code, needle);
    }

    fn mount(&self) {
        self.ok(&["mount", "v.vol", "m", "--key-file", "k"]);
    }

    fn unmount(&self) {
        self.ok(&["unmount", "m"]);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(self.m())
            .stderr(Stdio::null())
            .status();
    }
}

/// The number in `text` right before `what` (as in "3 transactions").
fn count_before(text: &str, what: &str) -> u64 {
    let at = text
        .find(what)
        .unwrap_or_else(|| panic!("{what:?} missing from {text}"));
    text[..at]
        .trim_end()
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {what:?} in {text}"))
}

// ---------------------------------------------------------------------------
// A tree as a listing, for comparing a mount with what was written.

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

/// Short printable values as they are, anything else by length and hash.
fn show(v: &[u8]) -> String {
    if v.len() <= 48 && v.iter().all(|c| (0x20..0x7f).contains(c) && *c != b'"') {
        format!("\"{}\"", String::from_utf8_lossy(v))
    } else {
        format!("len:{},sha256:{}", v.len(), sha256(v))
    }
}

/// A POSIX ACL xattr (the kernel's format: version 2, then 8-byte entries
/// of tag, permissions, id) in `getfacl`'s words.
fn acl_text(v: &[u8]) -> String {
    if v.len() < 4 || (v.len() - 4) % 8 != 0 || v[..4] != 2u32.to_le_bytes() {
        return format!("malformed:{}", hex(v));
    }
    let entries: Vec<String> = v[4..]
        .chunks(8)
        .map(|e| {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let perm = u16::from_le_bytes([e[2], e[3]]);
            let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            let who = match tag {
                0x01 => "user:".to_string(),
                0x02 => format!("user:{id}"),
                0x04 => "group:".to_string(),
                0x08 => format!("group:{id}"),
                0x10 => "mask:".to_string(),
                0x20 => "other:".to_string(),
                t => format!("tag{t:#x}:{id}"),
            };
            let rwx: String = [(4, 'r'), (2, 'w'), (1, 'x')]
                .iter()
                .map(|(bit, c)| if perm & bit != 0 { *c } else { '-' })
                .collect();
            format!("{who}:{rwx}")
        })
        .collect();
    entries.join(",")
}

/// Extended attributes of `p` itself (not a symlink's target), by name.
fn xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: `c` is a NUL-terminated path and `names` has `names.len()`
    // writable bytes.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        n >= 0,
        "listxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: both strings are NUL-terminated and `v` has `v.len()`
        // writable bytes.
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(
            len >= 0,
            "getxattr {} {}: {}",
            p.display(),
            String::from_utf8_lossy(name),
            std::io::Error::last_os_error()
        );
        v.truncate(len as usize);
        out.push((String::from_utf8(name.to_vec()).unwrap(), v));
    }
    out.sort();
    out
}

/// One line per entry under `root` (`.snapshots` left out), sorted by
/// path: type, permission bits, owner, link count, size (not for
/// directories, whose size is each file system's own business), device
/// numbers, symlink target, contents, modification time and xattrs. A
/// further name of a hard-linked file says which entry it is the same file
/// as. Inode numbers, atime and ctime are left out.
fn listing(root: &Path) -> String {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
        let mut names: Vec<_> = fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| !(rel.as_os_str().is_empty() && n == ".snapshots"))
            .collect();
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for n in names {
            let r = rel.join(&n);
            out.push(r.clone());
            if fs::symlink_metadata(root.join(&r)).unwrap().is_dir() {
                walk(root, &r, out);
            }
        }
    }
    let mut paths = vec![PathBuf::new()];
    walk(root, Path::new(""), &mut paths);
    let mut seen: HashMap<u64, String> = HashMap::new();
    let mut lines = Vec::new();
    for rel in paths {
        let p = root.join(&rel);
        let name = if rel.as_os_str().is_empty() {
            ".".to_string()
        } else {
            rel.display().to_string()
        };
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            "d"
        } else if ft.is_file() {
            "f"
        } else if ft.is_symlink() {
            "l"
        } else if ft.is_fifo() {
            "p"
        } else if ft.is_socket() {
            "s"
        } else if ft.is_char_device() {
            "c"
        } else if ft.is_block_device() {
            "b"
        } else {
            "?"
        };
        let mut l = format!(
            "{name} {kind} {:04o} {}:{} n{}",
            md.mode() & 0o7777,
            md.uid(),
            md.gid(),
            md.nlink()
        );
        if !ft.is_dir() {
            l += &format!(" s{}", md.size());
        }
        if ft.is_char_device() || ft.is_block_device() {
            l += &format!(" dev{},{}", libc::major(md.rdev()), libc::minor(md.rdev()));
        }
        if ft.is_symlink() {
            l += &format!(
                " ->{}",
                show(fs::read_link(&p).unwrap().as_os_str().as_bytes())
            );
        }
        if !ft.is_dir() && md.nlink() > 1 {
            if let Some(first) = seen.get(&md.ino()) {
                l += &format!(" same-as:{first}");
            } else {
                seen.insert(md.ino(), name.clone());
            }
        }
        if ft.is_file() {
            l += &format!(" data:{}", show(&fs::read(&p).unwrap()));
        }
        l += &format!(" mtime:{}.{:09}", md.mtime(), md.mtime_nsec());
        for (n, v) in xattrs(&p) {
            if n.starts_with("system.posix_acl_") {
                l += &format!(" {n}={}", acl_text(&v));
            } else {
                l += &format!(" {n}={}", show(&v));
            }
        }
        lines.push(l);
    }
    lines.join("\n") + "\n"
}

fn assert_tree(root: &Path, want: &str, what: &str) {
    let have = listing(root);
    if have != want {
        panic!("{what}: the tree differs\n--- want\n{want}--- have\n{have}");
    }
}

// ---------------------------------------------------------------------------
// Generators of the file-system images.

/// Shell helpers every generator script starts with. `pat N LEN`: LEN bytes
/// of `seq N ...` output (each block differs). `stamp BASE`: gives every
/// entry its own modification time, BASE plus one day per entry in sorted
/// order, with nanoseconds.
const PRELUDE: &str = r#"set -eu
umask 022
pat() { seq "$1" 99999999 | head -c "$2"; }
stamp() {
  i=0
  find . | LC_ALL=C sort | while IFS= read -r p; do
    i=$((i+1))
    touch -h -d "@$(($1 + i*86400)).$(printf %09d $((i*1234567)))" "$p"
  done
}
"#;

/// Everything in [`FS1`] but the socket (bound by the generator itself).
const FS1_SCRIPT: &str = r#"
mkdir -p docs/deep/er/est sticky
printf 'hello, frozen world\n' > hello.txt
: > empty
pat 1 3000 > docs/notes.txt
truncate -s 100K sparse
pat 100 8192 | dd of=sparse bs=4096 seek=3 conv=notrunc status=none
fallocate -p -o $((4*4096)) -l 4096 sparse
pat 200 300 | dd of=sparse bs=1 seek=$((20*4096+17)) conv=notrunc status=none
truncate -s $((2*1024*1024+100)) big
pat 300 4096 | dd of=big bs=4096 seek=0 conv=notrunc status=none
pat 400 8192 | dd of=big bs=4096 seek=127 conv=notrunc status=none
pat 500 4096 | dd of=big bs=4096 seek=300 conv=notrunc status=none
: > prealloc
fallocate -o 0 -l 4096 prealloc
: > prealloc-past-eof
fallocate -n -o 0 -l 4096 prealloc-past-eof
ln -s hello.txt link-rel
ln -s /nonexistent/target dangling
ln -s "$(printf 'segment-%03d/' $(seq 1 150))" long-link
ln hello.txt docs/hello-hardlink
mkfifo -m 640 fifo
mknod -m 600 chardev c 1 3
mknod -m 660 blockdev b 7 0
setfattr -n user.color -v blue hello.txt
setfattr -n user.empty hello.txt
setfattr -n user.bin -v 0x00ff10 docs/notes.txt
setfattr -n user.big -v "$(pat 600 1500)" docs/notes.txt
setfattr -n trusted.secret -v root-only big
setfattr -n user.dir -v yes docs
setfacl -m u:1000:rw-,g:100:r--,m::rw- docs/notes.txt
setfacl -d -m u:1000:rwx docs/deep
# Under a default ACL the umask does not apply (POSIX.1e, ext4), but lsvfs
# does not ask the kernel for FUSE_DONT_MASK, so the kernel applies it
# before lsvfs sees the default ACL; with umask 000 both agree.
(umask 000; : > docs/deep/inherited; mkdir docs/deep/subdir-inherits)
chown 1000:1000 docs/deep/er
chown 1000:100 docs/deep/er/est
chmod 2750 docs/deep/er
chmod 1777 sticky
: > sticky/suid
chmod 4755 sticky/suid
"#;

/// After the socket is bound.
const FS1_FINISH: &str = "chmod 640 socket\nstamp 1600000000\n";

/// [`SNAP2`] before snapshot `first`.
const SNAP2_FIRST_SCRIPT: &str = r#"
mkdir -p dir/sub
printf 'kept in every snapshot\n' > dir/kept.txt
pat 1 6000 > data.bin
printf 'deleted after the first snapshot\n' > dir/sub/gone.txt
printf 'renamed after the first snapshot\n' > old-name
ln -s dir/kept.txt kept-link
setfattr -n user.phase -v one data.bin
stamp 1600000000
"#;

/// [`SNAP2`] between `first` and `second`.
const SNAP2_SECOND_SCRIPT: &str = r#"
pat 50000 4096 | dd of=data.bin bs=4096 seek=1 conv=notrunc status=none
rm dir/sub/gone.txt
mv old-name new-name
setfattr -n user.phase -v two data.bin
printf 'added before the second snapshot\n' > dir/added.txt
stamp 1610000000
"#;

/// [`SNAP2`]'s log tail, after `second`: then `new-name` is opened and
/// unlinked (an orphan), and [`SNAP2_TAIL_TIMES`] runs.
const SNAP2_TAIL_SCRIPT: &str = "printf 'written after the last snapshot\\n' > tail.txt\n";
const SNAP2_TAIL_TIMES: &str = "touch -h -d @1620000000.5 tail.txt\ntouch -h -d @1620000001.25 .\n";

/// [`ZERO3`] before snapshot `before-zero`.
const ZERO3_FIRST_SCRIPT: &str = r#"
pat 1 30000 > data.bin
fallocate -l 40960 pre
fallocate -n -o 40960 -l 8192 pre
pat 700 3000 | dd of=pre bs=1 seek=5000 conv=notrunc status=none
fallocate -z -o 100 -l 50 data.bin
stamp 1630000000
"#;

/// [`ZERO3`] after `before-zero`: its blocks 1-3 zeroed whole, part of
/// block 5 zeroed, and the file grown by a zero range.
const ZERO3_SECOND_SCRIPT: &str = r#"
fallocate -z -o 4096 -l 12288 data.bin
fallocate -z -o 21000 -l 1000 data.bin
fallocate -z -o 29000 -l 6000 data.bin
stamp 1640000000
"#;

/// [`ZERO3`]'s log tail.
const ZERO3_TAIL_SCRIPT: &str = r#"
fallocate -l 16384 tail-pre
fallocate -z -o 0 -l 4096 pre
touch -h -d @1650000000.5 tail-pre pre
touch -h -d @1650000001.25 .
"#;

/// Runs a generator script in the host directory `r` and in the mount `m`,
/// and asserts they hold the same tree.
fn script_both(r: &Path, m: &Path, body: &str, what: &str) {
    script(r, body);
    script(m, body);
    same_tree(r, m, what);
}

/// Runs a generator script (after [`PRELUDE`]) in `dir`.
fn script(dir: &Path, body: &str) {
    sh(dir, &format!("{PRELUDE}{body}"));
}

fn run_ok(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> String {
    succeeded(&run_in(dir, args, env), &format!("lsvfs {args:?}"))
}

/// The real key server on 127.0.0.1, for the generator of the sealed store.
struct KeyServer {
    dir: tempfile::TempDir,
    child: Child,
    url: String,
}

impl KeyServer {
    fn bin() -> PathBuf {
        let ks = Path::new(env!("CARGO_BIN_EXE_lsvfs")).with_file_name("lsvfs-keyserver");
        assert!(
            ks.exists(),
            "{} is missing: run `cargo build -p lsvfs-keyserver` first",
            ks.display()
        );
        ks
    }

    fn admin(&self, args: &[&str]) -> String {
        let o = Command::new(KeyServer::bin())
            .args(["admin", "--socket", "admin.sock"])
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        succeeded(&o, &format!("admin {args:?}"))
    }

    fn start() -> KeyServer {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for args in [
            &[
                "gen-cert",
                "--cert",
                "cert.pem",
                "--key",
                "cert.key",
                "127.0.0.1",
            ][..],
            &["gen-master-key", "master-key"][..],
        ] {
            let o = Command::new(KeyServer::bin())
                .args(args)
                .current_dir(p)
                .output()
                .unwrap();
            succeeded(&o, &format!("{args:?}"));
        }
        fs::write(
            p.join("config.toml"),
            "listen = \"127.0.0.1:0\"\ntls_cert = \"cert.pem\"\ntls_key = \"cert.key\"\n\
             state_dir = \"state\"\nadmin_socket = \"admin.sock\"\nmaster_key = \"master-key\"\n",
        )
        .unwrap();
        let mut child = Command::new(KeyServer::bin())
            .args(["serve", "--config", "config.toml"])
            .current_dir(p)
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let mut url = String::new();
        while out.read_line(&mut line).unwrap() > 0 {
            if let Some(a) = line.trim().strip_prefix("lsvfs-keyserver: listening on ") {
                url = format!("https://{a}");
                break;
            }
            line.clear();
        }
        assert!(!url.is_empty(), "the key server did not start");
        std::thread::spawn(move || for _ in out.lines() {});
        KeyServer { dir, child, url }
    }
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the cleaner over up to 8 victim segments (the volume's own code, as
/// a mount runs it under space pressure), so that the image's live blocks
/// sit in few segments.
fn clean(vol: &Path, key: &Path) {
    let dev: Arc<dyn Device> = Arc::new(FileDevice::open(vol, true).unwrap());
    let h = volume::read_header(&*dev).unwrap();
    let m = lsvfs::keys::unlock(&h, &lsvfs::keys::read_key_file(key).unwrap()).unwrap();
    let opts = Options {
        background: false,
        ..Options::default()
    };
    let v = Volume::open(dev, &m, opts).unwrap();
    v.clean(8).unwrap();
    v.close().unwrap();
}

/// Where logical block `lba` is stored.
fn locate(vol: &Path, key: &Path, lba: u64) -> u64 {
    let dev: Arc<dyn Device> = Arc::new(FileDevice::open(vol, false).unwrap());
    let h = volume::read_header(&*dev).unwrap();
    let m = lsvfs::keys::unlock(&h, &lsvfs::keys::read_key_file(key).unwrap()).unwrap();
    let opts = Options {
        read_only: true,
        background: false,
        ..Options::default()
    };
    Volume::open(dev, &m, opts)
        .unwrap()
        .locate(Lba(lba))
        .unwrap()
        .unwrap()
}

/// Zeroes the segments that nothing references any more: free segments
/// that stay allocated as the volume's reserve keep their old records,
/// which would only make the image larger (free segments outside the
/// reserve are hole-punched, i.e. zero, anyway). A segment is zeroed only
/// if `lsvfs check` then says exactly what it said before; the log tail
/// (its transaction count is part of that output) is never touched.
fn zero_unreferenced_segments(dir: &Path) {
    let check = |name: &str| {
        let o = run_in(dir, &["check", name, "--key-file", "k"], &[]);
        assert!(o.status.success(), "{}", text(&o));
        text(&o).replace(name, "VOLUME")
    };
    let mut img = fs::read(dir.join("v.vol")).unwrap();
    fs::write(dir.join("try.vol"), &img).unwrap();
    let want = check("try.vol");
    let seg_blocks = u32::from_le_bytes(img[48..52].try_into().unwrap()) as usize;
    let seg_bytes = seg_blocks * BLOCK_SIZE;
    let data = 256 * BLOCK_SIZE;
    let mut zeroed = Vec::new();
    for s in 0..(img.len() - data) / seg_bytes {
        let r = data + s * seg_bytes..data + (s + 1) * seg_bytes;
        if img[r.clone()].iter().all(|b| *b == 0) {
            continue;
        }
        let mut t = img.clone();
        t[r].fill(0);
        fs::write(dir.join("try.vol"), &t).unwrap();
        let o = run_in(dir, &["check", "try.vol", "--key-file", "k"], &[]);
        if o.status.success() && text(&o).replace("try.vol", "VOLUME") == want {
            img = t;
            zeroed.push(s);
        }
    }
    fs::remove_file(dir.join("try.vol")).unwrap();
    fs::write(dir.join("v.vol"), &img).unwrap();
    eprintln!("zeroed unreferenced segments {zeroed:?}");
}

/// Asserts that the mount shows `want` (the listing of the same scripts
/// run on the host's file system) and prints it for the test's constants.
fn same_tree(reference: &Path, mounted: &Path, what: &str) {
    let want = listing(reference);
    assert_tree(mounted, &want, what);
    eprintln!("--- {what}\n{want}---");
}

/// Detaches whatever is mounted on the path when dropped, so a generator
/// that fails leaves no mount behind.
struct Detach(PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

/// In `p`: a key `k`, a 1 MiB volume `v.vol` in 16-block segments mounted
/// on `m`, and `ref`, the host directory the generator scripts also run in.
fn small_mounted_volume(p: &Path) -> Detach {
    fs::create_dir(p.join("ref")).unwrap();
    fs::create_dir(p.join("m")).unwrap();
    let detach = Detach(p.join("m"));
    run_ok(p, &["keygen", "k"], &[]);
    let args = ["create", "v.vol", "--size", "1M", "--segment-blocks", "16"];
    run_ok(p, &[&args[..], &["--key-file", "k"]].concat(), &[]);
    run_ok(p, &["mount", "v.vol", "m", "--key-file", "k"], &[]);
    detach
}

/// `v.vol` mounted on `m` in `p` by a foreground daemon, once it says so;
/// for a log tail that [`kill_mount`] then leaves behind.
fn mount_foreground(p: &Path) -> Child {
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_lsvfs"))
        .args(["mount", "v.vol", "m", "--key-file", "k", "--foreground"])
        .current_dir(p)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(daemon.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("lsvfs: mounted"), "{line}");
    daemon
}

/// Kills a [`mount_foreground`] daemon with SIGKILL (no checkpoint, no
/// flush) and detaches its dead mount.
fn kill_mount(mut daemon: Child, p: &Path) {
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    sh(p, "fusermount3 -uz m");
}

fn mounted(mountpoint: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let m = mountpoint.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(m))
}

#[test]
#[ignore = "run once to create the fs1 image, its key and the sealed store; never regenerate them"]
fn generate_fs1_image_and_sealed_store() {
    refuse_overwrite(&[FS1, FS1_KEY, SEALED1]);
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let store = p.join("store");
    let machine_id = p.join("machine-id");
    // The frozen host's machine-id: "lsvfs-frozen-img" in hex.
    fs::write(&machine_id, "6c737666732d66726f7a656e2d696d67\n").unwrap();
    let env: &[(&str, &Path)] = &[("LSVFS_MACHINE_ID_FILE", &machine_id)];
    let ks = KeyServer::start();
    let init = run_ok(
        p,
        &[
            "host",
            "init",
            "--keyserver",
            &ks.url,
            "--ca",
            ks.dir.path().join("cert.pem").to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
        ],
        env,
    );
    let host_id = init
        .lines()
        .find_map(|l| l.strip_prefix("host id: "))
        .unwrap()
        .trim()
        .to_string();
    ks.admin(&["enroll", "frozen-host", &host_id]);
    run_ok(p, &["keygen", "k"], env);
    let created = run_ok(
        p,
        &[
            "create",
            "v.vol",
            "--size",
            "1M",
            "--segment-blocks",
            "16",
            "--key-file",
            "k",
            "--keyserver",
            &ks.url,
            "--store",
            store.to_str().unwrap(),
        ],
        env,
    );
    eprintln!("key server {}\n{init}{created}", ks.url);
    drop(ks);

    fs::create_dir(p.join("ref")).unwrap();
    fs::create_dir(p.join("m")).unwrap();
    let _detach = Detach(p.join("m"));
    run_ok(p, &["mount", "v.vol", "m", "--key-file", "k"], env);
    for dir in [p.join("ref"), p.join("m")] {
        script(&dir, FS1_SCRIPT);
        drop(std::os::unix::net::UnixListener::bind(dir.join("socket")).unwrap());
        script(&dir, FS1_FINISH);
    }
    same_tree(&p.join("ref"), &p.join("m"), "fs1");
    run_ok(p, &["unmount", "m"], env);

    clean(&p.join("v.vol"), &p.join("k"));
    zero_unreferenced_segments(p);
    let img = fs::read(p.join("v.vol")).unwrap();

    // Where hello.txt's one block lives, for the damaged-block test.
    let all = p.join("all.bin");
    run_ok(
        p,
        &[
            "read-blocks",
            "v.vol",
            "--key-file",
            "k",
            "--length",
            "1048576",
            "--output",
            all.to_str().unwrap(),
        ],
        env,
    );
    let blocks = fs::read(&all).unwrap();
    let lba = blocks
        .chunks(BLOCK_SIZE)
        .position(|b| b.starts_with(b"hello, frozen world\n"))
        .unwrap() as u64;
    eprintln!(
        "hello.txt: logical block {lba}, stored at block {}",
        locate(&p.join("v.vol"), &p.join("k"), lba)
    );

    // The image as frozen must check clean and mount with the same tree.
    let check = run_ok(p, &["check", "v.vol", "--key-file", "k"], env);
    eprintln!("{check}");
    run_ok(p, &["mount", "v.vol", "m", "--key-file", "k"], env);
    same_tree(&p.join("ref"), &p.join("m"), "fs1 after cleaning");
    run_ok(p, &["unmount", "m"], env);
    run_ok(p, &["check", "v.vol", "--key-file", "k"], env);

    gzip_to(FS1, &img);
    fs::copy(p.join("k"), repo(FS1_KEY)).unwrap();
    fs::create_dir(repo(SEALED1)).unwrap();
    for f in ["host-secret", "sealed"] {
        fs::copy(store.join(f), repo(SEALED1).join(f)).unwrap();
    }
    fs::copy(&machine_id, repo(SEALED1).join("machine-id")).unwrap();
}

#[test]
#[ignore = "run once to create the snap2 image and its key; never regenerate them"]
fn generate_snap2_image() {
    refuse_overwrite(&[SNAP2, SNAP2_KEY]);
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let (r, m) = (p.join("ref"), p.join("m"));
    let _detach = small_mounted_volume(p);
    script_both(&r, &m, SNAP2_FIRST_SCRIPT, "snap2 first");
    let first = listing(&r);
    run_ok(p, &["snapshot", "create", "m", "first"], &[]);
    script_both(&r, &m, SNAP2_SECOND_SCRIPT, "snap2 second");
    run_ok(p, &["snapshot", "create", "m", "second"], &[]);
    fs::create_dir(m.join(".snapshots/scratch")).unwrap();
    run_ok(p, &["snapshot", "delete", "m", "scratch"], &[]);
    assert_tree(&m.join(".snapshots/first"), &first, "snapshot first");
    same_tree(&r, &m.join(".snapshots/second"), "snapshot second");
    run_ok(p, &["unmount", "m"], &[]);
    clean(&p.join("v.vol"), &p.join("k"));
    zero_unreferenced_segments(p);

    // The log tail: work made durable by fsync, then the mount is killed.
    let daemon = mount_foreground(p);
    assert!(mounted(&m));
    for dir in [&r, &m] {
        script(dir, SNAP2_TAIL_SCRIPT);
        fs::File::open(dir.join("tail.txt"))
            .unwrap()
            .sync_all()
            .unwrap();
    }
    let held = fs::File::open(m.join("new-name")).unwrap();
    fs::remove_file(m.join("new-name")).unwrap();
    fs::remove_file(r.join("new-name")).unwrap();
    for dir in [&r, &m] {
        script(dir, SNAP2_TAIL_TIMES);
    }
    fs::File::open(m.join("tail.txt"))
        .unwrap()
        .sync_all()
        .unwrap();
    kill_mount(daemon, p);
    drop(held);
    let img = fs::read(p.join("v.vol")).unwrap();

    let check = run_ok(p, &["check", "v.vol", "--key-file", "k"], &[]);
    eprintln!("{check}");
    assert!(
        count_before(&check, "transactions in the log") > 0,
        "{check}"
    );
    assert_eq!(count_before(&check, "orphans"), 1, "{check}");
    run_ok(p, &["mount", "v.vol", "m", "--key-file", "k"], &[]);
    same_tree(&r, &m, "snap2 live after recovery");
    assert_tree(&m.join(".snapshots/first"), &first, "first after recovery");
    run_ok(p, &["unmount", "m"], &[]);
    run_ok(p, &["check", "v.vol", "--key-file", "k"], &[]);

    gzip_to(SNAP2, &img);
    fs::copy(p.join("k"), repo(SNAP2_KEY)).unwrap();
}

#[test]
#[ignore = "writes tests/images/zero3.vol.gz once; never rerun"]
fn generate_zero3_image() {
    refuse_overwrite(&[ZERO3, ZERO3_KEY]);
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let (r, m) = (p.join("ref"), p.join("m"));
    let _detach = small_mounted_volume(p);
    script_both(&r, &m, ZERO3_FIRST_SCRIPT, "zero3 first");
    let first = listing(&r);
    run_ok(p, &["snapshot", "create", "m", "before-zero"], &[]);
    script_both(&r, &m, ZERO3_SECOND_SCRIPT, "zero3 second");
    assert_tree(&m.join(".snapshots/before-zero"), &first, "before-zero");
    run_ok(p, &["unmount", "m"], &[]);
    clean(&p.join("v.vol"), &p.join("k"));
    zero_unreferenced_segments(p);

    // The log tail: durable by fsync, then the mount is killed.
    let daemon = mount_foreground(p);
    for dir in [&r, &m] {
        script(dir, ZERO3_TAIL_SCRIPT);
        fs::File::open(dir.join("pre")).unwrap().sync_all().unwrap();
    }
    kill_mount(daemon, p);
    let img = fs::read(p.join("v.vol")).unwrap();
    let check = run_ok(p, &["check", "v.vol", "--key-file", "k"], &[]);
    eprintln!("{check}");
    assert!(
        count_before(&check, "transactions in the log") > 0,
        "{check}"
    );
    assert!(count_before(&check, "zeroed") > 0, "{check}");
    run_ok(p, &["mount", "v.vol", "m", "--key-file", "k"], &[]);
    same_tree(&r, &m, "zero3 live after recovery");
    eprintln!("live:\n{}\nbefore-zero:\n{first}", listing(&r));
    run_ok(p, &["unmount", "m"], &[]);
    gzip_to(ZERO3, &img);
    fs::copy(p.join("k"), repo(ZERO3_KEY)).unwrap();
}

// ---------------------------------------------------------------------------
// Reading the frozen images back, and refusing damaged copies of them.

/// [`FS1`]'s tree: [`FS1_SCRIPT`] (and the socket, and [`FS1_FINISH`]) run on
/// the host's file system by the generator.
const FS1_TREE: &str = r#". d 0755 0:0 n4 mtime:1600086400.001234567
big f 0644 0:0 n1 s2097252 data:len:2097252,sha256:b742796ba004721cc4048a6b45f35b6d6efcd204758b945c9940a39305618db3 mtime:1600172800.002469134 trusted.secret="root-only"
blockdev b 0660 0:0 n1 s0 dev7,0 mtime:1600259200.003703701
chardev c 0600 0:0 n1 s0 dev1,3 mtime:1600345600.004938268
dangling l 0777 0:0 n1 s19 ->"/nonexistent/target" mtime:1600432000.006172835
docs d 0755 0:0 n3 mtime:1600518400.007407402 user.dir="yes"
docs/deep d 0755 0:0 n4 mtime:1600604800.008641969 system.posix_acl_default=user::rwx,user:1000:rwx,group::r-x,mask::rwx,other::r-x
docs/deep/er d 2750 1000:1000 n3 mtime:1600691200.009876536
docs/deep/er/est d 0755 1000:100 n2 mtime:1600777600.011111103
docs/deep/inherited f 0664 0:0 n1 s0 data:"" mtime:1600864000.012345670 system.posix_acl_access=user::rw-,user:1000:rwx,group::r-x,mask::rw-,other::r--
docs/deep/subdir-inherits d 0775 0:0 n2 mtime:1600950400.013580237 system.posix_acl_access=user::rwx,user:1000:rwx,group::r-x,mask::rwx,other::r-x system.posix_acl_default=user::rwx,user:1000:rwx,group::r-x,mask::rwx,other::r-x
docs/hello-hardlink f 0644 0:0 n2 s20 data:len:20,sha256:17efea2cff0788510a2b5d3137b8b6f0caf3525fb9177cc3d1fe69b2402e9c58 mtime:1601382400.019753072 user.color="blue" user.empty=""
docs/notes.txt f 0664 0:0 n1 s3000 data:len:3000,sha256:c083884c61b146c427e6618be170a974aa90a0c341d4405ff34c215178708af9 mtime:1601123200.016049371 system.posix_acl_access=user::rw-,user:1000:rw-,group::r--,group:100:r--,mask::rw-,other::r-- user.big=len:1499,sha256:23f056e7bc8d569747563590d860d6ba597d261c589b3423ac7ed342c9cbd03e user.bin=len:3,sha256:2da45f2cd1f9c8e69a67abf7a6b26c282533d0a7686787a9533265418680d4d2
empty f 0644 0:0 n1 s0 data:"" mtime:1601209600.017283938
fifo p 0640 0:0 n1 s0 mtime:1601296000.018518505
hello.txt f 0644 0:0 n2 s20 same-as:docs/hello-hardlink data:len:20,sha256:17efea2cff0788510a2b5d3137b8b6f0caf3525fb9177cc3d1fe69b2402e9c58 mtime:1601382400.019753072 user.color="blue" user.empty=""
link-rel l 0777 0:0 n1 s9 ->"hello.txt" mtime:1601468800.020987639
long-link l 0777 0:0 n1 s1800 ->len:1800,sha256:baa5c2cd591bfa9f74cb9fd42331e1f8b6bf341726344fe5b744be1d136c28a1 mtime:1601555200.022222206
prealloc f 0644 0:0 n1 s4096 data:len:4096,sha256:ad7facb2586fc6e966c004d7d1d16b024f5805ff7cb47c7a85dabd8b48892ca7 mtime:1601641600.023456773
prealloc-past-eof f 0644 0:0 n1 s0 data:"" mtime:1601728000.024691340
socket s 0640 0:0 n1 s0 mtime:1601814400.025925907
sparse f 0644 0:0 n1 s102400 data:len:102400,sha256:9d300bcd8c730d431390f50df0ae70bde729fd63ec39a33c1c191a3f3765f443 mtime:1601900800.027160474
sticky d 1777 0:0 n2 mtime:1601987200.028395041
sticky/suid f 4755 0:0 n1 s0 data:"" mtime:1602073600.029629608
"#;

/// The volume id `lsvfs create` printed for [`FS1`].
const FS1_VOLUME_ID: &str = "18424739a1485e36adf726106f92e17f";

/// hello.txt's only block in [`FS1`]: its logical block and where that is
/// stored (the generator printed both; the image never changes).
const FS1_HELLO_LBA: u64 = 2;
const FS1_HELLO_PBA: u64 = 497;

/// What `check` says about the file system in [`FS1`]: 23 inodes (24 names,
/// two of them one file, and the root), 10 data blocks (hello, notes, two
/// in sparse, four in big, one each preallocated).
const FS1_FS_LINE: &str = "file system: 23 inodes, 23 directory entries, 10 data blocks, 0 orphans";

#[test]
fn fs1_checks_clean_and_mounts_with_every_inode_type() {
    let s = Scratch::new(FS1, FS1_KEY);
    let c = s.check();
    assert!(c.contains(FS1_FS_LINE), "{c}");
    assert!(c.contains("(0 transactions in the log"), "{c}");
    let info = s.ok(&["info", "v.vol", "--key-file", "k"]);
    for want in [
        &format!("volume id:       {FS1_VOLUME_ID}")[..],
        "format version:  1",
        "logical size:    1.0 MiB (256 blocks)",
        "segment size:    64.0 KiB (16 blocks)",
        "key slot 0:      KeyFile",
        "snapshots:       0",
    ] {
        assert!(info.contains(want), "{want:?} missing from {info}");
    }
    s.mount();
    assert_tree(&s.m(), FS1_TREE, "fs1");
    // The old image takes new work.
    fs::write(s.m().join("new"), b"written by this build\n").unwrap();
    fs::remove_file(s.m().join("sparse")).unwrap();
    s.unmount();
    assert!(s.check().contains("0 orphans"));
    s.mount();
    assert_eq!(
        fs::read(s.m().join("new")).unwrap(),
        b"written by this build\n"
    );
    assert!(!s.m().join("sparse").exists());
    s.unmount();
}

#[test]
fn fs1_key_file_opens_it_and_other_keys_are_refused() {
    let s = Scratch::new(FS1, FS1_KEY);
    let key = fs::read_to_string(s.p().join("k")).unwrap();
    assert!(key.starts_with("lsvfs-key-v1 ") && key.len() == 13 + 64 + 1);
    s.ok(&["keygen", "other"]);
    s.fails(
        &["check", "v.vol", "--key-file", "other"],
        5,
        "no key slot of this volume belongs to this key",
    );
    // One hex digit changed: well formed, but not this volume's key.
    let digit = if key.as_bytes()[13] == b'0' { "1" } else { "0" };
    let altered = format!("lsvfs-key-v1 {digit}{}", &key[14..]);
    for (name, body, mode) in [
        ("altered", &altered[..], 0o600),
        ("readable", &key[..], 0o644),
        ("garbage", "hello\n", 0o600),
    ] {
        fs::write(s.p().join(name), body).unwrap();
        fs::set_permissions(s.p().join(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    s.fails(
        &["check", "v.vol", "--key-file", "altered"],
        5,
        "no key slot of this volume belongs to this key",
    );
    s.fails(
        &["check", "v.vol", "--key-file", "readable"],
        2,
        "chmod 600",
    );
    s.fails(
        &["check", "v.vol", "--key-file", "garbage"],
        2,
        "not an lsvfs key file",
    );
    s.fails(
        &["mount", "v.vol", "m", "--key-file", "other"],
        5,
        "no key slot of this volume belongs to this key",
    );
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The newest checkpoint (docs/FORMAT.md: blocks 2 and 3, seq at byte 32).
fn newest_checkpoint(img: &[u8]) -> &[u8] {
    let slot = |s: usize| &img[(2 + s) * BLOCK_SIZE..(3 + s) * BLOCK_SIZE];
    if u64_at(slot(0), 32) > u64_at(slot(1), 32) {
        slot(0)
    } else {
        slot(1)
    }
}

/// The block address of tree `id`'s root page in the newest checkpoint
/// (tree pointers at byte 128, 32 bytes each; the snapshot metadata's at
/// byte 304).
fn root_page(img: &[u8], id: usize) -> u64 {
    let cp = newest_checkpoint(img);
    let at = if id == 5 { 304 } else { 128 + 32 * id };
    let pba = u64_at(cp, at);
    assert_ne!(pba, 0, "tree {id} has a root page");
    pba
}

fn flipped(img: &[u8], at: usize) -> Vec<u8> {
    let mut v = img.to_vec();
    v[at] ^= 0x01;
    v
}

/// Sets a header copy's checksum (BLAKE3 of bytes 0..4080, first 16 bytes).
fn reseal_header(b: &mut [u8]) {
    let sum = blake3::hash(&b[..4080]);
    b[4080..4096].copy_from_slice(&sum.as_bytes()[..16]);
}

#[test]
fn fs1_damaged_headers_are_refused() {
    let s = Scratch::new(FS1, FS1_KEY);
    let good = s.image();
    let header = |img: &mut Vec<u8>, copy: usize, f: &dyn Fn(&mut [u8])| {
        f(&mut img[copy * BLOCK_SIZE..(copy + 1) * BLOCK_SIZE]);
    };

    // One copy lost: the other one serves.
    for copy in [0, 1] {
        let mut img = good.clone();
        header(&mut img, copy, &|b| b.fill(0));
        s.set_image(&img);
        assert!(s.check().contains(FS1_FS_LINE));
    }

    let both = |f: &dyn Fn(&mut [u8])| {
        let mut img = good.clone();
        header(&mut img, 0, f);
        header(&mut img, 1, f);
        img
    };
    s.set_image(&both(&|b| b.fill(0)));
    s.check_fails(3, "is not an lsvfs volume");
    s.set_image(&both(&|b| b[8] = 3));
    s.check_fails(3, "unsupported volume format: want=2 have=3");
    s.fails(
        &["mount", "v.vol", "m", "--key-file", "k"],
        3,
        "want=2 have=3",
    );
    s.set_image(&both(&|b| b[100] ^= 1));
    s.check_fails(4, "both header copies are damaged");
    // A header with another geometry and a correct checksum: the
    // authenticated checkpoint's geometry digest gives it away.
    s.set_image(&both(&|b| {
        b[40..48].copy_from_slice(&512u64.to_le_bytes());
        reseal_header(b);
    }));
    s.check_fails(4, "geometry");
}

#[test]
fn fs1_damaged_checkpoints_pages_and_blocks_are_refused() {
    let s = Scratch::new(FS1, FS1_KEY);
    let good = s.image();
    // The block holds hello.txt's contents (read through the volume).
    s.ok(&[
        "read-blocks",
        "v.vol",
        "--key-file",
        "k",
        "--offset",
        &(FS1_HELLO_LBA * BLOCK_SIZE as u64).to_string(),
        "--length",
        "4096",
        "--output",
        "hello.blk",
    ]);
    let blk = fs::read(s.p().join("hello.blk")).unwrap();
    assert!(blk.starts_with(b"hello, frozen world\n") && blk[20..].iter().all(|b| *b == 0));

    let mut img = good.clone();
    img[2 * BLOCK_SIZE + 200] ^= 1;
    img[3 * BLOCK_SIZE + 200] ^= 1;
    s.set_image(&img);
    s.check_fails(
        4,
        "no valid checkpoint (slot 0: MAC mismatch; slot 1: MAC mismatch)",
    );

    for (id, name) in [
        (0, "Map tree page"),
        (1, "Allocated tree page"),
        (2, "Changed tree page"),
        (4, "SegmentUsage tree page"),
    ] {
        let at = root_page(&good, id) as usize * BLOCK_SIZE + 1000;
        s.set_image(&flipped(&good, at));
        s.check_fails(4, &format!("integrity check failed for {name}"));
    }

    // One bit of one data block: check names it; through the mount that file
    // reads as EIO and every other file still reads.
    s.set_image(&flipped(&good, FS1_HELLO_PBA as usize * BLOCK_SIZE + 7));
    s.check_fails(
        4,
        &format!(
            "logical block {FS1_HELLO_LBA} (stored at block {FS1_HELLO_PBA}) fails authentication"
        ),
    );
    s.mount();
    let e = fs::read(s.m().join("hello.txt")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(
        sha256(&fs::read(s.m().join("docs/notes.txt")).unwrap()),
        "c083884c61b146c427e6618be170a974aa90a0c341d4405ff34c215178708af9"
    );
    s.unmount();

    // Truncated backing files.
    s.set_image(&good[..100]);
    s.check_fails(3, "is not an lsvfs volume");
    s.set_image(&good[..256 * BLOCK_SIZE]);
    s.check_fails(4, "backing store is truncated");
    s.set_image(&good[..FS1_HELLO_PBA as usize * BLOCK_SIZE]);
    s.check_fails(4, "fails authentication");
}

/// The superblock (logical block 0) of the volume in `s`, read through the
/// volume.
fn superblock(s: &Scratch) -> Vec<u8> {
    s.ok(&[
        "read-blocks",
        "v.vol",
        "--key-file",
        "k",
        "--length",
        "4096",
        "--output",
        "sb.blk",
    ]);
    let sb = fs::read(s.p().join("sb.blk")).unwrap();
    assert_eq!(&sb[..8], b"LSVFSFS\0");
    assert_eq!(u32_at(&sb, 8), 1, "file-system format version");
    sb
}

fn write_block(s: &Scratch, lba: u64, b: &[u8]) {
    fs::write(s.p().join("in.blk"), b).unwrap();
    s.ok(&[
        "write-blocks",
        "v.vol",
        "--key-file",
        "k",
        "--offset",
        &(lba * BLOCK_SIZE as u64).to_string(),
        "--input",
        "in.blk",
    ]);
}

/// Damage only the file system can see: a well-sealed volume block (written
/// through `lsvfs write-blocks`) that is not a valid B+tree node.
#[test]
fn fs1_damaged_file_system_metadata_is_refused() {
    let s = Scratch::new(FS1, FS1_KEY);
    let root = u64_at(&superblock(&s), 16);
    let mut node = vec![0u8; BLOCK_SIZE];
    node[..2].copy_from_slice(b"BT");
    node[4..6].copy_from_slice(&60000u16.to_le_bytes());
    write_block(&s, root, &node);
    let what = format!("metadata node at block {root}");
    s.check_fails(4, &what);
    s.fails(&["mount", "v.vol", "m", "--key-file", "k"], 4, &what);
}

#[test]
fn fs1_future_file_system_version_is_refused_by_mount() {
    let s = Scratch::new(FS1, FS1_KEY);
    let mut sb = superblock(&s);
    sb[8..12].copy_from_slice(&3u32.to_le_bytes());
    write_block(&s, 0, &sb);
    s.fails(
        &["mount", "v.vol", "m", "--key-file", "k"],
        3,
        "want=2 have=3",
    );
}

/// `check` took a superblock of a newer file-system version for "no file
/// system on this volume … clean" and exited 0.
#[test]
fn fs1_future_file_system_version_is_refused_by_check() {
    let s = Scratch::new(FS1, FS1_KEY);
    let mut sb = superblock(&s);
    sb[8..12].copy_from_slice(&3u32.to_le_bytes());
    write_block(&s, 0, &sb);
    s.check_fails(3, "want=2 have=3");
}

/// [`SNAP2`]'s tree when `first` was taken.
const SNAP2_FIRST: &str = r#". d 0755 0:0 n3 mtime:1600086400.001234567
data.bin f 0644 0:0 n1 s6000 data:len:6000,sha256:7366656e0e1ac04dfd69ec75e70f498bac26f82d146d6fb13fa27f1da540483a mtime:1600172800.002469134 user.phase="one"
dir d 0755 0:0 n3 mtime:1600259200.003703701
dir/kept.txt f 0644 0:0 n1 s23 data:len:23,sha256:ffc0217f8742c90d579eead15dbbca1c53f1ed7b70b150ebb29eb559d71e5832 mtime:1600345600.004938268
dir/sub d 0755 0:0 n2 mtime:1600432000.006172835
dir/sub/gone.txt f 0644 0:0 n1 s33 data:len:33,sha256:90c69ddd0386dbb220eb51973a10b153fae3382023ff2a9973a306f687a2763d mtime:1600518400.007407402
kept-link l 0777 0:0 n1 s12 ->"dir/kept.txt" mtime:1600604800.008641969
old-name f 0644 0:0 n1 s33 data:len:33,sha256:c2c311c7e6588e9365c1308634690fa55c0fca726fee5a636bbf4fb543a91ff9 mtime:1600691200.009876536
"#;

/// [`SNAP2`]'s tree when `second` was taken; also the live tree as the last
/// checkpoint has it (without the log tail).
const SNAP2_SECOND: &str = r#". d 0755 0:0 n3 mtime:1610086400.001234567
data.bin f 0644 0:0 n1 s8192 data:len:8192,sha256:d4651b14af935eb7cd80a12838a86385eed65aead6b2bdc47a76933d7b3ac58b mtime:1610172800.002469134 user.phase="two"
dir d 0755 0:0 n3 mtime:1610259200.003703701
dir/added.txt f 0644 0:0 n1 s33 data:len:33,sha256:3602e350b5cc2b8ee851aadca345d04a6a5a237c000cf6e4d30d33d6f522686c mtime:1610345600.004938268
dir/kept.txt f 0644 0:0 n1 s23 data:len:23,sha256:ffc0217f8742c90d579eead15dbbca1c53f1ed7b70b150ebb29eb559d71e5832 mtime:1610432000.006172835
dir/sub d 0755 0:0 n2 mtime:1610518400.007407402
kept-link l 0777 0:0 n1 s12 ->"dir/kept.txt" mtime:1610604800.008641969
new-name f 0644 0:0 n1 s33 data:len:33,sha256:c2c311c7e6588e9365c1308634690fa55c0fca726fee5a636bbf4fb543a91ff9 mtime:1610691200.009876536
"#;

/// [`SNAP2`]'s live tree once its log tail is replayed.
const SNAP2_LIVE: &str = r#". d 0755 0:0 n3 mtime:1620000001.250000000
data.bin f 0644 0:0 n1 s8192 data:len:8192,sha256:d4651b14af935eb7cd80a12838a86385eed65aead6b2bdc47a76933d7b3ac58b mtime:1610172800.002469134 user.phase="two"
dir d 0755 0:0 n3 mtime:1610259200.003703701
dir/added.txt f 0644 0:0 n1 s33 data:len:33,sha256:3602e350b5cc2b8ee851aadca345d04a6a5a237c000cf6e4d30d33d6f522686c mtime:1610345600.004938268
dir/kept.txt f 0644 0:0 n1 s23 data:len:23,sha256:ffc0217f8742c90d579eead15dbbca1c53f1ed7b70b150ebb29eb559d71e5832 mtime:1610432000.006172835
dir/sub d 0755 0:0 n2 mtime:1610518400.007407402
kept-link l 0777 0:0 n1 s12 ->"dir/kept.txt" mtime:1610604800.008641969
tail.txt f 0644 0:0 n1 s32 data:len:32,sha256:df5d2dc2ff8762715cf9e01343423a7ee3b2e5d64ac8d05c3e93dcc2912114d9 mtime:1620000000.500000000
"#;

#[test]
fn snap2_recovers_its_log_tail_and_shows_its_snapshots() {
    let s = Scratch::new(SNAP2, SNAP2_KEY);
    let c = s.check();
    assert!(count_before(&c, "transactions in the log") > 0, "{c}");
    // Live: 8 names and the open-and-unlinked new-name; 6 data blocks
    // (data.bin 2, added, kept, tail, new-name).
    assert!(
        c.contains("file system: 9 inodes, 7 directory entries, 6 data blocks, 1 orphans"),
        "{c}"
    );
    assert!(
        c.contains("snapshot first: 8 inodes, 7 directory entries, 5 data blocks"),
        "{c}"
    );
    // (Its inode count includes gone.txt if the kernel still held it.)
    let second = c
        .lines()
        .find(|l| l.starts_with("snapshot second: "))
        .unwrap_or_else(|| panic!("{c}"));
    assert!(
        second.ends_with(" inodes, 7 directory entries, 5 data blocks"),
        "{second}"
    );
    let info = s.ok(&["info", "v.vol", "--key-file", "k"]);
    assert!(info.contains("snapshots:       2 "), "{info}");

    s.mount();
    assert_tree(&s.m(), SNAP2_LIVE, "live");
    assert_tree(&s.m().join(".snapshots/first"), SNAP2_FIRST, "first");
    assert_tree(&s.m().join(".snapshots/second"), SNAP2_SECOND, "second");
    let list = s.ok(&["snapshot", "list", "m", "--json"]);
    let names: Vec<(String, u64)> = list
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["name"].as_str().unwrap().to_string(),
                v["id"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(names, [("first".to_string(), 1), ("second".to_string(), 2)]);
    let e = fs::write(s.m().join(".snapshots/first/x"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    // Snapshot ids are never reused: 3 was taken and deleted.
    let taken = s.ok(&["snapshot", "create", "m", "third"]);
    assert!(taken.contains("(id 4)"), "{taken}");
    assert_tree(&s.m().join(".snapshots/third"), SNAP2_LIVE, "third");
    s.unmount();

    let c = s.check();
    assert!(c.contains("(0 transactions in the log"), "{c}");
    // The orphan was freed at mount.
    assert!(
        c.contains("file system: 8 inodes, 7 directory entries, 5 data blocks, 0 orphans"),
        "{c}"
    );
    assert!(c.contains("snapshot third: "), "{c}");
    s.mount();
    assert_tree(
        &s.m().join(".snapshots/first"),
        SNAP2_FIRST,
        "first, remounted",
    );
    assert_tree(&s.m(), SNAP2_LIVE, "live, remounted");
    s.unmount();
}

#[test]
fn snap2_damaged_snapshot_metadata_is_refused() {
    let s = Scratch::new(SNAP2, SNAP2_KEY);
    let good = s.image();
    let at = root_page(&good, 5) as usize * BLOCK_SIZE + 1000;
    s.set_image(&flipped(&good, at));
    s.check_fails(4, "integrity check failed for SnapMeta tree page");
    s.fails(
        &["mount", "v.vol", "m", "--key-file", "k"],
        4,
        "SnapMeta tree page",
    );
}

/// A log tail that does not verify is a write the crash cut short: the log
/// ends before it, whole transactions are dropped, and that is no error.
#[test]
fn snap2_damaged_log_tail_is_dropped_whole() {
    let s = Scratch::new(SNAP2, SNAP2_KEY);
    let good = s.image();
    // The first record past the checkpoint: at the log head (segment at byte
    // 48, block offset at byte 56), or at offset 0 of the next segment
    // (byte 64) when it did not fit there.
    let cp = newest_checkpoint(&good);
    let seg_blocks = u32_at(&good, 48) as u64;
    let at_head = 256 + u64_at(cp, 48) * seg_blocks + u32_at(cp, 56) as u64;
    let summary = |pba: u64| &good[pba as usize * BLOCK_SIZE..][..BLOCK_SIZE];
    let first = if summary(at_head).starts_with(b"LSVFS\0LG") {
        at_head
    } else {
        256 + u64_at(cp, 64) * seg_blocks
    };
    assert!(summary(first).starts_with(b"LSVFS\0LG"));
    s.set_image(&flipped(&good, first as usize * BLOCK_SIZE + 4090));
    let c = s.check();
    assert!(c.contains("(0 transactions in the log"), "{c}");
    assert!(c.contains("0 orphans"), "{c}");
    s.mount();
    assert_tree(&s.m(), SNAP2_SECOND, "live without the tail");
    s.unmount();
}

/// The host id `lsvfs host init` printed, and the key server it was given.
const SEALED1_HOST_ID: &str = "c4e73be1986b7bd7b6bcf13189f2ba9c63f5bda1169e8de0d10eedab3048eeb1";
const SEALED1_KEY_SERVER: &str = "https://127.0.0.1:38033";

/// [`SEALED1`] copied to a private directory (git keeps neither the
/// directory's 0700 nor the files' 0600), beside [`FS1`].
fn sealed_store() -> (Scratch, PathBuf) {
    sealed_store_of(SEALED1)
}

/// The sealed store image `image`, copied as [`sealed_store`] does.
fn sealed_store_of(image: &str) -> (Scratch, PathBuf) {
    sealed_store_of_files(image, &["host-secret", "sealed", "machine-id"])
}

/// The files `files` of the sealed store image `image`, copied into a
/// private store directory beside [`FS1`].
fn sealed_store_of_files(image: &str, files: &[&str]) -> (Scratch, PathBuf) {
    let s = Scratch::new(FS1, FS1_KEY);
    let store = s.p().join("store");
    fs::create_dir(&store).unwrap();
    fs::set_permissions(&store, fs::Permissions::from_mode(0o700)).unwrap();
    for f in files {
        fs::copy(repo(image).join(f), store.join(f)).unwrap();
        fs::set_permissions(store.join(f), fs::Permissions::from_mode(0o600)).unwrap();
    }
    (s, store)
}

/// A sealed store of version 2: [`SEALED1`] after its host mounted and
/// unmounted [`FS1`] with the recovery key (`lsvfs mount v.vol m --key-file
/// k --store S` with `LSVFS_MACHINE_ID_FILE=S/machine-id`, then `lsvfs
/// unmount m`), which recorded FS1's newest checkpoint then and saved the
/// store as version 2.
const SEALED2: &str = "tests/images/sealed2";
/// The checkpoint the store recorded for FS1 (FS1 as committed is older).
const SEALED2_SEEN: u64 = 14;

/// The version 2 store opens, keeps its volume entry and holds its
/// rollback record; the committed FS1, older than the record, is refused
/// as a rollback (exit 12) before anything is written; `--allow-rollback`
/// mounts it and moves the record to it.
#[test]
fn sealed2_holds_a_rollback_record_that_refuses_the_older_fs1() {
    let (s, store) = sealed_store_of(SEALED2);
    let sealed = fs::read(store.join("sealed")).unwrap();
    assert_eq!(&sealed[..12], b"LSVFSSS\0\x02\0\0\0", "a version 2 file");
    let shown = succeeded(&with_store(&s, &store, &["host", "show"]), "host show");
    for want in [
        format!("host id:    {SEALED1_HOST_ID}"),
        format!("volume {FS1_VOLUME_ID}: KEK v1"),
        format!("volume {FS1_VOLUME_ID}: newest checkpoint seen {SEALED2_SEEN} (rollback record)"),
    ] {
        assert!(shown.contains(&want), "{want:?} missing from {shown}");
    }
    let before = s.image();
    failed(
        &with_store(&s, &store, &["mount", "v.vol", "m", "--key-file", "k"]),
        12,
        &format!("this host has seen checkpoint {SEALED2_SEEN}"),
        "mount of the older FS1",
    );
    assert!(s.image() == before, "the refused mount wrote to the volume");
    succeeded(
        &with_store(
            &s,
            &store,
            &["mount", "v.vol", "m", "--key-file", "k", "--allow-rollback"],
        ),
        "mount --allow-rollback",
    );
    let shown = succeeded(&with_store(&s, &store, &["host", "show"]), "host show");
    let seen: u64 = shown
        .lines()
        .find_map(|l| l.split("newest checkpoint seen ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no record in {shown}"));
    assert!(seen < SEALED2_SEEN, "the record moved back: {seen}");
    s.ok(&["unmount", "m"]);
    succeeded(
        &with_store(&s, &store, &["mount", "v.vol", "m", "--key-file", "k"]),
        "mount after the accepted rollback",
    );
    s.ok(&["unmount", "m"]);
}

fn with_store(s: &Scratch, store: &Path, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--store", store.to_str().unwrap()]);
    run_in(
        s.p(),
        &all,
        &[("LSVFS_MACHINE_ID_FILE", &store.join("machine-id"))],
    )
}

/// A sealed store of version 3 (several key servers, a threshold volume):
/// `lsvfs host init` with three `--keyserver`s (throwaway servers on
/// 127.0.0.1:39441..39443), `lsvfs create v.vol --size 64M` with all three
/// and `--threshold 2`; then the third server rotated its KEK and `lsvfs
/// rewrap v.vol` rewrapped that share only; then a mount and unmount with
/// the first server stopped, so only the second and third answered. The
/// volume itself is not kept: the store is what is frozen.
const SEALED3: &str = "tests/images/sealed3";
const SEALED3_HOST_ID: &str = "7a129f7c88dac9c7204ed7b243c6c9460471223dcdcc4dfa9c55c43ba9814173";
const SEALED3_VOLUME_ID: &str = "90dcb7e4bb4c7b4d24b7fd02680f089f";

#[test]
fn sealed3_holds_three_key_servers_and_a_two_of_three_volume() {
    let (s, store) = sealed_store_of(SEALED3);
    let sealed = fs::read(store.join("sealed")).unwrap();
    assert_eq!(&sealed[..12], b"LSVFSSS\0\x03\0\0\0", "a version 3 file");
    let shown = succeeded(&with_store(&s, &store, &["host", "show"]), "host show");
    let urls = [
        "https://127.0.0.1:39441",
        "https://127.0.0.1:39442",
        "https://127.0.0.1:39443",
    ];
    for want in [
        format!("host id:    {SEALED3_HOST_ID}"),
        format!("key server: {}", urls.join(", ")),
        format!(
            "volume {SEALED3_VOLUME_ID}: threshold 2 of 3: {} KEK v1, {} KEK v1, {} KEK v2",
            urls[0], urls[1], urls[2]
        ),
        format!("volume {SEALED3_VOLUME_ID}: newest checkpoint seen 7 (rollback record)"),
    ] {
        assert!(shown.contains(&want), "{want:?} missing from {shown}");
    }
    let machine = fs::read_to_string(store.join("machine-id")).unwrap();
    let mut m = sha2::Sha256::new();
    sha2::Digest::update(&mut m, b"lsvfs v1 host measurement\0");
    sha2::Digest::update(&mut m, machine.trim().as_bytes());
    let secret: [u8; 32] = fs::read(store.join("host-secret"))
        .unwrap()
        .try_into()
        .unwrap();
    let st = lsvfs::keys::SealedStore::unseal(
        &store,
        &sealed,
        &secret,
        &sha2::Digest::finalize(m).into(),
    )
    .unwrap();
    let e = &st.volumes[0];
    assert_eq!(
        (e.threshold, e.answered),
        (2, 0b110),
        "the last unlock: servers 2 and 3"
    );
    assert_eq!(
        e.shares
            .iter()
            .map(|s| (s.x, s.kek_version))
            .collect::<Vec<_>>(),
        [(1, 1), (2, 1), (3, 2)]
    );
}

/// A sealed store of version 4 on a TPM, with the TPM: `lsvfs host init
/// --tpm --tpm-pcrs 7` against a swtpm (its state `tpm2-00.permall` kept
/// beside the store), then a volume created with a key file and mounted
/// and unmounted once, which recorded its checkpoint and anchored the
/// store to the TPM's NV counter. The TPM-sealed host secret
/// (`host-secret.tpm`, version 1), the counter and the anchor are frozen.
const SEALED4_TPM: &str = "tests/images/sealed4-tpm";

#[test]
fn sealed4_tpm_opens_with_its_tpm_and_is_refused_by_another() {
    let (s, store) =
        sealed_store_of_files(SEALED4_TPM, &["host-secret.tpm", "sealed", "machine-id"]);
    let sealed = fs::read(store.join("sealed")).unwrap();
    assert_eq!(&sealed[..12], b"LSVFSSS\0\x04\0\0\0", "a version 4 file");
    let with_tpm = |tpm: &common::tpm::SoftTpm, args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--store", store.to_str().unwrap()]);
        run_in(
            s.p(),
            &all,
            &[
                ("LSVFS_MACHINE_ID_FILE", &store.join("machine-id")),
                ("LSVFS_TPM_TCTI", Path::new(&tpm.tcti)),
            ],
        )
    };
    let tpm = common::tpm::SoftTpm::start_from(Some(&repo(SEALED4_TPM)));
    let shown = succeeded(&with_tpm(&tpm, &["host", "show"]), "host show");
    for want in [
        "host id:    e5d15a0d19ce49ded1c7bcbb309896d45150395bd50420da7d68580517a059ee",
        "key server: https://127.0.0.1:39451",
        "sealed store: TPM 2.0 (host secret sealed to the TPM, bound to PCR 7; anchored by NV counter 0x018940d4)",
        "volume a5ae1012d923db612abf992119da1f13: newest checkpoint seen 7 (rollback record)",
    ] {
        assert!(shown.contains(want), "{want:?} missing from {shown}");
    }
    // Another TPM (fresh state): it does not load the sealed secret.
    let other = common::tpm::SoftTpm::start();
    failed(
        &with_tpm(&other, &["host", "show"]),
        11,
        "another TPM",
        "another TPM",
    );
}

#[test]
fn sealed1_opens_and_decodes_on_its_host() {
    let (s, store) = sealed_store();
    let shown = succeeded(&with_store(&s, &store, &["host", "show"]), "host show");
    for want in [
        format!("host id:    {SEALED1_HOST_ID}"),
        format!("key server: {SEALED1_KEY_SERVER}"),
        format!("volume {FS1_VOLUME_ID}: KEK v1"),
    ] {
        assert!(shown.contains(&want), "{want:?} missing from {shown}");
    }
    let slots = succeeded(
        &with_store(&s, &store, &["keyslot", "list", "v.vol"]),
        "keyslot list",
    );
    assert!(
        slots.contains(&format!(
            "sealed on this host: KEK v1 from {SEALED1_KEY_SERVER}"
        )),
        "{slots}"
    );
    // Without a key file the store opens and holds this volume's key; what
    // is missing is the key server that releases the KEK.
    failed(
        &with_store(
            &s,
            &store,
            &["check", "v.vol", "--attempts", "1", "--timeout", "2"],
        ),
        9,
        "key server",
        "check through the sealed store",
    );
}

#[test]
fn sealed1_is_refused_on_another_host_or_altered() {
    let shows = |what: &str, damage: &dyn Fn(&Path), needle: &str| {
        let (s, store) = sealed_store();
        damage(&store);
        failed(&with_store(&s, &store, &["host", "show"]), 11, needle, what);
    };
    let edit = |p: &Path, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = fs::read(p).unwrap();
        f(&mut b);
        fs::write(p, b).unwrap();
    };
    shows(
        "another machine-id",
        &|st| fs::write(st.join("machine-id"), "another-host\n").unwrap(),
        "sealed on another host",
    );
    shows(
        "a flipped ciphertext bit",
        &|st| {
            edit(&st.join("sealed"), &|b| {
                let n = b.len();
                b[n - 20] ^= 1;
            })
        },
        "does not open with this host's secret",
    );
    shows(
        "another host secret",
        &|st| edit(&st.join("host-secret"), &|b| b[0] ^= 1),
        "does not open with this host's secret",
    );
    shows(
        "a newer version",
        &|st| edit(&st.join("sealed"), &|b| b[8] = 5),
        "unsupported sealed store version: want=4 have=5",
    );
    shows(
        "a truncated file",
        &|st| edit(&st.join("sealed"), &|b| b.truncate(10)),
        "not an lsvfs sealed store",
    );
    shows(
        "a readable host secret",
        &|st| {
            fs::set_permissions(st.join("host-secret"), fs::Permissions::from_mode(0o644)).unwrap()
        },
        "chmod 600",
    );
    shows(
        "no sealed file",
        &|st| fs::remove_file(st.join("sealed")).unwrap(),
        "no sealed store in",
    );
}

/// [`ZERO3`]'s live tree once its log tail is replayed.
const ZERO3_LIVE: &str = r#". d 0755 0:0 n2 mtime:1650000001.250000000
data.bin f 0644 0:0 n1 s35000 data:len:35000,sha256:68b24b77ab172a14238a1ac2defc42642dbd2532b9c4971888bdb1ec5e57ce0c mtime:1640172800.002469134
pre f 0644 0:0 n1 s40960 data:len:40960,sha256:b0a09e03c98a7b12572ae2550adbc475b19c4ac96accad16e1c653bed892d925 mtime:1650000000.500000000
tail-pre f 0644 0:0 n1 s16384 data:len:16384,sha256:4fe7b59af6de3b665b67788cc2f99892ab827efae3a467342b3bb4e3bc8e5bfe mtime:1650000000.500000000
"#;

/// [`ZERO3`]'s tree when `before-zero` was taken.
const ZERO3_BEFORE: &str = r#". d 0755 0:0 n2 mtime:1630086400.001234567
data.bin f 0644 0:0 n1 s30000 data:len:30000,sha256:1f0ce4afe0f51ebd16b365dd44705675786732dda663c418d08545dcc2880f32 mtime:1630172800.002469134
pre f 0644 0:0 n1 s40960 data:len:40960,sha256:b0a09e03c98a7b12572ae2550adbc475b19c4ac96accad16e1c653bed892d925 mtime:1630259200.003703701
"#;

#[test]
fn zero3_replays_zeroed_blocks_and_its_snapshot_keeps_what_they_replaced() {
    let s = Scratch::new(ZERO3, ZERO3_KEY);
    let c = s.check();
    assert!(count_before(&c, "transactions in the log") > 0, "{c}");
    // Zeroed: pre's 10 blocks and 2 past its end, tail-pre's 4, data.bin's
    // 3 zeroed whole and the 2 its last zero range grew it by.
    assert!(c.contains(" 19 zeroed "), "{c}");
    assert!(
        c.contains("file system: 4 inodes, 3 directory entries, 25 data blocks, 0 orphans"),
        "{c}"
    );
    assert!(
        c.contains("snapshot before-zero: 3 inodes, 2 directory entries, 20 data blocks"),
        "{c}"
    );
    s.mount();
    assert_tree(&s.m(), ZERO3_LIVE, "live");
    assert_tree(
        &s.m().join(".snapshots/before-zero"),
        ZERO3_BEFORE,
        "before-zero",
    );
    // Preallocated blocks count, inside and past the end of the file.
    let blocks = |name: &str| fs::metadata(s.m().join(name)).unwrap().blocks() / 8;
    assert_eq!((blocks("pre"), blocks("tail-pre")), (12, 4));
    // A zeroed block takes data like any other.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(s.m().join("tail-pre"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"into a zeroed block", 9000).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let back = fs::read(s.m().join("tail-pre")).unwrap();
    assert_eq!(&back[9000..9019], b"into a zeroed block");
    assert!(back[..9000].iter().all(|b| *b == 0));
    s.unmount();
    let c = s.check();
    assert!(c.contains(" 18 zeroed "), "{c}");
}
