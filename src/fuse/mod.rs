//! FUSE layer: serves an [`Fs`] through the kernel with fuser. It only
//! converts types and replies; every decision is the file system's. Errors
//! are logged with their context (operation, inode) and answered with
//! [`FsError::errno`].

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use reply::{
    AttrReply, CreateReply, DataReply, DirPlusReply, DirReply, EmptyReply, EntryReply, OpenReply,
    Statfs, StatfsReply, WriteReply, XattrReply,
};

use crate::fs::format::{file_type, Inode, Time};
use crate::fs::{
    Fs, FsError, Ino, Leftover, Posix, SetAttr, SnapshotId, Snapshots, RENAME_EXCHANGE,
    RENAME_NOREPLACE, ROOT_INO,
};
use crate::BLOCK_SIZE;

pub mod reply;
mod slow;
pub mod snapdir;
pub mod uring;
use snapdir::{is_reserved, node, snap_ino, Node, SNAPDIR_INO, SNAPDIR_NAME};

/// Entries under `.snapshots` are not cached: a snapshot deleted through
/// the control socket disappears at once.
const NO_TTL: Duration = Duration::ZERO;

/// Readdir cookie of `.snapshots` when the root lists it (after every
/// real entry). The kernel keeps directory positions as signed offsets.
const SNAPDIR_COOKIE: u64 = i64::MAX as u64;

/// How long the kernel may cache attributes and names. Every change goes
/// through this mount, so the kernel's own invalidation keeps them right.
const TTL: Duration = Duration::from_secs(1);

/// Largest write the kernel sends in one request.
pub const MAX_WRITE: u32 = 1 << 20;

/// Every change to a file goes through this mount, so the kernel's page
/// cache stays valid across opens.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE;

/// A listing entry's size before its name: struct fuse_direntplus
/// (fuse_entry_out, 128 bytes, then fuse_dirent's 24), and fuse_dirent.
/// Each entry is rounded up to 8 bytes.
const DIRENTPLUS_HEAD: usize = 152;
const DIRENT_HEAD: usize = 24;

/// At most this many entries per listing request, however large its
/// buffer: the metadata lock is held while they are looked up.
const MAX_LISTED: usize = 1024;

/// The mount's operations, each written once for every transport
/// (`reply`): fuser calls them through [`FuseFs`], the io_uring queues
/// (`uring`) directly.
pub(crate) struct Ops {
    fs: Arc<Fs>,
    /// fsync, fallocate, truncate and the freeing of deleted large files
    /// run here, off the request threads.
    slow: slow::SlowWork,
    snaps: Arc<Snapshots>,
    /// List `.snapshots` in the root directory.
    show_snapshots: bool,
    activity: Arc<Activity>,
    /// INIT negotiated FUSE over io_uring.
    uring: std::sync::atomic::AtomicBool,
}

/// Which way the kernel's requests come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// io_uring queues when the kernel offers them, else /dev/fuse.
    Auto,
    /// io_uring queues, or no mount.
    Uring,
    /// /dev/fuse only.
    Dev,
}

/// When the mount last served a request from a process (`--idle-lock`).
/// The kernel's own housekeeping (FORGET) and statfs (which `df` and
/// monitoring agents send to every mount) do not count as use.
pub struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last request.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// On every request: a load, and a store at most once a millisecond
    /// (concurrent requests may store out of order by a millisecond).
    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        if self.last.load(Ordering::Relaxed) != now {
            self.last.store(now, Ordering::Relaxed);
        }
    }

    /// How long since the last request (or since the mount, if none).
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

impl Ops {
    /// Frees what an operation left (see [`Leftover`]), then runs `done`:
    /// here when it fits in one transaction (a small file's), else on a
    /// slow-request thread once a large file's blocks are free, so that
    /// the request thread goes on serving everyone else.
    fn free_then(&self, left: Leftover, done: impl FnOnce() + Send + 'static) {
        let left = self.fs.free_small(left);
        if left.is_empty() {
            return done();
        }
        let fs = self.fs.clone();
        self.slow.run(move || {
            fs.free_leftover(left);
            done()
        });
    }

    /// The file system an inode belongs to, its number there, and the
    /// snapshot id (None for the live tree). `.snapshots` has none.
    fn target(&self, ino: u64) -> Result<(Arc<Fs>, Ino, Option<SnapshotId>), FsError> {
        match node(ino) {
            Node::Live(i) => Ok((self.fs.clone(), i, None)),
            Node::Snap(id, i) => Ok((self.snaps.view(id)?, i, Some(id))),
            Node::SnapDir => Err(Posix::IsDir.at(".snapshots")),
        }
    }

    /// The mount's number for inode `i` of `id` (or of the live tree).
    fn outer(id: Option<SnapshotId>, i: Ino) -> u64 {
        match id {
            None => i.0,
            Some(id) => snap_ino(id, i),
        }
    }

    fn snapdir_attr(&self) -> Result<FileAttr, FsError> {
        let root = self.fs.getattr(ROOT_INO)?;
        let n = self.snaps.names()?.len() as u32;
        let mut i = root;
        i.mode = libc::S_IFDIR | 0o555;
        i.nlink = 2 + n;
        i.size = 0;
        i.blocks = 0;
        Ok(attr(SNAPDIR_INO, &i))
    }

    /// Attributes of inode `i` in `id`, numbered for the mount.
    fn attr_in(&self, fs: &Fs, id: Option<SnapshotId>, i: Ino) -> Result<FileAttr, FsError> {
        Ok(attr(Self::outer(id, i), &fs.getattr(i)?))
    }
}

