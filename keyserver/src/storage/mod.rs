//! The key server's state in one redb database: hosts, volumes and their
//! KEKs (encrypted at rest under the master key), the ACL, single-use
//! challenges and the append-only audit log.
//!
//! Every change goes through [`writer`], which group-commits; a caller is
//! answered only after its transaction is durable, so a crash at any moment
//! loses nothing that was acknowledged. Reads use their own snapshots.

pub mod at_rest;
pub mod format;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{
    Database, ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use at_rest::MasterKey;
use at_rest::{AtRest, SEALED_LEN};
use format::{valid_host_name, ChallengeRecord};
pub use format::{AuditRecord, HostRecord, Outcome, VolumeRecord};

use crate::protocol::{
    seal_kek, Challenge, HostId, KekVersion, Op, Refusal, SealedKek, SignedRequest, VolumeId,
};

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "keyserver.redb";

/// Database schema version, stored in `meta`.
pub const SCHEMA_VERSION: u8 = 1;

/// Most outstanding challenges; beyond it `challenge` answers 503 until
/// expired ones are purged.
pub const MAX_CHALLENGES: u64 = 1 << 20;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const HOSTS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("hosts");
const HOST_NAMES: TableDefinition<&str, [u8; 32]> = TableDefinition::new("host_names");
const VOLUMES: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("volumes");
const KEKS: TableDefinition<([u8; 16], u32), &[u8]> = TableDefinition::new("keks");
/// (volume, host) -> the KEK version the host's copy is wrapped under.
const ACL: TableDefinition<([u8; 16], [u8; 32]), u32> = TableDefinition::new("acl");
const CHALLENGES: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("challenges");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Volumes an admin declared compromised (`admin compromise`): volume id ->
/// when (Unix ms). An unlock answer tells the host to rekey; the host's
/// `rekeyed` report clears it.
const COMPROMISED: TableDefinition<[u8; 16], u64> = TableDefinition::new("compromised");

/// What went wrong in the storage layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// redb failed to open, read or write.
    #[error("database: {0}")]
    Db(String),
    /// A record failed validation.
    #[error("corrupted database: {0}")]
    Corrupted(String),
    /// The master key could not be read.
    #[error("master key: {0}")]
    MasterKey(String),
    /// The database was created under another master key.
    #[error("the master key is not the one this database was created with")]
    WrongMasterKey,
    /// A file or the RNG failed.
    #[error("{0}")]
    Io(String),
    /// The writer thread is gone.
    #[error("the database writer has stopped")]
    WriterGone,
    /// The group commit holding this write failed.
    #[error("not committed: {0}")]
    Aborted(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Db(e.to_string())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Why an admin command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum AdminRefusal {
    /// No host has this name or id.
    #[error("no host named or with id {0}")]
    UnknownHost(String),
    /// No such volume.
    #[error("no volume {0}")]
    UnknownVolume(String),
    /// Another host has this name.
    #[error("host name {0} is taken")]
    NameTaken(String),
    /// This public key is already enrolled.
    #[error("host {0} is already enrolled")]
    AlreadyEnrolled(String),
    /// The volume exists.
    #[error("volume {0} already exists")]
    VolumeExists(String),
    /// The host is revoked.
    #[error("host {0} is revoked")]
    HostRevoked(String),
    /// Malformed argument.
    #[error("{0}")]
    Invalid(String),
}

/// Result of a signed request.
#[derive(Debug)]
pub enum SignedOutcome {
    /// `register`/`unlock`: KEKs sealed to the client's key.
    Released {
        /// The version asked for.
        kek: SealedKek,
        /// The newest version, if newer.
        newest: Option<SealedKek>,
        /// The volume was declared compromised: the host must rekey it.
        rekey: bool,
    },
    /// `rekeyed`: whether a compromise mark was cleared.
    Rekeyed {
        /// A mark was there.
        cleared: bool,
    },
    /// `rewrapped`: the recorded version and the versions retired.
    Rewrapped {
        /// Version now recorded for the host.
        wrapped: KekVersion,
        /// Versions deleted.
        retired: Vec<KekVersion>,
    },
    /// `erase`: the KEK versions destroyed.
    Erased {
        /// Versions deleted.
        destroyed: Vec<KekVersion>,
    },
    /// Refused; already audited.
    Refused(Refusal, String),
}

/// A host, for `list-hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Host id, hex.
    pub id: String,
    /// Name.
    pub name: String,
    /// Enrollment time, Unix ms.
    pub enrolled_ms: u64,
    /// Revocation time, Unix ms.
    pub revoked_ms: Option<u64>,
}

/// A host on a volume's ACL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Host id, hex.
    pub host: String,
    /// Host name.
    pub name: String,
    /// KEK version its copy is wrapped under.
    pub wrapped_version: u32,
    /// The host is revoked (it no longer holds back retirement).
    pub revoked: bool,
}

