//! `vault-bootstrap watch`: the long-running lifecycle unit (`vault-bootstrap-watch.service`).
//! The work is in [`crate::lifecycle::watch`].

use crate::config::Config;
use crate::error::Result;

pub async fn run(cfg: &Config) -> Result<i32> {
    crate::lifecycle::watch::run(cfg).await
}
