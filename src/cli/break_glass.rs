//! `vault-bootstrap break-glass`: a new root token from recovery keys, with no token at all
//! (the unauthenticated generate-root path `boot` keeps open). For when every operator login
//! path is broken. The keys come typed on stdin (one per line) or, with `--from-escrow`, from
//! the escrow (needs kms:Decrypt on the escrow key). The token is printed once, never logged.
//! Run on a standby, the calls are forwarded to the active node; right after a leader change
//! there is none for a moment, and those answers are waited out (bounded, see
//! [`access::SETTLE_BOUND`]).

use crate::aws::kms::SdkKms;
use crate::aws::s3::SdkS3;
use crate::config::Config;
use crate::error::{exit, Error, Result};
use crate::escrow::{self, Layout};
use crate::secret::Secret;
use crate::{access, node, tls};
use std::io::{BufRead, Write};
use std::time::Duration;

pub async fn run(cfg: &Config, from_escrow: bool, yes: bool) -> Result<i32> {
    super::refuse_unless_terminal(yes, "a root token")?;
    let id = node::identity(cfg).await?;
    let deadline = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let shares: Vec<Secret> = if from_escrow {
        let layout = Layout::new(cfg, &id.tag_value);
        let s3 = SdkS3::new(&id.sdk);
        let kms = SdkKms::new(&id.sdk);
        // The shares in force are the current generation's (`rotate` makes new ones).
        let current = escrow::generation::current(&s3, &layout, deadline).await?;
        if current.pgp {
            // Then each escrowed share is a PGP message only its holder can open.
            return Err(Error::Usage {
                message: "the escrowed recovery keys are PGP-encrypted to their holders: have threshold-many holders decrypt theirs (`escrow reveal` + gpg) and type them into `break-glass` without --from-escrow".into(),
            });
        }
        let mut v = Vec::new();
        for n in 1..=current.threshold as usize {
            v.push(
                escrow::decrypt_item(&s3, &kms, &current.layout, &Layout::share_item(n), deadline)
                    .await?,
            );
        }
        tracing::info!(
            generation = current.layout.generation,
            "recovery keys taken from the escrow"
        );
        v
    } else {
        eprintln!("Type the recovery keys, one per line, then end with Ctrl-D:");
        std::io::stdin()
            .lock()
            .lines()
            .map_while(|l| l.ok())
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .map(Secret::new)
            .collect()
    };
    let ca = std::fs::read(tls::paths(&cfg.vault.tls_dir).2).map_err(|e| Error::NoInput {
        message: format!(
            "cannot read the cluster CA in {}: {e}; run boot first",
            cfg.vault.tls_dir.display()
        ),
    })?;
    let local = crate::api_clients::local_any_source(cfg, &id.facts, &ca)?;
    let token = access::generate_root(&local, &shares, access::SETTLE_BOUND).await?;
    tracing::warn!(
        shares = shares.len(),
        "break-glass: a new root token was generated; revoke it when done"
    );
    writeln!(std::io::stdout(), "{}", token.expose())
        .map_err(|e| Error::Internal(format!("stdout: {e}")))?;
    Ok(exit::OK)
}
