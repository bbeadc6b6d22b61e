//! The file system's namespace through its API (the FUSE layer will add
//! only type conversion): POSIX semantics and errors, stable readdir
//! cookies, and atomicity of every operation across kills.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::{mem_volume, open, Rng};
use lsvfs::device::MemDevice;
use lsvfs::fs::FsError;
use lsvfs::fs::{Fs, RENAME_EXCHANGE, RENAME_NOREPLACE};

use lsvfs::fs::{Ino, ROOT_INO as ROOT};
const DIR: u32 = libc::S_IFDIR | 0o755;
const REG: u32 = libc::S_IFREG | 0o644;

fn new_fs() -> (Arc<MemDevice>, Fs) {
    let dev = mem_volume(65536, 256);
    let v = open(dev.clone());
    Fs::format(&v, 0, 0).unwrap();
    (dev, Fs::mount(v).unwrap())
}

fn errno(r: Result<impl std::fmt::Debug, FsError>) -> i32 {
    r.expect_err("the operation should fail").errno()
}

fn names(fs: &Fs, dir: Ino) -> Vec<String> {
    fs.readdir(dir, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .collect()
}

#[test]
fn create_lookup_remove_and_their_errors() {
    let (_dev, fs) = new_fs();
    let (d, di) = fs.mknod(ROOT, b"d", DIR, 1000, 1000, 0).unwrap();
    assert!(di.is_dir() && di.nlink == 2 && di.uid == 1000);
    assert_eq!(fs.getattr(ROOT).unwrap().nlink, 3);
    let (f, _) = fs.mknod(d, b"f", REG, 0, 0, 0).unwrap();
    assert_eq!(fs.lookup(d, b"f").unwrap().0, f);
    assert_eq!(fs.lookup(d, b"..").unwrap().0, ROOT);
    assert_eq!(fs.lookup(d, b".").unwrap().0, d);
    assert_eq!(names(&fs, d), [".", "..", "f"]);
    for t in [libc::S_IFIFO, libc::S_IFSOCK, libc::S_IFCHR] {
        fs.mknod(d, format!("n{t}").as_bytes(), t | 0o600, 0, 0, 0x0501)
            .unwrap();
    }

    assert_eq!(errno(fs.mknod(d, b"f", REG, 0, 0, 0)), libc::EEXIST);
    assert_eq!(errno(fs.lookup(d, b"nope")), libc::ENOENT);
    assert_eq!(errno(fs.lookup(f, b"x")), libc::ENOTDIR);
    assert_eq!(errno(fs.mknod(f, b"x", REG, 0, 0, 0)), libc::ENOTDIR);
    assert_eq!(
        errno(fs.mknod(d, &[b'a'; 256], REG, 0, 0, 0)),
        libc::ENAMETOOLONG
    );
    fs.mknod(d, &[b'a'; 255], REG, 0, 0, 0).unwrap();
    assert_eq!(errno(fs.mknod(d, b"a/b", REG, 0, 0, 0)), libc::EINVAL);
    assert_eq!(errno(fs.rmdir(ROOT, b"d")), libc::ENOTEMPTY);
    assert_eq!(errno(fs.unlink(ROOT, b"d")), libc::EISDIR);
    assert_eq!(errno(fs.rmdir(d, b"f")), libc::ENOTDIR);
    assert_eq!(errno(fs.unlink(d, b"missing")), libc::ENOENT);

    fs.unlink(d, b"f").unwrap();
    assert_eq!(
        errno(fs.getattr(f)),
        libc::ENOENT,
        "the inode is gone with its last link"
    );
    for e in fs.readdir(d, 2, 100).unwrap() {
        fs.unlink(d, &e.name).unwrap();
    }
    fs.rmdir(ROOT, b"d").unwrap();
    assert_eq!(fs.getattr(ROOT).unwrap().nlink, 2);
    assert_eq!(names(&fs, ROOT), [".", ".."]);
}

#[test]
fn hard_links_and_symlinks() {
    let (_dev, fs) = new_fs();
    let (f, _) = fs.mknod(ROOT, b"f", REG, 0, 0, 0).unwrap();
    assert_eq!(fs.link(f, ROOT, b"g").unwrap().nlink, 2);
    assert_eq!(errno(fs.link(f, ROOT, b"g")), libc::EEXIST);
    let (d, _) = fs.mknod(ROOT, b"d", DIR, 0, 0, 0).unwrap();
    assert_eq!(errno(fs.link(d, ROOT, b"dl")), libc::EINVAL);
    fs.unlink(ROOT, b"f").unwrap();
    assert_eq!(fs.lookup(ROOT, b"g").unwrap().1.nlink, 1);
    let long: Vec<u8> = (0..4095).map(|i| b'a' + (i % 26) as u8).collect();
    let (s, si) = fs.symlink(ROOT, b"s", &long, 0, 0).unwrap();
    assert_eq!(si.size, 4095);
    assert_eq!(fs.readlink(s).unwrap(), long);
    assert_eq!(
        errno(fs.symlink(ROOT, b"t", &vec![b'x'; 4096], 0, 0)),
        libc::ENAMETOOLONG
    );
    assert_eq!(errno(fs.readlink(d)), libc::EINVAL);
}

#[test]
fn rename_semantics() {
    let (_dev, fs) = new_fs();
    let (a, _) = fs.mknod(ROOT, b"a", DIR, 0, 0, 0).unwrap();
    let (b, _) = fs.mknod(ROOT, b"b", DIR, 0, 0, 0).unwrap();
    let (x, _) = fs.mknod(a, b"x", REG, 0, 0, 0).unwrap();
    let (y, _) = fs.mknod(b, b"y", REG, 0, 0, 0).unwrap();

    // Over an existing file (what editors do): y's inode goes away.
    fs.rename(a, b"x", b, b"y", 0).unwrap();
    assert_eq!(fs.lookup(b, b"y").unwrap().0, x);
    assert_eq!(errno(fs.getattr(y)), libc::ENOENT);
    assert_eq!(errno(fs.lookup(a, b"x")), libc::ENOENT);

    // NOREPLACE and EXCHANGE.
    let (z, _) = fs.mknod(a, b"z", REG, 0, 0, 0).unwrap();
    assert_eq!(
        errno(fs.rename(a, b"z", b, b"y", RENAME_NOREPLACE)),
        libc::EEXIST
    );
    fs.rename(a, b"z", b, b"y", RENAME_EXCHANGE).unwrap();
    assert_eq!(fs.lookup(b, b"y").unwrap().0, z);
    assert_eq!(fs.lookup(a, b"z").unwrap().0, x);
    assert_eq!(
        errno(fs.rename(a, b"z", b, b"nope", RENAME_EXCHANGE)),
        libc::ENOENT
    );
    assert_eq!(
        errno(fs.rename(a, b"z", b, b"y", RENAME_EXCHANGE | RENAME_NOREPLACE)),
        libc::EINVAL
    );

    // Directories: moving updates "..", link counts, and may not go below itself.
    let (c, _) = fs.mknod(a, b"c", DIR, 0, 0, 0).unwrap();
    assert_eq!(fs.getattr(a).unwrap().nlink, 3);
    fs.rename(a, b"c", b, b"c", 0).unwrap();
    assert_eq!(fs.lookup(c, b"..").unwrap().0, b);
    assert_eq!(
        (fs.getattr(a).unwrap().nlink, fs.getattr(b).unwrap().nlink),
        (2, 3)
    );
    assert_eq!(errno(fs.rename(ROOT, b"b", c, b"inside", 0)), libc::EINVAL);
    assert_eq!(errno(fs.rename(ROOT, b"b", b, b"self", 0)), libc::EINVAL);
    // Directory over file and file over directory.
    assert_eq!(errno(fs.rename(b, b"c", b, b"y", 0)), libc::ENOTDIR);
    assert_eq!(errno(fs.rename(b, b"y", b, b"c", 0)), libc::EISDIR);
    // Directory over an empty directory, and over a non-empty one.
    let (e, _) = fs.mknod(a, b"e", DIR, 0, 0, 0).unwrap();
    fs.rename(b, b"c", a, b"e", 0).unwrap();
    assert_eq!(errno(fs.getattr(e)), libc::ENOENT);
    assert_eq!(fs.lookup(a, b"e").unwrap().0, c);
    fs.mknod(c, b"inner", REG, 0, 0, 0).unwrap();
    fs.mknod(b, b"full", DIR, 0, 0, 0).unwrap();
    assert_eq!(errno(fs.rename(b, b"full", a, b"e", 0)), libc::ENOTEMPTY);
    // Two names of one file: nothing happens.
    fs.link(x, a, b"x2").unwrap();
    fs.rename(a, b"x2", a, b"z", 0).unwrap();
    assert_eq!(fs.getattr(x).unwrap().nlink, 2);
}

#[test]
fn readdir_cookies_are_stable_under_concurrent_changes() {
    let (_dev, fs) = new_fs();
    let (d, _) = fs.mknod(ROOT, b"d", DIR, 0, 0, 0).unwrap();
    for i in 0..300 {
        fs.mknod(d, format!("f{i:04}").as_bytes(), REG, 0, 0, 0)
            .unwrap();
    }
    // Page through 17 entries at a time, creating and removing other
    // entries between pages: every entry that exists throughout appears
    // exactly once.
    let mut seen = BTreeMap::new();
    let mut cookie = 0;
    let mut round = 0;
    loop {
        let page = fs.readdir(d, cookie, 17).unwrap();
        if page.is_empty() {
            break;
        }
        for e in &page {
            *seen.entry(e.name.clone()).or_insert(0) += 1;
        }
        cookie = page.last().unwrap().cookie;
        fs.mknod(d, format!("new{round}").as_bytes(), REG, 0, 0, 0)
            .unwrap();
        fs.unlink(d, format!("new{round}").as_bytes()).unwrap();
        if round < 100 {
            fs.unlink(d, format!("f{:04}", 299 - round).as_bytes())
                .unwrap();
        }
        round += 1;
    }
    for i in 0..200 {
        assert_eq!(seen.get(format!("f{i:04}").as_bytes()), Some(&1), "f{i:04}");
    }
    assert!(seen.values().all(|n| *n == 1));
}

#[test]
fn ten_thousand_entries_in_one_directory() {
    let (_dev, fs) = new_fs();
    let (d, _) = fs.mknod(ROOT, b"big", DIR, 0, 0, 0).unwrap();
    for i in 0..10_000 {
        fs.mknod(d, format!("entry-{i}").as_bytes(), REG, 0, 0, 0)
            .unwrap();
    }
    for i in (0..10_000).step_by(997) {
        fs.lookup(d, format!("entry-{i}").as_bytes()).unwrap();
    }
    assert_eq!(fs.readdir(d, 0, usize::MAX).unwrap().len(), 10_002);
}

/// Random namespace operations against a model (paths to kinds), with
/// kills: every operation is atomic and they reach the log in order, so
/// after a kill the tree equals the model as of one of the operations
/// since the last commit (see `Fs::commit_pending`): a kill may lose
/// operations still pending, never part of one, never one out of order.
#[test]
fn random_operations_match_a_model_across_kills() {
    let (dev, fs) = new_fs();
    let mut dev = dev;
    let mut fs = fs;
    // Model: path (dirs only as parents) -> is_dir. Paths are "/a/b".
    let mut model: BTreeSet<(String, bool)> = BTreeSet::new();
    // The model after each operation since the last commit.
    let mut states = vec![model.clone()];
    let (mut lost_some, mut kept_all) = (0, 0);
    let mut rng = Rng(99);
    let pick_dir = |model: &BTreeSet<(String, bool)>, rng: &mut Rng| -> String {
        let dirs: Vec<&String> = model.iter().filter(|(_, d)| *d).map(|(p, _)| p).collect();
        if dirs.is_empty() || rng.below(3) == 0 {
            String::new()
        } else {
            dirs[rng.below(dirs.len() as u64) as usize].clone()
        }
    };
    let resolve = |fs: &Fs, path: &str| -> Ino {
        let mut ino = ROOT;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = fs.lookup(ino, part.as_bytes()).unwrap().0;
        }
        ino
    };
    for step in 0..1500 {
        let parent = pick_dir(&model, &mut rng);
        let name = format!("n{}", rng.below(12));
        let path = format!("{parent}/{name}");
        let exists = model.iter().find(|(p, _)| *p == path).cloned();
        let pino = resolve(&fs, &parent);
        match rng.below(5) {
            0 | 1 => {
                let dir = rng.below(2) == 0;
                let r = fs.mknod(pino, name.as_bytes(), if dir { DIR } else { REG }, 0, 0, 0);
                match exists {
                    Some(_) => assert_eq!(errno(r), libc::EEXIST),
                    None => {
                        r.unwrap();
                        model.insert((path, dir));
                    }
                }
            }
            2 => {
                let r = fs.unlink(pino, name.as_bytes());
                match exists {
                    None => assert_eq!(errno(r), libc::ENOENT),
                    Some((_, true)) => assert_eq!(errno(r), libc::EISDIR),
                    Some(e) => {
                        r.unwrap();
                        model.remove(&e);
                    }
                }
            }
            3 => {
                let r = fs.rmdir(pino, name.as_bytes());
                let has_children = model
                    .iter()
                    .any(|(p, _)| p.starts_with(&format!("{path}/")));
                match exists {
                    None => assert_eq!(errno(r), libc::ENOENT),
                    Some((_, false)) => assert_eq!(errno(r), libc::ENOTDIR),
                    Some(_) if has_children => assert_eq!(errno(r), libc::ENOTEMPTY),
                    Some(e) => {
                        r.unwrap();
                        model.remove(&e);
                    }
                }
            }
            _ => {
                // Rename a file to a new name in another directory, if both fit.
                let Some((src, false)) = exists else { continue };
                let to_parent = pick_dir(&model, &mut rng);
                let to = format!("{to_parent}/m{}", rng.below(12));
                if model.iter().any(|(p, _)| *p == to) {
                    continue;
                }
                let tino = resolve(&fs, &to_parent);
                fs.rename(
                    pino,
                    name.as_bytes(),
                    tino,
                    to.rsplit('/').next().unwrap().as_bytes(),
                    0,
                )
                .unwrap();
                model.remove(&(src, false));
                model.insert((to, false));
            }
        }
        states.push(model.clone());
        if step % 150 == 149 {
            // Half the kills come after every completed operation reached
            // the log (no checkpoint or flush after it); the others lose
            // what is still pending.
            if rng.below(2) == 0 {
                fs.commit_pending().unwrap();
                states = vec![model.clone()];
            }
            let img = dev.image();
            drop(fs);
            dev = Arc::new(MemDevice::from_image(img));
            fs = Fs::mount(open(dev.clone())).unwrap();
            // Collect the whole tree, with each directory's link count.
            let mut found = BTreeSet::new();
            let mut links = Vec::new();
            let mut stack = vec![(String::new(), ROOT)];
            while let Some((path, ino)) = stack.pop() {
                for e in fs.readdir(ino, 2, usize::MAX).unwrap() {
                    let p = format!("{path}/{}", String::from_utf8(e.name).unwrap());
                    let dir = e.kind == libc::S_IFDIR;
                    if dir {
                        links.push((p.clone(), fs.getattr(e.ino).unwrap().nlink));
                        stack.push((p.clone(), e.ino));
                    }
                    found.insert((p, dir));
                }
            }
            // Every operation is atomic and they reach the log in order:
            // the tree is the model as of one of the operations since the
            // last commit (all of them, after a commit).
            let Some(at) = states.iter().position(|m| *m == found) else {
                panic!("after remount at step {step}: the tree is no state the operations since the last commit passed through");
            };
            if at + 1 < states.len() {
                lost_some += 1;
            } else {
                kept_all += 1;
            }
            for (p, n) in links {
                let subdirs = found
                    .iter()
                    .filter(|(q, d)| *d && q.rsplit_once('/').unwrap().0 == p)
                    .count();
                assert_eq!(n as usize, 2 + subdirs, "{p}: link count");
            }
            model = found;
            states = vec![model.clone()];
            let report = fs.check().unwrap();
            assert!(
                report.problems.is_empty(),
                "step {step}: {:?}",
                report.problems
            );
        }
    }
    assert!(
        lost_some > 0 && kept_all > 0,
        "kills that lost pending operations: {lost_some}; that kept all: {kept_all}"
    );
}
