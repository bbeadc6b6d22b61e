//! `lsvfs mount` and `lsvfs unmount`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, SessionACL};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use super::common::{open_device, refuse_restoring, Keys, Tuning};
use super::options::MountOptions;
use crate::error::Class;
use crate::fs::{Fs, FsError, Snapshots};
use crate::fuse::{self, FuseFs, Transport};
use crate::volume::Options;
use crate::{volume, Error};

/// Longest time a write stays in the log unflushed.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// The line a foreground mount prints once the file system is mounted.
const READY: &str = "lsvfs: mounted";

fn canonical(p: &Path) -> Result<PathBuf, Error> {
    std::fs::canonicalize(p).map_err(|e| Error::io(format!("resolving {}", p.display()), e))
}

/// Readahead for the mount, in KiB: as large as one FUSE request (1 MiB).
const READ_AHEAD_KB: u32 = 1024;
/// Dirty page cache the mount may hold (its backing device's `max_bytes`).
/// Write-back sends the dirty pages as WRITEs that queue, per CPU, behind
/// those sent before them, so this bounds how long another process's
/// close or fsync waits behind a large writer: at 20% of the system's
/// dirty limit (970 MB on the 24 GiB test machine, this mount's setting
/// until 2026-12-07) a 16 KiB file's close waited up to 2.7 s beside fio
/// appending, at 32 MiB 51-78 ms, with the writer's rate unchanged.
/// Buffered random writes to a file larger than this go at the daemon's
/// rate instead of the page cache's (docs/PERFORMANCE.md).
const MAX_DIRTY_BYTES: u64 = 32 << 20;

/// Tunes the kernel's backing-device settings for the new mount (root
/// only; without them the mount works, with the kernel's defaults:
/// 128 KiB readahead, and a share of 1% of the system's dirty limit).
fn tune_bdi(mountpoint: &Path) {
    let Ok(st) = nix::sys::stat::stat(mountpoint) else {
        return;
    };
    let dev = st.st_dev;
    let bdi = format!(
        "/sys/class/bdi/{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    for (knob, value) in [
        ("read_ahead_kb", u64::from(READ_AHEAD_KB)),
        // Linux 6.2 and later; before, the kernel's 1% stays.
        ("max_bytes", MAX_DIRTY_BYTES),
    ] {
        if let Err(e) = std::fs::write(format!("{bdi}/{knob}"), value.to_string()) {
            tracing::warn!("could not set {bdi}/{knob} to {value} ({e}); continuing");
        }
    }
}

/// What ends the FUSE connection of the mount on `mountpoint` when a ring
/// thread fails while the connection is live (`fuse::uring::start`):
/// every request waiting on it, and every later one, then fails with
/// ECONNABORTED or ENOTCONN instead of waiting forever; the session ends,
/// and the daemon flushes and closes the volume as at an unmount. The
/// connection's number is read now, from the mount table: a `stat` of
/// the mount would be a request, and it hung waiting for the rings. Only
/// the first call acts.
fn connection_ender(mountpoint: &Path, own_mount: bool) -> Arc<dyn Fn() + Send + Sync> {
    let conn = mounted_connection(mountpoint);
    let mountpoint = mountpoint.to_path_buf();
    let once = AtomicBool::new(false);
    Arc::new(move || {
        if !once.swap(true, Ordering::SeqCst) {
            end_connection(&mountpoint, conn, own_mount)
        }
    })
}

/// The FUSE connection number of the mount now on `mountpoint`, if it is
/// a FUSE one: its minor device number (FUSE's major is 0).
fn mounted_connection(mountpoint: &Path) -> Option<u64> {
    let t = super::mounts::table();
    t[super::mounts::on(&t, mountpoint)?].connection()
}

fn end_connection(mountpoint: &Path, conn: Option<u64>, own_mount: bool) {
    use nix::mount::{umount2, MntFlags};
    // The connection is live (the ring thread checked), so its number is
    // not another's: its own switch, where fusectl is mounted (its files
    // belong to the mount's owner).
    let by_switch = conn.is_some_and(|c| {
        std::fs::write(format!("/sys/fs/fuse/connections/{c}/abort"), "1").is_ok()
    });
    // Else, as root, a forced unmount, which aborts a FUSE connection
    // before it finds the mount busy: only while the mount on the path is
    // still this connection (after a lazy unmount, or under another
    // mount, the path leads elsewhere).
    let ours = || conn.is_some() && mounted_connection(mountpoint) == conn;
    let ended = by_switch
        || (ours()
            && matches!(
                umount2(mountpoint, MntFlags::MNT_FORCE),
                Ok(()) | Err(nix::errno::Errno::EBUSY)
            ));
    if ended {
        // The aborted mount stays in the table until detached.
        if ours() {
            if own_mount {
                let _ = umount2(mountpoint, MntFlags::MNT_DETACH);
            } else {
                let _ = Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(mountpoint)
                    .status();
            }
        }
        return;
    }
    tracing::error!(
        "could not end the FUSE connection of {} (no /sys/fs/fuse/connections, and a \
         forced unmount needs root and the mount still on that path): exiting so that \
         the kernel ends it; the next mount replays the volume's log",
        mountpoint.display()
    );
    std::process::exit(crate::error::Class::Io(libc::EIO).exit_code());
}

