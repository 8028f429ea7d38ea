//! `vault-bootstrap doctor`: preflight checks, one line each, exit 0 only if none fails.
//! A line is `PASS`, `FAIL` (counted: exit 1) or `WARN` (a risk worth fixing that does not
//! stop a node from working, e.g. recovery shares not PGP-wrapped; not counted). Every AWS
//! call is harmless (reads, DescribeKey). Nothing is written.

use crate::aws::ec2::{Ec2Api, SdkEc2};
use crate::aws::kms::{Kms, SdkKms};
use crate::aws::s3::{ObjectStore, SdkS3};
use crate::config::Config;
use crate::error::Result;
use crate::escrow::Layout;
use crate::imds::{self, SdkImds};
use crate::{node, tls};
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};
use tokio::net::TcpStream;

/// Exit code when any check fails.
pub const FAILED: i32 = 1;

/// Clock skew beyond this breaks SigV4 signing (AWS allows 5 minutes) and TLS validity.
const MAX_SKEW_SECS: i64 = 60;

struct Report {
    failed: usize,
    warned: usize,
}

impl Report {
    fn line(&mut self, ok: bool, name: &str, detail: impl std::fmt::Display) {
        if !ok {
            self.failed += 1;
        }
        let _ = writeln!(
            std::io::stdout(),
            "{} {name}: {detail}",
            if ok { "PASS" } else { "FAIL" }
        );
    }

    /// A risk the operator should fix, that does not fail doctor (exit code unchanged).
    fn warn(&mut self, name: &str, detail: impl std::fmt::Display) {
        self.warned += 1;
        let _ = writeln!(std::io::stdout(), "WARN {name}: {detail}");
    }
}

