//! Logging: journald when its socket exists, stderr otherwise; and also stderr whenever
//! stderr is not the journal itself: a terminal, or a pipe someone reads (SSM Run Command,
//! `systemd-run --pipe`, Packer's SSH session), where an operator would otherwise see no
//! error at all. A unit whose stderr is the journal (systemd's `JOURNAL_STREAM`) logs once.
//! `VAULT_BOOTSTRAP_LOG_TARGET` forces one of the two. No ANSI codes off a terminal.
//!
//! Also owns the caps on third-party log targets: whatever `VAULT_BOOTSTRAP_LOG` asks for,
//! the AWS SDK, its signer and the HTTP/TLS stacks never log below [`CAP`].

use std::io::IsTerminal;
use tracing::level_filters::LevelFilter;
use tracing::Subscriber;
use tracing_subscriber::filter::{EnvFilter, FilterExt, Targets};
use tracing_subscriber::layer::{Filter, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Environment variable holding a `tracing` filter (default `info`).
pub const FILTER_ENV: &str = "VAULT_BOOTSTRAP_LOG";
/// `auto` (default: journald when its socket exists), `stderr` or `journald`. Tests and the
/// demo read the agent's stderr, also on machines where journald runs.
pub const TARGET_ENV: &str = "VAULT_BOOTSTRAP_LOG_TARGET";

/// The filter when `VAULT_BOOTSTRAP_LOG` is unset or does not parse.
const DEFAULT_FILTER: &str = "info,aws_smithy_runtime=warn,aws_config=warn,hyper=warn";

/// Target prefixes (a target starts with its crate's name) whose debug and trace events carry
/// secrets: the AWS SDK logs whole requests and responses (`aws_smithy_runtime` "transmitting
/// request"/"received response": KMS `Plaintext`, i.e. escrowed recovery shares and the root
/// token, S3 object bodies), `aws_sigv4` the request it signs with its session token header,
/// `aws_config` the credentials it loads; the HTTP and TLS stacks (hyper, h2, reqwest, rustls,
/// tower, http) log headers such as `X-Vault-Token` and raw frames. `aws_` covers every AWS
/// crate (aws_config, aws_runtime, aws_sigv4, aws_smithy_*, aws_sdk_*, aws_credential_types).
pub const CAPPED: &[&str] = &[
    "aws_",
    "hyper",
    "h2",
    "http",
    "reqwest",
    "rustls",
    "tokio_rustls",
    "tower",
];

/// The most verbose level the [`CAPPED`] targets may log at: their info events name
/// operations, providers and retries, never a body or a header value.
pub const CAP: LevelFilter = LevelFilter::INFO;

/// The caps as a filter of their own, ANDed with the user's. Appending `target=info`
/// directives to the user's `EnvFilter` would not hold: the most specific directive wins, so
/// `aws_smithy_runtime::client::orchestrator=trace` would lift `aws_smithy_runtime=info`.
fn caps() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(CAPPED.iter().map(|t| (*t, CAP)))
}

/// The filter every log layer uses: `spec` (the value of `VAULT_BOOTSTRAP_LOG`, or the
/// default when absent or unparsable) and, on top of it, the caps.
pub fn filter<S>(spec: Option<&str>) -> impl Filter<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let user = spec
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
    user.and(caps())
}

/// Whether the journal stream systemd names in `JOURNAL_STREAM` (`<device>:<inode>`, set for
/// a unit whose stdout or stderr goes to the journal) is the file `stderr` is: `dev`/`ino`.
fn is_journal_stream(journal_stream: Option<&str>, dev: u64, ino: u64) -> bool {
    journal_stream
        .and_then(|v| v.split_once(':'))
        .is_some_and(|(d, i)| d.parse() == Ok(dev) && i.parse() == Ok(ino))
}

/// Whether stderr is the journal (so logging to both would write every line twice).
fn stderr_is_journal() -> bool {
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    is_journal_stream(
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        st.st_dev,
        st.st_ino,
    )
}

/// Whether the logs reach stderr (see the module header). Callers that print an error
/// themselves ask, so that an operator sees it once, wherever they look.
pub fn stderr_gets_logs() -> bool {
    match std::env::var(TARGET_ENV).as_deref() {
        Ok("stderr") => true,
        Ok("journald") => !journald_socket(),
        _ => !journald_socket() || !stderr_is_journal(),
    }
}

fn journald_socket() -> bool {
    std::path::Path::new("/run/systemd/journal/socket").exists()
}

