//! Auto Scaling: the two lifecycle-hook calls the agent makes, behind a trait.
//!
//! The agent never reads or changes the group: it only answers the hooks the group holds
//! its own instance in (`Pending:Wait` at launch, `Terminating:Wait` at scale-in), which is
//! what `autoscaling:CompleteLifecycleAction` and `RecordLifecycleActionHeartbeat`, scoped
//! to the group, allow (packer/examples/iam-policy.json).

use crate::aws::sdk_error;
use crate::error::Result;
use aws_sdk_autoscaling::operation::complete_lifecycle_action::CompleteLifecycleActionError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use std::future::Future;

/// How a lifecycle action ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Launch: the instance goes InService. Terminate: termination proceeds.
    Continue,
    /// Launch: the group terminates the instance (and an instance refresh stops).
    Abandon,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Continue => "CONTINUE",
            Outcome::Abandon => "ABANDON",
        }
    }
}

/// One lifecycle action: the group, the hook, and this instance.
#[derive(Debug, Clone, Copy)]
pub struct Action<'a> {
    pub group: &'a str,
    pub hook: &'a str,
    pub instance_id: &'a str,
}

impl std::fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lifecycle hook {} of group {} for {}",
            self.hook, self.group, self.instance_id
        )
    }
}

/// What completing an action found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    Done,
    /// The group holds no action for this instance and hook (never was one, or it already
    /// ended: completed before a restart, or timed out to its default result).
    NoAction,
}

pub trait Lifecycle: Send + Sync {
    /// `CompleteLifecycleAction` with `outcome`.
    fn complete(
        &self,
        action: Action<'_>,
        outcome: Outcome,
    ) -> impl Future<Output = Result<Completed>> + Send;

    /// `RecordLifecycleActionHeartbeat`: the hook's heartbeat timeout starts again.
    fn heartbeat(&self, action: Action<'_>) -> impl Future<Output = Result<Completed>> + Send;
}

pub struct SdkAutoscaling {
    client: aws_sdk_autoscaling::Client,
}

impl SdkAutoscaling {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        SdkAutoscaling {
            client: aws_sdk_autoscaling::Client::new(config),
        }
    }
}

/// AWS answers `ValidationError` "No active Lifecycle Action found" when the instance is
/// not (or no longer) held by the hook.
fn no_action(code: Option<&str>, message: Option<&str>) -> bool {
    code == Some("ValidationError")
        && message.is_some_and(|m| m.contains("No active Lifecycle Action"))
}

impl Lifecycle for SdkAutoscaling {
    async fn complete(&self, a: Action<'_>, outcome: Outcome) -> Result<Completed> {
        let r = self
            .client
            .complete_lifecycle_action()
            .auto_scaling_group_name(a.group)
            .lifecycle_hook_name(a.hook)
            .instance_id(a.instance_id)
            .lifecycle_action_result(outcome.as_str())
            .send()
            .await;
        match r {
            Ok(_) => Ok(Completed::Done),
            Err(e) => {
                let svc: Option<&CompleteLifecycleActionError> = e.as_service_error();
                if no_action(svc.and_then(|s| s.code()), svc.and_then(|s| s.message())) {
                    return Ok(Completed::NoAction);
                }
                Err(sdk_error("CompleteLifecycleAction", a.to_string(), e))
            }
        }
    }

    async fn heartbeat(&self, a: Action<'_>) -> Result<Completed> {
        let r = self
            .client
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(a.group)
            .lifecycle_hook_name(a.hook)
            .instance_id(a.instance_id)
            .send()
            .await;
        match r {
            Ok(_) => Ok(Completed::Done),
            Err(e) => {
                let svc = e.as_service_error();
                if no_action(svc.and_then(|s| s.code()), svc.and_then(|s| s.message())) {
                    return Ok(Completed::NoAction);
                }
                Err(sdk_error(
                    "RecordLifecycleActionHeartbeat",
                    a.to_string(),
                    e,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_missing_action_is_no_action() {
        assert!(no_action(
            Some("ValidationError"),
            Some("No active Lifecycle Action found with instance ID i-1")
        ));
        assert!(!no_action(Some("ValidationError"), Some("hook not found")));
        assert!(!no_action(
            Some("AccessDenied"),
            Some("No active Lifecycle Action")
        ));
        assert!(!no_action(None, None));
    }
}