/// A volume, for `list-volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Volume id, hex.
    pub id: String,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// KEK versions held, ascending.
    pub versions: Vec<u32>,
    /// Authorized hosts.
    pub holders: Vec<Holder>,
}

/// An audit entry, for `audit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditInfo {
    /// Sequence number.
    pub seq: u64,
    /// Unix ms.
    pub time_ms: u64,
    /// Host id, hex.
    pub host: Option<String>,
    /// Volume id, hex.
    pub volume: Option<String>,
    /// KEK version (0 = none).
    pub version: u32,
    /// Action.
    pub action: String,
    /// `ok` or `refused`.
    pub outcome: String,
    /// Reason or detail.
    pub reason: String,
}

/// Filter for [`Store::audit`].
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this host.
    pub host: Option<HostId>,
    /// Only this volume.
    pub volume: Option<VolumeId>,
    /// At most this many of the newest matching entries.
    pub limit: usize,
}

/// Current time, Unix ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn random<const N: usize>() -> Result<[u8; N], StorageError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| StorageError::Io(format!("getrandom: {e}")))?;
    Ok(b)
}

/// Every table, opened once per job (redb lets a transaction hold a table
/// open only once).
struct Tables<'t> {
    hosts: Table<'t, [u8; 32], &'static [u8]>,
    names: Table<'t, &'static str, [u8; 32]>,
    volumes: Table<'t, [u8; 16], &'static [u8]>,
    keks: Table<'t, ([u8; 16], u32), &'static [u8]>,
    acl: Table<'t, ([u8; 16], [u8; 32]), u32>,
    challenges: Table<'t, [u8; 32], &'static [u8]>,
    audit: Table<'t, u64, &'static [u8]>,
    compromised: Table<'t, [u8; 16], u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Tables<'t>, StorageError> {
        Ok(Tables {
            hosts: txn.open_table(HOSTS)?,
            names: txn.open_table(HOST_NAMES)?,
            volumes: txn.open_table(VOLUMES)?,
            keks: txn.open_table(KEKS)?,
            acl: txn.open_table(ACL)?,
            challenges: txn.open_table(CHALLENGES)?,
            audit: txn.open_table(AUDIT)?,
            compromised: txn.open_table(COMPROMISED)?,
        })
    }

    fn host(&self, id: HostId) -> Result<Option<HostRecord>, StorageError> {
        self.hosts
            .get(&id.0)?
            .map(|g| HostRecord::decode(g.value()))
            .transpose()
    }

    fn volume(&self, id: VolumeId) -> Result<Option<VolumeRecord>, StorageError> {
        self.volumes
            .get(&id.0)?
            .map(|g| VolumeRecord::decode(g.value()))
            .transpose()
    }

    /// Resolves HOST given as a name or a host id.
    fn resolve(&self, host: &str) -> Result<Option<(HostId, HostRecord)>, StorageError> {
        let id = match HostId::from_hex(host) {
            Ok(id) => id,
            Err(_) => match self.names.get(host)? {
                Some(g) => HostId(g.value()),
                None => return Ok(None),
            },
        };
        Ok(self.host(id)?.map(|r| (id, r)))
    }

    fn append_audit(&mut self, rec: &AuditRecord) -> Result<(), StorageError> {
        let seq = self.audit.last()?.map_or(0, |(k, _)| k.value() + 1);
        self.audit.insert(seq, rec.encode().as_slice())?;
        Ok(())
    }

    fn put_kek(
        &mut self,
        at_rest: &AtRest,
        volume: VolumeId,
        version: KekVersion,
        kek: &[u8; 32],
    ) -> Result<(), StorageError> {
        let sealed = at_rest.seal_kek(volume, version, kek)?;
        self.keks.insert((volume.0, version.0), sealed.as_slice())?;
        Ok(())
    }

    fn kek_versions(&self, volume: VolumeId) -> Result<Vec<u32>, StorageError> {
        let mut out = vec![];
        for item in self.keks.range((volume.0, 0)..=(volume.0, u32::MAX))? {
            out.push(item?.0.value().1);
        }
        Ok(out)
    }

    /// Crypto-erase: deletes every KEK of the volume, its ACL and its
    /// record. Returns the versions deleted.
    /// Adds KEK version n+1 to a volume (a new random KEK); returns it.
    fn add_kek(
        &mut self,
        at_rest: &AtRest,
        volume: VolumeId,
    ) -> Result<Result<KekVersion, AdminRefusal>, StorageError> {
        let Some(mut vol) = self.volume(volume)? else {
            return Ok(Err(AdminRefusal::UnknownVolume(volume.to_hex())));
        };
        let Some(next) = vol.newest.next() else {
            return Ok(Err(AdminRefusal::Invalid("KEK versions exhausted".into())));
        };
        self.put_kek(at_rest, volume, next, &*new_kek()?)?;
        vol.newest = next;
        self.volumes.insert(&volume.0, vol.encode().as_slice())?;
        Ok(Ok(next))
    }

    fn erase_volume(&mut self, volume: VolumeId) -> Result<Vec<KekVersion>, StorageError> {
        let versions = self.kek_versions(volume)?;
        for v in &versions {
            self.keks.remove((volume.0, *v))?;
        }
        let mut holders = vec![];
        for item in self
            .acl
            .range((volume.0, [0; 32])..=(volume.0, [0xff; 32]))?
        {
            holders.push(item?.0.value().1);
        }
        for h in holders {
            self.acl.remove((volume.0, h))?;
        }
        self.volumes.remove(&volume.0)?;
        self.compromised.remove(&volume.0)?;
        Ok(versions.into_iter().map(KekVersion).collect())
    }

    /// Deletes the versions older than every active holder's wrapped version
    /// (never the newest). With no active holder nothing is deleted.
    fn retire(&mut self, volume: VolumeId) -> Result<Vec<KekVersion>, StorageError> {
        let Some(vol) = self.volume(volume)? else {
            return Ok(vec![]);
        };
        let mut holders = vec![];
        for item in self
            .acl
            .range((volume.0, [0; 32])..=(volume.0, [0xff; 32]))?
        {
            let (k, v) = item?;
            holders.push((HostId(k.value().1), v.value()));
        }
        let mut min: Option<u32> = None;
        for (host, wrapped) in holders {
            let active = self.host(host)?.is_some_and(|h| h.revoked_ms.is_none());
            if active {
                min = Some(min.map_or(wrapped, |m| m.min(wrapped)));
            }
        }
        let Some(min) = min else {
            return Ok(vec![]);
        };
        let keep_from = min.min(vol.newest.0);
        let old: Vec<u32> = self
            .kek_versions(volume)?
            .into_iter()
            .filter(|&v| v < keep_from)
            .collect();
        for &v in &old {
            self.keks.remove((volume.0, v))?;
        }
        Ok(old.into_iter().map(KekVersion).collect())
    }

    fn seal(
        &self,
        at_rest: &AtRest,
        req: &SignedRequest,
        version: KekVersion,
    ) -> Result<Sealed, StorageError> {
        let Some(blob) = self.keks.get((req.volume.0, version.0))? else {
            return Ok(Sealed::Missing);
        };
        let kek = at_rest.open_kek(req.volume, version, blob.value())?;
        Ok(
            match seal_kek(
                &req.client_key,
                req.host,
                req.challenge,
                req.volume,
                version,
                &kek,
            ) {
                Ok(s) => Sealed::Kek(s),
                // A low-order client key; the client's fault, so a refusal,
                // never an error that would abort the other jobs in the batch.
                Err(_) => Sealed::BadClientKey,
            },
        )
    }
}

