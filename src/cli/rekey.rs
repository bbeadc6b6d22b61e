//! `lsvfs rekey TARGET [--wait]`: a new key generation for a volume,
//! mounted (online) or not, and the pass that seals every older block
//! again (see `volume/rekey.rs`).
//!
//! The new generation's secret is wrapped under a key derived from the
//! master key, which only this command holds (a mount keeps only the keys
//! its blocks need): it unlocks the volume as `mount` does (key server or
//! `--key-file`), makes the generation, and hands it to the mount over its
//! root-only control socket, or runs the pass itself when the volume is
//! not mounted.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use super::common::{open_device, open_with, progress_bar, refuse_restoring, with_path, Env};
use super::control::{self, RekeyEntry, Request, SecretHex};
use crate::volume::{self, RekeyStatus, VolumeError};
use crate::Error;

/// What a finished or started rekey reports.
fn describe(generations: &[u16], current: u16) -> String {
    let older: Vec<String> = generations
        .iter()
        .filter(|g| **g != current)
        .map(|g| g.to_string())
        .collect();
    if older.is_empty() {
        format!("every block is sealed under key generation {current}")
    } else {
        format!(
            "new blocks are sealed under key generation {current}; generation {} still seals some",
            older.join(", ")
        )
    }
}

pub fn rekey(
    env: &Env,
    target: &Path,
    key_file: Option<std::path::PathBuf>,
    wait: bool,
    status: bool,
    json: bool,
) -> Result<(), Error> {
    // A mounted volume given by its path is rekeyed online, by its mount.
    let target = &super::mounts::mount_or_self(target);
    if status {
        return show_status(target, json);
    }
    if target.is_dir() {
        mounted(env, target, key_file, wait, json)
    } else {
        unmounted(env, target, key_file, json)
    }
}

fn status_of(mountpoint: &Path, resume: bool, blocks: bool) -> Result<RekeyEntry, Error> {
    let r = control::request(mountpoint, &Request::RekeyStatus { resume, blocks })?;
    if !r.ok {
        return Err(Error::Usage(r.error.unwrap_or_default()));
    }
    r.rekey.ok_or_else(|| {
        Error::Usage(format!(
            "the mount on {} did not say where its rekey stands (is it an older lsvfs?)",
            mountpoint.display()
        ))
    })
}

/// `--status`: where the rekey stands; starts nothing.
fn show_status(target: &Path, json: bool) -> Result<(), Error> {
    let st = if target.is_dir() {
        status_of(target, false, true)?
    } else {
        let h = super::common::header_unlocked(target)?;
        let mut generations: Vec<u16> = h.key_gens.iter().map(|g| g.key_gen).collect();
        if h.retired_below == 0 {
            generations.insert(0, 0);
        }
        RekeyEntry {
            volume: target.display().to_string(),
            current: h.key_gens.last().map_or(0, |g| g.key_gen),
            generations,
            retired_below: h.retired_below,
            ..RekeyEntry::default()
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&st).map_err(|e| Error::Usage(e.to_string()))?
        );
        return Ok(());
    }
    println!(
        "{}: {}",
        target.display(),
        describe(&st.generations, st.current)
    );
    if target.is_dir() {
        println!("policy: {}", policy_line(&st));
    }
    if let Some(n) = &st.blocks {
        println!("sealed blocks: {}", blocks_per_generation(n));
    }
    if in_progress(&st) {
        if st.segments_total > 0 {
            println!(
                "rekey: {} of {} segments left{}",
                st.segments_left,
                st.segments_total,
                if st.running { "" } else { " (stopped)" }
            );
        }
        if let Some(e) = &st.error {
            println!("rekey stopped: {e}");
        }
    }
    Ok(())
}

fn in_progress(e: &RekeyEntry) -> bool {
    e.generations.iter().any(|g| *g != e.current)
}

