//! IMDSv2: the instance facts the boot path needs, read through the SDK's IMDS client
//! (IMDSv2 only, token cached, values as `SensitiveString`) wrapped in typed methods.
//!
//! The SDK retries 5xx for a few seconds per read and reports a failed token request only as
//! "failed to load IMDS session token" (a 5xx or a v1-only endpoint both look like `NoTtl`).
//! So the agent puts its own bounded retry loop around the reads and, when the token fails,
//! makes one diagnostic `PUT` itself to name the real cause. It never falls back to IMDSv1.

use crate::error::{Error, Result};
use crate::retry::{self, Backoff};
use aws_config::imds::client::error::ImdsError;
use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// What the boot path knows about this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceFacts {
    pub instance_id: String,
    pub region: String,
    pub availability_zone: String,
    pub local_ipv4: IpAddr,
}

/// One metadata read: `Ok(None)` when IMDS answers 404.
pub trait Metadata: Send + Sync {
    fn get(&self, path: &str) -> impl Future<Output = Result<Option<String>>> + Send;
}

/// The SDK's IMDS client (cloned with its cached session token).
#[derive(Clone, Debug)]
pub struct SdkImds {
    client: aws_config::imds::Client,
}

const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";

fn endpoint() -> String {
    std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned())
}

impl SdkImds {
    pub fn new() -> Self {
        SdkImds {
            client: aws_config::imds::Client::builder()
                // The SDK's own retries (3 attempts on 5xx) are kept short: the agent's
                // outer loop owns the deadline and the logging.
                .max_attempts(2)
                // The SDK waits 1 s for an answer by default; the IMDS of an instance that is
                // still booting (or of a loaded host) can take longer, and a timed-out token
                // request looks like a refused token. 5 s per request; the agent's loop and
                // `agent.imds_timeout_secs` bound the whole wait.
                .read_timeout(Duration::from_secs(5))
                .build(),
        }
    }
}

impl Default for SdkImds {
    fn default() -> Self {
        Self::new()
    }
}

impl Metadata for SdkImds {
    async fn get(&self, path: &str) -> Result<Option<String>> {
        let full = format!("/latest/{path}");
        match self.client.get(&full).await {
            Ok(v) => Ok(Some(String::from(v).trim().to_owned())),
            Err(ImdsError::ErrorResponse(r)) => {
                let status = r.response().status().as_u16();
                match status {
                    404 => Ok(None),
                    s => Err(Error::Imds {
                        what: format!("GET {full}"),
                        message: format!("HTTP {s} from {}", endpoint()),
                        retriable: s >= 500 || s == 401 || s == 429,
                        protocol: false,
                    }),
                }
            }
            Err(e @ ImdsError::FailedToLoadToken(_)) => Err(diagnose_token_failure(
                aws_smithy_types::error::display::DisplayErrorContext(&e).to_string(),
            )
            .await),
            Err(e) => Err(Error::Imds {
                what: format!("GET {full}"),
                message: format!(
                    "{} at {}: {}",
                    e,
                    endpoint(),
                    aws_smithy_types::error::display::DisplayErrorContext(&e)
                ),
                retriable: true,
                protocol: false,
            }),
        }
    }
}

