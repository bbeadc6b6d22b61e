//! `systemd-analyze verify` accepts the unit file (with ExecStart pointed at
//! the built binary, since verify checks that the program exists).

use std::process::Command;

#[test]
fn unit_file_verifies() {
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED: systemd-analyze is not installed (Debian package: systemd)");
        return;
    };
    assert!(probe.status.success());
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/lsvfs-keyserver.service"
    ))
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/lsvfs-keyserver "));
    let unit = unit.replace(
        "/usr/local/bin/lsvfs-keyserver",
        env!("CARGO_BIN_EXE_lsvfs-keyserver"),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lsvfs-keyserver.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about the host's own units are not ours to fix.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("lsvfs-keyserver"))
        .collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");
}
