//! First-node init and joining, after the local server answers.
//!
//! In this order:
//! 0. A pending init response left by a crashed run is escrowed first: keys are at stake.
//! 1. The local server is initialized -> nothing to init; wait until unsealed.
//! 2. A peer answers initialized, or the escrow marker exists -> join via `retry_join`.
//!    A store that was on disk before the server started and still reports not
//!    initialized joined once and never received its data: it is moved aside
//!    ([`stale_join`]) and the next start joins afresh.
//! 3. Otherwise take the init lock (see [`lock`]); losers wait to join. A lock whose holder
//!    EC2 shows `terminated` (or does not list on two looks, [`SECOND_LOOK`] apart), with
//!    no initialized cluster, is taken over. A stopped holder is not gone: its volume still holds what it initialized.
//! 4. The winner gets a KMS data key, records the attempt on disk (see [`attempt`]), calls
//!    `sys/init`, seals the response to the pending file at once, escrows (see `escrow`),
//!    removes the pending file, then post-init: audit device, autopilot, root token revoked
//!    unless configured otherwise. The keys never exist only in memory when it can exit.
//!
//! [`become_member`] returns here, once the local server is unsealed: the boot records the
//! membership on disk before any further AWS call.
//!
//! 5. Every node then checks that it serves the cluster the escrow marker names
//!    ([`confirm`]).

pub mod attempt;
pub mod lock;
pub mod pgp;
pub mod stale_join;

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

/// How a node settled: what `boot` records as its last known good membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub outcome: Outcome,
    /// The cluster id the node serves (confirmed against the marker when it records one).
    pub cluster_id: Option<String>,
    pub post_init_done: bool,
}

/// This node's identity for init purposes.
pub struct Me<'a> {
    pub instance_id: &'a str,
    /// Region and id for the instance ARN the pending file is bound to.
    pub facts: &'a crate::imds::InstanceFacts,
    pub cluster: &'a str,
    /// Owner of the audit log's directory (the Vault user).
    pub vault_owner: Owner,
    pub flavor: Flavor,
    /// The raft store was on disk before this boot started the server: a store that
    /// reports not initialized is then one that joined and never received data (see
    /// [`stale_join`]), never one the server made just now.
    pub store_predates_start: bool,
}

/// A node that is an unsealed member of a cluster, before any check against the escrow:
/// what the boot records on disk at once, so that a reboot from here on comes back from
/// disk ([`crate::member`]).
pub struct Unsealed {
    pub outcome: Outcome,
    /// The cluster id the local server reports.
    pub cluster_id: Option<String>,
    /// Post-init done, as far as this node's own init or resume knows.
    finished: bool,
    layout: Layout,
}

/// Steps 0-4: init on the one node that wins the lock, join everywhere else; returns once
/// the local server is an unsealed member (no S3 read after that point).
pub async fn become_member<S: ObjectStore, K: Kms, E: Ec2Api>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
) -> Result<Unsealed> {
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    // Only a node that writes under the escrow prefix needs the key's ARN: one resuming a
    // pending init (now), or one about to take the init lock (`init_or_join` resolves it
    // then). A member, or a node joining a cluster that exists, writes nothing there and
    // makes no KMS call.
    let mut layout = Layout::new(cfg, me.cluster);
    if has_pending(&cfg.agent.state_dir) {
        layout.resolve_key_arn(d.kms, aws).await;
    }
    let (outcome, finished) = init_or_join(cfg, me, d, &mut layout).await?;
    Ok(Unsealed {
        outcome,
        cluster_id: d.local.cluster_id().await,
        finished,
        layout,
    })
}

/// Step 5, and post-init on a joiner that initialized earlier: the cluster checked against
/// the escrow marker.
pub async fn confirm<S: ObjectStore, K: Kms, E: Ec2Api>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
    u: Unsealed,
) -> Result<Settled> {
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let cluster_id = confirm_cluster(d, &u.layout, aws).await?;
    let post_init_done = match u.outcome {
        Outcome::Initialized | Outcome::Resumed => u.finished,
        Outcome::Joined => resume_post_init(cfg, me, d, &u.layout).await?,
    };
    Ok(Settled {
        outcome: u.outcome,
        cluster_id,
        post_init_done,
    })
}

