//! Boot storm: every host of a fleet unlocks its volume at the same moment.
//!
//! Starts a key server on 127.0.0.1 (in this process, real TLS), enrolls
//! `--hosts` distinct hosts through the admin socket and authorizes them for
//! one volume, then releases all of them at once: each host runs its own
//! thread and does challenge + unlock over its own TLS connection. Prints
//! throughput, latency percentiles and the error count.
//!
//!     cargo run --release -p lsvfs-keyserver --example bootstorm -- --hosts 4000

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use lsvfs_keyserver::admin::{call, AdminRequest, AdminResponse};
use lsvfs_keyserver::client::{unlock, ClientConfig, HostIdentity};
use lsvfs_keyserver::server::{self, Config};
use lsvfs_keyserver::storage::MasterKey;

#[derive(Parser)]
struct Args {
    /// Number of hosts.
    #[arg(long, default_value_t = 4000)]
    hosts: usize,
    /// Per-request client time-out, seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Client attempts (retries on connection errors and time-outs).
    #[arg(long, default_value_t = 3)]
    attempts: u32,
}

/// One host's unlock: how long it took and whether it worked.
type Sample = (Duration, Result<(), String>);

fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write only the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

fn admin(socket: &std::path::Path, req: AdminRequest) {
    match call(socket, &req) {
        Ok(AdminResponse::Ok { .. }) => {}
        other => panic!("admin {req:?}: {other:?}"),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let args = Args::parse();
    let nofile = raise_nofile_limit();
    // Each host holds one client and one server descriptor.
    if (nofile as usize) < 2 * args.hosts + 100 {
        eprintln!(
            "warning: open-file limit {nofile} is low for {} hosts",
            args.hosts
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem) = server::self_signed_cert(vec!["127.0.0.1".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, key_pem.as_bytes()).unwrap();
    let master = dir.path().join("master-key");
    MasterKey::create_file(&master).unwrap();
    let socket = dir.path().join("admin.sock");
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls_cert: cert,
        tls_key: key,
        state_dir: dir.path().join("state"),
        admin_socket: socket.clone(),
        master_key: master,
        challenge_lifetime_secs: 60,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let running = rt.block_on(server::start(&cfg)).expect("start server");
    let url = format!("https://{}", running.addr);
    println!(
        "server: {url} (in-process, {} tokio workers)",
        rt.metrics().num_workers()
    );

    // Enrollment and authorization, from a few admin clients at once.
    let volume = [0x42u8; 16];
    let volume_hex = hex::encode(volume);
    admin(
        &socket,
        AdminRequest::CreateVolume {
            volume: volume_hex.clone(),
        },
    );
    let t = Instant::now();
    let hosts: Vec<HostIdentity> = (0..args.hosts).map(|_| HostIdentity::generate()).collect();
    let hosts = Arc::new(hosts);
    std::thread::scope(|s| {
        for w in 0..16 {
            let (hosts, socket, volume_hex) = (&hosts, &socket, &volume_hex);
            s.spawn(move || {
                for (i, h) in hosts.iter().enumerate().skip(w).step_by(16) {
                    admin(
                        socket,
                        AdminRequest::Enroll {
                            name: format!("host-{i}"),
                            host: h.public_hex(),
                        },
                    );
                    admin(
                        socket,
                        AdminRequest::Authorize {
                            host: h.public_hex(),
                            volume: volume_hex.clone(),
                        },
                    );
                }
            });
        }
    });
    println!(
        "setup: {} hosts enrolled and authorized in {:.2} s",
        args.hosts,
        t.elapsed().as_secs_f64()
    );

    let client = ClientConfig {
        url: url.clone(),
        ca_pem: Some(cert_pem.into_bytes()),
        timeout: Duration::from_secs(args.timeout),
        attempts: args.attempts,
    };
    let barrier = Arc::new(Barrier::new(args.hosts + 1));
    let results: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::with_capacity(args.hosts)));
    let mut threads = Vec::with_capacity(args.hosts);
    for i in 0..args.hosts {
        let (barrier, results, client, hosts) = (
            barrier.clone(),
            results.clone(),
            client.clone(),
            hosts.clone(),
        );
        let t = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                barrier.wait();
                let start = Instant::now();
                let r = unlock(&client, &hosts[i], volume, 1)
                    .map(|u| assert_eq!(u.kek.version, 1))
                    .map_err(|e| e.to_string());
                results.lock().unwrap().push((start.elapsed(), r));
            })
            .expect("spawn host thread");
        threads.push(t);
    }
    let storm = Instant::now();
    barrier.wait();
    for t in threads {
        t.join().unwrap();
    }
    let wall = storm.elapsed();

    let results = std::mem::take(&mut *results.lock().unwrap());
    let mut lat: Vec<Duration> = results.iter().map(|(d, _)| *d).collect();
    lat.sort();
    let errors: Vec<&String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    let ok = results.len() - errors.len();
    println!(
        "storm: {} hosts unlocked at once (challenge + unlock, one TLS connection each)",
        args.hosts
    );
    println!("  wall time   {:.2} s", wall.as_secs_f64());
    println!(
        "  throughput  {:.0} unlocks/s",
        ok as f64 / wall.as_secs_f64()
    );
    println!(
        "  latency     p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms",
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!("  errors      {}", errors.len());
    for e in errors.iter().take(5) {
        println!("    {e}");
    }
    rt.block_on(running.shutdown());
    if !errors.is_empty() {
        std::process::exit(1);
    }
}