/// Names the real cause of a failed IMDSv2 token request with one plain `PUT`.
async fn diagnose_token_failure(sdk_error: String) -> Error {
    let ep = endpoint();
    let url = format!("{}/latest/api/token", ep.trim_end_matches('/'));
    let what = "IMDSv2 token request (PUT /latest/api/token)".to_owned();
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    {
        Ok(c) => c,
        Err(e) => return Error::Internal(format!("HTTP client: {e}")),
    };
    let resp = client
        .put(&url)
        .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .send()
        .await;
    match resp {
        Err(e) => Error::Imds {
            what,
            message: format!("IMDS at {ep} is unreachable ({e}); it may still be starting"),
            retriable: true,
            protocol: false,
        },
        Ok(r) => {
            let status = r.status().as_u16();
            let has_ttl = r
                .headers()
                .contains_key("x-aws-ec2-metadata-token-ttl-seconds");
            match status {
                s if s >= 500 || s == 429 => Error::Imds {
                    what,
                    message: format!("IMDS at {ep} answered HTTP {s}"),
                    retriable: true,
                    protocol: false,
                },
                403 => Error::Imds {
                    what,
                    message: format!(
                        "IMDS at {ep} answered HTTP 403: instance metadata is disabled for this \
                         instance or the request was forwarded; enable it (HttpEndpoint=enabled)"
                    ),
                    retriable: false,
                    protocol: true,
                },
                404 | 405 => Error::Imds {
                    what,
                    message: format!(
                        "IMDS at {ep} answered HTTP {status}: it offers no IMDSv2 tokens \
                         (v1-only). The agent never falls back to IMDSv1; require IMDSv2 \
                         (HttpTokens=required) in the launch template"
                    ),
                    retriable: false,
                    protocol: true,
                },
                s if (200..300).contains(&s) && !has_ttl => Error::Imds {
                    what,
                    message: format!(
                        "IMDS at {ep} answered HTTP {s} without the token TTL header: not an \
                         IMDSv2 endpoint"
                    ),
                    retriable: false,
                    protocol: true,
                },
                s => Error::Imds {
                    what,
                    message: format!("IMDS at {ep} answered HTTP {s} to a plain PUT, but the SDK's token request failed: {sdk_error}"),
                    retriable: true,
                    protocol: false,
                },
            }
        }
    }
}

async fn required<M: Metadata>(md: &M, path: &str) -> Result<String> {
    md.get(path).await?.ok_or_else(|| Error::Imds {
        what: format!("GET /latest/{path}"),
        message: "HTTP 404: this is not an EC2 instance, or IMDS is incomplete".into(),
        retriable: false,
        protocol: true,
    })
}

/// Reads instance id, region, AZ and local-ipv4, retrying transient failures until
/// `deadline`.
pub async fn instance_facts<M: Metadata>(md: &M, deadline: Duration) -> Result<InstanceFacts> {
    retry::retry("read instance facts from IMDS", deadline, || async {
        let instance_id = required(md, "meta-data/instance-id").await?;
        let availability_zone = required(md, "meta-data/placement/availability-zone").await?;
        let region = required(md, "meta-data/placement/region").await?;
        let ip = required(md, "meta-data/local-ipv4").await?;
        let local_ipv4 = ip.parse().map_err(|_| Error::Imds {
            what: "GET /latest/meta-data/local-ipv4".into(),
            message: format!("{ip:?} is not an IP address"),
            retriable: false,
            protocol: true,
        })?;
        Ok(InstanceFacts {
            instance_id,
            region,
            availability_zone,
            local_ipv4,
        })
    })
    .await
}

/// This instance's ARN, `arn:<partition>:ec2:<region>:<account>:instance/<id>`, from the
/// instance identity document: the value IAM sees as `ec2:SourceInstanceARN` for requests
/// signed with its role credentials, which binds the pending init file to this instance.
pub async fn instance_arn<M: Metadata>(
    md: &M,
    facts: &InstanceFacts,
    deadline: Duration,
) -> Result<String> {
    const DOC: &str = "dynamic/instance-identity/document";
    let text = retry::retry("read the instance identity document", deadline, || {
        required(md, DOC)
    })
    .await?;
    let account = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["accountId"].as_str().map(str::to_owned))
        .filter(|a| !a.is_empty())
        .ok_or_else(|| Error::Imds {
            what: format!("GET /latest/{DOC}"),
            message: "no accountId in the instance identity document".into(),
            retriable: false,
            protocol: true,
        })?;
    Ok(format!(
        "arn:{}:ec2:{}:{account}:instance/{}",
        partition(&facts.region),
        facts.region,
        facts.instance_id
    ))
}

