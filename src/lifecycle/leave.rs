//! Graceful leave, when the group is terminating this instance (IMDS target lifecycle state
//! `Terminated`): hand leadership over, leave the raft configuration only while what
//! remains keeps quorum, stop the server, then let termination proceed.
//!
//! A node that leaves this way is never a dead voter: the cluster's voter count drops with
//! it, and quorum with it. One that cannot leave yet (removing it would leave fewer healthy
//! voters than a quorum of the rest, with the cluster's failure tolerance to spare) waits,
//! with heartbeats and the reason in the log, up to `lifecycle.leave_timeout_secs` or the
//! end of its hook. Then the instance goes away whatever the node does, so it takes a last
//! look under a weaker rule: it removes itself if the healthy voters that remain are a
//! quorum of the rest (dying as a voter would leave the same healthy voters and a larger
//! quorum to reach). Only when not even that holds does it stop as a voter, and reaping
//! removes it once EC2 reports the instance terminated. A node whose own server is down or
//! sealed still removes itself, through the leader a peer names.
//!
//! Who votes is read from the raft configuration at the leader just before each removal,
//! and the removal takes the [`super::ticket`] of that configuration first: several old
//! nodes of one refresh may leave at once, and only one removal is decided on each
//! configuration; the others decide again on the configuration after it. (A random pause
//! before the read spreads concurrent leavers apart; the ticket is what makes it safe.)

