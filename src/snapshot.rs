//! Raft snapshots to S3 and back, and the credentials that take them.
//!
//! Credentials: not the root token. The init winner creates (in post-init, see
//! [`provision`]) a policy that can only read `sys/storage/raft/snapshot` and
//! `sys/storage/raft/configuration`, an AppRole bound to it, and escrows its role_id and
//! secret_id as one KMS-encrypted, write-once item (`snapshot-approle.enc`) next to the
//! recovery keys. Any node can then log in for 10 minutes, take a snapshot and nothing
//! else; deleting the secret_id revokes it. Restoring is an operator act with the
//! operator's own token: the AppRole cannot restore, by design.
//!
//! Scope: the role is bound to the cluster's addresses (`secret_id_bound_cidrs` and
//! `token_bound_cidrs`, see [`crate::approle::bound_cidrs`]), so a secret_id or token copied off the cluster
//! is refused elsewhere; and its tokens are short, so a copied token does not last.
//!
//! Names: `s3://<bucket>/<prefix>/<cluster>/<cluster>-<yyyymmddThhmmssZ>.snap` (UTC), so the
//! names of one cluster sort by time; only names of exactly this form are ever pruned.

use crate::approle;
use crate::aws::kms::Kms;
use crate::aws::s3::{ObjectStore, PutOutcome, SdkS3};
use crate::config::Config;
use crate::error::{exit, Error, Result};
use crate::escrow::Layout;
use crate::retry;
use crate::secret::Secret;
use crate::vault_api::VaultClient;
use aws_lc_rs::digest;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// Policy and AppRole role name (stable: operators revoke by them).
pub const NAME: &str = "vault-bootstrap-snapshot";
/// Read the snapshot (GET) and the raft configuration; nothing else, no restore.
pub const POLICY_HCL: &str = r#"# vault-bootstrap snapshot: take raft snapshots, nothing else (restore needs an operator).
path "sys/storage/raft/snapshot" {
  capabilities = ["read"]
}
path "sys/storage/raft/configuration" {
  capabilities = ["read"]
}
"#;
/// Lifetime of a snapshot login, and its maximum: a copied token must not last. A token is
/// checked when a request starts, so a snapshot that streams for longer (up to
/// `snapshot.timeout_secs`) still completes; the login, the download's start and the
/// revoke-self at the end fit in seconds.
pub const TOKEN_TTL: &str = "10m";
/// User metadata keys on each snapshot object.
pub const META_SHA256: &str = "sha256";
pub const META_SIZE: &str = "size";

/// The snapshot node credential (see [`crate::approle`]).
pub const ROLE: approle::Role = approle::Role {
    name: NAME,
    label: "snapshot",
    policy_hcl: POLICY_HCL,
    item: Layout::SNAPSHOT_APPROLE_ITEM,
    token_ttl: TOKEN_TTL,
    // Its tokens end themselves with the default policy's revoke-self.
    default_policy: true,
    docs: "docs/operations.md \"Snapshots\"",
    bound_setting: "snapshot.bound_cidrs",
};

/// Creates the snapshot policy and AppRole with the root token and escrows its credentials
/// (once), bound to `snapshot.bound_cidrs`, or else to the addresses of `local` and `peers`.
pub async fn provision<S: ObjectStore, K: Kms>(
    cfg: &Config,
    server: &VaultClient,
    nodes: &[std::net::IpAddr],
    root: &Secret,
    s3: &S,
    kms: &K,
    layout: &Layout,
) -> Result<()> {
    let cidrs = approle::bound_cidrs(&cfg.snapshot.bound_cidrs, nodes.iter().copied());
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    approle::provision(&ROLE, &cidrs, server, root, s3, kms, layout, aws).await
}

/// `<prefix>/<cluster>/`: where one cluster's snapshots live.
pub fn dir(prefix: &str, cluster: &str) -> String {
    format!("{}/{cluster}/", prefix.trim_matches('/'))
}

/// Whether `s3://bucket/key` lies under `cluster`'s snapshot prefix in `ours` (the
/// configured snapshot bucket): what `snapshot restore` accepts without `--foreign`.
pub fn is_ours(ours: &str, prefix: &str, cluster: &str, bucket: &str, key: &str) -> bool {
    bucket == ours && key.starts_with(&dir(prefix, cluster))
}

/// `yyyymmddThhmmssZ` of a Unix time (UTC).
pub fn utc_stamp(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let rem = unix % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The object key of a snapshot of `cluster` taken at `unix`.
pub fn object_key(prefix: &str, cluster: &str, unix: u64) -> String {
    format!("{}{cluster}-{}.snap", dir(prefix, cluster), utc_stamp(unix))
}

fn is_stamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 8 || i == 15 || c.is_ascii_digit())
}

