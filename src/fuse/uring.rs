//! FUSE over io_uring (Linux 6.14+): the kernel hands each request to a
//! queue of the CPU its caller runs on, and a thread pinned to that CPU
//! answers it, instead of a round trip through /dev/fuse that wakes a
//! thread on another CPU and back (`scripts/bench-fuse-transport.sh`:
//! 4-6 µs per request here against 10-14).
//!
//! fuser negotiates it (FUSE_OVER_IO_URING in INIT) and keeps serving
//! /dev/fuse, which still carries FORGET and INTERRUPT and every request
//! until each CPU's queue has registered. Then this module decodes the
//! kernel's requests from the ring entries and calls the same [`Ops`] as
//! fuser does, answering through [`Answer`].
//!
//! Each queue has [`THREADS_PER_QUEUE`] threads, each with its own ring
//! and [`ENTRIES_PER_THREAD`] entries (a 288-byte header and a payload
//! buffer as large as the largest request). An entry is the kernel's until
//! it completes with a request, then ours until its answer is committed
//! (COMMIT_AND_FETCH hands it back for the next request). Slow work
//! (fsync, fallocate, truncate) and large reads and writes answer from
//! other threads (a large write reads its data from the entry's buffer,
//! which stays the request's until the answer commits): the answer
//! goes on its ring's `done` list and an eventfd wakes the ring's thread,
//! the only one that submits to that ring.

use std::cell::Cell;
use std::ffi::OsStr;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    RenameFlags, TimeOrNow, WriteFlags,
};
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::reply::{
    fill_from_thread_buffer, AttrReply, CreateReply, DataReply, DirPlusReply, DirReply, EmptyReply,
    EntryReply, OpenReply, Reply, Statfs, StatfsReply, WriteReply, XattrReply,
};
use super::slow::{Lanes, SlowWork};
use super::{our_time, system_time, Caller, Ops, MAX_WRITE};
use crate::fs::format::Time;

/// Threads (each with its own ring) serving one CPU's queue: while one
/// waits on the disk, the other takes the queue's next request.
const THREADS_PER_QUEUE: usize = 2;
/// Ring entries per thread: requests of one queue in flight at once
/// (slow work holds its entry until it answers).
const ENTRIES_PER_THREAD: usize = 8;
/// READs at least this large (readahead's, of up to 1 MiB) run on the
/// bulk threads, which run on any CPU: the kernel queues a reader's
/// readahead on its own CPU's queue, whose pinned threads then compete
/// with the reader. fio 1 MiB sequential read, 512 MiB, cold: 557 MiB/s
/// served inline, 822-1,002 on the bulk threads (1,188 over /dev/fuse;
/// docs/PERFORMANCE.md).
const BULK_READ: u32 = 64 * 1024;
/// WRITEs at least this large (the kernel's write-back, of up to 1 MiB,
/// or a large direct write) run on the write lanes, a file's on one lane:
/// served on the ring thread of the CPU they came on (the flusher's, or
/// the writer's), each held up every request queued behind it there
/// (another process's mkdir waited up to 0.3-0.6 s beside a writer).
pub(super) const BULK_WRITE: usize = 64 * 1024;
/// The ring threads' nice value.
const RING_NICE: i32 = -10;

// The kernel's FUSE ABI (include/uapi/linux/fuse.h).
const OUT_HEADER: usize = 16;
/// struct fuse_uring_req_header: in_out[128], op_in[128], ring_ent_in_out.
const RING_HEADER: usize = 288;
const OP_IN: usize = 128;
const OP_IN_LEN: usize = 128;
const COMMIT_ID: usize = 264;
const PAYLOAD_SZ: usize = 272;
/// The largest request or reply body: a write or read of MAX_WRITE, or a
/// directory listing, or an xattr value (64 KiB).
const PAYLOAD: usize = MAX_WRITE as usize;
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// user_data of the eventfd read that wakes a ring's thread.
const WAKE: u64 = u64::MAX;

const FUSE_LOOKUP: u32 = 1;
const FUSE_GETATTR: u32 = 3;
const FUSE_SETATTR: u32 = 4;
const FUSE_READLINK: u32 = 5;
const FUSE_SYMLINK: u32 = 6;
const FUSE_MKNOD: u32 = 8;
const FUSE_MKDIR: u32 = 9;
const FUSE_UNLINK: u32 = 10;
const FUSE_RMDIR: u32 = 11;
const FUSE_RENAME: u32 = 12;
const FUSE_LINK: u32 = 13;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_FSYNC: u32 = 20;
const FUSE_SETXATTR: u32 = 21;
const FUSE_GETXATTR: u32 = 22;
const FUSE_LISTXATTR: u32 = 23;
const FUSE_REMOVEXATTR: u32 = 24;
const FUSE_FLUSH: u32 = 25;
const FUSE_OPENDIR: u32 = 27;
const FUSE_READDIR: u32 = 28;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_FSYNCDIR: u32 = 30;
const FUSE_CREATE: u32 = 35;
const FUSE_DESTROY: u32 = 38;
const FUSE_FALLOCATE: u32 = 43;
const FUSE_READDIRPLUS: u32 = 44;
const FUSE_RENAME2: u32 = 45;

const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_FH: u32 = 1 << 6;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;
const FATTR_CTIME: u32 = 1 << 10;
const FUSE_GETATTR_FH: u32 = 1 << 0;
const FUSE_READ_LOCKOWNER: u32 = 1 << 1;
const FUSE_RELEASE_FLUSH: u32 = 1 << 0;
const FUSE_FSYNC_FDATASYNC: u32 = 1 << 0;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A buffer the kernel reads and writes through the addresses registered
/// with an entry: it never moves and is freed only with its ring.
struct Buf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: who touches a buffer when is the protocol above: the kernel
// while the entry is its own, then the ring's thread, or the one thread
// holding the entry's Answer.
unsafe impl Send for Buf {}
unsafe impl Sync for Buf {}

