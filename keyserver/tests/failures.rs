//! Bad input, replays, expiry, wrong certificates and a dead server: each
//! gets the right answer, and the server keeps serving afterwards.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{volume_id, Server};
use ed25519_dalek::SigningKey;
use lsvfs_keyserver::client::{register_volume, unlock, ClientConfig, ClientError, HostIdentity};
use lsvfs_keyserver::protocol::{
    Challenge, KekVersion, Op, Recipient, SignedRequest, VolumeId, MAX_BODY,
};
use ureq::tls::{Certificate, RootCerts, TlsConfig};

fn agent(server: &Server) -> ureq::Agent {
    let ca = Certificate::from_pem(&server.ca_pem).unwrap();
    let tls = TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(vec![ca])))
        .build();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .tls_config(tls)
        .build()
        .into()
}

/// POSTs raw bytes; returns the status and the JSON body.
fn post(
    agent: &ureq::Agent,
    server: &Server,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let mut resp = agent
        .post(format!("{}{path}", server.url()))
        .header("content-type", content_type)
        .send(body)
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

fn challenge(agent: &ureq::Agent, server: &Server, host: &HostIdentity) -> Challenge {
    let body = format!(r#"{{"host":"{}"}}"#, host.public_hex());
    let (status, v) = post(
        agent,
        server,
        "/v1/challenge",
        "application/json",
        body.as_bytes(),
    );
    assert_eq!(status, 200, "{v}");
    Challenge::from_hex(v["challenge"].as_str().unwrap()).unwrap()
}

fn signed_unlock(host: &HostIdentity, vol: [u8; 16], challenge: Challenge) -> SignedRequest {
    let key = SigningKey::from_bytes(&host.secret());
    SignedRequest::sign(
        Op::Unlock,
        &key,
        VolumeId(vol),
        KekVersion(1),
        challenge,
        Recipient::generate().public(),
    )
}

fn setup(server: &Server) -> (HostIdentity, [u8; 16]) {
    let host = HostIdentity::generate();
    server.admin_ok(&["enroll", "h", &host.public_hex()]);
    let vol = volume_id(7);
    register_volume(&server.client(), &host, vol).unwrap();
    (host, vol)
}

fn still_serves(server: &Server, host: &HostIdentity, vol: [u8; 16]) {
    unlock(&server.client(), host, vol, 1).expect("server must keep serving");
}

#[test]
fn malformed_requests_get_4xx_and_the_server_keeps_serving() {
    let server = Server::start();
    let (host, vol) = setup(&server);
    let a = agent(&server);
    let json = "application/json";
    let unlock_body = signed_unlock(&host, vol, Challenge([0; 32])).to_body();
    let valid = serde_json::to_vec(&unlock_body).unwrap();
    let mut v2 = unlock_body.clone();
    v2.version = 2;
    let register_v2 = serde_json::to_vec(&v2).unwrap();
    let mut v0 = unlock_body;
    v0.version = 0;
    let unlock_v0 = serde_json::to_vec(&v0).unwrap();
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/challenge",
            json,
            b"not json".to_vec(),
            400,
            "bad_request",
        ),
        ("/v1/challenge", json, b"{}".to_vec(), 400, "bad_request"),
        (
            "/v1/challenge",
            json,
            br#"{"host":"zz"}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "/v1/challenge",
            json,
            vec![0xff, 0xfe, 0x00],
            400,
            "bad_request",
        ),
        ("/v1/unlock", json, b"[1,2,3]".to_vec(), 400, "bad_request"),
        (
            "/v1/unlock",
            json,
            valid[..valid.len() - 1].to_vec(),
            400,
            "bad_request",
        ),
        ("/v1/register", json, register_v2, 400, "bad_request"),
        ("/v1/unlock", json, unlock_v0, 400, "bad_request"),
        ("/v1/rewrapped", json, valid.clone(), 400, "bad_request"), // non-zero client_key
        (
            "/v1/unlock",
            "text/plain",
            valid.clone(),
            415,
            "unsupported_media_type",
        ),
        ("/v2/unlock", json, valid.clone(), 404, "not_found"),
        ("/", json, vec![], 404, "not_found"),
    ];
    for (path, ct, body, status, code) in cases {
        let (got, v) = post(&a, &server, path, ct, &body);
        assert_eq!(got, status, "{path} {ct} {} bytes: {v}", body.len());
        assert_eq!(v["error"], code, "{path}: {v}");
        assert!(v["message"].is_string());
    }
    // Oversized bodies are answered 413 as soon as the server knows (from
    // Content-Length, or when the limit is crossed) and the connection is
    // closed; a client still sending may see the close instead of the 413.
    let exactly_max = vec![b' '; MAX_BODY];
    let (status, v) = post(&a, &server, "/v1/unlock", json, &exactly_max);
    assert_eq!((status, v["error"].as_str()), (400, Some("bad_request")));
    let one_over = vec![b' '; MAX_BODY + 1];
    let huge = vec![b'{'; 1 << 20];
    let mut answered_413 = 0;
    for body in [&one_over, &huge, &one_over] {
        for chunked in [false, true] {
            let req = a
                .post(format!("{}/v1/unlock", server.url()))
                .header("content-type", json);
            let sent = if chunked {
                req.send(ureq::SendBody::from_reader(&mut &body[..]))
            } else {
                req.send(&body[..])
            };
            match sent {
                Ok(mut resp) => {
                    assert_eq!(resp.status().as_u16(), 413, "{} bytes", body.len());
                    let _ = resp.body_mut().read_to_string();
                    answered_413 += 1;
                }
                Err(ureq::Error::Io(e)) => assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    ),
                    "{e}"
                ),
                Err(e) => panic!("{} bytes: {e}", body.len()),
            }
        }
    }
    assert!(answered_413 > 0, "no oversized request got its 413");
    // GET on a known path.
    let resp = a.get(format!("{}/v1/unlock", server.url())).call().unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    still_serves(&server, &host, vol);
}

