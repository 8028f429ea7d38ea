//! The boot path (`vault-bootstrap boot`), top to bottom, in the product's order.
//!
//! 1. config (loaded by the caller)  2. IMDS facts, warm-pool wait.
//!
//! A member that was healthy then starts its server from its own disk first ([`from_disk`],
//! static stability), and refreshes peers and TLS afterwards. Every other node goes on:
//!
//! 3. peers  4. TLS from S3, checked, written  5. vault.hcl rendered and written on change
//!    (after an interrupted init of this node's is cleaned up, see `init::attempt`)
//! 6. server started; wait until `sys/health` answers; init or join; the membership is
//!    recorded on disk ([`crate::member`]) for the next boot.
//!
//! With the exec launcher the agent then stays with the server and exits with it.

pub mod from_disk;

use crate::aws::ec2::SdkEc2;
use crate::aws::kms::SdkKms;
use crate::aws::s3::SdkS3;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::fsutil::{self, FileSpec, Outcome, Owner};
use crate::launcher::{self, Running};
use crate::node_lock::{self, NodeLock};
use crate::vault_api::{self, Liveness, VaultClient};
use crate::{api_clients, init, lifecycle, member, node, render, tls};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};
use tracing::Instrument;

/// The uid/gid of `vault.user`, which owns what the server reads.
pub fn vault_owner(cfg: &Config) -> Result<Owner> {
    let (uid, gid) = fsutil::lookup_user(&cfg.vault.user).ok_or_else(|| Error::ConfigInvalid {
        path: "config".into(),
        key: "vault.user".into(),
        message: format!(
            "no system user {:?} exists; create it (vault-bootstrap install does) or name another",
            cfg.vault.user
        ),
    })?;
    Ok(Owner::new(uid, gid))
}

