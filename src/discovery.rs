//! Peer discovery: the instances that share this instance's cluster tag.
//!
//! One paginated `DescribeInstances` per attempt (filtered on the tag and on
//! pending/running), retried with backoff and jitter until at least `cluster.min_peers`
//! instances, this one included, are visible, bounded by `cluster.discovery_timeout_secs`.

use crate::aws::ec2::Ec2Api;
use crate::error::{Error, Result};
use crate::retry::Backoff;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A cluster member candidate, in deterministic order (by instance id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub instance_id: String,
    pub ip: IpAddr,
    pub is_self: bool,
}

/// What to look for.
#[derive(Debug, Clone)]
pub struct Query<'a> {
    pub tag_key: &'a str,
    pub tag_value: &'a str,
    pub self_id: &'a str,
    pub min_peers: usize,
    pub deadline: Duration,
}

/// Sorts, marks self, drops instances without a private IP (not yet networked).
pub fn to_peers(instances: Vec<crate::aws::ec2::Instance>, self_id: &str) -> Vec<Peer> {
    let mut peers: Vec<Peer> = instances
        .into_iter()
        .filter_map(|i| {
            Some(Peer {
                is_self: i.id == self_id,
                ip: i.private_ip?,
                instance_id: i.id,
            })
        })
        .collect();
    peers.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    peers.dedup_by(|a, b| a.instance_id == b.instance_id);
    peers
}

