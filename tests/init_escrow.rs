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
        "items-recorded",
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
            // The pending file holds the keys and the root token: escrow and post-init resume
            // from it (a node never decrypts the escrowed root token).
            assert!(log.contains("resuming its escrow"), "{point}:\n{log}");
            assert!(log.contains("post-init complete"), "{point}:\n{log}");
        } else {
            // The pending file goes only once post-init is done: nothing left to redo.
            assert!(!log.contains("resuming its escrow"), "{point}:\n{log}");
            assert!(!log.contains("POST-INIT UNFINISHED"), "{point}:\n{log}");
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
    // Stopped is not gone: its volume keeps whatever it initialized, and a takeover could
    // make a second cluster when it starts again. Node 1 keeps waiting (several rounds).
    let ec2 = aws_sdk_ec2::Client::new(&tb.sdk().await);
    ec2.stop_instances()
        .instance_ids(&tb.instances[0].id)
        .send()
        .await
        .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let log = b.stderr();
    assert!(
        !log.contains("taking the lock over") && !log.contains("sys/init succeeded"),
        "a stopped holder's lock was taken over:\n{log}"
    );
    // The instance is terminated: node 1 takes over and initializes.
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

/// Issue 12, item 1: the lock winner and its server lose power while `sys/init` runs. The
/// server's raft store is then half-bootstrapped ("cluster already has state" on every later
/// start) or initialized with keys nobody received. The next boot moves it aside (kept) and
/// inits again: one cluster, escrow verified. Three kill delays, so that at least one hits
/// the store mid-bootstrap (`sys/init` takes 1.5-3 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_during_sys_init_is_recovered_by_moving_the_store_aside() {
    let delays_ms = [150u64, 700, 1400];
    let tb = Testbed::start(62, delays_ms.len());
    let mut moved = 0;
    let mut late = 0;
    let mut during = 0;
    for (i, ms) in delays_ms.iter().enumerate() {
        let cluster = format!("midinit-{i}");
        tb.tag(i, "Cluster", &cluster).await;
        solo_config(&tb, i, &cluster, "");
        let mut a = tb.spawn_agent(i, &["boot"]);
        a.wait_log("calling sys/init", Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(*ms));
        a.power_off();
        // On a quiet machine sys/init can answer before the longest delay: that power loss
        // came after init, not during it, and proves nothing here (the crash trials cover
        // it). Counted apart; every power loss during sys/init must be recovered.
        let was_late = a.stderr().contains("sys/init succeeded");
        if was_late {
            late += 1;
            eprintln!("{ms} ms: sys/init had answered before the power loss");
        } else {
            during += 1;
            assert!(
                tb.node_dir(i).join("state/init-attempt.json").exists(),
                "{ms} ms: the attempt is on disk"
            );
        }
        let (mut a, log) = restart(&tb, i);
        let was_moved = log.contains("was moved aside (kept, not deleted)");
        assert!(
            was_moved || was_late,
            "{ms} ms: a power loss during sys/init was not recovered by moving the store aside:\n{log}"
        );
        if was_moved && !was_late {
            moved += 1;
            let aside = tree(&tb.node_dir(i))
                .into_iter()
                .filter(|f| f.starts_with("data.removed-") && f.ends_with("vault.db"))
                .count();
            assert_eq!(aside, 1, "{ms} ms: the store is kept beside data/");
        }
        // After a late power loss the restart resumes the one init there was.
        if !was_late {
            assert!(log.contains("sys/init succeeded"), "{ms} ms:\n{log}");
        }
        assert!(!tb.node_dir(i).join("state/init-attempt.json").exists());
        let (code, out) = tb.escrow_verify(i);
        assert_eq!(code, 0, "{ms} ms: {out}");
        a.stop();
    }
    assert_eq!(
        moved, during,
        "every interrupted init was recovered by moving its store aside"
    );
    assert!(
        during >= 2,
        "at least two power losses fell during sys/init ({late} came after it)"
    );
}

