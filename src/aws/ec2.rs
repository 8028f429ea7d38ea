//! EC2: the two calls discovery needs, behind a trait.

use crate::aws::sdk_error;
use crate::error::Result;
use aws_sdk_ec2::types::Filter;
use std::future::Future;
use std::net::IpAddr;

/// An instance as discovery sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub private_ip: Option<IpAddr>,
    pub state: String,
}

pub trait Ec2Api: Send + Sync {
    /// All pending/running instances tagged `key=value`, every page of one
    /// `DescribeInstances` call.
    fn instances_tagged(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<Vec<Instance>>> + Send;

    /// The state name of one instance (`pending`, `running`, `terminated`, ...), `None` when
    /// EC2 no longer knows it.
    fn instance_state(
        &self,
        instance_id: &str,
    ) -> impl Future<Output = Result<Option<String>>> + Send;

    /// The value of tag `key` on `instance_id` (`DescribeTags`), when IMDS tags are off.
    fn tag_of(
        &self,
        instance_id: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<String>>> + Send;
}

pub struct SdkEc2 {
    client: aws_sdk_ec2::Client,
}

impl SdkEc2 {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        SdkEc2 {
            client: aws_sdk_ec2::Client::new(config),
        }
    }
}

fn filter(name: &str, values: &[&str]) -> Filter {
    let mut f = Filter::builder().name(name);
    for v in values {
        f = f.values(*v);
    }
    f.build()
}

impl Ec2Api for SdkEc2 {
    async fn instances_tagged(&self, key: &str, value: &str) -> Result<Vec<Instance>> {
        let resource = format!("instances tagged {key}={value}");
        let mut pages = self
            .client
            .describe_instances()
            .filters(filter(&format!("tag:{key}"), &[value]))
            .filters(filter("instance-state-name", &["pending", "running"]))
            // Large enough that a normal cluster is one page; pagination covers the rest.
            .max_results(100)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| sdk_error("DescribeInstances", resource.clone(), e))?;
            for inst in page.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = inst.instance_id() else {
                    continue;
                };
                out.push(Instance {
                    id: id.to_owned(),
                    private_ip: inst.private_ip_address().and_then(|s| s.parse().ok()),
                    state: inst
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_owned())
                        .unwrap_or_default(),
                });
            }
        }
        Ok(out)
    }

    async fn instance_state(&self, instance_id: &str) -> Result<Option<String>> {
        match self
            .client
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(out) => Ok(out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .find(|i| i.instance_id() == Some(instance_id))
                .and_then(|i| {
                    i.state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_owned())
                })),
            Err(e) => {
                let err = sdk_error("DescribeInstances", instance_id.to_owned(), e);
                match &err {
                    crate::error::Error::Aws {
                        failure: crate::error::AwsFailure::NotFound,
                        ..
                    } => Ok(None),
                    _ => Err(err),
                }
            }
        }
    }

    async fn tag_of(&self, instance_id: &str, key: &str) -> Result<Option<String>> {
        let out = self
            .client
            .describe_tags()
            .filters(filter("resource-id", &[instance_id]))
            .filters(filter("key", &[key]))
            .send()
            .await
            .map_err(|e| sdk_error("DescribeTags", format!("tag {key} of {instance_id}"), e))?;
        Ok(out
            .tags()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value().map(str::to_owned)))
    }
}
