//! `vault-bootstrap install`: lays out an instance image. Packer's shell provisioner runs it
//! once per image build, as root. It is idempotent: a second run changes nothing and says so.
//!
//! Order: the release file's SHA-256 is checked against the pinned digest before anything
//! is written (a mismatch installs nothing: the guard against a compromised download
//! server), and the archive must hold the server binary; then the vault account, the
//! directories, the two binaries, the units and the enablement symlinks (agent, timers). Every write goes
//! through [`crate::fsutil`] (atomic, owned, moded). No secret and no `config.toml` is
//! written: those come from each instance's user-data.
//!
//! `--root DIR` installs into a staging root (tests, image inspection): the account is
//! then kept in `DIR/etc/passwd` and `DIR/etc/group` directly (useradd would edit the
//! build host's), files are owned by the ids found there, and the running systemd is
//! left alone.
//!
//! The docs/operations.md "Install layout" table documents [`DIRS`] and the files; keep them in sync.

use crate::error::{Error, Result};
use crate::fsutil::{self, FileSpec, Outcome, Owner};
use aws_lc_rs::digest;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The agent's unit, enabled (`multi-user.target.wants/`).
pub const AGENT_UNIT: &str = include_str!("../systemd/vault-bootstrap.service");
/// The server's unit, never enabled: the agent starts it once its config is written.
pub const SERVER_UNIT: &str = include_str!("../systemd/vault.service");
/// Hourly Raft snapshots to S3 (`vault-bootstrap snapshot`); its timer is enabled.
pub const SNAPSHOT_SERVICE: &str = include_str!("../systemd/vault-bootstrap-snapshot.service");
pub const SNAPSHOT_TIMER: &str = include_str!("../systemd/vault-bootstrap-snapshot.timer");
/// Daily TLS refresh (`vault-bootstrap refresh-tls`); its timer is enabled.
pub const REFRESH_TLS_SERVICE: &str =
    include_str!("../systemd/vault-bootstrap-refresh-tls.service");
pub const REFRESH_TLS_TIMER: &str = include_str!("../systemd/vault-bootstrap-refresh-tls.timer");
/// The lifecycle unit (`vault-bootstrap watch`: graceful leave, reaping), enabled.
pub const WATCH_UNIT: &str = include_str!("../systemd/vault-bootstrap-watch.service");
/// Drop-in making vault.service run OpenBao's `bao`; present only for `--binary-name bao`.
pub const OPENBAO_DROPIN: &str = include_str!("../systemd/vault.service.d/openbao.conf");

const BIN_DIR: &str = "/usr/local/bin";
const UNIT_DIR: &str = "/etc/systemd/system";
const WANTS_DIR: &str = "/etc/systemd/system/multi-user.target.wants";
const TIMERS_WANTS_DIR: &str = "/etc/systemd/system/timers.target.wants";
/// The timers `install` enables (`timers.target.wants/`), each with its service.
const TIMERS: &[(&str, &str, &str, &str)] = &[
    (
        "vault-bootstrap-snapshot.service",
        SNAPSHOT_SERVICE,
        "vault-bootstrap-snapshot.timer",
        SNAPSHOT_TIMER,
    ),
    (
        "vault-bootstrap-refresh-tls.service",
        REFRESH_TLS_SERVICE,
        "vault-bootstrap-refresh-tls.timer",
        REFRESH_TLS_TIMER,
    ),
];
const DROPIN_DIR: &str = "/etc/systemd/system/vault.service.d";
const AGENT_UNIT_NAME: &str = "vault-bootstrap.service";
const WATCH_UNIT_NAME: &str = "vault-bootstrap-watch.service";
const SERVER_UNIT_NAME: &str = "vault.service";

/// System ids `useradd --system` may hand out; the staging root picks the first free one.
const SYSTEM_IDS: std::ops::RangeInclusive<u32> = 100..=999;

/// Which server binary: HashiCorp Vault or OpenBao.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServerName {
    Vault,
    Bao,
}

impl ServerName {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerName::Vault => "vault",
            ServerName::Bao => "bao",
        }
    }
}

/// The release file as downloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// The server binary itself.
    Binary(PathBuf),
    /// A release .zip holding `vault` or `bao`.
    Archive(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Options {
    /// `/` on the image build instance; a staging directory otherwise.
    pub root: PathBuf,
    pub release: Release,
    /// Lower-case hex, 64 digits (see [`parse_sha256`]).
    pub sha256: String,
    /// Installed name; by default what the release holds.
    pub binary_name: Option<ServerName>,
    /// The server's system user (its primary group likewise).
    pub user: String,
    /// This agent's own binary, installed as `/usr/local/bin/vault-bootstrap`.
    pub agent_binary: PathBuf,
}

/// Who owns a path of the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// root:root
    Root,
    /// root:<vault group>: root writes, the server's group reads.
    RootGroup,
    /// <vault user>:<vault group>
    Server,
}

