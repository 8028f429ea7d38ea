//! A lifecycle session: a login with the lifecycle node credential at the cluster's active
//! node, and the four calls it allows. Every call goes to the active node (found through
//! this node's `sys/leader`, which standbys answer without a token), so nothing depends on a
//! standby forwarding requests.

use super::autopilot::State;
use crate::approle;
use crate::aws::kms::SdkKms;
use crate::aws::s3::SdkS3;
use crate::config::Config;
use crate::error::{exit, Error, Result};
use crate::escrow::Layout;
use crate::imds::InstanceFacts;
use crate::raft_config::Membership;
use crate::secret::Secret;
use crate::vault_api::VaultClient;
use crate::{api_clients, render};
use reqwest::Method;
use std::net::IpAddr;
use std::time::Duration;

/// What a lifecycle step needs to know about this node.
pub struct Ctx<'a> {
    pub cfg: &'a Config,
    pub facts: &'a InstanceFacts,
    pub tag_value: &'a str,
    pub sdk: &'a aws_config::SdkConfig,
    pub ca: &'a [u8],
    /// The peers' addresses (discovered, or recorded in the membership record): where to
    /// ask for the leader when this node's own server does not answer.
    pub peers: Vec<IpAddr>,
}

impl Ctx<'_> {
    pub fn me(&self) -> &str {
        &self.facts.instance_id
    }

    /// Whether this node's own server answers `sys/health` at all.
    pub async fn answers(&self) -> bool {
        match self.local() {
            Ok(c) => c.health().await.is_ok(),
            Err(_) => false,
        }
    }

    /// This node's own API client, from this instance's address.
    pub fn local(&self) -> Result<VaultClient> {
        api_clients::local(self.cfg, self.facts, self.ca)
    }

    /// The active node's client, as this node's `sys/leader` names it (or, when this
    /// node's server does not answer or knows no leader, a peer's); `None` while nobody
    /// names one. The flag says whether the active node is this one.
    pub async fn leader(&self) -> Result<Option<(VaultClient, bool)>> {
        let me = self.facts.local_ipv4;
        let local = self.local()?;
        if let Some(found) = leader_seen_by(local, true, self).await? {
            return Ok(Some(found));
        }
        for ip in &self.peers {
            let peer = api_clients::client(self.cfg, self.ca, *ip, me)?;
            if let Some(found) = leader_seen_by(peer, false, self).await? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }
}

/// The leader `node`'s `sys/leader` names (`mine`: `node` is this node's own server).
async fn leader_seen_by(
    node: VaultClient,
    mine: bool,
    ctx: &Ctx<'_>,
) -> Result<Option<(VaultClient, bool)>> {
    let Ok((200, body)) = node.call(Method::GET, "sys/leader", None, None).await else {
        return Ok(None);
    };
    if body["is_self"].as_bool() == Some(true) {
        return Ok(Some((node, mine)));
    }
    let Some(ip) = body["leader_address"]
        .as_str()
        .and_then(api_clients::host_ip)
    else {
        return Ok(None);
    };
    let is_me = ip == ctx.facts.local_ipv4;
    let client = api_clients::client(ctx.cfg, ctx.ca, ip, ctx.facts.local_ipv4)?;
    Ok(Some((client, is_me)))
}

/// One login kept across the polls of one wait (a launch hook's, a leave's): a login costs an
/// S3 read, a KMS decrypt and an AppRole login, and a wait polls every 2 s. It is ended
/// (revoked) after a failed call or a step-down, so the next poll logs in again at whichever
/// node leads then; when it is [`RELOGIN_AFTER`] old, well inside the token's 10 minutes; and
/// when the wait is over.
#[derive(Default)]
pub struct Logins(tokio::sync::Mutex<Option<Session>>);

impl Logins {
    /// The kept session, logging in first when there is none. Drop the guard before
    /// [`Logins::end`].
    pub async fn session(
        &self,
        ctx: &Ctx<'_>,
    ) -> Result<tokio::sync::MappedMutexGuard<'_, Session>> {
        let mut g = self.0.lock().await;
        if g.as_ref()
            .is_some_and(|s| s.opened.elapsed() >= RELOGIN_AFTER)
        {
            if let Some(old) = g.take() {
                old.close().await;
            }
        }
        if g.is_none() {
            *g = Some(Session::open(ctx).await?);
        }
        tokio::sync::MutexGuard::try_map(g, Option::as_mut)
            .map_err(|_| Error::Internal("no lifecycle session after a login".into()))
    }

    /// Ends the kept login, if any.
    pub async fn end(&self) {
        let kept = self.0.lock().await.take();
        if let Some(s) = kept {
            s.close().await;
        }
    }
}

