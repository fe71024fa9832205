//! The data directory holds the embedded store (audit trail, memos, key hashes), the admin token
//! and the audit key: it is created `0700` and its files `0600`, and a looser directory or file
//! left by an older version is tightened at start (contract §12, "local secrets stay local").
//!
//! SQLite creates its `-wal` and `-shm` files with the database file's mode, so creating
//! `bulkhead.db` as `0600` before the store opens it covers them too.

use std::path::Path;

use anyhow::Context;

/// The store's file inside the data directory.
pub(crate) const DB_FILE: &str = "bulkhead.db";
/// Files Bulkhead keeps in the data directory.
const FILES: [&str; 6] = [DB_FILE, "bulkhead.db-wal", "bulkhead.db-shm", "admin-token", "serve.lock", "audit-key"];

/// Creates `dir` (mode 0700) and an empty store file (mode 0600) when missing, and tightens the
/// modes of what is already there.
#[cfg(unix)]
pub(crate) fn make_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    tighten(dir, 0o700)?;
    // An empty file is an empty SQLite database; creating it here fixes its mode.
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(DB_FILE))
        .with_context(|| format!("cannot create {}", dir.join(DB_FILE).display()))?;
    for name in FILES {
        let path = dir.join(name);
        if path.exists() {
            tighten(&path, 0o600)?;
        }
    }
    return Ok(());

    fn tighten(path: &Path, mode: u32) -> anyhow::Result<()> {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        let now = meta.permissions().mode() & 0o777;
        if now & !mode != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(now & mode))
                .with_context(|| format!("cannot restrict the mode of {}", path.display()))?;
            tracing::warn!(path = %path.display(), from = format!("{now:o}"), to = format!("{:o}", now & mode), "tightened the mode of a data file");
        }
        Ok(())
    }
}

#[cfg(not(unix))]
pub fn make_private(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}
