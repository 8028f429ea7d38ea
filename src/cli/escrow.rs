//! `vault-bootstrap escrow verify|reveal`: operator commands on the recovery-key escrow.
//! Both find the escrow from the config and this instance's cluster tag.

use crate::aws::kms::SdkKms;
use crate::aws::s3::SdkS3;
use crate::config::Config;
use crate::error::{exit, Error, Result};
use crate::escrow::{self, Layout};
use crate::node;
use std::io::Write;
use std::time::Duration;

/// Exit 0 only when the marker and every share are present and decrypt. Prints counts,
/// never secrets.
pub async fn verify(cfg: &Config) -> Result<i32> {
    let id = node::identity(cfg).await?;
    let layout = Layout::new(cfg, &id.tag_value);
    let deadline = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let r = escrow::verify(
        &SdkS3::new(&id.sdk),
        &SdkKms::new(&id.sdk),
        &layout,
        deadline,
    )
    .await?;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "escrow: {}", layout.url(&layout.prefix));
    let _ = writeln!(
        out,
        "marker: {}",
        if r.marker { "present" } else { "MISSING" }
    );
    let _ = writeln!(
        out,
        "recovery keys: {}/{} present and decrypt",
        r.shares_ok, r.shares_expected
    );
    let _ = writeln!(
        out,
        "root token: {}",
        if r.root_token_ok {
            "present and decrypts"
        } else {
            "absent or unreadable"
        }
    );
    for p in &r.problems {
        let _ = writeln!(out, "problem: {p}");
    }
    let ok = r.ok();
    let _ = writeln!(out, "{}", if ok { "OK" } else { "FAILED" });
    Ok(if ok { exit::OK } else { exit::ESCROW })
}

/// Prints share `n` (from 1) alone on stdout, for a key holder.
pub async fn reveal(cfg: &Config, n: usize, yes: bool) -> Result<i32> {
    super::refuse_unless_terminal(yes, "a recovery key")?;
    let id = node::identity(cfg).await?;
    let layout = Layout::new(cfg, &id.tag_value);
    let deadline = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let s3 = SdkS3::new(&id.sdk);
    let marker = escrow::require_marker(&s3, &layout, deadline).await?;
    if n == 0 || n > marker.recovery_shares {
        return Err(Error::Usage {
            message: format!(
                "--share {n} is out of range: this escrow has shares 1..={}",
                marker.recovery_shares
            ),
        });
    }
    let share = escrow::decrypt_item(
        &s3,
        &SdkKms::new(&id.sdk),
        &layout,
        &Layout::share_item(n),
        deadline,
    )
    .await?;
    tracing::info!(share = n, cluster = %layout.cluster, "recovery key revealed to a key holder");
    let mut out = std::io::stdout();
    writeln!(out, "{}", share.expose()).map_err(|e| Error::Internal(format!("stdout: {e}")))?;
    Ok(exit::OK)
}
