//! The host side of network-bound unlock, end to end: the real
//! `lsvfs-keyserver` on 127.0.0.1 with real TLS, the real `lsvfs` binary,
//! real FUSE mounts. `cargo test --workspace` builds the key server binary
//! before any test runs.

mod common;

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
        KeyServer::start_as(None)
    }

    /// A server at `real`'s address with `real`'s TLS certificate and key,
    /// but its own database and master key: what an attacker who took over
    /// the key server's machine (or its TLS key) would run. `real` must be
    /// stopped first.
    fn impostor_of(real: &KeyServer) -> KeyServer {
        KeyServer::start_as(Some(real))
    }

    fn start_as(impostor_of: Option<&KeyServer>) -> KeyServer {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let ks = keyserver_bin();
        if let Some(real) = impostor_of {
            for f in ["cert.pem", "cert.key"] {
                std::fs::copy(real.dir.path().join(f), p.join(f)).unwrap();
            }
        } else {
            let o = run(
                &ks,
                &[
                    "gen-cert",
                    "--cert",
                    "cert.pem",
                    "--key",
                    "cert.key",
                    "127.0.0.1",
                ],
                p,
                &[],
            );
            assert!(o.status.success(), "{}", text(&o));
        }
        let o = run(&ks, &["gen-master-key", "master-key"], p, &[]);
        assert!(o.status.success(), "{}", text(&o));
        // A fixed port, so that a restarted server has the same URL.
        let port = match impostor_of {
            Some(real) => real.url.rsplit(':').next().unwrap().parse().unwrap(),
            None => std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
        };
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
    /// `LSVFS_TPM_TCTI` for its commands: the TPM it has, if any.
    tpm: Option<PathBuf>,
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
            tpm: None,
        }
    }

    fn p(&self) -> &Path {
        self.dir.path()
    }

    fn lsvfs(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&["--store", self.store.to_str().unwrap()]);
        let mut env = vec![("LSVFS_MACHINE_ID_FILE", self.machine_id.as_path())];
        if let Some(t) = &self.tpm {
            env.push(("LSVFS_TPM_TCTI", t.as_path()));
        }
        run(Path::new(env!("CARGO_BIN_EXE_lsvfs")), &all, self.p(), &env)
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
        host_id_in(&out)
    }
}

/// The host id `lsvfs host init` or `host show` printed.
fn host_id_in(out: &str) -> String {
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("host id:"))
        .expect("host id printed")
        .trim()
        .to_string();
    assert_eq!(id.len(), 64, "{out}");
    id
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

/// A host enrolled on `ks` as `name`, with a volume `v.vol` registered
/// there and a recovery key file `rk` in one of its key slots; returns the
/// host and the volume id.
fn host_with_volume(ks: &KeyServer, name: &str) -> (Host, String) {
    let a = Host::new(name);
    let id = a.init(ks, &ks.ca());
    ks.admin(&["enroll", name, &id]);
    a.ok(&["create", "v.vol", "--size", "1G", "--keyserver", &ks.url]);
    // Added while the key server still vouches for the host.
    a.ok(&["keyslot", "add-recovery", "v.vol", "--key-file", "rk"]);
    let vid = volume_id(&a);
    (a, vid)
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
    let show = a.ok(&["host", "show"]);
    assert!(show.contains(&format!("volume {vid}: KEK v2")), "{show}");
    // Without --tpm: the software store, and `host show` says so.
    assert!(show.contains("sealed store: software"), "{show}");

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
    let (a, vid) = host_with_volume(&ks, "host-a");
    let list = a.ok(&["keyslot", "list", "v.vol"]);
    assert!(
        list.contains("slot 0: KeyFile") && list.contains("sealed on this host: KEK v1"),
        "{list}"
    );
    a.ok(&["mount", "v.vol", "m"]);
    std::fs::write(a.p().join("m/kept"), b"data").unwrap();
    a.ok(&["unmount", "m"]);

    // Taken off the volume's ACL: refused until authorized again.
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
    let image = common::core_image(&pid, ks.dir.path());
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
    // AES-256's first two round keys are the halves of its key, and AES-NI
    // keeps them in vector registers, which a core records per thread.
    for (half, bytes) in ["first", "second"].iter().zip(at_rest.chunks(16)) {
        assert!(
            !image.windows(16).any(|w| w == bytes),
            "the {half} half of the key server's at-rest key is in its core"
        );
    }
    assert!(
        !image.windows(hex.len()).any(|w| w == hex.as_bytes()),
        "the master key file's text is in the key server's core"
    );
}

/// The host's sealed store, opened here as `lsvfs` opens it on that host
/// (the measurement is the one `src/keys/sealed.rs` documents).
fn open_store(h: &Host) -> lsvfs::keys::SealedStore {
    use sha2::Digest;
    let id = std::fs::read(&h.machine_id).unwrap();
    let mut m = sha2::Sha256::new();
    m.update(b"lsvfs v1 host measurement\0");
    m.update(id.trim_ascii());
    let measured: [u8; 32] = m.finalize().into();
    let secret: [u8; 32] = std::fs::read(h.store.join("host-secret"))
        .unwrap()
        .try_into()
        .unwrap();
    let sealed = std::fs::read(h.store.join("sealed")).unwrap();
    lsvfs::keys::SealedStore::unseal(&h.store, &sealed, &secret, &measured).unwrap()
}

/// How a host's store reaches its key server, as a client configuration.
fn client_of(store: &lsvfs::keys::SealedStore) -> lsvfs_keyserver::client::ClientConfig {
    lsvfs_keyserver::client::ClientConfig {
        url: store.primary().to_string(),
        ca_pem: Some(store.ca_pem.clone()),
        timeout: Duration::from_secs(10),
        attempts: 1,
    }
}

fn header_of(path: &Path) -> lsvfs::volume::Header {
    let mut block = [0u8; lsvfs::BLOCK_SIZE];
    block.copy_from_slice(&std::fs::read(path).unwrap()[..lsvfs::BLOCK_SIZE]);
    lsvfs::volume::Header::decode(&block).unwrap()
}

