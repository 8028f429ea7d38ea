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
    /// Raft's log index of this configuration (`config.index`): it changes with every
    /// membership change (a removal, a join, a promotion) and with nothing else.
    pub index: Option<u64>,
}

impl Membership {
    /// Parses the API answer (`{"data": {"config": {"servers": [...]}}}`); None when it is
    /// not that shape.
    pub fn parse(body: &serde_json::Value) -> Option<Membership> {
        let mut m = Membership {
            index: body["data"]["config"]["index"].as_u64(),
            ..Membership::default()
        };
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

    /// A name for this configuration that changes whenever its membership does: raft's
    /// index of it when the server reports one, else a digest of who is in it and who
    /// votes (a configuration seen again after changes then has its old name, which only
    /// makes a decision on it wait for a stale ticket).
    pub fn id(&self) -> String {
        if let Some(i) = self.index.filter(|i| *i > 0) {
            return format!("i{i:020}");
        }
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for s in &self.servers {
            ctx.update(s.as_bytes());
            ctx.update(if self.voters.contains(s) {
                b"=v;"
            } else {
                b"=n;"
            });
        }
        format!("h{}", &crate::install::hex(ctx.finish().as_ref())[..32])
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
    fn a_configuration_is_named_by_its_index_or_its_members() {
        let servers = |index: Option<u64>, voter_c: bool| {
            let mut config = json!({"servers": [
                {"node_id": "a", "voter": true},
                {"node_id": "b", "voter": true},
                {"node_id": "c", "voter": voter_c},
            ]});
            if let Some(i) = index {
                config["index"] = json!(i);
            }
            Membership::parse(&json!({"data": {"config": config}})).unwrap()
        };
        assert_eq!(servers(Some(42), true).id(), format!("i{:020}", 42));
        assert_ne!(servers(Some(42), true).id(), servers(Some(43), true).id());
        // Without an index: the same members name the same configuration, a promotion or
        // a removal another.
        let (h, promoted) = (servers(None, false).id(), servers(None, true).id());
        assert!(h.starts_with('h') && h.len() == 33, "{h}");
        assert_eq!(h, servers(None, false).id());
        assert_ne!(h, promoted);
        let mut fewer = servers(None, false);
        fewer.servers.remove("c");
        assert_ne!(fewer.id(), h);
    }

    #[test]
    fn quorum_is_a_strict_majority() {
        assert_eq!([1, 2, 3, 4, 5, 6].map(quorum), [1, 2, 2, 3, 3, 4]);
    }
}
