//! Commands on a volume file: keygen, create, info, check.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::common::{human, open_volume, parse_size, progress_bar, Env};
use super::Error;
use crate::crypto::{random_bytes, MasterKey};
use crate::device::{Device, DeviceError, FileDevice};
use crate::error::Class;
use crate::keys::{self, hex};
use crate::volume::{self, CreateOptions, KeySlot, Lba, Volume, VolumeError, KEY_SLOTS};
use crate::BLOCK_SIZE;

/// `lsvfs keygen KEYFILE`.
pub fn keygen(keyfile: &Path) -> Result<(), Error> {
    keys::generate_key_file(keyfile)?;
    println!(
        "wrote key file {} (mode 0600); keep it safe: it opens your volumes",
        keyfile.display()
    );
    Ok(())
}

/// `lsvfs create VOLUME [--size S] [--key-file K] [--keyserver URL]...
/// [--threshold K]` (--size may be left out on a block device).
pub fn create(
    env: &Env,
    path: &Path,
    size: Option<&str>,
    key_file: Option<PathBuf>,
    (keyserver, threshold): (Vec<String>, Option<usize>),
    segment_blocks: u32,
    (rekey_after, rekey_after_bytes): (Option<String>, Option<String>),
) -> Result<(), Error> {
    let policy = super::rekey::parse_policy(rekey_after.as_deref(), rekey_after_bytes.as_deref())?;
    let bytes = match size {
        Some(size) => parse_size(size)?,
        None => largest_on_device(path, segment_blocks)?,
    };
    if bytes == 0 || bytes % BLOCK_SIZE as u64 != 0 {
        return Err(Error::Usage(format!(
            "--size must be a non-zero multiple of 4096 bytes, not {bytes}"
        )));
    }
    let keying = Keying {
        key_file,
        keyserver,
        threshold,
    };
    let h = make_volume(
        env,
        path,
        bytes / BLOCK_SIZE as u64,
        &keying,
        segment_blocks,
        None,
        &mut |v| {
            if let Some((after, bytes)) = policy {
                let st = v.rekey_status()?;
                v.set_rekey_policy(
                    after.unwrap_or(st.after_secs.map(std::time::Duration::from_secs)),
                    bytes.unwrap_or(st.after_bytes),
                )?;
            }
            // SAFETY: getuid/getgid have no preconditions.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            crate::fs::Fs::format(v, uid, gid)?;
            Ok(())
        },
    )?;
    println!(
        "created {}: {} logical, backing store grows to at most {}",
        path.display(),
        human(h.logical_blocks * BLOCK_SIZE as u64),
        human(h.end_block() * BLOCK_SIZE as u64)
    );
    Ok(())
}

/// How a new volume's key is held: a key file's slot, key servers, or both.
pub(super) struct Keying {
    pub key_file: Option<PathBuf>,
    pub keyserver: Vec<String>,
    pub threshold: Option<usize>,
}