/// Checks that this node serves the cluster the escrow marker names; returns its id.
/// A node with raft data of another cluster (a second init, a stopped holder's own store)
/// must never report ready: it would answer clients with another cluster's data.
pub async fn confirm_cluster<S: ObjectStore, K, E>(
    d: &Deps<'_, S, K, E>,
    layout: &Layout,
    aws: Duration,
) -> Result<Option<String>> {
    let local = d.local.cluster_id().await;
    let marker = escrow::read_marker(d.s3, layout, aws).await?;
    check_cluster_id(
        local.as_deref(),
        marker.as_ref().and_then(|m| m.cluster_id.as_deref()),
        &layout.url(&layout.marker()),
    )?;
    Ok(local)
}

/// `Err` when both ids are known and differ.
pub fn check_cluster_id(local: Option<&str>, recorded: Option<&str>, source: &str) -> Result<()> {
    match (local, recorded) {
        (Some(l), Some(r)) if l != r => Err(Error::ForeignCluster {
            message: format!(
                "this node's server belongs to cluster {l}, but {source} records cluster {r}: its raft data is from another initialization (a second cluster). It is not reported ready. Keep both and investigate; `vault-bootstrap rejoin` moves this node's data aside and joins it to {r}"
            ),
        }),
        _ => Ok(()),
    }
}

