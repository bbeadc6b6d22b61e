//! Mount options, as `lsvfs mount -o OPTS` and the `mount.lsvfs` helper
//! (run by mount(8) for `mount -t lsvfs` and fstab entries) take them.
//!
//! One parser for both, so that an fstab line and a command line mean the
//! same thing. Unknown options are refused by name, unless the caller is
//! sloppy (`mount -s`); options meant for mount(8), systemd or fstab
//! (`_netdev`, `nofail`, `noauto`, `x-systemd.*`, ...) are accepted and
//! ignored here.

use std::path::PathBuf;

use fuser::MountOption;

use super::Error;
use crate::fuse::Transport;

/// What a mount is asked for, beyond the volume and the mountpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// `ro`: no write reaches the backing file (EROFS for every change).
    pub read_only: bool,
    /// `show_snapshots`: list `.snapshots` in the root directory.
    pub show_snapshots: bool,
    /// `allow_other`: other users may use the mount (their access is still
    /// checked against modes and ACLs). Root's mounts always allow them.
    pub allow_other: bool,
    /// `noexec`, `nosuid`, `nodev`, `noatime`, `sync`, `dirsync`: passed to
    /// the kernel.
    pub no_exec: bool,
    pub no_suid: bool,
    pub no_dev: bool,
    pub no_atime: bool,
    pub sync: bool,
    pub dir_sync: bool,
    /// `key_file=PATH`: a recovery key file instead of the key server.
    pub key_file: Option<PathBuf>,
    /// `store=PATH`: this host's sealed store.
    pub store: Option<PathBuf>,
    /// `timeout=SECONDS`: one exchange with the key server.
    pub timeout: Option<u64>,
    /// `attempts=N`: tries to reach the key server before giving up.
    pub attempts: Option<u32>,
    /// `allow_rollback`: mount a volume older than the state this host has
    /// recorded (an older copy put back), and reset the record to it.
    pub allow_rollback: bool,
    /// `idle_lock=DURATION` (`15m`, `1h`, `90s`): after that long without a
    /// request, unmount cleanly, which closes the volume and drops its keys.
    pub idle_lock: Option<std::time::Duration>,
    /// `on_lock_export=DIR|s3://BUCKET/PREFIX`: before the idle lock
    /// unmounts, snapshot the volume and export it (incrementally, over the
    /// previous such snapshot) there.
    pub on_lock_export: Option<String>,
    /// `transport=auto|uring|dev`: how the kernel's requests come (FUSE
    /// over io_uring where the kernel offers it, by default).
    pub transport: Option<Transport>,
}

/// Options for mount(8), fstab or systemd, not for lsvfs.
const IGNORED: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "_netdev",
    "nofail",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "relatime",
    "atime",
    "rw",
    "exec",
    "suid",
    "dev",
    "async",
    "nosymfollow",
];

/// What `unknown option` lists as known.
const KNOWN: &str = "ro, rw, key_file=PATH, store=PATH, timeout=SECONDS, attempts=N, \
    show_snapshots, allow_other, allow_rollback, idle_lock=DURATION, on_lock_export=DEST, transport=auto|uring|dev, noexec, nosuid, nodev, noatime, sync, dirsync, \
    and mount(8)'s own (defaults, auto, noauto, _netdev, nofail, x-*)";

