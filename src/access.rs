//! Never locked out: operator login paths configured right after init, before the root
//! token may be revoked, and the break-glass path (recovery keys -> new root token).
//!
//! The API calls are built by pure functions ([`cert_calls`], [`aws_calls`]) so their
//! payloads are pinned by tests even where the test-bed's server cannot run them (OpenBao has
//! no built-in AWS auth).

use crate::config::{AccessConfig, Config};
use crate::error::{Error, Result};
use crate::secret::Secret;
use crate::vault_api::VaultClient;
use base64::Engine;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The admin policy: cluster administration without `root`.
pub const ADMIN_POLICY: &str = r#"# vault-bootstrap: operators' policy. Administration of the cluster without root.
path "sys/*" {
  capabilities = ["create", "read", "update", "delete", "list", "sudo"]
}
path "auth/*" {
  capabilities = ["create", "read", "update", "delete", "list", "sudo"]
}
path "identity/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
"#;

/// Mount path of the operators' cert auth, and its role.
pub const CERT_MOUNT: &str = "cert";
pub const CERT_ROLE: &str = "operators";
pub const AWS_MOUNT: &str = "aws";

/// One API call to make.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub body: Value,
}

fn call(method: Method, path: impl Into<String>, body: Value) -> Call {
    Call {
        method,
        path: path.into(),
        body,
    }
}

/// Writes the admin policy: both login paths attach it, [`configure`] writes it once.
pub fn admin_policy_call(policy: &str) -> Call {
    call(
        Method::PUT,
        format!("sys/policies/acl/{policy}"),
        json!({"policy": ADMIN_POLICY}),
    )
}

/// Cert auth mount + the operators' role bound to the operator CA (and the admin policy).
pub fn cert_calls(access: &AccessConfig, operator_ca_pem: &str) -> Vec<Call> {
    let policy = access.policy_name();
    vec![
        call(
            Method::POST,
            format!("sys/auth/{CERT_MOUNT}"),
            json!({"type": "cert", "description": "operators (vault-bootstrap)"}),
        ),
        call(
            Method::POST,
            format!("auth/{CERT_MOUNT}/certs/{CERT_ROLE}"),
            json!({
                "certificate": operator_ca_pem,
                "display_name": CERT_ROLE,
                // Only the operators' own certificates: without a list, any certificate the
                // CA ever signed (for a server, a test, anyone) would log in as admin.
                "allowed_common_names": access.operator_common_names,
                "token_policies": [policy],
                // Short-lived admin tokens: re-login is cheap, a leaked token expires soon.
                "token_ttl": "1h",
                "token_max_ttl": "8h",
            }),
        ),
    ]
}

/// Refuses an operator CA that is the cluster CA: the same certificate, or one with the
/// same subject and public key (the CA re-issued). Every node holds a server certificate
/// the cluster CA signed, so with one CA for both a node's own key (any root shell on any
/// node) would log in as an administrator. Each certificate of either PEM bundle counts.
pub fn check_separate(
    operator_ca_pem: &str,
    cluster_ca_pem: &[u8],
) -> std::result::Result<(), String> {
    let parse = |pem: &[u8], what: &str| {
        crate::tls::pem_certs(pem).map_err(|problem| format!("{what}: {problem}"))
    };
    // (subject, SubjectPublicKeyInfo), both as DER.
    let identity = |der: &[u8], what: &str| -> std::result::Result<(Vec<u8>, Vec<u8>), String> {
        let (_, c) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("{what} holds a certificate that does not parse: {e}"))?;
        Ok((
            c.tbs_certificate.subject.as_raw().to_vec(),
            c.tbs_certificate.subject_pki.raw.to_vec(),
        ))
    };
    let operator = parse(operator_ca_pem.as_bytes(), "the operator CA")?;
    let cluster = parse(cluster_ca_pem, "the cluster CA")?;
    for o in &operator {
        let (o_subject, o_key) = identity(o, "the operator CA")?;
        for c in &cluster {
            if o == c {
                return Err("it is the cluster CA (the same certificate as tls.ca_key): every node's server certificate would log in as an administrator".into());
            }
            let (c_subject, c_key) = identity(c, "the cluster CA")?;
            if o_subject == c_subject && o_key == c_key {
                return Err("it is the cluster CA re-issued (the same subject and public key as tls.ca_key): every node's server certificate would log in as an administrator".into());
            }
        }
    }
    Ok(())
}