/// The snapshots under `dir` to delete so that the `keep` most recent remain. Only keys
/// named exactly as [`object_key`] names them count; anything else there is left alone.
pub fn to_prune(keys: &[String], prefix: &str, cluster: &str, keep: usize) -> Vec<String> {
    let d = dir(prefix, cluster);
    let mut ours: Vec<&String> = keys
        .iter()
        .filter(|k| {
            k.strip_prefix(&d)
                .and_then(|n| n.strip_prefix(cluster))
                .and_then(|n| n.strip_prefix('-'))
                .and_then(|n| n.strip_suffix(".snap"))
                .is_some_and(is_stamp)
        })
        .collect();
    // The stamp sorts as text in time order; newest first.
    ours.sort_unstable_by(|a, b| b.cmp(a));
    ours.into_iter().skip(keep).cloned().collect()
}

/// The first node answering `sys/health` 200 (active). The error lists what each said.
pub async fn find_active(nodes: &[VaultClient]) -> Result<&VaultClient> {
    crate::api_clients::find_active(nodes)
        .await
        .map_err(|seen| Error::Snapshot {
            message: format!(
                "no node answered sys/health 200 (active); {}. Nothing was taken; the next run retries",
                seen.join("; ")
            ),
            exit: exit::TEMPFAIL,
        })
}

/// Logs in with the escrowed AppRole; returns a 10-minute token, usable only from the
/// role's bound addresses (so `active` should connect from this instance's own address).
pub async fn login<S: ObjectStore, K: Kms>(
    active: &VaultClient,
    s3: &S,
    kms: &K,
    layout: &Layout,
    aws: Duration,
) -> Result<Secret> {
    let url = layout.url(&layout.object(Layout::SNAPSHOT_APPROLE_ITEM));
    approle::login(&ROLE, active, s3, kms, layout, aws)
        .await
        .map_err(|e| {
            let (message, exit) = e.explain(&ROLE, &url, active);
            Error::Snapshot { message, exit }
        })
}

/// What one `snapshot` run stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub url: String,
    pub size: u64,
    pub sha256: String,
    pub pruned: Vec<String>,
    pub elapsed: Duration,
}

/// Takes a snapshot from `active` (already logged in with `token`) and stores it; see the
/// module docs. On any failure the temp file is gone and no object is left behind.
pub async fn take(
    cfg: &Config,
    cluster: &str,
    active: &VaultClient,
    token: &Secret,
    s3: &SdkS3,
) -> Result<Taken> {
    let started = Instant::now();
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let bucket = cfg.snapshot_bucket();
    let kms_key = cfg.escrow_kms_key_id();
    let state_dir = &cfg.agent.state_dir;
    crate::fsutil::ensure_dir(state_dir, 0o700, Default::default())?;

    // 1. Stream to a 0600 temp file (tempfile's default mode), hashing on the way. It is
    // removed when `tmp` drops, on every path out of this function.
    let mut tmp = tempfile::Builder::new()
        .prefix(".snapshot-")
        .suffix(".tmp")
        .tempfile_in(state_dir)
        .map_err(|e| Error::write(state_dir, format!("temp file for the snapshot: {e}")))?;
    let tmp_path = tmp.path().to_path_buf();
    let mut ctx = digest::Context::new(&digest::SHA256);
    let size = {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        let mut sink = |chunk: &[u8]| {
            ctx.update(chunk);
            w.write_all(chunk)
        };
        let n = active
            .download(
                "sys/storage/raft/snapshot",
                token,
                Duration::from_secs(cfg.snapshot.timeout_secs),
                &mut sink,
            )
            .await?;
        w.flush()
            .map_err(|e| Error::write(&tmp_path, e.to_string()))?;
        n
    };
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::write(tmp.path(), e.to_string()))?;
    let hash = ctx.finish();
    let sha256 = crate::install::hex(hash.as_ref());
    let sha256_b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(hash.as_ref())
    };
    if size == 0 {
        return Err(Error::Snapshot {
            message: format!("{} returned an empty snapshot", active.base()),
            exit: exit::UNAVAILABLE,
        });
    }
    tracing::info!(size, sha256 = %sha256, from = %active.base(), "raft snapshot taken");

    // 2. Upload write-once, with the SHA-256 for S3 to check: a body that arrived
    // different is refused, and PutObject is atomic, so a failed one leaves no object.
    // Nothing reads the object back: the node role has no s3:GetObject on snapshots
    // (restore is the operator's), so credentials taken off a node cannot download them.
    let now = crate::clock::now_unix();
    let key = object_key(&cfg.snapshot.prefix, cluster, now);
    let url = format!("s3://{bucket}/{key}");
    let meta = [(META_SHA256, sha256.clone()), (META_SIZE, size.to_string())];
    let put = retry::retry("upload the snapshot", aws, || {
        s3.put_file_if_absent(bucket, &key, tmp.path(), kms_key, &sha256_b64, &meta)
    })
    .await
    .map_err(|e| Error::Snapshot {
        message: format!(
            "upload to {url} failed, nothing was stored (PutObject is all or nothing) and the local copy is removed; the timer's next run tries again. Cause: {e}"
        ),
        exit: e.exit_code(),
    })?;
    if put == PutOutcome::Exists {
        return Err(Error::Snapshot {
            message: format!(
                "{url} already exists (two snapshots in the same second?); not overwritten"
            ),
            exit: exit::TEMPFAIL,
        });
    }

    drop(tmp);
    tracing::info!(url = %url, size, sha256 = %sha256, "snapshot stored; S3 checked its sha256");

    // 3. Keep the most recent `keep`. A failure here is logged: the snapshot is stored, and
    // the next run prunes again.
    let mut pruned = Vec::new();
    match s3.list(bucket, &dir(&cfg.snapshot.prefix, cluster)).await {
        Ok(keys) => {
            for old in to_prune(
                &keys,
                &cfg.snapshot.prefix,
                cluster,
                cfg.snapshot.keep as usize,
            ) {
                match s3.delete(bucket, &old).await {
                    Ok(()) => pruned.push(old),
                    Err(e) => tracing::warn!("pruning s3://{bucket}/{old}: {e}"),
                }
            }
        }
        Err(e) => tracing::warn!("listing old snapshots to prune: {e}"),
    }
    if !pruned.is_empty() {
        tracing::info!(
            deleted = pruned.len(),
            keep = cfg.snapshot.keep,
            "older snapshots pruned"
        );
    }
    Ok(Taken {
        url,
        size,
        sha256,
        pruned,
        elapsed: started.elapsed(),
    })
}