/// The ARN partition a region belongs to.
fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// The instance's own value of tag `key` from IMDS instance tags.
/// `Ok(None)` when instance metadata tags are not enabled (the caller then asks EC2).
pub async fn tag_value<M: Metadata>(
    md: &M,
    key: &str,
    deadline: Duration,
) -> Result<Option<TagLookup>> {
    retry::retry("read instance tags from IMDS", deadline, || async {
        // The usual case is one GET. Only a 404 needs the listing, to tell "no such tag"
        // from "instance metadata tags are off".
        if let Some(v) = md.get(&format!("meta-data/tags/instance/{key}")).await? {
            return Ok(Some(TagLookup::Value(v)));
        }
        Ok(md
            .get("meta-data/tags/instance")
            .await?
            .map(|_| TagLookup::Absent))
    })
    .await
}

/// Result of a tag lookup where tags are readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagLookup {
    Value(String),
    Absent,
}

/// ASG lifecycle state, `None` outside an Auto Scaling group.
pub async fn lifecycle_state<M: Metadata>(md: &M, deadline: Duration) -> Result<Option<String>> {
    retry::retry("read ASG lifecycle state from IMDS", deadline, || async {
        md.get("meta-data/autoscaling/target-lifecycle-state").await
    })
    .await
}

/// Waits while the instance sits in a warm pool (`Warmed:*`): nothing raft-related may
/// happen there, since a warmed instance joining the cluster would be a voter the ASG is
/// about to stop. `bound` of zero means no bound.
pub async fn wait_in_service<M: Metadata>(
    md: &M,
    imds_deadline: Duration,
    bound: Duration,
) -> Result<()> {
    let start = Instant::now();
    // Warm pool transitions take tens of seconds; polling faster only loads IMDS.
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
    let mut logged = false;
    loop {
        match lifecycle_state(md, imds_deadline).await? {
            Some(s) if s.starts_with("Warmed:") => {
                if !logged {
                    tracing::info!(lifecycle_state = %s, "instance is in a warm pool: waiting for InService before any raft work");
                    logged = true;
                }
                if !bound.is_zero() && start.elapsed() > bound {
                    return Err(Error::Imds {
                        what: "autoscaling/target-lifecycle-state".into(),
                        message: format!(
                            "still {s} after {} s (agent.warm_pool_timeout_secs)",
                            bound.as_secs()
                        ),
                        retriable: true,
                        protocol: false,
                    });
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            other => {
                if logged {
                    tracing::info!(lifecycle_state = ?other, "left the warm pool");
                }
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// An in-memory IMDS: a map of path -> value, with scripted failures.
    #[derive(Default)]
    pub struct FakeImds {
        pub values: Mutex<HashMap<String, String>>,
        /// Errors returned (front first) before the map is consulted.
        pub failures: Mutex<Vec<Error>>,
        /// Values of the lifecycle state returned in turn (last one sticks).
        pub lifecycle: Mutex<Vec<String>>,
    }

    impl FakeImds {
        pub fn standard() -> Self {
            let f = FakeImds::default();
            {
                let mut v = f.values.lock().unwrap();
                v.insert("meta-data/instance-id".into(), "i-0abc".into());
                v.insert(
                    "meta-data/placement/availability-zone".into(),
                    "us-east-1a".into(),
                );
                v.insert("meta-data/placement/region".into(), "us-east-1".into());
                v.insert("meta-data/local-ipv4".into(), "10.0.1.5".into());
                v.insert(
                    "meta-data/tags/instance".into(),
                    "aws:autoscaling:groupName".into(),
                );
                v.insert(
                    "meta-data/tags/instance/aws:autoscaling:groupName".into(),
                    "prod-vault".into(),
                );
            }
            f
        }
    }

    impl Metadata for FakeImds {
        async fn get(&self, path: &str) -> Result<Option<String>> {
            if let Some(e) = {
                let mut f = self.failures.lock().unwrap();
                if f.is_empty() {
                    None
                } else {
                    Some(f.remove(0))
                }
            } {
                return Err(e);
            }
            // As the real IMDS: with instance metadata tags off, nothing under them answers.
            if path.starts_with("meta-data/tags/instance/")
                && !self
                    .values
                    .lock()
                    .unwrap()
                    .contains_key("meta-data/tags/instance")
            {
                return Ok(None);
            }
            if path == "meta-data/autoscaling/target-lifecycle-state" {
                let mut l = self.lifecycle.lock().unwrap();
                if l.len() > 1 {
                    return Ok(Some(l.remove(0)));
                }
                if let Some(v) = l.first() {
                    return Ok(Some(v.clone()));
                }
            }
            Ok(self.values.lock().unwrap().get(path).cloned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeImds;
    use super::*;

    fn down() -> Error {
        Error::Imds {
            what: "token".into(),
            message: "unreachable".into(),
            retriable: true,
            protocol: false,
        }
    }

    #[tokio::test]
    async fn reads_the_facts() {
        let f = FakeImds::standard();
        let facts = instance_facts(&f, Duration::from_secs(5)).await.unwrap();
        assert_eq!(facts.instance_id, "i-0abc");
        assert_eq!(facts.region, "us-east-1");
        assert_eq!(facts.availability_zone, "us-east-1a");
        assert_eq!(facts.local_ipv4, "10.0.1.5".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn retries_while_imds_is_briefly_down() {
        let f = FakeImds::standard();
        f.failures.lock().unwrap().extend([down(), down()]);
        let facts = instance_facts(&f, Duration::from_secs(5)).await.unwrap();
        assert_eq!(facts.instance_id, "i-0abc");
    }

    #[tokio::test]
    async fn a_v1_only_endpoint_is_not_retried() {
        let f = FakeImds::standard();
        f.failures.lock().unwrap().push(Error::Imds {
            what: "token".into(),
            message: "v1-only".into(),
            retriable: false,
            protocol: true,
        });
        let e = instance_facts(&f, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), 76);
    }

    #[tokio::test]
    async fn missing_local_ip_is_an_error() {
        let f = FakeImds::standard();
        f.values.lock().unwrap().remove("meta-data/local-ipv4");
        let e = instance_facts(&f, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("local-ipv4"), "{e}");
    }

    #[tokio::test]
    async fn tags_from_imds_or_none_when_disabled() {
        let f = FakeImds::standard();
        let key = "aws:autoscaling:groupName";
        let d = Duration::from_secs(1);
        assert_eq!(
            tag_value(&f, key, d).await.unwrap(),
            Some(TagLookup::Value("prod-vault".into()))
        );
        assert_eq!(
            tag_value(&f, "Team", d).await.unwrap(),
            Some(TagLookup::Absent)
        );
        f.values.lock().unwrap().remove("meta-data/tags/instance");
        assert_eq!(tag_value(&f, key, d).await.unwrap(), None);
    }

    #[tokio::test]
    async fn waits_while_warmed() {
        let f = FakeImds::standard();
        f.lifecycle
            .lock()
            .unwrap()
            .extend(["Warmed:Running".to_string(), "InService".to_string()]);
        let start = Instant::now();
        wait_in_service(&f, Duration::from_secs(1), Duration::ZERO)
            .await
            .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(400));
        // Outside an ASG (404) there is nothing to wait for.
        let f = FakeImds::standard();
        wait_in_service(&f, Duration::from_secs(1), Duration::ZERO)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn warm_pool_wait_is_bounded_when_asked() {
        let f = FakeImds::standard();
        f.lifecycle.lock().unwrap().push("Warmed:Running".into());
        let e = wait_in_service(&f, Duration::from_secs(1), Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("Warmed:Running"), "{e}");
    }
}
