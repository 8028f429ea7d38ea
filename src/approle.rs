//! Node credentials: narrow AppRoles the nodes log in with once the root token is gone.
//!
//! Two exist: the snapshot role ([`crate::snapshot`]: read raft snapshots) and the lifecycle
//! role ([`crate::lifecycle`]: autopilot state, step-down, remove-peer). Each is a policy of
//! its own and an AppRole bound to it, made by the init winner in post-init with the root
//! token; its role_id and one secret_id are escrowed as one KMS-encrypted, write-once item of
//! class `node-credential` next to the recovery keys, which every node may decrypt and no
//! node may overwrite.
//!
//! Scope: a role is bound to addresses (`secret_id_bound_cidrs` and `token_bound_cidrs`, see
//! [`bound_cidrs`]), so a secret_id or token copied off the cluster is refused elsewhere; and
//! its tokens are short, so a copied token does not last. Deleting the secret_id revokes it.

use crate::aws::kms::Kms;
use crate::aws::s3::{ObjectStore, PutOutcome};
use crate::error::{Error, Result};
use crate::escrow::{self, Layout};
use crate::retry;
use crate::secret::Secret;
use crate::vault_api::VaultClient;
use reqwest::Method;
use std::net::IpAddr;
use std::time::Duration;

/// One node credential: what its tokens may do, and where it is escrowed.
#[derive(Debug, Clone, Copy)]
pub struct Role {
    /// Policy and AppRole role name (stable: operators revoke by them).
    pub name: &'static str,
    /// What the logs call it ("snapshot", "lifecycle").
    pub label: &'static str,
    pub policy_hcl: &'static str,
    /// Escrow item name ([`Layout::object`]); its class is `node-credential`.
    pub item: &'static str,
    /// Lifetime of a login, and its maximum: a copied token must not last.
    pub token_ttl: &'static str,
    /// Whether its tokens also get the `default` policy (cubbyhole, wrapping, lookups,
    /// revoke-self); without it, they can do exactly what `policy_hcl` says.
    pub default_policy: bool,
    /// Where the docs explain it, for error messages.
    pub docs: &'static str,
    /// The config key that widens its bound addresses for a new cluster.
    pub bound_setting: &'static str,
}

/// The escrowed AppRole credentials.
#[derive(serde::Serialize, serde::Deserialize)]
struct Creds {
    role_id: String,
    secret_id: String,
}

impl Drop for Creds {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret_id);
    }
}

fn provision_err(role: &Role, call: &str, status: u16, body: &serde_json::Value) -> Error {
    Error::Init {
        message: format!(
            "{} credentials: {call} answered HTTP {status}: {}",
            role.name, body["errors"]
        ),
        retriable: false,
    }
}

