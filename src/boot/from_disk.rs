//! A member's reboot from its last known good files: static stability.
//!
//! The record in [`crate::member`] says this instance settled as a member before, and its
//! `vault.hcl`, TLS files and raft data are on disk. The server starts from them before any
//! EC2, S3 or KMS call of the agent's (the server's own seal still calls KMS), and the node
//! is ready once it is an unsealed member of the recorded cluster. Only then are peers, TLS
//! and the escrow's records refreshed from the control plane; a refresh that fails (EC2 or
//! S3 down) is a warning, retried by the `refresh-tls` timer and the next boot.
//!
//! `vault.hcl` is rendered again from `config.toml` as it is now and the recorded peers, so
//! a changed `config.toml` takes effect on this start too.

use super::{
    answer_the_group, fetch_tls, initialize_or_join, launch, lifecycle_ctx, render_config, report,
    settle, write_config, Joined, Ready,
};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::fsutil::Owner;
use crate::member::{self, Member};
use crate::vault_api::{Health, VaultClient};
use crate::{api_clients, init, launcher, node, node_lock, tls};
use std::time::{Duration, Instant};

pub async fn run(
    cfg: &Config,
    instance: node::Instance,
    record: Member,
    owner: Owner,
    started: Instant,
) -> Result<i32> {
    tracing::info!(
        cluster = %record.cluster,
        cluster_id = record.cluster_id.as_deref().unwrap_or("?"),
        peer_count = record.peers.len(),
        "a member of this cluster before: starting the server from its last known good files, before any AWS call"
    );
    let flavor = launcher::resolve_flavor(&cfg.vault).await;
    let node = instance
        .known_as(&record.cluster)
        .with_peers(record.peers());
    crate::lifecycle::launch::keep_alive_while_keys_pending(
        cfg,
        &node.tag_value,
        &node.facts.instance_id,
        &node.sdk,
    );
    let hcl = render_config(cfg, &node, flavor);
    let lock = node_lock::acquire(&cfg.agent.state_dir, "boot", node_lock::DEFAULT_WAIT).await?;
    let changed = write_config(cfg, &hcl, owner)?;
    let launched = launch(cfg, &node, changed, Some(lock)).await?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "phase done: server started (from disk)"
    );
    let ca_path = tls::paths(&cfg.vault.tls_dir).2;
    let ca_pem = std::fs::read(&ca_path).map_err(|e| Error::NoInput {
        message: format!("cannot read the cluster CA {}: {e}", ca_path.display()),
    })?;
    let local = api_clients::local_any_source(cfg, &node.facts, &ca_pem)?;
    let reloader = launcher::Reloader::of(&launched.running);
    let deadline = Duration::from_secs(cfg.vault.health_timeout_secs);
    let ready = Ready {
        node: &node,
        local: &local,
        ca_pem: &ca_pem,
        owner,
        reloader,
        flavor,
        store_predates_start: launched.store_predates_start,
    };
    // The lifecycle steps run whether the refresh worked or not: they need the recorded
    // peers, the CA on disk and their own credential (an S3 read and a KMS decrypt), not
    // fresh peers or TLS. So a launch hook that a boot which died left unanswered is
    // answered by the next one, with the node lock already released.
    let group = lifecycle_ctx(cfg, &node, &ca_pem);
    let (local, ready, record) = (&local, &ready, &record);
    settle(
        local,
        deadline,
        launched,
        |health, untouched| async move {
            report(&health, started);
            if untouched && health == Health::Sealed {
                tracing::warn!("this node's server is running and sealed, by an operator: left sealed. Restart vault.service or run `vault-bootstrap rejoin` to unseal it");
                return Ok(None);
            }
            serving(cfg, local, record).await?;
            tracing::info!(
                from_disk = true,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "serving from the last known good files (the record's cluster id matches the server's); checking it against the escrow marker"
            );
            // Ready is said only after the marker's check, which refresh makes: another
            // cluster's data must never be reported ready, even from disk.
            match refresh(cfg, ready, started).await {
                Ok(joined) => {
                    tracing::info!(
                        from_disk = true,
                        marker_checked = true,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "node ready: unsealed cluster member, started from its last known good files; the escrow marker names its cluster"
                    );
                    Ok(Some(joined))
                }
                // Another cluster's data, or keys nobody will escrow: loud, not a warning
                // (under systemd the server keeps serving; the boot unit retries).
                Err(e @ (Error::ForeignCluster { .. } | Error::Escrow { .. })) => Err(e),
                Err(e) => {
                    tracing::warn!("serving from the last known good files; refreshing peers, TLS and the escrow records failed ({e}): the refresh-tls timer and the next boot retry it");
                    tracing::info!(
                        from_disk = true,
                        marker_checked = false,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "node ready: unsealed cluster member, started from its last known good files; its cluster id matches the membership record, not checked against the escrow marker (the refresh failed)"
                    );
                    Ok(Some(Joined {
                        vanished: Vec::new(),
                    }))
                }
            }
        },
        |joined| answer_the_group(&group, joined),
    )
    .await
}

