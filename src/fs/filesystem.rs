//! The file system's namespace: inodes and directories on the metadata
//! B+tree. Every public operation either happens completely or, after any
//! crash, not at all; operations reach the volume's log in their order
//! (see [`Pending`]).

use rustc_hash::FxHashMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use super::acl;
use super::btree::BTree;
use super::format::{
    file_type, inode_range, key, key_suffix_u64, kind, kind_range, orphan_key, truncating_key,
    Dirent, Ino, Inode, Superblock, Time, CHUNK_BLOCKS, FS_VERSION_BASE, NAME_MAX, ORPHANS,
    ROOT_INO, SYMLINK_MAX,
};
use super::holds::Holds;
use super::store::{Allocator, Commit, NodeCache, Pending, Unwritten, VolumeStore};
use crate::fs::{FsError, Posix, Result};
use crate::volume::{Lba, SnapshotId, SnapshotInfo, Transaction, Volume};

/// The block that holds the superblock.
const SUPERBLOCK: Lba = Lba(0);
use crate::BLOCK_SIZE;

/// Inode numbers are below 2^40; the mount numbers snapshots' inodes above.
pub const MAX_INO: u64 = 1 << 40;

/// Most hard links one inode may have.
pub const LINK_MAX: u32 = 65000;

/// `rename` flags (as in renameat2).
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;

/// One entry returned by [`Fs::readdir`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Pass it back to continue after this entry; stable across creates and
    /// unlinks of other entries.
    pub cookie: u64,
    pub name: Vec<u8>,
    pub ino: Ino,
    /// File type bits (S_IFMT).
    pub kind: u32,
}

struct Meta {
    sb: Superblock,
    tree: BTree,
    alloc: Allocator,
    cache: NodeCache,
    /// Metadata changes of completed operations, not yet committed.
    pending: Pending,
    /// Lazy times: mtime and ctime of files changed only by overwrites,
    /// kept in memory until the next sync (as ext4's `lazytime`).
    lazy: HashMap<Ino, LazyTimes>,
}

/// Pending metadata changes (see [`Pending`]) are committed with the
/// operation that brings them to this many changed nodes (1 MiB)...
const PENDING_NODES: usize = 256;
/// ...or to this many freed blocks (64 MiB).
const PENDING_FREED: u64 = 16384;
/// ...or to this many data blocks of small writes (1 MiB).
const PENDING_DATA_BLOCKS: usize = 256;
/// Below this many free blocks (128 MiB), blocks that pending operations
/// freed are committed before the next operation, which may need them;
/// and nothing waits while the file system's allocator, or the volume
/// (its log without cleaning, or what snapshots hold: see
/// `Volume::room_to_wait`), has less room than this: near a full volume
/// (or a full host file system, once the log could not grow) each
/// operation commits at once and gets its own ENOSPC.
const LOW_SPACE_BLOCKS: u64 = 32768;

/// While others wait for the metadata lock, a long operation pauses after
/// each step this many times as long as the step held it...
const STEP_PAUSE_FACTOR: u32 = 4;
/// ...but never longer than this (a step is meant to be far shorter).
const MAX_STEP_PAUSE: Duration = Duration::from_millis(8);

/// The held metadata lock; poisons it if dropped by a panic, and
/// publishes [`MetaStats`] as it lets go.
struct MetaGuard<'a> {
    guard: parking_lot::MutexGuard<'a, Meta>,
    poisoned: &'a std::sync::atomic::AtomicBool,
    stats: &'a MetaStats,
}

impl MetaGuard<'_> {
    /// Hands the lock to a thread waiting for it, if any, and takes it
    /// back (a fair hand-over).
    fn bump(&mut self) {
        self.stats.publish(&self.guard);
        parking_lot::MutexGuard::bump(&mut self.guard);
    }
}

/// What statfs reports of the metadata, as the last holder of the
/// metadata lock left it: each holder publishes it as it lets go (still
/// holding the lock, so the figures follow the lock's order), and statfs,
/// which a process may call several times per operation (`df`, and
/// stress-ng's loops check free space), answers from it without waiting
/// for a long operation's step.
#[derive(Default)]
struct MetaStats {
    /// The allocator's free blocks (those in quarantine counted).
    free_blocks: AtomicU64,
    /// The next inode number to hand out.
    next_ino: AtomicU64,
    /// Blocks (data and metadata) freed by operations whose commit is
    /// pending.
    pending_freed: AtomicU64,
}

impl MetaStats {
    fn publish(&self, m: &Meta) {
        self.free_blocks
            .store(m.alloc.free_blocks(), Ordering::Release);
        self.next_ino.store(m.sb.next_ino, Ordering::Release);
        self.pending_freed
            .store(m.pending.freed_blocks(), Ordering::Release);
    }
}

impl std::ops::Deref for MetaGuard<'_> {
    type Target = Meta;
    fn deref(&self) -> &Meta {
        &self.guard
    }
}

impl std::ops::DerefMut for MetaGuard<'_> {
    fn deref_mut(&mut self) -> &mut Meta {
        &mut self.guard
    }
}

impl Drop for MetaGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.poisoned
                .store(true, std::sync::atomic::Ordering::SeqCst);
        } else {
            self.stats.publish(&self.guard);
        }
    }
}

/// Times of an inode kept in memory until the next sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LazyTimes {
    pub atime: Option<Time>,
    pub mtime: Time,
    pub ctime: Time,
}

/// Data blocks freed per transaction when deleting a file (64 MiB): larger
/// files become orphans and are freed in steps.
const PURGE_STEP: u64 = 16384;

/// A mounted file system.
pub struct Fs {
    volume: Volume,
    /// Eventually fair (parking_lot), and handed fairly to a waiter
    /// between the steps of a long operation (see [`Fs::op_steps`]).
    meta: parking_lot::Mutex<Meta>,
    /// A thread panicked while holding `meta`: its state may be half
    /// changed, so every later operation is refused (as a poisoned std
    /// mutex would be).
    meta_poisoned: std::sync::atomic::AtomicBool,
    /// Free blocks and inodes as the metadata lock's last holder left
    /// them (for statfs).
    meta_stats: MetaStats,
    /// Set when a thread found the metadata lock taken and had to wait:
    /// a long operation made of steps then pauses between them (see
    /// [`Fs::op_steps`]).
    meta_waited: std::sync::atomic::AtomicBool,
    /// How many times a long operation paused for others (a counter for
    /// tests and diagnostics).
    step_pauses: std::sync::atomic::AtomicU64,
    /// File block maps loaded from the tree (see `Fs::file_map`).
    pub(super) map_loads: std::sync::atomic::AtomicU64,
    /// Whether changes are pending (metadata, or small writes' data), as
    /// the last operation left them: a write in place, which commits
    /// without the metadata lock, then takes the ordinary path, which
    /// commits them first.
    has_pending: std::sync::atomic::AtomicBool,
    /// The data of small writes waiting for the next commit (shared with
    /// the pending changes, see [`Pending::unwritten`]): a read looks here
    /// before it reads the volume.
    pub(super) unwritten: Unwritten,
    /// Open handles and kernel lookups per inode: an inode that loses its
    /// last name while held lives on (as an orphan) until nothing holds it.
    holds: Mutex<Holds>,
    /// Block maps of files being read, so that a read looks up its blocks
    /// without the metadata lock (which a writer holds across its commit).
    /// An operation that changes a file's size or blocks updates its map
    /// in place, under the metadata lock, once it has succeeded (so a file
    /// read while it is appended to is not loaded again for each read);
    /// one that changes it otherwise (removes the file, or its
    /// capabilities) drops it, as the file's last close does.
    pub(super) files: Mutex<FxHashMap<Ino, Arc<RwLock<FileMap>>>>,
    /// Large appends in flight per file (see `Fs::append_outside_lock`):
    /// each holds the file's truncation record, which the last to finish
    /// removes, and operations count their frees of the file's blocks
    /// here. Taken with or without the metadata lock, never the other way
    /// round (nothing that holds it waits for the metadata lock or
    /// `reads`).
    pub(super) appending: Mutex<HashMap<Ino, Appending>>,
    /// Large appends written without the metadata lock. For tests.
    pub(super) appends_unlocked: std::sync::atomic::AtomicU64,
    /// For tests: a large append stops with an error after this step (1
    /// or 2), as a crash would; 0 lets them finish.
    pub(super) append_stop: std::sync::atomic::AtomicU8,
    /// For tests: run by every large append between its steps 1 and 2.
    pub(super) between_append_steps: Mutex<Option<AppendHook>>,
    /// Held shared by every data read from its block lookup to the end of
    /// its volume read. Blocks freed meanwhile stay quarantined (see
    /// `Allocator`) until an operation finds no read in flight, so a read
    /// never returns a block that was freed and reused by another file.
    pub(super) reads: std::sync::RwLock<()>,
    /// The kernel keeps file times of writes (FUSE writeback cache): writes
    /// leave mtime and ctime alone; the kernel sends them with setattr.
    kernel_times: std::sync::atomic::AtomicBool,
    /// Syncs shared between concurrent callers (see `Fs::sync_shared`).
    syncs: Mutex<SyncRound>,
    sync_done: std::sync::Condvar,
}

