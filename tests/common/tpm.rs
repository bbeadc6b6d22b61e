//! A software TPM 2.0 for the TPM store tests.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True if a TPM answers a command (GetRandom) through `tcti`.
fn answers(tcti: &str) -> bool {
    use std::str::FromStr;
    let Ok(conf) = tss_esapi::TctiNameConf::from_str(tcti) else {
        return false;
    };
    tss_esapi::Context::new(conf).is_ok_and(|mut c| c.get_random(8).is_ok())
}

/// A software TPM 2.0 (`swtpm`, Debian package `swtpm`) on 127.0.0.1, with
/// its state in a directory of its own; killed on drop.
pub struct SoftTpm {
    _dir: tempfile::TempDir,
    child: Child,
    pub tcti: String,
}

impl SoftTpm {
    pub fn start() -> SoftTpm {
        Self::start_from(None)
    }

    /// A TPM whose state (NV memory, seeds) starts as a copy of the
    /// `tpm2-00.permall` in `state` (a frozen TPM).
    pub fn start_from(state: Option<&Path>) -> SoftTpm {
        let dir = tempfile::tempdir().unwrap();
        if let Some(s) = state {
            std::fs::copy(
                s.join("tpm2-00.permall"),
                dir.path().join("tpm2-00.permall"),
            )
            .unwrap();
        }
        // Ports picked here may be taken by another test's server before
        // swtpm binds them: then it exits, or the TCTI meets that server.
        // So: start it, and try again until a real TPM command answers.
        for _ in 0..10 {
            let (server, mut child) = Self::spawn(dir.path());
            let tcti = format!("swtpm:host=127.0.0.1,port={server}");
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                if answers(&tcti) {
                    return SoftTpm {
                        _dir: dir,
                        child,
                        tcti,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("swtpm did not start (10 tries)");
    }

    /// Starts swtpm on a free port and the next one up (where the swtpm
    /// TCTI finds its control channel).
    fn spawn(state: &Path) -> (u16, Child) {
        let server = (0..100)
            .find_map(|_| {
                let a = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
                let p = a.local_addr().ok()?.port();
                std::net::TcpListener::bind(("127.0.0.1", p.checked_add(1)?)).ok()?;
                Some(p)
            })
            .expect("two free ports in a row");
        let ctrl = server + 1;
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={server},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm (Debian package swtpm; scripts/setup.sh installs it)");
        (server, child)
    }

    /// Extends PCR 7 (SHA-256 bank): what a changed Secure Boot state does.
    pub fn extend_pcr7(&self) {
        use std::str::FromStr;
        use tss_esapi::handles::PcrHandle;
        use tss_esapi::interface_types::{
            algorithm::HashingAlgorithm, session_handles::AuthSession,
        };
        use tss_esapi::structures::{Digest, DigestValues};
        let mut ctx =
            tss_esapi::Context::new(tss_esapi::TctiNameConf::from_str(&self.tcti).unwrap())
                .unwrap();
        let mut v = DigestValues::new();
        v.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(vec![7u8; 32]).unwrap(),
        );
        ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.pcr_extend(PcrHandle::Pcr7, v)
        })
        .unwrap();
    }
}

impl Drop for SoftTpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
