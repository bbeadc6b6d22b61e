//! Blocking HTTPS client for the lsvfs host side: proves the host's identity
//! with a signed challenge and opens the KEK the server seals to a one-time
//! key. Builds without tokio or the database (`--no-default-features
//! --features client`).

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};
use ureq::Agent;
use zeroize::Zeroizing;

pub use crate::protocol::Refusal;
use crate::protocol::{
    self, open_kek, parse_challenge_response, parse_erased_response, parse_error_body,
    parse_key_response, parse_rekeyed_response, parse_rewrapped_response, Challenge,
    ChallengeRequest, HostId, KekVersion, Op, Recipient, SignedRequest, VolumeId, MAX_RESPONSE,
};

/// First pause between attempts; it doubles after each failed attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Connection buffers. Messages are under 1 KiB; ureq's 128 KiB default
/// costs a 256 KiB memset per connection, which dominated a boot storm.
const BUFFER_SIZE: usize = 16 * 1024;

/// Where the key server is and how hard to try.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL, `https://host:port` (a trailing `/` is allowed).
    pub url: String,
    /// PEM of the CA (or the self-signed server certificate) to trust. The
    /// system roots are never used, so `None` is an error.
    pub ca_pem: Option<Vec<u8>>,
    /// Limit for one whole HTTP exchange (connect, TLS, request, response).
    pub timeout: Duration,
    /// Attempts on connection failures, time-outs and 5xx (at least 1).
    /// Refusals are never retried.
    pub attempts: u32,
}

/// A host's Ed25519 identity key. The secret is zeroized on drop; `Debug`
/// shows only the public key.
pub struct HostIdentity {
    key: SigningKey,
}

impl HostIdentity {
    /// A fresh identity from the OS RNG.
    pub fn generate() -> Self {
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::fill(secret.as_mut()).expect("the OS random number generator failed");
        Self::from_secret(&secret)
    }

    /// The identity with this 32-byte Ed25519 secret key.
    pub fn from_secret(bytes: &Zeroizing<[u8; 32]>) -> Self {
        HostIdentity {
            key: SigningKey::from_bytes(bytes),
        }
    }

    /// The 32-byte secret key, for the host's sealed store.
    pub fn secret(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.key.to_bytes())
    }

    /// The host id: the public key as 64 lowercase hex digits.
    pub fn public_hex(&self) -> String {
        self.host_id().to_hex()
    }

    /// The host id.
    pub fn host_id(&self) -> HostId {
        HostId(self.key.verifying_key().to_bytes())
    }
}

impl std::fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostIdentity({})", self.public_hex())
    }
}

/// A key-encryption key released by the server.
pub struct Kek {
    /// KEK version.
    pub version: u32,
    /// The key.
    pub key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek {{ version: {}, key: <redacted> }}", self.version)
    }
}

/// Result of [`unlock`].
#[derive(Debug)]
pub struct Unlocked {
    /// The version asked for.
    pub kek: Kek,
    /// The newest version, when it is newer than the one asked for: the host
    /// should rewrap under it and call [`report_rewrapped`].
    pub newest: Option<Kek>,
    /// The volume was declared compromised: the host should seal its data
    /// again under a new data key and call [`report_rekeyed`].
    pub rekey: bool,
}

