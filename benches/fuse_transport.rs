//! What one FUSE request costs in the kernel's round trip alone, over
//! /dev/fuse and over FUSE io_uring (Linux 6.14+): the budget of the
//! transport lever in issue 13 (a program, not a timed test).
//!
//!     cargo bench --bench fuse_transport -- [--dir DIR] [--calls N]
//!     cargo bench --bench fuse_transport -- --measure FILE
//!
//! The first form mounts, in turn, a file system that does no work (a root
//! directory holding one file `f` with the extended attribute `user.x`)
//! served over /dev/fuse by one thread per CPU, the way lsvfs is served
//! today, and over one io_uring queue per CPU, its thread pinned to that
//! CPU. It times a loop of getxattr(2) calls on `f` (one request each, which
//! the kernel never caches) from one thread and from two. The second form
//! times the same loops on FILE of any mount, for example of lsvfs
//! (`scripts/bench-fuse-transport.sh` runs both in one run). Needs root;
//! the io_uring half needs `echo 1 > /sys/module/fuse/parameters/enable_uring`.
//!
//! The protocol code here serves only what the loop needs; it is a probe
//! of the kernel's transport, not lsvfs's FUSE server.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// One FUSE request's round trip, over /dev/fuse and over io_uring.
#[derive(clap::Parser)]
struct Args {
    /// Directory for the mountpoints.
    #[arg(long, default_value = "target/fuse-transport")]
    dir: PathBuf,
    /// getxattr calls per measurement and client.
    #[arg(long, default_value_t = 50_000)]
    calls: usize,
    /// Only time the getxattr loops on this file (which has `user.x`).
    #[arg(long)]
    measure: Option<PathBuf>,
    /// The name printed for --measure's file system (default: the file).
    #[arg(long)]
    label: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

// The kernel's FUSE ABI (include/uapi/linux/fuse.h), as far as used here.
const IN_HEADER: usize = 40; // struct fuse_in_header
const OUT_HEADER: usize = 16; // struct fuse_out_header
const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_STATFS: u32 = 17;
const FUSE_GETXATTR: u32 = 22;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_READDIR: u32 = 28;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;
const FUSE_ASYNC_READ: u32 = 1 << 0;
const FUSE_MAX_PAGES: u32 = 1 << 22;
const FUSE_INIT_EXT: u32 = 1 << 30;
/// FUSE_OVER_IO_URING (bit 41 of the 64 flags), in `flags2`.
const FUSE_OVER_IO_URING_FLAGS2: u32 = 1 << (41 - 32);
const MAX_WRITE: u32 = 128 * 1024;
/// Bytes a read of /dev/fuse and a ring entry's payload buffer can hold.
const PAYLOAD: usize = MAX_WRITE as usize + 4096;
// struct fuse_uring_req_header: in_out[128], op_in[128], then
// struct fuse_uring_ent_in_out { flags, commit_id, payload_sz, .. }.
const RING_HEADER: usize = 288;
const RING_OP_IN: usize = 128;
const RING_COMMIT_ID: usize = 264;
const RING_PAYLOAD_SZ: usize = 272;
const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;
/// Ring entries each queue registers.
const RING_DEPTH: usize = 2;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put(out: &mut Vec<u8>, words: &[u64], halves: &[u32]) {
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    for h in halves {
        out.extend_from_slice(&h.to_le_bytes());
    }
}

/// The size of the fixed struct in front of a request's variable part:
/// over io_uring it arrives in `op_in`, the rest in the payload buffer.
fn op_in_size(opcode: u32) -> usize {
    match opcode {
        FUSE_GETATTR => 16,    // fuse_getattr_in
        FUSE_GETXATTR => 8,    // fuse_getxattr_in
        FUSE_OPENDIR => 8,     // fuse_open_in
        FUSE_READDIR => 40,    // fuse_read_in
        FUSE_RELEASEDIR => 24, // fuse_release_in
        _ => 0,
    }
}

/// struct fuse_attr of the root (1) or of `f` (2).
fn attr(out: &mut Vec<u8>, ino: u64) {
    let (mode, nlink) = if ino == 1 {
        (0o040755, 2)
    } else {
        (0o100644, 1)
    };
    put(
        out,
        &[ino, 0, 0, 0, 0, 0],
        &[0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0],
    );
}

/// A request's answer: the reply's body, an errno, or nothing to send.
enum Answer {
    Reply(Vec<u8>),
    Error(i32),
    None,
}

/// The file system: a root directory holding `f`, which has `user.x`.
fn answer(opcode: u32, node: u64, op_in: &[u8], rest: &[u8]) -> Answer {
    let name = rest.split(|&c| c == 0).next().unwrap_or_default();
    let mut out = Vec::new();
    match opcode {
        FUSE_LOOKUP if node == 1 && name == b"f" => {
            // fuse_entry_out: the entry is cached for an hour, its
            // attributes not at all.
            put(&mut out, &[2, 0, 3600, 0], &[0, 0]);
            attr(&mut out, 2);
        }
        FUSE_LOOKUP => return Answer::Error(libc::ENOENT),
        FUSE_GETATTR => {
            put(&mut out, &[0], &[0, 0]);
            attr(&mut out, node);
        }
        FUSE_GETXATTR if node == 2 && name == b"user.x" => {
            if u32_at(op_in, 0) == 0 {
                put(&mut out, &[], &[1, 0]); // fuse_getxattr_out: the size
            } else {
                out.push(b'1');
            }
        }
        FUSE_GETXATTR => return Answer::Error(libc::ENODATA),
        FUSE_OPENDIR => out.resize(16, 0),
        FUSE_READDIR | FUSE_RELEASEDIR | FUSE_DESTROY => {}
        FUSE_STATFS => {
            out.resize(80, 0);
            out[40..44].copy_from_slice(&4096u32.to_le_bytes());
            out[44..48].copy_from_slice(&255u32.to_le_bytes());
        }
        FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => return Answer::None,
        _ => return Answer::Error(libc::ENOSYS),
    }
    Answer::Reply(out)
}

/// struct fuse_out_header followed by the body.
fn reply(unique: u64, answer: Answer) -> Option<Vec<u8>> {
    let (error, body) = match answer {
        Answer::Reply(body) => (0, body),
        Answer::Error(errno) => (-errno, Vec::new()),
        Answer::None => return None,
    };
    let mut out = Vec::with_capacity(OUT_HEADER + body.len());
    out.extend_from_slice(&((OUT_HEADER + body.len()) as u32).to_le_bytes());
    out.extend_from_slice(&error.to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out.extend(body);
    Some(out)
}

fn write_all(fd: RawFd, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: `bytes` is a live slice of the length passed.
    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Serves /dev/fuse until the connection goes away. Over io_uring the
/// kernel still sends FORGETs and INTERRUPTs here.
fn serve_device(fd: RawFd) {
    let mut buf = vec![0u8; PAYLOAD + IN_HEADER];
    loop {
        // SAFETY: `buf` is a live buffer of the length passed.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR | libc::ENOENT) => continue,
                _ => return, // ENODEV: unmounted
            }
        }
        let req = &buf[..n as usize];
        let (opcode, unique, node) = (u32_at(req, 4), u64_at(req, 8), u64_at(req, 16));
        let body = &req[IN_HEADER..];
        let split = op_in_size(opcode).min(body.len());
        if let Some(out) = reply(unique, answer(opcode, node, &body[..split], &body[split..])) {
            let _ = write_all(fd, &out);
        }
    }
}

/// The 80-byte command area of a FUSE ring SQE: struct fuse_uring_cmd_req.
fn ring_cmd(commit_id: u64, queue: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_le_bytes());
    cmd[16..18].copy_from_slice(&queue.to_le_bytes());
    cmd
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; the call reads `set` only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Serves one io_uring queue (the kernel sends a request to the queue of
/// the CPU its caller runs on) until the connection goes away.
fn serve_queue(fd: RawFd, queue: u16) -> io::Result<()> {
    pin_to(queue as usize);
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(2 * RING_DEPTH as u32)?;
    // Each entry: a header buffer and a payload buffer, registered once.
    let mut headers = vec![[0u64; RING_HEADER / 8]; RING_DEPTH];
    let mut payloads = vec![vec![0u8; PAYLOAD]; RING_DEPTH];
    let iovecs: Vec<[libc::iovec; 2]> = headers
        .iter_mut()
        .zip(payloads.iter_mut())
        .map(|(h, p)| {
            [
                libc::iovec {
                    iov_base: h.as_mut_ptr().cast(),
                    iov_len: RING_HEADER,
                },
                libc::iovec {
                    iov_base: p.as_mut_ptr().cast(),
                    iov_len: PAYLOAD,
                },
            ]
        })
        .collect();
    for (entry, iov) in iovecs.iter().enumerate() {
        let sqe = opcode::UringCmd80::new(types::Fd(fd), FUSE_IO_URING_CMD_REGISTER)
            .cmd(ring_cmd(0, queue))
            .addr(Some(iov.as_ptr() as u64))
            .build()
            .user_data(entry as u64);
        // io-uring 0.7's UringCmd80 sets no `len`; REGISTER takes the
        // iovec count there (offset 24 of struct io_uring_sqe).
        // SAFETY: Entry128 is repr(C), 128 bytes: the SQE and its extension.
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        raw[24..28].copy_from_slice(&2u32.to_le_bytes());
        let sqe: squeue::Entry128 = unsafe { std::mem::transmute(raw) };
        // SAFETY: the iovecs and the buffers they name outlive the ring.
        unsafe { ring.submission().push(&sqe) }.expect("ring has room for every entry");
    }
    loop {
        match ring.submit_and_wait(1) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (entry, result) in done {
            if result < 0 {
                // ENOTCONN or ECONNABORTED once unmounted.
                return Err(io::Error::from_raw_os_error(-result));
            }
            let entry = entry as usize;
            // SAFETY: the header buffer is 288 bytes, u64-aligned.
            let header: &mut [u8] = unsafe {
                std::slice::from_raw_parts_mut(headers[entry].as_mut_ptr().cast(), RING_HEADER)
            };
            let (opcode, unique, node) = (u32_at(header, 4), u64_at(header, 8), u64_at(header, 16));
            let commit_id = u64_at(header, RING_COMMIT_ID);
            let in_len = (u32_at(header, RING_PAYLOAD_SZ) as usize).min(PAYLOAD);
            let op_in = &header[RING_OP_IN..RING_OP_IN + op_in_size(opcode)];
            let ans = answer(opcode, node, op_in, &payloads[entry][..in_len]);
            let out = reply(unique, ans).unwrap_or_else(|| {
                reply(unique, Answer::Error(libc::ENOSYS)).expect("an error is a reply")
            });
            // The out header goes into in_out, the body into the payload.
            header[..OUT_HEADER].copy_from_slice(&out[..OUT_HEADER]);
            let body = &out[OUT_HEADER..];
            payloads[entry][..body.len()].copy_from_slice(body);
            header[RING_PAYLOAD_SZ..RING_PAYLOAD_SZ + 4]
                .copy_from_slice(&(body.len() as u32).to_le_bytes());
            let sqe = opcode::UringCmd80::new(types::Fd(fd), FUSE_IO_URING_CMD_COMMIT_AND_FETCH)
                .cmd(ring_cmd(commit_id, queue))
                .build()
                .user_data(entry as u64);
            // SAFETY: as at registration.
            unsafe { ring.submission().push(&sqe) }.expect("one SQE per completed entry");
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Device,
    Uring,
}

/// A mounted probe file system and the threads serving it.
struct Mount {
    target: CString,
    fd: RawFd,
    threads: Vec<JoinHandle<()>>,
}

impl Mount {
    /// Mounts at `dir` and answers INIT; None if the kernel does not offer
    /// io_uring and it was asked for.
    fn new(dir: &Path, transport: Transport) -> io::Result<Option<Mount>> {
        // SAFETY: a NUL-terminated path.
        let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let opts = CString::new(format!("fd={fd},rootmode=40000,user_id=0,group_id=0"))?;
        let target = CString::new(dir.as_os_str().as_encoded_bytes())?;
        // SAFETY: NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                c"lsvfs-probe".as_ptr(),
                target.as_ptr(),
                c"fuse.lsvfs-probe".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut mount = Mount {
            target,
            fd,
            threads: Vec::new(),
        };
        let mut buf = vec![0u8; PAYLOAD + IN_HEADER];
        // SAFETY: `buf` is a live buffer of the length passed.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < IN_HEADER as isize + 20 || u32_at(&buf, 4) != FUSE_INIT {
            return Err(io::Error::other("the kernel's first request is not INIT"));
        }
        let init = &buf[IN_HEADER..];
        let (minor, readahead, flags, flags2) = (
            u32_at(init, 4),
            u32_at(init, 8),
            u32_at(init, 12),
            u32_at(init, 16),
        );
        let ring = transport == Transport::Uring;
        if ring && flags2 & FUSE_OVER_IO_URING_FLAGS2 == 0 {
            return Ok(None); // `mount` unmounts on drop
        }
        // struct fuse_init_out, 64 bytes.
        let mut out = Vec::new();
        put(
            &mut out,
            &[],
            &[
                7,
                minor,
                readahead,
                flags & (FUSE_INIT_EXT | FUSE_MAX_PAGES | FUSE_ASYNC_READ),
            ],
        );
        out.extend_from_slice(&16u16.to_le_bytes()); // max_background
        out.extend_from_slice(&12u16.to_le_bytes()); // congestion_threshold
        put(&mut out, &[], &[MAX_WRITE, 1]); // max_write, time_gran
        out.extend_from_slice(&32u16.to_le_bytes()); // max_pages
        out.extend_from_slice(&0u16.to_le_bytes()); // map_alignment
        put(
            &mut out,
            &[],
            &[if ring { FUSE_OVER_IO_URING_FLAGS2 } else { 0 }],
        );
        out.resize(64, 0);
        let unique = u64_at(&buf, 8);
        write_all(fd, &reply(unique, Answer::Reply(out)).expect("a reply"))?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        for _ in 0..(if ring { 1 } else { cpus }) {
            mount
                .threads
                .push(std::thread::spawn(move || serve_device(fd)));
        }
        if ring {
            for queue in 0..cpus {
                mount.threads.push(std::thread::spawn(move || {
                    if let Err(e) = serve_queue(fd, queue as u16) {
                        let unmounted =
                            matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED));
                        if !unmounted {
                            eprintln!("io_uring queue {queue}: {e}");
                        }
                    }
                }));
            }
        }
        Ok(Some(mount))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Unmounting ends the connection, which wakes every serving thread
        // (ENODEV on /dev/fuse, ENOTCONN on the rings).
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(self.target.as_ptr(), libc::MNT_DETACH) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // SAFETY: no thread uses `fd` any more.
        unsafe { libc::close(self.fd) };
    }
}

fn getxattr(path: &CStr) -> io::Result<()> {
    let mut value = [0u8; 8];
    // SAFETY: NUL-terminated strings and a live buffer of the length passed.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.x".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Microseconds per getxattr from one thread, and calls per second from two.
fn measure(label: &str, file: &Path, calls: usize) -> io::Result<()> {
    let path = CString::new(file.as_os_str().as_encoded_bytes())?;
    for _ in 0..1000 {
        getxattr(&path)?;
    }
    let start = Instant::now();
    for _ in 0..calls {
        getxattr(&path)?;
    }
    let one = start.elapsed().as_secs_f64() * 1e6 / calls as f64;
    let start = Instant::now();
    std::thread::scope(|s| {
        let clients: Vec<_> = (0..2)
            .map(|_| s.spawn(|| (0..calls).try_for_each(|_| getxattr(&path))))
            .collect();
        clients
            .into_iter()
            .try_for_each(|c| c.join().expect("client thread"))
    })?;
    let two = 2.0 * calls as f64 / start.elapsed().as_secs_f64();
    println!("{label:<24} {one:>6.1} us per call, 1 client   {two:>9.0} calls/s, 2 clients");
    Ok(())
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    if let Some(file) = &args.measure {
        let label = args
            .label
            .clone()
            .unwrap_or_else(|| file.display().to_string());
        if let Err(e) = measure(&label, file, args.calls) {
            eprintln!("getxattr {} user.x: {e}", file.display());
            std::process::exit(1);
        }
        return;
    }
    for (transport, name) in [
        (Transport::Device, "probe over /dev/fuse"),
        (Transport::Uring, "probe over io_uring"),
    ] {
        let dir = args.dir.join(if transport == Transport::Device {
            "dev"
        } else {
            "uring"
        });
        std::fs::create_dir_all(&dir).expect("creating the mountpoint");
        let mount = match Mount::new(&dir, transport) {
            Ok(Some(m)) => m,
            Ok(None) => {
                println!(
                    "{name:<24} not offered by the kernel (Linux 6.14+; as root: echo 1 > /sys/module/fuse/parameters/enable_uring)"
                );
                continue;
            }
            Err(e) => {
                eprintln!(
                    "mounting the probe at {}: {e} (it needs root and /dev/fuse)",
                    dir.display()
                );
                std::process::exit(1);
            }
        };
        // The ring takes requests once every CPU's queue has registered.
        std::thread::sleep(std::time::Duration::from_millis(100));
        if let Err(e) = measure(name, &dir.join("f"), args.calls) {
            eprintln!("{name}: {e}");
            std::process::exit(1);
        }
        drop(mount);
    }
}
