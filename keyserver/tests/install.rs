//! scripts/install-keyserver.sh, run twice into a scratch root with the
//! built binary: files land with the right modes, and the second run keeps
//! the master key and certificate.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn run_script(root: &Path) {
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/install-keyserver.sh"
        ))
        .env("DESTDIR", root)
        .env("BIN", env!("CARGO_BIN_EXE_lsvfs-keyserver"))
        .env("KEYSERVER_NAMES", "keys.example 127.0.0.1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Next steps"));
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn install_script_is_idempotent() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    run_script(r);
    let etc = r.join("etc/lsvfs-keyserver");
    assert_eq!(mode(&etc.join("master-key")), 0o600);
    assert_eq!(mode(&etc.join("key.pem")), 0o600);
    assert_eq!(mode(&r.join("usr/local/bin/lsvfs-keyserver")), 0o755);
    assert!(r
        .join("etc/systemd/system/lsvfs-keyserver.service")
        .exists());
    let key = std::fs::read(etc.join("master-key")).unwrap();
    let cert = std::fs::read(etc.join("cert.pem")).unwrap();
    let config = std::fs::read_to_string(etc.join("config.toml")).unwrap();
    assert!(config.contains("challenge_lifetime_secs = 30"));

    run_script(r);
    assert_eq!(std::fs::read(etc.join("master-key")).unwrap(), key);
    assert_eq!(std::fs::read(etc.join("cert.pem")).unwrap(), cert);
}