/// Result of sealing a stored KEK to a client.
enum Sealed {
    Kek(SealedKek),
    Missing,
    BadClientKey,
}

/// The open database.
pub struct Store {
    // Declared first so it is dropped (and joined) before `db`.
    writer: writer::Writer,
    db: Arc<Database>,
    at_rest: Arc<AtRest>,
}

impl Store {
    /// Opens (or creates) the database in `state_dir` and checks that it
    /// belongs to `master`.
    pub fn open(state_dir: &Path, master: &MasterKey) -> Result<Store, StorageError> {
        let path = state_dir.join(DB_FILE);
        let db = Arc::new(
            Database::create(&path)
                .map_err(|e| StorageError::Db(format!("{}: {e}", path.display())))?,
        );
        let at_rest = Arc::new(AtRest::new(master));
        let txn = db.begin_write()?;
        {
            let _ = Tables::open(&txn)?;
            let mut meta = txn.open_table(META)?;
            let schema = meta.get("schema")?.map(|g| g.value().to_vec());
            match schema {
                None => {
                    meta.insert("schema", [SCHEMA_VERSION].as_slice())?;
                    meta.insert("master_check", at_rest.check_value()?.as_slice())?;
                }
                Some(v) if v == [SCHEMA_VERSION] => {
                    let check = meta.get("master_check")?.map(|g| g.value().to_vec());
                    if !check.is_some_and(|c| at_rest.verify_check(&c)) {
                        return Err(StorageError::WrongMasterKey);
                    }
                }
                Some(v) => {
                    return Err(StorageError::Corrupted(format!(
                        "schema want={SCHEMA_VERSION} have={v:?}"
                    )))
                }
            }
        }
        txn.commit()?;
        let writer = writer::Writer::start(db.clone())?;
        Ok(Store {
            db,
            writer,
            at_rest,
        })
    }

