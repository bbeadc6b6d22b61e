//! The `lsvfs` binary: commands, messages and exit codes as a user sees them.

use lsvfs::volume::Lba;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn lsvfs(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lsvfs"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run lsvfs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(args: &[&str], cwd: &Path) -> String {
    let o = lsvfs(args, cwd);
    assert!(o.status.success(), "lsvfs {args:?} failed: {}", text(&o));
    text(&o)
}

fn fails(args: &[&str], cwd: &Path, code: i32, needle: &str) {
    let o = lsvfs(args, cwd);
    assert_eq!(o.status.code(), Some(code), "lsvfs {args:?}: {}", text(&o));
    assert!(
        text(&o).contains(needle),
        "lsvfs {args:?}: {:?} lacks {needle:?}",
        text(&o)
    );
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
}

#[test]
fn create_write_read_check_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(&["keygen", "k"], p);
    assert_eq!(
        std::fs::metadata(p.join("k")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    ok(&["create", "v.vol", "--size", "64M", "--key-file", "k"], p);
    assert_eq!(
        std::fs::metadata(p.join("v.vol"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(p.join("in"), &data).unwrap();
    ok(
        &[
            "write-blocks",
            "v.vol",
            "--key-file",
            "k",
            "--offset",
            "0",
            "--input",
            "in",
        ],
        p,
    );
    ok(
        &[
            "read-blocks",
            "v.vol",
            "--key-file",
            "k",
            "--offset",
            "0",
            "--length",
            "303104",
            "--output",
            "out",
        ],
        p,
    );
    let out = std::fs::read(p.join("out")).unwrap();
    assert_eq!(&out[..data.len()], &data[..]);
    assert!(out[data.len()..].iter().all(|b| *b == 0));
    // The same data through one crypto thread and small chunks.
    ok(
        &[
            "read-blocks",
            "v.vol",
            "--key-file",
            "k",
            "--offset",
            "0",
            "--length",
            "303104",
            "--output",
            "out1",
            "--crypto-threads",
            "1",
            "--chunk-size",
            "8K",
        ],
        p,
    );
    assert_eq!(std::fs::read(p.join("out1")).unwrap(), out);
    fails(
        &["check", "v.vol", "--key-file", "k", "--chunk-size", "100"],
        p,
        2,
        "--chunk-size",
    );
    let c = ok(&["check", "v.vol", "--key-file", "k"], p);
    assert!(
        c.contains("clean") && c.contains("74 data blocks") && c.contains("no file system"),
        "{c}"
    );
    let i = ok(&["info", "v.vol", "--key-file", "k"], p);
    assert!(
        i.contains("64.0 MiB") && i.contains("allocated:") && i.contains("KeyFile"),
        "{i}"
    );
    // The plaintext never appears in the backing file.
    let raw = std::fs::read(p.join("v.vol")).unwrap();
    assert!(!raw.windows(64).any(|w| w == &data[1000..1064]));
}

#[test]
fn errors_name_the_problem_and_exit_with_stable_codes() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(&["keygen", "k"], p);
    ok(&["keygen", "other"], p);
    ok(&["create", "v.vol", "--size", "8M", "--key-file", "k"], p);
    fails(
        &["check", "v.vol", "--key-file", "other"],
        p,
        5,
        "wrong key",
    );
    fails(
        &["create", "v.vol", "--size", "8M", "--key-file", "k"],
        p,
        8,
        "already exists",
    );
    fails(
        &["create", "w.vol", "--size", "12Q", "--key-file", "k"],
        p,
        2,
        "suffix",
    );
    fails(
        &["create", "w.vol", "--size", "1000", "--key-file", "k"],
        p,
        2,
        "multiple of 4096",
    );
    std::fs::write(p.join("junk"), vec![7u8; 100_000]).unwrap();
    fails(&["info", "junk"], p, 3, "junk is not an lsvfs volume");
    fails(
        &["check", "missing.vol", "--key-file", "k"],
        p,
        8,
        "missing.vol",
    );
    std::fs::set_permissions(p.join("other"), std::fs::Permissions::from_mode(0o644)).unwrap();
    fails(
        &["check", "v.vol", "--key-file", "other"],
        p,
        2,
        "chmod 600",
    );
    fails(
        &[
            "read-blocks",
            "v.vol",
            "--key-file",
            "k",
            "--offset",
            "8388608",
            "--length",
            "4096",
            "--output",
            "o",
        ],
        p,
        2,
        "outside the volume",
    );
    fails(&["frobnicate"], p, 2, "unrecognized subcommand");

    // Damage a data block: check reports it and exits 4.
    std::fs::write(p.join("in"), vec![1u8; 8192]).unwrap();
    ok(
        &["write-blocks", "v.vol", "--key-file", "k", "--input", "in"],
        p,
    );
    let raw = std::fs::read(p.join("v.vol")).unwrap();
    let data_block = {
        let dev =
            std::sync::Arc::new(lsvfs::device::FileDevice::open(&p.join("v.vol"), false).unwrap());
        let header = lsvfs::volume::read_header(&*dev).unwrap();
        let master =
            lsvfs::keys::unlock(&header, &lsvfs::keys::read_key_file(&p.join("k")).unwrap())
                .unwrap();
        let opts = lsvfs::volume::Options {
            read_only: true,
            background: false,
            ..Default::default()
        };
        let v = lsvfs::volume::Volume::open(dev, &master, opts).unwrap();
        v.locate(Lba(0)).unwrap().expect("block 0 was written") as usize * 4096
    };
    let mut damaged = raw.clone();
    damaged[data_block + 10] ^= 0xff;
    std::fs::write(p.join("v.vol"), &damaged).unwrap();
    fails(
        &["check", "v.vol", "--key-file", "k"],
        p,
        4,
        "fails authentication",
    );
    fails(
        &[
            "read-blocks",
            "v.vol",
            "--key-file",
            "k",
            "--length",
            "4096",
            "--output",
            "o",
        ],
        p,
        4,
        "integrity check failed for logical block 0",
    );

    // A truncated volume.
    std::fs::write(p.join("v.vol"), &raw[..6000]).unwrap();
    fails(&["check", "v.vol", "--key-file", "k"], p, 4, "corrupted");
}

#[test]
fn second_writer_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(&["keygen", "k"], p);
    ok(&["create", "v.vol", "--size", "8M", "--key-file", "k"], p);
    let _held = lsvfs::device::FileDevice::open(&p.join("v.vol"), true).unwrap();
    fails(
        &["write-blocks", "v.vol", "--key-file", "k", "--input", "k"],
        p,
        7,
        "in use",
    );
}

#[test]
fn help_lists_the_commands() {
    let d = tempfile::tempdir().unwrap();
    let h = ok(&["--help"], d.path());
    for c in [
        "keygen",
        "create",
        "info",
        "check",
        "write-blocks",
        "read-blocks",
    ] {
        assert!(h.contains(c), "{h}");
    }
}