/// One directory of the layout: path in the image, mode, owner.
struct Dir {
    path: &'static str,
    mode: u32,
    who: Who,
}

const fn dir(path: &'static str, mode: u32, who: Who) -> Dir {
    Dir { path, mode, who }
}

/// Every directory `install` manages, parents first (docs/operations.md "Install layout").
const DIRS: &[Dir] = &[
    // System directories the files go into: created when missing (staging root).
    dir(BIN_DIR, 0o755, Who::Root),
    dir(UNIT_DIR, 0o755, Who::Root),
    dir(WANTS_DIR, 0o755, Who::Root),
    dir(TIMERS_WANTS_DIR, 0o755, Who::Root),
    // vault.hcl: written by the agent (root), read by the server through its group.
    dir("/etc/vault.d", 0o750, Who::RootGroup),
    // Traversable, so the server reaches data/ and tls/ whatever the umask at build time.
    dir("/opt/vault", 0o755, Who::Root),
    // Raft storage: the server's alone.
    dir("/opt/vault/data", 0o700, Who::Server),
    // Holds the TLS private key: only the server's user (and root) may list it.
    dir("/opt/vault/tls", 0o750, Who::Server),
    // The file audit device writes here.
    dir("/var/log/vault", 0o750, Who::Server),
    // The agent's state: the KMS-encrypted pending init response.
    dir("/var/lib/vault-bootstrap", 0o700, Who::Root),
    // config.toml arrives here from user-data; nothing is baked in.
    dir("/etc/vault-bootstrap", 0o750, Who::Root),
];

/// What happened to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
    Unchanged,
    Removed,
}

impl Change {
    fn word(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Updated => "updated",
            Change::Unchanged => "unchanged",
            Change::Removed => "removed",
        }
    }
}

/// One line of the report: a path in the image (or `user NAME`) and what was done to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub change: Change,
    pub what: String,
    pub detail: String,
}

/// The report, printed one line per entry as the work is done (Packer shows it live).
pub struct Report<'a> {
    pub entries: Vec<Entry>,
    out: &'a mut dyn Write,
}

impl<'a> Report<'a> {
    pub fn new(out: &'a mut dyn Write) -> Self {
        Report {
            entries: Vec::new(),
            out,
        }
    }

    fn line(&mut self, text: &str) {
        // The report is informational: a closed stdout must not fail an install.
        let _ = writeln!(self.out, "{text}");
    }

    fn push(&mut self, change: Change, what: impl Into<String>, detail: impl Into<String>) {
        let e = Entry {
            change,
            what: what.into(),
            detail: detail.into(),
        };
        self.line(&format!(
            "{:<9} {}  ({})",
            e.change.word(),
            e.what,
            e.detail
        ));
        self.entries.push(e);
    }

    /// How many entries changed something.
    pub fn changed(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.change != Change::Unchanged)
            .count()
    }
}

/// Accepts 64 hex digits (either case, surrounding blanks ignored); returns them lower-case.
pub fn parse_sha256(s: &str) -> std::result::Result<String, String> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not a SHA-256 digest (64 hex digits, as in the release's SHA256SUMS)"
        ));
    }
    Ok(s.to_ascii_lowercase())
}

/// Lower-case hex of `bytes` (SHA-256 digests in checksums and S3 metadata).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of everything `r` yields, lower-case hex.
pub fn sha256_reader(r: &mut dyn Read) -> io::Result<String> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish().as_ref()))
}

/// Fails with [`Error::Checksum`] (exit 65) unless `actual` is `expected`.
pub fn check_sha256(path: &Path, expected: &str, actual: &str) -> Result<()> {
    if actual.eq_ignore_ascii_case(expected) {
        return Ok(());
    }
    Err(Error::Checksum {
        path: path.into(),
        expected: expected.to_ascii_lowercase(),
        actual: actual.to_owned(),
    })
}

/// Opens `path` and checks its SHA-256. The open file is returned, and everything later is
/// read from it: replacing the path after the check cannot slip another file in.
fn open_verified(path: &Path, expected: &str) -> Result<File> {
    let mut f = File::open(path).map_err(|e| Error::Artifact {
        path: path.into(),
        problem: format!("cannot open: {e}"),
        missing: e.kind() == io::ErrorKind::NotFound,
    })?;
    let actual = sha256_reader(&mut f).map_err(|e| unusable(path, format!("read: {e}")))?;
    check_sha256(path, expected, &actual)?;
    f.seek(SeekFrom::Start(0))
        .map_err(|e| unusable(path, format!("seek: {e}")))?;
    Ok(f)
}

fn unusable(path: &Path, problem: impl Into<String>) -> Error {
    Error::Artifact {
        path: path.into(),
        problem: problem.into(),
        missing: false,
    }
}