/// Refuses a change to anything under `.snapshots`.
fn writable(ino: u64) -> Result<Ino, Errno> {
    match node(ino) {
        Node::Live(i) => Ok(i),
        _ => Err(Errno::EROFS),
    }
}

/// Refuses to create `.snapshots` in the root (it exists, virtually).
fn new_name(parent: u64, name: &OsStr) -> Result<Ino, Errno> {
    let p = writable(parent)?;
    if is_reserved(p, name.as_bytes()) {
        return Err(Errno::EEXIST);
    }
    Ok(p)
}

/// Refuses to remove or replace `.snapshots`.
fn old_name(parent: u64, name: &OsStr) -> Result<Ino, Errno> {
    let p = writable(parent)?;
    if is_reserved(p, name.as_bytes()) {
        return Err(Errno::EROFS);
    }
    Ok(p)
}

fn errno(op: &str, ino: impl std::fmt::Display, e: &FsError) -> Errno {
    let n = e.errno();
    if n == libc::EIO {
        tracing::error!("{op} on inode {ino}: {e}");
    }
    Errno::from_i32(n)
}

fn system_time(t: Time) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::new(t.sec.unsigned_abs(), 0) + Duration::new(0, t.nsec)
    }
}

fn our_time(t: TimeOrNow) -> Time {
    let st = match t {
        TimeOrNow::Now => return Time::now(),
        TimeOrNow::SpecificTime(st) => st,
    };
    match st.duration_since(UNIX_EPOCH) {
        Ok(d) => Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (sec, nsec) = if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            };
            Time { sec, nsec }
        }
    }
}

fn kind(mode: u32) -> FileType {
    match file_type(mode) {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn attr(ino: u64, i: &Inode) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: i.size,
        blocks: i.blocks * (BLOCK_SIZE as u64 / 512),
        atime: system_time(i.atime),
        mtime: system_time(i.mtime),
        ctime: system_time(i.ctime),
        crtime: system_time(i.crtime),
        kind: kind(i.mode),
        perm: (i.mode & 0o7777) as u16,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: BLOCK_SIZE as u32,
        flags: 0,
    }
}

/// The entry that says a name is absent: node id 0, which the kernel
/// keeps as a negative dentry for the entry's TTL, so that probing the
/// same missing name again (a compiler's include path, a shell's PATH)
/// sends no LOOKUP. (An `open(O_CREAT|O_EXCL)`, as cp and tar make, looks
/// the name up again whatever is cached.) Only for the live tree: every
/// change to it comes through the kernel, which replaces or drops the
/// negative dentry itself when the name is made.
fn absent() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE as u32,
        flags: 0,
    }
}

/// Replies to an operation that returns nothing.
fn empty(op: &str, ino: impl std::fmt::Display, r: Result<(), FsError>, reply: impl EmptyReply) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(op, ino, &e)),
    }
}

/// Replies to an operation that may leave freeing to do, once it is done
/// ([`Ops::free_then`]): the caller gets its answer once the file
/// system's blocks are free, as before, but the request thread goes on
/// serving everyone else meanwhile (over io_uring, the only queue of the
/// caller's CPU, whose threads run at a raised priority).
fn empty_leaving(
    ops: &Ops,
    op: &'static str,
    ino: Ino,
    r: Result<Leftover, FsError>,
    reply: impl EmptyReply,
) {
    match r {
        Ok(left) => ops.free_then(left, move || reply.ok()),
        Err(e) => reply.error(errno(op, ino, &e)),
    }
}

/// Replies to an operation that creates or finds an inode.
fn entry(op: &str, parent: Ino, r: Result<(Ino, Inode), FsError>, reply: impl EntryReply) {
    match r {
        Ok((ino, i)) => reply.entry(&TTL, &attr(ino.0, &i), Generation(0)),
        Err(e) => reply.error(errno(op, parent, &e)),
    }
}

impl Ops {
    /// Owner and mode of a new inode: the caller's uid; the parent's gid and
    /// setgid bit (for directories) when the parent is setgid, as ext4 does.
    /// (The umask is applied by the file system, which knows about default ACLs.)
    fn new_owner(&self, req: &Caller, parent: Ino, mode: u32) -> Result<(u32, u32, u32), FsError> {
        let p = self.fs.getattr(parent)?;
        let mut mode = mode;
        let gid = if p.mode & libc::S_ISGID != 0 {
            if file_type(mode) == libc::S_IFDIR {
                mode |= libc::S_ISGID;
            }
            p.gid
        } else {
            req.gid()
        };
        Ok((mode, req.uid(), gid))
    }

    fn make(
        &self,
        req: &Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<(Ino, Inode), FsError> {
        let (mode, uid, gid) = self.new_owner(req, parent, mode)?;
        self.fs
            .create_node(parent, name.as_bytes(), mode, umask, uid, gid, rdev)
    }
}

/// Runs one request's handler. A handler that panics has answered EIO
/// already (a reply dropped unanswered answers EIO, over either
/// transport), and the thread serving it goes on serving. Without this,
/// one panic ended the whole mount over either transport: the next write
/// through it failed with ECONNABORTED, and dirty pages the kernel had not
/// yet written back were lost. A panic under the metadata lock poisons it
/// ([`crate::fs::Fs`]'s guard), so no later operation builds on what the
/// panicking one left half done.
pub(crate) fn guarded(f: impl FnOnce()) {
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        let why = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!("a FUSE request panicked ({why}); it was answered EIO");
    }
}

