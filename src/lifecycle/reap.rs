//! Evidence-based reaping: the active node removes raft peers whose instances EC2 reports
//! `terminated`, or no longer knows on two looks in a row (EC2 forgets a terminated
//! instance after about an hour; one miss could be its eventual consistency right after a
//! launch). An instance id is never reused, so a terminated one never comes back: its voter
//! only counts against quorum.
//!
//! Never reaped: a peer that is only unreachable while EC2 says its instance is pending,
//! running, stopping or stopped (its disk may bring it back), a server id that is not an
//! instance id, this node itself. And only while what remains keeps quorum
//! ([`super::autopilot::State::removal_keeps_quorum`]), and each removal first takes the
//! [`super::ticket`] of the configuration it was decided on, as leaves do. Autopilot's
//! dead-server cleanup, which removes live voters too, is off unless
//! `init.cleanup_dead_servers` turns it on.
//!
//! The watch unit's [`Reaper`] logs in only when EC2's list of the group's instances no
//! longer matches the members it last read (or every 10 minutes); the boot's [`pass`] runs
//! only when a peer it knew has vanished from that list.

use super::autopilot::{target_tolerance, Removal};
use super::session::{Ctx, Session};
use crate::aws::ec2::{Ec2Api, SdkEc2};
use crate::error::Result;
use crate::vault_api::Health;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// What EC2 says about one server's instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    Terminated,
    /// EC2 does not know the instance (now).
    Absent,
    /// Any other state: not evidence of anything.
    Alive(String),
}

/// Whether `evidence` about `id` allows reaping it, given the ids already seen absent on
/// the previous look (updated here).
pub fn is_gone(id: &str, evidence: &Evidence, absent_before: &mut BTreeSet<String>) -> bool {
    match evidence {
        Evidence::Terminated => true,
        Evidence::Absent => !absent_before.insert(id.to_owned()),
        Evidence::Alive(_) => {
            absent_before.remove(id);
            false
        }
    }
}

/// Raft server ids the agent names: instance ids (`i-` and hex).
pub fn is_instance_id(id: &str) -> bool {
    id.strip_prefix("i-")
        .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
}

async fn evidence<E: Ec2Api>(ec2: &E, id: &str) -> Result<Evidence> {
    Ok(match ec2.instance_state(id).await? {
        Some(s) if s == "terminated" => Evidence::Terminated,
        Some(s) => Evidence::Alive(s),
        None => Evidence::Absent,
    })
}

/// One reaping pass (see the module docs); returns the ids removed. Does nothing unless
/// this node is the active one: one reaper per cluster, and remove-peer is the leader's.
pub async fn pass(ctx: &Ctx<'_>, absent_before: &mut BTreeSet<String>) -> Result<Vec<String>> {
    let local = ctx.local()?;
    if !matches!(local.health().await, Ok(Health::Active)) {
        return Ok(Vec::new());
    }
    let s = Session::open(ctx).await?;
    let result = pass_in(ctx, &s, absent_before).await;
    s.close().await;
    result.map(|(removed, _)| removed)
}

/// How long the watch trusts the membership its last full pass read: past it, the next
/// tick logs in and reads the raft configuration again even if EC2's list did not change.
const TRUST_MEMBERS: Duration = Duration::from_secs(600);

/// The watch unit's reaper: what its last full pass learnt, so that a tick while nothing
/// changed costs one `DescribeInstances` and no login (an S3 read, a KMS decrypt and an
/// AppRole login every `watch_interval_secs`, forever, on the active node).
#[derive(Default)]
pub struct Reaper {
    absent_before: BTreeSet<String>,
    /// The raft members (instance ids) at the last full pass, and when.
    members: Option<(BTreeSet<String>, Instant)>,
}

impl Reaper {
    /// One tick: a full pass ([`pass`]) unless the members last read are recent and EC2
    /// lists each other one as pending or running, and no instance besides (so none is
    /// gone, and none joined since).
    pub async fn tick(&mut self, ctx: &Ctx<'_>) -> Result<Vec<String>> {
        let local = ctx.local()?;
        if !matches!(local.health().await, Ok(Health::Active)) {
            self.members = None;
            return Ok(Vec::new());
        }
        if let Some((known, at)) = &self.members {
            if at.elapsed() < TRUST_MEMBERS && self.absent_before.is_empty() {
                let listed: BTreeSet<String> = SdkEc2::new(ctx.sdk)
                    .instances_tagged(&ctx.cfg.cluster.tag_key, ctx.tag_value)
                    .await?
                    .into_iter()
                    .map(|i| i.id)
                    .filter(|id| id != ctx.me())
                    .collect();
                let others: BTreeSet<String> =
                    known.iter().filter(|id| *id != ctx.me()).cloned().collect();
                if listed == others {
                    return Ok(Vec::new());
                }
            }
        }
        let s = Session::open(ctx).await?;
        let result = pass_in(ctx, &s, &mut self.absent_before).await;
        s.close().await;
        let (removed, members) = result?;
        self.members = Some((members, Instant::now()));
        Ok(removed)
    }
}

