//! The volume API: an open volume over the state, its locks and the
//! background cleaner.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::ctx::{data_tag, Ctx};
use super::format::{self, Entry, Header, KeyGenEntry};
use super::geometry::{data_need, usable_per_segment};
use super::header::read_header;
use super::recovery::{self, Recovery};
use super::rekey::RekeyStatus;
use super::snapshot;
use super::state::{State, DISCARD_BATCH};
use super::txn::{Op, Transaction, MAX_TXN_BLOCKS, TRIM_CHUNK_BLOCKS};
use super::CheckReport;
use crate::crypto::{CryptoEngine, Mac, MasterKey, Tag, VolumeKeys};
use crate::device::{read_exact_at, Device};
use crate::volume::{Generation, Lba, Result, SnapshotId, VolumeError};
use crate::BLOCK_SIZE;

/// Run-time tuning of an open volume.
#[derive(Clone, Debug)]
pub struct Options {
    /// Bytes of metadata pages kept in memory (the block map cache).
    pub cache_bytes: usize,
    /// Crypto threads; 0 means one per CPU.
    pub crypto_threads: usize,
    /// Bytes per parallel crypto chunk.
    pub chunk_bytes: usize,
    pub read_only: bool,
    /// Run the cleaner and periodic checkpoints on a background thread.
    pub background: bool,
    /// Log blocks written between checkpoints (bounds recovery time).
    pub checkpoint_blocks: u64,
    /// Refuse to open ([`VolumeError::Rollback`]) when the newest valid
    /// checkpoint's sequence number is below this: the host saw a newer
    /// state of the volume, so this is an older copy put back. Checked
    /// before anything is written.
    pub newest_seen: Option<u64>,
    /// Open a volume whose restore has not finished (only `lsvfs restore`
    /// does; anything else gets [`VolumeError::IncompleteRestore`]).
    pub restoring: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cache_bytes: 64 << 20,
            crypto_threads: 0,
            chunk_bytes: crate::crypto::DEFAULT_CHUNK_BYTES,
            read_only: false,
            background: true,
            checkpoint_blocks: 65536,
            newest_seen: None,
            restoring: false,
        }
    }
}

/// A snapshot of an open volume's counters.
#[derive(Clone, Debug)]
pub struct Stats {
    pub logical_blocks: u64,
    pub allocated_blocks: u64,
    pub segment_blocks: u64,
    pub max_segments: u64,
    pub extent_segments: u64,
    pub free_segments: u64,
    /// The reserve's size: the lowest free segments, up to this many, are
    /// kept allocated on the host for checkpoints, the cleaner and trims
    /// when the host is full.
    pub reserve_segments: u64,
    pub dirty_pages: usize,
    pub cached_pages: usize,
    pub checkpoint_seq: u64,
    pub live_blocks: u64,
    pub snapshots: u64,
    /// Blocks only snapshots reference.
    pub held_blocks: u64,
    /// Checkpoints the background thread made durable while operations
    /// went on (see [`Inner::maybe_checkpoint`]).
    pub landed_behind: u64,
}

struct Inner {
    dev: Arc<dyn Device>,
    header: Header,
    keys: VolumeKeys,
    engine: CryptoEngine,
    state: Mutex<State>,
    reuse: RwLock<()>,
    /// See [`Ctx::poisoned`].
    poisoned: AtomicBool,
    /// Held shared by a commit from taking its generations to applying its
    /// records; a snapshot takes it exclusively, so no transaction whose
    /// generations are below the snapshot's birth is applied after it.
    commits: RwLock<()>,
    read_only: bool,
    checkpoint_blocks: u64,
    /// Wakes the background thread to land a checkpoint in flight (see
    /// [`Inner::maybe_checkpoint`]); None without a background thread.
    lander: Option<crossbeam::channel::Sender<()>>,
    /// See [`Stats::landed_behind`].
    landed_behind: std::sync::atomic::AtomicU64,
    /// Reads and commits so far: background work (a rekey) yields to them.
    activity: std::sync::atomic::AtomicU64,
    /// For tests: milliseconds each commit of 64 blocks or more waits
    /// before sealing them (see [`Volume::delay_large_seals_for_test`]).
    seal_delay_ms: std::sync::atomic::AtomicU64,
}

pub struct Volume {
    inner: Arc<Inner>,
    background: Option<(crossbeam::channel::Sender<()>, JoinHandle<()>)>,
    recovery: Recovery,
    closed: bool,
    /// A read-only view of this snapshot (by id) instead of the live volume.
    view: Option<SnapshotId>,
}

/// Blocks the file system may still fill (see [`Volume::free_blocks`]),
/// given `live`, the blocks counted live.
fn free_in(st: &State, live: u64) -> u64 {
    (st.geo.logical_blocks - st.allocated)
        .min(data_need(st.geo.logical_blocks).saturating_sub(live))
}

