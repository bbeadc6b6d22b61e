//! HPKE (RFC 9180, base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 /
//! ChaCha20-Poly1305) sealing of a KEK to the client's one-time key.
//!
//! `info` = `"lsvfs-ks v1 kek"` ‖ volume id (16) ‖ version (u32 BE): the
//! ciphertext can only be opened as that volume's KEK of that version.
//! `aad` = host id (32) ‖ challenge (32): it is bound to the request that
//! asked for it.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as KemTrait, OpModeR, OpModeS, Serializable};
use zeroize::Zeroizing;

use super::{Challenge, HostId, KekVersion, ProtocolError, VolumeId};

type Kem = X25519HkdfSha256;

/// Label at the start of the HPKE `info` string.
pub const KEK_INFO_LABEL: &[u8; 15] = b"lsvfs-ks v1 kek";

/// A KEK sealed to a client's one-time key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedKek {
    /// KEK version, also bound into `info`.
    pub version: KekVersion,
    /// HPKE encapsulated key.
    pub enc: [u8; 32],
    /// Ciphertext: 32-byte KEK and 16-byte tag.
    pub ct: [u8; 48],
}

fn info(volume: VolumeId, version: KekVersion) -> [u8; 35] {
    let mut out = [0u8; 35];
    out[..15].copy_from_slice(KEK_INFO_LABEL);
    out[15..31].copy_from_slice(&volume.0);
    out[31..].copy_from_slice(&version.0.to_be_bytes());
    out
}

fn aad(host: HostId, challenge: Challenge) -> [u8; 64] {
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(&host.0);
    out[32..].copy_from_slice(&challenge.0);
    out
}

/// Server side: seals `kek` to `client_key`.
pub fn seal_kek(
    client_key: &[u8; 32],
    host: HostId,
    challenge: Challenge,
    volume: VolumeId,
    version: KekVersion,
    kek: &[u8; 32],
) -> Result<SealedKek, ProtocolError> {
    let pk = <Kem as KemTrait>::PublicKey::from_bytes(client_key)
        .map_err(|_| ProtocolError::Seal("recipient key"))?;
    // Low-order client keys make the DH output all zero; hpke refuses them
    // with an encapsulation error, which becomes a bad_request.
    let (enc, ct) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &OpModeS::Base,
        &pk,
        &info(volume, version),
        kek,
        &aad(host, challenge),
    )
    .map_err(|_| ProtocolError::Seal("seal"))?;
    let ct: [u8; 48] = ct
        .as_slice()
        .try_into()
        .map_err(|_| ProtocolError::Seal("seal"))?;
    let mut enc_bytes = [0u8; 32];
    enc_bytes.copy_from_slice(&enc.to_bytes());
    Ok(SealedKek {
        version,
        enc: enc_bytes,
        ct,
    })
}

/// Client side: the one-time X25519 key pair a response is sealed to. The
/// private key is zeroized when this is dropped.
pub struct Recipient {
    sk: <Kem as KemTrait>::PrivateKey,
    pk: [u8; 32],
}

impl Recipient {
    /// A fresh key pair from the OS RNG.
    pub fn generate() -> Recipient {
        let (sk, pk) = Kem::gen_keypair();
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&pk.to_bytes());
        Recipient { sk, pk: bytes }
    }

    /// The public key to send as `client_key`.
    pub fn public(&self) -> [u8; 32] {
        self.pk
    }
}

impl std::fmt::Debug for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recipient({})", hex::encode(self.pk))
    }
}

/// Client side: opens a sealed KEK for `volume`.
pub fn open_kek(
    recipient: &Recipient,
    sealed: &SealedKek,
    host: HostId,
    challenge: Challenge,
    volume: VolumeId,
) -> Result<Zeroizing<[u8; 32]>, ProtocolError> {
    let enc = <Kem as KemTrait>::EncappedKey::from_bytes(&sealed.enc)
        .map_err(|_| ProtocolError::Seal("open"))?;
    let plain = Zeroizing::new(
        hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
            &OpModeR::Base,
            &recipient.sk,
            &enc,
            &info(volume, sealed.version),
            &sealed.ct,
            &aad(host, challenge),
        )
        .map_err(|_| ProtocolError::Seal("open"))?,
    );
    let mut kek = Zeroizing::new([0u8; 32]);
    if plain.len() != 32 {
        return Err(ProtocolError::Seal("open"));
    }
    kek.copy_from_slice(&plain);
    Ok(kek)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_binding() {
        let r = Recipient::generate();
        let host = HostId([1; 32]);
        let ch = Challenge([2; 32]);
        let vol = VolumeId([3; 16]);
        let kek = [0x5a; 32];
        let s = seal_kek(&r.public(), host, ch, vol, KekVersion(4), &kek).unwrap();
        assert_eq!(*open_kek(&r, &s, host, ch, vol).unwrap(), kek);

        // Each binding changes the result to an error.
        assert!(open_kek(&r, &s, HostId([9; 32]), ch, vol).is_err());
        assert!(open_kek(&r, &s, host, Challenge([9; 32]), vol).is_err());
        assert!(open_kek(&r, &s, host, ch, VolumeId([9; 16])).is_err());
        let mut other = s.clone();
        other.version = KekVersion(5);
        assert!(open_kek(&r, &other, host, ch, vol).is_err());
        let mut other = s.clone();
        other.ct[0] ^= 1;
        assert!(open_kek(&r, &other, host, ch, vol).is_err());
        assert!(open_kek(&Recipient::generate(), &s, host, ch, vol).is_err());
    }

    #[test]
    fn low_order_client_key_is_an_error_not_a_panic() {
        // The all-zero point is of small order.
        let r = seal_kek(
            &[0; 32],
            HostId([1; 32]),
            Challenge([2; 32]),
            VolumeId([3; 16]),
            KekVersion(1),
            &[0; 32],
        );
        assert!(r.is_err());
    }

    #[test]
    fn info_layout() {
        let i = info(VolumeId([0xee; 16]), KekVersion(0x0a0b0c0d));
        assert_eq!(&i[..15], b"lsvfs-ks v1 kek");
        assert_eq!(&i[15..31], &[0xee; 16]);
        assert_eq!(&i[31..], &[0x0a, 0x0b, 0x0c, 0x0d]);
    }
}
