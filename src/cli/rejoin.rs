//! `vault-bootstrap rejoin [--dry-run]`: repair this node over SSM (run as root).
//!
//! Re-reads IMDS, rediscovers peers, refreshes and re-checks TLS, re-renders `vault.hcl`;
//! finds out whether the cluster still knows this node (with `VAULT_TOKEN`: from the raft
//! configuration; without: from the cluster id each side reports). Only on positive evidence
//! that the cluster does not know this node (not in the raft configuration, or raft data of
//! another cluster) is its raft data moved aside to a timestamped directory (never deleted)
//! so it can join afresh; a node that is merely sealed, or sees another leader during an
//! election, is no such evidence, and without a token rejoin then refuses. Then the server
//! is restarted and the command waits, bounded, until the node is an unsealed member (a
//! voter, checked with `VAULT_TOKEN`).
//!
//! It refuses when the restart could cost the cluster its quorum: with `VAULT_TOKEN` counted
//! against the voters of the raft configuration, dead ones included (EC2 no longer lists a
//! terminated instance that raft still counts); without, against the instances EC2 lists.
//! `--dry-run` prints the plan and changes nothing.

use crate::boot::{self, Ready};
use crate::config::Config;
use crate::error::{exit, Error, Result};
use crate::launcher::{self, Reloader};
use crate::node;
use crate::node_lock;
use crate::secret::Secret;
use crate::vault_api::{Health, VaultClient};
use crate::{api_clients, raft_config};
use reqwest::Method;
use serde_json::Value;
use std::io::Write;
use std::time::{Duration, Instant};

/// What the cluster thinks of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Membership {
    /// An unsealed member following the cluster's leader.
    Member,
    /// In the cluster's raft configuration but not an unsealed member now (sealed, say):
    /// a restart repairs it, its data stays.
    Known(String),
    /// Positive evidence the cluster does not know it (removed, or raft data of another
    /// cluster): its data is moved aside.
    Unknown(String),
    /// No evidence either way (sealed, no leader, another leader than the peers'): moving
    /// data aside on a guess could throw away a member's data, so rejoin refuses.
    Unsure(String),
    /// The local server holds no cluster yet: it joins on its own once started.
    Fresh,
    /// The local server does not answer.
    Down,
}

/// Everything rejoin looked at, for [`classify`] and [`quorum_refusal`].
#[derive(Debug, Default)]
struct Seen {
    /// The local server's `sys/health` (status, body); None when it does not answer.
    local: Option<(u16, Value)>,
    /// The leader address the local server reports (`sys/leader` 200 only).
    local_leader: Option<String>,
    /// The cluster id the healthy peers report.
    cluster_id: Option<String>,
    /// The leader address the healthy peers report.
    leader: Option<String>,
    /// The raft configuration (read with `VAULT_TOKEN`).
    raft: Option<raft_config::Membership>,
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

    // Health of the peers and the cluster's view. During a CA rotation some nodes serve the
    // new CA's certificate and some the old one's: trust both (see `tls::trust_anchors`).
    let ca = crate::tls::trust_anchors(&cfg.vault.tls_dir, &material.ca_pem);
    let local = api_clients::local_any_source(cfg, &node.facts, &ca)?;
    let mut seen = Seen::default();
    let mut healthy_ids: Vec<&str> = Vec::new();
    let mut healthy_peers: Vec<VaultClient> = Vec::new();
    for p in node.peers.iter().filter(|p| !p.is_self) {
        let c = api_clients::peer(cfg, &ca, p.ip)?;
        if let Some((200 | 429, h)) = get(&c, "sys/health", None).await {
            seen.cluster_id = h["cluster_id"]
                .as_str()
                .map(str::to_owned)
                .or(seen.cluster_id);
            if let Some((200, l)) = get(&c, "sys/leader", None).await {
                seen.leader = leader_of(&l).or(seen.leader);
            }
            healthy_ids.push(&p.instance_id);
            healthy_peers.push(c);
        }
    }
    let healthy = healthy_peers.len();
    let total = node.peers.len();
    let quorum = raft_config::quorum(total);
    say(format!(
        "{healthy} of {} other node(s) healthy; quorum of {total} is {quorum}",
        total.saturating_sub(1)
    ));
    seen.local = get(&local, "sys/health", None).await;
    if seen.local.is_some() {
        seen.local_leader = match get(&local, "sys/leader", None).await {
            Some((200, l)) => Some(leader_of(&l).unwrap_or_default()),
            _ => None,
        };
    }
    if let Some(t) = &token {
        let raft = raft_configuration(&healthy_peers, &local, t).await?;
        say(format!(
            "raft configuration: {} server(s), {} voter(s)",
            raft.servers.len(),
            raft.voters.len()
        ));
        seen.raft = Some(raft);
    }
    let me = node.facts.instance_id.as_str();
    let membership = classify(&seen, me);
    say(format!("this node: {membership:?}"));

