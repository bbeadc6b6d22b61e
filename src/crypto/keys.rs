//! Key types. They zeroize on drop and implement neither `Debug` nor `Display`.

use super::xts::Xts;
use aes::cipher::KeyInit;
use aes::Aes256;
use std::sync::Arc;

use hkdf::Hkdf;
use lsvfs_keyserver::secret::{scrub_stack, scrub_stack_small, Locked};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{CryptoError, Mac, Tag, MAC_LEN};

/// Length of a master key and of every key-encryption key, in bytes.
pub const KEY_LEN: usize = 32;

/// HKDF-SHA256 labels. Changing one changes every derived key: never do it
/// without a new format version.
pub const LABEL_XTS: &[u8] = b"lsvfs v1 AES-256-XTS block encryption";
pub const LABEL_MAC: &[u8] = b"lsvfs v1 BLAKE3 block authentication";
pub const LABEL_KCV: &[u8] = b"lsvfs v1 key check value";
pub const LABEL_EXPORT: &[u8] = b"lsvfs v1 export volume slot";
pub const LABEL_GEN_WRAP: &[u8] = b"lsvfs v1 key generation wrap";

/// What the MAC input adds after the ciphertext: the encoded tag (17
/// bytes) and the volume id (16).
const MAC_TAIL: usize = 17 + 16;
/// The longest ciphertext whose MAC input is hashed in one piece.
const MAC_JOINED: usize = crate::BLOCK_SIZE;

/// 32 random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Result<Zeroizing<[u8; N]>, CryptoError> {
    let mut out = Zeroizing::new([0u8; N]);
    getrandom::fill(out.as_mut_slice()).map_err(|_| CryptoError::Random)?;
    Ok(out)
}

/// The random per-volume master key. Everything else is derived from it.
/// It lives in locked, dump-excluded memory (see `lsvfs_keyserver::secret`).
pub struct MasterKey(Locked<[u8; KEY_LEN]>);

impl MasterKey {
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = locked_key()?;
        getrandom::fill(k.as_mut_slice()).map_err(|_| CryptoError::Random)?;
        Ok(MasterKey(k))
    }

    /// A master key from bytes held elsewhere; `bytes` is zeroized by its
    /// owner.
    pub fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        Self::from_slice(&bytes[..]).expect("locked memory for one key")
    }

    /// A master key copied from `bytes` (exactly KEY_LEN of them).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let mut k = locked_key()?;
        k.copy_from_slice(bytes);
        Ok(MasterKey(k))
    }

    /// The raw key, for wrapping it into a key slot. Never log or store it.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key-check value stored in the volume header: a one-way function
    /// of the master key that tells "wrong key" apart from "corrupt data".
    pub fn check_value(&self, volume_id: &[u8; 16]) -> [u8; 16] {
        let kcv = self.check_value_below(volume_id);
        // The HKDF state was in the frames below (never in this one: the
        // scrub clears only below its caller).
        scrub_stack();
        kcv
    }

    #[inline(never)]
    fn check_value_below(&self, volume_id: &[u8; 16]) -> [u8; 16] {
        let mut kcv = [0u8; 16];
        expand(self, volume_id, LABEL_KCV, &mut kcv);
        kcv
    }
}

/// Zeroed, locked memory for one key.
pub(super) fn locked_key() -> Result<Locked<[u8; KEY_LEN]>, CryptoError> {
    Locked::zeroed().map_err(|_| CryptoError::Memory)
}

fn expand(master: &MasterKey, volume_id: &[u8; 16], label: &[u8], out: &mut [u8]) {
    let hk = Hkdf::<Sha256>::new(Some(volume_id), master.0.as_slice());
    // Output lengths here are at most 64 bytes, far below HKDF's 255*32 limit.
    hk.expand(label, out)
        .expect("HKDF output length is a small constant");
}

/// The working keys of one open volume: the root of its export keys and
/// its key ring, the keys of every key generation that still seals some
/// block (`lsvfs rekey`). Key generation 0 derives from the master key;
/// every later one from a random secret the header keeps wrapped under a
/// key derived from the master key. New blocks are sealed under the
/// current generation; a block is opened under the generation its
/// pointer names.
pub struct VolumeKeys {
    root: Locked<Root>,
    ring: std::sync::RwLock<Ring>,
}

