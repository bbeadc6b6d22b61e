//! Decoders of untrusted bytes, one entry point each: shared by the
//! cargo-fuzz targets (fuzz/fuzz_targets/*.rs) and the smoke test
//! (tests/fuzz_smoke.rs). The oracle is that nothing panics; each decoder
//! must turn any input into a value or an error.

use std::path::Path;

use lsvfs::fs::acl::Acl;
use lsvfs::fs::btree::Node;
use lsvfs::fs::format::{decode_chunk, parse_xattr_piece, Dirent, Ino, Inode, Superblock};
use lsvfs::keys::{parse_key_file, SealedStore};

/// File-system metadata as the B+tree hands it over after authentication
/// (a volume key holder could write any of it): byte 0 picks the decoder.
pub fn fs_metadata(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 7 {
        0 => drop(Inode::decode(rest, Ino(7))),
        1 => drop(Dirent::decode(rest)),
        2 => drop(Superblock::decode(rest)),
        3 => drop(Node::decode(rest, 77)),
        4 => {
            if let Ok(acl) = Acl::decode(rest) {
                // What the file system does with a stored ACL.
                let _ = acl.is_minimal();
                let _ = acl.encode();
                let _ = acl.create(0o644);
            }
        }
        5 => drop(decode_chunk(rest)),
        // An xattr piece key after its inode and kind (`lsvfs check`).
        _ => drop(parse_xattr_piece(rest)),
    }
}

/// A key file's bytes.
pub fn key_file(data: &[u8]) {
    let _ = parse_key_file(data, Path::new("fuzz.key"));
}

/// The sealed store: byte 0 even, the sealed file as it is on disk (magic,
/// version, measurement, AEAD); odd, its contents after the AEAD opened,
/// as version 1 (bit 1 clear) or 2 (bit 1 set).
pub fn sealed_store(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let dir = Path::new("/nonexistent/lsvfs-fuzz-store");
    if which % 2 == 0 {
        let _ = SealedStore::unseal(dir, rest, &[7u8; 32], &[9u8; 32]);
        if let Some(t) = lsvfs::keys::tpm::TpmSealed::decode(rest) {
            assert!(t.pcrs.len() <= 24);
            assert_eq!(
                lsvfs::keys::tpm::TpmSealed::decode(&t.encode()).map(|u| u.pcrs),
                Some(t.pcrs)
            );
        }
    } else if let Some(st) = SealedStore::decode(dir, 1 + u32::from(which >> 1) % 4, rest) {
        let _ = lsvfs::keys::host_id(&st);
        for v in &st.volumes {
            let e = st.entry(&v.volume_id).expect("a decoded volume is found");
            assert!(e.shares.len() >= e.threshold as usize && e.threshold >= 1);
        }
        for s in &st.seen {
            let _ = st.seen(&s.volume_id);
        }
    }
}

/// One line from the mount's control socket.
pub fn control_request(data: &[u8]) {
    let _ = lsvfs::cli::parse_control_request(data);
}

/// An export stream (byte 0 even), as `lsvfs export verify` and `lsvfs
/// restore` read it, with the key file whose KEK is 32 bytes of 0x33; or
/// (odd) a chunk's plaintext, as the records decoder sees it after
/// authentication.
pub fn export_stream(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 1 {
        let mut next = 0;
        if let Ok(rs) = lsvfs::export::decode_records(rest, 1 << 20, &mut next) {
            for r in rs {
                assert!(r.count > 0 && r.first + r.count <= 1 << 20);
            }
        }
        return;
    }
    if let Ok(s) = lsvfs::export::Stream::open(rest, "fuzz.lsx") {
        let _ = s.verify();
    }
    let kek = lsvfs::crypto::Kek::from_bytes(zeroize::Zeroizing::new([0x33; 32]));
    if let Ok(s) = lsvfs::export::Stream::open(rest, "fuzz.lsx") {
        if let Ok(key) = s.open_key(&[], std::slice::from_ref(&kek)) {
            let _ = s.read_records(&key, &mut |_| Ok(()));
        }
    }
}
