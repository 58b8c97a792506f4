//! Opening the redb databases that fireflyer services keep their durable state in (ADR 001).
//!
//! [`open`] creates or opens a database file, optionally verifying every page checksum first,
//! and turns every way that can fail — another process holding the file, a damaged file, even a
//! panic inside redb on a file it cannot make sense of — into an [`OpenError`] that names the
//! file and says what to do.

use std::path::Path;

use redb::Database;

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process has the file open.
    #[error("{path} is already open in another process; is another daemon using this directory?")]
    InUse {
        /// The file.
        path: String,
    },
    /// The file is not a valid database (damaged, truncated, or not redb at all).
    #[error("cannot open {path}: {reason}. The file is damaged; restore it from a replica")]
    Damaged {
        /// The file.
        path: String,
        /// What redb said.
        reason: String,
    },
    /// The file could not be read or written.
    #[error("cannot open {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Creates (if missing) and opens the database at `path`; with `verify`, every page checksum
/// is checked before the database is used, so a damaged file is refused instead of trusted.
pub fn open(path: &Path, verify: bool) -> Result<Database, OpenError> {
    let display = path.display().to_string();
    let opened = std::panic::catch_unwind(|| {
        let mut builder = Database::builder();
        builder.set_check_integrity_on_open(verify);
        builder.create(path)
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
            Err(OpenError::InUse { path: display })
        }
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(error))))
            if error.kind() != std::io::ErrorKind::InvalidData =>
        {
            Err(OpenError::Io {
                path: display,
                reason: error.to_string(),
            })
        }
        Ok(Err(error)) => Err(OpenError::Damaged {
            path: display,
            reason: error.to_string(),
        }),
        Err(_) => Err(OpenError::Damaged {
            path: display,
            reason: "redb could not read it".to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_second_opens_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        let db = open(&path, true).unwrap();
        assert!(matches!(open(&path, true), Err(OpenError::InUse { .. })));
        drop(db);
        std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
        let error = open(&path, true).unwrap_err();
        assert!(matches!(error, OpenError::Damaged { .. }), "{error}");
        assert!(error.to_string().contains("x.redb"));
    }
}