struct Root {
    /// The root of the keys that seal an export's key for whoever can
    /// unlock this volume (see [`VolumeKeys::export_slot_key`]).
    export_root: [u8; 32],
    volume_id: [u8; 16],
}

struct Ring {
    /// Ascending by generation.
    gens: Vec<Arc<GenKeys>>,
    current: u16,
}

/// The keys of one key generation: the XTS key pair (as expanded AES key
/// schedules) and the MAC key, in locked, dump-excluded memory.
pub struct GenKeys {
    key_gen: u16,
    s: Locked<Schedule>,
}

struct Schedule {
    xts: Xts,
    mac_key: [u8; 32],
    volume_id: [u8; 16],
}

/// The XTS key pair and the MAC key `VolumeKeys::derive` makes from
/// `master`: for tests that look for them where they must not be (a core
/// dump). Anyone holding the master key can derive them.
#[doc(hidden)]
pub fn derived_key_bytes(master: &MasterKey, volume_id: &[u8; 16]) -> Zeroizing<[u8; 96]> {
    let mut out = Zeroizing::new([0u8; 96]);
    expand(master, volume_id, LABEL_XTS, &mut out[..64]);
    expand(master, volume_id, LABEL_MAC, &mut out[64..]);
    out
}

/// The key that wraps the secrets of key generations 1 and up in the
/// header: anyone who holds the master key can derive it, nobody else.
pub fn generation_wrap_key(master: &MasterKey, volume_id: &[u8; 16]) -> super::Kek {
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    expand(master, volume_id, LABEL_GEN_WRAP, &mut k[..]);
    let kek = super::Kek::from_bytes(k);
    scrub_stack();
    kek
}

/// What a key generation's wrapped secret is bound to: the volume and the
/// generation number.
pub fn generation_binding(volume_id: &[u8; 16], key_gen: u16) -> [u8; 38] {
    let mut ad = [0u8; 38];
    ad[..20].copy_from_slice(b"lsvfs key generation");
    ad[20..36].copy_from_slice(volume_id);
    ad[36..].copy_from_slice(&key_gen.to_le_bytes());
    ad
}

impl GenKeys {
    /// The keys of generation `key_gen`, derived from `ikm` (the master key
    /// for generation 0, the generation's own secret after it).
    fn derive(ikm: &MasterKey, volume_id: &[u8; 16], key_gen: u16) -> Result<Self, CryptoError> {
        let k = Self::derive_locked(ikm, volume_id, key_gen);
        // The key schedules and HKDF state were built on the stack, in
        // the frames below this one (never in it: the scrub clears only
        // below its caller, and a caller that inlined the work would keep
        // copies that later code moves to the heap as uninitialized bytes).
        scrub_stack();
        k
    }

    #[inline(never)]
    fn derive_locked(
        ikm: &MasterKey,
        volume_id: &[u8; 16],
        key_gen: u16,
    ) -> Result<Self, CryptoError> {
        let mut xts_key = Locked::<[u8; 64]>::new_with(|k| {
            k.write([0u8; 64]);
        })
        .map_err(|_| CryptoError::Memory)?;
        expand(ikm, volume_id, LABEL_XTS, xts_key.as_mut_slice());
        let s = Locked::new_with(|s| {
            let k1 = Aes256::new_from_slice(&xts_key[..32]).expect("32-byte key");
            let k2 = Aes256::new_from_slice(&xts_key[32..]).expect("32-byte key");
            let s = s.write(Schedule {
                xts: Xts::new(k1, k2),
                mac_key: [0u8; 32],
                volume_id: *volume_id,
            });
            expand(ikm, volume_id, LABEL_MAC, &mut s.mac_key);
        })
        .map_err(|_| CryptoError::Memory)?;
        Ok(GenKeys { key_gen, s })
    }

    /// The key generation these keys belong to.
    pub fn key_gen(&self) -> u16 {
        self.key_gen
    }

    /// Encrypts one block in place under the tweak of `tag`.
    pub fn encrypt(&self, tag: Tag, block: &mut [u8]) {
        self.s.xts.encrypt(block, tag.tweak());
    }

    /// Encrypts consecutive blocks of `buf` in place, one tag each.
    pub fn encrypt_blocks(&self, tags: &[Tag], buf: &mut [u8]) {
        for (block, tag) in buf.chunks_exact_mut(crate::BLOCK_SIZE).zip(tags) {
            self.s.xts.encrypt_in_batch(block, tag.tweak());
        }
        scrub_stack_small();
    }