impl Buf {
    fn new(len: usize) -> Buf {
        let b = vec![0u8; len].into_boxed_slice();
        Buf {
            ptr: Box::into_raw(b).cast::<u8>(),
            len,
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: made by Box::into_raw of a slice of this length.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.ptr, self.len,
            )))
        };
    }
}

/// An answer waiting for its ring's thread to commit it.
struct Done {
    entry: usize,
    commit_id: u64,
    unique: u64,
    /// Negative errno, or 0.
    error: i32,
    /// Body length, already in the payload buffer unless `staged`.
    len: usize,
    staged: Option<Vec<u8>>,
}

/// One thread's ring: its entries' buffers and the answers to commit.
struct Ring {
    headers: Vec<Buf>,
    payloads: Vec<Buf>,
    done: Mutex<Vec<Done>>,
    wake: OwnedFd,
}

thread_local! {
    /// The ring this thread serves (its address), if any.
    static SERVING: Cell<usize> = const { Cell::new(0) };
}

impl Ring {
    /// The header and the payload (as long as the header says) of the
    /// request in `entry`, which the kernel has completed: the entry is
    /// this thread's until committed. Answers to requests that read the
    /// payload are staged (`reads_payload`), so nothing writes it while
    /// these live.
    fn request(&self, entry: usize) -> (&[u8], &[u8]) {
        // SAFETY: as above; each buffer is as long as the slice made of it.
        let header = unsafe { std::slice::from_raw_parts(self.headers[entry].ptr, RING_HEADER) };
        let len = (u32_at(header, PAYLOAD_SZ) as usize).min(PAYLOAD);
        // SAFETY: as above.
        let payload = unsafe { std::slice::from_raw_parts(self.payloads[entry].ptr, len) };
        (header, payload)
    }

    fn push(self: &Arc<Ring>, d: Done) {
        self.done.lock().unwrap_or_else(|p| p.into_inner()).push(d);
        let here = SERVING.with(|s| s.get()) == Arc::as_ptr(self) as usize;
        if !here {
            let one: u64 = 1;
            // SAFETY: an eventfd takes one u64; a failed wake-up can only
            // be a full counter, which wakes the thread anyway.
            unsafe { libc::write(self.wake.as_raw_fd(), (&raw const one).cast(), 8) };
        }
    }
}

/// The rings serving a mount, and how many requests they answered.
pub struct Rings {
    threads: Vec<JoinHandle<()>>,
    served: Arc<AtomicU64>,
}

impl Rings {
    /// Requests the rings have answered so far.
    pub fn served(&self) -> Arc<AtomicU64> {
        self.served.clone()
    }
}

impl Drop for Rings {
    /// The threads end when the connection does (at unmount).
    fn drop(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How many queues the kernel makes: one per possible CPU.
fn possible_cpus() -> usize {
    let n = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
                .max()
        });
    n.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |max| max + 1,
    )
}

/// Starts serving the queues of the connection `dev` (a /dev/fuse
/// descriptor whose INIT negotiated FUSE_OVER_IO_URING). Returns once every
/// ring has registered its entries, with the first error if one did not:
/// the kernel switches to the rings only when every CPU's queue has
/// entries, so it then may or may not use the threads that did register.
/// Either way the [`Rings`] must be kept until the session has ended.
/// `abort` ends the connection: it is called when a thread that had
/// registered fails, since the requests its entries hold (and every later
/// one the kernel gives its queue) would otherwise wait forever.
pub(super) fn start(
    dev: OwnedFd,
    ops: Arc<Ops>,
    owner: Option<u32>,
    abort: Arc<dyn Fn() + Send + Sync>,
) -> (Rings, io::Result<()>) {
    let dev = Arc::new(dev);
    let served = Arc::new(AtomicU64::new(0));
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let bulk = Arc::new(SlowWork::with_threads(cpus.clamp(2, 8), "lsvfs-bulk"));
    // One per CPU, four at least and eight at most: files whose writes
    // share a lane wait for each other.
    let writes = Arc::new(Lanes::new(cpus.clamp(4, 8), "lsvfs-write"));
    let (tx, rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let mut threads = Vec::new();
    let mut result = Ok(());
    'spawn: for queue in 0..possible_cpus() {
        for n in 0..THREADS_PER_QUEUE {
            let (dev, ops, served, tx) = (dev.clone(), ops.clone(), served.clone(), tx.clone());
            let (bulk, writes, abort) = (bulk.clone(), writes.clone(), abort.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("lsvfs-ring-{queue}.{n}"))
                .spawn(move || {
                    let to = Serve {
                        ops: &ops,
                        bulk: &bulk,
                        writes: &writes,
                        owner,
                        served: &served,
                    };
                    // A panic (outside the requests, which `guarded`
                    // answers) is an error too: `start` waits to hear from
                    // every thread.
                    let mut registered = false;
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        serve_queue(dev.as_raw_fd(), queue as u16, &to, &tx, &mut registered)
                    }))
                    .unwrap_or_else(|_| Err(io::Error::other("the ring thread panicked")));
                    match r {
                        Ok(()) => {}
                        // Before registering, `start` hears of it.
                        Err(e) if !registered => {
                            tracing::error!("FUSE io_uring queue {queue}, thread {n}: {e}");
                            let _ = tx.send(Err(e));
                        }
                        // An error while the connection ends (an unmount)
                        // is its end too.
                        Err(e) if !connection_live(dev.as_raw_fd()) => {
                            tracing::debug!("FUSE io_uring queue {queue}, thread {n}: {e}, as the connection ended");
                        }
                        // After, its entries hold requests nobody will
                        // answer, and the kernel goes on giving the queue
                        // new ones: the callers would wait forever.
                        Err(e) => {
                            tracing::error!(
                                "FUSE io_uring queue {queue}, thread {n}: {e}; the requests it \
                                 held can never be answered, so the connection is ended \
                                 (callers get ENOTCONN; the volume is flushed and closed \
                                 as at an unmount; mount it again)"
                            );
                            abort();
                        }
                    }
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    result = Err(e);
                    break 'spawn;
                }
            }
        }
    }
    drop(tx);
    for _ in 0..threads.len() {
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                result = result.and(Err(e));
                break;
            }
            Err(_) => {
                result = result.and(Err(io::Error::other(
                    "a ring thread ended before registering",
                )));
                break;
            }
        }
    }
    (Rings { threads, served }, result)
}

