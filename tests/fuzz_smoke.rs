//! Runs the fuzz harness (fuzz/harness.rs) on deterministic inputs, so the
//! code the fuzzer drives is exercised by every test run on stable Rust.
//! The real fuzzer: see README ("Fuzzing").

#[path = "../fuzz/harness.rs"]
mod harness;

#[test]
fn fuzz_harness_survives_random_patches_and_images() {
    let base = harness::base_image();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..300 {
        let mut input = vec![1u8];
        for _ in 0..(round % 12 + 1) {
            // Aim half the patches at the metadata region and log head.
            let off = if next() % 2 == 0 {
                next() % (base.len() as u64)
            } else {
                next() % (1 << 21)
            };
            input.extend_from_slice(&(off as u32).to_le_bytes());
            input.push(next() as u8);
        }
        harness::run(&input);
    }
    // Raw images: empty, tiny, a valid header with garbage after it.
    harness::run(&[0]);
    harness::run(&[0, 1, 2, 3]);
    let mut img = vec![0u8];
    img.extend_from_slice(&base[..8192]);
    harness::run(&img);
    img.extend_from_slice(&vec![0xff; 1 << 20]);
    harness::run(&img);
}

#[path = "../fuzz/decoders.rs"]
mod decoders;

/// Deterministic mutations of `seed`: bit flips, truncations, extensions,
/// overwritten runs, and pure noise; `run` must survive every one.
fn mutations(seed: &[u8], rounds: usize, run: fn(&[u8])) {
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ seed.len() as u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    run(seed);
    run(&[]);
    for _ in 0..rounds {
        let mut m = seed.to_vec();
        match next() % 5 {
            0 if !m.is_empty() => {
                let i = (next() as usize) % m.len();
                m[i] ^= 1 << (next() % 8);
            }
            1 => m.truncate((next() as usize) % (seed.len() + 1)),
            2 => m.extend((0..next() % 64).map(|_| next() as u8)),
            3 if !m.is_empty() => {
                let i = (next() as usize) % m.len();
                let n = ((next() as usize) % 16).min(m.len() - i);
                for b in &mut m[i..i + n] {
                    *b = next() as u8;
                }
            }
            _ => m = (0..next() % 600).map(|_| next() as u8).collect(),
        }
        run(&m);
    }
}

