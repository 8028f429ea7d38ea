//! Vault API clients: the cluster CA as the only trust anchor, always.
//!
//! Two kinds. [`client`] and [`local`] connect from this instance's own address: node
//! credentials (the snapshot and lifecycle AppRoles, see [`crate::approle`]) and their
//! tokens work only from the cluster's addresses, and without a pinned source the kernel
//! picks one by route (127.0.0.1 towards a loopback address, maybe another interface's on a
//! multi-homed host). [`peer`] and [`local_any_source`] leave the source to the kernel: for
//! calls that carry no token bound to an address (health, init, join, the operator's own
//! token), which must work before this instance's address is known to be configured.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::imds::InstanceFacts;
use crate::tls;
use crate::vault_api::VaultClient;
use std::net::IpAddr;

/// The cluster CA `boot` wrote.
pub fn cluster_ca(cfg: &Config) -> Result<Vec<u8>> {
    let ca_path = tls::paths(&cfg.vault.tls_dir).2;
    std::fs::read(&ca_path).map_err(|e| Error::NoInput {
        message: format!(
            "cannot read the cluster CA {} ({e}); `boot` writes it: run on a cluster node",
            ca_path.display()
        ),
    })
}

/// The API client of the node at `ip`, connecting from `me` (this instance's address).
pub fn client(cfg: &Config, ca: &[u8], ip: IpAddr, me: IpAddr) -> Result<VaultClient> {
    VaultClient::from_source(
        ca,
        ip,
        cfg.vault.api_port,
        cfg.tls.server_name.as_deref(),
        me,
    )
}

/// This node's own client: at the address its server listens on, from this instance's
/// address.
pub fn local(cfg: &Config, facts: &InstanceFacts, ca: &[u8]) -> Result<VaultClient> {
    client(cfg, ca, listen_ip(cfg, facts), facts.local_ipv4)
}

/// The API client of the node at `ip`, from whatever source address the kernel picks.
pub fn peer(cfg: &Config, ca: &[u8], ip: IpAddr) -> Result<VaultClient> {
    VaultClient::new(ca, ip, cfg.vault.api_port, cfg.tls.server_name.as_deref())
}

/// This node's own client, from whatever source address the kernel picks.
pub fn local_any_source(cfg: &Config, facts: &InstanceFacts, ca: &[u8]) -> Result<VaultClient> {
    peer(cfg, ca, listen_ip(cfg, facts))
}

/// This node first, then its peers as EC2 lists them now (each connecting from this
/// instance's address): the clients [`find_active`] tries.
pub async fn with_peers(
    cfg: &Config,
    id: crate::node::Identity,
    ca: &[u8],
    local: VaultClient,
) -> Result<(crate::node::Node, Vec<VaultClient>)> {
    let me = id.facts.local_ipv4;
    let n = crate::node::current(cfg, id).await?;
    let mut clients = vec![local];
    for p in n.peers.iter().filter(|p| !p.is_self) {
        clients.push(client(cfg, ca, p.ip, me)?);
    }
    Ok((n, clients))
}

/// The active node, as this node's own server names it (`sys/leader`; no EC2 call, so it
/// works with credentials that may not list instances): `local` itself, or a client of the
/// leader's address. None while there is no leader.
pub async fn leader_of(
    cfg: &Config,
    ca: &[u8],
    local: VaultClient,
    me: IpAddr,
) -> Result<Option<VaultClient>> {
    let Ok((200, body)) = local
        .call(reqwest::Method::GET, "sys/leader", None, None)
        .await
    else {
        return Ok(None);
    };
    if body["is_self"].as_bool() == Some(true) {
        return Ok(Some(local));
    }
    match body["leader_address"].as_str().and_then(host_ip) {
        Some(ip) => Ok(Some(client(cfg, ca, ip, me)?)),
        None => Ok(None),
    }
}

/// The IP address in an `api_addr` URL (`https://10.0.1.7:8200`, `https://[fd00::1]:8200`).
/// The agent renders `api_addr` from the instance's address, so a name here means a
/// cluster not rendered by it: no address.
pub fn host_ip(url: &str) -> Option<IpAddr> {
    let url = reqwest::Url::parse(url).ok()?;
    // An IPv6 host comes bracketed, as in the URL.
    url.host_str()?.trim_matches(['[', ']']).parse().ok()
}

/// The first node answering `sys/health` 200 (active); else what each said.
pub async fn find_active(nodes: &[VaultClient]) -> std::result::Result<&VaultClient, Vec<String>> {
    let mut seen = Vec::new();
    for n in nodes {
        match n.health().await {
            Ok(crate::vault_api::Health::Active) => return Ok(n),
            Ok(h) => seen.push(format!("{}: {h}", n.base())),
            Err(e) => seen.push(format!("{}: {e}", n.base())),
        }
    }
    Err(seen)
}

/// Where this node's server is reached: its bind address, or the private IP when it binds
/// to every address.
fn listen_ip(cfg: &Config, facts: &InstanceFacts) -> IpAddr {
    let bind = crate::render::bind_ip(cfg, facts);
    if bind.is_unspecified() {
        facts.local_ipv4
    } else {
        bind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_addr_hosts_parse() {
        assert_eq!(
            host_ip("https://10.0.1.7:8200"),
            Some("10.0.1.7".parse().unwrap())
        );
        assert_eq!(
            host_ip("https://[fd00::1]:8200"),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(
            host_ip("http://127.0.99.1:8200/"),
            Some("127.0.99.1".parse().unwrap())
        );
        assert_eq!(host_ip("https://vault.example:8200"), None);
        assert_eq!(host_ip(""), None);
    }
}