/// Why a key-server call failed.
#[derive(Debug)]
pub enum ClientError {
    /// No successful answer after every attempt (connection refused,
    /// time-out, 5xx).
    Unreachable {
        /// The server URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The server refused; retrying will not help.
    Refused {
        /// Stable refusal code.
        reason: Refusal,
        /// The server's message.
        message: String,
    },
    /// The server's TLS certificate does not chain to the pinned CA.
    CertificateMismatch {
        /// The server URL.
        url: String,
        /// What rustls reported.
        detail: String,
    },
    /// A malformed answer, a bad URL or configuration, or a KEK that does not
    /// open.
    Protocol(String),
    /// The server answered, but what it gave cannot be used (its KEK opens
    /// nothing of this host's): counted as that server failing.
    Unusable(String),
}

fn refusal_hint(reason: Refusal) -> &'static str {
    match reason {
        Refusal::NotEnrolled => {
            "enroll this host on the key server: lsvfs-keyserver admin enroll NAME HOST_ID"
        }
        Refusal::Revoked => "this host was revoked; an administrator must enroll a new identity",
        Refusal::NotAuthorized => {
            "authorize this host for the volume: lsvfs-keyserver admin authorize HOST VOLUME"
        }
        Refusal::UnknownVolume => {
            "the key server has no such volume: check the volume id or create it"
        }
        Refusal::UnknownVersion => {
            "the key server no longer has this KEK version: it was retired after a rotation"
        }
        Refusal::ChallengeExpired | Refusal::ChallengeReplayed => {
            "retry; if it persists, check that this host's clock and network are not too slow"
        }
        Refusal::BadSignature => "the host identity key does not match the host id",
        Refusal::BadRequest => "the client and server disagree on the protocol: upgrade one",
        Refusal::VolumeExists => "a volume with this id is already registered",
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unreachable {
                url,
                attempts,
                last,
            } => write!(
                f,
                "key server {url} unreachable after {attempts} attempt(s): {last} \
                 (check that lsvfs-keyserver runs there and the URL is right)"
            ),
            ClientError::Refused { reason, message } => write!(
                f,
                "key server refused ({reason}): {message} ({})",
                refusal_hint(*reason)
            ),
            ClientError::CertificateMismatch { url, detail } => write!(
                f,
                "the TLS certificate of key server {url} is not signed by the pinned CA: \
                 {detail} (pass the key server's CA certificate with --ca)"
            ),
            ClientError::Protocol(m) => write!(f, "key server protocol error: {m}"),
            ClientError::Unusable(m) => write!(f, "key server answered, unusably: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// Registers a new volume: the server creates KEK v1 and authorizes this
/// host for it. A retried call whose first attempt reached the server gets
/// `Refused { VolumeExists }`; the host may then call [`unlock`] for v1.
pub fn register_volume(
    cfg: &ClientConfig,
    host: &HostIdentity,
    volume_id: [u8; 16],
) -> Result<Kek, ClientError> {
    let volume = VolumeId(volume_id);
    with_retries(cfg, |agent| {
        let (challenge, recipient, body) =
            signed_exchange(agent, cfg, host, Op::Register, volume, KekVersion::FIRST)?;
        let (sealed, _, _) = parse_key_response(&body).map_err(fatal_protocol)?;
        if sealed.version != KekVersion::FIRST {
            return Err(fatal_protocol("register returned a version other than 1"));
        }
        let key = open_kek(&recipient, &sealed, host.host_id(), challenge, volume)
            .map_err(fatal_protocol)?;
        Ok(Kek { version: 1, key })
    })
}

/// Asks for KEK `version` of the volume; also returns the newest KEK when a
/// newer one exists.
pub fn unlock(
    cfg: &ClientConfig,
    host: &HostIdentity,
    volume_id: [u8; 16],
    version: u32,
) -> Result<Unlocked, ClientError> {
    let volume = VolumeId(volume_id);
    with_retries(cfg, |agent| {
        let (challenge, recipient, body) =
            signed_exchange(agent, cfg, host, Op::Unlock, volume, KekVersion(version))?;
        let (sealed, newest, rekey) = parse_key_response(&body).map_err(fatal_protocol)?;
        if sealed.version != KekVersion(version) {
            return Err(fatal_protocol("unlock returned another version"));
        }
        let open = |s: &protocol::SealedKek| {
            open_kek(&recipient, s, host.host_id(), challenge, volume)
                .map(|key| Kek {
                    version: s.version.0,
                    key,
                })
                .map_err(fatal_protocol)
        };
        Ok(Unlocked {
            kek: open(&sealed)?,
            newest: newest.as_ref().map(open).transpose()?,
            rekey,
        })
    })
}

/// Reports that this host's copy of the volume key is now wrapped under
/// `version`, so older versions can be retired.
pub fn report_rewrapped(
    cfg: &ClientConfig,
    host: &HostIdentity,
    volume_id: [u8; 16],
    version: u32,
) -> Result<(), ClientError> {
    let volume = VolumeId(volume_id);
    with_retries(cfg, |agent| {
        let (_, _, body) =
            signed_exchange(agent, cfg, host, Op::Rewrapped, volume, KekVersion(version))?;
        let resp = parse_rewrapped_response(&body).map_err(fatal_protocol)?;
        if resp.wrapped_version < version {
            return Err(fatal_protocol("rewrapped recorded an older version"));
        }
        Ok(())
    })
}

/// Reports that the volume's data is sealed under a new data key (after
/// the server asked for it: the volume was declared compromised). Returns
/// whether the server's compromise mark was cleared.
pub fn report_rekeyed(
    cfg: &ClientConfig,
    host: &HostIdentity,
    volume_id: [u8; 16],
) -> Result<bool, ClientError> {
    let volume = VolumeId(volume_id);
    with_retries(cfg, |agent| {
        let (_, _, body) =
            signed_exchange(agent, cfg, host, Op::Rekeyed, volume, KekVersion::FIRST)?;
        let resp = parse_rekeyed_response(&body).map_err(fatal_protocol)?;
        Ok(resp.cleared)
    })
}

/// Asks the key server to destroy every KEK of the volume (crypto-erase);
/// returns the versions destroyed. Only a host authorized for the volume
/// may; the server audits it. After it, no unlock of the volume succeeds.
pub fn erase_volume(
    cfg: &ClientConfig,
    host: &HostIdentity,
    volume_id: [u8; 16],
) -> Result<Vec<u32>, ClientError> {
    let volume = VolumeId(volume_id);
    with_retries(cfg, |agent| {
        let (_, _, body) = signed_exchange(agent, cfg, host, Op::Erase, volume, KekVersion::FIRST)?;
        let resp = parse_erased_response(&body).map_err(fatal_protocol)?;
        Ok(resp.destroyed)
    })
}

/// What each server of a failed [`quorum`] said, by its index.
pub type Failures = Vec<(usize, ClientError)>;

/// Asks every server at once, each on a thread of its own, and returns as
/// soon as `k` have answered: a slow, dead or black-holed server costs
/// nothing while `k` others answer. Answers that come later are dropped
/// (whatever key they carry is zeroized with them); their threads end on
/// their own, within the configured time-outs. Fails as soon as so many
/// servers have failed that `k` answers can no longer come, with every
/// failure so far (by index into `servers`). With `every`, waits for
/// every server's answer or failure instead (for rewrapping under every
/// server's newest KEK), and succeeds if `k` answered.
pub fn quorum<T: Send + 'static>(
    k: usize,
    servers: Vec<ClientConfig>,
    every: bool,
    ask: impl Fn(usize, &ClientConfig) -> Result<T, ClientError> + Send + Sync + 'static,
) -> Result<Vec<(usize, T)>, Failures> {
    let n = servers.len();
    if k == 0 || k > n {
        return Err(vec![(
            0,
            ClientError::Protocol(format!("a quorum of {k} out of {n} key servers")),
        )]);
    }
    if n == 1 {
        // Nothing to wait for in parallel: no thread.
        let cfg = servers.into_iter().next().expect("one server");
        return ask(0, &cfg).map(|v| vec![(0, v)]).map_err(|e| vec![(0, e)]);
    }
    let ask = Arc::new(ask);
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, cfg) in servers.into_iter().enumerate() {
        let (mine, ask) = (tx.clone(), ask.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("keyserver-{i}"))
            .stack_size(512 << 10)
            .spawn(move || {
                let _ = mine.send((i, ask(i, &cfg)));
            });
        if let Err(e) = spawned {
            let _ = tx.send((i, Err(ClientError::Protocol(format!("no thread: {e}")))));
        }
    }
    drop(tx);
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for (i, r) in rx {
        match r {
            Ok(v) => ok.push((i, v)),
            Err(e) => failed.push((i, e)),
        }
        if every {
            continue;
        }
        if ok.len() >= k {
            return Ok(ok);
        }
        if failed.len() > n - k {
            break;
        }
    }
    if ok.len() >= k {
        return Ok(ok);
    }
    Err(failed)
}

/// Outcome of one attempt.
enum Attempt {
    /// Worth another attempt after a pause.
    Retry(String),
    /// Final.
    Fatal(ClientError),
}

fn fatal_protocol(e: impl std::fmt::Display) -> Attempt {
    Attempt::Fatal(ClientError::Protocol(e.to_string()))
}

fn with_retries<T>(
    cfg: &ClientConfig,
    mut once: impl FnMut(&Agent) -> Result<T, Attempt>,
) -> Result<T, ClientError> {
    let agent = agent(cfg)?;
    let attempts = cfg.attempts.max(1);
    let mut pause = FIRST_BACKOFF;
    let mut last = String::new();
    for i in 0..attempts {
        if i > 0 {
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_BACKOFF);
        }
        match once(&agent) {
            Ok(v) => return Ok(v),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(why)) => last = why,
        }
    }
    Err(ClientError::Unreachable {
        url: cfg.url.clone(),
        attempts,
        last,
    })
}

