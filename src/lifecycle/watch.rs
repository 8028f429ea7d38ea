//! `vault-bootstrap watch`: the long-running unit beside the server. It polls IMDS for the
//! instance's target lifecycle state (every [`POLL`], as AWS recommends for scale-in) and
//! leaves the cluster gracefully when it becomes `Terminated` ([`super::leave`]); and every
//! `lifecycle.watch_interval_secs` it reaps dead peers ([`super::reap`]).
//!
//! It holds no secret between steps: each reaping pass logs in with the lifecycle credential
//! and revokes the token at its end; a leave keeps one login for its wait (see
//! [`super::session::Logins`]). A failed step is logged and tried again at the next tick;
//! only a finished leave ends the command (exit 0: the instance is going away).

use super::session::Ctx;
use crate::config::Config;
use crate::error::Result;
use crate::imds::{self, SdkImds};
use crate::{api_clients, node};
use std::time::{Duration, Instant};

/// IMDS polling interval for the target lifecycle state: what AWS's scale-in guidance uses,
/// short against the terminate hook's heartbeat timeout, light on IMDS.
pub const POLL: Duration = Duration::from_secs(5);

/// The peers this node settled with (its membership record): where to find the leader
/// when its own server is down. No EC2 call: the watch must work while EC2 does not.
fn recorded_peers(cfg: &Config) -> Vec<std::net::IpAddr> {
    crate::member::read(&cfg.agent.state_dir)
        .ok()
        .flatten()
        .map(|m| {
            m.peers()
                .into_iter()
                .filter(|p| !p.is_self)
                .map(|p| p.ip)
                .collect()
        })
        .unwrap_or_default()
}

/// A step's context, with the CA as it is on disk now (boot may write it after we start).
fn ctx_of<'a>(cfg: &'a Config, id: &'a node::Identity, ca: &'a [u8]) -> Ctx<'a> {
    Ctx {
        cfg,
        facts: &id.facts,
        tag_value: &id.tag_value,
        sdk: &id.sdk,
        ca,
        peers: recorded_peers(cfg),
    }
}

pub async fn run(cfg: &Config) -> Result<i32> {
    // Who this is: IMDS, and the cluster tag (IMDS tags, else one DescribeTags).
    let id = node::identity(cfg).await?;
    let md = SdkImds::new();
    let imds_deadline = Duration::from_secs(cfg.agent.imds_timeout_secs);
    let interval = Duration::from_secs(cfg.lifecycle.watch_interval_secs);
    tracing::info!(
        instance_id = %id.facts.instance_id,
        terminate_hook = cfg.lifecycle.terminate_hook.as_deref().unwrap_or("-"),
        reap = cfg.lifecycle.reap,
        interval_secs = interval.as_secs(),
        "watching the lifecycle state and the raft peers"
    );
    let mut reaper = super::reap::Reaper::default();
    // The first reaping pass waits one interval: boot reaps on its own when it settles.
    let mut last_reap = Instant::now();
    let mut last_state = None;
    loop {
        match imds::lifecycle_state(&md, imds_deadline).await {
            Ok(state) => {
                if state != last_state {
                    tracing::info!(lifecycle_state = ?state, "target lifecycle state");
                    last_state = state.clone();
                }
                if state.as_deref() == Some("Terminated") {
                    // The CA is on disk once boot ran; without it there is no server to leave.
                    let ca = api_clients::cluster_ca(cfg).unwrap_or_default();
                    let left = super::leave::run(&ctx_of(cfg, &id, &ca)).await?;
                    tracing::info!(outcome = ?left, "left the cluster: watch ends");
                    return Ok(crate::error::exit::OK);
                }
            }
            Err(e) => tracing::warn!(
                "cannot read the target lifecycle state from IMDS ({e}); trying again in {} s",
                POLL.as_secs()
            ),
        }
        if cfg.lifecycle.reap && last_reap.elapsed() >= interval {
            last_reap = Instant::now();
            match api_clients::cluster_ca(cfg) {
                Ok(ca) => {
                    if let Err(e) = reaper.tick(&ctx_of(cfg, &id, &ca)).await {
                        tracing::warn!(
                            "reaping pass failed ({e}); the next one is in {} s",
                            interval.as_secs()
                        );
                    }
                }
                Err(e) => tracing::info!("not reaping yet: {e}"),
            }
        }
        tokio::time::sleep(POLL).await;
    }
}
