//! An export's own key, the cipher its chunks are sealed with, and the
//! slots that hold the key: one per recipient public
//! key (HPKE, RFC 9180: X25519, HKDF-SHA256, ChaCha20-Poly1305) and one per
//! key file (XChaCha20-Poly1305 under a key derived from the file's KEK).
//! The volume's data key is never in an export, not even wrapped.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use super::format::{ChunkAead, Header, Slot, SlotKind, FIXED_LEN, TAG_LEN};
use super::{ExportError, Result};
use crate::crypto::{Kek, VolumeKeys};

type Kem = X25519HkdfSha256;

const HPKE_INFO: &[u8] = b"lsvfs v1 export key";
const SLOT_INFO: &[u8] = b"lsvfs v1 export key slot";
/// Format version 1's chunk key (XChaCha20-Poly1305).
const CHUNK_INFO_V1: &[u8] = b"lsvfs v1 export chunks";
/// The chunk key from version 2 on (AES-256-GCM).
const CHUNK_INFO: &[u8] = b"lsvfs v2 export chunks (AES-256-GCM)";
const PUBLIC_PREFIX: &str = "lsvfs-recipient-v1 ";
const SECRET_PREFIX: &str = "lsvfs-recipient-secret-v1 ";

/// An export's random key. Zeroized on drop, never printed.
pub struct ExportKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for ExportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportKey(..)")
    }
}

impl ExportKey {
    pub fn generate() -> Result<ExportKey> {
        let mut k = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut k[..])
            .map_err(|e| ExportError::Usage(format!("no randomness: {e}")))?;
        Ok(ExportKey(k))
    }

    /// The cipher of the chunks of an export with `header`: a key derived
    /// with HKDF-SHA256 from the export key, salted with the export id, for
    /// the cipher the header's format version names.
    pub fn chunk_cipher(&self, header: &Header) -> ChunkCipher {
        let key = |info: &[u8]| {
            let hk = Hkdf::<Sha256>::new(Some(&header.export_id), &self.0[..]);
            let mut k = Zeroizing::new([0u8; 32]);
            hk.expand(info, &mut k[..]).expect("32 bytes");
            k
        };
        match header.chunk_aead() {
            ChunkAead::XChaCha20Poly1305 => ChunkCipher::XChaCha(
                XChaCha20Poly1305::new_from_slice(&key(CHUNK_INFO_V1)[..]).expect("32-byte key"),
            ),
            ChunkAead::Aes256Gcm => ChunkCipher::Gcm(LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, &key(CHUNK_INFO)[..]).expect("32-byte key"),
            )),
        }
    }
}

/// What seals an export's chunks: AES-256-GCM from format version 2 on,
/// XChaCha20-Poly1305 in version 1. Each chunk's nonce is its index and
/// whether it is the last one; each export has its own random key, so no
/// nonce repeats under a key.
pub enum ChunkCipher {
    /// Version 1 (the key is zeroized on drop).
    XChaCha(XChaCha20Poly1305),
    /// Version 2. AWS-LC overwrites the context, key schedule included,
    /// when it frees it.
    Gcm(LessSafeKey),
}

impl ChunkCipher {
    /// Seals chunk `index` in place, bound to `aad` (the header's hash);
    /// returns its tag.
    pub fn seal(
        &self,
        index: u64,
        last: bool,
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        let failed = || ExportError::Usage("sealing a chunk".into());
        match self {
            ChunkCipher::XChaCha(c) => c
                .encrypt_in_place_detached(&xnonce(index, last), aad, buf)
                .map(Into::into)
                .map_err(|_| failed()),
            ChunkCipher::Gcm(k) => {
                let tag = k
                    .seal_in_place_separate_tag(gcm_nonce(index, last), Aad::from(aad), buf)
                    .map_err(|_| failed())?;
                tag.as_ref().try_into().map_err(|_| failed())
            }
        }
    }

