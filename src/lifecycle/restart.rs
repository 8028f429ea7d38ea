//! A restart of this node's server that the cluster must survive: `refresh-tls` installing a
//! new CA (peers verify each other with it, so a reload is not enough).
//!
//! While it restarts the node is out of the quorum, though still in the configuration: the
//! rule is [`super::autopilot::State::restart_keeps_quorum`] (who votes read from the raft
//! configuration at the leader, who is healthy from autopilot), and the restart first takes
//! the [`super::ticket`] of that configuration, like a removal. After a fleet reboot every
//! node's daily timer fires at once (`Persistent=true`); with the ticket one of them
//! restarts, and the others wait until that ticket no longer holds
//! ([`super::ticket::RESTART_HOLD`]) and the restarted node is healthy again, then decide
//! again, one at a time. A removal decided on the same
//! configuration waits the same way.

use super::autopilot::target_tolerance;
use super::session::{Ctx, Logins};
use super::ticket::Ticket;
use crate::error::{Error, Result};
use std::future::Future;
use std::time::{Duration, Instant};

/// Between looks while waiting: a restarted peer is healthy again within seconds.
const POLL: Duration = Duration::from_secs(5);

/// Runs `restart` once restarting this node keeps the failure tolerance and no other
/// removal or restart was decided on the current raft configuration; waits (logging why)
/// up to `bound`, then fails with a retriable error and nothing restarted.
pub async fn when_it_keeps_quorum<F, Fut>(ctx: &Ctx<'_>, bound: Duration, restart: F) -> Result<()>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let start = Instant::now();
    let logins = Logins::default();
    let mut last_why = String::new();
    let decided = loop {
        match decide(ctx, &logins).await {
            Ok(()) => break Ok(()),
            Err(why) => {
                if why != last_why {
                    tracing::warn!(
                        waited_secs = start.elapsed().as_secs(),
                        "not restarting the server yet: {why}"
                    );
                    last_why = why;
                }
            }
        }
        if start.elapsed() >= bound {
            break Err(Error::Refused {
                message: format!(
                    "the server needs a restart (a new CA), but for {} s it could not be done without lowering the cluster's failure tolerance: {last_why}. Nothing was restarted; the next run tries again",
                    bound.as_secs()
                ),
            });
        }
        tokio::time::sleep(POLL).await;
    };
    logins.end().await;
    decided?;
    restart().await
}

/// `Ok` when this node may restart now (its ticket taken), `Err(why)` to wait.
async fn decide(ctx: &Ctx<'_>, logins: &Logins) -> std::result::Result<(), String> {
    let me = ctx.me();
    let s = logins.session(ctx).await.map_err(|e| e.to_string())?;
    let (members, state) = match s.view().await {
        Ok(v) => v,
        Err(e) => {
            drop(s);
            logins.end().await;
            return Err(e.to_string());
        }
    };
    state.restart_keeps_quorum(me, &members, target_tolerance(ctx.cfg.init.expected_size))?;
    match super::ticket::take_restart_here(ctx, &members).await {
        Ok(Ticket::Mine) => {}
        Ok(Ticket::Held(t)) => {
            return Err(format!(
                "a removal or restart (of {} by {}) was decided on this raft configuration ({}): waiting for it",
                t.server_id, t.decided_by, t.configuration
            ))
        }
        Err(e) => return Err(format!("cannot take the ticket: {e}")),
    }
    if s.leader_is_me {
        // An election costs the writers less when it is asked for.
        if let Err(e) = s.step_down().await {
            tracing::warn!("step-down before the restart refused ({e}); restarting anyway");
        }
    }
    Ok(())
}
