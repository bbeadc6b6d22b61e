//! `lsvfs rekey` through the binary and a real FUSE mount: a mounted volume
//! rekeys online while another process writes and fsyncs, every file (and
//! every snapshot's) reads back the same, the older key generation leaves
//! the header, and a rekey cut short by kill -9 resumes at the next mount.
//! The volume-level model, power-cut and frozen-image tests are in
//! tests/snapshot_volume.rs, tests/crash.rs and tests/frozen.rs.

mod common;

use std::process::{Command, Stdio};

use common::mounted::{lsvfs, ok, sh_in, Mounted};

/// SHA-256 of every file under `dir` (in the mount), sorted by path.
fn sums(m: &Mounted, dir: &str) -> String {
    m.sh(&format!(
        "cd {dir} && find . -type f ! -path './.snapshots/*' -print0 | sort -z | xargs -0 sha256sum"
    ))
}

fn rekey_json(m: &Mounted, args: &[&str]) -> serde_json::Value {
    let out = ok(args, m.p());
    let line = out
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON from lsvfs {args:?}: {out}"));
    serde_json::from_str(line).unwrap()
}

/// `info --key-file`'s line of blocks per key generation, and all of it.
fn sealed_blocks(m: &Mounted) -> (String, String) {
    let info = ok(&["info", "v.vol", "--key-file", "k"], m.p());
    let line = info
        .lines()
        .find(|l| l.starts_with("sealed blocks:"))
        .unwrap_or_else(|| panic!("no sealed blocks line: {info}"))
        .to_string();
    (line, info)
}

