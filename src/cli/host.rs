//! This host's identity and a volume's keys: host init/show, rewrap,
//! keyslot list/add-recovery/remove.

use std::path::Path;

use super::common::{open_device, with_path, Env};
use super::Error;
use crate::keys::{self, hex};
use crate::volume::{self, KeySlot, KEY_SLOTS};

/// `lsvfs host init --keyserver URL... --ca CA.pem [--tpm [--tpm-pcrs 7]]`.
pub fn init(
    env: &Env,
    keyservers: &[String],
    ca: &Path,
    tpm: Option<Vec<u8>>,
) -> Result<(), Error> {
    let mut pcrs = tpm.clone().unwrap_or_default();
    pcrs.sort_unstable();
    pcrs.dedup();
    if let Some(p) = pcrs.iter().find(|&&p| p > 23) {
        return Err(Error::Usage(format!(
            "--tpm-pcrs {p}: a TPM 2.0 has PCRs 0 to 23"
        )));
    }
    let ca_pem = std::fs::read(ca)
        .map_err(|e| Error::io(format!("reading the CA certificate {}", ca.display()), e))?;
    if !ca_pem.starts_with(b"-----BEGIN") {
        return Err(Error::Usage(format!(
            "{} is not a PEM certificate",
            ca.display()
        )));
    }
    for (i, u) in keyservers.iter().enumerate() {
        if !u.starts_with("https://") {
            return Err(Error::Usage(format!(
                "key server {u} must be an https:// URL"
            )));
        }
        if keyservers[..i].contains(u) {
            return Err(Error::Usage(format!("--keyserver {u} is given twice")));
        }
    }
    let st = keys::SealedStore::init(
        &env.store,
        keyservers,
        ca_pem,
        tpm.as_ref().map(|_| &pcrs[..]),
    )?;
    println!(
        "created the sealed store in {}: {}",
        env.store.display(),
        st.backend()?
    );
    println!("host id: {}", keys::host_id(&st));
    let on = if keyservers.len() == 1 {
        "on the key server".to_string()
    } else {
        format!("on each of the {} key servers", keyservers.len())
    };
    println!(
        "enroll it {on}: lsvfs-keyserver admin enroll NAME {}",
        keys::host_id(&st)
    );
    Ok(())
}