pub async fn run(cfg: &Config) -> Result<i32> {
    let mut r = Report {
        failed: 0,
        warned: 0,
    };
    // Short bounds: a doctor answers quickly; boot is the one that waits.
    let quick = Duration::from_secs(5);
    let md = SdkImds::new();
    let facts = match imds::instance_facts(&md, quick).await {
        Ok(f) => {
            r.line(
                true,
                "imds",
                format!(
                    "IMDSv2 token and facts: {} {} {}",
                    f.instance_id, f.availability_zone, f.local_ipv4
                ),
            );
            f
        }
        Err(e) => {
            r.line(false, "imds", e);
            r.line(
                false,
                "rest",
                "skipped: every other check needs the instance facts",
            );
            return Ok(FAILED);
        }
    };
    let sdk = crate::aws::sdk_config(
        &facts.region,
        Duration::from_secs(cfg.agent.aws_timeout_secs),
    )
    .await;
    let (ec2, s3, kms) = (SdkEc2::new(&sdk), SdkS3::new(&sdk), SdkKms::new(&sdk));

    let tag = node::tag_value(cfg, &md, &ec2, &facts).await;
    match &tag {
        Ok(v) => r.line(true, "tag", format!("{}={v}", cfg.cluster.tag_key)),
        Err(e) => r.line(false, "tag", e),
    }
    match ec2.instance_state(&facts.instance_id).await {
        Ok(Some(s)) => r.line(
            true,
            "iam ec2",
            format!("DescribeInstances: this instance is {s}"),
        ),
        Ok(None) => r.line(
            false,
            "iam ec2",
            "DescribeInstances does not know this instance",
        ),
        Err(e) => r.line(false, "iam ec2", e),
    }

    let mut objects = Vec::new();
    for key in [&cfg.tls.cert_key, &cfg.tls.key_key, &cfg.tls.ca_key] {
        match s3.get(&cfg.tls.bucket, key).await {
            Ok(b) => objects.push(b),
            Err(e) => r.line(false, "iam s3", e),
        }
    }
    if objects.len() == 3 {
        r.line(
            true,
            "iam s3",
            format!(
                "GetObject: the three TLS objects in s3://{}",
                cfg.tls.bucket
            ),
        );
        let m = tls::Material {
            ca_pem: objects.pop().unwrap_or_default(),
            key_pem: zeroize::Zeroizing::new(objects.pop().unwrap_or_default()),
            cert_pem: objects.pop().unwrap_or_default(),
        };
        let expect = tls::Expect {
            ip: facts.local_ipv4,
            server_name: cfg.tls.server_name.as_deref(),
        };
        match tls::check(
            &m,
            &tls::Sources::from_config(&cfg.tls),
            &expect,
            SystemTime::now(),
        ) {
            Ok(c) => r.line(
                true,
                "tls",
                format!(
                    "valid, matching, chains to the CA; {} days left",
                    tls::days_left(&c, SystemTime::now())
                ),
            ),
            Err(e) => r.line(false, "tls", e),
        }
    } else {
        r.line(false, "tls", "skipped: the TLS objects could not be read");
    }

    for (name, key) in [
        ("kms seal", cfg.seal.kms_key_id.as_str()),
        ("kms escrow", cfg.escrow_kms_key_id()),
    ] {
        match kms.describe(key).await {
            Ok(arn) => r.line(true, name, format!("DescribeKey {key}: {arn}")),
            Err(e) => r.line(false, name, e),
        }
    }

    match &tag {
        Ok(cluster) => {
            let (ok, detail) =
                escrow_write_once(&aws_sdk_s3::Client::new(&sdk), &Layout::new(cfg, cluster)).await;
            r.line(ok, "escrow write-once", detail);
        }
        Err(_) => r.line(
            false,
            "escrow write-once",
            "skipped: the escrow prefix is named after the cluster tag value",
        ),
    }
    let pgp = &cfg.init.recovery_pgp_keys;
    if pgp.is_empty() {
        r.warn(
            "recovery pgp",
            "init.recovery_pgp_keys is empty: the recovery shares are escrowed under KMS only, not PGP-wrapped to their holders, so whoever may decrypt the escrow (the operator role) reads every share; list one public key per holder (docs/security.md \"Recommendation: PGP-wrap the shares in production\")",
        );
    } else {
        r.line(
            true,
            "recovery pgp",
            format!(
                "init.recovery_pgp_keys names {} holders: the server PGP-wraps each share to its holder at init",
                pgp.len()
            ),
        );
    }

    match clock_skew(&sdk, &facts.region).await {
        Ok(skew) => r.line(
            skew.abs() <= MAX_SKEW_SECS,
            "clock",
            format!("{skew:+} s against an AWS response Date (limit {MAX_SKEW_SECS} s)"),
        ),
        Err(e) => r.line(false, "clock", e),
    }

    if let Ok(v) = &tag {
        match ec2.instances_tagged(&cfg.cluster.tag_key, v).await {
            Ok(instances) => {
                let peers = crate::discovery::to_peers(instances, &facts.instance_id);
                let mut closed = Vec::new();
                for p in peers.iter().filter(|p| !p.is_self) {
                    for port in [cfg.vault.api_port, cfg.vault.cluster_port] {
                        let addr = SocketAddr::new(p.ip, port);
                        if !matches!(
                            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
                                .await,
                            Ok(Ok(_))
                        ) {
                            closed.push(addr.to_string());
                        }
                    }
                }
                let others = peers.iter().filter(|p| !p.is_self).count();
                if closed.is_empty() {
                    r.line(
                        true,
                        "peers",
                        format!(
                            "{others} peer(s) reachable on ports {} and {}",
                            cfg.vault.api_port, cfg.vault.cluster_port
                        ),
                    );
                } else {
                    r.line(
                        false,
                        "peers",
                        format!(
                            "not reachable: {}; check security groups and the peers' servers",
                            closed.join(", ")
                        ),
                    );
                }
            }
            Err(e) => r.line(false, "peers", e),
        }
    }

    match crate::launcher::check_binary(&cfg.vault.binary) {
        Err(e) => r.line(false, "vault binary", e),
        Ok(()) => {
            let out = crate::launcher::binary_command(&cfg.vault.binary)
                .arg("version")
                .output()
                .await;
            match out {
                Ok(o) if o.status.success() => {
                    let v = String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_owned();
                    r.line(
                        true,
                        "vault binary",
                        format!("{}: {v}", cfg.vault.binary.display()),
                    );
                }
                Ok(o) => r.line(
                    false,
                    "vault binary",
                    format!("{} version exited {}", cfg.vault.binary.display(), o.status),
                ),
                Err(e) => r.line(false, "vault binary", e),
            }
        }
    }
    let warnings = match r.warned {
        0 => String::new(),
        n => format!(", {n} warning(s)"),
    };
    let _ = writeln!(
        std::io::stdout(),
        "{}{warnings}",
        if r.failed == 0 {
            "all checks passed".to_string()
        } else {
            format!("{} check(s) failed", r.failed)
        }
    );
    Ok(if r.failed == 0 { 0 } else { FAILED })
}

