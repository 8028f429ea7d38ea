//! The Vault HTTP API, as far as the agent uses it, over TLS verified against the cluster CA
//! only (never the system roots: the server's certificate is ours, from the resources bucket).

use crate::error::{Error, Result};
use crate::escrow::InitSecrets;
use crate::secret::Secret;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// What `GET /v1/sys/health` says, by status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Active,
    Standby,
    PerfStandby,
    DrSecondary,
    Uninitialized,
    Sealed,
    Other(u16),
}

impl Health {
    pub fn from_status(s: u16) -> Health {
        match s {
            200 => Health::Active,
            429 => Health::Standby,
            472 => Health::DrSecondary,
            473 => Health::PerfStandby,
            501 => Health::Uninitialized,
            503 => Health::Sealed,
            s => Health::Other(s),
        }
    }

    /// Whether the code is one `sys/health` documents (the server is up and answering).
    pub fn is_known(self) -> bool {
        !matches!(self, Health::Other(_))
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Active => write!(f, "200 initialized, unsealed, active"),
            Health::Standby => write!(f, "429 unsealed standby"),
            Health::PerfStandby => write!(f, "473 performance standby"),
            Health::DrSecondary => write!(f, "472 DR secondary"),
            Health::Uninitialized => write!(f, "501 not initialized"),
            Health::Sealed => write!(f, "503 sealed"),
            Health::Other(s) => write!(f, "{s} (unexpected)"),
        }
    }
}

/// A client for one node's API.
#[derive(Clone)]
pub struct VaultClient {
    http: reqwest::Client,
    /// The same client without a total timeout, for `sys/init` alone.
    unbounded: reqwest::Client,
    base: String,
    /// The node's address (what the URL resolves to, also behind a server name).
    ip: IpAddr,
    /// The local address connections leave from, when pinned ([`VaultClient::from_source`]).
    source: Option<IpAddr>,
}

