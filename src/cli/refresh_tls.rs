//! `vault-bootstrap refresh-tls` (systemd timer): picks up rotated TLS material without a
//! restart. The objects are fetched and checked exactly as `boot` does; a refused set changes
//! nothing and the old certificate keeps serving. A changed certificate/key is swapped
//! atomically and the server reloaded (SIGHUP re-reads the listener's files). A changed CA
//! needs a restart (peers verify each other with it), done only when every peer is healthy,
//! so that this restart can never cost the cluster its quorum.

use crate::aws::s3::SdkS3;
use crate::cli::boot::vault_owner;
use crate::config::{Config, LauncherKind};
use crate::error::{exit, Error, Result};
use crate::vault_api::Health;
use crate::{launcher, node, tls};
use std::time::{Duration, SystemTime};

pub async fn run(cfg: &Config) -> Result<i32> {
    let owner = vault_owner(cfg)?;
    let id = node::identity(cfg).await?;
    let deadline = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let m = tls::fetch(&SdkS3::new(&id.sdk), &cfg.tls, deadline).await?;
    let checked = tls::check(
        &m,
        &tls::Sources::from_config(&cfg.tls),
        &tls::Expect {
            ip: id.facts.local_ipv4,
            server_name: cfg.tls.server_name.as_deref(),
        },
        SystemTime::now(),
    )?;
    let days_left = tls::days_left(&checked, SystemTime::now());
    if days_left < i64::from(cfg.tls.expiry_warning_days) {
        tracing::warn!(days_left, serial = %checked.serial_hex, "the TLS certificate in the resources bucket expires soon: upload a renewed one");
    } else {
        tracing::info!(days_left, serial = %checked.serial_hex, "TLS material checked");
    }

    // Compared and written under the node lock: a boot or rejoin may be rewriting them.
    let _lock = crate::node_lock::acquire(
        &cfg.agent.state_dir,
        "refresh-tls",
        crate::node_lock::DEFAULT_WAIT,
    )
    .await?;
    let (cert_p, key_p, ca_p) = tls::paths(&cfg.vault.tls_dir);
    let same = |p: &std::path::Path, want: &[u8]| std::fs::read(p).ok().as_deref() == Some(want);
    let ca_changed = !same(&ca_p, &m.ca_pem);
    if !ca_changed && same(&cert_p, &m.cert_pem) && same(&key_p, &m.key_pem) {
        tracing::info!("TLS material unchanged: nothing to do");
        return Ok(exit::OK);
    }

    if ca_changed {
        // Restart: only when every other node is up, and never with the exec launcher
        // (its server belongs to the `boot` process).
        if cfg.vault.launcher == LauncherKind::Exec {
            return Err(Error::Command {
                command: "refresh-tls".into(),
                message: "the CA changed, which needs a server restart; with launcher = \"exec\" restart the `boot` process".into(),
            });
        }
        // Who is in the cluster now (the identity read above is reused: no second IMDS pass).
        let n = node::current(cfg, id.clone()).await?;
        let ca = std::fs::read(&ca_p).unwrap_or_default();
        let mut down = Vec::new();
        for p in n.peers.iter().filter(|p| !p.is_self) {
            let c = crate::cli::boot::peer_client(cfg, &ca, p.ip)?;
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
    tracing::info!(serial = %checked.serial_hex, days_left, "new certificate installed; server reloaded (no restart)");
    Ok(exit::OK)
}
