//! First-node init and joining, after the local server answers.
//!
//! In this order:
//! 0. A pending init response left by a crashed run is escrowed first: keys are at stake.
//! 1. The local server is initialized -> nothing to init; wait until unsealed.
//! 2. A peer answers initialized, or the escrow marker exists -> join via `retry_join`.
//! 3. Otherwise take the init lock (see [`lock`]); losers wait to join. A lock whose holder
//!    EC2 no longer shows pending/running, with no initialized cluster, is taken over.
//! 4. The winner gets a KMS data key, calls `sys/init`, seals the response to the pending
//!    file at once, escrows (see `escrow`), removes the pending file, then post-init:
//!    audit device, autopilot, root token revoked unless configured otherwise.

pub mod lock;
pub mod pgp;

use crate::aws::ec2::Ec2Api;
use crate::aws::kms::Kms;
use crate::aws::s3::{ObjectStore, PutOutcome};
use crate::config::{parse_duration_secs, Config, Flavor};
use crate::error::{Error, Result};
use crate::escrow::{self, crash_point, pending, InitSecrets, Layout};
use crate::fsutil::{self, Owner};
use crate::launcher::Reloader;
use crate::retry::{self, Backoff};
use crate::secret::Secret;
use crate::vault_api::{Health, VaultClient};
use reqwest::Method;
use std::path::Path;
use std::time::{Duration, Instant};

/// The outside systems init talks to.
pub struct Deps<'a, S, K, E> {
    pub s3: &'a S,
    pub kms: &'a K,
    pub ec2: &'a E,
    pub local: &'a VaultClient,
    pub peers: &'a [VaultClient],
    /// Reloads the local server (SIGHUP).
    pub reloader: &'a Reloader,
}

/// What this boot did about init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// This node initialized the cluster and escrowed its keys.
    Initialized,
    /// A crashed run's init response was escrowed.
    Resumed,
    /// The node joined (or was already part of) an initialized cluster.
    Joined,
}

/// This node's identity for init purposes.
pub struct Me<'a> {
    pub instance_id: &'a str,
    pub cluster: &'a str,
    /// Owner of the audit log's directory (the Vault user).
    pub vault_owner: Owner,
    pub flavor: Flavor,
}

pub async fn run<S: ObjectStore, K: Kms, E: Ec2Api>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
) -> Result<Outcome> {
    let layout = Layout::new(cfg, me.cluster);
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let join = Duration::from_secs(cfg.init.join_timeout_secs);
    let state_dir = &cfg.agent.state_dir;

    if let Some((info, secrets)) = pending::read(d.kms, &layout, state_dir).await? {
        tracing::warn!(
            written_by = %info.instance_id,
            path = %pending::path(state_dir).display(),
            "found the encrypted init response of an interrupted run: resuming its escrow"
        );
        finish(cfg, me, d, &layout, &secrets).await?;
        wait_unsealed(d.local, join).await?;
        return Ok(Outcome::Resumed);
    }

    let start = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(3));
    let mut said_waiting = false;
    // Once seen initialized, a cluster stays so: stop asking peers and S3 every round.
    let mut initialized_elsewhere = false;
    loop {
        match d.local.health().await {
            Ok(Health::Active | Health::Standby | Health::PerfStandby) => {
                tracing::info!("this node is unsealed and part of an initialized cluster");
                resume_post_init(cfg, me, d, &layout).await?;
                return Ok(Outcome::Joined);
            }
            Ok(Health::Uninitialized) if cfg.init.enabled => {
                initialized_elsewhere =
                    initialized_elsewhere || cluster_initialized(d, &layout, aws).await?;
                if !initialized_elsewhere {
                    match lock::acquire(d.s3, &layout, me.instance_id, aws).await? {
                        lock::Lock::Mine(g) => {
                            tracing::info!(generation = g, lock = %layout.url(&layout.lock_dir()), "won the init lock");
                            return winner(cfg, me, d, &layout).await;
                        }
                        lock::Lock::Held(holder) => {
                            if holder_gone(d.ec2, &holder, aws).await?
                                && !cluster_initialized(d, &layout, aws).await?
                            {
                                tracing::warn!(
                                    holder = %holder.instance_id,
                                    generation = holder.generation,
                                    "the init lock's holder is no longer pending/running and left no initialized cluster: taking the lock over"
                                );
                                if let lock::Lock::Mine(g) =
                                    lock::take_over(d.s3, &layout, me.instance_id, &holder, aws)
                                        .await?
                                {
                                    tracing::warn!(generation = g, "took over the init lock");
                                    return winner(cfg, me, d, &layout).await;
                                }
                            } else if !said_waiting {
                                tracing::info!(holder = %holder.instance_id, "another node holds the init lock: waiting to join it");
                                said_waiting = true;
                            }
                        }
                    }
                } else if !said_waiting {
                    tracing::info!(
                        "the cluster is initialized elsewhere: joining through retry_join"
                    );
                    said_waiting = true;
                }
            }
            Ok(h) => {
                if !said_waiting {
                    tracing::info!(state = %h, "waiting for this node to be unsealed and join");
                    said_waiting = true;
                }
            }
            Err(e) => tracing::warn!("local sys/health: {e}"),
        }
        let delay = backoff.next_delay();
        if start.elapsed() + delay > join {
            return Err(Error::Init {
                message: format!(
                    "this node did not become an unsealed cluster member within {} s (init.join_timeout_secs); check the server log and the peers' retry_join reachability",
                    join.as_secs()
                ),
                retriable: true,
            });
        }
        tokio::time::sleep(delay).await;
    }
}

