//! What autopilot says about the raft servers, and the quorum arithmetic the lifecycle
//! decisions rest on. Pure: the calls that fetch the state live in [`super::session`].

use crate::raft_config::{quorum, Membership};
use std::collections::BTreeMap;

/// `sys/storage/raft/autopilot/state`, the parts the agent reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    pub leader: String,
    /// By server id (the instance id).
    pub servers: BTreeMap<String, Server>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// `leader`, `voter`, `non-voter` (and whatever a later server adds).
    pub status: String,
    /// Autopilot's own verdict: alive, in contact, caught up with the leader's log, and
    /// stable for `server_stabilization_time`.
    pub healthy: bool,
}

impl Server {
    pub fn is_voter(&self) -> bool {
        self.status == "leader" || self.status == "voter"
    }
}

impl State {
    /// Parses the API answer (`{"data": {...}}`); `None` when it is not an autopilot state.
    pub fn parse(body: &serde_json::Value) -> Option<State> {
        let d = &body["data"];
        let servers = d["servers"]
            .as_object()?
            .iter()
            .map(|(id, s)| {
                (
                    id.clone(),
                    Server {
                        status: s["status"].as_str().unwrap_or_default().to_owned(),
                        healthy: s["healthy"].as_bool().unwrap_or(false),
                    },
                )
            })
            .collect();
        Some(State {
            leader: d["leader"].as_str().unwrap_or_default().to_owned(),
            servers,
        })
    }

    /// Autopilot's voters (the tests build a raft configuration from them; decisions take
    /// who votes from the raft configuration itself).
    #[cfg(test)]
    pub fn voters(&self) -> impl Iterator<Item = (&String, &Server)> {
        self.servers.iter().filter(|(_, s)| s.is_voter())
    }

    /// Whether `id` is a voter autopilot calls healthy: what a launch hook waits for.
    pub fn healthy_voter(&self, id: &str) -> bool {
        self.servers
            .get(id)
            .is_some_and(|s| s.is_voter() && s.healthy)
    }

