//! `vault-bootstrap escrow verify|finish|reveal`: operator commands on the recovery-key
//! escrow. Each finds the escrow from the config and this instance's cluster tag.

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
    let _ = writeln!(out, "generation: {} (current)", r.generation);
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

/// Finishes the escrow from the copy of the gone initializer's init response, then runs
/// post-init (through the active node). Prints what it did, never a secret.
pub async fn finish(cfg: &Config, instance: Option<String>) -> Result<i32> {
    let id = node::identity(cfg).await?;
    let mut layout = Layout::new(cfg, &id.tag_value);
    let deadline = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let (s3, kms) = (SdkS3::new(&id.sdk), SdkKms::new(&id.sdk));
    // The bucket policy admits escrow objects under the escrow key's ARN only.
    layout.resolve_key_arn(&kms, deadline).await;
    let instance_id = match instance {
        Some(i) => i,
        None => crate::init::lock::holder(&s3, &layout, deadline)
            .await?
            .map(|h| h.instance_id)
            .ok_or_else(|| Error::Usage {
                message: format!(
                    "no init lock under {}: name the initializer with --instance",
                    layout.url(&layout.lock_dir())
                ),
            })?,
    };
    let ca =
        std::fs::read(crate::tls::paths(&cfg.vault.tls_dir).2).map_err(|e| Error::NoInput {
            message: format!(
                "cannot read the cluster CA in {}: {e}",
                cfg.vault.tls_dir.display()
            ),
        })?;
    let local = crate::api_clients::local_any_source(cfg, &id.facts, &ca)?;
    let cluster_id = local.cluster_id().await;
    let done = escrow::finish::from_copy(
        &s3,
        &kms,
        &layout,
        &instance_id,
        cluster_id.as_deref(),
        deadline,
    )
    .await?;
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "escrow of {instance_id}'s init finished from {}: {} item(s) kept as uploaded, {} written; marker {} (cluster id {})",
        layout.url(&escrow::pending::copy_key(&layout, &instance_id)),
        done.kept,
        done.written,
        layout.url(&layout.marker()),
        done.marker.cluster_id.as_deref().unwrap_or("unknown")
    );
    let root = escrow::decrypt_item(&s3, &kms, &layout, Layout::ROOT_ITEM, deadline).await?;
    let ec2 = crate::aws::ec2::SdkEc2::new(&id.sdk);
    let me = crate::init::Me {
        instance_id: &id.facts.instance_id,
        facts: &id.facts,
        cluster: &id.tag_value,
        vault_owner: crate::boot::vault_owner(cfg)?,
        flavor: crate::launcher::resolve_flavor(&cfg.vault).await,
        store_predates_start: true,
    };
    let reloader = crate::launcher::reloader_for(&cfg.vault, &cfg.agent.state_dir)?;
    let deps = crate::init::Deps {
        s3: &s3,
        kms: &kms,
        ec2: &ec2,
        local: &local,
        peers: &[],
        reloader: &reloader,
    };
    crate::init::post_init_by_operator(cfg, &me, &deps, &layout, &root).await?;
    let _ = writeln!(out, "post-init: done");
    Ok(exit::OK)
}

/// Prints share `n` (from 1) alone on stdout, for a key holder.
pub async fn reveal(cfg: &Config, n: usize, yes: bool) -> Result<i32> {
    super::refuse_unless_terminal(yes, "a recovery key")?;
    let id = node::identity(cfg).await?;
    let layout = Layout::new(cfg, &id.tag_value);
    let deadline = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let s3 = SdkS3::new(&id.sdk);
    let current = escrow::generation::current(&s3, &layout, deadline).await?;
    if n == 0 || n > current.shares {
        return Err(Error::Usage {
            message: format!(
                "--share {n} is out of range: generation {} of this escrow has shares 1..={}",
                current.layout.generation, current.shares
            ),
        });
    }
    let share = escrow::decrypt_item(
        &s3,
        &SdkKms::new(&id.sdk),
        &current.layout,
        &Layout::share_item(n),
        deadline,
    )
    .await?;
    tracing::info!(share = n, generation = current.layout.generation, cluster = %layout.cluster, "recovery key revealed to a key holder");
    let mut out = std::io::stdout();
    writeln!(out, "{}", share.expose()).map_err(|e| Error::Internal(format!("stdout: {e}")))?;
    Ok(exit::OK)
}