fn agent(cfg: &ClientConfig) -> Result<Agent, ClientError> {
    if !cfg.url.starts_with("https://") {
        return Err(ClientError::Protocol(format!(
            "key server URL {} must start with https://",
            cfg.url
        )));
    }
    let pem = cfg.ca_pem.as_deref().ok_or_else(|| {
        ClientError::Protocol(format!(
            "no CA certificate to trust for {}: --ca is required (system roots are not used)",
            cfg.url
        ))
    })?;
    let mut roots: Vec<Certificate<'static>> = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item {
            Ok(PemItem::Certificate(c)) => roots.push(c),
            Ok(_) => {}
            Err(e) => return Err(ClientError::Protocol(format!("CA PEM: {e}"))),
        }
    }
    if roots.is_empty() {
        return Err(ClientError::Protocol(
            "the CA PEM holds no certificate".to_string(),
        ));
    }
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .build();
    let config = Agent::config_builder()
        .https_only(true)
        .http_status_as_error(false)
        .timeout_global(Some(cfg.timeout))
        .input_buffer_size(BUFFER_SIZE)
        .output_buffer_size(BUFFER_SIZE)
        .tls_config(tls)
        .build();
    Ok(Agent::with_parts(
        config,
        DefaultConnector::default(),
        LiteralFirst::default(),
    ))
}

