//! `lsvfs snapshot export`, `lsvfs export verify|show`, `lsvfs restore` and
//! `lsvfs recipient keygen`: snapshots as portable, encrypted, incremental
//! files (the stream format is in docs/FORMAT.md, "Export stream").

use std::fs::File;
use std::io::{BufReader, BufWriter, IsTerminal, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::common::{human, open_device, open_volume, progress_bar, refuse_restoring, Env};
use super::control::{self, ExportEntry};
use super::objects::{Bucket, ObjectWriter, S3Url};
use super::volumes::{make_volume, Keying};
use super::Error;
use crate::crypto::{Kek, VolumeKeys};
use crate::export::{
    self, ExportError, Header, Holders, Identity, Kind, RecipientKey, Stream, Summary,
};
use crate::keys;
use crate::volume::{self, Volume};

/// `lsvfs recipient keygen KEYFILE`.
pub fn recipient_keygen(path: &Path) -> Result<(), Error> {
    let id = Identity::generate(path)?;
    let public = id.public().to_string();
    let pubfile = PathBuf::from(format!("{}.pub", path.display()));
    std::fs::write(&pubfile, format!("{public}\n"))
        .map_err(|e| Error::io(format!("writing {}", pubfile.display()), e))?;
    println!("{public}");
    eprintln!(
        "wrote the identity {} (mode 0600; it opens every export made for it: keep it safe) \
         and its public key {} (give that to `lsvfs snapshot export --recipient`)",
        path.display(),
        pubfile.display()
    );
    Ok(())
}

/// A progress bar on a terminal (stderr), nothing otherwise.
fn bar(what: &'static str, total: u64, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    Some(progress_bar(
        what,
        total,
        "[{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}, {eta} left",
    ))
}

/// Where an export goes: standard output, a FIFO or character device
/// named by -o, or a file written under a temporary name and renamed into
/// place once complete (so an interrupted export never leaves a file by
/// the name asked for).
enum Output {
    Stdout,
    /// An existing FIFO or character device (`-o /dev/null`, `-o
    /// ./pipe`): written as it is, like standard output.
    Stream {
        path: PathBuf,
        file: File,
    },
    File {
        tmp: PathBuf,
        path: PathBuf,
        file: File,
    },
    /// A multipart upload: the object exists once it is completed.
    Object {
        url: S3Url,
        writer: ObjectWriter,
    },
}

