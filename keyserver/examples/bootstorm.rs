//! Boot storm: every host of a fleet unlocks its volume at the same moment.
//!
//! Starts `--servers` real `lsvfs-keyserver serve` processes on 127.0.0.1
//! (real TLS), enrolls `--hosts` distinct hosts on each through their admin
//! sockets and authorizes them for one volume, then releases all of them at
//! once: each host runs its own thread and unlocks the way `lsvfs mount`
//! does (`client::quorum`: challenge + unlock to every server at once, over
//! a TLS connection each, done when `--threshold` servers have released
//! their KEK). Prints throughput, latency percentiles and the error count;
//! exits 1 on any error.
//!
//! ```text
//! cargo build --release -p lsvfs-keyserver --bins --examples
//! target/release/examples/bootstorm --hosts 4000                       # one server
//! target/release/examples/bootstorm --hosts 4000 --servers 3 --threshold 2 --kill-after-ms 300
//! target/release/examples/bootstorm --servers 3 --threshold 2 --sequential 200 [--black-hole]
//! ```
//!
//! `--kill-after-ms` kills the last server (SIGKILL) that long into the
//! storm. `--black-hole` stops it (SIGSTOP: it accepts connections and never
//! answers) before the unlocks start. `--sequential N` replaces the storm by
//! one host unlocking N times in a row, for the latency of one unlock.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, RwLock};
use std::time::{Duration, Instant};

use clap::Parser;
use lsvfs_keyserver::admin::{call, AdminRequest, AdminResponse};
use lsvfs_keyserver::client::{quorum, unlock, ClientConfig, HostIdentity};
use lsvfs_keyserver::server;
use lsvfs_keyserver::storage::MasterKey;