use super::autopilot::{target_tolerance, Removal};
use super::session::{Ctx, Logins};
use super::ticket::Ticket;
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
    /// Neither this node's server nor any peer named a leader: nothing to hand over to.
    NoCluster,
    /// The terminate hook ended meanwhile (timed out to its default result): the instance
    /// is going away whatever this node does, so it stops waiting.
    HookEnded,
    /// The bound passed with the removal still unsafe.
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
    let bound = Duration::from_secs(cfg.lifecycle.leave_timeout_secs);
    let left = hand_over(ctx, &lc, action, bound).await;
    tracing::info!(outcome = ?left, "stopping the server");
    launcher::stop_server(&cfg.vault, &cfg.agent.state_dir).await?;
    if let Some(a) = action {
        let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
        match super::launch::complete(&lc, a, Outcome::Continue, aws).await? {
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

/// Steps down when active and removes this node from raft once that keeps quorum, within
/// `bound`, without any hook: what a node that must abandon its launch does first.
pub async fn remove_self(ctx: &Ctx<'_>, bound: Duration) -> Left {
    hand_over(ctx, &SdkAutoscaling::new(ctx.sdk), None, bound).await
}

/// Steps down when active, then removes this node once that keeps quorum; heartbeats the
/// hook meanwhile.
async fn hand_over<L: Lifecycle>(
    ctx: &Ctx<'_>,
    lc: &L,
    action: Option<Action<'_>>,
    bound: Duration,
) -> Left {
    let logins = Logins::default();
    let left = wait_to_leave(ctx, lc, action, bound, &logins).await;
    logins.end().await;
    left
}

async fn wait_to_leave<L: Lifecycle>(
    ctx: &Ctx<'_>,
    lc: &L,
    action: Option<Action<'_>>,
    bound: Duration,
    logins: &Logins,
) -> Left {
    let me = ctx.me();
    let start = Instant::now();
    let heartbeat = Duration::from_secs(ctx.cfg.lifecycle.heartbeat_secs);
    let mut last_beat = Instant::now();
    let mut stepped_down = false;
    let mut last_why = String::new();
    loop {
        let settling = start.elapsed() < ALL_HEALTHY_FIRST;
        let rule = Rule::Tolerance {
            target: target_tolerance(ctx.cfg.init.expected_size),
            settling,
        };
        let why = match step(ctx, logins, &mut stepped_down, rule).await {
            Ok(Some(left)) => return left,
            Ok(None) => String::new(),
            Err(why) => why,
        };
        if !why.is_empty() && why != last_why {
            tracing::warn!(instance_id = %me, waited_secs = start.elapsed().as_secs(), "not leaving the raft configuration yet: {why}");
            last_why = why;
        }
        if start.elapsed() >= bound {
            tracing::warn!(instance_id = %me, "waited {} s for a removal that keeps the failure tolerance: {last_why}. The instance goes away now whatever this node does", bound.as_secs());
            if let Some(left) = last_look(ctx, logins, &mut stepped_down).await {
                return left;
            }
            tracing::error!(instance_id = %me, "leaving without removing this node from raft: {last_why}. It stays a voter until reaping sees its instance terminated (or autopilot's dead-server cleanup, when init.cleanup_dead_servers is on)");
            return Left::TimedOut;
        }
        if let Some(a) = action {
            if last_beat.elapsed() >= heartbeat {
                match lc.heartbeat(a).await {
                    Ok(Completed::Done) => last_beat = Instant::now(),
                    Ok(Completed::NoAction) => {
                        tracing::error!(action = %a, "the terminate hook ended while this node waited (its heartbeat timeout passed): the instance is going away now. {last_why}");
                        return match last_look(ctx, logins, &mut stepped_down).await {
                            Some(left) => left,
                            None => Left::HookEnded,
                        };
                    }
                    Err(e) => tracing::warn!(action = %a, "heartbeat failed ({e}); retrying"),
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// How long the last look may take: a removal decided by another leaver on the same
/// configuration lands in seconds, and the instance may be gone any moment.
const LAST_LOOK: Duration = Duration::from_secs(60);

/// Which removals a look allows.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// While the leave may still wait: the removal keeps the failure tolerance
    /// ([`super::autopilot::State::removal_keeps_quorum`] with this target); while
    /// `settling`, every other voter must also be healthy.
    Tolerance { target: usize, settling: bool },
    /// Once the instance goes away whatever this node does: the healthy voters that remain
    /// are a quorum of the configuration without it. Dying as a voter never leaves a better
    /// cluster than that (the same healthy voters, a quorum at least as large), and several
    /// nodes terminated together that all die as voters can take the quorum with them.
    QuorumOnly,
}

/// The leave's wait is over and the instance goes away: one last series of looks, under the
/// [`Rule::QuorumOnly`] rule and the removal ticket (so leavers at their deadlines together
/// still remove one at a time, each deciding on the configuration after the previous).
async fn last_look(ctx: &Ctx<'_>, logins: &Logins, stepped_down: &mut bool) -> Option<Left> {
    let me = ctx.me();
    let start = Instant::now();
    let mut last_why = String::new();
    while start.elapsed() < LAST_LOOK {
        match step(ctx, logins, stepped_down, Rule::QuorumOnly).await {
            Ok(Some(left)) => return Some(left),
            Ok(None) => continue,
            Err(why) if why != last_why => {
                tracing::warn!(instance_id = %me, "last look, removal under the quorum rule not possible yet: {why}");
                last_why = why;
            }
            Err(_) => {}
        }
        tokio::time::sleep(POLL).await;
    }
    None
}

/// How long a leave first waits for every other voter to be healthy before the removal
/// rule alone decides. After an election the new leader's autopilot calls the voters it
/// has not heard from yet unhealthy (2.5-5 s measured on OpenBao 2.6): read then, the rule
/// would let a leave lower the failure tolerance that is only unknown. A voter unhealthy
/// for longer is really down, and the rule (which still keeps quorum) decides.
const ALL_HEALTHY_FIRST: Duration = Duration::from_secs(30);

/// Spreads the last check of concurrent leaves apart (several old nodes of one refresh):
/// each then reads a raft configuration that already holds the others' removals.
const JITTER_MS: u64 = 2_000;

/// One attempt: `Ok(Some)` when done, `Ok(None)` to look again at once (after a
/// step-down), `Err(why)` to wait.
async fn step(
    ctx: &Ctx<'_>,
    logins: &Logins,
    stepped_down: &mut bool,
    rule: Rule,
) -> std::result::Result<Option<Left>, String> {
    let me = ctx.me();
    let s = match logins.session(ctx).await {
        Ok(s) => s,
        // Nobody, this node included, names a leader: no cluster to hand over to (this
        // node's server is down too, or it stands alone).
        // (This node's own health first: one call, where the leader search asks every
        // peer again after the login's own search.)
        Err(_) if !ctx.answers().await && matches!(ctx.leader().await, Ok(None)) => {
            return Ok(Some(Left::NoCluster))
        }
        Err(e) => return Err(e.to_string()),
    };
    // Decide on a fresh view: the raft configuration for who votes, autopilot for who is
    // healthy, both read after a random pause.
    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..JITTER_MS))).await;
    let (members, state) = match s.view().await {
        Ok(v) => v,
        Err(e) => {
            drop(s);
            // Maybe another node leads now: log in afresh at the next look.
            logins.end().await;
            return Err(e.to_string());
        }
    };
    let (target, settling) = match rule {
        Rule::Tolerance { target, settling } => (target, settling),
        Rule::QuorumOnly => (0, false),
    };
    match state.removal_keeps_quorum(me, &members, target)? {
        Removal::NotAMember => Ok(Some(Left::NotAMember)),
        Removal::Safe { remaining, .. }
            if settling && !state.unhealthy_others(me, &members).is_empty() =>
        {
            Err(format!(
                "autopilot does not call every other voter healthy yet ({remaining} remain): waiting up to {} s for that (a leader elected moments ago has not heard from its followers yet)",
                ALL_HEALTHY_FIRST.as_secs()
            ))
        }
        Removal::Safe { remaining, healthy } => {
            match super::ticket::take_here(ctx, &members, me).await {
                Ok(Ticket::Mine) => {}
                Ok(Ticket::Held(t)) => {
                    return Err(format!(
                        "another removal (of {} by {}) was decided on this raft configuration ({}): waiting for it to land, then deciding again on the configuration after it",
                        t.server_id, t.decided_by, t.configuration
                    ))
                }
                Err(e) => return Err(format!("cannot take the removal ticket: {e}")),
            }
            // Leadership is handed over only now, by the one leaver whose removal is
            // decided: a leader that stepped down while it still had to wait would do so
            // again each time it was elected, and several leavers electing each other in
            // turn left the cluster without an active node for a minute. Its ticket is
            // still its own at the next look, at the new leader.
            if s.leader_is_me {
                return step_down(ctx, s, logins, stepped_down).await;
            }
            crate::escrow::pause_point("remove-peer").await;
            s.remove_peer(me).await.map_err(|e| e.to_string())?;
            tracing::info!(instance_id = %me, remaining_voters = remaining, healthy_voters = healthy, leader = %state.leader, rule = ?rule, "removed this node from the raft configuration");
            Ok(Some(Left::Removed {
                stepped_down: *stepped_down,
            }))
        }
    }
}

/// Steps this node down (it leads), then waits up to [`NEW_LEADER`] for another voter to
/// take over: `Ok(None)` to look again at once, at the new leader.
async fn step_down(
    ctx: &Ctx<'_>,
    s: tokio::sync::MappedMutexGuard<'_, super::session::Session>,
    logins: &Logins,
    stepped_down: &mut bool,
) -> std::result::Result<Option<Left>, String> {
    let me = ctx.me();
    let r = s.step_down().await;
    drop(s);
    // The next look logs in at the new leader.
    logins.end().await;
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
    Err(format!(
        "no other leader within {} s of stepping down",
        NEW_LEADER.as_secs()
    ))
}