    /// Issues a challenge for `host`; `None` when too many are outstanding.
    /// Challenges are issued for any well-formed host id, enrolled or not,
    /// so this call reveals nothing about enrollment.
    pub async fn issue_challenge(
        &self,
        host: HostId,
        lifetime: Duration,
    ) -> Result<Option<(Challenge, u64)>, StorageError> {
        let challenge = Challenge(random::<32>()?);
        let expires_ms = now_ms().saturating_add(lifetime.as_millis() as u64);
        self.writer
            .write(false, move |txn| {
                let mut t = txn.open_table(CHALLENGES)?;
                if t.len()? >= MAX_CHALLENGES {
                    return Ok(None);
                }
                let rec = ChallengeRecord {
                    host,
                    expires_ms,
                    used: false,
                };
                t.insert(&challenge.0, rec.encode().as_slice())?;
                Ok(Some((challenge, expires_ms)))
            })
            .await
    }

    /// Deletes expired challenges; returns how many.
    pub async fn purge_challenges(&self) -> Result<u64, StorageError> {
        self.writer
            .write(false, |txn| {
                let now = now_ms();
                let mut t = txn.open_table(CHALLENGES)?;
                let before = t.len()?;
                t.retain(|_, v| ChallengeRecord::decode(v).is_ok_and(|c| c.expires_ms >= now))?;
                Ok(before - t.len()?)
            })
            .await
    }

    /// Runs a signed request: consumes its challenge, then checks the
    /// signature, enrollment, revocation, the ACL and the version, and
    /// writes the audit entry, all in one transaction. `signature_ok` is the
    /// result of [`SignedRequest::verify`], computed by the caller outside
    /// the writer.
    pub async fn signed(
        &self,
        req: SignedRequest,
        signature_ok: bool,
    ) -> Result<SignedOutcome, StorageError> {
        let at_rest = self.at_rest.clone();
        self.writer
            .write(true, move |txn| {
                let mut t = Tables::open(txn)?;
                let now = now_ms();
                let outcome = signed_job(&mut t, &at_rest, &req, signature_ok, now)?;
                let (result, reason) = match &outcome {
                    SignedOutcome::Released { kek, newest, rekey } => (
                        Outcome::Ok,
                        format!(
                            "{}{}",
                            match newest {
                                Some(n) =>
                                    format!("released {} and newest {}", kek.version, n.version),
                                None => format!("released {}", kek.version),
                            },
                            if *rekey {
                                "; the volume is marked compromised: rekey asked"
                            } else {
                                ""
                            }
                        ),
                    ),
                    SignedOutcome::Rekeyed { cleared } => (
                        Outcome::Ok,
                        if *cleared {
                            "rekeyed; the compromise mark is cleared".to_string()
                        } else {
                            "rekeyed (the volume was not marked)".to_string()
                        },
                    ),
                    SignedOutcome::Rewrapped { wrapped, retired } => (
                        Outcome::Ok,
                        format!("wrapped under {wrapped}; retired {retired:?}"),
                    ),
                    SignedOutcome::Erased { destroyed } => (
                        Outcome::Ok,
                        format!("volume erased; destroyed KEKs {destroyed:?}"),
                    ),
                    SignedOutcome::Refused(r, m) => (Outcome::Refused, format!("{r}: {m}")),
                };
                t.append_audit(&AuditRecord {
                    time_ms: now,
                    host: Some(req.host),
                    volume: Some(req.volume),
                    version: req.version.0,
                    action: req.op.name().to_string(),
                    outcome: result,
                    reason,
                })?;
                Ok(outcome)
            })
            .await
    }

