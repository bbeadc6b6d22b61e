//! The master key and the encryption of KEKs at rest.
//!
//! The at-rest key is HKDF-SHA256(master key, info = [`AT_REST_LABEL`]).
//! A sealed KEK (table `keks`) is:
//!
//! | offset | len | field                                         |
//! |--------|-----|-----------------------------------------------|
//! | 0      | 1   | format = 1                                    |
//! | 1      | 24  | XChaCha20-Poly1305 nonce (random)             |
//! | 25     | 48  | ciphertext: 32-byte KEK, 16-byte tag          |
//!
//! with associated data `"lsvfs-ks v1 kek at rest"` ‖ volume id (16) ‖
//! version (u32 BE), so a sealed KEK cannot be moved to another volume or
//! version. The `meta` table holds a check value sealed the same way with
//! the AD [`CHECK_AD`], so the wrong master key is detected at startup.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::secret::{scrub_stack, Locked};

/// Zeroed, locked memory for one key.
fn locked_key() -> Result<Locked<[u8; 32]>, StorageError> {
    Locked::zeroed().map_err(|e| StorageError::Io(format!("memory for a key: {e}")))
}

use crate::protocol::{KekVersion, VolumeId};

use super::format::RECORD_FORMAT;
use super::StorageError;

/// HKDF info deriving the at-rest key from the master key.
pub const AT_REST_LABEL: &[u8] = b"lsvfs-keyserver v1 KEK at rest";
/// Start of the associated data of a sealed KEK.
pub const KEK_AD_LABEL: &[u8] = b"lsvfs-ks v1 kek at rest";
/// Associated data of the master-key check value.
pub const CHECK_AD: &[u8] = b"lsvfs-ks v1 master key check";

/// Length of a sealed KEK.
pub const SEALED_LEN: usize = 1 + 24 + 48;

/// The server master key. Not `Debug`; in locked, dump-excluded memory,
/// zeroed on drop.
pub struct MasterKey(Locked<[u8; 32]>);

impl MasterKey {
    /// A fresh key from the OS RNG.
    pub fn generate() -> Result<MasterKey, StorageError> {
        let mut k = locked_key()?;
        getrandom::fill(k.as_mut()).map_err(|e| StorageError::Io(format!("getrandom: {e}")))?;
        Ok(MasterKey(k))
    }

    /// Parses a master key file: 64 hex digits, surrounding whitespace
    /// allowed.
    pub fn parse(contents: &[u8]) -> Result<MasterKey, StorageError> {
        let text = std::str::from_utf8(contents)
            .map_err(|_| StorageError::MasterKey("not text: want 64 hex digits".into()))?
            .trim();
        let mut k = locked_key()?;
        if text.len() != 64 || hex::decode_to_slice(text, k.as_mut()).is_err() {
            return Err(StorageError::MasterKey(format!(
                "want 64 hex digits, have {} characters",
                text.len()
            )));
        }
        Ok(MasterKey(k))
    }

    /// Reads a master key file. A world-readable file is refused.
    pub fn load(path: &Path) -> Result<MasterKey, StorageError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| StorageError::MasterKey(format!("{}: {e}", path.display())))?;
        if meta.permissions().mode() & 0o004 != 0 {
            return Err(StorageError::MasterKey(format!(
                "{} is world-readable: chmod 600 it",
                path.display()
            )));
        }
        let bytes = Zeroizing::new(
            std::fs::read(path)
                .map_err(|e| StorageError::MasterKey(format!("{}: {e}", path.display())))?,
        );
        MasterKey::parse(&bytes)
            .map_err(|e| StorageError::MasterKey(format!("{}: {e}", path.display())))
    }

    /// Writes a new key to `path`, created with mode 0600; fails if the file
    /// exists.
    pub fn create_file(path: &Path) -> Result<(), StorageError> {
        let key = MasterKey::generate()?;
        let mut text = Zeroizing::new(hex::encode(&key.0[..]));
        text.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| StorageError::Io(format!("{}: {e}", path.display())))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| StorageError::Io(format!("{}: {e}", path.display())))
    }
}

/// Seals and opens KEKs at rest.
pub struct AtRest {
    /// Holds the at-rest key's schedule: locked, dump-excluded.
    cipher: Locked<XChaCha20Poly1305>,
}

impl AtRest {
    /// Derives the at-rest key.
    pub fn new(master: &MasterKey) -> AtRest {
        let cipher = Self::derive_below(master);
        // The HKDF state and the cipher's key were built on the stack, in
        // the frames below this one (the scrub clears only below its caller).
        scrub_stack();
        AtRest { cipher }
    }

