//! `vault-bootstrap rejoin [--dry-run]`: repair this node over SSM (run as root).
//!
//! Re-reads IMDS, rediscovers peers, refreshes and re-checks TLS, re-renders `vault.hcl`;
//! finds out whether the cluster still knows this node (with `VAULT_TOKEN`: from the raft
//! configuration; without: from the cluster id and the leader each side reports). A node the
//! cluster no longer knows gets its raft data moved aside to a timestamped directory (never
//! deleted) so it can join afresh. Then the server is restarted and the command waits,
//! bounded, until the node is an unsealed member (a voter, checked with `VAULT_TOKEN`).
//! It refuses when the restart could cost the cluster its quorum. `--dry-run` prints the
//! plan and changes nothing.

use crate::cli::boot::{self, Ready};
use crate::config::{Config, LauncherKind};
use crate::error::{exit, Error, Result};
use crate::launcher::{self, Reloader};
use crate::node;
use crate::node_lock;
use crate::secret::Secret;
use crate::vault_api::{Health, VaultClient};
use reqwest::Method;
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What the cluster thinks of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Membership {
    /// An unsealed member following the cluster's leader.
    Member,
    /// The cluster does not know it (removed, or raft data of another cluster).
    Unknown(String),
    /// The local server holds no cluster yet: it joins on its own once started.
    Fresh,
    /// The local server does not answer.
    Down,
}

fn say(line: impl std::fmt::Display) {
    let _ = writeln!(std::io::stdout(), "rejoin: {line}");
}

async fn get(c: &VaultClient, path: &str, token: Option<&Secret>) -> Option<(u16, Value)> {
    c.call(Method::GET, path, token, None).await.ok()
}

