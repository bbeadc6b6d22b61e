//! The TPM 2.0 backend of the sealed store (`lsvfs host init --tpm`): the
//! host secret is sealed to the TPM as a keyed-hash data object under the
//! owner hierarchy's storage primary key, optionally bound to PCR values
//! (a PolicyPCR policy), through the `tss-esapi` binding. The file
//! `host-secret.tpm` then holds only the object's public and private
//! (TPM-encrypted) parts: copied to another machine, or with the PCRs
//! changed, it does not unseal. Byte layout: docs/FORMAT.md, "TPM-sealed
//! host secret".
//!
//! Every exchange runs in a session salted with the primary key, with
//! parameter encryption, so the secret does not cross the bus in clear.
//! Which TPM: `$LSVFS_TPM_TCTI` (for example `swtpm:host=127.0.0.1,port=2321`),
//! else `$TCTI` or `$TPM2TOOLS_TCTI`, else `device:/dev/tpmrm0`.

use std::str::FromStr;

use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::{
    NvIndexAttributesBuilder, ObjectAttributesBuilder, SessionAttributesBuilder,
};
use tss_esapi::constants::nv_index_type::NvIndexType;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Digest, EccPoint, KeyedHashScheme, NvPublicBuilder, PcrSelectionList, PcrSelectionListBuilder,
    PcrSlot, Private, Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters,
    SensitiveData, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::{Context, TctiNameConf};
use zeroize::Zeroizing;

use crate::keys::{KeysError, Result};

/// The file in the store directory that replaces `host-secret`.
pub const TPM_SECRET_FILE: &str = "host-secret.tpm";
const MAGIC: &[u8; 8] = b"LSVFSTPM";
const VERSION: u32 = 1;
const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// A host secret sealed to the TPM, as stored.
pub struct TpmSealed {
    /// PCR indexes (SHA-256 bank) the secret is bound to; empty: none.
    pub pcrs: Vec<u8>,
    /// SHA-256 over those PCRs' values at sealing (the PolicyPCR digest).
    pub pcr_digest: [u8; 32],
    /// The NV counter index that anchors the sealed store against being
    /// put back (0: none; the owner hierarchy refused one).
    pub nv_index: u32,
    public: Vec<u8>,
    private: Vec<u8>,
}

fn tpm_err(what: &str, e: impl std::fmt::Display) -> KeysError {
    KeysError::SealedStore(format!("TPM: {what}: {e}"))
}

/// Held while lsvfs talks to the TPM: a TPM without a resource manager
/// (swtpm, or /dev/tpm0) has room for only a few objects and sessions,
/// and two lsvfs processes (a mount and its daemon) would take each
/// other's. The kernel's /dev/tpmrm0 does not need it; it costs nothing.
type TpmLock = Option<nix::fcntl::Flock<std::fs::File>>;

/// In a directory only root can write (a lock anyone can take would let
/// anyone stall the mounts); without root there is none.
fn tpm_lock() -> TpmLock {
    use std::os::unix::fs::OpenOptionsExt;
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let _ = std::fs::create_dir_all("/run/lsvfs");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open("/run/lsvfs/tpm.lock")
        .ok()?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).ok()
}

/// The lock held while the TPM is used, the context and which TPM. Bound
/// as `let (_lock, ctx, _) = ...`, the context is dropped (its handles
/// flushed) before the lock.
fn context() -> Result<(TpmLock, Context, String)> {
    let lock = tpm_lock();
    let tcti = ["LSVFS_TPM_TCTI", "TCTI", "TPM2TOOLS_TCTI"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| DEFAULT_TCTI.to_string());
    let conf = TctiNameConf::from_str(&tcti).map_err(|e| tpm_err(&format!("TCTI {tcti}"), e))?;
    let ctx = Context::new(conf).map_err(|e| {
        KeysError::SealedStore(format!(
            "cannot reach the TPM through {tcti}: {e}; does this host have one (ls /dev/tpmrm0)? \
             Set LSVFS_TPM_TCTI for another, or use the software store (host init without --tpm)"
        ))
    })?;
    Ok((lock, ctx, tcti))
}

