//! The mount(8) and umount(8) helpers: the `lsvfs` binary acting on its
//! name. Installed as links, `/sbin/mount.lsvfs` makes `mount -t lsvfs
//! VOLUME DIR -o OPTIONS` and fstab entries of type `lsvfs` work, and
//! `/sbin/umount.fuse.lsvfs` makes `umount DIR` wait, as `lsvfs unmount`
//! does, until the volume is flushed and closed.
//!
//! mount(8) runs `mount.lsvfs SOURCE TARGET [-sfnv] [-N NS] [-o OPTIONS]
//! [-t TYPE]`; umount(8) runs `umount.fuse.lsvfs TARGET [-flnrv] [-N NS]
//! [-t TYPE]`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};

use super::common::{Env, Tuning};
use super::options::MountOptions;
use super::{mount, Error};
use crate::keys;

/// A helper's entry point: the whole argument list, its name included.
pub(super) type Helper = fn(Vec<OsString>) -> Result<(), Error>;

/// Which helper the binary's name asks for, if any.
pub(super) fn by_name(arg0: &Path) -> Option<Helper> {
    match arg0.file_name()?.to_str()? {
        "mount.lsvfs" | "mount.fuse.lsvfs" => Some(mount_helper),
        "umount.lsvfs" | "umount.fuse.lsvfs" => Some(umount_helper),
        _ => None,
    }
}

/// What `mount.lsvfs --help` and its manual page say about options.
const MOUNT_LONG_ABOUT: &str =
    "mount(8) helper for lsvfs volumes: mount -t lsvfs VOLUME DIR -o OPTIONS, \
and fstab entries of type lsvfs.

Options: ro, rw; key_file=PATH (a recovery key file instead of the key server); \
store=PATH (the sealed store, default /var/lib/lsvfs); timeout=SECONDS and attempts=N \
(reaching the key server); show_snapshots (list .snapshots in the root); allow_other \
(root's mounts always allow other users; modes and ACLs still apply); noexec, nosuid, \
nodev, noatime, sync, dirsync (passed to the kernel). mount(8)'s and systemd's own \
(defaults, auto, noauto, _netdev, nofail, user, comment=, x-*) are accepted and left to \
them. An unknown option is refused by name unless -s is given.

Example fstab line:  /srv/data.vol  /srv/data  lsvfs  _netdev,nodev,noexec  0 0

umount DIR runs umount.fuse.lsvfs, which returns once the volume is flushed and closed. \
For mounts that must wait for the key server at boot, see lsvfs-mount@.service \
(lsvfs-mount-entry(1)).";

#[derive(Parser)]
#[command(
    name = "mount.lsvfs",
    about = "mount(8) helper for lsvfs volumes: mount -t lsvfs VOLUME DIR -o OPTIONS",
    long_about = MOUNT_LONG_ABOUT,
    disable_version_flag = true
)]
struct MountArgs {
    /// The volume: a backing file or block device.
    source: PathBuf,
    /// The mountpoint.
    target: PathBuf,
    /// Sloppy: ignore mount options lsvfs does not know.
    #[arg(short = 's')]
    sloppy: bool,
    /// Fake: check the options, mount nothing.
    #[arg(short = 'f')]
    fake: bool,
    /// No /etc/mtab (accepted; lsvfs writes none).
    #[arg(short = 'n')]
    no_mtab: bool,
    /// Verbose.
    #[arg(short = 'v')]
    verbose: bool,
    /// Mount options, comma-separated (see `lsvfs mount --help`).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// The type mount(8) was given (lsvfs or fuse.lsvfs).
    #[arg(short = 't', value_name = "TYPE")]
    fstype: Option<String>,
    /// Another mount namespace (not supported).
    #[arg(short = 'N', value_name = "NS")]
    namespace: Option<String>,
}

#[derive(Parser)]
#[command(
    name = "umount.fuse.lsvfs",
    about = "umount(8) helper for lsvfs volumes: unmounts and waits until the volume is closed",
    disable_version_flag = true
)]
struct UmountArgs {
    /// The mountpoint.
    target: PathBuf,
    /// Lazy: detach now, close the volume when the last user lets go.
    #[arg(short = 'l')]
    lazy: bool,
    /// Force (accepted; FUSE mounts are unmounted the same way).
    #[arg(short = 'f')]
    force: bool,
    /// No /etc/mtab (accepted).
    #[arg(short = 'n')]
    no_mtab: bool,
    /// Remount read-only on failure (not supported; accepted and ignored).
    #[arg(short = 'r')]
    remount: bool,
    /// Verbose.
    #[arg(short = 'v')]
    verbose: bool,
    #[arg(short = 't', value_name = "TYPE")]
    fstype: Option<String>,
    #[arg(short = 'N', value_name = "NS")]
    namespace: Option<String>,
}

/// The helpers' command lines, for their manual pages.
pub(super) fn commands() -> [clap::Command; 2] {
    [MountArgs::command(), UmountArgs::command()]
}

fn parse<T: Parser>(args: Vec<OsString>) -> T {
    T::try_parse_from(args).unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 2 } else { 0 })
    })
}

fn no_namespaces(ns: &Option<String>) -> Result<(), Error> {
    match ns {
        Some(ns) => Err(Error::Usage(format!(
            "-N {ns}: lsvfs cannot mount in another namespace; run mount inside it instead"
        ))),
        None => Ok(()),
    }
}

/// The settings a command-line mount would take from its defaults and
/// `LSVFS_STORE`, before the mount options change them.
fn default_env() -> Env {
    Env {
        tuning: Tuning {
            crypto_threads: 0,
            chunk_bytes: crate::crypto::DEFAULT_CHUNK_BYTES,
        },
        store: std::env::var_os("LSVFS_STORE")
            .map_or_else(|| PathBuf::from(keys::DEFAULT_STORE), PathBuf::from),
        server: keys::ServerOptions::default(),
    }
}

fn mount_helper(args: Vec<OsString>) -> Result<(), Error> {
    let a: MountArgs = parse(args);
    super::start_logging(a.verbose as u8);
    no_namespaces(&a.namespace)?;
    if let Some(t) = &a.fstype {
        if t != "lsvfs" && t != "fuse.lsvfs" {
            return Err(Error::Usage(format!(
                "mount.lsvfs mounts type lsvfs, not {t}"
            )));
        }
    }
    let opts = MountOptions::parse(&a.options.join(","), a.sloppy)?;
    if a.verbose {
        tracing::info!(
            "mount.lsvfs: {} on {} with {}",
            a.source.display(),
            a.target.display(),
            opts.to_list()
        );
    }
    if a.fake {
        return Ok(());
    }
    let env = default_env().with_mount_options(&opts);
    let k = env.keys(opts.key_file.clone());
    mount::daemon(&a.source, &a.target, &k, &opts)
}

fn umount_helper(args: Vec<OsString>) -> Result<(), Error> {
    let a: UmountArgs = parse(args);
    super::start_logging(a.verbose as u8);
    no_namespaces(&a.namespace)?;
    if a.lazy {
        return mount::detach_lazily(&a.target);
    }
    mount::unmount(&a.target)
}