/// Issue 12, item 2: no init unless the state directory takes a write first; and once the
/// keys exist, the agent never exits while they are only in its memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_never_only_in_memory_when_the_agent_can_exit() {
    let mut tb = Testbed::start(63, 3);
    tb.start_proxy();
    let fast = "[agent]\naws_timeout_secs = 3\n";

    // (a) The attempt record cannot be written: no sys/init at all, exit 73, nothing in S3.
    tb.tag(0, "Cluster", "nowrite").await;
    solo_config(&tb, 0, "nowrite", fast);
    let (code, _, log) = tb.run_agent_env(
        0,
        &["boot"],
        &[("VAULT_BOOTSTRAP_FAIL_AT", "attempt-write")],
        Duration::from_secs(90),
    );
    assert_eq!(code, 73, "{log}");
    assert!(log.contains("init-attempt.json"), "{log}");
    assert!(!log.contains("calling sys/init"), "{log}");
    let objects = aws_sdk_s3::Client::new(&tb.sdk().await)
        .list_objects_v2()
        .bucket("vault-resources")
        .prefix("vault-bootstrap/nowrite/")
        .send()
        .await
        .unwrap();
    let keys: Vec<&str> = objects.contents().iter().filter_map(|o| o.key()).collect();
    assert!(keys.iter().all(|k| k.contains("init-lock/")), "{keys:?}");

    // (b) The pending file cannot be written and S3 refuses the escrow: the agent keeps the
    // keys and retries both, loudly, for as long as it takes; when S3 is back it escrows.
    tb.tag(1, "Cluster", "inmemory").await;
    solo_config(&tb, 1, "inmemory", fast);
    tb.proxy_rules("PUT .*recovery-key-2\\.enc status 503 ServiceUnavailable\n");
    let mut a = tb.spawn_agent_env(
        1,
        &["boot"],
        &[("VAULT_BOOTSTRAP_FAIL_AT", "pending-write")],
    );
    a.wait_log(
        "THE RECOVERY KEYS EXIST ONLY IN THIS PROCESS",
        Duration::from_secs(60),
    );
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        assert!(
            a.exited().is_none(),
            "exited with the keys only in memory:\n{}",
            a.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        a.stderr()
            .matches("THE RECOVERY KEYS EXIST ONLY IN THIS PROCESS")
            .count()
            >= 2
    );
    tb.proxy_rules("");
    let log = a.wait_log("node ready", Duration::from_secs(90));
    assert!(
        !log.contains("init response sealed to the local pending file"),
        "{log}"
    );
    let (code, out) = tb.escrow_verify(1);
    assert_eq!(code, 0, "{out}");
    a.stop();
    assert_no_plain_secrets(&tb, 1, "inmemory").await;

    // (c) The lock holder's cluster is initialized, but neither a marker nor a pending file
    // (nor an attempt record) exists: its keys are lost. Every boot fails with exit 80, never
    // "ready", and `status` says so.
    tb.tag(2, "Cluster", "lost").await;
    solo_config(&tb, 2, "lost", fast);
    let mut a = tb.spawn_agent_env(
        2,
        &["boot"],
        &[("VAULT_BOOTSTRAP_CRASH_AT", "pending-written")],
    );
    a.wait_exit(Duration::from_secs(90));
    a.kill_servers();
    std::fs::remove_file(pending(&tb, 2)).unwrap();
    for _ in 0..2 {
        let (code, _, log) = tb.run_agent(2, &["boot"], Duration::from_secs(90));
        assert_eq!(code, 80, "{log}");
        assert!(
            log.contains("were never escrowed") && !log.contains("node ready"),
            "{log}"
        );
    }
    // status reads the local server: start it as boot would have left it, from its files.
    let server = std::process::Command::new(bao())
        .arg("server")
        .arg(format!(
            "-config={}",
            tb.node_dir(2).join("etc/vault.hcl").display()
        ))
        .envs(tb.agent_env(2))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = Owned {
        name: "bao".into(),
        child: server,
    };
    poll("the server unsealed", Duration::from_secs(30), || async {
        matches!(tb.api(2).health().await, Some((200 | 429, _))).then_some(())
    })
    .await;
    let (code, out, _) = tb.run_agent(2, &["status"], Duration::from_secs(60));
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        doc["escrow"]["keys"]
            .as_str()
            .unwrap()
            .starts_with("NOT ESCROWED"),
        "{doc}"
    );
    drop(server);
}

