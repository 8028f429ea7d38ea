//! S3: object reads and write-once puts, behind a trait.

use crate::aws::sdk_error;
use crate::error::{AwsFailure, Error, Result};
use std::future::Future;

/// What a write-once put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    /// The key existed (`412 Precondition Failed` on `If-None-Match: *`); nothing written.
    Exists,
}

pub trait ObjectStore: Send + Sync {
    /// The whole object `s3://bucket/key`.
    fn get(&self, bucket: &str, key: &str) -> impl Future<Output = Result<Vec<u8>>> + Send;

    /// Like [`ObjectStore::get`], `Ok(None)` when the object does not exist.
    fn get_opt(
        &self,
        bucket: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send {
        async move {
            match self.get(bucket, key).await {
                Ok(b) => Ok(Some(b)),
                Err(Error::Aws {
                    failure: AwsFailure::NotFound,
                    message,
                    ..
                }) if !message.contains("NoSuchBucket") => Ok(None),
                Err(e) => Err(e),
            }
        }
    }

    /// Writes only if the key does not exist (`If-None-Match: *`), encrypted with SSE-KMS
    /// under `sse_kms_key` when given.
    fn put_if_absent(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        sse_kms_key: Option<&str>,
    ) -> impl Future<Output = Result<PutOutcome>> + Send;

    /// The object and the SHA-256 checksum S3 stored with it (base64), when it has one:
    /// what a write-once item's read-back compares with what was written.
    fn get_checked(&self, bucket: &str, key: &str) -> impl Future<Output = Result<Stored>> + Send {
        async move {
            Ok(Stored {
                body: self.get(bucket, key).await?,
                sha256: None,
            })
        }
    }

    /// Keys under `prefix`.
    fn list(&self, bucket: &str, prefix: &str) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// Deletes `s3://bucket/key`; deleting a key that does not exist is not an error.
    fn delete(&self, bucket: &str, key: &str) -> impl Future<Output = Result<()>> + Send;
}

/// An object as read back, with S3's own checksum of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub body: Vec<u8>,
    /// `ChecksumSHA256` (base64) that S3 stored at the write, validated by the SDK on read.
    pub sha256: Option<String>,
}

/// The base64 SHA-256 of `body`, as S3 reports `ChecksumSHA256`.
pub fn sha256_b64(body: &[u8]) -> String {
    use base64::Engine;
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body);
    base64::engine::general_purpose::STANDARD.encode(d.as_ref())
}

/// `s3://bucket/key` -> (bucket, key); both must be non-empty.
pub fn parse_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("s3://")?;
    let (b, k) = rest.split_once('/')?;
    (!b.is_empty() && !k.is_empty()).then(|| (b.to_owned(), k.to_owned()))
}

/// Sends a write-once (`If-None-Match: *`) PutObject: `Exists` when the key already holds
/// an object (412 / PreconditionFailed), whatever the body.
async fn put_once(
    req: aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder,
    url: String,
) -> Result<PutOutcome> {
    match req.send().await {
        Ok(_) => Ok(PutOutcome::Created),
        Err(e) => {
            let status = e.raw_response().map(|r| r.status().as_u16());
            let code = aws_smithy_types::error::metadata::ProvideErrorMetadata::code(&e)
                .map(str::to_owned);
            if status == Some(412) || code.as_deref() == Some("PreconditionFailed") {
                Ok(PutOutcome::Exists)
            } else {
                Err(sdk_error("PutObject", url, e))
            }
        }
    }
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

    /// For uploads of large streamed bodies (snapshots): the read timeout counts from the
    /// start of the request, so it would cut off any upload longer than itself. The connect
    /// timeout stays, and the caller bounds the whole transfer.
    pub fn for_streams(config: &aws_config::SdkConfig) -> Self {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_millis(3100))
            .build();
        let conf = aws_sdk_s3::config::Builder::from(config)
            .timeout_config(timeouts)
            .build();
        SdkS3 {
            client: aws_sdk_s3::Client::from_conf(conf),
        }
    }
}