/// Whether the connection of `dev` (a /dev/fuse descriptor) still
/// serves: once it has ended (unmounted or aborted), polling the device
/// reports an error.
fn connection_live(dev: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd: dev,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, on the stack; no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n >= 0 && p.revents & (libc::POLLERR | libc::POLLNVAL) == 0
}

fn pin_to(cpu: usize) {
    // A CPU past what a cpu_set_t holds (CPU_SET would panic): unpinned.
    if cpu >= libc::CPU_SETSIZE as usize {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is an empty set; the call only reads it.
    // Refused (an offline CPU), the thread runs anywhere.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The 80-byte command of a FUSE ring SQE (struct fuse_uring_cmd_req).
fn ring_cmd(commit_id: u64, queue: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_le_bytes());
    cmd[16..18].copy_from_slice(&queue.to_le_bytes());
    cmd
}

/// Is this error the connection ending (unmount, abort)?
fn ended(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV | libc::ECANCELED
    )
}

/// What every ring thread of a mount serves with.
struct Serve<'a> {
    ops: &'a Arc<Ops>,
    /// Threads for large reads.
    bulk: &'a SlowWork,
    /// Lanes for large writes, by inode.
    writes: &'a Lanes,
    /// Only this uid's requests are served (None: everyone's).
    owner: Option<u32>,
    /// Requests the rings answered.
    served: &'a AtomicU64,
}

fn serve_queue(
    dev: RawFd,
    queue: u16,
    to: &Serve<'_>,
    registered: &std::sync::mpsc::Sender<io::Result<()>>,
    is_registered: &mut bool,
) -> io::Result<()> {
    pin_to(queue as usize);
    // A woken ring thread should run at once on its CPU, whose caller
    // waits for it: the getxattr round trip took 10.5-11.7 µs at nice 0
    // and 6.2-7.6 µs at -10 (`benches/fuse_transport.rs --measure`, two
    // mounts each; the nice-0 figures come from a build with RING_NICE
    // set to 0). Root only; refused, the thread keeps its nice.
    // SAFETY: setpriority on this thread, integer arguments only.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as u32, RING_NICE) };
    // SAFETY: eventfd with flags only.
    let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if wake < 0 {
        return Err(io::Error::last_os_error());
    }
    let ring = Arc::new(Ring {
        headers: (0..ENTRIES_PER_THREAD)
            .map(|_| Buf::new(RING_HEADER))
            .collect(),
        payloads: (0..ENTRIES_PER_THREAD).map(|_| Buf::new(PAYLOAD)).collect(),
        done: Mutex::new(Vec::new()),
        // SAFETY: a new descriptor, ours alone.
        wake: unsafe { OwnedFd::from_raw_fd(wake) },
    });
    SERVING.with(|s| s.set(Arc::as_ptr(&ring) as usize));
    let mut wake_buf = Box::new([0u8; 8]);
    // Made after the buffers its commands name, so that it is dropped
    // (closed, cancelling them) before they are freed.
    let mut uring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build((2 * ENTRIES_PER_THREAD) as u32)?;
    let iovecs: Vec<[libc::iovec; 2]> = (0..ENTRIES_PER_THREAD)
        .map(|e| {
            [
                libc::iovec {
                    iov_base: ring.headers[e].ptr.cast(),
                    iov_len: RING_HEADER,
                },
                libc::iovec {
                    iov_base: ring.payloads[e].ptr.cast(),
                    iov_len: PAYLOAD,
                },
            ]
        })
        .collect();
    for (e, iov) in iovecs.iter().enumerate() {
        let sqe = opcode::UringCmd80::new(types::Fd(dev), CMD_REGISTER)
            .cmd(ring_cmd(0, queue))
            .addr(Some(iov.as_ptr() as u64))
            .build()
            .user_data(e as u64);
        // io-uring 0.7's UringCmd80 sets no `len`; REGISTER takes the
        // iovec count there (offset 24 of struct io_uring_sqe).
        // SAFETY: Entry128 is repr(C): the 64-byte SQE, then 64 more bytes.
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        raw[24..28].copy_from_slice(&2u32.to_le_bytes());
        // SAFETY: the same bytes, with `len` set.
        let sqe: squeue::Entry128 = unsafe { std::mem::transmute(raw) };
        // SAFETY: the iovecs live until the submit below has read them;
        // the buffers they name live as long as the ring.
        unsafe { uring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("ring full while registering"))?;
    }
    let arm_wake = |uring: &mut IoUring<squeue::Entry128, cqueue::Entry>, buf: *mut u8| {
        let sqe = opcode::Read::new(types::Fd(ring.wake.as_raw_fd()), buf, 8)
            .build()
            .user_data(WAKE);
        // SAFETY: the buffer lives as long as the ring.
        unsafe { uring.submission().push(&sqe.into()) }.map_err(|_| io::Error::other("ring full"))
    };
    arm_wake(&mut uring, wake_buf.as_mut_ptr())?;
    uring.submit()?;
    drop(iovecs);
    // A REGISTER the kernel refuses completes at once; one it takes
    // completes only with a request.
    let mut completed = Vec::with_capacity(2 * ENTRIES_PER_THREAD);
    completed.extend(uring.completion().map(|c| (c.user_data(), c.result())));
    if let Some(&(_, result)) = completed.iter().find(|&&(d, r)| d != WAKE && r < 0) {
        return Err(io::Error::from_raw_os_error(-result));
    }
    let _ = registered.send(Ok(()));
    *is_registered = true;

    // Each turn: serve what completed (requests, wake-ups), commit the
    // answers ready, then submit and wait for more.
    loop {
        for &(data, result) in &completed {
            if data == WAKE {
                arm_wake(&mut uring, wake_buf.as_mut_ptr())?;
            } else if result < 0 {
                if ended(-result) {
                    return Ok(());
                }
                return Err(io::Error::from_raw_os_error(-result));
            } else {
                #[cfg(debug_assertions)]
                fail_for_test(&ring, data as usize)?;
                to.served.fetch_add(1, Ordering::Relaxed);
                // A request that panics is answered EIO (its Answer, dropped
                // unanswered), which this thread then commits.
                super::guarded(|| dispatch(to, &ring, data as usize));
            }
        }
        completed.clear();
        let done = std::mem::take(&mut *ring.done.lock().unwrap_or_else(|p| p.into_inner()));
        for d in done {
            commit(&ring, &d);
            let sqe = opcode::UringCmd80::new(types::Fd(dev), CMD_COMMIT_AND_FETCH)
                .cmd(ring_cmd(d.commit_id, queue))
                .build()
                .user_data(d.entry as u64);
            // SAFETY: as at registration. Each entry has at most one SQE
            // in flight, so the ring (twice the entries) has room.
            unsafe { uring.submission().push(&sqe) }
                .map_err(|_| io::Error::other("ring full while committing"))?;
        }
        match uring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
            // Short of memory for now: the commands stay in the submission
            // queue and go in at the next try. Ending the thread instead
            // would strand the requests its entries hold.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
        completed.extend(uring.completion().map(|c| (c.user_data(), c.result())));
    }
}