/// The verified server binary, where to read it from.
enum Server {
    File(File),
    Zip {
        archive: zip::ZipArchive<File>,
        index: usize,
        path: PathBuf,
    },
}

impl Server {
    /// Streams the binary into `w`.
    fn copy_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
        match self {
            Server::File(f) => {
                f.seek(SeekFrom::Start(0))?;
                io::copy(f, w)?;
            }
            // Reading an entry to its end also checks its CRC-32.
            Server::Zip { archive, index, .. } => {
                let mut entry = archive.by_index(*index).map_err(io::Error::other)?;
                io::copy(&mut entry, w)?;
            }
        }
        Ok(())
    }

    fn digest(&mut self) -> io::Result<String> {
        let mut w = DigestWriter(digest::Context::new(&digest::SHA256));
        self.copy_to(&mut w)?;
        Ok(hex(w.0.finish().as_ref()))
    }
}

struct DigestWriter(digest::Context);

impl Write for DigestWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Finds the server binary in a release zip: an entry whose file name is `vault` or `bao`
/// (HashiCorp's zips hold `vault` beside `LICENSE.txt`).
fn find_in_zip(
    archive: &mut zip::ZipArchive<File>,
    path: &Path,
    want: Option<ServerName>,
) -> Result<(usize, ServerName)> {
    let mut found: Vec<(usize, ServerName)> = Vec::new();
    for i in 0..archive.len() {
        let entry = archive
            .by_index(i)
            .map_err(|e| unusable(path, format!("zip entry {i}: {e}")))?;
        if !entry.is_file() {
            continue;
        }
        let Some(name) = entry.enclosed_name() else {
            continue;
        };
        let name = name.file_name().map(|n| n.to_string_lossy().into_owned());
        for s in [ServerName::Vault, ServerName::Bao] {
            if name.as_deref() == Some(s.as_str()) && want.is_none_or(|w| w == s) {
                found.push((i, s));
            }
        }
    }
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(unusable(
            path,
            match want {
                Some(w) => format!("the archive holds no file named `{}`", w.as_str()),
                None => "the archive holds no file named `vault` or `bao`".into(),
            },
        )),
        _ => Err(unusable(
            path,
            "the archive holds more than one server binary; choose with --binary-name",
        )),
    }
}

/// Checks the release and finds the binary in it. Writes nothing.
fn prepare_server(opts: &Options) -> Result<(Server, ServerName)> {
    match &opts.release {
        Release::Binary(path) => {
            let f = open_verified(path, &opts.sha256)?;
            let name = opts.binary_name.unwrap_or_else(|| {
                let file = path.file_name().map(|n| n.to_string_lossy().into_owned());
                if file.is_some_and(|n| n.starts_with("bao")) {
                    ServerName::Bao
                } else {
                    ServerName::Vault
                }
            });
            Ok((Server::File(f), name))
        }
        Release::Archive(path) => {
            let f = open_verified(path, &opts.sha256)?;
            let mut archive = zip::ZipArchive::new(f).map_err(|e| {
                unusable(
                    path,
                    format!("not a zip archive ({e}); pass a bare binary with --vault-binary"),
                )
            })?;
            let (index, name) = find_in_zip(&mut archive, path, opts.binary_name)?;
            Ok((
                Server::Zip {
                    archive,
                    index,
                    path: path.clone(),
                },
                name,
            ))
        }
    }
}

/// The vault account's ids and the names used in the report.
#[derive(Debug, Clone)]
struct Ids {
    uid: u32,
    gid: u32,
    user: String,
}

impl Ids {
    fn owner(&self, who: Who) -> Owner {
        match who {
            Who::Root => Owner::new(0, 0),
            Who::RootGroup => Owner::new(0, self.gid),
            Who::Server => Owner::new(self.uid, self.gid),
        }
    }

    fn names(&self, who: Who) -> String {
        match who {
            Who::Root => "root:root".into(),
            Who::RootGroup => format!("root:{}", self.user),
            Who::Server => format!("{0}:{0}", self.user),
        }
    }
}

/// What to append to `passwd` and `group` so that `user` exists, and its ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountPlan {
    pub uid: u32,
    pub gid: u32,
    pub passwd_line: Option<String>,
    pub group_line: Option<String>,
}

/// (name, id) of each well-formed `name:x:id:...` line.
fn ids_of(text: &str) -> Vec<(&str, u32)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id = f.nth(1)?.parse().ok()?;
            Some((name, id))
        })
        .collect()
}