/// Resolves a URL whose host is an IP address by parsing it, and any other
/// host through ureq's own resolver. With a time-out set, ureq's resolver
/// starts a thread for every connection, even to `127.0.0.1`; key server
/// URLs are usually addresses, and a boot storm of unlocks paid a thread
/// start and exit per server for nothing.
#[derive(Debug, Default)]
struct LiteralFirst(DefaultResolver);

impl Resolver for LiteralFirst {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let host = uri.host().unwrap_or_default();
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .parse::<std::net::IpAddr>();
        match (literal, uri.port_u16()) {
            (Ok(ip), Some(port)) => {
                let mut out = self.empty();
                out.push(std::net::SocketAddr::new(ip, port));
                Ok(out)
            }
            _ => self.0.resolve(uri, config, timeout),
        }
    }
}

/// One challenge and one signed request over the agent's connection.
fn signed_exchange(
    agent: &Agent,
    cfg: &ClientConfig,
    host: &HostIdentity,
    op: Op,
    volume: VolumeId,
    version: KekVersion,
) -> Result<(Challenge, Recipient, Vec<u8>), Attempt> {
    let req = ChallengeRequest {
        host: host.public_hex(),
    };
    let body = post(agent, cfg, "/v1/challenge", &req)?;
    let challenge = parse_challenge_response(&body).map_err(fatal_protocol)?;
    let recipient = Recipient::generate();
    let client_key = if op.releases_key() {
        recipient.public()
    } else {
        [0; 32]
    };
    let signed = SignedRequest::sign(op, &host.key, volume, version, challenge, client_key);
    let body = post(agent, cfg, op.path(), &signed.to_body())?;
    Ok((challenge, recipient, body))
}

