//! Reading an export: the header, then frame by frame, hashing every byte.
//! Without a key a stream can be checked for completeness and for its
//! hash; with its key every chunk is authenticated before its records are
//! used.

use std::io::Read;

use super::format::{
    records, Header, Kind, RecordKind, Trailer, MAGIC, MAX_CHUNK, SIGNATURE_LEN, TAG_LEN,
    TRAILER_LEN, TRAILER_MAGIC, TRAILER_MARK,
};
use super::keys::{open_slots, ExportKey, Identity};
use super::write::{plan_increment, signed_message, union, Step};
use super::{ExportError, Result};
use crate::crypto::{Kek, VolumeKeys};
use crate::volume::{Lba, SnapshotId, Transaction, Volume};

/// One frame of the stream.
enum Frame {
    Chunk(Vec<u8>),
    End(Trailer),
}

/// An export stream being read.
pub struct Stream<R: Read> {
    r: R,
    sha: blake3::Hasher,
    bytes: u64,
    header: Header,
    header_hash: [u8; 32],
    /// Names the stream in errors (a path, or "standard input").
    name: String,
    /// The last chunk's buffer, read into again: a chunk's ciphertext is
    /// not zeroed first unless it is longer than the one before.
    spare: Vec<u8>,
}

fn cut_short(name: &str) -> ExportError {
    ExportError::Incomplete(format!(
        "{name} ends before its trailer: the export was cut short (interrupted, truncated, or \
         still being written); export it again"
    ))
}

