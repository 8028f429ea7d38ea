//! Bounded retries with backoff and jitter, used around every call to IMDS, EC2 and S3 on
//! the boot path.
//!
//! The schedule is Fibonacci from 250 ms (as Bottlerocket's boot agents do), capped, with
//! jitter so that the nodes of an ASG that boot together do not hit the same API in lockstep.

use crate::error::{Error, Result};
use std::future::Future;
use std::time::{Duration, Instant};

/// First sleep: short, because IMDS and the network are usually only a moment late at boot.
const FIRST: Duration = Duration::from_millis(250);
/// Longest single sleep: keeps a late peer from waiting minutes after the cause went away.
const CAP: Duration = Duration::from_secs(8);

/// Fibonacci backoff with jitter in [d/2, d].
#[derive(Debug, Clone)]
pub struct Backoff {
    prev: Duration,
    next: Duration,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(FIRST, CAP)
    }
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            prev: Duration::ZERO,
            next: first,
            cap,
        }
    }

    /// The next sleep, jittered.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next.min(self.cap);
        let following = (self.prev + self.next).min(self.cap);
        self.prev = self.next;
        self.next = following;
        let half = d / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Runs `op` until it succeeds, fails with an error that is not retriable, or `deadline`
/// would pass before the next attempt; then returns the last error.
pub async fn retry<T, F, Fut>(what: &str, deadline: Duration, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    retry_when(what, deadline, &mut op, Error::is_retriable).await
}

/// Like [`retry`], with the caller deciding which errors are worth another attempt.
async fn retry_when<T, F, Fut>(
    what: &str,
    deadline: Duration,
    op: &mut F,
    retriable: fn(&Error) -> bool,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    let mut backoff = Backoff::default();
    let mut attempt = 1u32;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if retriable(&e) => {
                let delay = backoff.next_delay();
                if start.elapsed() + delay > deadline {
                    tracing::error!(%what, attempt, waited_secs = start.elapsed().as_secs(), "giving up: {e}");
                    return Err(e);
                }
                tracing::warn!(%what, attempt, retry_in_ms = delay.as_millis() as u64, "{e}");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::AwsFailure;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn transient() -> Error {
        Error::Aws {
            operation: "GetObject",
            resource: "s3://b/k".into(),
            failure: AwsFailure::Transient,
            message: "503".into(),
        }
    }

    #[test]
    fn backoff_grows_fibonacci_and_stays_under_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let bounds = [100, 100, 200, 300, 500, 500, 500];
        for max in bounds {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(max), "{d:?} > {max}");
            assert!(d >= Duration::from_millis(max / 2), "{d:?} < {max}/2");
        }
    }

    #[tokio::test]
    async fn retries_transient_errors_until_success() {
        let calls = AtomicU32::new(0);
        let v = retry("test", Duration::from_secs(10), || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(transient())
            } else {
                Ok(7)
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let e = retry("test", Duration::from_secs(10), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(Error::Internal("boom".into()))
        })
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Internal(_)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline() {
        let start = Instant::now();
        let e = retry("test", Duration::from_millis(600), || async {
            Err::<(), _>(transient())
        })
        .await
        .unwrap_err();
        assert!(e.is_retriable());
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
