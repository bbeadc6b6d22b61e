//! FUSE layer: serves an [`Fs`] through the kernel with fuser. It only
//! converts types and replies; every decision is the file system's. Errors
//! are logged with their context (operation, inode) and answered with
//! [`Error::errno`].

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::format::{file_type, Inode, Time};
use crate::fs::{Fs, SetAttr, RENAME_EXCHANGE, RENAME_NOREPLACE};
use crate::{Error, BLOCK_SIZE};

/// How long the kernel may cache attributes and names. Every change goes
/// through this mount, so the kernel's own invalidation keeps them right.
const TTL: Duration = Duration::from_secs(1);

/// Largest write the kernel sends in one request.
pub const MAX_WRITE: u32 = 1 << 20;

/// Every change to a file goes through this mount, so the kernel's page
/// cache stays valid across opens.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE;

pub struct FuseFs {
    fs: Arc<Fs>,
}

impl FuseFs {
    pub fn new(fs: Arc<Fs>) -> FuseFs {
        FuseFs { fs }
    }
}

fn errno(op: &str, ino: u64, e: &Error) -> Errno {
    let n = e.errno();
    if n == libc::EIO {
        eprintln!("lsvfs: {op} on inode {ino}: {e}");
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

/// Replies to an operation that returns nothing.
fn empty(op: &str, ino: u64, r: Result<(), Error>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(op, ino, &e)),
    }
}

/// Replies to an operation that creates or finds an inode.
fn entry(op: &str, parent: u64, r: Result<(u64, Inode), Error>, reply: ReplyEntry) {
    match r {
        Ok((ino, i)) => reply.entry(&TTL, &attr(ino, &i), Generation(0)),
        Err(e) => reply.error(errno(op, parent, &e)),
    }
}

impl FuseFs {
    /// Owner and mode of a new inode: the caller's uid; the parent's gid and
    /// setgid bit (for directories) when the parent is setgid, as ext4 does.
    /// (The umask is applied by the file system, which knows about default ACLs.)
    fn new_owner(&self, req: &Request, parent: u64, mode: u32) -> Result<(u32, u32, u32), Error> {
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
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<(u64, Inode), Error> {
        let (mode, uid, gid) = self.new_owner(req, parent, mode)?;
        self.fs
            .create_node(parent, name.as_bytes(), mode, umask, uid, gid, rdev)
    }
}

impl fuser::Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        // The kernel then owns POSIX ACL semantics: it checks ACLs, turns an
        // ACL equivalent to a mode into a chmod (as `cp -a` relies on), and
        // applies default ACLs to new inodes. We store the xattrs.
        let _ = config.add_capabilities(InitFlags::FUSE_POSIX_ACL);
        // Lookups and readdirs in one directory may run in parallel: the
        // file system serializes what it must.
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // Directory listings carry each entry's attributes (and the kernel
        // picks plain readdir when that would not pay off).
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        // The kernel's page cache absorbs writes and sends them in large
        // batches; fsync, close and memory pressure write them back.
        let _ = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE);
        // Clearing setuid/setgid and file capabilities on write, truncate
        // and chown is ours (`Op::kill_priv`); the kernel no longer asks
        // for security.capability before every write.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        entry(
            "lookup",
            parent.0,
            self.fs.lookup(parent.0, name.as_bytes()),
            reply,
        )
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(i) => reply.attr(&TTL, &attr(ino.0, &i)),
            Err(e) => reply.error(errno("getattr", ino.0, &e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(our_time),
            mtime: mtime.map(our_time),
        };
        match self.fs.setattr(ino.0, a) {
            Ok(i) => reply.attr(&TTL, &attr(ino.0, &i)),
            Err(e) => reply.error(errno("setattr", ino.0, &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno("readlink", ino.0, &e)),
        }
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
        entry(
            "mknod",
            parent.0,
            self.make(req, parent.0, name, mode, umask, rdev),
            reply,
        )
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
        entry(
            "mkdir",
            parent.0,
            self.make(
                req,
                parent.0,
                name,
                libc::S_IFDIR | (mode & 0o7777),
                umask,
                0,
            ),
            reply,
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            "unlink",
            parent.0,
            self.fs.unlink(parent.0, name.as_bytes()),
            reply,
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            "rmdir",
            parent.0,
            self.fs.rmdir(parent.0, name.as_bytes()),
            reply,
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self
            .new_owner(req, parent.0, libc::S_IFLNK | 0o777)
            .and_then(|(_, uid, gid)| {
                self.fs.symlink(
                    parent.0,
                    link_name.as_bytes(),
                    target.as_os_str().as_bytes(),
                    uid,
                    gid,
                )
            });
        match r {
            Ok((ino, i)) => reply.entry(&TTL, &attr(ino, &i), Generation(0)),
            Err(e) => reply.error(errno("symlink", parent.0, &e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
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
        empty(
            "rename",
            parent.0,
            self.fs.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                f,
            ),
            reply,
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.fs.link(ino.0, newparent.0, newname.as_bytes()) {
            Ok(i) => reply.entry(&TTL, &attr(ino.0, &i), Generation(0)),
            Err(e) => reply.error(errno("link", ino.0, &e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.fs.open(ino.0);
        reply.opened(FileHandle(0), OPEN_FLAGS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read_data(ino.0, offset, size as usize) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno("read", ino.0, &e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.fs.write_data(ino.0, offset, data, kill) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno("write", ino.0, &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        empty("release", ino.0, self.fs.release(ino.0), reply)
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty("fsync", ino.0, self.fs.sync(), reply)
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        // About 25 entries with attributes fit the kernel's one-page buffer.
        match self.fs.readdir_plus(ino.0, offset, 48) {
            Ok(entries) => {
                for (e, i) in entries {
                    if reply.add(
                        INodeNo(e.ino),
                        e.cookie,
                        OsStr::from_bytes(&e.name),
                        &TTL,
                        &attr(e.ino, &i),
                        Generation(0),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno("readdirplus", ino.0, &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.fs.readdir(ino.0, offset, 512) {
            Ok(entries) => {
                for e in entries {
                    if reply.add(
                        INodeNo(e.ino),
                        e.cookie,
                        kind(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno("readdir", ino.0, &e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty("fsyncdir", ino.0, self.fs.sync(), reply)
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks,
                s.free_blocks,
                s.free_blocks,
                s.files + s.free_blocks,
                s.free_blocks,
                BLOCK_SIZE as u32,
                255,
                BLOCK_SIZE as u32,
            ),
            Err(e) => reply.error(errno("statfs", 1, &e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match self
            .fs
            .setxattr(ino.0, name.as_bytes(), value, flags as u32)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("setxattr", ino.0, &e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.fs.getxattr(ino.0, name.as_bytes()) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno("getxattr", ino.0, &e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(ino.0) {
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

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            "removexattr",
            ino.0,
            self.fs.removexattr(ino.0, name.as_bytes()),
            reply,
        )
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.make(req, parent.0, name, mode, umask, 0) {
            Ok((ino, i)) => {
                self.fs.open(ino);
                reply.created(
                    &TTL,
                    &attr(ino, &i),
                    Generation(0),
                    FileHandle(0),
                    OPEN_FLAGS,
                )
            }
            Err(e) => reply.error(errno("create", parent.0, &e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(
            "fallocate",
            ino.0,
            self.fs.fallocate(ino.0, offset, length, mode as u32),
            reply,
        )
    }
}
