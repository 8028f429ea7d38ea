//! `vault-bootstrap doctor`: preflight checks, one PASS/FAIL line each, exit 0 only if all
//! pass. Every AWS call is harmless (reads, DescribeKey). Nothing is written.

use crate::aws::ec2::{Ec2Api, SdkEc2};
use crate::aws::kms::{Kms, SdkKms};
use crate::aws::s3::{ObjectStore, SdkS3};
use crate::config::Config;
use crate::error::Result;
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
}

pub async fn run(cfg: &Config) -> Result<i32> {
    let mut r = Report { failed: 0 };
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
    let _ = writeln!(
        std::io::stdout(),
        "{}",
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
