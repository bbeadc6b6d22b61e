//! The export stream's structures, byte by byte (docs/FORMAT.md, "Export
//! stream"): the header, the records inside a chunk, and the trailer.
//! Every decoder takes untrusted bytes and fails softly.

use sha2::{Digest, Sha256};

use super::{ExportError, Result};
use crate::volume::format::MAX_LOGICAL_BLOCKS;
use crate::wire::Reader;
use crate::BLOCK_SIZE;

pub const MAGIC: [u8; 8] = *b"LSVFSEXP";
pub const TRAILER_MAGIC: [u8; 8] = *b"LSVFSEND";
/// The export format version this build writes: 2 seals chunks with
/// AES-256-GCM. Version 1 (XChaCha20-Poly1305 chunks, otherwise the same
/// bytes) is still read.
pub const VERSION: u16 = 2;
/// The oldest version this build reads.
pub const OLDEST_VERSION: u16 = 1;
/// Bytes of the header's fixed part (the slots' associated data).
pub const FIXED_LEN: usize = 208;
/// Largest header (fixed part, names, slots).
pub const MAX_HEADER: usize = 64 << 10;
/// Most key slots in one export.
pub const MAX_SLOTS: usize = 32;
/// Largest slot body.
pub const MAX_SLOT: usize = 1024;
/// Frame length that announces the trailer instead of a chunk.
pub const TRAILER_MARK: u32 = u32::MAX;
/// Bytes of the trailer after its mark.
pub const TRAILER_LEN: usize = 8 + 8 * 4 + 32;
/// The Ed25519 signature after the trailer's hash.
pub const SIGNATURE_LEN: usize = 64;
/// AEAD tag per chunk.
pub const TAG_LEN: usize = 16;
/// Data blocks a writer puts in one chunk.
pub const CHUNK_BLOCKS: u64 = 256;
/// Largest chunk plaintext a reader accepts: a full chunk of data plus
/// record headers.
pub const MAX_CHUNK: usize = (CHUNK_BLOCKS as usize) * BLOCK_SIZE + 64 * RECORD_HEADER;
/// Bytes before a record's data.
pub const RECORD_HEADER: usize = 1 + 8 + 4;
/// Longest snapshot name.
const NAME_MAX: usize = 255;

/// Full export, or an increment over a base snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Full = 0,
    Increment = 1,
}

/// A snapshot as an export names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapRef {
    pub id: u64,
    pub name: String,
    pub created_sec: i64,
    pub created_nsec: u32,
}

/// What a slot holds the export key for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// A recipient's X25519 public key (HPKE).
    Recipient = 1,
    /// A key file's KEK (the volume's recovery key, or any key file).
    KeyFile = 2,
    /// Whoever can unlock the source volume (a key derived from its master
    /// key): this host's sealed store and the volume's key servers.
    Volume = 3,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub kind: SlotKind,
    pub body: Vec<u8>,
}

/// The stream header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The format version: which cipher seals the chunks.
    pub version: u16,
    pub kind: Kind,
    pub export_id: [u8; 16],
    pub volume_id: [u8; 16],
    pub logical_blocks: u64,
    /// When the export was written (Unix seconds).
    pub written: u64,
    pub snapshot: SnapRef,
    /// For an increment: the snapshot it applies over.
    pub base: Option<SnapRef>,
    /// The Ed25519 public key that signs the stream (the source volume's
    /// export signing key).
    pub source_key: [u8; 32],
    pub slots: Vec<Slot>,
}

/// The identity of a snapshot of a volume: what links an increment to the
/// export of its base, whoever wrote that export.
pub fn link(volume_id: &[u8; 16], s: &SnapRef) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"lsvfs v1 snapshot link");
    h.update(volume_id);
    h.update(s.id.to_le_bytes());
    h.update(s.created_sec.to_le_bytes());
    h.update(s.created_nsec.to_le_bytes());
    h.update([s.name.len() as u8]);
    h.update(s.name.as_bytes());
    h.finalize().into()
}