/// The name whose LOOKUP, in a debug build whose environment sets
/// `LSVFS_TEST_RING_FAIL`, makes the ring thread that took it fail as an
/// unexpected io_uring error would: the request is never answered.
#[cfg(debug_assertions)]
const TEST_RING_FAIL_NAME: &[u8] = b"lsvfs-test-ring-fail";

#[cfg(debug_assertions)]
fn fail_for_test(ring: &Ring, entry: usize) -> io::Result<()> {
    if std::env::var_os("LSVFS_TEST_RING_FAIL").is_none() {
        return Ok(());
    }
    let (header, p) = ring.request(entry);
    if u32_at(header, 4) == FUSE_LOOKUP
        && name(p).is_some_and(|(n, _)| n.as_bytes() == TEST_RING_FAIL_NAME)
    {
        return Err(io::Error::other(
            "LSVFS_TEST_RING_FAIL: a LOOKUP of lsvfs-test-ring-fail fails its ring thread",
        ));
    }
    Ok(())
}

/// Writes an answer's header (and staged body) into its entry.
fn commit(ring: &Ring, d: &Done) {
    let header = &ring.headers[d.entry];
    let payload = &ring.payloads[d.entry];
    let (mut len, mut error) = (d.len, d.error);
    match &d.staged {
        // As `Answer::send` answers an unstaged body that does not fit.
        Some(body) if body.len() > payload.len => (len, error) = (0, -libc::EIO),
        Some(body) => {
            len = body.len();
            // SAFETY: the entry is ours until committed; nothing borrows
            // its payload any more (the operation returned before this
            // runs), and the body fits.
            unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), payload.ptr, len) };
        }
        None => {}
    }
    let mut out = [0u8; OUT_HEADER];
    out[0..4].copy_from_slice(&((OUT_HEADER + len) as u32).to_le_bytes());
    out[4..8].copy_from_slice(&error.to_le_bytes());
    out[8..16].copy_from_slice(&d.unique.to_le_bytes());
    // SAFETY: as above; the header is 288 bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(out.as_ptr(), header.ptr, OUT_HEADER);
        std::ptr::copy_nonoverlapping(
            (len as u32).to_le_bytes().as_ptr(),
            header.ptr.add(PAYLOAD_SZ),
            4,
        );
    }
}

/// Requests whose arguments point into the payload buffer (names, write
/// data): their answers are staged and copied in at commit, after the
/// operation stopped reading the arguments.
fn reads_payload(opcode: u32) -> bool {
    matches!(
        opcode,
        FUSE_LOOKUP
            | FUSE_SYMLINK
            | FUSE_MKNOD
            | FUSE_MKDIR
            | FUSE_UNLINK
            | FUSE_RMDIR
            | FUSE_RENAME
            | FUSE_RENAME2
            | FUSE_LINK
            | FUSE_WRITE
            | FUSE_SETXATTR
            | FUSE_GETXATTR
            | FUSE_REMOVEXATTR
            | FUSE_CREATE
    )
}

/// The request's name, for the log.
fn op_name(opcode: u32) -> String {
    let name = match opcode {
        FUSE_LOOKUP => "LOOKUP",
        FUSE_GETATTR => "GETATTR",
        FUSE_SETATTR => "SETATTR",
        FUSE_READLINK => "READLINK",
        FUSE_SYMLINK => "SYMLINK",
        FUSE_MKNOD => "MKNOD",
        FUSE_MKDIR => "MKDIR",
        FUSE_UNLINK => "UNLINK",
        FUSE_RMDIR => "RMDIR",
        FUSE_RENAME => "RENAME",
        FUSE_LINK => "LINK",
        FUSE_OPEN => "OPEN",
        FUSE_READ => "READ",
        FUSE_WRITE => "WRITE",
        FUSE_STATFS => "STATFS",
        FUSE_RELEASE => "RELEASE",
        FUSE_FSYNC => "FSYNC",
        FUSE_SETXATTR => "SETXATTR",
        FUSE_GETXATTR => "GETXATTR",
        FUSE_LISTXATTR => "LISTXATTR",
        FUSE_REMOVEXATTR => "REMOVEXATTR",
        FUSE_FLUSH => "FLUSH",
        FUSE_OPENDIR => "OPENDIR",
        FUSE_READDIR => "READDIR",
        FUSE_RELEASEDIR => "RELEASEDIR",
        FUSE_FSYNCDIR => "FSYNCDIR",
        FUSE_CREATE => "CREATE",
        FUSE_DESTROY => "DESTROY",
        FUSE_FALLOCATE => "FALLOCATE",
        FUSE_READDIRPLUS => "READDIRPLUS",
        FUSE_RENAME2 => "RENAME2",
        _ => return format!("opcode {opcode}"),
    };
    name.to_string()
}

