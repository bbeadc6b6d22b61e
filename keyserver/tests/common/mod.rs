//! Runs the real `lsvfs-keyserver` binary on 127.0.0.1 with a fresh state
//! directory, a self-signed certificate and a master key, and drives its
//! admin socket through the same binary.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use lsvfs_keyserver::client::ClientConfig;

pub const BIN: &str = env!("CARGO_BIN_EXE_lsvfs-keyserver");

pub fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run lsvfs-keyserver")
}

/// Writes a self-signed certificate for 127.0.0.1 into `dir`.
pub fn gen_cert(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    let out = run(&[
        "gen-cert",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "127.0.0.1",
        "localhost",
    ]);
    assert!(out.status.success(), "{out:?}");
    (cert, key)
}

pub struct Server {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub ca_pem: Vec<u8>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(30)
    }

    pub fn start_with(challenge_lifetime_secs: u64) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = gen_cert(dir.path(), "server");
        let master = dir.path().join("master-key");
        let out = run(&["gen-master-key", master.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        let socket = dir.path().join("admin.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n\
                 tls_cert = \"{}\"\n\
                 tls_key = \"{}\"\n\
                 state_dir = \"{}\"\n\
                 admin_socket = \"{}\"\n\
                 master_key = \"{}\"\n\
                 challenge_lifetime_secs = {challenge_lifetime_secs}\n",
                cert.display(),
                key.display(),
                dir.path().join("state").display(),
                socket.display(),
                master.display(),
            ),
        )
        .unwrap();
        let ca_pem = std::fs::read(&cert).unwrap();
        let mut s = Server {
            dir,
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            config,
            socket,
            ca_pem,
        };
        s.spawn();
        s
    }

    /// Starts the process and waits for its "listening on" line.
    pub fn spawn(&mut self) {
        self.spawn_with_env(&[]);
    }

    /// Like `spawn`, with extra environment variables.
    pub fn spawn_with_env(&mut self, env: &[(&str, &Path)]) {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config", self.config.to_str().unwrap()])
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("NOTIFY_SOCKET");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(a) = line.strip_prefix("lsvfs-keyserver: listening on ") {
                    let _ = tx.send(a.to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("server did not print its address");
        self.addr = addr.parse().unwrap();
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().to_string();
            let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
            assert!(st.success());
            let status = c.wait().unwrap();
            assert!(status.success(), "server exited with {status}");
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn client(&self) -> ClientConfig {
        ClientConfig {
            url: self.url(),
            ca_pem: Some(self.ca_pem.clone()),
            timeout: Duration::from_secs(10),
            attempts: 2,
        }
    }

    /// Runs `lsvfs-keyserver admin --json ARGS`.
    pub fn admin(&self, args: &[&str]) -> Output {
        let mut all = vec!["admin", "--socket", self.socket.to_str().unwrap(), "--json"];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Runs an admin command that must succeed; returns its `result`.
    pub fn admin_ok(&self, args: &[&str]) -> serde_json::Value {
        let out = self.admin(args);
        assert!(
            out.status.success(),
            "admin {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["result"].clone()
    }

    /// Volume entry of `list-volumes`.
    pub fn volume(&self, id: &str) -> serde_json::Value {
        let r = self.admin_ok(&["list-volumes"]);
        r["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == id)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn volume_id(n: u8) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[0] = 0x5e;
    v[15] = n;
    v
}
