//! Snapshot metadata: the snapshot list, the held table and the changed
//! bitmaps waiting for the next snapshot, as one byte string cut into
//! sealed pages (docs/FORMAT.md, "Snapshot metadata").

use std::collections::HashMap;

use super::super::{Generation, SnapshotId};
use super::{TreePtr, DATA_START, MAX_PBA, TREE_PTR_LEN};
use crate::crypto::Mac;
use crate::volume::{Result, VolumeError};
use crate::BLOCK_SIZE;

/// Most snapshots one volume keeps.
pub const MAX_SNAPSHOTS: usize = 1024;
/// Largest snapshot id: ids are never reused, and a mount numbers a
/// snapshot's inodes with 23 bits of id (see the mount's inode numbering).
pub const MAX_SNAPSHOT_ID: u64 = (1 << 23) - 1;
/// Longest snapshot name, in bytes.
pub const SNAPSHOT_NAME_MAX: usize = 255;
/// Payload bytes per metadata leaf page (after its 4-byte length).
pub const LEAF_PAYLOAD: usize = BLOCK_SIZE - 4;

/// A snapshot as it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapRecord {
    /// Never reused within a volume.
    pub id: SnapshotId,
    pub name: String,
    pub created_sec: i64,
    pub created_nsec: u32,
    /// Every block it references has a generation below this.
    pub birth: Generation,
    /// The checkpoint whose block map it froze.
    pub checkpoint_seq: u64,
    /// Logical blocks mapped in it.
    pub allocated: u64,
    pub map: TreePtr,
    /// Changed bitmaps whose union is every block written or trimmed since
    /// the previous snapshot (one per interval, merged when snapshots
    /// between are deleted).
    pub changed: Vec<TreePtr>,
}

fn put(out: &mut Vec<u8>, v: &[u8]) {
    out.extend_from_slice(v);
}

fn ptr_bytes(p: &TreePtr) -> [u8; TREE_PTR_LEN] {
    let mut b = [0u8; TREE_PTR_LEN];
    p.encode(&mut b);
    b
}

/// The persisted snapshot metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapMeta {
    pub next_id: u64,
    pub snaps: Vec<SnapRecord>,
    /// Changed bitmaps of deleted snapshots whose changes now belong to the
    /// interval after the newest snapshot.
    pub live_changed: Vec<TreePtr>,
    /// Generation -> location of every block that only snapshots reference.
    pub held: HashMap<Generation, u64>,
    /// Generation -> (key generation, MAC) of every held block sealed under
    /// a key generation above 0.
    pub seals: HashMap<Generation, (u16, Mac)>,
}

/// A read of the snapshot metadata that ran past its end.
fn need<T>(v: Option<T>) -> Result<T> {
    v.ok_or_else(|| VolumeError::Corrupted("snapshot metadata ends early".to_string()))
}

/// Checks a snapshot name: 1..=255 bytes of UTF-8, no `/` or NUL, not `.`
/// or `..`.
pub fn check_snapshot_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > SNAPSHOT_NAME_MAX
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
    {
        return Err(VolumeError::InvalidArgument(format!(
            "{name:?} is not a valid snapshot name (1 to {SNAPSHOT_NAME_MAX} bytes, no '/' or NUL, not . or ..)"
        )));
    }
    Ok(())
}