/// Writes `h` over both header copies of the volume file at `path`.
fn put_header(path: &Path, h: &lsvfs::volume::Header) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for blk in lsvfs::volume::format::HEADER_BLOCKS {
        f.write_all_at(&h.encode()[..], blk * lsvfs::BLOCK_SIZE as u64)
            .unwrap();
    }
    f.sync_all().unwrap();
}

/// Writes a key file holding `kek` (the format of `lsvfs keygen`).
fn write_key_file(path: &Path, kek: &[u8; 32]) {
    use std::os::unix::fs::OpenOptionsExt;
    let hex: String = kek.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut f, format!("lsvfs-key-v1 {hex}\n").as_bytes()).unwrap();
}

/// SECURITY.md C13 and C14. A key server that has been taken over (its
/// database, its master key, its TLS key) holds the volume's KEK, but that
/// KEK opens no key slot of the volume file: with the file alone it gets
/// no data. And a server that answers with a KEK of its own making cannot
/// make the host mount anything: the KEK does not open the sealed key, so
/// "wrong key", and the host's sealed store is left as it was.
#[test]
fn a_compromised_key_server_gets_no_data_and_cannot_make_a_host_mount_wrong_data() {
    use lsvfs_keyserver::client::{self, HostIdentity};
    let mut ks = KeyServer::start();
    let a = Host::new("host-c-machine-id");
    let id = a.init(&ks, &ks.ca());
    ks.admin(&["enroll", "host-c", &id]);
    a.ok(&["create", "v.vol", "--size", "256M", "--keyserver", &ks.url]);
    a.ok(&["mount", "v.vol", "m"]);
    std::fs::write(a.p().join("m/secret"), b"the host's data").unwrap();
    a.ok(&["unmount", "m"]);

    // The KEK the server holds for the volume (what its database and
    // master key give an attacker), fetched as the host fetches it.
    let store = open_store(&a);
    let host = HostIdentity::from_secret(&store.identity);
    let header = header_of(&a.p().join("v.vol"));
    let vid = header.volume_id;
    let kek = client::unlock(&client_of(&store), &host, vid, 1)
        .unwrap()
        .kek;
    let as_kek = lsvfs::crypto::Kek::from_bytes(zeroize::Zeroizing::new(*kek.key));
    // C13: no slot of the volume file opens with it, by the library and
    // through the binary (the KEK written out as a key file).
    let e = lsvfs::keys::unlock(&header, &as_kek)
        .err()
        .expect("the server's KEK opened the volume file");
    assert!(e.to_string().contains("no key slot"), "{e}");
    write_key_file(&a.p().join("server-kek"), &kek.key);
    a.fails(
        &["check", "v.vol", "--key-file", "server-kek"],
        5,
        "wrong key",
    );

    // C14: an impostor with the server's address and TLS key, where this
    // host is enrolled and the volume registered under a KEK of its own.
    ks.stop();
    let evil = KeyServer::impostor_of(&ks);
    evil.admin(&["enroll", "host-c", &id]);
    client::register_volume(&client_of(&store), &host, vid).unwrap();
    let sealed_before = std::fs::read(a.store.join("sealed")).unwrap();
    a.fails(&["mount", "v.vol", "m"], 5, "does not open the sealed key");
    assert!(!a.p().join("m/secret").exists(), "nothing is mounted");
    assert_eq!(
        std::fs::read(a.store.join("sealed")).unwrap(),
        sealed_before,
        "the impostor changed the host's sealed store"
    );
    // A rotation on the impostor (a "newer" KEK) changes nothing either.
    evil.admin(&["rotate-kek", &lsvfs::keys::hex(&vid)]);
    a.fails(&["mount", "v.vol", "m"], 5, "does not open the sealed key");
    assert_eq!(
        std::fs::read(a.store.join("sealed")).unwrap(),
        sealed_before
    );
    drop(evil);
    // The real server back: the host mounts its own data.
    ks.spawn();
    a.ok(&["mount", "v.vol", "m"]);
    assert_eq!(
        std::fs::read(a.p().join("m/secret")).unwrap(),
        b"the host's data"
    );
    a.ok(&["unmount", "m"]);
}

/// SECURITY.md A16. An attacker's volume, made to carry the victim's
/// volume id in its header, does not mount on the victim's host as the
/// victim's volume: the sealed key's check value differs ("wrong key");
/// with the victim's check value copied too, the key is the victim's but
/// the attacker's checkpoints do not verify under it.
#[test]
fn a_volume_made_to_carry_another_volumes_id_does_not_mount_as_it() {
    let ks = KeyServer::start();
    let a = Host::new("host-v-machine-id");
    let id = a.init(&ks, &ks.ca());
    ks.admin(&["enroll", "host-v", &id]);
    a.ok(&["create", "v.vol", "--size", "256M", "--keyserver", &ks.url]);
    // The attacker's volume, under a key of the attacker's.
    a.ok(&["keygen", "attacker.key"]);
    a.ok(&[
        "create",
        "x.vol",
        "--size",
        "256M",
        "--key-file",
        "attacker.key",
    ]);
    a.ok(&["mount", "x.vol", "m", "--key-file", "attacker.key"]);
    std::fs::write(a.p().join("m/planted"), b"attacker's data").unwrap();
    a.ok(&["unmount", "m"]);

    let victim = header_of(&a.p().join("v.vol"));
    let mut forged = header_of(&a.p().join("x.vol"));
    forged.volume_id = victim.volume_id;
    put_header(&a.p().join("x.vol"), &forged);
    a.fails(&["mount", "x.vol", "m"], 5, "does not open the sealed key");
    assert!(!a.p().join("m/planted").exists());

    forged.key_check = victim.key_check;
    put_header(&a.p().join("x.vol"), &forged);
    a.fails(&["mount", "x.vol", "m"], 4, "no valid checkpoint");
    assert!(!a.p().join("m/planted").exists());
    // The victim's own volume is unaffected.
    a.ok(&["check", "v.vol"]);
}

