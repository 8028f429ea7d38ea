//! The node's last known good membership, on its own disk: what lets a member that was
//! healthy come back without the AWS control plane (static stability).
//!
//! `boot` writes `<state_dir>/member.json` as soon as the node's server is an unsealed
//! member (before any S3 read), and again once the cluster is checked against the escrow
//! marker; a record of a node found serving another cluster is removed. It holds no secret: the instance it was written
//! on, the cluster tag value, the cluster id, the peers last seen and whether post-init was
//! done. On the next boot, a record written by this same instance, with `vault.hcl`, the TLS
//! files and raft data still on disk, lets the server start before any EC2, S3 or KMS call
//! (the server's own seal still needs KMS); peers and TLS are refreshed after it serves.
//! A record baked into an image never matches a new instance: it is keyed by instance id.

use crate::config::Config;
use crate::discovery::Peer;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::imds::InstanceFacts;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub const FILE: &str = "member.json";
const VERSION: u32 = 1;

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// One peer as last discovered (the order and content of `retry_join`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KnownPeer {
    pub instance_id: String,
    pub ip: IpAddr,
}

/// What a settled boot knew; see the module docs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub version: u32,
    pub instance_id: String,
    pub local_ipv4: IpAddr,
    /// The cluster tag value (the escrow layout's name).
    pub cluster: String,
    /// `sys/health`'s `cluster_id` when the node settled; the marker's, when it records one.
    pub cluster_id: Option<String>,
    pub peers: Vec<KnownPeer>,
    pub post_init_done: bool,
    pub recorded_unix: u64,
}

impl Member {
    pub fn new(
        facts: &InstanceFacts,
        cluster: &str,
        cluster_id: Option<String>,
        peers: &[Peer],
        post_init_done: bool,
    ) -> Member {
        Member {
            version: VERSION,
            instance_id: facts.instance_id.clone(),
            local_ipv4: facts.local_ipv4,
            cluster: cluster.to_owned(),
            cluster_id,
            peers: peers
                .iter()
                .map(|p| KnownPeer {
                    instance_id: p.instance_id.clone(),
                    ip: p.ip,
                })
                .collect(),
            post_init_done,
            recorded_unix: crate::clock::now_unix(),
        }
    }

    /// The recorded peers in discovery's shape (`is_self` from this node's id).
    pub fn peers(&self) -> Vec<Peer> {
        self.peers
            .iter()
            .map(|p| Peer {
                instance_id: p.instance_id.clone(),
                ip: p.ip,
                is_self: p.instance_id == self.instance_id,
            })
            .collect()
    }
}

/// Reads the record; `None` when there is none. A damaged record is an error naming it:
/// the node then cannot tell whether it was a member, and the operator must look.
pub fn read(state_dir: &Path) -> Result<Option<Member>> {
    let p = path(state_dir);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| Error::NoInput {
            message: format!(
                "{} is damaged ({e}); remove it to boot this node as a new one (it then needs EC2 and S3), or run `vault-bootstrap rejoin`",
                p.display()
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::NoInput {
            message: format!("cannot read {}: {e}", p.display()),
        }),
    }
}

/// Writes the record atomically (root-only; it holds no secret, but nobody else needs it).
pub fn write(state_dir: &Path, m: &Member) -> Result<()> {
    fsutil::write_record(state_dir, FILE, m).map(|_| ())
}

/// Removes the record: the node's raft data is gone or moved aside (`rejoin`), so it must
/// boot as a new node again.
pub fn forget(state_dir: &Path) -> Result<()> {
    fsutil::remove_durable(&path(state_dir))
}