/// AWS IAM auth bound to the operators' role ARNs (Vault built in; OpenBao needs the
/// external plugin). STS/IAM endpoints from config; the server-id header is enforced.
pub fn aws_calls(access: &AccessConfig) -> Vec<Call> {
    if access.aws_role_arns.is_empty() {
        return Vec::new();
    }
    let policy = access.policy_name();
    let mut client = json!({});
    if let Some(e) = &access.aws_sts_endpoint {
        client["sts_endpoint"] = json!(e);
        // use_sts_region_from_client would ignore sts_endpoint: keep it off, name the region.
        client["use_sts_region_from_client"] = json!(false);
    }
    if let Some(r) = &access.aws_sts_region {
        client["sts_region"] = json!(r);
    }
    if let Some(e) = &access.aws_iam_endpoint {
        client["iam_endpoint"] = json!(e);
    }
    if let Some(h) = &access.aws_iam_server_id_header_value {
        client["iam_server_id_header_value"] = json!(h);
    }
    let mut calls = Vec::new();
    if let (Some(sha), Some(cmd)) = (&access.aws_plugin_sha256, &access.aws_plugin_command) {
        // OpenBao has no built-in AWS auth: register its external plugin, pinned by SHA-256,
        // so a swapped binary in plugin_directory is refused by the server.
        calls.push(call(
            Method::PUT,
            "sys/plugins/catalog/auth/aws",
            json!({"sha256": sha, "command": cmd}),
        ));
    }
    calls.extend([
        call(
            Method::POST,
            format!("sys/auth/{AWS_MOUNT}"),
            json!({"type": "aws", "description": "operators via IAM (vault-bootstrap)"}),
        ),
        call(
            Method::POST,
            format!("auth/{AWS_MOUNT}/config/client"),
            client,
        ),
    ]);
    calls.push(call(
        Method::POST,
        format!("auth/{AWS_MOUNT}/role/operators"),
        json!({
            "auth_type": "iam",
            // Role ARNs, never assumed-role session ARNs; resolve_aws_unique_ids is left at
            // its default because it cannot be turned off again once on.
            "bound_iam_principal_arn": access.aws_role_arns,
            "token_policies": [policy],
            "token_ttl": "1h",
            "token_max_ttl": "8h",
        }),
    ));
    calls
}

async fn run(local: &VaultClient, root: &Secret, calls: &[Call]) -> Result<()> {
    for c in calls {
        let (status, body) = local
            .call(c.method.clone(), &c.path, Some(root), Some(c.body.clone()))
            .await?;
        let already = status == 400
            && body["errors"]
                .to_string()
                .contains("path is already in use");
        if !(200..300).contains(&status) && !already {
            return Err(Error::Init {
                message: format!(
                    "{} {} answered HTTP {status}: {}",
                    c.method, c.path, body["errors"]
                ),
                retriable: false,
            });
        }
    }
    Ok(())
}

/// Whether `auth/cert` is mounted, the operators' role holds `ca_pem` and carries the policy.
async fn cert_reads_back(
    local: &VaultClient,
    root: &Secret,
    access: &AccessConfig,
    ca_pem: &str,
) -> Result<bool> {
    let (s, auths) = local
        .call(Method::GET, "sys/auth", Some(root), None)
        .await?;
    let mounted = s == 200
        && (auths.get(format!("{CERT_MOUNT}/")).is_some()
            || auths["data"].get(format!("{CERT_MOUNT}/")).is_some());
    let (s, role) = local
        .call(
            Method::GET,
            &format!("auth/{CERT_MOUNT}/certs/{CERT_ROLE}"),
            Some(root),
            None,
        )
        .await?;
    let ca_ok =
        s == 200 && role["data"]["certificate"].as_str().map(str::trim) == Some(ca_pem.trim());
    let names_ok = role["data"]["allowed_common_names"] == json!(access.operator_common_names);
    let policy_ok = role["data"]["token_policies"]
        .as_array()
        .is_some_and(|p| p.iter().any(|v| v == access.policy_name()));
    let (s, _) = local
        .call(
            Method::GET,
            &format!("sys/policies/acl/{}", access.policy_name()),
            Some(root),
            None,
        )
        .await?;
    Ok(mounted && ca_ok && names_ok && policy_ok && s == 200)
}

