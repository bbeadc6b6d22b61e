//! File data and attributes: read, write, truncate, fallocate, setattr,
//! xattrs, statfs. Each call is one volume transaction.
//!
//! A file's blocks are named by chunk items of 128 block addresses. An
//! overwrite of a block that exists writes the same logical block again,
//! which changes no metadata (the volume underneath is log-structured and
//! the transaction atomic); only holes get new blocks.

use super::acl;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use super::btree::MAX_VALUE;
use super::filesystem::{FileMap, Fs, MapChange, Op};
use super::format::{
    decode_chunk, file_type, key, key_suffix_u64, kind, kind_range, truncating_key,
    xattr_piece_key, xattr_pieces_range, Ino, Inode, Time, CHUNK_BLOCKS, FS_VERSION_PIECES,
};
use super::store::Runs;
use crate::fs::{FsError, Posix, Result};
use crate::volume::{Lba, Transaction};
use crate::BLOCK_SIZE;

const BS: u64 = BLOCK_SIZE as u64;

/// The blocks of one write gathered into runs of consecutive addresses,
/// one buffer and one transaction write each: the volume seals a run in
/// place, and a write that is one run goes into the log record without
/// another copy. (One 4 KiB buffer per block, each zeroed, then copied
/// again into the record as it grew: 14% of the daemon's samples in a
/// sequential write went to memmove.)
struct DataRuns {
    run: Option<(u64, Vec<u8>)>,
    /// Bytes of the blocks still to come: a new run makes room for them
    /// all, since the blocks of a write are usually consecutive.
    left: usize,
    /// Bytes more the first run makes room for: the metadata its
    /// transaction will carry (see `METADATA_ROOM`).
    room: usize,
}

/// Blocks of metadata a write's transaction usually carries after its
/// data (the file's map and inode nodes, the superblock): the first run
/// makes room for them too, so that the volume can gather the record
/// into it without moving it. (Without the room, the volume grew the
/// 1 MiB buffer of each large write, a copy of it: 5% of the daemon's
/// samples while it wrote back a large file.)
const METADATA_ROOM: usize = 16 * BLOCK_SIZE;

impl DataRuns {
    fn new(blocks: u64) -> Self {
        DataRuns {
            run: None,
            left: blocks as usize * BLOCK_SIZE,
            room: 0,
        }
    }

    /// For a transaction that will carry metadata after the data. (A
    /// small write's buffer is not worth the room: growing it copies
    /// little.)
    fn with_metadata(blocks: u64) -> Self {
        let runs = DataRuns::new(blocks);
        DataRuns {
            room: METADATA_ROOM.min(runs.left),
            ..runs
        }
    }

    /// The buffer of the run `lba` continues, or of a new one.
    fn run_for(&mut self, txn: &mut Transaction, lba: u64) -> &mut Vec<u8> {
        let continues = matches!(&self.run,
            Some((start, buf)) if *start + (buf.len() / BLOCK_SIZE) as u64 == lba);
        if !continues {
            self.finish(txn);
            // The first run becomes the record's buffer (see above).
            let room = std::mem::take(&mut self.room);
            self.run = Some((lba, Vec::with_capacity(self.left + room)));
        }
        self.left = self.left.saturating_sub(BLOCK_SIZE);
        &mut self.run.as_mut().expect("a run was just made").1
    }

    /// Block `lba` holds `block` (4 KiB).
    fn push(&mut self, txn: &mut Transaction, lba: u64, block: &[u8]) {
        debug_assert_eq!(block.len(), BLOCK_SIZE);
        self.run_for(txn, lba).extend_from_slice(block);
    }

    /// Block `lba` holds what `fill` writes into 4 KiB of zeros.
    fn push_with(
        &mut self,
        txn: &mut Transaction,
        lba: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let buf = self.run_for(txn, lba);
        let at = buf.len();
        buf.resize(at + BLOCK_SIZE, 0);
        fill(&mut buf[at..])
    }

    /// Hands the last run to `txn`. The first run keeps the room it made
    /// (the volume gathers the later runs into it); later ones give back
    /// what they did not use.
    fn finish(&mut self, txn: &mut Transaction) {
        if let Some((start, mut buf)) = self.run.take() {
            if !txn.is_empty() && buf.capacity() > 2 * buf.len() {
                buf.shrink_to_fit();
            }
            txn.write(Lba(start), buf);
        }
    }
}

/// Largest file size: 2^44 bytes (16 TiB).
pub const MAX_FILE_SIZE: u64 = 1 << 44;

/// A write of at most this many blocks (64 KiB), all of them new to the
/// file, may leave its data to the next commit (see
/// [`VolumeStore::defer_data`](super::store::VolumeStore::defer_data)).
/// Larger writes commit at once: they gain nothing from waiting.
const DEFER_DATA_BLOCKS: u64 = 16;

/// `fallocate` modes (as in fallocate(2)).
pub const FALLOC_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_PUNCH_HOLE: u32 = 0x02;
pub const FALLOC_ZERO_RANGE: u32 = 0x10;

/// Blocks that one `fallocate` transaction covers (4 MiB).
const FALLOC_STEP: u64 = 1024;

/// Blocks that one truncate transaction frees, at most (4 MiB).
const TRUNCATE_STEP: u64 = 1024;

/// Attribute changes for [`Fs::setattr`]; None leaves a field alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Time>,
    pub mtime: Option<Time>,
    /// Set by the kernel when it keeps file times itself (writeback cache).
    pub ctime: Option<Time>,
}

/// Numbers for statfs(2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsStats {
    pub blocks: u64,
    pub free_blocks: u64,
    pub files: u64,
}

/// The xattr holding file capabilities.
const SECURITY_CAPABILITY: &[u8] = b"security.capability";

/// `setxattr` flags.
pub const XATTR_CREATE: u32 = 1;
pub const XATTR_REPLACE: u32 = 2;
/// The most listxattr(2) can return: the names of a file's xattrs, each
/// with its NUL, take at most this many bytes together (the kernel's
/// XATTR_LIST_MAX). A name that would go past it is refused, so that every
/// file's xattrs can be listed (and copied by `cp -a`, `rsync -X`, `tar`).
pub const XATTR_LIST_MAX: usize = 65536;

/// An overwrite at least this large commits the changes waiting before
/// it, then goes without the metadata lock (see `overwrite_in_place`); a
/// smaller one takes the ordinary path, which commits them with its data.
const COMMIT_FIRST_BYTES: usize = 64 << 10;

/// The most blocks an append writes without the metadata lock (4 MiB):
/// the kernel sends at most 1 MiB per write.
const APPEND_MAX_BLOCKS: u64 = 1024;

/// The longest xattr value (the kernel's XATTR_SIZE_MAX; it refuses
/// longer ones itself). One over [`MAX_VALUE`] bytes is stored in pieces.
pub const XATTR_SIZE_MAX: usize = 65536;
/// The most one inode's xattr values take together. Deleting a file frees
/// its xattrs in one transaction, so this bounds that transaction: values
/// in about 5,000 items (besides the names' up to 8,192), no more than the
/// 8,192 full items of 1,700 bytes that the name limit alone allowed
/// before values had pieces.
pub const XATTR_VALUES_MAX: usize = 8 << 20;