/// Our clock minus the Date of an AWS endpoint's answer (any answer carries one).
async fn clock_skew(sdk: &aws_config::SdkConfig, region: &str) -> std::result::Result<i64, String> {
    let url = sdk
        .endpoint_url()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client
        .head(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let date = resp
        .headers()
        .get("date")
        .and_then(|d| d.to_str().ok())
        .ok_or_else(|| format!("{url} sent no Date header"))?;
    let theirs =
        aws_smithy_types::DateTime::from_str(date, aws_smithy_types::date_time::Format::HttpDate)
            .map_err(|e| format!("Date {date:?}: {e}"))?;
    let ours = crate::clock::now_unix() as i64;
    Ok(ours - theirs.secs())
}

/// The shipped bucket policy, named in every FAIL of the write-once check.
const BUCKET_POLICY_EXAMPLE: &str = "packer/examples/escrow-bucket-policy.json";

/// Which write-once control S3 enforces on the escrow prefix: the bucket policy's Deny
/// statements, S3 Object Lock with a default retention, both, or neither (FAIL). Returns
/// (ok, the line's detail).
async fn escrow_write_once(s3: &aws_sdk_s3::Client, layout: &Layout) -> (bool, String) {
    let bucket = &layout.bucket;
    let prefix = layout.url(&layout.prefix);
    // A real item's key: a Deny statement must cover the objects the agent writes.
    let probe = layout.object(&Layout::share_item(1));
    let mut in_force = Vec::new();
    let mut missing = Vec::new();
    match bucket_controls::policy(s3, bucket).await {
        Ok(Some(text)) => match policy_write_once(&text, bucket, &probe) {
            Ok(()) => in_force.push(format!(
                "bucket policy (Deny s3:PutObject without s3:if-none-match, Deny s3:DeleteObject and s3:DeleteObjectVersion, for every principal, on {prefix})"
            )),
            Err(gaps) => missing.push(format!("the bucket policy of s3://{bucket} {gaps}")),
        },
        Ok(None) => missing.push(format!("s3://{bucket} has no bucket policy")),
        Err(e) => missing.push(format!("bucket policy not readable: {e}")),
    }
    match bucket_controls::object_lock(s3, bucket).await {
        Ok(ObjectLock::Retention(how)) => in_force.push(format!("S3 Object Lock, {how}")),
        Ok(ObjectLock::NoDefaultRetention) => missing.push(format!(
            "S3 Object Lock is enabled on s3://{bucket} but has no default retention (objects the agent writes are not locked)"
        )),
        Ok(ObjectLock::Off) => missing.push(format!("s3://{bucket} has no S3 Object Lock")),
        Err(e) => missing.push(format!("Object Lock configuration not readable: {e}")),
    }
    if in_force.is_empty() {
        (
            false,
            format!(
                "neither the write-once bucket policy nor S3 Object Lock is in force on {prefix}: a node's credentials may overwrite or delete escrow objects. {}. Apply {BUCKET_POLICY_EXAMPLE} (docs/operations.md \"Escrow bucket policy\") or Object Lock with a default retention (\"S3 Object Lock instead, or as well\")",
                missing.join("; ")
            ),
        )
    } else {
        (true, in_force.join("; and "))
    }
}

/// What `GetObjectLockConfiguration` says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ObjectLock {
    /// Enabled with a default retention: the mode and period, as text.
    Retention(String),
    NoDefaultRetention,
    Off,
}