/// Configures every operator login path the config asks for; returns the ones that read
/// back as written. `operator_ca_pem` is the operator CA fetched from S3 (if configured).
/// The operator CA (`access.operator_ca_key`) from the resources bucket, refused when it is
/// the cluster CA. Called before `sys/init` too: a refusal then comes while no key exists,
/// not with a cluster initialized and its root token kept.
pub async fn operator_ca<S: crate::aws::s3::ObjectStore>(
    cfg: &Config,
    s3: &S,
) -> Result<Option<String>> {
    let Some(key) = &cfg.access.operator_ca_key else {
        return Ok(None);
    };
    let aws = std::time::Duration::from_secs(cfg.agent.aws_timeout_secs);
    let object = format!("s3://{}/{key}", cfg.tls.bucket);
    let pem = crate::retry::retry("fetch the operator CA", aws, || {
        s3.get(&cfg.tls.bucket, key)
    })
    .await?;
    let pem = String::from_utf8(pem).map_err(|_| Error::OperatorCa {
        object: object.clone(),
        problem: "not a PEM text file".into(),
    })?;
    let cluster_ca = crate::tls::paths(&cfg.vault.tls_dir).2;
    let cluster_pem = std::fs::read(&cluster_ca).map_err(|e| Error::NoInput {
        message: format!(
            "cannot read the cluster CA {} to check the operator CA against it ({e}); boot writes it before the server starts",
            cluster_ca.display()
        ),
    })?;
    check_separate(&pem, &cluster_pem).map_err(|problem| Error::OperatorCa { object, problem })?;
    Ok(Some(pem))
}

