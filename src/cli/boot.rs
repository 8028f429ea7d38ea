//! `vault-bootstrap boot`: the boot path lives in [`crate::boot`]; this leaf only runs it.

pub use crate::boot::run;
// Day-2 commands still reach the shared steps through this path; new code imports
// `crate::boot` directly.
pub(crate) use crate::boot::{
    fetch_tls, initialize_or_join, local_client, peer_client, render_config, settle, start,
    vault_owner, write_files, Launched, Ready,
};