    // While this node restarts only the others serve: they must hold a quorum by themselves.
    let refusal = match &seen.raft {
        Some(raft) => quorum_refusal(raft, me, &healthy_ids),
        None => (healthy < quorum).then(|| format!(
            "only {healthy} of the other {} node(s) are healthy and a quorum of {total} is {quorum}: restarting this node now could cost the cluster its quorum (or there is none to join). Bring the other nodes back first",
            total.saturating_sub(1)
        )),
    };
    if let Some(message) = refusal {
        return Err(Error::Refused { message });
    }
    if let Membership::Unsure(why) = &membership {
        return Err(Error::Refused {
            message: format!(
                "cannot tell whether the cluster still knows this node ({why}); nothing was changed. Run rejoin with VAULT_TOKEN (a token that can read sys/storage/raft/configuration): the raft configuration then decides, and a sealed member is restarted with its data. Or run it again once the cluster has settled"
            ),
        });
    }
    if membership == Membership::Member && !hcl_changes && !tls_changes {
        say("nothing to repair: an unsealed member with current configuration");
        return Ok(exit::OK);
    }
    let move_aside = matches!(membership, Membership::Unknown(_));
    let aside = crate::raft_store::aside_path(&cfg.vault.data_dir);
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

    launcher::stop_server(&cfg.vault, &cfg.agent.state_dir).await?;
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
        // Without its raft data this node is no longer the member the record describes: a
        // failed rejoin must not restart it "from disk" on an empty store.
        crate::member::forget(&cfg.agent.state_dir)?;
        let aside = crate::raft_store::move_aside(&cfg.vault.data_dir)?;
        say(format!(
            "raft data moved aside to {} (kept, not deleted)",
            aside.display()
        ));
    }
    let _ = boot::write_files(cfg, &material, &hcl, owner)?;
    let launched = boot::launch(cfg, &node, true, lock).await?;
    say("server started");

    let ready = &Ready {
        node: &node,
        local: &local,
        ca_pem: &ca,
        owner,
        reloader: Reloader::of(&launched.running),
        flavor,
        store_predates_start: launched.store_predates_start,
    };
    let deadline = Duration::from_secs(cfg.vault.health_timeout_secs);
    let join = Duration::from_secs(cfg.init.join_timeout_secs);
    let group = boot::lifecycle_ctx(cfg, &node, &ca);
    boot::settle(
        &local,
        deadline,
        launched,
        |_, _| async {
            let joined = boot::initialize_or_join(cfg, ready, started).await?;
            wait_voter(&local, &node.facts.instance_id, token.as_ref(), join).await?;
            say(format!(
                "done in {:.1} s: an unsealed member again",
                started.elapsed().as_secs_f64()
            ));
            tracing::info!("rejoin complete");
            Ok(Some(joined))
        },
        |joined| boot::answer_the_group(&group, joined),
    )
    .await
}

/// The non-empty `leader_address` of a `sys/leader` answer.
fn leader_of(body: &Value) -> Option<String> {
    body["leader_address"]
        .as_str()
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
}