/// Serves the file system until a signal or an unmount, then flushes.
pub fn foreground(
    path: &Path,
    mountpoint: &Path,
    k: &Keys,
    t: &Tuning,
    opts: &MountOptions,
    service: bool,
) -> Result<(), Error> {
    // The kernel may need this process to make progress on writeback to
    // free memory: mark it as an I/O flusher (root only; harmless if
    // refused). First thing, so every thread started later inherits it.
    // SAFETY: prctl with integer arguments has no memory effects.
    unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    let path = canonical(path)?;
    let mountpoint = canonical(mountpoint)?;
    // Signals are taken synchronously (sigtimedwait); block them before any
    // thread starts (the volume's crypto and cleaner threads, key server
    // requests) so that every thread inherits the mask: a thread that did
    // not block SIGTERM would take it while the main thread is between two
    // waits, and die of it with the whole process.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)
        .map_err(|e| Error::io("blocking signals", e.into()))?;
    let (fs, device, rekey_asked) = if service {
        match open_fs_waiting(&path, k, t, opts, &signals)? {
            Some(opened) => opened,
            None => {
                tracing::info!(
                    "stopped while waiting for the key server; {} was not mounted",
                    path.display()
                );
                return Ok(());
            }
        }
    } else {
        open_fs(&path, k, t, opts)?
    };
    let fs = Arc::new(fs);
    let volume_id = fs.volume_id();

    let synced = mountpoint.clone();
    let snaps = Arc::new(Snapshots::new(
        fs.clone(),
        Box::new(move || sync_mount(&synced)),
    ));
    let transport = opts.transport.unwrap_or(Transport::Auto);
    let fuse =
        FuseFs::new(fs.clone(), snaps.clone(), opts.show_snapshots)?.with_transport(transport);
    let rings_of = fuse.ring_starter();
    let idle = opts.idle_lock.map(|after| IdleLock {
        after,
        activity: fuse.activity(),
        mountpoint: mountpoint.clone(),
        refusal_said: std::cell::Cell::new(false),
        export: opts.on_lock_export.clone().map(|dest| LockExport {
            dest,
            snaps: snaps.clone(),
            key_file: k
                .key_file
                .as_deref()
                .and_then(|f| std::fs::canonicalize(f).ok()),
        }),
    });
    let config = mount_config(&path, opts);
    // As fuser: a mount that does not let others in serves only its owner.
    // SAFETY: geteuid has no preconditions.
    let owner = (config.acl != SessionACL::All).then(|| unsafe { libc::geteuid() });
    let dup = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .map_err(|e| Error::io("duplicating the /dev/fuse descriptor", e))
    };
    // SAFETY: geteuid has no preconditions.
    let (session, own_mount, dev) = if unsafe { libc::geteuid() } == 0 {
        // Root mounts with mount(2) itself, so that the mount's type is
        // fuse.lsvfs (fuser's own mount says only "fuse"): umount(8) then
        // finds umount.fuse.lsvfs, and findmnt -t fuse.lsvfs finds lsvfs.
        let fd = kernel_mount(&path, &mountpoint, opts)?;
        let dev = dup(fd.as_fd())?;
        let s = fuser::Session::from_fd(fuse, fd, config.acl, config)
            .and_then(|s| s.spawn())
            .map_err(|e| {
                let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
                Error::io(format!("serving the mount on {}", mountpoint.display()), e)
            })?;
        (s, true, dev)
    } else {
        // A user's mount goes through fusermount3, which sets the type.
        let s = fuser::Session::new(fuse, &mountpoint, &config)
            .map_err(|e| Error::io(format!("mounting on {}", mountpoint.display()), e))?;
        let dev = dup(s.as_fd())?;
        let s = s
            .spawn()
            .map_err(|e| Error::io(format!("serving the mount on {}", mountpoint.display()), e))?;
        (s, false, dev)
    };
    // INIT is done: start the io_uring queues if it negotiated them. The
    // rings are kept (and joined) until the session has ended, even when
    // some failed to start: the others may serve.
    let (rings, ring_error) = if rings_of.negotiated() {
        let (r, e) = rings_of.start(dev, owner, connection_ender(&mountpoint, own_mount));
        (Some(r), e.err())
    } else {
        (None, None)
    };
    let on_ring = rings.is_some() && ring_error.is_none();
    match ring_error {
        Some(e) if transport == Transport::Uring => {
            let _ = if own_mount {
                let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
                session.join()
            } else {
                session.umount_and_join()
            };
            drop(rings);
            return Err(Error::io(
                format!(
                    "starting the FUSE io_uring queues of {} (unmounted; \
                     --transport auto or dev serves it over /dev/fuse)",
                    mountpoint.display()
                ),
                e,
            ));
        }
        Some(e) => tracing::warn!(
            "FUSE io_uring queues could not all start ({e}); {} is served over /dev/fuse \
             (`lsvfs info` counts any requests the started queues still take)",
            mountpoint.display()
        ),
        None if rings.is_some() => {
            tracing::info!("{} is served over FUSE io_uring", mountpoint.display())
        }
        None => {}
    }
    // It holds the file system, which must be let go at unmount.
    drop(rings_of);
    tune_bdi(&mountpoint);
    // A rekey that was running when the volume was last closed goes on
    // (a read-only mount leaves it for the next read-write one).
    if !opts.read_only
        && snaps
            .rekey_status()
            .is_ok_and(|(st, _, _)| st.in_progress())
    {
        snaps.rekey_in_background();
    }
    let served = super::control::Served {
        transport: if on_ring { "io_uring" } else { "/dev/fuse" },
        ring_requests: rings.as_ref().map(|r| r.served()),
    };
    let control = match super::control::serve(&mountpoint, &path, snaps.clone(), served) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!("no snapshot control socket ({e}); `mkdir .snapshots/NAME` still works");
            None
        }
    };
    // Root's own mounts: so that `umount MOUNTPOINT` waits for the close.
    let utab = UtabEntry(
        (own_mount && super::mounts::register_for_umount(&path, &mountpoint))
            .then(|| (mountpoint.clone(), mounted_connection(&mountpoint))),
    );
    println!("{READY} {} on {}", path.display(), mountpoint.display());
    let _ = std::io::stdout().flush();
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!(
                "mounted {} on {}",
                path.display(),
                mountpoint.display()
            )),
        ],
    );
    if is_daemon_child() {
        // The starting `lsvfs mount` reads our stderr only until READY and
        // then exits: later messages would hit a closed pipe.
        detach_stderr();
    }

    let auto = AutoRekey {
        snaps: snaps.clone(),
        path: path.clone(),
        keys: k.clone(),
        starting: Arc::new(AtomicBool::new(false)),
        report_to: Arc::new(std::sync::Mutex::new(rekey_asked)),
        volume_id,
    };
    let by_signal = serve(
        &session,
        &fs,
        &signals,
        idle.as_ref(),
        &|seq| k.record_seen(&volume_id, seq, false, false),
        &|| {
            if !opts.read_only {
                auto.tick()
            }
        },
    );
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("flushing and closing the volume"),
        ],
    );
    let ended = match (by_signal, own_mount) {
        (true, true) => {
            // As fuser does for its own mounts: detach, then wait for the
            // kernel to end the session.
            let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
            session.join()
        }
        (true, false) => session.umount_and_join(),
        (false, _) => session.join(),
    };
    if let Err(e) = ended {
        tracing::error!("the FUSE session ended with an error: {e}");
    }
    // The path is no longer this mount's: its entry goes (unless another
    // mount is on the path already, after a lazy unmount; see UtabEntry).
    drop(utab);
    // The connection is gone: the ring threads end (and let go of the
    // file system).
    drop(rings);
    if let Some(p) = control {
        let _ = std::fs::remove_file(p);
    }
    snaps.shutdown();
    // A snapshot request still running (control socket, mkdir) may hold
    // the file system for a moment: wait for it, then close cleanly.
    let checkpoint = close(fs)?;
    k.record_seen(&volume_id, checkpoint, false, true);
    // Only now is the backing file's lock let go: `lsvfs unmount` waits
    // for it, and so returns after the record too.
    drop(device);
    Ok(())
}