#[test]
fn fs_metadata_decoders_survive_mutations() {
    use lsvfs::fs::btree::Node;
    use lsvfs::fs::format::{Dirent, Ino, Inode, Superblock};
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    let tag = |t: u8, b: Vec<u8>| [vec![t], b].concat();
    seeds.push(tag(0, Inode::new(0o100644, 1, 2, 0).encode()));
    seeds.push(tag(
        1,
        Dirent {
            ino: Ino(5),
            cookie: 9,
            mode: libc::S_IFREG,
        }
        .encode(),
    ));
    seeds.push(tag(
        2,
        Superblock {
            version: 2,
            root: 3,
            next_ino: 12,
        }
        .encode(),
    ));
    let leaf = Node::Leaf(vec![
        (b"k1".to_vec().into(), b"v1".to_vec().into()),
        (b"k2".to_vec().into(), vec![7u8; 300].into()),
    ]);
    seeds.push(tag(3, leaf.encode()));
    let branch = Node::Branch {
        keys: vec![b"m".to_vec().into()],
        children: vec![4, 5],
    };
    seeds.push(tag(3, branch.encode()));
    // An ACL as setfacl hands it over: version 2, user::rw-, user:55:r--,
    // group::r--, mask::r--, other::---.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (t, p, id) in [
        (1u16, 6u16, u32::MAX),
        (2, 4, 55),
        (4, 4, u32::MAX),
        (16, 4, u32::MAX),
        (32, 0, u32::MAX),
    ] {
        acl.extend_from_slice(&t.to_le_bytes());
        acl.extend_from_slice(&p.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    seeds.push(tag(4, acl));
    seeds.push(tag(5, (0..128u64).flat_map(|b| b.to_le_bytes()).collect()));
    seeds.push(tag(6, b"user.x\0\x02".to_vec()));
    for s in &seeds {
        mutations(s, 3000, decoders::fs_metadata);
    }
}

#[test]
fn key_file_parser_survives_mutations() {
    let seed = format!("lsvfs-key-v1 {}\n", "0123456789abcdef".repeat(4));
    assert!(lsvfs::keys::parse_key_file(seed.as_bytes(), std::path::Path::new("k")).is_ok());
    mutations(seed.as_bytes(), 5000, decoders::key_file);
}

#[test]
fn sealed_store_decoders_survive_mutations() {
    // Contents: identity, URL, CA, one volume, then (version 2) one
    // rollback record (see docs/FORMAT.md). The first byte picks the
    // version: 3 is version 2, 5 version 3, 7 version 4.
    let mut plain = vec![3u8];
    plain.extend_from_slice(&[3u8; 32]);
    let url = b"https://127.0.0.1:7443";
    plain.extend_from_slice(&(url.len() as u16).to_le_bytes());
    plain.extend_from_slice(url);
    let ca = b"-----BEGIN CERTIFICATE-----\n";
    plain.extend_from_slice(&(ca.len() as u32).to_le_bytes());
    plain.extend_from_slice(ca);
    plain.extend_from_slice(&1u32.to_le_bytes());
    plain.extend_from_slice(&[5u8; 16]);
    plain.extend_from_slice(&2u32.to_le_bytes());
    plain.extend_from_slice(&[6u8; lsvfs::crypto::WRAPPED_LEN]);
    let x = std::path::Path::new("/x");
    let v1 = plain[1..].to_vec();
    plain.extend_from_slice(&1u32.to_le_bytes());
    plain.extend_from_slice(&[5u8; 16]);
    plain.extend_from_slice(&77u64.to_le_bytes());
    let st = lsvfs::keys::SealedStore::decode(x, 2, &plain[1..]).unwrap();
    assert_eq!(st.seen(&[5u8; 16]), Some(77));
    // Version 1 has no records; each version refuses the other's bytes.
    assert!(lsvfs::keys::SealedStore::decode(x, 1, &v1)
        .unwrap()
        .seen
        .is_empty());
    assert!(lsvfs::keys::SealedStore::decode(x, 1, &plain[1..]).is_none());
    assert!(lsvfs::keys::SealedStore::decode(x, 2, &v1).is_none());
    mutations(&plain, 5000, decoders::sealed_store);

    // Version 3 (first byte 5): three servers, one volume of threshold 2
    // with three shares, one record.
    let mut v3 = vec![5u8];
    v3.extend_from_slice(&[3u8; 32]);
    v3.push(3);
    let urls: Vec<String> = (1..=3)
        .map(|i| format!("https://127.0.0.1:744{i}"))
        .collect();
    let put_str = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u16).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    for u in &urls {
        put_str(&mut v3, u);
    }
    v3.extend_from_slice(&(ca.len() as u32).to_le_bytes());
    v3.extend_from_slice(ca);
    v3.extend_from_slice(&1u32.to_le_bytes());
    v3.extend_from_slice(&[5u8; 16]);
    v3.extend_from_slice(&[2, 3, 0b011]);
    for (i, u) in urls.iter().enumerate() {
        v3.push(i as u8 + 1);
        put_str(&mut v3, u);
        v3.extend_from_slice(&1u32.to_le_bytes());
        v3.extend_from_slice(&[6u8; lsvfs::crypto::WRAPPED_LEN]);
    }
    v3.extend_from_slice(&1u32.to_le_bytes());
    v3.extend_from_slice(&[5u8; 16]);
    v3.extend_from_slice(&77u64.to_le_bytes());
    let st = lsvfs::keys::SealedStore::decode(x, 3, &v3[1..]).unwrap();
    let e = st.entry(&[5u8; 16]).unwrap();
    assert_eq!((e.threshold, e.shares.len(), e.answered), (2, 3, 0b011));
    assert_eq!(st.servers, urls);
    assert!(lsvfs::keys::SealedStore::decode(x, 2, &v3[1..]).is_none());
    assert!(lsvfs::keys::SealedStore::decode(x, 3, &plain[1..]).is_none());
    mutations(&v3, 5000, decoders::sealed_store);
    // Version 4 (first byte 7): version 3 and the TPM counter anchor.
    let mut v4 = v3.clone();
    v4[0] = 7;
    v4.extend_from_slice(&41u64.to_le_bytes());
    v4.extend_from_slice(&0x0180_0001u32.to_le_bytes());
    let st = lsvfs::keys::SealedStore::decode(x, 4, &v4[1..]).unwrap();
    assert_eq!(
        (st.anchor, st.nv_index, st.seen(&[5u8; 16])),
        (41, 0x0180_0001, Some(77))
    );
    assert!(lsvfs::keys::SealedStore::decode(x, 4, &v3[1..]).is_none());
    assert!(lsvfs::keys::SealedStore::decode(x, 3, &v4[1..]).is_none());
    mutations(&v4, 5000, decoders::sealed_store);

    // A TPM-sealed host secret file (first byte 0: even), PCRs 0 and 7.
    let mut tpm = vec![0u8];
    tpm.extend_from_slice(b"LSVFSTPM");
    tpm.extend_from_slice(&1u32.to_le_bytes());
    tpm.extend_from_slice(&[2, 0, 7]);
    tpm.extend_from_slice(&[4u8; 32]);
    tpm.extend_from_slice(&0x0180_0001u32.to_le_bytes());
    for part in [&[1u8; 90][..], &[2u8; 120][..]] {
        tpm.extend_from_slice(&(part.len() as u32).to_le_bytes());
        tpm.extend_from_slice(part);
    }
    let t = lsvfs::keys::tpm::TpmSealed::decode(&tpm[1..]).unwrap();
    assert_eq!(
        (t.pcrs.as_slice(), t.pcr_digest),
        (&[0u8, 7][..], [4u8; 32])
    );
    mutations(&tpm, 5000, decoders::sealed_store);
    // The file as on disk: magic, version, measurement, nonce, ciphertext.
    let mut file = vec![0u8];
    file.extend_from_slice(b"LSVFSSS\0");
    file.extend_from_slice(&1u32.to_le_bytes());
    file.extend_from_slice(&[9u8; 32]);
    file.extend_from_slice(&[0u8; 24 + 4 + 64]);
    mutations(&file, 3000, decoders::sealed_store);
}