/// The AEAD that seals an export's chunks, which its format version names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkAead {
    /// Version 1.
    XChaCha20Poly1305,
    /// Version 2.
    Aes256Gcm,
}

impl ChunkAead {
    pub fn name(self) -> &'static str {
        match self {
            ChunkAead::XChaCha20Poly1305 => "XChaCha20-Poly1305",
            ChunkAead::Aes256Gcm => "AES-256-GCM",
        }
    }
}

impl Header {
    /// The AEAD that seals the chunks (`decode` admits versions 1 and 2).
    pub fn chunk_aead(&self) -> ChunkAead {
        if self.version == 1 {
            ChunkAead::XChaCha20Poly1305
        } else {
            ChunkAead::Aes256Gcm
        }
    }

    pub fn snapshot_link(&self) -> [u8; 32] {
        link(&self.volume_id, &self.snapshot)
    }

    pub fn base_link(&self) -> Option<[u8; 32]> {
        self.base.as_ref().map(|b| link(&self.volume_id, b))
    }

    /// The fixed part: what every key slot is bound to.
    pub fn fixed(&self) -> [u8; FIXED_LEN] {
        let mut b = [0u8; FIXED_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&(self.kind as u16).to_le_bytes());
        // 12..16: header length, filled by encode (not part of the binding).
        b[16..32].copy_from_slice(&self.export_id);
        b[32..48].copy_from_slice(&self.volume_id);
        b[48..56].copy_from_slice(&self.logical_blocks.to_le_bytes());
        b[56..60].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b[64..72].copy_from_slice(&self.written.to_le_bytes());
        b[72..104].copy_from_slice(&self.snapshot_link());
        b[104..136].copy_from_slice(&self.base_link().unwrap_or([0; 32]));
        b[136..144].copy_from_slice(&self.snapshot.id.to_le_bytes());
        b[144..152].copy_from_slice(&self.snapshot.created_sec.to_le_bytes());
        b[152..156].copy_from_slice(&self.snapshot.created_nsec.to_le_bytes());
        let base = self.base.as_ref();
        b[156..160].copy_from_slice(&base.map_or(0, |s| s.created_nsec).to_le_bytes());
        b[160..168].copy_from_slice(&base.map_or(0, |s| s.created_sec).to_le_bytes());
        b[168..176].copy_from_slice(&base.map_or(0, |s| s.id).to_le_bytes());
        b[176..208].copy_from_slice(&self.source_key);
        b
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.fixed().to_vec();
        b.push(self.snapshot.name.len() as u8);
        b.extend_from_slice(self.snapshot.name.as_bytes());
        let base_name = self.base.as_ref().map_or("", |s| s.name.as_str());
        b.push(base_name.len() as u8);
        b.extend_from_slice(base_name.as_bytes());
        b.push(self.slots.len() as u8);
        for s in &self.slots {
            b.push(s.kind as u8);
            b.extend_from_slice(&(s.body.len() as u16).to_le_bytes());
            b.extend_from_slice(&s.body);
        }
        let len = b.len() as u32;
        b[12..16].copy_from_slice(&len.to_le_bytes());
        b
    }

