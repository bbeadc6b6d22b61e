//! The HTTPS server: TLS with rustls, HTTP/1.1 with hyper, one route table,
//! one mapping from errors to status codes. Requests are validated by
//! [`crate::protocol`] and decided by [`crate::storage`].

pub mod config;
mod http;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use zeroize::Zeroizing;

pub use config::Config;
pub use http::ApiError;

use crate::storage::{MasterKey, StorageError, Store};

/// Most connections served at once; further ones are closed on accept.
pub const MAX_CONNECTIONS: usize = 16_384;
/// Listen backlog (the kernel caps it at `net.core.somaxconn`).
pub const BACKLOG: u32 = 4096;
/// Time allowed for the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one connection.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration file is missing or invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// A socket could not be bound.
    #[error("{0}")]
    Bind(String),
    /// The database or master key failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Shared by every connection.
pub(crate) struct AppState {
    pub(crate) store: Arc<Store>,
    pub(crate) challenge_lifetime: Duration,
}

/// A started server.
pub struct Running {
    /// The bound HTTPS address.
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    state: Arc<AppState>,
}

impl Running {
    /// Stops accepting, waits for the listeners to end, and closes the
    /// database once the last connection is gone.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        drop(self.state);
    }
}

fn tls_acceptor(cfg: &Config) -> Result<TlsAcceptor, ServerError> {
    let cert_pem = std::fs::read(&cfg.tls_cert)
        .map_err(|e| ServerError::Tls(format!("{}: {e}", cfg.tls_cert.display())))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ServerError::Tls(format!("{}: {e}", cfg.tls_cert.display())))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(format!(
            "{}: no certificate",
            cfg.tls_cert.display()
        )));
    }
    let key_path = cfg.tls_key_path();
    let key_pem = Zeroizing::new(
        std::fs::read(&key_path)
            .map_err(|e| ServerError::Tls(format!("{}: {e}", key_path.display())))?,
    );
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| ServerError::Tls(format!("{}: {e}", key_path.display())))?;
    // TLS 1.3's SHA-256 suites first, chosen by the server: the key
    // exchange (X25519 with lsvfs's client, P-256 otherwise) is at a
    // 128-bit security level, so AES-256 adds nothing, and SHA-384 costs a
    // handshake more than SHA-256 (which has CPU instructions). Every
    // suite of the default list stays allowed.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        )
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No session tickets: a host builds a new TLS client for each call and
    // never resumes a session, so the two tickets TLS 1.3 sends by default
    // after every handshake were made, stored, sent and thrown away.
    tls.send_tls13_tickets = 0;
    tls.ignore_client_order = true;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(TlsAcceptor::from(Arc::new(tls)))
}

fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    let bind = |e: std::io::Error| ServerError::Bind(format!("listen on {addr}: {e}"));
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(bind)?;
    socket.set_reuseaddr(true).map_err(bind)?;
    socket.bind(addr).map_err(bind)?;
    socket.listen(BACKLOG).map_err(bind)
}

/// Binds the admin socket with mode 0600, replacing a stale socket file.
fn bind_admin(path: &Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let bind = |e: std::io::Error| ServerError::Bind(format!("{}: {e}", path.display()));
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(bind)?;
        } else {
            return Err(ServerError::Bind(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
    }
    let listener = UnixListener::bind(path).map_err(bind)?;
    // The process umask is 077 (see `serve`), so the socket is never more
    // open than 0600, even before this chmod.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind)?;
    Ok(listener)
}

/// Opens the database, binds both sockets and starts serving. Must run
/// inside a tokio runtime.
pub async fn start(cfg: &Config) -> Result<Running, ServerError> {
    let acceptor = tls_acceptor(cfg)?;
    let master = MasterKey::load(&cfg.master_key_path())?;
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| ServerError::Config(format!("{}: {e}", cfg.state_dir.display())))?;
    let store = Store::open(&cfg.state_dir, &master)?;
    drop(master);
    let state = Arc::new(AppState {
        store: Arc::new(store),
        challenge_lifetime: cfg.challenge_lifetime(),
    });
    let tcp = bind_tcp(cfg.listen)?;
    let addr = tcp
        .local_addr()
        .map_err(|e| ServerError::Bind(e.to_string()))?;
    let admin = bind_admin(&cfg.admin_socket)?;
    let (stop, stopped) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(http::accept_loop(
            tcp,
            acceptor,
            state.clone(),
            stopped.clone(),
        )),
        tokio::spawn(crate::admin::serve(
            admin,
            state.store.clone(),
            stopped.clone(),
        )),
        tokio::spawn(purge_loop(state.clone(), stopped)),
    ];
    Ok(Running {
        addr,
        stop,
        tasks,
        state,
    })
}

async fn purge_loop(state: Arc<AppState>, mut stopped: watch::Receiver<bool>) {
    let every = state.challenge_lifetime.max(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = state.store.purge_challenges().await {
            tracing::warn!("purging challenges: {e}");
        }
    }
}

/// Raises the soft open-file limit to the hard limit: every connection
/// holds a descriptor.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we own and pass by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max
    {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads the rlimit we pass.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// `lsvfs-keyserver serve`: runs until SIGTERM or SIGINT. Prints
/// `lsvfs-keyserver: listening on ADDR` once ready and tells systemd.
pub fn serve(cfg: &Config) -> Result<(), ServerError> {
    // SAFETY: umask only changes this process's file-creation mask. Every
    // file the server creates (database, admin socket) is private.
    unsafe { libc::umask(0o077) };
    raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ServerError::Bind(format!("tokio runtime: {e}")))?;
    rt.block_on(async {
        let running = start(cfg).await?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "lsvfs-keyserver: listening on {}", running.addr);
            let _ = writeln!(
                out,
                "lsvfs-keyserver: admin socket {}",
                cfg.admin_socket.display()
            );
            let _ = out.flush();
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| ServerError::Bind(format!("SIGTERM handler: {e}")))?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        running.shutdown().await;
        let _ = std::fs::remove_file(&cfg.admin_socket);
        Ok(())
    })
}

/// A self-signed certificate and its key, both PEM, for `names` (DNS names
/// or IP addresses).
pub fn self_signed_cert(names: Vec<String>) -> Result<(String, Zeroizing<String>), ServerError> {
    let ck =
        rcgen::generate_simple_self_signed(names).map_err(|e| ServerError::Tls(e.to_string()))?;
    Ok((
        ck.cert.pem(),
        Zeroizing::new(ck.signing_key.serialize_pem()),
    ))
}