    /// Opens chunk `index` (`ct`, then `tag`) into `out`, as long as `ct`;
    /// false if it does not authenticate. `ct` is left as it was, so a
    /// failed attempt can be tried again as the last chunk.
    pub fn open(
        &self,
        index: u64,
        last: bool,
        aad: &[u8],
        ct: &[u8],
        tag: &[u8; TAG_LEN],
        out: &mut [u8],
    ) -> bool {
        match self {
            ChunkCipher::XChaCha(c) => {
                out.copy_from_slice(ct);
                c.decrypt_in_place_detached(&xnonce(index, last), aad, out, tag.into())
                    .is_ok()
            }
            ChunkCipher::Gcm(k) => k
                .open_separate_gather(gcm_nonce(index, last), Aad::from(aad), ct, tag, out)
                .is_ok(),
        }
    }
}

/// A version 1 chunk's nonce: its index (8 bytes, little endian), then 1
/// for the last chunk, else 0, then zeros.
fn xnonce(index: u64, last: bool) -> XNonce {
    let mut n = [0u8; 24];
    n[..8].copy_from_slice(&index.to_le_bytes());
    n[8] = u8::from(last);
    *XNonce::from_slice(&n)
}

/// A version 2 chunk's nonce: the first 12 bytes of the version 1 nonce.
fn gcm_nonce(index: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n.copy_from_slice(&xnonce(index, last)[..12]);
    Nonce::assume_unique_for_key(n)
}

/// A recipient's public key, parsed from its one-line text form.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RecipientKey(pub [u8; 32]);

impl std::fmt::Display for RecipientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", crate::keys::hex(&self.0))
    }
}

impl std::fmt::Debug for RecipientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecipientKey({})", crate::keys::hex(&self.0))
    }
}

fn unhex32(s: &str) -> Option<Zeroizing<[u8; 32]>> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = Zeroizing::new([0u8; 32]);
    for (i, o) in out.iter_mut().enumerate() {
        let d = |c: u8| (c as char).to_digit(16);
        *o = (d(s[2 * i])? << 4 | d(s[2 * i + 1])?) as u8;
    }
    Some(out)
}

impl RecipientKey {
    /// Parses `lsvfs-recipient-v1 <64 hex digits>` (`from` names the source
    /// in errors).
    pub fn parse(text: &str, from: &str) -> Result<RecipientKey> {
        let k = text
            .trim()
            .strip_prefix(PUBLIC_PREFIX)
            .and_then(unhex32)
            .ok_or_else(|| {
                ExportError::Usage(format!(
                    "{from} is not a recipient public key (expected one line: \
                     {PUBLIC_PREFIX}<64 hex digits>, as `lsvfs recipient keygen` prints)"
                ))
            })?;
        <Kem as hpke::Kem>::PublicKey::from_bytes(&k[..])
            .map_err(|_| ExportError::Usage(format!("{from}: not a usable X25519 public key")))?;
        Ok(RecipientKey(*k))
    }

    pub fn read(path: &Path) -> Result<RecipientKey> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ExportError::io(format!("reading recipient {}", path.display()), e))?;
        RecipientKey::parse(&text, &path.display().to_string())
    }
}

/// A recipient's private key (an identity file).
pub struct Identity {
    sk: <Kem as hpke::Kem>::PrivateKey,
    public: RecipientKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({:?})", self.public)
    }
}

impl Identity {
    pub fn public(&self) -> RecipientKey {
        self.public
    }

