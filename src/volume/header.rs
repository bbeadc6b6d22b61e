//! The volume header (two copies at the start of the device) and the
//! formatting of a new volume.

use super::format::{
    self, Block, Checkpoint, Header, KeySlot, LogPos, RestoredFrom, TreePtr, DATA_START, KEY_SLOTS,
    MAX_LOGICAL_BLOCKS,
};
use super::geometry::{max_segments_for, reserves};
use super::{Generation, SegmentId};
use crate::crypto::{Mac, MasterKey, VolumeKeys};
use crate::device::{read_exact_at, Device};
use crate::volume::{Result, VolumeError};
use crate::BLOCK_SIZE;

/// Parameters fixed when a volume is created.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub logical_blocks: u64,
    pub segment_blocks: u32,
}

/// Reads the volume header: the newest of the two copies that is intact.
pub fn read_header(dev: &dyn Device) -> Result<Header> {
    let mut best: Option<Header> = None;
    let mut errors = Vec::new();
    for (i, blk) in format::HEADER_BLOCKS.iter().enumerate() {
        let mut b: Box<Block> = Box::new([0u8; BLOCK_SIZE]);
        if let Err(e) = read_exact_at(dev, &mut b[..], blk * BLOCK_SIZE as u64) {
            errors.push((i, format!("{e}"), None));
            continue;
        }
        match Header::decode(&b) {
            Ok(h) => {
                if best.as_ref().is_none_or(|b| h.seq > b.seq) {
                    best = Some(h);
                }
            }
            Err(e) => errors.push((i, e.to_string(), Some(e))),
        }
    }
    if let Some(h) = best {
        return Ok(h);
    }
    use format::DecodeError;
    if let Some((_, _, Some(DecodeError::Version { want, have }))) = errors.first() {
        return Err(VolumeError::UnsupportedVersion {
            want: *want,
            have: *have,
        });
    }
    if errors
        .iter()
        .all(|(_, _, e)| matches!(e, None | Some(DecodeError::Magic(_))))
    {
        return Err(VolumeError::NotAVolume("the backing store".into()));
    }
    let why: Vec<String> = errors
        .iter()
        .map(|(i, m, _)| format!("copy {}: {m}", ["A", "B"][*i]))
        .collect();
    Err(VolumeError::Corrupted(format!(
        "both header copies are damaged ({})",
        why.join("; ")
    )))
}

/// Writes a header to both copies, one after the other, each made durable,
/// so that a crash leaves at least one intact.
pub fn write_header(dev: &dyn Device, header: &Header) -> Result<()> {
    let b = header.encode();
    for blk in format::HEADER_BLOCKS {
        dev.write_at(&b[..], blk * BLOCK_SIZE as u64)
            .and_then(|_| dev.flush())
            .map_err(|e| VolumeError::io("writing the volume header", e))?;
    }
    Ok(())
}

/// The key ring of the volume `header` describes, opened with its master
/// key: key generation 0 and every later one the header lists, less the
/// retired ones.
pub fn key_ring(header: &Header, master: &MasterKey) -> Result<VolumeKeys> {
    let keys = VolumeKeys::derive(master, &header.volume_id);
    if header.key_gens.is_empty() {
        return Ok(keys);
    }
    let wrap = crate::crypto::generation_wrap_key(master, &header.volume_id);
    for g in &header.key_gens {
        let binding = crate::crypto::generation_binding(&header.volume_id, g.key_gen);
        let secret = crate::crypto::unwrap_key(&wrap, &g.wrapped, &binding).map_err(|_| {
            VolumeError::Corrupted(format!(
                "the header's key generation {} does not open with the volume's key: the \
                 header is damaged; restore the volume from an export or a copy",
                g.key_gen
            ))
        })?;
        keys.add_generation(g.key_gen, &secret)
            .map_err(|e| VolumeError::Corrupted(format!("key generation {}: {e}", g.key_gen)))?;
    }
    keys.retire_below(header.retired_below);
    Ok(keys)
}