/// The raft configuration, from the first healthy peer (it forwards to the leader) or the
/// local server that answers 200. With a token it is what decides membership and quorum, so
/// not getting it is a refusal, never a fallback to guesses.
async fn raft_configuration(
    peers: &[VaultClient],
    local: &VaultClient,
    token: &Secret,
) -> Result<raft_config::Membership> {
    let mut answers = Vec::new();
    for c in peers.iter().chain(std::iter::once(local)) {
        match get(c, "sys/storage/raft/configuration", Some(token)).await {
            Some((200, body)) => match raft_config::Membership::parse(&body) {
                Some(raft) => return Ok(raft),
                None => answers.push(format!(
                    "{}: HTTP 200, but not a server list whose every entry has a node_id",
                    c.base()
                )),
            },
            Some((status, body)) => {
                answers.push(format!("{}: HTTP {status} {}", c.base(), body["errors"]))
            }
            None => answers.push(format!("{}: no answer", c.base())),
        }
    }
    Err(Error::Refused {
        message: format!(
            "VAULT_TOKEN is set but no node returned the raft configuration ({}); nothing was changed. Use a token that can read sys/storage/raft/configuration, or bring a node of the cluster back",
            answers.join("; ")
        ),
    })
}

/// Why restarting (or removing) this node would cost the cluster its quorum, counted on the
/// raft configuration: every voter counts, also those whose instance is gone, and only the
/// other voters that answered healthy keep serving while this node restarts.
fn quorum_refusal(raft: &raft_config::Membership, me: &str, healthy: &[&str]) -> Option<String> {
    let voters = &raft.voters;
    let quorum = raft_config::quorum(voters.len());
    let alive = voters
        .iter()
        .filter(|id| *id != me && healthy.contains(&id.as_str()))
        .count();
    if alive >= quorum {
        return None;
    }
    let silent: Vec<&str> = voters
        .iter()
        .filter(|id| *id != me && !healthy.contains(&id.as_str()))
        .map(String::as_str)
        .collect();
    Some(format!(
        "the raft configuration has {} voter(s), a quorum is {quorum}, and only {alive} other voter(s) answer healthy (not answering: {silent:?}): restarting this node now could cost the cluster its quorum. Bring those nodes back, or remove the dead ones from the raft configuration (sys/storage/raft/remove-peer), first",
        voters.len()
    ))
}