    /// Writes a new identity file (mode 0600, never overwritten) and
    /// returns it.
    pub fn generate(path: &Path) -> Result<Identity> {
        let (sk, pk) = Kem::gen_keypair();
        let mut line = Zeroizing::new(String::from(SECRET_PREFIX));
        let mut secret = sk.to_bytes();
        line.push_str(&Zeroizing::new(crate::keys::hex(&secret)));
        secret.zeroize();
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| ExportError::io(format!("creating {}", path.display()), e))?;
        f.write_all(line.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| ExportError::io(format!("writing {}", path.display()), e))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(&pk.to_bytes());
        Ok(Identity {
            sk,
            public: RecipientKey(public),
        })
    }

    /// Reads an identity file; refuses one that others may read.
    pub fn read(path: &Path) -> Result<Identity> {
        use std::os::unix::fs::MetadataExt;
        let name = path.display();
        let meta = std::fs::metadata(path)
            .map_err(|e| ExportError::io(format!("reading identity {name}"), e))?;
        if meta.mode() & 0o077 != 0 {
            return Err(ExportError::Usage(format!(
                "identity {name} is accessible by group or others (mode {:o}); run: chmod 600 {name}",
                meta.mode() & 0o777
            )));
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| ExportError::io(format!("reading identity {name}"), e))?,
        );
        let bytes = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .and_then(unhex32)
            .ok_or_else(|| {
                ExportError::Usage(format!(
                    "{name} is not a recipient identity (expected one line: {SECRET_PREFIX}<64 \
                     hex digits>, as `lsvfs recipient keygen` writes)"
                ))
            })?;
        let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(&bytes[..])
            .map_err(|_| ExportError::Usage(format!("{name}: not a usable X25519 key")))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(&Kem::sk_to_pk(&sk).to_bytes());
        Ok(Identity {
            sk,
            public: RecipientKey(public),
        })
    }
}

/// A slot holding `key` for a recipient: its public key, the HPKE
/// encapsulated key and the sealed export key, bound to the header's
/// fixed part.
pub fn recipient_slot(to: &RecipientKey, key: &ExportKey, fixed: &[u8; FIXED_LEN]) -> Result<Slot> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&to.0)
        .map_err(|_| ExportError::Usage(format!("{to}: not a usable X25519 public key")))?;
    let (enc, ct) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &OpModeS::Base,
        &pk,
        HPKE_INFO,
        &key.0[..],
        fixed,
    )
    .map_err(|e| ExportError::Usage(format!("sealing the export key for {to}: {e}")))?;
    let mut body = to.0.to_vec();
    body.extend_from_slice(&enc.to_bytes());
    body.extend_from_slice(&ct);
    Ok(Slot {
        kind: SlotKind::Recipient,
        body,
    })
}

fn slot_cipher(kek: &Kek, fixed: &[u8; FIXED_LEN]) -> XChaCha20Poly1305 {
    let hk = Hkdf::<Sha256>::new(Some(&fixed[16..32]), kek.expose());
    let mut k = Zeroizing::new([0u8; 32]);
    hk.expand(SLOT_INFO, &mut k[..]).expect("32 bytes");
    XChaCha20Poly1305::new_from_slice(&k[..]).expect("32-byte key")
}

/// A slot of `kind`: `prefix` (which key opens it), a random nonce, and
/// the export key sealed with `cipher` (XChaCha20-Poly1305), bound to the
/// header's fixed part.
fn sealed_slot(
    kind: SlotKind,
    cipher: XChaCha20Poly1305,
    prefix: &[u8],
    key: &ExportKey,
    fixed: &[u8; FIXED_LEN],
) -> Result<Slot> {
    let mut nonce = [0u8; 24];
    getrandom::fill(&mut nonce).map_err(|e| ExportError::Usage(format!("no randomness: {e}")))?;
    let ct = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &key.0[..],
                aad: fixed,
            },
        )
        .map_err(|_| ExportError::Usage("sealing the export key".into()))?;
    let mut body = prefix.to_vec();
    body.extend_from_slice(&nonce);
    body.extend_from_slice(&ct);
    Ok(Slot { kind, body })
}

/// Opens what [`sealed_slot`] made, given the body after its prefix.
fn open_sealed(
    cipher: XChaCha20Poly1305,
    rest: &[u8],
    fixed: &[u8; FIXED_LEN],
) -> Option<ExportKey> {
    let plain = cipher.decrypt(
        XNonce::from_slice(rest.get(..24)?),
        Payload {
            msg: rest.get(24..)?,
            aad: fixed,
        },
    );
    plain.ok().map(Zeroizing::new).and_then(|p| key_from(&p))
}