#[test]
fn replayed_forged_and_stolen_challenges_are_refused_and_audited() {
    let server = Server::start();
    let (host, vol) = setup(&server);
    let a = agent(&server);
    let json = "application/json";

    let ch = challenge(&a, &server, &host);
    let body = serde_json::to_vec(&signed_unlock(&host, vol, ch).to_body()).unwrap();
    assert_eq!(post(&a, &server, "/v1/unlock", json, &body).0, 200);
    let (status, v) = post(&a, &server, "/v1/unlock", json, &body);
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("challenge_replayed"))
    );

    // Bad signature: one bit flipped. The challenge is used up by it.
    let ch = challenge(&a, &server, &host);
    let mut req = signed_unlock(&host, vol, ch);
    req.signature[10] ^= 1;
    let body = serde_json::to_vec(&req.to_body()).unwrap();
    let (status, v) = post(&a, &server, "/v1/unlock", json, &body);
    assert_eq!((status, v["error"].as_str()), (401, Some("bad_signature")));
    req.signature[10] ^= 1;
    let body = serde_json::to_vec(&req.to_body()).unwrap();
    let (status, v) = post(&a, &server, "/v1/unlock", json, &body);
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("challenge_replayed"))
    );

    // A challenge issued to another host.
    let thief = HostIdentity::generate();
    server.admin_ok(&["enroll", "thief", &thief.public_hex()]);
    let ch = challenge(&a, &server, &host);
    let body = serde_json::to_vec(&signed_unlock(&thief, vol, ch).to_body()).unwrap();
    let (status, v) = post(&a, &server, "/v1/unlock", json, &body);
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("challenge_expired"))
    );
    // ... which the rightful host can still use.
    let body = serde_json::to_vec(&signed_unlock(&host, vol, ch).to_body()).unwrap();
    assert_eq!(post(&a, &server, "/v1/unlock", json, &body).0, 200);

    // A signature by an unenrolled key over its own id.
    let stranger = HostIdentity::generate();
    let ch = challenge(&a, &server, &stranger);
    let body = serde_json::to_vec(&signed_unlock(&stranger, vol, ch).to_body()).unwrap();
    let (status, v) = post(&a, &server, "/v1/unlock", json, &body);
    assert_eq!((status, v["error"].as_str()), (403, Some("not_enrolled")));

    let audit = server.admin_ok(&["audit", "--volume", &hex::encode(vol), "--limit", "50"]);
    let reasons: Vec<String> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["outcome"] == "refused")
        .map(|e| {
            e["reason"]
                .as_str()
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "challenge_replayed",
            "bad_signature",
            "challenge_replayed",
            "challenge_expired",
            "not_enrolled"
        ]
    );
    still_serves(&server, &host, vol);
}

