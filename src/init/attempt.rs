//! A `sys/init` call in flight, on this node's disk: `<state_dir>/init-attempt.json`.
//!
//! Written (durably) right before the lock winner calls `sys/init`, and removed once the
//! answer is sealed to the pending file or escrowed. Writing it is also the proof that the
//! state directory takes a write before any key exists: if it cannot, there is no init.
//!
//! An attempt found on a later boot, with no pending file, means the answer was lost (the
//! agent or the whole instance died, or the call failed). The server then holds either a
//! half-bootstrapped raft store ("cluster already has state" on every later start) or an
//! initialized cluster whose recovery keys and root token nobody ever received. Either way
//! nobody holds a key or a token for it, so nothing was ever written to it: [`recover`]
//! moves it aside (never deletes it) and the node, still the lock holder, inits again.
//! If any escrow item exists, some key did reach S3: then nothing is moved and the error
//! stays loud (exit 80) until an operator decides.
//!
//! Nor is anything moved when another node joined that store's cluster (a lost answer, not
//! a crash: `sys/init` committed and peers joined within seconds): such a peer answers
//! `sys/health` initialized, or the store's raft log names it ([`crate::raft_store::names_servers`]).
//! Its members come back from their own disks serving that cluster, so a second init here
//! would make two. The boot stops with exit 80 and the operator starts the cluster over
//! (docs/operations.md).

use crate::aws::s3::ObjectStore;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::escrow::{self, pending, Layout};
use crate::fsutil;
use crate::retry;
use crate::vault_api::{Health, VaultClient};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const FILE: &str = "init-attempt.json";

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// What the attempt file says (no secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attempt {
    pub instance_id: String,
    pub cluster: String,
    pub started_unix: u64,
}

/// Records the attempt; an error here means no `sys/init` call may follow.
pub fn begin(state_dir: &Path, instance_id: &str, cluster: &str) -> Result<()> {
    if escrow::fault_point("attempt-write") {
        return Err(Error::write(
            path(state_dir),
            "injected failure (VAULT_BOOTSTRAP_FAIL_AT)",
        ));
    }
    let attempt = Attempt {
        instance_id: instance_id.to_owned(),
        cluster: cluster.to_owned(),
        started_unix: crate::clock::now_unix(),
    };
    fsutil::write_record(state_dir, FILE, &attempt).map(|_| ())
}

/// Removes the attempt once its answer is durable elsewhere (pending file or escrow).
pub fn end(state_dir: &Path) -> Result<()> {
    fsutil::remove_durable(&path(state_dir))
}

pub fn read(state_dir: &Path) -> Result<Option<Attempt>> {
    let p = path(state_dir);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| Error::Escrow {
            message: format!(
                "{} is damaged ({e}): this node began a sys/init whose outcome is unknown; check the escrow in S3 and the server, then remove the file",
                p.display()
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Escrow {
            message: format!("cannot read {}: {e}", p.display()),
        }),
    }
}

/// What an attempt left behind, judged before the server starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Left {
    /// No attempt, or one whose answer the pending file holds: nothing to do here.
    Nothing,
    /// The escrow completed (its marker exists): only the record is stale.
    Finished,
    /// No key reached anyone: the raft store can go.
    Stranded(Attempt),
    /// Some escrow items exist without a marker: keys may be partly in S3.
    PartlyEscrowed(Vec<String>),
}

/// Decides what an attempt left (S3 reads only; a new node's boot may use the control plane).
pub async fn assess<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    state_dir: &Path,
    aws: Duration,
) -> Result<Left> {
    let Some(attempt) = read(state_dir)? else {
        return Ok(Left::Nothing);
    };
    if pending::path(state_dir).exists() {
        return Ok(Left::Nothing);
    }
    if escrow::read_marker(s3, layout, aws).await?.is_some() {
        return Ok(Left::Finished);
    }
    let keys = retry::retry("list the escrow", aws, || {
        s3.list(&layout.bucket, &layout.prefix)
    })
    .await?;
    let items: Vec<String> = keys
        .into_iter()
        .filter(|k| k.ends_with(".enc"))
        .filter(|k| {
            let name = k.trim_start_matches(layout.prefix.as_str());
            name.starts_with("recovery-key-") || name.starts_with(Layout::ROOT_ITEM)
        })
        .collect();
    if items.is_empty() {
        Ok(Left::Stranded(attempt))
    } else {
        Ok(Left::PartlyEscrowed(items))
    }
}

/// Another node of the cluster, as discovery saw it.
pub struct Peer {
    pub instance_id: String,
    pub api: VaultClient,
}