impl SdkS3 {
    /// Uploads the file at `path` write-once (`If-None-Match: *`) with SSE-KMS and user
    /// metadata. The body is streamed from the file. A PutObject is atomic: when it fails,
    /// no object (and no part of one) exists under `key`.
    ///
    /// `sha256_b64` is the body's SHA-256 as the caller computed it while writing the file;
    /// sent as `x-amz-checksum-sha256`, S3 computes its own over what it received and
    /// refuses the put (`BadDigest`) when they differ. That is the read-back: the writer
    /// needs no `s3:GetObject` on what it wrote.
    pub async fn put_file_if_absent(
        &self,
        bucket: &str,
        key: &str,
        path: &std::path::Path,
        sse_kms_key: &str,
        sha256_b64: &str,
        metadata: &[(&str, String)],
    ) -> Result<PutOutcome> {
        let url = format!("s3://{bucket}/{key}");
        let body = aws_sdk_s3::primitives::ByteStream::from_path(path)
            .await
            .map_err(|e| Error::Internal(format!("reading {}: {e}", path.display())))?;
        let mut req = self
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .if_none_match("*")
            .server_side_encryption(aws_sdk_s3::types::ServerSideEncryption::AwsKms)
            .ssekms_key_id(sse_kms_key)
            .checksum_sha256(sha256_b64)
            .body(body);
        for (k, v) in metadata {
            req = req.metadata(*k, v);
        }
        put_once(req, url).await
    }

    /// Streams `s3://bucket/key` into `sink` chunk by chunk; returns the object's user
    /// metadata. Never holds the whole object in memory.
    pub async fn download(
        &self,
        bucket: &str,
        key: &str,
        sink: &mut (dyn FnMut(&[u8]) -> std::io::Result<()> + Send),
    ) -> Result<std::collections::HashMap<String, String>> {
        let url = format!("s3://{bucket}/{key}");
        let mut out = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_error("GetObject", url.clone(), e))?;
        let metadata = out
            .metadata()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        while let Some(chunk) = out.body.next().await {
            let chunk = chunk.map_err(|e| Error::Aws {
                operation: "GetObject",
                resource: url.clone(),
                failure: AwsFailure::Transient,
                message: format!("reading the body failed: {e}"),
            })?;
            sink(&chunk).map_err(|e| Error::Internal(format!("writing {url} locally: {e}")))?;
        }
        Ok(metadata)
    }
}

impl ObjectStore for SdkS3 {
    async fn get(&self, bucket: &str, key: &str) -> Result<Vec<u8>> {
        // One GetObject path for small objects and streamed snapshots alike.
        let mut body = Vec::new();
        self.download(bucket, key, &mut |chunk| {
            body.extend_from_slice(chunk);
            Ok(())
        })
        .await?;
        Ok(body)
    }

    async fn put_if_absent(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        sse_kms_key: Option<&str>,
    ) -> Result<PutOutcome> {
        let url = format!("s3://{bucket}/{key}");
        // SHA-256 computed by the SDK, checked and stored by S3: the read-back compares it,
        // and S3 Object Lock buckets refuse a PutObject without a checksum.
        let mut req = self
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .if_none_match("*")
            .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Sha256)
            .body(body.into());
        if let Some(k) = sse_kms_key {
            req = req
                .server_side_encryption(aws_sdk_s3::types::ServerSideEncryption::AwsKms)
                .ssekms_key_id(k);
        }
        put_once(req, url).await
    }

    async fn get_checked(&self, bucket: &str, key: &str) -> Result<Stored> {
        let url = format!("s3://{bucket}/{key}");
        let out = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| sdk_error("GetObject", url.clone(), e))?;
        let sha256 = out.checksum_sha256().map(str::to_owned);
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| Error::Aws {
                operation: "GetObject",
                resource: url,
                failure: AwsFailure::Transient,
                message: format!("reading the body failed (or its checksum did not match): {e}"),
            })?
            .into_bytes()
            .to_vec();
        Ok(Stored { body, sha256 })
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| sdk_error("ListObjectsV2", format!("s3://{bucket}/{prefix}"), e))?;
            out.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
        }
        Ok(out)
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<()> {
        self.client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_error("DeleteObject", format!("s3://{bucket}/{key}"), e))?;
        Ok(())
    }
}