/// A new key generation for the volume `header` describes: the number
/// after its newest, a random secret, and the header entry that keeps the
/// secret wrapped under a key only the master key gives. Refused while the
/// header holds as many generations as it can (a rekey still running).
pub fn new_key_generation(
    header: &Header,
    master: &MasterKey,
) -> Result<(format::KeyGenEntry, MasterKey)> {
    if header.key_gens.len() >= format::MAX_KEY_GENS - 1 {
        return Err(VolumeError::InvalidArgument(format!(
            "the volume already has {} key generations whose blocks are not all sealed again; \
             let the running rekey finish (lsvfs rekey --wait) before starting another",
            header.key_gens.len()
        )));
    }
    let newest = header.key_gens.last().map_or(0, |g| g.key_gen);
    let key_gen = newest.checked_add(1).ok_or_else(|| {
        VolumeError::InvalidArgument("the volume has used every key generation number".into())
    })?;
    let secret = MasterKey::generate()
        .map_err(|e| VolumeError::io("making a new key", std::io::Error::other(e)))?;
    let wrap = crate::crypto::generation_wrap_key(master, &header.volume_id);
    let binding = crate::crypto::generation_binding(&header.volume_id, key_gen);
    let wrapped = crate::crypto::wrap_key(&wrap, &secret, &binding)
        .map_err(|e| VolumeError::io("wrapping a new key", std::io::Error::other(e)))?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok((
        format::KeyGenEntry {
            key_gen,
            started,
            wrapped,
        },
        secret,
    ))
}

/// Adds key generation `entry` to the header (both copies, durably).
pub(super) fn add_key_generation(dev: &dyn Device, entry: format::KeyGenEntry) -> Result<Header> {
    let h = read_header(dev)?;
    if h.key_gens
        .last()
        .is_some_and(|l| l.key_gen >= entry.key_gen)
        || h.key_gens.len() >= format::MAX_KEY_GENS
    {
        return Err(VolumeError::InvalidArgument(format!(
            "key generation {} does not follow the header's newest; start the rekey again",
            entry.key_gen
        )));
    }
    update_header(dev, |old| {
        let mut key_gens = old.key_gens.clone();
        key_gens.push(entry);
        Header { key_gens, ..old }
    })
}

/// Removes every key generation below `key_gen` from the header and marks
/// them retired (both copies, durably): their secrets exist nowhere on the
/// device afterwards.
pub(super) fn retire_key_generations(dev: &dyn Device, key_gen: u16) -> Result<Header> {
    update_header(dev, |old| Header {
        key_gens: old
            .key_gens
            .iter()
            .copied()
            .filter(|g| g.key_gen >= key_gen)
            .collect(),
        retired_below: key_gen.max(old.retired_below),
        ..old
    })
}

/// Refuses an erased volume (`name` names it in the message): checked
/// before any key is looked for.
pub fn refuse_erased(h: &Header, name: &str) -> Result<()> {
    match h.erased {
        Some(_) => Err(VolumeError::Erased(name.to_string())),
        None => Ok(()),
    }
}

/// Crypto-erases the volume on `dev`: both header copies are rewritten
/// with every key slot and the key-check value zeroed and the erased flag
/// set (durably, one copy after the other). Nothing opens the volume
/// afterwards: its master key exists nowhere on the device. Erasing an
/// erased volume rewrites it again (keeping the first erase's time).
pub fn erase(dev: &dyn Device) -> Result<Header> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    update_header(dev, |old| Header {
        key_check: [0; 16],
        slots: [KeySlot::EMPTY; KEY_SLOTS],
        key_gens: Vec::new(),
        retired_below: 0,
        erased: Some(old.erased.unwrap_or(now)),
        ..old
    })
}

/// Reads the header, changes it with `f`, and writes it back (both
/// copies, durably) under the next sequence number.
fn update_header(dev: &dyn Device, f: impl FnOnce(Header) -> Header) -> Result<Header> {
    let old = read_header(dev)?;
    let seq = old.seq + 1;
    let h = Header { seq, ..f(old) };
    write_header(dev, &h)?;
    Ok(h)
}

/// Sets or clears the header's restore-in-progress flag (durably, one
/// copy after the other). While it is set, [`crate::volume::Volume::open`]
/// refuses the volume unless its options allow it.
pub fn set_restoring(dev: &dyn Device, on: bool) -> Result<Header> {
    update_header(dev, |old| Header {
        restoring: on,
        ..old
    })
}

/// Ends a restore into a new volume: clears the restoring flag and records
/// the volume its exports came from, in one header update.
pub fn finish_restore(dev: &dyn Device, from: RestoredFrom) -> Result<Header> {
    update_header(dev, |old| Header {
        restoring: false,
        restored_from: Some(from),
        ..old
    })
}

/// Formats a new volume on `dev` and returns its header.
pub fn create(
    dev: &dyn Device,
    master: &MasterKey,
    volume_id: [u8; 16],
    slots: [KeySlot; KEY_SLOTS],
    opts: &CreateOptions,
) -> Result<Header> {
    create_with(dev, master, volume_id, slots, opts, false)
}

