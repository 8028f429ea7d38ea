//! Atomic, owned, moded file writes.
//!
//! A file is written to a temp file in the same directory (created with its final mode, so a
//! secret is never readable by others even for a moment), chowned, fsynced, renamed over the
//! target, and the directory fsynced: a crash leaves the old file or the new one, never half
//! of either. Unchanged content is not rewritten (only owner and mode are corrected), so a
//! reboot does not touch what Vault already reads.

use crate::error::{Error, Result};
use nix::unistd::{Gid, Uid};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Owner and group to give a file; `None` keeps the writer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Owner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Owner {
    pub fn new(uid: u32, gid: u32) -> Self {
        Owner {
            uid: Some(uid),
            gid: Some(gid),
        }
    }
}

/// Looks up a system user: (uid, primary gid).
pub fn lookup_user(name: &str) -> Option<(u32, u32)> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
}

/// One file to write.
#[derive(Debug)]
pub struct FileSpec<'a> {
    pub path: &'a Path,
    pub contents: &'a [u8],
    pub mode: u32,
    pub owner: Owner,
}

/// What [`write_files`] did to each file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Written,
    Unchanged,
}

/// Writes one file atomically; see the module docs.
pub fn write_atomic(spec: &FileSpec<'_>) -> Result<Outcome> {
    Ok(write_files(std::slice::from_ref(spec))?[0])
}

/// Writes `value` as pretty JSON to `<dir>/<name>`, root-only (0600), atomically: the
/// agent's small state records (membership, init attempt, pending init).
pub fn write_record<T: serde::Serialize>(dir: &Path, name: &str, value: &T) -> Result<PathBuf> {
    let body = serde_json::to_vec_pretty(value).map_err(|e| Error::Internal(e.to_string()))?;
    ensure_dir(dir, 0o700, Owner::default())?;
    let path = dir.join(name);
    write_atomic(&FileSpec {
        path: &path,
        contents: &body,
        mode: 0o600,
        owner: Owner::default(),
    })?;
    Ok(path)
}

/// Removes `path` and makes the removal durable (the directory is fsynced); a file that is
/// already gone is not an error.
pub fn remove_durable(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::write(path, format!("remove: {e}"))),
    }
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Whether `path` already holds exactly `contents` (a missing or unreadable file does not).
/// The bytes read are zeroed when dropped: the file may be a private key.
pub fn holds(path: &Path, contents: &[u8]) -> bool {
    fs::read(path)
        .map(zeroize::Zeroizing::new)
        .is_ok_and(|on_disk| on_disk.as_slice() == contents)
}

/// Writes a set of files: all temp files are written and synced first, then renamed in
/// order, so a failure while writing leaves every target as it was.
pub fn write_files(specs: &[FileSpec<'_>]) -> Result<Vec<Outcome>> {
    let mut staged: Vec<(Option<tempfile::TempPath>, &FileSpec<'_>)> = Vec::new();
    for spec in specs {
        if holds(spec.path, spec.contents) {
            fix_owner_mode(spec)?;
            staged.push((None, spec));
            continue;
        }
        staged.push((Some(stage(spec)?), spec));
    }
    let mut outcomes = Vec::with_capacity(specs.len());
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (tmp, spec) in staged {
        match tmp {
            None => outcomes.push(Outcome::Unchanged),
            Some(tmp) => {
                tmp.persist(spec.path)
                    .map_err(|e| Error::write(spec.path, format!("rename: {}", e.error)))?;
                let dir = parent(spec.path);
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
                outcomes.push(Outcome::Written);
            }
        }
    }
    for dir in dirs {
        // The rename is durable only once the directory entry is.
        sync_dir(&dir)?;
    }
    Ok(outcomes)
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn stage(spec: &FileSpec<'_>) -> Result<tempfile::TempPath> {
    stage_with(spec.path, spec.mode, spec.owner, |f| {
        f.write_all(spec.contents)
    })
}

/// A synced temp file beside `path` with its final mode and owner, filled by `fill`.
fn stage_with(
    path: &Path,
    mode: u32,
    owner: Owner,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<tempfile::TempPath> {
    let dir = parent(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(mode));
    let mut tmp = builder
        .tempfile_in(&dir)
        .map_err(|e| Error::write(path, format!("temp file in {}: {e}", dir.display())))?;
    let file = tmp.as_file_mut();
    // The umask may have narrowed the mode given at creation; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| Error::write(path, format!("chmod: {e}")))?;
    chown_fd(file, owner).map_err(|e| Error::write(path, format!("chown: {e}")))?;
    fill(file)
        .and_then(|_| file.sync_all())
        .map_err(|e| Error::write(path, e))?;
    Ok(tmp.into_temp_path())
}

/// Writes one file atomically like [`write_atomic`], its contents streamed into the temp
/// file by `fill`: for files too large to hold in memory (a server binary is ~450 MB). It
/// always writes; the caller decides beforehand whether the contents changed.
pub fn write_atomic_from(
    path: &Path,
    mode: u32,
    owner: Owner,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = stage_with(path, mode, owner, fill)?;
    tmp.persist(path)
        .map_err(|e| Error::write(path, format!("rename: {}", e.error)))?;
    sync_dir(&parent(path))
}

/// Corrects the mode and owner of an existing file, as [`write_files`] does for a file
/// whose contents are unchanged.
pub fn set_owner_mode(path: &Path, mode: u32, owner: Owner) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| Error::write(path, e))?;
    let want_uid = owner.uid.unwrap_or(meta.uid());
    let want_gid = owner.gid.unwrap_or(meta.gid());
    if meta.uid() != want_uid || meta.gid() != want_gid {
        std::os::unix::fs::chown(path, Some(want_uid), Some(want_gid))
            .map_err(|e| Error::write(path, format!("chown: {e}")))?;
    }
    // After chown, which may clear set-id bits.
    if meta.mode() & 0o7777 != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| Error::write(path, format!("chmod: {e}")))?;
    }
    Ok(())
}