/// The utab entry of a mount ([`super::mounts::register_for_umount`]),
/// with the mount's FUSE connection; removed when dropped (when the
/// session ends, or on a way out of `foreground` before it). Not if
/// another mount is on the path by then (a lazy unmount returns at once,
/// and a new mount may follow): libmount would remove the newest entry
/// for the path, that mount's; ours then stays, harmless, until the next
/// mount there replaces it.
struct UtabEntry(Option<(PathBuf, Option<u64>)>);

impl Drop for UtabEntry {
    fn drop(&mut self) {
        let Some((m, ours)) = self.0.take() else {
            return;
        };
        let t = super::mounts::table();
        let clear = match super::mounts::on(&t, &m) {
            None => true,
            Some(i) => t[i].connection().is_some_and(|c| Some(c) == ours),
        };
        if clear {
            super::mounts::unregister_for_umount(&m);
        }
    }
}

/// Closes the file system once the mount has ended: waits (up to 60 s)
/// for snapshot requests still holding it, then flushes and closes.
/// Returns the newest durable checkpoint's sequence number.
fn close(fs: Arc<Fs>) -> Result<u64, Error> {
    let mut fs = fs;
    let deadline = Instant::now() + Duration::from_secs(60);
    let fs = loop {
        match Arc::try_unwrap(fs) {
            Ok(f) => break f,
            Err(shared) if Instant::now() < deadline => {
                fs = shared;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(shared) => {
                // Committed work is in the log; make it durable at least.
                let _ = shared.sync();
                return Err(Error::Busy(
                    "the file system was still in use 60 s after unmounting; it was flushed, and the next mount replays its log".into(),
                ));
            }
        }
    };
    Ok(fs.unmount_at()?)
}

/// syncfs(2) on the mount: the kernel writes back every dirty page and
/// inode of it (through this process's request threads), so a snapshot
/// taken afterwards holds every write that returned before.
fn sync_mount(mountpoint: &Path) -> Result<(), FsError> {
    use std::os::fd::AsRawFd;
    let io = |what: &str, source| FsError::Io {
        context: format!("{what} {}", mountpoint.display()),
        source,
    };
    let dir = std::fs::File::open(mountpoint).map_err(|e| io("opening", e))?;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io("syncfs on", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Opens the volume at `path` with the key `k` gives and mounts its file
/// system (not yet in the kernel). Read-only, nothing is written to the
/// backing file: a log left by a crash is replayed in memory only, and
/// the mount says so.
///
/// Rollback: a volume whose newest checkpoint is older than the one this
/// host recorded is refused before anything is written, unless
/// `allow_rollback`, which accepts it and resets the record. The record
/// moves to the checkpoint the open leaves.
/// The file system, and the backing device it holds (and so its lock).
/// The file system, its device, and the key servers that asked for a
/// rekey at the unlock (a rekey is started; they hear when it is done).
type Opened = (Fs, Arc<dyn crate::device::Device>, Vec<String>);

fn open_fs(path: &Path, k: &Keys, t: &Tuning, o: &MountOptions) -> Result<Opened, Error> {
    let read_only = o.read_only;
    let dev = open_device(path, !read_only)?;
    let device = dev.clone();
    let header = volume::read_header(&*dev)?;
    refuse_restoring(&header, path)?;
    let (master, mut rekey_asked) = k.master_and_rekey(&header, path)?;
    let vid = header.volume_id;
    let seen = k.newest_seen(&vid)?;
    let opts = Options {
        crypto_threads: t.crypto_threads,
        chunk_bytes: t.chunk_bytes,
        read_only,
        newest_seen: seen.filter(|_| !o.allow_rollback),
        ..Options::default()
    };
    let v = volume::Volume::open(dev, &master, opts)?;
    if !rekey_asked.is_empty() {
        if read_only {
            tracing::warn!(
                "{}: the key server ({}) declared the volume compromised and asks for a rekey; \
                 a read-only mount cannot: mount it read-write",
                path.display(),
                rekey_asked.join(", ")
            );
            rekey_asked.clear();
        } else if !v.rekey_status()?.in_progress() {
            let (entry, secret) = volume::new_key_generation(&header, &master)?;
            v.rekey_start(entry, &secret)?;
            tracing::warn!(
                "{}: the key server ({}) declared the volume compromised: the volume key was \
                 rewrapped under its new KEK, and a rekey to key generation {} started; the \
                 server hears when it is done",
                path.display(),
                rekey_asked.join(", "),
                entry.key_gen
            );
        }
    }
    drop(master);
    let checkpoint = v.stats()?.checkpoint_seq;
    if let Some(seen) = seen.filter(|s| *s > checkpoint) {
        tracing::warn!(
            "{}: accepted a rollback (--allow-rollback): its newest checkpoint was older than \
             checkpoint {seen}, which this host had seen; the record now says {checkpoint}",
            path.display()
        );
    }
    k.record_seen(&vid, checkpoint, o.allow_rollback, true);
    let r = v.recovery();
    if read_only && (r.transactions > 0 || r.dropped_records > 0) {
        tracing::warn!(
            "{} was not unmounted cleanly: {} transactions in its log were replayed in memory \
             for this read-only mount{}, and the file was left unchanged; a read-write mount stores \
             the replay",
            path.display(),
            r.transactions,
            if r.dropped_records > 0 {
                format!(" ({} records of an unfinished one ignored)", r.dropped_records)
            } else {
                String::new()
            }
        );
    }
    Ok((Fs::mount(v)?, device, rekey_asked))
}

/// Longest wait between two tries to reach the key server.
const KEYSERVER_RETRY_MAX: Duration = Duration::from_secs(60);

/// [`open_fs`] for a service starting at boot: while the key server cannot
/// be reached (exit code 9), waits and tries again (1 s, doubling up to a
/// minute), saying why in the service's status and on stderr. Any other
/// error ends it. One of `signals` (blocked by the caller) ends the wait:
/// None.
fn open_fs_waiting(
    path: &Path,
    k: &Keys,
    t: &Tuning,
    o: &MountOptions,
    signals: &SigSet,
) -> Result<Option<Opened>, Error> {
    let mut delay = Duration::from_secs(1);
    loop {
        match open_fs(path, k, t, o) {
            Err(e) if e.exit_code() == 9 => {
                let status = format!(
                    "waiting for the key server to unlock {}: {e}; next try in {} s",
                    path.display(),
                    delay.as_secs()
                );
                tracing::warn!("{status}");
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]);
                let ts = libc::timespec {
                    tv_sec: delay.as_secs() as libc::time_t,
                    tv_nsec: 0,
                };
                // SAFETY: the set and timespec are valid for the call; a
                // null info pointer is allowed.
                if unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), &ts) } > 0 {
                    return Ok(None);
                }
                delay = (delay * 2).min(KEYSERVER_RETRY_MAX);
            }
            r => return r.map(Some),
        }
    }
}