    /// Runs an admin change in one durable transaction, auditing it when it
    /// succeeds.
    async fn admin<T: Send + 'static>(
        &self,
        f: impl FnOnce(
                &mut Tables,
                &AtRest,
                u64,
            ) -> Result<Result<(T, AuditRecord), AdminRefusal>, StorageError>
            + Send
            + 'static,
    ) -> Result<Result<T, AdminRefusal>, StorageError> {
        let at_rest = self.at_rest.clone();
        self.writer
            .write(true, move |txn| {
                let mut t = Tables::open(txn)?;
                let now = now_ms();
                Ok(match f(&mut t, &at_rest, now)? {
                    Ok((v, audit)) => {
                        t.append_audit(&audit)?;
                        Ok(v)
                    }
                    Err(r) => Err(r),
                })
            })
            .await
    }

    /// Enrolls a host under `name`.
    pub async fn enroll(
        &self,
        name: String,
        host: HostId,
    ) -> Result<Result<(), AdminRefusal>, StorageError> {
        if !valid_host_name(&name) {
            return Ok(Err(AdminRefusal::Invalid(format!(
                "bad host name {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ -"
            ))));
        }
        if ed25519_dalek::VerifyingKey::from_bytes(&host.0).is_err() {
            return Ok(Err(AdminRefusal::Invalid(format!(
                "{host} is not an Ed25519 public key"
            ))));
        }
        self.admin(move |t, _, now| {
            if t.host(host)?.is_some() {
                return Ok(Err(AdminRefusal::AlreadyEnrolled(host.to_hex())));
            }
            if t.names.get(name.as_str())?.is_some() {
                return Ok(Err(AdminRefusal::NameTaken(name)));
            }
            let rec = HostRecord {
                name: name.clone(),
                enrolled_ms: now,
                revoked_ms: None,
            };
            t.hosts.insert(&host.0, rec.encode().as_slice())?;
            t.names.insert(name.as_str(), &host.0)?;
            Ok(Ok((
                (),
                admin_audit(now, Some(host), None, 0, "enroll", format!("name {name}")),
            )))
        })
        .await
    }

    /// Revokes a host; effective for the next request.
    pub async fn revoke(&self, host: String) -> Result<Result<(), AdminRefusal>, StorageError> {
        self.admin(move |t, _, now| {
            let Some((id, mut rec)) = t.resolve(&host)? else {
                return Ok(Err(AdminRefusal::UnknownHost(host)));
            };
            if rec.revoked_ms.is_none() {
                rec.revoked_ms = Some(now);
                t.hosts.insert(&id.0, rec.encode().as_slice())?;
            }
            // A revoked host no longer holds back retirement.
            let mut volumes = vec![];
            for item in t.acl.iter()? {
                let (k, _) = item?;
                let (v, h) = k.value();
                if h == id.0 {
                    volumes.push(VolumeId(v));
                }
            }
            for v in volumes {
                t.retire(v)?;
            }
            Ok(Ok((
                (),
                admin_audit(
                    now,
                    Some(id),
                    None,
                    0,
                    "revoke",
                    format!("name {}", rec.name),
                ),
            )))
        })
        .await
    }

    /// Creates a volume with KEK v1 and no authorized host.
    pub async fn create_volume(
        &self,
        volume: VolumeId,
    ) -> Result<Result<(), AdminRefusal>, StorageError> {
        self.admin(move |t, at_rest, now| {
            if t.volume(volume)?.is_some() {
                return Ok(Err(AdminRefusal::VolumeExists(volume.to_hex())));
            }
            create_volume(t, at_rest, volume, now, &*new_kek()?)?;
            Ok(Ok((
                (),
                admin_audit(now, None, Some(volume), 1, "create-volume", String::new()),
            )))
        })
        .await
    }

    /// Authorizes a host for a volume. Its copy is assumed wrapped under the
    /// newest version until it reports otherwise.
    pub async fn authorize(
        &self,
        host: String,
        volume: VolumeId,
    ) -> Result<Result<(), AdminRefusal>, StorageError> {
        self.admin(move |t, _, now| {
            let Some((id, rec)) = t.resolve(&host)? else {
                return Ok(Err(AdminRefusal::UnknownHost(host)));
            };
            if rec.revoked_ms.is_some() {
                return Ok(Err(AdminRefusal::HostRevoked(host)));
            }
            let Some(vol) = t.volume(volume)? else {
                return Ok(Err(AdminRefusal::UnknownVolume(volume.to_hex())));
            };
            if t.acl.get((volume.0, id.0))?.is_none() {
                t.acl.insert((volume.0, id.0), vol.newest.0)?;
            }
            Ok(Ok((
                (),
                admin_audit(now, Some(id), Some(volume), 0, "authorize", String::new()),
            )))
        })
        .await
    }

    /// Removes a host from a volume's ACL.
    pub async fn deauthorize(
        &self,
        host: String,
        volume: VolumeId,
    ) -> Result<Result<(), AdminRefusal>, StorageError> {
        self.admin(move |t, _, now| {
            let Some((id, _)) = t.resolve(&host)? else {
                return Ok(Err(AdminRefusal::UnknownHost(host)));
            };
            if t.volume(volume)?.is_none() {
                return Ok(Err(AdminRefusal::UnknownVolume(volume.to_hex())));
            }
            t.acl.remove((volume.0, id.0))?;
            let retired = t.retire(volume)?;
            Ok(Ok((
                (),
                admin_audit(
                    now,
                    Some(id),
                    Some(volume),
                    0,
                    "deauthorize",
                    format!("retired {retired:?}"),
                ),
            )))
        })
        .await
    }

    /// Adds KEK version n+1 to a volume; returns it.
    pub async fn rotate_kek(
        &self,
        volume: VolumeId,
    ) -> Result<Result<KekVersion, AdminRefusal>, StorageError> {
        self.admin(move |t, at_rest, now| {
            let next = match t.add_kek(at_rest, volume)? {
                Ok(n) => n,
                Err(r) => return Ok(Err(r)),
            };
            Ok(Ok((
                next,
                admin_audit(now, None, Some(volume), next.0, "rotate-kek", String::new()),
            )))
        })
        .await
    }

    /// Declares a volume compromised: adds KEK version n+1 (so hosts rewrap
    /// at their next unlock) and marks the volume, so that every unlock
    /// answer asks the host to rekey its data until a host reports that it
    /// has (`rekeyed`). Returns the new KEK version.
    pub async fn compromise(
        &self,
        volume: VolumeId,
    ) -> Result<Result<KekVersion, AdminRefusal>, StorageError> {
        self.admin(move |t, at_rest, now| {
            let next = match t.add_kek(at_rest, volume)? {
                Ok(n) => n,
                Err(r) => return Ok(Err(r)),
            };
            t.compromised.insert(&volume.0, now)?;
            Ok(Ok((
                next,
                admin_audit(
                    now,
                    None,
                    Some(volume),
                    next.0,
                    "compromise",
                    "KEK rotated; hosts are asked to rewrap and rekey at their next unlock".into(),
                ),
            )))
        })
        .await
    }

    /// Whether a volume is marked compromised (not yet reported rekeyed).
    pub fn is_compromised(&self, volume: VolumeId) -> Result<bool, StorageError> {
        let r = self.db.begin_read()?;
        match r.open_table(COMPROMISED) {
            Ok(t) => Ok(t.get(&volume.0)?.is_some()),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Crypto-erases a volume: every KEK, its ACL and its record.
    pub async fn erase_volume(
        &self,
        volume: VolumeId,
    ) -> Result<Result<Vec<KekVersion>, AdminRefusal>, StorageError> {
        self.admin(move |t, _, now| {
            if t.volume(volume)?.is_none() {
                return Ok(Err(AdminRefusal::UnknownVolume(volume.to_hex())));
            }
            let destroyed = t.erase_volume(volume)?;
            let reason = format!("destroyed KEKs {destroyed:?}");
            Ok(Ok((
                destroyed,
                admin_audit(now, None, Some(volume), 0, "erase-volume", reason),
            )))
        })
        .await
    }

    /// Every host, ordered by name.
    pub fn list_hosts(&self) -> Result<Vec<HostInfo>, StorageError> {
        let r = self.db.begin_read()?;
        let names = r.open_table(HOST_NAMES)?;
        let hosts = r.open_table(HOSTS)?;
        let mut out = vec![];
        for item in names.iter()? {
            let (_, id) = item?;
            let id = id.value();
            let Some(rec) = hosts.get(&id)? else {
                return Err(StorageError::Corrupted("host name without host".into()));
            };
            let rec = HostRecord::decode(rec.value())?;
            out.push(HostInfo {
                id: hex::encode(id),
                name: rec.name,
                enrolled_ms: rec.enrolled_ms,
                revoked_ms: rec.revoked_ms,
            });
        }
        Ok(out)
    }

    /// Every volume with its KEK versions and holders.
    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>, StorageError> {
        let r = self.db.begin_read()?;
        let volumes = r.open_table(VOLUMES)?;
        let keks = r.open_table(KEKS)?;
        let acl = r.open_table(ACL)?;
        let hosts = r.open_table(HOSTS)?;
        let mut out = vec![];
        for item in volumes.iter()? {
            let (id, rec) = item?;
            let id = id.value();
            let rec = VolumeRecord::decode(rec.value())?;
            let mut versions = vec![];
            for k in keks.range((id, 0)..=(id, u32::MAX))? {
                versions.push(k?.0.value().1);
            }
            let mut holders = vec![];
            for a in acl.range((id, [0; 32])..=(id, [0xff; 32]))? {
                let (k, wrapped) = a?;
                let host = k.value().1;
                let h = match hosts.get(&host)? {
                    Some(g) => HostRecord::decode(g.value())?,
                    None => return Err(StorageError::Corrupted("ACL names no host".into())),
                };
                holders.push(Holder {
                    host: hex::encode(host),
                    name: h.name,
                    wrapped_version: wrapped.value(),
                    revoked: h.revoked_ms.is_some(),
                });
            }
            out.push(VolumeInfo {
                id: hex::encode(id),
                created_ms: rec.created_ms,
                versions,
                holders,
            });
        }
        Ok(out)
    }

    /// Resolves HOST (a name or an id) for filters.
    pub fn resolve_host(&self, host: &str) -> Result<Option<HostId>, StorageError> {
        if let Ok(id) = HostId::from_hex(host) {
            return Ok(Some(id));
        }
        let r = self.db.begin_read()?;
        let names = r.open_table(HOST_NAMES)?;
        Ok(names.get(host)?.map(|g| HostId(g.value())))
    }

    /// The newest `filter.limit` matching audit entries, oldest first.
    pub fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditInfo>, StorageError> {
        let r = self.db.begin_read()?;
        let audit = r.open_table(AUDIT)?;
        let mut out = vec![];
        for item in audit.iter()?.rev() {
            if out.len() >= filter.limit {
                break;
            }
            let (seq, rec) = item?;
            let rec = AuditRecord::decode(rec.value())?;
            if filter.host.is_some_and(|h| rec.host != Some(h))
                || filter.volume.is_some_and(|v| rec.volume != Some(v))
            {
                continue;
            }
            out.push(AuditInfo {
                seq: seq.value(),
                time_ms: rec.time_ms,
                host: rec.host.map(|h| h.to_hex()),
                volume: rec.volume.map(|v| v.to_hex()),
                version: rec.version,
                action: rec.action,
                outcome: match rec.outcome {
                    Outcome::Ok => "ok".into(),
                    Outcome::Refused => "refused".into(),
                },
                reason: rec.reason,
            });
        }
        out.reverse();
        Ok(out)
    }
}

fn admin_audit(
    now: u64,
    host: Option<HostId>,
    volume: Option<VolumeId>,
    version: u32,
    action: &str,
    reason: String,
) -> AuditRecord {
    AuditRecord {
        time_ms: now,
        host,
        volume,
        version,
        action: action.to_string(),
        outcome: Outcome::Ok,
        reason,
    }
}

fn new_kek() -> Result<Zeroizing<[u8; 32]>, StorageError> {
    Ok(Zeroizing::new(random::<32>()?))
}

fn create_volume(
    t: &mut Tables,
    at_rest: &AtRest,
    volume: VolumeId,
    now: u64,
    kek: &[u8; 32],
) -> Result<(), StorageError> {
    let rec = VolumeRecord {
        created_ms: now,
        newest: KekVersion::FIRST,
    };
    t.volumes.insert(&volume.0, rec.encode().as_slice())?;
    t.put_kek(at_rest, volume, KekVersion::FIRST, kek)
}

/// The checks of a signed request, in order; see [`Store::signed`].
fn signed_job(
    t: &mut Tables,
    at_rest: &AtRest,
    req: &SignedRequest,
    signature_ok: bool,
    now: u64,
) -> Result<SignedOutcome, StorageError> {
    let refuse = |r: Refusal, m: String| Ok(SignedOutcome::Refused(r, m));
    let rec = t
        .challenges
        .get(&req.challenge.0)?
        .map(|g| ChallengeRecord::decode(g.value()))
        .transpose()?;
    match rec {
        // A challenge issued to another host is treated as unknown and left
        // alone, so nobody can burn another host's challenge.
        None => return refuse(Refusal::ChallengeExpired, "unknown challenge".into()),
        Some(c) if c.host != req.host => {
            return refuse(Refusal::ChallengeExpired, "unknown challenge".into())
        }
        Some(c) if c.used => {
            return refuse(Refusal::ChallengeReplayed, "challenge already used".into())
        }
        Some(c) if c.expires_ms < now => {
            t.challenges.remove(&req.challenge.0)?;
            return refuse(Refusal::ChallengeExpired, "challenge expired".into());
        }
        Some(mut c) => {
            c.used = true;
            t.challenges
                .insert(&req.challenge.0, c.encode().as_slice())?;
        }
    }
    if !signature_ok {
        return refuse(
            Refusal::BadSignature,
            "signature does not verify under the host id".into(),
        );
    }
    let host = match t.host(req.host)? {
        None => return refuse(Refusal::NotEnrolled, "host is not enrolled".into()),
        Some(h) if h.revoked_ms.is_some() => {
            return refuse(Refusal::Revoked, format!("host {} was revoked", h.name))
        }
        Some(h) => h,
    };
    let bad_key = || {
        refuse(
            Refusal::BadRequest,
            "client_key is not a usable X25519 public key".into(),
        )
    };
    if req.op == Op::Register {
        if t.volume(req.volume)?.is_some() {
            return refuse(
                Refusal::VolumeExists,
                format!("volume {} already exists", req.volume),
            );
        }
        // Seal first: an unusable client key is refused before anything
        // is written.
        let kek = new_kek()?;
        let Ok(sealed) = seal_kek(
            &req.client_key,
            req.host,
            req.challenge,
            req.volume,
            KekVersion::FIRST,
            &kek,
        ) else {
            return bad_key();
        };
        create_volume(t, at_rest, req.volume, now, &kek)?;
        t.acl
            .insert((req.volume.0, req.host.0), KekVersion::FIRST.0)?;
        return Ok(SignedOutcome::Released {
            kek: sealed,
            newest: None,
            rekey: false,
        });
    }
    let Some(vol) = t.volume(req.volume)? else {
        return refuse(Refusal::UnknownVolume, format!("no volume {}", req.volume));
    };
    let Some(wrapped) = t.acl.get((req.volume.0, req.host.0))?.map(|g| g.value()) else {
        return refuse(
            Refusal::NotAuthorized,
            format!(
                "host {} is not authorized for volume {}",
                host.name, req.volume
            ),
        );
    };
    if req.op == Op::Erase {
        let destroyed = t.erase_volume(req.volume)?;
        return Ok(SignedOutcome::Erased { destroyed });
    }
    if req.op == Op::Rekeyed {
        let cleared = t.compromised.remove(&req.volume.0)?.is_some();
        return Ok(SignedOutcome::Rekeyed { cleared });
    }
    if t.keks.get((req.volume.0, req.version.0))?.is_none() {
        return refuse(
            Refusal::UnknownVersion,
            format!("volume {} has no KEK {}", req.volume, req.version),
        );
    }
    if req.op == Op::Rewrapped {
        let recorded = KekVersion(wrapped.max(req.version.0));
        t.acl.insert((req.volume.0, req.host.0), recorded.0)?;
        let retired = t.retire(req.volume)?;
        return Ok(SignedOutcome::Rewrapped {
            wrapped: recorded,
            retired,
        });
    }
    let kek = match t.seal(at_rest, req, req.version)? {
        Sealed::Kek(k) => k,
        Sealed::BadClientKey => return bad_key(),
        Sealed::Missing => return Err(StorageError::Corrupted("KEK vanished".into())),
    };
    let newest = if vol.newest > req.version {
        match t.seal(at_rest, req, vol.newest)? {
            Sealed::Kek(k) => Some(k),
            Sealed::BadClientKey => return bad_key(),
            Sealed::Missing => {
                return Err(StorageError::Corrupted(format!(
                    "volume {} lost its newest KEK",
                    req.volume
                )))
            }
        }
    } else {
        None
    };
    let rekey = t.compromised.get(&req.volume.0)?.is_some();
    Ok(SignedOutcome::Released { kek, newest, rekey })
}

const _: () = assert!(SEALED_LEN == 73);

#[cfg(test)]
mod tests;
