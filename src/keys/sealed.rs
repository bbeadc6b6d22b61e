//! The host's sealed store: a software stand-in for a TPM. It keeps the
//! host's Ed25519 identity key, the key servers' addresses and pinned CA,
//! and each volume's data key wrapped under that volume's KEK (or, for a
//! volume with a threshold of key servers, one Shamir share of it per
//! server, each wrapped under that server's KEK).
//!
//! # Threat model
//!
//! Two files in the store directory (default `/var/lib/lsvfs`, mode 0700):
//! - `host-secret`: 32 random bytes, mode 0600, readable by root only;
//! - `sealed`: everything else, encrypted and authenticated
//!   (XChaCha20-Poly1305) under a key derived from the host secret *and* a
//!   measurement of the host (SHA-256 of `/etc/machine-id`).
//!
//! What it protects against:
//! - The `sealed` file copied (or restored from a backup) to another host:
//!   that host has another secret and another machine-id, so it does not
//!   open ("sealed on another host").
//! - Both files copied to another host: the machine-id differs, so it does
//!   not open either.
//! - A stolen volume file, or a stolen sealed store without network access:
//!   the data keys inside are wrapped under KEKs that only the key server
//!   releases, to this host's identity, while it is enrolled and authorized.
//!   Revoking the host on the key server locks it out at the next mount.
//! - Tampering: any change to `sealed` fails authentication.
//!
//! What it does not protect against:
//! - root on this host while the host is enrolled: root can read the host
//!   secret (or have the TPM unseal it) and ask the key server for KEKs, as
//!   the mount does;
//! - with the software backend, an attacker who copies both files *and*
//!   reproduces the machine-id (which is not secret). The TPM backend
//!   (`host init --tpm`, `super::tpm`) closes this: the host secret is then
//!   sealed to the TPM (and optionally to PCR values), and the copied file
//!   does not unseal on any other TPM. The machine-id path can be overridden with
//!   `LSVFS_MACHINE_ID_FILE`, which the tests use to simulate a second host;
//!   the override changes the measurement, it grants nothing.
//!
//! Plaintext keys exist only in memory (`Zeroizing`) and the files are
//! written with mode 0600 through a temporary file and an atomic rename.
//! The byte layout is in docs/FORMAT.md ("Sealed store").

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::crypto::WrappedKey;
use crate::crypto::{random_bytes, WRAPPED_LEN};
use crate::keys::{KeysError, Result};

const MAGIC: &[u8; 8] = b"LSVFSSS\0";
/// Version 2 added the rollback records, version 3 several key servers and
/// threshold volumes (shares), version 4 the TPM counter anchor; older
/// versions still open and are saved as version 4.
const VERSION: u32 = 4;
/// magic, version, measurement digest, nonce, plaintext length.
const HEADER: usize = 8 + 4 + 32 + 24 + 4;
const SECRET_FILE: &str = "host-secret";
const SEALED_FILE: &str = "sealed";
/// Default store directory.
pub const DEFAULT_STORE: &str = "/var/lib/lsvfs";
const DEFAULT_MACHINE_ID: &str = "/etc/machine-id";
/// Upper bound on a sealed file (a CA bundle and many volumes fit easily).
const MAX_SEALED: usize = 4 << 20;

/// Most key servers one host or one volume uses (the last-unlock record
/// is a bit mask).
pub const MAX_SERVERS: usize = 8;

/// One volume's data key as this host holds it: `threshold` of `shares`
/// open it. A volume of one key server has threshold 1 and one share with
/// `x == 0`: the whole key, not a Shamir share.
#[derive(Clone)]
pub struct VolumeEntry {
    pub volume_id: [u8; 16],
    pub threshold: u8,
    pub shares: Vec<Share>,
    /// Which shares (bit i: `shares[i]`) the key servers released at the
    /// last unlock; 0 before the first.
    pub answered: u8,
}

/// The part of a volume's key that one key server's KEK opens.
#[derive(Clone)]
pub struct Share {
    /// The key server's URL.
    pub server: String,
    /// Shamir x coordinate, 1..=255; 0: the whole key (threshold 1).
    pub x: u8,
    /// The KEK version it is wrapped under.
    pub kek_version: u32,
    pub wrapped: WrappedKey,
}

impl VolumeEntry {
    /// A volume of one key server: its whole key under one KEK.
    pub fn single(
        volume_id: [u8; 16],
        server: &str,
        kek_version: u32,
        wrapped: WrappedKey,
    ) -> Self {
        VolumeEntry {
            volume_id,
            threshold: 1,
            shares: vec![Share {
                server: server.to_string(),
                x: 0,
                kek_version,
                wrapped,
            }],
            answered: 0,
        }
    }
}