fn mounted(
    env: &Env,
    mountpoint: &Path,
    key_file: Option<std::path::PathBuf>,
    wait: bool,
    json: bool,
) -> Result<(), Error> {
    // A pass that is due but stopped (an error, or a remount) starts again.
    let mut st = status_of(mountpoint, true, false)?;
    if in_progress(&st) {
        if !json {
            eprintln!(
                "{}: a rekey to key generation {} is already running; {}",
                mountpoint.display(),
                st.current,
                if wait {
                    "waiting for it"
                } else {
                    "`lsvfs rekey --wait` waits for it"
                }
            );
        }
    } else {
        let path = Path::new(&st.volume).to_path_buf();
        // The mount holds the volume's lock.
        let h = super::common::header_unlocked(&path)?;
        let master = env.keys(key_file).master(&h, &path)?;
        let (entry, secret) = volume::new_key_generation(&h, &master)?;
        drop(master);
        let req = Request::Rekey {
            key_gen: entry.key_gen,
            started: entry.started,
            wrapped: crate::keys::hex(&entry.wrapped.0),
            secret: SecretHex(crate::keys::hex(secret.expose())),
        };
        drop(secret);
        let r = control::request(mountpoint, &req)?;
        if !r.ok {
            return Err(Error::Usage(r.error.unwrap_or_default()));
        }
        st = r.rekey.unwrap_or_default();
        if !json {
            eprintln!(
                "{}: rekey started: {}",
                mountpoint.display(),
                describe(&st.generations, st.current)
            );
        }
    }
    if wait {
        st = wait_for(mountpoint, st, json)?;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(&st).map_err(|e| Error::Usage(e.to_string()))?
        );
    } else if wait {
        println!(
            "{}: rekey done: {}",
            mountpoint.display(),
            describe(&st.generations, st.current)
        );
    }
    Ok(())
}

/// Polls the mount until its rekey is done, with a progress bar on a
/// terminal. A pass that stops early is an error naming why.
fn wait_for(mountpoint: &Path, mut st: RekeyEntry, json: bool) -> Result<RekeyEntry, Error> {
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        progress_bar(
            "rekey",
            st.segments_total.max(1),
            "[{bar:40}] {pos}/{len} segments, {eta} left",
        )
    });
    while in_progress(&st) {
        if let Some(b) = &bar {
            b.set_length(st.segments_total.max(1));
            b.set_position(st.segments_total.saturating_sub(st.segments_left));
        }
        if !st.running {
            let why = st.error.clone().unwrap_or_else(|| "it stopped".into());
            return Err(VolumeError::InvalidArgument(format!(
                "the rekey of {} did not finish: {why}; run `lsvfs rekey {}` again to resume it",
                mountpoint.display(),
                mountpoint.display()
            ))
            .into());
        }
        std::thread::sleep(Duration::from_millis(200));
        st = status_of(mountpoint, false, false)?;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(st)
}