/// The CIDR blocks a role is bound to: `configured` when set, else every node's own address
/// (`/32`, or `/128` for IPv6), sorted. The agent cannot learn the VPC's CIDR (that would
/// need `ec2:DescribeVpcs`, a grant the node role does without), so the default is the
/// addresses known now; an instance that joins later with a new address is outside it until
/// an operator widens the role (docs/operations.md "Snapshots").
pub fn bound_cidrs(configured: &[String], nodes: impl IntoIterator<Item = IpAddr>) -> Vec<String> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    let mut v: Vec<String> = nodes
        .into_iter()
        .map(|ip| match ip {
            IpAddr::V4(_) => format!("{ip}/32"),
            IpAddr::V6(_) => format!("{ip}/128"),
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The body that writes an AppRole: its policy, its bound addresses, short tokens, and a
/// secret_id that lives until an operator destroys it.
pub fn role_body(role: &Role, cidrs: &[String]) -> serde_json::Value {
    serde_json::json!({
        "token_policies": [role.name],
        "token_ttl": role.token_ttl,
        "token_max_ttl": role.token_ttl,
        "token_no_default_policy": !role.default_policy,
        // Login only from the cluster's addresses, and its tokens work only from there.
        "secret_id_bound_cidrs": cidrs,
        "token_bound_cidrs": cidrs,
        // The secret_id lives in the escrow until an operator destroys it.
        "secret_id_ttl": 0,
        "secret_id_num_uses": 0,
    })
}

/// Creates the role's policy and AppRole with the root token and escrows the AppRole's
/// credentials (once). Idempotent: policy and role are rewritten as they are; when the item
/// is already escrowed no new secret_id is made.
#[allow(clippy::too_many_arguments)]
pub async fn provision<S: ObjectStore, K: Kms>(
    role: &Role,
    cidrs: &[String],
    local: &VaultClient,
    root: &Secret,
    s3: &S,
    kms: &K,
    layout: &Layout,
    aws: Duration,
) -> Result<()> {
    let call = |method: Method, path: String, body: Option<serde_json::Value>| async move {
        let (status, resp) = local.call(method.clone(), &path, Some(root), body).await?;
        Ok::<_, Error>((status, resp, format!("{method} {path}")))
    };
    let name = role.name;
    let (s, b, c) = call(
        Method::PUT,
        format!("sys/policies/acl/{name}"),
        Some(serde_json::json!({ "policy": role.policy_hcl })),
    )
    .await?;
    if !(200..300).contains(&s) {
        return Err(provision_err(role, &c, s, &b));
    }
    let (s, b, c) = call(
        Method::POST,
        "sys/auth/approle".into(),
        Some(serde_json::json!({ "type": "approle" })),
    )
    .await?;
    let mounted =
        (200..300).contains(&s) || (s == 400 && b["errors"].to_string().contains("already in use"));
    if !mounted {
        return Err(provision_err(role, &c, s, &b));
    }
    let (s, b, c) = call(
        Method::POST,
        format!("auth/approle/role/{name}"),
        Some(role_body(role, cidrs)),
    )
    .await?;
    if !(200..300).contains(&s) {
        return Err(provision_err(role, &c, s, &b));
    }
    tracing::info!(role = name, bound_cidrs = ?cidrs, token_ttl = role.token_ttl, "{} AppRole bound to the cluster's addresses", role.label);

    let key = layout.object(role.item);
    let existing = retry::retry("read a node credential item", aws, || {
        s3.get_opt(&layout.bucket, &key)
    })
    .await?;
    if existing.is_some() {
        tracing::info!(item = %layout.url(&key), role = name, "{} AppRole already escrowed", role.label);
        return Ok(());
    }
    let (s, b, c) = call(
        Method::GET,
        format!("auth/approle/role/{name}/role-id"),
        None,
    )
    .await?;
    let role_id = b["data"]["role_id"].as_str().map(str::to_owned);
    let Some(role_id) = role_id.filter(|_| s == 200) else {
        return Err(provision_err(role, &c, s, &b));
    };
    let (s, b, c) = call(
        Method::POST,
        format!("auth/approle/role/{name}/secret-id"),
        None,
    )
    .await?;
    let (Some(secret_id), Some(accessor)) = (
        b["data"]["secret_id"].as_str().map(Secret::new),
        b["data"]["secret_id_accessor"].as_str().map(str::to_owned),
    ) else {
        return Err(provision_err(role, &c, s, &b));
    };
    let item = Secret::new(
        serde_json::to_string(&Creds {
            role_id,
            secret_id: secret_id.expose().to_owned(),
        })
        .map_err(|e| Error::Internal(e.to_string()))?,
    );
    let (put, ct) = escrow::put_item(s3, kms, layout, role.item, &item, aws).await?;
    if put == PutOutcome::Exists && !stored_is_ours(s3, layout, role.item, &ct, aws).await? {
        // Another run escrowed its own secret_id meanwhile: ours must not stay valid unseen.
        let destroyed = call(
            Method::POST,
            format!("auth/approle/role/{name}/secret-id-accessor/destroy"),
            Some(serde_json::json!({ "secret_id_accessor": accessor })),
        )
        .await;
        if !matches!(destroyed, Ok((200..=299, _, _))) {
            tracing::warn!(role = name, accessor = %accessor, "another run escrowed this role's credentials first, and the secret_id made here could not be destroyed: destroy it by its accessor");
        }
        return Ok(());
    }
    // Read back as the other escrow items are: the bytes and S3's checksum. Nodes may
    // decrypt this class, but the comparison needs no key at all.
    escrow::check_stored(s3, layout, role.item, &ct, aws).await?;
    tracing::info!(item = %layout.url(&key), role = name, "{} AppRole created and its credentials escrowed", role.label);
    Ok(())
}

/// Why a login did not give a token.
#[derive(Debug)]
pub enum LoginError {
    /// The escrow item could not be read or decrypted.
    Item(Error),
    /// The item decrypted to something that is not a role_id/secret_id document.
    NotCredentials,
    /// The server refused the login (outside the bound addresses, secret_id destroyed).
    Refused { status: u16, errors: String },
    /// The server could not be asked.
    Api(Error),
}

impl LoginError {
    /// What went wrong, naming what to do, and the exit code: for a login as `role` at
    /// `server` with the item at `url`.
    pub fn explain(self, role: &Role, url: &str, server: &VaultClient) -> (String, i32) {
        match self {
            LoginError::Item(e) => (
                format!(
                    "cannot read the {} credential {url} ({e}); the node that initialized the cluster writes it in post-init ({})",
                    role.label, role.docs
                ),
                e.exit_code(),
            ),
            LoginError::NotCredentials => (
                format!("{url} is not a role_id/secret_id document"),
                crate::error::exit::DATAERR,
            ),
            LoginError::Api(e) => (e.to_string(), e.exit_code()),
            LoginError::Refused { status, errors } => {
                let from = server
                    .source()
                    .map_or_else(|| "this node".to_string(), |ip| ip.to_string());
                (
                    format!(
                        "AppRole login as {name} from {from} at {at} refused (HTTP {status}: {errors}). Either {from} is outside the role's bound addresses (an instance that joined after init: {setting} widens them for a new cluster; for this one an operator widens secret_id_bound_cidrs and token_bound_cidrs of auth/approle/role/{name}), or its secret_id was destroyed ({docs})",
                        name = role.name,
                        at = server.base(),
                        setting = role.bound_setting,
                        docs = role.docs,
                    ),
                    crate::error::exit::NOPERM,
                )
            }
        }
    }
}

/// After a write-once upload answered `Exists`: whether the stored item is this run's own.
/// The upload is retried on transient errors, so an attempt that landed but whose answer
/// was lost meets its own bytes on the retry; only other bytes are another run's.
async fn stored_is_ours<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    item: &str,
    ct: &[u8],
    aws: Duration,
) -> Result<bool> {
    let key = layout.object(item);
    let stored = retry::retry("read a node credential item", aws, || {
        s3.get_checked(&layout.bucket, &key)
    })
    .await?;
    Ok(stored.body == ct)
}

/// Ends a login now rather than at its TTL (best effort: it expires anyway).
pub async fn revoke_self(server: &VaultClient, token: &Secret) {
    let _ = server
        .call(Method::POST, "auth/token/revoke-self", Some(token), None)
        .await;
}

/// Logs in as `role` with its escrowed credentials at `server`, which should connect from
/// this instance's own address (the role's tokens work only from its bound addresses).
pub async fn login<S: ObjectStore, K: Kms>(
    role: &Role,
    server: &VaultClient,
    s3: &S,
    kms: &K,
    layout: &Layout,
    aws: Duration,
) -> std::result::Result<Secret, LoginError> {
    // After a rotation the credentials in force are the newest generation's that has them.
    let current = escrow::generation::layout_holding(s3, layout, role.item, aws)
        .await
        .map_err(LoginError::Item)?;
    let item = escrow::decrypt_item(s3, kms, &current, role.item, aws)
        .await
        .map_err(LoginError::Item)?;
    let creds: Creds =
        serde_json::from_str(item.expose()).map_err(|_| LoginError::NotCredentials)?;
    let body = serde_json::json!({ "role_id": creds.role_id, "secret_id": creds.secret_id });
    let (status, resp) = server
        .call(Method::POST, "auth/approle/login", None, Some(body))
        .await
        .map_err(LoginError::Api)?;
    match resp["auth"]["client_token"].as_str() {
        Some(t) if status == 200 => Ok(Secret::new(t)),
        _ => Err(LoginError::Refused {
            status,
            errors: resp["errors"].to_string(),
        }),
    }
}

/// The `path "..."` names of a policy, in order (for the tests that pin each role's policy).
#[cfg(test)]
pub(crate) fn policy_paths(hcl: &str) -> Vec<&str> {
    hcl.lines()
        .filter_map(|l| l.trim().strip_prefix("path \""))
        .filter_map(|l| l.split('"').next())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: Role = Role {
        name: "r",
        label: "test",
        policy_hcl: "",
        item: "r-item",
        token_ttl: "10m",
        default_policy: false,
        docs: "the docs",
        bound_setting: "r.bound_cidrs",
    };

    /// An upload that landed and whose answer was lost meets its own bytes on the retry:
    /// that is this run's item (its secret_id must stay valid); other bytes are another's.
    #[tokio::test]
    async fn an_existing_item_is_ours_only_when_its_bytes_are() {
        let s3 = crate::escrow::fake::FakeS3::default();
        let layout = Layout {
            bucket: "esc".into(),
            prefix: "vb/prod/".into(),
            kms_key_id: "k".into(),
            cluster: "prod".into(),
            generation: crate::escrow::generation::FIRST,
        };
        let d = Duration::from_secs(1);
        let key = layout.object(ROLE.item);
        s3.put_if_absent("esc", &key, b"ours".to_vec(), None)
            .await
            .unwrap();
        assert!(stored_is_ours(&s3, &layout, ROLE.item, b"ours", d)
            .await
            .unwrap());
        assert!(!stored_is_ours(&s3, &layout, ROLE.item, b"theirs", d)
            .await
            .unwrap());
    }

    #[test]
    fn a_role_is_bound_to_the_cluster_and_short_lived() {
        let ips: Vec<IpAddr> = ["10.0.1.7", "10.0.0.5", "10.0.1.7", "fd00::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        // Default: each node's own address, once, sorted.
        let cidrs = bound_cidrs(&[], ips.clone());
        assert_eq!(cidrs, ["10.0.0.5/32", "10.0.1.7/32", "fd00::1/128"]);
        // Configured: exactly what the config says, whatever the nodes are.
        let vpc = vec!["10.0.0.0/16".to_string()];
        assert_eq!(bound_cidrs(&vpc, ips), vpc);
        let body = role_body(&ROLE, &cidrs);
        assert_eq!(body["secret_id_bound_cidrs"], serde_json::json!(cidrs));
        assert_eq!(body["token_bound_cidrs"], serde_json::json!(cidrs));
        assert_eq!(body["token_ttl"], "10m");
        assert_eq!(body["token_max_ttl"], "10m");
        assert_eq!(body["token_policies"], serde_json::json!(["r"]));
        assert_eq!(body["token_no_default_policy"], true);
    }
}
