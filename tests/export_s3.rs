//! Exports to and restores from S3-compatible object storage: a real S3
//! server process (moto's, from PyPI; scripts/setup.sh installs it in
//! /opt/lsvfs-moto, LSVFS_MOTO names another) on 127.0.0.1, started by each
//! test, driven by the `lsvfs` binary with the usual AWS environment
//! variables. Multipart uploads, chains listed under a prefix, and an
//! export killed half-way that leaves no object.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::mounted::{sh_in, Mounted};

struct S3 {
    child: Child,
    port: u16,
}

impl S3 {
    /// Starts the server and makes bucket `bucket`.
    fn start(bucket: &str) -> S3 {
        let bin = std::env::var("LSVFS_MOTO")
            .unwrap_or_else(|_| "/opt/lsvfs-moto/bin/moto_server".to_string());
        assert!(
            Path::new(&bin).exists(),
            "{bin} is missing: run scripts/setup.sh (it installs moto's S3 server)"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = S3 { child, port };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the S3 server never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Listening is not yet serving: try until the bucket is made.
        let t = Instant::now();
        loop {
            let made = Command::new("curl")
                .args(["-sf", "-X", "PUT", &format!("{}/{bucket}", s.endpoint())])
                .output()
                .unwrap();
            if made.status.success() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "creating bucket {bucket}: {}",
                String::from_utf8_lossy(&made.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `lsvfs ARGS` in `dir` with this server's AWS environment.
    fn lsvfs(&self, dir: &Path, args: &str) -> Output {
        Command::new(env!("CARGO_BIN_EXE_lsvfs"))
            .args(args.split_whitespace())
            .current_dir(dir)
            .envs(self.env())
            .output()
            .unwrap()
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "lsvfs-test".into()),
            ("AWS_SECRET_ACCESS_KEY", "lsvfs-test-secret".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    fn ok(&self, dir: &Path, args: &str) -> String {
        let o = self.lsvfs(dir, args);
        let t = text(&o);
        assert!(o.status.success(), "lsvfs {args}: {t}");
        t
    }

    /// Keys under `prefix`, from the server's own listing.
    fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let o = Command::new("curl")
            .args([
                "-sf",
                &format!("{}/{bucket}?list-type=2&prefix={prefix}", self.endpoint()),
            ])
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&o.stdout).to_string();
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(String::from)
            .collect()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn manifest(dir: &Path) -> String {
    sh_in(
        dir,
        "find . -path ./.snapshots -prune -o -printf '%p %y %m %U %s %n %T@ %l\\n' | sort; \
         find . -path ./.snapshots -prune -o -type f -print0 | sort -z | xargs -0 -r sha256sum",
    )
}

#[test]
fn a_chain_goes_to_object_storage_in_parts_and_restores_from_its_prefix() {
    let s3 = S3::start("lsvfs-backups");
    let src = Mounted::new();
    let p = src.p();
    // 20 MiB of data: the full export is uploaded in several 8 MiB parts.
    sh_in(
        &src.m(),
        "dd if=/dev/urandom of=big bs=1M count=20 status=none && cp -a /usr/include/linux .",
    );
    s3.ok(p, "snapshot create m s1");
    sh_in(
        &src.m(),
        "echo changed > linux/types.h && rm -rf linux/netfilter",
    );
    s3.ok(p, "snapshot create m s2");
    s3.ok(
        p,
        "snapshot export m s1 --key-file k -o s3://lsvfs-backups/host1/",
    );
    s3.ok(
        p,
        "snapshot export m s2 --since s1 --key-file k -o s3://lsvfs-backups/host1",
    );
    assert_eq!(
        s3.keys("lsvfs-backups", "host1/"),
        ["host1/s1.lsx", "host1/s2.lsx"]
    );
    // Never overwritten.
    let o = s3.lsvfs(
        p,
        "snapshot export m s1 --key-file k -o s3://lsvfs-backups/host1/",
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("exists"), "{}", text(&o));

    let v = s3.ok(p, "export verify s3://lsvfs-backups/host1/");
    assert!(v.contains("chain: 2 exports"), "{v}");
    let show = s3.ok(p, "export show s3://lsvfs-backups/host1/s2.lsx");
    assert!(show.contains("increment over snapshot s1"), "{show}");

    s3.ok(
        p,
        "restore s3://lsvfs-backups/host1/ --to r.vol --key-file k",
    );
    std::fs::create_dir(p.join("rm")).unwrap();
    s3.ok(p, "mount r.vol rm --key-file k");
    let same = ["s1", "s2"].iter().all(|s| {
        manifest(&p.join("rm/.snapshots").join(s)) == manifest(&src.m().join(".snapshots").join(s))
    });
    let live_same = manifest(&p.join("rm")) == manifest(&src.m().join(".snapshots/s2"));
    s3.ok(p, "unmount rm");
    assert!(
        same && live_same,
        "the restored snapshots differ from the source's"
    );

    // A foreign export under the prefix breaks the chain: refused, named.
    let other = Mounted::with_size("64M");
    s3.ok(other.p(), "snapshot create m x");
    s3.ok(
        other.p(),
        "snapshot export m x --key-file k -o s3://lsvfs-backups/host1/",
    );
    let o = s3.lsvfs(
        p,
        "restore s3://lsvfs-backups/host1/ --to r2.vol --key-file k",
    );
    assert_eq!(o.status.code(), Some(15), "{}", text(&o));
    assert!(text(&o).contains("x.lsx"), "{}", text(&o));
    assert!(!p.join("r2.vol").exists());
    other.unmount();
    src.unmount();
}

#[test]
fn an_export_killed_mid_upload_leaves_no_object() {
    let s3 = S3::start("lsvfs-killed");
    let src = Mounted::new();
    let p = src.p();
    sh_in(
        &src.m(),
        "dd if=/dev/urandom of=big bs=1M count=160 status=none",
    );
    s3.ok(p, "snapshot create m s1");
    src.unmount();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lsvfs"))
        .args(["snapshot", "export", "v.vol", "s1", "--key-file", "k", "-o"])
        .arg("s3://lsvfs-killed/k/")
        .current_dir(p)
        .envs(s3.env())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Until parts are on their way: the server has written something.
    let t = Instant::now();
    loop {
        let io = std::fs::read_to_string(format!("/proc/{}/io", child.id())).unwrap_or_default();
        let written: u64 = io
            .lines()
            .find_map(|l| l.strip_prefix("wchar: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if written > 24 << 20 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the export ended before it could be killed"
        );
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the export never sent"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        s3.keys("lsvfs-killed", "k/").is_empty(),
        "an object appeared: {:?}",
        s3.keys("lsvfs-killed", "k/")
    );
    let o = s3.lsvfs(p, "export verify s3://lsvfs-killed/k/s1.lsx");
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    // A complete export afterwards is whole.
    s3.ok(
        p,
        "snapshot export v.vol s1 --key-file k -o s3://lsvfs-killed/k/",
    );
    s3.ok(p, "export verify s3://lsvfs-killed/k/");
}