/// The name whose LOOKUP panics in a debug build when the daemon's
/// environment sets `LSVFS_TEST_PANIC` (for the test that a panicking
/// request is answered and the mount goes on).
#[cfg(debug_assertions)]
const TEST_PANIC_NAME: &str = "lsvfs-test-panic";

#[cfg(debug_assertions)]
fn panic_for_test(name: &[u8]) {
    if name == TEST_PANIC_NAME.as_bytes() && std::env::var_os("LSVFS_TEST_PANIC").is_some() {
        panic!("LSVFS_TEST_PANIC: a LOOKUP of {TEST_PANIC_NAME} panics, as the test asked");
    }
}

/// In a debug build whose environment sets `LSVFS_TEST_SLOW_WRITE` to a
/// number of milliseconds, each WRITE the io_uring transport hands to a
/// write lane (`uring::BULK_WRITE` bytes or more) waits that long first
/// (for the test that a slow write holds up no other request).
#[cfg(debug_assertions)]
fn slow_write_for_test(len: usize) {
    let ms = std::env::var("LSVFS_TEST_SLOW_WRITE").ok();
    if let Some(ms) = ms
        .and_then(|v| v.parse().ok())
        .filter(|_| len >= uring::BULK_WRITE)
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

// The operations take the request's fields as fuser decodes them, so
// that both transports call them alike.
#[allow(clippy::too_many_arguments)]
impl Ops {
    pub(crate) fn lookup(
        &self,
        _req: &Caller,
        parent: INodeNo,
        name: &OsStr,
        reply: impl EntryReply,
    ) {
        self.activity.touch();
        let name = name.as_bytes();
        #[cfg(debug_assertions)]
        panic_for_test(name);
        match node(parent.0) {
            Node::Live(p) if is_reserved(p, name) => match self.snapdir_attr() {
                Ok(a) => reply.entry(&TTL, &a, Generation(0)),
                Err(e) => reply.error(errno("lookup", parent.0, &e)),
            },
            Node::SnapDir => {
                let r = match name {
                    b"." => self.snapdir_attr(),
                    b".." => self.attr_in(&self.fs, None, ROOT_INO),
                    _ => self.snaps.id_of(name).and_then(|id| match id {
                        Some(id) => self.attr_in(&*self.snaps.view(id)?, Some(id), ROOT_INO),
                        None => Err(Posix::NotFound.at(String::from_utf8_lossy(name))),
                    }),
                };
                match r {
                    Ok(a) => reply.entry(&NO_TTL, &a, Generation(0)),
                    Err(e) => reply.error(errno("lookup", parent.0, &e)),
                }
            }
            _ => {
                let r = self.target(parent.0).and_then(|(fs, p, id)| {
                    if id.is_some() && p == ROOT_INO && name == b".." {
                        return self.snapdir_attr().map(|a| (a, id));
                    }
                    let (ino, i) = fs.lookup(p, name)?;
                    Ok((attr(Self::outer(id, ino), &i), id))
                });
                match r {
                    Ok((a, _)) => reply.entry(&TTL, &a, Generation(0)),
                    Err(e) if e.is(Posix::NotFound) && matches!(node(parent.0), Node::Live(_)) => {
                        reply.entry(&TTL, &absent(), Generation(0))
                    }
                    Err(e) => reply.error(errno("lookup", parent.0, &e)),
                }
            }
        }
    }

    // BATCH_FORGET comes here too, one inode at a time (fuser's default).
    pub(crate) fn forget(&self, _req: &Caller, ino: INodeNo, nlookup: u64) {
        self.forget_all([(ino.0, nlookup)].into_iter());
    }

    pub(crate) fn getattr(
        &self,
        _req: &Caller,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        reply: impl AttrReply,
    ) {
        self.activity.touch();
        let r = match node(ino.0) {
            Node::SnapDir => self.snapdir_attr().map(|a| (a, TTL)),
            Node::Snap(id, i) if i == ROOT_INO => self
                .snaps
                .view(id)
                .and_then(|fs| self.attr_in(&fs, Some(id), i))
                .map(|a| (a, NO_TTL)),
            _ => self
                .target(ino.0)
                .and_then(|(fs, i, id)| self.attr_in(&fs, id, i))
                .map(|a| (a, TTL)),
        };
        match r {
            Ok((a, ttl)) => reply.attr(&ttl, &a),
            Err(e) => reply.error(errno("getattr", ino.0, &e)),
        }
    }

    pub(crate) fn setattr(
        &self,
        _req: &Caller,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: impl AttrReply,
    ) {
        self.activity.touch();
        let i = match writable(ino.0) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(our_time),
            mtime: mtime.map(our_time),
            ctime: ctime.map(|t| our_time(TimeOrNow::SpecificTime(t))),
        };
        let set = move |fs: &Fs| match fs.setattr(i, a) {
            Ok(n) => reply.attr(&TTL, &attr(i.0, &n)),
            Err(e) => reply.error(errno("setattr", i, &e)),
        };
        if size.is_some() {
            // A truncate may free much; it goes in steps, off the request threads.
            let fs = self.fs.clone();
            self.slow.run(move || set(&fs));
        } else {
            set(&self.fs);
        }
    }

    pub(crate) fn readlink(&self, _req: &Caller, ino: INodeNo, reply: impl DataReply) {
        self.activity.touch();
        match self.target(ino.0).and_then(|(fs, i, _)| fs.readlink(i)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno("readlink", ino.0, &e)),
        }
    }

    pub(crate) fn mknod(
        &self,
        req: &Caller,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: impl EntryReply,
    ) {
        self.activity.touch();
        match new_name(parent.0, name) {
            Ok(p) => entry(
                "mknod",
                p,
                self.make(req, p, name, mode, umask, rdev),
                reply,
            ),
            Err(e) => reply.error(e),
        }
    }

    pub(crate) fn mkdir(
        &self,
        req: &Caller,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: impl EntryReply,
    ) {
        self.activity.touch();
        if node(parent.0) == Node::SnapDir {
            // `mkdir .snapshots/NAME` takes a snapshot, as ZFS's .zfs/snapshot.
            if req.uid() != 0 {
                return reply.error(Errno::EPERM);
            }
            let Some(name) = name.to_str().map(str::to_string) else {
                return reply.error(Errno::EINVAL);
            };
            // Off the request thread: the write-back that comes first needs
            // the request threads free.
            let snaps = self.snaps.clone();
            let spawned = std::thread::Builder::new()
                .name("lsvfs-snapshot".into())
                .spawn(move || {
                    let r = snaps.create(&name).and_then(|id| {
                        let fs = snaps.view(id)?;
                        Ok(attr(snap_ino(id, ROOT_INO), &fs.getattr(ROOT_INO)?))
                    });
                    match r {
                        Ok(a) => reply.entry(&NO_TTL, &a, Generation(0)),
                        Err(e) => {
                            tracing::error!("creating snapshot {name}: {e}");
                            reply.error(errno("mkdir", SNAPDIR_INO, &e))
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("starting a snapshot thread: {e}");
            }
            return;
        }
        match new_name(parent.0, name) {
            Ok(p) => entry(
                "mkdir",
                p,
                self.make(req, p, name, libc::S_IFDIR | (mode & 0o7777), umask, 0),
                reply,
            ),
            Err(e) => reply.error(e),
        }
    }

    pub(crate) fn unlink(
        &self,
        _req: &Caller,
        parent: INodeNo,
        name: &OsStr,
        reply: impl EmptyReply,
    ) {
        self.activity.touch();
        match old_name(parent.0, name) {
            Ok(p) => empty_leaving(
                self,
                "unlink",
                p,
                self.fs.unlink_leaving(p, name.as_bytes()),
                reply,
            ),
            Err(e) => reply.error(e),
        }
    }

    pub(crate) fn rmdir(
        &self,
        req: &Caller,
        parent: INodeNo,
        name: &OsStr,
        reply: impl EmptyReply,
    ) {
        self.activity.touch();
        if node(parent.0) == Node::SnapDir {
            // `rmdir .snapshots/NAME` deletes the snapshot.
            if req.uid() != 0 {
                return reply.error(Errno::EPERM);
            }
            let r = match name.to_str() {
                Some(n) => self.snaps.delete(n),
                None => Err(Posix::NotFound.at(name.to_string_lossy())),
            };
            return empty("rmdir", SNAPDIR_INO, r, reply);
        }
        match old_name(parent.0, name) {
            Ok(p) => empty("rmdir", p, self.fs.rmdir(p, name.as_bytes()), reply),
            Err(e) => reply.error(e),
        }
    }

    pub(crate) fn symlink(
        &self,
        req: &Caller,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: impl EntryReply,
    ) {
        self.activity.touch();
        let p = match new_name(parent.0, link_name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let r = self
            .new_owner(req, p, libc::S_IFLNK | 0o777)
            .and_then(|(_, uid, gid)| {
                self.fs.symlink(
                    p,
                    link_name.as_bytes(),
                    target.as_os_str().as_bytes(),
                    uid,
                    gid,
                )
            });
        match r {
            Ok((ino, i)) => reply.entry(&TTL, &attr(ino.0, &i), Generation(0)),
            Err(e) => reply.error(errno("symlink", p, &e)),
        }
    }

    pub(crate) fn rename(
        &self,
        _req: &Caller,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: impl EmptyReply,
    ) {
        self.activity.touch();
        let (p, np) = match (old_name(parent.0, name), old_name(newparent.0, newname)) {
            (Ok(p), Ok(np)) => (p, np),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let mut f = 0;
        if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            f |= RENAME_NOREPLACE;
        }
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            f |= RENAME_EXCHANGE;
        }
        empty_leaving(
            self,
            "rename",
            p,
            self.fs
                .rename_leaving(p, name.as_bytes(), np, newname.as_bytes(), f),
            reply,
        )
    }

    pub(crate) fn link(
        &self,
        _req: &Caller,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: impl EntryReply,
    ) {
        self.activity.touch();
        let (i, np) = match (writable(ino.0), new_name(newparent.0, newname)) {
            (Ok(i), Ok(np)) => (i, np),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        match self.fs.link(i, np, newname.as_bytes()) {
            Ok(n) => reply.entry(&TTL, &attr(i.0, &n), Generation(0)),
            Err(e) => reply.error(errno("link", i, &e)),
        }
    }

    pub(crate) fn open(
        &self,
        _req: &Caller,
        ino: INodeNo,
        flags: OpenFlags,
        reply: impl OpenReply,
    ) {
        self.activity.touch();
        match node(ino.0) {
            Node::Live(i) => {
                self.fs.open(i);
                reply.opened(FileHandle(0), OPEN_FLAGS);
            }
            _ => {
                let f = flags.0;
                if f & libc::O_ACCMODE != libc::O_RDONLY || f & libc::O_TRUNC != 0 {
                    return reply.error(Errno::EROFS);
                }
                match self.target(ino.0) {
                    Ok((fs, i, _)) => {
                        fs.open(i);
                        reply.opened(FileHandle(0), OPEN_FLAGS);
                    }
                    Err(e) => reply.error(errno("open", ino.0, &e)),
                }
            }
        }
    }

    pub(crate) fn read(
        &self,
        _req: &Caller,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: impl DataReply,
    ) {
        self.activity.touch();
        // Into a buffer kept across READs (a fresh one was zeroed, then
        // copied once more), or the ring's own.
        let size = size as usize;
        reply.fill(Fs::read_span(offset, size), |buf| {
            self.target(ino.0)
                .and_then(|(fs, i, _)| fs.read_data_into(i, offset, size, buf))
                .map_err(|e| errno("read", ino.0, &e))
        });
    }

    pub(crate) fn write(
        &self,
        _req: &Caller,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: impl WriteReply,
    ) {
        self.activity.touch();
        let i = match writable(ino.0) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        #[cfg(debug_assertions)]
        slow_write_for_test(data.len());
        match self.fs.write_data(i, offset, data, kill) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno("write", i, &e)),
        }
    }

    pub(crate) fn flush(
        &self,
        _req: &Caller,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: impl EmptyReply,
    ) {
        self.activity.touch();
        // Nothing to do at close: data is written back (and its errors
        // reported to close) by the kernel before it would send FLUSH, and
        // there are no POSIX locks to drop here. ENOSYS makes the kernel stop
        // sending FLUSH at all, one round trip less for every close.
        reply.error(Errno::ENOSYS);
    }

    pub(crate) fn release(
        &self,
        _req: &Caller,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: impl EmptyReply,
    ) {
        self.activity.touch();
        match node(ino.0) {
            Node::Live(i) => empty_leaving(self, "release", i, self.fs.release_leaving(i), reply),
            // A snapshot's files are never orphans; a deleted snapshot's
            // view is gone already.
            _ => {
                if let Ok((fs, i, _)) = self.target(ino.0) {
                    let _ = fs.release(i);
                }
                reply.ok()
            }
        }
    }

    pub(crate) fn fsync(
        &self,
        _req: &Caller,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: impl EmptyReply,
    ) {
        self.activity.touch();
        match node(ino.0) {
            Node::Live(_) => {
                let fs = self.fs.clone();
                self.slow
                    .run(move || empty("fsync", ino.0, fs.sync_shared(), reply));
            }
            _ => reply.ok(),
        }
    }

    pub(crate) fn readdirplus(
        &self,
        _req: &Caller,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: impl DirPlusReply,
    ) {
        self.activity.touch();
        match self.listing(ino.0, offset, true, reply.room()) {
            Ok(entries) => {
                let mut entries = entries.into_iter();
                for e in entries.by_ref() {
                    let Some(a) = e.attr else { continue };
                    // Snapshot roots are not cached (a delete shows at once).
                    let ttl = match node(e.ino) {
                        Node::Snap(_, ROOT_INO) => NO_TTL,
                        _ => TTL,
                    };
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(INodeNo(e.ino), e.cookie, name, &ttl, &a, Generation(0)) {
                        // Not sent: the kernel will not count this entry
                        // (nor the ones after it) as a lookup.
                        self.unsent(std::iter::once(e).chain(entries));
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno("readdirplus", ino.0, &e)),
        }
    }

    pub(crate) fn readdir(
        &self,
        _req: &Caller,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: impl DirReply,
    ) {
        self.activity.touch();
        match self.listing(ino.0, offset, false, reply.room()) {
            Ok(entries) => {
                for e in entries {
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(INodeNo(e.ino), e.cookie, e.kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno("readdir", ino.0, &e)),
        }
    }

    pub(crate) fn fsyncdir(
        &self,
        _req: &Caller,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: impl EmptyReply,
    ) {
        self.activity.touch();
        match node(ino.0) {
            Node::Live(_) => {
                let fs = self.fs.clone();
                self.slow
                    .run(move || empty("fsyncdir", ino.0, fs.sync_shared(), reply));
            }
            _ => reply.ok(),
        }
    }

    pub(crate) fn statfs(&self, _req: &Caller, _ino: INodeNo, reply: impl StatfsReply) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(&Statfs {
                blocks: s.blocks,
                bfree: s.free_blocks,
                bavail: s.free_blocks,
                files: s.files + s.free_blocks,
                ffree: s.free_blocks,
                bsize: BLOCK_SIZE as u32,
                namelen: 255,
                frsize: BLOCK_SIZE as u32,
            }),
            Err(e) => reply.error(errno("statfs", 1, &e)),
        }
    }

    pub(crate) fn setxattr(
        &self,
        _req: &Caller,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: impl EmptyReply,
    ) {
        self.activity.touch();
        let i = match writable(ino.0) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        match self.fs.setxattr(i, name.as_bytes(), value, flags as u32) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("setxattr", i, &e)),
        }
    }

    pub(crate) fn getxattr(
        &self,
        _req: &Caller,
        ino: INodeNo,
        name: &OsStr,
        size: u32,
        reply: impl XattrReply,
    ) {
        self.activity.touch();
        if node(ino.0) == Node::SnapDir {
            return reply.error(Errno::ENODATA);
        }
        let r = self
            .target(ino.0)
            .and_then(|(fs, i, _)| fs.getxattr(i, name.as_bytes()));
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno("getxattr", ino.0, &e)),
        }
    }

    pub(crate) fn listxattr(&self, _req: &Caller, ino: INodeNo, size: u32, reply: impl XattrReply) {
        self.activity.touch();
        let r = if node(ino.0) == Node::SnapDir {
            Ok(Vec::new())
        } else {
            self.target(ino.0).and_then(|(fs, i, _)| fs.listxattr(i))
        };
        match r {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                if size == 0 {
                    reply.size(buf.len() as u32)
                } else if buf.len() > size as usize {
                    reply.error(Errno::ERANGE)
                } else {
                    reply.data(&buf)
                }
            }
            Err(e) => reply.error(errno("listxattr", ino.0, &e)),
        }
    }

    pub(crate) fn removexattr(
        &self,
        _req: &Caller,
        ino: INodeNo,
        name: &OsStr,
        reply: impl EmptyReply,
    ) {
        self.activity.touch();
        match writable(ino.0) {
            Ok(i) => empty(
                "removexattr",
                i,
                self.fs.removexattr(i, name.as_bytes()),
                reply,
            ),
            Err(e) => reply.error(e),
        }
    }

    pub(crate) fn create(
        &self,
        req: &Caller,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: impl CreateReply,
    ) {
        self.activity.touch();
        let p = match new_name(parent.0, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        match self.make(req, p, name, mode, umask, 0) {
            Ok((ino, i)) => {
                self.fs.open(ino);
                reply.created(
                    &TTL,
                    &attr(ino.0, &i),
                    Generation(0),
                    FileHandle(0),
                    OPEN_FLAGS,
                )
            }
            Err(e) => reply.error(errno("create", p, &e)),
        }
    }

    pub(crate) fn fallocate(
        &self,
        _req: &Caller,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: impl EmptyReply,
    ) {
        self.activity.touch();
        match writable(ino.0) {
            Ok(i) => {
                let fs = self.fs.clone();
                self.slow.run(move || {
                    let r = fs.fallocate(i, offset, length, mode as u32);
                    empty("fallocate", i, r, reply)
                });
            }
            Err(e) => reply.error(e),
        }
    }
}