/// A NUL-terminated name at the start of `b`, and what follows it.
fn name(b: &[u8]) -> Option<(&OsStr, &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((OsStr::from_bytes(&b[..end]), &b[end + 1..]))
}

fn time(secs: u64, nsecs: u32) -> SystemTime {
    system_time(Time {
        sec: secs as i64,
        nsec: nsecs.min(999_999_999),
    })
}

/// Decodes one request and calls its operation.
fn dispatch(to: &Serve<'_>, ring: &Arc<Ring>, entry: usize) {
    let (ops, owner) = (to.ops, to.owner);
    let (header, p) = ring.request(entry);
    let opcode = u32_at(header, 4);
    let unique = u64_at(header, 8);
    let node = INodeNo(u64_at(header, 16));
    let (uid, gid) = (u32_at(header, 24), u32_at(header, 28));
    let commit_id = u64_at(header, COMMIT_ID);
    let mut op = [0u8; OP_IN_LEN];
    op.copy_from_slice(&header[OP_IN..OP_IN + OP_IN_LEN]);
    let a = Answer {
        ring: Some(ring.clone()),
        entry,
        unique,
        commit_id,
        staged: reads_payload(opcode),
        len: 0,
        max: 0,
    };
    // As fuser: a mount limited to its owner answers anyone else EACCES,
    // except for what the kernel may send without a caller.
    let kernels = matches!(
        opcode,
        FUSE_READ
            | FUSE_READDIR
            | FUSE_READDIRPLUS
            | FUSE_WRITE
            | FUSE_FSYNC
            | FUSE_FSYNCDIR
            | FUSE_RELEASE
            | FUSE_RELEASEDIR
            | FUSE_DESTROY
    );
    if owner.is_some_and(|o| o != uid) && !kernels {
        return a.error(Errno::EACCES);
    }
    if tracing::enabled!(tracing::Level::DEBUG) {
        // As fuser logs each request it serves over /dev/fuse.
        let named = reads_payload(opcode) && opcode != FUSE_WRITE;
        let n = named.then(|| name(p).map(|(n, _)| n)).flatten();
        tracing::debug!(
            "FUSE({unique}) ino {:#018x} {}{}",
            node.0,
            op_name(opcode),
            n.map(|n| format!(" name {n:?}")).unwrap_or_default()
        );
    }
    let c = Caller::new(uid, gid);
    let u32_ = |at: usize| u32_at(&op, at);
    let u64_ = |at: usize| u64_at(&op, at);
    match opcode {
        FUSE_LOOKUP => match name(p) {
            Some((n, _)) => ops.lookup(&c, node, n, a),
            None => a.error(Errno::EINVAL),
        },
        FUSE_GETATTR => {
            let fh = (u32_(0) & FUSE_GETATTR_FH != 0).then(|| FileHandle(u64_(8)));
            ops.getattr(&c, node, fh, a)
        }
        FUSE_SETATTR => {
            // struct fuse_setattr_in
            let valid = u32_(0);
            let has = |bit: u32| valid & bit != 0;
            let when = |set: u32, now: u32, secs: u64, nsecs: u32| {
                has(set).then(|| {
                    if has(now) {
                        TimeOrNow::Now
                    } else {
                        TimeOrNow::SpecificTime(time(secs, nsecs))
                    }
                })
            };
            ops.setattr(
                &c,
                node,
                has(FATTR_MODE).then(|| u32_(68)),
                has(FATTR_UID).then(|| u32_(76)),
                has(FATTR_GID).then(|| u32_(80)),
                has(FATTR_SIZE).then(|| u64_(16)),
                when(FATTR_ATIME, FATTR_ATIME_NOW, u64_(32), u32_(56)),
                when(FATTR_MTIME, FATTR_MTIME_NOW, u64_(40), u32_(60)),
                has(FATTR_CTIME).then(|| time(u64_(48), u32_(64))),
                has(FATTR_FH).then(|| FileHandle(u64_(8))),
                None,
                None,
                None,
                None,
                a,
            )
        }
        FUSE_READLINK => ops.readlink(&c, node, a),
        FUSE_SYMLINK => match name(p).and_then(|(n, rest)| Some((n, name(rest)?.0))) {
            Some((n, target)) => ops.symlink(&c, node, n, Path::new(target), a),
            None => a.error(Errno::EINVAL),
        },
        FUSE_MKNOD => match name(p) {
            Some((n, _)) => ops.mknod(&c, node, n, u32_(0), u32_(8), u32_(4), a),
            None => a.error(Errno::EINVAL),
        },
        FUSE_MKDIR => match name(p) {
            Some((n, _)) => ops.mkdir(&c, node, n, u32_(0), u32_(4), a),
            None => a.error(Errno::EINVAL),
        },
        FUSE_UNLINK => match name(p) {
            Some((n, _)) => ops.unlink(&c, node, n, a),
            None => a.error(Errno::EINVAL),
        },
        FUSE_RMDIR => match name(p) {
            Some((n, _)) => ops.rmdir(&c, node, n, a),
            None => a.error(Errno::EINVAL),
        },
        FUSE_RENAME | FUSE_RENAME2 => {
            let flags = if opcode == FUSE_RENAME2 { u32_(8) } else { 0 };
            match name(p).and_then(|(old, rest)| Some((old, name(rest)?.0))) {
                Some((old, new)) => ops.rename(
                    &c,
                    node,
                    old,
                    INodeNo(u64_(0)),
                    new,
                    RenameFlags::from_bits_retain(flags),
                    a,
                ),
                None => a.error(Errno::EINVAL),
            }
        }
        FUSE_LINK => match name(p) {
            Some((n, _)) => ops.link(&c, INodeNo(u64_(0)), node, n, a),
            None => a.error(Errno::EINVAL),
        },
        FUSE_OPEN => ops.open(&c, node, OpenFlags(u32_(0) as i32), a),
        FUSE_READ => {
            // struct fuse_read_in
            let owner = (u32_(20) & FUSE_READ_LOCKOWNER != 0).then(|| LockOwner(u64_(24)));
            let size = u32_(16).min(PAYLOAD as u32);
            let flags = OpenFlags(u32_(32) as i32);
            let (fh, offset) = (FileHandle(u64_(0)), u64_(8));
            if size >= BULK_READ {
                let ops = ops.clone();
                to.bulk.run(move || {
                    ops.read(
                        &Caller::new(uid, gid),
                        node,
                        fh,
                        offset,
                        size,
                        flags,
                        owner,
                        a,
                    )
                });
            } else {
                ops.read(&c, node, fh, offset, size, flags, owner, a)
            }
        }
        FUSE_WRITE => {
            // struct fuse_write_in, then the data
            let size = u32_(16) as usize;
            if size > p.len() {
                return a.error(Errno::EINVAL);
            }
            let flags = WriteFlags::from_bits_retain(u32_(20));
            let open = OpenFlags(u32_(32) as i32);
            let owner = Some(LockOwner(u64_(24)));
            let (fh, offset) = (FileHandle(u64_(0)), u64_(8));
            if size >= BULK_WRITE {
                let (ops, ring) = (ops.clone(), ring.clone());
                to.writes.run(node.0, move || {
                    // The entry's buffer stays the request's until `a`
                    // commits the answer, so `a` waits until the write
                    // has let go of the data.
                    let held = HeldWrite::default();
                    let data = &ring.request(entry).1[..size];
                    let c = Caller::new(uid, gid);
                    ops.write(&c, node, fh, offset, data, flags, open, owner, held.clone());
                    match held.0.get() {
                        Some(Ok(n)) => a.written(*n),
                        Some(Err(e)) => a.error(*e),
                        None => a.error(Errno::EIO),
                    }
                });
            } else {
                ops.write(&c, node, fh, offset, &p[..size], flags, open, owner, a)
            }
        }
        FUSE_STATFS => ops.statfs(&c, node, a),
        FUSE_RELEASE => {
            // struct fuse_release_in
            let flush = u32_(12) & FUSE_RELEASE_FLUSH != 0;
            let flags = OpenFlags(u32_(8) as i32);
            let owner = Some(LockOwner(u64_(16)));
            ops.release(&c, node, FileHandle(u64_(0)), flags, owner, flush, a)
        }
        FUSE_FSYNC | FUSE_FSYNCDIR => {
            let datasync = u32_(8) & FUSE_FSYNC_FDATASYNC != 0;
            if opcode == FUSE_FSYNC {
                ops.fsync(&c, node, FileHandle(u64_(0)), datasync, a)
            } else {
                ops.fsyncdir(&c, node, FileHandle(u64_(0)), datasync, a)
            }
        }
        FUSE_SETXATTR => {
            // struct fuse_setxattr_in (8 bytes: no FUSE_SETXATTR_EXT)
            let size = u32_(0) as usize;
            match name(p) {
                Some((n, value)) if value.len() >= size => {
                    ops.setxattr(&c, node, n, &value[..size], u32_(4) as i32, 0, a)
                }
                _ => a.error(Errno::EINVAL),
            }
        }
        FUSE_GETXATTR => match name(p) {
            Some((n, _)) => ops.getxattr(&c, node, n, u32_(0), a),
            None => a.error(Errno::EINVAL),
        },
        FUSE_LISTXATTR => ops.listxattr(&c, node, u32_(0), a),
        FUSE_REMOVEXATTR => match name(p) {
            Some((n, _)) => ops.removexattr(&c, node, n, a),
            None => a.error(Errno::EINVAL),
        },
        FUSE_FLUSH => ops.flush(&c, node, FileHandle(u64_(0)), LockOwner(u64_(16)), a),
        // fuser's defaults, as over /dev/fuse.
        FUSE_OPENDIR => a.opened(FileHandle(0), FopenFlags::empty()),
        FUSE_RELEASEDIR | FUSE_DESTROY => EmptyReply::ok(a),
        FUSE_READDIR | FUSE_READDIRPLUS => {
            // struct fuse_read_in: the listing fills at most `size` bytes.
            let mut a = a;
            a.max = (u32_(16) as usize).min(PAYLOAD);
            if opcode == FUSE_READDIR {
                ops.readdir(&c, node, FileHandle(u64_(0)), u64_(8), a)
            } else {
                ops.readdirplus(&c, node, FileHandle(u64_(0)), u64_(8), a)
            }
        }
        FUSE_CREATE => match name(p) {
            // struct fuse_create_in: flags, mode, umask, open_flags
            Some((n, _)) => ops.create(&c, node, n, u32_(4), u32_(8), u32_(0) as i32, a),
            None => a.error(Errno::EINVAL),
        },
        FUSE_FALLOCATE => {
            // struct fuse_fallocate_in
            let (offset, length, mode) = (u64_(8), u64_(16), u32_(24) as i32);
            ops.fallocate(&c, node, FileHandle(u64_(0)), offset, length, mode, a)
        }
        _ => a.error(Errno::ENOSYS),
    }
}