/// The two bucket-configuration reads doctor needs, on the SDK client directly: the
/// `ObjectStore` seam (`crate::aws::s3`) carries only what the agent does to objects.
mod bucket_controls {
    use super::ObjectLock;
    use aws_sdk_s3::types::{ObjectLockEnabled, ObjectLockRetentionMode};
    use aws_smithy_types::error::metadata::ProvideErrorMetadata;

    /// The bucket's policy document; `None` when it has none.
    pub(super) async fn policy(
        s3: &aws_sdk_s3::Client,
        bucket: &str,
    ) -> Result<Option<String>, crate::error::Error> {
        match s3.get_bucket_policy().bucket(bucket).send().await {
            Ok(out) => Ok(out.policy().map(str::to_owned)),
            Err(e) if e.code() == Some("NoSuchBucketPolicy") => Ok(None),
            Err(e) => Err(crate::aws::sdk_error(
                "GetBucketPolicy",
                format!("s3://{bucket}"),
                e,
            )),
        }
    }

    pub(super) async fn object_lock(
        s3: &aws_sdk_s3::Client,
        bucket: &str,
    ) -> Result<ObjectLock, crate::error::Error> {
        let out = match s3
            .get_object_lock_configuration()
            .bucket(bucket)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.code() == Some("ObjectLockConfigurationNotFoundError") => {
                return Ok(ObjectLock::Off)
            }
            Err(e) => {
                return Err(crate::aws::sdk_error(
                    "GetObjectLockConfiguration",
                    format!("s3://{bucket}"),
                    e,
                ))
            }
        };
        let Some(conf) = out
            .object_lock_configuration()
            .filter(|c| c.object_lock_enabled() == Some(&ObjectLockEnabled::Enabled))
        else {
            return Ok(ObjectLock::Off);
        };
        let Some(d) = conf.rule().and_then(|r| r.default_retention()) else {
            return Ok(ObjectLock::NoDefaultRetention);
        };
        // S3 sets one of Days and Years; moto answers the other as 0.
        let period = match (d.days().filter(|n| *n > 0), d.years().filter(|n| *n > 0)) {
            (Some(n), _) => format!("{n} day(s)"),
            (None, Some(n)) => format!("{n} year(s)"),
            (None, None) => return Ok(ObjectLock::NoDefaultRetention),
        };
        Ok(ObjectLock::Retention(match d.mode() {
            Some(ObjectLockRetentionMode::Compliance) => {
                format!("COMPLIANCE, default retention {period}")
            }
            Some(ObjectLockRetentionMode::Governance) => format!(
                "GOVERNANCE, default retention {period} (a principal with s3:BypassGovernanceRetention can still delete versions)"
            ),
            Some(other) => format!("{}, default retention {period}", other.as_str()),
            None => return Ok(ObjectLock::NoDefaultRetention),
        }))
    }
}

