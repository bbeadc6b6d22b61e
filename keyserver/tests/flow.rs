//! The paths an administrator and a host take, against the real binary over
//! real TLS on 127.0.0.1.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use common::{volume_id, Server};
use lsvfs_keyserver::client::{
    register_volume, report_rewrapped, unlock, ClientError, HostIdentity, Refusal,
};

fn refusal(e: ClientError) -> Refusal {
    match e {
        ClientError::Refused { reason, .. } => reason,
        other => panic!("expected a refusal, got {other}"),
    }
}

#[test]
fn enroll_register_unlock_revoke_and_audit() {
    let server = Server::start();
    let cfg = server.client();
    let host = HostIdentity::generate();
    let vol = volume_id(1);
    let vol_hex = hex::encode(vol);

    // Not enrolled yet.
    assert_eq!(
        refusal(register_volume(&cfg, &host, vol).unwrap_err()),
        Refusal::NotEnrolled
    );
    server.admin_ok(&["enroll", "web1", &host.public_hex()]);
    let kek = register_volume(&cfg, &host, vol).unwrap();
    assert_eq!(kek.version, 1);
    let again = unlock(&cfg, &host, vol, 1).unwrap();
    assert_eq!(*again.kek.key, *kek.key);
    assert!(again.newest.is_none());
    // Registering twice is refused.
    assert_eq!(
        refusal(register_volume(&cfg, &host, vol).unwrap_err()),
        Refusal::VolumeExists
    );

    // Another enrolled host that is not on the ACL.
    let other = HostIdentity::generate();
    server.admin_ok(&["enroll", "web2", &other.public_hex()]);
    assert_eq!(
        refusal(unlock(&cfg, &other, vol, 1).unwrap_err()),
        Refusal::NotAuthorized
    );
    assert_eq!(
        refusal(unlock(&cfg, &host, volume_id(99), 1).unwrap_err()),
        Refusal::UnknownVolume
    );
    // Once authorized (by name), it gets the same KEK.
    server.admin_ok(&["authorize", "web2", &vol_hex]);
    assert_eq!(*unlock(&cfg, &other, vol, 1).unwrap().kek.key, *kek.key);
    server.admin_ok(&["deauthorize", &other.public_hex(), &vol_hex]);
    assert_eq!(
        refusal(unlock(&cfg, &other, vol, 1).unwrap_err()),
        Refusal::NotAuthorized
    );

    // Revocation is effective for the very next request, and audited.
    server.admin_ok(&["revoke", "web1"]);
    assert_eq!(
        refusal(unlock(&cfg, &host, vol, 1).unwrap_err()),
        Refusal::Revoked
    );
    let audit = server.admin_ok(&["audit", "--host", "web1", "--limit", "100"]);
    let entries = audit["entries"].as_array().unwrap();
    let last = entries.last().unwrap();
    assert_eq!(last["action"], "unlock");
    assert_eq!(last["outcome"], "refused");
    assert!(last["reason"].as_str().unwrap().starts_with("revoked"));
    assert_eq!(last["volume"], vol_hex.as_str());
    let released = entries
        .iter()
        .filter(|e| e["action"] == "unlock" && e["outcome"] == "ok")
        .count();
    assert_eq!(released, 1, "{entries:#?}");
    // The refusal before enrollment is there too.
    assert!(entries
        .iter()
        .any(|e| e["action"] == "register"
            && e["reason"].as_str().unwrap().starts_with("not_enrolled")));

    // Human-readable output names the host.
    let out = common::run(&[
        "admin",
        "--socket",
        server.socket.to_str().unwrap(),
        "list-hosts",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("web1") && text.contains("revoked"), "{text}");
}

#[test]
fn rotation_retires_old_versions_once_every_holder_rewrapped() {
    let server = Server::start();
    let cfg = server.client();
    let a = HostIdentity::generate();
    let b = HostIdentity::generate();
    let vol = volume_id(2);
    let vol_hex = hex::encode(vol);
    server.admin_ok(&["enroll", "a", &a.public_hex()]);
    server.admin_ok(&["enroll", "b", &b.public_hex()]);
    let v1 = register_volume(&cfg, &a, vol).unwrap();
    server.admin_ok(&["authorize", "b", &vol_hex]);

    let rotated = server.admin_ok(&["rotate-kek", &vol_hex]);
    assert_eq!(rotated["version"], 2);
    let got = unlock(&cfg, &a, vol, 1).unwrap();
    assert_eq!(*got.kek.key, *v1.key);
    let v2 = got.newest.expect("newest must be offered");
    assert_eq!(v2.version, 2);
    assert_ne!(*v2.key, *v1.key);
    // Asking for v2 directly gives the same key and no newer one.
    let direct = unlock(&cfg, &b, vol, 2).unwrap();
    assert_eq!(*direct.kek.key, *v2.key);
    assert!(direct.newest.is_none());

    report_rewrapped(&cfg, &a, vol, 2).unwrap();
    // b still holds v1.
    assert_eq!(
        server.volume(&vol_hex)["versions"],
        serde_json::json!([1, 2])
    );
    report_rewrapped(&cfg, &b, vol, 2).unwrap();
    let v = server.volume(&vol_hex);
    assert_eq!(v["versions"], serde_json::json!([2]));
    assert!(v["holders"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["wrapped_version"] == 2));
    assert_eq!(
        refusal(unlock(&cfg, &a, vol, 1).unwrap_err()),
        Refusal::UnknownVersion
    );
    assert_eq!(*unlock(&cfg, &a, vol, 2).unwrap().kek.key, *v2.key);
    // Reporting a version that does not exist is refused.
    assert_eq!(
        refusal(report_rewrapped(&cfg, &a, vol, 7).unwrap_err()),
        Refusal::UnknownVersion
    );
}

#[test]
fn restart_keeps_state_and_admin_socket_is_private() {
    let mut server = Server::start();
    let meta = std::fs::metadata(&server.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let host = HostIdentity::generate();
    let vol = volume_id(3);
    server.admin_ok(&["enroll", "db", &host.public_hex()]);
    let kek = register_volume(&server.client(), &host, vol).unwrap();
    server.admin_ok(&["create-volume", "00112233445566778899aabbccddeeff"]);

    server.restart();
    let meta = std::fs::metadata(&server.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let after = unlock(&server.client(), &host, vol, 1).unwrap();
    assert_eq!(*after.kek.key, *kek.key);
    let vols = server.admin_ok(&["list-volumes"]);
    assert_eq!(vols["volumes"].as_array().unwrap().len(), 2);

    // The same identity restored from its secret is the same host.
    let restored = HostIdentity::from_secret(&host.secret());
    assert_eq!(
        *unlock(&server.client(), &restored, vol, 1).unwrap().kek.key,
        *kek.key
    );
}

/// The admin socket answers only root and the server's own user, by its
/// own check too: with the socket's mode opened up (as a careless operator
/// might), another user's request is refused and changes nothing.
#[test]
fn the_admin_socket_refuses_other_users_by_peer_credentials() {
    let server = Server::start();
    let mode = |m: u32| std::fs::Permissions::from_mode(m);
    std::fs::set_permissions(server.dir.path(), mode(0o755)).unwrap();
    std::fs::set_permissions(&server.socket, mode(0o666)).unwrap();
    let host = HostIdentity::generate().public_hex();
    let o = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            common::BIN,
        ])
        .args(["admin", "--socket"])
        .arg(&server.socket)
        .args(["--json", "enroll", "intruder", &host])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("only root or the server's user may use the admin socket"),
        "{out}"
    );
    let hosts = server.admin_ok(&["list-hosts"]);
    assert!(!hosts.to_string().contains(&host), "{hosts}");
    // Root (the server's user here) still can.
    server.admin_ok(&["enroll", "admin-host", &host]);
    assert!(server.admin_ok(&["list-hosts"]).to_string().contains(&host));
}