/// Points the symlink `link` at `target` atomically (a temp link renamed over it), as
/// `systemctl enable` does for a `.wants/` entry. Unchanged when it already points there.
pub fn symlink_atomic(target: &Path, link: &Path) -> Result<Outcome> {
    if fs::read_link(link).ok().as_deref() == Some(target) {
        return Ok(Outcome::Unchanged);
    }
    let dir = parent(link);
    let name = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", fastrand::u64(..)));
    std::os::unix::fs::symlink(target, &tmp)
        .map_err(|e| Error::write(link, format!("symlink in {}: {e}", dir.display())))?;
    if let Err(e) = fs::rename(&tmp, link) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::write(link, format!("rename: {e}")));
    }
    sync_dir(&dir)?;
    Ok(Outcome::Written)
}

/// Makes a rename or unlink in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::write(dir, format!("fsync of directory: {e}")))
}

fn chown_fd(file: &File, owner: Owner) -> nix::Result<()> {
    if owner.uid.is_none() && owner.gid.is_none() {
        return Ok(());
    }
    nix::unistd::fchown(
        file,
        owner.uid.map(Uid::from_raw),
        owner.gid.map(Gid::from_raw),
    )
}

fn fix_owner_mode(spec: &FileSpec<'_>) -> Result<()> {
    set_owner_mode(spec.path, spec.mode, spec.owner)
}

/// Creates `dir` (and parents) if missing, then sets its mode and owner.
pub fn ensure_dir(dir: &Path, mode: u32, owner: Owner) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::write(dir, format!("mkdir: {e}")))?;
    set_owner_mode(dir, mode, owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn writes_with_mode_and_reports_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("server.key");
        let spec = FileSpec {
            path: &p,
            contents: b"secret",
            mode: 0o600,
            owner: Owner::default(),
        };
        assert_eq!(write_atomic(&spec).unwrap(), Outcome::Written);
        assert_eq!(fs::read(&p).unwrap(), b"secret");
        assert_eq!(mode_of(&p), 0o600);
        assert_eq!(write_atomic(&spec).unwrap(), Outcome::Unchanged);
        // A loosened mode is corrected even when the content is the same.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(write_atomic(&spec).unwrap(), Outcome::Unchanged);
        assert_eq!(mode_of(&p), 0o600);
        // No temp files are left behind.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn streamed_write_is_atomic_with_mode_and_owner_fixups() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vault");
        fs::write(&p, b"old").unwrap();
        write_atomic_from(&p, 0o755, Owner::default(), |f| {
            f.write_all(b"new ")?;
            f.write_all(b"binary")
        })
        .unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new binary");
        assert_eq!(mode_of(&p), 0o755);
        // A failing producer leaves the old file and no temp file.
        let e = write_atomic_from(&p, 0o755, Owner::default(), |_| {
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"new binary");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o777)).unwrap();
        set_owner_mode(&p, 0o755, Owner::default()).unwrap();
        assert_eq!(mode_of(&p), 0o755);
    }

    #[test]
    fn symlink_is_replaced_atomically_and_reports_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("vault-bootstrap.service");
        let target = Path::new("/etc/systemd/system/vault-bootstrap.service");
        assert_eq!(symlink_atomic(target, &link).unwrap(), Outcome::Written);
        assert_eq!(fs::read_link(&link).unwrap(), target);
        assert_eq!(symlink_atomic(target, &link).unwrap(), Outcome::Unchanged);
        // A link elsewhere (or a plain file) is replaced.
        fs::remove_file(&link).unwrap();
        fs::write(&link, b"not a link").unwrap();
        assert_eq!(symlink_atomic(target, &link).unwrap(), Outcome::Written);
        assert_eq!(fs::read_link(&link).unwrap(), target);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn failure_leaves_every_target_untouched() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        fs::write(&a, b"old").unwrap();
        let missing_dir = d.path().join("nope").join("b");
        let specs = [
            FileSpec {
                path: &a,
                contents: b"new",
                mode: 0o644,
                owner: Owner::default(),
            },
            FileSpec {
                path: &missing_dir,
                contents: b"x",
                mode: 0o644,
                owner: Owner::default(),
            },
        ];
        let e = write_files(&specs).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert_eq!(fs::read(&a).unwrap(), b"old");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