/// `create` without --size: the largest volume a block device holds.
fn largest_on_device(path: &Path, segment_blocks: u32) -> Result<u64, Error> {
    use std::os::unix::fs::FileTypeExt;
    let block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    volume::check_segment_blocks(segment_blocks)?;
    if !block {
        return Err(Error::Usage(format!(
            "give --size for {}: a volume in a file needs its logical size (only a block \
             device's defaults to the largest it holds)",
            path.display()
        )));
    }
    let dev = crate::device::FileDevice::open_unlocked(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let have = crate::device::Device::len(&dev)
        .map_err(|e| Error::io(format!("reading the size of {}", path.display()), e))?;
    let blocks =
        volume::largest_fitting(have / BLOCK_SIZE as u64, segment_blocks).ok_or_else(|| {
            Error::Usage(format!(
                "{} holds {have} bytes: no volume with segments of {segment_blocks} blocks fits \
             (a smaller --segment-blocks may)",
                path.display()
            ))
        })?;
    Ok(blocks * BLOCK_SIZE as u64)
}

/// Makes a new volume at `path` with a new id and master key, keyed as
/// `keying` says, lets `fill` write it (a file system, or a restore's
/// blocks), closes it and registers it with its key servers. With
/// `restoring` (the volume whose exports are restored), the header's
/// restore flag is set from its first write until `fill` has returned and
/// the volume is closed, so a restore that stops half-way leaves a volume
/// nothing mounts; the header then records that source. A volume that
/// fails is removed (a regular file; a block device is left as it is).
pub(super) fn make_volume(
    env: &Env,
    path: &Path,
    logical_blocks: u64,
    keying: &Keying,
    segment_blocks: u32,
    restoring: Option<volume::RestoredFrom>,
    fill: &mut dyn FnMut(&Volume) -> Result<(), Error>,
) -> Result<volume::Header, Error> {
    let (key_file, keyserver) = (&keying.key_file, &keying.keyserver);
    if key_file.is_none() && keyserver.is_empty() {
        return Err(Error::Usage(
            "give --keyserver URL (after `lsvfs host init`), --key-file KEYFILE, or both".into(),
        ));
    }
    let servers = servers_of(env, keyserver)?;
    let threshold = match (servers.len(), keying.threshold) {
        (0, None) => 0,
        (0, Some(_)) => return Err(Error::Usage("--threshold needs --keyserver".into())),
        (1, None | Some(1)) => 1,
        (n, None) => n / 2 + 1,
        (n, Some(k)) if n > 1 && (2..=n).contains(&k) => k,
        (n, Some(k)) => {
            return Err(Error::Usage(format!(
                "--threshold {k} with {n} key server(s): use 1 with one server, \
                 2 to {n} with {n} (one server alone must not open a shared volume)"
            )))
        }
    };
    let master = MasterKey::generate().map_err(|e| Error::Usage(e.to_string()))?;
    let volume_id = *random_bytes::<16>().map_err(|e| Error::Usage(e.to_string()))?;
    let mut slots = [KeySlot::EMPTY; KEY_SLOTS];
    if let Some(kf) = key_file {
        slots[0] = keys::key_file_slot(&keys::read_key_file(kf)?, &master, &volume_id)?;
    }
    let dev = FileDevice::open_for_create(path)
        .map_err(|e| DeviceError::new(format!("creating {}", path.display()), e))?;
    let opts = CreateOptions {
        logical_blocks,
        segment_blocks,
    };
    let fixed = dev.fixed_size();
    let made = (|| {
        let mut h = if restoring.is_some() {
            volume::create_restoring(&dev, &master, volume_id, slots, &opts)?
        } else {
            volume::create(&dev, &master, volume_id, slots, &opts)?
        };
        let dev: Arc<dyn Device> = Arc::new(dev);
        let o = volume::Options {
            restoring: restoring.is_some(),
            background: false,
            crypto_threads: env.tuning.crypto_threads,
            chunk_bytes: env.tuning.chunk_bytes,
            ..volume::Options::default()
        };
        let v = Volume::open(dev.clone(), &master, o)?;
        fill(&v)?;
        v.close()?;
        if let Some(from) = restoring {
            h = volume::finish_restore(&*dev, from)?;
        }
        if !servers.is_empty() {
            keys::register_volume(
                &env.store,
                &env.server,
                &volume_id,
                &master,
                &servers,
                threshold,
            )?;
        }
        Ok::<_, Error>(h)
    })();
    if made.is_err() && !fixed {
        let _ = std::fs::remove_file(path);
    }
    let h = made?;
    if !servers.is_empty() {
        if servers.len() == 1 {
            println!(
                "registered volume {} with the key server; its key is sealed on this host",
                hex(&volume_id)
            );
        } else {
            println!(
                "registered volume {} with {} key servers; any {threshold} of them unlock it, \
                 and its key shares are sealed on this host",
                hex(&volume_id),
                servers.len()
            );
        }
        if key_file.is_none() {
            tracing::warn!(
                "{} has no recovery key: if this host's sealed store \
                 is lost (reinstall, new machine-id), the volume cannot be opened. \
                 Add one now: lsvfs keyslot add-recovery {} --key-file RECOVERY.key",
                path.display(),
                path.display()
            );
        }
    }
    Ok(h)
}

/// The --keyserver URLs of a create, each one this host was set up for
/// (`host init`), without repeats.
fn servers_of(env: &Env, urls: &[String]) -> Result<Vec<String>, Error> {
    if urls.is_empty() {
        return Ok(Vec::new());
    }
    let st = keys::SealedStore::open(&env.store)?;
    let norm = |u: &str| u.trim_end_matches('/').to_string();
    let mut out: Vec<String> = Vec::new();
    for url in urls {
        let Some(known) = st.servers.iter().find(|s| norm(s) == norm(url)) else {
            return Err(Error::Usage(format!(
                "this host is set up for key server(s) {}, not {url}; \
                 run `lsvfs host init` again with every server",
                st.servers.join(", ")
            )));
        };
        if out.contains(known) {
            return Err(Error::Usage(format!("--keyserver {url} is given twice")));
        }
        out.push(known.clone());
    }
    if out.len() > keys::MAX_SERVERS {
        return Err(Error::Usage(format!(
            "at most {} key servers per volume",
            keys::MAX_SERVERS
        )));
    }
    Ok(out)
}

/// `lsvfs info VOLUME [--key-file K]`.
pub fn info(env: &Env, path: &Path, key_file: Option<PathBuf>) -> Result<(), Error> {
    // A mountpoint stands for the volume mounted there.
    let (volume, given) = if path.is_dir() {
        let m = std::fs::canonicalize(path)
            .map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
        let v = super::mounts::volume_on(&m).ok_or_else(|| {
            Error::Usage(format!(
                "{} is a directory no lsvfs volume is mounted on; give a volume (its file \
                 or block device) or the mountpoint of a mounted one",
                path.display()
            ))
        })?;
        (v, Some(m))
    } else {
        (path.to_path_buf(), None)
    };
    let path = volume.as_path();
    // The header only: readable while a mount holds the volume.
    let h = super::common::header_unlocked(path)?;
    let hex: String = h.volume_id.iter().map(|b| format!("{b:02x}")).collect();
    println!("volume:          {}", path.display());
    println!("volume id:       {hex}");
    if let Some(r) = &h.restored_from {
        println!(
            "restored from:   volume {}, exports signed by {} (only its increments apply)",
            crate::keys::hex(&r.volume_id),
            crate::keys::hex(&r.source_key)
        );
    }
    if let Some(t) = h.erased {
        println!("erased:          yes, at {t} (Unix seconds); no key opens it");
    }
    if let Ok(st) = crate::keys::SealedStore::open(&env.store) {
        if let Some(e) = st.entry(&h.volume_id) {
            let answered: Vec<&str> = e
                .shares
                .iter()
                .enumerate()
                .filter(|(i, _)| e.answered & (1 << i) != 0)
                .map(|(_, s)| s.server.as_str())
                .collect();
            println!(
                "key servers:     {} (threshold {} of {})",
                e.shares
                    .iter()
                    .map(|s| format!("{} (KEK v{})", s.server, s.kek_version))
                    .collect::<Vec<_>>()
                    .join(", "),
                e.threshold,
                e.shares.len()
            );
            println!(
                "last unlock:     {}",
                if answered.is_empty() {
                    "none yet".to_string()
                } else {
                    format!("answered by {}", answered.join(", "))
                }
            );
        }
        match st.seen(&h.volume_id) {
            Some(c) => println!("rollback record: checkpoint {c} (the newest this host has seen)"),
            None => println!("rollback record: none on this host yet"),
        }
    }
    let version = if h.key_gens.is_empty() && h.retired_below == 0 {
        1
    } else {
        2
    };
    println!("format version:  {version}");
    let mut gens: Vec<String> = Vec::new();
    if h.retired_below == 0 {
        gens.push("0 (from the master key, since creation)".into());
    }
    for g in &h.key_gens {
        gens.push(format!("{} (since {} Unix seconds)", g.key_gen, g.started));
    }
    let current = h.key_gens.last().map_or(0, |g| g.key_gen);
    println!("key generations: {}; current {current}", gens.join(", "));
    if h.retired_below > 0 {
        println!(
            "retired:         key generations below {} (nothing they sealed opens)",
            h.retired_below
        );
    }
    // The mountpoint given, else where the volume is mounted.
    let mounted = given.or_else(|| super::mounts::mountpoint_of(path));
    if let Some(m) = &mounted {
        println!("mounted on:      {}", m.display());
        let req = super::control::Request::Status {};
        if let Some(st) = super::control::request(m, &req).ok().and_then(|r| r.status) {
            let rings = if st.transport == "io_uring" {
                format!("; requests through its queues: {}", st.ring_requests)
            } else {
                String::new()
            };
            println!("transport:       FUSE over {}{rings}", st.transport);
        }
    }
    let running = mounted.as_deref().and_then(|m| {
        let req = super::control::Request::RekeyStatus {
            resume: false,
            blocks: true,
        };
        super::control::request(m, &req).ok().and_then(|r| r.rekey)
    });
    if let Some(st) = &running {
        if let Some(n) = &st.blocks {
            println!(
                "sealed blocks:   {}",
                super::rekey::blocks_per_generation(n)
            );
        }
        println!("{}", policy_field(st));
    }
    match running {
        Some(st) if st.generations.len() > 1 => println!(
            "rekey:           {} of {} segments left{}",
            st.segments_left,
            st.segments_total,
            if st.running {
                String::new()
            } else {
                format!(
                    " (stopped{}; `lsvfs rekey {}` resumes it)",
                    st.error.map(|e| format!(": {e}")).unwrap_or_default(),
                    mounted.as_deref().unwrap_or(path).display()
                )
            }
        ),
        _ if gens.len() > 1 => println!(
            "rekey:           not finished: older generations still seal blocks; a mount resumes \
             it (`lsvfs rekey MOUNTPOINT --wait` shows its progress), or `lsvfs rekey VOLUME` \
             finishes it here"
        ),
        _ => {}
    }
    println!(
        "logical size:    {} ({} blocks)",
        human(h.logical_blocks * BLOCK_SIZE as u64),
        h.logical_blocks
    );
    println!(
        "segment size:    {} ({} blocks)",
        human(h.segment_blocks as u64 * BLOCK_SIZE as u64),
        h.segment_blocks
    );
    println!(
        "max backing size: {}",
        human(h.end_block() * BLOCK_SIZE as u64)
    );
    for (i, s) in h.slots.iter().enumerate() {
        if s.kind != volume::SlotKind::Empty {
            let fp: String = s.fingerprint[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            println!("key slot {i}:      {:?} (key fingerprint {fp}…)", s.kind);
        }
    }
    if let Some(m) = &mounted {
        // The mount holds the volume: its usage comes from the mount, and
        // needs no key.
        let req = super::control::Request::Usage {};
        match super::control::request(m, &req) {
            Ok(r) => match (r.usage, r.error) {
                (Some(u), _) => print_usage(&u),
                // An older mount, say, that does not know the request.
                (None, e) => println!(
                    "usage:           the mount did not say ({})",
                    e.unwrap_or_else(|| "no answer".into())
                ),
            },
            Err(e) if key_file.is_some() => return Err(e),
            Err(_) => {}
        }
    } else if let Some(kf) = key_file {
        let v = open_volume(path, &env.keys(Some(kf)), true, &env.tuning)?;
        let s = v.stats()?;
        print_usage(&super::control::UsageEntry::of(&s));
        let by_gen = super::rekey::blocks_per_generation(&v.blocks_by_key_gen()?);
        let st = super::control::RekeyEntry::of(v.rekey_status()?, path);
        println!("{}", policy_field(&st));
        println!("sealed blocks:   {by_gen}");
        let r = v.recovery();
        if r.transactions > 0 || r.dropped_records > 0 {
            println!(
                "log to replay:   {} transactions ({} incomplete records)",
                r.transactions, r.dropped_records
            );
        }
    }
    Ok(())
}

/// info's usage lines.
fn print_usage(u: &super::control::UsageEntry) {
    println!(
        "allocated:       {} ({} blocks)",
        human(u.allocated_blocks * BLOCK_SIZE as u64),
        u.allocated_blocks
    );
    println!(
        "segments in use: {} of {} ({} free)",
        u.extent_segments, u.max_segments, u.free_segments
    );
    println!("checkpoint:      {}", u.checkpoint_seq);
    println!(
        "snapshots:       {} (holding {} that the live volume no longer uses)",
        u.snapshots,
        human(u.held_blocks * BLOCK_SIZE as u64)
    );
}

/// info's rekey policy line.
fn policy_field(st: &super::control::RekeyEntry) -> String {
    format!(
        "rekey policy:    {}",
        super::rekey::policy_line(st).trim_start_matches("rekey ")
    )
}

/// `lsvfs check VOLUME [--key-file K]`: the volume, every snapshot's file
/// system and the live one; problems found exit with code 4.
pub fn check(env: &Env, path: &Path, key_file: Option<PathBuf>) -> Result<(), Error> {
    let v = open_volume(path, &env.keys(key_file), true, &env.tuning)?;
    let show = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut bar = None;
    let r = v.check_with_progress(&mut |done, total| {
        if show {
            bar.get_or_insert_with(|| {
                progress_bar(
                    "authenticating data blocks",
                    total,
                    "[{bar:40}] {human_pos}/{human_len} blocks, {eta} left",
                )
            })
            .set_position(done);
        }
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let r = r?;
    let rec = v.recovery();
    println!(
        "checked {} metadata pages and {} data blocks, {} zeroed ({} transactions in the log past the last checkpoint)",
        r.pages, r.data_blocks, r.zeroed_blocks, rec.transactions
    );
    let mut problems = r.problems;
    if holds_file_system(&v) {
        // Each snapshot's file system too: its own tree of inodes,
        // directories and blocks, as frozen.
        for (id, name, _, _) in v.snapshot_names()? {
            let f = crate::fs::Fs::mount(v.snapshot_view(id)?).and_then(|fs| fs.check());
            match f {
                Ok(f) => {
                    println!(
                        "snapshot {name}: {} inodes, {} directory entries, {} data blocks",
                        f.inodes, f.entries, f.data_blocks
                    );
                    problems.extend(
                        f.problems
                            .into_iter()
                            .map(|p| format!("snapshot {name}: {p}")),
                    );
                }
                Err(e) => problems.push(format!("snapshot {name}: {e}")),
            }
        }
        match crate::fs::Fs::mount(v).and_then(|fs| fs.check()) {
            Ok(f) => {
                println!(
                    "file system: {} inodes, {} directory entries, {} data blocks, {} orphans",
                    f.inodes, f.entries, f.data_blocks, f.orphans
                );
                problems.extend(f.problems);
            }
            // A file system this build cannot read is not damage.
            Err(e) if e.class() == Class::NotAVolume => return Err(e.into()),
            Err(e) => problems.push(format!("file system: {e}")),
        }
    } else {
        println!("no file system on this volume (block 0 holds no superblock)");
    }
    if !problems.is_empty() {
        for p in &problems {
            println!("problem: {p}");
        }
        return Err(VolumeError::Corrupted(format!(
            "{} problems found in {}",
            problems.len(),
            path.display()
        ))
        .into());
    }
    println!("{}: clean", path.display());
    Ok(())
}

/// Whether `check` should check a file system on the volume: block 0
/// starts with the file-system magic, or cannot be read (then checking the
/// file system reports why). A damaged or newer superblock is reported, not
/// taken for "no file system".
fn holds_file_system(v: &Volume) -> bool {
    let mut b = vec![0u8; BLOCK_SIZE];
    v.read(Lba(0), &mut b).is_err() || b.starts_with(&crate::fs::format::FS_MAGIC)
}
