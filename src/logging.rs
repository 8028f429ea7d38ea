//! Logging: journald when its socket exists, stderr otherwise (and also stderr when a person
//! is watching a terminal, e.g. `rejoin` over SSM). No ANSI codes off a terminal.

use std::io::IsTerminal;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Environment variable holding a `tracing` filter (default `info`).
pub const FILTER_ENV: &str = "VAULT_BOOTSTRAP_LOG";
/// `auto` (default: journald when its socket exists), `stderr` or `journald`. Tests and the
/// demo read the agent's stderr, also on machines where journald runs.
pub const TARGET_ENV: &str = "VAULT_BOOTSTRAP_LOG_TARGET";

pub fn init() {
    let filter = || {
        EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| {
            EnvFilter::new("info,aws_smithy_runtime=warn,aws_config=warn,hyper=warn")
        })
    };
    let tty = std::io::stderr().is_terminal();
    // tracing-journald errors when the socket is absent (containers, CI, this test-bed);
    // that is the signal to fall back to stderr.
    let journald = tracing_journald::layer().ok().map(|l| {
        l.with_syslog_identifier("vault-bootstrap".into())
            .with_filter(filter())
    });
    let stderr = (journald.is_none() || tty).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(tty)
            .with_target(false)
            .with_filter(filter())
    });
    let _ = tracing_subscriber::registry()
        .with(journald)
        .with(stderr)
        .try_init();
}