/// Issue 12, item 4: a node whose raft data is another cluster's than the marker records
/// never reports ready, and says why (exit 81).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serving_another_cluster_is_never_ready() {
    let tb = Testbed::start(64, 2);
    for (i, c) in ["alpha", "beta"].iter().enumerate() {
        tb.tag(i, "Cluster", c).await;
        solo_config(&tb, i, c, "");
        let (mut a, _) = restart(&tb, i);
        a.stop();
    }
    // Node 1 (cluster beta's data) is moved to alpha.
    tb.tag(1, "Cluster", "alpha").await;
    solo_config(&tb, 1, "alpha", "");
    for _ in 0..2 {
        let (code, _, log) = tb.run_agent(1, &["boot"], Duration::from_secs(120));
        assert_eq!(code, 81, "{log}");
        assert!(
            log.contains("records cluster") && log.contains("cluster-initialized.json"),
            "{log}"
        );
        assert!(!log.contains("node ready"), "{log}");
    }

    // Under the systemd launcher the server outlives the agent: before exit 81 it must be
    // stopped, or a load balancer's health check keeps finding it serving.
    let systemd = "[vault]\nlauncher = \"systemd\"\n";
    solo_config(&tb, 1, "alpha", systemd);
    let log = boot_81_with_systemd(&tb, 1).await;
    assert!(
        !log.contains("from its last known good files"),
        "the new-node path: {log}"
    );

    // The same from disk: node 0's membership record and its store agree, but the escrow
    // marker names another cluster (a second init's); ready only after that check.
    let marker = |c: &str| format!("vault-bootstrap/{c}/cluster-initialized.json");
    let read = |c: &'static str| {
        let key = marker(c);
        let tb = &tb;
        async move { serde_json::from_slice::<serde_json::Value>(&tb.get_object(&key).await).unwrap() }
    };
    let beta_id = read("beta").await["cluster_id"].clone();
    let mut alpha = read("alpha").await;
    assert_ne!(alpha["cluster_id"], beta_id);
    alpha["cluster_id"] = beta_id;
    tb.put_object(&marker("alpha"), alpha.to_string().as_bytes())
        .await;
    solo_config(&tb, 0, "alpha", systemd);
    let log = boot_81_with_systemd(&tb, 0).await;
    assert!(
        log.contains("from its last known good files"),
        "the from-disk path: {log}"
    );
}

/// Boots node `i` under the systemd launcher (through [`SystemdStub`]), expecting exit 81:
/// systemd was asked to start the server and to stop it again, nothing answers `sys/health`
/// after the agent exits, and it never said ready. Returns the agent's log.
async fn boot_81_with_systemd(tb: &Testbed, i: usize) -> String {
    let stub = SystemdStub::new(tb, i);
    let path = stub.path();
    let (code, _, log) =
        tb.run_agent_env(i, &["boot"], &[("PATH", &path)], Duration::from_secs(120));
    let calls = stub.calls();
    let answers = tb.api(i).health().await;
    stub.kill_server();
    assert_eq!(code, 81, "{log}");
    assert!(
        calls.iter().any(|c| c.starts_with("start")),
        "{calls:?}\n{log}"
    );
    assert!(
        calls.iter().any(|c| c == "stop vault.service"),
        "{calls:?}\n{log}"
    );
    assert!(
        answers.is_none(),
        "node {i} still answers sys/health after exit 81: {answers:?}"
    );
    assert!(!log.contains("node ready"), "{log}");
    log
}

/// A stub `systemctl`, first on the agent's PATH, that runs node `i`'s real server as
/// systemd runs `vault.service` (start, restart, stop, is-active of that one unit) and
/// records every call. The server it starts inherits the agent's environment, as the exec
/// launcher's does.
struct SystemdStub {
    bin: PathBuf,
    calls: PathBuf,
    pidfile: PathBuf,
    hcl: PathBuf,
}