/// The syncs of [`Fs::sync_shared`]: how many began and finished, whether
/// one is running, and the last that failed.
#[derive(Default)]
struct SyncRound {
    started: u64,
    finished: u64,
    running: bool,
    failed: Option<u64>,
}

/// Freeing that an operation left to do once it has committed: the rest
/// of an unlinked file's blocks (a large file is freed in steps of
/// PURGE_STEP blocks, each its own transaction), and orphans nothing
/// holds any more. The mount frees a small file's at once
/// ([`Fs::free_small`]) and hands a large one's to its slow-request
/// threads, so that removing a large file does not hold up the requests
/// behind it.
#[derive(Debug, Default)]
#[must_use = "what an operation left is freed by Fs::free_leftover"]
pub struct Leftover {
    unlinked: Option<Ino>,
    unheld: Vec<Ino>,
}

impl Leftover {
    /// Nothing left to free.
    pub fn is_empty(&self) -> bool {
        self.unlinked.is_none() && self.unheld.is_empty()
    }
}

/// A regular file's size and block addresses, as of the last operation
/// on it.
pub(super) struct FileMap {
    pub size: u64,
    /// Chunk index -> block addresses; a missing chunk is a hole.
    pub chunks: HashMap<u64, Vec<u64>>,
    /// setuid or setgid.
    pub setid: bool,
    /// File capabilities (security.capability).
    pub capability: bool,
}

impl FileMap {
    /// Whether an inode's mode has setuid or setgid, which a map keeps
    /// as `setid`.
    pub fn setid_of(i: &Inode) -> bool {
        i.mode & (libc::S_ISUID | libc::S_ISGID) != 0
    }

    /// setuid, setgid or file capabilities: a write by an unprivileged
    /// user must clear them (which changes the inode).
    pub fn privileged(&self) -> bool {
        self.setid || self.capability
    }

    /// The block address of file block `fb`, 0 for a hole.
    pub fn block(&self, fb: u64) -> u64 {
        self.chunks
            .get(&(fb / CHUNK_BLOCKS))
            .map_or(0, |c| c[(fb % CHUNK_BLOCKS) as usize])
    }

    fn apply(&mut self, change: MapChange) {
        match change {
            MapChange::Chunk { index, blocks } => {
                if blocks.iter().all(|b| *b == 0) {
                    self.chunks.remove(&index);
                } else {
                    self.chunks.insert(index, blocks);
                }
            }
            MapChange::Inode { size, setid } => {
                self.size = size;
                self.setid = setid;
            }
            // `Fs::update_maps` drops the map instead of applying this.
            MapChange::Forget => {}
        }
    }
}

/// How an operation changed a file's [`FileMap`].
pub(super) enum MapChange {
    /// A chunk item now holds these blocks (all zero: it was deleted).
    Chunk { index: u64, blocks: Vec<u64> },
    /// The inode was stored with this size and setuid/setgid state.
    Inode { size: u64, setid: bool },
    /// Changed otherwise: a cached map is dropped.
    Forget,
}

/// One operation in progress: reads see its own changes; `Fs::op` commits.
pub(super) struct Op<'a> {
    pub(super) store: VolumeStore<'a>,
    pub(super) tree: &'a mut BTree,
    sb: &'a mut Superblock,
    holds: &'a Mutex<Holds>,
    lazy: &'a mut HashMap<Ino, LazyTimes>,
    /// How this operation changed files' sizes and blocks, in order.
    pub(super) map_changes: Vec<(Ino, MapChange)>,
    /// Lazy-time entries this operation changed, with their old values,
    /// put back if it fails.
    lazy_undo: Vec<(Ino, Option<LazyTimes>)>,
    /// Files this operation freed data blocks of.
    freed_from: Vec<Ino>,
}

/// See [`Fs::between_large_append_steps`].
pub(super) type AppendHook = Arc<dyn Fn(&Fs, &[u64]) + Send + Sync>;

/// The large appends in flight on one file (see `Fs::append_outside_lock`).
#[derive(Default)]
pub(super) struct Appending {
    pub(super) count: u32,
    /// Operations that freed some of the file's data blocks while an
    /// append was in flight: an append writes without the lock only if
    /// none did since it reserved its blocks.
    pub(super) frees: u64,
}