    /// The header's length from its first 16 bytes, checked; the magic and
    /// version too.
    pub fn length(first: &[u8; 16]) -> Result<usize> {
        if first[0..8] != MAGIC {
            return Err(ExportError::NotAnExport(
                "no export header (magic LSVFSEXP) at its start".into(),
            ));
        }
        let version = u16::from_le_bytes([first[8], first[9]]);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(ExportError::NotAnExport(format!(
                "export format version {version}; this build reads versions \
                 {OLDEST_VERSION} to {VERSION}: use an lsvfs release that reads it"
            )));
        }
        let len = u32::from_le_bytes(first[12..16].try_into().expect("4 bytes")) as usize;
        if !(FIXED_LEN + 4..=MAX_HEADER).contains(&len) {
            return Err(ExportError::Corrupt(format!(
                "header length {len} is out of range"
            )));
        }
        Ok(len)
    }

    pub fn decode(b: &[u8]) -> Result<Header> {
        let bad = |what: &str| ExportError::Corrupt(format!("bad header: {what}"));
        let first: &[u8; 16] = b
            .get(..16)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| bad("too short"))?;
        if Header::length(first)? != b.len() {
            return Err(bad("its length field does not match"));
        }
        let mut r = Reader::new(b);
        r.take(8);
        // Checked by `length` above.
        let version = r.u16().ok_or_else(|| bad("short"))?;
        let kind = match r.u16() {
            Some(0) => Kind::Full,
            Some(1) => Kind::Increment,
            _ => return Err(bad("unknown kind")),
        };
        r.take(4);
        let arr16 = |s: &[u8]| -> [u8; 16] { s.try_into().expect("16 bytes") };
        let export_id = arr16(r.take(16).ok_or_else(|| bad("short"))?);
        let volume_id = arr16(r.take(16).ok_or_else(|| bad("short"))?);
        let logical_blocks = r.u64().ok_or_else(|| bad("short"))?;
        if logical_blocks == 0 || logical_blocks > MAX_LOGICAL_BLOCKS {
            return Err(bad("logical block count out of range"));
        }
        if r.u32() != Some(BLOCK_SIZE as u32) {
            return Err(bad("block size is not 4096"));
        }
        if r.u32() != Some(0) {
            return Err(bad("reserved bytes are not zero"));
        }
        let written = r.u64().ok_or_else(|| bad("short"))?;
        let snap_link = r.take(32).ok_or_else(|| bad("short"))?.to_vec();
        let base_link = r.take(32).ok_or_else(|| bad("short"))?.to_vec();
        let id = r.u64().ok_or_else(|| bad("short"))?;
        let created_sec = r.u64().ok_or_else(|| bad("short"))? as i64;
        let created_nsec = r.u32().ok_or_else(|| bad("short"))?;
        let base_nsec = r.u32().ok_or_else(|| bad("short"))?;
        let base_sec = r.u64().ok_or_else(|| bad("short"))? as i64;
        let base_id = r.u64().ok_or_else(|| bad("short"))?;
        let source_key: [u8; 32] = r
            .take(32)
            .ok_or_else(|| bad("short"))?
            .try_into()
            .expect("32 bytes");
        let name = |r: &mut Reader, empty_ok: bool| -> Result<String> {
            let n = r.u8().ok_or_else(|| bad("short"))? as usize;
            let s = r.take(n).ok_or_else(|| bad("short"))?;
            let s = std::str::from_utf8(s).map_err(|_| bad("a name is not UTF-8"))?;
            if (n == 0 && !empty_ok) || n > NAME_MAX || s.contains(['/', '\0']) {
                return Err(bad("a snapshot name is empty or holds / or NUL"));
            }
            // A volume refuses them too, but only once every block is in.
            if s == "." || s == ".." {
                return Err(bad("a snapshot is named . or .."));
            }
            Ok(s.to_string())
        };
        let snap_name = name(&mut r, false)?;
        let base_name = name(&mut r, true)?;
        if created_nsec >= 1_000_000_000 || base_nsec >= 1_000_000_000 {
            return Err(bad("nanoseconds out of range"));
        }
        let base = match kind {
            Kind::Full => {
                if !base_name.is_empty()
                    || base_link != [0; 32]
                    || base_id != 0
                    || base_sec != 0
                    || base_nsec != 0
                {
                    return Err(bad("a full export names a base"));
                }
                None
            }
            Kind::Increment => {
                if base_name.is_empty() {
                    return Err(bad("an increment names no base"));
                }
                Some(SnapRef {
                    id: base_id,
                    name: base_name,
                    created_sec: base_sec,
                    created_nsec: base_nsec,
                })
            }
        };
        let count = r.u8().ok_or_else(|| bad("short"))? as usize;
        if count == 0 || count > MAX_SLOTS {
            return Err(bad("slot count out of range (1 to 32)"));
        }
        let mut slots = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = match r.u8() {
                Some(1) => SlotKind::Recipient,
                Some(2) => SlotKind::KeyFile,
                Some(3) => SlotKind::Volume,
                _ => return Err(bad("unknown key slot kind")),
            };
            let n = r.u16().ok_or_else(|| bad("short"))? as usize;
            if n > MAX_SLOT {
                return Err(bad("key slot too long"));
            }
            let body = r.take(n).ok_or_else(|| bad("short"))?.to_vec();
            slots.push(Slot { kind, body });
        }
        if r.remaining() != 0 {
            return Err(bad("bytes after the last key slot"));
        }
        let h = Header {
            version,
            kind,
            export_id,
            volume_id,
            logical_blocks,
            written,
            snapshot: SnapRef {
                id,
                name: snap_name,
                created_sec,
                created_nsec,
            },
            base,
            source_key,
            slots,
        };
        if h.snapshot_link()[..] != snap_link[..]
            || h.base_link().unwrap_or([0; 32])[..] != base_link[..]
        {
            return Err(bad(
                "its snapshot links do not match the snapshots it names",
            ));
        }
        Ok(h)
    }
}