/// Mounts /dev/fuse on `mountpoint` as type fuse.lsvfs (root only) and
/// returns the FUSE device to serve it on.
fn kernel_mount(
    path: &Path,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<std::os::fd::OwnedFd, Error> {
    use nix::mount::MsFlags;
    use std::os::fd::AsRawFd;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| Error::io("opening /dev/fuse (is the fuse module loaded?)", e))?;
    let st = nix::sys::stat::stat(mountpoint)
        .map_err(|e| Error::io(format!("reading {}", mountpoint.display()), e.into()))?;
    let mut flags = MsFlags::empty();
    for (on, flag) in [
        (opts.read_only, MsFlags::MS_RDONLY),
        (opts.no_exec, MsFlags::MS_NOEXEC),
        (opts.no_suid, MsFlags::MS_NOSUID),
        (opts.no_dev, MsFlags::MS_NODEV),
        (opts.no_atime, MsFlags::MS_NOATIME),
        (opts.sync, MsFlags::MS_SYNCHRONOUS),
        (opts.dir_sync, MsFlags::MS_DIRSYNC),
    ] {
        if on {
            flags |= flag;
        }
    }
    // Root's mounts let every user in (access is still checked by mode).
    let data = format!(
        "fd={},rootmode={:o},user_id=0,group_id=0,default_permissions,allow_other",
        dev.as_raw_fd(),
        st.st_mode & libc::S_IFMT,
    );
    nix::mount::mount(
        Some(format!("lsvfs:{}", path.display()).as_str()),
        mountpoint,
        Some("fuse.lsvfs"),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| Error::io(format!("mounting on {}", mountpoint.display()), e.into()))?;
    Ok(dev.into())
}