/// An xattr name has 1 to 255 bytes and no NUL (the kernel passes C
/// strings; a NUL would also let one name's pieces fall among another's).
fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > 255 || name.contains(&0) {
        return Err(Posix::Invalid.at("an xattr name must have 1 to 255 bytes and no NUL"));
    }
    Ok(())
}

impl Op<'_> {
    /// The value of xattr `name` of `ino`: its item, followed by its pieces
    /// while each part is full (see [`kind::XATTR_PIECE`]).
    pub(super) fn xattr(&mut self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some(mut value) = self.get(&key(ino, kind::XATTR, name))? else {
            return Ok(None);
        };
        let mut last = value.len();
        let mut piece = 1u8;
        while last == MAX_VALUE {
            let Some(part) = self.get(&xattr_piece_key(ino, name, piece))? else {
                break;
            };
            last = part.len();
            value.extend_from_slice(&part);
            if value.len() > XATTR_SIZE_MAX || piece == u8::MAX {
                return Err(FsError::Corrupted(format!(
                    "inode {ino}: xattr {:?} has pieces past {XATTR_SIZE_MAX} bytes",
                    String::from_utf8_lossy(name)
                )));
            }
            piece += 1;
        }
        Ok(Some(value))
    }

    /// Stores `value` as xattr `name` of `ino`: one item, and pieces for
    /// what is past its first [`MAX_VALUE`] bytes; pieces of a longer
    /// value stored before are removed. `old` is the length of the value
    /// it replaces (None for a new name), which the caller has read.
    /// ENOSPC if a new name would make the list of `ino`'s xattr names
    /// longer than listxattr(2) can return (ext4 answers the same when an
    /// inode's xattrs fill its block), or if a value that grows would make
    /// `ino`'s values take more than [`XATTR_VALUES_MAX`] together.
    pub(super) fn put_xattr(
        &mut self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        old: Option<usize>,
    ) -> Result<()> {
        let k = key(ino, kind::XATTR, name);
        // A new name is counted against the names' limit; a value that
        // grows, against the values' one. A value replaced by one no
        // longer is never refused, nor walks the others: a file that an
        // earlier build took past either limit can still be shrunk (and
        // chmod rewrite its ACL).
        let check_names = old.is_none();
        let check_values = value.len() > old.unwrap_or(0);
        let (s, e) = kind_range(ino, kind::XATTR);
        let listed = |key: &[u8]| key.len() - s.len() + 1;
        // Each other name with its NUL, then this one's; the other values,
        // then this one's new value.
        let mut names = listed(&k);
        let mut values = value.len();
        let over = |names: usize, values: usize| {
            (check_names && names > XATTR_LIST_MAX) || (check_values && values > XATTR_VALUES_MAX)
        };
        if check_names || check_values {
            self.tree.visit(&mut self.store, &s, &e, &mut |key, v| {
                if key != k.as_slice() {
                    names += listed(key);
                    values += v.len();
                }
                !over(names, values)
            })?;
        }
        if check_values && !over(names, values) {
            let (ps, pe) = kind_range(ino, kind::XATTR_PIECE);
            let (own_s, own_e) = xattr_pieces_range(ino, name);
            self.tree.visit(&mut self.store, &ps, &pe, &mut |key, v| {
                if !(own_s.as_slice()..own_e.as_slice()).contains(&key) {
                    values += v.len();
                }
                !over(names, values)
            })?;
        }
        if check_names && names > XATTR_LIST_MAX {
            return Err(FsError::NoSpace(format!(
                "inode {ino}'s xattr names would take more than {XATTR_LIST_MAX} bytes, \
                 the most listxattr can return; remove one of them first"
            )));
        }
        if check_values && values > XATTR_VALUES_MAX {
            return Err(FsError::NoSpace(format!(
                "inode {ino}'s xattr values would take more than {} MiB together; \
                 remove or shorten some first",
                XATTR_VALUES_MAX >> 20
            )));
        }
        let mut parts = value.chunks(MAX_VALUE);
        self.put(&k, parts.next().unwrap_or_default())?;
        let mut pieces = 0u8;
        for part in parts {
            pieces += 1;
            self.put(&xattr_piece_key(ino, name, pieces), part)?;
        }
        if pieces > 0 {
            // Older builds cannot read pieces: from now on they refuse
            // this file system by its version.
            self.require_version(FS_VERSION_PIECES);
        }
        // Pieces of the value replaced (a new name has none, unless the
        // tree was damaged: then they would be read as this value's).
        self.del_xattr_pieces(ino, name, pieces)?;
        Ok(())
    }

    /// Removes xattr `name` of `ino`, its pieces too.
    pub(super) fn del_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<()> {
        self.del(&key(ino, kind::XATTR, name))?;
        self.del_xattr_pieces(ino, name, 0)
    }

    /// Removes the pieces of xattr `name` of `ino` past the first `keep`.
    fn del_xattr_pieces(&mut self, ino: Ino, name: &[u8], keep: u8) -> Result<()> {
        let s = xattr_piece_key(ino, name, keep + 1);
        let (_, e) = xattr_pieces_range(ino, name);
        for (k, _) in self.tree.range(&mut self.store, &s, &e, usize::MAX)? {
            self.del(&k)?;
        }
        Ok(())
    }

    /// The inode of a file whose data is read or written: not a directory.
    fn file_inode(&mut self, ino: Ino) -> Result<Inode> {
        let i = self.inode(ino)?;
        if i.is_dir() {
            return Err(Posix::IsDir.at(format!("inode {ino}")));
        }
        Ok(i)
    }

    fn chunk(&mut self, ino: Ino, index: u64) -> Result<Vec<u64>> {
        match self.get(&key(ino, kind::CHUNK, &index.to_be_bytes()))? {
            Some(v) => decode_chunk(&v).ok_or_else(|| {
                FsError::Corrupted(format!("inode {ino}: chunk {index} has the wrong size"))
            }),
            None => Ok(vec![0; CHUNK_BLOCKS as usize]),
        }
    }

    fn put_chunk(&mut self, ino: Ino, index: u64, c: &[u64]) -> Result<()> {
        self.map_changes.push((
            ino,
            MapChange::Chunk {
                index,
                blocks: c.to_vec(),
            },
        ));
        let k = key(ino, kind::CHUNK, &index.to_be_bytes());
        if c.iter().all(|b| *b == 0) {
            return self.del(&k);
        }
        let v: Vec<u8> = c.iter().flat_map(|b| b.to_le_bytes()).collect();
        self.put(&k, &v)
    }

    /// What the kernel leaves to the file system under
    /// FUSE_HANDLE_KILLPRIV_V2: a regular file written by an unprivileged
    /// user (`kill_mode`), truncated or chowned loses its file capabilities
    /// and, with `kill_mode`, setuid (and setgid if group-executable).
    /// Returns whether anything changed.
    pub(super) fn kill_priv(&mut self, ino: Ino, i: &mut Inode, kill_mode: bool) -> Result<bool> {
        if file_type(i.mode) != libc::S_IFREG {
            return Ok(false);
        }
        let before = i.mode;
        if kill_mode {
            i.mode &= !libc::S_ISUID;
            if i.mode & libc::S_IXGRP != 0 {
                i.mode &= !libc::S_ISGID;
            }
        }
        let had_caps = self
            .get(&key(ino, kind::XATTR, SECURITY_CAPABILITY))?
            .is_some();
        if had_caps {
            self.del_xattr(ino, SECURITY_CAPABILITY)?;
            self.forget_map(ino);
        }
        Ok(had_caps || i.mode != before)
    }

    /// The block address of file block `fb`, 0 for a hole.
    pub(super) fn block_of(&mut self, ino: Ino, fb: u64) -> Result<u64> {
        Ok(self.chunk(ino, fb / CHUNK_BLOCKS)?[(fb % CHUNK_BLOCKS) as usize])
    }

    /// Frees file blocks `from..`, in the first chunks that hold about
    /// `max` blocks. Returns whether no chunk past them is left.
    fn free_blocks_from(&mut self, ino: Ino, i: &mut Inode, from: u64, max: u64) -> Result<bool> {
        let (_, end) = kind_range(ino, kind::CHUNK);
        let first_chunk = from / CHUNK_BLOCKS;
        let start = key(ino, kind::CHUNK, &first_chunk.to_be_bytes());
        let limit = (max / CHUNK_BLOCKS) as usize + 1;
        let mut items = self.tree.range(&mut self.store, &start, &end, limit + 1)?;
        let more = items.len() > limit;
        items.truncate(limit);
        for (k, _) in items {
            let index = key_suffix_u64(&k)
                .ok_or_else(|| FsError::Corrupted(format!("inode {ino}: a chunk key")))?;
            let mut c = self.chunk(ino, index)?;
            for (j, b) in c.iter_mut().enumerate() {
                if index * CHUNK_BLOCKS + j as u64 >= from && *b != 0 {
                    self.free_data(ino, *b);
                    *b = 0;
                    i.blocks = i.blocks.saturating_sub(1);
                }
            }
            self.put_chunk(ino, index, &c)?;
        }
        Ok(!more)
    }
}

