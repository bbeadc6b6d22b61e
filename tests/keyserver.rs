//! The host side of network-bound unlock, end to end: the real
//! `lsvfs-keyserver` on 127.0.0.1 with real TLS, the real `lsvfs` binary,
//! real FUSE mounts. `cargo test --workspace` builds the key server binary
//! before any test runs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn keyserver_bin() -> PathBuf {
    let lsvfs = PathBuf::from(env!("CARGO_BIN_EXE_lsvfs"));
    let ks = lsvfs.with_file_name("lsvfs-keyserver");
    assert!(
        ks.exists(),
        "{} is missing: run `cargo build -p lsvfs-keyserver` (or `cargo test --workspace`)",
        ks.display()
    );
    ks
}

fn run(bin: &Path, args: &[&str], cwd: &Path, env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(bin);
    c.args(args).current_dir(cwd);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct KeyServer {
    dir: tempfile::TempDir,
    child: Option<Child>,
    url: String,
}

impl KeyServer {
    fn start() -> KeyServer {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let ks = keyserver_bin();
        for args in [
            vec![
                "gen-cert",
                "--cert",
                "cert.pem",
                "--key",
                "cert.key",
                "127.0.0.1",
            ],
            vec!["gen-master-key", "master-key"],
        ] {
            let o = run(&ks, &args, p, &[]);
            assert!(o.status.success(), "{}", text(&o));
        }
        // A fixed port, so that a restarted server has the same URL.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            p.join("config.toml"),
            format!(
                "listen = \"127.0.0.1:{port}\"\ntls_cert = \"cert.pem\"\ntls_key = \"cert.key\"\n\
                 state_dir = \"state\"\nadmin_socket = \"admin.sock\"\nmaster_key = \"master-key\"\n"
            ),
        )
        .unwrap();
        let mut s = KeyServer {
            dir,
            child: None,
            url: String::new(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut child = Command::new(keyserver_bin())
            .args(["serve", "--config", "config.toml"])
            .current_dir(self.dir.path())
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while out.read_line(&mut line).unwrap() > 0 {
            if let Some(a) = line.trim().strip_prefix("lsvfs-keyserver: listening on ") {
                self.url = format!("https://{a}");
                break;
            }
            line.clear();
        }
        assert!(!self.url.is_empty(), "the key server did not start");
        // Keep draining its stdout so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in out.lines() {});
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    fn admin(&self, args: &[&str]) -> String {
        let mut all = vec!["admin", "--socket", "admin.sock"];
        all.extend_from_slice(args);
        let o = run(&keyserver_bin(), &all, self.dir.path(), &[]);
        assert!(o.status.success(), "admin {args:?}: {}", text(&o));
        text(&o)
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One simulated host: its own sealed store and machine-id.
struct Host {
    dir: tempfile::TempDir,
    store: PathBuf,
    machine_id: PathBuf,
}

impl Host {
    fn new(machine: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let machine_id = dir.path().join("machine-id");
        std::fs::write(&machine_id, format!("{machine}\n")).unwrap();
        std::fs::create_dir(dir.path().join("m")).unwrap();
        let store = dir.path().join("store");
        Host {
            dir,
            store,
            machine_id,
        }
    }

    fn p(&self) -> &Path {
        self.dir.path()
    }

    fn lsvfs(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&["--store", self.store.to_str().unwrap()]);
        run(
            Path::new(env!("CARGO_BIN_EXE_lsvfs")),
            &all,
            self.p(),
            &[("LSVFS_MACHINE_ID_FILE", &self.machine_id)],
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.lsvfs(args);
        assert!(o.status.success(), "lsvfs {args:?}: {}", text(&o));
        text(&o)
    }

    /// Runs `args`, which must fail with exit `code` and say `what`.
    fn fails(&self, args: &[&str], code: i32, what: &str) -> String {
        let o = self.lsvfs(args);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(code), "lsvfs {args:?}: {t}");
        assert!(t.contains(what), "lsvfs {args:?}: expected {what:?} in {t}");
        t
    }

    /// `host init` against `ks`; returns the host id.
    fn init(&self, ks: &KeyServer, ca: &Path) -> String {
        let out = self.ok(&[
            "host",
            "init",
            "--keyserver",
            &ks.url,
            "--ca",
            ca.to_str().unwrap(),
        ]);
        let id = out
            .lines()
            .find_map(|l| l.strip_prefix("host id: "))
            .expect("host id printed")
            .trim()
            .to_string();
        assert_eq!(id.len(), 64);
        id
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(self.p().join("m"))
            .stderr(Stdio::null())
            .status();
    }
}

fn volume_id(h: &Host) -> String {
    h.ok(&["info", "v.vol"])
        .lines()
        .find_map(|l| l.strip_prefix("volume id:"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn enroll_create_mount_rotate_revoke_and_recover() {
    let mut ks = KeyServer::start();
    let a = Host::new("host-a-machine-id");
    let id = a.init(&ks, &ks.ca());
    let store_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(a.store.join("host-secret"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(store_mode & 0o777, 0o600);

    // Not enrolled yet: create is refused and leaves no volume behind.
    a.fails(
        &["create", "v.vol", "--size", "1G", "--keyserver", &ks.url],
        10,
        "enroll",
    );
    assert!(!a.p().join("v.vol").exists());
    ks.admin(&["enroll", "host-a", &id]);
    let created = a.ok(&["create", "v.vol", "--size", "1G", "--keyserver", &ks.url]);
    assert!(created.contains("registered volume"), "{created}");
    let vid = volume_id(&a);

    // Mount with no key file: the sealed store and the key server.
    a.ok(&["mount", "v.vol", "m"]);
    std::fs::write(a.p().join("m/hello"), b"network-bound").unwrap();
    a.ok(&["unmount", "m"]);

    // Rotation: the next unlock rewraps under v2 and reports it; the server
    // then retires v1.
    ks.admin(&["rotate-kek", &vid]);
    let r = a.ok(&["rewrap", "v.vol"]);
    assert!(r.contains("from KEK v1 to v2"), "{r}");
    let r = a.ok(&["rewrap", "v.vol"]);
    assert!(r.contains("already wrapped under the newest"), "{r}");
    assert!(a
        .ok(&["host", "show"])
        .contains(&format!("volume {vid}: KEK v2")));

    // While the server is down: a bounded, clear failure.
    ks.stop();
    let t0 = Instant::now();
    a.fails(
        &["mount", "v.vol", "m", "--attempts", "2", "--timeout", "2"],
        9,
        "unreachable",
    );
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    // Restarted, it has kept every host, volume and KEK.
    ks.spawn();
    a.ok(&["mount", "v.vol", "m"]);
    assert_eq!(
        std::fs::read(a.p().join("m/hello")).unwrap(),
        b"network-bound"
    );
    a.ok(&["unmount", "m"]);
    a.ok(&["check", "v.vol"]);
}

#[test]
fn revoked_host_is_refused_and_the_recovery_key_still_opens() {
    let ks = KeyServer::start();
    let a = Host::new("host-a");
    let id = a.init(&ks, &ks.ca());
    ks.admin(&["enroll", "host-a", &id]);
    a.ok(&["create", "v.vol", "--size", "1G", "--keyserver", &ks.url]);
    // Add a recovery key while the key server still vouches for us.
    a.ok(&["keyslot", "add-recovery", "v.vol", "--key-file", "rk"]);
    let list = a.ok(&["keyslot", "list", "v.vol"]);
    assert!(
        list.contains("slot 0: KeyFile") && list.contains("sealed on this host: KEK v1"),
        "{list}"
    );
    a.ok(&["mount", "v.vol", "m"]);
    std::fs::write(a.p().join("m/kept"), b"data").unwrap();
    a.ok(&["unmount", "m"]);

    // Taken off the volume's ACL: refused until authorized again.
    let vid = volume_id(&a);
    ks.admin(&["deauthorize", "host-a", &vid]);
    a.fails(&["mount", "v.vol", "m"], 10, "not authorized");
    ks.admin(&["authorize", "host-a", &vid]);
    a.ok(&["check", "v.vol"]);

    ks.admin(&["revoke", "host-a"]);
    let t0 = Instant::now();
    a.fails(&["mount", "v.vol", "m"], 10, "revoked");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "no retry storm on a refusal"
    );
    let audit = ks.admin(&["audit", "--limit", "20"]);
    assert!(
        audit.contains("revoked") || audit.contains("Revoked"),
        "{audit}"
    );

    // The recovery key opens it without the key server.
    a.ok(&["mount", "v.vol", "m", "--key-file", "rk"]);
    assert_eq!(std::fs::read(a.p().join("m/kept")).unwrap(), b"data");
    a.ok(&["unmount", "m"]);
    // A wrong recovery key is "wrong key".
    a.ok(&["keygen", "other"]);
    a.fails(
        &["mount", "v.vol", "m", "--key-file", "other"],
        5,
        "wrong key",
    );
    // The last slot of a volume this host cannot otherwise open stays.
    std::fs::remove_dir_all(&a.store).unwrap();
    a.fails(
        &["keyslot", "remove", "v.vol", "--slot", "0"],
        2,
        "last way",
    );
}

#[test]
fn sealed_store_does_not_open_on_another_host() {
    let ks = KeyServer::start();
    let a = Host::new("machine-a");
    let id = a.init(&ks, &ks.ca());
    ks.admin(&["enroll", "host-a", &id]);
    a.ok(&["create", "v.vol", "--size", "256M", "--keyserver", &ks.url]);

    // Host B has its own host secret (even with A's machine-id, as after a
    // reinstall): A's sealed file does not open there.
    let b = Host::new("machine-a");
    let id_b = b.init(&ks, &ks.ca());
    ks.admin(&["enroll", "host-b", &id_b]);
    std::fs::copy(a.store.join("sealed"), b.store.join("sealed")).unwrap();
    std::fs::copy(a.p().join("v.vol"), b.p().join("v.vol")).unwrap();
    b.fails(&["mount", "v.vol", "m"], 11, "another host secret");

    // Both files copied to a machine with another machine-id: refused too.
    std::fs::write(&b.machine_id, "machine-b\n").unwrap();
    std::fs::copy(a.store.join("host-secret"), b.store.join("host-secret")).unwrap();
    b.fails(&["mount", "v.vol", "m"], 11, "sealed on another host");
    // No sealed store at all.
    std::fs::remove_dir_all(&b.store).unwrap();
    b.fails(&["mount", "v.vol", "m"], 11, "host init");
    // Still fine on A.
    a.ok(&["check", "v.vol"]);
}

#[test]
fn pinned_certificate_mismatch_is_refused() {
    let ks = KeyServer::start();
    let other = tempfile::tempdir().unwrap();
    let o = run(
        &keyserver_bin(),
        &["gen-cert", "--cert", "c.pem", "--key", "c.key", "127.0.0.1"],
        other.path(),
        &[],
    );
    assert!(o.status.success());
    let a = Host::new("machine-a");
    a.init(&ks, &other.path().join("c.pem"));
    a.fails(
        &["create", "v.vol", "--size", "256M", "--keyserver", &ks.url],
        9,
        "certificate",
    );
}

/// The key server holds the key that seals every KEK at rest in locked,
/// dump-excluded memory: a core of it taken as root, after it has served an
/// unlock, holds neither that key nor the master key it comes from.
#[test]
fn the_key_servers_master_key_stays_out_of_its_core() {
    let ks = KeyServer::start();
    let h = Host::new("core-test-machine-id");
    let id = h.init(&ks, &ks.ca());
    ks.admin(&["enroll", "core-host", &id]);
    h.ok(&["create", "v.vol", "--size", "64M", "--keyserver", &ks.url]);
    // An unlock: the server opened the volume's KEK under its master key.
    h.ok(&["check", "v.vol"]);
    let pid = ks.child.as_ref().unwrap().id();
    let hex = std::fs::read_to_string(ks.dir.path().join("master-key")).unwrap();
    let hex = hex.trim();
    let master: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(master.len(), 32);
    let core = ks.dir.path().join("core");
    let g = Command::new("gcore")
        .arg("-o")
        .arg(&core)
        .arg(pid.to_string())
        .output()
        .unwrap();
    let core = ks.dir.path().join(format!("core.{pid}"));
    assert!(
        g.status.success() && core.exists(),
        "gcore: {}",
        String::from_utf8_lossy(&g.stderr)
    );
    let image = std::fs::read(&core).unwrap();
    // A real image of the server: it holds its configuration's file names.
    assert!(
        image.windows(8).any(|w| w == b"cert.pem"),
        "the core does not hold the server's configuration: it is not its memory"
    );
    assert!(
        !image.windows(32).any(|w| w == master.as_slice()),
        "the key server's master key is in its core"
    );
    // The key it keeps for its whole life: the at-rest key derived from the
    // master key (keyserver/src/storage/at_rest.rs, AT_REST_LABEL).
    let mut at_rest = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(None, &master)
        .expand(b"lsvfs-keyserver v1 KEK at rest", &mut at_rest)
        .unwrap();
    assert!(
        !image.windows(32).any(|w| w == at_rest.as_slice()),
        "the key server's at-rest key is in its core"
    );
    assert!(
        !image.windows(hex.len()).any(|w| w == hex.as_bytes()),
        "the master key file's text is in the key server's core"
    );
}
