//! Rolling upgrades and replacements that never cost quorum (docs/operations.md "Rolling
//! upgrades"): the ASG lifecycle hooks, graceful leave, and evidence-based reaping.
//!
//! - [`launch`]: `boot` completes the launch hook with CONTINUE only once this node is a
//!   voter autopilot calls healthy (caught up), with heartbeats while it waits; ABANDON past
//!   `lifecycle.launch_timeout_secs`, so the group replaces the instance and an instance
//!   refresh stops.
//! - [`leave`]: when IMDS says the instance's target state is `Terminated`, `watch` steps
//!   down if active, removes this node from raft once what remains keeps quorum, stops the
//!   server and completes the terminate hook.
//! - [`reap`]: the active node removes raft peers whose instances EC2 reports terminated
//!   (or no longer knows, twice in a row), while what remains keeps quorum. Autopilot's
//!   dead-server cleanup is off unless `init.cleanup_dead_servers` turns it on.
//! - [`ticket`]: every removal (a leave, a reaping) first takes a write-once ticket named by
//!   the raft configuration it was decided on, so two removals are never decided on the
//!   same configuration.
//! - [`watch`]: the long-running unit (`vault-bootstrap watch`) that runs the last two.
//!
//! The Vault calls use the lifecycle node credential ([`ROLE`]): autopilot state, raft
//! configuration, step-down and remove-peer, nothing else; never a recovery key.

pub mod autopilot;
pub mod launch;
pub mod leave;
pub mod reap;
pub mod restart;
pub mod session;
pub mod ticket;
pub mod watch;

use crate::approle;
use crate::aws::kms::Kms;
use crate::aws::s3::ObjectStore;
use crate::config::{Config, ASG_TAG};
use crate::escrow::Layout;
use crate::secret::Secret;
use crate::vault_api::VaultClient;
use std::time::Duration;

/// Policy and AppRole role name (stable: operators revoke by them).
pub const NAME: &str = "vault-bootstrap-lifecycle";
/// What a node needs to join and leave safely: read autopilot's view and the raft
/// configuration, hand leadership over, remove a server. No secret engine, no sys/init, no
/// snapshot: a leaked token can shrink the cluster by removing peers (each stays out until
/// an operator runs `rejoin` on it), never read data.
pub const POLICY_HCL: &str = r#"# vault-bootstrap lifecycle: join and leave without losing quorum, nothing else.
path "sys/storage/raft/autopilot/state" {
  capabilities = ["read"]
}
path "sys/storage/raft/configuration" {
  capabilities = ["read"]
}
path "sys/storage/raft/remove-peer" {
  capabilities = ["update"]
}
path "sys/step-down" {
  capabilities = ["update", "sudo"]
}
# Its tokens carry no default policy: ending its own login early is granted here.
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
"#;
/// A lifecycle login serves one reaping pass, or one wait (re-made every 5 minutes, see
/// [`session::RELOGIN_AFTER`]); a copied token must not last.
pub const TOKEN_TTL: &str = "10m";

/// The lifecycle node credential (see [`crate::approle`]).
pub const ROLE: approle::Role = approle::Role {
    name: NAME,
    label: "lifecycle",
    policy_hcl: POLICY_HCL,
    item: Layout::LIFECYCLE_APPROLE_ITEM,
    token_ttl: TOKEN_TTL,
    // Exactly the paths above: revoke-self is one of them.
    default_policy: false,
    docs: "docs/operations.md \"Rolling upgrades\"",
    bound_setting: "lifecycle.bound_cidrs",
};

/// Creates the lifecycle policy and AppRole in post-init and escrows its credentials
/// (once), bound to `lifecycle.bound_cidrs`, else `snapshot.bound_cidrs`, else the
/// addresses of `local` and `peers`.
pub async fn provision<S: ObjectStore, K: Kms>(
    cfg: &Config,
    server: &VaultClient,
    nodes: &[std::net::IpAddr],
    root: &Secret,
    s3: &S,
    kms: &K,
    layout: &Layout,
) -> crate::error::Result<()> {
    let configured = if cfg.lifecycle.bound_cidrs.is_empty() {
        &cfg.snapshot.bound_cidrs
    } else {
        &cfg.lifecycle.bound_cidrs
    };
    let cidrs = approle::bound_cidrs(configured, nodes.iter().copied());
    let aws = Duration::from_secs(cfg.agent.aws_timeout_secs);
    approle::provision(&ROLE, &cidrs, server, root, s3, kms, layout, aws).await
}