impl Fs {
    /// The file's block map: cached, or loaded under the metadata lock
    /// (and cached while still under it; see `Fs::files`).
    fn file_map(&self, ino: Ino) -> Result<Arc<RwLock<FileMap>>> {
        if let Some(m) = self
            .files
            .lock()
            .map_err(|_| FsError::PreviousIo)?
            .get(&ino)
        {
            return Ok(m.clone());
        }
        self.read_op(|op| {
            let i = op.file_inode(ino)?;
            self.map_loads.fetch_add(1, Ordering::Relaxed);
            let (s, e) = kind_range(ino, kind::CHUNK);
            let mut chunks = HashMap::new();
            for (k, v) in op.tree.range(&mut op.store, &s, &e, usize::MAX)? {
                let item = key_suffix_u64(&k).zip(decode_chunk(&v));
                let (index, blocks) =
                    item.ok_or_else(|| FsError::Corrupted(format!("inode {ino}: a chunk item")))?;
                chunks.insert(index, blocks);
            }
            let capability = op
                .get(&key(ino, kind::XATTR, SECURITY_CAPABILITY))?
                .is_some();
            let m = Arc::new(RwLock::new(FileMap {
                size: i.size,
                chunks,
                setid: FileMap::setid_of(&i),
                capability,
            }));
            self.files
                .lock()
                .map_err(|_| FsError::PreviousIo)?
                .insert(ino, m.clone());
            Ok(m)
        })
    }

    /// Whether the file's block map is cached (a later [`Fs::file_map`]
    /// may still load it, if a commit dropped it meanwhile).
    fn map_cached(&self, ino: Ino) -> Result<bool> {
        Ok(self
            .files
            .lock()
            .map_err(|_| FsError::PreviousIo)?
            .contains_key(&ino))
    }

    /// The file's current block map, with `reads` held shared: from the
    /// lookup to the last volume access, no block freed meanwhile is handed
    /// out again (see `Fs::reads`). The map is fetched first (loading it
    /// takes the metadata lock, which must never be waited for while
    /// `reads` is held), then checked to be still current once `reads` is
    /// held.
    fn current_map(&self, ino: Ino) -> Result<(Arc<RwLock<FileMap>>, RwLockReadGuard<'_, ()>)> {
        loop {
            let map = self.file_map(ino)?;
            let reading = self.reads.read().map_err(|_| FsError::PreviousIo)?;
            let current = self
                .files
                .lock()
                .map_err(|_| FsError::PreviousIo)?
                .get(&ino)
                .is_some_and(|m| Arc::ptr_eq(m, &map));
            if current {
                return Ok((map, reading));
            }
        }
    }

    /// Reads up to `size` bytes at `offset`. The block lookup uses the
    /// file's cached map, so reads never wait for another file's commit.
    pub fn read_data(&self, ino: Ino, offset: u64, size: usize) -> Result<Vec<u8>> {
        // The buffer is as large as the file allows, not as `size` asks
        // (its size from the cached map: no metadata lock, as below).
        let here = (self.current_map(ino)?.0)
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .size
            .saturating_sub(offset);
        let size = size.min(usize::try_from(here).unwrap_or(usize::MAX));
        let mut buf = vec![0; Fs::read_span(offset, size)];
        let r = self.read_data_into(ino, offset, size, &mut buf)?;
        buf.truncate(r.end);
        buf.drain(..r.start);
        Ok(buf)
    }

    /// One data block as the file has it: its waiting data if a small
    /// write left it to the next commit, else what the volume holds.
    fn read_block(&self, lba: u64, block: &mut [u8]) -> Result<()> {
        if let Some(data) = self.unwritten.read().get(&lba) {
            block.copy_from_slice(data);
            return Ok(());
        }
        Ok(self.volume().read(Lba(lba), block)?)
    }

    /// The bytes of buffer a read of `size` bytes at `offset` needs: every
    /// block it touches, whole.
    pub fn read_span(offset: u64, size: usize) -> usize {
        if size == 0 {
            return 0;
        }
        let first = offset / BS;
        let last = offset.saturating_add(size as u64 - 1) / BS;
        ((last - first + 1) as usize).saturating_mul(BLOCK_SIZE)
    }