impl SnapMeta {
    /// Nothing to store: no snapshot was ever taken (ids are never reused,
    /// so once one was, `next_id` is kept).
    pub fn is_empty(&self) -> bool {
        self.next_id <= 1
            && self.snaps.is_empty()
            && self.held.is_empty()
            && self.live_changed.is_empty()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.held.len() * 16);
        put(&mut out, &self.next_id.to_le_bytes());
        put(&mut out, &(self.snaps.len() as u32).to_le_bytes());
        for s in &self.snaps {
            put(&mut out, &s.id.0.to_le_bytes());
            put(&mut out, &s.created_sec.to_le_bytes());
            put(&mut out, &s.created_nsec.to_le_bytes());
            put(&mut out, &s.birth.0.to_le_bytes());
            put(&mut out, &s.checkpoint_seq.to_le_bytes());
            put(&mut out, &s.allocated.to_le_bytes());
            put(&mut out, &ptr_bytes(&s.map));
            put(&mut out, &(s.changed.len() as u16).to_le_bytes());
            for c in &s.changed {
                put(&mut out, &ptr_bytes(c));
            }
            put(&mut out, &[s.name.len() as u8]);
            put(&mut out, s.name.as_bytes());
        }
        put(&mut out, &(self.live_changed.len() as u16).to_le_bytes());
        for c in &self.live_changed {
            put(&mut out, &ptr_bytes(c));
        }
        let mut held: Vec<(u64, u64)> = self.held.iter().map(|(g, p)| (g.0, *p)).collect();
        held.sort_unstable();
        put(&mut out, &(held.len() as u64).to_le_bytes());
        for (g, p) in held {
            put(&mut out, &g.to_le_bytes());
            // A held block sealed under a key generation above 0 has it in
            // the location's top 16 bits, and its MAC after.
            match self.seals.get(&Generation(g)) {
                Some((k, mac)) if *k != 0 => {
                    put(&mut out, &(p | ((*k as u64) << 48)).to_le_bytes());
                    put(&mut out, &mac.0);
                }
                _ => put(&mut out, &p.to_le_bytes()),
            }
        }
        out
    }

    /// Decodes and validates: every location inside the volume, ids
    /// increasing and below `next_id`, births increasing and below
    /// `gen_limit`, names valid and distinct.
    pub fn decode(b: &[u8], end_block: u64, gen_limit: Generation) -> Result<SnapMeta> {
        let bad = |what: String| VolumeError::Corrupted(format!("snapshot metadata: {what}"));
        let in_volume = |p: &TreePtr| p.is_absent() || (p.pba >= DATA_START && p.pba < end_block);
        let mut r = crate::wire::Reader::new(b);
        let next_id = need(r.u64())?;
        if next_id == 0 || next_id > u64::MAX / 2 {
            return Err(bad(format!("next snapshot id {next_id}")));
        }
        let n = need(r.u32())? as usize;
        if n > MAX_SNAPSHOTS {
            return Err(bad(format!("{n} snapshots (at most {MAX_SNAPSHOTS})")));
        }
        let mut snaps: Vec<SnapRecord> = Vec::with_capacity(n);
        for _ in 0..n {
            let id = SnapshotId(need(r.u64())?);
            let created_sec = need(r.u64())? as i64;
            let created_nsec = need(r.u32())?;
            let birth = Generation(need(r.u64())?);
            let checkpoint_seq = need(r.u64())?;
            let allocated = need(r.u64())?;
            let map = TreePtr::decode(need(r.take(TREE_PTR_LEN))?);
            let nc = need(r.u16())? as usize;
            let mut changed = Vec::with_capacity(nc);
            for _ in 0..nc {
                changed.push(TreePtr::decode(need(r.take(TREE_PTR_LEN))?));
            }
            let len = need(r.u8())? as usize;
            let name = String::from_utf8(need(r.take(len))?.to_vec())
                .map_err(|_| bad(format!("snapshot {id} has a name that is not UTF-8")))?;
            check_snapshot_name(&name)
                .map_err(|_| bad(format!("snapshot {id} has an invalid name")))?;
            if id.0 == 0 || id.0 >= next_id || snaps.last().is_some_and(|p| p.id >= id) {
                return Err(bad(format!("snapshot id {id} out of order")));
            }
            if birth > gen_limit || snaps.last().is_some_and(|p| p.birth > birth) {
                return Err(bad(format!(
                    "snapshot {id} has an impossible birth {birth}"
                )));
            }
            if !in_volume(&map) || !changed.iter().all(in_volume) {
                return Err(bad(format!("snapshot {id} points outside the volume")));
            }
            if snaps.iter().any(|s| s.name == name) {
                return Err(bad(format!("two snapshots are named {name:?}")));
            }
            snaps.push(SnapRecord {
                id,
                name,
                created_sec,
                created_nsec,
                birth,
                checkpoint_seq,
                allocated,
                map,
                changed,
            });
        }
        let nl = need(r.u16())? as usize;
        let mut live_changed = Vec::with_capacity(nl);
        for _ in 0..nl {
            let p = TreePtr::decode(need(r.take(TREE_PTR_LEN))?);
            if !in_volume(&p) {
                return Err(bad("a changed bitmap points outside the volume".into()));
            }
            live_changed.push(p);
        }
        let nh = need(r.u64())?;
        if nh > end_block || nh > (r.remaining() / 16) as u64 {
            return Err(bad(format!("{nh} held blocks")));
        }
        let mut held = HashMap::with_capacity(nh as usize);
        let mut seals = HashMap::new();
        for _ in 0..nh {
            let g = Generation(need(r.u64())?);
            let loc = need(r.u64())?;
            let (p, key_gen) = (loc & MAX_PBA, (loc >> 48) as u16);
            if key_gen != 0 {
                let mac = Mac(need(r.take(16))?.try_into().expect("16 bytes"));
                seals.insert(g, (key_gen, mac));
            }
            if !(DATA_START..end_block).contains(&p) || g >= gen_limit {
                return Err(bad(format!("held block {g} at {p} is out of range")));
            }
            if held.insert(g, p).is_some() {
                return Err(bad(format!("held block {g} is listed twice")));
            }
        }
        if r.remaining() != 0 {
            return Err(bad("trailing bytes".into()));
        }
        Ok(SnapMeta {
            next_id,
            snaps,
            live_changed,
            held,
            seals,
        })
    }
}
