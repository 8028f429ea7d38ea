//! `vault-bootstrap refresh-tls` (systemd timer): picks up rotated TLS material without a
//! restart. The objects are fetched and checked exactly as `boot` does; a refused set changes
//! nothing and the old certificate keeps serving. A changed certificate/key is swapped
//! atomically and the server reloaded (SIGHUP re-reads the listener's files). A changed CA
//! needs a restart (peers verify each other with it), done only when it keeps the cluster's
//! failure tolerance and one node at a time ([`crate::lifecycle::restart`]). Peers are checked against the
//! old and the new CA together: during a rotation both are served (see
//! [`tls::trust_anchors`]).

use crate::boot::vault_owner;
use crate::config::{Config, LauncherKind};
use crate::error::{exit, Error, Result};
use crate::lifecycle::restart::when_it_keeps_quorum;
use crate::{launcher, node, tls};
use std::time::{Duration, SystemTime};

/// How long a CA restart waits for a moment it keeps the cluster's failure tolerance: long
/// enough for the peers whose timers fired at the same time to restart one by one (each holds
/// the restart ticket until it is stale), short of the next daily run.
const RESTART_WAIT: Duration = Duration::from_secs(15 * 60);

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
        // Restart: only one node at a time with every other voter healthy, and never with the exec launcher
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
        let ctx = crate::boot::lifecycle_ctx(cfg, &n, &ca);
        when_it_keeps_quorum(&ctx, RESTART_WAIT, || async {
            tls::write(&m, &cfg.vault.tls_dir, owner)?;
            launcher::systemctl(&["restart", &cfg.vault.unit]).await
        })
        .await?;
        tracing::info!(serial = %checked.serial_hex, "new CA installed; server restarted");
        return Ok(exit::OK);
    }

    let reloader = launcher::reloader_for(&cfg.vault, &cfg.agent.state_dir)?;
    tls::write(&m, &cfg.vault.tls_dir, owner)?;
    reloader.reload().await?;
    tracing::info!(serial = %checked.serial_hex, days_left = tls::days_left(&checked, SystemTime::now()), "new certificate installed; server reloaded (no restart)");
    Ok(exit::OK)
}