pub async fn discover<E: Ec2Api>(ec2: &E, q: &Query<'_>) -> Result<Vec<Peer>> {
    let start = Instant::now();
    let mut backoff = Backoff::default();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let outcome = ec2.instances_tagged(q.tag_key, q.tag_value).await;
        let shortfall = match outcome {
            Ok(instances) => {
                let peers = to_peers(instances, q.self_id);
                let self_seen = peers.iter().any(|p| p.is_self);
                if self_seen && peers.len() >= q.min_peers {
                    tracing::info!(
                        peer_count = peers.len(),
                        attempt,
                        peers = ?peers.iter().map(|p| format!("{}={}", p.instance_id, p.ip)).collect::<Vec<_>>(),
                        "peers discovered"
                    );
                    return Ok(peers);
                }
                if peers.is_empty() {
                    format!(
                        "no instance tagged {}={} is pending or running; check cluster.tag_key / cluster.tag_value and the instances' tags",
                        q.tag_key, q.tag_value
                    )
                } else if !self_seen {
                    format!(
                        "this instance ({}) is not among the {} instance(s) tagged {}={}; check cluster.tag_value",
                        q.self_id,
                        peers.len(),
                        q.tag_key,
                        q.tag_value
                    )
                } else {
                    format!(
                        "{} of the required {} instance(s) tagged {}={} are visible (cluster.min_peers)",
                        peers.len(),
                        q.min_peers,
                        q.tag_key,
                        q.tag_value
                    )
                }
            }
            Err(e) if e.is_retriable() => e.to_string(),
            Err(e) => return Err(e),
        };
        let delay = backoff.next_delay();
        if start.elapsed() + delay > q.deadline {
            return Err(Error::Discovery {
                message: format!(
                    "{shortfall} (gave up after {} attempts in {} s, cluster.discovery_timeout_secs = {})",
                    attempt,
                    start.elapsed().as_secs(),
                    q.deadline.as_secs()
                ),
            });
        }
        tracing::warn!(
            attempt,
            retry_in_ms = delay.as_millis() as u64,
            "{shortfall}"
        );
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use crate::aws::ec2::Instance;
    use std::sync::Mutex;

    /// Answers scripted in turn; the last one sticks.
    #[derive(Default)]
    pub struct FakeEc2 {
        pub answers: Mutex<Vec<Result<Vec<Instance>>>>,
        pub tags: Mutex<std::collections::HashMap<(String, String), String>>,
        pub calls: std::sync::atomic::AtomicU32,
        pub states: Mutex<std::collections::HashMap<String, String>>,
    }

    pub fn inst(id: &str, ip: &str) -> Instance {
        Instance {
            id: id.into(),
            private_ip: Some(ip.parse().unwrap()),
            state: "running".into(),
        }
    }

    impl Ec2Api for FakeEc2 {
        async fn instances_tagged(&self, _k: &str, _v: &str) -> Result<Vec<Instance>> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut a = self.answers.lock().unwrap();
            if a.len() > 1 {
                a.remove(0)
            } else {
                match a.first() {
                    Some(Ok(v)) => Ok(v.clone()),
                    Some(Err(e)) => Err(Error::Internal(e.to_string())),
                    None => Ok(vec![]),
                }
            }
        }
        async fn instance_state(&self, id: &str) -> Result<Option<String>> {
            Ok(self.states.lock().unwrap().get(id).cloned())
        }
        async fn tag_of(&self, id: &str, key: &str) -> Result<Option<String>> {
            Ok(self
                .tags
                .lock()
                .unwrap()
                .get(&(id.to_string(), key.to_string()))
                .cloned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;
    use crate::error::AwsFailure;

    fn q(min: usize, secs: u64) -> Query<'static> {
        Query {
            tag_key: "aws:autoscaling:groupName",
            tag_value: "prod-vault",
            self_id: "i-2",
            min_peers: min,
            deadline: Duration::from_secs(secs),
        }
    }

    #[test]
    fn peers_are_sorted_marked_and_unnetworked_dropped() {
        let mut no_ip = inst("i-0", "10.0.0.1");
        no_ip.private_ip = None;
        let peers = to_peers(
            vec![
                inst("i-3", "10.0.0.3"),
                no_ip,
                inst("i-2", "10.0.0.2"),
                inst("i-1", "10.0.0.9"),
            ],
            "i-2",
        );
        let ids: Vec<_> = peers.iter().map(|p| p.instance_id.as_str()).collect();
        assert_eq!(ids, ["i-1", "i-2", "i-3"]);
        assert_eq!(peers.iter().filter(|p| p.is_self).count(), 1);
        assert!(peers[1].is_self);
    }

    #[tokio::test]
    async fn retries_until_enough_peers_are_visible() {
        let ec2 = FakeEc2::default();
        ec2.answers.lock().unwrap().extend([
            Ok(vec![inst("i-2", "10.0.0.2")]),
            Err(Error::Aws {
                operation: "DescribeInstances",
                resource: "x".into(),
                failure: AwsFailure::Transient,
                message: "RequestLimitExceeded".into(),
            }),
            Ok(vec![
                inst("i-2", "10.0.0.2"),
                inst("i-1", "10.0.0.1"),
                inst("i-3", "10.0.0.3"),
            ]),
        ]);
        let peers = discover(&ec2, &q(3, 10)).await.unwrap();
        assert_eq!(peers.len(), 3);
        assert_eq!(ec2.calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn gives_up_with_a_message_that_names_the_tag() {
        let ec2 = FakeEc2::default();
        ec2.answers.lock().unwrap().push(Ok(vec![]));
        let e = discover(&ec2, &q(1, 1)).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("no instance tagged aws:autoscaling:groupName=prod-vault"),
            "{msg}"
        );
        assert_eq!(e.exit_code(), 75);
    }

    #[tokio::test]
    async fn too_few_peers_is_reported_with_counts() {
        let ec2 = FakeEc2::default();
        ec2.answers
            .lock()
            .unwrap()
            .push(Ok(vec![inst("i-2", "10.0.0.2")]));
        let e = discover(&ec2, &q(3, 1)).await.unwrap_err();
        assert!(e.to_string().contains("1 of the required 3"), "{e}");
    }

    #[tokio::test]
    async fn permanent_errors_stop_discovery_at_once() {
        let ec2 = FakeEc2::default();
        ec2.answers
            .lock()
            .unwrap()
            .push(Err(Error::Internal("denied".into())));
        let start = Instant::now();
        let e = discover(&ec2, &q(1, 30)).await.unwrap_err();
        assert!(matches!(e, Error::Internal(_)));
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