/// The mount's options and threads.
fn mount_config(path: &Path, opts: &MountOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("lsvfs:{}", path.display())),
        MountOption::Subtype("lsvfs".into()),
        MountOption::DefaultPermissions,
    ];
    config.mount_options.extend(opts.kernel());
    // SAFETY: geteuid has no preconditions.
    if opts.allow_other || unsafe { libc::geteuid() } == 0 {
        config.acl = SessionACL::All;
    }
    // One request thread per CPU (at least 2, at most 8): more only adds
    // context switches (measured: 10,000 creates 6.4 s with 4 threads on 2
    // CPUs, 6.1 s with 2).
    config.n_threads = Some(
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 8),
    );
    config.clone_fd = true;
    config
}

/// Flushes every FLUSH_INTERVAL until the session ends (returns false) or
/// a signal arrives (returns true).
///
/// Every RECORD_INTERVAL, a checkpoint newer than the last one recorded
/// goes to `record` (the host's rollback record), so that a copy of the
/// file taken while mounted is refused too once a newer checkpoint exists.
///
/// With an idle lock, once no request came for its duration it unmounts
/// (as `lsvfs unmount` would: refused while a file or directory on the
/// mount is in use, then tried again every minute); the session then ends
/// and the volume is closed and its keys dropped, as at any unmount.
fn serve(
    session: &fuser::BackgroundSession,
    fs: &Fs,
    signals: &SigSet,
    idle: Option<&IdleLock>,
    record: &dyn Fn(u64),
    tick: &dyn Fn(),
) -> bool {
    let mut next_idle_try = Instant::now();
    // Without fsync, committed writes still reach the disk within
    // FLUSH_INTERVAL (as ext4's 5-second commit).
    let mut last_flush = Instant::now();
    let every = record_interval();
    let mut last_record = (
        Instant::now(),
        fs.volume_stats().map_or(0, |s| s.checkpoint_seq),
    );
    loop {
        if session.guard.is_finished() {
            break false;
        }
        if last_flush.elapsed() >= FLUSH_INTERVAL {
            if let Err(e) = fs.sync() {
                tracing::error!("periodic flush failed: {e}");
            }
            last_flush = Instant::now();
        }
        if let Some(l) = idle {
            if l.activity.idle() < l.after {
                l.refusal_said.set(false);
            } else if Instant::now() >= next_idle_try {
                l.lock();
                next_idle_try = Instant::now() + l.after.min(IDLE_RETRY);
            }
        }
        if last_record.0.elapsed() >= every {
            let seq = fs.volume_stats().map_or(0, |s| s.checkpoint_seq);
            if seq > last_record.1 {
                record(seq);
            }
            tick();
            last_record = (Instant::now(), seq.max(last_record.1));
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        // SAFETY: the set and timespec are valid for the call; a null info
        // pointer is allowed.
        let sig = unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), &ts) };
        if sig > 0 {
            break true;
        }
    }
}

