//! kill -9 of the server while admin writes are in flight: after a restart
//! the database opens and every acknowledged write is there.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{volume_id, Server};
use lsvfs_keyserver::admin::{call, AdminRequest, AdminResponse};
use lsvfs_keyserver::client::{register_volume, unlock, HostIdentity};

#[test]
fn kill_9_during_enrollments_loses_nothing_acknowledged() {
    let mut server = Server::start();
    let first = HostIdentity::generate();
    server.admin_ok(&["enroll", "first", &first.public_hex()]);
    let vol = volume_id(1);
    let kek = register_volume(&server.client(), &first, vol).unwrap();

    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    for (round, kill_after_ms) in [150u64, 400, 50].into_iter().enumerate() {
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let socket = server.socket.clone();
                let acked = acked.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let name = format!("r{round}-w{w}-{i}");
                        let req = AdminRequest::Enroll {
                            name: name.clone(),
                            host: HostIdentity::generate().public_hex(),
                        };
                        match call(&socket, &req) {
                            Ok(AdminResponse::Ok { .. }) => {
                                acked.lock().unwrap().insert(name);
                            }
                            Ok(other) => panic!("unexpected admin answer {other:?}"),
                            // The server died under us: anything not
                            // acknowledged may or may not be there.
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(kill_after_ms));
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        server.spawn();

        let hosts = server.admin_ok(&["list-hosts"]);
        let present: BTreeSet<String> = hosts["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["name"].as_str().unwrap().to_string())
            .collect();
        let acked = acked.lock().unwrap();
        eprintln!(
            "round {round}: {} enrollments acknowledged so far",
            acked.len()
        );
        let missing: Vec<_> = acked.difference(&present).collect();
        assert!(missing.is_empty(), "round {round}: lost {missing:?}");
        assert!(
            acked.iter().any(|n| n.starts_with(&format!("r{round}-"))),
            "round {round}: no enrollment was acknowledged before the kill"
        );
        assert_eq!(
            *unlock(&server.client(), &first, vol, 1).unwrap().kek.key,
            *kek.key
        );
    }
}