    /// Decrypts one block in place under the tweak of `tag`.
    pub fn decrypt(&self, tag: Tag, block: &mut [u8]) {
        self.s.xts.decrypt(block, tag.tweak());
    }

    /// [`GenKeys::seal`] without clearing the stack after: for one block of
    /// a batch, whose caller calls `scrub_stack_small` once after the
    /// last, from a frame above this call's (the cipher's and the hasher's
    /// frames, which hold key material, are below it).
    pub fn seal_in_batch(&self, tag: Tag, block: &mut [u8]) -> Mac {
        self.s.xts.encrypt_in_batch(block, tag.tweak());
        self.keyed_hash(tag, block)
    }

    /// [`GenKeys::open`] without clearing the stack after (see
    /// [`GenKeys::seal_in_batch`]): whether the MAC matched; only then is
    /// the block decrypted.
    pub fn open_in_batch(&self, tag: Tag, block: &mut [u8], mac: &Mac) -> bool {
        if !self.keyed_hash(tag, block).ct_eq(mac) {
            return false;
        }
        self.s.xts.decrypt_in_batch(block, tag.tweak());
        true
    }

    /// The keyed MAC of a ciphertext, bound to the volume and to `tag`.
    pub fn mac(&self, tag: Tag, ciphertext: &[u8]) -> Mac {
        let m = self.keyed_hash(tag, ciphertext);
        // The hasher held the key (its chaining value) in the frames below.
        scrub_stack_small();
        m
    }

    #[inline(never)]
    fn keyed_hash(&self, tag: Tag, ciphertext: &[u8]) -> Mac {
        // The ciphertext goes first so it lines up with BLAKE3's 1 KiB chunks,
        // which BLAKE3 then hashes in parallel SIMD lanes.
        let mut h = blake3::Hasher::new_keyed(&self.s.mac_key);
        let tag = tag.encode();
        let n = ciphertext.len();
        if n % blake3::CHUNK_LEN == 0 || n > MAC_JOINED {
            h.update(ciphertext);
            h.update(&tag);
            h.update(&self.s.volume_id);
        } else {
            // A ciphertext that ends inside a chunk (a summary's body, a
            // checkpoint's): given in one piece with what follows it, so
            // that the hasher sees each whole chunk followed by more input
            // and hashes them in parallel lanes. Given in three pieces, it
            // compressed the last whole chunk and the partial one 64 bytes
            // at a time (for a summary, 2 of its 4 chunks). Same bytes,
            // same MAC.
            let mut joined = [0u8; MAC_JOINED + MAC_TAIL];
            joined[..n].copy_from_slice(ciphertext);
            joined[n..n + tag.len()].copy_from_slice(&tag);
            joined[n + tag.len()..n + MAC_TAIL].copy_from_slice(&self.s.volume_id);
            h.update(&joined[..n + MAC_TAIL]);
        }
        let full = h.finalize();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&full.as_bytes()[..MAC_LEN]);
        Mac(out)
    }

    /// Encrypts `block` in place and returns its MAC.
    pub fn seal(&self, tag: Tag, block: &mut [u8]) -> Mac {
        let m = self.seal_in_batch(tag, block);
        scrub_stack_small();
        m
    }

    /// Checks the MAC of the ciphertext in `block`, then decrypts it in place.
    /// On a mismatch the block is left as it was.
    pub fn open(&self, tag: Tag, block: &mut [u8], mac: &Mac) -> Result<(), CryptoError> {
        let opened = self.open_in_batch(tag, block, mac);
        scrub_stack_small();
        opened.then_some(()).ok_or(CryptoError::Integrity)
    }
}

impl VolumeKeys {
    /// The keys of a volume that has only key generation 0 (the keys of a
    /// volume never rekeyed).
    pub fn derive(master: &MasterKey, volume_id: &[u8; 16]) -> Self {
        let keys = Self::derive_locked(master, volume_id).expect("locked memory for the keys");
        // The HKDF state was on the stack, in the frames below this one.
        scrub_stack();
        keys
    }

