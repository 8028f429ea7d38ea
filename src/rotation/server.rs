//! The server's half of a rotation: rekeying the recovery key with verification, rotating
//! the keyring and the root key, and replacing the node credentials' secrets. Every call
//! carries the operator's token.
//!
//! OpenBao (2.4 and later) has authenticated endpoints for all of it under `sys/rotate/`;
//! Vault rekeys the recovery key at `sys/rekey-recovery-key/`, rotates the keyring at
//! `sys/rotate`, and offers no root-key rotation on an auto-unseal seal without a second
//! rekey by recovery shares, which this command does not do.

use crate::config::Flavor;
use crate::error::{exit, Error, Result};
use crate::secret::Secret;
use crate::vault_api::VaultClient;
use reqwest::Method;
use serde_json::{json, Value};

/// A rekey answer, as far as the rotation cares.
#[derive(Debug)]
pub enum Update {
    /// More shares are needed.
    Progress,
    /// The threshold was reached: the new shares, and the nonce that verifies them (the new
    /// key is not in force until they are verified).
    Done {
        keys: Vec<Secret>,
        verification_nonce: String,
    },
    /// The shares do not combine into the key in force.
    WrongKey(String),
}

/// The server, through one node, with the operator's token.
pub struct KeyServer<'a> {
    pub client: &'a VaultClient,
    pub token: &'a Secret,
    pub flavor: Flavor,
}

/// `data` of an OpenBao answer, or the answer itself (Vault's rekey endpoints).
fn data(body: &Value) -> &Value {
    match body.get("data") {
        Some(d) if d.is_object() => d,
        _ => body,
    }
}