/// The record, when this instance may start its server from disk: written by this instance
/// at this address, and `vault.hcl`, the three TLS files and raft data all present. Anything
/// less boots the way a new node does (and says why at info level).
pub fn last_known_good(cfg: &Config, facts: &InstanceFacts) -> Result<Option<Member>> {
    let Some(m) = read(&cfg.agent.state_dir)? else {
        // Said because a node with raft data on disk and no record is not obviously new:
        // its boot then needs EC2 and S3.
        tracing::info!(
            record = %path(&cfg.agent.state_dir).display(),
            raft_data = crate::raft_store::present(&cfg.vault.data_dir),
            "not starting from the last known good files (no membership record: this instance never settled as an unsealed member): booting as a new node"
        );
        return Ok(None);
    };
    let (cert, key, ca) = crate::tls::paths(&cfg.vault.tls_dir);
    let missing: Vec<String> = [&cfg.vault.config_file, &cert, &key, &ca]
        .into_iter()
        .filter(|p| std::fs::metadata(p).map_or(true, |m| m.len() == 0))
        .map(|p| p.display().to_string())
        .collect();
    let why_not = if m.instance_id != facts.instance_id {
        Some(format!(
            "it was written by instance {}, this is {}",
            m.instance_id, facts.instance_id
        ))
    } else if cfg
        .cluster
        .tag_value
        .as_deref()
        .is_some_and(|t| t != m.cluster)
    {
        Some(format!(
            "it is for cluster {:?}, config.toml now names {:?}",
            m.cluster, cfg.cluster.tag_value
        ))
    } else if m.local_ipv4 != facts.local_ipv4 {
        Some(format!(
            "it was written at {}, this instance is at {}",
            m.local_ipv4, facts.local_ipv4
        ))
    } else if !missing.is_empty() {
        Some(format!("missing or empty: {}", missing.join(", ")))
    } else if !crate::raft_store::present(&cfg.vault.data_dir) {
        Some(format!("no raft data in {}", cfg.vault.data_dir.display()))
    } else {
        None
    };
    match why_not {
        None => Ok(Some(m)),
        Some(why) => {
            tracing::info!(record = %path(&cfg.agent.state_dir).display(), "not starting from the last known good files ({why}): booting as a new node");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> InstanceFacts {
        InstanceFacts {
            instance_id: "i-1".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            local_ipv4: "10.0.0.5".parse().unwrap(),
        }
    }

    fn cfg(dir: &Path) -> Config {
        let d = dir.display();
        Config::parse(
            &format!(
                "[tls]\nbucket = \"b\"\n[seal]\nkms_key_id = \"k\"\n[vault]\nconfig_file = \"{d}/vault.hcl\"\ndata_dir = \"{d}/data\"\ntls_dir = \"{d}/tls\"\n[agent]\nstate_dir = \"{d}/state\"\n"
            ),
            Path::new("t.toml"),
        )
        .unwrap()
    }

    fn lay_out(dir: &Path) {
        std::fs::create_dir_all(dir.join("tls")).unwrap();
        std::fs::create_dir_all(dir.join("data/raft")).unwrap();
        for f in ["vault.hcl", "data/vault.db", "data/raft/raft.db"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let (a, b, c) = crate::tls::paths(&dir.join("tls"));
        for p in [a, b, c] {
            std::fs::write(p, "x").unwrap();
        }
    }

    #[test]
    fn a_record_counts_only_for_its_instance_with_every_file_present() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        assert!(last_known_good(&c, &facts()).unwrap().is_none());
        lay_out(d.path());
        let m = Member::new(&facts(), "prod", Some("cid".into()), &[], true);
        write(&c.agent.state_dir, &m).unwrap();
        assert_eq!(last_known_good(&c, &facts()).unwrap(), Some(m.clone()));

        let mut other = facts();
        other.instance_id = "i-2".into();
        assert!(last_known_good(&c, &other).unwrap().is_none());
        let mut moved = facts();
        moved.local_ipv4 = "10.0.0.6".parse().unwrap();
        assert!(last_known_good(&c, &moved).unwrap().is_none());

        std::fs::remove_file(d.path().join("data/raft/raft.db")).unwrap();
        assert!(last_known_good(&c, &facts()).unwrap().is_none());
        std::fs::write(d.path().join("data/raft/raft.db"), "x").unwrap();
        std::fs::write(d.path().join("vault.hcl"), "").unwrap();
        assert!(last_known_good(&c, &facts()).unwrap().is_none());
        std::fs::write(d.path().join("vault.hcl"), "x").unwrap();

        forget(&c.agent.state_dir).unwrap();
        assert!(last_known_good(&c, &facts()).unwrap().is_none());
    }

    #[test]
    fn a_damaged_record_is_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FILE), "{").unwrap();
        let e = read(d.path()).unwrap_err();
        assert!(e.to_string().contains("member.json is damaged"), "{e}");
    }
}