/// Who sent a request (the fields of its header the operations use).
pub(crate) struct Caller {
    uid: u32,
    gid: u32,
}

impl Caller {
    pub(crate) fn new(uid: u32, gid: u32) -> Caller {
        Caller { uid, gid }
    }
    fn of(req: &Request) -> Caller {
        Caller::new(req.uid(), req.gid())
    }
    fn uid(&self) -> u32 {
        self.uid
    }
    fn gid(&self) -> u32 {
        self.gid
    }
}

/// The file system as fuser serves it over /dev/fuse: every operation
/// goes to the shared [`Ops`], which the io_uring queues call too.
pub struct FuseFs {
    ops: Arc<Ops>,
    transport: Transport,
}

/// Starts the io_uring queues of a mount whose INIT negotiated them; kept
/// by the mount while fuser owns the [`FuseFs`].
pub struct RingStarter {
    ops: Arc<Ops>,
}

impl RingStarter {
    /// Did INIT negotiate FUSE over io_uring?
    pub fn negotiated(&self) -> bool {
        self.ops.uring.load(Ordering::Relaxed)
    }

    /// Serves the io_uring queues of the connection `dev` (a descriptor of
    /// the mount's /dev/fuse). `owner`: only this uid's requests are served
    /// (as fuser does for a mount without allow_other). The returned
    /// [`uring::Rings`], even with an error (some threads may serve), must
    /// be dropped only after the session ended.
    ///
    /// `abort` must end the connection (see [`uring::start`]).
    pub fn start(
        &self,
        dev: std::os::fd::OwnedFd,
        owner: Option<u32>,
        abort: Arc<dyn Fn() + Send + Sync>,
    ) -> (uring::Rings, std::io::Result<()>) {
        uring::start(dev, self.ops.clone(), owner, abort)
    }
}

