//! A volume mounted through the real kernel FUSE mount by the `lsvfs`
//! binary, for the integration tests that drive it with ordinary programs.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Mounted {
    pub dir: tempfile::TempDir,
}

pub fn lsvfs(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lsvfs"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run lsvfs")
}

pub fn ok(args: &[&str], cwd: &Path) -> String {
    let o = lsvfs(args, cwd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "lsvfs {args:?}: {text}");
    text
}

impl Mounted {
    pub fn new() -> Mounted {
        Mounted::with_size("2G")
    }
    pub fn with_size(size: &str) -> Mounted {
        let m = Mounted::created(size);
        m.mount();
        m
    }
    /// A volume of `size` (`lsvfs create --size`) and its key, not mounted.
    pub fn created(size: &str) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("m")).unwrap();
        ok(&["keygen", "k"], dir.path());
        ok(
            &["create", "v.vol", "--size", size, "--key-file", "k"],
            dir.path(),
        );
        Mounted { dir }
    }
    pub fn p(&self) -> &Path {
        self.dir.path()
    }
    pub fn m(&self) -> PathBuf {
        self.dir.path().join("m")
    }
    pub fn mount(&self) {
        ok(&["mount", "v.vol", "m", "--key-file", "k"], self.p());
    }
    /// [`Mounted::mount`] with more variables in the daemon's environment.
    /// Returns what `lsvfs mount` wrote to stderr (the transport, say).
    pub fn mount_with_env(&self, env: &[(&str, &str)]) -> String {
        let o = Command::new(env!("CARGO_BIN_EXE_lsvfs"))
            .args(["mount", "v.vol", "m", "--key-file", "k"])
            .envs(env.iter().copied())
            .current_dir(self.p())
            .output()
            .expect("run lsvfs");
        let said = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "lsvfs mount: {said}");
        said
    }
    pub fn unmount(&self) {
        ok(&["unmount", "m"], self.p());
    }
    /// Unmounts and asserts that `lsvfs check` finds the volume clean.
    pub fn unmount_and_check(&self) {
        self.unmount();
        let c = ok(&["check", "v.vol", "--key-file", "k"], self.p());
        assert!(c.contains("v.vol: clean"), "{c}");
    }
    /// Runs a shell command in the mount; returns stdout, panics on failure.
    pub fn sh(&self, cmd: &str) -> String {
        sh_in(&self.m(), cmd)
    }
    /// The pid of this mount's daemon.
    pub fn daemon_pid(&self) -> String {
        let out = Command::new("pgrep")
            .args(["-f", "lsvfs mount "])
            .output()
            .unwrap();
        let ours: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|p| {
                let cmdline = fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default();
                cmdline.contains("--foreground")
                    && fs::read_link(format!("/proc/{p}/cwd")).ok().as_deref() == Some(self.p())
            })
            .map(String::from)
            .collect();
        assert_eq!(ours.len(), 1, "exactly one daemon for this mount: {ours:?}");
        ours[0].clone()
    }
}

/// The block count `lsvfs info` gives in a line such as
/// `allocated:       8.0 KiB (2 blocks)`.
pub fn info_blocks(info: &str, field: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|l| l.split('(').nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} line with a block count: {info}"))
}

/// Runs a shell command in `dir`; returns its stdout, panics on failure.
pub fn sh_in(dir: &Path, cmd: &str) -> String {
    let o = sh_output(dir, cmd);
    assert!(
        o.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn sh_output(dir: &Path, cmd: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// Runs `cmd` as uid/gid 65534 (nobody) in `dir`; returns (success, stderr).
pub fn as_nobody(dir: &Path, cmd: &str) -> (bool, String) {
    as_nobody_with(dir, &[], cmd)
}

/// [`as_nobody`] with more `setpriv` options (capabilities, say).
pub fn as_nobody_with(dir: &Path, setpriv: &[&str], cmd: &str) -> (bool, String) {
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(setpriv)
        .args(["sh", "-c", cmd])
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// Runs a shell command in `dir`; returns (success, stdout and stderr).
pub fn try_sh(dir: &Path, cmd: &str) -> (bool, String) {
    let o = sh_output(dir, cmd);
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(self.m())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
