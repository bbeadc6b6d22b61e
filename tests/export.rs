//! Snapshot exports and restores through the `lsvfs` binary and real FUSE
//! mounts: a chain exported from a mount that keeps serving a writer,
//! restored for a recipient with no key server into a new volume whose
//! snapshots and live tree match the source's file for file; increments
//! applied to a restored copy; pipes; and every kind of bad input, kill -9
//! and a full disk refused with the documented exit code and message.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mounted::{lsvfs, ok, sh_in, try_sh, Mounted};

/// `ok` and `lsvfs` with the arguments in one string (no argument holds a
/// space).
fn lx(dir: &Path, args: &str) -> String {
    ok(&args.split_whitespace().collect::<Vec<_>>(), dir)
}

fn lxr(dir: &Path, args: &str) -> std::process::Output {
    lsvfs(&args.split_whitespace().collect::<Vec<_>>(), dir)
}

/// Every entry under `dir` (type, mode, owner, size, link count, mtime,
/// symlink target), each file's SHA-256 and every xattr: what a restore
/// must reproduce exactly.
fn manifest(dir: &Path) -> String {
    sh_in(
        dir,
        "find . -path ./.snapshots -prune -o -printf '%p %y %m %U %G %s %n %T@ %l\\n' | sort; \
         find . -path ./.snapshots -prune -o -type f -print0 | sort -z | xargs -0 -r sha256sum; \
         getfattr -R -d -m - --absolute-names . 2>/dev/null | grep -v '^# file: ./.snapshots' || true",
    )
}

/// A tree with what `cp -a`, editors and git leave: many small files,
/// symlinks, a hard link, a sparse file, xattrs, an empty directory.
fn populate(m: &Path) {
    sh_in(
        m,
        "mkdir -p src/inc empty && cp -a /usr/include/linux src/inc/ && \
         printf 'hello\\n' > a.txt && ln a.txt hard.txt && ln -s a.txt sym && \
         ln -s /nowhere dangling && truncate -s 50M sparse && \
         printf 'in the middle' | dd of=sparse bs=1 seek=20000000 conv=notrunc status=none && \
         setfattr -n user.colour -v blue a.txt && chmod 640 a.txt && \
         dd if=/dev/urandom of=big bs=1M count=8 status=none",
    );
}

/// Changes after the first snapshot: an editor's rename over a file, an
/// append, a delete, a truncate, new files.
fn change(m: &Path) {
    sh_in(
        m,
        "printf 'new contents\\n' > .a.txt.swp && mv .a.txt.swp a.txt && \
         echo more >> hard.txt && rm -rf src/inc/linux/netfilter && truncate -s 1M big && \
         mkdir -p new/deeper && echo fresh > new/deeper/f && ln -sf new/deeper/f sym",
    );
}

/// A mount with snapshot s1 of [`populate`]'s tree and s2 after [`change`].
fn two_snapshots() -> Mounted {
    let src = Mounted::new();
    populate(&src.m());
    lx(src.p(), "snapshot create m s1");
    change(&src.m());
    lx(src.p(), "snapshot create m s2");
    src
}