/// SECURITY.md B5, a known limitation. A thief who copies a host's whole
/// sealed store and its machine-id (a stolen root disk) opens the host's
/// volumes while the host is still enrolled and the key server can be
/// reached: the store signs as the host. Only revoking the host stops it.
/// When a TPM backend binds the store to hardware, this test must change.
#[test]
fn known_limitation_a_stolen_store_opens_until_the_host_is_revoked() {
    let ks = KeyServer::start();
    let a = Host::new("machine-stolen");
    let id = a.init(&ks, &ks.ca());
    ks.admin(&["enroll", "host-s", &id]);
    a.ok(&["create", "v.vol", "--size", "256M", "--keyserver", &ks.url]);
    a.ok(&["mount", "v.vol", "m"]);
    std::fs::write(a.p().join("m/f"), b"the host's data").unwrap();
    a.ok(&["unmount", "m"]);

    // The thief's machine: a copy of the store, the machine-id and the volume.
    let thief = Host::new("elsewhere");
    std::fs::create_dir(&thief.store).unwrap();
    std::fs::set_permissions(
        &thief.store,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    for f in ["host-secret", "sealed"] {
        std::fs::copy(a.store.join(f), thief.store.join(f)).unwrap();
    }
    std::fs::copy(&a.machine_id, &thief.machine_id).unwrap();
    std::fs::copy(a.p().join("v.vol"), thief.p().join("v.vol")).unwrap();
    thief.ok(&["mount", "v.vol", "m"]);
    assert_eq!(
        std::fs::read(thief.p().join("m/f")).unwrap(),
        b"the host's data"
    );
    thief.ok(&["unmount", "m"]);

    ks.admin(&["revoke", "host-s"]);
    thief.fails(&["mount", "v.vol", "m"], 10, "revoked");
}

/// The boot-time mount (`lsvfs mount-entry`, what lsvfs-mount@.service
/// runs) with the key server down: it waits, retrying with a growing
/// delay, and its systemd status (NOTIFY_SOCKET, as systemd reads it) says
/// why; once the server is back it mounts and reports READY; SIGTERM
/// flushes, unmounts and ends it cleanly.
#[test]
fn the_boot_mount_waits_for_the_key_server_and_says_why() {
    use std::os::unix::net::UnixDatagram;
    let mut ks = KeyServer::start();
    let a = Host::new("host-boot-machine-id");
    let id = a.init(&ks, &ks.ca());
    ks.admin(&["enroll", "host-boot", &id]);
    a.ok(&["create", "v.vol", "--size", "256M", "--keyserver", &ks.url]);
    ks.stop();

    let p = a.p().canonicalize().unwrap();
    std::fs::write(
        p.join("fstab"),
        format!(
            "{0}/v.vol {0}/m lsvfs noauto,_netdev,store={1},timeout=1,attempts=1 0 0\n",
            p.display(),
            a.store.display()
        ),
    )
    .unwrap();
    let notify = UnixDatagram::bind(p.join("notify")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut service = Command::new(env!("CARGO_BIN_EXE_lsvfs"))
        .args(["mount-entry", "m", "--fstab", "fstab"])
        .current_dir(&p)
        .env("LSVFS_MACHINE_ID_FILE", &a.machine_id)
        .env("NOTIFY_SOCKET", p.join("notify"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let next = || {
        let mut buf = [0u8; 4096];
        let n = notify.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    // Two tries refused, the delay growing; not ready meanwhile.
    let first = next();
    assert!(
        first.contains("STATUS=waiting for the key server to unlock")
            && first.contains("next try in 1 s"),
        "{first}"
    );
    let second = next();
    assert!(second.contains("next try in 2 s"), "{second}");
    assert!(!first.contains("READY=1") && !second.contains("READY=1"));
    assert!(!mounted_on(&p.join("m")));

    ks.spawn();
    let ready = loop {
        let m = next();
        if m.contains("READY=1") {
            break m;
        }
        assert!(m.contains("waiting for the key server"), "{m}");
    };
    assert!(ready.contains("STATUS=mounted"), "{ready}");
    assert!(mounted_on(&p.join("m")));
    std::fs::write(p.join("m/booted"), b"yes").unwrap();

    Command::new("kill")
        .args(["-TERM", &service.id().to_string()])
        .status()
        .unwrap();
    let status = service.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut service.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains("waiting for the key server"),
        "the wait is logged too: {stderr}"
    );
    assert!(next().contains("STOPPING=1"));
    assert!(!mounted_on(&p.join("m")));
    a.ok(&["mount", "v.vol", "m"]);
    assert_eq!(std::fs::read(p.join("m/booted")).unwrap(), b"yes");
    a.ok(&["unmount", "m"]);
}

fn mounted_on(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == dir.to_str())
}

/// Rollback protection. Someone with access to the backing file keeps a
/// copy, lets the host write more, and puts the copy back (to undo a
/// deletion, say, or bring back a file the owner removed). The host
/// recorded the newest checkpoint it saw at every mount and unmount, so
/// the older copy is refused, by every way of mounting it (key server,
/// recovery key, read-only), before anything is written to it; only
/// --allow-rollback mounts it, and then the record follows it.
#[test]
fn an_older_copy_of_the_volume_put_back_is_refused_as_a_rollback() {
    let ks = KeyServer::start();
    let (a, vid) = host_with_volume(&ks, "host-a");
    let vol = a.p().join("v.vol");
    let old = a.p().join("old.vol");

    a.ok(&["mount", "v.vol", "m"]);
    std::fs::write(a.p().join("m/ledger"), b"balance 100").unwrap();
    a.ok(&["unmount", "m"]);
    std::fs::copy(&vol, &old).unwrap();
    let recorded = |a: &Host| -> u64 {
        let show = a.ok(&["host", "show"]);
        show.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("volume {vid}: newest checkpoint seen "))
                    .and_then(|r| r.split_whitespace().next())
            })
            .unwrap_or_else(|| panic!("no rollback record in {show}"))
            .parse()
            .unwrap()
    };
    let at_copy = recorded(&a);

    // While mounted, a newer checkpoint (a snapshot makes one) is recorded
    // within the record interval (60 s; 1 s here), not only at unmount.
    let o = run(
        Path::new(env!("CARGO_BIN_EXE_lsvfs")),
        &["mount", "v.vol", "m", "--store", a.store.to_str().unwrap()],
        a.p(),
        &[
            ("LSVFS_MACHINE_ID_FILE", &a.machine_id),
            ("LSVFS_RECORD_SECS", Path::new("1")),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let at_mount = recorded(&a);
    std::fs::write(a.p().join("m/ledger"), b"balance 0").unwrap();
    std::fs::create_dir(a.p().join("m/.snapshots/after")).unwrap();
    let t0 = Instant::now();
    while recorded(&a) <= at_mount {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not recorded while mounted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    a.ok(&["unmount", "m"]);
    let newest = recorded(&a);
    assert!(newest > at_copy, "{newest} > {at_copy}");
    assert!(a
        .ok(&["info", "v.vol"])
        .contains(&format!("rollback record: checkpoint {newest}")));

    // The copy put back: refused every way, and left as it was.
    std::fs::copy(&old, &vol).unwrap();
    let before = std::fs::read(&vol).unwrap();
    for args in [
        &["mount", "v.vol", "m"][..],
        &["mount", "v.vol", "m", "--read-only"],
        &["mount", "v.vol", "m", "--key-file", "rk"],
        &["mount", "v.vol", "m", "-o", "ro,key_file=rk"],
    ] {
        let t = a.fails(args, 12, "rollback refused");
        assert!(
            t.contains(&format!("this host has seen checkpoint {newest}"))
                && t.contains("--allow-rollback"),
            "{t}"
        );
        assert!(!mounted_on(&a.p().join("m")), "{args:?}");
    }
    assert!(
        std::fs::read(&vol).unwrap() == before,
        "a refused mount wrote to the volume"
    );
    assert_eq!(recorded(&a), newest, "a refused mount keeps the record");

    // Accepted on purpose: the old state, and the record follows it.
    a.ok(&["mount", "v.vol", "m", "--allow-rollback"]);
    assert_eq!(
        std::fs::read(a.p().join("m/ledger")).unwrap(),
        b"balance 100"
    );
    let reset = recorded(&a);
    assert!(reset < newest, "reset at mount: {reset} < {newest}");
    a.ok(&["unmount", "m"]);
    assert!(recorded(&a) > reset, "the unmount's checkpoint is recorded");
    a.ok(&["mount", "v.vol", "m"]);
    a.ok(&["unmount", "m"]);
    a.ok(&["check", "v.vol"]);
}

/// Crypto-erase. A volume is retired (or its host sold): `lsvfs erase`
/// must leave nothing that opens it. Its header's key slots and key-check
/// value are zeroed in both copies (no wrapped key or key-check value is
/// left anywhere in the backing file), the key server destroys its KEKs
/// (so even a copy of the sealed store taken earlier opens nothing), this
/// host forgets it, and every way of opening it, the recovery key file
/// included, says it was erased.
#[test]
fn erase_destroys_every_key_and_nothing_opens_the_volume_afterwards() {
    use lsvfs_keyserver::client::{self, ClientError, HostIdentity, Refusal};
    let mut ks = KeyServer::start();
    let (a, vid) = host_with_volume(&ks, "host-a");
    let vol = a.p().join("v.vol");
    a.ok(&["mount", "v.vol", "m"]);
    std::fs::write(a.p().join("m/secret"), b"the plans").unwrap();

    // What an attacker could later use: every wrapped key and the
    // key-check value in the header, the host's sealed entry, and a copy
    // of the sealed store taken before the erase.
    let h = header_of(&vol);
    assert_eq!(
        h.seq, 2,
        "created, then a slot added: each raises header_seq"
    );
    let mut material: Vec<Vec<u8>> = vec![h.key_check.to_vec()];
    for s in h
        .slots
        .iter()
        .filter(|s| s.kind != lsvfs::volume::SlotKind::Empty)
    {
        material.push(s.wrapped.0.to_vec());
    }
    assert_eq!(material.len(), 2, "a key-check value and one recovery slot");
    let before = open_store(&a);
    let sealed_entry = before.entry(&h.volume_id).unwrap().clone();
    let file = std::fs::read(&vol).unwrap();
    for m in &material {
        assert!(file.windows(m.len()).any(|w| w == &m[..]), "found before");
    }

    // Mounted: refused as busy. Not on a terminal, without --yes: refused.
    a.fails(&["erase", "v.vol", "--yes"], 7, "");
    a.ok(&["unmount", "m"]);
    a.fails(&["erase", "v.vol"], 2, "--yes");
    assert!(header_of(&vol) == h, "nothing erased without --yes");

    // The key server down: the header is erased at once (nothing opens
    // the volume from here on), the command fails saying so, and the
    // host keeps its sealed entry, so that running it again still asks
    // the server.
    ks.stop();
    let down = a.fails(
        &[
            "erase",
            "v.vol",
            "--yes",
            "--attempts",
            "1",
            "--timeout",
            "2",
        ],
        9,
        "unreachable",
    );
    assert!(
        down.contains("key slot and the key-check value zeroed"),
        "{down}"
    );
    assert!(header_of(&vol).erased.is_some());
    a.fails(
        &["mount", "v.vol", "m", "--key-file", "rk"],
        13,
        "crypto-erased",
    );
    assert!(a
        .ok(&["host", "show"])
        .contains(&format!("volume {vid}: KEK v1")));
    ks.spawn();

    let out = a.ok(&["erase", "v.vol", "--yes"]);
    assert!(out.contains("destroyed KEK versions [1]"), "{out}");
    assert!(out.contains("crypto-erased"), "{out}");

    // No key material survives anywhere in the backing file.
    let file = std::fs::read(&vol).unwrap();
    for m in &material {
        assert!(
            !file.windows(m.len()).any(|w| w == &m[..]),
            "key material survived"
        );
    }
    assert!(!file
        .windows(72)
        .any(|w| w == &sealed_entry.shares[0].wrapped.0[..]));
    assert!(header_of(&vol).erased.is_some());

    // Nothing opens it, and each way says why.
    a.fails(&["mount", "v.vol", "m"], 13, "crypto-erased");
    a.fails(
        &["mount", "v.vol", "m", "--key-file", "rk"],
        13,
        "crypto-erased",
    );
    a.fails(&["check", "v.vol", "--key-file", "rk"], 13, "crypto-erased");
    a.fails(&["rewrap", "v.vol"], 13, "crypto-erased");
    assert!(a.ok(&["info", "v.vol"]).contains("erased:          yes"));
    assert!(
        !a.ok(&["host", "show"]).contains(&vid),
        "the host forgot it"
    );

    // The key server destroyed its KEKs and audited it: the sealed store
    // copied before the erase gets nothing.
    let volumes = ks.admin(&["list-volumes"]);
    assert!(!volumes.contains(&vid), "{volumes}");
    let audit = ks.admin(&["audit", "--volume", &vid]);
    assert!(
        audit.contains("erase") && audit.contains("destroyed KEKs"),
        "{audit}"
    );
    let host = HostIdentity::from_secret(&before.identity);
    match client::unlock(
        &client_of(&before),
        &host,
        h.volume_id,
        sealed_entry.shares[0].kek_version,
    ) {
        Err(ClientError::Refused {
            reason: Refusal::UnknownVolume,
            ..
        }) => {}
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("an erased volume's KEK was released"),
    }

    // Running it again is harmless and says what it found.
    let again = a.ok(&["erase", "v.vol", "--yes"]);
    assert!(again.contains("already erased"), "{again}");
}

/// Three key servers and one host enrolled on each; `ca.pem` in the host's
/// directory trusts all three (their self-signed certificates, one file).
fn three_servers(name: &str) -> ([KeyServer; 3], Host, String) {
    let ks = [KeyServer::start(), KeyServer::start(), KeyServer::start()];
    let a = Host::new(name);
    let mut bundle = Vec::new();
    for s in &ks {
        bundle.extend(std::fs::read(s.ca()).unwrap());
    }
    std::fs::write(a.p().join("ca.pem"), bundle).unwrap();
    let out = a.ok(&[
        "host",
        "init",
        "--keyserver",
        &ks[0].url,
        "--keyserver",
        &ks[1].url,
        "--keyserver",
        &ks[2].url,
        "--ca",
        "ca.pem",
    ]);
    assert!(out.contains("on each of the 3 key servers"), "{out}");
    let id = host_id_in(&out);
    for s in &ks {
        s.admin(&["enroll", name, &id]);
    }
    (ks, a, id)
}

/// Mounts `v.vol` on `m`, reads `m/f`, unmounts; returns how long the
/// mount command took (the unlock is most of it).
fn timed_mount(a: &Host, want: &[u8]) -> Duration {
    let t0 = Instant::now();
    a.ok(&["mount", "v.vol", "m"]);
    let took = t0.elapsed();
    assert_eq!(std::fs::read(a.p().join("m/f")).unwrap(), want);
    a.ok(&["unmount", "m"]);
    took
}

fn signal(s: &KeyServer, sig: &str) {
    let pid = s.child.as_ref().unwrap().id().to_string();
    assert!(Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap()
        .success());
}

#[test]
fn two_of_three_key_servers_unlock_and_one_server_or_a_black_hole_changes_nothing() {
    let (mut ks, a, _) = three_servers("host-a");
    let owned: Vec<String> = ks.iter().map(|s| s.url.clone()).collect();
    let urls: Vec<&str> = owned.iter().map(|s| s.as_str()).collect();
    let create = |extra: &[&str]| {
        let mut args = vec!["create", "v.vol", "--size", "1G"];
        for u in &urls {
            args.extend(["--keyserver", u]);
        }
        args.extend_from_slice(extra);
        a.lsvfs(&args)
    };
    // A threshold of 1 with three servers would let any one of them open it.
    let o = create(&["--threshold", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(!a.p().join("v.vol").exists());
    let o = create(&["--threshold", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("any 2 of them unlock it"), "{}", text(&o));
    let vid = volume_id(&a);
    let info = a.ok(&["info", "v.vol"]);
    assert!(info.contains("(threshold 2 of 3)"), "{info}");
    for u in &urls {
        assert!(info.contains(&format!("{u} (KEK v1)")), "{info}");
    }

    a.ok(&["mount", "v.vol", "m"]);
    std::fs::write(a.p().join("m/f"), b"shared custody").unwrap();
    a.ok(&["unmount", "m"]);

    // The same unlock with all three up, then with one black-holed
    // (stopped: it accepts connections and never answers), alternating.
    let (mut up, mut holed) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        up.push(timed_mount(&a, b"shared custody"));
        signal(&ks[2], "-STOP");
        holed.push(timed_mount(&a, b"shared custody"));
        signal(&ks[2], "-CONT");
    }
    up.sort();
    holed.sort();
    println!(
        "mount (unlock) with 3 of 3 servers up: median {:?}; with one black-holed: median {:?}",
        up[1], holed[1]
    );
    // Its 10 s time-out (4 attempts) is never waited for.
    assert!(holed[2] < Duration::from_secs(5), "{holed:?}");
    signal(&ks[2], "-STOP");
    a.ok(&["mount", "v.vol", "m"]);
    a.ok(&["unmount", "m"]);
    let info = a.ok(&["info", "v.vol"]);
    assert!(
        info.contains(&format!("answered by {}, {}", urls[0], urls[1])),
        "{info}"
    );
    signal(&ks[2], "-CONT");

    // A dead one (stopped for good, connection refused) neither.
    ks[1].stop();
    timed_mount(&a, b"shared custody");
    // Two dead: refused after the time-outs, with every server's answer.
    ks[2].stop();
    let t = a.fails(
        &["mount", "v.vol", "m", "--attempts", "1", "--timeout", "2"],
        9,
        "needs 2 of 3 key servers and 2 failed",
    );
    assert!(t.contains(urls[1]) && t.contains(urls[2]), "{t}");
    ks[1].spawn();
    ks[2].spawn();

    // KEK rotation is per server: only server 3's share is rewrapped.
    ks[2].admin(&["rotate-kek", &vid]);
    let r = a.ok(&["rewrap", "v.vol"]);
    assert!(
        r.contains(&format!("from KEK v1 to v2 of {}", urls[2])),
        "{r}"
    );
    let show = a.ok(&["host", "show"]);
    assert!(
        show.contains("threshold 2 of 3")
            && show.contains(&format!("{} KEK v1", urls[0]))
            && show.contains(&format!("{} KEK v2", urls[2])),
        "{show}"
    );
    timed_mount(&a, b"shared custody");

    // Revoked on one server (n - k = 1): the other two still open it,
    // and that server audits its refusal.
    ks[0].admin(&["revoke", "host-a"]);
    timed_mount(&a, b"shared custody");
    let audit = ks[0].admin(&["audit", "--volume", &vid]);
    assert!(audit.contains("refused"), "{audit}");
    let audit = ks[1].admin(&["audit", "--volume", &vid]);
    assert!(audit.contains("released"), "{audit}");
    // Revoked on two (n - k + 1): refused, without waiting out a time-out.
    ks[1].admin(&["revoke", "host-a"]);
    let t0 = Instant::now();
    let t = a.fails(&["mount", "v.vol", "m"], 10, "needs 2 of 3 key servers");
    assert!(t.contains("revoked"), "{t}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(ks[1]
        .admin(&["audit", "--volume", &vid])
        .contains("refused"));
}

#[test]
fn one_key_servers_kek_and_the_hosts_own_share_do_not_open_a_threshold_volume() {
    let (mut ks, a, host_id) = three_servers("host-b");
    let mut args = vec!["create", "v.vol", "--size", "1G", "--threshold", "2"];
    for s in &ks {
        args.extend(["--keyserver", s.url.as_str()]);
    }
    a.ok(&args);
    let header = header_of(&a.p().join("v.vol"));
    // What one server's database and master key give (its KEK, here
    // asked for as the host itself), even together with this host's own
    // sealed store: one share, which is not the key and rebuilds no key
    // that passes the key check.
    let store = open_store(&a);
    let entry = store.entry(&header.volume_id).unwrap().clone();
    assert_eq!((entry.threshold, entry.shares.len()), (2, 3));
    let host = lsvfs_keyserver::client::HostIdentity::from_secret(&store.identity);
    let mut cfg = client_of(&store);
    let mut keks = Vec::new();
    for (i, s) in ks.iter().enumerate() {
        cfg.url = s.url.clone();
        let got = lsvfs_keyserver::client::unlock(&cfg, &host, header.volume_id, 1).unwrap();
        let kek = lsvfs::crypto::Kek::from_bytes(zeroize::Zeroizing::new(*got.kek.key));
        let share = &entry.shares[i];
        let mut ad = b"lsvfs v1 key share ".to_vec();
        ad.extend_from_slice(&header.volume_id);
        ad.push(share.x);
        let y = lsvfs::crypto::unwrap_key(&kek, &share.wrapped, &ad).unwrap();
        // The share is not the key, and no other server's KEK opens it.
        assert_ne!(y.check_value(&header.volume_id), header.key_check);
        keks.push((share.x, zeroize::Zeroizing::new(*y.expose())));
    }
    let as_share = |(x, y): &(u8, zeroize::Zeroizing<[u8; 32]>)| lsvfs::keys::threshold::KeyShare {
        x: *x,
        y: y.clone(),
    };
    for one in &keks {
        let k = lsvfs::keys::threshold::combine(&[as_share(one)]);
        assert!(
            k.map_or(true, |k| k.check_value(&header.volume_id)
                != header.key_check),
            "one share alone opened the volume"
        );
    }
    // Any two do (the control that makes the check above mean something).
    let two = lsvfs::keys::threshold::combine(&[as_share(&keks[0]), as_share(&keks[2])]).unwrap();
    assert_eq!(two.check_value(&header.volume_id), header.key_check);

    // One server taken over (an impostor at its address, with its TLS key,
    // that answers with a KEK of its own making): its answer opens no
    // share, so it counts as that server failing, and the other two
    // unlock the volume.
    let urls: Vec<String> = ks.iter().map(|s| s.url.clone()).collect();
    ks[0].stop();
    let evil = KeyServer::impostor_of(&ks[0]);
    evil.admin(&["enroll", "host-b", &host_id]);
    cfg.url = urls[0].clone();
    lsvfs_keyserver::client::register_volume(&cfg, &host, header.volume_id).unwrap();
    // `rewrap` waits for every server, so the impostor's answer is always
    // among those it gets.
    a.ok(&["rewrap", "v.vol"]);
    a.ok(&["mount", "v.vol", "m"]);
    a.ok(&["unmount", "m"]);
    let info = a.ok(&["info", "v.vol"]);
    assert!(
        info.contains(&format!("answered by {}, {}", urls[1], urls[2])),
        "{info}"
    );
    // With a second server down, the impostor's answer is named.
    ks[1].stop();
    let t = a.fails(
        &["mount", "v.vol", "m", "--attempts", "1", "--timeout", "2"],
        9,
        "needs 2 of 3 key servers",
    );
    assert!(
        t.contains(&format!("{}: ", urls[0]))
            && t.contains("does not open this host's sealed key share"),
        "{t}"
    );
}

#[test]
fn a_tpm_sealed_store_unlocks_and_a_changed_pcr_another_tpm_or_a_revocation_refuses() {
    let tpm = common::tpm::SoftTpm::start();
    let ks = KeyServer::start();
    let mut a = Host::new("host-tpm");
    a.tpm = Some(PathBuf::from(&tpm.tcti));
    let out = a.ok(&[
        "host",
        "init",
        "--keyserver",
        &ks.url,
        "--ca",
        ks.ca().to_str().unwrap(),
        "--tpm",
        "--tpm-pcrs",
        "7",
    ]);
    assert!(out.contains("bound to PCR 7"), "{out}");
    // No host secret in a file: only the TPM's sealed object, mode 0600.
    assert!(!a.store.join("host-secret").exists());
    let sealed = a.store.join("host-secret.tpm");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sealed).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let show = a.ok(&["host", "show"]);
    assert!(
        show.contains("sealed store: TPM 2.0 (host secret sealed to the TPM, bound to PCR 7; anchored by NV counter 0x01"),
        "{show}"
    );
    let id = host_id_in(&show);

    // Enroll, create, mount: the whole flow with the TPM-sealed store.
    ks.admin(&["enroll", "host-tpm", &id]);
    a.ok(&["create", "v.vol", "--size", "1G", "--keyserver", &ks.url]);
    a.ok(&["keyslot", "add-recovery", "v.vol", "--key-file", "rk"]);
    a.ok(&["mount", "v.vol", "m"]);
    std::fs::write(a.p().join("m/f"), b"sealed by the TPM").unwrap();
    a.ok(&["unmount", "m"]);

    // The store is anchored to a TPM counter at each mount and unmount:
    // an older copy of it put back (with older rollback records) is refused.
    let store_file = a.store.join("sealed");
    let older = std::fs::read(&store_file).unwrap();
    a.ok(&["mount", "v.vol", "m"]);
    std::fs::write(a.p().join("m/g"), b"later").unwrap();
    a.ok(&["unmount", "m"]);
    let newest = std::fs::read(&store_file).unwrap();
    std::fs::write(&store_file, &older).unwrap();
    let t = a.fails(&["mount", "v.vol", "m"], 11, "rollback of the sealed store");
    assert!(t.contains("older copy of the store"), "{t}");
    // Nor by pointing host-secret.tpm at no counter (its NV index zeroed:
    // magic, version, PCR count, PCR 7, PCR digest, then the index).
    let tpm_file = a.store.join("host-secret.tpm");
    let good = std::fs::read(&tpm_file).unwrap();
    let mut no_counter = good.clone();
    no_counter[8 + 4 + 1 + 1 + 32..][..4].fill(0);
    std::fs::write(&tpm_file, &no_counter).unwrap();
    a.fails(
        &["mount", "v.vol", "m"],
        11,
        "one of the two files was replaced",
    );
    std::fs::write(&tpm_file, &good).unwrap();
    std::fs::write(&store_file, &newest).unwrap();
    timed_mount(&a, b"sealed by the TPM");

    // The same files with another TPM: refused, naming the recovery path.
    let other = common::tpm::SoftTpm::start();
    let mut b = Host::new("host-tpm");
    b.tpm = Some(PathBuf::from(&other.tcti));
    std::fs::remove_dir_all(b.p().join("m")).unwrap();
    let copy = b.store.clone();
    std::fs::create_dir(&copy).unwrap();
    std::fs::set_permissions(
        &copy,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o700),
    )
    .unwrap();
    for f in ["host-secret.tpm", "sealed"] {
        std::fs::copy(a.store.join(f), copy.join(f)).unwrap();
    }
    let t = b.fails(&["host", "show"], 11, "another TPM");
    assert!(t.contains("--key-file"), "{t}");

    // Revoked: refused by the key server, as with the software store.
    ks.admin(&["revoke", "host-tpm"]);
    a.fails(&["mount", "v.vol", "m"], 10, "revoked");

    // A changed PCR 7: refused before the key server is asked, naming the
    // PCR and the recovery key.
    tpm.extend_pcr7();
    let t = a.fails(&["mount", "v.vol", "m"], 11, "PCR 7 changed");
    assert!(t.contains("recovery key (--key-file)"), "{t}");
    // The TPM itself enforces it: with the recorded digest made to match
    // the new PCR value (so lsvfs's own check passes), the TPM still
    // refuses to unseal under the policy of the old value.
    let mut b = std::fs::read(&sealed).unwrap();
    let at = 8 + 4 + 1 + 1; // magic, version, PCR count, PCR 7
    {
        use sha2::Digest as _;
        let mut ctx = tss_esapi::Context::new(
            <tss_esapi::TctiNameConf as std::str::FromStr>::from_str(&tpm.tcti).unwrap(),
        )
        .unwrap();
        let sel = tss_esapi::structures::PcrSelectionListBuilder::new()
            .with_selection(
                tss_esapi::interface_types::algorithm::HashingAlgorithm::Sha256,
                &[tss_esapi::structures::PcrSlot::Slot7],
            )
            .build()
            .unwrap();
        let (_, _, values) = ctx.pcr_read(sel).unwrap();
        let now: [u8; 32] = sha2::Sha256::digest(values.value()[0].value()).into();
        b[at..at + 32].copy_from_slice(&now);
    }
    std::fs::write(&sealed, &b).unwrap();
    a.fails(&["host", "show"], 11, "refused to unseal");
    // The recovery key still opens the volume.
    a.ok(&["mount", "v.vol", "m", "--key-file", "rk"]);
    assert_eq!(
        std::fs::read(a.p().join("m/f")).unwrap(),
        b"sealed by the TPM"
    );
    a.ok(&["unmount", "m"]);
}

/// An export's volume slot: whoever can unlock the source volume (this
/// host, through its sealed store and the key server) restores it, even
/// once the volume itself is gone; another host cannot, nor this one once
/// revoked.
#[test]
fn an_export_opens_for_whoever_unlocks_its_volume_and_not_after_revocation() {
    let ks = KeyServer::start();
    let (a, _vid) = host_with_volume(&ks, "host-x");
    a.ok(&["mount", "v.vol", "m"]);
    std::fs::write(a.p().join("m/kept"), b"exported").unwrap();
    a.ok(&["snapshot", "create", "m", "s1"]);
    let out = a.ok(&["snapshot", "export", "m", "s1", "-o", "s1.lsx"]);
    assert!(
        out.contains("only whoever can unlock the source volume"),
        "{out}"
    );
    a.ok(&["unmount", "m"]);
    let show = a.ok(&["export", "show", "s1.lsx"]);
    assert!(
        show.contains("whoever can unlock the source volume"),
        "{show}"
    );
    // The volume is lost; its export restores on this host alone.
    std::fs::remove_file(a.p().join("v.vol")).unwrap();
    a.ok(&["keygen", "new.key"]);
    a.ok(&[
        "restore",
        "s1.lsx",
        "--to",
        "r.vol",
        "--key-file",
        "new.key",
    ]);
    a.ok(&["mount", "r.vol", "m", "--key-file", "new.key"]);
    assert_eq!(std::fs::read(a.p().join("m/kept")).unwrap(), b"exported");
    a.ok(&["unmount", "m"]);

    // Another host, enrolled, holds no key of the volume: wrong key.
    let b = Host::new("host-y");
    let id = b.init(&ks, &ks.ca());
    ks.admin(&["enroll", "host-y", &id]);
    std::fs::copy(a.p().join("s1.lsx"), b.p().join("s1.lsx")).unwrap();
    b.ok(&["keygen", "new.key"]);
    b.fails(
        &[
            "restore",
            "s1.lsx",
            "--to",
            "r.vol",
            "--key-file",
            "new.key",
        ],
        5,
        "whoever can unlock the source volume",
    );
    assert!(!b.p().join("r.vol").exists());

    // Revoked: the key server refuses, so does the restore.
    ks.admin(&["revoke", "host-x"]);
    a.fails(
        &[
            "restore",
            "s1.lsx",
            "--to",
            "r2.vol",
            "--key-file",
            "new.key",
        ],
        10,
        "revoked",
    );
    assert!(!a.p().join("r2.vol").exists());
}

/// A recipient on another host, with a key server of its own, restores an
/// export into a volume registered there: it mounts through that server,
/// and the exporting host's server is never asked.
#[test]
fn an_export_restores_on_another_host_under_another_key_server() {
    let ks1 = KeyServer::start();
    let (a, _) = host_with_volume(&ks1, "source");
    a.ok(&["mount", "v.vol", "m"]);
    std::fs::write(a.p().join("m/kept"), b"moved").unwrap();
    a.ok(&["snapshot", "create", "m", "s1"]);
    let ks2 = KeyServer::start();
    let b = Host::new("target");
    let id = b.init(&ks2, &ks2.ca());
    ks2.admin(&["enroll", "target", &id]);
    b.ok(&["recipient", "keygen", "b.id"]);
    std::fs::copy(b.p().join("b.id.pub"), a.p().join("b.id.pub")).unwrap();
    a.ok(&[
        "snapshot",
        "export",
        "m",
        "s1",
        "--recipient",
        "b.id.pub",
        "-o",
        "s1.lsx",
    ]);
    a.ok(&["unmount", "m"]);
    std::fs::copy(a.p().join("s1.lsx"), b.p().join("s1.lsx")).unwrap();
    // The source's key server is gone: the target never needs it.
    drop(ks1);
    b.ok(&[
        "restore",
        "s1.lsx",
        "--to",
        "r.vol",
        "--identity",
        "b.id",
        "--keyserver",
        &ks2.url,
    ]);
    b.ok(&["mount", "r.vol", "m"]);
    assert_eq!(std::fs::read(b.p().join("m/kept")).unwrap(), b"moved");
    b.ok(&["unmount", "m"]);
    let audit = ks2.admin(&["audit", "--limit", "20"]);
    assert!(
        audit.contains("register") || audit.contains("Register"),
        "{audit}"
    );
}

/// A volume the key server's administrator declares compromised: the next
/// unlock rewraps the volume key under a new KEK and starts a rekey of the
/// data, and once it is done the host reports it; the server records both,
/// and the next unlock asks for nothing more.
#[test]
fn a_compromise_declared_on_the_key_server_rewraps_rekeys_and_is_reported() {
    let ks = KeyServer::start();
    let (a, vid) = host_with_volume(&ks, "host-a");
    a.ok(&["mount", "v.vol", "m"]);
    a.ok(&["rekey", "m", "--status"]);
    std::fs::write(a.p().join("m/hello"), b"before the compromise").unwrap();
    a.ok(&["unmount", "m"]);

    let out = ks.admin(&["compromise", &vid]);
    assert!(out.contains("declared compromised: KEK v2 added"), "{out}");
    // Mounted with the policy (and the report) checked every second.
    let store = a.store.to_str().unwrap().to_string();
    let o = run(
        Path::new(env!("CARGO_BIN_EXE_lsvfs")),
        &["mount", "v.vol", "m", "--store", &store],
        a.p(),
        &[
            ("LSVFS_MACHINE_ID_FILE", a.machine_id.as_path()),
            ("LSVFS_RECORD_SECS", Path::new("1")),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let status = || -> serde_json::Value {
        let out = a.ok(&["rekey", "m", "--status", "--json"]);
        serde_json::from_str(out.lines().find(|l| l.starts_with('{')).unwrap()).unwrap()
    };
    let t0 = Instant::now();
    let audit = loop {
        let st = status();
        let audit = ks.admin(&["audit", "--volume", &vid]);
        if st["current"] == 1
            && st["generations"].as_array().unwrap().len() == 1
            && audit.contains("rekeyed")
        {
            break audit;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no rekey reported: {st} {audit}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(audit.contains("compromise"), "{audit}");
    assert!(audit.contains("rekey asked"), "{audit}");
    assert!(audit.contains("compromise mark is cleared"), "{audit}");
    let show = a.ok(&["host", "show"]);
    assert!(
        show.contains(&format!("volume {vid}: KEK v2")),
        "rewrapped: {show}"
    );
    assert_eq!(
        std::fs::read(a.p().join("m/hello")).unwrap(),
        b"before the compromise"
    );
    a.ok(&["unmount", "m"]);

    // Cleared: the next mount starts no rekey.
    a.ok(&["mount", "v.vol", "m"]);
    let st = status();
    assert_eq!(
        (
            st["current"].as_u64(),
            st["generations"].as_array().unwrap().len()
        ),
        (Some(1), 1),
        "{st}"
    );
    a.ok(&["unmount", "m"]);
    a.ok(&["check", "v.vol"]);
}