/// The storage primary key of the owner hierarchy (ECC P-256, AES-128-CFB
/// for its children): the same template gives the same key on the same
/// TPM, so it is made again at every use instead of being persisted.
fn primary(ctx: &mut Context) -> Result<KeyHandle> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_decrypt(true)
        .with_restricted(true)
        .build()
        .map_err(|e| tpm_err("primary key attributes", e))?;
    let public = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(|e| tpm_err("primary key parameters", e))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(|e| tpm_err("primary key template", e))?;
    ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
        ctx.create_primary(Hierarchy::Owner, public, None, None, None, None)
    })
    .map(|r| r.key_handle)
    .map_err(|e| tpm_err("creating the storage primary key", e))
}

/// A session salted with `salt_key`, with parameter encryption both ways.
fn salted(ctx: &mut Context, salt_key: KeyHandle, kind: SessionType) -> Result<AuthSession> {
    let s = ctx
        .start_auth_session(
            Some(salt_key),
            None,
            None,
            kind,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(|e| tpm_err("starting a session", e))?
        .ok_or_else(|| tpm_err("starting a session", "no session"))?;
    let (attrs, mask) = SessionAttributesBuilder::new()
        .with_decrypt(true)
        .with_encrypt(true)
        .with_continue_session(true)
        .build();
    ctx.tr_sess_set_attributes(s, attrs, mask)
        .map_err(|e| tpm_err("session attributes", e))?;
    Ok(s)
}

fn selection(pcrs: &[u8]) -> Result<PcrSelectionList> {
    let slots = pcrs
        .iter()
        .map(|&p| {
            PcrSlot::try_from(1u32 << p).map_err(|_| {
                KeysError::Invalid(format!("PCR {p} does not exist (0 to 23 on a TPM 2.0)"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| tpm_err("PCR selection", e))
}

/// SHA-256 over the current values of `pcrs` (SHA-256 bank), in order.
fn pcr_digest(ctx: &mut Context, pcrs: &[u8]) -> Result<[u8; 32]> {
    let mut h = Sha256::new();
    // At most 8 PCRs come back per read.
    for chunk in pcrs.chunks(8) {
        let (_, _, values) = ctx
            .execute_without_session(|ctx| ctx.pcr_read(selection(chunk)?).map_err(Into::into))
            .map_err(|e: KeysError| e)?;
        if values.len() != chunk.len() {
            return Err(tpm_err(
                "reading PCRs",
                format!("the SHA-256 bank holds no value for PCRs {chunk:?}"),
            ));
        }
        for d in values.value() {
            h.update(d.value());
        }
    }
    Ok(h.finalize().into())
}

impl From<tss_esapi::Error> for KeysError {
    fn from(e: tss_esapi::Error) -> Self {
        tpm_err("command", e)
    }
}

fn handle_of(s: AuthSession) -> ObjectHandle {
    SessionHandle::from(s).into()
}

/// Flushes what a call loaded, whatever happened.
fn flush(ctx: &mut Context, handles: &[ObjectHandle]) {
    for &h in handles {
        let _ = ctx.flush_context(h);
    }
}

/// Starts a PolicyPCR session for `pcrs`: a trial one when sealing, with
/// the digest of the values to bind to; a real one when unsealing, with
/// no digest (the TPM then uses its current values).
fn pcr_policy(
    ctx: &mut Context,
    salt_key: KeyHandle,
    kind: SessionType,
    pcrs: &[u8],
    digest: Option<&[u8; 32]>,
) -> Result<PolicySession> {
    let s = salted(ctx, salt_key, kind)?;
    let ps = PolicySession::try_from(s).map_err(|e| tpm_err("policy session", e))?;
    let d = match digest {
        Some(d) => Digest::try_from(d.to_vec()).map_err(|e| tpm_err("PCR digest", e))?,
        None => Digest::default(),
    };
    ctx.execute_without_session(|ctx| ctx.policy_pcr(ps, d, selection(pcrs)?).map_err(Into::into))
        .map_err(|e: KeysError| e)?;
    Ok(ps)
}

/// Seals `secret` to this host's TPM, bound to the current values of
/// `pcrs` (none: bound to the TPM alone).
pub fn seal(secret: &[u8; 32], pcrs: &[u8]) -> Result<TpmSealed> {
    let (_lock, mut ctx, _) = context()?;
    let primary = primary(&mut ctx)?;
    let mut loaded: Vec<ObjectHandle> = vec![primary.into()];
    let r = (|| {
        let digest = pcr_digest(&mut ctx, pcrs)?;
        let policy = if pcrs.is_empty() {
            Digest::default()
        } else {
            let trial = pcr_policy(&mut ctx, primary, SessionType::Trial, pcrs, Some(&digest))?;
            loaded.push(handle_of(AuthSession::from(trial)));
            ctx.policy_get_digest(trial)
                .map_err(|e| tpm_err("policy digest", e))?
        };
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_no_da(true)
            .with_admin_with_policy(true)
            // Bound to PCRs: only the policy opens it, never a password.
            .with_user_with_auth(pcrs.is_empty())
            .build()
            .map_err(|e| tpm_err("sealed object attributes", e))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_auth_policy(policy)
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(|e| tpm_err("sealed object template", e))?;
        let data =
            SensitiveData::try_from(secret.to_vec()).map_err(|e| tpm_err("sealed data", e))?;
        let session = salted(&mut ctx, primary, SessionType::Hmac)?;
        loaded.push(handle_of(session));
        let made = ctx
            .execute_with_session(Some(session), |ctx| {
                ctx.create(primary, public, None, Some(data), None, None)
            })
            .map_err(|e| tpm_err("sealing the host secret", e))?;
        Ok(TpmSealed {
            pcrs: pcrs.to_vec(),
            pcr_digest: digest,
            nv_index: 0,
            public: made
                .out_public
                .marshall()
                .map_err(|e| tpm_err("public part", e))?,
            private: made.out_private.value().to_vec(),
        })
    })();
    flush(&mut ctx, &loaded);
    r
}

/// Unseals the host secret. A PCR that changed since sealing gives an error
/// that names it and the way back in.
pub fn unseal(sealed: &TpmSealed) -> Result<Zeroizing<[u8; 32]>> {
    let (_lock, mut ctx, tcti) = context()?;
    let primary = primary(&mut ctx)?;
    let mut loaded: Vec<ObjectHandle> = vec![primary.into()];
    let r = (|| {
        if !sealed.pcrs.is_empty() && pcr_digest(&mut ctx, &sealed.pcrs)? != sealed.pcr_digest {
            return Err(KeysError::SealedStore(format!(
                "the TPM ({tcti}) will not unseal this host's secret: PCR {} changed since \
                 `lsvfs host init --tpm` sealed it (firmware, boot loader or Secure Boot \
                 state). Open volumes with their recovery key (--key-file); to use the key \
                 server again, set the host up anew: move the store away, run `lsvfs host \
                 init --tpm` and enroll the new host id",
                pcr_list(&sealed.pcrs)
            )));
        }
        let public = Public::unmarshall(&sealed.public).map_err(|e| tpm_err("public part", e))?;
        let private =
            Private::try_from(sealed.private.clone()).map_err(|e| tpm_err("private part", e))?;
        let object = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.load(primary, private, public)
            })
            .map_err(|e| {
                KeysError::SealedStore(format!(
                    "the TPM ({tcti}) does not take this host's sealed secret: {e}; it was \
                     sealed by another TPM (a copied store) or the TPM was cleared. Open \
                     volumes with their recovery key (--key-file)"
                ))
            })?;
        loaded.push(object.into());
        let session = if sealed.pcrs.is_empty() {
            salted(&mut ctx, primary, SessionType::Hmac)?
        } else {
            let ps = pcr_policy(&mut ctx, primary, SessionType::Policy, &sealed.pcrs, None)?;
            AuthSession::from(ps)
        };
        loaded.push(handle_of(session));
        let data = ctx
            .execute_with_session(Some(session), |ctx| ctx.unseal(object.into()))
            .map_err(|e| {
                KeysError::SealedStore(format!(
                    "the TPM ({tcti}) refused to unseal this host's secret: {e}. Open \
                     volumes with their recovery key (--key-file)"
                ))
            })?;
        let bytes = Zeroizing::new(data.value().to_vec());
        let secret: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| tpm_err("unsealing", "the sealed secret is not 32 bytes"))?;
        Ok(Zeroizing::new(secret))
    })();
    flush(&mut ctx, &loaded);
    r
}

/// NV indexes of the owner's range (TCG handle registry).
const OWNER_NV: std::ops::RangeInclusive<u32> = 0x0180_0000..=0x01BF_FFFF;

fn nv_handle(ctx: &mut Context, index: u32) -> Result<NvIndexHandle> {
    let tpm = NvIndexTpmHandle::new(index).map_err(|e| tpm_err("NV index", e))?;
    ctx.execute_without_session(|ctx| ctx.tr_from_tpm_public(tpm.into()))
        .map(NvIndexHandle::from)
        .map_err(|e| {
            KeysError::SealedStore(format!(
                "this TPM has no NV counter {index:#010x}: the store was sealed by another \
                 TPM (a copied store), or this one was cleared ({e}). Open volumes with their \
                 recovery key (--key-file)"
            ))
        })
}

/// Defines a monotonic NV counter for this host's store in the owner
/// hierarchy (empty owner password) and starts it; returns its index and
/// value. None when the TPM refuses (an owner password is set, or no NV
/// space): the store then has no counter, and says so.
pub fn nv_counter_create() -> Result<Option<(u32, u64)>> {
    let (_lock, mut ctx, _) = context()?;
    let attrs = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .with_nv_index_type(NvIndexType::Counter)
        .build()
        .map_err(|e| tpm_err("NV counter attributes", e))?;
    for _ in 0..16 {
        let mut r = [0u8; 4];
        getrandom::fill(&mut r).map_err(|e| tpm_err("random NV index", e))?;
        let index = OWNER_NV.start() + u32::from_le_bytes(r) % (OWNER_NV.end() - OWNER_NV.start());
        let public = NvPublicBuilder::new()
            .with_nv_index(NvIndexTpmHandle::new(index).map_err(|e| tpm_err("NV index", e))?)
            .with_index_name_algorithm(HashingAlgorithm::Sha256)
            .with_index_attributes(attrs)
            .with_data_area_size(8)
            .build()
            .map_err(|e| tpm_err("NV counter", e))?;
        let defined = ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.nv_define_space(Provision::Owner, None, public)
        });
        match defined {
            Ok(h) => {
                let started =
                    nv_increment_with(&mut ctx, index).and_then(|_| nv_read_with(&mut ctx, index));
                if started.is_err() {
                    let _ = ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                        ctx.nv_undefine_space(Provision::Owner, h)
                    });
                } else {
                    let _ = ctx.tr_close(&mut ObjectHandle::from(h));
                }
                return Ok(Some((index, started?)));
            }
            // Taken by someone else: another index.
            Err(tss_esapi::Error::Tss2Error(rc))
                if rc.kind()
                    == Some(
                        tss_esapi::constants::response_code::Tss2ResponseCodeKind::NvDefined,
                    ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(
                    "the TPM gives no NV counter for this host's store ({e}); the store \
                     works without one, but an older copy of it put back is not detected"
                );
                return Ok(None);
            }
        }
    }
    Ok(None)
}

