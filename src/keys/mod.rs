//! Keys layer: what the host holds turned into a volume's master key. Two
//! ways in: the sealed store plus a KEK released by the key server (the
//! normal path), or a key file matching one of the header's key slots (the
//! recovery path).

mod error;
mod keyfile;
pub mod sealed;
pub mod threshold;
pub mod tpm;

pub use error::{KeysError, Result};
pub use keyfile::{generate_key_file, parse_key_file, read_key_file};
pub use sealed::{SealedStore, Share, VolumeEntry, DEFAULT_STORE, MAX_SERVERS};

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lsvfs_keyserver::client::{self, ClientConfig, ClientError, HostIdentity};
use zeroize::Zeroizing;

use crate::crypto::{unwrap_key, wrap_key, Kek, MasterKey, WrappedKey};
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

fn client_config(store: &SealedStore, url: &str, o: &ServerOptions) -> ClientConfig {
    ClientConfig {
        url: url.to_string(),
        ca_pem: Some(store.ca_pem.clone()),
        timeout: o.timeout,
        attempts: o.attempts,
    }
}

fn from_client(e: ClientError) -> KeysError {
    match e {
        ClientError::Refused { .. } => KeysError::Refused(e.to_string()),
        ClientError::Unusable(m) => KeysError::WrongKey(m),
        _ => KeysError::KeyServer(e.to_string()),
    }
}

/// The error of a quorum that was not reached: one server's error as it
/// is; for several, every server's answer, refused when the refusals alone
/// make the quorum impossible (a host revoked on enough servers).
fn quorum_failed(
    what: &str,
    k: usize,
    urls: &[String],
    mut failed: Vec<(usize, ClientError)>,
) -> KeysError {
    if urls.len() == 1 && failed.len() == 1 {
        return from_client(failed.remove(0).1);
    }
    let refused = failed
        .iter()
        .filter(|(_, e)| matches!(e, ClientError::Refused { .. }))
        .count();
    let unusable = failed
        .iter()
        .filter(|(_, e)| matches!(e, ClientError::Unusable(_)))
        .count();
    failed.sort_by_key(|(i, _)| *i);
    let each: Vec<String> = failed
        .iter()
        .map(|(i, e)| format!("{}: {e}", urls[*i]))
        .collect();
    let msg = format!(
        "{what} needs {k} of {} key servers and {} failed: {}",
        urls.len(),
        failed.len(),
        each.join("; ")
    );
    // What waiting cannot mend: wrong keys (first), or refusals.
    if unusable > 0 && refused + unusable > urls.len() - k {
        KeysError::WrongKey(msg)
    } else if refused > urls.len() - k {
        KeysError::Refused(msg)
    } else {
        KeysError::KeyServer(msg)
    }
}

fn kek_of(k: &client::Kek) -> Kek {
    Kek::from_bytes(Zeroizing::new(*k.key))
}

/// Associated data of a wrapped share: the volume and the share's x
/// (x = 0, the whole key, keeps the key slot's).
fn share_associated(volume_id: &[u8; 16], x: u8) -> Vec<u8> {
    if x == 0 {
        return associated(volume_id);
    }
    let mut ad = b"lsvfs v1 key share ".to_vec();
    ad.extend_from_slice(volume_id);
    ad.push(x);
    ad
}

fn wrap_share(kek: &client::Kek, y: &[u8; 32], volume_id: &[u8; 16], x: u8) -> Result<WrappedKey> {
    let secret = MasterKey::from_slice(y)?;
    wrap_key(&kek_of(kek), &secret, &share_associated(volume_id, x))
        .map_err(|e| KeysError::Invalid(format!("wrapping the volume key: {e}")))
}

/// The host id (Ed25519 public key, hex) of the store's identity.
pub fn host_id(store: &SealedStore) -> String {
    HostIdentity::from_secret(&store.identity).public_hex()
}