/// A slot holding `key` under a key file's KEK: the KEK's fingerprint, a
/// random nonce and the sealed export key, bound to the header's fixed part.
pub fn key_file_slot(kek: &Kek, key: &ExportKey, fixed: &[u8; FIXED_LEN]) -> Result<Slot> {
    let fingerprint = kek.fingerprint();
    sealed_slot(
        SlotKind::KeyFile,
        slot_cipher(kek, fixed),
        &fingerprint,
        key,
        fixed,
    )
}

/// A slot holding `key` for whoever can unlock the source volume: its
/// key-check value (which volume, which key), a random nonce and the export
/// key sealed with XChaCha20-Poly1305 under `slot_key` (the volume's
/// [`crate::crypto::VolumeKeys::export_slot_key`] for this export), bound
/// to the header's fixed part.
pub fn volume_slot(
    slot_key: &[u8; 32],
    key_check: &[u8; 16],
    key: &ExportKey,
    fixed: &[u8; FIXED_LEN],
) -> Result<Slot> {
    let cipher = XChaCha20Poly1305::new_from_slice(slot_key).expect("32-byte key");
    sealed_slot(SlotKind::Volume, cipher, key_check, key, fixed)
}

/// The source volume's key-check value, if the export has a volume slot.
pub fn volume_slot_check(slots: &[Slot]) -> Option<[u8; 16]> {
    slots
        .iter()
        .find(|s| s.kind == SlotKind::Volume && s.body.len() == 16 + 24 + 48)
        .map(|s| s.body[..16].try_into().expect("16 bytes"))
}

fn key_from(plain: &[u8]) -> Option<ExportKey> {
    let mut k = Zeroizing::new([0u8; 32]);
    if plain.len() != 32 {
        return None;
    }
    k.copy_from_slice(plain);
    Some(ExportKey(k))
}

/// Opens the export key with whatever the caller holds: the first slot an
/// identity or a key file opens. `Ok(None)` when none does.
pub fn open_slots(
    slots: &[Slot],
    fixed: &[u8; FIXED_LEN],
    identities: &[Identity],
    key_files: &[Kek],
    volume: Option<&VolumeKeys>,
) -> Option<ExportKey> {
    for s in slots {
        match s.kind {
            SlotKind::Volume if s.body.len() == 16 + 24 + 48 => {
                let Some(v) = volume else { continue };
                let id: [u8; 16] = fixed[16..32].try_into().expect("16 bytes");
                let cipher = XChaCha20Poly1305::new_from_slice(&v.export_slot_key(&id)[..])
                    .expect("32-byte key");
                if let Some(k) = open_sealed(cipher, &s.body[16..], fixed) {
                    return Some(k);
                }
            }
            SlotKind::Recipient if s.body.len() == 32 + 32 + 48 => {
                let Some(id) = identities.iter().find(|i| i.public.0[..] == s.body[..32]) else {
                    continue;
                };
                let Ok(enc) = <Kem as hpke::Kem>::EncappedKey::from_bytes(&s.body[32..64]) else {
                    continue;
                };
                let plain = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
                    &OpModeR::Base,
                    &id.sk,
                    &enc,
                    HPKE_INFO,
                    &s.body[64..],
                    fixed,
                );
                if let Some(k) = plain.ok().map(Zeroizing::new).and_then(|p| key_from(&p)) {
                    return Some(k);
                }
            }
            SlotKind::KeyFile if s.body.len() == 16 + 24 + 48 => {
                let Some(kek) = key_files
                    .iter()
                    .find(|k| k.fingerprint()[..] == s.body[..16])
                else {
                    continue;
                };
                if let Some(k) = open_sealed(slot_cipher(kek, fixed), &s.body[16..], fixed) {
                    return Some(k);
                }
            }
            _ => {}
        }
    }
    None
}

