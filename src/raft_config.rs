//! The raft configuration (`sys/storage/raft/configuration`): who is in the cluster, who
//! votes and who leads, and raft's quorum. Every count of voters the agent makes (rejoin's
//! refusal, `status`, the lifecycle's removal rule) is taken from here, because the raft
//! configuration lists every voter, also those whose instance is gone; EC2's list and
//! autopilot's state can both lag it.

use std::collections::BTreeSet;

/// Who is in the raft configuration, who votes, and who leads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    pub servers: BTreeSet<String>,
    pub voters: BTreeSet<String>,
    pub leader: Option<String>,
}

impl Membership {
    /// Parses the API answer (`{"data": {"config": {"servers": [...]}}}`); None when it is
    /// not that shape.
    pub fn parse(body: &serde_json::Value) -> Option<Membership> {
        let mut m = Membership::default();
        for s in body["data"]["config"]["servers"].as_array()? {
            let id = s["node_id"].as_str()?.to_owned();
            if s["voter"].as_bool().unwrap_or(false) {
                m.voters.insert(id.clone());
            }
            if s["leader"].as_bool().unwrap_or(false) {
                m.leader = Some(id.clone());
            }
            m.servers.insert(id);
        }
        Some(m)
    }

    /// What `id` is here: "leader", "voter", "non-voter" or "not a member".
    pub fn role(&self, id: &str) -> &'static str {
        if self.leader.as_deref() == Some(id) {
            "leader"
        } else if self.voters.contains(id) {
            "voter"
        } else if self.servers.contains(id) {
            "non-voter"
        } else {
            "not a member"
        }
    }
}

/// Raft's quorum of `voters`: a strict majority.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_servers_voters_and_the_leader() {
        let body = json!({"data": {"config": {"servers": [
            {"node_id": "a", "voter": true, "leader": true},
            {"node_id": "b", "voter": true, "leader": false},
            {"node_id": "c", "voter": false},
        ]}}});
        let m = Membership::parse(&body).expect("parsed");
        assert_eq!(m.servers.len(), 3);
        assert_eq!(m.voters.iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(
            ["a", "b", "c", "d"].map(|id| m.role(id)),
            ["leader", "voter", "non-voter", "not a member"]
        );
        assert_eq!(Membership::parse(&json!({"data": {}})), None);
        // A server without an id is not a configuration the agent can reason about.
        let bad = json!({"data": {"config": {"servers": [{"voter": true}]}}});
        assert_eq!(Membership::parse(&bad), None);
    }

    #[test]
    fn quorum_is_a_strict_majority() {
        assert_eq!([1, 2, 3, 4, 5, 6].map(quorum), [1, 2, 2, 3, 3, 4]);
    }
}
