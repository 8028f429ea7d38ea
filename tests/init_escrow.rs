//! Init and escrow under crashes and faults: the agent is killed (SIGKILL, through the
//! test-only `VAULT_BOOTSTRAP_CRASH_AT` hook) at every point between `sys/init` and the
//! marker, and S3/KMS fail during the escrow. In every case the keys end up in S3,
//! verified, after a restart; nothing is ever in plain text.
//!
//! Each trial is a cluster of its own: its instance gets a `Cluster=<name>` tag and the
//! agent discovers by that tag, so one test-bed serves many trials.

mod common;
use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;

const SECRETS_AT_REST: &[&str] = &[
    "recovery-key-1",
    "recovery-key-2",
    "recovery-key-3",
    "recovery-key-4",
    "recovery-key-5",
    "root-token",
];

fn solo_config(tb: &Testbed, i: usize, cluster: &str, extra: &str) {
    tb.write_config(
        i,
        &NodeOpts {
            extra_toml: format!(
                "[cluster]\ntag_key = \"Cluster\"\ntag_value = \"{cluster}\"\n{extra}"
            ),
            ..Default::default()
        },
    );
}

fn pending(tb: &Testbed, i: usize) -> PathBuf {
    tb.node_dir(i).join("state/pending-init.json")
}

/// All escrowed secrets of `cluster` appear in no log or file of node `i` (raft data aside).
async fn assert_no_plain_secrets(tb: &Testbed, i: usize, cluster: &str) {
    let mut secrets = Vec::new();
    for item in SECRETS_AT_REST {
        secrets.push(tb.escrowed(cluster, item).await);
    }
    assert_no_plain(&tb.node_dir(i), &secrets);
}