#[derive(Parser)]
struct Args {
    /// Number of hosts.
    #[arg(long, default_value_t = 4000)]
    hosts: usize,
    /// Number of key servers (processes).
    #[arg(long, default_value_t = 1)]
    servers: usize,
    /// How many servers must release their KEK (default: a majority).
    #[arg(long)]
    threshold: Option<usize>,
    /// Kill the last server (SIGKILL) this many milliseconds into the storm.
    #[arg(long)]
    kill_after_ms: Option<u64>,
    /// Stop the last server (SIGSTOP) before the unlocks: a black hole.
    #[arg(long)]
    black_hole: bool,
    /// Instead of a storm, one host unlocks this many times in a row.
    #[arg(long)]
    sequential: Option<usize>,
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

fn admin(socket: &Path, req: AdminRequest) {
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

/// A key server process with its own state directory.
struct Server {
    child: Child,
    url: String,
    socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `lsvfs-keyserver` binary beside this example's directory.
fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("lsvfs-keyserver"))
        .expect("target directory");
    if !bin.exists() {
        eprintln!(
            "{} is missing: build it first with \
             `cargo build --release -p lsvfs-keyserver --bins --examples`",
            bin.display()
        );
        std::process::exit(2);
    }
    bin
}

fn start_server(dir: &Path, cert: &Path, key: &Path) -> Server {
    std::fs::create_dir_all(dir).unwrap();
    MasterKey::create_file(&dir.join("master-key")).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
             state_dir = \"state\"\nadmin_socket = \"admin.sock\"\nmaster_key = \"master-key\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(server_binary())
        .args(["serve", "--config", "config.toml"])
        .current_dir(dir)
        .env("LSVFS_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start lsvfs-keyserver");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut url = None;
    while out.read_line(&mut line).unwrap_or(0) > 0 {
        if let Some(a) = line.trim().strip_prefix("lsvfs-keyserver: listening on ") {
            url = Some(format!("https://{a}"));
            break;
        }
        line.clear();
    }
    std::thread::spawn(move || for _ in out.lines() {});
    Server {
        child,
        url: url.expect("the key server did not start"),
        socket: dir.join("admin.sock"),
    }
}

fn main() {
    let args = Args::parse();
    let n = args.servers.max(1);
    let k = args.threshold.unwrap_or(if n == 1 { 1 } else { n / 2 + 1 });
    assert!((1..=n).contains(&k), "--threshold must be 1..={n}");
    let nofile = raise_nofile_limit();
    // Each host holds one connection per server here (each server, a
    // process of its own, holds the other end under its own limit).
    let hosts_at_once = if args.sequential.is_some() {
        1
    } else {
        args.hosts
    };
    if (nofile as usize) < n * hosts_at_once + 100 {
        eprintln!(
            "warning: open-file limit {nofile} is low for {hosts_at_once} hosts and {n} servers"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem) = server::self_signed_cert(vec!["127.0.0.1".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, key_pem.as_bytes()).unwrap();
    let mut servers: Vec<Server> = (0..n)
        .map(|i| start_server(&dir.path().join(format!("s{i}")), &cert, &key))
        .collect();
    for s in &servers {
        println!("server: {} (process {})", s.url, s.child.id());
    }
    println!("threshold: {k} of {n}");

    // Enrollment and authorization on every server, a few admin clients
    // per server at once.
    let volume = [0x42u8; 16];
    let volume_hex = hex::encode(volume);
    let hosts_needed = args.sequential.map_or(args.hosts, |_| 1);
    let t = Instant::now();
    let hosts: Vec<HostIdentity> = (0..hosts_needed)
        .map(|_| HostIdentity::generate())
        .collect();
    let hosts = Arc::new(hosts);
    std::thread::scope(|s| {
        for srv in &servers {
            admin(
                &srv.socket,
                AdminRequest::CreateVolume {
                    volume: volume_hex.clone(),
                },
            );
            for w in 0..8 {
                let (hosts, socket, volume_hex) = (&hosts, &srv.socket, &volume_hex);
                s.spawn(move || {
                    for (i, h) in hosts.iter().enumerate().skip(w).step_by(8) {
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
        }
    });
    println!(
        "setup: {hosts_needed} hosts enrolled and authorized on {n} server(s) in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    let clients: Vec<ClientConfig> = servers
        .iter()
        .map(|s| ClientConfig {
            url: s.url.clone(),
            ca_pem: Some(cert_pem.clone().into_bytes()),
            timeout: Duration::from_secs(args.timeout),
            attempts: args.attempts,
        })
        .collect();
    let pids: Vec<u32> = servers.iter().map(|s| s.child.id()).collect();
    let last = servers.last_mut().unwrap();
    if args.black_hole {
        signal(last.child.id(), "-STOP");
        println!("black hole: server {} stopped (SIGSTOP)", last.url);
    }
    // One unlock the way a mount does it.
    let unlock_one = move |host: &Arc<Vec<HostIdentity>>, i: usize, clients: &[ClientConfig]| {
        let hosts = host.clone();
        quorum(k, clients.to_vec(), false, move |_, cfg| {
            unlock(cfg, &hosts[i], volume, 1).map(|u| assert_eq!(u.kek.version, 1))
        })
        .map(|_| ())
        .map_err(|f| {
            f.iter()
                .map(|(s, e)| format!("server {s}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    };

    let mut cpu_after = None;
    let server_cpu = || pids.iter().map(|&p| process_cpu(p)).sum::<Duration>();
    let (server_before, client_before) = (server_cpu(), own_cpu());
    let (results, wall, what) = if let Some(rounds) = args.sequential {
        let mut results = Vec::with_capacity(rounds);
        let storm = Instant::now();
        for _ in 0..rounds {
            let start = Instant::now();
            let r = unlock_one(&hosts, 0, &clients);
            results.push((start.elapsed(), r));
        }
        (
            results,
            storm.elapsed(),
            format!("sequential: one host unlocked {rounds} times in a row"),
        )
    } else {
        // The hosts wait at a gate, a read-write lock the main thread holds
        // for writing: releasing it wakes every reader at once (a Barrier
        // hands its mutex from one woken thread to the next, 4,000 times).
        // Each host reports its result over a channel and then waits at a
        // second gate, so that 4,000 thread exits (stack unmapping, TLB
        // shootdowns) happen after the clock stops: they are the load
        // generator's cost, not the key server's.
        let start_gate = Arc::new(RwLock::new(()));
        let exit_gate = Arc::new(RwLock::new(()));
        let (held_start, held_exit) = (start_gate.write().unwrap(), exit_gate.write().unwrap());
        let ready = Arc::new(Barrier::new(args.hosts + 1));
        let (tx, rx) = std::sync::mpsc::channel::<Sample>();
        let mut threads = Vec::with_capacity(args.hosts);
        for i in 0..args.hosts {
            let (start_gate, exit_gate, ready, tx, clients, hosts) = (
                start_gate.clone(),
                exit_gate.clone(),
                ready.clone(),
                tx.clone(),
                clients.clone(),
                hosts.clone(),
            );
            let t = std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    ready.wait();
                    drop(start_gate.read());
                    let start = Instant::now();
                    // A panic is this host's error, not a result that never
                    // comes (the main thread counts results).
                    let r = std::panic::catch_unwind(|| unlock_one(&hosts, i, &clients))
                        .unwrap_or_else(|_| Err("the host's thread panicked".to_string()));
                    let _ = tx.send((start.elapsed(), r));
                    drop(tx);
                    drop(exit_gate.read());
                })
                .expect("spawn host thread");
            threads.push(t);
        }
        drop(tx);
        ready.wait();
        let killer = args.kill_after_ms.map(|ms| {
            let pid = last.child.id();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(ms));
                signal(pid, "-KILL");
                ms
            })
        });
        let storm = Instant::now();
        drop(held_start);
        let results: Vec<Sample> = rx.iter().take(args.hosts).collect();
        let wall = storm.elapsed();
        cpu_after = Some((server_cpu(), own_cpu()));
        drop(held_exit);
        for t in threads {
            t.join().unwrap();
        }
        if let Some(k) = killer {
            let ms = k.join().unwrap();
            let alive = last.child.try_wait().ok().flatten().is_none();
            println!(
                "killed: server {} (SIGKILL) {ms} ms into the storm{}",
                last.url,
                if alive {
                    " (it was still running?)"
                } else {
                    ""
                }
            );
        }
        (
            results,
            wall,
            format!(
                "storm: {} hosts unlocked at once (challenge + unlock to {n} server(s), \
                 one TLS connection each, done at {k})",
                args.hosts
            ),
        )
    };
    let (server_after, client_after) = cpu_after.unwrap_or_else(|| (server_cpu(), own_cpu()));
    if args.black_hole {
        signal(last.child.id(), "-CONT");
    }

    let mut lat: Vec<Duration> = results.iter().map(|(d, _)| *d).collect();
    lat.sort();
    let errors: Vec<&String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    let ok = results.len() - errors.len();
    println!("{what}");
    println!("  wall time   {:.2} s", wall.as_secs_f64());
    println!(
        "  throughput  {:.0} unlocks/s",
        ok as f64 / wall.as_secs_f64()
    );
    println!(
        "  latency     p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    let per = |d: Duration| d.as_secs_f64() * 1e3 / ok.max(1) as f64;
    // Every server of a quorum serves every host (the late ones too).
    let server_ms = per(server_after.saturating_sub(server_before)) / n as f64;
    println!(
        "  CPU         {server_ms:.3} ms per unlock on each server (user + system): one \
         2-core server alone sustains about {:.0} unlocks/s; load generator {:.3} ms",
        2e3 / server_ms.max(1e-9),
        per(client_after.saturating_sub(client_before))
    );
    println!("  errors      {}", errors.len());
    for e in errors.iter().take(5) {
        println!("    {e}");
    }
    drop(servers);
    if !errors.is_empty() {
        std::process::exit(1);
    }
}

/// CPU time (user + system) a process has used, from /proc.
fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and
    // stime are the 12th and 13th, in clock ticks.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(f.iter().sum::<u64>() * 1_000_000 / hz)
}

/// CPU time (user + system) this process has used.
fn own_cpu() -> Duration {
    // SAFETY: getrusage writes only the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}
