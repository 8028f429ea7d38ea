//! AWS: the SDK configuration and the small traits behind which EC2 and S3 sit, so that the
//! boot logic can be tested without AWS and the real SDK can be pointed at a local endpoint.
//!
//! Endpoints, region and credentials come from the SDK's standard chain (`AWS_ENDPOINT_URL`,
//! `AWS_REGION`, instance profile via IMDS, ...); the agent only supplies the region it read
//! from IMDS as the last fallback.

pub mod ec2;
pub mod kms;
pub mod s3;

use crate::error::{AwsFailure, Error};
use aws_config::meta::region::RegionProviderChain;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use std::time::Duration;

/// Longest wait for the first byte of one attempt's answer. S3, EC2 and KMS answer in well
/// under a second; an endpoint that says nothing for this long is hung (the SDK's default is
/// to wait forever, which would stall a boot with no error at all).
pub const ATTEMPT_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// Loads the SDK configuration; `fallback_region` (from IMDS) is used when the environment
/// names none. One attempt waits at most `step_deadline` (the step's whole bound,
/// `agent.aws_timeout_secs`) or [`ATTEMPT_READ_TIMEOUT`] for an answer, whichever is shorter;
/// a timed-out attempt is transient, so the step's retry loop tries again within its bound.
pub async fn sdk_config(fallback_region: &str, step_deadline: Duration) -> SdkConfig {
    let region =
        RegionProviderChain::default_provider().or_else(Region::new(fallback_region.to_owned()));
    aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_millis(3100))
                .read_timeout(step_deadline.min(ATTEMPT_READ_TIMEOUT))
                .build(),
        )
        .load()
        .await
}

const DENIED: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "AuthFailure",
    "InvalidClientTokenId",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "KMSInvalidStateException",
];
const NOT_FOUND: &[&str] = &[
    "NoSuchKey",
    "NoSuchBucket",
    "NotFound",
    "NotFoundException",
    "InvalidInstanceID.NotFound",
];
const TRANSIENT: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "SlowDown",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "RequestTimeout",
    "KMSInternalException",
    "DependencyTimeoutException",
];

/// Turns an SDK error into the agent's error, classified by what the operator can do about it.
/// The message is the full `DisplayErrorContext` chain: the plain `Display` of `SdkError`
/// says only "service error".
pub fn sdk_error<E, R>(
    operation: &'static str,
    resource: impl Into<String>,
    err: aws_smithy_runtime_api::client::result::SdkError<E, R>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + HttpStatus,
{
    use aws_smithy_runtime_api::client::result::SdkError;
    let status = err.raw_response().map(|r| r.http_status());
    let code = err.code().map(str::to_owned);
    let failure = match (&err, code.as_deref()) {
        (
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_),
            _,
        ) => AwsFailure::Transient,
        (_, Some(c)) if DENIED.contains(&c) => AwsFailure::Denied,
        (_, Some(c)) if NOT_FOUND.contains(&c) => AwsFailure::NotFound,
        (_, Some(c)) if TRANSIENT.contains(&c) => AwsFailure::Transient,
        _ => match status {
            Some(403) => AwsFailure::Denied,
            Some(404) => AwsFailure::NotFound,
            Some(429) => AwsFailure::Transient,
            Some(s) if s >= 500 => AwsFailure::Transient,
            _ => AwsFailure::Other,
        },
    };
    let hint = match failure {
        AwsFailure::Denied => "; grant the instance role this action (see README \"IAM policy\")",
        AwsFailure::NotFound => "; check the name in the config and that it exists in this region",
        AwsFailure::Transient => "; will retry while the step's deadline allows",
        AwsFailure::Other => "",
    };
    let status = status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
    Error::Aws {
        operation,
        resource: resource.into(),
        failure,
        message: format!("{}{status}{hint}", DisplayErrorContext(&err)),
    }
}

/// The HTTP status of a raw SDK response, whatever its type.
pub trait HttpStatus {
    fn http_status(&self) -> u16;
}

impl HttpStatus for aws_smithy_runtime_api::http::Response {
    fn http_status(&self) -> u16 {
        self.status().as_u16()
    }
}