    #[inline(never)]
    fn derive_locked(master: &MasterKey, volume_id: &[u8; 16]) -> Result<Self, CryptoError> {
        let gen0 = GenKeys::derive(master, volume_id, 0)?;
        let root = Locked::new_with(|r| {
            let r = r.write(Root {
                export_root: [0u8; 32],
                volume_id: *volume_id,
            });
            expand(master, volume_id, LABEL_EXPORT, &mut r.export_root);
        })
        .map_err(|_| CryptoError::Memory)?;
        Ok(VolumeKeys {
            root,
            ring: std::sync::RwLock::new(Ring {
                gens: vec![Arc::new(gen0)],
                current: 0,
            }),
        })
    }

    fn ring(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner())
    }

    fn ring_mut(&self) -> std::sync::RwLockWriteGuard<'_, Ring> {
        self.ring.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds key generation `key_gen` (above every one the ring has) from
    /// its secret, and makes it current: new blocks are sealed under it.
    pub fn add_generation(&self, key_gen: u16, secret: &MasterKey) -> Result<(), CryptoError> {
        let g = GenKeys::derive(secret, &self.root.volume_id, key_gen)?;
        let mut r = self.ring_mut();
        if r.gens.last().is_some_and(|l| l.key_gen >= key_gen) {
            return Err(CryptoError::WrongKey);
        }
        r.gens.push(Arc::new(g));
        r.current = key_gen;
        Ok(())
    }

    /// Drops every generation below `key_gen`: blocks sealed under them no
    /// longer open. Their keys are zeroized once the last user lets go.
    pub fn retire_below(&self, key_gen: u16) {
        let mut r = self.ring_mut();
        let current = r.current;
        r.gens.retain(|g| g.key_gen >= key_gen.min(current));
    }

    /// The generation new blocks are sealed under.
    pub fn current(&self) -> Arc<GenKeys> {
        let r = self.ring();
        r.gens
            .iter()
            .find(|g| g.key_gen == r.current)
            .cloned()
            .expect("the current key generation is in the ring")
    }

    /// The keys of generation `key_gen`, if the ring still has them.
    pub fn get(&self, key_gen: u16) -> Option<Arc<GenKeys>> {
        self.ring()
            .gens
            .iter()
            .find(|g| g.key_gen == key_gen)
            .cloned()
    }

    /// The generations in the ring, ascending.
    pub fn generations(&self) -> Vec<u16> {
        self.ring().gens.iter().map(|g| g.key_gen).collect()
    }

    pub fn volume_id(&self) -> &[u8; 16] {
        &self.root.volume_id
    }

    /// The key that signs this volume's exports (Ed25519): anyone who can
    /// unlock the volume can derive it, nobody else; its public half says
    /// which volume an export came from.
    pub fn export_signing_key(&self) -> ed25519_dalek::SigningKey {
        let hk = Hkdf::<Sha256>::new(None, &self.root.export_root);
        let mut seed = Zeroizing::new([0u8; 32]);
        hk.expand(b"lsvfs v1 export signing key", &mut seed[..])
            .expect("32 bytes");
        ed25519_dalek::SigningKey::from_bytes(&seed)
    }

    /// The key that seals export `export_id`'s key in its volume slot:
    /// anyone who can unlock this volume can derive it, nobody else.
    pub fn export_slot_key(&self, export_id: &[u8; 16]) -> Zeroizing<[u8; 32]> {
        let hk = Hkdf::<Sha256>::new(Some(export_id), &self.root.export_root);
        let mut out = Zeroizing::new([0u8; 32]);
        hk.expand(b"lsvfs v1 export volume slot key", &mut out[..])
            .expect("32 bytes");
        out
    }

    /// Whether `mac` is the MAC of `ciphertext` under `tag`, with the keys
    /// of the generation the tag names (false if the ring lacks them).
    pub fn verify(&self, tag: Tag, ciphertext: &[u8], mac: &Mac) -> bool {
        self.get(tag.key)
            .is_some_and(|g| g.mac(tag, ciphertext).ct_eq(mac))
    }

    /// Checks the MAC of the ciphertext in `block` under the generation
    /// the tag names, then decrypts it in place. A generation the ring
    /// lacks fails like a wrong MAC.
    pub fn open(&self, tag: Tag, block: &mut [u8], mac: &Mac) -> Result<(), CryptoError> {
        match self.get(tag.key) {
            Some(g) => g.open(tag, block, mac),
            None => Err(CryptoError::Integrity),
        }
    }
}
