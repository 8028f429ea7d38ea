//! S3: object reads for the TLS material, behind a trait.

use crate::aws::sdk_error;
use crate::error::Result;
use std::future::Future;

pub trait ObjectStore: Send + Sync {
    /// The whole object `s3://bucket/key`.
    fn get(&self, bucket: &str, key: &str) -> impl Future<Output = Result<Vec<u8>>> + Send;
}

pub struct SdkS3 {
    client: aws_sdk_s3::Client,
}

impl SdkS3 {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        SdkS3 {
            client: aws_sdk_s3::Client::new(config),
        }
    }
}

impl ObjectStore for SdkS3 {
    async fn get(&self, bucket: &str, key: &str) -> Result<Vec<u8>> {
        let url = format!("s3://{bucket}/{key}");
        let out = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_error("GetObject", url.clone(), e))?;
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| crate::error::Error::Aws {
                operation: "GetObject",
                resource: url,
                failure: crate::error::AwsFailure::Transient,
                message: format!("reading the body failed: {e}"),
            })?;
        Ok(body.into_bytes().to_vec())
    }
}