    /// The voters of `m` other than `id` that autopilot does not call healthy (one it does
    /// not list counts as unhealthy).
    pub fn unhealthy_others<'m>(&self, id: &str, m: &'m Membership) -> Vec<&'m String> {
        m.voters
            .iter()
            .filter(|v| {
                v.as_str() != id && !self.servers.get(v.as_str()).is_some_and(|s| s.healthy)
            })
            .collect()
    }

    /// Whether restarting `id`'s server now keeps the cluster serving. A restarting voter
    /// stays in the configuration (`m`, read at the leader just before), so every other
    /// voter must be healthy (a second restart, or a node already down, waits) and the
    /// others must be a quorum of all voters. A cluster built for no failure tolerance
    /// (`target` 0: one or two nodes) never has such a moment and restarts once every other
    /// voter is healthy, as it would have to some day. `Err` says why not.
    pub fn restart_keeps_quorum(
        &self,
        id: &str,
        m: &Membership,
        target: usize,
    ) -> Result<(), String> {
        if !m.servers.contains(id) {
            return Err(format!(
                "{id} is not in the raft configuration: `vault-bootstrap rejoin` first"
            ));
        }
        let unhealthy = self.unhealthy_others(id, m);
        if !unhealthy.is_empty() {
            return Err(format!(
                "autopilot does not call voters {unhealthy:?} healthy (a peer restarted a moment ago is one)"
            ));
        }
        let others = m.voters.iter().filter(|v| v.as_str() != id).count();
        if target > 0 && others < quorum(m.voters.len()) {
            return Err(format!(
                "{others} other voter(s) are not a quorum of {}: the cluster would stop while this node restarts",
                m.voters.len()
            ));
        }
        Ok(())
    }

    /// Whether removing `id` keeps the cluster's failure tolerance: after it, the healthy
    /// voters that remain are a quorum of the remaining configuration, with at least
    /// `min(tolerance now, target)` to spare, where `target` is the tolerance the cluster is
    /// built for (`(init.expected_size - 1) / 2`). So a removal never makes the tolerance
    /// worse than it is, below the target: a dead voter's removal (the healthy count stays)
    /// always passes while the cluster is writable; a healthy voter's leave waits while a
    /// remaining voter is unhealthy or not yet heard from (right after an election), unless
    /// the cluster was already below its target before.
    ///
    /// Who votes comes from the raft configuration (`m`), read at the leader just before:
    /// autopilot's state is a cache refreshed every few seconds, and a server another leave
    /// removed a moment ago may still be in it as a healthy voter. Health comes from
    /// autopilot; a voter it does not list counts as unhealthy. `Err` says why not.
    pub fn removal_keeps_quorum(
        &self,
        id: &str,
        m: &Membership,
        target: usize,
    ) -> Result<Removal, String> {
        if !m.servers.contains(id) {
            return Ok(Removal::NotAMember);
        }
        let healthy_of = |voters: &[&String]| {
            voters
                .iter()
                .filter(|v| self.servers.get(v.as_str()).is_some_and(|s| s.healthy))
                .count()
        };
        let now: Vec<&String> = m.voters.iter().collect();
        let remaining: Vec<&String> = m.voters.iter().filter(|v| v.as_str() != id).collect();
        if remaining.is_empty() {
            return Err(format!("{id} is the only voter"));
        }
        let tolerance =
            |voters: &[&String]| healthy_of(voters) as i64 - quorum(voters.len()) as i64;
        let (before, after) = (tolerance(&now), tolerance(&remaining));
        let healthy = healthy_of(&remaining);
        let need = quorum(remaining.len()) as i64 + before.clamp(0, target as i64);
        if (healthy as i64) < need {
            let what = if m.voters.contains(id) {
                "a voter"
            } else {
                "a non-voter"
            };
            return Err(format!(
                "after removing {id} ({what}) {} voters would remain, {healthy} of them healthy: failure tolerance {after}, below {} (the lesser of now, {before}, and the target, {target}); waiting until the others are healthy",
                remaining.len(),
                before.clamp(0, target as i64)
            ));
        }
        Ok(Removal::Safe {
            remaining: remaining.len(),
            healthy,
        })
    }
}

/// The failure tolerance a cluster of `expected_size` voters is built for.
pub fn target_tolerance(expected_size: u8) -> usize {
    usize::from(expected_size.saturating_sub(1) / 2)
}