fn post(
    agent: &Agent,
    cfg: &ClientConfig,
    path: &str,
    body: &impl serde::Serialize,
) -> Result<Vec<u8>, Attempt> {
    let url = format!("{}{}", cfg.url.trim_end_matches('/'), path);
    let json = serde_json::to_vec(body).map_err(fatal_protocol)?;
    let mut resp = agent
        .post(&url)
        .header("content-type", "application/json")
        .send(&json[..])
        .map_err(|e| classify(cfg, e))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(MAX_RESPONSE)
        .read_to_vec()
        .map_err(|e| classify(cfg, e))?;
    match status {
        200 => Ok(bytes),
        500..=599 => Err(Attempt::Retry(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ))),
        _ => {
            let err = parse_error_body(&bytes).map_err(|e| {
                fatal_protocol(format!(
                    "HTTP {status} from {url} with a bad error body: {e}"
                ))
            })?;
            match Refusal::from_code(&err.error) {
                Some(reason) => Err(Attempt::Fatal(ClientError::Refused {
                    reason,
                    message: err.message,
                })),
                None => Err(fatal_protocol(format!(
                    "HTTP {status} from {url}: {}: {}",
                    err.error, err.message
                ))),
            }
        }
    }
}

/// Finds a rustls error inside a ureq error, if any.
fn rustls_error(e: &ureq::Error) -> Option<&rustls::Error> {
    match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => io.get_ref().and_then(|inner| inner.downcast_ref()),
        _ => None,
    }
}