pub async fn run(cfg: &Config, dry_run: bool) -> Result<i32> {
    let started = Instant::now();
    launcher::check_binary(&cfg.vault.binary)?;
    let owner = boot::vault_owner(cfg)?;
    let token = std::env::var("VAULT_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .map(Secret::new);
    // A boot or refresh-tls changing this node now would interleave with the repair (a boot
    // could start the server on raft data being moved aside). A dry run changes nothing.
    let lock = if dry_run {
        None
    } else {
        Some(node_lock::acquire(&cfg.agent.state_dir, "rejoin", node_lock::DEFAULT_WAIT).await?)
    };
    let node = node::identify(cfg).await?;
    say(format!(
        "instance {} ({}), {} instance(s) in cluster {}",
        node.facts.instance_id,
        node.facts.local_ipv4,
        node.peers.len(),
        node.tag_value
    ));
    let (material, _) = boot::fetch_tls(cfg, &node.sdk, node.facts.local_ipv4).await?;
    let flavor = launcher::resolve_flavor(&cfg.vault).await;
    let hcl = boot::render_config(cfg, &node, flavor);
    let hcl_changes = !crate::fsutil::holds(&cfg.vault.config_file, hcl.as_bytes());
    let tls_changes = crate::tls::changes(&material, &cfg.vault.tls_dir).any;
    say(format!(
        "TLS material checked; {}",
        if tls_changes {
            "it will be refreshed"
        } else {
            "unchanged"
        }
    ));
    say(format!(
        "vault.hcl {}",
        if hcl_changes {
            "will be re-rendered (peers or settings changed)"
        } else {
            "unchanged"
        }
    ));

    // Health of the peers and the cluster's view.
    let local = boot::local_client(cfg, &node.facts, &material.ca_pem)?;
    let mut healthy = 0usize;
    let mut cluster_id = None;
    let mut leader = None;
    let mut healthy_peers: Vec<VaultClient> = Vec::new();
    for p in node.peers.iter().filter(|p| !p.is_self) {
        let c = boot::peer_client(cfg, &material.ca_pem, p.ip)?;
        if let Some((200 | 429, h)) = get(&c, "sys/health", None).await {
            healthy += 1;
            cluster_id = h["cluster_id"].as_str().map(str::to_owned).or(cluster_id);
            if let Some((200, l)) = get(&c, "sys/leader", None).await {
                leader = l["leader_address"]
                    .as_str()
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .or(leader);
            }
            healthy_peers.push(c);
        }
    }
    let total = node.peers.len();
    let quorum = total / 2 + 1;
    say(format!(
        "{healthy} of {} other node(s) healthy; quorum of {total} is {quorum}",
        total.saturating_sub(1)
    ));

    let membership = assess(
        &local,
        &node.facts.instance_id,
        token.as_ref(),
        &healthy_peers,
        cluster_id.as_deref(),
        leader.as_deref(),
    )
    .await;
    say(format!("this node: {membership:?}"));

    // While this node restarts only the others serve: they must hold a quorum by themselves.
    if healthy < quorum {
        return Err(Error::Refused {
            message: format!(
                "only {healthy} of the other {} node(s) are healthy and a quorum of {total} is {quorum}: restarting this node now could cost the cluster its quorum (or there is none to join). Bring the other nodes back first",
                total.saturating_sub(1)
            ),
        });
    }
    if membership == Membership::Member && !hcl_changes && !tls_changes {
        say("nothing to repair: an unsealed member with current configuration");
        return Ok(exit::OK);
    }
    let move_aside = matches!(membership, Membership::Unknown(_));
    let aside = aside_path(&cfg.vault.data_dir);
    if dry_run {
        if move_aside {
            say(format!(
                "would move {} aside to {}",
                cfg.vault.data_dir.display(),
                aside.display()
            ));
        }
        say("would write TLS and vault.hcl, restart the server and wait until it is an unsealed member");
        say("dry run: nothing changed");
        return Ok(exit::OK);
    }

    stop_server(cfg).await?;
    say("server stopped");
    if move_aside {
        if let (Some(t), Some(peer)) = (&token, healthy_peers.first()) {
            // A stale entry for this node id would keep counting as a dead voter.
            let body = serde_json::json!({"server_id": node.facts.instance_id});
            if let Ok((s, _)) = peer
                .call(
                    Method::POST,
                    "sys/storage/raft/remove-peer",
                    Some(t),
                    Some(body),
                )
                .await
            {
                if (200..300).contains(&s) {
                    say("removed this node's stale peer entry on the leader");
                }
            }
        }
        std::fs::rename(&cfg.vault.data_dir, &aside)
            .map_err(|e| Error::write(&aside, format!("move raft data aside: {e}")))?;
        say(format!(
            "raft data moved aside to {} (kept, not deleted)",
            aside.display()
        ));
    }
    let _ = boot::write_files(cfg, &material, &hcl, owner)?;
    let running = boot::start(cfg, &node, true).await?;
    say("server started");

    let ready = &Ready {
        node: &node,
        local: &local,
        ca_pem: &material.ca_pem,
        owner,
        reloader: Reloader::of(&running),
        flavor,
    };
    let deadline = Duration::from_secs(cfg.vault.health_timeout_secs);
    let join = Duration::from_secs(cfg.init.join_timeout_secs);
    let launched = boot::Launched { running, lock };
    boot::settle(&local, deadline, launched, |_, _| async {
        boot::initialize_or_join(cfg, ready, started).await?;
        wait_voter(&local, &node.facts.instance_id, token.as_ref(), join).await?;
        say(format!(
            "done in {:.1} s: an unsealed member again",
            started.elapsed().as_secs_f64()
        ));
        tracing::info!("rejoin complete");
        Ok(())
    })
    .await
}

async fn assess(
    local: &VaultClient,
    me: &str,
    token: Option<&Secret>,
    peers: &[VaultClient],
    cluster_id: Option<&str>,
    leader: Option<&str>,
) -> Membership {
    let local_health = get(local, "sys/health", None).await;
    let fresh =
        matches!(&local_health, Some((s, _)) if Health::from_status(*s) == Health::Uninitialized);
    if fresh {
        return Membership::Fresh;
    }
    if let Some(t) = token {
        // The authoritative answer: the cluster's own raft configuration (any healthy peer
        // forwards to the leader; the first that answers decides).
        for p in peers {
            if let Some((200, body)) = get(p, "sys/storage/raft/configuration", Some(t)).await {
                let servers = body["data"]["config"]["servers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !servers.iter().any(|s| s["node_id"] == me) {
                    return Membership::Unknown(
                        "not in the cluster's raft configuration (removed)".into(),
                    );
                }
                break;
            }
        }
    }
    // A removed node's server may stop answering; without the cluster's word it is "down".
    let Some((status, health)) = local_health else {
        return Membership::Down;
    };
    if let (Some(mine), Some(theirs)) = (health["cluster_id"].as_str(), cluster_id) {
        if !mine.is_empty() && mine != theirs {
            return Membership::Unknown(format!(
                "raft data of another cluster ({mine}, the cluster is {theirs})"
            ));
        }
    }
    match get(local, "sys/leader", None).await {
        Some((200, l)) => {
            let mine = l["leader_address"].as_str().unwrap_or("");
            if leader.is_some_and(|theirs| theirs != mine) {
                return Membership::Unknown(format!(
                    "follows leader {:?}, the cluster follows {:?}",
                    mine,
                    leader.unwrap_or("")
                ));
            }
        }
        _ => return Membership::Unknown("does not say who its leader is".into()),
    }
    if matches!(
        Health::from_status(status),
        Health::Active | Health::Standby | Health::PerfStandby
    ) {
        Membership::Member
    } else {
        Membership::Unknown(format!("answers {}", Health::from_status(status)))
    }
}

/// `<data_dir>.removed-<UTC time>` beside the data directory (same file system: a rename).
fn aside_path(data_dir: &std::path::Path) -> PathBuf {
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

async fn stop_server(cfg: &Config) -> Result<()> {
    match cfg.vault.launcher {
        LauncherKind::Systemd => launcher::systemctl(&["stop", &cfg.vault.unit]).await,
        LauncherKind::Exec => {
            let Ok(Reloader::Pid(pid)) = launcher::reloader_for(&cfg.vault, &cfg.agent.state_dir)
            else {
                return Ok(()); // nothing of ours is running
            };
            // A raft server shuts down in well under a second; 30 s covers a slow disk.
            launcher::stop_pid(pid, Duration::from_secs(30)).await
        }
    }
}

/// Until the node is a voter (with a token) or an unsealed member (without).
async fn wait_voter(
    local: &VaultClient,
    me: &str,
    token: Option<&Secret>,
    bound: Duration,
) -> Result<()> {
    let Some(t) = token else {
        crate::init::wait_unsealed(local, bound).await?;
        return Ok(());
    };
    let start = Instant::now();
    loop {
        if let Some((200, body)) = get(local, "sys/storage/raft/configuration", Some(t)).await {
            let voter = body["data"]["config"]["servers"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["node_id"] == me && s["voter"] == true));
            if voter {
                return Ok(());
            }
        }
        if start.elapsed() > bound {
            return Err(Error::Init {
                message: format!(
                    "this node did not become a voter within {} s",
                    bound.as_secs()
                ),
                retriable: true,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