impl<R: Read> Stream<R> {
    /// Reads and checks the header.
    pub fn open(mut r: R, name: &str) -> Result<Stream<R>> {
        let mut first = [0u8; 16];
        let got = read_upto(&mut r, &mut first, name)?;
        let magic = got.min(MAGIC.len());
        if got < first.len() && first[..magic] == MAGIC[..magic] {
            return Err(cut_short(name));
        }
        // Short input that is not the start of an export is refused here
        // as not an export (its magic does not match).
        let len = Header::length(&first).map_err(|e| e.about(name))?;
        let mut head = first.to_vec();
        head.resize(len, 0);
        let got = read_upto(&mut r, &mut head[16..], name)?;
        if got < len - 16 {
            return Err(short_frame(name, "its header", len, &head[..16 + got]));
        }
        let header = Header::decode(&head).map_err(|e| e.about(name))?;
        let mut sha = blake3::Hasher::new();
        sha.update(&head);
        Ok(Stream {
            r,
            sha,
            bytes: head.len() as u64,
            header_hash: blake3::hash(&head).into(),
            header,
            name: name.to_string(),
            spare: Vec::new(),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<()> {
        read_all(&mut self.r, buf, &self.name)?;
        self.absorb(buf);
        Ok(())
    }

    /// Counts and hashes bytes of the stream just read.
    fn absorb(&mut self, buf: &[u8]) {
        self.sha.update(buf);
        self.bytes += buf.len() as u64;
    }

    fn frame(&mut self) -> Result<Frame> {
        let mut len = [0u8; 4];
        self.take(&mut len)?;
        let len = u32::from_le_bytes(len);
        if len == TRAILER_MARK {
            let mut body = [0u8; TRAILER_LEN];
            self.take(&mut body[..TRAILER_LEN - 32])?;
            let want: [u8; 32] = self.sha.finalize().into();
            read_all(&mut self.r, &mut body[TRAILER_LEN - 32..], &self.name)?;
            let mut signature = [0u8; SIGNATURE_LEN];
            read_all(&mut self.r, &mut signature, &self.name)?;
            self.bytes += (32 + SIGNATURE_LEN) as u64;
            let t = Trailer::decode(&body).map_err(|e| e.about(&self.name))?;
            if t.hash != want {
                return Err(ExportError::Corrupt(format!(
                    "{}: its bytes do not match the hash in its trailer: the file was damaged \
                     or modified; use another copy",
                    self.name
                )));
            }
            let signed = ed25519_dalek::VerifyingKey::from_bytes(&self.header.source_key)
                .ok()
                .is_some_and(|k| {
                    k.verify_strict(
                        &signed_message(&want),
                        &ed25519_dalek::Signature::from_bytes(&signature),
                    )
                    .is_ok()
                });
            if !signed {
                return Err(ExportError::Corrupt(format!(
                    "{}: its signature does not verify under the source key its header names: \
                     the file was modified; use another copy",
                    self.name
                )));
            }
            let mut extra = [0u8; 1];
            match self.r.read(&mut extra) {
                Ok(0) => {}
                Ok(_) => {
                    return Err(ExportError::Corrupt(format!(
                        "{}: bytes follow its trailer (two exports run together?)",
                        self.name
                    )))
                }
                Err(e) => return Err(ExportError::io(format!("reading {}", self.name), e)),
            }
            return Ok(Frame::End(t));
        }
        let len = len as usize;
        if !(TAG_LEN..=MAX_CHUNK + TAG_LEN).contains(&len) {
            return Err(ExportError::Corrupt(format!(
                "{}: a chunk of {len} bytes at byte {} (at most {} are allowed): the file is \
                 damaged",
                self.name,
                self.bytes - 4,
                MAX_CHUNK + TAG_LEN
            )));
        }
        let mut ct = std::mem::take(&mut self.spare);
        ct.resize(len, 0);
        let got = read_upto(&mut self.r, &mut ct, &self.name)?;
        if got < len {
            let what = format!("the chunk at byte {}", self.bytes - 4);
            return Err(short_frame(&self.name, &what, len, &ct[..got]));
        }
        self.absorb(&ct);
        Ok(Frame::Chunk(ct))
    }

    /// Checks the stream without any key: complete, framed, and every byte
    /// matching the trailer's hash. Returns the trailer and the stream's
    /// size.
    pub fn verify(mut self) -> Result<(Trailer, u64)> {
        let mut chunks = 0u64;
        loop {
            match self.frame()? {
                Frame::Chunk(ct) => {
                    chunks += 1;
                    self.spare = ct;
                }
                Frame::End(t) => {
                    if t.chunks != chunks || chunks == 0 {
                        return Err(ExportError::Corrupt(format!(
                            "{}: its trailer counts {} chunks, the file holds {chunks}",
                            self.name, t.chunks
                        )));
                    }
                    return Ok((t, self.bytes));
                }
            }
        }
    }

    /// The export's key, from the first slot an identity or key file opens.
    pub fn open_key(&self, identities: &[Identity], key_files: &[Kek]) -> Result<ExportKey> {
        open_key(&self.header, &self.name, identities, key_files, None)
    }

    /// Authenticates the stream chunk by chunk with `key` and hands each
    /// chunk's records to `apply`, in order. Nothing of a chunk is handed
    /// on before the chunk is authenticated; the trailer is checked last.
    pub fn read_records(
        self,
        key: &ExportKey,
        apply: &mut dyn FnMut(&[super::format::Record]) -> Result<()>,
    ) -> Result<Trailer> {
        let logical = self.header.logical_blocks;
        let mut next = 0u64;
        self.read_chunks(key, &mut || None, &mut |plain| {
            apply(&records(&plain, logical, &mut next)?)
        })
    }

    /// [`Stream::read_records`], handing on each chunk's authenticated
    /// plaintext (whose records are checked) instead. Plaintext goes into
    /// a buffer `spare` hands back (one `apply` is done with; its old bytes
    /// are all overwritten) or a new one.
    pub fn read_chunks(
        mut self,
        key: &ExportKey,
        spare: &mut dyn FnMut() -> Option<crate::crypto::Wiped>,
        apply: &mut dyn FnMut(crate::crypto::Wiped) -> Result<()>,
    ) -> Result<Trailer> {
        let cipher = key.chunk_cipher(&self.header);
        let logical = self.header.logical_blocks;
        let mut next = 0u64;
        let mut index = 0u64;
        let mut last_seen = false;
        let (mut data, mut zero, mut trim) = (0u64, 0u64, 0u64);
        loop {
            match self.frame()? {
                Frame::Chunk(frame) => {
                    if last_seen {
                        return Err(ExportError::Corrupt(format!(
                            "{}: a chunk follows the final one: the file was modified",
                            self.name
                        )));
                    }
                    // A failed attempt leaves `ct` as it was, for the next.
                    let body = frame.len() - TAG_LEN;
                    let (ct, tag) = frame.split_at(body);
                    let tag: &[u8; TAG_LEN] = tag.try_into().expect("TAG_LEN bytes");
                    // Room for any chunk, so that it never grows (a
                    // reallocation would leave plaintext unwiped behind).
                    let mut plain = spare()
                        .filter(|b| b.capacity() >= MAX_CHUNK)
                        .unwrap_or_else(|| crate::crypto::Wiped::with_capacity(MAX_CHUNK));
                    plain.resize(body, 0);
                    let open = |last, out: &mut Vec<u8>| {
                        cipher.open(index, last, &self.header_hash, ct, tag, out)
                    };
                    if !open(false, &mut plain) {
                        if !open(true, &mut plain) {
                            return Err(ExportError::Corrupt(format!(
                                "{}: chunk {index} fails authentication: the export was \
                                 modified, damaged or reordered; use another copy",
                                self.name
                            )));
                        }
                        last_seen = true;
                    }
                    self.spare = frame;
                    let rs =
                        records(&plain, logical, &mut next).map_err(|e| e.about(&self.name))?;
                    for r in &rs {
                        match r.kind {
                            RecordKind::Data => data += r.count,
                            RecordKind::Zero => zero += r.count,
                            RecordKind::Trim => trim += r.count,
                        }
                        if self.header.kind == Kind::Full && r.kind == RecordKind::Trim {
                            return Err(ExportError::Corrupt(format!(
                                "{}: a full export holds a trim",
                                self.name
                            )));
                        }
                    }
                    drop(rs);
                    apply(plain)?;
                    index += 1;
                }
                Frame::End(t) => {
                    if !last_seen {
                        return Err(ExportError::Corrupt(format!(
                            "{}: its final chunk is missing: chunks were dropped from its end",
                            self.name
                        )));
                    }
                    if (t.chunks, t.data_blocks, t.zero_blocks, t.trim_blocks)
                        != (index, data, zero, trim)
                    {
                        return Err(ExportError::Corrupt(format!(
                            "{}: its trailer's counts do not match its chunks",
                            self.name
                        )));
                    }
                    return Ok(t);
                }
            }
        }
    }
}

/// The key of the export whose header is `header` (`name` names it in
/// the error), from the first slot an identity or key file opens.
pub fn open_key(
    header: &Header,
    name: &str,
    identities: &[Identity],
    key_files: &[Kek],
    volume: Option<&VolumeKeys>,
) -> Result<ExportKey> {
    open_slots(
        &header.slots,
        &header.fixed(),
        identities,
        key_files,
        volume,
    )
    .ok_or_else(|| {
        let held: Vec<String> = header.slots.iter().map(super::describe_slot).collect();
        ExportError::WrongKey(format!(
            "{name}: no key given opens this export (it opens for: {}); pass the matching \
             --identity or --key-file",
            held.join("; ")
        ))
    })
}

/// Reads into `buf` until it is full or the input ends; returns how many
/// bytes it read.
fn read_upto(r: &mut impl Read, buf: &mut [u8], name: &str) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ExportError::io(format!("reading {name}"), e)),
        }
    }
    Ok(got)
}