    /// [`Fs::read_data`] into `buf`, which must hold
    /// [`Fs::read_span`] bytes: returns where in `buf` the bytes are. What
    /// `buf` held is overwritten, never zeroed first (a large sequential
    /// read spent 5% of its CPU zeroing fresh buffers), so a caller can
    /// keep one buffer for every read, or read straight into the buffer
    /// the answer goes out from.
    pub fn read_data_into(
        &self,
        ino: Ino,
        offset: u64,
        size: usize,
        buf: &mut [u8],
    ) -> Result<Range<usize>> {
        let (map, _reading) = self.current_map(ino)?;
        // The size and blocks are copied out at once, so that an operation
        // updating the map (under the metadata lock) never waits for this
        // read's I/O.
        let (len, blocks) = {
            let map = map.read().unwrap_or_else(PoisonError::into_inner);
            if offset >= map.size || size == 0 {
                return Ok(0..0);
            }
            if buf.len() < Fs::read_span(offset, size) {
                return Err(FsError::Refused {
                    why: Posix::Invalid,
                    what: format!(
                        "read of {size} bytes at {offset} into a buffer of {}",
                        buf.len()
                    ),
                });
            }
            let len = (size as u64).min(map.size - offset);
            let (first, last) = (offset / BS, (offset + len - 1) / BS);
            let blocks: Vec<u64> = (first..=last).map(|fb| map.block(fb)).collect();
            (len, blocks)
        };
        // Blocks whose data still waits for its commit are copied from
        // memory first: one missing there was committed before it left
        // (or never waited), so the volume has it.
        let mut copied = Vec::new();
        {
            let waiting = self.unwritten.read();
            if !waiting.is_empty() {
                copied = vec![false; blocks.len()];
                for (j, lba) in blocks.iter().enumerate() {
                    if let Some(data) = waiting.get(lba) {
                        buf[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE].copy_from_slice(data);
                        copied[j] = true;
                    }
                }
            }
        }
        let copied = |j: usize| copied.get(j).copied().unwrap_or(false);
        // Data blocks are read outside the metadata lock, in runs.
        let mut j = 0;
        while j < blocks.len() {
            if copied(j) {
                j += 1;
                continue;
            }
            if blocks[j] == 0 {
                buf[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE].fill(0);
                j += 1;
                continue;
            }
            let mut k = j + 1;
            while k < blocks.len() && !copied(k) && blocks[k] == blocks[k - 1] + 1 {
                k += 1;
            }
            self.volume()
                .read(Lba(blocks[j]), &mut buf[j * BLOCK_SIZE..k * BLOCK_SIZE])?;
            j = k;
        }
        let skip = (offset % BS) as usize;
        Ok(skip..skip + len as usize)
    }

    /// Writes `data` into blocks the file already has, inside its size,
    /// without the metadata lock: such a write changes no metadata (the
    /// kernel keeps the file times). The blocks come from the cached map
    /// and are written only if still allocated (`Volume::commit_overwrite`);
    /// with `reads` held none of them can have been handed to another file
    /// meanwhile. Ok(false) when the write needs the ordinary path.
    fn overwrite_in_place(
        &self,
        ino: Ino,
        offset: u64,
        data: &[u8],
        kill_suid: bool,
    ) -> Result<bool> {
        if !self.kernel_times() {
            return Ok(false);
        }
        // Operations reach the log in order: one whose metadata change
        // still waits must not be overtaken by this write's commit. A
        // large write that qualifies commits what waits first, in a
        // transaction of its own (metadata, and small writes' data): the
        // ordinary path would commit it together with this write's data,
        // holding the metadata lock while that data is sealed and appended
        // (8-120 ms for 1 MiB beside other processes on 2 CPUs), which
        // every other process's metadata operation then waits out.
        // Operations that complete meanwhile ran beside this write, which
        // may come first.
        let pending = self.has_pending();
        if pending && data.len() < COMMIT_FIRST_BYTES {
            return Ok(false);
        }
        let end = offset + data.len() as u64;
        // Loading a map reads every chunk item of the file: an append,
        // which takes the ordinary path anyway, must not load it (a map
        // is cached only while the file is read or overwritten).
        if !self.map_cached(ino)? && end > self.read_op(|op| Ok(op.file_inode(ino)?.size))? {
            return Ok(false);
        }
        let (first, last) = (offset / BS, (end - 1) / BS);
        // The blocks written, if the write qualifies: inside the size,
        // into blocks the file has, not clearing a privilege. `reads` is
        // held from here until the commit.
        let qualifies = || -> Result<Option<(Vec<u64>, RwLockReadGuard<'_, ()>)>> {
            let (map, reading) = self.current_map(ino)?;
            let map = map.read().unwrap_or_else(PoisonError::into_inner);
            if end > map.size || (kill_suid && map.privileged()) {
                return Ok(None);
            }
            let lbas: Vec<u64> = (first..=last).map(|fb| map.block(fb)).collect();
            Ok((!lbas.contains(&0)).then_some((lbas, reading)))
        };
        let Some(mut found) = qualifies()? else {
            return Ok(false);
        };
        if pending {
            // Not while reading: a commit that frees blocks waits for the
            // readers. Then the map again, which may have changed.
            drop(found);
            if let Err(e) = self.commit_pending() {
                // The ordinary path commits it again, and reports.
                tracing::debug!("committing what waits before an overwrite of inode {ino}: {e}");
                return Ok(false);
            }
            let Some(again) = qualifies()? else {
                return Ok(false);
            };
            found = again;
        }
        let (lbas, _reading) = found;
        {
            // A block whose data waits for the commit is written by the
            // ordinary path, which commits that data first.
            let waiting = self.unwritten.read();
            if !waiting.is_empty() && lbas.iter().any(|l| waiting.contains_key(l)) {
                return Ok(false);
            }
        }
        self.write_blocks(offset, data, &lbas)
    }

    /// Writes `data` at `offset` into `lbas`, the blocks it covers (a part
    /// of a block over what the volume holds there), as one transaction
    /// applied only if all of them are still allocated (see
    /// [`crate::volume::Volume::commit_overwrite`]). The caller holds
    /// `reads` and knows the blocks are the file's.
    fn write_blocks(&self, offset: u64, data: &[u8], lbas: &[u64]) -> Result<bool> {
        let end = offset + data.len() as u64;
        let first = offset / BS;
        let mut txn = Transaction::new();
        let mut runs = DataRuns::new(lbas.len() as u64);
        for (k, &lba) in lbas.iter().enumerate() {
            let fb = first + k as u64;
            let lo = (fb * BS).max(offset);
            let hi = ((fb + 1) * BS).min(end);
            let src = &data[(lo - offset) as usize..(hi - offset) as usize];
            if hi - lo == BS {
                runs.push(&mut txn, lba, src);
            } else {
                runs.push_with(&mut txn, lba, |block| {
                    self.volume().read(Lba(lba), block)?;
                    block[(lo - fb * BS) as usize..(hi - fb * BS) as usize].copy_from_slice(src);
                    Ok(())
                })?;
            }
        }
        runs.finish(&mut txn);
        Ok(self.volume().commit_overwrite(txn)?)
    }