/// The counter's value.
pub fn nv_counter_read(index: u32) -> Result<u64> {
    let (_lock, mut ctx, _) = context()?;
    nv_read_with(&mut ctx, index)
}

fn nv_read_with(ctx: &mut Context, index: u32) -> Result<u64> {
    let h = nv_handle(ctx, index)?;
    // A counter, and only a counter: an ordinary index at that handle
    // (someone undefined the counter and wrote 0 there) would read low.
    let (public, _) = ctx
        .execute_without_session(|ctx| ctx.nv_read_public(h))
        .map_err(|e| tpm_err(&format!("NV index {index:#010x}"), e))?;
    if public.attributes().index_type().ok() != Some(NvIndexType::Counter) {
        return Err(KeysError::SealedStore(format!(
            "TPM NV index {index:#010x} is not the store's counter any more (it was \
             replaced); open volumes with their recovery key (--key-file)"
        )));
    }
    let buf = ctx
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.nv_read(NvAuth::Owner, h, 8, 0)
        })
        .map_err(|e| {
            tpm_err(
                &format!(
                    "reading NV counter {index:#010x} with the owner's authorization (if an \
                     owner password was set since `host init --tpm`, that is why)"
                ),
                e,
            )
        })?;
    let b: [u8; 8] = buf
        .value()
        .try_into()
        .map_err(|_| tpm_err("NV counter", "not 8 bytes"))?;
    // TPM integers are big-endian.
    Ok(u64::from_be_bytes(b))
}