/// A full pass at the active node; returns the ids removed and the members left.
async fn pass_in(
    ctx: &Ctx<'_>,
    s: &Session,
    absent_before: &mut BTreeSet<String>,
) -> Result<(Vec<String>, BTreeSet<String>)> {
    let ec2 = SdkEc2::new(ctx.sdk);
    // Who is a member comes from the raft configuration; health from autopilot.
    let mut members = s.membership().await?;
    let mut state = s.autopilot().await?;
    let candidates: Vec<String> = members
        .servers
        .iter()
        .filter(|id| id.as_str() != ctx.me() && is_instance_id(id))
        .cloned()
        .collect();
    // Forget absences of servers no longer listed.
    absent_before.retain(|id| members.servers.contains(id));
    let mut removed = Vec::new();
    for id in candidates {
        let ev = evidence(&ec2, &id).await?;
        if !is_gone(&id, &ev, absent_before) {
            if ev == Evidence::Absent {
                tracing::info!(server_id = %id, "EC2 does not know this raft peer's instance: reaped if the next look agrees");
            }
            continue;
        }
        match state.removal_keeps_quorum(
            &id,
            &members,
            target_tolerance(ctx.cfg.init.expected_size),
        ) {
            Ok(Removal::NotAMember) => {}
            Ok(Removal::Safe { remaining, healthy }) => {
                // Serialised with every leave: one removal per configuration.
                match super::ticket::take_here(ctx, &members, &id).await? {
                    super::ticket::Ticket::Mine => {}
                    super::ticket::Ticket::Held(t) => {
                        tracing::info!(server_id = %id, other = %t.server_id, decided_by = %t.decided_by, "not reaping this pass: another removal was decided on this raft configuration; the next pass decides again");
                        break;
                    }
                }
                s.remove_peer(&id).await?;
                absent_before.remove(&id);
                tracing::warn!(server_id = %id, evidence = ?ev, remaining_voters = remaining, healthy_voters = healthy, "reaped raft peer: EC2 reports its instance gone");
                removed.push(id);
                // The next decision counts the configuration as it is now.
                members = s.membership().await?;
                state = s.autopilot().await?;
            }
            Err(why) => {
                tracing::warn!(server_id = %id, evidence = ?ev, "not reaping this raft peer although its instance is gone: {why}");
            }
        }
    }
    Ok((removed, members.servers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminated_at_once_absent_only_on_the_second_look() {
        let mut seen = BTreeSet::new();
        assert!(is_gone("i-1", &Evidence::Terminated, &mut seen));
        assert!(!is_gone("i-2", &Evidence::Absent, &mut seen));
        assert!(is_gone("i-2", &Evidence::Absent, &mut seen));
        // Seen alive in between: the count starts again.
        let mut seen = BTreeSet::new();
        assert!(!is_gone("i-3", &Evidence::Absent, &mut seen));
        assert!(!is_gone(
            "i-3",
            &Evidence::Alive("running".into()),
            &mut seen
        ));
        assert!(!is_gone("i-3", &Evidence::Absent, &mut seen));
    }

    #[test]
    fn running_stopped_or_stopping_is_never_gone() {
        let mut seen = BTreeSet::new();
        for s in ["pending", "running", "stopping", "stopped", "shutting-down"] {
            for _ in 0..3 {
                assert!(
                    !is_gone("i-4", &Evidence::Alive(s.into()), &mut seen),
                    "{s}"
                );
            }
        }
    }

    #[test]
    fn only_instance_ids_are_candidates() {
        assert!(is_instance_id("i-0123456789abcdef0"));
        assert!(is_instance_id("i-1a2b"));
        assert!(!is_instance_id("vault_1"));
        assert!(!is_instance_id("i-"));
        assert!(!is_instance_id("i-xyz"));
    }
}