#[test]
fn admin_refusals_exit_3_with_a_reason() {
    let server = Server::start();
    for (args, needle) in [
        (vec!["revoke", "nobody"], "no host"),
        (
            vec!["enroll", "bad name", &"ab".repeat(32)],
            "bad host name",
        ),
        (vec!["enroll", "x", "abcd"], "bad host id"),
        (vec!["create-volume", "xyz"], "bad volume id"),
        (vec!["rotate-kek", &"00".repeat(16)], "no volume"),
    ] {
        let out = server.admin(&args);
        assert_eq!(out.status.code(), Some(3), "{args:?} {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(needle), "{args:?}: {text}");
    }
}

/// The server picks a SHA-256 suite even when the client prefers AES-256
/// with SHA-384, and sends no session tickets (hosts never resume).
#[test]
fn tls_prefers_sha256_suites_and_sends_no_session_tickets() {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let server = Server::start();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&server.ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    // ring's default order offers TLS13_AES_256_GCM_SHA384 first.
    let provider = rustls::crypto::ring::default_provider();
    assert_eq!(
        provider.cipher_suites[0].suite(),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    );
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(server.addr).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let host = HostIdentity::generate();
    let body = format!(r#"{{"host":"{}"}}"#, host.public_hex());
    write!(
        tls,
        "POST /v1/challenge HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = Vec::new();
    // The server closes without close_notify after `connection: close`.
    let _ = tls.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        tls.conn.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    assert_eq!(tls.conn.tls13_tickets_received(), 0);
}