/// Per-request bound for quick calls; health answers in milliseconds when the server is up.
const QUICK_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting to a listener on the same host or VPC takes milliseconds; longer means it is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl VaultClient {
    /// `ca_pem` is the only trust anchor. With `server_name` the URL uses that name (resolved
    /// to `ip`), so the certificate is checked against it, as peers do with
    /// `leader_tls_servername`.
    pub fn new(ca_pem: &[u8], ip: IpAddr, port: u16, server_name: Option<&str>) -> Result<Self> {
        Self::build(ca_pem, ip, port, server_name, None)
    }

    /// Like [`VaultClient::new`], every connection made from the local address `source`.
    /// For credentials bound to the cluster's addresses (the snapshot AppRole's
    /// `token_bound_cidrs`): the server must see this instance's own address, not whichever
    /// one the kernel picks for the route (on loopback, 127.0.0.1; with several network
    /// interfaces, maybe another).
    pub fn from_source(
        ca_pem: &[u8],
        ip: IpAddr,
        port: u16,
        server_name: Option<&str>,
        source: IpAddr,
    ) -> Result<Self> {
        Self::build(ca_pem, ip, port, server_name, Some(source))
    }

    fn build(
        ca_pem: &[u8],
        ip: IpAddr,
        port: u16,
        server_name: Option<&str>,
        source: Option<IpAddr>,
    ) -> Result<Self> {
        let certs = reqwest::Certificate::from_pem_bundle(ca_pem)
            .map_err(|e| Error::Internal(format!("CA bundle for the Vault API: {e}")))?;
        let client = |timeout: Option<Duration>| {
            let mut b = reqwest::Client::builder()
                .tls_certs_only(certs.clone())
                .connect_timeout(CONNECT_TIMEOUT)
                .local_address(source)
                .no_proxy();
            if let Some(t) = timeout {
                b = b.timeout(t);
            }
            if let Some(name) = server_name {
                b = b.resolve(name, SocketAddr::new(ip, port));
            }
            b.build()
                .map_err(|e| Error::Internal(format!("HTTP client for the Vault API: {e}")))
        };
        let base = match server_name {
            Some(name) => format!("https://{name}:{port}"),
            None => crate::render::api_url(ip, port),
        };
        Ok(VaultClient {
            http: client(Some(QUICK_TIMEOUT))?,
            unbounded: client(None)?,
            base,
            ip,
            source,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The node's address.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The local address connections leave from, when pinned.
    pub fn source(&self) -> Option<IpAddr> {
        self.source
    }

    /// One `GET /v1/sys/health`. Transport errors are returned as text (the caller decides
    /// whether to wait longer).
    pub async fn health(&self) -> std::result::Result<Health, String> {
        let url = format!("{}/v1/sys/health", self.base);
        match self.http.get(&url).send().await {
            Ok(r) => Ok(Health::from_status(r.status().as_u16())),
            Err(e) => Err(error_chain(&e)),
        }
    }
}

impl VaultClient {
    /// The `cluster_id` this node's `sys/health` reports (unsealed nodes, active or standby);
    /// `None` while it is sealed, uninitialized or not answering.
    pub async fn cluster_id(&self) -> Option<String> {
        let url = format!("{}/v1/sys/health", self.base);
        let body: serde_json::Value = self.http.get(&url).send().await.ok()?.json().await.ok()?;
        body["cluster_id"]
            .as_str()
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
    }

    /// One API call with an optional token; returns (status, JSON body or Null).
    /// Never use for `sys/init`: its body is secret (see [`VaultClient::init`]).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&Secret>,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        let url = format!("{}/v1/{path}", self.base);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t.expose());
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| Error::VaultApi {
            call: format!("{method} {path}"),
            url: self.base.clone(),
            message: error_chain(&e),
        })?;
        let status = resp.status().as_u16();
        let json = resp.json().await.unwrap_or(serde_json::Value::Null);
        Ok((status, json))
    }

    /// `GET path` streamed into `sink` (a raft snapshot), bounded by `timeout` as a whole;
    /// returns the bytes written. Anything but 200 is an error naming the status and the
    /// server's `errors`.
    pub async fn download(
        &self,
        path: &str,
        token: &Secret,
        timeout: Duration,
        sink: &mut (dyn FnMut(&[u8]) -> std::io::Result<()> + Send),
    ) -> Result<u64> {
        let fail = |message: String| Error::VaultApi {
            call: format!("GET {path}"),
            url: self.base.clone(),
            message,
        };
        let mut resp = self
            .http
            .get(format!("{}/v1/{path}", self.base))
            .header("X-Vault-Token", token.expose())
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
            return Err(fail(format!("HTTP {status} {}", body["errors"])));
        }
        let mut n = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(error_chain(&e)))? {
            sink(&chunk).map_err(|e| fail(format!("writing the body locally: {e}")))?;
            n += chunk.len() as u64;
        }
        Ok(n)
    }

    /// `POST path` with a raw body (a raft snapshot to restore), bounded by `timeout`.
    pub async fn post_bytes(
        &self,
        path: &str,
        token: &Secret,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(u16, serde_json::Value)> {
        let resp = self
            .http
            .post(format!("{}/v1/{path}", self.base))
            .header("X-Vault-Token", token.expose())
            .body(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| Error::VaultApi {
                call: format!("POST {path}"),
                url: self.base.clone(),
                message: error_chain(&e),
            })?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(serde_json::Value::Null)))
    }

    /// `PUT sys/init` with recovery shares (auto-unseal). The response holds the only copy
    /// of the keys. The server commits the cluster whether or not anyone reads the answer,
    /// so the call has no client timeout (systemd's `TimeoutStartSec=` bounds the boot), is
    /// never retried, and neither the body nor any part of it reaches an error message.
    pub async fn init(
        &self,
        shares: u8,
        threshold: u8,
        pgp_keys: &[String],
    ) -> Result<InitSecrets> {
        let url = format!("{}/v1/sys/init", self.base);
        let mut body = serde_json::json!({
            "recovery_shares": shares,
            "recovery_threshold": threshold,
        });
        if !pgp_keys.is_empty() {
            body["recovery_pgp_keys"] = serde_json::json!(pgp_keys);
        }
        let fail = |message: String| Error::VaultApi {
            call: "PUT sys/init".into(),
            url: self.base.clone(),
            message,
        };
        let resp = self
            .unbounded
            .put(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        let status = resp.status().as_u16();
        let bytes = zeroize::Zeroizing::new(
            resp.bytes()
                .await
                .map_err(|e| fail(error_chain(&e)))?
                .to_vec(),
        );
        if status != 200 {
            // Error bodies carry no keys: {"errors": [...]}.
            let errors = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .map(|v| v["errors"].to_string())
                .unwrap_or_default();
            return Err(fail(format!("HTTP {status} {errors}")));
        }
        #[derive(serde::Deserialize)]
        struct Resp {
            #[serde(default)]
            recovery_keys: Vec<String>,
            #[serde(default)]
            recovery_keys_base64: Vec<String>,
            root_token: String,
        }
        let mut r: Resp = serde_json::from_slice(&bytes)
            .map_err(|_| fail("the response is not the documented init response".into()))?;
        let pgp = !pgp_keys.is_empty();
        // PGP-encrypted shares are binary messages: keep the base64 form `gpg` reads.
        let chosen = if pgp {
            &r.recovery_keys_base64
        } else {
            &r.recovery_keys
        };
        let secrets = InitSecrets {
            shares: chosen.iter().map(|s| Secret::new(s.as_str())).collect(),
            root_token: Secret::new(r.root_token.as_str()),
            pgp,
            threshold,
        };
        {
            use zeroize::Zeroize;
            r.recovery_keys.iter_mut().for_each(|s| s.zeroize());
            r.recovery_keys_base64.iter_mut().for_each(|s| s.zeroize());
            r.root_token.zeroize();
        }
        if secrets.shares.len() != shares as usize {
            return Err(fail(format!(
                "returned {} recovery shares, asked for {shares}",
                secrets.shares.len()
            )));
        }
        Ok(secrets)
    }
}