    /// A large write wholly past the end of its file (an append, or one
    /// past a gap), in three steps so that its data is sealed and written
    /// without the metadata lock, as a large overwrite is
    /// (`overwrite_in_place`):
    /// 1. under the lock, one short transaction: new blocks for the range,
    ///    zeroed (as `fallocate` with KEEP_SIZE allocates them), and the
    ///    file's truncation record, which says blocks past its size may
    ///    need freeing;
    /// 2. without the lock, the data into those blocks;
    /// 3. under the lock, the new size, waiting for the next commit like
    ///    any metadata change; the last append in flight on the file then
    ///    removes the record.
    ///
    /// Until step 3 the blocks lie past the size, where no read reaches
    /// them (unless another operation grows the file over them first: a
    /// race whose either outcome is allowed). After a crash before it,
    /// the mount finishes the truncation the record names: it frees every
    /// block past the size, so the file is as before the write, and no
    /// data of a lost write waits past the size to show through a later
    /// extension. (A range the file had allocated past its size with
    /// `fallocate` KEEP_SIZE goes too.) An error between the steps frees
    /// the blocks at once (`abandon_append`).
    ///
    /// Ok(false) when the write needs the ordinary path: not far enough
    /// past the end, blocks already there, a truncation running (seen
    /// only while no other append is in flight on the file), or a data
    /// block of this file freed, or these blocks changed, before step 3 (the
    /// ordinary path then writes it again, after whatever changed them).
    /// A part of a block is written over what the volume holds there, as
    /// in `overwrite_in_place`: a caller of this API must not write
    /// another part of the same block meanwhile (the kernel writes whole
    /// pages, one write per range at a time).
    fn append_outside_lock(
        &self,
        ino: Ino,
        offset: u64,
        data: &[u8],
        kill_suid: bool,
    ) -> Result<bool> {
        let end = offset + data.len() as u64;
        let (first, last) = (offset / BS, (end - 1) / BS);
        // One more than the length in blocks when it starts inside one.
        let blocks = last - first + 1;
        if !self.kernel_times() || data.len() < COMMIT_FIRST_BYTES || blocks > APPEND_MAX_BLOCKS {
            return Ok(false);
        }
        let record = truncating_key(ino);
        // Step 1.
        let counted = std::cell::Cell::new(false);
        let reserved = self.op(|op, txn| {
            let mut i = op.inode(ino)?;
            if file_type(i.mode) != libc::S_IFREG || first < i.size.div_ceil(BS) {
                return Ok(None);
            }
            let holders = self.appending_on(ino);
            if holders == 0 && op.get(&record)?.is_some() {
                // A truncation is freeing blocks past the size.
                return Ok(None);
            }
            let mut chunks = Vec::new();
            for (index, slots, _) in chunk_spans(first, blocks as usize) {
                let c = op.chunk(ino, index)?;
                if c[slots.clone()].iter().any(|b| *b != 0) {
                    return Ok(None);
                }
                chunks.push((index, slots, c));
            }
            let mut lbas = Vec::with_capacity(blocks as usize);
            let mut hint = 0;
            for (index, slots, mut c) in chunks {
                let mut slot = slots.start;
                while slot < slots.end {
                    let (b, n) = op.alloc_data_run(hint, (slots.end - slot) as u64)?;
                    txn.zero(Lba(b), n);
                    for lba in b..b + n {
                        c[slot] = lba;
                        lbas.push(lba);
                        slot += 1;
                    }
                    hint = b + n;
                }
                op.put_chunk(ino, index, &c)?;
            }
            i.blocks += blocks;
            // A write by an unprivileged user clears setuid and the like
            // before its data lands, as the ordinary path does with it.
            op.kill_priv(ino, &mut i, kill_suid)?;
            op.put_inode(ino, &i)?;
            // Put by every append, whoever else holds it: no append may
            // count on another's.
            op.put(&record, &[])?;
            // Counted under the metadata lock, so that no other append's
            // step 3 removes the record meanwhile.
            let frees = self.appending_begin(ino)?;
            counted.set(true);
            Ok(Some((lbas, frees)))
        });
        let reserved = match reserved {
            Err(e) if counted.get() => {
                // The commit failed: nothing of step 1 happened.
                self.appending_done(ino);
                return Err(e);
            }
            r => r?,
        };
        let Some((lbas, frees)) = reserved else {
            return Ok(false);
        };
        let hook = self
            .between_append_steps
            .lock()
            .ok()
            .and_then(|h| h.clone());
        if let Some(hook) = hook {
            hook(self, &lbas);
        }
        let steps = self
            .append_stop(1)
            .and_then(|()| self.append_steps_2_3(ino, offset, data, &lbas, frees));
        let finished = match steps {
            Ok(finished) => finished,
            Err(e) => {
                // A test's stand-in for a crash leaves all as it is.
                if !matches!(self.append_stop.load(Ordering::Relaxed), 1 | 2) {
                    self.abandon_append(ino, first, &lbas);
                }
                return Err(e);
            }
        };
        if finished {
            self.appends_unlocked.fetch_add(1, Ordering::Relaxed);
        } else {
            tracing::debug!("an append to inode {ino} found its blocks changed; written again");
        }
        Ok(finished)
    }