/// The error for a frame whose length field reaches past the end of the
/// input, `read` being what was there. If what was there ends with a whole
/// trailer, the export did end properly and the length field is damaged
/// (a bit flip that enlarged it); otherwise the export was cut short.
fn short_frame(name: &str, what: &str, len: usize, read: &[u8]) -> ExportError {
    let trailer = 4 + TRAILER_LEN + SIGNATURE_LEN;
    let ends_whole = read.len() >= trailer && {
        let t = &read[read.len() - trailer..];
        t[..4] == TRAILER_MARK.to_le_bytes() && t[4..12] == TRAILER_MAGIC
    };
    if !ends_whole {
        return cut_short(name);
    }
    ExportError::Corrupt(format!(
        "{name}: {what} claims {len} bytes, but the export's trailer ends it after {}: its \
         length field is damaged; use another copy",
        read.len()
    ))
}

/// Fills `buf`; input that ends first was cut short.
fn read_all(r: &mut impl Read, buf: &mut [u8], name: &str) -> Result<()> {
    if read_upto(r, buf, name)? < buf.len() {
        return Err(cut_short(name));
    }
    Ok(())
}

/// Blocks a restore applies between two write-back hints (32 MiB).
const WRITE_BEHIND_BLOCKS: u64 = 8192;