impl SystemdStub {
    fn new(tb: &Testbed, i: usize) -> SystemdStub {
        let d = tb.node_dir(i);
        let bin = d.join("stub-systemd");
        std::fs::create_dir_all(&bin).unwrap();
        let (calls, pidfile) = (d.join("systemctl.calls"), d.join("stub-server.pid"));
        let _ = std::fs::remove_file(&calls);
        let script = format!(
            r#"#!/bin/sh
echo "$*" >> '{calls}'
pidf='{pid}'
alive() {{ [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; }}
stop() {{
    if alive; then
        kill "$(cat "$pidf")"
        i=0; while alive && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    fi
    rm -f "$pidf"
}}
case "$1" in
    is-active) alive; exit $? ;;
    start|restart)
        [ "$1" = restart ] && stop
        alive && exit 0
        '{bao}' server -config='{hcl}' >>'{log}' 2>&1 </dev/null &
        echo $! > "$pidf"
        exit 0 ;;
    stop) stop; exit 0 ;;
    *) exit 0 ;;
esac
"#,
            calls = calls.display(),
            pid = pidfile.display(),
            bao = bao().display(),
            hcl = d.join("etc/vault.hcl").display(),
            log = d.join("stub-server.log").display(),
        );
        std::fs::write(bin.join("systemctl"), script).unwrap();
        std::fs::set_permissions(
            bin.join("systemctl"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        SystemdStub {
            bin,
            calls,
            pidfile,
            hcl: d.join("etc/vault.hcl"),
        }
    }

    /// The agent's PATH, the stub first.
    fn path(&self) -> String {
        format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// SIGKILLs the server this stub started, if it still runs (by its recorded PID, and
    /// only while that PID is still a server of this node's configuration).
    fn kill_server(&self) {
        if let Some(pid) = std::fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let hcl = self.hcl.as_os_str().as_encoded_bytes();
            if cmdline.windows(hcl.len()).any(|w| w == hcl) {
                signal(pid, 9);
            }
        }
    }
}

/// A test that fails leaves no server behind.
impl Drop for SystemdStub {
    fn drop(&mut self) {
        self.kill_server();
    }
}

