//! AWS: the SDK configuration and the small traits behind which EC2 and S3 sit, so that the
//! boot logic can be tested without AWS and the real SDK can be pointed at a local endpoint.
//!
//! Endpoints, region and credentials come from the SDK's standard chain (`AWS_ENDPOINT_URL`,
//! `AWS_REGION`, instance profile via IMDS, ...); the agent only supplies the region it read
//! from IMDS as the last fallback.

pub mod autoscaling;
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
    // S3 409: another conditional write (`If-None-Match`/`If-Match`) to the same key was in
    // flight. S3 says to retry; the retry then sees the winner's object (412, `Exists`).
    "ConditionalRequestConflict",
    // S3 409: "a conflicting conditional operation is currently in progress; try again".
    "OperationAborted",
];

/// How a failed call is classified: `transport` when no answer came (dispatch, timeout,
/// unparseable response), else by the error code, else by the HTTP status.
fn classify(transport: bool, code: Option<&str>, status: Option<u16>) -> AwsFailure {
    if transport {
        return AwsFailure::Transient;
    }
    match code {
        Some(c) if DENIED.contains(&c) => AwsFailure::Denied,
        Some(c) if NOT_FOUND.contains(&c) => AwsFailure::NotFound,
        Some(c) if TRANSIENT.contains(&c) => AwsFailure::Transient,
        _ => match status {
            Some(403) => AwsFailure::Denied,
            Some(404) => AwsFailure::NotFound,
            Some(429) => AwsFailure::Transient,
            Some(s) if s >= 500 => AwsFailure::Transient,
            _ => AwsFailure::Other,
        },
    }
}

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
    let transport = matches!(
        &err,
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_)
    );
    let failure = classify(transport, code.as_deref(), status);
    let hint = match failure {
        AwsFailure::Denied => {
            "; grant the instance role this action (see docs/operations.md \"IAM policies\")"
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::operation::put_object::PutObjectError;
    use aws_smithy_runtime_api::client::result::SdkError;
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    /// The error the SDK hands back for an S3 answer `status` with error `code`.
    fn s3_error(status: u16, code: &str) -> Error {
        let raw = aws_smithy_runtime_api::http::Response::new(
            status.try_into().unwrap(),
            SdkBody::from(""),
        );
        let err = PutObjectError::generic(
            ErrorMetadata::builder()
                .code(code)
                .message("injected")
                .build(),
        );
        sdk_error("PutObject", "s3://b/k", SdkError::service_error(err, raw))
    }

    #[test]
    fn racing_conditional_writes_are_transient() {
        // Two conditional writes to one key at once: S3 answers 409 to one of them.
        let e = s3_error(409, "ConditionalRequestConflict");
        assert!(e.is_retriable(), "{e}");
        assert_eq!(e.exit_code(), 75, "{e}");
        assert!(e.to_string().contains("ConditionalRequestConflict"), "{e}");
        assert!(s3_error(409, "OperationAborted").is_retriable());
        // Other conflicts are not: retrying cannot change them.
        let e = s3_error(409, "BucketAlreadyExists");
        assert!(!e.is_retriable(), "{e}");
        assert_eq!(e.exit_code(), 69);
    }

    #[test]
    fn codes_win_over_statuses() {
        use AwsFailure::*;
        assert_eq!(classify(true, Some("AccessDenied"), Some(403)), Transient);
        assert_eq!(classify(false, Some("AccessDenied"), Some(400)), Denied);
        assert_eq!(classify(false, Some("NoSuchKey"), Some(404)), NotFound);
        assert_eq!(classify(false, Some("SlowDown"), Some(503)), Transient);
        assert_eq!(
            classify(false, Some("ConditionalRequestConflict"), Some(409)),
            Transient
        );
        assert_eq!(classify(false, None, Some(403)), Denied);
        assert_eq!(classify(false, None, Some(404)), NotFound);
        assert_eq!(classify(false, None, Some(429)), Transient);
        assert_eq!(classify(false, None, Some(502)), Transient);
        assert_eq!(classify(false, Some("ValidationError"), Some(400)), Other);
        assert_eq!(classify(false, None, Some(409)), Other);
    }
}
