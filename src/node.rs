//! Who this node is and who its peers are: IMDS facts, the cluster tag value, discovery.
//! Shared by `boot` and `render` (and the day-2 commands), which all start here.

use crate::aws::ec2::{Ec2Api, SdkEc2};
use crate::config::Config;
use crate::discovery::{self, Peer};
use crate::error::{Error, Result};
use crate::imds::{self, InstanceFacts, Metadata, SdkImds, TagLookup};
use std::time::Duration;
use tracing::Instrument;

/// The node as the boot path sees it.
#[derive(Debug, Clone)]
pub struct Node {
    pub facts: InstanceFacts,
    pub tag_value: String,
    pub peers: Vec<Peer>,
    pub sdk: aws_config::SdkConfig,
}

/// The cluster tag value: config, else IMDS instance tags, else `ec2:DescribeTags`.
pub async fn tag_value<M: Metadata, E: Ec2Api>(
    cfg: &Config,
    md: &M,
    ec2: &E,
    facts: &InstanceFacts,
) -> Result<String> {
    let key = &cfg.cluster.tag_key;
    if let Some(v) = &cfg.cluster.tag_value {
        return Ok(v.clone());
    }
    let found =
        match imds::tag_value(md, key, Duration::from_secs(cfg.agent.imds_timeout_secs)).await? {
            Some(TagLookup::Value(v)) => Some(v),
            Some(TagLookup::Absent) => None,
            None => {
                tracing::info!("instance metadata tags are off; asking EC2 (DescribeTags)");
                let deadline = Duration::from_secs(cfg.agent.aws_timeout_secs);
                crate::retry::retry("DescribeTags", deadline, || {
                    ec2.tag_of(&facts.instance_id, key)
                })
                .await?
            }
        };
    found.ok_or_else(|| Error::Discovery {
        message: format!(
            "this instance ({}) has no tag {key:?}: launch it from the cluster's Auto Scaling group, tag it, or set cluster.tag_value",
            facts.instance_id
        ),
    })
}

/// Who this instance is, without peers: what the escrow commands need.
#[derive(Debug, Clone)]
pub struct Identity {
    pub facts: InstanceFacts,
    pub tag_value: String,
    pub sdk: aws_config::SdkConfig,
}

/// This instance as IMDS describes it, and the SDK configuration for its region: all a
/// member needs to start its server again from its own disk (see `crate::member`).
#[derive(Debug, Clone)]
pub struct Instance {
    pub facts: InstanceFacts,
    pub sdk: aws_config::SdkConfig,
    /// Kept for the tag lookup: one IMDS session token per boot.
    imds: SdkImds,
}

/// IMDS facts and the cluster tag value (no warm-pool wait, no discovery).
pub async fn identity(cfg: &Config) -> Result<Identity> {
    with_tag(cfg, instance_with(cfg, SdkImds::new(), false).await?).await
}

/// IMDS facts, after waiting out a warm pool: the boot path's first step. No AWS API call.
pub async fn instance(cfg: &Config) -> Result<Instance> {
    instance_with(cfg, SdkImds::new(), true).await
}

/// Reads IMDS (waiting out a warm pool), resolves the tag value, discovers peers until
/// `cluster.min_peers` are visible: the boot path (and `render`, `rejoin`, which mirror it).
pub async fn identify(cfg: &Config) -> Result<Node> {
    identify_instance(cfg, instance(cfg).await?).await
}

/// The instances of this node's cluster as EC2 lists them now, for day-2 commands (`status`,
/// `snapshot`, `refresh-tls`) and the refresh after a member restarted from its disk: one
/// bounded look, no `min_peers` floor. A degraded cluster is exactly when they run, and a
/// warm-pool wait has no place there either.
pub async fn current(cfg: &Config, id: Identity) -> Result<Node> {
    let peers = discover(cfg, &id, 1, cfg.agent.aws_timeout_secs).await?;
    Ok(id.with_peers(peers))
}

