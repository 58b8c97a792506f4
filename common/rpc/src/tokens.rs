//! Bearer tokens of fireflyer's services: making them, storing only their SHA-256, and the
//! administrator's token file every replica of a group shares.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use sha2::{Digest, Sha256};

/// A new random token: 32 bytes as 64 hex digits.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `token`: what services store and look tokens up by.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Reads the administrator's token from `path`. A single-replica group creates it (mode 0600)
/// if missing; the replicas of a larger group must all be given the same file, since any of
/// them may judge a request.
pub fn admin_token(
    path: &Path,
    may_create: bool,
    make_command: &str,
) -> Result<String, std::io::Error> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the file is empty; delete it to have a new token made",
            ));
        }
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        Err(_) if !may_create => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "missing; a group of several replicas needs one token shared by all: \
                     make one with `{make_command} > FILE` and give every replica that file"
                ),
            ));
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let token = new_token();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(file, "{token}")?;
    file.sync_all()?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAKE: &str = "fs3 admin new-token";

    #[test]
    fn a_single_replica_makes_its_token_and_a_group_must_be_given_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("admin.token");
        let refused = admin_token(&path, false, MAKE).unwrap_err().to_string();
        assert!(refused.contains("fs3 admin new-token"), "{refused}");
        assert!(!path.exists());
        let made = admin_token(&path, true, MAKE).unwrap();
        assert_eq!(made.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert_eq!(
            admin_token(&path, false, MAKE).unwrap(),
            made,
            "read back, not remade"
        );
        std::fs::write(&path, "  \n").unwrap();
        assert!(
            admin_token(&path, true, MAKE).is_err(),
            "an empty file is refused"
        );
    }
}