impl FuseFs {
    /// Serves `fs`. From now on every inode it returns through an entry
    /// reply stays valid until the kernel forgets it.
    pub fn new(
        fs: Arc<Fs>,
        snaps: Arc<Snapshots>,
        show_snapshots: bool,
    ) -> Result<FuseFs, FsError> {
        fs.count_lookups()?;
        let ops = Ops {
            fs,
            slow: slow::SlowWork::new(),
            snaps,
            show_snapshots,
            activity: Arc::new(Activity::new()),
            uring: std::sync::atomic::AtomicBool::new(false),
        };
        Ok(FuseFs {
            ops: Arc::new(ops),
            transport: Transport::Dev,
        })
    }

    /// Asks INIT for FUSE over io_uring (`Auto`, `Uring`), or not (`Dev`).
    /// With `Uring`, a kernel that does not offer it fails the mount.
    pub fn with_transport(mut self, t: Transport) -> FuseFs {
        self.transport = t;
        self
    }

    /// What starts the io_uring queues once INIT is done.
    pub fn ring_starter(&self) -> RingStarter {
        RingStarter {
            ops: self.ops.clone(),
        }
    }

    /// When the mount was last used (shared; read it after the session
    /// took this FuseFs).
    pub fn activity(&self) -> Arc<Activity> {
        self.ops.activity.clone()
    }
}