/// The answer to one request that came over a ring. Dropped unanswered,
/// it answers EIO (as fuser's replies do).
pub(super) struct Answer {
    ring: Option<Arc<Ring>>,
    entry: usize,
    unique: u64,
    commit_id: u64,
    /// The body goes into a buffer of its own, copied in at commit.
    staged: bool,
    /// Bytes of a directory listing so far (in the payload buffer).
    len: usize,
    /// The most a directory listing may take.
    max: usize,
}

impl Answer {
    /// The answer to commit: `len` bytes already in the payload buffer.
    fn done(&self, error: i32, len: usize) -> Done {
        Done {
            entry: self.entry,
            commit_id: self.commit_id,
            unique: self.unique,
            error,
            len,
            staged: None,
        }
    }

    fn send(mut self, error: i32, parts: &[&[u8]]) {
        let Some(ring) = self.ring.take() else { return };
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut done = self.done(error, 0);
        if error == 0 {
            if self.staged {
                done.staged = Some(parts.concat());
            } else if total <= PAYLOAD {
                let mut at = 0;
                for part in parts {
                    // SAFETY: the entry is ours, nothing borrows its payload
                    // (`reads_payload`), and the parts fit.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            part.as_ptr(),
                            ring.payloads[self.entry].ptr.add(at),
                            part.len(),
                        )
                    };
                    at += part.len();
                }
                done.len = total;
            } else {
                done.error = -libc::EIO;
            }
        }
        ring.push(done);
    }

    /// Appends a directory entry to the listing; true if it does not fit.
    fn append(&mut self, parts: [&[u8]; 2]) -> bool {
        let len = parts[0].len() + parts[1].len();
        let padded = len.next_multiple_of(8);
        if self.len + padded > self.max {
            return true;
        }
        let Some(ring) = &self.ring else { return true };
        let base = ring.payloads[self.entry].ptr;
        // SAFETY: a listing request reads nothing from the payload, and
        // `max` is at most its length.
        unsafe {
            std::ptr::copy_nonoverlapping(parts[0].as_ptr(), base.add(self.len), parts[0].len());
            std::ptr::copy_nonoverlapping(
                parts[1].as_ptr(),
                base.add(self.len + parts[0].len()),
                parts[1].len(),
            );
            std::ptr::write_bytes(base.add(self.len + len), 0, padded - len);
        }
        self.len += padded;
        false
    }

    /// The listing built by `append`, already in place.
    fn send_listing(mut self) {
        let Some(ring) = self.ring.take() else { return };
        ring.push(self.done(0, self.len));
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if self.ring.is_some() {
            tracing::warn!("request {} was not answered; answering EIO", self.unique);
            let a = Answer {
                ring: self.ring.take(),
                ..*self
            };
            a.send(-libc::EIO, &[]);
        }
    }
}

