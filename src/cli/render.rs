//! `vault-bootstrap render`: what `boot` would write to `vault.config_file`, on stdout.
//! Reads IMDS and EC2 like `boot`; writes nothing.

use crate::boot;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::node;
use std::io::Write;

pub async fn run(cfg: &Config) -> Result<i32> {
    let node = node::identify(cfg).await?;
    let flavor = crate::launcher::resolve_flavor(&cfg.vault).await;
    let text = boot::render_config(cfg, &node, flavor);
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(|e| Error::Internal(format!("stdout: {e}")))?;
    Ok(crate::error::exit::OK)
}