/// What says that another node joined the cluster this store holds (empty: nothing does).
pub async fn joined_by(data_dir: &Path, peers: &[Peer]) -> Result<Vec<String>> {
    let mut evidence = Vec::new();
    for p in peers {
        if let Ok(h) = p.api.health().await {
            if h.is_known() && h != Health::Uninitialized {
                evidence.push(format!(
                    "{} answers sys/health initialized ({h})",
                    p.instance_id
                ));
            }
        }
    }
    let ids: Vec<String> = peers.iter().map(|p| p.instance_id.clone()).collect();
    let named = crate::raft_store::names_servers(data_dir, &ids)
        .map_err(|e| Error::write(data_dir, format!("read the raft store: {e}")))?;
    evidence.extend(
        named
            .into_iter()
            .map(|id| format!("{id} is in this node's raft configuration")),
    );
    Ok(evidence)
}

/// Acts on [`assess`]: before the boot writes files or starts the server, so that a store
/// nobody holds keys for is moved aside while the server is stopped.
pub async fn recover<S: ObjectStore>(
    cfg: &Config,
    s3: &S,
    layout: &Layout,
    peers: &[Peer],
) -> Result<()> {
    let state_dir = &cfg.agent.state_dir;
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    match assess(s3, layout, state_dir, aws).await? {
        Left::Nothing => Ok(()),
        Left::Finished => {
            tracing::info!(
                "the escrow of this node's earlier init completed; dropping its attempt record"
            );
            end(state_dir)
        }
        Left::PartlyEscrowed(items) => Err(Error::Escrow {
            message: format!(
                "this node began a sys/init (record {}) whose answer was lost, and {} escrow item(s) exist under {} without a marker: some keys may be in S3, the rest nowhere. Nothing was moved. Run `vault-bootstrap escrow verify` as an operator, decide whether the cluster is usable, then remove the record (or the raft data) by hand",
                path(state_dir).display(),
                items.len(),
                layout.url(&layout.prefix)
            ),
        }),
        Left::Stranded(a) => {
            let joined = joined_by(&cfg.vault.data_dir, peers).await?;
            if !joined.is_empty() {
                return Err(Error::Escrow {
                    message: format!(
                        "this node began a sys/init (record {}) whose answer was lost, and other nodes joined the cluster it made: {}. Nobody holds that cluster's recovery keys or root token, and its members come back from their own disks serving it, so this node neither moves its store aside nor initializes again (that would make a second cluster). Start the cluster over by hand: docs/operations.md \"A lost init answer that peers joined\"",
                        path(state_dir).display(),
                        joined.join("; ")
                    ),
                });
            }
            crate::launcher::stop_server(&cfg.vault, state_dir).await?;
            let moved = if crate::raft_store::present(&cfg.vault.data_dir)
                || cfg.vault.data_dir.exists()
            {
                Some(crate::raft_store::move_aside(&cfg.vault.data_dir)?)
            } else {
                None
            };
            tracing::warn!(
                started_unix = a.started_unix,
                moved_to = %moved.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(no data dir)".into()),
                "this node's earlier sys/init never returned its keys (crash or lost answer): its raft store, which nobody holds a key or token for, was moved aside (kept, not deleted); initializing again"
            );
            crate::member::forget(state_dir)?;
            end(state_dir)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::escrow::fake::FakeS3;

    fn layout() -> Layout {
        Layout {
            bucket: "esc".into(),
            prefix: "vb/prod/".into(),
            kms_key_id: "k".into(),
            cluster: "prod".into(),
            generation: crate::escrow::generation::FIRST,
        }
    }
    const D: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn an_attempt_is_judged_by_what_survived_it() {
        let d = tempfile::tempdir().unwrap();
        let s3 = FakeS3::default();
        let l = layout();
        assert_eq!(assess(&s3, &l, d.path(), D).await.unwrap(), Left::Nothing);

        begin(d.path(), "i-1", "prod").unwrap();
        assert!(matches!(
            assess(&s3, &l, d.path(), D).await.unwrap(),
            Left::Stranded(a) if a.instance_id == "i-1"
        ));

        // The lock lives under the same prefix and is no key.
        s3.objects.lock().unwrap().insert(
            ("esc".into(), "vb/prod/init-lock/00000000.json".into()),
            b"{}".to_vec(),
        );
        assert!(matches!(
            assess(&s3, &l, d.path(), D).await.unwrap(),
            Left::Stranded(_)
        ));

        s3.objects.lock().unwrap().insert(
            ("esc".into(), "vb/prod/recovery-key-2.enc".into()),
            b"ct".to_vec(),
        );
        assert_eq!(
            assess(&s3, &l, d.path(), D).await.unwrap(),
            Left::PartlyEscrowed(vec!["vb/prod/recovery-key-2.enc".into()])
        );

        s3.objects
            .lock()
            .unwrap()
            .insert(("esc".into(), l.marker()), b"{}".to_vec());
        // A marker this agent did not write is an error, not "finished".
        assert!(assess(&s3, &l, d.path(), D).await.is_err());

        std::fs::write(pending::path(d.path()), "{}").unwrap();
        assert_eq!(assess(&s3, &l, d.path(), D).await.unwrap(), Left::Nothing);

        end(d.path()).unwrap();
        assert!(read(d.path()).unwrap().is_none());
    }
}