impl KeyServer<'_> {
    /// The method of a rekey write: Vault's endpoints take PUT, OpenBao's POST.
    fn write_method(&self) -> Method {
        match self.flavor {
            Flavor::Vault => Method::PUT,
            _ => Method::POST,
        }
    }

    /// Gives one share to the rekey step `step` (`update` or `verify`) of `nonce`.
    async fn give_share(
        &self,
        step: &str,
        nonce: &str,
        share: &Secret,
    ) -> Result<(u16, Value, String)> {
        let path = self.rekey_path(step);
        let method = self.write_method();
        let (s, b) = self
            .call(
                method.clone(),
                &path,
                Some(json!({"key": share.expose(), "nonce": nonce})),
            )
            .await?;
        Ok((s, b, format!("{method} {path}")))
    }

    fn rekey_path(&self, step: &str) -> String {
        match self.flavor {
            Flavor::Vault => format!("sys/rekey-recovery-key/{step}"),
            _ => format!("sys/rotate/recovery/{step}"),
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        self.client.call(method, path, Some(self.token), body).await
    }

    fn refused(call: &str, status: u16, body: &Value) -> Error {
        let hint = match status {
            401 | 403 => "; VAULT_TOKEN may not do this (it needs sudo on sys/rotate/*, sys/rekey-recovery-key/*, sys/leases/revoke-prefix/* and write on auth/approle/*: the admin policy has all of them)",
            _ => "",
        };
        Error::Rotation {
            message: format!("{call} answered HTTP {status}: {}{hint}", body["errors"]),
            exit: if status == 403 || status == 401 {
                exit::NOPERM
            } else if status == 429 || status >= 500 {
                exit::TEMPFAIL
            } else {
                exit::UNAVAILABLE
            },
        }
    }

    /// The verification nonce of a rekey whose new shares await verification, if any.
    pub async fn pending_verification(&self) -> Result<Option<String>> {
        let path = self.rekey_path("init");
        let (s, b) = self.call(Method::GET, &path, None).await?;
        if s != 200 {
            return Err(Self::refused(&format!("GET {path}"), s, &b));
        }
        Ok(data(&b)["verification_nonce"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(str::to_owned))
    }

    /// Cancels any rekey in progress. Its new shares, if any were returned, never come into
    /// force: verification is always required, so the key in force stays until then.
    pub async fn cancel(&self) -> Result<()> {
        let path = self.rekey_path("init");
        let (s, b) = self.call(Method::DELETE, &path, None).await?;
        if !(200..300).contains(&s) {
            return Err(Self::refused(&format!("DELETE {path}"), s, &b));
        }
        Ok(())
    }

    /// Starts a rekey to `shares`/`threshold` that needs verification; returns its nonce.
    pub async fn start(&self, shares: usize, threshold: u8) -> Result<String> {
        let path = self.rekey_path("init");
        let method = self.write_method();
        let (s, b) = self
            .call(
                method.clone(),
                &path,
                Some(json!({
                    "secret_shares": shares,
                    "secret_threshold": threshold,
                    // The new key comes into force only once its shares are escrowed and
                    // given back: a crash before that leaves the old key working.
                    "require_verification": true,
                })),
            )
            .await?;
        let nonce = data(&b)["nonce"].as_str().unwrap_or_default().to_owned();
        if s != 200 || nonce.is_empty() {
            return Err(Self::refused(&format!("{method} {path}"), s, &b));
        }
        // Without verification the new key would be in force the moment the last old share
        // is given, its shares only in this process: never go on without it.
        if data(&b)["verification_required"].as_bool() != Some(true) {
            let _ = self.cancel().await;
            return Err(Error::Rotation {
                message: format!("{method} {path} did not take require_verification (the answer says verification_required is not true); nothing was changed"),
                exit: exit::UNAVAILABLE,
            });
        }
        Ok(nonce)
    }

    /// Gives one share of the key in force to the rekey `nonce`.
    pub async fn update(&self, nonce: &str, share: &Secret) -> Result<Update> {
        let (s, b, call) = self.give_share("update", nonce, share).await?;
        if s == 400 && b["errors"].to_string().contains("verification failed") {
            return Ok(Update::WrongKey(b["errors"].to_string()));
        }
        if s != 200 {
            return Err(Self::refused(&call, s, &b));
        }
        let d = data(&b);
        if d["complete"].as_bool() != Some(true) {
            return Ok(Update::Progress);
        }
        let keys: Vec<Secret> = d["keys"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(Secret::new)
                    .collect()
            })
            .unwrap_or_default();
        let verification_nonce = d["verification_nonce"].as_str().unwrap_or_default();
        if keys.is_empty() || verification_nonce.is_empty() {
            return Err(Error::Rotation {
                message: format!("{call} completed without new shares or a verification nonce"),
                exit: exit::UNAVAILABLE,
            });
        }
        Ok(Update::Done {
            keys,
            verification_nonce: verification_nonce.to_owned(),
        })
    }

    /// Starts the pending verification over (its progress from an interrupted run would
    /// refuse a share given again); returns its new nonce, or None when none is pending.
    pub async fn restart_verification(&self) -> Result<Option<String>> {
        let path = self.rekey_path("verify");
        let (s, b) = self.call(Method::DELETE, &path, None).await?;
        if s == 400 {
            return Ok(None);
        }
        if !(200..300).contains(&s) {
            return Err(Self::refused(&format!("DELETE {path}"), s, &b));
        }
        let (s, b) = self.call(Method::GET, &path, None).await?;
        if s != 200 {
            return Ok(None);
        }
        Ok(data(&b)["nonce"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(str::to_owned))
    }

    /// Gives the new shares back to verification `nonce`: true once the new key is in
    /// force; false otherwise (refused, or an answer that does not say): then only a probe
    /// tells whether it is.
    pub async fn verify(&self, nonce: &str, shares: &[Secret]) -> Result<bool> {
        for (i, share) in shares.iter().enumerate() {
            if i == 1 {
                crate::escrow::crash_point("rotation-verifying");
            }
            let (s, b, call) = self.give_share("verify", nonce, share).await?;
            if s == 400 {
                tracing::warn!(errors = %b["errors"], "the server refused these shares for verification");
                return Ok(false);
            }
            if s != 200 {
                return Err(Self::refused(&call, s, &b));
            }
            if data(&b)["complete"].as_bool() == Some(true) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Rotates the keyring (the barrier's encryption key); returns its new term.
    pub async fn rotate_keyring(&self) -> Result<Option<u64>> {
        let path = match self.flavor {
            Flavor::Vault => "sys/rotate",
            _ => "sys/rotate/keyring",
        };
        let (s, b) = self.call(Method::POST, path, None).await?;
        if !(200..300).contains(&s) {
            return Err(Self::refused(&format!("POST {path}"), s, &b));
        }
        let (s, b) = self.call(Method::GET, "sys/key-status", None).await?;
        Ok((s == 200).then(|| data(&b)["term"].as_u64()).flatten())
    }

    /// Rotates the root key where the server offers it without shares; false where not.
    pub async fn rotate_root_key(&self) -> Result<bool> {
        if self.flavor == Flavor::Vault {
            return Ok(false);
        }
        let (s, b) = self.call(Method::POST, "sys/rotate/root", None).await?;
        match s {
            200..=299 => Ok(true),
            404 | 405 => Ok(false),
            _ => Err(Self::refused("POST sys/rotate/root", s, &b)),
        }
    }

    /// The addresses AppRole `name` is bound to now (an operator may have widened them).
    pub async fn role_cidrs(&self, name: &str) -> Result<Vec<String>> {
        let path = format!("auth/approle/role/{name}");
        let (s, b) = self.call(Method::GET, &path, None).await?;
        if s != 200 {
            return Err(Self::refused(&format!("GET {path}"), s, &b));
        }
        Ok(data(&b)["secret_id_bound_cidrs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Makes every existing credential of AppRole `name` worthless: a new role_id, and
    /// every secret_id destroyed.
    pub async fn revoke_role_secrets(&self, name: &str) -> Result<usize> {
        let path = format!("auth/approle/role/{name}/role-id");
        let (s, b) = self
            .call(
                Method::POST,
                &path,
                Some(json!({"role_id": new_role_id()?})),
            )
            .await?;
        if !(200..300).contains(&s) {
            return Err(Self::refused(&format!("POST {path}"), s, &b));
        }
        let path = format!("auth/approle/role/{name}/secret-id?list=true");
        let (s, b) = self.call(Method::GET, &path, None).await?;
        let accessors: Vec<String> = match s {
            200 => data(&b)["keys"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            404 => Vec::new(),
            _ => return Err(Self::refused(&format!("LIST {path}"), s, &b)),
        };
        let path = format!("auth/approle/role/{name}/secret-id-accessor/destroy");
        for a in &accessors {
            let (s, b) = self
                .call(Method::POST, &path, Some(json!({"secret_id_accessor": a})))
                .await?;
            if !(200..300).contains(&s) {
                return Err(Self::refused(&format!("POST {path}"), s, &b));
            }
        }
        Ok(accessors.len())
    }

    /// Revokes every token an AppRole login issued (both node credentials log in there;
    /// operators do not).
    pub async fn revoke_approle_tokens(&self) -> Result<()> {
        let path = "sys/leases/revoke-prefix/auth/approle/login";
        let (s, b) = self.call(Method::PUT, path, None).await?;
        if !(200..300).contains(&s) {
            return Err(Self::refused(&format!("PUT {path}"), s, &b));
        }
        Ok(())
    }
}

/// A random role_id (UUID form, as the server makes them).
fn new_role_id() -> Result<String> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| Error::Internal("no randomness".into()))?;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_ids_are_fresh_uuids() {
        let (a, b) = (new_role_id().unwrap(), new_role_id().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }

    #[test]
    fn both_answer_shapes_are_read() {
        let bao = json!({"data": {"nonce": "n1"}, "request_id": "r"});
        let vault = json!({"nonce": "n2"});
        assert_eq!(data(&bao)["nonce"], "n1");
        assert_eq!(data(&vault)["nonce"], "n2");
    }
}
