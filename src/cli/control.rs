//! The mount's control socket: `lsvfs snapshot create|list|delete|export`
//! talk to the running mount over a Unix socket that only root (or the
//! user who mounted) may use. An export request carries the descriptor to
//! write the export to (SCM_RIGHTS), so the stream never passes through
//! the socket. Wire format: docs/FORMAT.md, "Control socket".

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::mounts::{run_dir, socket_path};
use crate::fs::{Posix, Snapshots};
use crate::Error;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Create {
        name: String,
    },
    Delete {
        name: String,
    },
    List {},
    /// Export snapshot `name` (an increment over `since`) to the
    /// descriptor sent with the request, for the recipients (public keys,
    /// their text form) and key files (absolute paths) given.
    Export {
        name: String,
        #[serde(default)]
        since: Option<String>,
        #[serde(default)]
        recipients: Vec<String>,
        #[serde(default)]
        key_files: Vec<PathBuf>,
    },
    /// Start key generation `key_gen` (its header entry: `started`, the
    /// wrapped secret in hex) from its secret (hex), and the rekey pass.
    Rekey {
        key_gen: u16,
        started: u64,
        wrapped: String,
        secret: SecretHex,
    },
    /// How the mount is served (its FUSE transport).
    Status {},
    /// The volume's usage: what `lsvfs info --key-file` shows of an
    /// unmounted volume.
    Usage {},
    /// Where the rekey stands (and the volume's path); with `resume`, a
    /// pass that is due but not running starts again.
    RekeyStatus {
        #[serde(default)]
        resume: bool,
        /// Count the data blocks each key generation seals too (reads
        /// every map page, a few at a time).
        #[serde(default)]
        blocks: bool,
    },
}

/// A key in hex on its way over the control socket: zeroized when
/// dropped, never shown by `Debug`.
#[derive(Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretHex(pub String);

impl Drop for SecretHex {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl std::fmt::Debug for SecretHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHex(…)")
    }
}

/// Where a mounted volume's rekey stands.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct RekeyEntry {
    pub volume: String,
    pub current: u16,
    pub generations: Vec<u16>,
    pub retired_below: u16,
    pub segments_left: u64,
    pub segments_total: u64,
    pub unsealed: u64,
    /// A thread runs the pass now.
    pub running: bool,
    /// Why the pass last stopped early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The rekey policy (None: never by age; no byte limit), the current
    /// generation's age and the bytes it has sealed.
    #[serde(default)]
    pub after_secs: Option<u64>,
    #[serde(default)]
    pub after_bytes: Option<u64>,
    #[serde(default)]
    pub age_secs: u64,
    #[serde(default)]
    pub sealed_bytes: u64,
    /// Data blocks per key generation, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<std::collections::BTreeMap<u16, u64>>,
}

impl RekeyEntry {
    /// The status of the volume at `volume`.
    pub fn of(st: crate::volume::RekeyStatus, volume: &Path) -> RekeyEntry {
        RekeyEntry {
            volume: volume.display().to_string(),
            current: st.current,
            generations: st.generations,
            retired_below: st.retired_below,
            segments_left: st.segments_left,
            segments_total: st.segments_total,
            unsealed: st.unsealed,
            after_secs: st.after_secs,
            after_bytes: st.after_bytes,
            age_secs: st.age_secs,
            sealed_bytes: st.sealed_bytes,
            ..RekeyEntry::default()
        }
    }
}

/// What an export wrote, as the mount reports it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ExportEntry {
    pub snapshot: String,
    #[serde(default)]
    pub base: Option<String>,
    pub bytes: u64,
    pub chunks: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub trim_blocks: u64,
    /// BLAKE3 of the stream (hex): the trailer's hash.
    pub hash: String,
}

