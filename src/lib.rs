//! vault-bootstrap: turns a freshly booted EC2 instance into a healthy member of a Vault
//! (or OpenBao) Raft cluster. `main.rs` is thin; the boot path lives here, one module per
//! concern, in the order the product runs them:
//! config -> imds -> discovery -> tls -> render -> launcher -> vault_api.

pub mod access;
pub mod api_clients;
pub mod approle;
pub mod aws;
pub mod boot;
pub mod cli;
pub mod clock;
pub mod config;
pub mod discovery;
pub mod error;
pub mod escrow;
pub mod fsutil;
pub mod imds;
pub mod init;
pub mod install;
pub mod launcher;
pub mod lifecycle;
pub mod logging;
pub mod member;
pub mod node;
pub mod node_lock;
pub mod raft_config;
pub mod raft_store;
pub mod render;
pub mod retry;
pub mod rotation;
pub mod secret;
pub mod snapshot;
pub mod tls;
pub mod vault_api;