    #[inline(never)]
    fn derive_below(master: &MasterKey) -> Locked<XChaCha20Poly1305> {
        let mut okm = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(None, master.0.as_ref())
            .expand(AT_REST_LABEL, okm.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let cipher = Locked::new_with(|c| {
            c.write(XChaCha20Poly1305::new(Key::from_slice(okm.as_ref())));
        })
        .expect("memory for the at-rest key");
        drop(okm);
        cipher
    }

    fn kek_ad(volume: VolumeId, version: KekVersion) -> Vec<u8> {
        let mut ad = Vec::with_capacity(KEK_AD_LABEL.len() + 20);
        ad.extend_from_slice(KEK_AD_LABEL);
        ad.extend_from_slice(&volume.0);
        ad.extend_from_slice(&version.0.to_be_bytes());
        ad
    }

    fn seal(&self, msg: &[u8; 32], ad: &[u8]) -> Result<[u8; SEALED_LEN], StorageError> {
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).map_err(|e| StorageError::Io(format!("getrandom: {e}")))?;
        let ct = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg, aad: ad })
            .map_err(|_| StorageError::Io("at-rest encryption failed".into()))?;
        let mut out = [0u8; SEALED_LEN];
        out[0] = RECORD_FORMAT;
        out[1..25].copy_from_slice(&nonce);
        if ct.len() != 48 {
            return Err(StorageError::Io("at-rest ciphertext length".into()));
        }
        out[25..].copy_from_slice(&ct);
        Ok(out)
    }

    fn open(&self, blob: &[u8], ad: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
        if blob.len() != SEALED_LEN || blob[0] != RECORD_FORMAT {
            return None;
        }
        let plain = Zeroizing::new(
            self.cipher
                .decrypt(
                    XNonce::from_slice(&blob[1..25]),
                    Payload {
                        msg: &blob[25..],
                        aad: ad,
                    },
                )
                .ok()?,
        );
        let mut out = Zeroizing::new([0u8; 32]);
        if plain.len() != 32 {
            return None;
        }
        out.copy_from_slice(&plain);
        Some(out)
    }

    /// Seals a KEK for storage.
    pub fn seal_kek(
        &self,
        volume: VolumeId,
        version: KekVersion,
        kek: &[u8; 32],
    ) -> Result<[u8; SEALED_LEN], StorageError> {
        self.seal(kek, &Self::kek_ad(volume, version))
    }

    /// Opens a stored KEK.
    pub fn open_kek(
        &self,
        volume: VolumeId,
        version: KekVersion,
        blob: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, StorageError> {
        self.open(blob, &Self::kek_ad(volume, version))
            .ok_or_else(|| {
                StorageError::Corrupted(format!(
                    "KEK {version} of volume {volume} does not decrypt under the master key"
                ))
            })
    }

    /// A new check value for the `meta` table.
    pub fn check_value(&self) -> Result<[u8; SEALED_LEN], StorageError> {
        self.seal(&[0; 32], CHECK_AD)
    }

    /// True if `blob` is a check value sealed under this master key.
    pub fn verify_check(&self, blob: &[u8]) -> bool {
        self.open(blob, CHECK_AD).is_some_and(|p| *p == [0; 32])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kek_at_rest_is_bound_to_volume_and_version() {
        let at = AtRest::new(&MasterKey::generate().unwrap());
        let v = VolumeId([1; 16]);
        let kek = [0x42; 32];
        let blob = at.seal_kek(v, KekVersion(1), &kek).unwrap();
        assert!(!blob.windows(32).any(|w| w == kek));
        assert_eq!(*at.open_kek(v, KekVersion(1), &blob).unwrap(), kek);
        assert!(at.open_kek(v, KekVersion(2), &blob).is_err());
        assert!(at
            .open_kek(VolumeId([2; 16]), KekVersion(1), &blob)
            .is_err());
        for i in 0..blob.len() {
            let mut t = blob;
            t[i] ^= 0x80;
            assert!(at.open_kek(v, KekVersion(1), &t).is_err(), "byte {i}");
        }
        assert!(at.open_kek(v, KekVersion(1), &blob[..72]).is_err());
        let other = AtRest::new(&MasterKey::generate().unwrap());
        assert!(other.open_kek(v, KekVersion(1), &blob).is_err());
    }

    #[test]
    fn check_value_detects_wrong_master_key() {
        let at = AtRest::new(&MasterKey::generate().unwrap());
        let check = at.check_value().unwrap();
        assert!(at.verify_check(&check));
        assert!(!AtRest::new(&MasterKey::generate().unwrap()).verify_check(&check));
    }

    #[test]
    fn master_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mk");
        MasterKey::create_file(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(MasterKey::create_file(&p).is_err(), "O_EXCL");
        MasterKey::load(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(MasterKey::load(&p).is_err());
        assert!(MasterKey::parse(b"abcd").is_err());
        assert!(MasterKey::parse(format!("  {}\n", "0f".repeat(32)).as_bytes()).is_ok());
    }
}