/// Plans the account for a staging root from its `passwd` and `group` texts (either may be
/// empty). An existing user is used as it is. Otherwise the user gets the group of the
/// same name when it exists, else a new one; new ids are the first of 100..=999 free in
/// both files, the same number for user and group when possible.
pub fn plan_account(
    passwd: &str,
    group: &str,
    user: &str,
) -> std::result::Result<AccountPlan, String> {
    if let Some(line) = passwd.lines().find(|l| l.split(':').next() == Some(user)) {
        let f: Vec<&str> = line.split(':').collect();
        let uid = f.get(2).and_then(|v| v.parse().ok());
        let gid = f.get(3).and_then(|v| v.parse().ok());
        return match (uid, gid) {
            (Some(uid), Some(gid)) => Ok(AccountPlan {
                uid,
                gid,
                passwd_line: None,
                group_line: None,
            }),
            _ => Err(format!("the passwd entry of {user} is malformed: {line:?}")),
        };
    }
    let uids: Vec<u32> = ids_of(passwd).into_iter().map(|(_, id)| id).collect();
    let gids = ids_of(group);
    let existing_group = gids.iter().find(|(n, _)| *n == user).map(|(_, id)| *id);
    let uid_free = |id: u32| !uids.contains(&id);
    let gid_free = |id: u32| !gids.iter().any(|(_, g)| *g == id);
    let exhausted = || format!("no free system id in {SYSTEM_IDS:?}");
    let (uid, gid, group_line) = match existing_group {
        Some(gid) => {
            let uid = if SYSTEM_IDS.contains(&gid) && uid_free(gid) {
                gid
            } else {
                SYSTEM_IDS
                    .clone()
                    .find(|&i| uid_free(i))
                    .ok_or_else(exhausted)?
            };
            (uid, gid, None)
        }
        None => {
            let id = SYSTEM_IDS
                .clone()
                .find(|&i| uid_free(i) && gid_free(i))
                .ok_or_else(exhausted)?;
            (id, id, Some(format!("{user}:x:{id}:")))
        }
    };
    Ok(AccountPlan {
        uid,
        gid,
        passwd_line: Some(format!(
            "{user}:x:{uid}:{gid}:Vault server:/nonexistent:/usr/sbin/nologin"
        )),
        group_line,
    })
}

/// `text` with `line` appended on a line of its own.
fn appended(text: &str, line: &str) -> String {
    let mut s = text.to_owned();
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s.push_str(line);
    s.push('\n');
    s
}

