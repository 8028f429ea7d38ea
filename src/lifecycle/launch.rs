//! The launch hook: `boot` lets the group put this instance InService only once it is a
//! voter autopilot calls healthy (caught up with the leader, stable), not merely answering.
//! An instance refresh with `MaxHealthyPercentage` above 100 then terminates an old node
//! only after its replacement counts towards quorum, so failure tolerance never dips.
//!
//! While it waits it records heartbeats (`lifecycle.heartbeat_secs`), so the hook's own
//! timeout never decides; past `lifecycle.launch_timeout_secs` it completes with ABANDON:
//! the group terminates the instance and launches another, and an instance refresh stops.
//!
//! A node that cannot become ready (the bound passed, or its lifecycle credential is refused
//! for good) is already in the raft configuration: before it abandons it removes itself, as
//! a graceful leave would, so the group's replacement of it never leaves a dead voter.
//!
//! Completion is recorded in `agent.state_dir` ([`DONE_FILE`], with the instance id: a file
//! baked into an image from a running node never counts for another instance) so that later
//! boots of the member (from its disk) make no call for a hook that ended long ago.

use super::session::{Ctx, Logins};
use crate::aws::autoscaling::{Action, Completed, Lifecycle, Outcome, SdkAutoscaling};
use crate::error::{exit, Error, Result};
use crate::{fsutil, retry};
use std::future::Future;
use std::time::{Duration, Instant};

/// Written once the launch hook has ended for this instance (no secret).
pub const DONE_FILE: &str = "launch-hook.json";
/// How often readiness is checked: autopilot's own view changes every few seconds.
const POLL: Duration = Duration::from_secs(2);

/// How a wait for a lifecycle action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Ready: completed with CONTINUE.
    Continued,
    /// Not ready within the bound, or never can be (`why`): nothing completed yet.
    Unready { why: String },
    /// The group holds no action for this instance (completed before a restart, timed out
    /// to its default result, or never was one).
    NotWaiting,
}

/// Why a node is not ready yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    pub why: String,
    /// Waiting cannot change it (the credential is refused or unreadable): stop now.
    pub fatal: bool,
}

impl Wait {
    fn of(e: &Error) -> Wait {
        Wait {
            why: e.to_string(),
            // Not NOINPUT: a missing credential item is what a node that joins a new
            // cluster finds until the initialiser's post-init escrows it, seconds later.
            // (A cluster from before the lifecycle credential never gets one: that wait
            // ends at its bound.)
            fatal: matches!(e.exit_code(), exit::NOPERM | exit::DATAERR | exit::CONFIG),
        }
    }
}

/// Timing of a wait.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub heartbeat: Duration,
    pub bound: Duration,
    pub poll: Duration,
}

/// Waits until `ready` says yes, heartbeating every `heartbeat`, and completes CONTINUE
/// then. Returns [`Ended::Unready`] (nothing completed) once `bound` has passed or `ready`
/// says waiting cannot help. `ready` answers `Err(why)` while it cannot tell (the reason is
/// logged when it changes).
pub async fn wait_then_complete<L, F, Fut>(
    lc: &L,
    action: Action<'_>,
    t: Timing,
    mut ready: F,
) -> Result<Ended>
where
    L: Lifecycle,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<bool, Wait>>,
{
    let start = Instant::now();
    let mut last_beat = Instant::now();
    let mut last_why = String::new();
    loop {
        let why = match ready().await {
            Ok(true) => {
                return Ok(
                    match complete(lc, action, Outcome::Continue, t.bound).await? {
                        Completed::Done => Ended::Continued,
                        Completed::NoAction => Ended::NotWaiting,
                    },
                )
            }
            Ok(false) => "not yet a healthy voter".to_string(),
            Err(w) if w.fatal => return Ok(Ended::Unready { why: w.why }),
            Err(w) => w.why,
        };
        if why != last_why {
            tracing::info!(%action, waited_secs = start.elapsed().as_secs(), "launch hook waits: {why}");
            last_why = why;
        }
        if start.elapsed() >= t.bound {
            return Ok(Ended::Unready {
                why: format!(
                    "not a healthy voter within {} s (lifecycle.launch_timeout_secs); last: {last_why}",
                    t.bound.as_secs()
                ),
            });
        }
        if last_beat.elapsed() >= t.heartbeat {
            match lc.heartbeat(action).await {
                Ok(Completed::Done) => last_beat = Instant::now(),
                Ok(Completed::NoAction) => return Ok(Ended::NotWaiting),
                // A missed heartbeat costs nothing until the hook's own timeout: try again.
                Err(e) => tracing::warn!(%action, "heartbeat failed ({e}); retrying"),
            }
        }
        tokio::time::sleep(t.poll).await;
    }
}