fn classify(cfg: &ClientConfig, e: ureq::Error) -> Attempt {
    if let Some(r) = rustls_error(&e) {
        if matches!(
            r,
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
        ) {
            return Attempt::Fatal(ClientError::CertificateMismatch {
                url: cfg.url.clone(),
                detail: r.to_string(),
            });
        }
    }
    match e {
        ureq::Error::Io(_)
        | ureq::Error::Timeout(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::HostNotFound
        | ureq::Error::Rustls(_)
        | ureq::Error::Protocol(_) => Attempt::Retry(e.to_string()),
        other => fatal_protocol(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfgs(n: usize) -> Vec<ClientConfig> {
        (0..n)
            .map(|i| ClientConfig {
                url: format!("https://127.0.0.1:{}", 1 + i),
                ca_pem: None,
                timeout: Duration::from_secs(1),
                attempts: 1,
            })
            .collect()
    }

    fn refused() -> ClientError {
        ClientError::Refused {
            reason: Refusal::Revoked,
            message: "revoked".into(),
        }
    }

    #[test]
    fn a_quorum_goes_on_at_k_and_fails_as_soon_as_k_cannot_come() {
        // Server 2 hangs for 5 s: two of three answer at once.
        let t0 = std::time::Instant::now();
        let got = quorum(2, cfgs(3), false, |i, _| {
            if i == 2 {
                std::thread::sleep(Duration::from_secs(5));
            }
            Ok(i)
        })
        .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        let mut who: Vec<usize> = got.iter().map(|(i, _)| *i).collect();
        who.sort();
        assert_eq!(who, [0, 1]);

        // Two refuse while the third hangs: 2 of 3 can no longer come, so
        // it fails at once with both refusals.
        let t0 = std::time::Instant::now();
        let failed = quorum(2, cfgs(3), false, |i, _| match i {
            2 => {
                std::thread::sleep(Duration::from_secs(5));
                Ok(())
            }
            _ => Err(refused()),
        })
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(failed.len(), 2);

        // One refusal of three is fine.
        let got = quorum(2, cfgs(3), false, |i, _| {
            if i == 0 {
                Err(refused())
            } else {
                Ok(i)
            }
        });
        assert_eq!(got.unwrap().len(), 2);
        // `every` waits for all and keeps every answer.
        let got = quorum(2, cfgs(3), true, |i, _| {
            std::thread::sleep(Duration::from_millis(50 * i as u64));
            Ok(i)
        });
        assert_eq!(got.unwrap().len(), 3);
        // A quorum that cannot exist is an error, not a hang.
        assert!(quorum(4, cfgs(3), false, |_, _| Ok(())).is_err());
        assert!(quorum(0, cfgs(3), false, |_, _| Ok(())).is_err());
    }

    #[test]
    fn identity_round_trip_and_debug_hides_secret() {
        let id = HostIdentity::generate();
        let again = HostIdentity::from_secret(&id.secret());
        assert_eq!(id.public_hex(), again.public_hex());
        assert_eq!(id.public_hex().len(), 64);
        let dbg = format!("{id:?}");
        assert!(dbg.contains(&id.public_hex()));
        assert!(!dbg.contains(&hex::encode(*id.secret())));
        let kek = Kek {
            version: 3,
            key: Zeroizing::new([0xab; 32]),
        };
        assert!(!format!("{kek:?}").contains("abab"));
    }

    #[test]
    fn address_urls_resolve_without_the_resolver() {
        use ureq::unversioned::transport::time::Duration as UreqDuration;
        // A time-out of zero: ureq's resolver, which waits for a thread of
        // its own with it, cannot answer in time; an address needs no wait.
        let no_time = NextTimeout {
            after: UreqDuration::Exact(Duration::ZERO),
            reason: ureq::Timeout::Global,
            per_read: None,
            per_write: None,
        };
        let config = ureq::config::Config::default();
        let r = LiteralFirst::default();
        for (url, want) in [
            ("https://127.0.0.1:8443/v1/unlock", "127.0.0.1:8443"),
            ("https://[::1]:9/", "[::1]:9"),
            ("https://10.1.2.3:443", "10.1.2.3:443"),
        ] {
            let uri: ureq::http::Uri = url.parse().unwrap();
            let got = r.resolve(&uri, &config, no_time).unwrap();
            assert_eq!(got.len(), 1, "{url}");
            assert_eq!(got[0].to_string(), want, "{url}");
        }
        // A name goes to ureq's resolver (here with time to answer).
        let uri: ureq::http::Uri = "https://localhost:7/".parse().unwrap();
        let some_time = NextTimeout {
            after: UreqDuration::Exact(Duration::from_secs(10)),
            ..no_time
        };
        let got = r.resolve(&uri, &config, some_time).unwrap();
        assert!(
            got.iter().all(|a| a.port() == 7 && a.ip().is_loopback()),
            "{got:?}"
        );
    }

    #[test]
    fn config_errors_are_not_retried() {
        let mut cfg = ClientConfig {
            url: "http://127.0.0.1:1".into(),
            ca_pem: None,
            timeout: Duration::from_secs(1),
            attempts: 3,
        };
        let id = HostIdentity::generate();
        let e = unlock(&cfg, &id, [0; 16], 1).unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
        cfg.url = "https://127.0.0.1:1".into();
        let e = unlock(&cfg, &id, [0; 16], 1).unwrap_err();
        assert!(e.to_string().contains("--ca"), "{e}");
        cfg.ca_pem = Some(b"not a pem".to_vec());
        let e = unlock(&cfg, &id, [0; 16], 1).unwrap_err();
        assert!(matches!(e, ClientError::Protocol(_)), "{e}");
    }
}