impl ExportEntry {
    pub fn of(s: &crate::export::Summary) -> ExportEntry {
        ExportEntry {
            snapshot: s.header.snapshot.name.clone(),
            base: s.header.base.as_ref().map(|b| b.name.clone()),
            bytes: s.bytes,
            chunks: s.trailer.chunks,
            data_blocks: s.trailer.data_blocks,
            zero_blocks: s.trailer.zero_blocks,
            trim_blocks: s.trailer.trim_blocks,
            hash: crate::keys::hex(&s.trailer.hash),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub id: u64,
    pub name: String,
    pub created_sec: i64,
    pub created_nsec: u32,
    pub allocated_blocks: u64,
    pub unique_blocks: u64,
}

/// How a mount is served, as it reports it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct StatusEntry {
    /// "io_uring" or "/dev/fuse".
    pub transport: String,
    /// Requests answered through the io_uring queues so far.
    #[serde(default)]
    pub ring_requests: u64,
}

/// A volume's usage, as `lsvfs info` shows it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct UsageEntry {
    pub allocated_blocks: u64,
    pub extent_segments: u64,
    pub max_segments: u64,
    pub free_segments: u64,
    pub checkpoint_seq: u64,
    pub snapshots: u64,
    /// Blocks only snapshots hold.
    pub held_blocks: u64,
}

impl UsageEntry {
    pub fn of(s: &crate::volume::Stats) -> UsageEntry {
        UsageEntry {
            allocated_blocks: s.allocated_blocks,
            extent_segments: s.extent_segments,
            max_segments: s.max_segments,
            free_segments: s.free_segments,
            checkpoint_seq: s.checkpoint_seq,
            snapshots: s.snapshots,
            held_blocks: s.held_blocks,
        }
    }
}

/// What the mount tells `status` requests.
pub struct Served {
    pub transport: &'static str,
    pub ring_requests: Option<Arc<std::sync::atomic::AtomicU64>>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotEntry>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rekey: Option<RekeyEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageEntry>,
}

/// Serves the control socket until the process ends. Returns the socket's
/// path (remove it at unmount).
pub fn serve(
    mountpoint: &Path,
    volume: &Path,
    snaps: Arc<Snapshots>,
    served: Served,
) -> Result<PathBuf, Error> {
    let served = Arc::new(served);
    let volume = volume.to_path_buf();
    let dir = run_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    secure_dir(&dir)?;
    let path = socket_path(mountpoint);
    if path.symlink_metadata().is_ok() {
        match UnixStream::connect(&path) {
            Ok(_) => {
                return Err(Error::Busy(format!(
                    "another mount serves {} ({})",
                    mountpoint.display(),
                    path.display()
                )))
            }
            // Left by a mount that was killed: nobody listens.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => {
                return Err(Error::io(
                    format!("probing the existing control socket {}", path.display()),
                    e,
                ))
            }
        }
    }
    let listener = UnixListener::bind(&path)
        .map_err(|e| Error::io(format!("creating the control socket {}", path.display()), e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("restricting {}", path.display()), e))?;
    std::thread::Builder::new()
        .name("lsvfs-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(stream) = conn else { continue };
                let snaps = snaps.clone();
                let volume = volume.clone();
                let served = served.clone();
                // One thread per client: a slow snapshot list must not hold
                // up the others.
                let _ = std::thread::Builder::new()
                    .name("lsvfs-control-client".into())
                    .spawn(move || handle(stream, &snaps, &volume, &served));
            }
        })
        .map_err(|e| Error::io("starting the control thread", e))?;
    Ok(path)
}

/// The socket directory must be a real directory that only we can write:
/// then nobody can swap the socket for a symlink or bind its name first.
fn secure_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let m = dir
        .symlink_metadata()
        .map_err(|e| Error::io(format!("inspecting {}", dir.display()), e))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !m.is_dir() || m.uid() != me {
        return Err(Error::Usage(format!(
            "{} must be a directory owned by uid {me} (not a symlink); remove it or set LSVFS_RUN_DIR",
            dir.display()
        )));
    }
    if m.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("restricting {}", dir.display()), e))?;
    }
    Ok(())
}