/// `CompleteLifecycleAction`, retried while AWS answers transiently (within `bound`): a
/// lost completion would leave the decision to the hook's default result.
pub async fn complete<L: Lifecycle>(
    lc: &L,
    action: Action<'_>,
    outcome: Outcome,
    bound: Duration,
) -> Result<Completed> {
    retry::retry("complete the lifecycle action", bound, || {
        lc.complete(action, outcome)
    })
    .await
}

/// Completes this instance's launch hook once it is a healthy voter (see the module docs).
/// Nothing to do without `lifecycle.launch_hook`, or when an earlier boot completed it.
pub async fn run(ctx: &Ctx<'_>) -> Result<()> {
    let cfg = ctx.cfg;
    let Some(hook) = cfg.lifecycle.launch_hook.as_deref() else {
        return Ok(());
    };
    if completed_earlier(ctx) {
        return Ok(());
    }
    let Some(group) = super::group(cfg, ctx.tag_value) else {
        // Config validation refuses hooks without a group; keep the boot honest anyway.
        return Err(Error::Internal("lifecycle hook without a group".into()));
    };
    let action = Action {
        group,
        hook,
        instance_id: ctx.me(),
    };
    let timing = Timing {
        heartbeat: Duration::from_secs(cfg.lifecycle.heartbeat_secs),
        bound: Duration::from_secs(cfg.lifecycle.launch_timeout_secs),
        poll: POLL,
    };
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let lc = SdkAutoscaling::new(ctx.sdk);
    let started = Instant::now();
    let logins = Logins::default();
    let ended = wait_then_complete(&lc, action, timing, || healthy_voter(ctx, &logins)).await;
    logins.end().await;
    let ended = ended?;
    let waited_ms = started.elapsed().as_millis() as u64;
    match &ended {
        Ended::Continued => {
            tracing::info!(%action, result = "CONTINUE", waited_ms, "launch hook completed: this node is a healthy voter");
        }
        Ended::NotWaiting => {
            tracing::warn!(%action, waited_ms, "launch hook: the group holds no action for this instance any more (completed elsewhere, or timed out to its default result); if the group is terminating it, the watch unit leaves the cluster");
        }
        Ended::Unready { why } => {
            // Already in the raft configuration: leave it before the group replaces us, so
            // the replacement never finds a dead voter (best effort, bounded).
            let left = super::leave::remove_self(ctx, LEAVE_ON_ABANDON).await;
            tracing::warn!(outcome = ?left, "left the raft configuration before abandoning");
            complete(&lc, action, Outcome::Abandon, aws).await?;
            return Err(Error::Lifecycle {
                message: format!(
                    "this node cannot become a healthy raft voter: {why}. {action} completed with ABANDON: the group replaces the instance and an instance refresh stops"
                ),
                exit: exit::ABANDONED,
            });
        }
    }
    let record = serde_json::json!({
        "instance_id": ctx.me(),
        "hook": hook,
        "group": group,
        "ended": format!("{ended:?}"),
    });
    fsutil::write_record(&cfg.agent.state_dir, DONE_FILE, &record).map(|_| ())
}

/// Bound on leaving the raft configuration before an ABANDON: a step-down and one removal
/// take seconds; the group's replacement must not wait long for it.
const LEAVE_ON_ABANDON: Duration = Duration::from_secs(60);

/// Whether this instance's launch hook ended in an earlier boot ([`DONE_FILE`] naming it).
/// Whether this node's init keys are on its disk alone: a `sys/init` call in flight (its
/// attempt record) or its sealed response (the pending file).
fn keys_pending(state_dir: &std::path::Path) -> bool {
    crate::init::attempt::path(state_dir).exists()
        || crate::escrow::pending::path(state_dir).exists()
}