/// What `boot` does for the group once the node is settled (its node lock released):
/// - a voter whose instance is gone only counts against quorum: with `vanished` peers (gone
///   from EC2's list since the last settle), the active node reaps now rather than at the
///   watch unit's next interval (one look: terminated only);
/// - then the launch hook: the group may count this instance InService only once it is a
///   healthy voter.
///
/// Only an abandoned launch (exit 82) fails the boot: the group is replacing this instance.
/// Any other failure leaves a serving member serving; the hook then ends with its default
/// result at its timeout (on ABANDON the group terminates the instance and the watch unit
/// leaves the cluster gracefully).
pub async fn after_settle(ctx: &session::Ctx<'_>, vanished: &[String]) -> crate::error::Result<()> {
    if ctx.cfg.lifecycle.reap && !vanished.is_empty() {
        tracing::info!(vanished = ?vanished, "peers recorded at the last settle are gone from EC2's list: reaping pass");
        if let Err(e) = reap::pass(ctx, &mut Default::default()).await {
            tracing::warn!("reaping at boot failed ({e}); the watch unit tries again");
        }
    }
    match launch::run(ctx).await {
        Err(
            e @ crate::error::Error::Lifecycle {
                exit: crate::error::exit::ABANDONED,
                ..
            },
        ) => Err(e),
        Err(e) => {
            tracing::error!("the launch hook was not answered ({e}): it ends with its default result at its timeout; this node keeps serving");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// The Auto Scaling group whose hooks this node answers: `lifecycle.group`, else the
/// cluster tag value when the cluster tag is the group's own tag.
pub fn group<'a>(cfg: &'a Config, tag_value: &'a str) -> Option<&'a str> {
    cfg.lifecycle
        .group
        .as_deref()
        .or((cfg.cluster.tag_key == ASG_TAG).then_some(tag_value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exactly these paths: what joining and leaving need, and ending its own login.
    #[test]
    fn the_policy_is_exactly_the_lifecycle_paths() {
        let paths = crate::approle::policy_paths(POLICY_HCL);
        assert_eq!(
            paths,
            [
                "sys/storage/raft/autopilot/state",
                "sys/storage/raft/configuration",
                "sys/storage/raft/remove-peer",
                "sys/step-down",
                "auth/token/revoke-self",
            ]
        );
        assert!(!POLICY_HCL.contains("snapshot"));
        assert!(!POLICY_HCL.contains("secret"));
    }

    #[test]
    fn the_group_comes_from_the_config_or_the_asg_tag() {
        let base = "[tls]\nbucket = \"b\"\n[seal]\nkms_key_id = \"k\"\n";
        let cfg = Config::parse(base, "c".as_ref()).unwrap();
        assert_eq!(group(&cfg, "vault-prod"), Some("vault-prod"));
        let cfg = Config::parse(
            &format!("{base}[cluster]\ntag_key = \"cluster\"\n"),
            "c".as_ref(),
        )
        .unwrap();
        assert_eq!(group(&cfg, "vault-prod"), None);
        let cfg = Config::parse(
            &format!("{base}[cluster]\ntag_key = \"cluster\"\n[lifecycle]\ngroup = \"asg-1\"\n"),
            "c".as_ref(),
        )
        .unwrap();
        assert_eq!(group(&cfg, "vault-prod"), Some("asg-1"));
        // Hooks without a way to name the group: refused, naming the key.
        let e = Config::parse(
            &format!("{base}[cluster]\ntag_key = \"cluster\"\n[lifecycle]\nlaunch_hook = \"l\"\nbound_cidrs = [\"10.0.0.0/16\"]\n"),
            "c".as_ref(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("lifecycle.group"), "{e}");
        // Hooks with the credential bound to the addresses at init only: refused, since no
        // replacement could ever log in. snapshot.bound_cidrs is the documented fallback.
        let e = Config::parse(
            &format!("{base}[lifecycle]\nterminate_hook = \"t\"\n"),
            "c".as_ref(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("lifecycle.bound_cidrs"), "{e}");
        assert!(Config::parse(
            &format!("{base}[lifecycle]\nterminate_hook = \"t\"\n[snapshot]\nbound_cidrs = [\"10.0.0.0/16\"]\n"),
            "c".as_ref(),
        )
        .is_ok());
    }
}