/// What this boot did, and whether post-init is done when this node did init.
async fn init_or_join<S: ObjectStore, K: Kms, E: Ec2Api>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
    layout: &mut Layout,
) -> Result<(Outcome, bool)> {
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let join = Duration::from_secs(cfg.init.join_timeout_secs);
    let state_dir = &cfg.agent.state_dir;

    if let Some((info, secrets)) = pending::read(d.kms, layout, state_dir).await? {
        tracing::warn!(
            written_by = %info.instance_id,
            path = %pending::path(state_dir).display(),
            "found the encrypted init response of an interrupted run: resuming its escrow"
        );
        let done = finish(cfg, me, d, layout, &secrets, info.sealed, false).await?;
        wait_unsealed(d.local, join).await?;
        return Ok((Outcome::Resumed, done));
    }

    let start = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(3));
    let mut said_waiting = false;
    // Once seen initialized, a cluster stays so: stop asking peers and S3 every round.
    let mut initialized_elsewhere = false;
    let mut key_resolved = false;
    let mut stale = stale_join::Watch::new(me.store_predates_start);
    loop {
        let health = d.local.health().await;
        if stale.stuck(health.as_ref().ok(), initialized_elsewhere) {
            return Err(stale_join::set_aside(cfg).await?);
        }
        match health {
            Ok(Health::Active | Health::Standby | Health::PerfStandby) => {
                tracing::info!("this node is unsealed and part of an initialized cluster");
                return Ok((Outcome::Joined, false));
            }
            Ok(Health::Uninitialized) if cfg.init.enabled => {
                initialized_elsewhere =
                    initialized_elsewhere || cluster_initialized(d, layout, aws).await?;
                if !initialized_elsewhere {
                    // The lock, and all an init writes, go under the escrow prefix.
                    if !key_resolved {
                        layout.resolve_key_arn(d.kms, aws).await;
                        key_resolved = true;
                    }
                    match lock::acquire(d.s3, layout, me.instance_id, aws).await? {
                        lock::Lock::Mine(g) => {
                            tracing::info!(generation = g, lock = %layout.url(&layout.lock_dir()), "won the init lock");
                            return winner(cfg, me, d, layout).await;
                        }
                        lock::Lock::Held(holder) => {
                            if holder_gone(d.ec2, &holder, aws, SECOND_LOOK).await?
                                && !cluster_initialized(d, layout, aws).await?
                            {
                                tracing::warn!(
                                    holder = %holder.instance_id,
                                    generation = holder.generation,
                                    "the init lock's holder is terminated and left no initialized cluster: taking the lock over"
                                );
                                if let lock::Lock::Mine(g) =
                                    lock::take_over(d.s3, layout, me.instance_id, &holder, aws)
                                        .await?
                                {
                                    tracing::warn!(generation = g, "took over the init lock");
                                    return winner(cfg, me, d, layout).await;
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

/// How long after EC2 first says it does not know the lock holder it is asked again. EC2's
/// API is eventually consistent: right after a launch, `DescribeInstances` can answer
/// `InvalidInstanceID.NotFound` for an instance that runs, for a few seconds. A holder that
/// wrote the lock had been running at least that long, so two looks this far apart tell
/// "not yet visible" from "forgotten" (EC2 forgets a terminated instance after about an
/// hour). Reaping asks for two looks too, a watch interval apart.
const SECOND_LOOK: Duration = Duration::from_secs(10);

/// Only `terminated`, or not listed on two looks `spacing` apart, is gone: a `stopping` or
/// `stopped` holder still has its volume, and on it whatever it initialized; taking over
/// from it could make a second cluster when it starts again.
async fn holder_gone<E: Ec2Api>(
    ec2: &E,
    holder: &lock::LockBody,
    aws: Duration,
    spacing: Duration,
) -> Result<bool> {
    let look = || {
        retry::retry("DescribeInstances (lock holder)", aws, || {
            ec2.instance_state(&holder.instance_id)
        })
    };
    let state = look().await?;
    if state.is_some() {
        return Ok(is_gone(state.as_deref()));
    }
    tracing::info!(
        holder = %holder.instance_id,
        again_in_secs = spacing.as_secs(),
        "EC2 does not know the init lock's holder; asking again before taking the lock over"
    );
    tokio::time::sleep(spacing).await;
    Ok(is_gone(look().await?.as_deref()))
}

fn is_gone(state: Option<&str>) -> bool {
    matches!(state, None | Some("terminated"))
}

async fn winner<S: ObjectStore, K: Kms, E: Ec2Api>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
    layout: &Layout,
) -> Result<(Outcome, bool)> {
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    // The pending file opens only on the instance that wrote it: its data key's context
    // names this instance's ARN, which the node policy compares with ec2:SourceInstanceARN.
    // Read here, from IMDS, only on the one node that inits.
    let instance_arn = crate::imds::instance_arn(
        &crate::imds::SdkImds::new(),
        me.facts,
        Duration::from_secs(cfg.agent.imds_timeout_secs),
    )
    .await?;
    // The data key that will seal the init response, obtained before init: this also
    // proves the escrow key is usable, so a KMS problem stops us while no key exists yet.
    let sealer = retry::retry("KMS data key for the init response", aws, || {
        pending::Sealer::prepare(d.kms, layout, me.instance_id, &instance_arn)
    })
    .await?;
    let pgp_keys = pgp::load_all(&cfg.init.recovery_pgp_keys, d.s3, aws).await?;
    crash_point("before-init");
    if cluster_initialized(d, layout, aws).await? {
        tracing::info!("a peer initialized meanwhile: joining instead");
        wait_unsealed(d.local, Duration::from_secs(cfg.init.join_timeout_secs)).await?;
        return Ok((Outcome::Joined, false));
    }

    // Refused now rather than in post-init, where the cluster would be initialized already.
    crate::access::operator_ca(cfg, d.s3).await?;
    // S3 lets exactly one conditional writer of a lock generation succeed. A store that does
    // not (the test-bed's moto, under load, once let two racing writers both succeed) is
    // caught here: the holder is read back after the steps above, long after any racing
    // write landed, and only the one whose body S3 kept goes on.
    match lock::holder(d.s3, layout, aws).await? {
        Some(h) if h.instance_id == me.instance_id => {}
        other => {
            tracing::warn!(holder = ?other.map(|h| h.instance_id), "the init lock reads back as another node's: joining instead of initializing");
            wait_unsealed(d.local, Duration::from_secs(cfg.init.join_timeout_secs)).await?;
            return Ok((Outcome::Joined, false));
        }
    }
    // The pending file's directory takes a write before any key exists (else no init), and
    // the record says, if this run dies, that the store may hold a cluster nobody has keys for.
    let state_dir = &cfg.agent.state_dir;
    attempt::begin(state_dir, me.instance_id, &layout.cluster)?;
    crash_point("attempt-written");
    tracing::info!("calling sys/init");
    let secrets = d
        .local
        .init(
            cfg.init.recovery_shares,
            cfg.init.recovery_threshold,
            &pgp_keys,
        )
        .await?;
    // Test hooks: an answer lost after peers had time to join what it made.
    escrow::pause_point("init-answered").await;
    crash_point("init-answered");
    tracing::info!(
        recovery_shares = secrets.shares.len(),
        recovery_threshold = secrets.threshold,
        pgp = secrets.pgp,
        "sys/init succeeded"
    );
    let sealed = make_durable(cfg, me, d, layout, &sealer, &secrets).await;
    attempt::end(state_dir)?;
    crash_point("pending-written");
    let done = finish(cfg, me, d, layout, &secrets, sealed, true).await?;
    Ok((Outcome::Initialized, done))
}

/// Returns only once the init response is durable: sealed in the pending file, or (when the
/// state directory refuses the write) escrowed and verified in S3. Never returns with the
/// keys only in this process's memory: it alternates between the two, loudly, for as long
/// as both fail (systemd's `TimeoutStartSec=` is the only bound, and an operator is told
/// every round what to fix).
async fn make_durable<S: ObjectStore, K: Kms, E>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
    layout: &Layout,
    sealer: &pending::Sealer,
    secrets: &InitSecrets,
) -> Option<escrow::Sealed> {
    let state_dir = &cfg.agent.state_dir;
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let loud = |e: &dyn std::fmt::Display| {
        tracing::error!(
            "THE RECOVERY KEYS EXIST ONLY IN THIS PROCESS: the pending file could not be written and the escrow failed ({e}). Fix {} (disk, permissions) or S3/KMS now; retrying both. Do not stop this process",
            state_dir.display()
        )
    };
    // Encrypted once, then kept across rounds: items a round uploaded are compared by their
    // bytes, which a fresh encryption would not reproduce.
    let mut sealed: Option<escrow::Sealed> = None;
    loop {
        match sealer.write(secrets, state_dir) {
            Ok(p) => {
                tracing::info!(path = %p.display(), "init response sealed to the local pending file");
                match &sealed {
                    None => return None,
                    // Some items may be in S3 already: the file must carry their bytes.
                    Some(s) => match pending::record_items(state_dir, s) {
                        Ok(()) => return sealed,
                        Err(e) => tracing::error!("could not record the escrow items in the pending file ({e})"),
                    },
                }
            }
            Err(e) => tracing::error!(
                "could not write the local pending copy of the init response ({e}); escrowing straight to S3"
            ),
        }
        if sealed.is_none() {
            match escrow::encrypt_items(d.kms, layout, secrets, aws).await {
                Ok(s) => sealed = Some(s),
                Err(e) => loud(&e),
            }
        }
        if let Some(s) = &sealed {
            let cluster_id = d.local.cluster_id().await;
            match escrow::escrow(
                d.s3,
                layout,
                s,
                secrets,
                me.instance_id,
                cluster_id.as_deref(),
                aws,
            )
            .await
            {
                Ok(_) => return sealed,
                Err(e) => loud(&e),
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Escrow (the items' ciphertexts recorded in the pending file before any upload), then
/// post-init with the root token from the init response, then drop the pending file: until
/// post-init is done it is the only copy of the root token a node may read. Returns whether
/// post-init is done (a resumed run on a standby leaves it, and the pending file, for later).
async fn finish<S: ObjectStore, K: Kms, E: Ec2Api>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
    layout: &Layout,
    secrets: &InitSecrets,
    sealed: Option<escrow::Sealed>,
    first_run: bool,
) -> Result<bool> {
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let state_dir = &cfg.agent.state_dir;
    let not_escrowed = |e: Error| {
        let kept = pending::path(state_dir);
        let where_ = if kept.exists() {
            format!("the KMS-encrypted init response is kept in {}; run `vault-bootstrap boot` again to resume", kept.display())
        } else {
            "no local copy could be written: the keys exist only in this process; fix S3/KMS now"
                .to_string()
        };
        Error::Escrow {
            message: format!("recovery keys not escrowed ({e}); {where_}"),
        }
    };
    // Before anything else can fail: the instance's volume may not outlive it, and an
    // operator can finish the escrow from this copy.
    if has_pending(state_dir) {
        let url = pending::upload_copy(d.s3, layout, state_dir, me.instance_id, aws)
            .await
            .map_err(not_escrowed)?;
        tracing::info!(copy = %url, "the encrypted init response is copied to S3 (write-once; this instance and the operator role can decrypt it)");
    }
    crash_point("pending-copied");
    // The marker records the cluster this init made; the node that made it is unsealed by
    // now (it just initialized, or its pending file says it did).
    let cluster_id =
        wait_cluster_id(d.local, Duration::from_secs(cfg.init.join_timeout_secs)).await?;
    let sealed = match sealed {
        Some(s) => s,
        None => {
            let s = escrow::encrypt_items(d.kms, layout, secrets, aws)
                .await
                .map_err(not_escrowed)?;
            // Before any upload: a resumed run must upload, and compare, these same bytes.
            if has_pending(state_dir) {
                pending::record_items(state_dir, &s)?;
            }
            s
        }
    };
    crash_point("items-recorded");
    escrow::escrow(
        d.s3,
        layout,
        &sealed,
        secrets,
        me.instance_id,
        Some(&cluster_id),
        aws,
    )
    .await
    .map_err(not_escrowed)?;
    post_init(cfg, me, d, layout, &secrets.root_token, first_run).await?;
    pending::remove(state_dir)?;
    crash_point("pending-removed");
    Ok(true)
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
) -> Result<bool> {
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    // The usual case on every later boot: post-init is recorded done; one GET answers it.
    if let Some(p) = post_init_record(d.s3, layout, aws).await? {
        // Keep saying it on every boot while the root token is alive.
        if !p.root_revoked {
            tracing::warn!(
                "ROOT TOKEN NOT REVOKED: {}. Configure an operator login path (docs/operations.md \"Operator access\"); until then the root token stays valid, escrowed KMS-encrypted",
                p.reason.unwrap_or_default()
            );
        }
        return Ok(true);
    }
    let Some(marker) = escrow::read_marker(d.s3, layout, aws).await? else {
        return unescrowed(cfg, me, d, layout).await;
    };
    let age = crate::clock::now_unix().saturating_sub(marker.initialized_unix);
    if marker.instance_id != me.instance_id {
        // Only the initializer can finish it (it alone may read the root token back); every
        // other member says so, quietly while the initializer is plausibly still at it.
        if age > POST_INIT_GRACE_SECS {
            tracing::warn!(initializer = %marker.instance_id, age_secs = age, "POST-INIT UNFINISHED: the cluster was initialized {age} s ago and its post-init (audit device, autopilot, root token revocation) is not recorded done. It resumes when {} boots again; if that instance is gone, finish it with `vault-bootstrap escrow finish` (docs/operations.md \"An initialiser gone before its escrow finished\")", marker.instance_id);
        } else {
            tracing::info!(initializer = %marker.instance_id, "post-init is in progress on the initializer");
        }
        return Ok(false);
    }
    // This node initialized the cluster, and its pending file (the only root token a node
    // may read) is gone: nodes never decrypt the escrowed root token.
    tracing::warn!("POST-INIT UNFINISHED: this node initialized the cluster, but its pending init file, which held the root token for post-init, is gone; an operator finishes post-init by hand (docs/internals.md \"Init and escrow\")");
    Ok(false)
}

/// How long after the marker a missing post-init record is still "in progress": post-init
/// waits for the active node and makes a handful of API calls (seconds); ten minutes is
/// well past any healthy run.
const POST_INIT_GRACE_SECS: u64 = 600;

/// An initialized cluster with no escrow marker. On the lock holder with no pending file,
/// its keys are lost: that is an escrow failure (exit 80) on every boot, never "ready".
/// Elsewhere the holder may still be escrowing: say so and go on.
async fn unescrowed<S: ObjectStore, K, E: Ec2Api>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
    layout: &Layout,
) -> Result<bool> {
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let holder = lock::holder(d.s3, layout, aws).await?;
    if holder.as_ref().map(|h| h.instance_id.as_str()) == Some(me.instance_id)
        && !has_pending(&cfg.agent.state_dir)
    {
        return Err(Error::Escrow {
            message: format!(
                "this node holds the init lock and its cluster is initialized, but there is no escrow marker ({}) and no pending init file in {}: the recovery keys and root token of this cluster were never escrowed and are not on this node. The cluster serves, but nobody can generate a root token for it. Decide now: re-create it (move {} aside on every node) while it holds no data, or keep it knowing that",
                layout.url(&layout.marker()),
                cfg.agent.state_dir.display(),
                cfg.vault.data_dir.display()
            ),
        });
    }
    if let Some(h) = holder.as_ref().filter(|h| h.instance_id != me.instance_id) {
        // Only the holder writes the marker. Gone, it never will: its volume, and on it the
        // pending file, went with it. The copy it put in S3 lets an operator finish.
        if holder_gone(d.ec2, h, aws, SECOND_LOOK).await? {
            return Err(Error::Escrow {
                message: format!(
                    "NOT ESCROWED: this cluster is initialized, no escrow marker exists ({}), and the node that initialized it, {}, is terminated or gone: it will never finish the escrow. An operator finishes it from the copy of its init response ({}): run `vault-bootstrap escrow finish` with the operator role on the active node (docs/operations.md \"An initialiser gone before its escrow finished\")",
                    layout.url(&layout.marker()),
                    h.instance_id,
                    layout.url(&pending::copy_key(layout, &h.instance_id))
                ),
            });
        }
    }
    tracing::info!(holder = ?holder.map(|h| h.instance_id), "the cluster is initialized; its escrow marker is not written yet");
    Ok(false)
}

/// Audit device, autopilot, root token revocation (seed article, steps 4-7). Each step is
/// idempotent, so a repeat after a crash is harmless. The first run (`patient`) waits until
/// its node is active (it just initialized a one-node cluster, so it will be); a resumed run
/// on a standby goes through the active node.
async fn post_init<S: ObjectStore, K: Kms, E>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
    layout: &Layout,
    root: &Secret,
    patient: bool,
) -> Result<()> {
    let join = Duration::from_secs(cfg.init.join_timeout_secs);
    // Post-init's API calls need the active node. A first run waits for this node to be it
    // (it just initialized a one-node cluster). A resumed run on a standby calls the active
    // node by its address (an OpenBao standby answers some writes itself, from its
    // read-only storage, and fails them), so the root token is revoked within this boot
    // rather than at some later boot as the active node.
    let leader = if patient {
        wait_active(d.local, join).await?;
        None
    } else if d.local.health().await == Ok(Health::Active) {
        None
    } else {
        let leader = wait_for_leader(cfg, me, d.local, join).await?;
        tracing::info!("this node initialized the cluster and is a standby now: post-init goes through the active node");
        Some(leader)
    };
    let standby = leader.is_some();
    let server: &VaultClient = leader.as_ref().unwrap_or(d.local);
    let api = |call: &str, status: u16, body: &serde_json::Value| Error::Init {
        message: format!("{call} answered HTTP {status}: {}", body["errors"]),
        retriable: false,
    };

    // Audit: OpenBao takes its device from vault.hcl (rendered on every node, and loaded by
    // the active node when it became active); Vault gets it by API.
    if me.flavor == Flavor::Openbao && standby {
        let (status, body) = server
            .call(Method::GET, "sys/audit", Some(root), None)
            .await?;
        if status == 403 {
            tracing::info!("root token already revoked: post-init was complete");
            mark_post_init_done(d.s3, layout, &revoked_earlier()).await?;
            return Ok(());
        }
        let listed = body["data"]
            .as_object()
            .or_else(|| body.as_object())
            .is_some_and(|m| m.values().any(|v| v["type"] == "file"));
        if status != 200 || !listed {
            return Err(Error::Init {
                message: format!(
                    "the active node lists no file audit device (GET sys/audit answered HTTP {status}); it loads the one its vault.hcl declares when it becomes active or on SIGHUP: reload its server (`systemctl reload vault`), and this boot's retry finishes post-init"
                ),
                retriable: true,
            });
        }
        tracing::info!("the active node serves the declared file audit device");
    } else if me.flavor == Flavor::Openbao {
        // Declared devices are created on the active node at start and on SIGHUP; this
        // node became active after its start, so reload it once.
        d.reloader.reload().await?;
        wait_active(d.local, join).await?;
        tracing::info!(path = %cfg.init.audit_file_path.display(), "file audit device declared in the server configuration and loaded");
    } else {
        if let Some(dir) = cfg.init.audit_file_path.parent() {
            fsutil::ensure_dir(dir, 0o750, me.vault_owner)?;
        }
        let (status, body) = server
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
                mark_post_init_done(d.s3, layout, &revoked_earlier()).await?;
                return Ok(());
            }
            s => return Err(api("PUT sys/audit/file", s, &body)),
        }
    }

    let threshold =
        parse_duration_secs(&cfg.init.dead_server_last_contact_threshold).unwrap_or(600);
    let (status, body) = server
        .call(
            Method::POST,
            "sys/storage/raft/autopilot/configuration",
            Some(root),
            Some(serde_json::json!({
                "cleanup_dead_servers": cfg.init.cleanup_dead_servers,
                "dead_server_last_contact_threshold": format!("{threshold}s"),
                "min_quorum": cfg.init.expected_size,
            })),
        )
        .await?;
    if status == 403 {
        tracing::info!("root token already revoked: post-init was complete");
        mark_post_init_done(d.s3, layout, &revoked_earlier()).await?;
        return Ok(());
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
        cleanup_dead_servers = cfg.init.cleanup_dead_servers,
        dead_server_last_contact_threshold_secs = threshold,
        "autopilot configured"
    );
    // The node credentials are bound to the cluster's addresses: this node's and its peers'.
    let nodes: Vec<std::net::IpAddr> = std::iter::once(d.local.ip())
        .chain(d.peers.iter().map(VaultClient::ip))
        .collect();
    crate::snapshot::provision(cfg, server, &nodes, root, d.s3, d.kms, layout).await?;
    crate::lifecycle::provision(cfg, server, &nodes, root, d.s3, d.kms, layout).await?;

    // Never locked out: revoke root only once an operator login path reads back as written
    // and the recovery-key path to a new root token (break-glass) is open.
    let operator_ca = crate::access::operator_ca(cfg, d.s3).await?;
    let paths = crate::access::configure(cfg, server, root, operator_ca.as_deref()).await?;
    let glass = crate::access::break_glass_open(server).await;
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
            let (status, body) = server
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
    mark_post_init_done(d.s3, layout, &record).await?;
    Ok(())
}

/// Post-init by an operator who holds the root token (an escrow finished by hand, its
/// initializer gone): the same steps, through the active node when this one is a standby.
pub async fn post_init_by_operator<S: ObjectStore, K: Kms, E>(
    cfg: &Config,
    me: &Me<'_>,
    d: &Deps<'_, S, K, E>,
    layout: &Layout,
    root: &Secret,
) -> Result<()> {
    if post_init_record(
        d.s3,
        layout,
        Duration::from_secs(cfg.agent.aws_timeout_secs),
    )
    .await?
    .is_some()
    {
        return Ok(());
    }
    post_init(cfg, me, d, layout, root, false).await
}

/// What post-init left behind (no secret): read on every boot to keep warning while the
/// root token is alive.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PostInit {
    pub root_revoked: bool,
    pub login_paths: Vec<String>,
    pub reason: Option<String>,
}

/// The post-init record, when post-init is done (also for `status`).
pub async fn post_init_record<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    aws: Duration,
) -> Result<Option<PostInit>> {
    let key = post_init_key(layout);
    let body = retry::retry("read the post-init record", aws, || {
        s3.get_opt(&layout.bucket, &key)
    })
    .await?;
    // A record that does not parse still says "done": only its warning is lost.
    Ok(body.map(|b| serde_json::from_slice(&b).unwrap_or_default()))
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

/// Waits until this node reports its cluster id (it is unsealed).
async fn wait_cluster_id(local: &VaultClient, bound: Duration) -> Result<String> {
    wait_unsealed(local, bound).await?;
    local.cluster_id().await.ok_or_else(|| Error::Init {
        message: "this node is unsealed but its sys/health reports no cluster_id; the init response stays in the pending file".into(),
        retriable: true,
    })
}

/// The active node, as this node's server names it (`sys/leader`), waited for (bounded):
/// right after a leader change there is none for a moment.
async fn wait_for_leader(
    cfg: &Config,
    me: &Me<'_>,
    local: &VaultClient,
    bound: Duration,
) -> Result<VaultClient> {
    let ca = crate::api_clients::cluster_ca(cfg)?;
    let start = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    loop {
        if let Some(leader) =
            crate::api_clients::leader_of(cfg, &ca, local.clone(), me.facts.local_ipv4).await?
        {
            return Ok(leader);
        }
        let delay = backoff.next_delay();
        if start.elapsed() + delay > bound {
            return Err(Error::Init {
                message: format!(
                    "this node's server named no active node (sys/leader) within {} s",
                    bound.as_secs()
                ),
                retriable: true,
            });
        }
        tokio::time::sleep(delay).await;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_terminated_or_unlisted_holder_is_gone() {
        assert!(is_gone(None));
        assert!(is_gone(Some("terminated")));
        // A stopped instance keeps its volume, and on it whatever it initialized.
        for s in ["pending", "running", "stopping", "stopped", "shutting-down"] {
            assert!(!is_gone(Some(s)), "{s}");
        }
    }

    /// EC2 answers these states, one per look, then keeps the last.
    struct Looks(std::sync::Mutex<Vec<Option<&'static str>>>);

    impl Ec2Api for Looks {
        async fn instances_tagged(
            &self,
            _: &str,
            _: &str,
        ) -> Result<Vec<crate::aws::ec2::Instance>> {
            Ok(Vec::new())
        }
        async fn instance_state(&self, _: &str) -> Result<Option<String>> {
            let mut looks = self.0.lock().unwrap();
            let next = if looks.len() > 1 {
                looks.remove(0)
            } else {
                looks[0]
            };
            Ok(next.map(str::to_owned))
        }
        async fn tag_of(&self, _: &str, _: &str) -> Result<Option<String>> {
            Ok(None)
        }
    }

    fn gone_after(looks: Vec<Option<&'static str>>) -> bool {
        let ec2 = Looks(std::sync::Mutex::new(looks));
        let holder = lock::LockBody {
            instance_id: "i-0holder".into(),
            acquired_unix: 0,
            cluster: "prod".into(),
            generation: 0,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(holder_gone(
            &ec2,
            &holder,
            Duration::from_secs(1),
            Duration::from_millis(1),
        ))
        .unwrap()
    }

    #[test]
    fn one_not_found_is_not_a_gone_holder() {
        // EC2's eventual consistency: unknown for a moment, then running.
        assert!(!gone_after(vec![None, Some("running")]));
        assert!(!gone_after(vec![None, Some("stopped")]));
        // Unknown on both looks, or terminated: gone.
        assert!(gone_after(vec![None, None]));
        assert!(gone_after(vec![Some("terminated")]));
        assert!(gone_after(vec![None, Some("terminated")]));
        assert!(!gone_after(vec![Some("running")]));
    }

    #[test]
    fn a_node_of_another_cluster_is_refused_with_exit_81() {
        assert!(check_cluster_id(Some("a"), Some("a"), "m").is_ok());
        // Unknown on either side (an old marker, a sealed node): nothing to compare.
        assert!(check_cluster_id(None, Some("a"), "m").is_ok());
        assert!(check_cluster_id(Some("a"), None, "m").is_ok());
        let e = check_cluster_id(Some("b"), Some("a"), "s3://x/marker").unwrap_err();
        assert_eq!(e.exit_code(), 81);
        let text = e.to_string();
        assert!(
            text.contains("cluster b")
                && text.contains("records cluster a")
                && text.contains("s3://x/marker"),
            "{text}"
        );
    }
}
