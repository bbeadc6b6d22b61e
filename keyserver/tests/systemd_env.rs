//! The server under systemd's conventions, without systemd: READY=1 on
//! $NOTIFY_SOCKET, and secrets read from $CREDENTIALS_DIRECTORY.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::{volume_id, Server};
use lsvfs_keyserver::client::{register_volume, unlock, HostIdentity};

#[test]
fn notifies_ready_and_reads_credentials() {
    let mut server = Server::start();
    let host = HostIdentity::generate();
    server.admin_ok(&["enroll", "h", &host.public_hex()]);
    let kek = register_volume(&server.client(), &host, volume_id(1)).unwrap();
    server.stop();

    // Move both secrets into a credentials directory; the configured paths
    // no longer exist, so the server can only start by using the credentials.
    let creds = server.dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::rename(
        server.dir.path().join("master-key"),
        creds.join("master-key"),
    )
    .unwrap();
    std::fs::rename(server.dir.path().join("server.key"), creds.join("tls-key")).unwrap();

    let notify_path = server.dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    server.spawn_with_env(&[
        ("CREDENTIALS_DIRECTORY", &creds),
        ("NOTIFY_SOCKET", &notify_path),
    ]);
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("no sd_notify message");
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert_eq!(
        *unlock(&server.client(), &host, volume_id(1), 1)
            .unwrap()
            .kek
            .key,
        *kek.key
    );

    // Without the credentials the configured paths are missing: startup
    // fails with a message naming the file.
    server.stop();
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--config", server.config.to_str().unwrap()])
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.key") || err.contains("master-key"),
        "{err}"
    );
}