impl fuser::Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        // The kernel then owns POSIX ACL semantics: it checks ACLs, turns an
        // ACL equivalent to a mode into a chmod (as `cp -a` relies on), and
        // applies default ACLs to new inodes. We store the xattrs.
        let _ = config.add_capabilities(InitFlags::FUSE_POSIX_ACL);
        // The umask is the file system's to apply (`Fs::create_node`): a
        // directory's default ACL replaces it, which the kernel, masking
        // first, would get wrong.
        let _ = config.add_capabilities(InitFlags::FUSE_DONT_MASK);
        // Lookups and readdirs in one directory may run in parallel: the
        // file system serializes what it must.
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // Directory listings carry each entry's attributes (and the kernel
        // picks plain readdir when that would not pay off).
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        // The kernel's page cache absorbs writes and sends them in large
        // batches; fsync, close and memory pressure write them back.
        if config
            .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
            .is_ok()
        {
            // Then the kernel owns mtime and ctime of writes and sends them
            // with setattr; writes reaching us must not overwrite them.
            self.ops.fs.set_kernel_times(true);
        }
        // Clearing setuid/setgid and file capabilities on write, truncate
        // and chown is ours (`Op::kill_priv`); the kernel no longer asks
        // for security.capability before every write.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        if self.transport != Transport::Dev {
            // Requests then come through per-CPU io_uring queues (`uring`),
            // once the mount has registered them.
            let offered = config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
            if !offered && self.transport == Transport::Uring {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "this kernel does not offer FUSE over io_uring (it needs Linux 6.14 or later \
                     and, as root, `echo 1 > /sys/module/fuse/parameters/enable_uring`); \
                     mount with --transport auto or dev",
                ));
            }
            self.ops.uring.store(offered, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guarded(|| self.ops.lookup(&Caller::of(req), parent, name, reply))
    }

    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        guarded(|| self.ops.forget(&Caller::of(req), ino, nlookup))
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        guarded(|| self.ops.getattr(&Caller::of(req), ino, fh, reply))
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        chgtime: Option<SystemTime>,
        bkuptime: Option<SystemTime>,
        flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        guarded(|| {
            self.ops.setattr(
                &Caller::of(req),
                ino,
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
                ctime,
                fh,
                crtime,
                chgtime,
                bkuptime,
                flags,
                reply,
            )
        })
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        guarded(|| self.ops.readlink(&Caller::of(req), ino, reply))
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        guarded(|| {
            self.ops
                .mknod(&Caller::of(req), parent, name, mode, umask, rdev, reply)
        })
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        guarded(|| {
            self.ops
                .mkdir(&Caller::of(req), parent, name, mode, umask, reply)
        })
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded(|| self.ops.unlink(&Caller::of(req), parent, name, reply))
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded(|| self.ops.rmdir(&Caller::of(req), parent, name, reply))
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        guarded(|| {
            self.ops
                .symlink(&Caller::of(req), parent, link_name, target, reply)
        })
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        guarded(|| {
            self.ops.rename(
                &Caller::of(req),
                parent,
                name,
                newparent,
                newname,
                flags,
                reply,
            )
        })
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        guarded(|| {
            self.ops
                .link(&Caller::of(req), ino, newparent, newname, reply)
        })
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guarded(|| self.ops.open(&Caller::of(req), ino, flags, reply))
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        guarded(|| {
            self.ops.read(
                &Caller::of(req),
                ino,
                fh,
                offset,
                size,
                flags,
                lock_owner,
                reply,
            )
        })
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        guarded(|| {
            self.ops.write(
                &Caller::of(req),
                ino,
                fh,
                offset,
                data,
                write_flags,
                flags,
                lock_owner,
                reply,
            )
        })
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        guarded(|| self.ops.flush(&Caller::of(req), ino, fh, lock_owner, reply))
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        flush: bool,
        reply: ReplyEmpty,
    ) {
        guarded(|| {
            self.ops
                .release(&Caller::of(req), ino, fh, flags, lock_owner, flush, reply)
        })
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded(|| self.ops.fsync(&Caller::of(req), ino, fh, datasync, reply))
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        guarded(|| {
            self.ops
                .readdirplus(&Caller::of(req), ino, fh, offset, reply)
        })
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        guarded(|| self.ops.readdir(&Caller::of(req), ino, fh, offset, reply))
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded(|| {
            self.ops
                .fsyncdir(&Caller::of(req), ino, fh, datasync, reply)
        })
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        guarded(|| self.ops.statfs(&Caller::of(req), ino, reply))
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        guarded(|| {
            self.ops
                .setxattr(&Caller::of(req), ino, name, value, flags, position, reply)
        })
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guarded(|| self.ops.getxattr(&Caller::of(req), ino, name, size, reply))
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guarded(|| self.ops.listxattr(&Caller::of(req), ino, size, reply))
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded(|| self.ops.removexattr(&Caller::of(req), ino, name, reply))
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        guarded(|| {
            self.ops
                .create(&Caller::of(req), parent, name, mode, umask, flags, reply)
        })
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        guarded(|| {
            self.ops
                .fallocate(&Caller::of(req), ino, fh, offset, length, mode, reply)
        })
    }
}

