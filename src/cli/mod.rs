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
//!
//! `run` parses the command line and hands each subcommand to one function:
//! volumes (keygen, create, info, check), blocks (write-blocks,
//! read-blocks), mount (mount, unmount), snapshot, host (host, rewrap,
//! keyslot, erase).

mod blocks;
mod common;
mod control;
mod error;
mod helper;
mod host;
mod mount;
mod options;
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
        /// Options as mount(8) and fstab give them, comma-separated: ro, rw,
        /// key_file=PATH, store=PATH, timeout=SECONDS, attempts=N,
        /// show_snapshots, allow_other, allow_rollback, idle_lock=DURATION,
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
        } => volumes::create(
            &env,
            &volume,
            &size,
            key_file,
            (keyserver, threshold),
            segment_blocks,
        ),
        Cmd::Info { volume, key_file } => volumes::info(&env, &volume, key_file),
        Cmd::Check { volume, key_file } => volumes::check(&env, &volume, key_file),
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
            options,
        } => {
            let mut opts = options::MountOptions::parse(options.as_deref().unwrap_or(""), false)?;
            opts.read_only |= read_only;
            opts.show_snapshots |= show_snapshots;
            opts.allow_other |= allow_other;
            opts.allow_rollback |= allow_rollback;
            opts.idle_lock = idle_lock.or(opts.idle_lock);
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
        Cmd::Snapshot(c) => snapshot::run(c),
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