/// `lsvfs host show`.
pub fn show(env: &Env) -> Result<(), Error> {
    let st = keys::SealedStore::open(&env.store)?;
    println!("host id:    {}", keys::host_id(&st));
    println!("key server: {}", st.servers.join(", "));
    println!(
        "sealed store: {}, in {}",
        st.backend()?,
        env.store.display()
    );
    for v in &st.volumes {
        match &v.shares[..] {
            [s] if s.x == 0 => println!("volume {}: KEK v{}", hex(&v.volume_id), s.kek_version),
            shares => println!(
                "volume {}: threshold {} of {}: {}",
                hex(&v.volume_id),
                v.threshold,
                shares.len(),
                shares
                    .iter()
                    .map(|s| format!("{} KEK v{}", s.server, s.kek_version))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    for s in &st.seen {
        println!(
            "volume {}: newest checkpoint seen {} (rollback record)",
            hex(&s.volume_id),
            s.checkpoint
        );
    }
    Ok(())
}

/// `lsvfs rewrap VOLUME`.
pub fn rewrap(env: &Env, path: &Path) -> Result<(), Error> {
    let dev = open_device(path, false)?;
    let h = volume::read_header(&*dev).map_err(|e| with_path(e, path))?;
    volume::refuse_erased(&h, &path.display().to_string())?;
    let (_, r, _) = keys::unlock_with_server(&env.store, &env.server, &h, true)?;
    if r.is_empty() {
        // Report again, in case an earlier report was lost.
        for (server, v) in keys::report_current(&env.store, &env.server, &h.volume_id)? {
            println!(
                "the key of {} is already wrapped under the newest KEK (v{v}) of {server}",
                path.display()
            )
        }
    }
    for w in r {
        println!(
            "rewrapped the key of {} from KEK v{} to v{} of {}",
            path.display(),
            w.from,
            w.to,
            w.server
        );
    }
    Ok(())
}

/// `lsvfs erase VOLUME [--yes]`: the header first (both copies, durably:
/// the one step that needs nothing but the file), then the key server's
/// KEKs and this host's sealed copy. If the key server cannot be reached
/// the command fails after the header is erased, keeping the sealed entry
/// so that running it again still knows to ask the server.
pub fn erase(env: &Env, path: &Path, yes: bool) -> Result<(), Error> {
    // Writable: the device lock refuses a mounted volume (exit code 7).
    let dev = open_device(path, true)?;
    let h = volume::read_header(&*dev).map_err(|e| with_path(e, path))?;
    let id = hex(&h.volume_id);
    if !yes {
        confirm_erase(path, &id)?;
    }
    volume::erase(&*dev)?;
    println!(
        "{}: every key slot and the key-check value zeroed in both header copies{}",
        path.display(),
        if h.erased.is_some() {
            " (it was already erased)"
        } else {
            ""
        }
    );
    drop(dev);
    match keys::erase_with_server(&env.store, &env.server, &h.volume_id)? {
        Some(each) => {
            for (server, v) in each {
                if v.is_empty() {
                    println!(
                        "the key server {server} holds no KEK of volume {id} any more \
                         (erased before)"
                    )
                } else {
                    println!("the key server {server} destroyed KEK versions {v:?} of volume {id}")
                }
            }
        }
        None => println!(
            "this host's sealed store holds no key for volume {id}, so no key server was \
             asked; if one holds its KEKs, its administrator runs \
             `lsvfs-keyserver admin erase-volume {id}`"
        ),
    }
    println!(
        "{} is crypto-erased: nothing opens it any more",
        path.display()
    );
    Ok(())
}

/// Asks on the terminal before an erase; without one, --yes is required.
fn confirm_erase(path: &Path, id: &str) -> Result<(), Error> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(Error::Usage(format!(
            "erase destroys the keys of {} for good and its data with them; \
             pass --yes to confirm",
            path.display()
        )));
    }
    eprint!(
        "This destroys every key of {} (volume {id}); its data cannot be recovered \
         afterwards, by anyone. Type ERASE to go on: ",
        path.display()
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| Error::io("reading the confirmation", e))?;
    if line.trim() != "ERASE" {
        return Err(Error::Usage("not confirmed; nothing was erased".into()));
    }
    Ok(())
}

/// `lsvfs keyslot list VOLUME`.
pub fn slot_list(env: &Env, path: &Path) -> Result<(), Error> {
    let dev = open_device(path, false)?;
    let h = volume::read_header(&*dev).map_err(|e| with_path(e, path))?;
    for (i, sl) in h.slots.iter().enumerate() {
        match sl.kind {
            volume::SlotKind::Empty => println!("slot {i}: empty"),
            k => println!(
                "slot {i}: {k:?} (key fingerprint {})",
                hex(&sl.fingerprint[..8])
            ),
        }
    }
    match keys::SealedStore::open(&env.store) {
        Ok(st) => match st.entry(&h.volume_id) {
            Some(e) if e.shares.len() == 1 => println!(
                "sealed on this host: KEK v{} from {}",
                e.shares[0].kek_version, e.shares[0].server
            ),
            Some(e) => println!(
                "sealed on this host: {} of {}: {}",
                e.threshold,
                e.shares.len(),
                e.shares
                    .iter()
                    .map(|s| format!("KEK v{} from {}", s.kek_version, s.server))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => println!("sealed on this host: no"),
        },
        Err(e) => println!("sealed on this host: no ({e})"),
    }
    Ok(())
}

/// `lsvfs keyslot add-recovery VOLUME --key-file K [--unlock-key-file U]`.
pub fn slot_add_recovery(
    env: &Env,
    path: &Path,
    key_file: &Path,
    unlock_key_file: Option<std::path::PathBuf>,
) -> Result<(), Error> {
    let dev = open_device(path, true)?;
    let mut h = volume::read_header(&*dev).map_err(|e| with_path(e, path))?;
    let master = env.keys(unlock_key_file).master(&h, path)?;
    if !key_file.exists() {
        keys::generate_key_file(key_file)?;
        println!("wrote key file {} (mode 0600)", key_file.display());
    }
    let slot = keys::key_file_slot(&keys::read_key_file(key_file)?, &master, &h.volume_id)?;
    if h.slots
        .iter()
        .any(|s| s.kind != volume::SlotKind::Empty && s.fingerprint == slot.fingerprint)
    {
        return Err(Error::Usage(format!(
            "{} already opens {}",
            key_file.display(),
            path.display()
        )));
    }
    let Some(i) = h
        .slots
        .iter()
        .position(|s| s.kind == volume::SlotKind::Empty)
    else {
        return Err(Error::Usage(format!(
            "all {KEY_SLOTS} key slots of {} are in use; remove one first",
            path.display()
        )));
    };
    h.slots[i] = slot;
    h.seq += 1;
    volume::write_header(&*dev, &h)?;
    println!("added recovery key {} in slot {i}", key_file.display());
    Ok(())
}

/// `lsvfs keyslot remove VOLUME --slot N`: refused for the last way in.
pub fn slot_remove(env: &Env, path: &Path, slot: usize) -> Result<(), Error> {
    let dev = open_device(path, true)?;
    let mut h = volume::read_header(&*dev).map_err(|e| with_path(e, path))?;
    if slot >= KEY_SLOTS || h.slots[slot].kind == volume::SlotKind::Empty {
        return Err(Error::Usage(format!("slot {slot} is empty")));
    }
    let others = h
        .slots
        .iter()
        .enumerate()
        .filter(|(i, s)| *i != slot && s.kind != volume::SlotKind::Empty)
        .count();
    let sealed_here = keys::SealedStore::open(&env.store)
        .map(|st| st.entry(&h.volume_id).is_some())
        .unwrap_or(false);
    if others == 0 && !sealed_here {
        return Err(Error::Usage(format!(
            "slot {slot} is the last way to open {}; add another recovery key first",
            path.display()
        )));
    }
    h.slots[slot] = KeySlot::EMPTY;
    h.seq += 1;
    volume::write_header(&*dev, &h)?;
    println!("removed key slot {slot} of {}", path.display());
    Ok(())
}