impl Volume {
    /// Opens a volume, recovering it if it was not closed cleanly.
    pub fn open(dev: Arc<dyn Device>, master: &MasterKey, opts: Options) -> Result<Volume> {
        let header = read_header(&*dev)?;
        super::header::refuse_erased(&header, "the volume")?;
        if header.restoring && !opts.restoring {
            return Err(VolumeError::IncompleteRestore("the volume".into()));
        }
        if master.check_value(&header.volume_id) != header.key_check {
            return Err(VolumeError::WrongKey(
                "the key does not match this volume's key check value".into(),
            ));
        }
        let keys = super::header::key_ring(&header, master)?;
        let engine = CryptoEngine::new(opts.crypto_threads, opts.chunk_bytes)
            .map_err(|e| VolumeError::io("starting crypto threads", e))?;
        let reuse = RwLock::new(());
        let poisoned = AtomicBool::new(false);
        let (state, recovery) = recovery::recover(
            &Ctx {
                dev: &*dev,
                keys: &keys,
                header: &header,
                engine: &engine,
                reuse: &reuse,
                poisoned: &poisoned,
            },
            opts.cache_bytes / BLOCK_SIZE,
            opts.read_only,
            opts.newest_seen,
        )?;
        let background = opts.background && !opts.read_only;
        let (lander, landings) = match background {
            true => {
                let (tx, rx) = crossbeam::channel::bounded::<()>(1);
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let inner = Arc::new(Inner {
            lander,
            landed_behind: std::sync::atomic::AtomicU64::new(0),
            checkpoint_blocks: opts.checkpoint_blocks.max(header.segment_blocks as u64),
            dev,
            header,
            keys,
            engine,
            state: Mutex::new(state),
            reuse,
            poisoned,
            commits: RwLock::new(()),
            read_only: opts.read_only,
            activity: std::sync::atomic::AtomicU64::new(0),
            seal_delay_ms: std::sync::atomic::AtomicU64::new(0),
        });
        if !opts.read_only && inner.rekey_pending() {
            // A rekey was running when the volume was last closed: it starts
            // over, skipping what is done.
            inner.lock()?.rekey_begin(&inner.ctx(), true)?;
        }
        let background = match landings {
            Some(rx) => Some(Inner::start_background(&inner, rx)?),
            None => None,
        };
        Ok(Volume {
            inner,
            background,
            recovery,
            closed: false,
            view: None,
        })
    }

    pub fn header(&self) -> &Header {
        &self.inner.header
    }

    /// Starts key generation `entry` (made by
    /// [`super::header::new_key_generation`] with the master key, which
    /// this volume does not hold) from its `secret`: the header lists it
    /// (durably) before anything is sealed under it, new blocks are sealed
    /// under it from now on, and a pass begins that seals every older
    /// block again ([`Volume::rekey_step`]).
    pub fn rekey_start(&self, entry: KeyGenEntry, secret: &MasterKey) -> Result<()> {
        self.writable()?;
        self.live_only()?;
        let inner = &*self.inner;
        // No transaction is between sealing its blocks and applying them.
        let _no_commits = inner.commits.write().unwrap_or_else(|p| p.into_inner());
        let mut st = inner.lock()?;
        if inner.rekey_pending() {
            return Err(VolumeError::InvalidArgument(format!(
                "a rekey is already running (key generations {:?}); let it finish (lsvfs rekey \
                 --wait) before starting another",
                inner.keys.generations()
            )));
        }
        super::header::add_key_generation(&*inner.dev, entry)?;
        st.sealed_blocks = 0;
        inner
            .keys
            .add_generation(entry.key_gen, secret)
            .map_err(|e| {
                VolumeError::Corrupted(format!("key generation {}: {e}", entry.key_gen))
            })?;
        st.rekey_begin(&inner.ctx(), false)
    }

    /// Seals the blocks of the next segment that older key generations seal
    /// again. Returns true while the pass goes on; once nothing is left it
    /// finishes (the older generations leave the header and the key ring)
    /// and returns false. Each call holds the volume's lock for one segment
    /// at most, so other work goes on between calls.
    pub fn rekey_step(&self) -> Result<bool> {
        self.writable()?;
        let inner = &*self.inner;
        if !inner.rekey_pending() {
            return Ok(false);
        }
        let mut st = inner.lock()?;
        let ctx = inner.ctx();
        if st.rekey.is_none() {
            st.rekey_begin(&ctx, true)?;
        }
        if st.rekey_step(&ctx)? {
            return Ok(true);
        }
        if st.unsealed > 0 {
            st.rekey = None;
            return Err(VolumeError::Integrity(format!(
                "{} blocks sealed under an older key generation fail authentication, so the \
                 rekey kept that generation; run lsvfs check to find them",
                st.unsealed
            )));
        }
        // The cleaned segments free; then every segment still in use is
        // looked at once more before anything is retired.
        st.checkpoint(&ctx)?;
        let round = st.rekey.as_ref().map_or(0, |p| p.rechecks);
        if st.rekey_recheck(&ctx, round)? {
            return Ok(true);
        }
        // Both checkpoint slots sealed under the current generation: then
        // nothing reachable needs an older one.
        st.checkpoint(&ctx)?;
        st.checkpoint(&ctx)?;
        st.rekey = None;
        let current = inner.keys.current().key_gen();
        super::header::retire_key_generations(&*inner.dev, current)?;
        inner.keys.retire_below(current);
        Ok(false)
    }

    /// How many data blocks each key generation seals, live and held. It
    /// reads every map page, a few at a time, letting go of the volume in
    /// between: on a busy mount other work goes on, and the counts are
    /// taken while blocks change (a rekey moves them between generations).
    pub fn blocks_by_key_gen(&self) -> Result<std::collections::BTreeMap<u16, u64>> {
        self.live_only()?;
        let mut n = std::collections::BTreeMap::new();
        // One interior map page's worth of leaves per turn of the lock.
        let step = (format::MAP_ENTRIES_PER_PAGE * format::MAP_ENTRIES_PER_PAGE) as u64;
        let mut lba = 0;
        while lba < self.inner.header.logical_blocks {
            let mut st = self.inner.lock()?;
            st.count_by_key_gen(&self.inner.ctx(), Lba(lba), step, &mut n)?;
            st.trees.evict();
            lba += step;
        }
        self.inner.lock()?.count_held_by_key_gen(&mut n);
        Ok(n)
    }

    /// How many reads and commits this volume has served: background work
    /// that sees it grow yields to them.
    pub fn activity(&self) -> u64 {
        self.inner.activity.load(Ordering::Relaxed)
    }

    /// The key generations, where a rekey stands, and the rekey policy.
    pub fn rekey_status(&self) -> Result<RekeyStatus> {
        // The header as it is now (a rekey changes it, under the lock held
        // here, so that it agrees with the key ring).
        let st = self.inner.lock()?;
        let h = super::header::read_header(&*self.inner.dev)?;
        let started = h.key_gens.last().map_or(h.created, |g| g.started);
        Ok(st.rekey_status(&self.inner.ctx(), h.retired_below, started))
    }

    /// Sets the rekey policy (durable when it returns): rekey after `after`
    /// of a key generation (None: never; `Some(0)`: the default, 120 days)
    /// or after `bytes` sealed under one (None: no limit). A mount starts
    /// the rekey by itself when it is due.
    pub fn set_rekey_policy(&self, after: Option<Duration>, bytes: Option<u64>) -> Result<()> {
        self.writable()?;
        self.live_only()?;
        let mut st = self.inner.lock()?;
        st.rekey_after_secs = after.map_or(u64::MAX, |d| d.as_secs().min(u64::MAX - 1));
        st.rekey_after_bytes = bytes.unwrap_or(0);
        st.checkpoint(&self.inner.ctx())
    }

    /// See [`crate::crypto::VolumeKeys::export_signing_key`].
    pub fn export_signing_key(&self) -> ed25519_dalek::SigningKey {
        self.inner.keys.export_signing_key()
    }

    /// See [`crate::crypto::VolumeKeys::export_slot_key`].
    pub fn export_slot_key(&self, export_id: &[u8; 16]) -> zeroize::Zeroizing<[u8; 32]> {
        self.inner.keys.export_slot_key(export_id)
    }

    pub fn logical_blocks(&self) -> u64 {
        self.inner.header.logical_blocks
    }

    pub fn is_read_only(&self) -> bool {
        self.inner.read_only || self.view.is_some()
    }

    /// The snapshot this handle shows, if it is a snapshot view.
    pub fn snapshot_id(&self) -> Option<SnapshotId> {
        self.view
    }

    fn live_only(&self) -> Result<()> {
        if self.view.is_some() {
            return Err(VolumeError::InvalidArgument(
                "this asks about the live volume, not a snapshot view".into(),
            ));
        }
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if self.is_read_only() {
            return Err(VolumeError::ReadOnly);
        }
        Ok(())
    }

    /// Takes a snapshot of every committed transaction, named `name`, and
    /// returns its id. Durable when it returns; costs one checkpoint.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotId> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or((0, 0), |d| (d.as_secs() as i64, d.subsec_nanos()));
        self.snapshot_create_at(name, now)
    }

    /// [`Volume::snapshot_create`] with a given creation time (seconds and
    /// nanoseconds since the Unix epoch): a restore keeps the times the
    /// snapshots had on the volume they were exported from.
    pub fn snapshot_create_at(&self, name: &str, now: (i64, u32)) -> Result<SnapshotId> {
        self.writable()?;
        // Transactions that took their generations must be applied first:
        // a block with a generation below the snapshot's birth is in it.
        let _no_commits = self
            .inner
            .commits
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut st = self.inner.lock()?;
        st.snapshot_create(&self.inner.ctx(), name, now)
    }

    /// Deletes a snapshot and frees the blocks only it held. Durable when
    /// it returns.
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.writable()?;
        let mut st = self.inner.lock()?;
        let i = st.snaps.named(name)?;
        st.snapshot_delete(&self.inner.ctx(), i)
    }