/// Any peer initialized, or the escrow marker present.
async fn cluster_initialized<S: ObjectStore, K, E>(
    d: &Deps<'_, S, K, E>,
    layout: &Layout,
    aws: Duration,
) -> Result<bool> {
    for p in d.peers {
        if let Ok(h) = p.health().await {
            if h.is_known() && h != Health::Uninitialized {
                tracing::debug!(peer = %p.base(), state = %h, "peer is initialized");
                return Ok(true);
            }
        }
    }
    Ok(escrow::read_marker(d.s3, layout, aws).await?.is_some())
}

async fn holder_gone<E: Ec2Api>(ec2: &E, holder: &lock::LockBody, aws: Duration) -> Result<bool> {
    let state = retry::retry("DescribeInstances (lock holder)", aws, || {
        ec2.instance_state(&holder.instance_id)
    })
    .await?;
    Ok(!matches!(state.as_deref(), Some("pending" | "running")))
}

async fn winner<S: ObjectStore, K: Kms, E: Ec2Api>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
    layout: &Layout,
) -> Result<Outcome> {
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    // The data key that will seal the init response, obtained before init: this also
    // proves the escrow key is usable, so a KMS problem stops us while no key exists yet.
    let sealer = retry::retry("KMS data key for the init response", aws, || {
        pending::Sealer::prepare(d.kms, layout, me.instance_id)
    })
    .await?;
    let pgp_keys = pgp::load_all(&cfg.init.recovery_pgp_keys, d.s3, aws).await?;
    crash_point("before-init");
    if cluster_initialized(d, layout, aws).await? {
        tracing::info!("a peer initialized meanwhile: joining instead");
        wait_unsealed(d.local, Duration::from_secs(cfg.init.join_timeout_secs)).await?;
        return Ok(Outcome::Joined);
    }

    let secrets = d
        .local
        .init(
            cfg.init.recovery_shares,
            cfg.init.recovery_threshold,
            &pgp_keys,
            Duration::from_secs(cfg.init.init_timeout_secs),
        )
        .await?;
    tracing::info!(
        recovery_shares = secrets.shares.len(),
        recovery_threshold = secrets.threshold,
        pgp = secrets.pgp,
        "sys/init succeeded"
    );
    match sealer.write(&secrets, &cfg.agent.state_dir) {
        Ok(p) => {
            tracing::info!(path = %p.display(), "init response sealed to the local pending file")
        }
        // Not fatal: the keys are still in memory and go straight to S3 below.
        Err(e) => tracing::error!(
            "could not write the local pending copy ({e}); escrowing straight to S3"
        ),
    }
    crash_point("pending-written");
    finish(cfg, me, d, layout, &secrets).await?;
    Ok(Outcome::Initialized)
}

/// Escrow, then drop the pending file, then post-init.
async fn finish<S: ObjectStore, K: Kms, E: Ec2Api>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
    layout: &Layout,
    secrets: &InitSecrets,
) -> Result<()> {
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let state_dir = &cfg.agent.state_dir;
    if let Err(e) = escrow::escrow(d.s3, d.kms, layout, secrets, me.instance_id, aws).await {
        let kept = pending::path(state_dir);
        let where_ = if kept.exists() {
            format!("the KMS-encrypted init response is kept in {}; run `vault-bootstrap boot` again to resume", kept.display())
        } else {
            "no local copy could be written: the keys exist only in this process; fix S3/KMS now"
                .to_string()
        };
        return Err(Error::Escrow {
            message: format!("recovery keys not escrowed ({e}); {where_}"),
        });
    }
    pending::remove(state_dir)?;
    crash_point("pending-removed");
    post_init(cfg, me, d, layout, &secrets.root_token).await
}