pub fn init() {
    let spec = std::env::var(FILTER_ENV).ok();
    let tty = std::io::stderr().is_terminal();
    let target = std::env::var(TARGET_ENV).ok();
    // tracing-journald errors when the socket is absent (containers, CI, this test-bed);
    // that is the signal to fall back to stderr.
    let journald = (target.as_deref() != Some("stderr"))
        .then(tracing_journald::layer)
        .and_then(|l| l.ok())
        .map(|l| {
            l.with_syslog_identifier("vault-bootstrap".into())
                .with_filter(filter(spec.as_deref()))
        });
    let also_stderr = match target.as_deref() {
        Some("journald") => false,
        _ => tty || !stderr_is_journal(),
    };
    let stderr = (journald.is_none() || also_stderr).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(tty)
            .with_target(false)
            .with_filter(filter(spec.as_deref()))
    });
    let _ = tracing_subscriber::registry()
        .with(journald)
        .with(stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer, for a fmt layer under test.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What a subscriber built with `filter(spec)` prints for a fixed set of events.
    fn logged(spec: Option<&str>) -> String {
        let buf = Buf::default();
        let w = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .with_filter(filter(spec));
        let sub = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(sub, || {
            tracing::trace!(target: "aws_smithy_runtime::client::orchestrator", "SDK-TRACE-BODY");
            tracing::debug!(target: "aws_smithy_runtime", "SDK-DEBUG");
            tracing::trace!(target: "aws_sigv4::http_request::sign", "SIGNER-TRACE");
            tracing::debug!(target: "aws_config::imds", "CONFIG-DEBUG");
            tracing::trace!(target: "hyper_util::client::legacy::pool", "HYPER-TRACE");
            tracing::trace!(target: "h2::codec", "H2-TRACE");
            tracing::debug!(target: "reqwest::connect", "REQWEST-DEBUG");
            tracing::trace!(target: "rustls::client", "RUSTLS-TRACE");
            tracing::warn!(target: "aws_smithy_runtime", "SDK-WARN");
            tracing::info!(target: "aws_config", "CONFIG-INFO");
            tracing::trace!(target: "vault_bootstrap::init", "OWN-TRACE");
            tracing::info!(target: "vault_bootstrap::init", "OWN-INFO");
        });
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    const BELOW_CAP: &[&str] = &[
        "SDK-TRACE-BODY",
        "SDK-DEBUG",
        "SIGNER-TRACE",
        "CONFIG-DEBUG",
        "HYPER-TRACE",
        "H2-TRACE",
        "REQWEST-DEBUG",
        "RUSTLS-TRACE",
    ];

    #[test]
    fn trace_everywhere_keeps_the_caps() {
        for spec in [
            "trace",
            "aws_smithy_runtime=trace",
            "trace,aws_smithy_runtime::client::orchestrator=trace,aws_sigv4=trace,hyper=trace",
            "aws=trace,h2=trace,reqwest=trace,rustls=trace,aws_config::imds=trace",
        ] {
            let out = logged(Some(spec));
            for m in BELOW_CAP {
                assert!(!out.contains(m), "{spec}: {m} got through:\n{out}");
            }
            assert!(out.contains("SDK-WARN"), "{spec}: {out}");
        }
        // The agent's own events follow the user's filter: all of them at `trace`.
        let out = logged(Some("trace"));
        assert!(
            out.contains("OWN-TRACE") && out.contains("OWN-INFO"),
            "{out}"
        );
        assert!(out.contains("CONFIG-INFO"), "info is within the cap: {out}");
    }

    #[test]
    fn the_journal_stream_is_recognised_by_device_and_inode() {
        assert!(is_journal_stream(Some("8:1234"), 8, 1234));
        assert!(!is_journal_stream(Some("8:1234"), 8, 1235));
        assert!(!is_journal_stream(Some("9:1234"), 8, 1234));
        assert!(!is_journal_stream(Some("garbage"), 8, 1234));
        assert!(!is_journal_stream(None, 8, 1234));
    }

    #[test]
    fn default_and_bad_specs_use_the_default() {
        for spec in [None, Some("not a [valid filter")] {
            let out = logged(spec);
            assert!(out.contains("OWN-INFO"), "{spec:?}: {out}");
            assert!(!out.contains("OWN-TRACE"), "{spec:?}: {out}");
            // The default holds aws_config at warn, below the cap.
            assert!(!out.contains("CONFIG-INFO"), "{spec:?}: {out}");
            assert!(out.contains("SDK-WARN"), "{spec:?}: {out}");
        }
    }
}