    /// Every snapshot, oldest first, with the space each alone holds (this
    /// walks what differs between neighbouring snapshots).
    pub fn snapshot_list(&self) -> Result<Vec<snapshot::SnapshotInfo>> {
        let mut st = self.inner.lock()?;
        st.snapshot_infos(&self.inner.ctx())
    }

    /// Every snapshot's id, name and creation time, oldest first (cheap).
    pub fn snapshot_names(&self) -> Result<Vec<(SnapshotId, String, i64, u32)>> {
        let st = self.inner.lock()?;
        Ok(st
            .snaps
            .list
            .iter()
            .map(|s| {
                (
                    s.rec.id,
                    s.rec.name.clone(),
                    s.rec.created_sec,
                    s.rec.created_nsec,
                )
            })
            .collect())
    }

    /// Runs of blocks written or trimmed between the previous snapshot and
    /// snapshot `name`, as (first block, count): the base of incremental export.
    pub fn snapshot_changed_runs(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let mut st = self.inner.lock()?;
        let i = st.snaps.named(name)?;
        st.snapshot_changed_runs(&self.inner.ctx(), i)
    }

    /// Runs of blocks written or trimmed since the newest snapshot was
    /// taken (overlapping runs possible): empty when the live volume is
    /// still exactly its newest snapshot.
    pub fn changed_since_newest_snapshot(&self) -> Result<Vec<(u64, u64)>> {
        self.live_only()?;
        let mut st = self.inner.lock()?;
        st.live_changed_runs(&self.inner.ctx())
    }