fn revoked_earlier() -> PostInit {
    PostInit {
        root_revoked: true,
        login_paths: Vec::new(),
        reason: Some("found revoked by an earlier run".into()),
    }
}

fn post_init_key(layout: &Layout) -> String {
    format!("{}post-init-done.json", layout.prefix)
}

/// Redoes post-init when this node initialized the cluster but a crash came before the
/// post-init steps were recorded as done.
async fn resume_post_init<S: ObjectStore, K: Kms, E: Ec2Api>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
    layout: &Layout,
) -> Result<()> {
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    // The usual case on every later boot: post-init is recorded done; one GET answers it.
    let done_key = post_init_key(layout);
    let done = retry::retry("read the post-init record", aws, || {
        d.s3.get_opt(&layout.bucket, &done_key)
    })
    .await?;
    if let Some(done) = done {
        // Keep saying it on every boot while the root token is alive.
        if let Ok(p) = serde_json::from_slice::<PostInit>(&done) {
            if !p.root_revoked {
                tracing::warn!(
                    "ROOT TOKEN NOT REVOKED: {}. Configure an operator login path (README \"Operator access\"); until then the root token stays valid, escrowed KMS-encrypted",
                    p.reason.unwrap_or_default()
                );
            }
        }
        return Ok(());
    }
    let Some(marker) = escrow::read_marker(d.s3, layout, aws).await? else {
        return Ok(());
    };
    if marker.instance_id != me.instance_id {
        return Ok(());
    }
    tracing::warn!(
        "post-init was interrupted on this node: redoing it with the escrowed root token"
    );
    let root = escrow::decrypt_item(d.s3, d.kms, layout, Layout::ROOT_ITEM, aws).await?;
    post_init(cfg, me, d, layout, &root).await
}

/// Audit device, autopilot, root token revocation (seed article, steps 4-7). Each step is
/// idempotent, so a repeat after a crash is harmless.
async fn post_init<S: ObjectStore, K: Kms, E>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
    layout: &Layout,
    root: &Secret,
) -> Result<()> {
    let join = Duration::from_secs(cfg.init.join_timeout_secs);
    wait_active(d.local, join).await?;
    let api = |call: &str, status: u16, body: &serde_json::Value| Error::Init {
        message: format!("{call} answered HTTP {status}: {}", body["errors"]),
        retriable: false,
    };

    // Audit: OpenBao takes its device from vault.hcl (rendered); Vault gets it by API.
    if me.flavor == Flavor::Openbao {
        // Declared devices are created on the active node at start and on SIGHUP; this
        // node became active after its start, so reload it once.
        d.reloader.reload().await?;
        wait_active(d.local, join).await?;
        tracing::info!(path = %cfg.init.audit_file_path.display(), "file audit device declared in the server configuration and loaded");
    } else {
        if let Some(dir) = cfg.init.audit_file_path.parent() {
            fsutil::ensure_dir(dir, 0o750, me.vault_owner)?;
        }
        let (status, body) = d
            .local
            .call(
                Method::PUT,
                "sys/audit/file",
                Some(root),
                Some(serde_json::json!({"type": "file", "options": {"file_path": cfg.init.audit_file_path}})),
            )
            .await?;
        match status {
            200 | 204 => {
                tracing::info!(path = %cfg.init.audit_file_path.display(), "file audit device enabled")
            }
            400 if body["errors"].to_string().contains("already in use") => {}
            403 => {
                // Only a revoked root token answers 403 here, and revocation is the last step.
                tracing::info!("root token already revoked: post-init was complete");
                return mark_post_init_done(d.s3, layout, &revoked_earlier()).await;
            }
            s => return Err(api("PUT sys/audit/file", s, &body)),
        }
    }

    let threshold =
        parse_duration_secs(&cfg.init.dead_server_last_contact_threshold).unwrap_or(600);
    let (status, body) = d
        .local
        .call(
            Method::POST,
            "sys/storage/raft/autopilot/configuration",
            Some(root),
            Some(serde_json::json!({
                "cleanup_dead_servers": true,
                "dead_server_last_contact_threshold": format!("{threshold}s"),
                "min_quorum": cfg.init.expected_size,
            })),
        )
        .await?;
    if status == 403 {
        tracing::info!("root token already revoked: post-init was complete");
        return mark_post_init_done(d.s3, layout, &revoked_earlier()).await;
    }
    if !(200..300).contains(&status) {
        return Err(api(
            "POST sys/storage/raft/autopilot/configuration",
            status,
            &body,
        ));
    }
    tracing::info!(
        min_quorum = cfg.init.expected_size,
        dead_server_last_contact_threshold_secs = threshold,
        "autopilot configured"
    );
    crate::snapshot::provision(cfg, d.local, root, d.s3, d.kms, layout).await?;

    // Never locked out: revoke root only once an operator login path reads back as written
    // and the recovery-key path to a new root token (break-glass) is open.
    let operator_ca = match &cfg.access.operator_ca_key {
        Some(key) => {
            let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
            let pem = retry::retry("fetch the operator CA", aws, || {
                d.s3.get(&cfg.tls.bucket, key)
            })
            .await?;
            Some(String::from_utf8(pem).map_err(|_| Error::Init {
                message: format!(
                    "s3://{}/{key} (access.operator_ca_key) is not a PEM text file",
                    cfg.tls.bucket
                ),
                retriable: false,
            })?)
        }
        None => None,
    };
    let paths = crate::access::configure(cfg, d.local, root, operator_ca.as_deref()).await?;
    let glass = crate::access::break_glass_open(d.local).await;
    let keep_reason = if !cfg.init.revoke_root_token {
        Some("init.revoke_root_token = false".to_string())
    } else if paths.is_empty() {
        Some("no operator login path is configured (set access.operator_ca_key or access.aws_role_arns)".to_string())
    } else if !glass {
        Some("the break-glass path (sys/generate-root) is closed on this server".to_string())
    } else {
        None
    };
    match &keep_reason {
        None => {
            let (status, body) = d
                .local
                .call(Method::POST, "auth/token/revoke-self", Some(root), None)
                .await?;
            if !(200..300).contains(&status) && status != 403 {
                return Err(api("POST auth/token/revoke-self", status, &body));
            }
            tracing::info!(login_paths = ?paths, "root token revoked (its escrowed copy is now useless; recovery keys remain)");
        }
        Some(why) => tracing::warn!(
            "ROOT TOKEN NOT REVOKED: {why}. It stays valid, escrowed KMS-encrypted in {}",
            layout.url(&layout.object(Layout::ROOT_ITEM))
        ),
    }
    let record = PostInit {
        root_revoked: keep_reason.is_none(),
        login_paths: paths,
        reason: keep_reason,
    };
    mark_post_init_done(d.s3, layout, &record).await
}