/// Post-init interrupted on the initializer. Every other member and `status` say it is
/// unfinished; the initializer, back as a standby, finishes it through the active node in
/// that boot: the root token is revoked and the node credentials exist (before, it left
/// post-init for a boot as the active node, and `snapshot` exited 66 meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_initializer_finishes_post_init_through_the_active_node() {
    let tb = Testbed::start(65, 3);
    // An operator login path, so that post-init revokes the root token.
    let operators = ca("operators CA");
    tb.put_object("tls/operator-ca.pem", operators.pem.as_bytes())
        .await;
    let extra = "[access]\noperator_ca_key = \"tls/operator-ca.pem\"\noperator_common_names = [\"alice\"]\n";
    for i in 0..3 {
        tb.write_config(
            i,
            &NodeOpts {
                extra_toml: extra.into(),
                ..Default::default()
            },
        );
    }
    // Only the initializer reaches this point; it dies there, its server lives on (as
    // vault.service would under systemd).
    let crash = [("VAULT_BOOTSTRAP_CRASH_AT", "marker-written")];
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| tb.spawn_agent_env(i, &["boot"], &crash))
        .collect();
    let winner = poll(
        "the initializer to die at its crash point",
        Duration::from_secs(120),
        || {
            // `exited` also records each agent's server while the agent lives: the
            // winner's must be known, to be killed later.
            let dead: Vec<bool> = agents.iter_mut().map(|a| a.exited().is_some()).collect();
            let found = (0..agents.len())
                .find(|&k| dead[k] && agents[k].stderr().contains("sys/init succeeded"));
            async move { found }
        },
    )
    .await;
    let others: Vec<usize> = (0..3).filter(|i| *i != winner).collect();
    for &i in &others {
        let log = agents[i].wait_log("node ready", Duration::from_secs(120));
        assert!(log.contains("post_init_done=false"), "{log}");
        assert!(
            log.contains("post-init is in progress on the initializer"),
            "{log}"
        );
    }
    let (code, out, _) = tb.run_agent(others[0], &["status"], Duration::from_secs(60));
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["post_init"]["state"], "UNFINISHED", "{doc}");
    assert_eq!(
        doc["post_init"]["initialized_by"].as_str(),
        Some(tb.instances[winner].id.as_str())
    );

    // Leadership moves away from the initializer, whose server then restarts: it comes back
    // as a standby.
    let root = tb.escrowed("test-vault", "root-token").await;
    wait_voters(&tb, others[0], &root, 3).await;
    tb.api(winner)
        .put_ok("sys/step-down", &root, serde_json::json!({}))
        .await;
    let new_leader = poll("a new active node", Duration::from_secs(60), || async {
        match roles(&tb, 3).await.0 {
            Some(a) if a != winner => Some(a),
            _ => None,
        }
    })
    .await;
    agents[winner].kill_servers();
    // A killed server's last threads may hold its port for a moment after it is reaped.
    let api = format!("{}:8200", tb.instances[winner].ip);
    wait_for(
        "the old server's port to close",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            std::net::TcpStream::connect_timeout(&api.parse().unwrap(), Duration::from_millis(200))
                .is_err()
                .then_some(())
        },
    );
    let mut again = tb.respawn_agent(winner, &["boot"], &[]);
    let log = again.wait_log("node ready", Duration::from_secs(90));
    assert!(
        log.contains("is a standby now: post-init goes through the active node"),
        "{log}"
    );
    assert!(log.contains("post-init complete"), "{log}");
    assert!(log.contains("root token revoked"), "{log}");
    assert!(log.contains("post_init_done=true"), "{log}");
    assert_eq!(
        roles(&tb, 3).await.0,
        Some(new_leader),
        "it did not take leadership back"
    );
    // Within this one boot: the root token is dead, post-init is recorded, and a node
    // takes a snapshot with the AppRole post-init made.
    let (code, _) = tb
        .api(new_leader)
        .get("sys/storage/raft/configuration", Some(&root))
        .await
        .unwrap();
    assert_eq!(code, 403, "the root token must be revoked");
    let (code, out, _) = tb.run_agent(others[0], &["status"], Duration::from_secs(60));
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["post_init"]["state"], "done", "{doc}");
    assert_eq!(doc["post_init"]["root_revoked"], true, "{doc}");
    let (code, out, err) = tb.run_agent(others[1], &["snapshot"], Duration::from_secs(120));
    assert_eq!(code, 0, "{out}\n{err}");
    again.stop();
    for a in agents.iter_mut() {
        a.stop();
    }
}

