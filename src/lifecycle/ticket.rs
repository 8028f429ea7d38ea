//! One removal per raft configuration, cluster-wide.
//!
//! Two nodes that leave at the same moment (a scale-in by two, an instance refresh that
//! terminates several at once, a manual termination) would each read the same raft
//! configuration, each find that removing itself keeps the removal rule, and both be
//! removed: the failure tolerance drops by two, and with one voter down quorum is lost.
//! Spacing the leavers apart in time only makes that rare.
//!
//! So every removal the agent makes (a leave, a reaping) first takes a write-once ticket
//! named by the configuration it was decided on: `removal-tickets/<configuration>-<gen>.json`
//! under the cluster's escrow prefix, created with `If-None-Match: *` and SSE-KMS like every
//! object there. S3 lets exactly one writer create it. Every other decider on that
//! configuration waits and decides again on the configuration after that removal, which
//! has another name ([`Membership::id`]). A ticket whose removal never landed (its writer
//! died between the ticket and `remove-peer`) holds its configuration for [`STALE`]; then
//! the next generation may be taken.
//!
//! What this needs: S3 reachable while a node leaves (a leave is a change, not a recovery;
//! one that cannot take its ticket waits with its hook heartbeated, up to
//! `lifecycle.leave_timeout_secs`, and is reaped later). What it does not cover: autopilot's
//! own dead-server cleanup (off unless `init.cleanup_dead_servers`) and an operator's
//! `remove-peer`, which take no ticket.

use super::session::Ctx;
use crate::aws::kms::SdkKms;
use crate::aws::s3::{ObjectStore, PutOutcome, SdkS3};
use crate::error::{exit, Error, Result};
use crate::escrow::Layout;
use crate::raft_config::Membership;
use crate::retry;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long a ticket holds its configuration while the removal it names has not landed.
/// A removal lands within one `remove-peer` call (a raft commit: milliseconds to seconds)
/// after its ticket; a ticket older than this with the configuration unchanged belongs to
/// a decider that died or gave up, and a live one re-reads and re-decides anyway.
pub const STALE: Duration = Duration::from_secs(120);

/// Generations tried on one configuration before giving up: each stale one took
/// [`STALE`], so this bound is hours, far past any leave's.
const MAX_GENERATIONS: u32 = 64;

/// A ticket's contents (not secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TicketBody {
    /// [`Membership::id`] of the configuration the removal was decided on.
    pub configuration: String,
    pub generation: u32,
    /// The instance whose agent decided the removal.
    pub decided_by: String,
    /// The raft server it removes (or restarts).
    pub server_id: String,
    pub decided_unix: u64,
    /// How long it holds its configuration when not [`STALE`]: a restart's ticket
    /// ([`RESTART_HOLD`]) holds it only while the restart itself runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_secs: Option<u64>,
}

/// How long a restart's ticket holds its configuration. A server restarts in seconds; from
/// then on autopilot calls it unhealthy until it is back, and every other decider waits on
/// that, not on the ticket.
pub const RESTART_HOLD: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ticket {
    /// Go ahead: no other removal was decided on this configuration.
    Mine,
    /// Another removal was decided on this configuration and is not stale: wait for it,
    /// then decide again on the configuration after it.
    Held(TicketBody),
}

/// Where the tickets live.
pub fn dir(layout: &Layout) -> String {
    format!("{}removal-tickets/", layout.prefix)
}

fn key(layout: &Layout, configuration: &str, generation: u32) -> String {
    format!("{}{configuration}-{generation:04}.json", dir(layout))
}

/// [`take`] for a removal this node decided, through this node's credentials. The escrow
/// key's ARN comes from the marker, which recorded it at init: an S3 read, so a leave makes
/// no KMS call (only a marker without an ARN is resolved with `DescribeKey`).
pub async fn take_here(ctx: &Ctx<'_>, members: &Membership, server_id: &str) -> Result<Ticket> {
    take_here_holding(ctx, members, server_id, None).await
}

/// [`take_here`] for a restart of this node ([`RESTART_HOLD`]).
pub async fn take_restart_here(ctx: &Ctx<'_>, members: &Membership) -> Result<Ticket> {
    take_here_holding(ctx, members, ctx.me(), Some(RESTART_HOLD)).await
}