/// Writes the operator login paths; `operator_ca_pem` comes from [`operator_ca`] (checked).
pub async fn configure(
    cfg: &Config,
    local: &VaultClient,
    root: &Secret,
    operator_ca_pem: Option<&str>,
) -> Result<Vec<String>> {
    let access = &cfg.access;
    let mut ready = Vec::new();
    if operator_ca_pem.is_some() || !access.aws_role_arns.is_empty() {
        run(local, root, &[admin_policy_call(access.policy_name())]).await?;
    }
    if let Some(ca) = operator_ca_pem {
        run(local, root, &cert_calls(access, ca)).await?;
        if cert_reads_back(local, root, access, ca).await? {
            tracing::info!(
                policy = access.policy_name(),
                common_names = ?access.operator_common_names,
                "operator login: cert auth bound to the operator CA"
            );
            ready.push("cert".to_string());
        } else {
            tracing::error!("operator login: cert auth did not read back as written");
        }
    }
    if !access.aws_role_arns.is_empty() {
        match run(local, root, &aws_calls(access)).await {
            Ok(()) => {
                let (s, role) = local
                    .call(
                        Method::GET,
                        &format!("auth/{AWS_MOUNT}/role/operators"),
                        Some(root),
                        None,
                    )
                    .await?;
                if s == 200
                    && role["data"]["bound_iam_principal_arn"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
                {
                    tracing::info!(roles = ?access.aws_role_arns, "operator login: AWS IAM auth");
                    ready.push("aws".to_string());
                }
            }
            Err(e) if e.to_string().contains("plugin not found") => {
                tracing::warn!("this server has no AWS auth method (OpenBao needs its external plugin); operators log in with cert auth");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(ready)
}

/// Whether the recovery-key path to a new root token is open on this server.
pub async fn break_glass_open(local: &VaultClient) -> bool {
    matches!(
        local
            .call(Method::GET, "sys/generate-root/attempt", None, None)
            .await,
        Ok((200, _))
    )
}

/// Decodes the `encoded_token` of a finished generate-root with its OTP (XOR after base64).
pub fn decode_root_token(encoded: &str, otp: &str) -> Option<Secret> {
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let bytes = engines.iter().find_map(|e| e.decode(encoded.trim()).ok())?;
    if bytes.len() != otp.len() {
        return None;
    }
    let token: Vec<u8> = bytes
        .iter()
        .zip(otp.as_bytes())
        .map(|(a, b)| a ^ b)
        .collect();
    String::from_utf8(token).ok().map(Secret::new)
}

/// How long `break-glass` waits out answers that mean "not now": a standby that does not know
/// the active node yet (HTTP 500 "active cluster node not found" right after a leader
/// change), a forward to an active node that just went away, a server still unsealing, rate
/// limiting (429). A raft election settles in seconds; 60 s also covers a node of the
/// cluster restarting meanwhile, and is still short for an operator at a terminal.
pub const SETTLE_BOUND: Duration = Duration::from_secs(60);

/// Whether an answer (or no answer) of the cluster may change by itself shortly.
fn transient(r: &Result<(u16, Value)>) -> bool {
    match r {
        Ok((s, _)) => *s == 429 || *s >= 500,
        Err(_) => true,
    }
}

/// One unauthenticated call, repeated (with backoff) while its answer is [`transient`] and
/// `bound` allows; returns the last answer. Only the server's `errors` are logged: a
/// generate-root answer carries the OTP and the encoded token.
async fn call_settled(
    local: &VaultClient,
    method: Method,
    path: &str,
    body: Option<Value>,
    bound: Duration,
) -> Result<(u16, Value)> {
    let start = Instant::now();
    // Elections take a second or two: poll fast first, then at most every 4 s.
    let mut backoff =
        crate::retry::Backoff::new(Duration::from_millis(250), Duration::from_secs(4));
    loop {
        let r = local.call(method.clone(), path, None, body.clone()).await;
        let delay = backoff.next_delay();
        if !transient(&r) || start.elapsed() + delay > bound {
            return r;
        }
        let answer = match &r {
            Ok((s, b)) => format!("HTTP {s} {}", b["errors"]),
            Err(e) => e.to_string(),
        };
        tracing::warn!(
            call = %format!("{method} {path}"),
            retry_in_ms = delay.as_millis() as u64,
            waited_secs = start.elapsed().as_secs(),
            "the cluster is not ready for this yet (a leader change?), waiting: {answer}"
        );
        tokio::time::sleep(delay).await;
    }
}

/// Runs a whole generate-root with `shares` (unauthenticated endpoints); returns the new root
/// token. Fails, naming the progress, when the shares do not reach the threshold. Transient
/// answers (no active node yet, 5xx, 429) are waited out for up to `settle` per call.
pub async fn generate_root(
    local: &VaultClient,
    shares: &[Secret],
    settle: Duration,
) -> Result<Secret> {
    let fail = |message: String| Error::Init {
        message,
        retriable: false,
    };
    // An answer still transient after `settle`: say so, and let a later run try again (75).
    let refused = |call: &str, s: u16, body: &Value, hint: &str| {
        let retriable = s == 429 || s >= 500;
        let hint = if retriable {
            format!(
                "; still so after waiting {} s: does the cluster have an active node? Run break-glass again once it has",
                settle.as_secs()
            )
        } else {
            hint.to_owned()
        };
        Error::Init {
            message: format!("{call} answered HTTP {s}: {}{hint}", body["errors"]),
            retriable,
        }
    };
    // A stale attempt (someone else's, or an interrupted one) would swallow our shares.
    let _ = call_settled(
        local,
        Method::DELETE,
        "sys/generate-root/attempt",
        None,
        settle,
    )
    .await;
    let (s, att) = call_settled(
        local,
        Method::PUT,
        "sys/generate-root/attempt",
        Some(json!({})),
        settle,
    )
    .await?;
    if s != 200 {
        return Err(refused(
            "sys/generate-root/attempt",
            s,
            &att,
            " (on OpenBao the listener needs disable_unauthed_generate_root_endpoints = false, which boot renders)",
        ));
    }
    let nonce = att["nonce"].as_str().unwrap_or_default().to_string();
    let otp = Secret::new(att["otp"].as_str().unwrap_or_default());
    let required = att["required"].as_u64().unwrap_or(0);
    let mut last = Value::Null;
    for share in shares {
        let (s, body) = call_settled(
            local,
            Method::PUT,
            "sys/generate-root/update",
            Some(json!({"key": share.expose(), "nonce": nonce})),
            settle,
        )
        .await?;
        if s != 200 {
            return Err(refused("sys/generate-root/update", s, &body, ""));
        }
        last = body;
        if last["complete"].as_bool() == Some(true) {
            break;
        }
    }
    if last["complete"].as_bool() != Some(true) {
        let progress = last["progress"].as_u64().unwrap_or(0);
        let _ = local
            .call(Method::DELETE, "sys/generate-root/attempt", None, None)
            .await;
        return Err(fail(format!(
            "{progress} of the {required} recovery keys needed were accepted; no root token was generated"
        )));
    }
    let encoded = last["encoded_token"]
        .as_str()
        .or_else(|| last["encoded_root_token"].as_str())
        .unwrap_or_default();
    decode_root_token(encoded, otp.expose())
        .ok_or_else(|| fail("the encoded root token does not decode with the OTP".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> AccessConfig {
        AccessConfig {
            aws_role_arns: vec!["arn:aws:iam::123456789012:role/vault-operators".into()],
            aws_sts_endpoint: Some("https://sts.us-east-1.amazonaws.com".into()),
            aws_sts_region: Some("us-east-1".into()),
            aws_iam_endpoint: Some("https://iam.amazonaws.com".into()),
            aws_iam_server_id_header_value: Some("vault.internal".into()),
            ..Default::default()
        }
    }

    fn golden(name: &str, actual: &str) {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/access")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, actual).unwrap();
        }
        let expected =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(actual, expected, "golden file {name} differs");
    }

    fn render(calls: &[Call]) -> String {
        calls
            .iter()
            .map(|c| {
                format!(
                    "{} /v1/{}\n{}\n",
                    c.method,
                    c.path,
                    serde_json::to_string_pretty(&c.body).unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn golden_aws_auth_calls_for_vault() {
        let calls = aws_calls(&access());
        golden("aws-auth-calls.txt", &render(&calls));
        let client = &calls
            .iter()
            .find(|c| c.path.ends_with("config/client"))
            .unwrap()
            .body;
        assert_eq!(
            client["sts_endpoint"],
            "https://sts.us-east-1.amazonaws.com"
        );
        assert_eq!(client["use_sts_region_from_client"], false);
        assert_eq!(client["iam_server_id_header_value"], "vault.internal");
        assert!(aws_calls(&AccessConfig::default()).is_empty());
    }

    #[test]
    fn golden_aws_auth_calls_for_openbao_with_a_pinned_plugin() {
        let mut a = access();
        a.aws_plugin_sha256 = Some("ab".repeat(32));
        a.aws_plugin_command = Some("openbao-plugin-auth-aws".into());
        let calls = aws_calls(&a);
        assert_eq!(calls[0].path, "sys/plugins/catalog/auth/aws");
        golden("aws-auth-calls-openbao-plugin.txt", &render(&calls));
    }

    #[test]
    fn golden_cert_auth_calls() {
        let a = AccessConfig {
            operator_ca_key: Some("tls/operator-ca.pem".into()),
            operator_common_names: vec!["alice".into(), "bob".into()],
            ..Default::default()
        };
        let calls = cert_calls(
            &a,
            "-----BEGIN CERTIFICATE-----\nMII...\n-----END CERTIFICATE-----\n",
        );
        golden("cert-auth-calls.txt", &render(&calls));
        assert_eq!(
            calls[1].body["allowed_common_names"],
            json!(["alice", "bob"])
        );
    }

    #[test]
    fn the_cluster_ca_is_refused_as_operator_ca() {
        use crate::tls::testcerts;
        let cluster = testcerts::ca();
        let operators = testcerts::ca();
        // A separate CA passes, also beside a rotation's two cluster CAs.
        assert_eq!(
            check_separate(&operators.pem, cluster.pem.as_bytes()),
            Ok(())
        );
        let rotation = format!("{}{}", testcerts::ca().pem, cluster.pem);
        assert_eq!(check_separate(&operators.pem, rotation.as_bytes()), Ok(()));
        // The same certificate, alone or in a bundle on either side.
        let e = check_separate(&cluster.pem, cluster.pem.as_bytes()).unwrap_err();
        assert!(e.contains("is the cluster CA"), "{e}");
        let bundle = format!("{}{}", operators.pem, cluster.pem);
        assert!(check_separate(&bundle, cluster.pem.as_bytes()).is_err());
        assert!(check_separate(&operators.pem, bundle.as_bytes()).is_err());
        // Re-issued: same subject and key, another serial and validity -> other bytes.
        let mut params = cluster.params.clone();
        params.serial_number = Some(rcgen::SerialNumber::from(vec![7u8, 7, 7]));
        let reissued = params.self_signed(&cluster.key).unwrap().pem();
        assert_ne!(reissued, cluster.pem);
        let e = check_separate(&reissued, cluster.pem.as_bytes()).unwrap_err();
        assert!(e.contains("re-issued"), "{e}");
        // Same subject, another key: a different CA (its certificates do not chain to ours).
        let other = testcerts::ca();
        assert_eq!(check_separate(&other.pem, cluster.pem.as_bytes()), Ok(()));
        // Not a certificate at all: refused with the reason.
        let e = check_separate("not a pem", cluster.pem.as_bytes()).unwrap_err();
        assert!(e.contains("operator CA: no PEM CERTIFICATE block"), "{e}");
    }

    #[test]
    fn refusing_the_operator_ca_is_a_config_error() {
        let e = Error::OperatorCa {
            object: "s3://b/tls/ca.pem".into(),
            problem: "it is the cluster CA".into(),
        };
        assert_eq!(e.exit_code(), 78);
        let m = e.to_string();
        assert!(
            m.contains("s3://b/tls/ca.pem") && m.contains("access.operator_ca_key"),
            "{m}"
        );
    }

    #[test]
    fn golden_admin_policy_call() {
        let calls = [admin_policy_call(AccessConfig::default().policy_name())];
        golden("admin-policy-call.txt", &render(&calls));
        // The login paths attach it but do not write it again.
        let cert = cert_calls(&AccessConfig::default(), "pem");
        assert!(cert
            .iter()
            .chain(aws_calls(&access()).iter())
            .all(|c| !c.path.starts_with("sys/policies/")));
    }

    #[test]
    fn the_admin_policy_is_not_root() {
        assert!(!ADMIN_POLICY.contains("\"root\""));
        assert!(ADMIN_POLICY.contains("path \"sys/*\""));
    }

    #[test]
    fn answers_that_change_by_themselves_are_waited_out() {
        let answer = |s: u16| Ok((s, Value::Null));
        // No active node yet (standby after a leader change), sealed, rate limited, no answer.
        for s in [500, 502, 503, 429] {
            assert!(transient(&answer(s)), "{s}");
        }
        assert!(transient(&Err(Error::Internal(
            "connection refused".into()
        ))));
        // Answers that mean it: done, bad request (wrong key), forbidden, not found.
        for s in [200, 204, 400, 403, 404] {
            assert!(!transient(&answer(s)), "{s}");
        }
    }

    #[test]
    fn otp_decoding_is_xor_after_base64() {
        let otp = "abcdefghijklmnopqrstuvwxyz12";
        let token = "s.0123456789abcdefghijklmnop";
        let xored: Vec<u8> = token.bytes().zip(otp.bytes()).map(|(a, b)| a ^ b).collect();
        let encoded = base64::engine::general_purpose::STANDARD.encode(xored);
        assert_eq!(decode_root_token(&encoded, otp).unwrap().expose(), token);
        let no_pad = base64::engine::general_purpose::STANDARD_NO_PAD.encode(
            token
                .bytes()
                .zip(otp.bytes())
                .map(|(a, b)| a ^ b)
                .collect::<Vec<_>>(),
        );
        assert_eq!(decode_root_token(&no_pad, otp).unwrap().expose(), token);
        assert!(decode_root_token(&encoded, "short").is_none());
    }
}
