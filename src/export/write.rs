//! Writing an export: the plan (which blocks, from the snapshot's
//! allocated bitmap or from the changed bitmaps since the base), then the
//! header, the sealed chunks and the trailer.

use std::io::Write;

use super::format::{
    put_record, Header, Kind, RecordKind, SnapRef, Trailer, CHUNK_BLOCKS, MAX_CHUNK, MAX_SLOTS,
    RECORD_HEADER, SIGNATURE_LEN, TAG_LEN, TRAILER_MARK, VERSION,
};
use super::keys::{key_file_slot, recipient_slot, volume_slot, ExportKey, RecipientKey};
use super::ordered::ordered_map;
use super::{ExportError, Result};
use crate::crypto::{Kek, Wiped, WipedPool};
use crate::volume::{SnapshotId, Volume};
use crate::BLOCK_SIZE;

/// Who can open an export: recipients' public keys and key files.
#[derive(Default)]
pub struct Holders {
    pub recipients: Vec<RecipientKey>,
    pub key_files: Vec<Kek>,
}

/// What an export wrote.
#[derive(Debug)]
pub struct Summary {
    pub header: Header,
    pub trailer: Trailer,
    /// Bytes of the whole stream.
    pub bytes: u64,
}

/// Counts and hashes what passes to the output.
struct Hashing<'a> {
    out: &'a mut dyn Write,
    sha: blake3::Hasher,
    bytes: u64,
}

impl Hashing<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.sha.update(b);
        self.bytes += b.len() as u64;
        self.out
            .write_all(b)
            .map_err(|e| ExportError::io("writing the export", e))
    }
}

/// Which blocks an export holds, in order: runs to read (each block then
/// goes out as data or as zeros) and runs to trim.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    Read(u64, u64),
    Trim(u64, u64),
}

/// Merges sorted-or-not runs into sorted, disjoint runs.
pub(super) fn union(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (s, n) in runs {
        match out.last_mut() {
            Some((ps, pn)) if *ps + *pn >= s => *pn = (*pn).max(s + n - *ps),
            _ => out.push((s, n)),
        }
    }
    out
}

/// The changed runs cut by the allocated runs: allocated parts are read,
/// the rest trimmed.
pub(super) fn plan_increment(changed: &[(u64, u64)], allocated: &[(u64, u64)]) -> Vec<Step> {
    let mut out = Vec::new();
    let mut a = 0;
    for &(cs, cn) in changed {
        let ce = cs + cn;
        let mut at = cs;
        while at < ce {
            while a < allocated.len() && allocated[a].0 + allocated[a].1 <= at {
                a += 1;
            }
            match allocated.get(a) {
                Some(&(s, n)) if s <= at => {
                    let end = (s + n).min(ce);
                    out.push(Step::Read(at, end - at));
                    at = end;
                }
                Some(&(s, _)) if s < ce => {
                    out.push(Step::Trim(at, s - at));
                    at = s;
                }
                _ => {
                    out.push(Step::Trim(at, ce - at));
                    at = ce;
                }
            }
        }
    }
    out
}