/// Applies a stream to `volume` (whose live tree must be the stream's base,
/// or empty for a full export), then takes the stream's snapshot with its
/// original name and time. `progress(blocks)` counts blocks applied.
/// Reading, hashing and authenticating run on a thread of their own, a few
/// chunks ahead of the writes into the volume.
pub fn restore_stream<R: Read + Send>(
    volume: &Volume,
    stream: Stream<R>,
    key: &ExportKey,
    progress: &mut dyn FnMut(u64),
) -> Result<(SnapshotId, Trailer)> {
    let snap = stream.header().snapshot.clone();
    let logical = stream.header().logical_blocks;
    let (tx, rx) = crossbeam::channel::bounded::<crate::crypto::Wiped>(4);
    // Applied chunks' buffers go back to the reader, to be decrypted into
    // again instead of allocated, zeroed and wiped each time.
    let (back, spares) = crossbeam::channel::bounded::<crate::crypto::Wiped>(4);
    let trailer = std::thread::scope(|s| {
        let reader = s.spawn(move || {
            stream.read_chunks(key, &mut || spares.try_recv().ok(), &mut |plain| {
                tx.send(plain)
                    .map_err(|_| ExportError::Usage("the restore stopped".into()))
            })
        });
        let mut next = 0u64;
        let mut done = 0u64;
        let mut written_back = 0u64;
        let mut applied: Result<()> = Ok(());
        for plain in rx.iter() {
            applied = (|| {
                let rs = records(&plain, logical, &mut next)?;
                let mut t = Transaction::new();
                for r in &rs {
                    match r.kind {
                        RecordKind::Data => {
                            t.write(Lba(r.first), r.data.to_vec());
                        }
                        RecordKind::Zero => volume.zero(Lba(r.first), r.count)?,
                        RecordKind::Trim => volume.trim(Lba(r.first), r.count)?,
                    }
                    done += r.count;
                }
                volume.commit(t)?;
                // A full channel drops the buffer, which wipes it.
                let _ = back.try_send(plain);
                if done - written_back >= WRITE_BEHIND_BLOCKS {
                    volume.write_behind();
                    written_back = done;
                }
                progress(done);
                Ok(())
            })();
            if applied.is_err() {
                break;
            }
        }
        // The reader's sends fail once this end is gone, and it stops.
        drop(rx);
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(ExportError::Usage("the export reader failed".into())));
        applied.and(read)
    })?;
    volume.flush()?;
    let id = volume.snapshot_create_at(&snap.name, (snap.created_sec, snap.created_nsec))?;
    Ok((id, trailer))
}

/// Puts the live volume back to its newest snapshot: every block changed
/// since is rewritten from the snapshot, or trimmed where the snapshot maps
/// nothing. Returns the snapshot's name and how many blocks were put back.
pub fn roll_back_to_newest(volume: &Volume) -> Result<(String, u64)> {
    let list = volume.snapshot_names()?;
    let Some((id, name, _, _)) = list.last().cloned() else {
        return Err(ExportError::Chain(
            "the volume has no snapshot to roll back to".into(),
        ));
    };
    let view = volume.snapshot_view(id)?;
    let changed = union(volume.changed_since_newest_snapshot()?);
    let plan = plan_increment(&changed, &view.allocated_runs()?);
    let mut put_back = 0u64;
    let mut buf = vec![0u8; 256 * crate::BLOCK_SIZE];
    for step in plan {
        match step {
            Step::Trim(s, n) => volume.trim(Lba(s), n)?,
            Step::Read(s, n) => {
                let mut at = s;
                while at < s + n {
                    let m = (s + n - at).min(256);
                    let b = &mut buf[..m as usize * crate::BLOCK_SIZE];
                    view.read(Lba(at), b)?;
                    let mut t = Transaction::new();
                    t.write(Lba(at), b.to_vec());
                    volume.commit(t)?;
                    at += m;
                }
            }
        }
        put_back += match step {
            Step::Trim(_, n) | Step::Read(_, n) => n,
        };
    }
    volume.flush()?;
    Ok((name, put_back))
}
