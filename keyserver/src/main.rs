//! `lsvfs-keyserver`: runs the key server, talks to its admin socket, and
//! creates its master key and a self-signed certificate.
//!
//! Exit codes: 0 success, 1 failure, 2 usage error, 3 admin command refused.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use lsvfs_keyserver::admin::{self, AdminRequest, AdminResponse, DEFAULT_AUDIT_LIMIT};
use lsvfs_keyserver::server::config::{DEFAULT_ADMIN_SOCKET, DEFAULT_CONFIG};
use lsvfs_keyserver::server::{self, Config};
use lsvfs_keyserver::storage::MasterKey;

const EXIT_FAILURE: u8 = 1;
const EXIT_REFUSED: u8 = 3;

#[derive(Parser)]
#[command(
    name = "lsvfs-keyserver",
    version,
    about = "Key server for lsvfs volumes"
)]
struct Cli {
    /// More log detail: -v debug, -vv trace (or LSVFS_LOG=LEVEL).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (HTTPS API and admin socket) until SIGTERM.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Send a command to a running server's admin socket.
    Admin {
        /// Admin socket of the server.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
        /// Print the raw JSON response.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Create a new master key file (mode 0600; fails if FILE exists).
    GenMasterKey {
        /// Where to write it.
        file: PathBuf,
    },
    /// Create a self-signed TLS certificate and key (key mode 0600; fails if
    /// either file exists).
    GenCert {
        /// Certificate output (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Private key output (PEM).
        #[arg(long)]
        key: PathBuf,
        /// DNS names or IP addresses the certificate is valid for.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Write the manual pages (lsvfs-keyserver(8) and one per command)
    /// into DIR, for packaging.
    #[command(hide = true)]
    GenerateMan { dir: PathBuf },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Enroll a host: NAME and its public key (host id, 64 hex digits).
    Enroll { name: String, pubkey: String },
    /// Authorize HOST (name or id) for VOLUME (32 hex digits).
    Authorize { host: String, volume: String },
    /// Remove HOST from VOLUME's ACL.
    Deauthorize { host: String, volume: String },
    /// Revoke HOST; effective for its next request.
    Revoke { host: String },
    /// Create VOLUME with KEK v1 and no authorized host.
    CreateVolume { volume: String },
    /// Add KEK version n+1 to VOLUME.
    RotateKek { volume: String },
    /// Declare VOLUME compromised (audited): add KEK version n+1; at its
    /// next unlock each host rewraps under it, seals the volume's data
    /// again under a new data key (an online rekey) and reports when done.
    Compromise { volume: String },
    /// Crypto-erase VOLUME: destroy every KEK version, its ACL and its
    /// record (audited). No host can unlock it afterwards; irreversible.
    EraseVolume { volume: String },
    /// List enrolled hosts.
    ListHosts,
    /// List volumes, their KEK versions and who holds what.
    ListVolumes,
    /// Show the newest audit entries.
    Audit {
        /// Only this host (name or id).
        #[arg(long)]
        host: Option<String>,
        /// Only this volume.
        #[arg(long)]
        volume: Option<String>,
        /// Number of entries.
        #[arg(long, default_value_t = DEFAULT_AUDIT_LIMIT)]
        limit: usize,
    },
}

impl From<AdminCommand> for AdminRequest {
    fn from(c: AdminCommand) -> Self {
        match c {
            AdminCommand::Enroll { name, pubkey } => AdminRequest::Enroll { name, host: pubkey },
            AdminCommand::Authorize { host, volume } => AdminRequest::Authorize { host, volume },
            AdminCommand::Deauthorize { host, volume } => {
                AdminRequest::Deauthorize { host, volume }
            }
            AdminCommand::Revoke { host } => AdminRequest::Revoke { host },
            AdminCommand::CreateVolume { volume } => AdminRequest::CreateVolume { volume },
            AdminCommand::RotateKek { volume } => AdminRequest::RotateKek { volume },
            AdminCommand::Compromise { volume } => AdminRequest::Compromise { volume },
            AdminCommand::EraseVolume { volume } => AdminRequest::EraseVolume { volume },
            AdminCommand::ListHosts => AdminRequest::ListHosts,
            AdminCommand::ListVolumes => AdminRequest::ListVolumes,
            AdminCommand::Audit {
                host,
                volume,
                limit,
            } => AdminRequest::Audit {
                host,
                volume,
                limit,
            },
        }
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("lsvfs-keyserver: {msg}");
    ExitCode::from(EXIT_FAILURE)
}

fn write_new(path: &Path, mode: u32, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn main() -> ExitCode {
    // Before any key is loaded: no core dumps, no ptrace by the same user.
    lsvfs_keyserver::secret::harden_process();
    let cli = Cli::parse();
    lsvfs_keyserver::logging::init(
        "lsvfs-keyserver",
        cli.verbose,
        lsvfs_keyserver::logging::Journal::IfStderrIsJournal,
    );
    match cli.command {
        Command::Serve { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            match server::serve(&cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Admin {
            socket,
            json,
            command,
        } => {
            let resp = match admin::call(&socket, &command.into()) {
                Ok(r) => r,
                Err(e) => {
                    return fail(format!(
                        "admin socket {}: {e} (is the server running, and are you root?)",
                        socket.display()
                    ))
                }
            };
            if json {
                println!("{}", serde_json::to_string(&resp).unwrap_or_default());
            }
            match resp {
                AdminResponse::Ok { result } => {
                    if !json {
                        let text = admin::format_human(&result);
                        if !text.is_empty() {
                            println!("{text}");
                        }
                    }
                    ExitCode::SUCCESS
                }
                AdminResponse::Refused { message } => {
                    eprintln!("lsvfs-keyserver: refused: {message}");
                    ExitCode::from(EXIT_REFUSED)
                }
                AdminResponse::Error { message } => fail(format!("server error: {message}")),
            }
        }
        Command::GenerateMan { dir } => {
            let cmd = Cli::command();
            match std::fs::create_dir_all(&dir).and_then(|()| {
                for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                    let name = format!("lsvfs-keyserver-{}", sub.get_name());
                    let sub = sub.clone().bin_name(name.clone()).display_name(name);
                    clap_mangen::Man::new(sub).section("8").generate_to(&dir)?;
                }
                clap_mangen::Man::new(cmd).section("8").generate_to(&dir)?;
                Ok(())
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("writing manual pages to {}: {e}", dir.display())),
            }
        }
        Command::GenMasterKey { file } => match MasterKey::create_file(&file) {
            Ok(()) => {
                println!("wrote a new master key to {} (mode 0600)", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::GenCert { cert, key, names } => {
            let (cert_pem, key_pem) = match server::self_signed_cert(names) {
                Ok(x) => x,
                Err(e) => return fail(e),
            };
            if let Err(e) = write_new(&key, 0o600, key_pem.as_bytes()) {
                return fail(format!("{}: {e}", key.display()));
            }
            if let Err(e) = write_new(&cert, 0o644, cert_pem.as_bytes()) {
                return fail(format!("{}: {e}", cert.display()));
            }
            println!("wrote {} and {}", cert.display(), key.display());
            ExitCode::SUCCESS
        }
    }
}
