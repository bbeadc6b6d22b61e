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
//! | 12 | rollback refused: the volume is older than a state this host has seen |
//! | 13 | the volume was crypto-erased: nothing opens it |
//! | 14 | not an export, or an export format version this build cannot read |
//! | 15 | export chain refused: a missing, reordered or foreign link, or a target that is not the increment's base |
//! | 16 | incomplete: an export cut short, or a volume whose restore did not finish |
//!
//! `run` parses the command line and hands each subcommand to one function:
//! volumes (keygen, create, info, check), blocks (write-blocks,
//! read-blocks), mount (mount, unmount), snapshot, host (host, rewrap,
//! keyslot, erase), export (snapshot export, export verify|show, restore,
//! recipient keygen).

mod blocks;
mod common;
mod control;
mod error;
mod export;
mod helper;
mod host;
mod mount;
mod mounts;
mod objects;
mod options;
mod rekey;
mod snapshot;
mod volumes;

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

pub use common::parse_size;
use common::{Env, Tuning};
/// The control socket's request parser, for its fuzz target.
#[doc(hidden)]
pub use control::{parse_request as parse_control_request, Request as ControlRequest};
pub use error::{Error, Result};

use crate::{keys, volume, BLOCK_SIZE};

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
    #[arg(long, global = true, default_value_t = keys::DEFAULT_TIMEOUT_SECS)]
    timeout: u64,
    /// Attempts to reach the key server (with backoff) before giving up.
    #[arg(long, global = true, default_value_t = keys::DEFAULT_ATTEMPTS)]
    attempts: u32,
    /// More log detail: -v debug (a mount's FUSE requests), -vv trace (or
    /// LSVFS_LOG=LEVEL). A foreground mount under systemd logs to journald.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum HostCmd {
    /// Create this host's identity (Ed25519) and sealed store; prints the
    /// host id to enroll on each key server.
    Init {
        /// A key server, https://HOST:PORT; repeat it for several (up to 8;
        /// a volume can then need a threshold of them, see `create`).
        #[arg(long, required = true)]
        keyserver: Vec<String>,
        /// CA certificate (PEM) of the key servers to pin (or their
        /// self-signed certificates, concatenated).
        #[arg(long)]
        ca: PathBuf,
        /// Seal the host secret to this host's TPM 2.0 instead of keeping it
        /// in a root-only file (the TPM: /dev/tpmrm0, or $LSVFS_TPM_TCTI).
        #[arg(long)]
        tpm: bool,
        /// With --tpm: bind it to these PCRs' current values (SHA-256 bank),
        /// comma-separated, e.g. 7 (Secure Boot state) or 0,2,7.
        #[arg(long, value_delimiter = ',', requires = "tpm")]
        tpm_pcrs: Vec<u8>,
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
    /// Export a snapshot as a portable, encrypted file: its blocks (or,
    /// with --since, only those changed since an older snapshot), sealed
    /// with a key of the export's own that only the --recipient keys and
    /// --key-file keys can open. Verify it with `lsvfs export verify`,
    /// rebuild a volume from it with `lsvfs restore`.
    Export {
        /// A mountpoint (exported through the running mount, which keeps
        /// serving), or a volume: a mounted one exports through its mount,
        /// an unmounted one is opened read-only with the first --key-file,
        /// else this host's sealed store and key server.
        source: PathBuf,
        /// The snapshot to export.
        name: String,
        /// Export only what changed since this older snapshot (an
        /// increment; restore applies it over the export of BASE).
        #[arg(long, value_name = "BASE")]
        since: Option<String>,
        /// A recipient's public key file (`lsvfs recipient keygen`): it
        /// alone can restore the export, with no key server. Repeatable.
        #[arg(long, value_name = "PUBFILE")]
        recipient: Vec<PathBuf>,
        /// A key file (the volume's recovery key, say) that can open the
        /// export. Repeatable.
        #[arg(long, value_name = "KEYFILE")]
        key_file: Vec<PathBuf>,
        /// Where to write: a new file (written as FILE.partial, renamed
        /// when complete), an existing FIFO or character device (written
        /// as it is), or - for standard output.
        #[arg(short = 'o', long, value_name = "FILE|-")]
        output: String,
        /// Print the summary as JSON (on stderr; stdout may be the export).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ExportCmd {
    /// Check export files without any key: each complete and intact (every
    /// byte against its trailer's hash), and, given several, that they form
    /// a chain in the order given (each an increment over the one before).
    Verify {
        #[arg(required = true, value_name = "FILE|-")]
        files: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show what an export holds: volume, snapshot, base, who can open it,
    /// sizes and hash (checking the whole file, without any key).
    Show {
        #[arg(value_name = "FILE|-")]
        file: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RecipientCmd {
    /// Make a recipient key pair: the identity KEYFILE (mode 0600; it opens
    /// exports made for it) and KEYFILE.pub, whose one line (also printed)
    /// is what `lsvfs snapshot export --recipient` takes.
    Keygen { keyfile: PathBuf },
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
        /// Logical size: bytes, or with a K, M, G or T suffix (powers of
        /// 1024). Needed for a file; a block device's volume is by default
        /// the largest it holds.
        #[arg(long)]
        size: Option<String>,
        /// Key file whose key opens the volume (see `lsvfs keygen`): a
        /// recovery slot, alone or beside --keyserver.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Register the volume with this key server (after `lsvfs host
        /// init`) and seal its key on this host. Repeat it to need a
        /// threshold of several servers (see --threshold).
        #[arg(long)]
        keyserver: Vec<String>,
        /// With several --keyserver: how many of them must release their
        /// key to unlock the volume (2 up to their number; default: a
        /// majority). Fewer servers learn nothing about the key.
        #[arg(long)]
        threshold: Option<usize>,
        /// Segment size in 4 KiB blocks (a power of two, 16..=16384).
        #[arg(long, default_value_t = volume::DEFAULT_SEGMENT_BLOCKS)]
        segment_blocks: u32,
        /// Rekey by itself after a key generation has sealed new blocks this
        /// long (120d, 12h), or never (default 120d; see `lsvfs tune`).
        #[arg(long, value_name = "DURATION")]
        rekey_after: Option<String>,
        /// Rekey by itself after this many bytes sealed under a key
        /// generation (64T), or none (the default).
        #[arg(long, value_name = "SIZE")]
        rekey_after_bytes: Option<String>,
    },
    /// Show a volume's header; with --key-file also its usage. VOLUME may
    /// be a mountpoint; a mounted volume's usage comes from its mount (no
    /// key needed).
    Info {
        volume: PathBuf,
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Seal every block of a volume again under a new key generation, online
    /// when TARGET is a mountpoint (new writes use the new keys at once; a
    /// background pass seals the rest, snapshots included, then destroys
    /// the older keys), or here when TARGET is an unmounted volume. If a
    /// rekey is already running, it is resumed (or waited for) instead.
    Rekey {
        /// A mountpoint or an unmounted volume.
        target: PathBuf,
        /// Recovery key file (default: the sealed store and key server).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Wait until the pass is done (a progress bar on a terminal). An
        /// unmounted volume is always waited for.
        #[arg(long)]
        wait: bool,
        /// Only say where the rekey stands (starts nothing).
        #[arg(long, conflicts_with = "wait")]
        status: bool,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Set a volume's rekey policy (unmounted): a mount rekeys by itself
    /// once its key generation is older than --rekey-after (default 120d) or
    /// has sealed more than --rekey-after-bytes.
    Tune {
        volume: PathBuf,
        /// Recovery key file (default: the sealed store and key server).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// A duration (120d, 12h, 90m), or never.
        #[arg(long, value_name = "DURATION")]
        rekey_after: Option<String>,
        /// A size (64T, 500G), or none.
        #[arg(long, value_name = "SIZE")]
        rekey_after_bytes: Option<String>,
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
        /// Mount read-only: every change fails with EROFS and nothing is
        /// written to the volume (a crash's log is replayed in memory).
        #[arg(long)]
        read_only: bool,
        /// Let other users in (their access is still checked against modes
        /// and ACLs). Root's mounts always let them in; a user's need
        /// `user_allow_other` in /etc/fuse.conf.
        #[arg(long)]
        allow_other: bool,
        /// Mount even if the volume is older than the state this host has
        /// recorded for it (an older copy of the backing file put back,
        /// refused with exit code 12 otherwise), and reset the record.
        #[arg(long)]
        allow_rollback: bool,
        /// Unmount by itself after this long without a request (15m, 1h,
        /// 90s), closing the volume and dropping its keys; while a file or
        /// directory on it is in use it stays, and tries again every minute.
        /// With a systemd automount unit the next access mounts it again.
        #[arg(long, value_name = "DURATION", value_parser = options::parse_idle)]
        idle_lock: Option<std::time::Duration>,
        /// With --idle-lock: before unmounting, take a snapshot and export
        /// it to DEST (a directory, or s3://BUCKET/PREFIX), incrementally
        /// over the previous one; the exports open with the volume's keys
        /// (and with the mount's --key-file, if it has one).
        #[arg(long, value_name = "DEST")]
        on_lock_export: Option<String>,
        /// How the kernel's requests come: auto (FUSE over io_uring where
        /// the kernel offers it: Linux 6.14+ with the fuse module's
        /// enable_uring set; else /dev/fuse), uring (or fail), or dev.
        #[arg(long, value_name = "auto|uring|dev", value_parser = options::parse_transport, env = "LSVFS_TRANSPORT")]
        transport: Option<crate::fuse::Transport>,
        /// Options as mount(8) and fstab give them, comma-separated: ro, rw,
        /// key_file=PATH, store=PATH, timeout=SECONDS, attempts=N,
        /// show_snapshots, allow_other, allow_rollback, idle_lock=DURATION,
        /// on_lock_export=DEST, transport=auto|uring|dev,
        /// noexec, nosuid, nodev, noatime, sync, dirsync (and mount(8)'s
        /// own: defaults, _netdev, nofail, x-*).
        #[arg(short = 'o', long = "options", value_name = "OPTS")]
        options: Option<String>,
    },
    /// Mount the fstab entry (type lsvfs) for MOUNTPOINT in the
    /// foreground, as the lsvfs-mount@.service unit does at boot: while the
    /// key server cannot be reached it waits and retries (1 s doubling to
    /// 60 s), saying why in the unit's status; ready once mounted.
    MountEntry {
        mountpoint: PathBuf,
        /// The fstab file to read.
        #[arg(long, default_value = "/etc/fstab")]
        fstab: PathBuf,
    },
    /// Snapshots of a mounted volume (root or the user who mounted it;
    /// through the mount's control socket).
    #[command(subcommand)]
    Snapshot(SnapCmd),
    /// Unmount a mounted volume and wait until it is flushed and closed.
    Unmount { mountpoint: PathBuf },
    /// This host's identity and sealed store.
    #[command(subcommand)]
    Host(HostCmd),
    /// Re-wrap the volume's sealed key under the key server's newest KEK.
    Rewrap { volume: PathBuf },
    /// Crypto-erase a volume (unmounted), for good: zero every key slot and
    /// the key-check value in both header copies, ask the key server to
    /// destroy the volume's KEKs (audited), and drop this host's sealed
    /// copy. Afterwards nothing opens it, recovery key files included.
    /// Running it again finishes an erase that was interrupted.
    Erase {
        volume: PathBuf,
        /// Do not ask for confirmation (needed when not on a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// A volume's key slots (recovery keys).
    #[command(subcommand)]
    Keyslot(SlotCmd),
    /// Check or inspect export files (see `lsvfs snapshot export`).
    #[command(subcommand)]
    Export(ExportCmd),
    /// Rebuild a volume from exports: a new volume (new id, new data key)
    /// from a full export and its increments, oldest first, each becoming a
    /// snapshot under .snapshots/ and the newest the live tree; or, with
    /// --incremental, apply increments to a volume whose newest snapshot is
    /// their base.
    Restore {
        /// Export files, oldest first (or - for standard input, alone); a
        /// FIFO or a pipe's /dev/fd path is read once.
        #[arg(required = true, value_name = "FILE|-")]
        files: Vec<String>,
        /// The volume to create (or, with --incremental, to update).
        #[arg(long, value_name = "VOLUME")]
        to: PathBuf,
        /// Key file: opens exports made for it (--key-file at export), and
        /// becomes the new volume's recovery key slot (with --incremental:
        /// opens the volume).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// A recipient identity (`lsvfs recipient keygen`) that opens the
        /// exports. Repeatable.
        #[arg(long, value_name = "KEYFILE")]
        identity: Vec<PathBuf>,
        /// Refuse exports not signed by this source key (hex, as `lsvfs
        /// export show` prints it): anyone can write an export for a
        /// recipient, only the source volume can sign it.
        #[arg(long, value_name = "HEX")]
        source_key: Option<String>,
        /// Register the new volume with this key server (after `lsvfs host
        /// init`), as `lsvfs create` does. Repeatable, with --threshold.
        #[arg(long)]
        keyserver: Vec<String>,
        #[arg(long)]
        threshold: Option<usize>,
        /// Apply the increments to the existing volume --to, whose newest
        /// snapshot must be the first one's base.
        #[arg(long)]
        incremental: bool,
        /// With --incremental: first put the volume back to its newest
        /// snapshot, discarding what changed since (also finishes an
        /// increment whose restore was interrupted).
        #[arg(long, requires = "incremental")]
        rollback: bool,
        /// Segment size of the new volume, in 4 KiB blocks.
        #[arg(long, default_value_t = volume::DEFAULT_SEGMENT_BLOCKS)]
        segment_blocks: u32,
        /// One JSON summary line instead of the progress bar and summary.
        #[arg(long)]
        json: bool,
    },
    /// Recipient key pairs for exports.
    #[command(subcommand)]
    Recipient(RecipientCmd),
    /// Write the manual pages (lsvfs(1) and one per command, mount.lsvfs(8),
    /// umount.fuse.lsvfs(8)) into DIR, for packaging.
    #[command(hide = true)]
    GenerateMan { dir: PathBuf },
    /// Print shell completions for lsvfs.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
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

/// Shells `lsvfs completions` writes for.
#[derive(Clone, Copy, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Writes every manual page into `dir`.
fn generate_man(dir: &std::path::Path) -> Result<(), Error> {
    let io = |e| Error::io(format!("writing manual pages to {}", dir.display()), e);
    std::fs::create_dir_all(dir).map_err(io)?;
    clap_mangen::generate_to(Cli::command(), dir).map_err(io)?;
    for cmd in helper::commands() {
        clap_mangen::Man::new(cmd)
            .section("8")
            .generate_to(dir)
            .map_err(io)?;
    }
    Ok(())
}

/// Starts logging (see `lsvfs_keyserver::logging`). A mount daemon started
/// in the background logs to journald too: its stderr goes away once it is
/// mounted.
fn start_logging(verbosity: u8) {
    use lsvfs_keyserver::logging::{init, Journal};
    let journal = if mount::is_daemon_child() {
        Journal::Also
    } else {
        Journal::IfStderrIsJournal
    };
    init("lsvfs", verbosity, journal);
}

/// Runs the `lsvfs` command line.
pub fn run(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<(), Error> {
    let args: Vec<std::ffi::OsString> = args.into_iter().collect();
    if let Some(helper) = args.first().and_then(|a0| helper::by_name(a0.as_ref())) {
        return helper(args);
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { 2 } else { 0 });
        }
    };
    start_logging(cli.verbose);
    if !matches!(cli.cmd, Cmd::Mount { .. } | Cmd::MountEntry { .. }) {
        // Like other Unix tools, end quietly when the reader of our output
        // goes away (`lsvfs info V | head`); a mount keeps ignoring SIGPIPE,
        // its control clients may hang up at any time.
        // SAFETY: setting a signal's disposition to its default is always
        // sound; no handler runs.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let env = env_of(&cli)?;
    match cli.cmd {
        Cmd::Keygen { keyfile } => volumes::keygen(&keyfile),
        Cmd::Create {
            volume,
            size,
            key_file,
            keyserver,
            threshold,
            segment_blocks,
            rekey_after,
            rekey_after_bytes,
        } => volumes::create(
            &env,
            &volume,
            size.as_deref(),
            key_file,
            (keyserver, threshold),
            segment_blocks,
            (rekey_after, rekey_after_bytes),
        ),
        Cmd::Info { volume, key_file } => volumes::info(&env, &volume, key_file),
        Cmd::Check { volume, key_file } => volumes::check(&env, &volume, key_file),
        Cmd::Tune {
            volume,
            key_file,
            rekey_after,
            rekey_after_bytes,
        } => rekey::tune(&env, &volume, key_file, rekey_after, rekey_after_bytes),
        Cmd::Rekey {
            target,
            key_file,
            wait,
            status,
            json,
        } => rekey::rekey(&env, &target, key_file, wait, status, json),
        Cmd::WriteBlocks {
            volume,
            key_file,
            offset,
            input,
        } => blocks::write(&env, &volume, key_file, offset, &input),
        Cmd::ReadBlocks {
            volume,
            key_file,
            offset,
            length,
            output,
        } => blocks::read(&env, &volume, key_file, offset, length, &output),
        Cmd::Mount {
            volume,
            mountpoint,
            key_file,
            foreground,
            show_snapshots,
            read_only,
            allow_other,
            allow_rollback,
            idle_lock,
            on_lock_export,
            transport,
            options,
        } => {
            let mut opts = options::MountOptions::parse(options.as_deref().unwrap_or(""), false)?;
            opts.transport = transport.or(opts.transport);
            opts.read_only |= read_only;
            opts.show_snapshots |= show_snapshots;
            opts.allow_other |= allow_other;
            opts.allow_rollback |= allow_rollback;
            opts.idle_lock = idle_lock.or(opts.idle_lock);
            opts.on_lock_export = on_lock_export.or(opts.on_lock_export);
            if opts.on_lock_export.is_some() && opts.idle_lock.is_none() {
                return Err(Error::Usage(
                    "--on-lock-export exports when the idle lock unmounts: give --idle-lock too"
                        .into(),
                ));
            }
            if key_file.is_some() {
                opts.key_file = key_file;
            }
            let env = env.with_mount_options(&opts);
            let k = env.keys(opts.key_file.clone());
            if foreground {
                mount::foreground(&volume, &mountpoint, &k, &env.tuning, &opts, false)
            } else {
                mount::daemon(&volume, &mountpoint, &k, &opts)
            }
        }
        Cmd::MountEntry { mountpoint, fstab } => {
            // fstab names mountpoints by absolute path.
            let mountpoint = std::fs::canonicalize(&mountpoint).unwrap_or(mountpoint);
            let text = std::fs::read_to_string(&fstab)
                .map_err(|e| Error::io(format!("reading {}", fstab.display()), e))?;
            let entry = options::fstab_entry(
                &text,
                &fstab.display().to_string(),
                &mountpoint.display().to_string(),
            )?;
            let opts = options::MountOptions::parse(&entry.options, false)?;
            let env = env.with_mount_options(&opts);
            let k = env.keys(opts.key_file.clone());
            mount::foreground(&entry.volume, &mountpoint, &k, &env.tuning, &opts, true)
        }
        Cmd::Unmount { mountpoint } => mount::unmount(&mountpoint),
        Cmd::Snapshot(SnapCmd::Export {
            source,
            name,
            since,
            recipient,
            key_file,
            output,
            json,
        }) => export::snapshot_export(
            &env,
            export::ExportArgs {
                source,
                name,
                since,
                recipients: recipient,
                key_files: key_file,
                output,
                json,
            },
        ),
        Cmd::Snapshot(c) => snapshot::run(c),
        Cmd::Export(ExportCmd::Verify { files, json }) => export::verify(&files, json),
        Cmd::Export(ExportCmd::Show { file, json }) => export::show(&file, json),
        Cmd::Recipient(RecipientCmd::Keygen { keyfile }) => export::recipient_keygen(&keyfile),
        Cmd::Restore {
            files,
            to,
            key_file,
            identity,
            source_key,
            keyserver,
            threshold,
            incremental,
            rollback,
            segment_blocks,
            json,
        } => export::restore(
            &env,
            export::RestoreArgs {
                files,
                to,
                keying: volumes::Keying {
                    key_file,
                    keyserver,
                    threshold,
                },
                identities: identity,
                source_key,
                incremental,
                rollback,
                segment_blocks,
                json,
            },
        ),
        Cmd::Host(HostCmd::Init {
            keyserver,
            ca,
            tpm,
            tpm_pcrs,
        }) => host::init(&env, &keyserver, &ca, tpm.then_some(tpm_pcrs)),
        Cmd::Host(HostCmd::Show) => host::show(&env),
        Cmd::Rewrap { volume } => host::rewrap(&env, &volume),
        Cmd::Erase { volume, yes } => host::erase(&env, &volume, yes),
        Cmd::Keyslot(SlotCmd::List { volume }) => host::slot_list(&env, &volume),
        Cmd::Keyslot(SlotCmd::AddRecovery {
            volume,
            key_file,
            unlock_key_file,
        }) => host::slot_add_recovery(&env, &volume, &key_file, unlock_key_file),
        Cmd::Keyslot(SlotCmd::Remove { volume, slot }) => host::slot_remove(&env, &volume, slot),
        Cmd::GenerateMan { dir } => generate_man(&dir),
        Cmd::Completions { shell } => {
            let mut cmd = Cli::command();
            let out = &mut std::io::stdout();
            match shell {
                Shell::Bash => {
                    clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "lsvfs", out)
                }
                Shell::Zsh => {
                    clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, "lsvfs", out)
                }
                Shell::Fish => {
                    clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, "lsvfs", out)
                }
            }
            Ok(())
        }
    }
}

/// The global options, checked.
fn env_of(cli: &Cli) -> Result<Env, Error> {
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
    Ok(Env {
        tuning: Tuning {
            crypto_threads: cli.crypto_threads,
            chunk_bytes: chunk_bytes as usize,
        },
        store: cli.store.clone(),
        server: keys::ServerOptions {
            timeout: std::time::Duration::from_secs(cli.timeout.max(1)),
            attempts: cli.attempts.max(1),
        },
    })
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