/// A record inside a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// `count` blocks of data follow.
    Data = 1,
    /// `count` blocks read as zeros.
    Zero = 2,
    /// `count` blocks are unmapped (an increment's trims).
    Trim = 3,
}

/// One record, its data borrowed from the chunk.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: RecordKind,
    pub first: u64,
    pub count: u64,
    pub data: &'a [u8],
}

pub fn put_record(out: &mut Vec<u8>, kind: RecordKind, first: u64, count: u32, data: &[u8]) {
    out.push(kind as u8);
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(data);
}

/// Splits a chunk's plaintext into records, checking each lies inside the
/// volume and after the one before (`next`: the first block the next
/// record may start at, carried from chunk to chunk).
pub fn records<'a>(plain: &'a [u8], logical: u64, next: &mut u64) -> Result<Vec<Record<'a>>> {
    let bad = |what: String| ExportError::Corrupt(format!("bad record: {what}"));
    let mut r = Reader::new(plain);
    let mut out = Vec::new();
    while r.remaining() > 0 {
        let kind = match r.u8() {
            Some(1) => RecordKind::Data,
            Some(2) => RecordKind::Zero,
            Some(3) => RecordKind::Trim,
            k => return Err(bad(format!("unknown kind {k:?}"))),
        };
        let first = r.u64().ok_or_else(|| bad("short".into()))?;
        let count = r.u32().ok_or_else(|| bad("short".into()))? as u64;
        if count == 0 || first < *next || first.checked_add(count).is_none_or(|e| e > logical) {
            return Err(bad(format!(
                "blocks {first}+{count} overlap the previous record or lie outside the volume"
            )));
        }
        let data = if kind == RecordKind::Data {
            let n = (count as usize)
                .checked_mul(BLOCK_SIZE)
                .ok_or_else(|| bad("too long".into()))?;
            r.take(n)
                .ok_or_else(|| bad("its data is cut short".into()))?
        } else {
            &[]
        };
        *next = first + count;
        out.push(Record {
            kind,
            first,
            count,
            data,
        });
    }
    Ok(out)
}

/// The trailer, after the last chunk.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Trailer {
    pub chunks: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub trim_blocks: u64,
    /// BLAKE3 of every byte of the stream before this field.
    pub hash: [u8; 32],
}