pub async fn run(cfg: &Config) -> Result<i32> {
    let started = Instant::now();
    // Preflight: what the operator can fix locally fails before any network call or write.
    launcher::check_binary(&cfg.vault.binary)?;
    let owner = vault_owner(cfg)?;
    if cfg.init.init_timeout_secs.is_some() {
        tracing::warn!("init.init_timeout_secs is no longer used and can be removed from config.toml: sys/init has no client timeout (a timed-out call would lose the keys the server goes on to commit)");
    }

    let instance = node::instance(cfg).await?;
    // Static stability: a member comes back from what is on its disk, not from the control
    // plane. Everything below is for new nodes (and members whose files are gone).
    if let Some(record) = member::last_known_good(cfg, &instance.facts)? {
        return from_disk::run(cfg, instance, record, owner, started).await;
    }
    let node = node::identify_instance(cfg, instance).await?;
    lifecycle::launch::keep_alive_while_keys_pending(
        cfg,
        &node.tag_value,
        &node.facts.instance_id,
        &node.sdk,
    );
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "phase done: imds+discovery"
    );
    let (material, _) = fetch_tls(cfg, &node.sdk, node.facts.local_ipv4).await?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "phase done: tls"
    );
    let flavor = launcher::resolve_flavor(&cfg.vault).await;
    let hcl = render_config(cfg, &node, flavor);
    // Everything above only read; from here on this node changes. A `rejoin` or
    // `refresh-tls` running now would interleave with us: wait for it (bounded).
    let lock = node_lock::acquire(&cfg.agent.state_dir, "boot", node_lock::DEFAULT_WAIT).await?;
    if cfg.init.enabled {
        // Before the server starts on it: a store from this node's own interrupted init,
        // which nobody holds keys for, is moved aside here.
        let layout = crate::escrow::Layout::new(cfg, &node.tag_value);
        let peers = node
            .peers
            .iter()
            .filter(|p| !p.is_self)
            .map(|p| {
                Ok(init::attempt::Peer {
                    instance_id: p.instance_id.clone(),
                    api: api_clients::peer(cfg, &material.ca_pem, p.ip)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        init::attempt::recover(cfg, &SdkS3::new(&node.sdk), &layout, &peers).await?;
    }
    let (tls_changed, config_changed) = write_files(cfg, &material, &hcl, owner)?;
    tracing::info!(
        path = %cfg.vault.config_file.display(),
        tls_changed,
        changed = config_changed,
        peer_count = node.peers.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "phase done: render"
    );
    let launched = launch(cfg, &node, config_changed || tls_changed, Some(lock)).await?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        store_predates_start = launched.store_predates_start,
        "phase done: server started"
    );
    serve(cfg, &node, &material, owner, flavor, launched, started).await
}

/// The started server and the node lock held until it is settled (`None`: no lock taken).
pub(crate) struct Launched {
    pub running: Running,
    pub lock: Option<NodeLock>,
    /// The raft store was on disk before the server started (see `init::stale_join`).
    pub store_predates_start: bool,
}

/// Step 3: fetch the TLS objects and check them for the node at `ip`; nothing is written
/// here. Also `rejoin` and `refresh-tls`.
pub(crate) async fn fetch_tls(
    cfg: &Config,
    sdk: &aws_config::SdkConfig,
    ip: IpAddr,
) -> Result<(tls::Material, tls::Checked)> {
    let s3 = SdkS3::new(sdk);
    let m = tls::fetch(
        &s3,
        &cfg.tls,
        Duration::from_secs(cfg.agent.aws_timeout_secs),
    )
    .instrument(tracing::info_span!("tls"))
    .await?;
    let checked = tls::check(
        &m,
        &tls::Sources::from_config(&cfg.tls),
        &tls::Expect {
            ip,
            server_name: cfg.tls.server_name.as_deref(),
        },
        SystemTime::now(),
    )?;
    let days_left = tls::days_left(&checked, SystemTime::now());
    if days_left < i64::from(cfg.tls.expiry_warning_days) {
        tracing::warn!(serial = %checked.serial_hex, days_left, "the TLS certificate expires soon: upload a renewed one to the resources bucket");
    } else {
        tracing::info!(serial = %checked.serial_hex, days_left, "TLS material checked");
    }
    Ok((m, checked))
}

/// Step 4's input: the configuration file's text.
pub(crate) fn render_config(
    cfg: &Config,
    node: &node::Node,
    flavor: crate::config::Flavor,
) -> String {
    render::render(&render::Input {
        config: cfg,
        flavor,
        facts: &node.facts,
        peers: &node.peers,
    })
}

/// Steps 3-4 on disk: TLS files, directories, vault.hcl. Returns (tls changed, config changed).
pub(crate) fn write_files(
    cfg: &Config,
    material: &tls::Material,
    hcl: &str,
    owner: Owner,
) -> Result<(bool, bool)> {
    let tls_changed = tls::write(material, &cfg.vault.tls_dir, owner)?;
    Ok((tls_changed, write_config(cfg, hcl, owner)?))
}

/// Step 4 on disk: the directories the server writes into, and vault.hcl (true: changed).
pub(crate) fn write_config(cfg: &Config, hcl: &str, owner: Owner) -> Result<bool> {
    // The server must be able to create its raft directory's contents, and nobody else
    // may read them.
    fsutil::ensure_dir(&cfg.vault.data_dir, 0o700, owner)?;
    // The server writes its audit log as the Vault user; the directory must exist first
    // (OpenBao creates its declared device at activation and fails without it).
    if let Some(dir) = cfg.init.audit_file_path.parent() {
        fsutil::ensure_dir(dir, 0o750, owner)?;
    }
    let config_changed = fsutil::write_atomic(&FileSpec {
        path: &cfg.vault.config_file,
        contents: hcl.as_bytes(),
        // root:vault 0640: the server reads it, only root changes it.
        mode: 0o640,
        owner: Owner {
            uid: None,
            gid: owner.gid,
        },
    })? == Outcome::Written;
    Ok(config_changed)
}

/// Step 5 with what settling needs: whether the raft store predates this start, the
/// started server, and the node lock held until it settles.
pub(crate) async fn launch(
    cfg: &Config,
    node: &node::Node,
    changed: bool,
    lock: Option<NodeLock>,
) -> Result<Launched> {
    let store_predates_start = crate::raft_store::present(&cfg.vault.data_dir);
    let running = start(cfg, node, changed).await?;
    Ok(Launched {
        running,
        lock,
        store_predates_start,
    })
}

/// Step 5: start the server (recording its PID for the exec launcher).
async fn start(cfg: &Config, node: &node::Node, changed: bool) -> Result<Running> {
    let bind = render::bind_ip(cfg, &node.facts);
    let running = launcher::start(&cfg.vault, bind, changed).await?;
    if let Running::Child(child) = &running {
        fsutil::ensure_dir(&cfg.agent.state_dir, 0o700, Owner::default())?;
        fsutil::write_atomic(&FileSpec {
            path: &cfg.agent.state_dir.join(launcher::PID_FILE),
            contents: format!("{}\n", child.id().unwrap_or(0)).as_bytes(),
            mode: 0o644,
            owner: Owner::default(),
        })?;
    }
    Ok(running)
}

/// Step 6 and after: wait until the server answers, init or join, then answer the group
/// (reaping, the launch hook); with the exec launcher, then stay with the server and exit
/// with it.
pub(crate) async fn serve(
    cfg: &Config,
    node: &node::Node,
    material: &tls::Material,
    owner: Owner,
    flavor: crate::config::Flavor,
    launched: Launched,
    started: Instant,
) -> Result<i32> {
    let client = api_clients::local_any_source(cfg, &node.facts, &material.ca_pem)?;
    let ready = &Ready {
        node,
        local: &client,
        ca_pem: &material.ca_pem,
        owner,
        reloader: launcher::Reloader::of(&launched.running),
        flavor,
        store_predates_start: launched.store_predates_start,
    };
    let deadline = Duration::from_secs(cfg.vault.health_timeout_secs);
    let group = lifecycle_ctx(cfg, node, &material.ca_pem);
    settle(
        &client,
        deadline,
        launched,
        |health, untouched| async move {
            report(&health, started);
            if untouched && health == vault_api::Health::Sealed {
                // Auto-unseal never leaves a running server sealed: an operator sealed it
                // on purpose. Not ours to undo; a restart (or `rejoin`) unseals it.
                tracing::warn!("this node's server is running and sealed, by an operator: left sealed. Restart vault.service or run `vault-bootstrap rejoin` to unseal it");
                return Ok(None);
            }
            initialize_or_join(cfg, ready, started).await.map(Some)
        },
        |joined| answer_the_group(&group, joined),
    )
    .await
}

/// What the lifecycle steps after a settle need: this node, its peers' addresses, the CA.
pub(crate) fn lifecycle_ctx<'a>(
    cfg: &'a Config,
    node: &'a node::Node,
    ca_pem: &'a [u8],
) -> lifecycle::session::Ctx<'a> {
    lifecycle::session::Ctx {
        cfg,
        facts: &node.facts,
        tag_value: &node.tag_value,
        sdk: &node.sdk,
        ca: ca_pem,
        peers: node
            .peers
            .iter()
            .filter(|p| !p.is_self)
            .map(|p| p.ip)
            .collect(),
    }
}