/// The outcome of [`State::removal_keeps_quorum`] when it allows the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Not in the configuration (already removed): nothing to do.
    NotAMember,
    Safe {
        remaining: usize,
        healthy: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The membership the state implies (what the raft configuration says when no change
    /// is in flight).
    fn m(s: &State) -> Membership {
        Membership {
            servers: s.servers.keys().cloned().collect(),
            voters: s.voters().map(|(id, _)| id.clone()).collect(),
            leader: Some(s.leader.clone()),
            index: None,
        }
    }

    fn state(servers: &[(&str, &str, bool)]) -> State {
        let v = serde_json::json!({"data": {
            "healthy": true, "failure_tolerance": 1, "leader": servers[0].0,
            "servers": servers.iter().map(|(id, status, healthy)| (id.to_string(), serde_json::json!({
                "id": id, "status": status, "healthy": healthy, "node_status": "alive"
            }))).collect::<serde_json::Map<_, _>>()
        }});
        State::parse(&v).unwrap()
    }

    #[test]
    fn parses_what_openbao_answers() {
        // Captured from OpenBao 2.6.2 (one node).
        let body = serde_json::json!({"data": {"failure_tolerance": 0, "healthy": true,
            "leader": "i-one", "servers": {"i-one": {"id": "i-one", "name": "i-one",
            "address": "127.0.99.1:8201", "node_status": "alive", "last_contact": "0s",
            "last_term": 3, "last_index": 29, "healthy": true, "stable_since":
            "2026-11-30T17:03:33.1386086Z", "status": "leader", "version": "2.6.2",
            "node_type": "voter"}}, "voters": ["i-one"]}});
        let s = State::parse(&body).unwrap();
        assert_eq!(s.leader, "i-one");
        assert!(s.healthy_voter("i-one"));
        assert!(!s.healthy_voter("i-two"));
        assert_eq!(State::parse(&serde_json::json!({"errors": []})), None);
    }

    #[test]
    fn a_non_voter_or_an_unhealthy_voter_is_not_ready() {
        let s = state(&[
            ("a", "leader", true),
            ("b", "non-voter", true),
            ("c", "voter", false),
        ]);
        assert!(s.healthy_voter("a"));
        assert!(!s.healthy_voter("b"));
        assert!(!s.healthy_voter("c"));
    }

    #[test]
    fn a_restart_needs_every_other_voter_healthy_and_a_quorum_without_it() {
        let s = state(&[
            ("a", "leader", true),
            ("b", "voter", true),
            ("c", "voter", true),
        ]);
        assert_eq!(s.restart_keeps_quorum("b", &m(&s), 1), Ok(()));
        let e = s.restart_keeps_quorum("zzz", &m(&s), 1).unwrap_err();
        assert!(e.contains("not in the raft configuration"), "{e}");
        // A peer restarting (unhealthy until it is back) holds the next one.
        let s = state(&[
            ("a", "leader", true),
            ("b", "voter", true),
            ("c", "voter", false),
        ]);
        let e = s.restart_keeps_quorum("b", &m(&s), 1).unwrap_err();
        assert!(e.contains("\"c\""), "{e}");
        // Two voters of a cluster built for three: the other alone is no quorum; wait.
        let s = state(&[("a", "leader", true), ("b", "voter", true)]);
        let e = s.restart_keeps_quorum("b", &m(&s), 1).unwrap_err();
        assert!(e.contains("not a quorum of 2"), "{e}");
        // A cluster built for no tolerance restarts once the others are healthy.
        assert_eq!(s.restart_keeps_quorum("b", &m(&s), 0), Ok(()));
        let one = state(&[("a", "leader", true)]);
        assert_eq!(one.restart_keeps_quorum("a", &m(&one), 0), Ok(()));
    }

    #[test]
    fn removal_needs_a_healthy_quorum_of_what_remains() {
        // Launch before terminate: 4 healthy voters, one leaves: 3 remain, all healthy.
        let s = state(&[
            ("a", "leader", true),
            ("b", "voter", true),
            ("c", "voter", true),
            ("new", "voter", true),
        ]);
        assert_eq!(
            s.removal_keeps_quorum("b", &m(&s), 1),
            Ok(Removal::Safe {
                remaining: 3,
                healthy: 3
            })
        );
        // A dead voter's removal never lowers the healthy count: allowed while a quorum is up.
        let s = state(&[
            ("a", "leader", true),
            ("b", "voter", true),
            ("dead", "voter", false),
        ]);
        assert!(s.removal_keeps_quorum("dead", &m(&s), 1).is_ok());
        // A healthy voter leaving 2 voters of which 1 is healthy: refused, with the numbers.
        let e = s.removal_keeps_quorum("b", &m(&s), 1).unwrap_err();
        assert!(
            e.contains("2 voters would remain, 1 of them healthy"),
            "{e}"
        );
        // Right after an election the new leader has not heard from the newest voter: a
        // leave then waits, although a bare quorum would remain.
        let s = state(&[
            ("new1", "leader", true),
            ("new2", "voter", true),
            ("old", "voter", true),
            ("leaving", "voter", true),
            ("unheard", "voter", false),
        ]);
        let e = s.removal_keeps_quorum("leaving", &m(&s), 1).unwrap_err();
        assert!(e.contains("failure tolerance 0, below 1"), "{e}");
        // Once it is heard from, the leave goes on: 4 healthy voters keep tolerance 1.
        let s = state(&[
            ("new1", "leader", true),
            ("new2", "voter", true),
            ("old", "voter", true),
            ("leaving", "voter", true),
            ("unheard", "voter", true),
        ]);
        assert!(s.removal_keeps_quorum("leaving", &m(&s), 1).is_ok());
        // Five nodes, target 2: from 6 healthy voters one leaves; a dead one is reaped at
        // tolerance 1 (it cannot get worse by that).
        let s = state(&[
            ("a", "leader", true),
            ("b", "voter", true),
            ("c", "voter", true),
            ("d", "voter", true),
            ("e", "voter", true),
            ("f", "voter", true),
        ]);
        assert!(s.removal_keeps_quorum("f", &m(&s), 2).is_ok());
        let s = state(&[
            ("a", "leader", true),
            ("b", "voter", true),
            ("c", "voter", true),
            ("d", "voter", true),
            ("dead", "voter", false),
        ]);
        assert!(s.removal_keeps_quorum("dead", &m(&s), 2).is_ok());
        assert!(s.removal_keeps_quorum("d", &m(&s), 2).is_err());
        // A leave's last look (target 0): what remains is 3 healthy of 4, a quorum.
        assert!(s.removal_keeps_quorum("d", &m(&s), 0).is_ok());
        // ... but never below a quorum: 1 healthy of 2 would remain.
        let s = state(&[
            ("a", "leader", true),
            ("b", "voter", true),
            ("sick", "voter", false),
        ]);
        assert!(s.removal_keeps_quorum("b", &m(&s), 0).is_err());
        assert_eq!(target_tolerance(3), 1);
        assert_eq!(target_tolerance(5), 2);
        assert_eq!(target_tolerance(4), 1);
        // The last voter never leaves; a non-member is nothing to do.
        let one = state(&[("a", "leader", true)]);
        assert!(one.removal_keeps_quorum("a", &m(&one), 1).is_err());
        assert_eq!(
            s.removal_keeps_quorum("zzz", &m(&s), 1),
            Ok(Removal::NotAMember)
        );
        // A non-voter's removal counts only the voters.
        let s = state(&[
            ("a", "leader", true),
            ("b", "voter", false),
            ("nv", "non-voter", true),
        ]);
        assert!(s.removal_keeps_quorum("nv", &m(&s), 1).is_err());
    }

    /// Two old nodes leave at once from 6 voters, 4 healthy: autopilot's cache still lists
    /// the first as a healthy voter after it left. The raft configuration decides who votes,
    /// so the second leave counts 4 voters, 2 healthy, and waits.
    #[test]
    fn who_votes_comes_from_the_raft_configuration_not_the_cache() {
        let s = state(&[
            ("old1", "leader", true),
            ("old2", "voter", true),
            ("old3", "voter", true),
            ("new1", "voter", true),
            ("new2", "voter", false),
            ("new3", "voter", false),
        ]);
        let mut after_old1 = m(&s);
        after_old1.voters.remove("old1");
        after_old1.servers.remove("old1");
        // From the stale cache alone the second leave would look safe (5 left, 3 healthy).
        assert!(s.removal_keeps_quorum("old2", &m(&s), 1).is_ok());
        let e = s.removal_keeps_quorum("old2", &after_old1, 1).unwrap_err();
        assert!(
            e.contains("4 voters would remain, 2 of them healthy"),
            "{e}"
        );
        // And a server the configuration no longer has is nothing to do, whatever the cache says.
        assert_eq!(
            s.removal_keeps_quorum("old1", &after_old1, 1),
            Ok(Removal::NotAMember)
        );
    }

    #[test]
    fn the_raft_configuration_parses() {
        let body = serde_json::json!({"data": {"config": {"index": 0, "servers": [
            {"node_id": "i-1", "address": "10.0.0.1:8201", "leader": true, "voter": true},
            {"node_id": "i-2", "address": "10.0.0.2:8201", "leader": false, "voter": false}
        ]}}});
        let m = Membership::parse(&body).unwrap();
        assert_eq!(m.servers.len(), 2);
        assert_eq!(m.voters.iter().collect::<Vec<_>>(), ["i-1"]);
        assert_eq!(Membership::parse(&serde_json::json!({})), None);
    }

    #[test]
    fn quorum_is_a_strict_majority() {
        assert_eq!((1..=6).map(quorum).collect::<Vec<_>>(), [1, 2, 2, 3, 3, 4]);
    }
}