    /// A read-only handle that reads snapshot `id` (it keeps working while
    /// the live volume changes, and fails once the snapshot is deleted).
    pub fn snapshot_view(&self, id: SnapshotId) -> Result<Volume> {
        let st = self.inner.lock()?;
        if st.snaps.index_by_id(id).is_none() {
            return Err(VolumeError::NoSuchSnapshot(format!("snapshot {id}")));
        }
        Ok(Volume {
            inner: self.inner.clone(),
            background: None,
            recovery: Recovery::default(),
            closed: true,
            view: Some(id),
        })
    }

    /// Blocks the file system may still fill: the logical blocks not in use,
    /// less what snapshots hold beyond them (the space bound's data share
    /// minus every block counted live). The live total kept rather than
    /// counted, as in [`Volume::room_to_wait`]: statfs asks this.
    pub fn free_blocks(&self) -> Result<u64> {
        let st = self.inner.lock()?;
        Ok(free_in(&st, st.usage.live_total()))
    }

    /// Whether changes may wait in memory for a later commit: the log can
    /// take `blocks` more without cleaning or its reserve, and as many
    /// logical blocks are free (what snapshots hold counted). Near a full
    /// volume each operation commits its own changes instead, so that the
    /// one that needs space is the one told there is none.
    pub fn room_to_wait(&self, blocks: u64) -> bool {
        let Ok(st) = self.inner.lock() else {
            return false;
        };
        let log_room = st.log.user_available() * usable_per_segment(st.geo.seg_blocks);
        // The live total kept rather than counted: a large volume has many
        // segments, and this runs per operation.
        log_room >= blocks && free_in(&st, st.usage.live_total()) >= blocks
    }