/// Registers a new volume with each of `servers` (every one must answer)
/// and seals its master key in the store (saved): whole under the one
/// server's KEK, or split so that any `threshold` of the servers' KEKs
/// open it.
pub fn register_volume(
    store_dir: &Path,
    o: &ServerOptions,
    volume_id: &[u8; 16],
    master: &MasterKey,
    servers: &[String],
    threshold: usize,
) -> Result<()> {
    let n = servers.len();
    if n == 0
        || n > MAX_SERVERS
        || (n == 1 && threshold != 1)
        || (n > 1 && !(2..=n).contains(&threshold))
    {
        return Err(KeysError::Invalid(format!(
            "--threshold {threshold} with {n} key servers: use 1 with one server, \
             2 to {n} with {n} (at most {MAX_SERVERS} servers)"
        )));
    }
    let store = SealedStore::open(store_dir)?;
    let host = Arc::new(HostIdentity::from_secret(&store.identity));
    let cfgs = servers
        .iter()
        .map(|u| client_config(&store, u, o))
        .collect();
    let vid = *volume_id;
    let mut keks = client::quorum(n, cfgs, false, move |_, cfg| {
        client::register_volume(cfg, &host, vid)
    })
    .map_err(|f| quorum_failed("registering the volume", n, servers, f))?;
    keks.sort_by_key(|(i, _)| *i);
    let shares = if n == 1 {
        let wrapped = wrap_key(&kek_of(&keks[0].1), master, &associated(volume_id))
            .map_err(|e| KeysError::Invalid(format!("wrapping the volume key: {e}")))?;
        vec![Share {
            server: servers[0].clone(),
            x: 0,
            kek_version: keks[0].1.version,
            wrapped,
        }]
    } else {
        let split = threshold::split(master, threshold, n)?;
        split
            .iter()
            .zip(&keks)
            .map(|(sh, (i, kek))| {
                Ok(Share {
                    server: servers[*i].clone(),
                    x: sh.x,
                    kek_version: kek.version,
                    wrapped: wrap_share(kek, &sh.y, volume_id, sh.x)?,
                })
            })
            .collect::<Result<Vec<_>>>()?
    };
    SealedStore::update(store_dir, |st| {
        st.put(VolumeEntry {
            volume_id: *volume_id,
            threshold: threshold as u8,
            shares,
            answered: 0,
        });
        Ok(())
    })
}

/// A share rewrapped under a server's newer KEK at an unlock.
pub struct Rewrapped {
    pub server: String,
    pub from: u32,
    pub to: u32,
}

/// The normal unlock: finds the volume's wrapped key (or shares) in the
/// sealed store, asks its key servers for their KEKs (proving this host's
/// identity) all at once, and goes on as soon as the threshold of them
/// have answered; unwraps, combines and checks the key against the header.
/// Where a server has a newer KEK, rewraps its share under it, saves the
/// store and tells the server. Records which servers answered. With
/// `every`, waits for every server (or its failure) instead, so that each
/// one's newer KEK is seen (`lsvfs rewrap`).
pub fn unlock_with_server(
    store_dir: &Path,
    o: &ServerOptions,
    header: &Header,
    every: bool,
) -> Result<(MasterKey, Vec<Rewrapped>, Vec<String>)> {
    unlock_volume_id(store_dir, o, &header.volume_id, &header.key_check, every)
}

