//! Key files: a KEK in a small text file, created with mode 0600.
//!
//! Format (one line): `lsvfs-key-v1 <64 hex digits>\n`.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use zeroize::Zeroizing;

use crate::crypto::{Kek, KEY_LEN};
use crate::keys::{KeysError, Result};

const PREFIX: &str = "lsvfs-key-v1 ";

/// Creates a new key file with a random KEK. Refuses to overwrite.
pub fn generate_key_file(path: &Path) -> Result<Kek> {
    let kek = Kek::generate().map_err(|e| KeysError::Invalid(e.to_string()))?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| KeysError::io(format!("creating key file {}", path.display()), e))?;
    let mut line = Zeroizing::new(String::with_capacity(PREFIX.len() + 2 * KEY_LEN + 1));
    line.push_str(PREFIX);
    for b in kek.expose() {
        line.push(char::from_digit((b >> 4) as u32, 16).expect("nibble"));
        line.push(char::from_digit((b & 15) as u32, 16).expect("nibble"));
    }
    line.push('\n');
    f.write_all(line.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| KeysError::io(format!("writing key file {}", path.display()), e))?;
    Ok(kek)
}

/// Reads a key file. Refuses files that others can read or write.
pub fn read_key_file(path: &Path) -> Result<Kek> {
    let f = std::fs::File::open(path)
        .map_err(|e| KeysError::io(format!("opening key file {}", path.display()), e))?;
    let meta = f
        .metadata()
        .map_err(|e| KeysError::io(format!("reading key file {}", path.display()), e))?;
    if meta.mode() & 0o077 != 0 {
        return Err(KeysError::Invalid(format!(
            "key file {} is accessible by group or others (mode {:o}); run: chmod 600 {}",
            path.display(),
            meta.mode() & 0o777,
            path.display()
        )));
    }
    let mut text = Zeroizing::new(Vec::new());
    f.take(4096)
        .read_to_end(&mut text)
        .map_err(|e| KeysError::io(format!("reading key file {}", path.display()), e))?;
    parse_key_file(&text, path)
}

/// Parses a key file's bytes (`path` only names it in errors): untrusted
/// input, validated before any byte becomes key material.
pub fn parse_key_file(text: &[u8], path: &Path) -> Result<Kek> {
    let bad = || {
        KeysError::Invalid(format!(
            "{} is not an lsvfs key file (expected one line: {PREFIX}<64 hex digits>); make one with `lsvfs keygen`",
            path.display()
        ))
    };
    let text = std::str::from_utf8(text).map_err(|_| bad())?;
    let hex = text.trim_end().strip_prefix(PREFIX).ok_or_else(bad)?;
    if hex.len() != 2 * KEY_LEN {
        return Err(bad());
    }
    // Decoded straight into the KEK's locked memory.
    let kek = Kek::fill(|key| {
        for (i, out) in key.iter_mut().enumerate() {
            let hi = hex.as_bytes()[2 * i];
            let lo = hex.as_bytes()[2 * i + 1];
            let d = |c: u8| (c as char).to_digit(16);
            match (d(hi), d(lo)) {
                (Some(h), Some(l)) => *out = (h * 16 + l) as u8,
                _ => return Err(bad()),
            }
        }
        Ok(())
    })??;
    Ok(kek)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trip_mode_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let kek = generate_key_file(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(read_key_file(&p).unwrap().expose(), kek.expose());
        assert!(generate_key_file(&p).is_err(), "must not overwrite");
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let e = read_key_file(&p).err().unwrap().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        let g = dir.path().join("g");
        std::fs::write(&g, "hello\n").unwrap();
        std::fs::set_permissions(&g, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert!(read_key_file(&g)
            .err()
            .unwrap()
            .to_string()
            .contains("not an lsvfs key file"));
    }
}
