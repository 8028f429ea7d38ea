//! Graceful leave, when the group is terminating this instance (IMDS target lifecycle state
//! `Terminated`): hand leadership over, leave the raft configuration only while what
//! remains keeps quorum, stop the server, then let termination proceed.
//!
//! A node that leaves this way is never a dead voter: the cluster's voter count drops with
//! it, and quorum with it. One that cannot leave yet (removing it would leave fewer healthy
//! voters than a quorum of the rest) waits, with heartbeats and the reason in the log, up to
//! `lifecycle.leave_timeout_secs`; past that it stops without removing itself, and reaping
//! removes it once EC2 reports the instance terminated.

use super::autopilot::Removal;
use super::session::{Ctx, Session};
use crate::aws::autoscaling::{Action, Completed, Lifecycle, Outcome, SdkAutoscaling};
use crate::error::Result;
use crate::launcher;
use std::time::{Duration, Instant};

/// Between looks at the cluster while waiting: elections and promotions take seconds.
const POLL: Duration = Duration::from_secs(2);
/// Bound on a new leader being elected after this node stepped down; raft elects one in a
/// few election timeouts (seconds), and a longer wait only repeats the step-down.
const NEW_LEADER: Duration = Duration::from_secs(30);

/// What a leave did, for the log and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// Removed from the raft configuration (after stepping down when it was active).
    Removed { stepped_down: bool },
    /// Not a member any more (removed earlier, or by a reaper).
    NotAMember,
    /// This node's server did not answer: nothing to hand over.
    ServerDown,
    /// `lifecycle.leave_timeout_secs` passed with the removal still unsafe.
    TimedOut,
}

/// Leaves the cluster gracefully and completes the terminate hook (see the module docs).
pub async fn run(ctx: &Ctx<'_>) -> Result<Left> {
    let cfg = ctx.cfg;
    let lc = SdkAutoscaling::new(ctx.sdk);
    let group = super::group(cfg, ctx.tag_value);
    let action = match (cfg.lifecycle.terminate_hook.as_deref(), group) {
        (Some(hook), Some(group)) => Some(Action {
            group,
            hook,
            instance_id: ctx.me(),
        }),
        _ => None,
    };
    tracing::warn!(instance_id = %ctx.me(), "the group is terminating this instance: leaving the cluster gracefully");
    let left = hand_over(ctx, &lc, action).await?;
    tracing::info!(outcome = ?left, "stopping the server");
    launcher::stop_server(&cfg.vault, &cfg.agent.state_dir).await?;
    if let Some(a) = action {
        match lc.complete(a, Outcome::Continue).await? {
            Completed::Done => {
                tracing::info!(action = %a, result = "CONTINUE", "terminate hook completed: termination proceeds")
            }
            Completed::NoAction => {
                tracing::info!(action = %a, "terminate hook: the group holds no action for this instance (already ended)")
            }
        }
    }
    Ok(left)
}

/// Steps down when active, then removes this node once that keeps quorum.
async fn hand_over<L: Lifecycle>(
    ctx: &Ctx<'_>,
    lc: &L,
    action: Option<Action<'_>>,
) -> Result<Left> {
    let cfg = ctx.cfg;
    let me = ctx.me();
    let start = Instant::now();
    let bound = Duration::from_secs(cfg.lifecycle.leave_timeout_secs);
    let heartbeat = Duration::from_secs(cfg.lifecycle.heartbeat_secs);
    let mut last_beat = Instant::now();
    let mut stepped_down = false;
    let mut last_why = String::new();
    loop {
        let why = match step(ctx, &mut stepped_down).await {
            Ok(Some(left)) => return Ok(left),
            Ok(None) => String::new(),
            Err(why) => why,
        };
        if !why.is_empty() && why != last_why {
            tracing::warn!(instance_id = %me, waited_secs = start.elapsed().as_secs(), "not leaving the raft configuration yet: {why}");
            last_why = why;
        }
        if start.elapsed() >= bound {
            tracing::error!(instance_id = %me, "leaving without removing this node from raft after {} s (lifecycle.leave_timeout_secs): {last_why}. It stays a voter until reaping sees its instance terminated, or autopilot's dead-server cleanup", bound.as_secs());
            return Ok(Left::TimedOut);
        }
        if let Some(a) = action {
            if last_beat.elapsed() >= heartbeat {
                match lc.heartbeat(a).await {
                    Ok(_) => last_beat = Instant::now(),
                    Err(e) => tracing::warn!(action = %a, "heartbeat failed ({e}); retrying"),
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One attempt: `Ok(Some)` when done, `Ok(None)` to look again at once (after a
/// step-down), `Err(why)` to wait.
async fn step(ctx: &Ctx<'_>, stepped_down: &mut bool) -> std::result::Result<Option<Left>, String> {
    let me = ctx.me();
    let local = ctx.local().map_err(|e| e.to_string())?;
    if local.health().await.is_err() {
        return Ok(Some(Left::ServerDown));
    }
    let s = Session::open(ctx).await.map_err(|e| e.to_string())?;
    if s.leader_is_me {
        let r = s.step_down().await;
        s.close().await;
        r.map_err(|e| format!("step-down refused: {e}"))?;
        *stepped_down = true;
        tracing::info!(instance_id = %me, "stepped down: waiting for another voter to take over");
        let t = Instant::now();
        while t.elapsed() < NEW_LEADER {
            if let Ok(Some((_, false))) = ctx.leader().await {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        return Err(format!(
            "no other leader within {} s of stepping down",
            NEW_LEADER.as_secs()
        ));
    }
    let result = async {
        let state = s.autopilot().await.map_err(|e| e.to_string())?;
        match state.removal_keeps_quorum(me)? {
            Removal::NotAMember => Ok(Some(Left::NotAMember)),
            Removal::Safe { remaining, healthy } => {
                s.remove_peer(me).await.map_err(|e| e.to_string())?;
                tracing::info!(instance_id = %me, remaining_voters = remaining, healthy_voters = healthy, leader = %state.leader, "removed this node from the raft configuration");
                Ok(Some(Left::Removed {
                    stepped_down: *stepped_down,
                }))
            }
        }
    }
    .await;
    s.close().await;
    result
}