/// `--idle-lock`: unmount after `after` without a request.
struct IdleLock {
    after: Duration,
    activity: Arc<fuse::Activity>,
    mountpoint: PathBuf,
    /// A refused unmount was logged since the mount was last used (the
    /// retries after it are logged at debug level only).
    refusal_said: std::cell::Cell<bool>,
    /// `--on-lock-export`: where to export a snapshot before unmounting.
    export: Option<LockExport>,
}

/// `--on-lock-export DEST`: before the idle lock unmounts, a snapshot
/// `idle-<UTC time>` is taken and exported to DEST (as `lsvfs snapshot
/// export` would, through this mount's control socket), incrementally over
/// the previous `idle-` snapshot, which then goes: one stays as the next
/// base. Nothing changed since that one (a lock tried again while the mount
/// is busy): nothing to export. A failed
/// export is logged and the lock goes ahead (the data is safe on the
/// volume; the lock is what was asked for).
struct LockExport {
    dest: String,
    snaps: Arc<Snapshots>,
    /// The mount's key file: the exports get a slot for it too.
    key_file: Option<PathBuf>,
}

impl LockExport {
    fn run(&self, mountpoint: &Path) {
        let m = mountpoint.display();
        match self.export(mountpoint) {
            Ok(Some(name)) => {
                tracing::info!("{m}: exported snapshot {name} to {} (idle lock)", self.dest)
            }
            Ok(None) => tracing::debug!("{m}: nothing changed since the last idle export"),
            Err(e) => tracing::warn!(
                "{m}: the export before the idle lock failed: {e}; locking anyway (the data is \
                 on the volume; `lsvfs snapshot export` exports it later)"
            ),
        }
    }