fn peer_uid(s: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given, and
    // the descriptor is open for the duration of the call.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

fn failure(e: &Error) -> Response {
    Response {
        ok: false,
        error: Some(e.to_string()),
        errno: Some(e.errno()),
        ..Response::default()
    }
}

fn handle(stream: UnixStream, snaps: &Arc<Snapshots>, volume: &Path, served: &Served) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let resp = match peer_uid(&stream) {
        Some(uid) if uid == 0 || uid == me => {
            let read = read_request(&stream).map(|(mut line, fds)| {
                let req = parse_request(&line);
                // A rekey request carries a key.
                zeroize::Zeroize::zeroize(&mut line);
                (req, fds)
            });
            match read {
                Ok((Ok(Request::Status {}), _)) => status(served),
                Ok((Ok(req), fds)) => answer(req, fds, snaps, volume),
                Ok((Err(e), _)) => failure(&e),
                Err(e) => failure(&Error::io("reading the control request", e)),
            }
        }
        _ => failure(
            &Posix::NotPermitted
                .at("the snapshot control socket is for root")
                .into(),
        ),
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    let _ = send_all(&stream, &out);
}

/// Reads one request line, and the descriptors sent with it.
fn read_request(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut buf = [0u8; 1024];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(got) = c {
                // SAFETY: the kernel just installed these descriptors in
                // this process for us; nothing else owns them.
                fds.extend(got.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        let n = msg.bytes;
        line.extend_from_slice(&buf[..n]);
        if n == 0 || line.contains(&b'\n') || line.len() as u64 > MAX_REQUEST {
            return Ok((line, fds));
        }
    }
}

/// Sends one request line and reads the answer line. A mount that refuses
/// us answers without reading the request and closes, so the write may
/// fail with EPIPE: its answer (the reason) is still there to read, and is
/// what to report.
fn exchange(stream: &UnixStream, line: &[u8]) -> Result<String, Error> {
    let sent = send_all(stream, line);
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer);
    match (sent, read) {
        (_, Ok(n)) if n > 0 => Ok(answer),
        (Err(e), _) => Err(Error::io("sending the control request", e)),
        (Ok(()), Err(e)) => Err(Error::io("reading the mount's answer", e)),
        (Ok(()), Ok(_)) => Ok(answer),
    }
}

/// Writes all of `b` with MSG_NOSIGNAL: a mount that hung up is an error
/// to report (EPIPE), never a SIGPIPE that ends this process (the command
/// line restores SIGPIPE's default so that `lsvfs ... | head` ends quietly).
fn send_all(stream: &UnixStream, mut b: &[u8]) -> std::io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    while !b.is_empty() {
        match send(stream.as_raw_fd(), b, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => b = &b[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Parses one request line (at most MAX_REQUEST bytes, ended by a
/// newline): untrusted bytes from the control socket.
pub fn parse_request(line: &[u8]) -> Result<Request, Error> {
    if line.last() != Some(&b'\n') || line.len() as u64 > MAX_REQUEST {
        return Err(Error::Usage(format!(
            "control request too long or not ended by a newline (at most {MAX_REQUEST} bytes)"
        )));
    }
    serde_json::from_slice::<Request>(line).map_err(|e| {
        Error::Usage(format!(
            "bad control request ({e}); expected one JSON line such as {{\"op\":\"list\"}}"
        ))
    })
}

fn status(served: &Served) -> Response {
    Response {
        ok: true,
        status: Some(StatusEntry {
            transport: served.transport.to_string(),
            ring_requests: served
                .ring_requests
                .as_ref()
                .map_or(0, |n| n.load(std::sync::atomic::Ordering::Relaxed)),
        }),
        ..Response::default()
    }
}

fn answer(req: Request, fds: Vec<OwnedFd>, snaps: &Arc<Snapshots>, volume: &Path) -> Response {
    if let Request::Export {
        name,
        since,
        recipients,
        key_files,
    } = req
    {
        let Some(fd) = fds.into_iter().next() else {
            return failure(&Error::Usage(
                "an export request must carry the descriptor to write to".into(),
            ));
        };
        return export_to(snaps, &name, since.as_deref(), &recipients, &key_files, fd)
            .map(|e| Response {
                ok: true,
                export: Some(e),
                ..Response::default()
            })
            .unwrap_or_else(|e| failure(&e));
    }
    let r = match req {
        Request::Create { name } => snaps.create(&name).map(|id| Response {
            ok: true,
            id: Some(id.0),
            ..Response::default()
        }),
        Request::Delete { name } => snaps.delete(&name).map(|()| Response {
            ok: true,
            ..Response::default()
        }),
        Request::List {} => snaps.list().map(|l| Response {
            ok: true,
            snapshots: Some(
                l.into_iter()
                    .map(|s| SnapshotEntry {
                        id: s.id.0,
                        name: s.name,
                        created_sec: s.created_sec,
                        created_nsec: s.created_nsec,
                        allocated_blocks: s.allocated_blocks,
                        unique_blocks: s.unique_blocks,
                    })
                    .collect(),
            ),
            ..Response::default()
        }),
        Request::Rekey {
            key_gen,
            started,
            wrapped,
            secret,
        } => {
            return rekey_start(snaps, key_gen, started, &wrapped, &secret)
                .and_then(|()| rekey_status(snaps, volume))
                .unwrap_or_else(|e| failure(&e));
        }
        Request::RekeyStatus { resume, blocks } => {
            if resume {
                snaps.rekey_in_background();
            }
            let counted = if blocks {
                match snaps.with_volume(|v, _| v.blocks_by_key_gen()) {
                    Ok(Ok(n)) => Some(n),
                    Ok(Err(e)) => return failure(&e.into()),
                    Err(e) => return failure(&e.into()),
                }
            } else {
                None
            };
            return rekey_status(snaps, volume)
                .map(|mut r| {
                    if let Some(e) = r.rekey.as_mut() {
                        e.blocks = counted;
                    }
                    r
                })
                .unwrap_or_else(|e| failure(&e));
        }
        Request::Usage {} => {
            return match snaps.with_volume(|v, _| v.stats()) {
                Ok(Ok(s)) => Response {
                    ok: true,
                    usage: Some(UsageEntry::of(&s)),
                    ..Response::default()
                },
                Ok(Err(e)) => failure(&e.into()),
                Err(e) => failure(&e.into()),
            };
        }
        Request::Export { .. } => unreachable!("answered above"),
        Request::Status {} => {
            return failure(&Error::Usage("status is answered by `handle`".into()))
        }
    };
    r.unwrap_or_else(|e| failure(&e.into()))
}

/// Starts a key generation the command line made (with the master key,
/// which the mount does not hold).
fn rekey_start(
    snaps: &Arc<Snapshots>,
    key_gen: u16,
    started: u64,
    wrapped: &str,
    secret: &SecretHex,
) -> Result<(), Error> {
    let bad = |what: &str| Error::Usage(format!("a rekey request with a bad {what}"));
    let mut w = [0u8; crate::crypto::WRAPPED_LEN];
    hex::decode_to_slice(wrapped, &mut w).map_err(|_| bad("wrapped secret"))?;
    let mut k = zeroize::Zeroizing::new([0u8; crate::crypto::KEY_LEN]);
    hex::decode_to_slice(&secret.0, &mut k[..]).map_err(|_| bad("secret"))?;
    let secret = crate::crypto::MasterKey::from_bytes(k);
    let entry = crate::volume::format::KeyGenEntry {
        key_gen,
        started,
        wrapped: crate::crypto::WrappedKey(w),
    };
    snaps.rekey_start(entry, &secret)?;
    Ok(())
}

fn rekey_status(snaps: &Snapshots, volume: &Path) -> Result<Response, Error> {
    let (st, running, error) = snaps.rekey_status()?;
    Ok(Response {
        ok: true,
        rekey: Some(RekeyEntry {
            running,
            error,
            ..RekeyEntry::of(st, volume)
        }),
        ..Response::default()
    })
}

/// Writes an export of the mounted volume to `fd`. It stops (and fails)
/// if the mount ends meanwhile.
fn export_to(
    snaps: &Snapshots,
    name: &str,
    since: Option<&str>,
    recipients: &[String],
    key_files: &[PathBuf],
    fd: OwnedFd,
) -> Result<ExportEntry, Error> {
    let holders = crate::export::Holders {
        recipients: recipients
            .iter()
            .map(|r| crate::export::RecipientKey::parse(r, "a --recipient"))
            .collect::<Result<_, _>>()?,
        key_files: key_files
            .iter()
            .map(|k| crate::keys::read_key_file(k))
            .collect::<Result<_, _>>()?,
    };
    // A file or a pipe; for a pipe, the write-back hints fail and are
    // ignored.
    let file = std::fs::File::from(fd);
    let mut out =
        std::io::BufWriter::with_capacity(1 << 20, super::common::WriteBehind::new(&file));
    let s = snaps.with_volume(|v, mounted| {
        crate::export::export(
            v,
            name,
            since,
            &holders,
            crate::export::READERS_MOUNTED,
            &mut out,
            &mut |_, _| {
                if mounted() {
                    Ok(())
                } else {
                    Err(crate::export::ExportError::Usage(
                        "the volume was unmounted during the export".into(),
                    ))
                }
            },
        )
    })??;
    Ok(ExportEntry::of(&s))
}

/// Sends one request to the mount on `mountpoint` and returns its answer.
pub fn request(mountpoint: &Path, req: &Request) -> Result<Response, Error> {
    request_with(mountpoint, req, None)
}

/// [`request`], sending `fd` with it (an export's output); it then waits
/// for the answer as long as the export takes.
pub fn request_with(
    mountpoint: &Path,
    req: &Request,
    fd: Option<std::os::fd::BorrowedFd>,
) -> Result<Response, Error> {
    // A mounted volume's path stands for its mountpoint.
    let mountpoint = &super::mounts::mount_or_self(mountpoint);
    let mountpoint = std::fs::canonicalize(mountpoint)
        .map_err(|e| Error::io(format!("resolving {}", mountpoint.display()), e))?;
    let path = socket_path(&mountpoint);
    let stream = UnixStream::connect(&path).map_err(|e| {
        Error::Usage(format!(
            "no lsvfs mount answers for {} ({}: {e}); is it mounted, and are you root?",
            mountpoint.display(),
            path.display()
        ))
    })?;
    // Only a mount run by root or by us may answer.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match peer_uid(&stream) {
        Some(uid) if uid == 0 || uid == me => {}
        other => {
            let who = other.map_or_else(|| "an unknown uid".to_string(), |u| format!("uid {u}"));
            return Err(Error::Usage(format!(
                "{} is served by {who}, not by root or uid {me}; refusing to trust it \
                 (remove it if no lsvfs mount of yours is running)",
                path.display()
            )));
        }
    }
    let mut line =
        zeroize::Zeroizing::new(serde_json::to_vec(req).map_err(|e| Error::Usage(e.to_string()))?);
    line.push(b'\n');
    let answer = match fd {
        None => {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(600)));
            exchange(&stream, &line)?
        }
        Some(fd) => {
            use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
            let fds = [fd.as_raw_fd()];
            let iov = [std::io::IoSlice::new(&line)];
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(|e| Error::io("sending the control request", e.into()))?;
            let mut answer = String::new();
            BufReader::new(&stream)
                .read_line(&mut answer)
                .map_err(|e| Error::io("reading the mount's answer", e))?;
            answer
        }
    };
    serde_json::from_str(&answer).map_err(|e| {
        Error::io(
            "reading the mount's answer",
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("it is not valid ({e}): {answer:?}"),
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_refusal_sent_before_the_request_is_read_is_still_reported() {
        let (client, server) = UnixStream::pair().unwrap();
        (&server)
            .write_all(b"{\"ok\":false,\"error\":\"for root\"}\n")
            .unwrap();
        drop(server);
        // The peer is gone: the write fails (EPIPE), the answer is there.
        let answer = exchange(&client, b"{\"op\":\"list\"}\n").unwrap();
        assert!(answer.contains("for root"), "{answer}");
        // Nothing to read either: the send error is what is reported.
        let (client, server) = UnixStream::pair().unwrap();
        drop(server);
        let e = exchange(&client, b"{\"op\":\"list\"}\n").unwrap_err();
        assert!(e.to_string().contains("sending the control request"), "{e}");
    }

    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        let r = Request::Create { name: "n".into() };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(j, r#"{"op":"create","name":"n"}"#);
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"list"}"#).unwrap(),
            Request::List {}
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"status"}"#).unwrap(),
            Request::Status {}
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"usage"}"#).unwrap(),
            Request::Usage {}
        );
        for bad in [
            "",
            "{}",
            r#"{"op":"format"}"#,
            r#"{"op":"create"}"#,
            r#"{"op":"list","x":1}"#,
            r#"{"op":"rekey","key_gen":1}"#,
            r#"{"op":"rekey","key_gen":70000,"started":1,"wrapped":"","secret":""}"#,
            "\u{0}\u{1}",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad:?}");
        }
    }

    /// A rekey request round-trips, and its secret never shows in `Debug`.
    #[test]
    fn a_rekey_request_round_trips_and_hides_its_secret() {
        let secret = "ab".repeat(32);
        let r = Request::Rekey {
            key_gen: 3,
            started: 1_800_000_000,
            wrapped: "cd".repeat(72),
            secret: SecretHex(secret.clone()),
        };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r);
        assert!(!format!("{r:?}").contains(&secret), "{r:?}");
        let s = serde_json::from_str::<Request>(r#"{"op":"rekeystatus"}"#).unwrap();
        assert_eq!(
            s,
            Request::RekeyStatus {
                resume: false,
                blocks: false
            }
        );
    }
}
