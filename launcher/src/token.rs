//! A VM's API token: 32 random bytes as hex, kept on the host in a 0600
//! file; the VM only ever sees its SHA-256 (on the config disk), so a copy
//! of the disk does not grant access.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Errors making or reading a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The kernel's random source failed.
    #[error("no randomness for the API token: {0}")]
    Random(String),
    /// The token file cannot be written or read.
    #[error("the token file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A fresh token: 32 random bytes, 64 hex digits.
///
/// # Errors
/// [`TokenError::Random`] when `getrandom` fails.
pub fn generate() -> Result<String, TokenError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| TokenError::Random(e.to_string()))?;
    Ok(hex(&bytes))
}

/// The SHA-256 of `token` as 64 hex digits (what the guest checks against).
#[must_use]
pub fn sha256_hex(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Writes `token` to `path`, readable by root only (replacing a file left
/// by an interrupted create).
///
/// # Errors
/// [`TokenError::File`].
pub fn write(path: &Path, token: &str) -> Result<(), TokenError> {
    let err = |source| TokenError::File {
        path: path.to_owned(),
        source,
    };
    nestbox_durable::write_atomic(path, format!("{token}\n").as_bytes(), 0o600)
        .map_err(|e| err(e.into()))
}

/// Reads the token at `path`.
///
/// # Errors
/// [`TokenError::File`].
pub fn read(path: &Path) -> Result<String, TokenError> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_owned())
        .map_err(|source| TokenError::File {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn tokens_are_64_hex_digits_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.len(), 64);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }

    #[test]
    fn the_hash_is_sha256_hex() {
        // printf %s test | sha256sum
        assert_eq!(
            sha256_hex("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn the_file_is_private_and_reads_back() {
        let path = std::env::temp_dir().join(format!("nb-token-{}", std::process::id()));
        write(&path, "abc").unwrap();
        write(&path, "def").unwrap();
        assert_eq!(read(&path).unwrap(), "def");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_file(&path).unwrap();
    }
}
