//! The replies an operation can give, whichever transport carried its
//! request: fuser's reply types for /dev/fuse, and the ring's own
//! (`uring::Answer`) for FUSE over io_uring. Each operation in `Ops` is
//! written once, against these traits.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::ops::Range;
use std::time::Duration;

use fuser::{Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo};

/// What every reply can do: fail. Replies move to other threads with slow
/// work, and each must be answered exactly once (dropping one unanswered
/// answers EIO).
pub trait Reply: Send + 'static {
    fn error(self, e: Errno);
}

pub trait EmptyReply: Reply {
    fn ok(self);
}

pub trait EntryReply: Reply {
    fn entry(self, ttl: &Duration, attr: &FileAttr, generation: Generation);
}

pub trait AttrReply: Reply {
    fn attr(self, ttl: &Duration, attr: &FileAttr);
}

pub trait DataReply: Reply {
    fn data(self, data: &[u8]);

    /// Answers with bytes that `read` writes into a buffer of `len` bytes
    /// and names the range of. The ring reads straight into the buffer
    /// the kernel takes the answer from; this default reads into the
    /// thread's own buffer, kept across calls, and sends from it.
    fn fill(self, len: usize, read: impl FnOnce(&mut [u8]) -> Result<Range<usize>, Errno>)
    where
        Self: Sized,
    {
        fill_from_thread_buffer(self, len, read)
    }
}

/// [`DataReply::fill`] through the calling thread's buffer.
pub fn fill_from_thread_buffer(
    reply: impl DataReply,
    len: usize,
    read: impl FnOnce(&mut [u8]) -> Result<Range<usize>, Errno>,
) {
    thread_local! {
        static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        if buf.len() < len {
            buf.resize(len, 0);
        }
        match read(&mut buf[..len]) {
            Ok(r) if r.start <= r.end && r.end <= len => reply.data(&buf[r]),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    })
}

pub trait OpenReply: Reply {
    fn opened(self, fh: FileHandle, flags: FopenFlags);
}

pub trait WriteReply: Reply {
    fn written(self, size: u32);
}

pub trait XattrReply: Reply {
    /// The size a value or list would take (the caller asked with size 0).
    fn size(self, size: u32);
    fn data(self, data: &[u8]);
}

pub trait CreateReply: Reply {
    fn created(
        self,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
        fh: FileHandle,
        flags: FopenFlags,
    );
}

/// Numbers for statfs, in `fuse_kstatfs` order.
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

pub trait StatfsReply: Reply {
    fn statfs(self, s: &Statfs);
}

pub trait DirReply: Reply {
    /// Adds an entry; true when it did not fit (and was not added).
    fn add(&mut self, ino: INodeNo, offset: u64, kind: FileType, name: &OsStr) -> bool;
    /// Bytes the listing may still take, where the reply knows them (over
    /// io_uring, the request's size; fuser's replies do not say).
    fn room(&self) -> Option<usize>;
    fn ok(self);
}

pub trait DirPlusReply: Reply {
    /// Adds an entry with its attributes; true when it did not fit.
    fn add(
        &mut self,
        ino: INodeNo,
        offset: u64,
        name: &OsStr,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
    ) -> bool;
    /// As [`DirReply::room`].
    fn room(&self) -> Option<usize>;
    fn ok(self);
}

macro_rules! fuser_error {
    ($($t:ty),*) => {$(
        impl Reply for $t {
            fn error(self, e: Errno) {
                <$t>::error(self, e)
            }
        }
    )*};
}

fuser_error!(
    fuser::ReplyEmpty,
    fuser::ReplyEntry,
    fuser::ReplyAttr,
    fuser::ReplyData,
    fuser::ReplyOpen,
    fuser::ReplyWrite,
    fuser::ReplyXattr,
    fuser::ReplyCreate,
    fuser::ReplyStatfs,
    fuser::ReplyDirectory,
    fuser::ReplyDirectoryPlus
);

impl EmptyReply for fuser::ReplyEmpty {
    fn ok(self) {
        fuser::ReplyEmpty::ok(self)
    }
}

impl EntryReply for fuser::ReplyEntry {
    fn entry(self, ttl: &Duration, attr: &FileAttr, generation: Generation) {
        fuser::ReplyEntry::entry(self, ttl, attr, generation)
    }
}

impl AttrReply for fuser::ReplyAttr {
    fn attr(self, ttl: &Duration, attr: &FileAttr) {
        fuser::ReplyAttr::attr(self, ttl, attr)
    }
}

impl DataReply for fuser::ReplyData {
    fn data(self, data: &[u8]) {
        fuser::ReplyData::data(self, data)
    }
}

impl OpenReply for fuser::ReplyOpen {
    fn opened(self, fh: FileHandle, flags: FopenFlags) {
        fuser::ReplyOpen::opened(self, fh, flags)
    }
}

impl WriteReply for fuser::ReplyWrite {
    fn written(self, size: u32) {
        fuser::ReplyWrite::written(self, size)
    }
}

impl XattrReply for fuser::ReplyXattr {
    fn size(self, size: u32) {
        fuser::ReplyXattr::size(self, size)
    }
    fn data(self, data: &[u8]) {
        fuser::ReplyXattr::data(self, data)
    }
}

impl CreateReply for fuser::ReplyCreate {
    fn created(
        self,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
        fh: FileHandle,
        flags: FopenFlags,
    ) {
        fuser::ReplyCreate::created(self, ttl, attr, generation, fh, flags)
    }
}

impl StatfsReply for fuser::ReplyStatfs {
    fn statfs(self, s: &Statfs) {
        fuser::ReplyStatfs::statfs(
            self, s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
        )
    }
}

impl DirReply for fuser::ReplyDirectory {
    fn add(&mut self, ino: INodeNo, offset: u64, kind: FileType, name: &OsStr) -> bool {
        fuser::ReplyDirectory::add(self, ino, offset, kind, name)
    }
    fn room(&self) -> Option<usize> {
        None
    }
    fn ok(self) {
        fuser::ReplyDirectory::ok(self)
    }
}

impl DirPlusReply for fuser::ReplyDirectoryPlus {
    fn add(
        &mut self,
        ino: INodeNo,
        offset: u64,
        name: &OsStr,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
    ) -> bool {
        fuser::ReplyDirectoryPlus::add(self, ino, offset, name, ttl, attr, generation)
    }
    fn room(&self) -> Option<usize> {
        None
    }
    fn ok(self) {
        fuser::ReplyDirectoryPlus::ok(self)
    }
}
