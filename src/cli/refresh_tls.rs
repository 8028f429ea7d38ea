//! `vault-bootstrap refresh-tls` (systemd timer): picks up rotated TLS material without a
//! restart. The objects are fetched and checked exactly as `boot` does; a refused set changes
//! nothing and the old certificate keeps serving. A changed certificate/key is swapped
//! atomically and the server reloaded (SIGHUP re-reads the listener's files). A changed CA
//! needs a restart (peers verify each other with it), done only when every peer is healthy,
//! so that this restart can never cost the cluster its quorum. Peers are checked against the
//! old and the new CA together: during a rotation both are served (see
//! [`tls::trust_anchors`]).

use crate::boot::vault_owner;
use crate::config::{Config, LauncherKind};
use crate::error::{exit, Error, Result};
use crate::vault_api::Health;
use crate::{launcher, node, tls};
use std::time::SystemTime;

pub async fn run(cfg: &Config) -> Result<i32> {
    let owner = vault_owner(cfg)?;
    let id = node::identity(cfg).await?;
    let (m, checked) = crate::boot::fetch_tls(cfg, &id.sdk, id.facts.local_ipv4).await?;

    // Compared and written under the node lock: a boot or rejoin may be rewriting them.
    let _lock = crate::node_lock::acquire(
        &cfg.agent.state_dir,
        "refresh-tls",
        crate::node_lock::DEFAULT_WAIT,
    )
    .await?;
    let changes = tls::changes(&m, &cfg.vault.tls_dir);
    if !changes.any {
        tracing::info!("TLS material unchanged: nothing to do");
        return Ok(exit::OK);
    }

    if changes.ca {
        // Restart: only when every other node is up, and never with the exec launcher
        // (its server belongs to the `boot` process).
        if cfg.vault.launcher == LauncherKind::Exec {
            return Err(Error::Command {
                command: "refresh-tls".into(),
                message: "the CA changed, which needs a server restart; with launcher = \"exec\" restart the `boot` process".into(),
            });
        }
        // Who is in the cluster now (the identity read above is reused: no second IMDS pass).
        let n = node::current(cfg, id).await?;
        // A rotation goes node by node: peers that refreshed before us serve the new CA's
        // certificates, the others still the old one's. Trust both, or every node after the
        // first would count the first as down and never restart (exit 75 every day).
        let ca = tls::trust_anchors(&cfg.vault.tls_dir, &m.ca_pem);
        let mut down = Vec::new();
        for p in n.peers.iter().filter(|p| !p.is_self) {
            let c = crate::api_clients::peer(cfg, &ca, p.ip)?;
            if !matches!(
                c.health().await,
                Ok(Health::Active | Health::Standby | Health::PerfStandby)
            ) {
                down.push(p.instance_id.clone());
            }
        }
        if !down.is_empty() {
            return Err(Error::Init {
                message: format!(
                    "the CA changed and needs a restart, but peers {down:?} are not healthy: restarting now could cost the cluster its quorum; will retry on the next run"
                ),
                retriable: true,
            });
        }
        tls::write(&m, &cfg.vault.tls_dir, owner)?;
        launcher::systemctl(&["restart", &cfg.vault.unit]).await?;
        tracing::info!(serial = %checked.serial_hex, "new CA installed; server restarted");
        return Ok(exit::OK);
    }

    let reloader = launcher::reloader_for(&cfg.vault, &cfg.agent.state_dir)?;
    tls::write(&m, &cfg.vault.tls_dir, owner)?;
    reloader.reload().await?;
    tracing::info!(serial = %checked.serial_hex, days_left = tls::days_left(&checked, SystemTime::now()), "new certificate installed; server reloaded (no restart)");
    Ok(exit::OK)
}