/// What the cluster thinks of this node, from what rejoin saw. The raft configuration, when
/// read, decides; without it only a different cluster id is evidence that the cluster does
/// not know this node. Sealed, leaderless or following another leader is what an election,
/// a KMS hiccup or an operator's seal looks like too: `Unsure`.
fn classify(seen: &Seen, me: &str) -> Membership {
    let health = seen.local.as_ref().map(|(s, _)| Health::from_status(*s));
    if health == Some(Health::Uninitialized) {
        return Membership::Fresh;
    }
    let unsealed = matches!(
        health,
        Some(Health::Active | Health::Standby | Health::PerfStandby)
    );
    if let Some(raft) = &seen.raft {
        if !raft.servers.contains(me) {
            return Membership::Unknown("not in the cluster's raft configuration (removed)".into());
        }
        return match health {
            None => Membership::Down,
            Some(_) if unsealed => Membership::Member,
            Some(h) => Membership::Known(format!(
                "in the cluster's raft configuration, and answers {h}"
            )),
        };
    }
    // A removed node's server may stop answering; without the cluster's word it is "down".
    let (Some(h), Some((_, body))) = (health, &seen.local) else {
        return Membership::Down;
    };
    if let (Some(mine), Some(theirs)) = (body["cluster_id"].as_str(), &seen.cluster_id) {
        if !mine.is_empty() && mine != theirs {
            return Membership::Unknown(format!(
                "raft data of another cluster ({mine}, the cluster is {theirs})"
            ));
        }
    }
    if !unsealed {
        return Membership::Unsure(format!("answers {h}"));
    }
    match (&seen.local_leader, &seen.leader) {
        (None, _) => Membership::Unsure("does not say who its leader is".into()),
        (Some(mine), _) if mine.is_empty() => Membership::Unsure("knows no leader".into()),
        (Some(mine), Some(theirs)) if mine != theirs => Membership::Unsure(format!(
            "follows leader {mine:?}, the other nodes follow {theirs:?}"
        )),
        _ => Membership::Member,
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
            if raft_config::Membership::parse(&body).is_some_and(|m| m.voters.contains(me)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn servers(list: &[(&str, bool)]) -> raft_config::Membership {
        raft_config::Membership {
            servers: list.iter().map(|(id, _)| (*id).into()).collect(),
            voters: list
                .iter()
                .filter(|(_, voter)| *voter)
                .map(|(id, _)| (*id).into())
                .collect(),
            leader: None,
            index: None,
        }
    }

    /// A local server answering `status`, in cluster `cid`, following `leader`; the peers in
    /// cluster "c1" following "https://a:8200".
    fn seen(status: u16, cid: &str, leader: Option<&str>) -> Seen {
        Seen {
            local: Some((status, json!({ "cluster_id": cid }))),
            local_leader: leader.map(str::to_owned),
            cluster_id: Some("c1".into()),
            leader: Some("https://a:8200".into()),
            raft: None,
        }
    }

    #[test]
    fn without_a_token_only_another_cluster_id_moves_data_aside() {
        let member = seen(429, "c1", Some("https://a:8200"));
        assert_eq!(classify(&member, "i-me"), Membership::Member);
        assert!(matches!(
            classify(&seen(429, "c2", Some("https://a:8200")), "i-me"),
            Membership::Unknown(_)
        ));
        // Sealed, leaderless, or following the old leader during an election: no evidence.
        for s in [
            seen(503, "c1", None),
            seen(503, "", Some("")),
            seen(429, "c1", None),
            seen(429, "c1", Some("")),
            seen(429, "c1", Some("https://b:8200")),
        ] {
            assert!(
                matches!(classify(&s, "i-me"), Membership::Unsure(_)),
                "{s:?}: {:?}",
                classify(&s, "i-me")
            );
        }
        assert_eq!(classify(&seen(501, "", None), "i-me"), Membership::Fresh);
        let down = Seen {
            local: None,
            ..seen(0, "", None)
        };
        assert_eq!(classify(&down, "i-me"), Membership::Down);
    }

    #[test]
    fn with_the_raft_configuration_it_decides() {
        let listed = Some(servers(&[("i-a", true), ("i-me", true)]));
        let sealed = Seen {
            raft: listed.clone(),
            ..seen(503, "c1", None)
        };
        assert!(matches!(classify(&sealed, "i-me"), Membership::Known(_)));
        let electing = Seen {
            raft: listed,
            ..seen(429, "c1", Some("https://b:8200"))
        };
        assert_eq!(classify(&electing, "i-me"), Membership::Member);
        let removed = Seen {
            raft: Some(servers(&[("i-a", true), ("i-b", true)])),
            ..seen(429, "c1", Some("https://a:8200"))
        };
        assert!(matches!(classify(&removed, "i-me"), Membership::Unknown(_)));
    }

    #[test]
    fn quorum_counts_raft_voters_dead_ones_included() {
        // Four voters, one of them on a terminated instance EC2 no longer lists: with this
        // node restarting only two would serve, and a quorum of four is three.
        let four = servers(&[
            ("i-a", true),
            ("i-b", true),
            ("i-dead", true),
            ("i-me", true),
        ]);
        let why = quorum_refusal(&four, "i-me", &["i-a", "i-b"]).expect("refused");
        assert!(
            why.contains("4 voter(s)") && why.contains("i-dead"),
            "{why}"
        );
        assert_eq!(
            quorum_refusal(&four, "i-me", &["i-a", "i-b", "i-dead"]),
            None
        );
        // Three voters, this one among them: the two others suffice.
        let three = servers(&[("i-a", true), ("i-b", true), ("i-me", true)]);
        assert_eq!(quorum_refusal(&three, "i-me", &["i-a", "i-b"]), None);
        assert!(quorum_refusal(&three, "i-me", &["i-a"]).is_some());
        // Non-voters do not count; a removed node (not listed) needs the voters' quorum.
        let with_learner = servers(&[("i-a", true), ("i-b", true), ("i-new", false)]);
        assert_eq!(quorum_refusal(&with_learner, "i-me", &["i-a", "i-b"]), None);
        assert!(quorum_refusal(&with_learner, "i-me", &["i-a", "i-new"]).is_some());
    }
}