/// [`unlock_with_server`] for a volume known by its id and key-check value
/// alone (an export's volume slot: the volume itself may be gone).
pub fn unlock_volume_id(
    store_dir: &Path,
    o: &ServerOptions,
    volume_id: &[u8; 16],
    key_check: &[u8; 16],
    every: bool,
) -> Result<(MasterKey, Vec<Rewrapped>, Vec<String>)> {
    let store = SealedStore::open(store_dir)?;
    let vid = *volume_id;
    let hex = hex(&vid);
    let entry = store.entry(&vid).cloned().ok_or_else(|| {
        KeysError::SealedStore(format!(
            "this host's sealed store ({}) holds no key for volume {hex}; \
             it was created on another host: open it with its recovery key (--key-file)",
            store_dir.display()
        ))
    })?;
    let host = Arc::new(HostIdentity::from_secret(&store.identity));
    let k = entry.threshold as usize;
    let urls: Vec<String> = entry.shares.iter().map(|s| s.server.clone()).collect();
    let cfgs: Vec<ClientConfig> = urls.iter().map(|u| client_config(&store, u, o)).collect();
    let versions: Vec<u32> = entry.shares.iter().map(|s| s.kek_version).collect();
    let whole = entry.shares.len() == 1 && entry.shares[0].x == 0;
    // Each answer is opened as it comes: a KEK that does not open this
    // host's share counts as that server failing, so a wrong answer from
    // one server (compromised, or restored from an old backup) does not stop
    // the unlock while k others answer.
    let shares: Vec<(u8, WrappedKey)> = entry.shares.iter().map(|s| (s.x, s.wrapped)).collect();
    let asker = host.clone();
    let volume = hex.clone();
    let mut got = client::quorum(k, cfgs.clone(), every, move |i, cfg| {
        let got = client::unlock(cfg, &asker, vid, versions[i])?;
        let (x, wrapped) = &shares[i];
        match unwrap_key(&kek_of(&got.kek), wrapped, &share_associated(&vid, *x)) {
            Ok(secret) => Ok((got, Zeroizing::new(*secret.expose()))),
            Err(_) if whole => Err(ClientError::Unusable(format!(
                "the key server's KEK v{} does not open the sealed key of volume {volume}; \
                 the sealed store and the volume do not belong together",
                versions[i]
            ))),
            Err(_) => Err(ClientError::Unusable(format!(
                "its KEK v{} does not open this host's sealed key share",
                versions[i]
            ))),
        }
    })
    .map_err(|f| quorum_failed("unlocking", k, &urls, f))?;
    got.sort_by_key(|(i, _)| *i);
    let not_ours = |what: String| {
        KeysError::WrongKey(format!(
            "{what} of volume {hex}; the sealed store and the volume do not belong together"
        ))
    };
    let master = if whole {
        MasterKey::from_bytes(got[0].1 .1.clone())
    } else {
        let parts: Vec<threshold::KeyShare> = got
            .iter()
            .map(|(i, (_, y))| threshold::KeyShare {
                x: entry.shares[*i].x,
                y: y.clone(),
            })
            .collect();
        threshold::combine(&parts)?
    };
    if master.check_value(&vid) != *key_check {
        return Err(not_ours(if whole {
            format!(
                "the key server's KEK v{} does not open the sealed key",
                entry.shares[0].kek_version
            )
        } else {
            "the key shares the key servers opened do not open the sealed key (its \
             key-check value differs)"
                .to_string()
        }));
    }
    // Shares under a newer KEK, then one locked update of the store.
    let mut rewraps = Vec::new();
    for (i, (u, y)) in &got {
        if let Some(newest) = &u.newest {
            let s = &entry.shares[*i];
            let wrapped = if s.x == 0 {
                wrap_key(&kek_of(newest), &master, &associated(&vid))
                    .map_err(|e| KeysError::Invalid(format!("wrapping the volume key: {e}")))?
            } else {
                wrap_share(newest, y, &vid, s.x)?
            };
            rewraps.push((*i, newest.version, wrapped));
        }
    }
    let answered = got.iter().fold(0u8, |m, (i, _)| m | 1 << i);
    SealedStore::update_if(store_dir, true, |st| {
        let Some(e) = st.volumes.iter_mut().find(|e| e.volume_id == vid) else {
            return Ok(((), false));
        };
        let mut changed = e.answered != answered;
        e.answered = answered;
        for (i, version, wrapped) in &rewraps {
            // The entry as this unlock read it: a share of the same server
            // and x (another process may have rewrapped it meanwhile).
            let want = &entry.shares[*i];
            if let Some(s) = e
                .shares
                .iter_mut()
                .find(|s| s.x == want.x && s.server == want.server && s.kek_version < *version)
            {
                s.kek_version = *version;
                s.wrapped = *wrapped;
                changed = true;
            }
        }
        Ok(((), changed))
    })?;
    let mut done = Vec::new();
    for (i, version, _) in rewraps {
        // The key is safe under the new KEK either way; if the server does
        // not hear of it now, it keeps the old version a while longer.
        if let Err(e) = client::report_rewrapped(&cfgs[i], &host, vid, version) {
            tracing::warn!(
                "could not tell the key server {} about the rewrap, so it keeps the \
                 old KEK for now; run `lsvfs rewrap` (volume unmounted) to report it: {e}",
                urls[i]
            );
        }
        done.push(Rewrapped {
            server: urls[i].clone(),
            from: entry.shares[i].kek_version,
            to: version,
        });
    }
    // Servers that declared the volume compromised ask for a rekey.
    let rekey: Vec<String> = got
        .iter()
        .filter(|(_, (u, _))| u.rekey)
        .map(|(i, _)| urls[*i].clone())
        .collect();
    Ok((master, done, rekey))
}