/// Rekeys a volume that is not mounted, running the whole pass here.
fn unmounted(
    env: &Env,
    path: &Path,
    key_file: Option<std::path::PathBuf>,
    json: bool,
) -> Result<(), Error> {
    let dev = open_device(path, true)?;
    let h = volume::read_header(&*dev).map_err(|e| with_path(e, path))?;
    refuse_restoring(&h, path)?;
    let master = env.keys(key_file).master(&h, path)?;
    let v = open_with(dev, &master, false, &env.tuning)?;
    let st = v.rekey_status()?;
    if !st.in_progress() {
        let (entry, secret) = volume::new_key_generation(&h, &master)?;
        v.rekey_start(entry, &secret)?;
    } else if !json {
        eprintln!(
            "{}: finishing the rekey to key generation {} that was running",
            path.display(),
            st.current
        );
    }
    drop(master);
    let st = v.rekey_status()?;
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        progress_bar(
            "rekey",
            st.segments_total.max(1),
            "[{bar:40}] {pos}/{len} segments, {eta} left",
        )
    });
    while v.rekey_step()? {
        if let Some(b) = &bar {
            let s = v.rekey_status()?;
            b.set_position(s.segments_total.saturating_sub(s.segments_left));
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let st: RekeyStatus = v.rekey_status()?;
    v.close()?;
    if json {
        let e = RekeyEntry::of(st, path);
        println!(
            "{}",
            serde_json::to_string(&e).map_err(|e| Error::Usage(e.to_string()))?
        );
    } else {
        println!(
            "{}: rekey done: {}",
            path.display(),
            describe(&st.generations, st.current)
        );
    }
    Ok(())
}

/// The policy and where the current generation stands against it.
pub fn policy_line(st: &RekeyEntry) -> String {
    format!(
        "rekey {}; key generation {} is {} old and has sealed {}",
        describe_policy(st.after_secs, st.after_bytes),
        st.current,
        human_secs(st.age_secs),
        super::common::human(st.sealed_bytes)
    )
}

/// Data blocks per key generation, in words.
pub fn blocks_per_generation(n: &std::collections::BTreeMap<u16, u64>) -> String {
    if n.is_empty() {
        return "none".into();
    }
    n.iter()
        .map(|(g, c)| format!("generation {g}: {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A rekey policy's age: a duration (`120d`, `12h`), or `never`.
fn parse_after(v: &str) -> Result<Option<Duration>, Error> {
    if v == "never" {
        return Ok(None);
    }
    let d = humantime::parse_duration(v).map_err(|e| {
        Error::Usage(format!(
            "--rekey-after {v:?}: {e}; write a duration such as 120d or 12h, or never"
        ))
    })?;
    if d.as_secs() == 0 {
        return Err(Error::Usage(format!(
            "--rekey-after {v:?} is under a second; write a duration such as 120d, or never"
        )));
    }
    Ok(Some(d))
}

/// A rekey policy's byte limit: a size (`64T`), or `none`.
fn parse_bytes(v: &str) -> Result<Option<u64>, Error> {
    if v == "none" {
        return Ok(None);
    }
    let b = super::common::parse_size(v)?;
    if b < crate::BLOCK_SIZE as u64 {
        return Err(Error::Usage(format!(
            "--rekey-after-bytes {v:?} is under one block; write a size such as 64T, or none"
        )));
    }
    Ok(Some(b))
}

/// Seconds in the largest whole unit: `120d`, `12h`, `90m`, `7s`; a
/// length of time that is no whole number of them, in the two largest.
pub fn human_secs(s: u64) -> String {
    for (unit, n) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if s >= n && s % n == 0 {
            return format!("{}{unit}", s / n);
        }
    }
    match s {
        86_400.. => format!("{}d {}h", s / 86_400, s % 86_400 / 3_600),
        3_600.. => format!("{}h {}m", s / 3_600, s % 3_600 / 60),
        60.. => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{s}s"),
    }
}

/// The policy `--rekey-after` and `--rekey-after-bytes` give: None if
/// neither is given; each part None if not given (then unchanged).
#[allow(clippy::type_complexity)]
pub fn parse_policy(
    after: Option<&str>,
    bytes: Option<&str>,
) -> Result<Option<(Option<Option<Duration>>, Option<Option<u64>>)>, Error> {
    if after.is_none() && bytes.is_none() {
        return Ok(None);
    }
    Ok(Some((
        after.map(parse_after).transpose()?,
        bytes.map(parse_bytes).transpose()?,
    )))
}

/// Says a policy in words.
pub fn describe_policy(after: Option<u64>, bytes: Option<u64>) -> String {
    let a = after.map_or("never by age".to_string(), |s| {
        format!("after {}", human_secs(s))
    });
    match bytes {
        Some(b) => format!("{a}, or after {} sealed", super::common::human(b)),
        None => a,
    }
}

/// `lsvfs tune VOLUME [--rekey-after DUR|never] [--rekey-after-bytes SIZE|none]`
/// (unmounted): the rekey policy a mount follows by itself.
pub fn tune(
    env: &Env,
    path: &Path,
    key_file: Option<std::path::PathBuf>,
    after: Option<String>,
    bytes: Option<String>,
) -> Result<(), Error> {
    let Some((after, bytes)) = parse_policy(after.as_deref(), bytes.as_deref())? else {
        return Err(Error::Usage(
            "nothing to change: give --rekey-after and/or --rekey-after-bytes".into(),
        ));
    };
    let v = super::common::open_volume(path, &env.keys(key_file), false, &env.tuning)?;
    let st = v.rekey_status()?;
    let after = after.unwrap_or(st.after_secs.map(Duration::from_secs));
    let bytes = bytes.unwrap_or(st.after_bytes);
    v.set_rekey_policy(after, bytes)?;
    let st = v.rekey_status()?;
    v.close()?;
    println!(
        "{}: rekey {}",
        path.display(),
        describe_policy(st.after_secs, st.after_bytes)
    );
    Ok(())
}