impl Op<'_> {
    /// Writes the superblock as format `version` (or the later one it
    /// has) at this operation's commit: it stores something older builds
    /// cannot read.
    pub(super) fn require_version(&mut self, version: u32) {
        self.sb.version = self.sb.version.max(version);
    }

    /// The file system's format version, as its superblock says.
    pub(super) fn version(&self) -> u32 {
        self.sb.version
    }

    pub(super) fn get(&mut self, k: &[u8]) -> Result<Option<Vec<u8>>> {
        self.tree.get(&mut self.store, k)
    }

    pub(super) fn put(&mut self, k: &[u8], v: &[u8]) -> Result<()> {
        self.tree.insert(&mut self.store, k, v).map(|_| ())
    }

    pub(super) fn del(&mut self, k: &[u8]) -> Result<()> {
        self.tree.remove(&mut self.store, k).map(|_| ())
    }

    /// A logical block for file data, near `hint`.
    pub(super) fn alloc_data(&mut self, hint: u64) -> Result<u64> {
        self.store.alloc_data(hint)
    }

    /// Up to `max` adjacent data blocks near `hint`: the first, how many.
    pub(super) fn alloc_data_run(&mut self, hint: u64, max: u64) -> Result<(u64, u64)> {
        self.store.alloc_data_run(hint, max)
    }

    /// Frees a data block of `ino`: trimmed in this operation's transaction.
    pub(super) fn free_data(&mut self, ino: Ino, lba: u64) {
        if self.freed_from.last() != Some(&ino) {
            self.freed_from.push(ino);
        }
        self.store.free_data(lba);
    }

    /// Lets this operation's data writes (`txn`, whole blocks it
    /// allocated) wait for the next commit; `txn` back if it holds more.
    pub(super) fn defer_data(&mut self, txn: Transaction) -> std::result::Result<(), Transaction> {
        self.store.defer_data(txn)
    }

    /// The inode, with its lazy times (if any) applied.
    pub(super) fn inode(&mut self, ino: Ino) -> Result<Inode> {
        let mut i = match self.get(&key(ino, kind::INODE, &[]))? {
            Some(v) => Inode::decode(&v, ino)?,
            None => return Err(Posix::NotFound.at(format!("inode {ino}"))),
        };
        if let Some(t) = self.lazy.get(&ino) {
            i.mtime = t.mtime;
            i.ctime = t.ctime;
            if let Some(a) = t.atime {
                i.atime = a;
            }
        }
        Ok(i)
    }

    /// The file's cached map, if any, is to be dropped once this operation
    /// succeeds: it changed the file in a way the map does not follow.
    pub(super) fn forget_map(&mut self, ino: Ino) {
        self.map_changes.push((ino, MapChange::Forget));
    }

    /// Stores the inode; its lazy times, already applied by `inode`, are
    /// now part of this operation.
    pub(super) fn put_inode(&mut self, ino: Ino, i: &Inode) -> Result<()> {
        self.map_changes.push((
            ino,
            MapChange::Inode {
                size: i.size,
                setid: FileMap::setid_of(i),
            },
        ));
        if let Some(t) = self.lazy.remove(&ino) {
            self.lazy_undo.push((ino, Some(t)));
        }
        self.put(&key(ino, kind::INODE, &[]), &i.encode())
    }

    /// Sets times in memory only; the next sync (at most 5 s away in a
    /// mount) stores them. `mtime` and `ctime` always change; `atime` if given.
    pub(super) fn set_times_lazily(
        &mut self,
        ino: Ino,
        atime: Option<Time>,
        mtime: Time,
        ctime: Time,
    ) {
        let atime = atime.or_else(|| self.lazy.get(&ino).and_then(|t| t.atime));
        let old = self.lazy.insert(
            ino,
            LazyTimes {
                atime,
                mtime,
                ctime,
            },
        );
        self.lazy_undo.push((ino, old));
    }

    /// Sets mtime and ctime to `t` in memory only (see `set_times_lazily`).
    pub(super) fn touch_lazily(&mut self, ino: Ino, t: Time) {
        self.set_times_lazily(ino, None, t, t);
    }

    fn dir(&mut self, ino: Ino) -> Result<Inode> {
        let i = self.inode(ino)?;
        if !i.is_dir() {
            return Err(Posix::NotDir.at(format!("inode {ino}")));
        }
        Ok(i)
    }

    fn entry(&mut self, dir: Ino, name: &[u8]) -> Result<Option<Dirent>> {
        match self.get(&key(dir, kind::DIRENT, name))? {
            Some(v) => Dirent::decode(&v).map(Some),
            None => Ok(None),
        }
    }

    /// Adds `name -> ino` to `dir` (which the caller has loaded as `d`).
    fn add_entry(
        &mut self,
        dir: Ino,
        d: &mut Inode,
        name: &[u8],
        ino: Ino,
        mode: u32,
    ) -> Result<()> {
        let cookie = d.next_cookie;
        d.next_cookie += 1;
        let e = Dirent {
            ino,
            cookie,
            mode: file_type(mode),
        };
        self.put(&key(dir, kind::DIRENT, name), &e.encode())?;
        self.put(&key(dir, kind::COOKIE, &cookie.to_be_bytes()), name)
    }

    fn remove_entry(&mut self, dir: Ino, name: &[u8], e: &Dirent) -> Result<()> {
        self.del(&key(dir, kind::DIRENT, name))?;
        self.del(&key(dir, kind::COOKIE, &e.cookie.to_be_bytes()))
    }

    fn is_empty_dir(&mut self, ino: Ino) -> Result<bool> {
        let (s, e) = kind_range(ino, kind::DIRENT);
        Ok(self.tree.range(&mut self.store, &s, &e, 1)?.is_empty())
    }

    /// The holds on this file system's inodes.
    fn holds(&self) -> Result<std::sync::MutexGuard<'_, Holds>> {
        self.holds.lock().map_err(|_| FsError::PreviousIo)
    }

    /// Counts a reference the caller (the kernel) keeps to `ino`.
    fn remember(&mut self, ino: Ino) -> Result<()> {
        self.holds()?.remember(ino);
        Ok(())
    }

    /// Drops one link to `ino`; deletes the inode when none is left and
    /// nothing holds it. Returns whether [`Fs::reclaim`] has more to free
    /// once this operation has committed.
    fn unlink_inode(&mut self, ino: Ino, now: Time) -> Result<bool> {
        let mut i = self.inode(ino)?;
        i.nlink = i.nlink.saturating_sub(if i.is_dir() { 2 } else { 1 });
        i.ctime = now;
        if i.nlink > 0 {
            self.put_inode(ino, &i)?;
            return Ok(false);
        }
        let (open, held) = {
            let h = self.holds()?;
            (h.is_open(ino), h.is_held(ino))
        };
        if !held && i.blocks <= PURGE_STEP {
            self.purge(ino)?;
            return Ok(false);
        }
        // An orphan: still open or known to the kernel, or too large to
        // free in one transaction. `reclaim` finishes it (at the last close
        // or forget, right after this operation, or at the next mount
        // after a crash). Data nobody has open goes now.
        self.put_inode(ino, &i)?;
        self.put(&orphan_key(ino), &[])?;
        self.holds()?.add_orphan(ino);
        if open {
            return Ok(false);
        }
        let all_data_freed = self.free_some_chunks(ino, PURGE_STEP)?;
        Ok(!all_data_freed || !held)
    }

    /// Frees up to about `max` data blocks of `ino`, chunk by chunk, keeping
    /// the inode's block count right. Returns whether no chunk is left.
    fn free_some_chunks(&mut self, ino: Ino, max: u64) -> Result<bool> {
        self.forget_map(ino);
        let (s, e) = kind_range(ino, kind::CHUNK);
        let mut i = self.inode(ino)?;
        let mut freed = 0;
        let done = loop {
            let batch = self.tree.range(&mut self.store, &s, &e, 64)?;
            if batch.is_empty() {
                break true;
            }
            for (k, v) in batch {
                let n = self.free_chunk_blocks(ino, &v);
                i.blocks = i.blocks.saturating_sub(n);
                freed += n;
                self.del(&k)?;
            }
            if freed >= max {
                break false;
            }
        };
        if freed > 0 {
            self.put_inode(ino, &i)?;
        }
        Ok(done)
    }

    /// Removes every item of an inode, freeing its data blocks.
    pub(super) fn purge(&mut self, ino: Ino) -> Result<()> {
        self.forget_map(ino);
        // A truncation still in progress has nothing left to do.
        self.del(&truncating_key(ino))?;
        let (s, e) = inode_range(ino);
        loop {
            let batch = self.tree.range(&mut self.store, &s, &e, 256)?;
            if batch.is_empty() {
                return Ok(());
            }
            for (k, v) in batch {
                if k.get(8) == Some(&kind::CHUNK) {
                    self.free_chunk_blocks(ino, &v);
                }
                self.del(&k)?;
            }
        }
    }

    /// Frees the data blocks a chunk item's value names; returns how many.
    fn free_chunk_blocks(&mut self, ino: Ino, v: &[u8]) -> u64 {
        let mut n = 0;
        for b in v.chunks_exact(8) {
            let lba = u64::from_le_bytes(b.try_into().expect("8 bytes"));
            if lba != 0 {
                self.free_data(ino, lba);
                n += 1;
            }
        }
        n
    }

    /// Refuses to move directory `moving` into `into` or below it.
    fn check_not_below(&mut self, moving: Ino, into: Ino) -> Result<()> {
        let mut at = into;
        for _ in 0..4096 {
            if at == moving {
                return Err(Posix::Invalid.at("moving a directory into itself"));
            }
            if at == ROOT_INO {
                return Ok(());
            }
            at = self.inode(at)?.parent;
        }
        Err(FsError::Corrupted("directory parents form a loop".into()))
    }

    /// RENAME_EXCHANGE: the two names swap inodes; directories change
    /// parents and the parents' link counts follow.
    fn exchange(
        &mut self,
        (parent, name, src): (Ino, &[u8], Dirent),
        (newparent, newname, dst): (Ino, &[u8], Dirent),
        now: Time,
    ) -> Result<()> {
        let src_dir = src.mode == libc::S_IFDIR;
        let dst_dir = dst.mode == libc::S_IFDIR;
        if src_dir && parent != newparent {
            self.check_not_below(src.ino, newparent)?;
        }
        if dst_dir && parent != newparent {
            self.check_not_below(dst.ino, parent)?;
        }
        self.put(
            &key(parent, kind::DIRENT, name),
            &Dirent {
                ino: dst.ino,
                mode: dst.mode,
                ..src
            }
            .encode(),
        )?;
        self.put(
            &key(newparent, kind::DIRENT, newname),
            &Dirent {
                ino: src.ino,
                mode: src.mode,
                ..dst
            }
            .encode(),
        )?;
        for (ino, is_dir, new_parent) in [(src.ino, src_dir, newparent), (dst.ino, dst_dir, parent)]
        {
            let mut i = self.inode(ino)?;
            if is_dir {
                i.parent = new_parent;
            }
            i.ctime = now;
            self.put_inode(ino, &i)?;
        }
        if parent != newparent && src_dir != dst_dir {
            let (gains, loses) = if src_dir {
                (newparent, parent)
            } else {
                (parent, newparent)
            };
            let mut g = self.inode(gains)?;
            g.nlink += 1;
            self.put_inode(gains, &g)?;
            let mut l = self.inode(loses)?;
            l.nlink -= 1;
            self.put_inode(loses, &l)?;
        }
        for p in [parent, newparent] {
            let mut d = self.inode(p)?;
            d.mtime = now;
            d.ctime = now;
            self.put_inode(p, &d)?;
        }
        Ok(())
    }

    /// A plain rename: `src` moves to `newparent/newname`, replacing `dst`
    /// unless RENAME_NOREPLACE. Returns the replaced inode if `reclaim`
    /// has more to free after the commit.
    fn move_entry(
        &mut self,
        (parent, name, src): (Ino, &[u8], Dirent),
        (newparent, newname): (Ino, &[u8]),
        dst: Option<Dirent>,
        flags: u32,
        now: Time,
    ) -> Result<Option<Ino>> {
        let src_dir = src.mode == libc::S_IFDIR;
        let mut replaced = None;
        if let Some(dst) = dst {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(Posix::Exists.at(String::from_utf8_lossy(newname)));
            }
            if dst.ino == src.ino {
                // Two names of one file: POSIX says do nothing.
                return Ok(None);
            }
            let dst_dir = dst.mode == libc::S_IFDIR;
            match (src_dir, dst_dir) {
                (true, false) => return Err(Posix::NotDir.at(String::from_utf8_lossy(newname))),
                (false, true) => return Err(Posix::IsDir.at(String::from_utf8_lossy(newname))),
                (true, true) if !self.is_empty_dir(dst.ino)? => {
                    return Err(Posix::NotEmpty.at(String::from_utf8_lossy(newname)))
                }
                _ => {}
            }
            if src_dir {
                self.check_not_below(src.ino, newparent)?;
            }
            self.remove_entry(newparent, newname, &dst)?;
            if self.unlink_inode(dst.ino, now)? {
                replaced = Some(dst.ino);
            }
            if dst_dir {
                let mut np = self.inode(newparent)?;
                np.nlink -= 1;
                self.put_inode(newparent, &np)?;
            }
        } else if src_dir && parent != newparent {
            self.check_not_below(src.ino, newparent)?;
        }
        self.remove_entry(parent, name, &src)?;
        let mut np = self.inode(newparent)?;
        self.add_entry(newparent, &mut np, newname, src.ino, src.mode)?;
        np.mtime = now;
        np.ctime = now;
        if src_dir && parent != newparent {
            np.nlink += 1;
        }
        self.put_inode(newparent, &np)?;
        if parent != newparent {
            let mut p = self.inode(parent)?;
            if src_dir {
                p.nlink -= 1;
            }
            p.mtime = now;
            p.ctime = now;
            self.put_inode(parent, &p)?;
        }
        let mut i = self.inode(src.ino)?;
        if src_dir {
            i.parent = newparent;
        }
        i.ctime = now;
        self.put_inode(src.ino, &i)?;
        Ok(replaced)
    }

    /// A fresh inode number. It is not persisted here: mount derives the
    /// next number from the highest inode in the tree, which is the truth
    /// after any crash, so creating a file does not rewrite the superblock.
    /// Numbers stay below [`MAX_INO`]: the mount shows snapshots' inodes
    /// above it.
    fn new_ino(&mut self) -> Result<Ino> {
        let ino = Ino(self.sb.next_ino);
        if ino.0 >= MAX_INO {
            return Err(FsError::NoSpace(format!(
                "inode numbers are exhausted (the file system has used all {MAX_INO})"
            )));
        }
        self.sb.next_ino += 1;
        Ok(ino)
    }
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(Posix::NameTooLong.at(format!("a name of {} bytes", name.len())));
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Posix::Invalid.at(format!("the name {:?}", String::from_utf8_lossy(name))));
    }
    Ok(())
}

