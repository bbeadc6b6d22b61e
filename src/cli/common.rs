//! What the commands share: the global options, opening volumes, sizes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Error;
use crate::crypto::MasterKey;
use crate::device::{Device, DeviceError, FileDevice};
use crate::keys;
use crate::volume::{self, Options, Volume, VolumeError};

/// The global options every command gets.
pub(super) struct Env {
    pub tuning: Tuning,
    pub store: PathBuf,
    pub server: keys::ServerOptions,
}

impl Env {
    /// The store and key-server settings a mount's options (`store=`,
    /// `timeout=`, `attempts=`) choose instead of the global flags.
    pub fn with_mount_options(self, o: &super::options::MountOptions) -> Env {
        Env {
            store: o.store.clone().unwrap_or(self.store),
            server: keys::ServerOptions {
                timeout: o.timeout.map_or(self.server.timeout, |s| {
                    std::time::Duration::from_secs(s.max(1))
                }),
                attempts: o.attempts.map_or(self.server.attempts, |n| n.max(1)),
            },
            tuning: self.tuning,
        }
    }

    /// Where to get a volume's key: `key_file` if given, else this host's
    /// sealed store and the key server.
    pub fn keys(&self, key_file: Option<PathBuf>) -> Keys {
        Keys {
            key_file,
            store: self.store.clone(),
            server: self.server.clone(),
        }
    }
}

/// Where a command gets a volume's master key: a key file (recovery), or
/// this host's sealed store and the key server.
#[derive(Clone)]
pub(crate) struct Keys {
    pub key_file: Option<PathBuf>,
    pub store: PathBuf,
    pub server: keys::ServerOptions,
}

impl Keys {
    /// The newest checkpoint of the volume this host has recorded (its
    /// rollback record), from the sealed store. None without a store: a
    /// host that never ran `host init` keeps no records. A store that
    /// exists but does not open is an error when the key comes from it
    /// anyway, and only a warning when it does not (a key file).
    pub fn newest_seen(&self, volume_id: &[u8; 16]) -> Result<Option<u64>, Error> {
        match keys::SealedStore::open(&self.store) {
            Ok(st) => Ok(st.seen(volume_id)),
            Err(_) if !keys::SealedStore::exists(&self.store) => Ok(None),
            Err(e) if self.key_file.is_none() => Err(e.into()),
            Err(e) => {
                tracing::warn!("no rollback check for this volume: {e}");
                Ok(None)
            }
        }
    }

    /// Records `checkpoint` as the newest this host has seen of the volume
    /// (`reset`: even if lower, after an accepted rollback). Without a
    /// store nothing is recorded; a failure is logged, never fatal: the
    /// volume itself is fine, only the record lags.
    /// `anchor`: also anchor the store to the TPM counter, if it has one
    /// (at a mount's open and close; not for the records made every minute).
    pub fn record_seen(&self, volume_id: &[u8; 16], checkpoint: u64, reset: bool, anchor: bool) {
        if !keys::SealedStore::exists(&self.store) {
            return;
        }
        let r = keys::SealedStore::update_if(&self.store, anchor, |st| {
            Ok(((), st.record_seen(volume_id, checkpoint, reset)))
        });
        if let Err(e) = r {
            tracing::warn!(
                "could not record checkpoint {checkpoint} of volume {} against rollback: {e}",
                keys::hex(volume_id)
            );
        }
    }

    /// The master key of the volume at `path` whose header is `header`.
    pub fn master(&self, header: &volume::Header, path: &Path) -> Result<MasterKey, Error> {
        self.master_and_rekey(header, path).map(|(m, _)| m)
    }

    /// [`Keys::master`], and the key servers that asked for a rekey (they
    /// declared the volume compromised; a mount starts one and reports it).
    pub fn master_and_rekey(
        &self,
        header: &volume::Header,
        path: &Path,
    ) -> Result<(MasterKey, Vec<String>), Error> {
        volume::refuse_erased(header, &path.display().to_string())?;
        match &self.key_file {
            Some(f) => Ok((keys::unlock(header, &keys::read_key_file(f)?)?, Vec::new())),
            None => {
                let got = keys::unlock_with_server(&self.store, &self.server, header, false);
                // Shares, KEKs and the combined key passed through the
                // frames below this one.
                lsvfs_keyserver::secret::scrub_stack();
                let (m, r, rekey) = got?;
                for w in r {
                    tracing::info!(
                        "rewrapped the volume key from KEK v{} to v{} of {}",
                        w.from,
                        w.to,
                        w.server
                    );
                }
                Ok((m, rekey))
            }
        }
    }
}

/// Volume options from the command line's global flags.
pub(super) struct Tuning {
    pub crypto_threads: usize,
    pub chunk_bytes: usize,
}

/// Parses "100G", "512M", "4096" into bytes.
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => {
                    return Err(Error::Usage(format!(
                        "unknown size suffix in {s:?}; use K, M, G, T or P"
                    )))
                }
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| Error::Usage(format!("{s:?} is not a size (examples: 4096, 512M, 100G)")))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| Error::Usage(format!("size {s:?} is too large")))
}