/// `Ok` when the bucket policy `text` holds, for every principal, a Deny of `s3:PutObject`
/// without `If-None-Match` and unconditioned Denies of `s3:DeleteObject` and
/// `s3:DeleteObjectVersion`, each covering `s3://bucket/key`; else what is missing. Only
/// plain statements count: one with `NotAction`, `NotResource` or `NotPrincipal`, a
/// narrower principal, or further conditions (which narrow a Deny) is not taken as that rule.
fn policy_write_once(text: &str, bucket: &str, key: &str) -> std::result::Result<(), String> {
    let doc: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("is not JSON ({e})"))?;
    let statements = match &doc["Statement"] {
        serde_json::Value::Array(a) => a.clone(),
        s @ serde_json::Value::Object(_) => vec![s.clone()],
        _ => return Err("has no Statement".into()),
    };
    let object = format!("{bucket}/{key}");
    let (mut overwrite, mut delete, mut delete_version) = (false, false, false);
    for st in &statements {
        let plain = st["Effect"] == "Deny"
            && ["NotAction", "NotResource", "NotPrincipal"]
                .iter()
                .all(|k| st.get(k).is_none())
            && everyone(&st["Principal"])
            && strings(&st["Resource"])
                .iter()
                .any(|r| resource_matches(r, &object));
        if !plain {
            continue;
        }
        let actions = strings(&st["Action"]);
        let covers = |action: &str| {
            actions
                .iter()
                .any(|a| glob(&a.to_ascii_lowercase(), &action.to_ascii_lowercase()))
        };
        let condition = &st["Condition"];
        let unconditioned =
            condition.is_null() || condition.as_object().is_some_and(|c| c.is_empty());
        if covers("s3:PutObject") && only_no_if_none_match(condition) {
            overwrite = true;
        }
        if unconditioned {
            delete |= covers("s3:DeleteObject");
            delete_version |= covers("s3:DeleteObjectVersion");
            // An unconditioned Deny of PutObject forbids writing at all: write-once too,
            // though the agent could not escrow under it.
            overwrite |= covers("s3:PutObject");
        }
    }
    let mut gaps = Vec::new();
    if !overwrite {
        gaps.push("no Deny of s3:PutObject when s3:if-none-match is absent (\"Null\": {\"s3:if-none-match\": \"true\"})");
    }
    if !delete {
        gaps.push("no Deny of s3:DeleteObject");
    }
    if !delete_version {
        gaps.push("no Deny of s3:DeleteObjectVersion");
    }
    if gaps.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "has, for every principal on s3://{object}, {}",
            gaps.join(", ")
        ))
    }
}