    fn export(&self, mountpoint: &Path) -> Result<Option<String>, Error> {
        let names = self.snaps.names()?;
        let base = names
            .iter()
            .rev()
            .find(|(_, n)| n.starts_with("idle-"))
            .map(|(_, n)| n.clone());
        let newest_is_base = names.last().map(|(_, n)| n) == base.as_ref();
        if newest_is_base
            && self
                .snaps
                .with_volume(|v, _| v.changed_since_newest_snapshot())??
                .is_empty()
        {
            return Ok(None);
        }
        let name = format!(
            "idle-{}",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        );
        self.snaps.create(&name)?;
        let to = if self.dest.starts_with("s3://") {
            self.dest.clone()
        } else {
            Path::new(&self.dest)
                .join(format!("{name}.lsx"))
                .display()
                .to_string()
        };
        let exe = std::env::current_exe().map_err(|e| Error::io("finding this program", e))?;
        let mut c = Command::new(exe);
        c.arg("snapshot")
            .arg("export")
            .arg(mountpoint)
            .arg(&name)
            .args(["-o", &to, "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(b) = &base {
            c.args(["--since", b]);
        }
        if let Some(k) = &self.key_file {
            c.arg("--key-file").arg(k);
        }
        let out = c
            .output()
            .map_err(|e| Error::io("running lsvfs snapshot export", e))?;
        if !out.status.success() {
            return Err(Error::Usage(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        // The new snapshot is the next base; older idle snapshots go.
        for (_, n) in names.iter().filter(|(_, n)| n.starts_with("idle-")) {
            if let Err(e) = self.snaps.delete(n) {
                tracing::warn!("{}: deleting snapshot {n}: {e}", mountpoint.display());
            }
        }
        Ok(Some(name))
    }
}

/// How often an idle mount that was busy is tried again.
const IDLE_RETRY: Duration = Duration::from_secs(60);

impl IdleLock {
    /// Unmounts, or says why not (it is tried again later).
    fn lock(&self) {
        let idle = humantime::format_duration(Duration::from_secs(self.activity.idle().as_secs()));
        if let Some(x) = &self.export {
            x.run(&self.mountpoint);
        }
        match detach(&self.mountpoint, Duration::ZERO) {
            Ok(()) => tracing::info!(
                "{}: no request for {idle}: unmounted (idle lock); the volume is closed and \
                 its keys are dropped",
                self.mountpoint.display()
            ),
            Err(e) => {
                let retry = humantime::format_duration(self.after.min(IDLE_RETRY));
                let m = self.mountpoint.display();
                if self.refusal_said.replace(true) {
                    tracing::debug!("{m}: still in use (idle lock): {e}; trying again in {retry}");
                } else {
                    tracing::info!(
                        "{m}: no request for {idle}, but not unmounted (idle lock): {e}; \
                         trying again every {retry}"
                    );
                }
            }
        }
    }
}

/// How often a mounted volume's newest checkpoint is recorded against
/// rollback (when it changed).
const RECORD_INTERVAL: Duration = Duration::from_secs(60);

/// RECORD_INTERVAL, or `LSVFS_RECORD_SECS` (for tests).
fn record_interval() -> Duration {
    std::env::var("LSVFS_RECORD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(RECORD_INTERVAL, Duration::from_secs)
}

/// The rekey policy, followed by the mount: when the volume's key
/// generation is due (`lsvfs tune`), the mount unlocks the volume as it did
/// at mount (key server or key file), makes a new generation, drops the
/// master key and starts the rekey, on a thread of its own so that the key
/// server's answer never holds up the mount's other work.
struct AutoRekey {
    snaps: Arc<Snapshots>,
    path: PathBuf,
    keys: Keys,
    /// A thread is starting a rekey.
    starting: Arc<AtomicBool>,
    /// Key servers that asked for a rekey at the unlock: told once it is
    /// done (then emptied).
    report_to: Arc<std::sync::Mutex<Vec<String>>>,
    volume_id: [u8; 16],
}

impl AutoRekey {
    fn tick(&self) {
        if self.starting.load(Ordering::SeqCst) {
            return;
        }
        let Ok((st, _, _)) = self.snaps.rekey_status() else {
            return;
        };
        if !st.in_progress() {
            self.report_rekeyed();
            if self.starting.load(Ordering::SeqCst) {
                return;
            }
        }
        let Some(why) = st.due() else {
            return;
        };
        self.starting.store(true, Ordering::SeqCst);
        let (snaps, path, keys, starting) = (
            self.snaps.clone(),
            self.path.clone(),
            self.keys.clone(),
            self.starting.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("lsvfs-auto-rekey".into())
            .spawn(move || {
                tracing::info!("{}: a rekey is due ({why}); starting it", path.display());
                let started = (|| -> Result<u16, Error> {
                    let h = super::common::header_unlocked(&path)?;
                    let master = keys.master(&h, &path)?;
                    let (entry, secret) = volume::new_key_generation(&h, &master)?;
                    drop(master);
                    snaps.rekey_start(entry, &secret)?;
                    Ok(entry.key_gen)
                })();
                match started {
                    Ok(g) => tracing::info!(
                        "{}: rekey to key generation {g} started (the policy)",
                        path.display()
                    ),
                    Err(e) => tracing::warn!(
                        "{}: a rekey is due ({why}) but did not start: {e}; trying again at the \
                         next check",
                        path.display()
                    ),
                }
                starting.store(false, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.starting.store(false, Ordering::SeqCst);
        }
    }
}

impl AutoRekey {
    /// Tells the key servers that asked for a rekey that it is done (each
    /// clears its compromise mark and audits it), on a thread of its own;
    /// tried again at the next check if one cannot be reached.
    fn report_rekeyed(&self) {
        let to = match self.report_to.lock() {
            Ok(mut to) if !to.is_empty() => std::mem::take(&mut *to),
            _ => return,
        };
        self.starting.store(true, Ordering::SeqCst);
        let (keys, path, back, starting, vid) = (
            self.keys.clone(),
            self.path.clone(),
            self.report_to.clone(),
            self.starting.clone(),
            self.volume_id,
        );
        let spawned = std::thread::Builder::new()
            .name("lsvfs-rekey-report".into())
            .spawn(move || {
                match crate::keys::report_rekeyed(&keys.store, &keys.server, &vid, &to) {
                    Ok(_) => tracing::info!(
                        "{}: told {} that the rekey asked for is done",
                        path.display(),
                        to.join(", ")
                    ),
                    Err(e) => {
                        tracing::warn!(
                            "{}: could not tell the key server the rekey is done: {e}; trying \
                             again at the next check",
                            path.display()
                        );
                        if let Ok(mut b) = back.lock() {
                            b.extend(to);
                        }
                    }
                }
                starting.store(false, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.starting.store(false, Ordering::SeqCst);
        }
    }
}

/// prctl option (Linux 5.6, include/uapi/linux/prctl.h); not in `libc` yet.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Set in the environment of the daemon `lsvfs mount` starts.
const DAEMON_CHILD: &str = "LSVFS_MOUNT_DAEMON";

/// Whether this process is a mount daemon `lsvfs mount` started.
pub fn is_daemon_child() -> bool {
    std::env::var_os(DAEMON_CHILD).is_some()
}

/// Points stderr at /dev/null.
fn detach_stderr() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: both descriptors are valid; dup2 replaces fd 2 atomically.
        unsafe { libc::dup2(null.as_raw_fd(), 2) };
    }
}

/// Starts a foreground mount in the background and returns once it is
/// mounted, or with its error.
pub fn daemon(path: &Path, mountpoint: &Path, k: &Keys, opts: &MountOptions) -> Result<(), Error> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| Error::io("finding the lsvfs binary", e))?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount").arg(path).arg(mountpoint);
    cmd.arg("-o").arg(opts.to_list());
    if let Some(f) = &k.key_file {
        cmd.arg("--key-file").arg(f);
    }
    let mut child = cmd
        .arg("--store")
        .arg(&k.store)
        .arg("--timeout")
        .arg(k.server.timeout.as_secs().to_string())
        .arg("--attempts")
        .arg(k.server.attempts.to_string())
        .arg("--foreground")
        .env(DAEMON_CHILD, "1")
        // The daemon logs at this command's level (-v).
        .env(
            "LSVFS_LOG",
            tracing::level_filters::LevelFilter::current().to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io("starting the mount daemon", e))?;
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let _ = out.read_line(&mut line);
    // What the daemon said before it was mounted (or why it failed). Once
    // mounted it lets go of this pipe, so this read ends.
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if line.starts_with(READY) {
        eprint!("{err}");
        print!("{line}");
        return Ok(());
    }
    let status = child
        .wait()
        .map_err(|e| Error::io("waiting for the mount daemon", e))?;
    let msg = err.trim().trim_start_matches("lsvfs: ").to_string();
    Err(Error::Reported {
        class: Class::Exit(status.code().unwrap_or(1)),
        message: msg,
    })
}

/// Unmounts `mountpoint` (the daemon then flushes and closes the volume):
/// umount2(2) as root, fusermount3 (from fuse3) otherwise. As root, a busy
/// mount is tried again for up to `patience`.
fn detach(mountpoint: &Path, patience: Duration) -> Result<(), Error> {
    let busy = || {
        Error::Busy(format!(
            "{} is busy; close the files open on it",
            mountpoint.display()
        ))
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // A file closed a moment ago can still pin the mount briefly (its
        // last reference dropped by another process, or a child between
        // fork and exec holding a copy): busy only if it stays busy.
        let deadline = Instant::now() + patience;
        loop {
            return match nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
                Ok(()) => Ok(()),
                Err(nix::errno::Errno::EBUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(nix::errno::Errno::EBUSY) => Err(busy()),
                Err(e) => Err(Error::io(
                    format!("unmounting {}", mountpoint.display()),
                    e.into(),
                )),
            };
        }
    }
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .status()
        .map_err(|e| {
            Error::io(
                "running fusermount3 to unmount as a user (install the fuse3 package, or unmount as root)",
                e,
            )
        })?;
    if !st.success() {
        return Err(busy());
    }
    Ok(())
}

/// Detaches `mountpoint` now (umount -l); the daemon flushes and closes the
/// volume once the last process using the mount lets go.
pub fn detach_lazily(mountpoint: &Path) -> Result<(), Error> {
    nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
        Error::io(
            format!("detaching {} lazily", mountpoint.display()),
            e.into(),
        )
    })
}

/// Unmounts and waits until the daemon has flushed and released the volume.
pub fn unmount(mountpoint: &Path) -> Result<(), Error> {
    let mountpoint = canonical(mountpoint)?;
    let vol = super::mounts::volume_on(&mountpoint).ok_or_else(|| {
        Error::Usage(format!(
            "no lsvfs volume is mounted on {}",
            mountpoint.display()
        ))
    })?;
    detach(&mountpoint, Duration::from_secs(2))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(false) = crate::device::FileDevice::is_held(&vol) {
            println!(
                "unmounted {} and closed {}",
                mountpoint.display(),
                vol.display()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(Error::Busy(format!(
        "{} did not close within 60 s",
        vol.display()
    )))
}