/// The account in a staging root: `etc/passwd` and `etc/group` edited directly.
fn account_in_staging(root: &Path, user: &str, report: &mut Report<'_>) -> Result<Ids> {
    let etc = root.join("etc");
    fsutil::ensure_dir(&etc, 0o755, Owner::new(0, 0))?;
    let read = |name: &str| -> Result<(PathBuf, Option<String>)> {
        let p = etc.join(name);
        match fs::read_to_string(&p) {
            Ok(t) => Ok((p, Some(t))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((p, None)),
            Err(e) => Err(Error::write(&p, format!("read: {e}"))),
        }
    };
    let (passwd_path, passwd) = read("passwd")?;
    let (group_path, group) = read("group")?;
    let plan = plan_account(
        passwd.as_deref().unwrap_or(""),
        group.as_deref().unwrap_or(""),
        user,
    )
    .map_err(|m| Error::write(&passwd_path, m))?;
    // Group first: a passwd entry must never name a group that does not exist.
    for (path, text, line, logical) in [
        (&group_path, &group, &plan.group_line, "/etc/group"),
        (&passwd_path, &passwd, &plan.passwd_line, "/etc/passwd"),
    ] {
        let Some(line) = line else {
            report.push(Change::Unchanged, logical, format!("has {user}"));
            continue;
        };
        // An existing file keeps its mode and owner; a new one is 0644 root:root.
        let (mode, owner) = match fs::metadata(path) {
            Ok(m) => (m.mode() & 0o7777, Owner::new(m.uid(), m.gid())),
            Err(_) => (0o644, Owner::new(0, 0)),
        };
        let new = appended(text.as_deref().unwrap_or(""), line);
        fsutil::write_atomic(&FileSpec {
            path,
            contents: new.as_bytes(),
            mode,
            owner,
        })?;
        let change = if text.is_some() {
            Change::Updated
        } else {
            Change::Created
        };
        report.push(change, logical, format!("added {line:?}"));
    }
    let change = if plan.passwd_line.is_some() {
        Change::Created
    } else {
        Change::Unchanged
    };
    report.push(
        change,
        format!("user {user}"),
        format!("uid {} gid {}", plan.uid, plan.gid),
    );
    Ok(Ids {
        uid: plan.uid,
        gid: plan.gid,
        user: user.to_owned(),
    })
}

/// Runs a command; a failure carries its stderr.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Command {
            command: command.clone(),
            message: e.to_string(),
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Command {
        command,
        message: format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

/// The account on the running system: `useradd` unless the user exists (getpwnam, the
/// same lookup as `getent passwd`).
fn account_on_host(user: &str, report: &mut Report<'_>) -> Result<Ids> {
    let mut change = Change::Unchanged;
    if fsutil::lookup_user(user).is_none() {
        let group_exists = nix::unistd::Group::from_name(user).ok().flatten().is_some();
        let mut args = vec![
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "Vault server",
        ];
        // --user-group fails when the group already exists: join it instead.
        if group_exists {
            args.extend(["--gid", user]);
        } else {
            args.push("--user-group");
        }
        args.push(user);
        run("useradd", &args)?;
        change = Change::Created;
    }
    let (uid, gid) = fsutil::lookup_user(user).ok_or_else(|| Error::Command {
        command: format!("getent passwd {user}"),
        message: "the user is still unknown after useradd".into(),
    })?;
    report.push(
        change,
        format!("user {user}"),
        format!("uid {uid} gid {gid}"),
    );
    Ok(Ids {
        uid,
        gid,
        user: user.to_owned(),
    })
}

/// The state of a path before it is touched, to tell created/updated/unchanged apart.
fn state(path: &Path) -> Option<(u32, u32, u32)> {
    fs::metadata(path)
        .ok()
        .map(|m| (m.mode() & 0o7777, m.uid(), m.gid()))
}

fn change_of(before: Option<(u32, u32, u32)>, after: Option<(u32, u32, u32)>) -> Change {
    match before {
        None => Change::Created,
        Some(b) if Some(b) == after => Change::Unchanged,
        Some(_) => Change::Updated,
    }
}

/// Installs a (large) binary, streamed: rewritten only when its SHA-256 differs.
fn install_binary(
    path: &Path,
    logical: &str,
    digest: &str,
    copy: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    report: &mut Report<'_>,
) -> Result<()> {
    let before = state(path);
    let same = match File::open(path) {
        Ok(mut f) => sha256_reader(&mut f).map_err(|e| Error::write(path, e))? == digest,
        Err(_) => false,
    };
    let owner = Owner::new(0, 0);
    if same {
        fsutil::set_owner_mode(path, 0o755, owner)?;
    } else {
        fsutil::write_atomic_from(path, 0o755, owner, |f| {
            let mut w = io::BufWriter::new(f);
            copy(&mut w)?;
            w.flush()
        })?;
    }
    let change = match (before, same) {
        (None, _) => Change::Created,
        (Some(_), false) => Change::Updated,
        (Some(b), true) => change_of(Some(b), state(path)),
    };
    report.push(
        change,
        logical,
        format!("0755 root:root sha256 {}", &digest[..16]),
    );
    Ok(())
}

fn write_small(path: &Path, logical: &str, contents: &str, report: &mut Report<'_>) -> Result<()> {
    let before = state(path);
    let outcome = fsutil::write_atomic(&FileSpec {
        path,
        contents: contents.as_bytes(),
        mode: 0o644,
        owner: Owner::new(0, 0),
    })?;
    let change = match outcome {
        Outcome::Written if before.is_some() => Change::Updated,
        Outcome::Written => Change::Created,
        Outcome::Unchanged => change_of(before, state(path)),
    };
    report.push(change, logical, "0644 root:root");
    Ok(())
}

fn remove_if_present(
    path: &Path,
    logical: &str,
    why: &str,
    report: &mut Report<'_>,
) -> Result<bool> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(false);
    }
    fs::remove_file(path).map_err(|e| Error::write(path, format!("remove: {e}")))?;
    fsutil::sync_dir(path.parent().unwrap_or(Path::new("/")))?;
    report.push(Change::Removed, logical, why);
    Ok(true)
}

/// The path of `logical` (absolute, in the image) under `root`.
fn under(root: &Path, logical: &str) -> PathBuf {
    root.join(logical.trim_start_matches('/'))
}