/// Downloads `s3://bucket/key`, checks it against its sha256 metadata, and restores it into
/// the cluster through `active` with the operator's `token`: through
/// `sys/storage/raft/snapshot`, where the server refuses a snapshot sealed by another seal,
/// or with `force` through `sys/storage/raft/snapshot-force`, which skips that check.
pub async fn restore(
    cfg: &Config,
    bucket: &str,
    key: &str,
    active: &VaultClient,
    token: &Secret,
    s3: &SdkS3,
    force: bool,
) -> Result<u64> {
    let url = format!("s3://{bucket}/{key}");
    let state_dir = &cfg.agent.state_dir;
    crate::fsutil::ensure_dir(state_dir, 0o700, Default::default())?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".restore-")
        .suffix(".tmp")
        .tempfile_in(state_dir)
        .map_err(|e| Error::write(state_dir, format!("temp file for the snapshot: {e}")))?;
    let tmp_path = tmp.path().to_path_buf();
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut size = 0u64;
    let meta = {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        let mut sink = |chunk: &[u8]| {
            ctx.update(chunk);
            size += chunk.len() as u64;
            w.write_all(chunk)
        };
        let meta = s3.download(bucket, key, &mut sink).await?;
        w.flush()
            .map_err(|e| Error::write(&tmp_path, e.to_string()))?;
        meta
    };
    let sha256 = crate::install::hex(ctx.finish().as_ref());
    match meta.get(META_SHA256) {
        Some(want) if *want == sha256 => {}
        Some(want) => {
            return Err(Error::Snapshot {
                message: format!("{url}: sha256 is {sha256}, its metadata says {want}: corrupt or tampered; nothing restored"),
                exit: exit::DATAERR,
            })
        }
        None => {
            return Err(Error::Snapshot {
                message: format!("{url} has no sha256 metadata (not written by `vault-bootstrap snapshot`); nothing restored"),
                exit: exit::DATAERR,
            })
        }
    }
    tracing::info!(url = %url, size, sha256 = %sha256, "snapshot downloaded and verified; restoring");
    let body = std::fs::read(tmp.path()).map_err(|e| Error::write(tmp.path(), e.to_string()))?;
    drop(tmp);
    let path = if force {
        "sys/storage/raft/snapshot-force"
    } else {
        "sys/storage/raft/snapshot"
    };
    let (status, resp) = active
        .post_bytes(
            path,
            token,
            body,
            Duration::from_secs(cfg.snapshot.timeout_secs),
        )
        .await?;
    if !(200..300).contains(&status) {
        // 400 on the checked path: the server could not verify the snapshot with this
        // cluster's seal (another cluster's KMS key, or a corrupt file).
        let hint = match (status, force) {
            (400, false) => "; the server refused the snapshot, e.g. because it was sealed by another seal: such a snapshot cannot be restored here. --force skips that check, but the snapshot's seal must still be this cluster's or the cluster cannot decrypt its data afterwards",
            (403, _) => "; VAULT_TOKEN may not do this (its policy needs update on this path)",
            _ => "",
        };
        return Err(Error::Snapshot {
            message: format!(
                "POST {path} at {} answered HTTP {status}: {}{hint}; nothing was restored",
                active.base(),
                resp["errors"]
            ),
            exit: match status {
                403 => exit::NOPERM,
                400 => exit::DATAERR,
                _ => exit::UNAVAILABLE,
            },
        });
    }
    Ok(size)
}