fn type_bits(kind: FileType) -> u32 {
    match kind {
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Socket => libc::S_IFSOCK,
    }
}

/// struct fuse_attr (88 bytes).
fn fuse_attr(out: &mut Vec<u8>, a: &FileAttr) {
    let t = |st: SystemTime| our_time(TimeOrNow::SpecificTime(st));
    let (at, mt, ct) = (t(a.atime), t(a.mtime), t(a.ctime));
    for v in [
        a.ino.0,
        a.size,
        a.blocks,
        at.sec as u64,
        mt.sec as u64,
        ct.sec as u64,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in [
        at.nsec,
        mt.nsec,
        ct.nsec,
        type_bits(a.kind) | u32::from(a.perm),
        a.nlink,
        a.uid,
        a.gid,
        a.rdev,
        a.blksize,
        0,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// struct fuse_entry_out (128 bytes).
fn entry_out(out: &mut Vec<u8>, ttl: &Duration, a: &FileAttr, generation: Generation) {
    for v in [a.ino.0, generation.0, ttl.as_secs(), ttl.as_secs()] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&ttl.subsec_nanos().to_le_bytes());
    out.extend_from_slice(&ttl.subsec_nanos().to_le_bytes());
    fuse_attr(out, a);
}

/// struct fuse_open_out (16 bytes).
fn open_out(out: &mut Vec<u8>, fh: FileHandle, flags: FopenFlags) {
    out.extend_from_slice(&fh.0.to_le_bytes());
    out.extend_from_slice(&flags.bits().to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
}

impl Reply for Answer {
    fn error(self, e: Errno) {
        self.send(-e.code(), &[])
    }
}

impl EmptyReply for Answer {
    fn ok(self) {
        self.send(0, &[])
    }
}

impl EntryReply for Answer {
    fn entry(self, ttl: &Duration, attr: &FileAttr, generation: Generation) {
        let mut out = Vec::with_capacity(128);
        entry_out(&mut out, ttl, attr, generation);
        self.send(0, &[&out])
    }
}

impl AttrReply for Answer {
    fn attr(self, ttl: &Duration, attr: &FileAttr) {
        // struct fuse_attr_out (104 bytes)
        let mut out = Vec::with_capacity(104);
        out.extend_from_slice(&ttl.as_secs().to_le_bytes());
        out.extend_from_slice(&ttl.subsec_nanos().to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        fuse_attr(&mut out, attr);
        self.send(0, &[&out])
    }
}

impl DataReply for Answer {
    fn data(self, data: &[u8]) {
        self.send(0, &[data])
    }

    /// Reads straight into the entry's payload buffer, which the kernel
    /// copies the answer from: the bytes are copied once fewer than
    /// through a buffer of the thread's own.
    fn fill(mut self, len: usize, read: impl FnOnce(&mut [u8]) -> Result<Range<usize>, Errno>) {
        let Some(ring) = self.ring.clone() else {
            return;
        };
        if self.staged || len > PAYLOAD {
            return fill_from_thread_buffer(self, len, read);
        }
        let base = ring.payloads[self.entry].ptr;
        // SAFETY: the entry is ours until committed, the request reads
        // nothing from its payload (not `staged`), and `len` fits in it.
        // The slice ends with `read`, before the bytes are moved below.
        let got = read(unsafe { std::slice::from_raw_parts_mut(base, len) });
        match got {
            Ok(r) if r.start <= r.end && r.end <= len => {
                // SAFETY: both ranges lie in the payload (checked above);
                // `copy` allows them to overlap.
                unsafe { std::ptr::copy(base.add(r.start), base, r.len()) };
                self.ring = None;
                ring.push(self.done(0, r.len()));
            }
            Ok(_) => self.error(Errno::EIO),
            Err(e) => self.error(e),
        }
    }
}

impl OpenReply for Answer {
    fn opened(self, fh: FileHandle, flags: FopenFlags) {
        let mut out = Vec::with_capacity(16);
        open_out(&mut out, fh, flags);
        self.send(0, &[&out])
    }
}

/// A WRITE's answer as `Ops::write` gives it, sent by the caller once the
/// write has returned: the data it borrows is the entry's buffer, which
/// the answer hands back to the kernel.
#[derive(Clone, Default)]
struct HeldWrite(Arc<std::sync::OnceLock<Result<u32, Errno>>>);

impl Reply for HeldWrite {
    fn error(self, e: Errno) {
        let _ = self.0.set(Err(e));
    }
}

impl WriteReply for HeldWrite {
    fn written(self, size: u32) {
        let _ = self.0.set(Ok(size));
    }
}

impl WriteReply for Answer {
    fn written(self, size: u32) {
        // struct fuse_write_out
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&size.to_le_bytes());
        self.send(0, &[&out])
    }
}

impl XattrReply for Answer {
    fn size(self, size: u32) {
        // struct fuse_getxattr_out
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&size.to_le_bytes());
        self.send(0, &[&out])
    }
    fn data(self, data: &[u8]) {
        self.send(0, &[data])
    }
}

impl CreateReply for Answer {
    fn created(
        self,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
        fh: FileHandle,
        flags: FopenFlags,
    ) {
        let mut out = Vec::with_capacity(144);
        entry_out(&mut out, ttl, attr, generation);
        open_out(&mut out, fh, flags);
        self.send(0, &[&out])
    }
}

impl StatfsReply for Answer {
    fn statfs(self, s: &Statfs) {
        // struct fuse_kstatfs (80 bytes)
        let mut out = Vec::with_capacity(80);
        for v in [s.blocks, s.bfree, s.bavail, s.files, s.ffree] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [s.bsize, s.namelen, s.frsize, 0, 0, 0, 0, 0, 0, 0] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        self.send(0, &[&out])
    }
}

impl DirReply for Answer {
    fn add(&mut self, ino: INodeNo, offset: u64, kind: FileType, name: &OsStr) -> bool {
        // struct fuse_dirent, then the name
        let name = name.as_bytes();
        let mut head = [0u8; 24];
        head[0..8].copy_from_slice(&ino.0.to_le_bytes());
        head[8..16].copy_from_slice(&offset.to_le_bytes());
        head[16..20].copy_from_slice(&(name.len() as u32).to_le_bytes());
        head[20..24].copy_from_slice(&(type_bits(kind) >> 12).to_le_bytes());
        self.append([&head, name])
    }
    fn room(&self) -> Option<usize> {
        Some(self.max.saturating_sub(self.len))
    }
    fn ok(self) {
        self.send_listing()
    }
}

impl DirPlusReply for Answer {
    fn add(
        &mut self,
        _ino: INodeNo,
        offset: u64,
        name: &OsStr,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
    ) -> bool {
        // struct fuse_direntplus: fuse_entry_out, then fuse_dirent (its
        // inode number is the attributes', as fuser's), then the name
        let name = name.as_bytes();
        let mut head = Vec::with_capacity(152);
        entry_out(&mut head, ttl, attr, generation);
        head.extend_from_slice(&attr.ino.0.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        head.extend_from_slice(&(name.len() as u32).to_le_bytes());
        head.extend_from_slice(&(type_bits(attr.kind) >> 12).to_le_bytes());
        self.append([&head, name])
    }
    fn room(&self) -> Option<usize> {
        Some(self.max.saturating_sub(self.len))
    }
    fn ok(self) {
        self.send_listing()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr() -> FileAttr {
        FileAttr {
            ino: INodeNo(7),
            size: 4097,
            blocks: 16,
            atime: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5),
            mtime: SystemTime::UNIX_EPOCH - Duration::new(10, 0),
            ctime: SystemTime::UNIX_EPOCH + Duration::new(3, 999_999_999),
            crtime: SystemTime::UNIX_EPOCH,
            kind: FileType::Symlink,
            perm: 0o4755,
            nlink: 2,
            uid: 1000,
            gid: 100,
            rdev: 9,
            blksize: 4096,
            flags: 0,
        }
    }

    /// fuse_attr's fields land at the kernel's offsets.
    #[test]
    fn fuse_attr_has_the_kernel_layout() {
        let mut out = Vec::new();
        fuse_attr(&mut out, &attr());
        assert_eq!(out.len(), 88);
        assert_eq!(u64_at(&out, 0), 7);
        assert_eq!(u64_at(&out, 8), 4097);
        assert_eq!(u64_at(&out, 16), 16);
        assert_eq!(u64_at(&out, 24), 1_700_000_000);
        assert_eq!(u64_at(&out, 32) as i64, -10);
        assert_eq!(u64_at(&out, 40), 3);
        assert_eq!(u32_at(&out, 48), 5);
        assert_eq!(u32_at(&out, 52), 0);
        assert_eq!(u32_at(&out, 56), 999_999_999);
        assert_eq!(u32_at(&out, 60), libc::S_IFLNK | 0o4755);
        assert_eq!(u32_at(&out, 64), 2);
        assert_eq!(u32_at(&out, 68), 1000);
        assert_eq!(u32_at(&out, 72), 100);
        assert_eq!(u32_at(&out, 76), 9);
        assert_eq!(u32_at(&out, 80), 4096);
    }

    /// fuse_entry_out: node, generation, both timeouts, then the attributes.
    #[test]
    fn entry_out_has_the_kernel_layout() {
        let mut out = Vec::new();
        entry_out(
            &mut out,
            &Duration::from_millis(1500),
            &attr(),
            Generation(3),
        );
        assert_eq!(out.len(), 128);
        assert_eq!(u64_at(&out, 0), 7);
        assert_eq!(u64_at(&out, 8), 3);
        assert_eq!((u64_at(&out, 16), u64_at(&out, 24)), (1, 1));
        assert_eq!(
            (u32_at(&out, 32), u32_at(&out, 36)),
            (500_000_000, 500_000_000)
        );
        assert_eq!(u64_at(&out, 40), 7);
    }

    /// Names are NUL-terminated; a request without the NUL is refused.
    #[test]
    fn names_need_their_nul() {
        let (n, rest) = name(b"old\0new\0").unwrap();
        assert_eq!(n.as_bytes(), b"old");
        assert_eq!(name(rest).unwrap().0.as_bytes(), b"new");
        assert!(name(b"no terminator").is_none());
        assert!(name(b"").is_none());
    }
}