/// Polls `rekey --status` on the mount until one key generation is left
/// and no pass runs (at most 120 s); a pass that stopped with an error
/// fails at once. (Each status counts the blocks per generation through
/// the mount, so it polls twice a second, not faster.)
fn wait_for_pass(m: &Mounted) -> serde_json::Value {
    let mut st = serde_json::Value::Null;
    for _ in 0..240 {
        st = rekey_json(m, &["rekey", "m", "--status", "--json"]);
        assert!(st.get("error").is_none(), "the resumed rekey stopped: {st}");
        let left = st["generations"].as_array().map_or(0, |g| g.len());
        if st["running"] == serde_json::Value::Bool(false) && left == 1 {
            return st;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    panic!("the resumed rekey did not finish in 120 s; last status: {st}");
}

fn generations(v: &serde_json::Value) -> (Vec<u64>, u64, u64) {
    (
        v["generations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_u64().unwrap())
            .collect(),
        v["current"].as_u64().unwrap(),
        v["retired_below"].as_u64().unwrap(),
    )
}

#[test]
fn a_mounted_volume_rekeys_online_under_a_busy_writer_and_keeps_every_file() {
    let m = Mounted::new();
    m.sh(
        "cp -a /usr/include/linux inc && head -c 48M /dev/urandom > big && \
         mkdir d && for i in $(seq 1 200); do echo file $i > d/f$i; done && sync",
    );
    ok(&["snapshot", "create", "m", "before"], m.p());
    let before = sums(&m, ".");
    // Overwritten after the snapshot: the snapshot alone holds the old
    // blocks (held blocks, sealed again by the rekey too).
    m.sh("dd if=/dev/urandom of=big bs=1M count=16 conv=notrunc,fsync status=none");

    // Another process writes and fsyncs all through the rekey.
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(
            "mkdir w && for i in $(seq 1 150); do \
             dd if=/dev/urandom of=w/$i bs=64k count=4 conv=fsync status=none || exit 1; done",
        )
        .current_dir(m.m())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let st = rekey_json(&m, &["rekey", "m", "--key-file", "k", "--wait", "--json"]);
    assert_eq!(generations(&st), (vec![1], 1, 1), "{st}");
    assert!(writer.wait().unwrap().success(), "the writer failed");
    assert_eq!(
        m.sh("ls w | wc -l").trim(),
        "150",
        "the writer's files are all there"
    );

    let live = sums(&m, ".");
    assert_eq!(
        sums(&m, ".snapshots/before"),
        before,
        "the snapshot changed"
    );
    let info = ok(&["info", "v.vol"], m.p());
    assert!(info.contains("format version:  2"), "{info}");
    assert!(info.contains("current 1"), "{info}");
    assert!(
        info.contains("retired:         key generations below 1"),
        "{info}"
    );
    assert!(!info.contains("not finished"), "{info}");
    assert!(info.contains("mounted on:      "), "{info}");
    let sealed = info
        .lines()
        .find(|l| l.starts_with("sealed blocks:"))
        .unwrap_or_else(|| panic!("{info}"));
    assert!(
        sealed.contains("generation 1: ") && !sealed.contains("generation 0"),
        "counted through the mount: {info}"
    );
    assert!(
        info.contains("rekey policy:    after 120d; key generation 1 is "),
        "{info}"
    );

    // A second rekey, and everything again after a remount.
    let st = rekey_json(&m, &["rekey", "m", "--key-file", "k", "--wait", "--json"]);
    assert_eq!(generations(&st), (vec![2], 2, 2), "{st}");
    m.unmount_and_check();
    m.mount();
    assert_eq!(sums(&m, "."), live, "live files after the remount");
    assert_eq!(sums(&m, ".snapshots/before"), before);
    m.unmount_and_check();
}

#[test]
fn an_unmounted_volume_rekeys_and_a_killed_mount_resumes_its_rekey() {
    let m = Mounted::new();
    m.sh("head -c 32M /dev/urandom > a && cp -a /usr/include/linux inc && sync");
    let want = sums(&m, ".");
    m.unmount();

    // Unmounted: the whole pass runs in the command.
    let st = rekey_json(&m, &["rekey", "v.vol", "--key-file", "k", "--json"]);
    assert_eq!(generations(&st), (vec![1], 1, 1), "{st}");
    let c = ok(&["check", "v.vol", "--key-file", "k"], m.p());
    assert!(c.contains("v.vol: clean"), "{c}");
    let (sealed, info) = sealed_blocks(&m);
    assert!(
        sealed.contains("generation 1: ") && !sealed.contains("generation 0"),
        "{info}"
    );
    m.mount();
    assert_eq!(sums(&m, "."), want);

    // Enough data that the pass is still running when the mount dies.
    m.sh("head -c 400M /dev/urandom > b && sync");
    let want = sums(&m, ".");
    let pid = m.daemon_pid();
    let out = lsvfs(&["rekey", "m", "--key-file", "k"], m.p());
    assert!(out.status.success(), "{out:?}");
    sh_in(m.p(), &format!("kill -9 {pid}"));
    let _ = Command::new("fusermount3")
        .args(["-uz"])
        .arg(m.m())
        .status();
    let info = ok(&["info", "v.vol"], m.p());
    assert!(
        info.contains("rekey:           not finished"),
        "the pass was not cut short: {info}"
    );
    // The older generation still seals blocks.
    let (sealed, info) = sealed_blocks(&m);
    assert!(sealed.contains("generation 1: "), "{info}");

    // The next mount resumes it by itself: no second `rekey` is asked for
    // (one asked after the pass ended would start generation 3).
    m.mount();
    let st = wait_for_pass(&m);
    assert_eq!(generations(&st), (vec![2], 2, 2), "{st}");
    assert_eq!(sums(&m, "."), want);
    m.unmount_and_check();
    let (sealed, info) = sealed_blocks(&m);
    assert!(
        sealed.contains("generation 2: ") && !sealed.contains("generation 1"),
        "{info}"
    );
}

#[test]
fn rekey_refuses_what_it_cannot_do_with_a_way_out() {
    let m = Mounted::new();
    m.unmount();
    // A key file that does not open the volume.
    ok(&["keygen", "other"], m.p());
    let o = lsvfs(&["rekey", "v.vol", "--key-file", "other"], m.p());
    let text = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(5), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    // Not a volume.
    std::fs::write(m.p().join("junk"), vec![7u8; 1 << 20]).unwrap();
    let o = lsvfs(&["rekey", "junk", "--key-file", "k"], m.p());
    let text = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(3), "{text}");
    assert!(text.contains("not an lsvfs volume"), "{text}");
    // A directory that no mount serves.
    std::fs::create_dir(m.p().join("empty")).unwrap();
    let o = lsvfs(&["rekey", "empty"], m.p());
    let text = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("is it mounted"), "{text}");
}

/// Mounts with the policy checked every second (`LSVFS_RECORD_SECS`).
fn mount_checking_often(m: &Mounted) {
    m.mount_with_env(&[("LSVFS_RECORD_SECS", "1")]);
}

/// Polls `rekey --status --json` until `done` holds (at most a minute).
fn wait_until(m: &Mounted, what: &str, done: &dyn Fn(&serde_json::Value) -> bool) {
    for _ in 0..300 {
        let st = rekey_json(m, &["rekey", "m", "--status", "--json"]);
        if done(&st) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("{what}: not within a minute");
}

#[test]
fn a_mount_rekeys_by_itself_when_its_policy_says_so() {
    let m = Mounted::new();
    m.unmount();
    for (args, needle) in [
        (
            vec!["tune", "v.vol", "--key-file", "k"],
            "nothing to change",
        ),
        (
            vec!["tune", "v.vol", "--key-file", "k", "--rekey-after", "soon"],
            "write a duration",
        ),
        (
            vec![
                "tune",
                "v.vol",
                "--key-file",
                "k",
                "--rekey-after-bytes",
                "12Q",
            ],
            "unknown size suffix",
        ),
    ] {
        let o = lsvfs(&args, m.p());
        let text = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {text}");
        assert!(text.contains(needle), "{args:?}: {text}");
    }
    let info = ok(&["info", "v.vol", "--key-file", "k"], m.p());
    assert!(
        info.contains("rekey policy:    after 120d;"),
        "the default policy is 120 days: {info}"
    );
    ok(
        &[
            "create",
            "p.vol",
            "--size",
            "64M",
            "--key-file",
            "k",
            "--rekey-after",
            "30d",
            "--rekey-after-bytes",
            "1T",
        ],
        m.p(),
    );
    let info = ok(&["info", "p.vol", "--key-file", "k"], m.p());
    assert!(
        info.contains("rekey policy:    after 30d, or after 1.0 TiB sealed;"),
        "{info}"
    );

    // By bytes: 8 MiB sealed under a generation.
    let t = ok(
        &[
            "tune",
            "v.vol",
            "--key-file",
            "k",
            "--rekey-after",
            "never",
            "--rekey-after-bytes",
            "8M",
        ],
        m.p(),
    );
    assert!(t.contains("never by age, or after 8.0 MiB sealed"), "{t}");
    mount_checking_often(&m);
    m.sh("head -c 24M /dev/urandom > a && sync");
    wait_until(&m, "a rekey by bytes", &|st| {
        generations(st).1 >= 1 && st["generations"].as_array().unwrap().len() == 1
    });
    let want = sums(&m, ".");
    m.unmount_and_check();

    // By age: two seconds.
    ok(
        &[
            "tune",
            "v.vol",
            "--key-file",
            "k",
            "--rekey-after",
            "2s",
            "--rekey-after-bytes",
            "none",
        ],
        m.p(),
    );
    let before = generations(&rekey_json(&m, &["rekey", "v.vol", "--status", "--json"])).1;
    mount_checking_often(&m);
    wait_until(&m, "a rekey by age", &|st| {
        generations(st).1 > before && st["generations"].as_array().unwrap().len() == 1
    });
    assert_eq!(sums(&m, "."), want);
    m.unmount_and_check();
}