/// `sys/init` committed, the two other nodes joined what it made, and the answer never
/// reached the agent (here a test hook kills the agent 15 s after the answer, before it
/// seals it anywhere). Nobody holds that cluster's keys, and its members would come back
/// from their own disks serving it. The initializer's next boot must not move its store
/// aside and init a second cluster: it stops with exit 80, both while the peers answer and
/// once they are down (an AZ power event), when only its own raft store says they joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_init_answer_that_peers_joined_is_never_initialized_again() {
    let tb = Testbed::start(95, 3);
    for i in 0..3 {
        tb.write_config(i, &NodeOpts::default());
    }
    let hooks = [
        ("VAULT_BOOTSTRAP_PAUSE_AT", "init-answered:15000"),
        ("VAULT_BOOTSTRAP_CRASH_AT", "init-answered"),
    ];
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| tb.spawn_agent_env(i, &["boot"], &hooks))
        .collect();
    let w = poll("the lock winner", Duration::from_secs(120), || async {
        (0..3).find(|&i| agents[i].stderr().contains("won the init lock"))
    })
    .await;
    let peers: Vec<usize> = (0..3).filter(|&i| i != w).collect();
    for &i in &peers {
        // A joiner settles on the marker only, which never comes: its server joining is
        // what counts here.
        agents[i].wait_log(
            "this node is unsealed and part of an initialized cluster",
            Duration::from_secs(60),
        );
    }
    let status = agents[w].wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "the hook killed the initializer");
    agents[w].kill_servers();
    assert!(!agents[w].stderr().contains("sys/init succeeded"));
    assert!(tb.node_dir(w).join("state/init-attempt.json").exists());

    let boot_again = |why: &str| {
        let mut a = tb.respawn_agent(w, &["boot"], &[]);
        let code = a.wait_exit(Duration::from_secs(120)).code();
        a.kill_servers();
        let log = a.stderr();
        assert_eq!(code, Some(80), "{why}: exit 80:\n{}", tail(&log, 40));
        assert!(
            log.contains("other nodes joined the cluster it made"),
            "{why}:\n{}",
            tail(&log, 40)
        );
        assert!(
            !log.contains("calling sys/init"),
            "{why}: no second init:\n{log}"
        );
        assert!(
            !tree(&tb.node_dir(w))
                .iter()
                .any(|f| f.starts_with("data.removed-")),
            "{why}: the store stays where it is"
        );
        assert!(tb.node_dir(w).join("state/init-attempt.json").exists());
        log
    };
    let log = boot_again("peers up");
    assert!(log.contains("answers sys/health initialized"), "{log}");
    for &i in &peers {
        agents[i].power_off();
    }
    let log = boot_again("peers down");
    assert!(
        log.contains("is in this node's raft configuration"),
        "{log}"
    );
    assert!(!log.contains("answers sys/health initialized"), "{log}");
}

