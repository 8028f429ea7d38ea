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

/// Which of `ids` the store names as raft servers. The agent cannot open the server's log
/// store, but needs no more than this: hashicorp/raft keeps every configuration change as
/// a log entry whose server IDs are plain bytes in `raft/raft.db` (msgpack, not
/// compressed), and a snapshot's `meta.json` lists its configuration. An ID found there
/// was, at some point, in this store's raft configuration: positive evidence that the
/// server joined this store's cluster. Node IDs are instance ids, so a match by accident is
/// not a concern. Read in chunks: a store that served a while can be large.
pub fn names_servers(data_dir: &Path, ids: &[String]) -> std::io::Result<Vec<String>> {
    use std::io::Read;
    let ids: Vec<&String> = ids.iter().filter(|i| !i.is_empty()).collect();
    let mut found = vec![false; ids.len()];
    let mut files = vec![data_dir.join("raft/raft.db")];
    if let Ok(snaps) = std::fs::read_dir(data_dir.join("raft/snapshots")) {
        files.extend(snaps.flatten().map(|e| e.path().join("meta.json")));
    }
    let overlap = ids.iter().map(|i| i.len()).max().unwrap_or(0);
    for f in files {
        let mut file = match std::fs::File::open(&f) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut window: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            window.extend_from_slice(&chunk[..n]);
            for (k, id) in ids.iter().enumerate() {
                found[k] = found[k] || window.windows(id.len()).any(|w| w == id.as_bytes());
            }
            // Keep the tail, so an ID across two chunks is still seen.
            let keep = window.len().saturating_sub(overlap);
            window.drain(..keep);
        }
    }
    Ok(ids
        .into_iter()
        .zip(found)
        .filter(|(_, f)| *f)
        .map(|(i, _)| i.clone())
        .collect())
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

/// Moves the store aside (the server must be stopped) and makes the move durable; returns
/// where it went. The next server start finds an empty store. The whole directory is
/// renamed beside itself; when it is a mount point of its own (a data volume), which cannot
/// be renamed, its entries move into `<data_dir>/removed-<UTC time>/` on that volume.
pub fn move_aside(data_dir: &Path) -> Result<PathBuf> {
    match rename_aside(data_dir) {
        Ok(p) => Ok(p),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc_errno::EXDEV | libc_errno::EBUSY)
            ) =>
        {
            move_entries_aside(data_dir)
        }
        Err(e) => Err(Error::write(data_dir, format!("move raft data aside: {e}"))),
    }
}

/// errno values of a rename that cannot move a mount point.
mod libc_errno {
    pub const EBUSY: i32 = 16;
    pub const EXDEV: i32 = 18;
}

fn rename_aside(data_dir: &Path) -> std::io::Result<PathBuf> {
    let mut aside = aside_path(data_dir);
    // Two moves within one second (a crash loop) must not collide.
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = PathBuf::from(format!("{}.{n}", aside_path(data_dir).display()));
    }
    std::fs::rename(data_dir, &aside)?;
    if let Some(parent) = data_dir.parent() {
        crate::fsutil::sync_dir(parent).map_err(std::io::Error::other)?;
    }
    Ok(aside)
}

/// The store's entries into a new `removed-<UTC time>` directory inside `data_dir`, which
/// stays (and stays mounted).
fn move_entries_aside(data_dir: &Path) -> Result<PathBuf> {
    let name = aside_path(data_dir)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stamp = name.rsplit("removed-").next().unwrap_or("aside").to_owned();
    move_entries_into(data_dir, &stamp)
}

fn move_entries_into(data_dir: &Path, stamp: &str) -> Result<PathBuf> {
    // Two moves within one second share a stamp: the second takes the next free suffix,
    // as `rename_aside` does, instead of failing on the first one's directory.
    let mut aside = data_dir.join(format!("removed-{stamp}"));
    let mut n = 1;
    loop {
        match std::fs::create_dir(&aside) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => {
                n += 1;
                aside = data_dir.join(format!("removed-{stamp}.{n}"));
            }
            Err(e) => {
                return Err(Error::write(
                    &aside,
                    format!("create the aside directory: {e}"),
                ))
            }
        }
    }
    let entries = std::fs::read_dir(data_dir)
        .map_err(|e| Error::write(data_dir, format!("list the raft data: {e}")))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| Error::write(data_dir, format!("list the raft data: {e}")))?;
        let from = entry.path();
        // Earlier asides stay where they are.
        if entry.file_name().to_string_lossy().starts_with("removed-") {
            continue;
        }
        let to = aside.join(entry.file_name());
        std::fs::rename(&from, &to)
            .map_err(|e| Error::write(&from, format!("move raft data aside: {e}")))?;
    }
    crate::fsutil::sync_dir(&aside)?;
    crate::fsutil::sync_dir(data_dir)?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_a_store_names_are_found_in_its_log_and_snapshots() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir_all(data.join("raft/snapshots/2-10-1")).unwrap();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let want = ids(&["i-0aaa", "i-0bbb", "i-0ccc"]);
        assert!(names_servers(&data, &want).unwrap().is_empty());
        // Bytes around it as msgpack would have them; one ID across the 1 MiB chunk border.
        let mut log = vec![0u8; (1 << 20) - 3];
        log.extend_from_slice(b"i-0aaa\xa4");
        std::fs::write(data.join("raft/raft.db"), &log).unwrap();
        assert_eq!(names_servers(&data, &want).unwrap(), ids(&["i-0aaa"]));
        std::fs::write(
            data.join("raft/snapshots/2-10-1/meta.json"),
            r#"{"Configuration":{"Servers":[{"ID":"i-0ccc"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            names_servers(&data, &want).unwrap(),
            ids(&["i-0aaa", "i-0ccc"])
        );
        // An ID that only begins like one found is not found.
        assert!(names_servers(&data, &ids(&["i-0aaab"])).unwrap().is_empty());
    }

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

    #[test]
    fn a_data_volume_keeps_its_mount_point_and_its_store_moves_inside() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir_all(data.join("raft")).unwrap();
        std::fs::write(data.join("raft/raft.db"), "r").unwrap();
        std::fs::write(data.join("vault.db"), "v").unwrap();
        let a = move_entries_aside(&data).unwrap();
        assert!(data.is_dir() && !present(&data));
        assert!(a.starts_with(&data));
        assert_eq!(std::fs::read(a.join("vault.db")).unwrap(), b"v");
        assert_eq!(std::fs::read(a.join("raft/raft.db")).unwrap(), b"r");
        // A second move leaves the first aside directory where it is.
        // Within the same second too (the same stamp, given here so that the test does
        // not depend on the clock): each takes the next suffix.
        std::fs::write(data.join("vault.db"), "w").unwrap();
        let b = move_entries_into(&data, "T").unwrap();
        assert_eq!(b, data.join("removed-T"));
        assert!(a.exists() && b.exists() && a != b);
        assert_eq!(std::fs::read(b.join("vault.db")).unwrap(), b"w");
        std::fs::write(data.join("vault.db"), "x").unwrap();
        let c = move_entries_into(&data, "T").unwrap();
        assert_eq!(c, data.join("removed-T.2"));
        assert!(a.exists() && b.exists() && c.exists() && c != a && c != b);
        assert_eq!(std::fs::read(c.join("vault.db")).unwrap(), b"x");
        assert_eq!(std::fs::read(a.join("vault.db")).unwrap(), b"v");
    }
}