/// A reqwest error with its causes ("connection refused", "certificate expired", ...).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Something that may die while we wait for it to answer (the exec launcher's child).
pub trait Liveness {
    /// `Some(description)` once the process has exited.
    fn exited(&mut self) -> Option<String>;
}

/// Waits, bounded, until `sys/health` answers with a documented code.
pub async fn wait_answering(
    client: &VaultClient,
    deadline: Duration,
    mut alive: Option<&mut dyn Liveness>,
) -> Result<Health> {
    let start = Instant::now();
    // The server needs ~0.6 s to open its listener; poll fast at first, then back off.
    let mut backoff =
        crate::retry::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    loop {
        let last = match client.health().await {
            Ok(h) if h.is_known() => return Ok(h),
            Ok(h) => format!("HTTP {h}"),
            Err(e) => e,
        };
        if let Some(a) = alive.as_deref_mut() {
            if let Some(status) = a.exited() {
                return Err(Error::ServerExited { status });
            }
        }
        let delay = backoff.next_delay();
        if start.elapsed() + delay > deadline {
            return Err(Error::HealthTimeout {
                url: format!("{}/v1/sys/health", client.base()),
                waited_secs: start.elapsed().as_secs(),
                last,
            });
        }
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_codes_are_named() {
        assert_eq!(Health::from_status(200), Health::Active);
        assert_eq!(Health::from_status(429), Health::Standby);
        assert_eq!(Health::from_status(501), Health::Uninitialized);
        assert_eq!(Health::from_status(503), Health::Sealed);
        assert!(!Health::from_status(404).is_known());
        assert!(Health::Sealed.to_string().contains("sealed"));
    }

    #[tokio::test]
    async fn waiting_on_a_closed_port_times_out_naming_the_url() {
        let ca = crate::tls::testcerts::ca();
        // Port 9 (discard) on loopback: nothing listens there in the test environment.
        let c = VaultClient::new(ca.pem.as_bytes(), "127.0.0.1".parse().unwrap(), 9, None).unwrap();
        let e = wait_answering(&c, Duration::from_millis(700), None)
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), 75);
        assert!(
            e.to_string().contains("https://127.0.0.1:9/v1/sys/health"),
            "{e}"
        );
    }
}
