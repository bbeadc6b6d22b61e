//! The admin socket: one JSON request line, one JSON response line per
//! connection, over a Unix socket with mode 0600 that accepts only root and
//! the server's own user (checked with SO_PEERCRED).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::protocol::{HostId, VolumeId};
use crate::storage::{
    AdminRefusal, AuditFilter, AuditInfo, HostInfo, StorageError, Store, VolumeInfo,
};

/// Longest request line.
pub const MAX_REQUEST: u64 = 64 * 1024;
/// Default and largest `audit --limit`.
pub const DEFAULT_AUDIT_LIMIT: usize = 50;
/// Largest `audit --limit`.
pub const MAX_AUDIT_LIMIT: usize = 100_000;

/// An admin command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AdminRequest {
    /// Enroll a host key under a name.
    Enroll {
        /// Host name.
        name: String,
        /// Host id, hex.
        host: String,
    },
    /// Add a host to a volume's ACL.
    Authorize {
        /// Name or id.
        host: String,
        /// Volume id, hex.
        volume: String,
    },
    /// Remove a host from a volume's ACL.
    Deauthorize {
        /// Name or id.
        host: String,
        /// Volume id, hex.
        volume: String,
    },
    /// Revoke a host.
    Revoke {
        /// Name or id.
        host: String,
    },
    /// Create a volume with KEK v1.
    CreateVolume {
        /// Volume id, hex.
        volume: String,
    },
    /// Add KEK version n+1.
    RotateKek {
        /// Volume id, hex.
        volume: String,
    },
    /// Declare a volume compromised: add KEK version n+1 and ask every
    /// host, at its next unlock, to rewrap and to rekey the volume's data.
    Compromise {
        /// Volume id, hex.
        volume: String,
    },
    /// Destroy every KEK of a volume, its ACL and its record.
    EraseVolume {
        /// Volume id, hex.
        volume: String,
    },
    /// List hosts.
    ListHosts,
    /// List volumes.
    ListVolumes,
    /// Show the audit log.
    Audit {
        /// Only this host (name or id).
        host: Option<String>,
        /// Only this volume.
        volume: Option<String>,
        /// At most this many entries.
        limit: usize,
    },
}

/// What a command returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdminResult {
    /// A change was made.
    Done {
        /// What was done.
        message: String,
    },
    /// `rotate-kek`.
    Rotated {
        /// Volume id.
        volume: String,
        /// The new version.
        version: u32,
    },
    /// `list-hosts`.
    Hosts {
        /// Hosts by name.
        hosts: Vec<HostInfo>,
    },
    /// `list-volumes`.
    Volumes {
        /// Volumes by id.
        volumes: Vec<VolumeInfo>,
    },
    /// `audit`.
    Audit {
        /// Entries, oldest first.
        entries: Vec<AuditInfo>,
    },
}

/// The response line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AdminResponse {
    /// Success.
    Ok {
        /// The result.
        result: AdminResult,
    },
    /// The command was refused (bad argument, unknown host, ...).
    Refused {
        /// Why.
        message: String,
    },
    /// The server failed.
    Error {
        /// Why.
        message: String,
    },
}

pub(crate) async fn serve(
    listener: UnixListener,
    store: Arc<Store>,
    mut stopped: watch::Receiver<bool>,
) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    loop {
        let accepted = tokio::select! {
            _ = stopped.changed() => return,
            r = listener.accept() => r,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let store = store.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(60), connection(stream, &store, own_uid))
                    .await;
        });
    }
}