impl Identity {
    pub fn with_peers(self, peers: Vec<Peer>) -> Node {
        Node {
            facts: self.facts,
            tag_value: self.tag_value,
            peers,
            sdk: self.sdk,
        }
    }
}

impl Instance {
    /// The identity of a member whose cluster tag value is known from its own disk.
    pub fn known_as(self, tag_value: &str) -> Identity {
        Identity {
            facts: self.facts,
            tag_value: tag_value.to_owned(),
            sdk: self.sdk,
        }
    }
}

async fn instance_with(cfg: &Config, md: SdkImds, wait_in_service: bool) -> Result<Instance> {
    let imds_deadline = Duration::from_secs(cfg.agent.imds_timeout_secs);
    let facts = imds::instance_facts(&md, imds_deadline)
        .instrument(tracing::info_span!("imds"))
        .await?;
    tracing::info!(instance_id = %facts.instance_id, region = %facts.region, az = %facts.availability_zone, local_ipv4 = %facts.local_ipv4, "instance facts");
    if wait_in_service {
        imds::wait_in_service(
            &md,
            imds_deadline,
            Duration::from_secs(cfg.agent.warm_pool_timeout_secs),
        )
        .await?;
    }
    let sdk = crate::aws::sdk_config(
        &facts.region,
        Duration::from_secs(cfg.agent.aws_timeout_secs),
    )
    .await;
    Ok(Instance {
        facts,
        sdk,
        imds: md,
    })
}

async fn with_tag(cfg: &Config, inst: Instance) -> Result<Identity> {
    let tag_value = tag_value(cfg, &inst.imds, &SdkEc2::new(&inst.sdk), &inst.facts).await?;
    Ok(inst.known_as(&tag_value))
}

/// The rest of [`identify`] for an instance already read: tag value and peers.
pub async fn identify_instance(cfg: &Config, inst: Instance) -> Result<Node> {
    let id = with_tag(cfg, inst).await?;
    let peers = discover(
        cfg,
        &id,
        cfg.cluster.min_peers,
        cfg.cluster.discovery_timeout_secs,
    )
    .await?;
    Ok(id.with_peers(peers))
}

async fn discover(cfg: &Config, id: &Identity, min_peers: usize, secs: u64) -> Result<Vec<Peer>> {
    discovery::discover(
        &SdkEc2::new(&id.sdk),
        &discovery::Query {
            tag_key: &cfg.cluster.tag_key,
            tag_value: &id.tag_value,
            self_id: &id.facts.instance_id,
            min_peers,
            deadline: Duration::from_secs(secs),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::fake::FakeEc2;
    use crate::imds::fake::FakeImds;
    use std::path::Path;

    fn cfg(extra: &str) -> Config {
        Config::parse(
            &format!("[tls]\nbucket = \"b\"\n[seal]\nkms_key_id = \"k\"\n{extra}"),
            Path::new("t.toml"),
        )
        .unwrap()
    }

    fn facts() -> InstanceFacts {
        InstanceFacts {
            instance_id: "i-0abc".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            local_ipv4: "10.0.1.5".parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn tag_from_config_then_imds_then_ec2() {
        let md = FakeImds::standard();
        let ec2 = FakeEc2::default();
        let c = cfg("[cluster]\ntag_value = \"explicit\"\n");
        assert_eq!(
            tag_value(&c, &md, &ec2, &facts()).await.unwrap(),
            "explicit"
        );
        let c = cfg("");
        assert_eq!(
            tag_value(&c, &md, &ec2, &facts()).await.unwrap(),
            "prod-vault"
        );
        md.values.lock().unwrap().remove("meta-data/tags/instance");
        ec2.tags.lock().unwrap().insert(
            ("i-0abc".into(), "aws:autoscaling:groupName".into()),
            "from-ec2".into(),
        );
        assert_eq!(
            tag_value(&c, &md, &ec2, &facts()).await.unwrap(),
            "from-ec2"
        );
        ec2.tags.lock().unwrap().clear();
        let e = tag_value(&c, &md, &ec2, &facts()).await.unwrap_err();
        assert!(e.to_string().contains("has no tag"), "{e}");
    }
}
