//! `vault-bootstrap status`: one JSON document with what this node knows about itself and
//! its cluster: instance facts, peers seen, local health, raft role and voters (with
//! `VAULT_TOKEN`), escrow state. Reads only; prints no secret.

use crate::aws::ec2::Ec2Api;
use crate::aws::s3::SdkS3;
use crate::config::Config;
use crate::error::{exit, Error, Result};
use crate::escrow::{self, Layout};
use crate::secret::Secret;
use crate::vault_api::Health;
use crate::{init, node, tls};
use serde_json::{json, Value};
use std::io::Write;
use std::time::Duration;

pub async fn run(cfg: &Config) -> Result<i32> {
    let n = node::current(cfg, node::identity(cfg).await?).await?;
    let deadline = Duration::from_secs(cfg.agent.aws_timeout_secs);
    let layout = Layout::new(cfg, &n.tag_value);
    let s3 = SdkS3::new(&n.sdk);
    let marker = escrow::read_marker(&s3, &layout, deadline)
        .await
        .ok()
        .flatten();
    let post_init = match (
        &marker,
        init::post_init_record(&s3, &layout, deadline).await,
    ) {
        (_, Ok(Some(p))) => json!({"state": "done", "root_revoked": p.root_revoked}),
        (Some(m), Ok(None)) => {
            json!({"state": "UNFINISHED", "initialized_by": m.instance_id, "why": "audit device, autopilot and root-token revocation are not recorded done; they resume at the initializer's next boot, whatever its role, or with `escrow finish` if it is gone"})
        }
        (None, Ok(None)) => json!({"state": "not initialized"}),
        (_, Err(e)) => json!({"state": format!("unknown: {e}")}),
    };
    let member = crate::member::read(&cfg.agent.state_dir).ok().flatten();

    let ca = std::fs::read(tls::paths(&cfg.vault.tls_dir).2).ok();
    let mut initialized = None;
    let (health, raft) = match &ca {
        None => (
            json!("unknown: no CA in vault.tls_dir (boot has not run)"),
            Value::Null,
        ),
        Some(ca) => {
            let local = crate::api_clients::local_any_source(cfg, &n.facts, ca)?;
            let answer = local.health().await;
            let health = match &answer {
                Ok(h) => json!(h.to_string()),
                Err(e) => json!(format!("not answering: {e}")),
            };
            if let Ok(h @ (Health::Active | Health::Standby | Health::PerfStandby)) = answer {
                initialized = Some(h);
            }
            let raft = match std::env::var("VAULT_TOKEN").ok().filter(|t| !t.is_empty()) {
                None => json!("set VAULT_TOKEN to read the raft configuration"),
                Some(t) => {
                    let token = Secret::new(t);
                    match local
                        .call(
                            reqwest::Method::GET,
                            "sys/storage/raft/configuration",
                            Some(&token),
                            None,
                        )
                        .await
                    {
                        Ok((200, body)) => match crate::raft_config::Membership::parse(&body) {
                            Some(m) => json!({
                                "role": m.role(&n.facts.instance_id),
                                "voters": m.voters,
                                "servers": m.servers.len(),
                            }),
                            None => json!(
                                "HTTP 200, but not a server list whose every entry has a node_id"
                            ),
                        },
                        Ok((s, body)) => json!(format!("HTTP {s}: {}", body["errors"])),
                        Err(e) => json!(e.to_string()),
                    }
                }
            };
            (health, raft)
        }
    };
    let pending = init::has_pending(&cfg.agent.state_dir);
    // Which generation of the recovery keys is in force, and any rotation left unfinished.
    let generations = match &marker {
        Some(_) => match escrow::generation::scan(&s3, &layout, deadline).await {
            Ok(g) => json!({
                "current": g.current(),
                // A rotation that stopped: before its key came into force, or after.
                "unfinished_rotation": g.open_attempt().or(g.unfinished()),
                "superseded": g.superseded,
                "abandoned": g.abandoned,
            }),
            Err(e) => json!(format!("unknown: {e}")),
        },
        None => Value::Null,
    };
    // Without a marker, who holds the init lock and what EC2 says of it: a holder that is
    // gone never finishes the escrow.
    let holder = match &marker {
        Some(_) => None,
        None => init::lock::holder(&s3, &layout, deadline)
            .await
            .ok()
            .flatten(),
    };
    let holder_state = match &holder {
        Some(h) => Some(
            crate::aws::ec2::SdkEc2::new(&n.sdk)
                .instance_state(&h.instance_id)
                .await
                .map(|s| s.unwrap_or_else(|| "not listed".into()))
                .unwrap_or_else(|e| format!("unknown: {e}")),
        ),
        None => None,
    };
    let holder_gone = matches!(holder_state.as_deref(), Some("terminated" | "not listed"));
    // An initialized cluster with no marker and no pending file here: on the lock holder,
    // keys that were never escrowed (boot exits 80 then); elsewhere, maybe still in flight,
    // unless the holder is gone.
    let keys = match (&marker, initialized, pending) {
        (Some(_), _, _) => json!("escrowed"),
        (None, _, true) => json!("in the local pending file: boot resumes the escrow"),
        (None, Some(_), false) if holder_gone => json!(format!(
            "NOT ESCROWED: the initializer {} is {} and never finished the escrow; finish it from {} with `vault-bootstrap escrow finish` (operator role, on the active node)",
            holder.as_ref().map(|h| h.instance_id.as_str()).unwrap_or("?"),
            holder_state.as_deref().unwrap_or("?"),
            holder.as_ref().map(|h| layout.url(&escrow::pending::copy_key(&layout, &h.instance_id))).unwrap_or_default()
        )),
        (None, Some(_), false) => json!("NOT ESCROWED: the cluster is initialized and no marker exists (see the lock holder's boot log; exit 80 there means the keys are lost)"),
        (None, None, false) => json!("none yet"),
    };
    let doc = json!({
        "instance": {
            "id": n.facts.instance_id,
            "region": n.facts.region,
            "availability_zone": n.facts.availability_zone,
            "local_ipv4": n.facts.local_ipv4.to_string(),
        },
        "cluster": n.tag_value,
        "peers": n.peers.iter().map(|p| json!({"instance_id": p.instance_id, "ip": p.ip.to_string(), "self": p.is_self})).collect::<Vec<_>>(),
        "health": health,
        "tls_days_left": cert_days_left(&cfg.vault.tls_dir),
        "raft": raft,
        "escrow": {
            "location": layout.url(&layout.prefix),
            "marker": marker.as_ref().map(|m| json!({"initialized_by": m.instance_id, "recovery_shares": m.recovery_shares, "recovery_threshold": m.recovery_threshold, "pgp": m.pgp})),
            "local_pending_init": pending,
            "local_init_attempt": init::attempt::path(&cfg.agent.state_dir).exists(),
            "keys": keys,
            "init_lock_holder": holder.as_ref().map(|h| json!({"instance_id": h.instance_id, "ec2_state": holder_state})),
            "marker_cluster_id": marker.as_ref().and_then(|m| m.cluster_id.clone()),
            "generation": generations,
        },
        "post_init": post_init,
        "member_record": member.map(|m| json!({"cluster": m.cluster, "cluster_id": m.cluster_id, "post_init_done": m.post_init_done, "recorded_unix": m.recorded_unix})),
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| Error::Internal(e.to_string()))?;
    writeln!(std::io::stdout(), "{text}").map_err(|e| Error::Internal(format!("stdout: {e}")))?;
    Ok(exit::OK)
}

/// Days until the installed certificate expires (what `refresh-tls` warns about).
fn cert_days_left(tls_dir: &std::path::Path) -> Option<i64> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(tls::paths(tls_dir).0).ok()?;
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let now = crate::clock::now_unix() as i64;
    Some((cert.validity().not_after.timestamp() - now).div_euclid(86_400))
}