/// The lifecycle steps after a settle (`None`: the node was left as an operator had it).
pub(crate) async fn answer_the_group(
    ctx: &lifecycle::session::Ctx<'_>,
    joined: Option<Joined>,
) -> Result<()> {
    match joined {
        Some(j) => lifecycle::after_settle(ctx, &j.vanished).await,
        None => Ok(()),
    }
}

/// Waits until the started server answers, then runs `then` (init or join, and whatever
/// the command adds; `untouched`: systemd found the unit running and left it). Then the node
/// is settled: the node lock is released (a `rejoin` or `refresh-tls` may take over), and
/// `after` runs with what `then` returned: the lifecycle steps, which may wait for many
/// minutes and must not hold the lock. With the exec launcher the agent then stays with the
/// server and exits with it. A failure stops the exec launcher's server: never an orphan
/// behind a failed command (keys are escrowed or sealed in the pending file by then).
pub(crate) async fn settle<T, F, Fut, A, AFut>(
    client: &VaultClient,
    deadline: Duration,
    launched: Launched,
    then: F,
    after: A,
) -> Result<i32>
where
    F: FnOnce(vault_api::Health, bool) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
    A: FnOnce(T) -> AFut,
    AFut: std::future::Future<Output = Result<()>>,
{
    let Launched { running, lock, .. } = launched;
    match running {
        Running::Unit { unit, untouched } => {
            let health = vault_api::wait_answering(client, deadline, None).await?;
            let settled = match then(health, untouched).await {
                Ok(s) => s,
                Err(e @ Error::ForeignCluster { .. }) => {
                    stop_foreign(&unit).await;
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            drop(lock);
            after(settled).await?;
            Ok(crate::error::exit::OK)
        }
        Running::Child(mut child) => {
            let waited = async {
                let liveness = Some(&mut child as &mut dyn Liveness);
                let health = vault_api::wait_answering(client, deadline, liveness).await?;
                then(health, false).await
            }
            .await;
            let waited = match waited {
                Ok(settled) => {
                    drop(lock);
                    after(settled).await
                }
                Err(e) => Err(e),
            };
            match waited {
                // From now on we only supervise.
                Ok(()) => launcher::supervise(child).await,
                Err(e) => {
                    launcher::stop_child(&mut child, Duration::from_secs(5)).await;
                    Err(e)
                }
            }
        }
    }
}

/// Under systemd the server outlives the agent: left running, a node serving another
/// cluster's data would stay unsealed and answer `sys/health` (200 or 429), and a load
/// balancer would keep routing clients to it. So it is stopped before the agent exits 81
/// (and the boot unit does not restart on 81: its store is not fixed by retrying).
async fn stop_foreign(unit: &str) {
    match launcher::systemctl(&["stop", unit]).await {
        Ok(()) => tracing::error!(
            unit,
            "stopped the server: it serves another cluster's data than the escrow marker records"
        ),
        Err(e) => tracing::error!(
            unit,
            "could not stop the server ({e}): it still serves another cluster's data; stop it by hand"
        ),
    }
}

/// What step 6 needs from steps 1-5.
pub(crate) struct Ready<'a> {
    pub node: &'a node::Node,
    pub local: &'a VaultClient,
    pub ca_pem: &'a [u8],
    pub owner: Owner,
    pub reloader: launcher::Reloader,
    pub flavor: crate::config::Flavor,
    pub store_predates_start: bool,
}

/// What a settled node tells the lifecycle steps ([`answer_the_group`]).
pub(crate) struct Joined {
    /// Peers this node knew when it last settled that EC2 no longer lists as pending or
    /// running: the only evidence worth a reaping pass at boot.
    pub vanished: Vec<String>,
}

/// Step 6: init on exactly one node of a new cluster (with escrow), join everywhere else;
/// then record the membership: first as soon as the server is an unsealed member, before
/// any S3 read (a reboot from then on comes back from disk), then again once the cluster is
/// checked against the escrow marker.
pub(crate) async fn initialize_or_join(
    cfg: &Config,
    r: &Ready<'_>,
    started: Instant,
) -> Result<Joined> {
    let (node, ca_pem) = (r.node, r.ca_pem);
    let peers = node
        .peers
        .iter()
        .filter(|p| !p.is_self)
        .map(|p| api_clients::peer(cfg, ca_pem, p.ip))
        .collect::<Result<Vec<_>>>()?;
    let s3 = SdkS3::new(&node.sdk);
    let kms = SdkKms::new(&node.sdk);
    let ec2 = SdkEc2::new(&node.sdk);
    let me = init::Me {
        instance_id: &node.facts.instance_id,
        facts: &node.facts,
        cluster: &node.tag_value,
        vault_owner: r.owner,
        flavor: r.flavor,
        store_predates_start: r.store_predates_start,
    };
    let deps = init::Deps {
        s3: &s3,
        kms: &kms,
        ec2: &ec2,
        local: r.local,
        peers: &peers,
        reloader: &r.reloader,
    };
    let unsealed = init::become_member(cfg, &me, &deps)
        .instrument(tracing::info_span!("init"))
        .await?;
    // Read before the record is written again below.
    let before = member::read(&cfg.agent.state_dir).ok().flatten();
    let vanished: Vec<String> = before
        .as_ref()
        .map(|b| {
            b.peers
                .iter()
                .map(|p| p.instance_id.clone())
                .filter(|id| !node.peers.iter().any(|p| &p.instance_id == id))
                .collect()
        })
        .unwrap_or_default();
    let record = |cluster_id: Option<String>, post_init_done: bool| {
        member::write(
            &cfg.agent.state_dir,
            &member::Member::new(
                &node.facts,
                &node.tag_value,
                cluster_id,
                &node.peers,
                post_init_done,
            ),
        )
    };
    // What the next boot needs to come back without EC2 or S3, before anything else can
    // fail. Post-init is not known yet: what this node's init knows, or the last record's.
    let known_done = before
        .as_ref()
        .is_some_and(|b| b.post_init_done && b.cluster_id == unsealed.cluster_id);
    record(unsealed.cluster_id.clone(), known_done)?;
    tracing::info!(
        cluster_id = unsealed.cluster_id.as_deref().unwrap_or("?"),
        record = %member::path(&cfg.agent.state_dir).display(),
        "unsealed cluster member: membership recorded; checking it against the escrow marker"
    );
    let settled = match init::confirm(cfg, &me, &deps, unsealed)
        .instrument(tracing::info_span!("init"))
        .await
    {
        Ok(s) => s,
        Err(e @ Error::ForeignCluster { .. }) => {
            // Another cluster's data must not come back from disk on the next boot.
            member::forget(&cfg.agent.state_dir)?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    record(settled.cluster_id.clone(), settled.post_init_done)?;
    tracing::info!(
        outcome = ?settled.outcome,
        cluster_id = settled.cluster_id.as_deref().unwrap_or("?"),
        post_init_done = settled.post_init_done,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "node ready: unsealed cluster member"
    );
    Ok(Joined { vanished })
}

pub(crate) fn report(health: &vault_api::Health, started: Instant) {
    tracing::info!(
        state = %health,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "boot complete: the server answers sys/health"
    );
}
