//! The `lsvfs` command line.
//!
//! Exit codes are stable (scripts rely on them):
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | other error |
//! | 2 | usage error |
//! | 3 | not an lsvfs volume, or an unsupported format version |
//! | 4 | corruption or failed authentication (including `check` finding problems) |
//! | 5 | wrong key |
//! | 6 | no space |
//! | 7 | volume in use by another process |
//! | 8 | I/O error |
//! | 9 | key server unreachable, or its certificate is not the pinned one |
//! | 10 | key server refused (host revoked, not enrolled, not authorized) |
//! | 11 | sealed store missing, damaged, or from another host |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::crypto::{random_bytes, MasterKey};
use crate::device::{Device, DeviceError, FileDevice};
use crate::error::Class;
use crate::volume::{self, CreateOptions, KeySlot, Options, Volume, KEY_SLOTS};
use crate::volume::{Lba, VolumeError};
use crate::{keys, BLOCK_SIZE};

#[derive(Parser)]
#[command(name = "lsvfs", version, about = "Encrypted, log-structured volumes", long_about = None)]
struct Cli {
    /// Threads for parallel block encryption (0 = one per CPU).
    #[arg(long, global = true, default_value_t = 0)]
    crypto_threads: usize,
    /// Bytes per parallel crypto chunk (K/M suffixes allowed).
    #[arg(long, global = true, default_value = "512K")]
    chunk_size: String,
    /// This host's sealed store (host identity and sealed volume keys).
    #[arg(long, global = true, env = "LSVFS_STORE", default_value = keys::DEFAULT_STORE)]
    store: PathBuf,
    /// Seconds allowed for one exchange with the key server.
    #[arg(long, global = true, default_value_t = 10)]
    timeout: u64,
    /// Attempts to reach the key server (with backoff) before giving up.
    #[arg(long, global = true, default_value_t = 4)]
    attempts: u32,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where a command gets a volume's master key: a key file (recovery), or
/// this host's sealed store and the key server.
pub(crate) struct Keys {
    key_file: Option<PathBuf>,
    store: PathBuf,
    server: keys::ServerOptions,
}

impl Keys {
    fn master(&self, header: &volume::Header) -> Result<MasterKey, Error> {
        match &self.key_file {
            Some(f) => Ok(keys::unlock(header, &keys::read_key_file(f)?)?),
            None => {
                let (m, r) = keys::unlock_with_server(&self.store, &self.server, header)?;
                if let Some((from, to)) = r {
                    eprintln!("lsvfs: rewrapped the volume key from KEK v{from} to v{to}");
                }
                Ok(m)
            }
        }
    }
}

#[derive(Subcommand)]
enum HostCmd {
    /// Create this host's identity (Ed25519) and sealed store; prints the
    /// host id to enroll on the key server.
    Init {
        /// The key server, https://HOST:PORT.
        #[arg(long)]
        keyserver: String,
        /// CA certificate (PEM) of the key server to pin (or its self-signed certificate).
        #[arg(long)]
        ca: PathBuf,
    },
    /// Show this host's id, key server and sealed volumes.
    Show,
}

#[derive(Subcommand)]
enum SlotCmd {
    /// List the volume's key slots and this host's sealed key for it.
    List { volume: PathBuf },
    /// Add a recovery key slot for KEYFILE (created if it does not exist).
    AddRecovery {
        volume: PathBuf,
        #[arg(long)]
        key_file: PathBuf,
        /// Unlock with this key file instead of the sealed store and key server.
        #[arg(long)]
        unlock_key_file: Option<PathBuf>,
    },
    /// Remove key slot N.
    Remove {
        volume: PathBuf,
        #[arg(long)]
        slot: usize,
    },
}

#[derive(Subcommand)]
enum SnapCmd {
    /// Take a snapshot of a mounted volume: instant, and readable at
    /// MOUNTPOINT/.snapshots/NAME (so is `mkdir MOUNTPOINT/.snapshots/NAME`).
    Create { mountpoint: PathBuf, name: String },
    /// List snapshots, oldest first: name, creation time (UTC), and the
    /// space each alone holds (what deleting it would free).
    List {
        mountpoint: PathBuf,
        /// One JSON object per snapshot, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot and free the space only it held (so does
    /// `rmdir MOUNTPOINT/.snapshots/NAME`).
    Delete { mountpoint: PathBuf, name: String },
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a key file (mode 0600) holding a random key-encryption key.
    Keygen {
        /// Where to write the key file; it must not exist.
        keyfile: PathBuf,
    },
    /// Create a volume in a new file (sparse; it grows with data) or on a block device.
    Create {
        volume: PathBuf,
        /// Logical size: bytes, or with a K, M, G or T suffix (powers of 1024).
        #[arg(long)]
        size: String,
        /// Key file whose key opens the volume (see `lsvfs keygen`): a
        /// recovery slot, alone or beside --keyserver.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Register the volume with this key server (after `lsvfs host
        /// init`) and seal its key on this host.
        #[arg(long)]
        keyserver: Option<String>,
        /// Segment size in 4 KiB blocks (a power of two, 16..=16384).
        #[arg(long, default_value_t = volume::DEFAULT_SEGMENT_BLOCKS)]
        segment_blocks: u32,
    },
    /// Show a volume's header; with --key-file also its usage.
    Info {
        volume: PathBuf,
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Verify every metadata page and data block of a volume (read-only).
    Check {
        volume: PathBuf,
        /// Recovery key file (default: the sealed store and key server).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Write a file's bytes into the volume at a byte offset (whole blocks).
    WriteBlocks {
        volume: PathBuf,
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Byte offset in the volume; a multiple of 4096.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// File to read; its length is padded with zeros to whole blocks.
        #[arg(long)]
        input: PathBuf,
    },
    /// Mount a volume's file system (a daemon unless --foreground; SIGTERM,
    /// SIGINT, `lsvfs unmount` and `fusermount3 -u` all flush and unmount).
    Mount {
        volume: PathBuf,
        mountpoint: PathBuf,
        /// Recovery key file (default: the sealed store and key server).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Stay attached to the terminal instead of becoming a daemon.
        #[arg(long)]
        foreground: bool,
        /// List `.snapshots` in the root directory (it is always reachable
        /// by path; hidden by default so that `du`, `find`, `rsync` and
        /// `cp -a` of the mount do not walk every snapshot).
        #[arg(long)]
        show_snapshots: bool,
    },
    /// Snapshots of a mounted volume (root only; through the mount's
    /// control socket).
    #[command(subcommand)]
    Snapshot(SnapCmd),
    /// Unmount a mounted volume and wait until it is flushed and closed.
    Unmount { mountpoint: PathBuf },
    /// This host's identity and sealed store.
    #[command(subcommand)]
    Host(HostCmd),
    /// Re-wrap the volume's sealed key under the key server's newest KEK.
    Rewrap { volume: PathBuf },
    /// A volume's key slots (recovery keys).
    #[command(subcommand)]
    Keyslot(SlotCmd),
    /// Read bytes from the volume into a file.
    ReadBlocks {
        volume: PathBuf,
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Byte offset in the volume; a multiple of 4096.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes to read; a multiple of 4096.
        #[arg(long)]
        length: u64,
        #[arg(long)]
        output: PathBuf,
    },
}

/// Parses "100G", "512M", "4096" into bytes.
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => {
                    return Err(Error::Usage(format!(
                        "unknown size suffix in {s:?}; use K, M, G, T or P"
                    )))
                }
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| Error::Usage(format!("{s:?} is not a size (examples: 4096, 512M, 100G)")))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| Error::Usage(format!("size {s:?} is too large")))
}

fn open_device(path: &Path, writable: bool) -> Result<Arc<dyn Device>, Error> {
    FileDevice::open(path, writable)
        .map(|d| Arc::new(d) as Arc<dyn Device>)
        .map_err(|e| DeviceError::new(format!("opening {}", path.display()), e).into())
}

/// Names the file in "not an lsvfs volume".
fn with_path(e: VolumeError, path: &Path) -> Error {
    match e {
        VolumeError::NotAVolume(_) => VolumeError::NotAVolume(path.display().to_string()).into(),
        e => e.into(),
    }
}

/// Volume options from the command line's global flags.
struct Tuning {
    crypto_threads: usize,
    chunk_bytes: usize,
}

mod control;
mod error;
mod mount;

pub use error::{Error, Result};

fn control_call(mountpoint: &Path, req: control::Request) -> Result<control::Response, Error> {
    let r = control::request(mountpoint, &req)?;
    if r.ok {
        return Ok(r);
    }
    Err(Error::Reported {
        class: Class::Errno(r.errno.unwrap_or(libc::EIO)),
        message: r.error.unwrap_or_else(|| "the mount refused".into()),
    })
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for Unix seconds.
fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn snapshot_cmd(c: SnapCmd) -> Result<(), Error> {
    match c {
        SnapCmd::Create { mountpoint, name } => {
            let r = control_call(&mountpoint, control::Request::Create { name: name.clone() })?;
            println!(
                "snapshot {name} taken (id {}); read it under {}/.snapshots/{name}",
                r.id.unwrap_or(0),
                mountpoint.display()
            );
        }
        SnapCmd::Delete { mountpoint, name } => {
            control_call(&mountpoint, control::Request::Delete { name: name.clone() })?;
            println!("snapshot {name} deleted");
        }
        SnapCmd::List { mountpoint, json } => {
            let r = control_call(&mountpoint, control::Request::List {})?;
            let list = r.snapshots.unwrap_or_default();
            if json {
                for s in &list {
                    println!(
                        "{}",
                        serde_json::to_string(s).map_err(|e| Error::Usage(e.to_string()))?
                    );
                }
                return Ok(());
            }
            println!(
                "{:<24} {:>6}  {:<19}  {:>12}",
                "NAME", "ID", "CREATED (UTC)", "UNIQUE"
            );
            for s in &list {
                println!(
                    "{:<24} {:>6}  {:<19}  {:>12}",
                    s.name,
                    s.id,
                    utc(s.created_sec),
                    human(s.unique_blocks * crate::BLOCK_SIZE as u64)
                );
            }
        }
    }
    Ok(())
}

/// Whether block 0 of the volume holds a file-system superblock.
/// Whether `check` should check a file system on the volume: block 0
/// starts with the file-system magic, or cannot be read (then checking the
/// file system reports why). A damaged or newer superblock is reported, not
/// taken for "no file system".
fn holds_file_system(v: &Volume) -> bool {
    let mut b = vec![0u8; BLOCK_SIZE];
    v.read(Lba(0), &mut b).is_err() || b.starts_with(&crate::fs::format::FS_MAGIC)
}

fn open_volume(path: &Path, k: &Keys, read_only: bool, t: &Tuning) -> Result<Volume, Error> {
    let dev = open_device(path, !read_only)?;
    let header = volume::read_header(&*dev).map_err(|e| with_path(e, path))?;
    let master = k.master(&header)?;
    open_with(dev, &master, read_only, t)
}

fn open_with(
    dev: Arc<dyn Device>,
    master: &MasterKey,
    read_only: bool,
    t: &Tuning,
) -> Result<Volume, Error> {
    let opts = Options {
        read_only,
        background: false,
        crypto_threads: t.crypto_threads,
        chunk_bytes: t.chunk_bytes,
        ..Options::default()
    };
    Ok(Volume::open(dev, master, opts)?)
}

use keys::hex;

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

pub fn run(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<(), Error> {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let chunk_bytes = parse_size(&cli.chunk_size)?;
    if chunk_bytes < BLOCK_SIZE as u64
        || chunk_bytes % BLOCK_SIZE as u64 != 0
        || chunk_bytes > 1 << 30
    {
        return Err(Error::Usage(format!(
            "--chunk-size must be a multiple of 4096 between 4K and 1G, not {}",
            cli.chunk_size
        )));
    }
    let tuning = Tuning {
        crypto_threads: cli.crypto_threads,
        chunk_bytes: chunk_bytes as usize,
    };
    let server = keys::ServerOptions {
        timeout: std::time::Duration::from_secs(cli.timeout.max(1)),
        attempts: cli.attempts.max(1),
    };
    let store = cli.store.clone();
    let keys_with = |key_file: Option<PathBuf>| Keys {
        key_file,
        store: store.clone(),
        server: server.clone(),
    };
    match cli.cmd {
        Cmd::Keygen { keyfile } => {
            keys::generate_key_file(&keyfile)?;
            println!(
                "wrote key file {} (mode 0600); keep it safe: it opens your volumes",
                keyfile.display()
            );
        }
        Cmd::Create {
            volume: path,
            size,
            key_file,
            keyserver,
            segment_blocks,
        } => {
            let bytes = parse_size(&size)?;
            if bytes == 0 || bytes % BLOCK_SIZE as u64 != 0 {
                return Err(Error::Usage(format!(
                    "--size must be a non-zero multiple of 4096 bytes, not {bytes}"
                )));
            }
            if key_file.is_none() && keyserver.is_none() {
                return Err(Error::Usage(
                    "give --keyserver URL (after `lsvfs host init`), --key-file KEYFILE, or both"
                        .into(),
                ));
            }
            let master = MasterKey::generate().map_err(|e| Error::Usage(e.to_string()))?;
            let volume_id = *random_bytes::<16>().map_err(|e| Error::Usage(e.to_string()))?;
            let mut slots = [KeySlot::EMPTY; KEY_SLOTS];
            if let Some(kf) = &key_file {
                slots[0] = keys::key_file_slot(&keys::read_key_file(kf)?, &master, &volume_id)?;
            }
            if let Some(url) = &keyserver {
                let st = keys::SealedStore::open(&store)?;
                if st.keyserver_url.trim_end_matches('/') != url.trim_end_matches('/') {
                    return Err(Error::Usage(format!(
                        "this host is set up for key server {}, not {url}; \
                         run `lsvfs host init` again for another server",
                        st.keyserver_url
                    )));
                }
            }
            let dev = FileDevice::open_for_create(&path)
                .map_err(|e| DeviceError::new(format!("creating {}", path.display()), e))?;
            let opts = CreateOptions {
                logical_blocks: bytes / BLOCK_SIZE as u64,
                segment_blocks,
            };
            let fixed = dev.fixed_size();
            let made = (|| {
                let h = volume::create(&dev, &master, volume_id, slots, &opts)?;
                let dev: Arc<dyn Device> = Arc::new(dev);
                let v = open_with(dev, &master, false, &tuning)?;
                // SAFETY: getuid/getgid have no preconditions.
                let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
                crate::fs::Fs::format(&v, uid, gid)?;
                v.close()?;
                if keyserver.is_some() {
                    keys::register_volume(&store, &server, &volume_id, &master)?;
                }
                Ok::<_, Error>(h)
            })();
            if made.is_err() && !fixed {
                let _ = std::fs::remove_file(&path);
            }
            let h = made?;
            if keyserver.is_some() {
                println!(
                    "registered volume {} with the key server; its key is sealed on this host",
                    hex(&volume_id)
                );
                if key_file.is_none() {
                    eprintln!(
                        "lsvfs: warning: {} has no recovery key: if this host's sealed store \
                         is lost (reinstall, new machine-id), the volume cannot be opened. \
                         Add one now: lsvfs keyslot add-recovery {} --key-file RECOVERY.key",
                        path.display(),
                        path.display()
                    );
                }
            }
            println!(
                "created {}: {} logical, backing store grows to at most {}",
                path.display(),
                human(h.logical_blocks * BLOCK_SIZE as u64),
                human(h.end_block() * BLOCK_SIZE as u64)
            );
        }
        Cmd::Info {
            volume: path,
            key_file,
        } => {
            let dev = open_device(&path, false)?;
            let h = volume::read_header(&*dev).map_err(|e| with_path(e, &path))?;
            let hex: String = h.volume_id.iter().map(|b| format!("{b:02x}")).collect();
            println!("volume:          {}", path.display());
            println!("volume id:       {hex}");
            println!("format version:  {}", volume::format::FORMAT_VERSION);
            println!(
                "logical size:    {} ({} blocks)",
                human(h.logical_blocks * BLOCK_SIZE as u64),
                h.logical_blocks
            );
            println!(
                "segment size:    {} ({} blocks)",
                human(h.segment_blocks as u64 * BLOCK_SIZE as u64),
                h.segment_blocks
            );
            println!(
                "max backing size: {}",
                human(h.end_block() * BLOCK_SIZE as u64)
            );
            for (i, s) in h.slots.iter().enumerate() {
                if s.kind != volume::SlotKind::Empty {
                    let fp: String = s.fingerprint[..8]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    println!("key slot {i}:      {:?} (key fingerprint {fp}…)", s.kind);
                }
            }
            if let Some(kf) = key_file {
                drop(dev);
                let v = open_volume(&path, &keys_with(Some(kf)), true, &tuning)?;
                let s = v.stats()?;
                println!(
                    "allocated:       {} ({} blocks)",
                    human(s.allocated_blocks * BLOCK_SIZE as u64),
                    s.allocated_blocks
                );
                println!(
                    "segments in use: {} of {} ({} free)",
                    s.extent_segments, s.max_segments, s.free_segments
                );
                println!("checkpoint:      {}", s.checkpoint_seq);
                println!(
                    "snapshots:       {} (holding {} that the live volume no longer uses)",
                    s.snapshots,
                    human(s.held_blocks * BLOCK_SIZE as u64)
                );
                let r = v.recovery();
                if r.transactions > 0 || r.dropped_records > 0 {
                    println!(
                        "log to replay:   {} transactions ({} incomplete records)",
                        r.transactions, r.dropped_records
                    );
                }
            }
        }
        Cmd::Check {
            volume: path,
            key_file,
        } => {
            let v = open_volume(&path, &keys_with(key_file), true, &tuning)?;
            let r = v.check()?;
            let rec = v.recovery();
            println!(
                "checked {} metadata pages and {} data blocks ({} transactions in the log past the last checkpoint)",
                r.pages, r.data_blocks, rec.transactions
            );
            let mut problems = r.problems;
            if holds_file_system(&v) {
                // Each snapshot's file system too: its own tree of inodes,
                // directories and blocks, as frozen.
                for (id, name, _, _) in v.snapshot_names()? {
                    let f = crate::fs::Fs::mount(v.snapshot_view(id)?).and_then(|fs| fs.check());
                    match f {
                        Ok(f) => {
                            println!(
                                "snapshot {name}: {} inodes, {} directory entries, {} data blocks",
                                f.inodes, f.entries, f.data_blocks
                            );
                            problems.extend(
                                f.problems
                                    .into_iter()
                                    .map(|p| format!("snapshot {name}: {p}")),
                            );
                        }
                        Err(e) => problems.push(format!("snapshot {name}: {e}")),
                    }
                }
                match crate::fs::Fs::mount(v).and_then(|fs| fs.check()) {
                    Ok(f) => {
                        println!(
                            "file system: {} inodes, {} directory entries, {} data blocks, {} orphans",
                            f.inodes, f.entries, f.data_blocks, f.orphans
                        );
                        problems.extend(f.problems);
                    }
                    // A file system this build cannot read is not damage.
                    Err(e) if e.class() == Class::NotAVolume => return Err(e.into()),
                    Err(e) => problems.push(format!("file system: {e}")),
                }
            } else {
                println!("no file system on this volume (block 0 holds no superblock)");
            }
            if !problems.is_empty() {
                for p in &problems {
                    println!("problem: {p}");
                }
                return Err(VolumeError::Corrupted(format!(
                    "{} problems found in {}",
                    problems.len(),
                    path.display()
                ))
                .into());
            }
            println!("{}: clean", path.display());
        }
        Cmd::WriteBlocks {
            volume: path,
            key_file,
            offset,
            input,
        } => {
            if offset % BLOCK_SIZE as u64 != 0 {
                return Err(Error::Usage("--offset must be a multiple of 4096".into()));
            }
            let mut data = std::fs::read(&input)
                .map_err(|e| Error::io(format!("reading {}", input.display()), e))?;
            data.resize(data.len().div_ceil(BLOCK_SIZE) * BLOCK_SIZE, 0);
            let v = open_volume(&path, &keys_with(key_file), false, &tuning)?;
            let chunk = 256 * BLOCK_SIZE;
            for (i, c) in data.chunks(chunk).enumerate() {
                v.write(Lba(offset / BLOCK_SIZE as u64 + (i * 256) as u64), c)?;
            }
            v.flush()?;
            v.close()?;
            println!("wrote {} bytes at offset {offset}", data.len());
        }
        Cmd::Mount {
            volume: path,
            mountpoint,
            key_file,
            foreground,
            show_snapshots,
        } => {
            let k = keys_with(key_file);
            if foreground {
                mount::foreground(&path, &mountpoint, &k, &tuning, show_snapshots)?;
            } else {
                mount::daemon(&path, &mountpoint, &k, show_snapshots)?;
            }
        }
        Cmd::Snapshot(c) => snapshot_cmd(c)?,
        Cmd::Unmount { mountpoint } => mount::unmount(&mountpoint)?,
        Cmd::Host(HostCmd::Init { keyserver, ca }) => {
            let ca_pem = std::fs::read(&ca).map_err(|e| {
                Error::io(format!("reading the CA certificate {}", ca.display()), e)
            })?;
            if !ca_pem.starts_with(b"-----BEGIN") {
                return Err(Error::Usage(format!(
                    "{} is not a PEM certificate",
                    ca.display()
                )));
            }
            let st = keys::SealedStore::init(&store, &keyserver, ca_pem)?;
            println!("created the sealed store in {}", store.display());
            println!("host id: {}", keys::host_id(&st));
            println!(
                "enroll it on the key server: lsvfs-keyserver admin enroll NAME {}",
                keys::host_id(&st)
            );
        }
        Cmd::Host(HostCmd::Show) => {
            let st = keys::SealedStore::open(&store)?;
            println!("host id:    {}", keys::host_id(&st));
            println!("key server: {}", st.keyserver_url);
            for v in &st.volumes {
                println!("volume {}: KEK v{}", hex(&v.volume_id), v.kek_version);
            }
        }
        Cmd::Rewrap { volume: path } => {
            let dev = open_device(&path, false)?;
            let h = volume::read_header(&*dev).map_err(|e| with_path(e, &path))?;
            let (_, r) = keys::unlock_with_server(&store, &server, &h)?;
            match r {
                Some((from, to)) => println!(
                    "rewrapped the key of {} from KEK v{from} to v{to}",
                    path.display()
                ),
                None => {
                    // Report again, in case an earlier report was lost.
                    let v = keys::report_current(&store, &server, &h.volume_id)?;
                    println!(
                        "the key of {} is already wrapped under the newest KEK (v{v})",
                        path.display()
                    )
                }
            }
        }
        Cmd::Keyslot(SlotCmd::List { volume: path }) => {
            let dev = open_device(&path, false)?;
            let h = volume::read_header(&*dev).map_err(|e| with_path(e, &path))?;
            for (i, sl) in h.slots.iter().enumerate() {
                match sl.kind {
                    volume::SlotKind::Empty => println!("slot {i}: empty"),
                    k => println!(
                        "slot {i}: {k:?} (key fingerprint {})",
                        hex(&sl.fingerprint[..8])
                    ),
                }
            }
            match keys::SealedStore::open(&store) {
                Ok(st) => match st.entry(&h.volume_id) {
                    Some(e) => println!(
                        "sealed on this host: KEK v{} from {}",
                        e.kek_version, st.keyserver_url
                    ),
                    None => println!("sealed on this host: no"),
                },
                Err(e) => println!("sealed on this host: no ({e})"),
            }
        }
        Cmd::Keyslot(SlotCmd::AddRecovery {
            volume: path,
            key_file,
            unlock_key_file,
        }) => {
            let dev = open_device(&path, true)?;
            let mut h = volume::read_header(&*dev).map_err(|e| with_path(e, &path))?;
            let master = keys_with(unlock_key_file).master(&h)?;
            if !key_file.exists() {
                keys::generate_key_file(&key_file)?;
                println!("wrote key file {} (mode 0600)", key_file.display());
            }
            let slot =
                keys::key_file_slot(&keys::read_key_file(&key_file)?, &master, &h.volume_id)?;
            if h.slots
                .iter()
                .any(|s| s.kind != volume::SlotKind::Empty && s.fingerprint == slot.fingerprint)
            {
                return Err(Error::Usage(format!(
                    "{} already opens {}",
                    key_file.display(),
                    path.display()
                )));
            }
            let Some(i) = h
                .slots
                .iter()
                .position(|s| s.kind == volume::SlotKind::Empty)
            else {
                return Err(Error::Usage(format!(
                    "all {KEY_SLOTS} key slots of {} are in use; remove one first",
                    path.display()
                )));
            };
            h.slots[i] = slot;
            volume::write_header(&*dev, &h)?;
            println!("added recovery key {} in slot {i}", key_file.display());
        }
        Cmd::Keyslot(SlotCmd::Remove { volume: path, slot }) => {
            let dev = open_device(&path, true)?;
            let mut h = volume::read_header(&*dev).map_err(|e| with_path(e, &path))?;
            if slot >= KEY_SLOTS || h.slots[slot].kind == volume::SlotKind::Empty {
                return Err(Error::Usage(format!("slot {slot} is empty")));
            }
            let others = h
                .slots
                .iter()
                .enumerate()
                .filter(|(i, s)| *i != slot && s.kind != volume::SlotKind::Empty)
                .count();
            let sealed_here = keys::SealedStore::open(&store)
                .map(|st| st.entry(&h.volume_id).is_some())
                .unwrap_or(false);
            if others == 0 && !sealed_here {
                return Err(Error::Usage(format!(
                    "slot {slot} is the last way to open {}; add another recovery key first",
                    path.display()
                )));
            }
            h.slots[slot] = KeySlot::EMPTY;
            volume::write_header(&*dev, &h)?;
            println!("removed key slot {slot} of {}", path.display());
        }
        Cmd::ReadBlocks {
            volume: path,
            key_file,
            offset,
            length,
            output,
        } => {
            if offset % BLOCK_SIZE as u64 != 0 || length % BLOCK_SIZE as u64 != 0 {
                return Err(Error::Usage(
                    "--offset and --length must be multiples of 4096".into(),
                ));
            }
            let v = open_volume(&path, &keys_with(key_file), true, &tuning)?;
            let mut out = vec![0u8; length as usize];
            v.read(Lba(offset / BLOCK_SIZE as u64), &mut out)?;
            std::fs::write(&output, &out)
                .map_err(|e| Error::io(format!("writing {}", output.display()), e))?;
            println!(
                "read {length} bytes at offset {offset} into {}",
                output.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("100G").unwrap(), 100 << 30);
        assert_eq!(parse_size("16t").unwrap(), 16 << 40);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999P").is_err());
    }
}
