//! The frozen export chains: a full export and one increment in each export
//! format version (1: XChaCha20-Poly1305 chunks, 2: AES-256-GCM), written
//! once by the `#[ignore]`d generator below and committed under
//! tests/images/exportN/, restored on every test run by the `lsvfs` binary
//! and compared with trees the generator's scripts make on the host's own
//! file system. Damaged copies are refused with their exit codes.

mod common;

use std::path::Path;

use common::mounted::{lsvfs, ok, sh_in, Mounted};

/// The directory of version `v`'s chain, and its key file's name there.
fn chain(v: u16) -> (String, String) {
    (format!("tests/images/export{v}"), format!("export{v}.key"))
}

/// `ok` and `lsvfs` with the arguments in one string (no argument holds a
/// space).
fn lx(dir: &Path, args: &str) -> String {
    ok(&args.split_whitespace().collect::<Vec<_>>(), dir)
}

fn lxr(dir: &Path, args: &str) -> std::process::Output {
    lsvfs(&args.split_whitespace().collect::<Vec<_>>(), dir)
}

/// The tree of snapshot `one`.
const SCRIPT1: &str = "mkdir -p d/e empty && printf 'first\\n' > a && ln a hard && ln -s a sym && \
     printf 'x%.0s' $(seq 1 9000) > d/e/long && truncate -s 3M sparse && \
     printf 'mid' | dd of=sparse bs=1 seek=1500000 conv=notrunc status=none && \
     chmod 751 d && setfattr -n user.k -v v a";
/// What changed before snapshot `two`: a rename over, an append, a delete,
/// a new file.
const SCRIPT2: &str = "printf 'second\\n' > a.new && mv a.new a && echo more >> hard && \
     rm d/e/long && echo new > d/new";

/// Entries (type, mode, size, links, target), contents and xattrs; no
/// times, owners or inode numbers (the host's run of the scripts differs
/// there).
fn manifest(dir: &Path) -> String {
    sh_in(
        dir,
        "find . -path ./.snapshots -prune -o ! -type d -printf '%p %y %m %s %n %l\\n' \
           -o -type d -printf '%p %y %m - %n\\n' | sort; \
         find . -path ./.snapshots -prune -o -type f -print0 | sort -z | xargs -0 -r sha256sum; \
         find . -path ./.snapshots -prune -o -print | sort | \
           while read -r f; do getfattr -h -d -m user. --absolute-names \"$f\" 2>/dev/null; done",
    )
}

#[test]
#[ignore = "writes the frozen export chain of this build's format version; never regenerate an existing one"]
fn generate_export_chain() {
    let (dir, key) = chain(lsvfs::export::VERSION);
    let m = Mounted::with_size("16M");
    let p = m.p();
    sh_in(&m.m(), SCRIPT1);
    lx(p, "snapshot create m one");
    sh_in(&m.m(), SCRIPT2);
    lx(p, "snapshot create m two");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    std::fs::create_dir_all(&out).unwrap();
    lx(p, "recipient keygen alice.id");
    lx(
        p,
        "snapshot export m one --recipient alice.id.pub --key-file k -o full.lsx",
    );
    lx(
        p,
        "snapshot export m two --since one --recipient alice.id.pub --key-file k -o inc.lsx",
    );
    for f in ["full.lsx", "inc.lsx", "alice.id", "alice.id.pub"] {
        std::fs::copy(p.join(f), out.join(f)).unwrap();
    }
    std::fs::copy(p.join("k"), out.join(key)).unwrap();
    m.unmount();
}

fn expected(script: &[&str]) -> String {
    let d = tempfile::tempdir().unwrap();
    for s in script {
        sh_in(d.path(), s);
    }
    manifest(d.path())
}

fn copy_images(v: u16, to: &Path) {
    let (dir, key) = chain(v);
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    for f in ["full.lsx", "inc.lsx", "alice.id"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    std::fs::copy(from.join(key), to.join("source.key")).unwrap();
    // Key files must be 0600 (git keeps only the executable bit).
    sh_in(to, "chmod 600 alice.id source.key");
}

#[test]
fn the_frozen_version1_chain_restores_and_damage_to_it_is_refused() {
    frozen_chain_restores_and_damage_to_it_is_refused(1, "XChaCha20-Poly1305");
}

#[test]
fn the_frozen_version2_chain_restores_and_damage_to_it_is_refused() {
    frozen_chain_restores_and_damage_to_it_is_refused(2, "AES-256-GCM");
}

fn frozen_chain_restores_and_damage_to_it_is_refused(v: u16, cipher: &str) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    copy_images(v, p);
    let v_line = format!("format version:  {v} (chunks sealed with {cipher})");
    for f in ["full.lsx", "inc.lsx"] {
        let show = lx(p, &format!("export show {f}"));
        assert!(show.contains(&v_line), "{f}: {show}");
    }
    let v = lx(p, "export verify full.lsx inc.lsx");
    assert!(v.contains("chain: 2 exports"), "{v}");
    // The full export opens for the recipient, the increment for the key
    // file: both slot kinds.
    lx(p, "keygen new.key");
    lx(
        p,
        "restore full.lsx --to r.vol --identity alice.id --key-file new.key",
    );
    let r = lxr(
        p,
        "restore --incremental inc.lsx --to r.vol --key-file new.key",
    );
    assert_eq!(r.status.code(), Some(5), "new.key opens no slot of inc.lsx");
    lx(
        p,
        "restore --incremental inc.lsx --to r.vol --key-file new.key --identity alice.id",
    );
    // The source's recovery key alone opens the whole chain too.
    lx(
        p,
        "restore full.lsx inc.lsx --to r2.vol --key-file source.key",
    );
    std::fs::create_dir(p.join("m")).unwrap();
    lx(p, "mount r.vol m --key-file new.key");
    let one = manifest(&p.join("m/.snapshots/one"));
    let two = manifest(&p.join("m/.snapshots/two"));
    let live = manifest(&p.join("m"));
    lx(p, "unmount m");
    lx(p, "mount r2.vol m --key-file source.key");
    let live2 = manifest(&p.join("m"));
    lx(p, "unmount m");
    assert_eq!(live2, live);
    assert_eq!(one, expected(&[SCRIPT1]), "snapshot one");
    assert_eq!(two, expected(&[SCRIPT1, SCRIPT2]), "snapshot two");
    assert_eq!(live, two, "the live tree is the newest snapshot");

    // Damaged copies: a flipped byte (4), cut short (16), reordered (15).
    let full = std::fs::read(p.join("full.lsx")).unwrap();
    let mut bad = full.clone();
    let n = bad.len();
    bad[n - 100] ^= 1;
    std::fs::write(p.join("bad.lsx"), &bad).unwrap();
    let r = lxr(p, "export verify bad.lsx");
    assert_eq!(r.status.code(), Some(4));
    std::fs::write(p.join("cut.lsx"), &full[..n - 40]).unwrap();
    let r = lxr(p, "export verify cut.lsx");
    assert_eq!(r.status.code(), Some(16));
    let r = lxr(p, "export verify inc.lsx full.lsx");
    assert_eq!(r.status.code(), Some(15));
}