fn find(list: &[(SnapshotId, String, i64, u32)], name: &str) -> Result<(usize, SnapRef)> {
    list.iter()
        .enumerate()
        .find(|(_, s)| s.1 == name)
        .map(|(i, s)| {
            (
                i,
                SnapRef {
                    id: s.0 .0,
                    name: s.1.clone(),
                    created_sec: s.2,
                    created_nsec: s.3,
                },
            )
        })
        .ok_or_else(|| {
            let names: Vec<&str> = list.iter().map(|s| s.1.as_str()).collect();
            ExportError::Usage(format!(
                "no snapshot named {name:?} (the volume has: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ))
        })
}

/// Writes the export of snapshot `name` (an increment over `since` if
/// given) of the live volume `volume` to `out`. `progress(done, total)`
/// counts blocks; an error from it stops the export. The volume keeps serving other work meanwhile: each
/// read takes its lock only briefly.
pub fn export(
    volume: &Volume,
    name: &str,
    since: Option<&str>,
    holders: &Holders,
    readers: usize,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<Summary> {
    if holders.recipients.len() + holders.key_files.len() + 1 > MAX_SLOTS {
        return Err(ExportError::Usage(format!(
            "at most {} --recipient and --key-file in all (one slot is the volume's own)",
            MAX_SLOTS - 1
        )));
    }
    let list = volume.snapshot_names()?;
    let (at, snapshot) = find(&list, name)?;
    let view = volume.snapshot_view(SnapshotId(snapshot.id))?;
    let allocated = view.allocated_runs()?;
    let (kind, base, plan) = match since {
        None => (
            Kind::Full,
            None,
            allocated.iter().map(|&(s, n)| Step::Read(s, n)).collect(),
        ),
        Some(b) => {
            let (bi, base) = find(&list, b)?;
            if bi >= at {
                return Err(ExportError::Usage(format!(
                    "--since {b}: the base must be a snapshot older than {name}"
                )));
            }
            let mut changed = Vec::new();
            for s in &list[bi + 1..=at] {
                changed.extend(volume.snapshot_changed_runs(&s.1)?);
            }
            (
                Kind::Increment,
                Some(base),
                plan_increment(&union(changed), &allocated),
            )
        }
    };
    let signer = volume.export_signing_key();
    let mut header = Header {
        version: VERSION,
        kind,
        export_id: *crate::crypto::random_bytes::<16>()
            .map_err(|e| ExportError::Usage(e.to_string()))?,
        volume_id: volume.header().volume_id,
        logical_blocks: volume.logical_blocks(),
        written: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        snapshot,
        base,
        source_key: signer.verifying_key().to_bytes(),
        slots: Vec::new(),
    };
    let key = ExportKey::generate()?;
    let fixed = header.fixed();
    for r in &holders.recipients {
        header.slots.push(recipient_slot(r, &key, &fixed)?);
    }
    for k in &holders.key_files {
        header.slots.push(key_file_slot(k, &key, &fixed)?);
    }
    // Always: whoever can unlock the volume can open its exports.
    header.slots.push(volume_slot(
        &volume.export_slot_key(&header.export_id),
        &volume.header().key_check,
        &key,
        &fixed,
    )?);
    let head = header.encode();
    let cipher = key.chunk_cipher(&header);
    let header_hash: [u8; 32] = blake3::hash(&head).into();
    let mut w = Hashing {
        out,
        sha: blake3::Hasher::new(),
        bytes: 0,
    };
    w.put(&head)?;

    let total: u64 = plan
        .iter()
        .map(|s| match s {
            Step::Read(_, n) => *n,
            Step::Trim(..) => 0,
        })
        .sum();
    // Runs of at most CHUNK_BLOCKS blocks are read by `readers` threads at
    // once (several reads in flight on the disk), gathered into chunks in
    // order, and sealed by SEALERS threads at once; this thread hashes and
    // writes the chunks in order.
    // Read runs are cut into units of at most CHUNK_BLOCKS as they are
    // needed (a volume's one big run would otherwise list a unit per MiB).
    let units = plan.into_iter().flat_map(|step| {
        let (s, n, pieces) = match step {
            Step::Trim(s, n) => (s, n, 1),
            Step::Read(s, n) => (s, n, n.div_ceil(CHUNK_BLOCKS)),
        };
        let trim = matches!(step, Step::Trim(..));
        (0..pieces).map(move |k| {
            let a = s + k * CHUNK_BLOCKS;
            if trim {
                Step::Trim(s, n)
            } else {
                Step::Read(a, (s + n - a).min(CHUNK_BLOCKS))
            }
        })
    });
    let view = &view;
    // Enough buffers for every stage's window, so that none is allocated
    // after the first few megabytes.
    let read_window = READ_AHEAD_PER_READER * readers.max(1);
    let pool = &WipedPool::new(read_window + readers + SEAL_WINDOW + SEALERS + 4, MAX_CHUNK);
    let read = move |unit: Step| -> Result<Loaded> {
        match unit {
            Step::Trim(s, n) => Ok(Loaded {
                first: s,
                blocks: 0,
                runs: vec![(RecordKind::Trim, s, n)],
                data: Wiped::default(),
            }),
            Step::Read(s, n) => {
                let mut data = pool.zeroed(n as usize * BLOCK_SIZE);
                view.read(crate::volume::Lba(s), &mut data)?;
                Ok(Loaded {
                    first: s,
                    blocks: n,
                    runs: zero_and_data_runs(s, &data),
                    data,
                })
            }
        }
    };
    let cipher = &cipher;
    let header_hash = &header_hash;
    let seal = move |piece: Result<Piece>| -> Result<Piece> {
        let mut p = piece?;
        // Sealed in place: the ciphertext, then its tag.
        p.tag = cipher.seal(p.index, p.last, header_hash, &mut p.plain)?;
        Ok(p)
    };
    let (chunks, counts) = std::thread::scope(|s| -> Result<(u64, Trailer)> {
        let loaded = ordered_map(s, units, readers, read_window, read, lost);
        let sealed = ordered_map(
            s,
            Chunker::new(loaded, pool),
            SEALERS,
            SEAL_WINDOW,
            seal,
            lost,
        );
        let mut chunks = 0u64;
        for piece in sealed {
            let mut p = piece?;
            w.put(&((p.plain.len() + TAG_LEN) as u32).to_le_bytes())?;
            w.put(&p.plain)?;
            w.put(&p.tag)?;
            pool.put(std::mem::take(&mut p.plain));
            progress(p.done, total)?;
            chunks += 1;
            if let Some(counts) = p.counts {
                return Ok((chunks, counts));
            }
        }
        Err(ExportError::Usage(
            "the export's last chunk never came".into(),
        ))
    })?;
    let mut trailer = Trailer { chunks, ..counts };
    w.put(&TRAILER_MARK.to_le_bytes())?;
    w.put(&trailer.body())?;
    trailer.hash = w.sha.finalize().into();
    let signature = signature_of(&signer, &trailer.hash);
    w.out
        .write_all(&trailer.hash)
        .and_then(|()| w.out.write_all(&signature))
        .and_then(|()| w.out.flush())
        .map_err(|e| ExportError::io("writing the export", e))?;
    Ok(Summary {
        header,
        trailer,
        bytes: w.bytes + 32 + SIGNATURE_LEN as u64,
    })
}

/// What the source volume's export key signs: the stream's hash, which
/// covers every byte before it, the header included.
pub(super) fn signed_message(hash: &[u8; 32]) -> Vec<u8> {
    let mut m = b"lsvfs v1 export stream ".to_vec();
    m.extend_from_slice(hash);
    m
}

fn signature_of(key: &ed25519_dalek::SigningKey, hash: &[u8; 32]) -> [u8; SIGNATURE_LEN] {
    use ed25519_dalek::Signer;
    key.sign(&signed_message(hash)).to_bytes()
}

/// What a worker that panicked leaves in the stream.
fn lost<T>() -> Result<T> {
    Err(ExportError::Usage(
        "an export thread failed: this is a bug in lsvfs (its message is above); what was \
         written is incomplete and will not verify, so run the export again, and please report it"
            .into(),
    ))
}

/// Threads reading runs of blocks at once for an export of a volume that
/// is not mounted. A cold export of many small files reads blocks
/// scattered over the log: 2.4 GB took 6.7-7.5 s with one read at a time,
/// 5.0 s with 4 readers, 4.3-4.7 s with 8 and 4.1-4.4 s with 16 (this
/// machine, output to a pipe).
pub const READERS: usize = 8;
/// Readers of an export that a mount runs: it shares the disk and the
/// volume with every other process using the mount.
pub const READERS_MOUNTED: usize = 2;
/// How many runs (each at most 1 MiB) may be read ahead of the chunk
/// being gathered, per reader: 32 MiB for a command's export, 8 MiB for a
/// mount's.
const READ_AHEAD_PER_READER: usize = 4;
/// Threads sealing chunks at once, and how many chunks may wait.
const SEALERS: usize = 2;
const SEAL_WINDOW: usize = 4;

/// A run of blocks read (or a trim), cut into records.
struct Loaded {
    /// The run's first block.
    first: u64,
    /// Blocks read (progress).
    blocks: u64,
    /// Records: kind, first block, count. Data records' blocks are in
    /// `data`, from block `first` on.
    runs: Vec<(RecordKind, u64, u64)>,
    data: Wiped,
}

/// Whether a block is all zeros: eight words at a time, stopping at the
/// first 64 bytes that hold data (a data block's first ones, nearly always).
fn is_zero(block: &[u8]) -> bool {
    block.chunks(64).all(|c| {
        c.chunks(8).fold(0u64, |a, w| {
            let mut x = [0u8; 8];
            x[..w.len()].copy_from_slice(w);
            a | u64::from_le_bytes(x)
        }) == 0
    })
}

/// Blocks read from `first` on, as records: runs of all-zero blocks become
/// zero records, the rest data records.
fn zero_and_data_runs(first: u64, b: &[u8]) -> Vec<(RecordKind, u64, u64)> {
    let mut out: Vec<(RecordKind, u64, u64)> = Vec::new();
    for (i, block) in b.chunks_exact(BLOCK_SIZE).enumerate() {
        let kind = if is_zero(block) {
            RecordKind::Zero
        } else {
            RecordKind::Data
        };
        match out.last_mut() {
            Some((k, _, n)) if *k == kind => *n += 1,
            _ => out.push((kind, first + i as u64, 1)),
        }
    }
    out
}

/// A chunk on its way: its plaintext, then (sealed) its ciphertext.
struct Piece {
    /// The chunk's position in the stream (its nonce).
    index: u64,
    plain: Wiped,
    tag: [u8; TAG_LEN],
    /// The final chunk.
    last: bool,
    /// Blocks read so far (progress).
    done: u64,
    /// Blocks of each kind in the whole export, on the final chunk.
    counts: Option<Trailer>,
}

/// Gathers records into chunks, in order: an iterator of pieces over an
/// iterator of runs read. After the last run it yields the final chunk
/// (possibly empty); after an error, the error and nothing more.
struct Chunker<'p, I> {
    input: I,
    pool: &'p WipedPool,
    plain: Wiped,
    counts: Trailer,
    done: u64,
    index: u64,
    ready: std::collections::VecDeque<Piece>,
    finished: bool,
}

impl<'p, I: Iterator<Item = Result<Loaded>>> Chunker<'p, I> {
    fn new(input: I, pool: &'p WipedPool) -> Self {
        Chunker {
            input,
            pool,
            plain: pool.get(),
            counts: Trailer::default(),
            done: 0,
            index: 0,
            ready: Default::default(),
            finished: false,
        }
    }

    fn record(&mut self, kind: RecordKind, first: u64, count: u64, data: &[u8]) {
        // Trims and zeros of any length, in records of at most u32::MAX.
        let mut at = first;
        let mut left = count;
        while left > 0 {
            let n = left.min(u32::MAX as u64);
            let bytes = if kind == RecordKind::Data {
                &data[(at - first) as usize * BLOCK_SIZE..(at - first + n) as usize * BLOCK_SIZE]
            } else {
                &[][..]
            };
            if self.plain.len() + RECORD_HEADER + bytes.len() > MAX_CHUNK {
                self.send(false);
            }
            put_record(&mut self.plain, kind, at, n as u32, bytes);
            match kind {
                RecordKind::Data => self.counts.data_blocks += n,
                RecordKind::Zero => self.counts.zero_blocks += n,
                RecordKind::Trim => self.counts.trim_blocks += n,
            }
            at += n;
            left -= n;
        }
    }

    fn send(&mut self, last: bool) {
        let next = if last {
            Wiped::default()
        } else {
            self.pool.get()
        };
        let plain = std::mem::replace(&mut self.plain, next);
        self.ready.push_back(Piece {
            index: self.index,
            plain,
            tag: [0; TAG_LEN],
            last,
            done: self.done,
            counts: last.then(|| std::mem::take(&mut self.counts)),
        });
        self.index += 1;
    }
}

impl<I: Iterator<Item = Result<Loaded>>> Iterator for Chunker<'_, I> {
    type Item = Result<Piece>;

    fn next(&mut self) -> Option<Result<Piece>> {
        loop {
            if let Some(p) = self.ready.pop_front() {
                return Some(Ok(p));
            }
            if self.finished {
                return None;
            }
            match self.input.next() {
                Some(Ok(l)) => {
                    self.done += l.blocks;
                    for &(kind, first, count) in &l.runs {
                        let from = (first - l.first) as usize * BLOCK_SIZE;
                        self.record(kind, first, count, &l.data[from.min(l.data.len())..]);
                    }
                    self.pool.put(l.data);
                }
                Some(Err(e)) => {
                    self.finished = true;
                    return Some(Err(e));
                }
                None => {
                    self.finished = true;
                    self.send(true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_become_zero_and_data_runs_whatever_byte_holds_the_data() {
        let bs = BLOCK_SIZE;
        let mut b = vec![0u8; 6 * bs];
        b[bs + bs - 1] = 1; // block 1: only its last byte
        b[2 * bs] = 9; // block 2: only its first byte
        b[4 * bs + 1000] = 3; // block 4: one byte in the middle
        use RecordKind::{Data, Zero};
        assert_eq!(
            zero_and_data_runs(100, &b),
            vec![
                (Zero, 100, 1),
                (Data, 101, 2),
                (Zero, 103, 1),
                (Data, 104, 1),
                (Zero, 105, 1)
            ]
        );
        assert!(zero_and_data_runs(7, &[]).is_empty());
    }

    #[test]
    fn runs_merge_and_an_increment_reads_what_is_allocated_and_trims_the_rest() {
        assert_eq!(
            union(vec![(10, 5), (0, 3), (3, 2), (12, 10), (40, 1)]),
            vec![(0, 5), (10, 12), (40, 1)]
        );
        let plan = plan_increment(&[(0, 10), (20, 5), (100, 3)], &[(2, 3), (8, 14), (101, 1)]);
        assert_eq!(
            plan,
            vec![
                Step::Trim(0, 2),
                Step::Read(2, 3),
                Step::Trim(5, 3),
                Step::Read(8, 2),
                Step::Read(20, 2),
                Step::Trim(22, 3),
                Step::Trim(100, 1),
                Step::Read(101, 1),
                Step::Trim(102, 1),
            ]
        );
        assert!(plan_increment(&[], &[(0, 5)]).is_empty());
    }
}