async fn take_here_holding(
    ctx: &Ctx<'_>,
    members: &Membership,
    server_id: &str,
    hold: Option<Duration>,
) -> Result<Ticket> {
    let aws = Duration::from_secs(ctx.cfg.agent.aws_timeout_secs);
    let s3 = SdkS3::new(ctx.sdk);
    let mut layout = Layout::new(ctx.cfg, ctx.tag_value);
    match crate::escrow::read_marker(&s3, &layout, aws).await? {
        Some(m) if m.kms_key_id.starts_with("arn:") => layout.kms_key_id = m.kms_key_id,
        _ => layout.resolve_key_arn(&SdkKms::new(ctx.sdk), aws).await,
    }
    let now = crate::clock::now_unix();
    take_holding(&s3, &layout, members, ctx.me(), server_id, now, aws, hold).await
}

/// Takes the ticket for removing `server_id`, decided by `decided_by` on `members` (see
/// the module docs). `layout.kms_key_id` must be the escrow key's ARN: the shipped bucket
/// policy refuses a put under the escrow prefix that names the key otherwise.
pub async fn take<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    members: &Membership,
    decided_by: &str,
    server_id: &str,
    now_unix: u64,
    aws: Duration,
) -> Result<Ticket> {
    take_holding(
        s3, layout, members, decided_by, server_id, now_unix, aws, None,
    )
    .await
}

