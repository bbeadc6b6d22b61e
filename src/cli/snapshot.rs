//! `lsvfs snapshot create|list|delete MOUNTPOINT ...`, through the mount's
//! control socket.

use std::path::Path;

use super::common::human;
use super::{control, Error, SnapCmd};
use crate::error::Class;

pub(super) fn run(c: SnapCmd) -> Result<(), Error> {
    match c {
        SnapCmd::Create { mountpoint, name } => {
            let r = control_call(&mountpoint, control::Request::Create { name: name.clone() })?;
            println!(
                "snapshot {name} taken (id {}); read it under {}/.snapshots/{name}",
                r.id.unwrap_or(0),
                mountpoint.display()
            );
        }
        // Dispatched to cli::export by `run`, which has the global options.
        SnapCmd::Export { .. } => {
            return Err(Error::Usage(
                "snapshot export is run by the export command".into(),
            ))
        }
        SnapCmd::Delete { mountpoint, name } => {
            control_call(&mountpoint, control::Request::Delete { name: name.clone() })?;
            println!("snapshot {name} deleted");
        }
        SnapCmd::List { mountpoint, json } => {
            let r = control_call(&mountpoint, control::Request::List {})?;
            let list = r.snapshots.unwrap_or_default();
            if json {
                for s in &list {
                    println!(
                        "{}",
                        serde_json::to_string(s).map_err(|e| Error::Usage(e.to_string()))?
                    );
                }
                return Ok(());
            }
            println!(
                "{:<24} {:>6}  {:<19}  {:>12}",
                "NAME", "ID", "CREATED (UTC)", "UNIQUE"
            );
            for s in &list {
                println!(
                    "{:<24} {:>6}  {:<19}  {:>12}",
                    s.name,
                    s.id,
                    utc(s.created_sec),
                    human(s.unique_blocks * crate::BLOCK_SIZE as u64)
                );
            }
        }
    }
    Ok(())
}

fn control_call(mountpoint: &Path, req: control::Request) -> Result<control::Response, Error> {
    let r = control::request(mountpoint, &req)?;
    if r.ok {
        return Ok(r);
    }
    Err(Error::Reported {
        class: Class::Errno(r.errno.unwrap_or(libc::EIO)),
        message: r.error.unwrap_or_else(|| "the mount refused".into()),
    })
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for Unix seconds.
pub(super) fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