impl Ops {
    /// The kernel forgot (inode, lookups): orphans nothing holds any more
    /// are freed. Snapshot views are read-only: their inodes never are.
    fn forget_all(&self, forgets: impl Iterator<Item = (u64, u64)>) {
        let live: Vec<(Ino, u64)> = forgets
            .filter_map(|(ino, n)| match node(ino) {
                Node::Live(i) => Some((i, n)),
                _ => None,
            })
            .collect();
        match self.fs.forget_leaving(&live) {
            // No reply to wait for.
            Ok(left) => self.free_then(left, || {}),
            Err(e) => tracing::warn!("freeing forgotten inodes (retried at unmount): {e}"),
        }
    }

    /// Gives back the lookups the file system counted for listed entries
    /// that did not fit in a READDIRPLUS reply.
    fn unsent(&self, entries: impl Iterator<Item = Listed>) {
        self.forget_all(
            entries
                .filter(|e| e.name != b"." && e.name != b"..")
                .map(|e| (e.ino, 1)),
        );
    }
}

/// One directory entry as the mount lists it.
struct Listed {
    cookie: u64,
    name: Vec<u8>,
    /// The mount's inode number.
    ino: u64,
    kind: FileType,
    /// With `plus` (READDIRPLUS) only.
    attr: Option<FileAttr>,
}