/// Tells the key servers in `servers` (those that asked at an unlock) that
/// the volume's data is sealed under a new data key; each clears its
/// compromise mark and audits it. Returns the servers that cleared one.
pub fn report_rekeyed(
    store_dir: &Path,
    o: &ServerOptions,
    volume_id: &[u8; 16],
    servers: &[String],
) -> Result<Vec<String>> {
    let store = SealedStore::open(store_dir)?;
    let host = HostIdentity::from_secret(&store.identity);
    let (mut cleared, mut failed) = (Vec::new(), Vec::new());
    for server in servers {
        match client::report_rekeyed(&client_config(&store, server, o), &host, *volume_id) {
            Ok(true) => cleared.push(server.clone()),
            Ok(false) => {}
            Err(e) => failed.push(format!("{server}: {e}")),
        }
    }
    match failed.len() {
        0 => Ok(cleared),
        _ => Err(KeysError::KeyServer(failed.join("; "))),
    }
}

/// A key server and the KEK versions of a volume it destroyed.
pub type Destroyed = (String, Vec<u32>);

/// Crypto-erase on the key servers' side: asks each of the volume's
/// servers to destroy every KEK of the volume (each checks that this host
/// is authorized, and audits it), then drops this host's sealed copy and
/// rollback record. Returns, per server, the KEK versions destroyed (empty:
/// it had erased them before), or None when this host's store holds no key
/// for the volume (nothing to ask; only the rollback record is dropped).
/// If any server cannot be reached, the sealed entry stays so that running
/// the erase again asks them all again.
pub fn erase_with_server(
    store_dir: &Path,
    o: &ServerOptions,
    volume_id: &[u8; 16],
) -> Result<Option<Vec<Destroyed>>> {
    if !SealedStore::exists(store_dir) {
        return Ok(None);
    }
    let store = SealedStore::open(store_dir)?;
    let destroyed = match store.entry(volume_id) {
        None => None,
        Some(entry) => {
            let host = HostIdentity::from_secret(&store.identity);
            let mut out = Vec::new();
            for s in &entry.shares {
                match client::erase_volume(&client_config(&store, &s.server, o), &host, *volume_id)
                {
                    Ok(v) => out.push((s.server.clone(), v)),
                    Err(ClientError::Refused {
                        reason: client::Refusal::UnknownVolume,
                        ..
                    }) => out.push((s.server.clone(), Vec::new())),
                    Err(e) => {
                        let e = from_client(e);
                        return Err(match e {
                            KeysError::KeyServer(m) if entry.shares.len() > 1 => {
                                KeysError::KeyServer(format!("{}: {m}", s.server))
                            }
                            e => e,
                        });
                    }
                }
            }
            Some(out)
        }
    };
    SealedStore::update(store_dir, |st| {
        st.forget(volume_id);
        Ok(())
    })?;
    Ok(destroyed)
}

/// Tells the volume's key servers that answered at the last unlock again
/// which KEK version this host's share is wrapped under (after a report
/// that did not get through). Returns the servers and versions.
pub fn report_current(
    store_dir: &Path,
    o: &ServerOptions,
    volume_id: &[u8; 16],
) -> Result<Vec<(String, u32)>> {
    let store = SealedStore::open(store_dir)?;
    let entry = store
        .entry(volume_id)
        .ok_or_else(|| KeysError::SealedStore("no key for this volume on this host".into()))?;
    let host = HostIdentity::from_secret(&store.identity);
    let (mut out, mut failed) = (Vec::new(), Vec::new());
    for (i, s) in entry.shares.iter().enumerate() {
        if entry.answered & (1 << i) == 0 {
            continue;
        }
        // Every server hears it, whichever fails.
        match client::report_rewrapped(
            &client_config(&store, &s.server, o),
            &host,
            *volume_id,
            s.kek_version,
        ) {
            Ok(()) => out.push((s.server.clone(), s.kek_version)),
            Err(e) => failed.push(format!("{}: {e}", s.server)),
        }
    }
    match failed.len() {
        0 => Ok(out),
        _ => Err(KeysError::KeyServer(failed.join("; "))),
    }
}

/// Bytes as lowercase hex (volume ids, fingerprints).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}