/// [`take`], the ticket holding its configuration for `hold` (default [`STALE`]).
#[allow(clippy::too_many_arguments)]
async fn take_holding<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    members: &Membership,
    decided_by: &str,
    server_id: &str,
    now_unix: u64,
    aws: Duration,
    hold: Option<Duration>,
) -> Result<Ticket> {
    let configuration = members.id();
    for generation in 0..MAX_GENERATIONS {
        let body = TicketBody {
            configuration: configuration.clone(),
            generation,
            decided_by: decided_by.to_owned(),
            server_id: server_id.to_owned(),
            decided_unix: now_unix,
            hold_secs: hold.map(|h| h.as_secs()),
        };
        let bytes = serde_json::to_vec_pretty(&body).map_err(|e| Error::Internal(e.to_string()))?;
        let k = key(layout, &configuration, generation);
        let put = retry::retry("write the removal ticket", aws, || {
            s3.put_if_absent(&layout.bucket, &k, bytes.clone(), Some(&layout.kms_key_id))
        })
        .await?;
        if put == PutOutcome::Created {
            return Ok(Ticket::Mine);
        }
        let raw = retry::retry("read the removal ticket", aws, || {
            s3.get(&layout.bucket, &k)
        })
        .await?;
        let held: TicketBody = serde_json::from_slice(&raw).map_err(|e| Error::Lifecycle {
            message: format!(
                "{} is not a removal ticket this agent wrote ({e}); no removal is decided on raft configuration {configuration} until it is moved out of the way",
                layout.url(&k)
            ),
            exit: exit::DATAERR,
        })?;
        let holds = held
            .hold_secs
            .unwrap_or(STALE.as_secs())
            .min(STALE.as_secs());
        if now_unix.saturating_sub(held.decided_unix) < holds {
            // The same decision again (a retry after a failed remove-peer, or a put whose
            // first answer was lost): still this decider's. Only while it holds: a stale
            // one of its own (a restart long ago on a configuration that has not changed
            // since) is passed over like any other, or two nodes that each find their own
            // old ticket would both go ahead.
            if held.decided_by == decided_by && held.server_id == server_id {
                return Ok(Ticket::Mine);
            }
            return Ok(Ticket::Held(held));
        }
        tracing::warn!(
            ticket = %layout.url(&k),
            decided_by = %held.decided_by,
            server_id = %held.server_id,
            "a ticket older than {holds} s on a configuration that has not changed (a restart's, or a removal that never landed): taking the next generation"
        );
    }
    Err(Error::Lifecycle {
        message: format!(
            "{MAX_GENERATIONS} removal tickets were taken on raft configuration {configuration} under {} and none of their removals landed; look at the agents' logs before removing any",
            layout.url(&dir(layout))
        ),
        exit: exit::TEMPFAIL,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::escrow::fake::FakeS3;

    const D: Duration = Duration::from_secs(1);

    fn layout() -> Layout {
        Layout {
            bucket: "esc".into(),
            prefix: "vault-bootstrap/prod/".into(),
            kms_key_id: "arn:aws:kms:eu-west-1:1:key/k".into(),
            cluster: "prod".into(),
            generation: crate::escrow::generation::FIRST,
        }
    }

    fn config(index: u64) -> Membership {
        Membership {
            servers: ["a", "b", "c", "d"].map(String::from).into(),
            voters: ["a", "b", "c", "d"].map(String::from).into(),
            leader: Some("a".into()),
            index: Some(index),
        }
    }

    #[tokio::test]
    async fn two_deciders_on_one_configuration_get_one_ticket() {
        let (s3, l) = (FakeS3::default(), layout());
        let c = config(7);
        assert_eq!(
            take(&s3, &l, &c, "b", "b", 100, D).await.unwrap(),
            Ticket::Mine
        );
        match take(&s3, &l, &c, "c", "c", 101, D).await.unwrap() {
            Ticket::Held(t) => {
                assert_eq!((t.decided_by.as_str(), t.server_id.as_str()), ("b", "b"));
                assert_eq!(t.configuration, c.id());
            }
            other => panic!("{other:?}"),
        }
        // The first decider's retry is still its own; the next configuration is free.
        assert_eq!(
            take(&s3, &l, &c, "b", "b", 102, D).await.unwrap(),
            Ticket::Mine
        );
        assert_eq!(
            take(&s3, &l, &config(8), "c", "c", 103, D).await.unwrap(),
            Ticket::Mine
        );
        // Each ticket was written under the escrow prefix, once.
        let keys: Vec<String> = s3
            .objects
            .lock()
            .unwrap()
            .keys()
            .map(|(_, k)| k.clone())
            .collect();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(keys
            .iter()
            .all(|k| k.starts_with("vault-bootstrap/prod/removal-tickets/")));
    }

    #[tokio::test]
    async fn a_stale_ticket_gives_way_to_the_next_generation_once() {
        let (s3, l) = (FakeS3::default(), layout());
        let c = config(7);
        assert_eq!(
            take(&s3, &l, &c, "b", "b", 100, D).await.unwrap(),
            Ticket::Mine
        );
        let later = 100 + STALE.as_secs();
        assert_eq!(
            take(&s3, &l, &c, "c", "c", later, D).await.unwrap(),
            Ticket::Mine
        );
        // The second generation is fresh: a third decider waits for it.
        assert!(matches!(
            take(&s3, &l, &c, "d", "d", later + 1, D).await.unwrap(),
            Ticket::Held(TicketBody { generation: 1, .. })
        ));
    }

    #[tokio::test]
    async fn a_restart_ticket_holds_briefly_and_an_old_own_ticket_is_no_pass() {
        let (s3, l) = (FakeS3::default(), layout());
        let c = config(7);
        let hold = Some(RESTART_HOLD);
        let t = |who: &'static str, now: u64| {
            let (s3, l, c) = (&s3, &l, &c);
            async move {
                take_holding(s3, l, c, who, who, now, D, hold)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(t("b", 100).await, Ticket::Mine);
        assert!(matches!(t("c", 101).await, Ticket::Held(_)));
        // A removal decided meanwhile waits for the restart too.
        assert!(matches!(
            take(&s3, &l, &c, "d", "d", 102, D).await.unwrap(),
            Ticket::Held(_)
        ));
        let after = 100 + RESTART_HOLD.as_secs();
        assert_eq!(
            t("c", after).await,
            Ticket::Mine,
            "held only as long as a restart"
        );
        // Much later, on the same configuration: b's own old ticket is no pass while c's
        // newer one holds, and once both are old, the next generation is b's alone.
        assert!(matches!(
            t("b", after + 1).await,
            Ticket::Held(TicketBody { generation: 1, .. })
        ));
        let much_later = after + 10 * RESTART_HOLD.as_secs();
        assert_eq!(t("b", much_later).await, Ticket::Mine);
        assert!(matches!(
            t("c", much_later + 1).await,
            Ticket::Held(TicketBody { generation: 2, .. })
        ));
    }

    #[tokio::test]
    async fn a_foreign_object_in_the_way_is_named() {
        let (s3, l) = (FakeS3::default(), layout());
        let c = config(7);
        s3.objects
            .lock()
            .unwrap()
            .insert(("esc".into(), key(&l, &c.id(), 0)), b"not json".to_vec());
        let e = take(&s3, &l, &c, "b", "b", 100, D).await.unwrap_err();
        assert_eq!(e.exit_code(), exit::DATAERR);
        assert!(e.to_string().contains("removal-tickets/"), "{e}");
    }
}
