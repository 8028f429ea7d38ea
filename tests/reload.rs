//! With the systemd launcher the agent reloads the server with exactly
//! `systemctl kill --kill-whom=main --signal=SIGHUP <unit>`: systemd signals the main process
//! itself, so the reload needs no `/bin/kill` (absent from a minimal image, where
//! `systemctl reload` failed 203/EXEC and the agent exited 71 on every restart). On a
//! systemctl older than 252, which refuses `--kill-whom`, it falls back to `--kill-who`.
//!
//! `refresh-tls` drives the reload: the node's TLS directory holds the cluster's CA but no
//! certificate, so the fetched set differs only in certificate and key, the case that
//! reloads (a changed CA restarts instead). A stub `systemctl` first on PATH records every
//! call. Address block 127.0.81.0/24.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const BLOCK: u8 = 81;
const WANT: &str = "kill --kill-whom=main --signal=SIGHUP vault.service";

/// A directory holding a stub `systemctl` that appends its arguments to `calls`; with
/// `pre_252`, it refuses `--kill-whom` as systemctl 249 does (glibc getopt's message).
fn stub(dir: &Path, calls: &Path, pre_252: bool) -> PathBuf {
    let bin = dir.join(if pre_252 { "stub-249" } else { "stub-252" });
    std::fs::create_dir_all(&bin).unwrap();
    let refuse = if pre_252 {
        "case \"$*\" in *--kill-whom*) echo \"systemctl: unrecognized option '--kill-whom=main'\" >&2; exit 1;; esac\n"
    } else {
        ""
    };
    let script = format!(
        "#!/bin/sh\necho \"$*\" >> '{}'\n{refuse}exit 0\n",
        calls.display()
    );
    std::fs::write(bin.join("systemctl"), script).unwrap();
    std::fs::set_permissions(
        bin.join("systemctl"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    bin
}

/// Runs `refresh-tls` on node 0 with `bin` first on PATH, after removing the certificate so
/// that there is something to install; returns (exit code, log, systemctl calls).
fn refresh_with(tb: &Testbed, bin: &Path, calls: &Path) -> (i32, String, Vec<String>) {
    let _ = std::fs::remove_file(tb.node_dir(0).join("tls/server.pem"));
    let _ = std::fs::remove_file(calls);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (code, _, log) = tb.run_agent_env(
        0,
        &["refresh-tls"],
        &[("PATH", path.as_str())],
        Duration::from_secs(60),
    );
    let recorded = std::fs::read_to_string(calls).unwrap_or_default();
    (code, log, recorded.lines().map(str::to_owned).collect())
}

#[test]
fn the_reload_is_a_sighup_sent_by_systemd_to_the_main_process() {
    let tb = Testbed::start(BLOCK, 1);
    tb.write_config(
        0,
        &NodeOpts {
            extra_toml: "[vault]\nlauncher = \"systemd\"\n".into(),
            ..Default::default()
        },
    );
    let tls = tb.node_dir(0).join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::copy(tb.seed_dir().join("ca.pem"), tls.join("ca.pem")).unwrap();
    let calls = tb.path().join("systemctl.calls");

    // systemd 252 and later.
    let bin = stub(tb.path(), &calls, false);
    let (code, log, recorded) = refresh_with(&tb, &bin, &calls);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("server reloaded (no restart)"), "{log}");
    assert_eq!(recorded, [WANT], "{log}");

    // systemd 249: refused, then the older spelling.
    let bin = stub(tb.path(), &calls, true);
    let (code, log, recorded) = refresh_with(&tb, &bin, &calls);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("predates --kill-whom"), "{log}");
    assert_eq!(
        recorded,
        [WANT, "kill --kill-who=main --signal=SIGHUP vault.service"],
        "{log}"
    );
}
