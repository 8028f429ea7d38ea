//! A raft store that joined a cluster and never received its data.
//!
//! A joining server first writes the leader's raft configuration to its log store, then
//! waits for the leader's data (the barrier, the seal configuration). Killed in between, it
//! keeps a store with raft state and nothing else: on every later start it answers "not
//! initialized" and its `retry_join` fails with "cluster already has state". It never joins
//! again by itself.
//!
//! The agent cannot read the raft log store, so it judges by what it sees: a store that
//! was on disk before this boot started the server, whose server reports not initialized
//! for [`GRACE`] on end while a peer or the escrow marker says the cluster exists. A store
//! with no raft state joins in one `retry_join` round (2 s) when a leader answers, and one
//! that reports not initialized holds no cluster's data (no seal configuration, no
//! keyring): moving it aside loses nothing. A store whose server reports initialized is
//! never touched here.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::vault_api::Health;
use std::time::{Duration, Instant};

/// How long a store that predates the server's start may report not initialized, with
/// the cluster up elsewhere, before it is judged stale: five `retry_join` rounds.
pub const GRACE: Duration = Duration::from_secs(10);

/// Watches the local health answers of one boot.
pub struct Watch {
    armed: bool,
    since: Option<Instant>,
}

impl Watch {
    /// `store_predates_start`: the raft store was on disk before the server started.
    pub fn new(store_predates_start: bool) -> Watch {
        Watch {
            armed: store_predates_start,
            since: None,
        }
    }

    /// Feeds one answer (`None`: no answer); true once the store is judged stale.
    pub fn stuck(&mut self, health: Option<&Health>, cluster_exists: bool) -> bool {
        self.stuck_at(health, cluster_exists, Instant::now())
    }

    fn stuck_at(&mut self, health: Option<&Health>, cluster_exists: bool, now: Instant) -> bool {
        if !self.armed {
            return false;
        }
        match health {
            Some(Health::Uninitialized) if cluster_exists => {
                let since = *self.since.get_or_insert(now);
                now.duration_since(since) >= GRACE
            }
            // No answer says nothing either way; anything else ends the watch.
            None => false,
            Some(Health::Uninitialized) => {
                self.since = None;
                false
            }
            Some(_) => {
                self.armed = false;
                false
            }
        }
    }
}

/// Stops the server, moves the store aside (kept, not deleted) and forgets the membership
/// record; returns the error this boot exits with, so that systemd starts it again on an
/// empty store, which joins afresh.
pub async fn set_aside(cfg: &Config) -> Result<Error> {
    let state_dir = &cfg.agent.state_dir;
    crate::launcher::stop_server(&cfg.vault, state_dir).await?;
    let moved = crate::raft_store::move_aside(&cfg.vault.data_dir)?;
    crate::member::forget(state_dir)?;
    tracing::warn!(
        moved_to = %moved.display(),
        grace_secs = GRACE.as_secs(),
        "this node's raft store joined the cluster but never received its data (its server reports not initialized while the cluster exists, and retry_join cannot bootstrap over the store's raft state): the store was moved aside (kept, not deleted); the next start joins again"
    );
    Ok(Error::Init {
        message: format!(
            "the raft store joined the cluster but never received its data; it was moved aside to {} and this boot exits so that the next one joins on an empty store",
            moved.display()
        ),
        retriable: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_store_that_predates_the_start_and_stays_uninitialized_is_stale() {
        let t0 = Instant::now();
        let later = t0 + GRACE;
        let un = Some(&Health::Uninitialized);

        // A store the server made at this start is never judged.
        let mut w = Watch::new(false);
        assert!(!w.stuck_at(un, true, t0));
        assert!(!w.stuck_at(un, true, later));

        // Predating, uninitialized, the cluster up elsewhere, for the whole grace: stale.
        let mut w = Watch::new(true);
        assert!(!w.stuck_at(un, true, t0));
        assert!(!w.stuck_at(None, true, t0 + GRACE / 2));
        assert!(w.stuck_at(un, true, later));

        // While nobody says the cluster exists, the clock starts again.
        let mut w = Watch::new(true);
        assert!(!w.stuck_at(un, true, t0));
        assert!(!w.stuck_at(un, false, t0 + GRACE / 2));
        assert!(!w.stuck_at(un, true, later));
        assert!(w.stuck_at(un, true, later + GRACE));

        // Once the server reports anything else (it got its data), never again.
        let mut w = Watch::new(true);
        assert!(!w.stuck_at(un, true, t0));
        assert!(!w.stuck_at(Some(&Health::Sealed), true, t0 + GRACE / 2));
        assert!(!w.stuck_at(un, true, later));
        assert!(!w.stuck_at(un, true, later + GRACE));
    }
}