/// [`create`] for `lsvfs restore`: the header carries the restoring flag
/// from its first write, so no moment exists at which the new volume opens
/// as an ordinary one before its restore has finished.
pub fn create_restoring(
    dev: &dyn Device,
    master: &MasterKey,
    volume_id: [u8; 16],
    slots: [KeySlot; KEY_SLOTS],
    opts: &CreateOptions,
) -> Result<Header> {
    create_with(dev, master, volume_id, slots, opts, true)
}

fn create_with(
    dev: &dyn Device,
    master: &MasterKey,
    volume_id: [u8; 16],
    slots: [KeySlot; KEY_SLOTS],
    opts: &CreateOptions,
    restoring: bool,
) -> Result<Header> {
    let seg = opts.segment_blocks;
    super::geometry::check_segment_blocks(seg)?;
    if opts.logical_blocks == 0 || opts.logical_blocks > MAX_LOGICAL_BLOCKS {
        return Err(VolumeError::InvalidArgument(format!(
            "volume size must be between 4 KiB and {} TiB",
            (MAX_LOGICAL_BLOCKS * BLOCK_SIZE as u64) >> 40
        )));
    }
    let max_segments = max_segments_for(opts.logical_blocks, seg);
    let end = DATA_START + max_segments * seg as u64;
    if dev.fixed_size() {
        let have = dev
            .len()
            .map_err(|e| VolumeError::io("reading the device size", e))?;
        if have < end * BLOCK_SIZE as u64 {
            let most = super::geometry::largest_fitting(have / BLOCK_SIZE as u64, seg).map_or_else(
                || "it is too small for any volume".to_string(),
                |l| {
                    format!(
                        "the largest volume it holds has {}K of logical space (`lsvfs create` \
                         without --size makes that one)",
                        l * BLOCK_SIZE as u64 / 1024
                    )
                },
            );
            return Err(VolumeError::InvalidArgument(format!(
                "the device holds {have} bytes but a volume of this size needs {} (lsvfs keeps 25% headroom for the cleaner); {most}",
                end * BLOCK_SIZE as u64
            )));
        }
    }
    let header = Header {
        seq: 1,
        volume_id,
        logical_blocks: opts.logical_blocks,
        segment_blocks: seg,
        max_segments,
        key_check: master.check_value(&volume_id),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        slots,
        erased: None,
        restoring,
        restored_from: None,
        key_gens: Vec::new(),
        retired_below: 0,
    };
    // Both checkpoint slots are cleared first: stale ones from an earlier
    // volume on the same device must not be mistaken for ours.
    let zero = [0u8; BLOCK_SIZE];
    for blk in format::CHECKPOINT_BLOCKS {
        dev.write_at(&zero, blk * BLOCK_SIZE as u64)
            .map_err(|e| VolumeError::io("clearing the checkpoint slots", e))?;
    }
    // The log head, the next segment and the reserve are allocated now, so
    // that the reserve exists even if the host fills up later.
    let initial = 2 + reserves(opts.logical_blocks, seg as u64).2;
    let seg_bytes = seg as u64 * BLOCK_SIZE as u64;
    dev.allocate(DATA_START * BLOCK_SIZE as u64, initial * seg_bytes)
        .map_err(|e| VolumeError::io("reserving the first segments", e))?;
    let keys = VolumeKeys::derive(master, &volume_id);
    let c = Checkpoint {
        seq: 1,
        log: LogPos {
            seq: 1,
            segment: SegmentId(0),
            offset: 0,
            next_segment: SegmentId(1),
            anchor: Mac::default(),
        },
        gen_limit: Generation(1),
        extent: initial,
        allocated: 0,
        changed_since: 1,
        key_gen: 0,
        roots: [TreePtr::ABSENT; 5],
        snap_meta: TreePtr::ABSENT,
        snap_pages: 0,
        rekey_after_secs: 0,
        rekey_after_bytes: 0,
        sealed_blocks: 0,
    };
    let b = super::checkpoint::seal(&keys, &header, &c)?;
    dev.write_at(&b[..], format::CHECKPOINT_BLOCKS[1] * BLOCK_SIZE as u64)
        .and_then(|_| dev.flush())
        .map_err(|e| VolumeError::io("writing the first checkpoint", e))?;
    // The header goes last: until it is written, nothing claims to be a volume.
    write_header(dev, &header)?;
    Ok(header)
}