/// Age at which a kept login is replaced: half the lifecycle token's TTL
/// ([`super::TOKEN_TTL`], 10 minutes), so no call ever carries an expired token.
pub const RELOGIN_AFTER: Duration = Duration::from_secs(300);

/// A logged-in session at the active node.
pub struct Session {
    pub leader: VaultClient,
    /// Whether the active node is this node.
    pub leader_is_me: bool,
    token: Secret,
    opened: std::time::Instant,
}

fn err(message: String, exit: i32) -> Error {
    Error::Lifecycle { message, exit }
}

impl Session {
    /// Logs in at the active node with the escrowed lifecycle credential.
    pub async fn open(ctx: &Ctx<'_>) -> Result<Session> {
        let Some((leader, leader_is_me)) = ctx.leader().await? else {
            return Err(err(
                format!(
                    "no active node known to this node's server at {}: no leader (an election, or this server is down); retrying",
                    render::api_url(ctx.facts.local_ipv4, ctx.cfg.vault.api_port)
                ),
                exit::TEMPFAIL,
            ));
        };
        let layout = Layout::new(ctx.cfg, ctx.tag_value);
        let aws = Duration::from_secs(ctx.cfg.agent.aws_timeout_secs);
        let s3 = SdkS3::new(ctx.sdk);
        let kms = SdkKms::new(ctx.sdk);
        let url = layout.url(&layout.object(Layout::LIFECYCLE_APPROLE_ITEM));
        let token = approle::login(&super::ROLE, &leader, &s3, &kms, &layout, aws)
            .await
            .map_err(|e| {
                let (message, exit) = e.explain(&super::ROLE, &url, &leader);
                err(message, exit)
            })?;
        Ok(Session {
            leader,
            leader_is_me,
            token,
            opened: std::time::Instant::now(),
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let (status, resp) = self
            .leader
            .call(method.clone(), path, Some(&self.token), body)
            .await?;
        if !(200..300).contains(&status) {
            return Err(Error::VaultApi {
                call: format!("{method} {path}"),
                url: self.leader.base().to_owned(),
                message: format!("HTTP {status}: {}", resp["errors"]),
            });
        }
        Ok(resp)
    }

    /// Who votes (the raft configuration) and who is healthy (autopilot), read together for
    /// one decision.
    pub async fn view(&self) -> Result<(Membership, State)> {
        Ok((self.membership().await?, self.autopilot().await?))
    }

    /// Autopilot's view of the servers, from the active node.
    pub async fn autopilot(&self) -> Result<State> {
        let body = self
            .call(Method::GET, "sys/storage/raft/autopilot/state", None)
            .await?;
        State::parse(&body).ok_or_else(|| Error::VaultApi {
            call: "GET sys/storage/raft/autopilot/state".into(),
            url: self.leader.base().to_owned(),
            message: "the answer holds no servers".into(),
        })
    }

    /// The raft configuration, from the active node: who is a member, who votes.
    pub async fn membership(&self) -> Result<Membership> {
        let body = self
            .call(Method::GET, "sys/storage/raft/configuration", None)
            .await?;
        Membership::parse(&body).ok_or_else(|| Error::VaultApi {
            call: "GET sys/storage/raft/configuration".into(),
            url: self.leader.base().to_owned(),
            message: "the answer holds no servers".into(),
        })
    }

    /// Removes `server_id` from the raft configuration.
    pub async fn remove_peer(&self, server_id: &str) -> Result<()> {
        self.call(
            Method::POST,
            "sys/storage/raft/remove-peer",
            Some(serde_json::json!({ "server_id": server_id })),
        )
        .await
        .map(|_| ())
    }

    /// Asks the active node to give up leadership (another voter takes over).
    pub async fn step_down(&self) -> Result<()> {
        self.call(Method::PUT, "sys/step-down", None)
            .await
            .map(|_| ())
    }

    /// Ends the login now rather than at its TTL (best effort).
    pub async fn close(self) {
        approle::revoke_self(&self.leader, &self.token).await;
    }
}