impl Output {
    /// `snapshot`: the object's name under an s3:// prefix.
    fn open(to: &str, snapshot: &str) -> Result<Output, Error> {
        if to == "-" {
            if std::io::stdout().is_terminal() {
                return Err(Error::Usage(
                    "refusing to write an export to a terminal; redirect it (-o - > FILE, or a \
                     pipe) or give -o FILE"
                        .into(),
                ));
            }
            return Ok(Output::Stdout);
        }
        if let Some(url) = S3Url::parse(to) {
            let url = url?.object_for(snapshot);
            let bucket = Bucket::open(&url.bucket)?;
            if bucket.exists(&url.key)? {
                return Err(Error::Usage(format!(
                    "{url} exists; delete it or choose another prefix"
                )));
            }
            let writer = bucket.writer(&url.key)?;
            return Ok(Output::Object { url, writer });
        }
        let path = PathBuf::from(to);
        if let Some(file) = Output::stream(&path)? {
            return Ok(Output::Stream { path, file });
        }
        if path.symlink_metadata().is_ok() {
            return Err(Error::Usage(format!(
                "{} exists; remove it or choose another name",
                path.display()
            )));
        }
        let tmp = PathBuf::from(format!("{to}.partial"));
        // One left by an export that was killed goes (the name itself, if it
        // is a symlink); the new one is made afresh, never through a link.
        if tmp.symlink_metadata().is_ok() {
            std::fs::remove_file(&tmp)
                .map_err(|e| Error::io(format!("removing the stale {}", tmp.display()), e))?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        Ok(Output::File { tmp, path, file })
    }

    /// `path` opened for writing if it is a FIFO or a character device
    /// (through symlinks, as /dev/stdout is) that root or this user owns;
    /// None if it is nothing, or a regular file (refused by the caller).
    /// A FIFO with no reader yet is waited for, saying so.
    fn stream(path: &Path) -> Result<Option<File>, Error> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let Ok(named) = path.metadata() else {
            return Ok(None);
        };
        let stream =
            |m: &std::fs::Metadata| m.file_type().is_fifo() || m.file_type().is_char_device();
        if !stream(&named) {
            return Ok(None);
        }
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        // A pipe without a name (/dev/stdout, /dev/fd/N, a shell's <(...))
        // belongs to whoever made it, `sudo`'s caller say; only a named
        // FIFO or device can have been put in the way by another user.
        let pipefs = nix::sys::statfs::FsType(0x5049_5045);
        let unnamed = |st: nix::Result<nix::sys::statfs::Statfs>| {
            st.is_ok_and(|st| st.filesystem_type() == pipefs)
        };
        let name_is_a_pipe = unnamed(nix::sys::statfs::statfs(path));
        let foreign =
            |m: &std::fs::Metadata, unnamed: bool| !unnamed && m.uid() != 0 && m.uid() != me;
        let refuse = || {
            Error::Usage(format!(
                "{} is a FIFO or device another user owns, or changed under the export; \
                 give -o a new FILE, or - and a pipe",
                path.display()
            ))
        };
        if foreign(&named, name_is_a_pipe) {
            return Err(refuse());
        }
        let open = |flags| {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(flags)
                .open(path)
        };
        let file = match open(libc::O_NONBLOCK) {
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && named.file_type().is_fifo() => {
                eprintln!("lsvfs: waiting for a reader on {}", path.display());
                open(0)
            }
            r => r,
        }
        .map_err(|e| Error::io(format!("opening {} to write the export", path.display()), e))?;
        // What was opened, not what the name said a moment before.
        let m = file
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        if !stream(&m) || foreign(&m, unnamed(nix::sys::statfs::fstatfs(&file))) {
            return Err(refuse());
        }
        if file.is_terminal() {
            return Err(Error::Usage(format!(
                "refusing to write an export to a terminal ({}); give -o FILE, or a pipe",
                path.display()
            )));
        }
        // Blocking writes from here on.
        let blocking = |file: &File| -> nix::Result<()> {
            use nix::fcntl::{fcntl, FcntlArg, OFlag};
            let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL)?);
            fcntl(file, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)).map(|_| ())
        };
        blocking(&file)
            .map_err(|e| Error::io(format!("setting up {}", path.display()), e.into()))?;
        Ok(Some(file))
    }

    fn name(&self) -> String {
        match self {
            Output::Stdout => "standard output".into(),
            Output::Stream { path, .. } => path.display().to_string(),
            Output::File { path, .. } => path.display().to_string(),
            Output::Object { url, .. } => url.to_string(),
        }
    }

    /// Makes the written export durable and gives it its name.
    fn finish(self) -> Result<(), Error> {
        if let Output::Object { writer, .. } = self {
            return writer.finish();
        }
        if let Output::File { tmp, path, file } = self {
            file.sync_all()
                .map_err(|e| Error::io(format!("syncing {}", tmp.display()), e))?;
            rename_noreplace(&tmp, &path)
                .map_err(|e| Error::io(format!("renaming {} into place", tmp.display()), e))?;
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// A full disk under an export file, said as such: which file, and what
    /// to do. Other errors as they are. (An export a mount runs reports its
    /// failure by errno, so the errno is what tells.)
    fn explain(&self, e: Error) -> Error {
        match self {
            Output::File { path, .. } if e.class().errno() == libc::ENOSPC => Error::Reported {
                class: e.class(),
                message: format!(
                    "{}: no space left on its file system ({e}); the partial export is \
                         removed: free space there, or export elsewhere (another -o FILE, -o - \
                         into a pipe, or an s3:// prefix)",
                    path.display()
                ),
            },
            _ => e,
        }
    }

    fn abandon(self) {
        match self {
            Output::File { tmp, .. } => {
                let _ = std::fs::remove_file(tmp);
            }
            Output::Object { writer, .. } => writer.abort(),
            Output::Stdout | Output::Stream { .. } => {}
        }
    }
}

/// rename(2) that fails (EEXIST) rather than replace what appeared at `to`
/// meanwhile.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The options of `lsvfs snapshot export`.
pub(super) struct ExportArgs {
    pub source: PathBuf,
    pub name: String,
    pub since: Option<String>,
    pub recipients: Vec<PathBuf>,
    pub key_files: Vec<PathBuf>,
    pub output: String,
    pub json: bool,
}

/// `lsvfs snapshot export SOURCE NAME [--since BASE] [--recipient PUBFILE]...
/// [--key-file K]... -o FILE|-`.
pub(super) fn snapshot_export(env: &Env, a: ExportArgs) -> Result<(), Error> {
    let recipients: Vec<RecipientKey> = a
        .recipients
        .iter()
        .map(|p| RecipientKey::read(p))
        .collect::<Result<_, _>>()?;
    if recipients.is_empty() && a.key_files.is_empty() {
        tracing::warn!(
            "only whoever can unlock the source volume (this host, through its sealed store and \
             the volume's key servers) can open this export; for one another host can restore, \
             add --recipient PUBFILE (see `lsvfs recipient keygen`) or --key-file KEYFILE"
        );
    }
    // A mounted volume named by its path is exported through its mount.
    let mut a = a;
    a.source = super::mounts::mount_or_self(&a.source);
    let mounted = a.source.is_dir();
    let mut out = Output::open(&a.output, &a.name)?;
    let started = Instant::now();
    let r = if mounted {
        export_mounted(&a, &recipients, &mut out)
    } else {
        export_unmounted(env, &a, recipients, &mut out)
    };
    let entry = match r {
        Ok(e) => e,
        Err(e) => {
            let e = out.explain(e);
            out.abandon();
            return Err(e);
        }
    };
    let to = out.name();
    out.finish()?;
    report_export(&entry, &a.source, &to, started, a.json)
}

fn export_mounted(
    a: &ExportArgs,
    recipients: &[RecipientKey],
    out: &mut Output,
) -> Result<ExportEntry, Error> {
    let key_files = a
        .key_files
        .iter()
        .map(|k| {
            std::fs::canonicalize(k).map_err(|e| Error::io(format!("resolving {}", k.display()), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let req = control::Request::Export {
        name: a.name.clone(),
        since: a.since.clone(),
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        key_files,
    };
    let stdout = std::io::stdout();
    let r = match out {
        Output::Stdout => control::request_with(&a.source, &req, Some(stdout.as_fd()))?,
        Output::File { file, .. } | Output::Stream { file, .. } => {
            control::request_with(&a.source, &req, Some(file.as_fd()))?
        }
        Output::Object { writer, .. } => {
            // The mount writes into a pipe; this process uploads what comes
            // out of it.
            let (rd, wr) = nix::unistd::pipe().map_err(|e| Error::io("making a pipe", e.into()))?;
            std::thread::scope(|s| {
                let pump = s.spawn(move || std::io::copy(&mut File::from(rd), writer));
                let r = control::request_with(&a.source, &req, Some(wr.as_fd()));
                drop(wr);
                let copied = pump.join();
                let r = r?;
                match copied {
                    Ok(Ok(_)) => Ok(r),
                    Ok(Err(e)) if r.ok => Err(Error::io("uploading the export", e)),
                    _ => Ok(r),
                }
            })?
        }
    };
    if !r.ok {
        return Err(Error::Reported {
            class: crate::error::Class::Errno(r.errno.unwrap_or(libc::EIO)),
            message: r.error.unwrap_or_else(|| "the mount refused".into()),
        });
    }
    r.export
        .ok_or_else(|| Error::Usage("the mount's answer holds no export summary".into()))
}

fn export_unmounted(
    env: &Env,
    a: &ExportArgs,
    recipients: Vec<RecipientKey>,
    out: &mut Output,
) -> Result<ExportEntry, Error> {
    let key_files: Vec<Kek> = a
        .key_files
        .iter()
        .map(|k| keys::read_key_file(k))
        .collect::<Result<_, _>>()?;
    // Opened with the first key file if one is given, else with this
    // host's sealed store and key server; read-only, nothing is written.
    let v = open_volume(
        &a.source,
        &env.keys(a.key_files.first().cloned()),
        true,
        &env.tuning,
    )?;
    let holders = Holders {
        recipients,
        key_files,
    };
    let quiet = a.json;
    let mut progress: Option<indicatif::ProgressBar> = None;
    let mut tick = |done: u64, total: u64| -> export::Result<()> {
        let b = progress.get_or_insert_with(|| {
            bar("exporting", total * crate::BLOCK_SIZE as u64, quiet)
                .unwrap_or_else(indicatif::ProgressBar::hidden)
        });
        b.set_position(done * crate::BLOCK_SIZE as u64);
        Ok(())
    };
    let mut run = |w: &mut dyn std::io::Write| {
        export::export(
            &v,
            &a.name,
            a.since.as_deref(),
            &holders,
            export::READERS,
            w,
            &mut tick,
        )
    };
    let s: Summary = match out {
        Output::Stdout => run(&mut BufWriter::with_capacity(
            1 << 20,
            std::io::stdout().lock(),
        ))?,
        Output::File { file, .. } => run(&mut BufWriter::with_capacity(
            1 << 20,
            super::common::WriteBehind::new(file),
        ))?,
        Output::Stream { file, .. } => run(&mut BufWriter::with_capacity(1 << 20, &*file))?,
        Output::Object { writer, .. } => run(writer)?,
    };
    if let Some(b) = progress {
        b.finish_and_clear();
    }
    Ok(ExportEntry::of(&s))
}

fn report_export(
    e: &ExportEntry,
    source: &Path,
    to: &str,
    started: Instant,
    json: bool,
) -> Result<(), Error> {
    let secs = started.elapsed().as_secs_f64();
    if json {
        let mut v = serde_json::to_value(e).map_err(|e| Error::Usage(e.to_string()))?;
        v["output"] = to.into();
        v["seconds"] = secs.into();
        eprintln!("{v}");
        return Ok(());
    }
    let what = match &e.base {
        Some(b) => format!("snapshot {} as an increment over {b}", e.snapshot),
        None => format!("snapshot {} (full)", e.snapshot),
    };
    eprintln!(
        "exported {what} of {} to {to}: {} ({} data, {} zero, {} trimmed blocks) in {secs:.1} s, \
         {}/s; blake3 {}",
        source.display(),
        human(e.bytes),
        e.data_blocks,
        e.zero_blocks,
        e.trim_blocks,
        human((e.bytes as f64 / secs.max(1e-3)) as u64),
        e.hash
    );
    Ok(())
}

/// One export to read: one that can be read only once (standard input,
/// a FIFO, a pipe's /dev/fd path: its header is kept with the stream), a
/// file, or an object.
enum Input {
    Once {
        /// None: standard input.
        path: Option<PathBuf>,
        kept: Option<Box<Stream<Box<dyn Read + Send>>>>,
    },
    File(String),
    Object(Arc<Bucket>, S3Url),
}

impl Input {
    /// `name` as the command line gives it: `-`, or a file of any kind.
    fn local(name: &str) -> Input {
        use std::os::unix::fs::FileTypeExt;
        if name == "-" {
            return Input::Once {
                path: None,
                kept: None,
            };
        }
        let t = std::fs::metadata(name).map(|m| m.file_type());
        match t {
            Ok(t) if t.is_fifo() || t.is_char_device() => Input::Once {
                path: Some(PathBuf::from(name)),
                kept: None,
            },
            _ => Input::File(name.to_string()),
        }
    }

    fn name(&self) -> String {
        match self {
            Input::Once { path: None, .. } => "standard input".into(),
            Input::Once { path: Some(p), .. } => p.display().to_string(),
            Input::File(f) => f.clone(),
            Input::Object(_, u) => u.to_string(),
        }
    }

    /// The whole stream, from its start.
    fn stream(&mut self) -> Result<Stream<Box<dyn Read + Send>>, Error> {
        let name = self.name();
        match self {
            Input::Once { kept, .. } if kept.is_some() => {
                Ok(*kept.take().expect("checked just before"))
            }
            Input::Once { path, .. } => {
                let r: Box<dyn Read + Send> = match path {
                    None => Box::new(BufReader::with_capacity(1 << 20, std::io::stdin())),
                    Some(p) => {
                        let file = File::open(&*p)
                            .map_err(|e| Error::io(format!("opening {}", p.display()), e))?;
                        Box::new(BufReader::with_capacity(1 << 20, file))
                    }
                };
                Ok(Stream::open(r, &name)?)
            }
            Input::File(f) => {
                let file = File::open(&*f).map_err(|e| Error::io(format!("opening {f}"), e))?;
                let r: Box<dyn Read + Send> = Box::new(BufReader::with_capacity(1 << 20, file));
                Ok(Stream::open(r, &name)?)
            }
            Input::Object(b, u) => {
                let r: Box<dyn Read + Send> =
                    Box::new(BufReader::with_capacity(1 << 20, b.reader(&u.key)?));
                Ok(Stream::open(r, &name)?)
            }
        }
    }

    /// The header alone (an object's first bytes; one that can be read
    /// only once is kept open for [`Input::stream`]).
    fn header(&mut self) -> Result<Header, Error> {
        let name = self.name();
        match self {
            Input::Once { .. } => {
                let s = self.stream()?;
                let h = s.header().clone();
                if let Input::Once { kept, .. } = self {
                    *kept = Some(Box::new(s));
                }
                Ok(h)
            }
            Input::File(_) => Ok(self.stream()?.header().clone()),
            Input::Object(b, u) => {
                let bytes = b.head_bytes(&u.key)?;
                Ok(Stream::open(&bytes[..], &name)?.header().clone())
            }
        }
    }
}

/// The exports the command line names, each with its header: `-`, files,
/// `s3://BUCKET/KEY.lsx` objects, and `s3://BUCKET/PREFIX` for every
/// export under the prefix, in chain order.
fn inputs(names: &[String]) -> Result<Vec<(Input, Header)>, Error> {
    if names.len() > 1 && names.iter().any(|f| f == "-") {
        return Err(Error::Usage(
            "standard input (-) can only be read alone".into(),
        ));
    }
    let mut out = Vec::new();
    for n in names {
        let Some(url) = S3Url::parse(n) else {
            let mut i = Input::local(n);
            let h = i.header()?;
            out.push((i, h));
            continue;
        };
        let url = url?;
        let bucket = Arc::new(Bucket::open(&url.bucket)?);
        if url.is_object() {
            let mut i = Input::Object(bucket, url);
            let h = i.header()?;
            out.push((i, h));
            continue;
        }
        let mut found = Vec::new();
        for key in bucket.list(&url.key)? {
            let u = S3Url {
                bucket: url.bucket.clone(),
                key,
            };
            let mut i = Input::Object(bucket.clone(), u);
            let h = i.header()?;
            found.push((i, h));
        }
        if found.is_empty() {
            return Err(Error::Usage(format!("no exports (*.lsx) under {n}")));
        }
        out.extend(chain_order(n, found)?);
    }
    Ok(out)
}

/// The exports found under one prefix, put in chain order: the one whose
/// base is none of theirs first, then each increment over the one before.
fn chain_order(
    prefix: &str,
    mut items: Vec<(Input, Header)>,
) -> Result<Vec<(Input, Header)>, ExportError> {
    let links: Vec<[u8; 32]> = items.iter().map(|(_, h)| h.snapshot_link()).collect();
    let starts: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].1.base_link().is_none_or(|b| !links.contains(&b)))
        .collect();
    let names = |ix: &[usize], items: &[(Input, Header)]| {
        ix.iter()
            .map(|&i| items[i].0.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if starts.len() != 1 {
        return Err(ExportError::Chain(format!(
            "{prefix} holds {} exports that each start a chain ({}): keep one chain per prefix, \
             or name the objects",
            starts.len(),
            names(&starts, &items)
        )));
    }
    let mut order = vec![items.remove(starts[0])];
    loop {
        let last = order[order.len() - 1].1.snapshot_link();
        let next: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].1.base_link() == Some(last))
            .collect();
        match next.len() {
            0 => break,
            1 => order.push(items.remove(next[0])),
            _ => {
                return Err(ExportError::Chain(format!(
                    "{prefix}: {} are increments over the same snapshot; keep one of them",
                    names(&next, &items)
                )))
            }
        }
    }
    if !items.is_empty() {
        let rest: Vec<usize> = (0..items.len()).collect();
        return Err(ExportError::Chain(format!(
            "{prefix}: {} do not continue the chain that starts at {}",
            names(&rest, &items),
            order[0].0.name()
        )));
    }
    Ok(order)
}

/// Checks that `headers` (in the order given) form a chain: each one an
/// increment over the snapshot of the one before, all of one volume.
fn check_chain(headers: &[(String, Header)]) -> Result<(), ExportError> {
    for w in headers.windows(2) {
        let ((pn, prev), (n, h)) = (&w[0], &w[1]);
        if h.volume_id != prev.volume_id {
            return Err(ExportError::Chain(format!(
                "{n} is from volume {}, {pn} from volume {}: a foreign link; give one volume's \
                 exports only",
                keys::hex(&h.volume_id),
                keys::hex(&prev.volume_id)
            )));
        }
        if h.source_key != prev.source_key {
            return Err(ExportError::Chain(format!(
                "{n} is signed by source key {}, {pn} by {}: a foreign link (not written by \
                 the volume that wrote the rest of the chain)",
                keys::hex(&h.source_key),
                keys::hex(&prev.source_key)
            )));
        }
        if h.logical_blocks != prev.logical_blocks {
            return Err(ExportError::Chain(format!(
                "{n} records a volume of {} blocks, {pn} one of {}: the links of one volume's \
                 chain all record its size, so one of them is not of this chain (or its header \
                 is damaged); give one chain's exports only",
                h.logical_blocks, prev.logical_blocks
            )));
        }
        let Some(base) = &h.base else {
            return Err(ExportError::Chain(format!(
                "{n} is a full export, so it cannot follow {pn}; restore it on its own, or give \
                 the chain oldest first: one full export, then its increments"
            )));
        };
        if h.base_link() != Some(prev.snapshot_link()) {
            let later = headers
                .iter()
                .find(|(_, x)| Some(x.snapshot_link()) == h.base_link())
                .map(|(x, _)| x.clone());
            return Err(ExportError::Chain(match later {
                Some(x) => format!(
                    "{n} applies over snapshot {} ({x}), not over {} ({pn}): the files are out \
                     of order; give them oldest first",
                    base.name, prev.snapshot.name
                ),
                None => format!(
                    "{n} applies over snapshot {}, but {pn} holds snapshot {}: the export of {} \
                     (or of the snapshots between) is missing from the chain",
                    base.name, prev.snapshot.name, base.name
                ),
            }));
        }
    }
    Ok(())
}

/// `lsvfs export verify FILE...`: each file complete and intact (its
/// trailer's hash), and the files a chain in the order given (an s3://
/// prefix: the chain under it). No key.
pub fn verify(files: &[String], json: bool) -> Result<(), Error> {
    let mut headers = Vec::new();
    for (mut input, _) in inputs(files)? {
        let f = input.name();
        let s = input.stream()?;
        let h = s.header().clone();
        let (t, bytes) = s.verify()?;
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "file": f, "snapshot": h.snapshot.name,
                    "base": h.base.as_ref().map(|b| b.name.clone()),
                    "bytes": bytes, "hash": keys::hex(&t.hash),
                    "signed_by": keys::hex(&h.source_key), "ok": true,
                })
            );
        } else {
            // Anyone can sign an export: the signer says who wrote it.
            println!(
                "{f}: intact and complete: {} of {} ({}), blake3 {}, signed by {}",
                match &h.base {
                    Some(b) => format!("increment {} -> {}", b.name, h.snapshot.name),
                    None => format!("full export of {}", h.snapshot.name),
                },
                keys::hex(&h.volume_id),
                human(bytes),
                keys::hex(&t.hash),
                keys::hex(&h.source_key)
            );
        }
        headers.push((f, h));
    }
    check_chain(&headers)?;
    if headers.len() > 1 && !json {
        println!(
            "chain: {} exports, each linked to the one before",
            headers.len()
        );
    }
    Ok(())
}