/// Heartbeats the launch hook every `every` for as long as [`keys_pending`], from the start
/// of the boot: the hook's timeout would otherwise end it while an escrow keeps failing (an
/// S3 or KMS outage, `kms:Encrypt` denied), and a default result of ABANDON terminates the
/// instance, and its volume with the pending file. Returns once the group holds no action
/// for this instance (completed, or over).
pub async fn beat_while_keys_pending<L: Lifecycle>(
    lc: &L,
    action: Action<'_>,
    state_dir: &std::path::Path,
    every: Duration,
) {
    let mut said = false;
    loop {
        if keys_pending(state_dir) {
            match lc.heartbeat(action).await {
                Ok(Completed::Done) if !said => {
                    tracing::info!(%action, "launch hook heartbeated while this node's init keys are not escrowed yet");
                    said = true;
                }
                Ok(Completed::Done) => {}
                Ok(Completed::NoAction) => return,
                Err(e) => {
                    tracing::warn!(%action, "heartbeat while the init keys are pending failed ({e}); retrying")
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Starts [`beat_while_keys_pending`] in the background for this boot, when a launch hook
/// is configured and not completed earlier.
pub fn keep_alive_while_keys_pending(
    cfg: &crate::config::Config,
    tag_value: &str,
    instance_id: &str,
    sdk: &aws_config::SdkConfig,
) {
    let state_dir = cfg.agent.state_dir.clone();
    let (Some(hook), Some(group)) = (
        cfg.lifecycle.launch_hook.clone(),
        super::group(cfg, tag_value).map(str::to_owned),
    ) else {
        return;
    };
    if completed_for(&state_dir, instance_id) {
        return;
    }
    let every = Duration::from_secs(cfg.lifecycle.heartbeat_secs);
    let instance_id = instance_id.to_owned();
    let lc = SdkAutoscaling::new(sdk);
    tokio::spawn(async move {
        let action = Action {
            group: &group,
            hook: &hook,
            instance_id: &instance_id,
        };
        beat_while_keys_pending(&lc, action, &state_dir, every).await;
    });
}

fn completed_earlier(ctx: &Ctx<'_>) -> bool {
    completed_for(&ctx.cfg.agent.state_dir, ctx.me())
}

/// Whether `state_dir`'s [`DONE_FILE`] names instance `me` (a file baked into an image, or
/// copied from another instance, names another one).
fn completed_for(state_dir: &std::path::Path, me: &str) -> bool {
    std::fs::read(state_dir.join(DONE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["instance_id"] == me)
}

/// Whether autopilot, asked at the active node, calls this node a healthy voter.
async fn healthy_voter(ctx: &Ctx<'_>, logins: &Logins) -> std::result::Result<bool, Wait> {
    let state = {
        let s = logins.session(ctx).await.map_err(|e| Wait::of(&e))?;
        s.autopilot().await
    };
    let state = match state {
        Ok(state) => state,
        Err(e) => {
            // Maybe another node leads now: log in afresh at the next poll.
            logins.end().await;
            return Err(Wait::of(&e));
        }
    };
    if state.healthy_voter(ctx.me()) {
        return Ok(true);
    }
    Err(Wait {
        why: match state.servers.get(ctx.me()) {
            None => "autopilot does not list this node yet".into(),
            Some(me) => format!(
                "autopilot lists this node as {} ({})",
                me.status,
                if me.healthy {
                    "healthy"
                } else {
                    "not healthy yet"
                }
            ),
        },
        fatal: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct FakeLc {
        completed: Mutex<Vec<Outcome>>,
        beats: AtomicUsize,
        gone: bool,
    }

    impl Lifecycle for FakeLc {
        async fn complete(&self, _: Action<'_>, o: Outcome) -> Result<Completed> {
            self.completed.lock().unwrap().push(o);
            Ok(if self.gone {
                Completed::NoAction
            } else {
                Completed::Done
            })
        }
        async fn heartbeat(&self, _: Action<'_>) -> Result<Completed> {
            self.beats.fetch_add(1, Ordering::SeqCst);
            Ok(if self.gone {
                Completed::NoAction
            } else {
                Completed::Done
            })
        }
    }

    const A: Action<'static> = Action {
        group: "g",
        hook: "h",
        instance_id: "i-1",
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn the_hook_is_heartbeated_while_init_keys_are_pending_and_only_then() {
        let d = tempfile::tempdir().unwrap();
        let lc = FakeLc::default();
        async fn beat(lc: &FakeLc, dir: &std::path::Path) {
            let _ = tokio::time::timeout(ms(60), beat_while_keys_pending(lc, A, dir, ms(10))).await;
        }
        beat(&lc, d.path()).await;
        assert_eq!(
            lc.beats.load(Ordering::SeqCst),
            0,
            "no keys on disk: no beat"
        );
        std::fs::write(crate::init::attempt::path(d.path()), "{}").unwrap();
        beat(&lc, d.path()).await;
        assert!(lc.beats.load(Ordering::SeqCst) >= 3, "an init in flight");
        std::fs::remove_file(crate::init::attempt::path(d.path())).unwrap();
        std::fs::write(crate::escrow::pending::path(d.path()), "{}").unwrap();
        let before = lc.beats.load(Ordering::SeqCst);
        beat(&lc, d.path()).await;
        assert!(
            lc.beats.load(Ordering::SeqCst) >= before + 3,
            "a pending file"
        );
        // The hook is over: the beating ends by itself.
        let over = FakeLc {
            gone: true,
            ..Default::default()
        };
        tokio::time::timeout(ms(500), beat_while_keys_pending(&over, A, d.path(), ms(10)))
            .await
            .expect("returns once the group holds no action");
        assert_eq!(over.beats.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn continues_once_ready_with_heartbeats_meanwhile() {
        let lc = FakeLc::default();
        let calls = AtomicUsize::new(0);
        let t = Timing {
            heartbeat: ms(20),
            bound: Duration::from_secs(10),
            poll: ms(10),
        };
        let ended = wait_then_complete(&lc, A, t, || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            if n < 8 {
                Err(Wait {
                    why: "not listed".into(),
                    fatal: false,
                })
            } else {
                Ok(true)
            }
        })
        .await
        .unwrap();
        assert_eq!(ended, Ended::Continued);
        assert_eq!(*lc.completed.lock().unwrap(), [Outcome::Continue]);
        assert!(
            lc.beats.load(Ordering::SeqCst) >= 2,
            "heartbeats while waiting"
        );
    }

    #[tokio::test]
    async fn past_the_bound_it_is_unready_and_never_continues() {
        let lc = FakeLc::default();
        let t = Timing {
            heartbeat: ms(10),
            bound: ms(60),
            poll: ms(10),
        };
        let ended = wait_then_complete(&lc, A, t, || async { Ok(false) })
            .await
            .unwrap();
        assert!(matches!(ended, Ended::Unready { .. }), "{ended:?}");
        // The caller leaves raft first, then abandons: nothing completed here.
        assert!(lc.completed.lock().unwrap().is_empty());
        assert!(lc.beats.load(Ordering::SeqCst) >= 2);
    }

    #[tokio::test]
    async fn a_refused_credential_ends_the_wait_at_once() {
        let lc = FakeLc::default();
        let t = Timing {
            heartbeat: ms(10),
            bound: Duration::from_secs(60),
            poll: ms(10),
        };
        let started = Instant::now();
        let ended = wait_then_complete(&lc, A, t, || async {
            Err(Wait {
                why: "login refused".into(),
                fatal: true,
            })
        })
        .await
        .unwrap();
        assert_eq!(
            ended,
            Ended::Unready {
                why: "login refused".into()
            }
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            Wait::of(&Error::Lifecycle {
                message: String::new(),
                exit: exit::NOPERM
            })
            .fatal
        );
        assert!(
            !Wait::of(&Error::Lifecycle {
                message: String::new(),
                exit: exit::TEMPFAIL
            })
            .fatal
        );
        // The credential item not escrowed yet (a new cluster's post-init runs late).
        assert!(
            !Wait::of(&Error::Lifecycle {
                message: String::new(),
                exit: exit::NOINPUT
            })
            .fatal
        );
    }

    #[test]
    fn only_this_instances_record_skips_the_hook() {
        let d = tempfile::tempdir().unwrap();
        assert!(!completed_for(d.path(), "i-me"), "no record");
        let record = |id: &str| {
            std::fs::write(
                d.path().join(DONE_FILE),
                serde_json::json!({ "instance_id": id, "hook": "h" }).to_string(),
            )
            .unwrap()
        };
        record("i-me");
        assert!(completed_for(d.path(), "i-me"));
        record("i-other");
        assert!(
            !completed_for(d.path(), "i-me"),
            "another instance's record"
        );
        std::fs::write(d.path().join(DONE_FILE), "not json").unwrap();
        assert!(!completed_for(d.path(), "i-me"), "a damaged record");
    }

    #[tokio::test]
    async fn a_hook_that_ended_elsewhere_stops_the_wait() {
        let lc = FakeLc {
            gone: true,
            ..FakeLc::default()
        };
        let t = Timing {
            heartbeat: ms(10),
            bound: Duration::from_secs(10),
            poll: ms(10),
        };
        let ended = wait_then_complete(&lc, A, t, || async { Ok(false) })
            .await
            .unwrap();
        assert_eq!(ended, Ended::NotWaiting);
        assert!(lc.completed.lock().unwrap().is_empty());
    }
}
