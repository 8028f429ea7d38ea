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