/// `lsvfs export show FILE`: what the header says, and the trailer after a
/// keyless check of the whole file.
pub fn show(file: &str, json: bool) -> Result<(), Error> {
    let mut found = inputs(&[file.to_string()])?;
    if found.len() != 1 {
        return Err(Error::Usage(format!(
            "{file} holds {} exports; show one object (s3://BUCKET/KEY.lsx)",
            found.len()
        )));
    }
    let s = found[0].0.stream()?;
    let h = s.header().clone();
    let (t, bytes) = s.verify()?;
    let time = |sec: i64, nsec: u32| format!("{} (+{nsec} ns)", super::snapshot::utc(sec));
    let holders: Vec<String> = h.slots.iter().map(export::describe_slot).collect();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "file": file,
                "version": h.version,
                "chunk_cipher": h.chunk_aead().name(),
                "kind": if h.kind == Kind::Full { "full" } else { "increment" },
                "export_id": keys::hex(&h.export_id),
                "volume": keys::hex(&h.volume_id),
                "logical_bytes": h.logical_blocks * crate::BLOCK_SIZE as u64,
                "snapshot": h.snapshot.name, "snapshot_id": h.snapshot.id,
                "created": h.snapshot.created_sec,
                "base": h.base.as_ref().map(|b| b.name.clone()),
                "link": keys::hex(&h.snapshot_link()),
                "base_link": h.base_link().map(|l| keys::hex(&l)),
                "holders": holders,
                "bytes": bytes, "chunks": t.chunks, "data_blocks": t.data_blocks,
                "zero_blocks": t.zero_blocks, "trim_blocks": t.trim_blocks,
                "hash": keys::hex(&t.hash),
            })
        );
        return Ok(());
    }
    println!("file:            {file}");
    println!(
        "format version:  {} (chunks sealed with {})",
        h.version,
        h.chunk_aead().name()
    );
    println!(
        "kind:            {}",
        match &h.base {
            Some(b) => format!("increment over snapshot {} (id {})", b.name, b.id),
            None => "full".into(),
        }
    );
    println!("volume:          {}", keys::hex(&h.volume_id));
    println!(
        "volume size:     {}",
        human(h.logical_blocks * crate::BLOCK_SIZE as u64)
    );
    println!(
        "snapshot:        {} (id {}), taken {}",
        h.snapshot.name,
        h.snapshot.id,
        time(h.snapshot.created_sec, h.snapshot.created_nsec)
    );
    if let Some(b) = &h.base {
        println!(
            "base:            {} (id {}), taken {}",
            b.name,
            b.id,
            time(b.created_sec, b.created_nsec)
        );
    }
    println!("link:            {}", keys::hex(&h.snapshot_link()));
    if let Some(l) = h.base_link() {
        println!("base link:       {}", keys::hex(&l));
    }
    println!("export id:       {}", keys::hex(&h.export_id));
    println!(
        "signed by:       {} (the source volume's export key; pin it with restore --source-key)",
        keys::hex(&h.source_key)
    );
    for d in &holders {
        println!("opens for:       {d}");
    }
    println!(
        "size:            {} in {} chunks: {} data, {} zero, {} trimmed blocks",
        human(bytes),
        t.chunks,
        t.data_blocks,
        t.zero_blocks,
        t.trim_blocks
    );
    println!("blake3:          {}", keys::hex(&t.hash));
    Ok(())
}