impl MountOptions {
    /// Applies a comma-separated option list (later options win). With
    /// `sloppy`, unknown options are ignored instead of refused.
    pub fn apply(&mut self, list: &str, sloppy: bool) -> Result<(), Error> {
        for opt in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) = match opt.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (opt, None),
            };
            let flag = |set: &mut bool, on: bool| -> Result<(), Error> {
                if value.is_some() {
                    return Err(Error::Usage(format!(
                        "mount option {name:?} takes no value (got {opt:?})"
                    )));
                }
                *set = on;
                Ok(())
            };
            let need = || -> Result<&str, Error> {
                match value {
                    Some(v) if !v.is_empty() => Ok(v),
                    _ => Err(Error::Usage(format!(
                        "mount option {name:?} needs a value ({name}=...)"
                    ))),
                }
            };
            let number = |what: &str| -> Result<u64, Error> {
                let v = need()?;
                v.parse().map_err(|_| {
                    Error::Usage(format!(
                        "mount option {name}={v}: {what} must be a whole number"
                    ))
                })
            };
            match name {
                "ro" => flag(&mut self.read_only, true)?,
                "rw" => flag(&mut self.read_only, false)?,
                "show_snapshots" => flag(&mut self.show_snapshots, true)?,
                "allow_other" => flag(&mut self.allow_other, true)?,
                "allow_rollback" => flag(&mut self.allow_rollback, true)?,
                "noexec" => flag(&mut self.no_exec, true)?,
                "exec" => flag(&mut self.no_exec, false)?,
                "nosuid" => flag(&mut self.no_suid, true)?,
                "suid" => flag(&mut self.no_suid, false)?,
                "nodev" => flag(&mut self.no_dev, true)?,
                "dev" => flag(&mut self.no_dev, false)?,
                "noatime" => flag(&mut self.no_atime, true)?,
                "atime" | "relatime" => flag(&mut self.no_atime, false)?,
                "sync" => flag(&mut self.sync, true)?,
                "async" => flag(&mut self.sync, false)?,
                "dirsync" => flag(&mut self.dir_sync, true)?,
                "key_file" | "keyfile" => self.key_file = Some(PathBuf::from(need()?)),
                "store" => self.store = Some(PathBuf::from(need()?)),
                "timeout" => self.timeout = Some(number("the timeout in seconds")?),
                "idle_lock" => self.idle_lock = Some(parse_idle(need()?)?),
                "on_lock_export" => self.on_lock_export = Some(need()?.to_string()),
                "transport" => self.transport = Some(parse_transport(need()?)?),
                "attempts" => {
                    let n = number("the number of attempts")?;
                    self.attempts = Some(u32::try_from(n).map_err(|_| {
                        Error::Usage(format!("mount option attempts={n} is too large"))
                    })?);
                }
                _ if IGNORED.contains(&name) || name.starts_with("x-") || name == "comment" => {}
                _ if sloppy => {}
                _ => {
                    return Err(Error::Usage(format!(
                        "unknown mount option {opt:?}; lsvfs knows {KNOWN}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Parses a comma-separated option list onto the defaults.
    pub fn parse(list: &str, sloppy: bool) -> Result<MountOptions, Error> {
        let mut o = MountOptions::default();
        o.apply(list, sloppy)?;
        Ok(o)
    }

    /// The options the kernel gets, besides lsvfs's own (fsname, subtype,
    /// default_permissions).
    pub fn kernel(&self) -> Vec<MountOption> {
        let pick = |no: bool, yes: MountOption, not: MountOption| if no { not } else { yes };
        let mut k = vec![
            pick(self.read_only, MountOption::RW, MountOption::RO),
            pick(self.no_exec, MountOption::Exec, MountOption::NoExec),
            pick(self.no_suid, MountOption::Suid, MountOption::NoSuid),
            pick(self.no_dev, MountOption::Dev, MountOption::NoDev),
        ];
        if self.no_atime {
            k.push(MountOption::NoAtime);
        }
        if self.sync {
            k.push(MountOption::Sync);
        }
        if self.dir_sync {
            k.push(MountOption::DirSync);
        }
        k
    }

    /// The option list that gives these options back (keys and key-server
    /// settings excluded: those travel as their own flags).
    pub fn to_list(&self) -> String {
        let idle = self
            .idle_lock
            .map(|d| format!("idle_lock={}s", d.as_secs()));
        let export = self
            .on_lock_export
            .as_ref()
            .map(|d| format!("on_lock_export={d}"));
        let transport = self
            .transport
            .map(|t| format!("transport={}", transport_name(t)));
        let mut l = vec![if self.read_only { "ro" } else { "rw" }];
        l.extend(idle.as_deref());
        l.extend(export.as_deref());
        l.extend(transport.as_deref());
        for (on, name) in [
            (self.show_snapshots, "show_snapshots"),
            (self.allow_other, "allow_other"),
            (self.allow_rollback, "allow_rollback"),
            (self.no_exec, "noexec"),
            (self.no_suid, "nosuid"),
            (self.no_dev, "nodev"),
            (self.no_atime, "noatime"),
            (self.sync, "sync"),
            (self.dir_sync, "dirsync"),
        ] {
            if on {
                l.push(name);
            }
        }
        l.join(",")
    }
}

/// Parses an idle-lock duration: `15m`, `1h 30m`, `90s` (at least 1 s).
/// `auto`, `uring` or `dev` (`--transport`, `transport=`).
pub fn parse_transport(v: &str) -> Result<Transport, Error> {
    match v {
        "auto" => Ok(Transport::Auto),
        "uring" | "io_uring" => Ok(Transport::Uring),
        "dev" | "dev-fuse" => Ok(Transport::Dev),
        _ => Err(Error::Usage(format!(
            "transport {v:?}: write auto (io_uring where the kernel offers it), uring or dev (/dev/fuse)"
        ))),
    }
}

/// The name `parse_transport` takes back.
pub fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Auto => "auto",
        Transport::Uring => "uring",
        Transport::Dev => "dev",
    }
}

pub fn parse_idle(v: &str) -> Result<std::time::Duration, Error> {
    let d = humantime::parse_duration(v).map_err(|e| {
        Error::Usage(format!(
            "idle lock {v:?}: {e}; write a duration such as 15m, 1h or 90s"
        ))
    })?;
    if d.as_secs() == 0 {
        return Err(Error::Usage(format!(
            "idle lock {v:?} is under a second; write a duration such as 15m"
        )));
    }
    Ok(d)
}

/// An fstab entry of type lsvfs: the volume and its options.
#[derive(Debug, PartialEq, Eq)]
pub struct FstabEntry {
    pub volume: PathBuf,
    pub options: String,
}

/// Undoes fstab's octal escapes (`\040` for a space, as in fstab(5)).
pub(super) fn unescape(field: &str) -> String {
    String::from_utf8_lossy(&super::mounts::unescape(field.as_bytes())).into_owned()
}

/// The fstab entry of type lsvfs (or fuse.lsvfs) for `mountpoint`, from
/// the text of an fstab file named `file`.
pub fn fstab_entry(text: &str, file: &str, mountpoint: &str) -> Result<FstabEntry, Error> {
    let want = mountpoint.trim_end_matches('/');
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(spec), Some(target), Some(kind)) = (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        let target = unescape(target);
        if target.trim_end_matches('/') != want || !matches!(*kind, "lsvfs" | "fuse.lsvfs") {
            continue;
        }
        return Ok(FstabEntry {
            volume: PathBuf::from(unescape(spec)),
            options: fields.get(3).map_or_else(String::new, |o| unescape(o)),
        });
    }
    Err(Error::Usage(format!(
        "{file} has no lsvfs entry for {mountpoint}; add one such as \
         `/srv/data.vol {mountpoint} lsvfs noauto,_netdev 0 0`"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_options_parse_and_round_trip() {
        let o = MountOptions::parse(
            "defaults,_netdev,nofail,x-systemd.requires=lsvfs-keyserver.service,ro,\
             key_file=/etc/lsvfs/k,store=/var/lib/s,timeout=3,attempts=9,show_snapshots,\
             noexec,nosuid,nodev,noatime,allow_other,allow_rollback,idle_lock=15m,comment=backup,\
             transport=dev",
            false,
        )
        .unwrap();
        assert!(o.read_only && o.show_snapshots && o.allow_other && o.allow_rollback);
        assert_eq!(o.transport, Some(Transport::Dev));
        assert_eq!(o.idle_lock, Some(std::time::Duration::from_secs(900)));
        assert!(o.no_exec && o.no_suid && o.no_dev && o.no_atime);
        assert_eq!(o.key_file, Some(PathBuf::from("/etc/lsvfs/k")));
        assert_eq!(o.store, Some(PathBuf::from("/var/lib/s")));
        assert_eq!((o.timeout, o.attempts), (Some(3), Some(9)));
        assert!(o.kernel().contains(&MountOption::RO));
        assert!(o.kernel().contains(&MountOption::NoExec));
        let back = MountOptions::parse(&o.to_list(), false).unwrap();
        assert_eq!(
            back,
            MountOptions {
                key_file: None,
                store: None,
                timeout: None,
                attempts: None,
                ..o
            }
        );
        // Later options win.
        let o = MountOptions::parse("ro,noexec,rw,exec", false).unwrap();
        assert_eq!(o, MountOptions::default());
        assert!(o.kernel().contains(&MountOption::RW));
    }

    #[test]
    fn bad_options_are_refused_by_name() {
        for (list, says) in [
            ("ro,fancy", "unknown mount option \"fancy\""),
            ("key_file", "needs a value"),
            ("key_file=", "needs a value"),
            ("ro=1", "takes no value"),
            ("timeout=soon", "must be a whole number"),
            ("attempts=99999999999", "too large"),
            ("idle_lock=soon", "write a duration such as 15m"),
            ("idle_lock=0s", "under a second"),
            ("idle_lock", "needs a value"),
            ("transport=fast", "write auto"),
            ("transport", "needs a value"),
        ] {
            let e = MountOptions::parse(list, false).unwrap_err().to_string();
            assert!(e.contains(says), "{list}: {e}");
        }
        // Sloppy (mount -s) ignores what it does not know, and still
        // checks what it does.
        assert!(MountOptions::parse("ro,fancy", true).unwrap().read_only);
        assert!(MountOptions::parse("timeout=soon", true).is_err());
    }

    #[test]
    fn fstab_entries_are_found_by_mountpoint() {
        let fstab = "# comment\n\
            UUID=1234 / ext4 defaults 0 1\n\
            /srv/a.vol /srv/a lsvfs noauto,_netdev,key_file=/k 0 0\n\
            \t/srv/my\\040vol.vol  /srv/my\\040data/  fuse.lsvfs  ro\n\
            /srv/x.vol /srv/x ext4 defaults 0 0\n\
            /srv/b.vol /srv/b lsvfs\n";
        let e = fstab_entry(fstab, "fstab", "/srv/a").unwrap();
        assert_eq!(e.volume, PathBuf::from("/srv/a.vol"));
        assert_eq!(e.options, "noauto,_netdev,key_file=/k");
        let e = fstab_entry(fstab, "fstab", "/srv/my data").unwrap();
        assert_eq!(e.volume, PathBuf::from("/srv/my vol.vol"));
        assert_eq!(e.options, "ro");
        assert_eq!(fstab_entry(fstab, "fstab", "/srv/b/").unwrap().options, "");
        let e = fstab_entry(fstab, "/etc/fstab", "/srv/x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/fstab has no lsvfs entry for /srv/x"),
            "{e}"
        );
        assert!(fstab_entry(fstab, "f", "/srv").is_err());
        assert_eq!(unescape("a\\134b\\0"), "a\\b\\0");
    }
}