/// Runs the install; see the module docs. The report goes to `out` as it happens.
pub fn install<'a>(opts: &Options, out: &'a mut dyn Write) -> Result<Report<'a>> {
    let mut report = Report::new(out);
    // Parents created on the way (a staging root's usr/, etc/) must be traversable whatever
    // umask the provisioner's shell has; every managed path gets its mode set explicitly.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let root = &opts.root;
    let root_real = match fs::metadata(root) {
        Ok(m) if m.is_dir() => root
            .canonicalize()
            .map_err(|e| Error::write(root, format!("resolve: {e}")))?,
        _ => {
            return Err(Error::Artifact {
                path: root.clone(),
                problem: "is not a directory (--root must exist)".into(),
                missing: true,
            })
        }
    };
    let on_host = root_real == Path::new("/");
    report.line(&format!(
        "vault-bootstrap install into {}",
        root_real.display()
    ));

    // 1. Everything that can refuse, before the first write.
    let (mut server, name) = prepare_server(opts)?;
    let release_path = match &opts.release {
        Release::Binary(p) | Release::Archive(p) => p.clone(),
    };
    report.line(&format!(
        "verified  {}  (sha256 {}, as pinned)",
        release_path.display(),
        opts.sha256
    ));
    let server_digest = match &mut server {
        // The pinned digest is the binary's own.
        Server::File(_) => opts.sha256.clone(),
        Server::Zip { path, .. } => {
            let path = path.clone();
            server
                .digest()
                .map_err(|e| unusable(&path, format!("cannot extract `{}`: {e}", name.as_str())))?
        }
    };
    let mut agent = File::open(&opts.agent_binary).map_err(|e| Error::Artifact {
        path: opts.agent_binary.clone(),
        problem: format!("agent binary: cannot open: {e}"),
        missing: e.kind() == io::ErrorKind::NotFound,
    })?;
    let agent_digest = sha256_reader(&mut agent)
        .map_err(|e| unusable(&opts.agent_binary, format!("read: {e}")))?;

    // 2. The account the server runs as.
    let ids = if on_host {
        account_on_host(&opts.user, &mut report)?
    } else {
        account_in_staging(root, &opts.user, &mut report)?
    };

    // 3. Directories, parents first.
    for d in DIRS {
        let p = under(root, d.path);
        let before = state(&p);
        fsutil::ensure_dir(&p, d.mode, ids.owner(d.who))?;
        report.push(
            change_of(before, state(&p)),
            d.path,
            format!("dir {:04o} {}", d.mode, ids.names(d.who)),
        );
    }

    // 4. The binaries.
    let server_logical = format!("{BIN_DIR}/{}", name.as_str());
    install_binary(
        &under(root, &server_logical),
        &server_logical,
        &server_digest,
        &mut |w| server.copy_to(w),
        &mut report,
    )?;
    let agent_logical = format!("{BIN_DIR}/vault-bootstrap");
    install_binary(
        &under(root, &agent_logical),
        &agent_logical,
        &agent_digest,
        &mut |w| {
            agent.seek(SeekFrom::Start(0))?;
            io::copy(&mut agent, w).map(|_| ())
        },
        &mut report,
    )?;

    // 5. The units. Their changes decide whether a running systemd must reload.
    let units_before = report.changed();
    for (unit, text) in [
        (SERVER_UNIT_NAME, SERVER_UNIT),
        (AGENT_UNIT_NAME, AGENT_UNIT),
        (WATCH_UNIT_NAME, WATCH_UNIT),
    ] {
        let logical = format!("{UNIT_DIR}/{unit}");
        write_small(&under(root, &logical), &logical, text, &mut report)?;
    }
    for (service, service_text, timer, timer_text) in TIMERS {
        for (unit, text) in [(service, service_text), (timer, timer_text)] {
            let logical = format!("{UNIT_DIR}/{unit}");
            write_small(&under(root, &logical), &logical, text, &mut report)?;
        }
    }
    let dropin = format!("{DROPIN_DIR}/openbao.conf");
    if name == ServerName::Bao {
        let dir = under(root, DROPIN_DIR);
        let before = state(&dir);
        fsutil::ensure_dir(&dir, 0o755, Owner::new(0, 0))?;
        report.push(
            change_of(before, state(&dir)),
            DROPIN_DIR,
            "dir 0755 root:root",
        );
        write_small(&under(root, &dropin), &dropin, OPENBAO_DROPIN, &mut report)?;
    } else {
        remove_if_present(
            &under(root, &dropin),
            &dropin,
            "the server binary is vault, not bao",
            &mut report,
        )?;
    }

    // 6. Enable the agent and its watch unit as `systemctl enable` would (works offline and
    // in a staging root);
    // never the server: the agent starts it once vault.hcl is written.
    // The timers likewise (`timers.target.wants/`): their services are never enabled alone.
    let links = [(WANTS_DIR, AGENT_UNIT_NAME), (WANTS_DIR, WATCH_UNIT_NAME)]
        .into_iter()
        .chain(
            TIMERS
                .iter()
                .map(|(_, _, timer, _)| (TIMERS_WANTS_DIR, *timer)),
        );
    for (wants, unit) in links {
        let target = format!("{UNIT_DIR}/{unit}");
        let link_logical = format!("{wants}/{unit}");
        let link = under(root, &link_logical);
        let existed = fs::symlink_metadata(&link).is_ok();
        let change = match fsutil::symlink_atomic(Path::new(&target), &link)? {
            Outcome::Unchanged => Change::Unchanged,
            Outcome::Written if existed => Change::Updated,
            Outcome::Written => Change::Created,
        };
        report.push(change, link_logical, format!("symlink -> {target}"));
    }
    remove_if_present(
        &under(root, &format!("{WANTS_DIR}/{SERVER_UNIT_NAME}")),
        &format!("{WANTS_DIR}/{SERVER_UNIT_NAME}"),
        "vault.service must not start on its own: vault-bootstrap starts it",
        &mut report,
    )?;

    // 7. A running systemd reads changed unit files only after a reload.
    if on_host && report.changed() > units_before && Path::new("/run/systemd/system").exists() {
        run("systemctl", &["daemon-reload"])?;
        report.line("systemd   daemon-reload (unit files changed)");
    }

    let changed = report.changed();
    if changed == 0 {
        report.line("install: nothing changed: every path was already as specified");
    } else {
        report.line(&format!(
            "install: {changed} change(s); the image bakes no secret and no config.toml"
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_vectors() {
        // FIPS 180-2 test vectors.
        assert_eq!(
            sha256_reader(&mut &b"abc"[..]).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_reader(&mut &b""[..]).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // Longer than one read buffer.
        let big = vec![b'a'; 1_000_000];
        assert_eq!(
            sha256_reader(&mut &big[..]).unwrap(),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    #[test]
    fn sha256_argument_is_64_hex_digits() {
        let d = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        assert_eq!(parse_sha256(&format!(" {d}\n")).unwrap(), d.to_lowercase());
        assert!(parse_sha256(&d[1..]).is_err());
        assert!(parse_sha256(&format!("{}g", &d[1..])).is_err());
        assert!(parse_sha256("").unwrap_err().contains("64 hex digits"));
    }

    #[test]
    fn checksum_mismatch_names_file_expected_and_actual() {
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let bad = "0000000000000000000000000000000000000000000000000000000000000000";
        let p = Path::new("/tmp/vault.zip");
        check_sha256(p, good, good).unwrap();
        check_sha256(p, &good.to_uppercase(), good).unwrap();
        let e = check_sha256(p, bad, good).unwrap_err();
        assert_eq!(e.exit_code(), 65);
        let m = e.to_string();
        for part in ["/tmp/vault.zip", good, bad, "nothing was installed"] {
            assert!(m.contains(part), "{m}");
        }
    }

    #[test]
    fn open_verified_refuses_a_wrong_digest_and_a_missing_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vault");
        fs::write(&p, b"abc").unwrap();
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let mut f = open_verified(&p, good).unwrap();
        let mut back = String::new();
        f.read_to_string(&mut back).unwrap();
        assert_eq!(
            back, "abc",
            "the verified file is read again from its start"
        );
        let wrong = good.replace('b', "c");
        assert_eq!(open_verified(&p, &wrong).unwrap_err().exit_code(), 65);
        let e = open_verified(&d.path().join("nope"), good).unwrap_err();
        assert_eq!(e.exit_code(), 66, "{e}");
    }

    #[test]
    fn account_in_empty_files_gets_the_first_system_id() {
        let plan = plan_account("", "", "vault").unwrap();
        assert_eq!(
            plan,
            AccountPlan {
                uid: 100,
                gid: 100,
                passwd_line: Some(
                    "vault:x:100:100:Vault server:/nonexistent:/usr/sbin/nologin".into()
                ),
                group_line: Some("vault:x:100:".into()),
            }
        );
    }

    #[test]
    fn account_skips_ids_taken_in_either_file() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n_apt:x:100:65534::/nonexistent:/usr/sbin/nologin\nmessagebus:x:102:104::/x:/y\n";
        let group = "root:x:0:\n# a comment\nusers:x:101:\nmessagebus:x:104:\nbroken line\n";
        let plan = plan_account(passwd, group, "vault").unwrap();
        assert_eq!((plan.uid, plan.gid), (103, 103));
    }

    #[test]
    fn existing_user_is_used_as_it_is() {
        let passwd = "vault:x:995:993:Vault:/opt/vault:/bin/false\n";
        let plan = plan_account(passwd, "vault:x:993:\n", "vault").unwrap();
        assert_eq!(
            plan,
            AccountPlan {
                uid: 995,
                gid: 993,
                passwd_line: None,
                group_line: None
            }
        );
        // Only the exact name matches, not a prefix.
        let plan = plan_account("vaultx:x:100:100::/:/bin/false\n", "", "vault").unwrap();
        assert_eq!((plan.uid, plan.gid), (101, 101));
        assert!(plan_account("vault:x:abc:1::/:/x\n", "", "vault").is_err());
    }

    #[test]
    fn existing_group_is_joined() {
        let plan = plan_account("", "vault:x:500:\n", "vault").unwrap();
        assert_eq!((plan.uid, plan.gid, plan.group_line), (500, 500, None));
        // Its gid taken as a uid: the user gets the first free uid, still in the group.
        let plan = plan_account("other:x:500:1::/:/x\n", "vault:x:500:\n", "vault").unwrap();
        assert_eq!((plan.uid, plan.gid), (100, 500));
        assert!(plan.passwd_line.unwrap().starts_with("vault:x:100:500:"));
    }

    #[test]
    fn no_free_id_is_an_error() {
        let passwd: String = SYSTEM_IDS
            .map(|i| format!("u{i}:x:{i}:{i}::/:/x\n"))
            .collect();
        let e = plan_account(&passwd, "", "vault").unwrap_err();
        assert!(e.contains("no free system id"), "{e}");
    }

    #[test]
    fn appended_keeps_lines_apart() {
        assert_eq!(appended("", "a"), "a\n");
        assert_eq!(appended("x\n", "a"), "x\na\n");
        assert_eq!(appended("x", "a"), "x\na\n");
    }

    fn zip_with(entries: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("release.zip");
        let mut w = zip::ZipWriter::new(File::create(&p).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            w.start_file(*name, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap();
        (d, p)
    }

    #[test]
    fn finds_the_server_binary_in_a_release_zip() {
        let (_d, p) = zip_with(&[("LICENSE.txt", b"MPL"), ("vault", b"#!/bin/sh\n")]);
        let mut a = zip::ZipArchive::new(File::open(&p).unwrap()).unwrap();
        let (i, name) = find_in_zip(&mut a, &p, None).unwrap();
        assert_eq!(name, ServerName::Vault);
        let mut s = Server::Zip {
            archive: a,
            index: i,
            path: p.clone(),
        };
        assert_eq!(
            s.digest().unwrap(),
            sha256_reader(&mut &b"#!/bin/sh\n"[..]).unwrap()
        );
        let mut a = zip::ZipArchive::new(File::open(&p).unwrap()).unwrap();
        let e = find_in_zip(&mut a, &p, Some(ServerName::Bao)).unwrap_err();
        assert!(e.to_string().contains("no file named `bao`"), "{e}");
    }

    #[test]
    fn a_zip_with_both_servers_needs_a_choice() {
        let (_d, p) = zip_with(&[("vault", b"v"), ("bin/bao", b"b")]);
        let mut a = zip::ZipArchive::new(File::open(&p).unwrap()).unwrap();
        let e = find_in_zip(&mut a, &p, None).unwrap_err();
        assert!(e.to_string().contains("--binary-name"), "{e}");
        let (_, name) = find_in_zip(&mut a, &p, Some(ServerName::Bao)).unwrap();
        assert_eq!(name, ServerName::Bao);
    }

    #[test]
    fn the_units_keep_their_promises() {
        // The agent's unit is enabled and never ordered before the server (start deadlock).
        assert!(AGENT_UNIT.contains("\nWantedBy=multi-user.target\n"));
        assert!(!AGENT_UNIT.contains("\nBefore="));
        assert!(AGENT_UNIT.contains("\nExecStart=/usr/local/bin/vault-bootstrap boot\n"));
        // The server's unit cannot be enabled and is not ordered after the agent.
        assert!(!SERVER_UNIT.lines().any(|l| l.trim() == "[Install]"));
        assert!(!SERVER_UNIT.contains("\nAfter=vault-bootstrap"));
        // Every exit code retrying cannot fix stops the agent's restarts (src/error.rs).
        use crate::error::exit;
        let line = AGENT_UNIT
            .lines()
            .find_map(|l| l.strip_prefix("RestartPreventExitStatus="))
            .unwrap();
        for code in [
            exit::DATAERR,
            exit::OSFILE,
            exit::PROTOCOL,
            exit::NOPERM,
            exit::CONFIG,
            exit::FOREIGN_CLUSTER,
            exit::ABANDONED,
        ] {
            assert!(
                line.split(' ').any(|c| c == code.to_string()),
                "{code} in {line}"
            );
        }
        assert!(!line.split(' ').any(|c| c == exit::TEMPFAIL.to_string()));
    }

    #[test]
    fn the_timers_run_their_commands() {
        assert!(SNAPSHOT_SERVICE.contains("\nType=oneshot\n"));
        assert!(SNAPSHOT_SERVICE
            .contains("\nExecStart=/usr/local/bin/vault-bootstrap snapshot --only-if-active\n"));
        assert!(SNAPSHOT_SERVICE.contains("\nAfter=vault.service\n"));
        assert!(SNAPSHOT_TIMER.contains("\nOnCalendar=hourly\n"));
        assert!(REFRESH_TLS_SERVICE
            .contains("\nExecStart=/usr/local/bin/vault-bootstrap refresh-tls\n"));
        assert!(REFRESH_TLS_TIMER.contains("\nOnCalendar=*-*-* 03:00\n"));
        for t in [SNAPSHOT_TIMER, REFRESH_TLS_TIMER] {
            assert!(t.contains("\nPersistent=true\n"));
            assert!(t.contains("\nWantedBy=timers.target\n"));
        }
        // A timer's service is started by its timer, never enabled on its own.
        for s in [SNAPSHOT_SERVICE, REFRESH_TLS_SERVICE] {
            assert!(!s.contains("[Install]"));
        }
    }
}