/// Waits until the server is an unsealed member of the recorded cluster.
async fn serving(cfg: &Config, local: &VaultClient, record: &Member) -> Result<()> {
    if local.health().await == Ok(Health::Uninitialized) {
        // The raft data holds no cluster (an operator emptied it): the record is stale.
        member::forget(&cfg.agent.state_dir)?;
        return Err(Error::Init {
            message: format!(
                "{} says this node was a member, but its server holds no initialized cluster: the record was removed, and the next boot joins as a new node",
                member::path(&cfg.agent.state_dir).display()
            ),
            retriable: true,
        });
    }
    init::wait_unsealed(local, Duration::from_secs(cfg.init.join_timeout_secs)).await?;
    init::check_cluster_id(
        local.cluster_id().await.as_deref(),
        record.cluster_id.as_deref(),
        &member::path(&cfg.agent.state_dir).display().to_string(),
    )?;
    if !record.post_init_done {
        tracing::warn!(
            "post-init was not recorded done when this node last settled; checked again below"
        );
    }
    Ok(())
}

/// After serving: peers from EC2, TLS from S3, then what every boot checks against the
/// escrow (cluster id, post-init), which also records the membership again.
async fn refresh(cfg: &Config, r: &Ready<'_>, started: Instant) -> Result<Joined> {
    let id = node::Identity {
        facts: r.node.facts.clone(),
        tag_value: r.node.tag_value.clone(),
        sdk: r.node.sdk.clone(),
    };
    let fresh = match node::current(cfg, id).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("peers not refreshed ({e}); keeping the recorded ones");
            r.node.clone()
        }
    };
    let (material, _) = fetch_tls(cfg, &fresh.sdk, fresh.facts.local_ipv4).await?;
    let changes = tls::changes(&material, &cfg.vault.tls_dir);
    if changes.ca {
        // A CA change needs a restart that peers must survive: refresh-tls's job.
        tracing::info!("the CA in the resources bucket differs from the one on disk: left to the refresh-tls timer, which restarts the server only when that keeps the failure tolerance, one node at a time");
    } else if changes.any {
        tls::write(&material, &cfg.vault.tls_dir, r.owner)?;
        r.reloader.reload().await?;
        tracing::info!("renewed TLS certificate installed; server reloaded");
    }
    let hcl = render_config(cfg, &fresh, r.flavor);
    if write_config(cfg, &hcl, r.owner)? {
        // retry_join is read only by a server with no raft data: nothing to restart for.
        tracing::info!(
            "vault.hcl updated with the current peers; the server reads it at its next start"
        );
    }
    let ready = Ready {
        node: &fresh,
        local: r.local,
        ca_pem: r.ca_pem,
        owner: r.owner,
        reloader: r.reloader.clone(),
        flavor: r.flavor,
        store_predates_start: r.store_predates_start,
    };
    initialize_or_join(cfg, &ready, started).await
}