/// Restarts the agent of node `i` and waits until it reports ready; returns its log.
fn restart(tb: &Testbed, i: usize) -> (Agent, String) {
    let mut a = tb.spawn_agent(i, &["boot"]);
    let log = a.wait_log("node ready", Duration::from_secs(120));
    (a, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_every_point_between_init_and_marker_loses_nothing() {
    let points = [
        "pending-written",
        "uploaded-recovery-key-1",
        "uploaded-recovery-key-3",
        "uploaded-root-token",
        "verified",
        "marker-written",
        "pending-removed",
    ];
    let tb = Testbed::start(31, points.len());
    for (i, point) in points.iter().enumerate() {
        let cluster = format!("crash-{i}");
        tb.tag(i, "Cluster", &cluster).await;
        solo_config(&tb, i, &cluster, "");
        let mut a = tb.spawn_agent_env(i, &["boot"], &[("VAULT_BOOTSTRAP_CRASH_AT", point)]);
        let status = a.wait_exit(Duration::from_secs(120));
        let log = a.stderr();
        assert_eq!(
            status.signal(),
            Some(9),
            "{point}: agent was not killed at the hook:\n{log}"
        );
        assert!(log.contains("sys/init succeeded"), "{point}:\n{log}");
        // The agent died; its server lives on as an orphan. Kill it too (a reboot would).
        a.kill_servers();
        drop(a);
        let before_removal = *point != "pending-removed";
        assert_eq!(
            pending(&tb, i).exists(),
            before_removal,
            "{point}: pending file"
        );

        let (mut a, log) = restart(&tb, i);
        if before_removal {
            assert!(log.contains("resuming its escrow"), "{point}:\n{log}");
        } else {
            assert!(
                log.contains("redoing it with the escrowed root token"),
                "{point}:\n{log}"
            );
        }
        assert!(
            !log.contains("sys/init succeeded"),
            "{point}: a second init"
        );
        assert!(!pending(&tb, i).exists(), "{point}: pending file left");
        let (code, out) = tb.escrow_verify(i);
        assert_eq!(code, 0, "{point}: {out}");
        assert!(
            out.contains("recovery keys: 5/5 present and decrypt"),
            "{point}: {out}"
        );
        a.stop();
        assert_no_plain_secrets(&tb, i, &cluster).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_that_dies_before_init_is_taken_over() {
    let tb = Testbed::start(32, 2);
    for i in 0..2 {
        tb.tag(i, "Cluster", "takeover").await;
        solo_config(&tb, i, "takeover", "");
    }
    // Node 0 takes the lock and dies before sys/init.
    let mut a = tb.spawn_agent_env(0, &["boot"], &[("VAULT_BOOTSTRAP_CRASH_AT", "before-init")]);
    let status = a.wait_exit(Duration::from_secs(120));
    let log = a.stderr();
    assert_eq!(status.signal(), Some(9), "{log}");
    assert!(
        log.contains("won the init lock") && !log.contains("sys/init succeeded"),
        "{log}"
    );
    a.kill_servers();
    drop(a);
    // While its instance still runs, the lock is respected: node 1 waits, no init.
    let mut b = tb.spawn_agent(1, &["boot"]);
    b.wait_log("another node holds the init lock", Duration::from_secs(60));
    assert!(!b.stderr().contains("sys/init succeeded"));
    // The instance is terminated: node 1 takes over and initializes.
    let ec2 = aws_sdk_ec2::Client::new(&tb.sdk().await);
    ec2.terminate_instances()
        .instance_ids(&tb.instances[0].id)
        .send()
        .await
        .unwrap();
    let log = b.wait_log("node ready", Duration::from_secs(120));
    assert!(
        log.contains("taking the lock over") && log.contains("took over the init lock"),
        "{log}"
    );
    assert!(log.contains("sys/init succeeded"), "{log}");
    let (code, out) = tb.escrow_verify(1);
    assert_eq!(code, 0, "{out}");
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escrow_faults_keep_the_local_copy_and_resume() {
    let mut tb = Testbed::start(33, 4);
    tb.start_proxy();
    let fast = "[agent]\naws_timeout_secs = 3\n";

    // Lock bucket missing: a clear error, and no init at all.
    tb.tag(0, "Cluster", "nobucket").await;
    solo_config(
        &tb,
        0,
        "nobucket",
        &format!("{fast}[init]\nescrow_bucket = \"no-such-bucket\"\n"),
    );
    let (code, _, log) = tb.run_agent(0, &["boot"], Duration::from_secs(90));
    assert_eq!(code, 66, "{log}");
    assert!(
        log.contains("no-such-bucket") && log.contains("NoSuchBucket"),
        "{log}"
    );
    assert!(!log.contains("sys/init succeeded"), "{log}");

    // (rule, cluster, exit code, what the log must name)
    let cases = [
        (
            "POST #TrentService\\.Encrypt$ status 503 KMSInternalException",
            "kmsdown",
            80,
            "KMSInternalException",
        ),
        (
            "POST #TrentService\\.Encrypt$ status 400 AccessDeniedException",
            "kmsdenied",
            80,
            "AccessDeniedException",
        ),
        (
            "PUT .*recovery-key-2\\.enc status 503 ServiceUnavailable",
            "s3down",
            80,
            "ServiceUnavailable",
        ),
    ];
    for (n, (rule, cluster, code, needle)) in cases.into_iter().enumerate() {
        let i = n + 1;
        tb.tag(i, "Cluster", cluster).await;
        solo_config(&tb, i, cluster, fast);
        tb.proxy_rules(&format!("{rule}\n"));
        let (got, _, log) = tb.run_agent(i, &["boot"], Duration::from_secs(120));
        assert_eq!(got, code, "{cluster}: {log}");
        assert!(log.contains("sys/init succeeded"), "{cluster}: {log}");
        assert!(log.contains(needle), "{cluster}: {log}");
        assert!(
            log.contains("recovery keys not escrowed") && log.contains("is kept in"),
            "{cluster}: {log}"
        );
        assert!(
            pending(&tb, i).exists(),
            "{cluster}: the local encrypted copy must be kept"
        );
        let (vcode, out) = tb.escrow_verify(i);
        assert_ne!(
            vcode, 0,
            "{cluster}: verify must fail before the escrow completes: {out}"
        );

        // The fault clears; the next boot resumes and completes the escrow.
        tb.proxy_rules("");
        let (mut a, log) = restart(&tb, i);
        assert!(log.contains("resuming its escrow"), "{cluster}: {log}");
        assert!(!pending(&tb, i).exists());
        let (vcode, out) = tb.escrow_verify(i);
        assert_eq!(vcode, 0, "{cluster}: {out}");
        a.stop();
        assert_no_plain_secrets(&tb, i, cluster).await;
    }
}

fn gpg(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new("gpg")
        .arg("--homedir")
        .arg(home)
        .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("gpg (apt-get install gnupg)");
    assert!(
        out.status.success(),
        "gpg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgp_recovery_keys_are_encrypted_by_the_server_and_escrowed() {
    use base64::Engine;
    let tb = Testbed::start(34, 1);
    let home = tb.path().join("gnupg");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut files = Vec::new();
    for k in 1..=2 {
        let uid = format!("holder{k} <holder{k}@example.com>");
        gpg(
            &home,
            &[
                "--quick-gen-key",
                &uid,
                "future-default",
                "default",
                "never",
            ],
        );
        let export = gpg(&home, &["--export", &format!("holder{k}@example.com")]);
        let f = tb.path().join(format!("holder{k}.gpg"));
        std::fs::write(&f, &export.stdout).unwrap();
        files.push(format!("\"{}\"", f.display()));
    }
    tb.write_config(
        0,
        &NodeOpts {
            extra_toml: format!(
                "[init]\nrecovery_shares = 2\nrecovery_threshold = 2\nrecovery_pgp_keys = [{}]\n",
                files.join(", ")
            ),
            ..Default::default()
        },
    );
    let (mut a, log) = restart(&tb, 0);
    assert!(log.contains("pgp=true"), "{log}");
    a.stop();
    for n in 1..=2 {
        let escrowed = tb
            .escrowed("test-vault", &format!("recovery-key-{n}"))
            .await;
        let message = base64::engine::general_purpose::STANDARD
            .decode(escrowed.trim())
            .expect("base64 PGP message");
        let f = tb.path().join(format!("share{n}.pgp"));
        std::fs::write(&f, message).unwrap();
        let out = gpg(&home, &["-dq", f.to_str().unwrap()]);
        let share = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            share.len() >= 32 && share.chars().all(|c| c.is_ascii_hexdigit()),
            "share {n} decrypts to a hex key"
        );
    }
}