/// The options of `lsvfs restore`.
pub(super) struct RestoreArgs {
    pub files: Vec<String>,
    pub to: PathBuf,
    pub keying: Keying,
    pub identities: Vec<PathBuf>,
    /// The source volume's export signing key (hex) every export must carry.
    pub source_key: Option<String>,
    pub incremental: bool,
    pub rollback: bool,
    pub segment_blocks: u32,
    pub json: bool,
}

/// `lsvfs restore FILE... --to VOLUME ...` and `lsvfs restore --incremental
/// FILE --to VOLUME`.
pub(super) fn restore(env: &Env, a: RestoreArgs) -> Result<(), Error> {
    if a.files.is_empty() {
        return Err(Error::Usage("give at least one export file".into()));
    }
    let identities: Vec<Identity> = a
        .identities
        .iter()
        .map(|p| Identity::read(p))
        .collect::<Result<_, _>>()?;
    let key_files: Vec<Kek> = a
        .keying
        .key_file
        .iter()
        .map(|k| keys::read_key_file(k))
        .collect::<Result<_, _>>()?;
    // Every header first: the chain is checked, and every export's key
    // found, before anything is written.
    let found = inputs(&a.files)?;
    let headers: Vec<(String, Header)> = found.iter().map(|(i, h)| (i.name(), h.clone())).collect();
    check_chain(&headers)?;
    let source = &headers[0].1.source_key;
    match &a.source_key {
        Some(pin) if !pin.eq_ignore_ascii_case(&keys::hex(source)) => {
            return Err(ExportError::Chain(format!(
                "{} is signed by source key {}, not by the --source-key given ({pin}): it was \
                 not written by the volume you expect",
                headers[0].0,
                keys::hex(source)
            ))
            .into());
        }
        Some(_) => {}
        None if !a.json => eprintln!(
            "the exports are signed by source key {}; to refuse any other next time, pass \
             --source-key {}",
            keys::hex(source),
            keys::hex(source)
        ),
        None => {}
    }
    let mut opened = Vec::new();
    for (input, h) in found {
        let key = export_key(env, &h, &input.name(), &identities, &key_files)?;
        opened.push((input, h, key));
    }
    let started = Instant::now();
    let mut applied = 0u64;
    if a.incremental {
        restore_incremental(env, &a, opened, &mut applied)?;
    } else {
        let (first_name, first) = &headers[0];
        if first.kind != Kind::Full {
            return Err(ExportError::Chain(format!(
                "{first_name} is an increment over snapshot {}: a restore into a new volume \
                 starts with a full export; give the chain's full export first (or use \
                 --incremental to apply it to a volume that holds {})",
                first.base.as_ref().map_or("?", |b| b.name.as_str()),
                first.base.as_ref().map_or("?", |b| b.name.as_str())
            ))
            .into());
        }
        let total = total_blocks(&headers);
        let mut progress = bar("restoring", total, a.json);
        let mut opened = Some(opened);
        make_volume(
            env,
            &a.to,
            first.logical_blocks,
            &a.keying,
            a.segment_blocks,
            Some(volume::RestoredFrom {
                volume_id: first.volume_id,
                source_key: first.source_key,
            }),
            &mut |v| {
                for (input, h, key) in opened.take().unwrap_or_default() {
                    apply(v, input, &h, &key, &mut applied, &mut progress)?;
                }
                Ok(())
            },
        )?;
        if let Some(b) = progress {
            b.finish_and_clear();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let newest = &headers[headers.len() - 1].1.snapshot.name;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "volume": a.to.display().to_string(), "exports": headers.len(),
                "snapshots": headers.iter().map(|(_, h)| h.snapshot.name.clone()).collect::<Vec<_>>(),
                "blocks": applied, "seconds": secs,
            })
        );
    } else {
        eprintln!(
            "restored {} export(s) into {} in {secs:.1} s ({} blocks); its snapshots: {}; its \
             live tree is {newest}",
            headers.len(),
            a.to.display(),
            applied,
            headers
                .iter()
                .map(|(_, h)| h.snapshot.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// The key of an export: from an identity or a key file given, else,
/// through its volume slot, by unlocking its source volume with this host's
/// sealed store and that volume's key servers (the host that exported it,
/// while the key servers still release the volume's key to it).
fn export_key(
    env: &Env,
    h: &Header,
    name: &str,
    identities: &[Identity],
    key_files: &[Kek],
) -> Result<export::ExportKey, Error> {
    let refused = match export::open_key(h, name, identities, key_files, None) {
        Ok(k) => return Ok(k),
        Err(e) => e,
    };
    let Some(key_check) = export::volume_slot_check(&h.slots) else {
        return Err(refused.into());
    };
    let sealed = keys::SealedStore::exists(&env.store)
        && keys::SealedStore::open(&env.store).is_ok_and(|s| s.entry(&h.volume_id).is_some());
    if !sealed {
        return Err(refused.into());
    }
    let (master, _, _) =
        keys::unlock_volume_id(&env.store, &env.server, &h.volume_id, &key_check, false)?;
    lsvfs_keyserver::secret::scrub_stack();
    let volume = VolumeKeys::derive(&master, &h.volume_id);
    drop(master);
    Ok(export::open_key(
        h,
        name,
        identities,
        key_files,
        Some(&volume),
    )?)
}

/// Blocks of data the exports announce (an estimate for the progress bar:
/// the exact counts are in the trailers, at the end).
fn total_blocks(headers: &[(String, Header)]) -> u64 {
    headers
        .iter()
        .map(|(_, h)| h.logical_blocks)
        .max()
        .unwrap_or(0)
        * crate::BLOCK_SIZE as u64
}

/// One export applied to `v`: its stream opened (again) and checked to be
/// the export whose header was read first.
fn apply(
    v: &Volume,
    mut input: Input,
    header: &Header,
    key: &export::ExportKey,
    applied: &mut u64,
    progress: &mut Option<indicatif::ProgressBar>,
) -> Result<(), Error> {
    let base = *applied;
    let s = input.stream()?;
    if s.header() != header {
        return Err(ExportError::Chain(format!(
            "{} changed while the restore ran (its header is not the one checked first)",
            input.name()
        ))
        .into());
    }
    let name = s.header().snapshot.name.clone();
    if let Some(b) = progress {
        b.set_message(format!("restoring {name}"));
    }
    let (_, t) = export::restore_stream(v, s, key, &mut |n| {
        if let Some(b) = progress {
            b.set_position((base + n) * crate::BLOCK_SIZE as u64);
        }
    })?;
    *applied += t.data_blocks + t.zero_blocks + t.trim_blocks;
    Ok(())
}

/// An increment applies only to a volume restored from the volume that
/// wrote it: its header records that volume's id and export signing key
/// (the base snapshot's name and time alone are in any export's clear
/// header, so another volume's increment could claim them). A volume
/// restored by a release from before the record has none: then only an
/// increment whose signer `--source-key` pins is applied.
fn check_source(
    target: &volume::Header,
    path: &Path,
    name: &str,
    inc: &Header,
    pinned: bool,
) -> Result<(), Error> {
    let Some(from) = &target.restored_from else {
        if pinned {
            return Ok(());
        }
        return Err(ExportError::Chain(format!(
            "{} does not record which volume it was restored from (an older lsvfs restored \
             it), so {name} cannot be checked as a link of its chain: pass --source-key {} if \
             that is the key of the volume it came from",
            path.display(),
            keys::hex(&inc.source_key)
        ))
        .into());
    };
    if from.volume_id != inc.volume_id {
        let source = keys::hex(&from.volume_id);
        return Err(ExportError::Chain(format!(
            "{name} is an increment of volume {}, but {} was restored from volume {source}: it \
             is not a link of that volume's chain; apply the increments of {source} (or \
             restore this chain into a new volume)",
            keys::hex(&inc.volume_id),
            path.display(),
        ))
        .into());
    }
    if from.source_key != inc.source_key {
        return Err(ExportError::Chain(format!(
            "{name} is signed by source key {}, but {} was restored from exports signed by {}: \
             it was not written by the volume it claims; it is refused",
            keys::hex(&inc.source_key),
            path.display(),
            keys::hex(&from.source_key)
        ))
        .into());
    }
    Ok(())
}

fn restore_incremental(
    env: &Env,
    a: &RestoreArgs,
    opened: Vec<(Input, Header, export::ExportKey)>,
    applied: &mut u64,
) -> Result<(), Error> {
    let path = &a.to;
    let first = opened[0].1.clone();
    let (first_name, base) = match &first.base {
        Some(b) => (opened[0].0.name(), b.clone()),
        None => {
            return Err(Error::Usage(format!(
                "{} is a full export: --incremental applies increments; restore a full export \
                 into a new volume (without --incremental)",
                opened[0].0.name()
            )))
        }
    };
    let dev = open_device(path, true)?;
    let header = volume::read_header(&*dev).map_err(|e| super::common::with_path(e, path))?;
    // An increment whose restore was interrupted leaves the volume flagged;
    // --rollback puts it back to its newest snapshot and applies again.
    let resuming = header.restoring && a.rollback;
    if !resuming {
        refuse_restoring(&header, path)?;
    }
    check_source(&header, path, &first_name, &first, a.source_key.is_some())?;
    let k = env.keys(a.keying.key_file.clone());
    let master = k.master(&header, path)?;
    // An older copy of the volume put back is refused, as a mount refuses it.
    let seen = k.newest_seen(&header.volume_id)?;
    let opts = |restoring| volume::Options {
        restoring,
        newest_seen: seen,
        background: false,
        crypto_threads: env.tuning.crypto_threads,
        chunk_bytes: env.tuning.chunk_bytes,
        ..volume::Options::default()
    };
    // The target must hold the base as its newest snapshot, unchanged since.
    {
        let v = Volume::open(dev.clone(), &master, opts(resuming))?;
        if v.logical_blocks() != first.logical_blocks {
            return Err(ExportError::Chain(format!(
                "{first_name} is of a volume of {} blocks, {} has {}: not the volume its base \
                 was restored into",
                first.logical_blocks,
                path.display(),
                v.logical_blocks()
            ))
            .into());
        }
        let names = v.snapshot_names()?;
        let newest = names.last();
        let same = newest.is_some_and(|(_, n, sec, nsec)| {
            *n == base.name && *sec == base.created_sec && *nsec == base.created_nsec
        });
        if !same {
            return Err(ExportError::Chain(format!(
                "{first_name} applies over snapshot {} (taken {}), but the newest snapshot of \
                 {} is {}: apply the increments in order, starting after its newest snapshot, \
                 or restore the whole chain into a new volume",
                base.name,
                super::snapshot::utc(base.created_sec),
                path.display(),
                newest.map_or("none".to_string(), |n| format!(
                    "{} (taken {})",
                    n.1,
                    super::snapshot::utc(n.2)
                ))
            ))
            .into());
        }
        let changed: u64 = v.changed_since_newest_snapshot()?.iter().map(|r| r.1).sum();
        if changed > 0 && !a.rollback {
            return Err(ExportError::Chain(format!(
                "{} changed since its snapshot {} (about {changed} blocks written, by a mount \
                 that wrote or updated access times, say): an increment applies only to an \
                 unchanged copy; pass --rollback to put it back to {} first (discarding those \
                 changes), or restore the chain into a new volume",
                path.display(),
                base.name,
                base.name
            ))
            .into());
        }
        v.close()?;
    }
    volume::set_restoring(&*dev, true)?;
    let v = Volume::open(dev.clone(), &master, opts(true))?;
    drop(master);
    if a.rollback {
        let (snap, n) = export::roll_back_to_newest(&v)?;
        if n > 0 {
            eprintln!(
                "rolled {} back to snapshot {snap}: {n} blocks put back",
                path.display()
            );
        }
    }
    let mut progress = bar(
        "restoring",
        total_blocks(
            &opened
                .iter()
                .map(|(_, h, _)| (String::new(), h.clone()))
                .collect::<Vec<_>>(),
        ),
        a.json,
    );
    for (input, h, key) in opened {
        apply(&v, input, &h, &key, applied, &mut progress)?;
    }
    if let Some(b) = progress {
        b.finish_and_clear();
    }
    let checkpoint = v.close_at()?;
    volume::set_restoring(&*dev, false)?;
    k.record_seen(&header.volume_id, checkpoint, false, true);
    drop(dev);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::SnapRef;

    fn increment(volume_id: [u8; 16], source_key: [u8; 32]) -> Header {
        let snap = |id, name: &str| SnapRef {
            id,
            name: name.into(),
            created_sec: 1_800_000_000,
            created_nsec: 5,
        };
        Header {
            version: 2,
            kind: Kind::Increment,
            export_id: [1; 16],
            volume_id,
            logical_blocks: 1 << 16,
            written: 1_800_000_100,
            snapshot: snap(2, "s2"),
            base: Some(snap(1, "s1")),
            source_key,
            slots: Vec::new(),
        }
    }

    fn target(restored_from: Option<volume::RestoredFrom>) -> volume::Header {
        volume::Header {
            restored_from,
            ..volume::format::tests::header()
        }
    }

    /// The increment's volume and signer must be the ones the copy was
    /// restored from; a copy that records none takes only a pinned signer.
    #[test]
    fn an_increment_applies_only_from_the_volume_and_signer_the_copy_came_from() {
        let from = volume::RestoredFrom {
            volume_id: [3; 16],
            source_key: [4; 32],
        };
        let t = target(Some(from));
        let path = Path::new("c.vol");
        let check = |h: &Header, pinned| check_source(&t, path, "x.lsx", h, pinned);
        assert!(check(&increment([3; 16], [4; 32]), false).is_ok());
        let e = check(&increment([3; 16], [5; 32]), false).unwrap_err();
        assert!(
            e.to_string()
                .contains("not written by the volume it claims"),
            "{e}"
        );
        let e = check(&increment([3; 16], [5; 32]), true).unwrap_err();
        assert!(
            e.to_string()
                .contains("not written by the volume it claims"),
            "{e}"
        );
        let e = check(&increment([6; 16], [4; 32]), false).unwrap_err();
        assert!(e.to_string().contains("not a link of that volume"), "{e}");

        let old = target(None);
        let e = check_source(&old, path, "x.lsx", &increment([3; 16], [4; 32]), false).unwrap_err();
        assert!(e.to_string().contains("--source-key"), "{e}");
        assert!(check_source(&old, path, "x.lsx", &increment([3; 16], [4; 32]), true).is_ok());
    }

    /// Links of one chain that record different volume sizes are refused
    /// with the headers, before a block is read.
    #[test]
    fn a_chain_whose_links_record_different_sizes_is_refused() {
        let full = Header {
            kind: Kind::Full,
            base: None,
            snapshot: increment([3; 16], [4; 32]).base.unwrap(),
            ..increment([3; 16], [4; 32])
        };
        let inc = increment([3; 16], [4; 32]);
        let chain = |inc: &Header| {
            check_chain(&[
                ("a.lsx".into(), full.clone()),
                ("b.lsx".into(), inc.clone()),
            ])
        };
        assert!(chain(&inc).is_ok());
        let larger = Header {
            logical_blocks: inc.logical_blocks + 1,
            ..inc
        };
        let e = chain(&larger).unwrap_err();
        assert!(matches!(e, ExportError::Chain(_)), "{e}");
        assert!(e.to_string().contains("b.lsx records a volume of"), "{e}");
    }
}