#[test]
fn expired_challenge_is_refused() {
    let server = Server::start_with(1);
    let (host, vol) = setup(&server);
    let a = agent(&server);
    let ch = challenge(&a, &server, &host);
    std::thread::sleep(Duration::from_millis(1500));
    let body = serde_json::to_vec(&signed_unlock(&host, vol, ch).to_body()).unwrap();
    let (status, v) = post(&a, &server, "/v1/unlock", "application/json", &body);
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("challenge_expired"))
    );
    still_serves(&server, &host, vol);
}

#[test]
fn wrong_pinned_ca_is_a_certificate_mismatch() {
    let server = Server::start();
    let (host, vol) = setup(&server);
    let other = tempfile::tempdir().unwrap();
    let (cert, _) = common::gen_cert(other.path(), "other");
    let cfg = ClientConfig {
        ca_pem: Some(std::fs::read(cert).unwrap()),
        attempts: 3,
        ..server.client()
    };
    let started = Instant::now();
    match unlock(&cfg, &host, vol, 1) {
        Err(ClientError::CertificateMismatch { url, detail }) => {
            assert_eq!(url, server.url());
            assert!(!detail.is_empty());
        }
        other => panic!("expected CertificateMismatch, got {other:?}"),
    }
    // Not retried: no backoff pauses.
    assert!(started.elapsed() < Duration::from_millis(500));
    still_serves(&server, &host, vol);
}

#[test]
fn dead_server_is_unreachable_after_bounded_attempts() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = common::gen_cert(dir.path(), "ca");
    let cfg = ClientConfig {
        url: format!("https://127.0.0.1:{port}"),
        ca_pem: Some(std::fs::read(&cert).unwrap()),
        timeout: Duration::from_secs(1),
        attempts: 3,
    };
    let host = HostIdentity::generate();
    let started = Instant::now();
    match unlock(&cfg, &host, [0; 16], 1) {
        Err(ClientError::Unreachable {
            url,
            attempts,
            last,
        }) => {
            assert_eq!(url, cfg.url);
            assert_eq!(attempts, 3);
            assert!(!last.is_empty());
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    let took = started.elapsed();
    // Backoff 100 ms + 200 ms between three refused connections.
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");

    // A server that accepts and never answers: each attempt times out.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = ClientConfig {
        url: format!("https://{}", silent.local_addr().unwrap()),
        timeout: Duration::from_millis(400),
        attempts: 2,
        ..cfg
    };
    let holder = std::thread::spawn(move || {
        let mut held = vec![];
        for _ in 0..2 {
            if let Ok((mut s, _)) = silent.accept() {
                let mut buf = [0u8; 1];
                let _ = s.set_read_timeout(Some(Duration::from_millis(10)));
                let _ = s.read(&mut buf);
                held.push(s);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    });
    let started = Instant::now();
    let e = unlock(&cfg, &host, [0; 16], 1).unwrap_err();
    assert!(
        matches!(e, ClientError::Unreachable { attempts: 2, .. }),
        "{e}"
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(800), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(e.to_string().contains(&cfg.url));
    holder.join().unwrap();
}