/// The header of the volume at `path`, read without its lock: a mount
/// may hold the volume (the header's two checksummed copies are consistent
/// on their own; nothing past the header is).
pub(super) fn header_unlocked(path: &Path) -> Result<volume::Header, Error> {
    let dev = FileDevice::open_unlocked(path)
        .map_err(|e| DeviceError::new(format!("opening {}", path.display()), e))?;
    volume::read_header(&dev).map_err(|e| with_path(e, path))
}

/// A volume held by a mount says where it is mounted, and the way out.
pub(super) fn open_device(path: &Path, writable: bool) -> Result<Arc<dyn Device>, Error> {
    FileDevice::open(path, writable)
        .map(|d| Arc::new(d) as Arc<dyn Device>)
        .map_err(|e| {
            let held = e.kind() == std::io::ErrorKind::WouldBlock;
            match held.then(|| super::mounts::mountpoint_of(path)).flatten() {
                Some(m) => Error::Busy(format!(
                    "{} is mounted on {}: this command opens the volume itself, so unmount it \
                     first (`lsvfs unmount {}`); `lsvfs info`, `snapshot` and `rekey` work \
                     while it is mounted",
                    path.display(),
                    m.display(),
                    shell_word(&m)
                )),
                None => DeviceError::new(format!("opening {}", path.display()), e).into(),
            }
        })
}

/// `p` as one shell word, for a command a message suggests.
pub(super) fn shell_word(p: &Path) -> String {
    let s = p.display().to_string();
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"/._-+,:@%=".contains(&b);
    if !s.is_empty() && s.bytes().all(plain) {
        return s;
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Names the file in "not an lsvfs volume".
pub(super) fn with_path(e: VolumeError, path: &Path) -> Error {
    match e {
        VolumeError::NotAVolume(_) => VolumeError::NotAVolume(path.display().to_string()).into(),
        VolumeError::IncompleteRestore(_) => {
            VolumeError::IncompleteRestore(path.display().to_string()).into()
        }
        e => e.into(),
    }
}

pub(super) fn open_volume(
    path: &Path,
    k: &Keys,
    read_only: bool,
    t: &Tuning,
) -> Result<Volume, Error> {
    let dev = open_device(path, !read_only)?;
    let header = volume::read_header(&*dev).map_err(|e| with_path(e, path))?;
    refuse_restoring(&header, path)?;
    let master = k.master(&header, path)?;
    open_with(dev, &master, read_only, t)
}

/// Refuses a volume whose restore has not finished, before any key is
/// asked for.
pub(super) fn refuse_restoring(h: &volume::Header, path: &Path) -> Result<(), Error> {
    if h.restoring {
        return Err(VolumeError::IncompleteRestore(path.display().to_string()).into());
    }
    Ok(())
}

pub(super) fn open_with(
    dev: Arc<dyn Device>,
    master: &MasterKey,
    read_only: bool,
    t: &Tuning,
) -> Result<Volume, Error> {
    let opts = Options {
        read_only,
        background: false,
        crypto_threads: t.crypto_threads,
        chunk_bytes: t.chunk_bytes,
        ..Options::default()
    };
    Ok(Volume::open(dev, master, opts)?)
}

/// A progress bar showing `template`'s fields after "`what`: [bar]".
pub(super) fn progress_bar(
    what: &'static str,
    total: u64,
    template: &str,
) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!("{{msg}}: {template}"))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what);
    bar
}

pub(super) fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// Writes a file and starts its write-back every [`WriteBehind::STEP`]
/// bytes, then waits for the write-back started a step before: the disk
/// writes while the export reads and seals, and the final fsync finds
/// little left, instead of gigabytes of dirty pages written at the end (or
/// in bursts when the kernel's dirty limit throttles the writer). Offsets
/// are the file's own, from where writing began (a descriptor handed over
/// may be positioned anywhere); on a pipe the hints fail and are ignored.
pub(crate) struct WriteBehind<'a> {
    file: &'a std::fs::File,
    /// The file offset of the next byte written.
    at: u64,
    /// Write-back started up to here.
    started: u64,
    /// Write-back waited for up to here.
    waited: u64,
}

impl<'a> WriteBehind<'a> {
    const STEP: u64 = 16 << 20;

    pub(crate) fn new(file: &'a std::fs::File) -> Self {
        use std::io::Seek;
        let start = (&mut &*file).stream_position().unwrap_or(0);
        WriteBehind {
            file,
            at: start,
            started: start,
            waited: start,
        }
    }
}

impl std::io::Write for WriteBehind<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = (&mut &*self.file).write(buf)?;
        self.at += n as u64;
        if self.at - self.started >= Self::STEP {
            use crate::device::sync_file_range;
            let len = self.at - self.started;
            sync_file_range(self.file, self.started, len, libc::SYNC_FILE_RANGE_WRITE);
            // The step started last time has had a step's time. (A length
            // of 0 would mean "to the end of the file".)
            if self.started > self.waited {
                let len = self.started - self.waited;
                sync_file_range(
                    self.file,
                    self.waited,
                    len,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE,
                );
            }
            self.waited = self.started;
            self.started = self.at;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_quote_what_the_shell_would_split() {
        assert_eq!(shell_word(Path::new("/mnt/data-1")), "/mnt/data-1");
        assert_eq!(shell_word(Path::new("/mnt/my data")), "'/mnt/my data'");
        assert_eq!(shell_word(Path::new("/mnt/it's")), r"'/mnt/it'\''s'");
        assert_eq!(shell_word(Path::new("")), "''");
    }
}