impl Ops {
    /// Entries of directory `ino` after `offset`, numbered for the mount:
    /// a snapshot's ".." at its root is `.snapshots`, and the root lists
    /// `.snapshots` last when the mount shows it. Where the reply says
    /// how many bytes it has `room` for, as many entries as fit in it and
    /// no more are looked up (a READDIRPLUS entry takes 152 bytes and its
    /// name, a READDIR entry 24 and its name, each rounded up to 8);
    /// otherwise a fixed count (48 with attributes, 512 without), which
    /// the kernel's buffer (at least a page) takes or cuts short.
    fn listing(
        &self,
        ino: u64,
        offset: u64,
        plus: bool,
        room: Option<usize>,
    ) -> Result<Vec<Listed>, FsError> {
        if node(ino) == Node::SnapDir {
            return self.snapdir_listing(offset, plus);
        }
        let (fs, i, id) = self.target(ino)?;
        let mut out = Vec::new();
        if offset == SNAPDIR_COOKIE {
            return Ok(out);
        }
        let head = if plus { DIRENTPLUS_HEAD } else { DIRENT_HEAD };
        let limit = match room {
            // The shortest entry has a name of 1 byte.
            Some(room) => (room / (head + 8)).clamp(1, MAX_LISTED),
            None if plus => 48,
            None => 512,
        };
        let mut left = room.unwrap_or(usize::MAX);
        let mut full = false;
        let mut fits = |name: &[u8]| {
            let size = (head + name.len()).next_multiple_of(8);
            full = size > left;
            left = left.saturating_sub(size);
            !full
        };
        let entries: Vec<_> = if plus {
            fs.readdir_plus(i, offset, limit, &mut fits)?
                .into_iter()
                .map(|(e, n)| (e, Some(n)))
                .collect()
        } else {
            fs.readdir_fitting(i, offset, limit, &mut fits)?
                .into_iter()
                .map(|e| (e, None))
                .collect()
        };
        // Whether the directory's entries ended here.
        let short = !full && entries.len() < limit;
        let snapdir_attr = |plus: bool| plus.then(|| self.snapdir_attr()).transpose();
        for (e, n) in entries {
            let (ino, attr) = if id.is_some() && i == ROOT_INO && e.cookie == 2 {
                (SNAPDIR_INO, snapdir_attr(plus)?)
            } else {
                let o = Self::outer(id, e.ino);
                (o, n.map(|n| attr(o, &n)))
            };
            out.push(Listed {
                cookie: e.cookie,
                name: e.name,
                ino,
                kind: kind(e.kind),
                attr,
            });
        }
        if id.is_none() && i == ROOT_INO && self.show_snapshots && short {
            out.push(Listed {
                cookie: SNAPDIR_COOKIE,
                name: SNAPDIR_NAME.to_vec(),
                ino: SNAPDIR_INO,
                kind: FileType::Directory,
                attr: snapdir_attr(plus)?,
            });
        }
        Ok(out)
    }

    /// `.snapshots` entries after `offset`: ".", "..", then each snapshot
    /// (cookie id + 2).
    fn snapdir_listing(&self, offset: u64, plus: bool) -> Result<Vec<Listed>, FsError> {
        let dir = |cookie, name: &[u8], ino, attr| Listed {
            cookie,
            name: name.to_vec(),
            ino,
            kind: FileType::Directory,
            attr,
        };
        let mut out = Vec::new();
        if offset < 1 {
            let a = plus.then(|| self.snapdir_attr()).transpose()?;
            out.push(dir(1, b".", SNAPDIR_INO, a));
        }
        if offset < 2 {
            let a = plus
                .then(|| self.attr_in(&self.fs, None, ROOT_INO))
                .transpose()?;
            out.push(dir(2, b"..", ROOT_INO.0, a));
        }
        for (id, name) in self.snaps.names()? {
            if id.0 + 2 <= offset {
                continue;
            }
            let a = if plus {
                match self.snaps.view(id) {
                    Ok(fs) => Some(self.attr_in(&fs, Some(id), ROOT_INO)?),
                    // Deleted meanwhile.
                    Err(e) if e.is(Posix::NotFound) => continue,
                    Err(e) => return Err(e),
                }
            } else {
                None
            };
            out.push(dir(id.0 + 2, name.as_bytes(), snap_ino(id, ROOT_INO), a));
            if out.len() >= 64 {
                break;
            }
        }
        Ok(out)
    }
}