impl Fs {
    /// Creates an empty file system (a root directory owned by `uid:gid`)
    /// on a volume that holds nothing yet.
    pub fn format(volume: &Volume, uid: u32, gid: u32) -> Result<()> {
        if !volume.allocated_runs()?.is_empty() {
            return Err(Posix::Invalid.at("the volume already holds data; create a new one"));
        }
        let mut alloc = Allocator::from_allocated(1, volume.logical_blocks(), &[]);
        let mut cache = NodeCache::default();
        let mut pending = Pending::default();
        let mut store = VolumeStore::new(volume, &mut alloc, &mut cache, &mut pending);
        let mut tree = BTree::create(&mut store)?;
        let mut root = Inode::new(libc::S_IFDIR | 0o755, uid, gid, 0);
        root.nlink = 2;
        root.parent = ROOT_INO;
        tree.insert(&mut store, &key(ROOT_INO, kind::INODE, &[]), &root.encode())?;
        let sb = Superblock {
            version: FS_VERSION_BASE,
            root: tree.root,
            next_ino: ROOT_INO.0 + 1,
        };
        let mut txn = Transaction::new();
        txn.write(SUPERBLOCK, sb.encode());
        store.commit(txn)?;
        Ok(volume.flush()?)
    }

    /// Mounts the file system on `volume`, reclaiming inodes that were
    /// unlinked while open when the last mount ended.
    pub fn mount(volume: Volume) -> Result<Fs> {
        let mut b = vec![0u8; BLOCK_SIZE];
        volume.read(SUPERBLOCK, &mut b)?;
        let sb = Superblock::decode(&b)?;
        let limit = volume.logical_blocks();
        let alloc = if volume.snapshot_id().is_some() {
            // A snapshot is read-only: nothing is ever allocated through
            // it, so its block map is not walked (that would cost as much
            // as the snapshot is large).
            Allocator::from_allocated(1, limit, &[(1, limit.saturating_sub(1))])
        } else {
            Allocator::from_allocated(1, limit, &volume.allocated_runs()?)
        };
        let pending = Pending::default();
        let fs = Fs {
            meta_poisoned: Default::default(),
            meta_stats: Default::default(),
            meta_waited: Default::default(),
            step_pauses: Default::default(),
            map_loads: Default::default(),
            has_pending: Default::default(),
            unwritten: pending.unwritten(),
            meta: parking_lot::Mutex::new(Meta {
                tree: BTree { root: sb.root },
                sb,
                alloc,
                cache: NodeCache::default(),
                pending,
                lazy: HashMap::new(),
            }),
            holds: Mutex::new(Holds::default()),
            files: Mutex::new(FxHashMap::default()),
            appending: Mutex::new(HashMap::new()),
            appends_unlocked: Default::default(),
            append_stop: Default::default(),
            between_append_steps: Mutex::new(None),
            reads: std::sync::RwLock::new(()),
            kernel_times: Default::default(),
            syncs: Mutex::default(),
            sync_done: std::sync::Condvar::new(),
            volume,
        };
        fs.meta_stats.publish(&fs.meta.lock());
        let highest = fs.read_op(|op| op.tree.last_key(&mut op.store))?;
        if let Some(k) = highest {
            let ino = k
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| FsError::Corrupted("a short metadata key".into()))?;
            let mut m = fs.lock_meta()?;
            m.sb.next_ino = m.sb.next_ino.max(ino + 1);
        }
        if fs.volume.is_read_only() {
            return Ok(fs);
        }
        fs.reclaim_orphans()?;
        fs.finish_truncations()?;
        Ok(fs)
    }

    /// Finishes truncations a crash interrupted: frees what lies past
    /// each file's size (see [`kind::TRUNCATING`]).
    fn finish_truncations(&self) -> Result<()> {
        for ino in self.listed(kind::TRUNCATING, "a truncation record's key")? {
            self.finish_truncate(ino)?;
        }
        Ok(())
    }

    /// The inode numbers that the items of `kind` under inode 0 name
    /// (orphans, truncations); `what` names a malformed key.
    fn listed(&self, kind: u8, what: &str) -> Result<Vec<Ino>> {
        self.read_op(|op| {
            let (s, e) = kind_range(ORPHANS, kind);
            op.tree
                .range(&mut op.store, &s, &e, usize::MAX)?
                .iter()
                .map(|(k, _)| {
                    key_suffix_u64(k)
                        .map(Ino)
                        .ok_or_else(|| FsError::Corrupted(what.into()))
                })
                .collect()
        })
    }

    /// Frees every orphan on disk: at mount (left by the last mount or a
    /// crash) and at unmount (nothing holds an inode any more).
    fn reclaim_orphans(&self) -> Result<()> {
        let orphans = self.listed(kind::ORPHAN, "an orphan key")?;
        if let Err(e) = self.reclaim_all(&orphans) {
            tracing::warn!("freeing deleted inodes (retried at the next mount): {e}");
        }
        Ok(())
    }

    /// Whether writes leave file times to the kernel (see `kernel_times`).
    pub fn kernel_times(&self) -> bool {
        self.kernel_times.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The FUSE layer calls this when the kernel caches writes and keeps
    /// file times itself.
    pub fn set_kernel_times(&self, on: bool) {
        self.kernel_times
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn holds(&self) -> Result<std::sync::MutexGuard<'_, Holds>> {
        self.holds.lock().map_err(|_| FsError::PreviousIo)
    }

    /// From now on every inode that `lookup`, `create_node`, `symlink`,
    /// `link` and `readdir_plus` return is held until [`Fs::forget`] (the
    /// kernel's lookup count, which a FUSE mount keeps).
    pub fn count_lookups(&self) -> Result<()> {
        self.holds()?.count_lookups();
        Ok(())
    }

    /// The kernel forgot `n` lookups of `ino` (FORGET). An orphan that
    /// nothing holds any more is freed with others, in one transaction
    /// (or at the next sync).
    pub fn forget(&self, ino: Ino, n: u64) -> Result<()> {
        self.forget_many(&[(ino, n)])
    }

    /// [`Fs::forget`] for many inodes.
    pub fn forget_many(&self, forgets: &[(Ino, u64)]) -> Result<()> {
        let left = self.forget_leaving(forgets)?;
        if left.unheld.is_empty() {
            return Ok(());
        }
        self.reclaim_all(&left.unheld)
    }

    /// [`Fs::forget_many`] that leaves the freeing of the orphans nothing
    /// holds any more to [`Fs::free_leftover`].
    pub fn forget_leaving(&self, forgets: &[(Ino, u64)]) -> Result<Leftover> {
        let mut h = self.holds()?;
        let full = forgets
            .iter()
            .fold(false, |f, (ino, n)| h.forget(*ino, *n) | f);
        if !full {
            return Ok(Leftover::default());
        }
        Ok(Leftover {
            unheld: h.take_unheld(),
            ..Leftover::default()
        })
    }

    /// Frees now what an operation left that fits in one transaction
    /// (the orphans of small files, as before `Leftover` existed) and
    /// returns the rest, a large file's, for [`Fs::free_leftover`]: only
    /// that is worth handing to another thread.
    pub fn free_small(&self, left: Leftover) -> Leftover {
        let mut rest = Leftover::default();
        if let Some(ino) = left.unlinked {
            match self.read_op(|op| op.inode(ino).map(|i| i.blocks)) {
                Ok(blocks) if blocks <= PURGE_STEP => self.free_unlinked(ino),
                // Large, or not readable: `free_leftover` reports a failure.
                _ => rest.unlinked = Some(ino),
            }
        }
        if !left.unheld.is_empty() {
            match self.reclaim_small(&left.unheld) {
                Ok(large) => rest.unheld = large,
                Err(e) => tracing::warn!("freeing deleted inodes (retried at unmount): {e}"),
            }
        }
        rest
    }

    /// Frees what an operation left (see [`Leftover`]). The operation has
    /// committed, so a failure is logged, not returned: the orphan list
    /// finishes the job at unmount or at the next mount.
    pub fn free_leftover(&self, left: Leftover) {
        if let Some(ino) = left.unlinked {
            self.free_unlinked(ino);
        }
        if !left.unheld.is_empty() {
            if let Err(e) = self.reclaim_all(&left.unheld) {
                tracing::warn!("freeing deleted inodes (retried at unmount): {e}");
            }
        }
    }

    /// [`Fs::reclaim`] of an orphan whose operation has committed: a
    /// failure is logged, and the orphan list retries it.
    fn free_unlinked(&self, ino: Ino) {
        if let Err(e) = self.reclaim(ino) {
            tracing::warn!("freeing deleted inode {ino} (retried at the next mount): {e}");
        }
    }

    /// Frees the orphans that nothing holds any more.
    fn reclaim_unheld(&self) -> Result<()> {
        let batch = self.holds()?.take_unheld();
        if batch.is_empty() {
            return Ok(());
        }
        self.reclaim_all(&batch)
    }

    /// Notes an open handle on `ino`.
    pub fn open(&self, ino: Ino) {
        if let Ok(mut h) = self.holds.lock() {
            h.open(ino);
        }
    }

    /// Closes a handle; the last close of an unlinked inode frees its data
    /// (and the inode, once the kernel has forgotten it too).
    pub fn release(&self, ino: Ino) -> Result<()> {
        match self.release_leaving(ino)?.unlinked {
            Some(ino) => self.reclaim(ino),
            None => Ok(()),
        }
    }

    /// [`Fs::release`] that leaves the freeing to [`Fs::free_leftover`].
    pub fn release_leaving(&self, ino: Ino) -> Result<Leftover> {
        let Some(orphan) = self.holds()?.release(ino) else {
            return Ok(Leftover::default());
        };
        if let Ok(mut files) = self.files.lock() {
            files.remove(&ino);
        }
        Ok(Leftover {
            unlinked: orphan.then_some(ino),
            ..Leftover::default()
        })
    }

    /// Frees what an orphan (an inode with no links left) still has, in
    /// transactions of at most PURGE_STEP blocks: its data once no handle
    /// is open, then the inode once nothing holds it. A crash between the
    /// steps leaves an orphan that the next mount finishes.
    fn reclaim(&self, ino: Ino) -> Result<()> {
        self.op_steps(|op, _| {
            let orphan = orphan_key(ino);
            if op.get(&orphan)?.is_none() {
                return Ok(Some(()));
            }
            let (open, held) = {
                let h = op.holds()?;
                (h.is_open(ino), h.is_held(ino))
            };
            if open {
                // Opened again (through a name looked up before the
                // unlink): its last close finishes the job.
                return Ok(Some(()));
            }
            if !op.free_some_chunks(ino, PURGE_STEP)? {
                return Ok(None);
            }
            if held {
                // The kernel still knows it: its last forget finishes.
                return Ok(Some(()));
            }
            op.del(&orphan)?;
            op.purge(ino)?;
            op.holds()?.reclaimed(ino);
            Ok(Some(()))
        })
    }

    /// Frees orphans that nothing holds: the small ones together, in one
    /// transaction of at most PURGE_STEP blocks, the rest by `reclaim`.
    fn reclaim_all(&self, inos: &[Ino]) -> Result<()> {
        for ino in self.reclaim_small(inos)? {
            self.reclaim(ino)?;
        }
        Ok(())
    }

    /// The first half of [`Fs::reclaim_all`]: frees the small orphans in
    /// one transaction and returns the others.
    fn reclaim_small(&self, inos: &[Ino]) -> Result<Vec<Ino>> {
        self.op(|op, _| {
            let mut budget = PURGE_STEP;
            let mut rest = Vec::new();
            for &ino in inos {
                let orphan = orphan_key(ino);
                if op.get(&orphan)?.is_none() || op.holds()?.is_held(ino) {
                    continue;
                }
                let blocks = op.inode(ino)?.blocks;
                if blocks > budget {
                    rest.push(ino);
                    continue;
                }
                budget -= blocks;
                op.del(&orphan)?;
                op.purge(ino)?;
                op.holds()?.reclaimed(ino);
            }
            Ok(rest)
        })
    }

    /// Runs `f` as if a data read were in flight (holding `reads`): for
    /// tests of the freed-block quarantine.
    #[doc(hidden)]
    pub fn with_read_in_flight<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let _reading = self.reads.read().map_err(|_| FsError::PreviousIo)?;
        Ok(f())
    }

    /// Data blocks whose small writes wait for the next commit. For tests.
    #[doc(hidden)]
    pub fn waiting_data_blocks(&self) -> usize {
        self.unwritten.read().len()
    }

    /// The data block addresses of a file, in file order (0 for holes).
    #[doc(hidden)]
    pub fn file_blocks(&self, ino: Ino) -> Result<Vec<u64>> {
        self.read_op(|op| {
            let i = op.inode(ino)?;
            (0..i.size.div_ceil(BLOCK_SIZE as u64))
                .map(|fb| op.block_of(ino, fb))
                .collect()
        })
    }

    /// Runs `f` while holding the metadata lock, as a long commit would:
    /// for tests that show which operations do not wait for it.
    #[doc(hidden)]
    pub fn with_metadata_locked<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let _guard = self.lock_meta()?;
        Ok(f())
    }

    pub(super) fn volume(&self) -> &Volume {
        &self.volume
    }

    /// Whether completed operations' metadata changes wait for a commit.
    pub(super) fn has_pending(&self) -> bool {
        self.has_pending.load(Ordering::Acquire)
    }

    /// How many times a long operation made of steps paused to leave the
    /// metadata lock to others. For tests and diagnostics.
    #[doc(hidden)]
    pub fn step_pauses(&self) -> u64 {
        self.step_pauses.load(Ordering::Relaxed)
    }

    /// How many large appends were written without the metadata lock
    /// (see `Fs::append_outside_lock`). For tests and diagnostics.
    #[doc(hidden)]
    pub fn appends_unlocked(&self) -> u64 {
        self.appends_unlocked.load(Ordering::Relaxed)
    }

    /// For tests: every large append that goes without the metadata lock
    /// fails after its step `step` (1: blocks reserved, 2: data written),
    /// leaving the volume as a crash there would; 3 fails it after step 2
    /// with an error it then cleans up after, as a failed write; 0 turns
    /// it off.
    #[doc(hidden)]
    pub fn stop_large_appends_after(&self, step: u8) {
        self.append_stop.store(step, Ordering::Relaxed);
    }

    /// For tests: every large append that goes without the metadata lock
    /// runs `hook` between reserving its blocks and writing them, as
    /// another process's operation might run there, with the blocks it
    /// reserved; `None` removes it.
    #[doc(hidden)]
    pub fn between_large_append_steps(&self, hook: Option<AppendHook>) {
        if let Ok(mut h) = self.between_append_steps.lock() {
            *h = hook;
        }
    }

    /// How many times a file's block map was loaded from the tree (each
    /// load reads all of the file's chunk items). For tests and diagnostics.
    #[doc(hidden)]
    pub fn map_loads(&self) -> u64 {
        self.map_loads.load(Ordering::Relaxed)
    }

    /// The volume's counters. For tests and diagnostics.
    #[doc(hidden)]
    pub fn volume_stats(&self) -> Result<crate::volume::Stats> {
        Ok(self.volume.stats()?)
    }

    /// The volume's own check (pages, blocks, bitmaps). For tests.
    #[doc(hidden)]
    pub fn volume_check(&self) -> Result<crate::volume::CheckReport> {
        self.commit_pending()?;
        Ok(self.volume.check()?)
    }

    /// Logical blocks the volume maps (superblock, metadata nodes, data).
    #[doc(hidden)]
    pub fn mapped_blocks(&self) -> Result<u64> {
        self.commit_pending()?;
        Ok(self.volume.allocated_runs()?.iter().map(|(_, n)| n).sum())
    }

    /// Stores lazy times, commits pending operations and flushes the
    /// volume: after this returns, every completed operation survives a
    /// crash (fsync, syncfs, the periodic flush).
    pub fn sync(&self) -> Result<()> {
        if self.volume.is_read_only() {
            return Ok(());
        }
        if let Err(e) = self.reclaim_unheld() {
            tracing::warn!("freeing deleted inodes (retried at the next mount): {e}");
        }
        let times = self.op_now(|op, _| Self::store_lazy_times(op));
        // The volume is flushed even when the times could not be stored
        // (a full volume): committed data must not wait for them, nor
        // pending operations.
        let pending = match &times {
            Ok(()) => Ok(()),
            Err(_) => self.commit_pending(),
        };
        let flushed = self.volume.flush();
        if let Err(e) = &times {
            tracing::warn!("storing file times: {e}");
        }
        flushed?;
        pending
    }

    /// [`Fs::sync`] shared between concurrent callers (group commit): a
    /// caller waits for one sync that began after it called, running it
    /// itself if none is running. However many processes fsync at once,
    /// at most one sync runs and one more waits to start.
    pub fn sync_shared(&self) -> Result<()> {
        let lock = || self.syncs.lock().map_err(|_| FsError::PreviousIo);
        let mut round = lock()?;
        // A sync already running may have begun before our data was
        // committed: ours is the next one to start.
        let want = round.started + 1;
        loop {
            if round.finished >= want {
                // A failed flush poisons the volume: every later operation
                // fails too, so a waiter reports the earlier failure.
                return match round.failed {
                    Some(n) if n >= want => Err(FsError::PreviousIo),
                    _ => Ok(()),
                };
            }
            if !round.running {
                round.running = true;
                round.started += 1;
                let me = round.started;
                drop(round);
                let r = self.sync();
                round = lock()?;
                round.running = false;
                round.finished = me;
                if r.is_err() {
                    round.failed = Some(me);
                }
                self.sync_done.notify_all();
                return r;
            }
            round = self
                .sync_done
                .wait(round)
                .map_err(|_| FsError::PreviousIo)?;
        }
    }

    fn store_lazy_times(op: &mut Op) -> Result<()> {
        let pending: Vec<Ino> = op.lazy.keys().copied().collect();
        for ino in pending {
            // Gone since (unlinked and reclaimed): nothing to store.
            match op.inode(ino) {
                Ok(i) => op.put_inode(ino, &i)?,
                Err(FsError::Refused {
                    why: Posix::NotFound,
                    ..
                }) => {
                    let t = op.lazy.remove(&ino);
                    op.lazy_undo.push((ino, t));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Takes a snapshot of the file system named `name` and returns its id.
    /// It holds every operation that completed before and none that had
    /// not begun: the metadata lock is held throughout, and times kept
    /// in memory are stored first.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotId> {
        let mut guard = self.lock_meta()?;
        self.op_in(&mut guard, false, |op, _| Self::store_lazy_times(op))?;
        let id = self.volume.snapshot_create(name)?;
        drop(guard);
        Ok(id)
    }

    /// A read-only file system showing snapshot `id`.
    pub fn open_snapshot(&self, id: SnapshotId) -> Result<Fs> {
        Fs::mount(self.volume.snapshot_view(id)?)
    }

    /// (id, name) of every snapshot, oldest first.
    pub fn snapshot_names(&self) -> Result<Vec<(SnapshotId, String)>> {
        Ok(self
            .volume
            .snapshot_names()?
            .into_iter()
            .map(|(id, n, _, _)| (id, n))
            .collect())
    }

    /// Every snapshot with the space it alone holds (walks what differs
    /// between neighbouring snapshots).
    pub fn snapshot_list(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self.volume.snapshot_list()?)
    }

    /// Deletes snapshot `name` and frees what only it held.
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        Ok(self.volume.snapshot_delete(name)?)
    }

    /// Frees the orphans nothing holds any more, stores lazy times,
    /// flushes and closes the volume.
    /// The volume's id (its header's).
    pub fn volume_id(&self) -> [u8; 16] {
        self.volume.header().volume_id
    }

    pub fn unmount(self) -> Result<()> {
        self.unmount_at().map(|_| ())
    }

    /// [`Fs::unmount`], returning the sequence number of the volume's
    /// newest durable checkpoint (what the host records against rollback).
    pub fn unmount_at(self) -> Result<u64> {
        if !self.volume.is_read_only() {
            self.holds()?.clear();
            self.reclaim_orphans()?;
        }
        let synced = self.sync();
        let closed = self.volume.close_at();
        synced.and(closed.map_err(FsError::from))
    }

    /// Runs `f` as one operation: its tree changes, plus whatever it adds to
    /// the transaction, commit atomically; on any error nothing changes.
    /// An operation that changes only metadata (nothing in the
    /// transaction) is not written yet: its changes wait, with those of
    /// the operations before it, for the next commit (see [`Pending`]).
    pub(super) fn op<T>(
        &self,
        f: impl FnOnce(&mut Op, &mut Transaction) -> Result<T>,
    ) -> Result<T> {
        let mut guard = self.lock_meta()?;
        self.op_in(&mut guard, true, f)
    }

    /// [`Fs::op`] committed at once, with every change still pending.
    fn op_now<T>(&self, f: impl FnOnce(&mut Op, &mut Transaction) -> Result<T>) -> Result<T> {
        let mut guard = self.lock_meta()?;
        self.op_in(&mut guard, false, f)
    }

    /// Commits the metadata changes of completed operations that are still
    /// pending (see [`Pending`]): after this, the volume's log holds every
    /// completed operation (a flush makes them durable).
    pub fn commit_pending(&self) -> Result<()> {
        self.commit_pending_if(|p| !p.is_empty())
    }

    fn commit_pending_in(&self, guard: &mut Meta) -> Result<()> {
        if guard.pending.is_empty() {
            return Ok(());
        }
        self.run_op(guard, false, |_, _| Ok(()))
    }

    /// Commits pending frees, so that free space counts them.
    pub(super) fn commit_pending_frees(&self) -> Result<()> {
        self.commit_pending_if(|p| p.freed_blocks() > 0)
    }

    /// Commits what is pending if `needed` says so of it (never on a
    /// read-only file system, where nothing is).
    fn commit_pending_if(&self, needed: impl Fn(&Pending) -> bool) -> Result<()> {
        if self.volume.is_read_only() {
            return Ok(());
        }
        let mut guard = self.lock_meta()?;
        if !needed(&guard.pending) {
            return Ok(());
        }
        self.commit_pending_in(&mut guard)
    }

    /// Runs `step` as one operation after another, each its own
    /// transaction, until it returns a value. Between steps the metadata
    /// lock goes to any thread waiting for it (a fair hand-over) before
    /// this one takes it again, so a long operation made of short steps
    /// (fallocate, truncate, freeing a large file) delays another
    /// process's operation by at most one step.
    pub(super) fn op_steps<T>(
        &self,
        mut step: impl FnMut(&mut Op, &mut Transaction) -> Result<Option<T>>,
    ) -> Result<T> {
        let mut guard = self.lock_meta()?;
        // Only a wait during one of this operation's steps counts.
        self.meta_waited.store(false, Ordering::Relaxed);
        loop {
            let began = Instant::now();
            if let Some(v) = self.op_in(&mut guard, false, &mut step)? {
                return Ok(v);
            }
            if self.meta_waited.swap(false, Ordering::Relaxed) {
                // Others waited for the lock during this step: they get it
                // for four times as long as the step held it. A process
                // whose every request needs the lock (a mkdir loop) would
                // otherwise find it taken at each of its requests and wait
                // out most of a step each time: the hand-over below gives
                // it only the request already waiting, not the next one.
                // (Once as long gave such a process a third of its solo
                // rate, which metadata-only operations waiting for a
                // commit had made faster; four times, nearly half.)
                let held = (began.elapsed() * STEP_PAUSE_FACTOR).min(MAX_STEP_PAUSE);
                drop(guard);
                self.step_pauses.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(held);
                guard = self.lock_meta()?;
                // A wait of this thread's own, just now, is not one of
                // another's during a step.
                self.meta_waited.store(false, Ordering::Relaxed);
            } else {
                guard.bump();
            }
            if self.meta_poisoned.load(Ordering::SeqCst) {
                return Err(FsError::PreviousIo);
            }
        }
    }

    /// The metadata lock, unless a thread panicked holding it.
    fn lock_meta(&self) -> Result<MetaGuard<'_>> {
        let guard = match self.meta.try_lock() {
            Some(g) => g,
            None => {
                self.meta_waited.store(true, Ordering::Relaxed);
                self.meta.lock()
            }
        };
        if self.meta_poisoned.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(FsError::PreviousIo);
        }
        Ok(MetaGuard {
            guard,
            poisoned: &self.meta_poisoned,
            stats: &self.meta_stats,
        })
    }

    /// [`Fs::op`] with the metadata lock already held; `defer` says
    /// whether a change of metadata alone may wait (see [`Pending`]).
    fn op_in<T>(
        &self,
        guard: &mut Meta,
        defer: bool,
        f: impl FnOnce(&mut Op, &mut Transaction) -> Result<T>,
    ) -> Result<T> {
        if guard.pending.freed_blocks() > 0 && guard.alloc.free_blocks() < LOW_SPACE_BLOCKS {
            // Space is short: what pending operations freed becomes
            // allocatable once committed (and out of quarantine, below).
            // If that fails (the log has no room either), the changes
            // stay pending and this operation goes on: it may need no
            // space, and a read must not fail for others' changes.
            if let Err(e) = self.commit_pending_in(guard) {
                tracing::debug!("committing pending operations before one more: {e}");
            }
        }
        self.run_op(guard, defer, f)
    }

    /// [`Fs::op_in`] without its check of free space.
    fn run_op<T>(
        &self,
        guard: &mut Meta,
        defer: bool,
        f: impl FnOnce(&mut Op, &mut Transaction) -> Result<T>,
    ) -> Result<T> {
        // An operation that changed nothing (a read) never commits what
        // others left pending, so that it cannot fail for them. Near a full
        // volume nothing waits: each operation commits its own changes,
        // small transactions a nearly full log can still take.
        let when = if !defer {
            Commit::Now
        } else if guard.pending.nodes() >= PENDING_NODES
            || guard.pending.freed_blocks() >= PENDING_FREED
            || guard.pending.data_blocks() >= PENDING_DATA_BLOCKS
            || guard.alloc.free_blocks() < LOW_SPACE_BLOCKS
        {
            Commit::IfChanged
        } else {
            Commit::Defer
        };
        // Usually without waiting: a read in flight (holding `reads`) keeps
        // the quarantine for a later operation. When most free space is in
        // quarantine, wait for the reads in flight; they never wait for the
        // metadata lock while holding `reads`, so this cannot deadlock.
        if guard.alloc.has_quarantine() {
            if let Ok(_no_reads) = self.reads.try_write() {
                guard.alloc.release_quarantined();
            } else if guard.alloc.mostly_quarantined() {
                let _no_reads = self.reads.write().map_err(|_| FsError::PreviousIo)?;
                guard.alloc.release_quarantined();
            }
        }
        let (old_root, old_sb) = (guard.tree.root, guard.sb);
        let result = {
            let Meta {
                sb,
                tree,
                alloc,
                cache,
                pending,
                lazy,
            } = &mut *guard;
            let mut txn = Transaction::new();
            let mut op = Op {
                store: VolumeStore::new(&self.volume, alloc, cache, pending)
                    .waiting_needs_room(LOW_SPACE_BLOCKS),
                tree,
                sb,
                holds: &self.holds,
                lazy,
                lazy_undo: Vec::new(),
                map_changes: Vec::new(),
                freed_from: Vec::new(),
            };
            let r = f(&mut op, &mut txn);
            // Counted whether or not the operation commits: an append
            // that finds a count changed only takes the locked path.
            self.freed_data_of(&op.freed_from);
            let lazy_undo = std::mem::take(&mut op.lazy_undo);
            let map_changes = std::mem::take(&mut op.map_changes);
            let result = r.and_then(|v| {
                let Op {
                    store, tree, sb, ..
                } = op;
                if tree.root != old_root || sb.version != old_sb.version {
                    sb.root = tree.root;
                    txn.write(SUPERBLOCK, sb.encode());
                }
                store.finish(txn, when).map(|_| v)
            });
            (result, lazy_undo, map_changes)
        };
        let (result, lazy_undo, map_changes) = result;
        if result.is_ok() && !map_changes.is_empty() {
            // Still under the metadata lock: a reader loading a map holds
            // it too, so no stale map can be put back after this.
            self.update_maps(map_changes);
        }
        if result.is_err() {
            guard.tree.root = old_root;
            guard.sb = old_sb;
            for (ino, old) in lazy_undo.into_iter().rev() {
                match old {
                    Some(t) => guard.lazy.insert(ino, t),
                    None => guard.lazy.remove(&ino),
                };
            }
        }
        self.has_pending
            .store(!guard.pending.is_empty(), Ordering::Release);
        result
    }

    /// Applies a successful operation's changes to the cached maps of the
    /// files it changed. Each map takes all of its file's changes under one
    /// write lock, so a read never sees the new size without the new
    /// blocks; readers hold that lock only to copy their blocks out.
    fn update_maps(&self, changes: Vec<(Ino, MapChange)>) {
        let mut maps: HashMap<Ino, (Arc<RwLock<FileMap>>, Vec<MapChange>)> = HashMap::new();
        {
            let Ok(mut files) = self.files.lock() else {
                return;
            };
            // Usually a handful of files are cached, and an operation
            // (reclaiming every orphan at mount) may change many more.
            let mut forget = Vec::new();
            for (ino, change) in changes {
                let Some(map) = files.get(&ino) else {
                    continue;
                };
                if matches!(change, MapChange::Forget) {
                    forget.push(ino);
                } else {
                    maps.entry(ino)
                        .or_insert_with(|| (map.clone(), Vec::new()))
                        .1
                        .push(change);
                }
            }
            for ino in forget {
                files.remove(&ino);
                maps.remove(&ino);
            }
        }
        // Still under the metadata lock, which a load of a map takes too:
        // no map is loaded meanwhile (one that the file's last close drops
        // meanwhile is updated to no effect).
        for (map, changes) in maps.into_values() {
            let mut map = map.write().unwrap_or_else(PoisonError::into_inner);
            for c in changes {
                map.apply(c);
            }
        }
    }

    /// Reads without changing anything.
    pub(super) fn read_op<T>(&self, f: impl FnOnce(&mut Op) -> Result<T>) -> Result<T> {
        self.op(|op, _| f(op))
    }

    /// Free logical blocks and inode numbers handed out so far, as the
    /// metadata lock's last holder left them (without waiting for it).
    /// Space that completed operations freed counts as free: if any is
    /// pending, it is committed first (which takes the lock).
    pub(super) fn meta_stats(&self) -> Result<(u64, u64)> {
        if self.meta_poisoned.load(Ordering::SeqCst) {
            return Err(FsError::PreviousIo);
        }
        if self.meta_stats.pending_freed.load(Ordering::Acquire) > 0 {
            self.commit_pending_frees()?;
        }
        let s = &self.meta_stats;
        Ok((
            s.free_blocks.load(Ordering::Acquire),
            s.next_ino.load(Ordering::Acquire) - 1,
        ))
    }

    pub fn getattr(&self, ino: Ino) -> Result<Inode> {
        self.read_op(|op| op.inode(ino))
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<(Ino, Inode)> {
        if name.len() > NAME_MAX {
            return Err(Posix::NameTooLong.at(format!("a name of {} bytes", name.len())));
        }
        self.read_op(|op| {
            let d = op.dir(parent)?;
            let ino = match name {
                b"." => parent,
                b".." => d.parent,
                _ => match op.entry(parent, name)? {
                    Some(e) => e.ino,
                    None => return Err(Posix::NotFound.at(String::from_utf8_lossy(name))),
                },
            };
            let i = op.inode(ino)?;
            op.remember(ino)?;
            Ok((ino, i))
        })
    }

    /// Creates a regular file, directory, FIFO, socket or device node with
    /// exactly `mode` (no umask).
    pub fn mknod(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
    ) -> Result<(Ino, Inode)> {
        self.create_node(parent, name, mode, 0, uid, gid, rdev)
    }

    /// Creates a node as open(2)/mkdir(2)/mknod(2) do: if the directory has
    /// a default ACL the new inode inherits it (and the umask is ignored),
    /// otherwise the umask applies.
    #[allow(clippy::too_many_arguments)]
    pub fn create_node(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
    ) -> Result<(Ino, Inode)> {
        check_name(name)?;
        let t = file_type(mode);
        let ok = [
            libc::S_IFREG,
            libc::S_IFDIR,
            libc::S_IFIFO,
            libc::S_IFSOCK,
            libc::S_IFCHR,
            libc::S_IFBLK,
        ];
        if !ok.contains(&t) {
            return Err(Posix::Invalid.at(format!("file type {t:o}")));
        }
        self.op(|op, _| {
            let mut d = op.dir(parent)?;
            if op.entry(parent, name)?.is_some() {
                return Err(Posix::Exists.at(String::from_utf8_lossy(name)));
            }
            let default = op.xattr(parent, acl::DEFAULT)?;
            let (mode, access) = match &default {
                Some(v) => {
                    let (a, bits) = acl::Acl::decode(v)?.create(mode);
                    (
                        (mode & !0o777) | bits,
                        (!a.is_minimal()).then(|| a.encode()),
                    )
                }
                None => (mode & !(umask & 0o777), None),
            };
            let ino = op.new_ino()?;
            let mut i = Inode::new(mode, uid, gid, rdev);
            if t == libc::S_IFDIR {
                if d.nlink >= LINK_MAX {
                    return Err(Posix::TooManyLinks.at(format!("directory {parent}")));
                }
                i.nlink = 2;
                i.parent = parent;
                d.nlink += 1;
                if let Some(v) = &default {
                    op.put_xattr(ino, acl::DEFAULT, v, None)?;
                }
            }
            if let Some(a) = access {
                op.put_xattr(ino, acl::ACCESS, &a, None)?;
            }
            op.put_inode(ino, &i)?;
            op.add_entry(parent, &mut d, name, ino, mode)?;
            d.mtime = i.ctime;
            d.ctime = i.ctime;
            op.put_inode(parent, &d)?;
            op.remember(ino)?;
            Ok((ino, i))
        })
    }

    pub fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(Ino, Inode)> {
        check_name(name)?;
        if target.is_empty() || target.len() > SYMLINK_MAX {
            return Err(
                Posix::NameTooLong.at(format!("a symlink target of {} bytes", target.len()))
            );
        }
        self.op(|op, _| {
            let mut d = op.dir(parent)?;
            if op.entry(parent, name)?.is_some() {
                return Err(Posix::Exists.at(String::from_utf8_lossy(name)));
            }
            let ino = op.new_ino()?;
            let mut i = Inode::new(libc::S_IFLNK | 0o777, uid, gid, 0);
            i.size = target.len() as u64;
            op.put_inode(ino, &i)?;
            for (n, piece) in target.chunks(1024).enumerate() {
                op.put(&key(ino, kind::SYMLINK, &[n as u8]), piece)?;
            }
            op.add_entry(parent, &mut d, name, ino, i.mode)?;
            d.mtime = i.ctime;
            d.ctime = i.ctime;
            op.put_inode(parent, &d)?;
            op.remember(ino)?;
            Ok((ino, i))
        })
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        self.read_op(|op| {
            if file_type(op.inode(ino)?.mode) != libc::S_IFLNK {
                return Err(Posix::Invalid.at(format!("inode {ino} is not a symlink")));
            }
            let (s, e) = kind_range(ino, kind::SYMLINK);
            Ok(op
                .tree
                .range(&mut op.store, &s, &e, 8)?
                .into_iter()
                .flat_map(|(_, v)| v)
                .collect())
        })
    }

    /// A new name for an existing non-directory.
    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<Inode> {
        check_name(name)?;
        self.op(|op, _| {
            let mut i = op.inode(ino)?;
            if i.is_dir() {
                return Err(Posix::Invalid.at("hard links to directories"));
            }
            if i.nlink >= LINK_MAX {
                return Err(Posix::TooManyLinks.at(format!("inode {ino}")));
            }
            let mut d = op.dir(parent)?;
            if op.entry(parent, name)?.is_some() {
                return Err(Posix::Exists.at(String::from_utf8_lossy(name)));
            }
            let now = Time::now();
            i.nlink += 1;
            i.ctime = now;
            op.put_inode(ino, &i)?;
            op.add_entry(parent, &mut d, name, ino, i.mode)?;
            d.mtime = now;
            d.ctime = now;
            op.put_inode(parent, &d)?;
            op.remember(ino)?;
            Ok(i)
        })
    }

    /// Removes a name that is not a directory.
    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.free_leftover(self.unlink_leaving(parent, name)?);
        Ok(())
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.free_leftover(self.remove(parent, name, true)?);
        Ok(())
    }

    /// [`Fs::unlink`] that leaves the rest of a large file's freeing to
    /// [`Fs::free_leftover`].
    pub fn unlink_leaving(&self, parent: Ino, name: &[u8]) -> Result<Leftover> {
        self.remove(parent, name, false)
    }

    fn remove(&self, parent: Ino, name: &[u8], dir: bool) -> Result<Leftover> {
        if name == b"." || name == b".." {
            return Err(Posix::Invalid.at(String::from_utf8_lossy(name)));
        }
        self.op(|op, _| {
            let mut d = op.dir(parent)?;
            let e = op
                .entry(parent, name)?
                .ok_or_else(|| Posix::NotFound.at(String::from_utf8_lossy(name)))?;
            let is_dir = e.mode == libc::S_IFDIR;
            match (dir, is_dir) {
                (false, true) => return Err(Posix::IsDir.at(String::from_utf8_lossy(name))),
                (true, false) => return Err(Posix::NotDir.at(String::from_utf8_lossy(name))),
                (true, true) if !op.is_empty_dir(e.ino)? => {
                    return Err(Posix::NotEmpty.at(String::from_utf8_lossy(name)))
                }
                _ => {}
            }
            let now = Time::now();
            op.remove_entry(parent, name, &e)?;
            let more = op.unlink_inode(e.ino, now)?;
            if is_dir {
                d.nlink -= 1;
            }
            d.mtime = now;
            d.ctime = now;
            op.put_inode(parent, &d)?;
            Ok(Leftover {
                unlinked: more.then_some(e.ino),
                ..Leftover::default()
            })
        })
    }

    /// Renames `parent/name` to `newparent/newname`, with the renameat2
    /// flags [`RENAME_NOREPLACE`] and [`RENAME_EXCHANGE`].
    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        let left = self.rename_leaving(parent, name, newparent, newname, flags)?;
        self.free_leftover(left);
        Ok(())
    }

    /// [`Fs::rename`] that leaves the rest of a replaced large file's
    /// freeing to [`Fs::free_leftover`].
    pub fn rename_leaving(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> Result<Leftover> {
        check_name(name)?;
        check_name(newname)?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        {
            return Err(Posix::Invalid.at(format!("rename flags {flags:#x}")));
        }
        let replaced = self.op(|op, _| {
            let now = Time::now();
            op.dir(parent)?;
            op.dir(newparent)?;
            let src = op
                .entry(parent, name)?
                .ok_or_else(|| Posix::NotFound.at(String::from_utf8_lossy(name)))?;
            let dst = op.entry(newparent, newname)?;
            if parent == newparent && name == newname {
                return if flags & RENAME_NOREPLACE != 0 {
                    Err(Posix::Exists.at(String::from_utf8_lossy(name)))
                } else {
                    Ok(None)
                };
            }
            let from = (parent, name, src);
            if flags & RENAME_EXCHANGE != 0 {
                let dst =
                    dst.ok_or_else(|| Posix::NotFound.at(String::from_utf8_lossy(newname)))?;
                op.exchange(from, (newparent, newname, dst), now)?;
                return Ok(None);
            }
            op.move_entry(from, (newparent, newname), dst, flags, now)
        })?;
        Ok(Leftover {
            unlinked: replaced,
            ..Leftover::default()
        })
    }

    /// [`Fs::readdir_fitting`] with each entry's inode, in one operation
    /// (READDIRPLUS: `ls -l`, `find` and `tar` then need no lookup per
    /// entry), each entry but "." and ".." counted as a lookup, as the
    /// kernel counts them.
    pub fn readdir_plus(
        &self,
        ino: Ino,
        cookie: u64,
        limit: usize,
        fits: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<Vec<(DirEntry, Inode)>> {
        self.read_op(|op| {
            let listed = Self::entries(op, ino, cookie, limit, fits)?
                .into_iter()
                .map(|e| {
                    let i = op.inode(e.ino)?;
                    Ok((e, i))
                })
                .collect::<Result<Vec<_>>>()?;
            // The kernel counts every entry but "." and ".." as a lookup.
            for (e, _) in &listed {
                if e.name != b"." && e.name != b".." {
                    op.remember(e.ino)?;
                }
            }
            Ok(listed)
        })
    }

    /// Up to `limit` entries after `cookie` (0 starts; "." and ".." are
    /// cookies 1 and 2), in cookie order, stable under concurrent changes.
    pub fn readdir(&self, ino: Ino, cookie: u64, limit: usize) -> Result<Vec<DirEntry>> {
        self.readdir_fitting(ino, cookie, limit, &mut |_| true)
    }

    /// [`Fs::readdir`], ending before the first entry whose name `fits`
    /// refuses (a reply's room, which the entries' names take up): no
    /// entry is looked up that would not be sent.
    pub fn readdir_fitting(
        &self,
        ino: Ino,
        cookie: u64,
        limit: usize,
        fits: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<Vec<DirEntry>> {
        self.read_op(|op| Self::entries(op, ino, cookie, limit, fits))
    }

    fn entries(
        op: &mut Op,
        ino: Ino,
        cookie: u64,
        limit: usize,
        fits: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<Vec<DirEntry>> {
        {
            let d = op.dir(ino)?;
            let mut out = Vec::new();
            if cookie < 1 && out.len() < limit {
                if !fits(b".") {
                    return Ok(out);
                }
                out.push(DirEntry {
                    cookie: 1,
                    name: b".".to_vec(),
                    ino,
                    kind: libc::S_IFDIR,
                });
            }
            if cookie < 2 && out.len() < limit {
                if !fits(b"..") {
                    return Ok(out);
                }
                out.push(DirEntry {
                    cookie: 2,
                    name: b"..".to_vec(),
                    ino: d.parent,
                    kind: libc::S_IFDIR,
                });
            }
            let start = key(ino, kind::COOKIE, &(cookie.max(2) + 1).to_be_bytes());
            let (_, end) = kind_range(ino, kind::COOKIE);
            let want = limit - out.len();
            for (k, name) in op.tree.range(&mut op.store, &start, &end, want)? {
                let c = key_suffix_u64(&k).ok_or_else(|| {
                    FsError::Corrupted(format!("a readdir key of directory {ino}"))
                })?;
                if !fits(&name) {
                    break;
                }
                let e = op.entry(ino, &name)?.ok_or_else(|| {
                    FsError::Corrupted(format!("directory {ino}: cookie {c} names a missing entry"))
                })?;
                out.push(DirEntry {
                    cookie: c,
                    name,
                    ino: e.ino,
                    kind: e.mode,
                });
            }
            Ok(out)
        }
    }
}
