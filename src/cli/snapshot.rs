//! `vault-bootstrap snapshot` (run hourly by its timer) and `snapshot restore --from s3://...
//! --yes [--foreign] [--force]` (an operator's act). The work is in [`crate::snapshot`]; this
//! file finds the nodes, the credentials and the buckets, and guards the restore: only this
//! cluster's snapshots unless `--foreign`, the server's seal check unless `--force`.

use crate::aws::kms::SdkKms;
use crate::aws::s3::SdkS3;
use crate::config::Config;
use crate::error::{exit, Error, Result};
use crate::escrow::Layout;
use crate::secret::Secret;
use crate::{api_clients, node, snapshot};
use std::io::Write;
use std::time::Duration;

/// The cluster CA `boot` wrote: the only trust anchor for the API calls.
fn cluster_ca(cfg: &Config) -> Result<Vec<u8>> {
    api_clients::cluster_ca(cfg).map_err(|e| Error::Snapshot {
        message: e.to_string(),
        exit: exit::NOINPUT,
    })
}

/// Takes one snapshot and stores it (see [`snapshot::take`]); prints its URL, size, sha256.
pub async fn take(cfg: &Config, only_if_active: bool) -> Result<i32> {
    let id = node::identity(cfg).await?;
    let ca = cluster_ca(cfg)?;
    let local = api_clients::local(cfg, &id.facts, &ca)?;
    // The hourly timer runs on every node: a standby stops here, before any EC2 call.
    if only_if_active && !matches!(local.health().await, Ok(crate::vault_api::Health::Active)) {
        tracing::info!(
            "this node is not the active one: the active node's timer takes the snapshot"
        );
        return Ok(exit::OK);
    }
    let (n, clients) = api_clients::with_peers(cfg, id, &ca, local).await?;
    let active = snapshot::find_active(&clients).await?;
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let s3 = SdkS3::for_streams(&n.sdk);
    let layout = Layout::new(cfg, &n.tag_value);
    let token = snapshot::login(active, &s3, &SdkKms::new(&n.sdk), &layout, aws).await?;
    let result = snapshot::take(cfg, &n.tag_value, active, &token, &s3).await;
    // The login lives 10 minutes anyway; end it now (best effort, the default policy allows it).
    crate::approle::revoke_self(active, &token).await;
    let t = result?;
    tracing::info!(
        url = %t.url,
        size = t.size,
        elapsed_ms = t.elapsed.as_millis() as u64,
        pruned = t.pruned.len(),
        "snapshot done"
    );
    let _ = writeln!(
        std::io::stdout(),
        "{} size={} sha256={}",
        t.url,
        t.size,
        t.sha256
    );
    Ok(exit::OK)
}

/// The operator's choices for `snapshot restore`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Restore {
    /// Replacing the cluster's data is meant (required).
    pub yes: bool,
    /// A snapshot outside this cluster's prefix is meant.
    pub foreign: bool,
    /// Skip the server's seal check (`snapshot-force`).
    pub force: bool,
}

/// Restores `from` into the cluster with the operator's `VAULT_TOKEN`.
pub async fn restore(cfg: &Config, from: &str, how: Restore) -> Result<i32> {
    let usage = |message: String| Error::Snapshot {
        message,
        exit: exit::USAGE,
    };
    if !how.yes {
        return Err(usage(format!(
            "restoring {from} replaces ALL of the cluster's data with the snapshot's; pass --yes if you mean it"
        )));
    }
    let Some((bucket, key)) = crate::aws::s3::parse_url(from) else {
        return Err(usage(format!(
            "--from {from:?} is not an s3://bucket/key URL"
        )));
    };
    let token = match std::env::var("VAULT_TOKEN") {
        Ok(t) if !t.trim().is_empty() => Secret::new(t.trim()),
        _ => return Err(usage(
            "restore needs an operator token in VAULT_TOKEN (the admin login, or a token from `break-glass`); the snapshot AppRole deliberately cannot restore: its policy only reads sys/storage/raft/snapshot".into(),
        )),
    };
    let id = node::identity(cfg).await?;
    // A URL pasted from another cluster's listing (or a typo in the cluster name) would
    // replace this cluster's data with someone else's: only this cluster's prefix, unless
    // the operator says so. Checked before anything is downloaded.
    let (prefix, ours) = (&cfg.snapshot.prefix, cfg.snapshot_bucket());
    if !how.foreign && !snapshot::is_ours(ours, prefix, &id.tag_value, &bucket, &key) {
        return Err(usage(format!(
            "{from} is not one of this cluster's snapshots (those are under s3://{ours}/{}); restoring it replaces this cluster's data with another's. Pass --foreign if you mean it; nothing was restored",
            snapshot::dir(prefix, &id.tag_value)
        )));
    }
    if how.force {
        tracing::warn!(
            from = %from,
            "--force: restoring through sys/storage/raft/snapshot-force, which skips the server's check that the snapshot was sealed by this cluster's seal. The snapshot's seal must be this cluster's (the same KMS key): if it is not, the cluster cannot decrypt its data after the restore"
        );
    }
    let ca = cluster_ca(cfg)?;
    let local = api_clients::local(cfg, &id.facts, &ca)?;
    let (n, clients) = api_clients::with_peers(cfg, id, &ca, local).await?;
    let active = snapshot::find_active(&clients).await?;
    let size = snapshot::restore(
        cfg,
        &bucket,
        &key,
        active,
        &token,
        &SdkS3::for_streams(&n.sdk),
        how.force,
    )
    .await?;
    tracing::warn!(from = %from, size, via = %active.base(), force = how.force, "cluster restored from the snapshot");
    let _ = writeln!(std::io::stdout(), "restored {from} ({size} bytes)");
    Ok(exit::OK)
}