#[test]
fn control_request_parser_survives_mutations() {
    for seed in [
        "{\"op\":\"create\",\"name\":\"nightly\"}\n",
        "{\"op\":\"delete\",\"name\":\"x\"}\n",
        "{\"op\":\"list\"}\n",
    ] {
        assert!(lsvfs::cli::parse_control_request(seed.as_bytes()).is_ok());
        mutations(seed.as_bytes(), 3000, decoders::control_request);
    }
}

#[test]
fn export_stream_decoders_survive_mutations() {
    use lsvfs::crypto::{Kek, MasterKey};
    use lsvfs::device::{Device, MemDevice};
    use lsvfs::volume::{self, CreateOptions, KeySlot, Lba, Options, Transaction, Volume};
    use std::sync::Arc;
    // A small export with a key-file slot for the decoder's key (0x33...).
    let dev = Arc::new(MemDevice::new());
    let m = MasterKey::from_bytes(zeroize::Zeroizing::new([1; 32]));
    volume::create(
        &*dev,
        &m,
        [2; 16],
        [KeySlot::EMPTY; volume::KEY_SLOTS],
        &CreateOptions {
            logical_blocks: 64,
            segment_blocks: 16,
        },
    )
    .unwrap();
    let o = Options {
        background: false,
        ..Options::default()
    };
    let v = Volume::open(dev as Arc<dyn Device>, &m, o).unwrap();
    let mut t = Transaction::new();
    t.write(Lba(3), vec![7u8; 4096]);
    t.zero(Lba(9), 2);
    v.commit(t).unwrap();
    v.snapshot_create("a").unwrap();
    v.trim(Lba(3), 1).unwrap();
    v.write(Lba(20), &[9u8; 4096]).unwrap();
    v.snapshot_create("b").unwrap();
    let holders = lsvfs::export::Holders {
        recipients: vec![],
        key_files: vec![Kek::from_bytes(zeroize::Zeroizing::new([0x33; 32]))],
    };
    for since in [None, Some("a")] {
        let mut out = vec![0u8];
        lsvfs::export::export(
            &v,
            "b",
            since,
            &holders,
            lsvfs::export::READERS,
            &mut out,
            &mut |_, _| Ok(()),
        )
        .unwrap();
        decoders::export_stream(&out);
        mutations(&out, 3000, decoders::export_stream);
    }
    // Records: a data, a zero and a trim record, mutated.
    let mut recs = vec![1u8];
    for (kind, first, count) in [(1u8, 2u64, 1u32), (2, 5, 3), (3, 9, 100)] {
        recs.push(kind);
        recs.extend_from_slice(&first.to_le_bytes());
        recs.extend_from_slice(&count.to_le_bytes());
        if kind == 1 {
            recs.extend_from_slice(&[5u8; 4096]);
        }
    }
    mutations(&recs, 3000, decoders::export_stream);
}