    /// Steps 2 and 3 of [`Fs::append_outside_lock`]: whether the write is
    /// done. On an error the append is still counted in `appending`, for
    /// `abandon_append` to count out.
    fn append_steps_2_3(
        &self,
        ino: Ino,
        offset: u64,
        data: &[u8],
        lbas: &[u64],
        frees: u64,
    ) -> Result<bool> {
        let end = offset + data.len() as u64;
        let first = offset / BS;
        let record = truncating_key(ino);
        // Step 2.
        let written = {
            // If no operation freed any of this file's data blocks since
            // step 1, these blocks are still the file's; one that frees
            // some now leaves them in quarantine, not to be handed out
            // again while `reads` is held (an operation's frees are
            // counted before it releases the metadata lock, and the
            // quarantine is released only under that lock). Blocks freed
            // from other files do not matter: these were never theirs.
            // (The caller of this API, as the kernel, frees none of a
            // file's blocks while writing to it; this is the guarantee if
            // one did.) The data may reach the log before operations still
            // waiting for a commit: it shows only with the size, in step
            // 3, which waits after them.
            let _reading = self.reads.read().map_err(|_| FsError::PreviousIo)?;
            self.frees_on(ino) == Some(frees) && self.write_blocks(offset, data, lbas)?
        };
        self.append_stop(2)?;
        self.append_stop(3)?;
        // Step 3. The count drops once the record is gone (or stays for
        // another append); an error before that leaves both to
        // `abandon_append`.
        let counted = std::cell::Cell::new(true);
        let finished = self.op(|op, _| {
            let mut i = op.inode(ino)?;
            let same = written && self.still_reserved(op, ino, first, lbas)?;
            if same && end > i.size {
                i.size = end;
                op.put_inode(ino, &i)?;
            }
            if self.appending_on(ino) == 1 {
                op.del(&record)?;
            }
            self.appending_done(ino);
            counted.set(false);
            Ok(same)
        });
        match finished {
            Ok(same) => Ok(same),
            // The commit failed after the count dropped: the record is
            // still there (the failed operation changed nothing), and
            // so is this append, for `abandon_append` to count out.
            Err(e) if !counted.get() => {
                self.appending_begin(ino)?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether file blocks from `first` are still `lbas`.
    fn still_reserved(&self, op: &mut Op, ino: Ino, first: u64, lbas: &[u64]) -> Result<bool> {
        for (index, slots, ks) in chunk_spans(first, lbas.len()) {
            if op.chunk(ino, index)?[slots] != lbas[ks] {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// After an append failed between its steps: counts it out, frees the
    /// blocks it reserved that are still the file's and still past its
    /// size (whatever of its data reached them), and removes the
    /// truncation record if no other append holds it. If that fails too
    /// (the volume failed), the record stays for the next mount, and
    /// until then no large append goes without the lock on this file.
    fn abandon_append(&self, ino: Ino, first: u64, lbas: &[u64]) {
        self.appending_done(ino);
        let r = self.op(|op, _| {
            let mut i = op.inode(ino)?;
            let past = i.size.div_ceil(BS);
            for (index, slots, ks) in chunk_spans(first, lbas.len()) {
                let mut c = op.chunk(ino, index)?;
                let mut changed = false;
                for (slot, k) in slots.zip(ks) {
                    if first + k as u64 >= past && c[slot] == lbas[k] {
                        op.free_data(ino, lbas[k]);
                        c[slot] = 0;
                        i.blocks = i.blocks.saturating_sub(1);
                        changed = true;
                    }
                }
                if changed {
                    op.put_chunk(ino, index, &c)?;
                }
            }
            op.put_inode(ino, &i)?;
            if self.appending_on(ino) == 0 {
                op.del(&truncating_key(ino))?;
            }
            Ok(())
        });
        if let Err(e) = r {
            tracing::warn!(
                "inode {ino}: a failed append's blocks past the size stay until the next mount \
                 frees them: {e}"
            );
        }
    }

    /// For tests: an error in place of what follows step `step` of a large
    /// append (see [`Fs::stop_large_appends_after`]; 3 is an error after
    /// step 2 that the append handles, as it would a failed write).
    fn append_stop(&self, step: u8) -> Result<()> {
        if self.append_stop.load(Ordering::Relaxed) == step {
            return Err(FsError::Io {
                context: format!("a large append stopped after step {step} (a test)"),
                source: std::io::Error::other("stopped"),
            });
        }
        Ok(())
    }

    /// How many large appends are in flight on `ino`.
    fn appending_on(&self, ino: Ino) -> u32 {
        self.appending
            .lock()
            .map_or(0, |a| a.get(&ino).map_or(0, |a| a.count))
    }

    /// How many operations freed data blocks of `ino` while large appends
    /// were in flight on it (none if no append is).
    fn frees_on(&self, ino: Ino) -> Option<u64> {
        let appending = self.appending.lock().ok()?;
        appending.get(&ino).map(|a| a.frees)
    }

    /// Counts an operation's frees for the files with appends in flight.
    /// Called under the metadata lock, at the end of every operation.
    pub(super) fn freed_data_of(&self, inos: &[Ino]) {
        if inos.is_empty() {
            return;
        }
        let Ok(mut appending) = self.appending.lock() else {
            return;
        };
        for ino in inos {
            if let Some(a) = appending.get_mut(ino) {
                a.frees += 1;
            }
        }
    }

    /// One more large append in flight on `ino`; the file's count of
    /// frees (see [`Fs::frees_on`]) as of now.
    fn appending_begin(&self, ino: Ino) -> Result<u64> {
        let mut appending = self.appending.lock().map_err(|_| FsError::PreviousIo)?;
        let a = appending.entry(ino).or_default();
        a.count += 1;
        Ok(a.frees)
    }

    /// One large append on `ino` is done.
    fn appending_done(&self, ino: Ino) {
        let Ok(mut appending) = self.appending.lock() else {
            return;
        };
        match appending.get_mut(&ino) {
            Some(a) if a.count > 1 => a.count -= 1,
            Some(_) => {
                appending.remove(&ino);
            }
            None => {}
        }
    }

    /// Writes `data` at `offset`. With `kill_suid`, clears the setuid bit
    /// (and setgid if group-executable), as a write by an unprivileged user must.
    pub fn write_data(&self, ino: Ino, offset: u64, data: &[u8], kill_suid: bool) -> Result<u64> {
        if data.is_empty() {
            return Ok(0);
        }
        if offset
            .checked_add(data.len() as u64)
            .is_some_and(|e| e <= MAX_FILE_SIZE)
            && (self.overwrite_in_place(ino, offset, data, kill_suid)?
                || self.append_outside_lock(ino, offset, data, kill_suid)?)
        {
            return Ok(data.len() as u64);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE);
        let Some(end) = end else {
            return Err(Posix::FileTooBig.at(format!("a write past {MAX_FILE_SIZE} bytes")));
        };
        self.op(|op, txn| {
            let mut i = op.inode(ino)?;
            if file_type(i.mode) != libc::S_IFREG {
                return Err(
                    Posix::Invalid.at(format!("writing to inode {ino}, not a regular file"))
                );
            }
            let blocks_before = i.blocks;
            let first = offset / BS;
            let last = (end - 1) / BS;
            let mut chunk_index = u64::MAX;
            let mut chunk = Vec::new();
            let mut chunk_changed = false;
            let mut hint = 0;
            let mut runs = DataRuns::with_metadata(last - first + 1);
            for fb in first..=last {
                if fb / CHUNK_BLOCKS != chunk_index {
                    if chunk_changed {
                        op.put_chunk(ino, chunk_index, &chunk)?;
                    }
                    chunk_index = fb / CHUNK_BLOCKS;
                    chunk = op.chunk(ino, chunk_index)?;
                    chunk_changed = false;
                }
                let slot = (fb % CHUNK_BLOCKS) as usize;
                let lo = (fb * BS).max(offset);
                let hi = ((fb + 1) * BS).min(end);
                let src = &data[(lo - offset) as usize..(hi - offset) as usize];
                let existing = chunk[slot];
                let lba = if existing != 0 {
                    existing
                } else {
                    let b = op.alloc_data(hint)?;
                    chunk[slot] = b;
                    chunk_changed = true;
                    i.blocks += 1;
                    b
                };
                hint = lba + 1;
                if hi - lo == BS {
                    runs.push(txn, lba, src);
                } else {
                    runs.push_with(txn, lba, |block| {
                        if existing != 0 {
                            self.read_block(existing, block)?;
                        }
                        block[(lo - fb * BS) as usize..(hi - fb * BS) as usize]
                            .copy_from_slice(src);
                        Ok(())
                    })?;
                }
            }
            runs.finish(txn);
            let allocated = i.blocks != blocks_before;
            if allocated
                && i.blocks - blocks_before == last - first + 1
                && last - first < DEFER_DATA_BLOCKS
            {
                // Every block is new: the data may wait for the commit.
                let own = std::mem::take(txn);
                if let Err(own) = op.defer_data(own) {
                    *txn = own;
                }
            }
            if chunk_changed {
                op.put_chunk(ino, chunk_index, &chunk)?;
            }
            let now = Time::now();
            let killed = op.kill_priv(ino, &mut i, kill_suid)?;
            if self.kernel_times() {
                // The kernel keeps mtime and ctime of writes and stores
                // them with setattr (which may arrive before this write).
                if allocated || end > i.size || killed {
                    i.size = i.size.max(end);
                    op.put_inode(ino, &i)?;
                }
            } else if !allocated && end <= i.size && !killed {
                // A pure overwrite changes only the times: they are kept
                // in memory until the next sync, so the transaction holds
                // the data blocks alone.
                op.touch_lazily(ino, now);
            } else {
                i.size = i.size.max(end);
                i.mtime = now;
                i.ctime = now;
                op.put_inode(ino, &i)?;
            }
            Ok(data.len() as u64)
        })
    }

    /// Changes attributes; a size change truncates or extends (sparsely).
    pub fn setattr(&self, ino: Ino, a: SetAttr) -> Result<Inode> {
        if a.size.is_some_and(|s| s > MAX_FILE_SIZE) {
            return Err(Posix::FileTooBig.at(format!("a size past {MAX_FILE_SIZE} bytes")));
        }
        if a.mode.is_none() && a.uid.is_none() && a.gid.is_none() && a.size.is_none() {
            // Times only (utimensat, or the kernel's writeback cache storing
            // mtime after writes): kept in memory until the next sync.
            return self.op(|op, _| {
                let mut i = op.inode(ino)?;
                let now = Time::now();
                i.atime = a.atime.unwrap_or(i.atime);
                i.mtime = a.mtime.unwrap_or(i.mtime);
                i.ctime = a.ctime.unwrap_or(now);
                op.set_times_lazily(ino, a.atime, i.mtime, i.ctime);
                Ok(i)
            });
        }
        let mut pending = false;
        let i = self.op(|op, txn| {
            let mut i = op.inode(ino)?;
            let now = Time::now();
            if let Some(m) = a.mode {
                i.mode = file_type(i.mode) | (m & 0o7777);
                // An access ACL follows the mode (posix_acl_chmod).
                if let Some(v) = op.xattr(ino, acl::ACCESS)? {
                    let mut a = acl::Acl::decode(&v)?;
                    a.chmod(i.mode);
                    op.put_xattr(ino, acl::ACCESS, &a.encode(), Some(v.len()))?;
                }
            }
            if a.uid.is_some() || a.gid.is_some() || a.size.is_some() {
                // chown and truncate drop privileges, as the kernel would
                // without FUSE_HANDLE_KILLPRIV_V2; an explicit mode wins.
                op.kill_priv(ino, &mut i, a.mode.is_none())?;
            }
            if let Some(u) = a.uid {
                i.uid = u;
            }
            if let Some(g) = a.gid {
                i.gid = g;
            }
            if let Some(t) = a.atime {
                i.atime = t;
            }
            if let Some(t) = a.mtime {
                i.mtime = t;
            }
            if let Some(size) = a.size {
                if i.is_dir() {
                    return Err(Posix::IsDir.at(format!("truncating inode {ino}")));
                }
                if size < i.size {
                    let keep = size.div_ceil(BS);
                    // A large truncate frees the rest in more steps (see
                    // `finish_truncate`), each its own short transaction.
                    if !op.free_blocks_from(ino, &mut i, keep, TRUNCATE_STEP)? {
                        op.put(&truncating_key(ino), &[])?;
                        pending = true;
                    }
                    // Zero the tail of the last kept block, so that growing
                    // the file again shows zeros there.
                    if size % BS != 0 {
                        let lba = op.block_of(ino, size / BS)?;
                        if lba != 0 {
                            let mut b = vec![0u8; BLOCK_SIZE];
                            self.read_block(lba, &mut b)?;
                            b[(size % BS) as usize..].fill(0);
                            txn.write(Lba(lba), b);
                        }
                    }
                }
                if a.mtime.is_none() {
                    i.mtime = now;
                }
                i.size = size;
            }
            i.ctime = a.ctime.unwrap_or(now);
            op.put_inode(ino, &i)?;
            Ok(i)
        })?;
        if pending {
            return self
                .finish_truncate(ino)?
                .ok_or_else(|| Posix::NotFound.at(format!("inode {ino}")));
        }
        Ok(i)
    }

    /// Frees what a truncate left past the file's size, TRUNCATE_STEP
    /// blocks per transaction, then drops its record; returns the inode.
    /// The new size took effect in the first step. Between steps other
    /// operations go on; the mount's kernel holds this file's inode lock
    /// throughout a truncate, so no write to it comes in between (a
    /// caller of this API must not write the file meanwhile either).
    pub(super) fn finish_truncate(&self, ino: Ino) -> Result<Option<Inode>> {
        // Some(the inode if it still exists) once finished.
        self.op_steps(|op, _| {
            let record = truncating_key(ino);
            let mut i = match op.inode(ino) {
                Ok(i) => i,
                Err(FsError::Refused {
                    why: Posix::NotFound,
                    ..
                }) => {
                    op.del(&record)?;
                    return Ok(Some(None));
                }
                Err(e) => return Err(e),
            };
            let before = i.blocks;
            let keep = i.size.div_ceil(BS);
            let done = op.free_blocks_from(ino, &mut i, keep, TRUNCATE_STEP)?;
            if i.blocks != before {
                op.put_inode(ino, &i)?;
            }
            if !done {
                return Ok(None);
            }
            // An append in flight (only through this API: the kernel
            // writes nothing during a truncate) still needs the record.
            if self.appending_on(ino) == 0 {
                op.del(&record)?;
            }
            Ok(Some(Some(i)))
        })
    }

    /// fallocate(2). Mode 0 allocates (and extends), KEEP_SIZE allocates
    /// only, PUNCH_HOLE|KEEP_SIZE frees the range (partial blocks zeroed),
    /// ZERO_RANGE (with or without KEEP_SIZE) makes the range read as zeros
    /// and allocated. Allocated blocks are zeroed in the volume (see
    /// [`crate::volume::Transaction::zero`]): they take their logical space
    /// at once, so later writes to them cannot run out of it, but nothing
    /// is written or encrypted until data comes.
    pub fn fallocate(&self, ino: Ino, offset: u64, len: u64, mode: u32) -> Result<()> {
        if len == 0 {
            return Err(Posix::Invalid.at(format!("fallocate of 0 bytes at {offset}")));
        }
        // As the kernel answers past its own limit (vfs_fallocate).
        let end = offset.checked_add(len).filter(|e| *e <= MAX_FILE_SIZE);
        let Some(end) = end else {
            return Err(Posix::FileTooBig.at(format!(
                "fallocate range {offset}+{len} ends past {MAX_FILE_SIZE} bytes"
            )));
        };
        if mode & !(FALLOC_KEEP_SIZE | FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE) != 0 {
            return Err(Posix::NotSupported.at(format!("fallocate mode {mode:#x}")));
        }
        let punch = mode & FALLOC_PUNCH_HOLE != 0;
        if punch && mode & FALLOC_KEEP_SIZE == 0 {
            // fallocate(2): PUNCH_HOLE must come with KEEP_SIZE.
            return Err(Posix::Invalid.at("fallocate PUNCH_HOLE without KEEP_SIZE"));
        }
        if punch && mode & FALLOC_ZERO_RANGE != 0 {
            return Err(Posix::Invalid.at("fallocate PUNCH_HOLE with ZERO_RANGE"));
        }
        // A large range goes in steps of FALLOC_STEP blocks, one short
        // transaction each, so that other operations wait at most one step
        // for the metadata lock. Every step leaves a consistent file, so a
        // crash between steps leaves part of the range done, as on ext4.
        let step = FALLOC_STEP * BS;
        let mut at = offset;
        self.op_steps(|op, txn| {
            let to = ((at / step + 1) * step).min(end);
            // Only the last step changes the size: a failure part way
            // leaves the size as it was (the kernel's copy agrees).
            let m = if to < end {
                mode | FALLOC_KEEP_SIZE
            } else {
                mode
            };
            self.fallocate_step(op, txn, ino, (at, to), end, m)?;
            at = to;
            Ok((at == end).then_some(()))
        })
    }

    /// One step of [`Fs::fallocate`]: the range `offset..end` of the whole
    /// range that ends at `range_end`.
    fn fallocate_step(
        &self,
        op: &mut Op,
        txn: &mut Transaction,
        ino: Ino,
        (offset, end): (u64, u64),
        range_end: u64,
        mode: u32,
    ) -> Result<()> {
        let punch = mode & FALLOC_PUNCH_HOLE != 0;
        let zero_range = mode & FALLOC_ZERO_RANGE != 0;
        let mut i = op.inode(ino)?;
        if file_type(i.mode) != libc::S_IFREG {
            return Err(Posix::Invalid.at(format!("fallocate on inode {ino}")));
        }
        let mut zeroed = Runs::default();
        let mut hint = 0;
        // Blocks taken from the allocator for holes and not used yet: the
        // next one, and how many.
        let mut run = (0u64, 0u64);
        let (first, last) = (offset / BS, end.div_ceil(BS));
        for index in first / CHUNK_BLOCKS..=(last - 1) / CHUNK_BLOCKS {
            let mut c = op.chunk(ino, index)?;
            let mut changed = false;
            let lo_fb = first.max(index * CHUNK_BLOCKS);
            let hi_fb = last.min((index + 1) * CHUNK_BLOCKS);
            for fb in lo_fb..hi_fb {
                let slot = (fb % CHUNK_BLOCKS) as usize;
                let lo = (fb * BS).max(offset);
                let hi = ((fb + 1) * BS).min(end);
                let whole = hi - lo == BS;
                if c[slot] == 0 {
                    if punch {
                        continue;
                    }
                    // A hole: allocated, and zeroed (reads as zeros,
                    // stored nowhere). Blocks come a run at a time, never
                    // more than the holes that follow in this chunk.
                    if run.1 == 0 {
                        let holes = (fb..hi_fb)
                            .take_while(|f| c[(f % CHUNK_BLOCKS) as usize] == 0)
                            .count() as u64;
                        run = op.alloc_data_run(hint, holes)?;
                    }
                    let b = run.0;
                    run = (b + 1, run.1 - 1);
                    hint = b + 1;
                    c[slot] = b;
                    i.blocks += 1;
                    zeroed.push(b);
                    changed = true;
                } else if punch && whole {
                    op.free_data(ino, c[slot]);
                    c[slot] = 0;
                    i.blocks = i.blocks.saturating_sub(1);
                    changed = true;
                } else if zero_range && whole {
                    // Keeps its logical block; the data goes.
                    zeroed.push(c[slot]);
                } else if punch || zero_range {
                    // Part of a block: zeros written over that part.
                    let mut b = vec![0u8; BLOCK_SIZE];
                    self.read_block(c[slot], &mut b)?;
                    b[(lo - fb * BS) as usize..(hi - fb * BS) as usize].fill(0);
                    txn.write(Lba(c[slot]), b);
                }
            }
            if changed {
                op.put_chunk(ino, index, &c)?;
            }
        }
        debug_assert_eq!(run.1, 0, "blocks taken for holes left over");
        for (lba, n) in zeroed.0 {
            txn.zero(Lba(lba), n);
        }
        if !punch && mode & FALLOC_KEEP_SIZE == 0 {
            // Only the last step comes without KEEP_SIZE.
            i.size = i.size.max(range_end);
        }
        let now = Time::now();
        i.ctime = now;
        if punch || zero_range {
            // The content changed (ext4 sets mtime too; the kernel
            // updates times itself only when fallocate grows the file).
            i.mtime = now;
        }
        op.put_inode(ino, &i)
    }

    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: u32) -> Result<()> {
        check_xattr_name(name)?;
        if value.len() > XATTR_SIZE_MAX {
            return Err(Posix::TooBig.at(format!(
                "an xattr value of {} bytes (at most {XATTR_SIZE_MAX})",
                value.len()
            )));
        }
        self.op(|op, _| {
            let mut i = op.inode(ino)?;
            // The length of the value replaced, if any (put_xattr's limits).
            let old = op.xattr(ino, name)?.map(|v| v.len());
            let exists = old.is_some();
            if flags & XATTR_CREATE != 0 && exists {
                return Err(Posix::Exists.at(String::from_utf8_lossy(name)));
            }
            if flags & XATTR_REPLACE != 0 && !exists {
                return Err(Posix::NoAttr.at(String::from_utf8_lossy(name)));
            }
            if name == acl::ACCESS {
                // The ACL sets the permission bits; one that says no more
                // than the mode is not kept (posix_acl_update_mode).
                let a = acl::Acl::decode(value)?;
                i.mode = (i.mode & !0o777) | a.mode_bits();
                if a.is_minimal() {
                    op.del_xattr(ino, name)?;
                } else {
                    op.put_xattr(ino, name, value, old)?;
                }
            } else if name == acl::DEFAULT {
                if !i.is_dir() {
                    return Err(Posix::Invalid.at("a default ACL on a non-directory"));
                }
                acl::Acl::decode(value)?;
                op.put_xattr(ino, name, value, old)?;
            } else {
                op.put_xattr(ino, name, value, old)?;
            }
            if name == SECURITY_CAPABILITY {
                op.forget_map(ino);
            }
            i.ctime = Time::now();
            op.put_inode(ino, &i)
        })
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        check_xattr_name(name)?;
        self.read_op(|op| {
            op.inode(ino)?;
            op.xattr(ino, name)?
                .ok_or_else(|| Posix::NoAttr.at(String::from_utf8_lossy(name)))
        })
    }

    pub fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        self.read_op(|op| {
            op.inode(ino)?;
            let (s, e) = kind_range(ino, kind::XATTR);
            Ok(op
                .tree
                .range(&mut op.store, &s, &e, usize::MAX)?
                .into_iter()
                .map(|(k, _)| k[9..].to_vec())
                .collect())
        })
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        check_xattr_name(name)?;
        self.op(|op, _| {
            let mut i = op.inode(ino)?;
            if op.get(&key(ino, kind::XATTR, name))?.is_none() {
                return Err(Posix::NoAttr.at(String::from_utf8_lossy(name)));
            }
            op.del_xattr(ino, name)?;
            if name == SECURITY_CAPABILITY {
                op.forget_map(ino);
            }
            i.ctime = Time::now();
            op.put_inode(ino, &i)
        })
    }

    pub fn statfs(&self) -> Result<FsStats> {
        let (free, files) = self.meta_stats()?;
        // Blocks snapshots hold take room the file system could otherwise use.
        let free = if self.volume().is_read_only() {
            free
        } else {
            free.min(self.volume().free_blocks()?)
        };
        Ok(FsStats {
            blocks: self.volume().logical_blocks(),
            free_blocks: free,
            files,
        })
    }
}

/// Adds `SetAttr` conveniences for tests and callers.
impl SetAttr {
    pub fn size(size: u64) -> SetAttr {
        SetAttr {
            size: Some(size),
            ..SetAttr::default()
        }
    }
}

/// The chunk items that `n` consecutive file blocks from `first` fall in:
/// for each, its index, the slots the blocks take in it, and the blocks'
/// places (0..n) those slots hold.
fn chunk_spans(first: u64, n: usize) -> impl Iterator<Item = (u64, Range<usize>, Range<usize>)> {
    let mut k = 0;
    std::iter::from_fn(move || {
        if k >= n {
            return None;
        }
        let fb = first + k as u64;
        let slot = (fb % CHUNK_BLOCKS) as usize;
        let take = (CHUNK_BLOCKS as usize - slot).min(n - k);
        let span = (fb / CHUNK_BLOCKS, slot..slot + take, k..k + take);
        k += take;
        Some(span)
    })
}
