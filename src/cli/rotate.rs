//! `vault-bootstrap rotate`: after a node compromise, rotate what a node could have kept:
//! the recovery key (new shares escrowed as a new generation), the keyring and the root
//! key, and the node credentials. Operator role for AWS, the operator's `VAULT_TOKEN` for
//! the server. Resumes whatever an interrupted run left (see `crate::rotation`).

use crate::aws::kms::SdkKms;
use crate::aws::s3::SdkS3;
use crate::config::Config;
use crate::error::{exit, Error, Result};
use crate::escrow::Layout;
use crate::rotation::{self, server::KeyServer};
use crate::secret::Secret;
use crate::{node, tls};
use std::io::Write;
use std::time::Duration;

pub async fn run(cfg: &Config, yes: bool, from: Option<u32>) -> Result<i32> {
    if !yes {
        return Err(Error::Usage {
            message: "rotate makes the escrowed recovery keys, the keyring and the node credentials of this cluster new, and the old shares stop working; pass --yes if you mean it".into(),
        });
    }
    let token = match std::env::var("VAULT_TOKEN") {
        Ok(t) if !t.trim().is_empty() => Secret::new(t.trim()),
        _ => {
            return Err(Error::Usage {
                message: "rotate needs an operator token in VAULT_TOKEN (the admin login, or a token from `break-glass`)".into(),
            })
        }
    };
    let id = node::identity(cfg).await?;
    let deadline = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let (s3, kms) = (SdkS3::new(&id.sdk), SdkKms::new(&id.sdk));
    let mut layout = Layout::new(cfg, &id.tag_value);
    // The bucket policy admits escrow objects under the escrow key's ARN only.
    layout.resolve_key_arn(&kms, deadline).await;
    let ca = std::fs::read(tls::paths(&cfg.vault.tls_dir).2).map_err(|e| Error::NoInput {
        message: format!(
            "cannot read the cluster CA in {}: {e}; run this on a node of the cluster",
            cfg.vault.tls_dir.display()
        ),
    })?;
    let local = crate::api_clients::local(cfg, &id.facts, &ca)?;
    // A rekey's state lives in the active node's memory, and a standby answers some of its
    // calls itself: every call goes to the active node, found without EC2 (the operator
    // role may not list instances).
    let client = crate::api_clients::leader_of(cfg, &ca, local, id.facts.local_ipv4)
        .await?
        .ok_or_else(|| Error::Rotation {
            message: "this node's server names no active node (sys/leader); nothing was changed"
                .into(),
            exit: exit::TEMPFAIL,
        })?;
    let server = KeyServer {
        client: &client,
        token: &token,
        flavor: crate::launcher::resolve_flavor(&cfg.vault).await,
    };
    let roles = [crate::snapshot::ROLE, crate::lifecycle::ROLE];
    let ctx = rotation::Ctx {
        s3: &s3,
        kms: &kms,
        layout: &layout,
        server: &server,
        roles: &roles,
        aws: deadline,
    };
    let done = rotation::rotate(&ctx, from).await?;
    let mut out = std::io::stdout();
    let Some(steps) = &done.finished else {
        let _ = writeln!(
            out,
            "generation {} is current; generation {} is already replaced: nothing to do",
            done.generation, done.supersedes
        );
        return Ok(exit::OK);
    };
    let _ = writeln!(
        out,
        "generation {} is current (it supersedes {}){}",
        done.generation,
        done.supersedes,
        if done.resumed {
            ", finishing an interrupted run"
        } else {
            ""
        }
    );
    for n in &done.abandoned {
        let _ = writeln!(out, "attempt {n} abandoned: its keys never came into force");
    }
    let _ = writeln!(
        out,
        "keyring: rotated{}",
        steps
            .keyring_term
            .map(|t| format!(" (term {t})"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "root key: {}",
        if steps.root_key_rotated {
            "rotated"
        } else {
            "NOT rotated (this server offers no rotation without shares)"
        }
    );
    for (role, destroyed) in &steps.credentials {
        let _ = writeln!(
            out,
            "node credential {role}: replaced ({destroyed} old secret_id(s) destroyed)"
        );
    }
    Ok(exit::OK)
}
