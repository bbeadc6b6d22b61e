//! Writing an export: the plan (which blocks, from the snapshot's
//! allocated bitmap or from the changed bitmaps since the base), then the
//! header, the sealed chunks and the trailer.

use std::io::Write;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::XNonce;
use zeroize::{Zeroize, Zeroizing};

use super::format::{
    put_record, Header, Kind, RecordKind, SnapRef, Trailer, CHUNK_BLOCKS, MAX_CHUNK, MAX_SLOTS,
    RECORD_HEADER, SIGNATURE_LEN, TAG_LEN, TRAILER_MARK,
};
use super::keys::{key_file_slot, recipient_slot, volume_slot, ExportKey, RecipientKey};
use super::{ExportError, Result};
use crate::crypto::Kek;
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

/// The nonce of chunk `index`; `last` marks the final chunk.
pub(super) fn nonce(index: u64, last: bool) -> XNonce {
    let mut n = [0u8; 24];
    n[..8].copy_from_slice(&index.to_le_bytes());
    n[8] = u8::from(last);
    *XNonce::from_slice(&n)
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
    let cipher = key.chunk_cipher(&header.export_id);
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
    // A thread reads the snapshot's blocks and gathers them into chunks,
    // a few chunks ahead; this one seals, hashes and writes them.
    let (tx, rx) = crossbeam::channel::bounded::<Piece>(4);
    let view = &view;
    let counts = std::thread::scope(|s| {
        let producer = s.spawn(move || {
            let mut chunk = Chunker {
                tx,
                plain: Zeroizing::new(Vec::with_capacity(MAX_CHUNK)),
                counts: Trailer::default(),
                done: 0,
            };
            let mut buf = vec![0u8; CHUNK_BLOCKS as usize * BLOCK_SIZE];
            for step in plan {
                match step {
                    Step::Trim(s, n) => chunk.record(RecordKind::Trim, s, n, &[])?,
                    Step::Read(s, n) => {
                        let mut at = s;
                        while at < s + n {
                            let m = (s + n - at).min(CHUNK_BLOCKS);
                            let b = &mut buf[..m as usize * BLOCK_SIZE];
                            view.read(crate::volume::Lba(at), b)?;
                            chunk.done += m;
                            chunk.blocks(at, b)?;
                            at += m;
                        }
                    }
                }
            }
            buf.zeroize();
            chunk.send(true)?;
            Ok::<_, ExportError>(chunk.counts)
        });
        let mut sealed = Ok(0u64);
        for mut piece in rx.iter() {
            sealed = sealed.and_then(|chunks| {
                // Sealed in place: the ciphertext, then its tag.
                let tag = cipher
                    .encrypt_in_place_detached(
                        &nonce(chunks, piece.last),
                        &header_hash,
                        &mut piece.plain,
                    )
                    .map_err(|_| ExportError::Usage("sealing a chunk".into()))?;
                w.put(&((piece.plain.len() + TAG_LEN) as u32).to_le_bytes())?;
                w.put(&piece.plain)?;
                w.put(&tag)?;
                progress(piece.done, total)?;
                Ok(chunks + 1)
            });
            if sealed.is_err() {
                break;
            }
        }
        // The producer's sends fail once this end is gone, and it stops.
        drop(rx);
        let produced = producer
            .join()
            .unwrap_or_else(|_| Err(ExportError::Usage("the export reader failed".into())));
        sealed.and_then(|chunks| produced.map(|c| (chunks, c)))
    })?;
    let mut trailer = Trailer {
        chunks: counts.0,
        ..counts.1
    };
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

/// A chunk's plaintext on its way to be sealed.
struct Piece {
    plain: Zeroizing<Vec<u8>>,
    /// The final chunk.
    last: bool,
    /// Blocks read so far (progress).
    done: u64,
}

/// Gathers records into chunks and hands them on to be sealed.
struct Chunker {
    tx: crossbeam::channel::Sender<Piece>,
    plain: Zeroizing<Vec<u8>>,
    /// Blocks of each kind (the trailer's counts).
    counts: Trailer,
    done: u64,
}

impl Chunker {
    fn record(&mut self, kind: RecordKind, first: u64, count: u64, data: &[u8]) -> Result<()> {
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
                self.send(false)?;
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
        Ok(())
    }

    /// Blocks read from `first` on: runs of all-zero blocks become zero
    /// records, the rest data records.
    fn blocks(&mut self, first: u64, b: &[u8]) -> Result<()> {
        let n = b.len() / BLOCK_SIZE;
        let zero = |i: usize| {
            b[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]
                .iter()
                .all(|&x| x == 0)
        };
        let mut i = 0;
        while i < n {
            let z = zero(i);
            let mut j = i + 1;
            while j < n && zero(j) == z {
                j += 1;
            }
            let kind = if z {
                RecordKind::Zero
            } else {
                RecordKind::Data
            };
            let data = &b[i * BLOCK_SIZE..j * BLOCK_SIZE];
            self.record(kind, first + i as u64, (j - i) as u64, data)?;
            i = j;
        }
        Ok(())
    }

    fn send(&mut self, last: bool) -> Result<()> {
        let plain = std::mem::replace(
            &mut self.plain,
            Zeroizing::new(Vec::with_capacity(MAX_CHUNK)),
        );
        self.tx
            .send(Piece {
                plain,
                last,
                done: self.done,
            })
            .map_err(|_| ExportError::Usage("the export stopped".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