impl Trailer {
    /// The trailer's bytes after its mark, except the hash.
    pub fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(TRAILER_LEN);
        b.extend_from_slice(&TRAILER_MAGIC);
        for v in [
            self.chunks,
            self.data_blocks,
            self.zero_blocks,
            self.trim_blocks,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8; TRAILER_LEN]) -> Result<Trailer> {
        if b[..8] != TRAILER_MAGIC {
            return Err(ExportError::Corrupt("bad trailer (no LSVFSEND)".into()));
        }
        let mut r = Reader::new(&b[8..]);
        let mut v = [0u64; 4];
        for x in &mut v {
            *x = r.u64().expect("fixed length");
        }
        Ok(Trailer {
            chunks: v[0],
            data_blocks: v[1],
            zero_blocks: v[2],
            trim_blocks: v[3],
            hash: r.take(32).expect("fixed length").try_into().expect("32"),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn header(kind: Kind) -> Header {
        Header {
            version: VERSION,
            kind,
            export_id: [1; 16],
            volume_id: [2; 16],
            logical_blocks: 4096,
            written: 1_800_000_000,
            snapshot: SnapRef {
                id: 7,
                name: "nightly".into(),
                created_sec: 1_799_999_999,
                created_nsec: 5,
            },
            base: (kind == Kind::Increment).then(|| SnapRef {
                id: 6,
                name: "base".into(),
                created_sec: 1_799_999_000,
                created_nsec: 9,
            }),
            source_key: [8; 32],
            slots: vec![Slot {
                kind: SlotKind::KeyFile,
                body: vec![9; 88],
            }],
        }
    }

    #[test]
    fn headers_round_trip_and_every_cut_or_flip_is_refused() {
        for kind in [Kind::Full, Kind::Increment] {
            let h = header(kind);
            let b = h.encode();
            assert_eq!(Header::decode(&b).unwrap(), h);
            for n in 0..b.len() {
                assert!(Header::decode(&b[..n]).is_err(), "cut at {n}");
            }
            // A flipped byte anywhere never panics, and one in a name or a
            // link is refused (the links bind the names and times).
            for i in 0..b.len() {
                let mut c = b.clone();
                c[i] ^= 0x10;
                let r = Header::decode(&c);
                let linked = (72..104).contains(&i) || (136..156).contains(&i);
                if linked {
                    assert!(r.is_err(), "flip at {i}");
                }
            }
        }
    }

    /// Names a volume would refuse only after every block is applied are
    /// refused when the header is read.
    #[test]
    fn snapshot_names_dot_and_dot_dot_are_refused() {
        for bad in [".", ".."] {
            let mut h = header(Kind::Increment);
            h.snapshot.name = bad.into();
            assert!(Header::decode(&h.encode()).is_err(), "snapshot {bad}");
            let mut h = header(Kind::Increment);
            h.base.as_mut().unwrap().name = bad.into();
            assert!(Header::decode(&h.encode()).is_err(), "base {bad}");
        }
        let mut h = header(Kind::Full);
        h.snapshot.name = "...".into();
        assert!(Header::decode(&h.encode()).is_ok());
    }

    #[test]
    fn versions_1_and_2_decode_as_themselves_and_others_are_refused() {
        let mut h = header(Kind::Full);
        for v in [OLDEST_VERSION, VERSION] {
            h.version = v;
            assert_eq!(Header::decode(&h.encode()).unwrap().version, v);
        }
        for v in [0, VERSION + 1, u16::MAX] {
            h.version = v;
            match Header::decode(&h.encode()) {
                Err(ExportError::NotAnExport(m)) => {
                    assert!(m.contains(&format!("version {v}")), "{m}")
                }
                other => panic!("version {v}: {other:?}"),
            }
        }
    }

    #[test]
    fn records_must_be_ordered_inside_the_volume_and_whole() {
        let mut p = Vec::new();
        put_record(&mut p, RecordKind::Data, 3, 2, &[7u8; 2 * BLOCK_SIZE]);
        put_record(&mut p, RecordKind::Trim, 10, 5, &[]);
        let mut next = 0;
        let rs = records(&p, 100, &mut next).unwrap();
        assert_eq!(rs.len(), 2);
        assert_eq!(
            (rs[1].kind, rs[1].first, rs[1].count),
            (RecordKind::Trim, 10, 5)
        );
        assert_eq!(next, 15);
        // Beyond the volume, overlapping, out of order, cut short.
        assert!(records(&p, 14, &mut 0).is_err());
        assert!(records(&p, 100, &mut 4).is_err());
        assert!(records(&p[..p.len() - 13 - 1], 100, &mut 0).is_err());
        let mut q = Vec::new();
        put_record(&mut q, RecordKind::Zero, 0, 0, &[]);
        assert!(records(&q, 100, &mut 0).is_err());
    }
}