/// Adds one to the counter.
pub fn nv_counter_increment(index: u32) -> Result<()> {
    let (_lock, mut ctx, _) = context()?;
    nv_increment_with(&mut ctx, index)
}

fn nv_increment_with(ctx: &mut Context, index: u32) -> Result<()> {
    let h = nv_handle(ctx, index)?;
    ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
        ctx.nv_increment(NvAuth::Owner, h)
    })
    .map_err(|e| tpm_err(&format!("incrementing NV counter {index:#010x}"), e))
}

/// Removes the counter (a store being made anew on the same TPM).
pub fn nv_counter_remove(index: u32) -> Result<()> {
    let (_lock, mut ctx, _) = context()?;
    let h = nv_handle(&mut ctx, index)?;
    ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
        ctx.nv_undefine_space(Provision::Owner, h)
    })
    .map_err(|e| tpm_err(&format!("removing NV counter {index:#010x}"), e))
}

/// "7" or "0, 2 and 7".
pub fn pcr_list(pcrs: &[u8]) -> String {
    let s: Vec<String> = pcrs.iter().map(|p| p.to_string()).collect();
    match s.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => s.join(""),
    }
}

impl TpmSealed {
    /// The file's bytes (docs/FORMAT.md, "TPM-sealed host secret").
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.push(self.pcrs.len() as u8);
        b.extend_from_slice(&self.pcrs);
        b.extend_from_slice(&self.pcr_digest);
        b.extend_from_slice(&self.nv_index.to_le_bytes());
        b.extend_from_slice(&(self.public.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.public);
        b.extend_from_slice(&(self.private.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.private);
        b
    }

    /// Decodes untrusted bytes; None when they are not such a file.
    pub fn decode(b: &[u8]) -> Option<TpmSealed> {
        let mut r = crate::wire::Reader::new(b);
        if r.take(8)? != MAGIC || r.u32()? != VERSION {
            return None;
        }
        let n = r.u8()? as usize;
        let pcrs = r.take(n)?.to_vec();
        if pcrs.iter().any(|&p| p > 23) || pcrs.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        let pcr_digest = r.take(32)?.try_into().ok()?;
        let nv_index = r.u32()?;
        if nv_index != 0 && !OWNER_NV.contains(&nv_index) {
            return None;
        }
        let n = r.u32()? as usize;
        let public = r.take(n)?.to_vec();
        let n = r.u32()? as usize;
        let private = r.take(n)?.to_vec();
        (r.remaining() == 0 && public.len() <= 4096 && private.len() <= 4096).then_some(TpmSealed {
            pcrs,
            pcr_digest,
            nv_index,
            public,
            private,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_round_trips_and_bad_bytes_do_not_decode() {
        let t = TpmSealed {
            pcrs: vec![0, 7],
            pcr_digest: [3; 32],
            nv_index: 0x0180_1234,
            public: vec![1; 50],
            private: vec![2; 60],
        };
        let b = t.encode();
        let d = TpmSealed::decode(&b).unwrap();
        assert_eq!(
            (d.pcrs, d.pcr_digest, d.public, d.private),
            (t.pcrs, t.pcr_digest, t.public, t.private)
        );
        for cut in 0..b.len() {
            assert!(TpmSealed::decode(&b[..cut]).is_none(), "cut at {cut}");
        }
        let mut unsorted = b.clone();
        unsorted[13] = 9;
        assert!(TpmSealed::decode(&unsorted).is_none());
        assert_eq!(pcr_list(&[7]), "7");
        assert_eq!(pcr_list(&[0, 2, 7]), "0, 2 and 7");
    }
}