/// The newest checkpoint of a volume this host has seen: a volume whose
/// newest checkpoint is older is an older copy put back (rollback).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeenRecord {
    pub volume_id: [u8; 16],
    pub checkpoint: u64,
}

/// The opened store. `Debug` shows no key material.
pub struct SealedStore {
    dir: PathBuf,
    /// Ed25519 secret key of this host's identity.
    pub identity: Zeroizing<[u8; 32]>,
    /// The key servers this host was set up for (`host init --keyserver`,
    /// in order; at least one).
    pub servers: Vec<String>,
    pub ca_pem: Vec<u8>,
    pub volumes: Vec<VolumeEntry>,
    /// Rollback records, one per volume this host has opened.
    pub seen: Vec<SeenRecord>,
    /// The TPM NV counter's value when this store was last anchored (0
    /// without a counter): an older copy of the store has a lower anchor
    /// than the counter and is refused.
    pub anchor: u64,
    /// The TPM NV counter's index (0: none), here where the host secret
    /// authenticates it; `host-secret.tpm` must name the same.
    pub nv_index: u32,
    /// The store's NV counter and its value, as read when it was opened.
    counter: Option<(u32, u64)>,
    /// The host secret it was opened with, so that saving it again needs
    /// no second TPM unseal.
    secret: Option<Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for SealedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedStore")
            .field("dir", &self.dir)
            .field("servers", &self.servers)
            .field("volumes", &self.volumes.len())
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

fn store_err(dir: &Path, what: impl std::fmt::Display) -> KeysError {
    KeysError::SealedStore(format!("{} ({what})", dir.display()))
}

/// SHA-256 over a label and this host's machine-id.
fn measurement() -> Result<[u8; 32]> {
    let path = std::env::var_os("LSVFS_MACHINE_ID_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MACHINE_ID));
    let id = fs::read(&path).map_err(|e| {
        KeysError::SealedStore(format!(
            "cannot measure this host: reading {}: {e}; run `systemd-machine-id-setup`",
            path.display()
        ))
    })?;
    let mut h = Sha256::new();
    h.update(b"lsvfs v1 host measurement\0");
    h.update(id.trim_ascii());
    Ok(h.finalize().into())
}

fn sealing_key(secret: &[u8; 32], digest: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(digest), secret);
    let mut k = Zeroizing::new([0u8; 32]);
    hk.expand(b"lsvfs v1 sealed store", k.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 length");
    k
}

/// Writes `data` to `dir/name` with mode 0600, atomically and durably.
fn write_private(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let io = |e| KeysError::io(format!("writing {}", dir.join(name).display()), e);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(io)?;
    fs::rename(&tmp, dir.join(name)).map_err(io)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// Where the host secret is kept: a file, or sealed to the TPM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `host-secret`, readable by root only.
    Software,
    /// `host-secret.tpm`, sealed to this host's TPM 2.0, bound to these
    /// PCRs (SHA-256 bank; none: to the TPM alone), the store anchored by
    /// this NV counter (0: none).
    Tpm { pcrs: Vec<u8>, nv_index: u32 },
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Software => write!(f, "software (host secret in a root-only file)"),
            Backend::Tpm { pcrs, nv_index } => {
                write!(f, "TPM 2.0 (host secret sealed to the TPM")?;
                if !pcrs.is_empty() {
                    write!(f, ", bound to PCR {}", super::tpm::pcr_list(pcrs))?;
                }
                match nv_index {
                    0 => write!(
                        f,
                        "; no NV counter, so an older copy of the store is not detected)"
                    ),
                    i => write!(f, "; anchored by NV counter {i:#010x})"),
                }
            }
        }
    }
}

/// The TPM-sealed host secret of the store in `dir`, if it has one.
fn tpm_sealed(dir: &Path) -> Result<Option<super::tpm::TpmSealed>> {
    let path = dir.join(super::tpm::TPM_SECRET_FILE);
    if !path.exists() {
        return Ok(None);
    }
    check_private(&path)?;
    let b = fs::read(&path).map_err(|e| KeysError::io(format!("reading {}", path.display()), e))?;
    super::tpm::TpmSealed::decode(&b)
        .map(Some)
        .ok_or_else(|| store_err(dir, format!("{} is damaged", path.display())))
}

