//! The server's configuration file (TOML) and where secrets come from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ServerError;

/// Default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/lsvfs-keyserver/config.toml";
/// Default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/lsvfs-keyserver/admin.sock";
/// Name of the systemd credential holding the master key.
pub const MASTER_KEY_CREDENTIAL: &str = "master-key";
/// Name of the systemd credential holding the TLS private key.
pub const TLS_KEY_CREDENTIAL: &str = "tls-key";

fn default_admin_socket() -> PathBuf {
    PathBuf::from(DEFAULT_ADMIN_SOCKET)
}

fn default_master_key() -> PathBuf {
    PathBuf::from("/etc/lsvfs-keyserver/master-key")
}

fn default_lifetime() -> u64 {
    30
}

/// `config.toml`; docs/PROTOCOL.md ("Running the server") lists the keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on, e.g. `0.0.0.0:8443`; port 0 picks a free port.
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub tls_cert: PathBuf,
    /// PEM private key; `$CREDENTIALS_DIRECTORY/tls-key` wins when present.
    pub tls_key: PathBuf,
    /// Directory holding the database.
    pub state_dir: PathBuf,
    /// Admin socket path.
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// Master key file (64 hex digits); `$CREDENTIALS_DIRECTORY/master-key`
    /// wins when present.
    #[serde(default = "default_master_key")]
    pub master_key: PathBuf,
    /// Challenge lifetime in seconds (1 to 3600).
    #[serde(default = "default_lifetime")]
    pub challenge_lifetime_secs: u64,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ServerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
        Config::parse(&text).map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if !(1..=3600).contains(&cfg.challenge_lifetime_secs) {
            return Err("challenge_lifetime_secs must be between 1 and 3600".into());
        }
        Ok(cfg)
    }

    /// The challenge lifetime.
    pub fn challenge_lifetime(&self) -> Duration {
        Duration::from_secs(self.challenge_lifetime_secs)
    }

    /// The master key file: the systemd credential if present, else
    /// `master_key`.
    pub fn master_key_path(&self) -> PathBuf {
        credential(MASTER_KEY_CREDENTIAL).unwrap_or_else(|| self.master_key.clone())
    }

    /// The TLS key file: the systemd credential if present, else `tls_key`.
    pub fn tls_key_path(&self) -> PathBuf {
        credential(TLS_KEY_CREDENTIAL).unwrap_or_else(|| self.tls_key.clone())
    }
}

fn credential(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let p = Path::new(&dir).join(name);
    p.exists().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_defaults_and_rejects() {
        let base = r#"
            listen = "127.0.0.1:0"
            tls_cert = "/c.pem"
            tls_key = "/k.pem"
            state_dir = "/var/lib/x"
        "#;
        let c = Config::parse(base).unwrap();
        assert_eq!(c.challenge_lifetime(), Duration::from_secs(30));
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert!(Config::parse(&format!("{base}\nchallenge_lifetime_secs = 0")).is_err());
        assert!(Config::parse(&format!("{base}\nunknown_key = 1")).is_err());
        assert!(Config::parse("listen = \"nonsense\"").is_err());
    }

    #[test]
    fn shipped_sample_config_parses() {
        let c = Config::parse(include_str!("../../systemd/config.toml")).unwrap();
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert_eq!(c.challenge_lifetime_secs, 30);
    }
}
