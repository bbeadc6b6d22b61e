//! Logging for both programs (`lsvfs` and `lsvfs-keyserver`).
//!
//! Messages are `tracing` events; the `log` records of libraries (fuser's
//! request log, rustls) are taken in too. Where they go:
//!
//! - stderr, as `PROGRAM: [LEVEL: ]message` (no level word for info), the
//!   way a command's messages always looked. With `-v` the source module is
//!   shown too.
//! - journald, with its priority and fields, when stderr already is the
//!   journal (a systemd service: `$JOURNAL_STREAM` names stderr), instead
//!   of stderr; and beside stderr for a background mount daemon, whose
//!   stderr goes away once it is mounted.
//!
//! The level is info, debug with one `-v`, trace with two; `LSVFS_LOG`
//! (error, warn, info, debug, trace) overrides it. Keys never reach a
//! message: no key type implements `Debug` or `Display` (docs/SECURITY.md,
//! E1).

use std::fmt;
use std::os::unix::fs::MetadataExt;

use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Where a program's messages go besides stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Journal {
    /// Only if stderr is the journal already (then instead of stderr).
    IfStderrIsJournal,
    /// Also to journald, if it runs (a daemon about to lose its stderr).
    Also,
}

/// `PROGRAM: [LEVEL: ][target: ]message`.
struct Plain {
    program: &'static str,
    targets: bool,
}

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // A `log` record (fuser, rustls) carries its own module as target.
        let normalized = event.normalized_metadata();
        let m = normalized.as_ref().unwrap_or_else(|| event.metadata());
        write!(w, "{}: ", self.program)?;
        match *m.level() {
            Level::ERROR => write!(w, "error: ")?,
            Level::WARN => write!(w, "warning: ")?,
            Level::INFO => {}
            Level::DEBUG => write!(w, "debug: ")?,
            Level::TRACE => write!(w, "trace: ")?,
        }
        if self.targets {
            write!(w, "{}: ", m.target())?;
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Whether stderr is the journal stream systemd connected ($JOURNAL_STREAM
/// holds its device and inode).
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(md) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(md.dev()) && ino.parse() == Ok(md.ino())
}

/// The level `verbosity` (the count of `-v`) asks for, unless `LSVFS_LOG`
/// names one.
pub fn level(verbosity: u8) -> LevelFilter {
    if let Some(l) = std::env::var("LSVFS_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
    {
        return l;
    }
    match verbosity {
        0 => LevelFilter::INFO,
        1 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

/// Starts logging for `program`; later calls do nothing.
pub fn init(program: &'static str, verbosity: u8, journal: Journal) {
    let level = level(verbosity);
    let to_journal = match journal {
        Journal::IfStderrIsJournal => stderr_is_journal(),
        Journal::Also => true,
    };
    let journald = if to_journal {
        tracing_journald::layer().ok().map(|l| {
            // syslog's meanings: info is 6, debug 7 (the crate's default
            // is one step more urgent).
            use tracing_journald::{Priority, PriorityMappings};
            l.with_syslog_identifier(program.to_string())
                .with_priority_mappings(PriorityMappings {
                    error: Priority::Error,
                    warn: Priority::Warning,
                    info: Priority::Informational,
                    debug: Priority::Debug,
                    trace: Priority::Debug,
                })
        })
    } else {
        None
    };
    let stderr = (journal == Journal::Also || journald.is_none()).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .event_format(Plain {
                program,
                targets: level >= LevelFilter::DEBUG,
            })
    });
    // The TPM binding logs every context it closes at info level, and
    // every failure that lsvfs then reports itself at error level: only
    // with -vv.
    let tpm_level = if level == LevelFilter::TRACE {
        level
    } else {
        LevelFilter::OFF
    };
    let filter = || {
        tracing_subscriber::filter::Targets::new()
            .with_default(level)
            .with_target("tss_esapi", tpm_level)
    };
    let _ = tracing_subscriber::registry()
        .with(journald.with_filter(filter()))
        .with(stderr.with_filter(filter()))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_and_lsvfs_log_choose_the_level() {
        // LSVFS_LOG is not set in the test environment.
        if std::env::var_os("LSVFS_LOG").is_none() {
            assert_eq!(level(0), LevelFilter::INFO);
            assert_eq!(level(1), LevelFilter::DEBUG);
            assert_eq!(level(5), LevelFilter::TRACE);
        }
        assert!("warn".parse::<LevelFilter>().is_ok());
    }
}
