//! Keys layer: what the user holds (for now a key file) turned into a
//! volume's master key, through the header's key slots.

mod keyfile;

pub use keyfile::{generate_key_file, read_key_file};

use crate::crypto::{unwrap_key, wrap_key, Kek, MasterKey};
use crate::volume::{Header, KeySlot, SlotKind, KEY_SLOTS};
use crate::{Error, Result};

/// Associated data binding a wrapped key to its volume.
fn associated(volume_id: &[u8; 16]) -> Vec<u8> {
    let mut ad = b"lsvfs v1 key slot ".to_vec();
    ad.extend_from_slice(volume_id);
    ad
}

/// A key-file slot holding `master` wrapped under `kek`.
pub fn key_file_slot(kek: &Kek, master: &MasterKey, volume_id: &[u8; 16]) -> Result<KeySlot> {
    let wrapped = wrap_key(kek, master, &associated(volume_id))
        .map_err(|e| Error::InvalidArgument(format!("wrapping the volume key: {e}")))?;
    Ok(KeySlot {
        kind: SlotKind::KeyFile,
        fingerprint: kek.fingerprint(),
        wrapped,
    })
}

/// Opens the volume's master key with a KEK: finds the slot made for this
/// KEK, unwraps it, and checks the result against the header's key-check value.
pub fn unlock(header: &Header, kek: &Kek) -> Result<MasterKey> {
    let fp = kek.fingerprint();
    let slots: Vec<&KeySlot> = header
        .slots
        .iter()
        .take(KEY_SLOTS)
        .filter(|s| s.kind != SlotKind::Empty && s.fingerprint == fp)
        .collect();
    if slots.is_empty() {
        return Err(Error::WrongKey(
            "no key slot of this volume belongs to this key; check --key-file".into(),
        ));
    }
    for s in slots {
        if let Ok(mk) = unwrap_key(kek, &s.wrapped, &associated(&header.volume_id)) {
            if mk.check_value(&header.volume_id) == header.key_check {
                return Ok(mk);
            }
        }
    }
    Err(Error::WrongKey(
        "the key slot for this key does not open (the header was altered or the key is wrong)"
            .into(),
    ))
}
