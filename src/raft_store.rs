//! The server's raft data directory as the agent sees it: whether it holds a store, and
//! moving one aside. The agent never deletes raft data: a store it cannot use is renamed to
//! `<data_dir>.removed-<UTC time>` beside it (same file system, so a rename) and kept for
//! the operator.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Whether `data_dir` holds a raft store (OpenBao and Vault write `raft/raft.db` and
/// `vault.db` there).
pub fn present(data_dir: &Path) -> bool {
    data_dir.join("raft/raft.db").is_file() && data_dir.join("vault.db").is_file()
}

/// `<data_dir>.removed-<UTC time>` beside the data directory.
pub fn aside_path(data_dir: &Path) -> PathBuf {
    let now = aws_smithy_types::DateTime::from(std::time::SystemTime::now());
    let stamp = now
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default();
    // 2026-11-23T21:44:51.956Z -> 20261123T214451Z
    let stamp = format!(
        "{}Z",
        stamp
            .split('.')
            .next()
            .unwrap_or("")
            .trim_end_matches('Z')
            .replace([':', '-'], "")
    );
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    data_dir.with_file_name(format!("{name}.removed-{stamp}"))
}

/// Renames `data_dir` aside (the server must be stopped) and makes the rename durable;
/// returns where it went. The next server start finds an empty store.
pub fn move_aside(data_dir: &Path) -> Result<PathBuf> {
    let mut aside = aside_path(data_dir);
    // Two moves within one second (a crash loop) must not collide.
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = PathBuf::from(format!("{}.{n}", aside_path(data_dir).display()));
    }
    std::fs::rename(data_dir, &aside)
        .map_err(|e| Error::write(&aside, format!("move raft data aside: {e}")))?;
    if let Some(parent) = data_dir.parent() {
        crate::fsutil::sync_dir(parent)?;
    }
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_aside_keeps_the_store_and_never_collides() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir_all(data.join("raft")).unwrap();
        std::fs::write(data.join("raft/raft.db"), "r").unwrap();
        std::fs::write(data.join("vault.db"), "v").unwrap();
        assert!(present(&data));
        let a = move_aside(&data).unwrap();
        assert!(!data.exists() && !present(&data));
        assert_eq!(std::fs::read(a.join("vault.db")).unwrap(), b"v");
        std::fs::create_dir_all(&data).unwrap();
        let b = move_aside(&data).unwrap();
        assert_ne!(a, b);
        assert!(a.exists() && b.exists());
    }
}