    /// What recovery did when the volume was opened.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Reads `buf.len() / 4096` blocks from `lba`. Unwritten blocks read as
    /// zeros. A block that fails authentication is an [`VolumeError::Integrity`].
    pub fn read(&self, lba: Lba, buf: &mut [u8]) -> Result<()> {
        self.inner.activity.fetch_add(1, Ordering::Relaxed);
        let n = self.inner.check_range(lba, buf.len())?;
        let (entries, _guard) = {
            let mut st = self.inner.lock()?;
            let ctx = self.inner.ctx();
            let mut es = Vec::with_capacity(n as usize);
            match self.view {
                None => {
                    for i in 0..n {
                        es.push(st.lookup(&ctx, lba + i)?);
                    }
                }
                Some(id) => {
                    let s = st.snaps.index_by_id(id).ok_or_else(|| {
                        VolumeError::NoSuchSnapshot(format!("snapshot {id} (it was deleted)"))
                    })?;
                    for i in 0..n {
                        es.push(st.snap_locate(&ctx, s, lba + i)?);
                    }
                    st.snaps.list[s].trees.evict();
                }
            }
            st.trees.evict();
            (
                es,
                self.inner.reuse.read().unwrap_or_else(|p| p.into_inner()),
            )
        };
        let mut i = 0usize;
        while i < entries.len() {
            if !entries[i].is_stored() {
                buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].fill(0);
                i += 1;
                continue;
            }
            // A run of blocks that are contiguous on disk: one read, one open.
            let mut j = i + 1;
            while j < entries.len()
                && entries[j].is_stored()
                && entries[j].pba == entries[j - 1].pba + 1
            {
                j += 1;
            }
            let run = &mut buf[i * BLOCK_SIZE..j * BLOCK_SIZE];
            let at = entries[i].pba;
            read_exact_at(&*self.inner.dev, run, at * BLOCK_SIZE as u64).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    VolumeError::Corrupted(format!(
                        "backing store is truncated: logical block {} lives past its end",
                        lba + i as u64
                    ))
                } else {
                    VolumeError::io(format!("reading logical block {}", lba + i as u64), e)
                }
            })?;
            let tags: Vec<Tag> = (i..j)
                .map(|k| data_tag(lba + k as u64, entries[k].gen, entries[k].key_gen))
                .collect();
            let macs: Vec<Mac> = entries[i..j].iter().map(|e| e.mac).collect();
            if let Err(bad) = self.inner.engine.open(&self.inner.keys, run, &tags, &macs) {
                let k = i + bad;
                return Err(VolumeError::Integrity(format!(
                    "logical block {} (stored at block {})",
                    lba + k as u64,
                    entries[k].pba
                )));
            }
            i = j;
        }
        Ok(())
    }

    /// Writes whole blocks at `lba` as one transaction.
    pub fn write(&self, lba: Lba, data: &[u8]) -> Result<()> {
        let mut t = Transaction::new();
        t.write(lba, data.to_vec());
        self.commit(t)
    }

    /// Unmaps `count` blocks from `lba`, in transactions of at most
    /// [`TRIM_CHUNK_BLOCKS`] blocks: each chunk is atomic, so a huge trim
    /// never needs more free space for its metadata than a full volume has.
    pub fn trim(&self, lba: Lba, count: u64) -> Result<()> {
        self.inner.check_blocks(lba, count)?;
        let mut at = lba;
        let end = lba + count;
        loop {
            let n = (end - at).min(TRIM_CHUNK_BLOCKS);
            let mut t = Transaction::new();
            t.trim(at, n);
            self.commit(t)?;
            at += n;
            if at >= end {
                return Ok(());
            }
        }
    }

    /// Zeroes `count` blocks from `lba` (see [`Transaction::zero`]), in
    /// transactions of at most [`TRIM_CHUNK_BLOCKS`] blocks.
    pub fn zero(&self, lba: Lba, count: u64) -> Result<()> {
        self.inner.check_blocks(lba, count)?;
        let end = lba + count;
        let mut at = lba;
        while at < end {
            let n = (end - at).min(TRIM_CHUNK_BLOCKS);
            let mut t = Transaction::new();
            t.zero(at, n);
            self.commit(t)?;
            at += n;
        }
        Ok(())
    }

    /// Applies a transaction atomically. It is in the log when this returns
    /// and durable after the next [`Volume::flush`].
    pub fn commit(&self, txn: Transaction) -> Result<()> {
        self.commit_checked(txn, false).map(|_| ())
    }

    /// [`Volume::commit`] of a transaction that overwrites blocks in place:
    /// applied only if every block it writes is still allocated (checked
    /// under the lock that orders commits); Ok(false), with nothing
    /// written, if one is not. A caller that knows which blocks it owns,
    /// and that no freed block is handed out again meanwhile, can so write
    /// without holding its own metadata lock.
    pub fn commit_overwrite(&self, txn: Transaction) -> Result<bool> {
        self.commit_checked(txn, true)
    }

    fn commit_checked(&self, txn: Transaction, only_allocated: bool) -> Result<bool> {
        let inner = &*self.inner;
        inner.activity.fetch_add(1, Ordering::Relaxed);
        self.writable()?;
        if txn.is_empty() {
            return Ok(true);
        }
        let (mut n_blocks, mut n_zeroed) = (0u64, 0u64);
        for op in &txn.ops {
            match op {
                Op::Write { lba, data } => n_blocks += inner.check_range(*lba, data.len())?,
                Op::Trim { lba, count } => inner.check_blocks(*lba, *count)?,
                Op::Zero { lba, count } => {
                    inner.check_blocks(*lba, *count)?;
                    n_zeroed += count;
                }
            }
        }
        if n_blocks > MAX_TXN_BLOCKS {
            return Err(VolumeError::InvalidArgument(format!(
                "a transaction may write at most {MAX_TXN_BLOCKS} blocks, not {n_blocks}"
            )));
        }
        if n_zeroed > TRIM_CHUNK_BLOCKS {
            return Err(VolumeError::InvalidArgument(format!(
                "a transaction may zero at most {TRIM_CHUNK_BLOCKS} blocks, not {n_zeroed}"
            )));
        }
        let _committing = inner.commits.read().unwrap_or_else(|p| p.into_inner());
        let base = {
            let mut st = inner.lock()?;
            st.alloc_gens(&inner.ctx(), n_blocks)?
        };
        // Entries in operation order; payload blocks sealed in place, under
        // the current key generation.
        let gk = inner.keys.current();
        let key_gen = gk.key_gen();
        let mut entries = Vec::with_capacity(n_blocks as usize);
        let mut tags = Vec::with_capacity(n_blocks as usize);
        // The first write's buffer becomes the record's payload, made large
        // enough for the others at once (the file system's writes leave
        // room for all their blocks in it); the others are copied in.
        let mut payload = Vec::new();
        for op in txn.ops {
            match op {
                Op::Write { lba, data } => {
                    for i in 0..(data.len() / BLOCK_SIZE) as u64 {
                        tags.push(data_tag(lba + i, base + tags.len() as u64, key_gen));
                        entries.push(Entry::Write {
                            lba: lba + i,
                            gen: Generation(0),
                            key_gen,
                            mac: Mac::default(),
                        });
                    }
                    if payload.is_empty() {
                        payload = data;
                        payload.reserve(n_blocks as usize * BLOCK_SIZE - payload.len());
                    } else {
                        payload.extend_from_slice(&data);
                    }
                }
                Op::Trim { lba, count } => {
                    let mut at = lba;
                    let end = lba + count;
                    while at < end {
                        let c = (end - at).min(u32::MAX as u64);
                        entries.push(Entry::Trim {
                            lba: at,
                            count: c as u32,
                        });
                        at += c;
                    }
                }
                // At most TRIM_CHUNK_BLOCKS (checked above): one entry.
                Op::Zero { lba, count } => entries.push(Entry::Zero {
                    lba,
                    count: count as u32,
                }),
            }
        }
        let mut macs = vec![Mac::default(); tags.len()];
        if tags.len() >= 64 {
            let ms = inner.seal_delay_ms.load(Ordering::Relaxed);
            if ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
        inner.engine.seal(&gk, &mut payload, &tags, &mut macs);
        let mut k = 0;
        for e in entries.iter_mut() {
            if let Entry::Write { gen, mac, .. } = e {
                *gen = Generation(tags[k].gen);
                *mac = macs[k];
                k += 1;
            }
        }

        let mut st = inner.lock()?;
        let ctx = inner.ctx();
        if only_allocated {
            for e in &entries {
                if let Entry::Write { lba, .. } = *e {
                    if !st.lookup(&ctx, lba)?.is_mapped() {
                        return Ok(false);
                    }
                }
            }
        }
        if !st.checkpointed {
            // The first commit since opening writes a checkpoint of the
            // version this code writes first: what follows in the log may
            // need it (zeroed blocks, truncation records), and an older
            // lsvfs then refuses the volume by its version rather than
            // misreading the log after an older checkpoint.
            st.checkpoint(&ctx)?;
        }
        // A transaction that only trims frees space: it may use the reserve.
        // Not while snapshots exist: what it drops, they may hold.
        let frees = payload.is_empty() && n_zeroed == 0 && st.snaps.list.is_empty();
        st.ensure_space(&ctx, &entries, frees)?;
        st.prefetch(&ctx, &entries)?;
        let pbas = match st.append(&ctx, &entries, &payload, true, frees) {
            // The backing file could not grow: nothing was written. Make
            // room from free and cleaned segments instead, and try once more.
            Err(e) if e.is_no_space() && st.log.growth_blocked => {
                st.ensure_space(&ctx, &entries, frees)?;
                st.prefetch(&ctx, &entries)?;
                st.append(&ctx, &entries, &payload, true, frees)?
            }
            r => r?,
        };
        if let Err(e) = st.apply(&ctx, &entries, &pbas) {
            ctx.poison();
            return Err(e);
        }
        inner.maybe_checkpoint(&mut st, &ctx);
        st.trees.evict();
        Ok(true)
    }

    /// Starts writing back what was committed so far, without waiting for
    /// it (a hint): a long run of commits (a restore) then keeps the disk
    /// busy while it seals, instead of leaving its whole size to the final
    /// [`Volume::flush`].
    pub fn write_behind(&self) {
        self.inner.dev.write_behind();
    }

    /// For tests: every commit that seals 64 blocks or more (a large
    /// write's data) first waits `ms` milliseconds, as a slow CPU would
    /// stretch its sealing; 0 turns it off. Shows which locks a large
    /// write holds while its data is sealed.
    #[doc(hidden)]
    pub fn delay_large_seals_for_test(&self, ms: u64) {
        self.inner.seal_delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Makes every committed transaction durable (fdatasync).
    pub fn flush(&self) -> Result<()> {
        if self.view.is_some() {
            return Ok(());
        }
        if self.inner.poisoned.load(Ordering::SeqCst) {
            return Err(VolumeError::PreviousIo);
        }
        self.inner.dev.flush().map_err(|e| {
            self.inner.poisoned.store(true, Ordering::SeqCst);
            VolumeError::io("flushing the backing store", e)
        })
    }

    /// Writes a checkpoint now, then discards on the host the segments it
    /// freed (a batch per hold of the lock).
    pub fn checkpoint(&self) -> Result<()> {
        self.writable()?;
        let mut st = self.inner.lock()?;
        st.checkpoint(&self.inner.ctx())?;
        drop(st);
        self.inner.drain_discards();
        Ok(())
    }

    /// Runs the cleaner until no segment is worth cleaning (or `max`
    /// victims), then checkpoints and discards on the host the segments
    /// that freed. Returns the number of segments cleaned.
    pub fn clean(&self, max: usize) -> Result<usize> {
        self.writable()?;
        let mut st = self.inner.lock()?;
        let ctx = self.inner.ctx();
        let mut n = 0;
        while n < max {
            let k = st.clean_batch(&ctx)?;
            st.checkpoint(&ctx)?;
            if k == 0 {
                break;
            }
            n += k;
        }
        drop(st);
        self.inner.drain_discards();
        Ok(n)
    }

    pub fn stats(&self) -> Result<Stats> {
        self.live_only()?;
        let st = self.inner.lock()?;
        Ok(Stats {
            logical_blocks: st.geo.logical_blocks,
            allocated_blocks: st.allocated,
            segment_blocks: st.geo.seg_blocks,
            max_segments: st.geo.max_segments,
            extent_segments: st.log.extent,
            free_segments: st.log.free.len() as u64,
            reserve_segments: st.geo.reserve,
            dirty_pages: st.trees.dirty_count(),
            cached_pages: st.trees.cached_count(),
            checkpoint_seq: st.ckpt.last.seq,
            live_blocks: st.usage.total_live(st.log.extent),
            snapshots: st.snaps.list.len() as u64,
            held_blocks: st.usage.held.len() as u64,
            landed_behind: self.inner.landed_behind.load(Ordering::Relaxed),
        })
    }

    /// Runs of blocks written or trimmed since the changed bitmap was last
    /// reset, as (first block, count).
    pub fn changed_runs(&self) -> Result<Vec<(u64, u64)>> {
        self.live_only()?;
        let mut st = self.inner.lock()?;
        st.bitmap_runs(&self.inner.ctx(), format::TreeId::Changed)
    }

    /// Runs of allocated (mapped) blocks, as (first block, count); for a
    /// snapshot view, the blocks the snapshot maps.
    pub fn allocated_runs(&self) -> Result<Vec<(u64, u64)>> {
        if let Some(id) = self.view {
            let mut st = self.inner.lock()?;
            let i = st.snaps.index_by_id(id).ok_or_else(|| {
                VolumeError::NoSuchSnapshot(format!("snapshot {id} (it was deleted)"))
            })?;
            return st.snapshot_allocated_runs(&self.inner.ctx(), i);
        }
        let mut st = self.inner.lock()?;
        st.bitmap_runs(&self.inner.ctx(), format::TreeId::Allocated)
    }

    /// Clears the changed bitmap. Returns the checkpoint sequence number
    /// from which changes are now recorded.
    pub fn reset_changed(&self) -> Result<u64> {
        self.writable()?;
        let mut st = self.inner.lock()?;
        st.reset_changed(&self.inner.ctx())
    }

    /// The checkpoint sequence number the changed bitmap starts at.
    pub fn changed_since(&self) -> Result<u64> {
        Ok(self.inner.lock()?.changed_since)
    }

    /// The key generation that sealed `lba`'s current version (low bit, from
    /// the key-generation bitmap), or None if the block is not stored
    /// (unmapped or zeroed).
    pub fn key_generation_bit(&self, lba: Lba) -> Result<Option<bool>> {
        self.live_only()?;
        self.inner.check_range(lba, BLOCK_SIZE)?;
        let mut st = self.inner.lock()?;
        let ctx = self.inner.ctx();
        if !st.lookup(&ctx, lba)?.is_stored() {
            return Ok(None);
        }
        Ok(Some(st.get_bit(&ctx, format::TreeId::KeyGen, lba)?))
    }

    /// Verifies everything reachable: every page, every data block, and that
    /// counts and bitmaps agree with the map.
    pub fn check(&self) -> Result<CheckReport> {
        self.check_with_progress(&mut |_, _| {})
    }

    /// [`Volume::check`], telling `progress(done, total)` how many of the
    /// mapped data blocks are authenticated so far.
    pub fn check_with_progress(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<CheckReport> {
        self.live_only()?;
        let mut st = self.inner.lock()?;
        st.check(&self.inner.ctx(), progress)
    }

    /// Where the current version of `lba` is stored on the device (a block
    /// address), or None if it is unmapped or zeroed. For diagnostics and tests.
    pub fn locate(&self, lba: Lba) -> Result<Option<u64>> {
        self.live_only()?;
        self.inner.check_range(lba, BLOCK_SIZE)?;
        let mut st = self.inner.lock()?;
        let e = st.lookup(&self.inner.ctx(), lba)?;
        Ok(e.is_stored().then_some(e.pba))
    }

    /// Stops using the volume without a checkpoint or flush, as if the
    /// process had been killed: the next open recovers from the log.
    pub fn abandon(mut self) {
        self.closed = true;
        if let Some((tx, handle)) = self.background.take() {
            drop(tx);
            let _ = handle.join();
        }
    }

    /// Checkpoints and flushes, and stops the background thread.
    pub fn close(self) -> Result<()> {
        self.close_at().map(|_| ())
    }

    /// [`Volume::close`], returning the sequence number of the newest
    /// durable checkpoint (what the host records against rollback).
    pub fn close_at(mut self) -> Result<u64> {
        self.shutdown()?;
        Ok(self.inner.lock()?.ckpt.last.seq)
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        if let Some((tx, handle)) = self.background.take() {
            drop(tx);
            let _ = handle.join();
        }
        if self.inner.read_only {
            return Ok(());
        }
        let mut st = self.inner.lock()?;
        let checkpointed = st.checkpoint(&self.inner.ctx());
        drop(st);
        self.inner.drain_discards();
        // Committed transactions are in the log: even if the checkpoint
        // failed, a flush makes them durable, and recovery replays them.
        let flushed = self
            .inner
            .dev
            .flush()
            .map_err(|e| VolumeError::io("flushing the backing store", e));
        checkpointed.and(flushed)
    }
}

// The FUSE layer shares one volume between request threads.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Volume>();
};

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

impl Inner {
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            dev: &*self.dev,
            keys: &self.keys,
            header: &self.header,
            engine: &self.engine,
            reuse: &self.reuse,
            poisoned: &self.poisoned,
        }
    }

    /// Discards the freed segments that wait for it (see
    /// [`State::discard_some`]), a batch per hold of the lock, pausing
    /// between batches so that a thread that waited for the lock gets it.
    /// A checkpoint begun meanwhile is landed here, as the cleaner thread
    /// would: otherwise the next commit would land it, under the lock.
    fn drain_discards(&self) {
        loop {
            let (left, in_flight) = match self.lock() {
                Ok(mut st) => (
                    st.discard_some(&self.ctx(), DISCARD_BATCH),
                    st.ckpt.in_flight().is_some(),
                ),
                Err(_) => return,
            };
            if in_flight {
                self.land_in_flight();
            }
            if left == 0 {
                return;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Key generations other than the current one are still in the ring.
    fn rekey_pending(&self) -> bool {
        self.keys.generations().len() > 1
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        let st = self.state.lock().map_err(|_| VolumeError::PreviousIo)?;
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(VolumeError::PreviousIo);
        }
        Ok(st)
    }

    /// Checks that `bytes` from `lba` is a whole number of blocks inside the
    /// volume; returns the block count.
    fn check_range(&self, lba: Lba, bytes: usize) -> Result<u64> {
        if bytes % BLOCK_SIZE != 0 {
            return Err(VolumeError::InvalidArgument(format!(
                "{bytes} bytes is not a whole number of 4096-byte blocks"
            )));
        }
        let n = (bytes / BLOCK_SIZE) as u64;
        self.check_blocks(lba, n)?;
        Ok(n)
    }

    /// Checks that blocks `lba .. lba + n` are inside the volume.
    fn check_blocks(&self, lba: Lba, n: u64) -> Result<()> {
        let limit = self.header.logical_blocks;
        match lba.0.checked_add(n) {
            Some(end) if end <= limit => Ok(()),
            _ => Err(VolumeError::OutOfRange {
                start: lba.0,
                end: lba.0.saturating_add(n),
                limit,
            }),
        }
    }

    /// After a commit: a checkpoint once enough pages are dirty or enough
    /// log written since the last one. With a background thread, only its
    /// first half runs here, under the lock; the thread lands it (flushes
    /// and writes the slot) while other operations go on.
    fn maybe_checkpoint(&self, st: &mut State, ctx: &Ctx) {
        if st.trees.dirty_count() as u64 <= st.geo.dirty_limit
            && st.log.blocks_since_checkpoint <= self.checkpoint_blocks
        {
            return;
        }
        // The transaction is already committed; a checkpoint that cannot
        // find space now is retried after the next one.
        match &self.lander {
            // One still in flight lands first (here, if the thread has not
            // yet: the dirty pages must not outgrow the reserve).
            Some(lander) => {
                if st.begin_checkpoint(ctx).is_ok() {
                    let _ = lander.try_send(());
                }
            }
            None => {
                let _ = st.checkpoint(ctx);
            }
        }
    }

    /// Lands the checkpoint in flight without holding the state's lock,
    /// then frees what it let go.
    fn land_in_flight(&self) {
        let landing = match self.lock() {
            Ok(st) => st.ckpt.in_flight().cloned(),
            Err(_) => return,
        };
        let Some(landing) = landing else {
            return;
        };
        let ctx = self.ctx();
        if let Ok(wrote) = landing.land(&ctx) {
            if wrote {
                self.landed_behind.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(mut st) = self.lock() {
                let _ = st.settle_if_landed(&ctx);
            }
        }
    }

    /// Starts the thread that lands checkpoints, cleans and checkpoints in
    /// the background; it ends when the volume is dropped or the sender
    /// is.
    fn start_background(
        inner: &Arc<Inner>,
        landings: crossbeam::channel::Receiver<()>,
    ) -> Result<(crossbeam::channel::Sender<()>, JoinHandle<()>)> {
        let (tx, rx) = crossbeam::channel::bounded::<()>(1);
        let weak = Arc::downgrade(inner);
        let handle = std::thread::Builder::new()
            .name("lsvfs-cleaner".into())
            .spawn(move || {
                let every = Duration::from_millis(500);
                let mut next_tick = Instant::now() + every;
                loop {
                    let wait = next_tick.saturating_duration_since(Instant::now());
                    let tick = crossbeam::channel::select! {
                        recv(rx) -> _ => break,
                        recv(landings) -> m => match (m, weak.upgrade()) {
                            (Ok(()), Some(inner)) => {
                                inner.land_in_flight();
                                inner.drain_discards();
                                Instant::now() >= next_tick
                            }
                            _ => break,
                        },
                        default(wait) => true,
                    };
                    if tick {
                        match weak.upgrade() {
                            Some(inner) => {
                                inner.background_tick();
                                inner.drain_discards();
                            }
                            None => break,
                        }
                        next_tick = Instant::now() + every;
                    }
                }
            })
            .map_err(|e| VolumeError::io("starting the cleaner thread", e))?;
        Ok((tx, handle))
    }

    fn background_tick(&self) {
        let Ok(mut st) = self.lock() else {
            return;
        };
        let ctx = self.ctx();
        let low = (st.geo.reserve * 2).max(st.geo.max_segments / 16);
        let begun = if st.log.available() < low {
            matches!(st.clean_batch(&ctx), Ok(n) if n > 0) && st.begin_checkpoint(&ctx).is_ok()
        } else if st.log.blocks_since_checkpoint > self.checkpoint_blocks / 2 {
            st.begin_checkpoint(&ctx).is_ok()
        } else {
            let _ = st.settle_if_landed(&ctx);
            false
        };
        drop(st);
        if begun {
            self.land_in_flight();
        }
    }
}