/// The host secret; the buffer it was read into is zeroized too.
/// The host secret: unsealed by the TPM when the store has `tpm` (its
/// `host-secret.tpm`), else read from `host-secret`.
fn read_secret(dir: &Path, tpm: Option<&super::tpm::TpmSealed>) -> Result<Zeroizing<[u8; 32]>> {
    if let Some(t) = tpm {
        return super::tpm::unseal(t);
    }
    let path = dir.join(SECRET_FILE);
    let bytes = Zeroizing::new(
        fs::read(&path).map_err(|e| KeysError::io(format!("reading {}", path.display()), e))?,
    );
    let secret: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| store_err(dir, "the host secret is not 32 bytes"))?;
    Ok(Zeroizing::new(secret))
}

/// Refuses a store directory that another user owns or that group or
/// others can write to: whoever can write it can replace the store.
fn check_dir(dir: &Path) -> Result<()> {
    let md =
        fs::metadata(dir).map_err(|e| KeysError::io(format!("reading {}", dir.display()), e))?;
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me && md.uid() != 0 {
        return Err(KeysError::SealedStore(format!(
            "{} belongs to uid {}, not to uid {me} or root; use a store directory of your own",
            dir.display(),
            md.uid()
        )));
    }
    if md.mode() & 0o022 != 0 {
        return Err(KeysError::SealedStore(format!(
            "{} can be written by group or others, who could replace the store; run `chmod 700 {}`",
            dir.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// Refuses a secret file that group or others can read.
fn check_private(path: &Path) -> Result<()> {
    let md =
        fs::metadata(path).map_err(|e| KeysError::io(format!("reading {}", path.display()), e))?;
    if md.permissions().mode() & 0o077 != 0 {
        return Err(KeysError::SealedStore(format!(
            "{} is accessible to group or others; run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

impl SealedStore {
    /// Creates a new store in `dir` with a fresh host secret and identity.
    /// Refuses to overwrite an existing store.
    /// With `tpm`, the host secret is sealed to this host's TPM, bound to
    /// those PCRs (none: to the TPM alone), instead of kept in a file.
    pub fn init(
        dir: &Path,
        servers: &[String],
        ca_pem: Vec<u8>,
        tpm: Option<&[u8]>,
    ) -> Result<SealedStore> {
        if servers.is_empty() || servers.len() > MAX_SERVERS {
            return Err(store_err(
                dir,
                format!("give 1 to {MAX_SERVERS} key servers, not {}", servers.len()),
            ));
        }
        if [SEALED_FILE, SECRET_FILE, super::tpm::TPM_SECRET_FILE]
            .iter()
            .any(|f| dir.join(f).exists())
        {
            return Err(store_err(
                dir,
                "a sealed store already exists here; remove it first to start over \
                 (its volumes then open only with their recovery keys)",
            ));
        }
        // Measure before writing anything, so a host that cannot be
        // measured is refused without leaving half a store behind.
        measurement()?;
        if !dir.exists() {
            fs::create_dir_all(dir)
                .and_then(|_| fs::set_permissions(dir, fs::Permissions::from_mode(0o700)))
                .map_err(|e| KeysError::io(format!("creating {}", dir.display()), e))?;
        } else if fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none()) {
            // An empty directory made beforehand (by a package, say) is
            // ours to tighten; a directory with other files is not.
            let md = fs::metadata(dir)
                .map_err(|e| KeysError::io(format!("reading {}", dir.display()), e))?;
            if md.uid() == nix::unistd::geteuid().as_raw() && md.mode() & 0o077 != 0 {
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                    .map_err(|e| KeysError::io(format!("tightening {}", dir.display()), e))?;
            }
        }
        check_dir(dir)?;
        let secret = random_bytes::<32>().map_err(|e| store_err(dir, e))?;
        let identity = random_bytes::<32>().map_err(|e| store_err(dir, e))?;
        let mut counter = None;
        let secret_file = match tpm {
            Some(pcrs) => {
                let mut sealed = super::tpm::seal(&secret, pcrs)?;
                counter = super::tpm::nv_counter_create()?;
                sealed.nv_index = counter.map_or(0, |(i, _)| i);
                if let Err(e) = write_private(dir, super::tpm::TPM_SECRET_FILE, &sealed.encode()) {
                    if let Some((i, _)) = counter {
                        let _ = super::tpm::nv_counter_remove(i);
                    }
                    return Err(e);
                }
                super::tpm::TPM_SECRET_FILE
            }
            None => {
                write_private(dir, SECRET_FILE, &secret[..])?;
                SECRET_FILE
            }
        };
        let store = SealedStore {
            dir: dir.to_path_buf(),
            identity,
            servers: servers.to_vec(),
            ca_pem,
            volumes: Vec::new(),
            seen: Vec::new(),
            anchor: counter.map_or(0, |(_, v)| v),
            nv_index: counter.map_or(0, |(i, _)| i),
            counter,
            secret: Some(secret.clone()),
        };
        if let Err(e) = store.save_with(&secret) {
            let _ = fs::remove_file(dir.join(secret_file));
            if let Some((i, _)) = counter {
                let _ = super::tpm::nv_counter_remove(i);
            }
            return Err(e);
        }
        Ok(store)
    }

    /// Changes the store under an exclusive lock: re-reads it, applies `f`,
    /// saves. Concurrent updates (a create beside a mount that rewraps)
    /// never drop each other's entries.
    pub fn update<T>(dir: &Path, f: impl FnOnce(&mut SealedStore) -> Result<T>) -> Result<T> {
        Self::update_if(dir, true, |st| f(st).map(|out| (out, true)))
    }

    /// [`SealedStore::update`], where `f` also says whether it changed
    /// anything: an unchanged store is not written again. With `anchor`
    /// and a TPM counter, the saved store is anchored to the counter's
    /// next value and the counter is then advanced (one NV write: not for
    /// the records a mount makes every minute).
    pub fn update_if<T>(
        dir: &Path,
        anchor: bool,
        f: impl FnOnce(&mut SealedStore) -> Result<(T, bool)>,
    ) -> Result<T> {
        let lock_path = dir.join("lock");
        let lock = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| KeysError::io(format!("opening {}", lock_path.display()), e))?;
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, e)| KeysError::io(format!("locking {}", lock_path.display()), e.into()),
        )?;
        let mut store = SealedStore::open(dir)?;
        let (out, changed) = f(&mut store)?;
        if changed {
            match store.counter.filter(|_| anchor) {
                // The file first, then the counter: a crash between leaves
                // a store ahead of the counter, which still opens.
                Some((index, value)) => {
                    store.anchor = value + 1;
                    store.save()?;
                    // Saved: a store ahead of its counter still opens, so
                    // a counter that did not move is only a warning.
                    if let Err(e) = super::tpm::nv_counter_increment(index) {
                        tracing::warn!(
                            "the sealed store was saved, but its TPM counter did not \
                             advance, so the previous copy of it still opens: {e}"
                        );
                    }
                }
                None => store.save()?,
            }
        }
        Ok(out)
    }

    /// Where this store keeps its host secret.
    pub fn backend(&self) -> Result<Backend> {
        Ok(match tpm_sealed(&self.dir)? {
            Some(t) => Backend::Tpm {
                pcrs: t.pcrs,
                nv_index: t.nv_index,
            },
            None => Backend::Software,
        })
    }

    /// True if `dir` holds a sealed store (whether or not it opens here).
    pub fn exists(dir: &Path) -> bool {
        dir.join(SEALED_FILE).exists()
    }

    /// Opens the store in `dir` on this host.
    pub fn open(dir: &Path) -> Result<SealedStore> {
        let sealed_path = dir.join(SEALED_FILE);
        let secret_path = dir.join(SECRET_FILE);
        if !sealed_path.exists() {
            return Err(KeysError::SealedStore(format!(
                "no sealed store in {}; run `lsvfs host init --keyserver URL --ca FILE` \
                 (or pass --store DIR, or use the volume's recovery key with --key-file)",
                dir.display()
            )));
        }
        check_dir(dir)?;
        if !dir.join(super::tpm::TPM_SECRET_FILE).exists() {
            check_private(&secret_path)?;
        }
        // The counter before the file: a writer saves the file (anchored one
        // above the counter) before it advances the counter, so whichever
        // file is read after this, a current one is never below it.
        let tpm = tpm_sealed(dir)?;
        let index = tpm.as_ref().map_or(0, |t| t.nv_index);
        let counter = match index {
            0 => None,
            i => Some((i, super::tpm::nv_counter_read(i)?)),
        };
        let secret = read_secret(dir, tpm.as_ref())?;
        let b = fs::read(&sealed_path)
            .map_err(|e| KeysError::io(format!("reading {}", sealed_path.display()), e))?;
        let mut store = Self::unseal(dir, &b, &secret, &measurement()?)?;
        if store.nv_index != index {
            return Err(store_err(
                dir,
                format!(
                    "{} names TPM counter {index:#010x} but the store was anchored to \
                     {:#010x}: one of the two files was replaced. Put the store's own files \
                     back, or open volumes with their recovery key (--key-file)",
                    dir.join(super::tpm::TPM_SECRET_FILE).display(),
                    store.nv_index
                ),
            ));
        }
        if let Some((index, value)) = counter {
            if store.anchor < value {
                return Err(store_err(
                    dir,
                    format!(
                        "rollback of the sealed store: it was anchored at {}, but this \
                         host's TPM counter {index:#010x} is at {value}, so this is an older \
                         copy of the store put back (its rollback records are older too). \
                         Put the newest copy back, or open volumes with their recovery key \
                         (--key-file) and set the host up anew",
                        store.anchor
                    ),
                ));
            }
            store.counter = Some((index, value));
        }
        store.secret = Some(secret);
        Ok(store)
    }

    /// Opens the sealed file's bytes `b` with the host secret, on a host
    /// whose measurement is `measured`: untrusted bytes, checked (magic,
    /// version, measurement, AEAD) before they are decoded.
    #[doc(hidden)]
    pub fn unseal(
        dir: &Path,
        b: &[u8],
        secret: &[u8; 32],
        measured: &[u8; 32],
    ) -> Result<SealedStore> {
        if b.len() < HEADER + 16 || b.len() > MAX_SEALED || &b[..8] != MAGIC {
            return Err(store_err(
                dir,
                "the sealed file is not an lsvfs sealed store",
            ));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if !(1..=VERSION).contains(&version) {
            return Err(store_err(
                dir,
                format!("unsupported sealed store version: want={VERSION} have={version}"),
            ));
        }
        let digest: [u8; 32] = b[12..44].try_into().expect("32 bytes");
        if &digest != measured {
            return Err(store_err(
                dir,
                "sealed on another host: this host's measurement (machine-id) differs; \
                 a sealed store opens only on the host that made it. Use the volume's \
                 recovery key (--key-file), or run `lsvfs host init` here",
            ));
        }
        let nonce = XNonce::from_slice(&b[44..68]);
        let key = sealing_key(secret, &digest);
        let plain = XChaCha20Poly1305::new(key.as_ref().into())
            .decrypt(
                nonce,
                Payload {
                    msg: &b[HEADER..],
                    aad: &b[..HEADER],
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| {
                store_err(
                    dir,
                    "the sealed store does not open with this host's secret: it was made \
                     with another host secret, or it was altered",
                )
            })?;
        Self::decode(dir, version, &plain)
            .ok_or_else(|| store_err(dir, "the sealed contents are malformed"))
    }

    /// Decodes the sealed contents of a store of `version` (after the AEAD
    /// opened them).
    #[doc(hidden)]
    pub fn decode(dir: &Path, version: u32, plain: &[u8]) -> Option<SealedStore> {
        let mut r = crate::wire::Reader::new(plain);
        let identity = Zeroizing::new(<[u8; 32]>::try_from(r.take(32)?).ok()?);
        let string = |r: &mut crate::wire::Reader| {
            let n = r.u16()? as usize;
            String::from_utf8(r.take(n)?.to_vec()).ok()
        };
        let servers = if version >= 3 {
            let n = r.u8()? as usize;
            (0..n).map(|_| string(&mut r)).collect::<Option<Vec<_>>>()?
        } else {
            vec![string(&mut r)?]
        };
        if servers.is_empty() || servers.len() > MAX_SERVERS {
            return None;
        }
        let n = r.u32()? as usize;
        let ca_pem = r.take(n)?.to_vec();
        let count = r.u32()?;
        let mut volumes = Vec::new();
        for _ in 0..count {
            let volume_id: [u8; 16] = r.take(16)?.try_into().ok()?;
            if version < 3 {
                let kek_version = r.u32()?;
                let wrapped = WrappedKey(r.take(WRAPPED_LEN)?.try_into().ok()?);
                volumes.push(VolumeEntry::single(
                    volume_id,
                    &servers[0],
                    kek_version,
                    wrapped,
                ));
                continue;
            }
            let threshold = r.u8()?;
            let n = r.u8()? as usize;
            let answered = r.u8()?;
            let mut shares = Vec::with_capacity(n);
            for _ in 0..n {
                shares.push(Share {
                    x: r.u8()?,
                    server: string(&mut r)?,
                    kek_version: r.u32()?,
                    wrapped: WrappedKey(r.take(WRAPPED_LEN)?.try_into().ok()?),
                });
            }
            let whole = n == 1 && threshold == 1 && shares[0].x == 0;
            let split = threshold >= 2
                && n >= threshold as usize
                && n <= MAX_SERVERS
                && shares.iter().all(|s| s.x != 0)
                && shares.iter().enumerate().all(|(i, s)| {
                    shares[..i]
                        .iter()
                        .all(|o| o.x != s.x && o.server != s.server)
                });
            if !(whole || split) || (answered as usize) >> n != 0 {
                return None;
            }
            volumes.push(VolumeEntry {
                volume_id,
                threshold,
                shares,
                answered,
            });
        }
        let mut seen = Vec::new();
        if version >= 2 {
            for _ in 0..r.u32()? {
                seen.push(SeenRecord {
                    volume_id: r.take(16)?.try_into().ok()?,
                    checkpoint: r.u64()?,
                });
            }
        }
        let (anchor, nv_index) = if version >= 4 {
            (r.u64()?, r.u32()?)
        } else {
            (0, 0)
        };
        (r.remaining() == 0).then(|| SealedStore {
            dir: dir.to_path_buf(),
            identity,
            servers,
            ca_pem,
            volumes,
            seen,
            anchor,
            nv_index,
            counter: None,
            secret: None,
        })
    }

    /// Seals the current contents and replaces the file atomically.
    pub fn save(&self) -> Result<()> {
        match &self.secret {
            Some(secret) => self.save_with(secret),
            None => self.save_with(&*read_secret(&self.dir, tpm_sealed(&self.dir)?.as_ref())?),
        }
    }

    fn save_with(&self, secret: &[u8; 32]) -> Result<()> {
        let dir = &self.dir;
        let too_long = |u: &String| u.len() > u16::MAX as usize;
        if self.servers.iter().any(too_long)
            || self.servers.is_empty()
            || self.servers.len() > MAX_SERVERS
            || self.ca_pem.len() > MAX_SEALED / 2
        {
            return Err(store_err(
                dir,
                "the key server URLs or the CA are too large",
            ));
        }
        let put_str = |plain: &mut Vec<u8>, s: &str| {
            plain.extend_from_slice(&(s.len() as u16).to_le_bytes());
            plain.extend_from_slice(s.as_bytes());
        };
        let mut plain = Zeroizing::new(Vec::new());
        plain.extend_from_slice(&self.identity[..]);
        plain.push(self.servers.len() as u8);
        for u in &self.servers {
            put_str(&mut plain, u);
        }
        plain.extend_from_slice(&(self.ca_pem.len() as u32).to_le_bytes());
        plain.extend_from_slice(&self.ca_pem);
        plain.extend_from_slice(&(self.volumes.len() as u32).to_le_bytes());
        for v in &self.volumes {
            if v.shares.len() > MAX_SERVERS || v.shares.iter().any(|s| too_long(&s.server)) {
                return Err(store_err(dir, "a volume has too many key servers"));
            }
            plain.extend_from_slice(&v.volume_id);
            plain.push(v.threshold);
            plain.push(v.shares.len() as u8);
            plain.push(v.answered);
            for s in &v.shares {
                plain.push(s.x);
                put_str(&mut plain, &s.server);
                plain.extend_from_slice(&s.kek_version.to_le_bytes());
                plain.extend_from_slice(&s.wrapped.0);
            }
        }
        plain.extend_from_slice(&(self.seen.len() as u32).to_le_bytes());
        for s in &self.seen {
            plain.extend_from_slice(&s.volume_id);
            plain.extend_from_slice(&s.checkpoint.to_le_bytes());
        }
        plain.extend_from_slice(&self.anchor.to_le_bytes());
        plain.extend_from_slice(&self.nv_index.to_le_bytes());
        let digest = measurement()?;
        let nonce = random_bytes::<24>().map_err(|e| store_err(dir, e))?;
        let mut out = Vec::with_capacity(HEADER + plain.len() + 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&digest);
        out.extend_from_slice(&nonce[..]);
        out.extend_from_slice(&(plain.len() as u32).to_le_bytes());
        let key = sealing_key(secret, &digest);
        let ct = XChaCha20Poly1305::new(key.as_ref().into())
            .encrypt(
                XNonce::from_slice(&nonce[..]),
                Payload {
                    msg: &plain,
                    aad: &out,
                },
            )
            .map_err(|_| store_err(dir, "sealing failed"))?;
        out.extend_from_slice(&ct);
        write_private(dir, SEALED_FILE, &out)
    }

    /// The first key server: the one a volume of one server uses by default.
    pub fn primary(&self) -> &str {
        &self.servers[0]
    }

    pub fn entry(&self, volume_id: &[u8; 16]) -> Option<&VolumeEntry> {
        self.volumes.iter().find(|v| &v.volume_id == volume_id)
    }

    /// Adds or replaces the entry for `e.volume_id`.
    pub fn put(&mut self, e: VolumeEntry) {
        self.volumes.retain(|v| v.volume_id != e.volume_id);
        self.volumes.push(e);
    }

    /// The newest checkpoint of the volume this host has recorded.
    pub fn seen(&self, volume_id: &[u8; 16]) -> Option<u64> {
        self.seen
            .iter()
            .find(|s| &s.volume_id == volume_id)
            .map(|s| s.checkpoint)
    }

    /// Records `checkpoint` as seen for the volume: never lowers the record
    /// unless `reset` (an accepted rollback). True if the record changed.
    pub fn record_seen(&mut self, volume_id: &[u8; 16], checkpoint: u64, reset: bool) -> bool {
        match self.seen.iter_mut().find(|s| &s.volume_id == volume_id) {
            Some(s) if s.checkpoint == checkpoint || (s.checkpoint > checkpoint && !reset) => false,
            Some(s) => {
                s.checkpoint = checkpoint;
                true
            }
            None => {
                self.seen.push(SeenRecord {
                    volume_id: *volume_id,
                    checkpoint,
                });
                true
            }
        }
    }

    /// Drops everything the store holds for the volume (its sealed key and
    /// its rollback record). True if there was anything.
    pub fn forget(&mut self, volume_id: &[u8; 16]) -> bool {
        let before = self.volumes.len() + self.seen.len();
        self.volumes.retain(|v| &v.volume_id != volume_id);
        self.seen.retain(|s| &s.volume_id != volume_id);
        before != self.volumes.len() + self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(url: &str) -> Vec<String> {
        vec![url.to_string()]
    }

    #[test]
    fn several_servers_and_a_threshold_volume_survive_a_save_and_bad_entries_do_not_decode() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("store");
        let urls: Vec<String> = (1..=3).map(|i| format!("https://127.0.0.1:{i}")).collect();
        let mut s = SealedStore::init(&dir, &urls, b"CA".to_vec(), None).unwrap();
        let share = |i: u8| Share {
            server: urls[i as usize - 1].clone(),
            x: i,
            kek_version: i as u32 + 10,
            wrapped: WrappedKey([i; WRAPPED_LEN]),
        };
        s.put(VolumeEntry {
            volume_id: [5; 16],
            threshold: 2,
            shares: vec![share(1), share(2), share(3)],
            answered: 0b101,
        });
        s.save().unwrap();
        let o = SealedStore::open(&dir).unwrap();
        assert_eq!(o.servers, urls);
        let e = o.entry(&[5; 16]).unwrap();
        assert_eq!((e.threshold, e.answered, e.shares.len()), (2, 0b101, 3));
        assert_eq!(e.shares[2].server, urls[2]);
        assert_eq!((e.shares[2].x, e.shares[2].kek_version), (3, 13));
        assert_eq!(e.shares[1].wrapped.0, [2; WRAPPED_LEN]);

        // Entries that cannot be right are refused whole: a threshold above
        // the share count, a repeated x, a whole key beside shares.
        let mut encode = |e: VolumeEntry| {
            s.volumes = vec![e];
            s.save().unwrap();
            SealedStore::open(&dir).map(|_| ())
        };
        let bad = [
            (3u8, vec![share(1), share(2)], 0u8),
            (2, vec![share(1), share(1)], 0),
            (2, vec![share(1), Share { x: 0, ..share(2) }], 0),
            (2, vec![share(1), share(2)], 0b100),
            (2, vec![share(1), Share { x: 2, ..share(1) }], 0),
        ];
        for (threshold, shares, answered) in bad {
            let e = encode(VolumeEntry {
                volume_id: [6; 16],
                threshold,
                shares,
                answered,
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains("malformed"), "{e}");
        }
    }

    #[test]
    fn round_trip_tamper_and_another_host() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("store");
        let mut s =
            SealedStore::init(&dir, &one("https://127.0.0.1:1"), b"CA".to_vec(), None).unwrap();
        s.put(VolumeEntry::single(
            [7; 16],
            "https://127.0.0.1:1",
            3,
            WrappedKey([9; WRAPPED_LEN]),
        ));
        s.save().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join(SECRET_FILE)), 0o600);
        assert_eq!(mode(&dir.join(SEALED_FILE)), 0o600);
        let o = SealedStore::open(&dir).unwrap();
        assert_eq!(o.identity[..], s.identity[..]);
        assert_eq!(o.servers, one("https://127.0.0.1:1"));
        assert_eq!(o.entry(&[7; 16]).unwrap().shares[0].kek_version, 3);
        assert!(!format!("{o:?}").contains(&format!("{:?}", &o.identity[..4])));
        assert!(
            SealedStore::init(&dir, &one("x"), Vec::new(), None).is_err(),
            "no overwrite"
        );

        // Another host secret: the sealed file does not open.
        let other = d.path().join("other");
        SealedStore::init(&other, &one("x"), Vec::new(), None).unwrap();
        fs::copy(dir.join(SEALED_FILE), other.join(SEALED_FILE)).unwrap();
        let e = SealedStore::open(&other).unwrap_err().to_string();
        assert!(e.contains("another host secret"), "{e}");

        // A flipped byte anywhere fails.
        let mut b = fs::read(dir.join(SEALED_FILE)).unwrap();
        let n = b.len();
        b[n - 20] ^= 1;
        fs::write(other.join(SEALED_FILE), &b).unwrap();
        fs::copy(dir.join(SECRET_FILE), other.join(SECRET_FILE)).unwrap();
        assert!(SealedStore::open(&other).is_err());

        // A group-readable host secret is refused.
        fs::set_permissions(dir.join(SECRET_FILE), fs::Permissions::from_mode(0o640)).unwrap();
        let e = SealedStore::open(&dir).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn rollback_records_only_rise_unless_reset_and_survive_a_save() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("store");
        let mut s = SealedStore::init(&dir, &one("https://127.0.0.1:1"), Vec::new(), None).unwrap();
        assert_eq!(s.seen(&[1; 16]), None);
        assert!(s.record_seen(&[1; 16], 7, false));
        assert!(!s.record_seen(&[1; 16], 7, false), "unchanged");
        assert!(!s.record_seen(&[1; 16], 5, false), "never lowered");
        assert!(s.record_seen(&[1; 16], 9, false));
        assert!(s.record_seen(&[2; 16], 3, false));
        s.save().unwrap();
        let mut o = SealedStore::open(&dir).unwrap();
        assert_eq!((o.seen(&[1; 16]), o.seen(&[2; 16])), (Some(9), Some(3)));
        assert!(
            o.record_seen(&[1; 16], 4, true),
            "an accepted rollback resets it"
        );
        assert_eq!(o.seen(&[1; 16]), Some(4));
        o.put(VolumeEntry::single(
            [2; 16],
            "x",
            1,
            WrappedKey([9; WRAPPED_LEN]),
        ));
        assert!(o.forget(&[2; 16]));
        assert!(!o.forget(&[2; 16]));
        assert!(o.entry(&[2; 16]).is_none() && o.seen(&[2; 16]).is_none());
        assert_eq!(o.seen(&[1; 16]), Some(4), "other volumes kept");
    }

    #[test]
    fn the_store_directory_is_private_and_a_writable_one_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let chmod =
            |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();

        // Created by lsvfs: 0700.
        let fresh = d.path().join("fresh");
        SealedStore::init(&fresh, &one("x"), Vec::new(), None).unwrap();
        assert_eq!(mode(&fresh), 0o700);

        // Made empty beforehand with a wide mode (by a package, say): tightened.
        let made = d.path().join("made");
        fs::create_dir(&made).unwrap();
        chmod(&made, 0o755);
        SealedStore::init(&made, &one("x"), Vec::new(), None).unwrap();
        assert_eq!(mode(&made), 0o700);

        // A shared directory with other files in it is not ours to chmod:
        // refused while others can write it, with the command to run.
        let shared = d.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::write(shared.join("unrelated"), b"x").unwrap();
        chmod(&shared, 0o777);
        let e = SealedStore::init(&shared, &one("x"), Vec::new(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chmod 700"), "{e}");
        assert_eq!(mode(&shared), 0o777, "left as it was");
        assert!(!shared.join(SECRET_FILE).exists(), "nothing written");

        // A store whose directory became writable by others is refused
        // at open, before its files are read.
        chmod(&fresh, 0o770);
        let e = SealedStore::open(&fresh).unwrap_err().to_string();
        assert!(e.contains("can be written by group or others"), "{e}");
        chmod(&fresh, 0o700);
        SealedStore::open(&fresh).unwrap();

        // A directory another user owns is refused (when lsvfs runs as
        // root, only root's own; otherwise the user's or root's).
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&fresh, Some(65534), None).unwrap();
            let e = SealedStore::open(&fresh).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 65534"), "{e}");
        }
    }
}
