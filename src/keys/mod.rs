//! Keys layer: what the host holds turned into a volume's master key. Two
//! ways in: the sealed store plus a KEK released by the key server (the
//! normal path), or a key file matching one of the header's key slots (the
//! recovery path).

mod error;
mod keyfile;
pub mod sealed;

pub use error::{KeysError, Result};
pub use keyfile::{generate_key_file, parse_key_file, read_key_file};
pub use sealed::{SealedStore, VolumeEntry, DEFAULT_STORE};

use std::path::Path;
use std::time::Duration;

use lsvfs_keyserver::client::{self, ClientConfig, ClientError, HostIdentity};
use zeroize::Zeroizing;

use crate::crypto::{unwrap_key, wrap_key, Kek, MasterKey};
use crate::volume::{Header, KeySlot, SlotKind, KEY_SLOTS};

/// Associated data binding a wrapped key to its volume.
fn associated(volume_id: &[u8; 16]) -> Vec<u8> {
    let mut ad = b"lsvfs v1 key slot ".to_vec();
    ad.extend_from_slice(volume_id);
    ad
}

/// A key-file slot holding `master` wrapped under `kek`.
pub fn key_file_slot(kek: &Kek, master: &MasterKey, volume_id: &[u8; 16]) -> Result<KeySlot> {
    let wrapped = wrap_key(kek, master, &associated(volume_id))
        .map_err(|e| KeysError::Invalid(format!("wrapping the volume key: {e}")))?;
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
        return Err(KeysError::WrongKey(
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
    Err(KeysError::WrongKey(
        "the key slot for this key does not open (the header was altered or the key is wrong)"
            .into(),
    ))
}

/// How commands reach the key server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Limit for one exchange with the key server.
    pub timeout: Duration,
    /// Attempts on connection failures and 5xx.
    pub attempts: u32,
}

/// Seconds one exchange with the key server may take, by default.
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;
/// Tries to reach the key server before giving up, by default.
pub const DEFAULT_ATTEMPTS: u32 = 4;

impl Default for ServerOptions {
    /// The defaults of `lsvfs --timeout` and `--attempts`.
    fn default() -> Self {
        ServerOptions {
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
            attempts: DEFAULT_ATTEMPTS,
        }
    }
}

fn client_config(store: &SealedStore, o: &ServerOptions) -> ClientConfig {
    ClientConfig {
        url: store.keyserver_url.clone(),
        ca_pem: Some(store.ca_pem.clone()),
        timeout: o.timeout,
        attempts: o.attempts,
    }
}

fn from_client(e: ClientError) -> KeysError {
    match e {
        ClientError::Refused { .. } => KeysError::Refused(e.to_string()),
        _ => KeysError::KeyServer(e.to_string()),
    }
}

fn kek_of(k: &client::Kek) -> Kek {
    Kek::from_bytes(Zeroizing::new(*k.key))
}

/// The host id (Ed25519 public key, hex) of the store's identity.
pub fn host_id(store: &SealedStore) -> String {
    HostIdentity::from_secret(&store.identity).public_hex()
}

/// Registers a new volume with the key server and seals its master key,
/// wrapped under the returned KEK, in the store (saved).
pub fn register_volume(
    store_dir: &Path,
    o: &ServerOptions,
    volume_id: &[u8; 16],
    master: &MasterKey,
) -> Result<()> {
    let store = SealedStore::open(store_dir)?;
    let host = HostIdentity::from_secret(&store.identity);
    let kek = client::register_volume(&client_config(&store, o), &host, *volume_id)
        .map_err(from_client)?;
    let wrapped = wrap_key(&kek_of(&kek), master, &associated(volume_id))
        .map_err(|e| KeysError::Invalid(format!("wrapping the volume key: {e}")))?;
    SealedStore::update(store_dir, |st| {
        st.put(VolumeEntry {
            volume_id: *volume_id,
            kek_version: kek.version,
            wrapped,
        });
        Ok(())
    })
}

/// The normal unlock: finds the volume's wrapped key in the sealed store,
/// asks the key server for its KEK (proving this host's identity), unwraps
/// the key and checks it against the header. When the server has a newer
/// KEK, rewraps the key under it, saves the store and tells the server;
/// then also returns the KEK versions before and after.
pub fn unlock_with_server(
    store_dir: &Path,
    o: &ServerOptions,
    header: &Header,
) -> Result<(MasterKey, Option<(u32, u32)>)> {
    let store = SealedStore::open(store_dir)?;
    let vid = header.volume_id;
    let hex = hex(&vid);
    let entry = store.entry(&vid).cloned().ok_or_else(|| {
        KeysError::SealedStore(format!(
            "this host's sealed store ({}) holds no key for volume {hex}; \
             it was created on another host: open it with its recovery key (--key-file)",
            store_dir.display()
        ))
    })?;
    let host = HostIdentity::from_secret(&store.identity);
    let cfg = client_config(&store, o);
    let got = client::unlock(&cfg, &host, vid, entry.kek_version).map_err(from_client)?;
    let master = unwrap_key(&kek_of(&got.kek), &entry.wrapped, &associated(&vid))
        .ok()
        .filter(|mk| mk.check_value(&vid) == header.key_check)
        .ok_or_else(|| {
            KeysError::WrongKey(format!(
                "the key server's KEK v{} does not open the sealed key of volume {hex}; \
                 the sealed store and the volume do not belong together",
                entry.kek_version
            ))
        })?;
    let mut rewrapped = None;
    if let Some(newest) = got.newest {
        let wrapped = wrap_key(&kek_of(&newest), &master, &associated(&vid))
            .map_err(|e| KeysError::Invalid(format!("wrapping the volume key: {e}")))?;
        SealedStore::update(store_dir, |st| {
            st.put(VolumeEntry {
                volume_id: vid,
                kek_version: newest.version,
                wrapped,
            });
            Ok(())
        })?;
        rewrapped = Some((entry.kek_version, newest.version));
        // The key is safe under the new KEK either way; if the server does
        // not hear of it now, it keeps the old version a while longer.
        if let Err(e) = client::report_rewrapped(&cfg, &host, vid, newest.version) {
            tracing::warn!(
                "could not tell the key server about the rewrap, so it keeps the \
                 old KEK for now; run `lsvfs rewrap` (volume unmounted) to report it: {e}"
            );
        }
    }
    Ok((master, rewrapped))
}

/// Crypto-erase on the key server's side: asks it to destroy every KEK of
/// the volume (it checks that this host is authorized, and audits it),
/// then drops this host's sealed copy and rollback record. Returns the
/// KEK versions destroyed, or None when this host's store holds no key
/// for the volume (nothing to ask; only the rollback record is dropped).
/// A server that no longer knows the volume has erased it already.
pub fn erase_with_server(
    store_dir: &Path,
    o: &ServerOptions,
    volume_id: &[u8; 16],
) -> Result<Option<Vec<u32>>> {
    if !SealedStore::exists(store_dir) {
        return Ok(None);
    }
    let store = SealedStore::open(store_dir)?;
    let destroyed = match store.entry(volume_id) {
        None => None,
        Some(_) => {
            let host = HostIdentity::from_secret(&store.identity);
            match client::erase_volume(&client_config(&store, o), &host, *volume_id) {
                Ok(v) => Some(v),
                Err(ClientError::Refused {
                    reason: client::Refusal::UnknownVolume,
                    ..
                }) => Some(Vec::new()),
                Err(e) => return Err(from_client(e)),
            }
        }
    };
    SealedStore::update(store_dir, |st| {
        st.forget(volume_id);
        Ok(())
    })?;
    Ok(destroyed)
}

/// Tells the key server again which KEK version this host's sealed key for
/// the volume is wrapped under (after a report that did not get through).
pub fn report_current(store_dir: &Path, o: &ServerOptions, volume_id: &[u8; 16]) -> Result<u32> {
    let store = SealedStore::open(store_dir)?;
    let entry = store
        .entry(volume_id)
        .ok_or_else(|| KeysError::SealedStore("no key for this volume on this host".into()))?;
    let host = HostIdentity::from_secret(&store.identity);
    client::report_rewrapped(
        &client_config(&store, o),
        &host,
        *volume_id,
        entry.kek_version,
    )
    .map_err(from_client)?;
    Ok(entry.kek_version)
}

/// Bytes as lowercase hex (volume ids, fingerprints).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}