fn code(o: &std::process::Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_chain_exported_from_a_busy_mount_restores_for_a_recipient_file_for_file() {
    let src = two_snapshots();
    let p = src.p();
    sh_in(&src.m(), "echo after > after.txt");
    lx(p, "snapshot create m s3");
    lx(p, "recipient keygen alice.id");
    let public = std::fs::read_to_string(p.join("alice.id.pub")).unwrap();
    assert!(public.starts_with("lsvfs-recipient-v1 "), "{public}");

    // A writer keeps the mount busy while the exports run through it.
    let writer = Command::new("sh")
        .arg("-c")
        .arg("i=0; while [ $i -lt 400 ]; do echo $i > w.$((i % 7)); sync w.$((i % 7)); i=$((i+1)); done")
        .current_dir(src.m())
        .spawn()
        .unwrap();
    let t = Instant::now();
    lx(p, "snapshot export m s1 --recipient alice.id.pub -o s1.lsx");
    lx(
        p,
        "snapshot export m s2 --since s1 --recipient alice.id.pub -o s2.lsx",
    );
    lx(
        p,
        "snapshot export m s3 --since s2 --recipient alice.id.pub -o s3.lsx",
    );
    let exported_in = t.elapsed();
    let status = writer.wait_with_output().unwrap();
    assert!(
        status.status.success(),
        "the writer failed during the exports"
    );
    assert!(exported_in < Duration::from_secs(60), "{exported_in:?}");
    // Increments follow the change: s3 added one small file.
    let size = |f: &str| std::fs::metadata(p.join(f)).unwrap().len();
    assert!(size("s1.lsx") > 8 << 20, "full {}", size("s1.lsx"));
    assert!(
        size("s3.lsx") < 64 << 10,
        "tiny increment is {} bytes",
        size("s3.lsx")
    );
    assert!(size("s2.lsx") < size("s1.lsx") / 2);
    assert!(!p.join("s1.lsx.partial").exists());

    let v = lx(p, "export verify s1.lsx s2.lsx s3.lsx");
    assert!(v.contains("chain: 3 exports"), "{v}");
    let show = lx(p, "export show s2.lsx");
    let signer = show
        .lines()
        .find_map(|l| l.strip_prefix("signed by:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    // verify names the signer, as show does.
    assert_eq!(v.matches(&format!("signed by {signer}")).count(), 3, "{v}");
    assert!(
        show.contains("increment over snapshot s1") && show.contains(public.trim()),
        "{show}"
    );

    // Another host: its own store (none), its own key file; only the
    // recipient's identity opens the exports.
    let other = tempfile::tempdir().unwrap();
    let q = other.path();
    std::fs::copy(p.join("alice.id"), q.join("alice.id")).unwrap();
    for f in ["s1.lsx", "s2.lsx", "s3.lsx"] {
        std::fs::copy(p.join(f), q.join(f)).unwrap();
    }
    lx(q, "keygen k2");
    let r = lxr(q, "restore s1.lsx s2.lsx s3.lsx --to r.vol --key-file k2");
    assert_eq!(code(&r), 5, "no identity: wrong key: {}", text(&r));
    assert!(!q.join("r.vol").exists(), "nothing made without a key");
    let store = q.join("no-store");
    ok(
        &[
            "--store",
            store.to_str().unwrap(),
            "restore",
            "s1.lsx",
            "s2.lsx",
            "s3.lsx",
            "--to",
            "r.vol",
            "--identity",
            "alice.id",
            "--key-file",
            "k2",
        ],
        q,
    );
    let info_new = lx(q, "info r.vol");
    let source_id = show
        .lines()
        .find_map(|l| l.strip_prefix("volume:"))
        .unwrap()
        .trim()
        .to_string();
    let new_id = info_new
        .lines()
        .find_map(|l| l.strip_prefix("volume id:"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(source_id.len(), 32, "{show}");
    assert_ne!(source_id, new_id, "a new volume id");
    // The source's key file opens nothing of the new volume.
    std::fs::copy(p.join("k"), q.join("k")).unwrap();
    let r = lxr(q, "check r.vol --key-file k");
    assert_eq!(code(&r), 5, "{}", text(&r));

    // Signed by the source volume: pinned, only its exports restore; one a
    // stranger wrote for the same recipient is refused.
    assert_eq!(signer.len(), 64, "{show}");
    let stranger = Mounted::with_size("64M");
    lx(stranger.p(), "snapshot create m s1");
    std::fs::copy(p.join("alice.id.pub"), stranger.p().join("alice.id.pub")).unwrap();
    lx(
        stranger.p(),
        "snapshot export m s1 --recipient alice.id.pub -o forged.lsx",
    );
    stranger.unmount();
    std::fs::copy(stranger.p().join("forged.lsx"), q.join("forged.lsx")).unwrap();
    let pinned = format!("--source-key {signer}");
    let r = lxr(
        q,
        &format!("restore forged.lsx --to f.vol --identity alice.id --key-file k2 {pinned}"),
    );
    assert_eq!(code(&r), 15, "{}", text(&r));
    assert!(
        text(&r).contains("not written by the volume you expect"),
        "{}",
        text(&r)
    );
    assert!(!q.join("f.vol").exists());
    lx(
        q,
        &format!("restore s1.lsx s2.lsx --to p.vol --identity alice.id --key-file k2 {pinned}"),
    );

    std::fs::create_dir(q.join("m")).unwrap();
    lx(q, "mount r.vol m --key-file k2");
    let snaps = sh_in(&q.join("m"), "ls .snapshots");
    assert_eq!(
        snaps.split_whitespace().collect::<Vec<_>>(),
        ["s1", "s2", "s3"]
    );
    for s in ["s1", "s2", "s3"] {
        let a = manifest(&src.m().join(".snapshots").join(s));
        let b = manifest(&q.join("m/.snapshots").join(s));
        assert!(a == b, "snapshot {s} differs:\n{a}\n---\n{b}");
    }
    let live = manifest(&q.join("m"));
    assert!(
        live == manifest(&src.m().join(".snapshots/s3")),
        "the live tree is the newest snapshot"
    );
    // The restored volume is an ordinary one: writable, snapshots work.
    sh_in(&q.join("m"), "echo new > x && rm -rf new");
    lx(q, "unmount m");
    let c = lx(q, "check r.vol --key-file k2");
    assert!(c.contains("clean"), "{c}");
    src.unmount_and_check();
}

#[test]
fn increments_apply_to_a_restored_copy_and_a_changed_copy_needs_a_rollback() {
    let src = two_snapshots();
    let p = src.p();
    for (name, since) in [("s1", None), ("s2", Some("s1"))] {
        let mut args = vec!["snapshot", "export", "m", name, "--key-file", "k"];
        if let Some(b) = since {
            args.extend(["--since", b]);
        }
        let out = format!("{name}.lsx");
        args.extend(["-o", &out]);
        ok(&args, p);
    }
    // Pipe: export to stdout, restore from stdin.
    let sh = sh_in(
        p,
        &format!(
            "{0} snapshot export m s1 --key-file k -o - | {0} restore - --to piped.vol --key-file k 2>&1",
            env!("CARGO_BIN_EXE_lsvfs")
        ),
    );
    assert!(sh.contains("restored 1 export(s) into piped.vol"), "{sh}");

    lx(p, "restore s1.lsx --to c.vol --key-file k");
    // Out of order for a fresh volume: refused, nothing made.
    let r = lxr(p, "restore s2.lsx --to x.vol --key-file k");
    assert_eq!(code(&r), 15, "{}", text(&r));
    assert!(
        text(&r).contains("starts with a full export"),
        "{}",
        text(&r)
    );
    assert!(!p.join("x.vol").exists());
    let r = lxr(p, "restore s2.lsx s1.lsx --to x.vol --key-file k");
    assert_eq!(code(&r), 15, "{}", text(&r));
    // The copy is changed through a mount: the increment is refused...
    std::fs::create_dir(p.join("cm")).unwrap();
    lx(p, "mount c.vol cm --key-file k");
    sh_in(&p.join("cm"), "echo local > local.txt");
    lx(p, "unmount cm");
    let r = lxr(p, "restore --incremental s2.lsx --to c.vol --key-file k");
    assert_eq!(code(&r), 15, "{}", text(&r));
    assert!(text(&r).contains("--rollback"), "{}", text(&r));
    // ...until rolled back; then the copy is s2, file for file.
    lx(
        p,
        "restore --incremental --rollback s2.lsx --to c.vol --key-file k",
    );
    // Applying it twice: the copy's newest snapshot is now s2.
    let r = lxr(p, "restore --incremental s2.lsx --to c.vol --key-file k");
    assert_eq!(code(&r), 15, "{}", text(&r));
    lx(p, "mount c.vol cm --key-file k");
    assert!(!p.join("cm/local.txt").exists());
    assert!(manifest(&p.join("cm")) == manifest(&src.m().join(".snapshots/s2")));
    lx(p, "unmount cm");
    src.unmount_and_check();
}

/// The newest snapshot of the volume at `path` (id, name, seconds,
/// nanoseconds), read through the library with key file `key`.
fn newest_snapshot(path: &Path, key: &Path) -> (u64, String, i64, u32) {
    let dev = std::sync::Arc::new(lsvfs::device::FileDevice::open(path, true).unwrap());
    let h = lsvfs::volume::read_header(&*dev).unwrap();
    let master = lsvfs::keys::unlock(&h, &lsvfs::keys::read_key_file(key).unwrap()).unwrap();
    let v = lsvfs::volume::Volume::open(dev, &master, lsvfs::volume::Options::default()).unwrap();
    let (id, name, sec, nsec) = v.snapshot_names().unwrap().pop().unwrap();
    v.close().unwrap();
    (id.0, name, sec, nsec)
}

/// An increment another volume wrote is refused by a restored copy, even
/// when that volume's base snapshot has the same name and time as the
/// copy's newest snapshot (both are in every export's clear header) and
/// the export opens with the copy owner's identity: the copy's header
/// records the volume it was restored from and its signing key. The
/// source's own increment still applies.
#[test]
fn a_restored_copy_refuses_an_increment_another_volume_wrote_for_its_base() {
    let src = Mounted::with_size("64M");
    let p = src.p();
    sh_in(&src.m(), "echo original > a.txt");
    lx(p, "snapshot create m s1");
    sh_in(&src.m(), "echo second > b.txt");
    lx(p, "snapshot create m s2");
    lx(p, "recipient keygen alice.id");
    for (name, since) in [("s1", ""), ("s2", "--since s1")] {
        lx(
            p,
            &format!("snapshot export m {name} {since} --recipient alice.id.pub -o {name}.lsx"),
        );
    }
    src.unmount();
    lx(p, "keygen k2");
    lx(
        p,
        "restore s1.lsx --to c.vol --identity alice.id --key-file k2",
    );
    let (_, name, sec, nsec) = newest_snapshot(&p.join("c.vol"), &p.join("k2"));
    assert_eq!(name, "s1");
    let info = lx(p, "info c.vol");
    let source = lx(p, "info v.vol");
    let source_id = source
        .lines()
        .find_map(|l| l.strip_prefix("volume id:"))
        .unwrap()
        .trim();
    assert!(
        info.contains(&format!("restored from:   volume {source_id}")),
        "{info}"
    );

    // A stranger's volume with a snapshot s1 taken at the same instant,
    // then its own change and s2, exported for alice.
    let stranger = Mounted::created("64M");
    let q = stranger.p();
    {
        let dev =
            std::sync::Arc::new(lsvfs::device::FileDevice::open(&q.join("v.vol"), true).unwrap());
        let h = lsvfs::volume::read_header(&*dev).unwrap();
        let kek = lsvfs::keys::read_key_file(&q.join("k")).unwrap();
        let master = lsvfs::keys::unlock(&h, &kek).unwrap();
        let v =
            lsvfs::volume::Volume::open(dev, &master, lsvfs::volume::Options::default()).unwrap();
        v.snapshot_create_at("s1", (sec, nsec)).unwrap();
        v.close().unwrap();
    }
    stranger.mount();
    sh_in(&stranger.m(), "echo planted > evil.txt");
    lx(q, "snapshot create m s2");
    std::fs::copy(p.join("alice.id.pub"), q.join("alice.id.pub")).unwrap();
    lx(
        q,
        "snapshot export m s2 --since s1 --recipient alice.id.pub -o evil.lsx",
    );
    stranger.unmount();
    std::fs::copy(q.join("evil.lsx"), p.join("evil.lsx")).unwrap();

    let r = lxr(
        p,
        "restore --incremental evil.lsx --to c.vol --identity alice.id --key-file k2",
    );
    assert_eq!(code(&r), 15, "{}", text(&r));
    assert!(
        text(&r).contains("restored from volume") && text(&r).contains("not a link"),
        "{}",
        text(&r)
    );
    // Nothing was applied: the copy's newest snapshot is still s1, and
    // the source's own increment applies.
    assert_eq!(newest_snapshot(&p.join("c.vol"), &p.join("k2")).1, "s1");
    lx(
        p,
        "restore --incremental s2.lsx --to c.vol --identity alice.id --key-file k2",
    );
    std::fs::create_dir(p.join("cm")).unwrap();
    lx(p, "mount c.vol cm --key-file k2");
    assert_eq!(
        sh_in(&p.join("cm"), "cat a.txt b.txt"),
        "original\nsecond\n"
    );
    assert!(!p.join("cm/evil.txt").exists());
    lx(p, "unmount cm");
}

#[test]
fn bad_exports_are_refused_with_their_exit_codes_and_a_way_out() {
    let src = two_snapshots();
    let p = src.p();
    lx(p, "snapshot export m s1 --key-file k -o s1.lsx");
    lx(p, "snapshot export m s2 --since s1 --key-file k -o s2.lsx");
    let full = std::fs::read(p.join("s1.lsx")).unwrap();
    let restore =
        |file: &str, to: &str| lsvfs(&["restore", file, "--to", to, "--key-file", "k"], p);

    // Truncated: 16, for verify and restore; no volume left behind.
    std::fs::write(p.join("cut.lsx"), &full[..full.len() / 2]).unwrap();
    let r = lxr(p, "export verify cut.lsx");
    assert_eq!(code(&r), 16, "{}", text(&r));
    assert!(text(&r).contains("cut short"), "{}", text(&r));
    let r = restore("cut.lsx", "cut.vol");
    assert_eq!(code(&r), 16, "{}", text(&r));
    assert!(!p.join("cut.vol").exists());

    // A flipped bit in the data: 4 from verify (the hash) and from restore
    // (authentication), naming the file.
    let mut flipped = full.clone();
    let at = full.len() / 3;
    flipped[at] ^= 0x20;
    std::fs::write(p.join("flip.lsx"), &flipped).unwrap();
    for r in [
        lxr(p, "export verify flip.lsx"),
        restore("flip.lsx", "flip.vol"),
    ] {
        assert_eq!(code(&r), 4, "{}", text(&r));
        assert!(text(&r).contains("flip.lsx"), "{}", text(&r));
    }
    assert!(!p.join("flip.vol").exists());

    // Not an export: 14.
    std::fs::write(p.join("text.lsx"), b"just some text, not an export at all").unwrap();
    let r = lxr(p, "export verify text.lsx");
    assert_eq!(code(&r), 14, "{}", text(&r));

    // A missing link, a foreign link: 15.
    let other = Mounted::with_size("64M");
    ok(&["snapshot", "create", "m", "s1"], other.p());
    ok(&["snapshot", "create", "m", "s2"], other.p());
    ok(
        &[
            "snapshot",
            "export",
            "m",
            "s2",
            "--since",
            "s1",
            "--key-file",
            "k",
            "-o",
            "foreign.lsx",
        ],
        other.p(),
    );
    std::fs::copy(other.p().join("foreign.lsx"), p.join("foreign.lsx")).unwrap();
    let r = lxr(p, "export verify s1.lsx foreign.lsx");
    assert_eq!(code(&r), 15, "{}", text(&r));
    assert!(text(&r).contains("foreign"), "{}", text(&r));
    let r = lxr(p, "export verify s2.lsx s1.lsx");
    assert_eq!(code(&r), 15, "{}", text(&r));

    // A wrong key: 5, naming who can open it.
    lx(p, "keygen wrong");
    let r = lxr(p, "restore s1.lsx --to w.vol --key-file wrong");
    assert_eq!(code(&r), 5, "{}", text(&r));
    assert!(
        text(&r).contains("key file (KEK fingerprint"),
        "{}",
        text(&r)
    );
    // An existing output is never overwritten.
    let r = lxr(p, "snapshot export m s1 --key-file k -o s1.lsx");
    assert_eq!(code(&r), 2, "{}", text(&r));
    assert_eq!(std::fs::read(p.join("s1.lsx")).unwrap(), full);
    other.unmount();
    src.unmount();
}

/// Bytes process `pid` has read so far (rchar in /proc/PID/io).
fn read_so_far(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `path` exists and has at least `bytes` written (its
/// allocated blocks: a new volume is a sparse file of its full size).
fn wait_for(path: &Path, bytes: u64) {
    use std::os::unix::fs::MetadataExt;
    let t = Instant::now();
    while std::fs::metadata(path).map_or(0, |m| m.blocks() * 512) < bytes {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{} never grew",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn kill_9_and_a_full_disk_never_leave_anything_that_passes_for_complete() {
    let src = Mounted::new();
    let p = src.p();
    sh_in(
        &src.m(),
        "dd if=/dev/urandom of=big bs=1M count=96 status=none",
    );
    lx(p, "snapshot create m s1");
    lx(p, "snapshot export m s1 --key-file k -o s1.lsx");

    // kill -9 during an export: only FILE.partial, which verify calls
    // incomplete.
    src.unmount();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lsvfs"))
        .args([
            "snapshot",
            "export",
            "v.vol",
            "s1",
            "--key-file",
            "k",
            "-o",
            "killed.lsx",
        ])
        .current_dir(p)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&p.join("killed.lsx.partial"), 8 << 20);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!p.join("killed.lsx").exists());
    let r = lxr(p, "export verify killed.lsx.partial");
    assert_eq!(code(&r), 16, "{}", text(&r));

    // kill -9 during a restore: the volume is there but refuses to mount
    // or open, saying it is an unfinished restore.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lsvfs"))
        .args(["restore", "s1.lsx", "--to", "r.vol", "--key-file", "k"])
        .current_dir(p)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Mid-stream: it has read a quarter of the export (the new volume's
    // file size says nothing, creating it allocates its reserve).
    let t = Instant::now();
    while read_so_far(child.id()) < 24 << 20 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the restore never read its input"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::create_dir(p.join("rm")).unwrap();
    let r = lxr(p, "mount r.vol rm --key-file k");
    assert_eq!(code(&r), 16, "{}", text(&r));
    assert!(text(&r).contains("unfinished restore"), "{}", text(&r));
    let r = lxr(p, "check r.vol --key-file k");
    assert_eq!(code(&r), 16, "{}", text(&r));

    // A full disk during a restore: exit 6, and the half-made volume gone.
    let small = p.join("small");
    std::fs::create_dir(&small).unwrap();
    let (mounted, why) = try_sh(p, "mount -t tmpfs -o size=40M tmpfs small");
    assert!(mounted, "tmpfs: {why}");
    let r = lxr(p, "restore s1.lsx --to small/r.vol --key-file k");
    let listing = sh_in(p, "ls -A small");
    assert_eq!(code(&r), 6, "{}", text(&r));
    assert!(listing.trim().is_empty(), "left behind: {listing}");
    // And during an export to a file, by this command or by the mount:
    // exit 6, a message that names the file and what to do, and the
    // partial file gone.
    let from_volume = lxr(p, "snapshot export v.vol s1 --key-file k -o small/s1.lsx");
    let left_by_volume = sh_in(p, "ls -A small");
    src.mount();
    let from_mount = lxr(p, "snapshot export m s1 --key-file k -o small/s1.lsx");
    let left_by_mount = sh_in(p, "ls -A small");
    src.unmount();
    let _ = try_sh(p, "umount small");
    for (r, listing) in [(from_volume, left_by_volume), (from_mount, left_by_mount)] {
        assert_eq!(code(&r), 6, "{}", text(&r));
        assert!(
            text(&r).contains("small/s1.lsx") && text(&r).contains("free space there"),
            "{}",
            text(&r)
        );
        assert!(listing.trim().is_empty(), "left behind: {listing}");
    }
}

#[test]
fn progress_shows_on_a_terminal_and_json_summaries_elsewhere() {
    let src = Mounted::new();
    let p = src.p();
    sh_in(&src.m(), "head -c 60000000 /dev/urandom > data");
    lx(p, "snapshot create m s1");
    src.unmount();
    let bin = env!("CARGO_BIN_EXE_lsvfs");
    let (done, tty) = try_sh(
        p,
        &format!("script -qec '{bin} snapshot export v.vol s1 --key-file k -o s1.lsx' /dev/null"),
    );
    assert!(done, "{tty}");
    assert!(tty.contains("exporting: ["), "no progress bar: {tty}");
    assert!(tty.contains("exported snapshot s1 (full)"), "{tty}");
    let (done, tty) = try_sh(
        p,
        &format!("script -qec '{bin} restore s1.lsx --to r.vol --key-file k' /dev/null"),
    );
    assert!(done, "{tty}");
    assert!(tty.contains("restoring"), "no progress bar: {tty}");
    // Not a terminal: no bar; --json: one JSON object.
    let o = lxr(p, "snapshot export v.vol s1 --key-file k -o s2.lsx --json");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success() && !err.contains("exporting: ["), "{err}");
    let v: serde_json::Value = serde_json::from_str(err.trim()).expect("one JSON object");
    assert_eq!(v["snapshot"], "s1");
    assert_eq!(
        v["bytes"].as_u64(),
        Some(std::fs::metadata(p.join("s2.lsx")).unwrap().len())
    );
    let o = lxr(p, "restore s2.lsx --to r2.vol --key-file k --json");
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("restore --json prints one JSON object");
    assert_eq!(v["snapshots"][0], "s1");
}