async fn connection(stream: UnixStream, store: &Store, own_uid: u32) {
    let allowed = stream
        .peer_cred()
        .is_ok_and(|c| c.uid() == 0 || c.uid() == own_uid);
    let (read, mut write) = stream.into_split();
    let response = if allowed {
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST));
        match reader.read_line(&mut line).await {
            Ok(_) => match serde_json::from_str::<AdminRequest>(&line) {
                Ok(req) => execute(store, req).await,
                Err(e) => AdminResponse::Refused {
                    message: format!("malformed request: {e}"),
                },
            },
            Err(e) => AdminResponse::Error {
                message: format!("reading the request: {e}"),
            },
        }
    } else {
        AdminResponse::Refused {
            message: "only root or the server's user may use the admin socket".into(),
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

fn parse_volume(s: &str) -> Result<VolumeId, AdminRefusal> {
    VolumeId::from_hex(s)
        .map_err(|_| AdminRefusal::Invalid(format!("bad volume id {s:?}: want 32 hex digits")))
}

async fn execute(store: &Store, req: AdminRequest) -> AdminResponse {
    let done = |m: String| AdminResult::Done { message: m };
    let result: Result<Result<AdminResult, AdminRefusal>, StorageError> = async {
        Ok(match req {
            AdminRequest::Enroll { name, host } => match HostId::from_hex(&host) {
                Err(_) => Err(AdminRefusal::Invalid(format!(
                    "bad host id {host:?}: want 64 hex digits"
                ))),
                Ok(id) => store
                    .enroll(name.clone(), id)
                    .await?
                    .map(|()| done(format!("enrolled {name} ({id})"))),
            },
            AdminRequest::Authorize { host, volume } => match parse_volume(&volume) {
                Err(e) => Err(e),
                Ok(v) => store
                    .authorize(host.clone(), v)
                    .await?
                    .map(|()| done(format!("authorized {host} for {v}"))),
            },
            AdminRequest::Deauthorize { host, volume } => match parse_volume(&volume) {
                Err(e) => Err(e),
                Ok(v) => store
                    .deauthorize(host.clone(), v)
                    .await?
                    .map(|()| done(format!("deauthorized {host} for {v}"))),
            },
            AdminRequest::Revoke { host } => store
                .revoke(host.clone())
                .await?
                .map(|()| done(format!("revoked {host}"))),
            AdminRequest::CreateVolume { volume } => match parse_volume(&volume) {
                Err(e) => Err(e),
                Ok(v) => store
                    .create_volume(v)
                    .await?
                    .map(|()| done(format!("created volume {v} with KEK v1"))),
            },
            AdminRequest::RotateKek { volume } => match parse_volume(&volume) {
                Err(e) => Err(e),
                Ok(v) => store.rotate_kek(v).await?.map(|n| AdminResult::Rotated {
                    volume: v.to_hex(),
                    version: n.0,
                }),
            },
            AdminRequest::Compromise { volume } => match parse_volume(&volume) {
                Err(e) => Err(e),
                Ok(v) => store.compromise(v).await?.map(|n| {
                    done(format!(
                        "volume {v} declared compromised: KEK v{} added; at its next unlock each \
                         host rewraps and rekeys the volume's data, and reports it",
                        n.0
                    ))
                }),
            },
            AdminRequest::EraseVolume { volume } => match parse_volume(&volume) {
                Err(e) => Err(e),
                Ok(v) => store.erase_volume(v).await?.map(|destroyed| {
                    done(format!(
                        "erased volume {v}: destroyed KEK versions {:?}",
                        destroyed.iter().map(|k| k.0).collect::<Vec<_>>()
                    ))
                }),
            },
            AdminRequest::ListHosts => Ok(AdminResult::Hosts {
                hosts: store.list_hosts()?,
            }),
            AdminRequest::ListVolumes => Ok(AdminResult::Volumes {
                volumes: store.list_volumes()?,
            }),
            AdminRequest::Audit {
                host,
                volume,
                limit,
            } => {
                let host = match host {
                    None => Ok(None),
                    Some(h) => match store.resolve_host(&h)? {
                        Some(id) => Ok(Some(id)),
                        None => Err(AdminRefusal::UnknownHost(h)),
                    },
                };
                let volume = volume.as_deref().map(parse_volume).transpose();
                match (host, volume) {
                    (Err(e), _) | (_, Err(e)) => Err(e),
                    (Ok(host), Ok(volume)) => Ok(AdminResult::Audit {
                        entries: store.audit(&AuditFilter {
                            host,
                            volume,
                            limit: limit.min(MAX_AUDIT_LIMIT),
                        })?,
                    }),
                }
            }
        })
    }
    .await;
    match result {
        Ok(Ok(result)) => AdminResponse::Ok { result },
        Ok(Err(refusal)) => AdminResponse::Refused {
            message: refusal.to_string(),
        },
        Err(e) => {
            tracing::warn!("admin: {e}");
            AdminResponse::Error {
                message: e.to_string(),
            }
        }
    }
}

/// Client side: sends one request and reads the response.
pub fn call(socket: &Path, req: &AdminRequest) -> std::io::Result<AdminResponse> {
    let mut stream = StdUnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    // A server that refuses us answers without reading the request and
    // closes, so the write may fail with EPIPE: the answer (the reason) is
    // still there to read, and is what to report.
    let sent = stream.write_all(&line);
    let mut reply = String::new();
    match (sent, BufReader::new(stream).read_line(&mut reply)) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) | (Ok(()), Err(e)) => return Err(e),
        (Ok(()), Ok(_)) => {}
    }
    serde_json::from_str(&reply).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("malformed admin response: {e}"),
        )
    })
}

/// Formats Unix ms as RFC 3339 UTC, seconds precision.
fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Human-readable lines for a result.
pub fn format_human(result: &AdminResult) -> String {
    let mut out = String::new();
    match result {
        AdminResult::Done { message } => out.push_str(message),
        AdminResult::Rotated { volume, version } => {
            out.push_str(&format!("volume {volume}: new KEK v{version}"))
        }
        AdminResult::Hosts { hosts } => {
            for h in hosts {
                let state = match h.revoked_ms {
                    Some(t) => format!("revoked {}", time(t)),
                    None => "active".into(),
                };
                out.push_str(&format!(
                    "{} {} enrolled {} {}\n",
                    h.name,
                    h.id,
                    time(h.enrolled_ms),
                    state
                ));
            }
        }
        AdminResult::Volumes { volumes } => {
            for v in volumes {
                let versions: Vec<String> = v.versions.iter().map(|n| format!("v{n}")).collect();
                out.push_str(&format!(
                    "volume {} created {} keks {}\n",
                    v.id,
                    time(v.created_ms),
                    versions.join(",")
                ));
                for h in &v.holders {
                    out.push_str(&format!(
                        "  {} {} wrapped v{}{}\n",
                        h.name,
                        h.host,
                        h.wrapped_version,
                        if h.revoked { " (revoked)" } else { "" }
                    ));
                }
            }
        }
        AdminResult::Audit { entries } => {
            for e in entries {
                out.push_str(&format!(
                    "{} #{} {} {} host={} volume={} version={} {}\n",
                    time(e.time_ms),
                    e.seq,
                    e.action,
                    e.outcome,
                    e.host.as_deref().unwrap_or("-"),
                    e.volume.as_deref().unwrap_or("-"),
                    e.version,
                    e.reason
                ));
            }
        }
    }
    out.trim_end().to_string()
}
