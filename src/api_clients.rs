//! Vault API clients built from what `boot` left on this node: the cluster CA as the only
//! trust anchor, and connections made from this instance's own address. Node credentials
//! (the snapshot and lifecycle AppRoles, see [`crate::approle`]) and their tokens work only
//! from the cluster's addresses; without a pinned source the kernel picks one by route
//! (127.0.0.1 towards a loopback address, maybe another interface's on a multi-homed host).

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

/// This node's own client: at the address its server listens on (as `boot` reaches it),
/// from this instance's address.
pub fn local(cfg: &Config, facts: &InstanceFacts, ca: &[u8]) -> Result<VaultClient> {
    let bind = crate::render::bind_ip(cfg, facts);
    let ip = if bind.is_unspecified() {
        facts.local_ipv4
    } else {
        bind
    };
    client(cfg, ca, ip, facts.local_ipv4)
}