/// What a slot says about who can open it (for `export show`).
pub fn describe(s: &Slot) -> String {
    match s.kind {
        SlotKind::Recipient if s.body.len() >= 32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(&s.body[..32]);
            format!("recipient {}", RecipientKey(k))
        }
        SlotKind::KeyFile if s.body.len() >= 16 => {
            format!(
                "key file (KEK fingerprint {})",
                crate::keys::hex(&s.body[..16])
            )
        }
        SlotKind::Volume => "whoever can unlock the source volume (its key servers, with this \
             host's sealed store)"
            .to_string(),
        _ => "a malformed slot".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_open_only_at_their_place_under_their_version_and_a_failed_try_changes_nothing() {
        let key = ExportKey::generate().unwrap();
        let mut h = crate::export::format::tests::header(crate::export::Kind::Full);
        for v in [1, 2] {
            h.version = v;
            let c = key.chunk_cipher(&h);
            let plain: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
            let mut ct = plain.clone();
            let tag = c.seal(3, true, b"head", &mut ct).unwrap();
            assert_ne!(ct, plain, "version {v}: sealed");
            let mut out = vec![0u8; ct.len()];
            let before = ct.clone();
            // Not the last chunk, another index, another header, another tag.
            assert!(!c.open(3, false, b"head", &ct, &tag, &mut out));
            assert!(!c.open(4, true, b"head", &ct, &tag, &mut out));
            assert!(!c.open(3, true, b"hea", &ct, &tag, &mut out));
            let mut bad = tag;
            bad[0] ^= 1;
            assert!(!c.open(3, true, b"head", &ct, &bad, &mut out));
            assert_eq!(ct, before, "version {v}: failed tries leave the chunk");
            assert!(c.open(3, true, b"head", &ct, &tag, &mut out));
            assert_eq!(out, plain, "version {v}");
            // The other version's cipher (another key, another AEAD).
            h.version = 3 - v;
            assert!(!key
                .chunk_cipher(&h)
                .open(3, true, b"head", &ct, &tag, &mut out));
        }
    }

    #[test]
    fn each_slot_opens_with_its_key_only_and_only_for_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let alice = Identity::generate(&dir.path().join("alice")).unwrap();
        let bob = Identity::generate(&dir.path().join("bob")).unwrap();
        let kek = Kek::generate().unwrap();
        let other = Kek::generate().unwrap();
        let key = ExportKey::generate().unwrap();
        let fixed = [5u8; FIXED_LEN];
        let slots = vec![
            recipient_slot(&alice.public(), &key, &fixed).unwrap(),
            key_file_slot(&kek, &key, &fixed).unwrap(),
        ];
        let got = open_slots(&slots, &fixed, std::slice::from_ref(&alice), &[], None).unwrap();
        assert_eq!(*got.0, *key.0);
        let got = open_slots(&slots, &fixed, &[], std::slice::from_ref(&kek), None).unwrap();
        assert_eq!(*got.0, *key.0);
        assert!(open_slots(&slots, &fixed, std::slice::from_ref(&bob), &[other], None).is_none());
        // Bound to the header: another export's fixed part opens nothing.
        let mut moved = fixed;
        moved[20] ^= 1;
        assert!(open_slots(&slots, &moved, &[alice], std::slice::from_ref(&kek), None).is_none());
        // Identity files: 0600, read back to the same public key, and the
        // public key's text form parses.
        let again = Identity::read(&dir.path().join("bob")).unwrap();
        assert_eq!(again.public(), bob.public());
        let text = bob.public().to_string();
        assert_eq!(RecipientKey::parse(&text, "t").unwrap(), bob.public());
        assert!(RecipientKey::parse("lsvfs-recipient-v1 zz", "t").is_err());
        assert!(!format!("{again:?}").contains(&crate::keys::hex(&again.sk.to_bytes())));
    }
}