/// The escrow keeps failing (KMS refuses `Encrypt`) for longer than the launch hook's
/// heartbeat timeout: the hook is heartbeated while the keys are pending, so the group
/// never abandons the initializer. Then the initializer is terminated anyway, its volume
/// gone. Every member's boot then fails loudly (exit 80, `status` says why), and an operator
/// finishes the escrow from the copy of the init response in S3: the keys make a root token.
/// Every node runs under the systemd launcher (a stub `systemctl`), whose server outlives
/// a failed boot as `vault.service` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initializer_gone_before_its_escrow_finished_is_finished_from_s3() {
    const HOOK_TIMEOUT_SECS: u64 = 15;
    let mut tb = Testbed::start(96, 3);
    tb.start_lifecycle(
        &[Hook {
            name: "vb-launch",
            transition: "launching",
            heartbeat_timeout_secs: HOOK_TIMEOUT_SECS,
            default_result: "ABANDON",
        }],
        &[],
    );
    let id0 = tb.instances[0].id.clone();
    assert_eq!(
        tb.lifecycle_cmd(&["launch", "--instance", &id0]),
        "Pending:Wait"
    );
    tb.proxy_rules("POST TrentService\\.Encrypt$ status 500 KMSInternalException\n");
    let base = "[vault]\nlauncher = \"systemd\"\n[init]\nrevoke_root_token = false\n[agent]\naws_timeout_secs = 5\n";
    let hooked = format!("{base}[lifecycle]\nlaunch_hook = \"vb-launch\"\nheartbeat_secs = 3\nbound_cidrs = [\"127.0.0.0/8\"]\n");
    for i in 0..3 {
        let extra = if i == 0 {
            hooked.clone()
        } else {
            base.to_string()
        };
        tb.write_config(
            i,
            &NodeOpts {
                extra_toml: extra,
                ..Default::default()
            },
        );
    }
    let stubs: Vec<SystemdStub> = (0..3).map(|i| SystemdStub::new(&tb, i)).collect();
    let paths: Vec<String> = stubs.iter().map(SystemdStub::path).collect();
    let boot = |i: usize| tb.respawn_agent(i, &["boot"], &[("PATH", &paths[i])]);

    // The initializer: init succeeds, the copy reaches S3, the escrow fails.
    let mut a0 = boot(0);
    a0.wait_log("is copied to S3", Duration::from_secs(120));
    let copy = tb
        .get_object(&format!(
            "vault-bootstrap/test-vault/pending-init/{id0}.json"
        ))
        .await;
    assert!(String::from_utf8_lossy(&copy).contains("encrypted_data_key"));
    for i in 1..3 {
        let mut a = boot(i);
        assert!(
            a.wait_exit(Duration::from_secs(180)).success(),
            "{}",
            a.stderr()
        );
    }
    // Past twice the hook's timeout, restarting the initializer's boot as systemd would.
    let since = std::time::Instant::now();
    let mut failures = 0;
    while since.elapsed() < Duration::from_secs(2 * HOOK_TIMEOUT_SECS + 10) {
        if let Some(s) = a0.exited() {
            assert_eq!(s.code(), Some(80), "{}", tail(&a0.stderr(), 30));
            failures += 1;
            std::thread::sleep(Duration::from_secs(1));
            a0 = boot(0);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let state = tb.lifecycle_cmd(&["state", "--instance", &id0]);
    assert_eq!(
        state, "Pending:Wait",
        "the group kept the initializer while its keys were pending"
    );
    let beats = tb
        .lifecycle_events(&id0)
        .iter()
        .filter(|e| e["action"] == "heartbeat")
        .count();
    assert!(beats >= 5, "{beats} heartbeats");
    println!("escrow failing: {failures} failed boots, {beats} heartbeats, the hook still waits after {:?}", since.elapsed());

    // Terminated with its volume: no pending file survives anywhere but in S3.
    a0.power_off();
    stubs[0].kill_server();
    tb.terminate_instance(&id0);
    std::fs::remove_dir_all(tb.node_dir(0).join("state")).unwrap();
    std::fs::remove_dir_all(tb.node_dir(0).join("data")).unwrap();

    // A member's boot now fails loudly, and says what to do.
    let member = poll("an active member", Duration::from_secs(60), || async {
        for i in 1..3 {
            if let Some((200, _)) = tb.api(i).health().await {
                return Some(i);
            }
        }
        None
    })
    .await;
    let other = 3 - member;
    let mut a = boot(other);
    let code = a.wait_exit(Duration::from_secs(120)).code();
    let log = a.stderr();
    assert_eq!(code, Some(80), "{}", tail(&log, 30));
    assert!(
        log.contains("is terminated or gone") && log.contains("escrow finish"),
        "{log}"
    );
    assert!(
        tb.api(other).health().await.is_some(),
        "its server keeps serving"
    );
    let (code, out, err) = tb.run_agent_env(
        other,
        &["status"],
        &[("PATH", &paths[other])],
        Duration::from_secs(60),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("never finished the escrow") && out.contains("escrow finish"),
        "{out}"
    );

    // The operator finishes it, on the active member; its keys make a root token.
    tb.proxy_rules("");
    let (code, out, err) = tb.run_agent_env(
        member,
        &["escrow", "finish"],
        &[("PATH", &paths[member])],
        Duration::from_secs(180),
    );
    assert_eq!(code, 0, "escrow finish: {out}\n{err}");
    assert!(
        out.contains(&format!("escrow of {id0}'s init finished")),
        "{out}"
    );
    assert!(out.contains("post-init: done"), "{out}");
    let (code, out) = tb.escrow_verify(member);
    assert_eq!(code, 0, "{out}");
    let (code, token, err) = tb.run_agent(
        member,
        &["break-glass", "--from-escrow", "--yes"],
        Duration::from_secs(90),
    );
    assert_eq!(code, 0, "break-glass: {err}");
    let servers = raft_servers(&tb, member, token.trim()).await;
    assert!(
        servers.is_some_and(|s| !s.is_empty()),
        "the new root token reads the raft configuration"
    );
    // And the member that failed boots again, ready.
    let mut a = boot(other);
    assert!(
        a.wait_exit(Duration::from_secs(120)).success(),
        "{}",
        tail(&a.stderr(), 30)
    );
    for s in &stubs {
        s.kill_server();
    }
}