/// A string or a list of strings, as policies write `Action` and `Resource`.
fn strings(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// `"*"`, or `{"AWS": "*"}` (or `["*"]`): the statement binds every principal.
fn everyone(p: &serde_json::Value) -> bool {
    p == "*" || strings(&p["AWS"]).iter().any(|a| a == "*")
}

/// Whether the policy resource `pattern` covers the object `bucket/key`, in any partition.
fn resource_matches(pattern: &str, object: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    // arn:PARTITION:s3:::bucket/key; the partition (aws, aws-cn, ...) does not matter here.
    let mut parts = pattern.splitn(6, ':');
    let (Some("arn"), Some(_), Some(service), Some(""), Some(""), Some(rest)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    glob(service, "s3") && glob(rest, object)
}

/// The condition is exactly `{"Null": {"s3:if-none-match": "true"}}`: a put without the
/// header (an overwrite) is denied, whatever else the request says.
fn only_no_if_none_match(condition: &serde_json::Value) -> bool {
    let Some(ops) = condition.as_object() else {
        return false;
    };
    let Some(null) = ops.get("Null").and_then(|n| n.as_object()) else {
        return false;
    };
    let truthy = |v: &serde_json::Value| match v {
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::String(s) => s.eq_ignore_ascii_case("true"),
        serde_json::Value::Array(a) => a.len() == 1 && a.iter().all(|x| x == "true" || x == true),
        _ => false,
    };
    ops.len() == 1
        && null.len() == 1
        && null
            .iter()
            .all(|(k, v)| k.eq_ignore_ascii_case("s3:if-none-match") && truthy(v))
}

/// IAM wildcard matching: `*` any run of characters, `?` any one.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it has swallowed up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "vault-bootstrap/prod-vault/recovery-key-1.enc";

    fn shipped() -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(BUCKET_POLICY_EXAMPLE);
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn the_shipped_bucket_policy_is_recognised() {
        assert_eq!(
            policy_write_once(&shipped(), "acme-vault-resources", KEY),
            Ok(())
        );
        // Another cluster's prefix, another bucket: not covered.
        let e = policy_write_once(
            &shipped(),
            "acme-vault-resources",
            "vault-bootstrap/other/recovery-key-1.enc",
        )
        .unwrap_err();
        assert!(
            e.contains("s3:PutObject") && e.contains("s3:DeleteObject"),
            "{e}"
        );
        assert!(policy_write_once(&shipped(), "other-bucket", KEY).is_err());
    }

    fn without(sid: &str) -> String {
        let mut doc: serde_json::Value = serde_json::from_str(&shipped()).unwrap();
        doc["Statement"]
            .as_array_mut()
            .unwrap()
            .retain(|s| s["Sid"] != sid);
        doc.to_string()
    }

    #[test]
    fn each_missing_rule_is_named() {
        let e = policy_write_once(&without("EscrowWriteOnceOnly"), "acme-vault-resources", KEY)
            .unwrap_err();
        assert!(
            e.contains("s3:if-none-match") && !e.contains("DeleteObject"),
            "{e}"
        );
        let e = policy_write_once(&without("EscrowNeverDeleted"), "acme-vault-resources", KEY)
            .unwrap_err();
        assert!(
            e.contains("s3:DeleteObject,") && e.contains("s3:DeleteObjectVersion"),
            "{e}"
        );
        assert!(policy_write_once("{", "b", KEY)
            .unwrap_err()
            .contains("not JSON"));
    }

    #[test]
    fn narrower_statements_do_not_count() {
        let base = |principal: &str, extra: &str| {
            format!(
                r#"{{"Statement": [
                  {{"Effect": "Deny", "Principal": {principal}, "Action": "s3:PutObject",
                    "Resource": "arn:aws:s3:::b/vault-bootstrap/*",
                    "Condition": {{"Null": {{"s3:if-none-match": "true"}}{extra}}}}},
                  {{"Effect": "Deny", "Principal": {principal}, "Action": "s3:Delete*",
                    "Resource": "arn:aws:s3:::b/*"}}]}}"#
            )
        };
        let key = "vault-bootstrap/c/recovery-key-1.enc";
        // Wildcards in actions and resources, a single statement object, AWS: "*".
        assert_eq!(policy_write_once(&base("\"*\"", ""), "b", key), Ok(()));
        assert_eq!(
            policy_write_once(&base("{\"AWS\": \"*\"}", ""), "b", key),
            Ok(())
        );
        // Only some principals: the others may still overwrite and delete.
        let role = "{\"AWS\": \"arn:aws:iam::1:role/node\"}";
        assert!(policy_write_once(&base(role, ""), "b", key).is_err());
        // A further condition narrows the Deny (here: only over plain HTTP).
        let narrowed = base("\"*\"", ", \"Bool\": {\"aws:SecureTransport\": \"false\"}");
        let e = policy_write_once(&narrowed, "b", key).unwrap_err();
        assert!(e.contains("s3:if-none-match"), "{e}");
        // An Allow is not a Deny.
        let allow = base("\"*\"", "").replace("\"Deny\"", "\"Allow\"");
        assert!(policy_write_once(&allow, "b", key).is_err());
    }

    #[test]
    fn wildcards_match_as_iam_does() {
        assert!(glob("s3:*", "s3:putobject"));
        assert!(glob("s3:put?bject", "s3:putobject"));
        assert!(glob("b/*/recovery-*", "b/c/recovery-key-1.enc"));
        assert!(!glob("b/c/*", "b/d/x"));
        assert!(!glob("s3:put", "s3:putobject"));
        assert!(glob("*", ""));
        assert!(resource_matches("arn:aws-cn:s3:::b/*", "b/k"));
        assert!(!resource_matches("arn:aws:s3:::b", "b/k"));
        assert!(!resource_matches("arn:aws:kms:eu-west-1:1:key/x", "b/k"));
    }
}