/// What post-init left behind (no secret): read on every boot to keep warning while the
/// root token is alive.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PostInit {
    pub root_revoked: bool,
    pub login_paths: Vec<String>,
    pub reason: Option<String>,
}

async fn mark_post_init_done<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    record: &PostInit,
) -> Result<()> {
    let body = serde_json::to_vec_pretty(record).map_err(|e| Error::Internal(e.to_string()))?;
    let put = s3
        .put_if_absent(
            &layout.bucket,
            &post_init_key(layout),
            body,
            Some(&layout.kms_key_id),
        )
        .await?;
    if put == PutOutcome::Created {
        tracing::info!("post-init complete");
    }
    Ok(())
}

/// Waits until this node answers as an unsealed member (active or standby).
pub async fn wait_unsealed(local: &VaultClient, bound: Duration) -> Result<Health> {
    wait_for(
        local,
        bound,
        |h| matches!(h, Health::Active | Health::Standby | Health::PerfStandby),
        "unsealed and a raft member",
    )
    .await
}

async fn wait_active(local: &VaultClient, bound: Duration) -> Result<Health> {
    wait_for(local, bound, |h| h == Health::Active, "active").await
}

async fn wait_for(
    local: &VaultClient,
    bound: Duration,
    ok: fn(Health) -> bool,
    what: &str,
) -> Result<Health> {
    let start = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    loop {
        let last = match local.health().await {
            Ok(h) if ok(h) => return Ok(h),
            Ok(h) => h.to_string(),
            Err(e) => e,
        };
        let delay = backoff.next_delay();
        if start.elapsed() + delay > bound {
            return Err(Error::Init {
                message: format!(
                    "this node was not {what} within {} s (last: {last})",
                    bound.as_secs()
                ),
                retriable: true,
            });
        }
        tokio::time::sleep(delay).await;
    }
}

/// Whether a state dir holds an unfinished escrow (for `status` and tests).
pub fn has_pending(state_dir: &Path) -> bool {
    pending::path(state_dir).exists()
}