/// Whether `p` is a temp file a snapshot or restore run leaves while it works.
pub fn is_temp_file(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        (n.starts_with(".snapshot-") || n.starts_with(".restore-")) && n.ends_with(".tmp")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_and_sortable() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_700_000_000), "20231114T221320Z");
        assert_eq!(utc_stamp(4_102_444_799), "20991231T235959Z");
        assert!(utc_stamp(1_700_000_000) < utc_stamp(1_700_000_001));
        assert_eq!(
            object_key("/vault-bootstrap-snapshots/", "prod", 1_700_000_000),
            "vault-bootstrap-snapshots/prod/prod-20231114T221320Z.snap"
        );
    }

    #[test]
    fn prune_keeps_the_newest_and_ignores_foreign_keys() {
        let k = |t: u64| object_key("snaps", "prod", t);
        let mut keys: Vec<String> = [5, 1, 3, 2, 4].iter().map(|t| k(t * 3600)).collect();
        keys.push("snaps/prod/notes.txt".into());
        keys.push("snaps/prod/prod-latest.snap".into());
        keys.push("snaps/prod-2/prod-2-19700101T000000Z.snap".into());
        keys.push(object_key("snaps", "other", 0));
        let gone = to_prune(&keys, "snaps", "prod", 2);
        assert_eq!(gone, vec![k(3 * 3600), k(2 * 3600), k(3600)]);
        assert!(to_prune(&keys, "snaps", "prod", 5).is_empty());
        assert!(to_prune(&keys, "snaps", "prod", 50).is_empty());
        assert_eq!(to_prune(&keys, "snaps", "prod", 1).len(), 4);
    }

    #[test]
    fn s3_urls_parse() {
        assert_eq!(
            crate::aws::s3::parse_url("s3://b/p/c/c-x.snap"),
            Some(("b".into(), "p/c/c-x.snap".into()))
        );
        assert_eq!(crate::aws::s3::parse_url("s3://b/"), None);
        assert_eq!(crate::aws::s3::parse_url("https://b/k"), None);
        assert_eq!(crate::aws::s3::parse_url("s3:///k"), None);
    }

    #[test]
    fn only_this_clusters_prefix_is_ours() {
        let key = object_key("snaps", "prod", 1_700_000_000);
        assert!(is_ours("b", "snaps", "prod", "b", &key));
        assert!(is_ours("b", "/snaps/", "prod", "b", &key));
        assert!(!is_ours("b", "snaps", "prod", "other-bucket", &key));
        let other = object_key("snaps", "prod-2", 1_700_000_000);
        assert!(!is_ours("b", "snaps", "prod", "b", &other), "{other}");
        assert!(!is_ours("b", "snaps", "prod", "b", "elsewhere/prod/x.snap"));
    }

    /// Exactly two paths, each `read` only: what a snapshot needs and nothing more.
    #[test]
    fn the_policy_is_exactly_the_snapshot_paths() {
        let paths = crate::approle::policy_paths(POLICY_HCL);
        assert_eq!(
            paths,
            [
                "sys/storage/raft/snapshot",
                "sys/storage/raft/configuration"
            ]
        );
        let caps: Vec<&str> = POLICY_HCL
            .lines()
            .filter(|l| l.contains("capabilities"))
            .map(str::trim)
            .collect();
        assert_eq!(caps, ["capabilities = [\"read\"]"; 2]);
    }

    #[test]
    fn policy_cannot_restore() {
        assert!(!POLICY_HCL.contains("snapshot-force"));
        assert!(!POLICY_HCL.contains("update"));
        assert!(is_temp_file(Path::new("/x/.snapshot-abc.tmp")));
        assert!(!is_temp_file(Path::new("/x/pending-init.json")));
    }
}
