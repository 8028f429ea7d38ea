//! `refresh-tls`: a rotated certificate is served after a reload, by the same server
//! process (no restart); a bad new certificate is refused and the old one keeps serving; a
//! rotated CA goes through every node in turn, each restarted, the cluster keeping quorum;
//! three nodes whose timers fire together restart one at a time.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// The serial of the certificate the server presents on a TLS handshake.
async fn served_serial(tb: &Testbed) -> String {
    let ca = std::fs::read(tb.seed_dir().join("ca.pem")).unwrap();
    let (_, serial) = served(&ca, &tb.instances[0].ip)
        .await
        .expect("TLS handshake");
    serial
}

/// (issuer, serial) of the certificate the server at `ip` presents, verified against the
/// CAs in `ca_pem`; None when the handshake or the request fails.
async fn served(ca_pem: &[u8], ip: &str) -> Option<(String, String)> {
    let http = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem).unwrap())
        .tls_info(true)
        // A new connection each time: a pooled one would show the old handshake.
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .unwrap();
    let r = http
        .get(format!("https://{ip}:8200/v1/sys/health"))
        .send()
        .await
        .ok()?;
    let info = r
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("tls info");
    let der = info.peer_certificate().expect("peer certificate").to_vec();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    Some((
        cert.issuer().to_string(),
        cert.raw_serial_as_string().replace(':', ""),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_is_served_without_a_restart_and_bad_ones_are_refused() {
    let tb = Testbed::start(37, 1);
    tb.write_config(0, &NodeOpts::default());
    let mut a = tb.spawn_agent(0, &["boot"]);
    a.wait_log("node ready", Duration::from_secs(120));
    let server_pid = children_of(a.pid()).first().copied().expect("server child");
    let before = served_serial(&tb).await;

    // A bad new certificate: refused, nothing swapped, the old one keeps serving.
    let key_before = std::fs::read(tb.node_dir(0).join("tls/server.key")).unwrap();
    for (variant, needle) in [("expired", "expired"), ("mismatch", "does not match")] {
        tb.tls_variant(variant);
        let (code, _, log) = tb.run_agent(0, &["refresh-tls"], Duration::from_secs(60));
        assert_eq!(code, 65, "{variant}: {log}");
        assert!(log.contains(needle), "{variant}: {log}");
        assert_eq!(
            served_serial(&tb).await,
            before,
            "{variant}: the old certificate must keep serving"
        );
        assert_eq!(
            std::fs::read(tb.node_dir(0).join("tls/server.key")).unwrap(),
            key_before
        );
    }

    // A good new certificate (same CA): swapped and reloaded, same process.
    tb.tls_variant("good");
    let (code, _, log) = tb.run_agent(0, &["refresh-tls"], Duration::from_secs(60));
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("server reloaded (no restart)"), "{log}");
    let after = poll(
        "the new certificate served",
        Duration::from_secs(20),
        || {
            let tb = &tb;
            let before = before.clone();
            async move {
                let s = served_serial(tb).await;
                (s != before).then_some(s)
            }
        },
    )
    .await;
    assert!(
        log.contains(&after),
        "the served serial is the one refresh-tls installed: {after}\n{log}"
    );
    assert_eq!(
        children_of(a.pid()).first().copied(),
        Some(server_pid),
        "same server process"
    );

    // Unchanged material: nothing to do.
    let (code, _, log) = tb.run_agent(0, &["refresh-tls"], Duration::from_secs(60));
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("unchanged"), "{log}");
    a.stop();
}

/// What `systemctl restart vault.service` does, played by the test (the agents run under the
/// exec launcher here): the server is started again on the files in node `i`'s directory.
fn start_server(tb: &Testbed, i: usize) -> Owned {
    let d = tb.node_dir(i);
    let ip = &tb.instances[i].ip;
    // The stopped server must have let go of its ports (all its threads gone).
    wait_for(
        &format!("node {i}'s ports to be free"),
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            [8200, 8201]
                .iter()
                .all(|p| std::net::TcpListener::bind(format!("{ip}:{p}")).is_ok())
                .then_some(())
        },
    );
    let log = std::fs::File::create(d.join("server-restarted.log")).unwrap();
    let child = std::process::Command::new(bao())
        .arg("server")
        .arg(format!("-config={}", d.join("etc/vault.hcl").display()))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", &d)
        .envs(tb.agent_env(i))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn the server");
    Owned {
        name: format!("node {i}'s restarted server"),
        child,
    }
}

/// A CA rotation as the daily timer runs it: a new CA and certificates it signed are
/// uploaded, then `refresh-tls` runs on one node after the other. Each must see its peers as
/// healthy (the ones already rotated serve the new CA's certificate, the others the old
/// one's), install the new CA and restart its server; the cluster keeps its quorum and its
/// three voters throughout, and every node ends serving the new CA's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_goes_through_every_node_and_the_cluster_keeps_quorum() {
    let extra = "[init]\nrevoke_root_token = false\n";
    let (tb, mut agents) = form(70, 3, extra);
    let root = tb.escrowed("test-vault", "root-token").await;
    wait_voters(&tb, 0, &root, 3).await;

    tb.tls_variant("new-ca");
    let new_ca = std::fs::read(tb.seed_dir().join("ca.pem")).unwrap();
    let both = [
        new_ca.clone(),
        std::fs::read(tb.seed_dir().join("ca-old.pem")).unwrap(),
    ]
    .concat();
    let rotated = |issuer: &str| issuer.contains("(rotated)");

    // systemd, as far as refresh-tls sees it: a stub systemctl per node that records each call.
    let stubs: Vec<(String, std::path::PathBuf)> =
        (0..3).map(|i| recording_systemctl(&tb, i)).collect();

    let mut restarted = Vec::new();
    for (i, agent) in agents.iter_mut().enumerate() {
        tb.write_config(
            i,
            &NodeOpts {
                extra_toml: format!("{extra}[vault]\nlauncher = \"systemd\"\n"),
                ..Default::default()
            },
        );
        // The node before holds the restart ticket for 30 s: a later one waits that long.
        let (code, _, log) = tb.run_agent_env(
            i,
            &["refresh-tls"],
            &[("PATH", stubs[i].0.as_str())],
            Duration::from_secs(180),
        );
        assert_eq!(code, 0, "node {i}'s refresh-tls:\n{log}");
        assert!(log.contains("new CA installed; server restarted"), "{log}");
        let recorded = std::fs::read_to_string(&stubs[i].1).unwrap_or_default();
        assert_eq!(
            recorded
                .lines()
                .last()
                .and_then(|l| l.split_once(' '))
                .map(|(_, call)| call),
            Some("restart vault.service"),
            "{recorded}"
        );
        assert_eq!(
            std::fs::read(tb.node_dir(i).join("tls/ca.pem")).unwrap(),
            new_ca,
            "node {i} holds the new CA"
        );
        // The restart refresh-tls asked systemd for.
        agent.stop();
        restarted.push(start_server(&tb, i));
        let ip = tb.instances[i].ip.clone();
        poll(
            &format!("node {i} unsealed, serving the new CA's certificate"),
            Duration::from_secs(60),
            || {
                let (tb, ip, both) = (&tb, ip.clone(), both.clone());
                async move {
                    let (issuer, _) = served(&both, &ip).await?;
                    let (code, _) = tb.api(i).health().await?;
                    (rotated(&issuer) && (code == 200 || code == 429)).then_some(())
                }
            },
        )
        .await;
        // Quorum kept: a leader, and all three voters, as the restarted node sees them.
        wait_voters(&tb, i, &root, 3).await;
    }

    // Done: every node serves the new CA's certificate, and a later run has nothing to do.
    for inst in &tb.instances {
        let (issuer, _) = served(&new_ca, &inst.ip)
            .await
            .unwrap_or_else(|| panic!("{} does not verify against the new CA", inst.ip));
        assert!(rotated(&issuer), "{}: {issuer}", inst.ip);
    }
    active(&tb, 3).await;
    let (code, _, log) = tb.run_agent_env(
        1,
        &["refresh-tls"],
        &[("PATH", stubs[1].0.as_str())],
        Duration::from_secs(60),
    );
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("unchanged"), "{log}");
    drop(restarted);
}

/// A stub `systemctl` for node `i` that records each call with its time (seconds since the
/// epoch) and does nothing: the test plays the restart.
fn recording_systemctl(tb: &Testbed, i: usize) -> (String, std::path::PathBuf) {
    let bin = tb.node_dir(i).join("stub-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = tb.node_dir(i).join("systemctl.calls");
    std::fs::write(
        bin.join("systemctl"),
        format!(
            "#!/bin/sh\necho \"$(date +%s.%N) $*\" >> {}\nexit 0\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("systemctl"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (path, calls)
}

/// After a fleet reboot every node's refresh-tls timer fires at once (`Persistent=true`).
/// With a new CA in the bucket, three `refresh-tls` start together: they restart their
/// servers one at a time, each once the raft configuration and autopilot say the others
/// are healthy, so at every sample (0.25 s) at least two of the three nodes serve. (Before,
/// each counted its EC2 peers healthy at the same instant and all three restarted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_restarts_of_nodes_whose_timers_fire_together_go_one_at_a_time() {
    let extra = "[init]\nrevoke_root_token = false\n";
    let (tb, mut agents) = form(98, 3, extra);
    let root = tb.escrowed("test-vault", "root-token").await;
    wait_voters(&tb, 0, &root, 3).await;
    tb.tls_variant("new-ca");
    let both = tb.path().join("both-cas.pem");
    std::fs::write(
        &both,
        [
            std::fs::read(tb.seed_dir().join("ca.pem")).unwrap(),
            std::fs::read(tb.seed_dir().join("ca-old.pem")).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let stubs: Vec<(String, std::path::PathBuf)> =
        (0..3).map(|i| recording_systemctl(&tb, i)).collect();
    for i in 0..3 {
        tb.write_config(
            i,
            &NodeOpts {
                extra_toml: format!("{extra}[vault]\nlauncher = \"systemd\"\n"),
                ..Default::default()
            },
        );
    }
    let mut refreshers: Vec<Agent> = (0..3)
        .map(|i| tb.spawn_agent_env(i, &["refresh-tls"], &[("PATH", stubs[i].0.as_str())]))
        .collect();
    let start = Instant::now();
    let mut restarted_at: Vec<Option<f64>> = vec![None; 3];
    let mut servers = Vec::new();
    let mut fewest = 3;
    loop {
        // Read before the calls files, so a refresher's last call is seen before the loop ends.
        let done = refreshers.iter_mut().all(|r| r.exited().is_some());
        for i in 0..3 {
            let calls = std::fs::read_to_string(&stubs[i].1).unwrap_or_default();
            if restarted_at[i].is_none() {
                if let Some(line) = calls.lines().find(|l| l.ends_with("restart vault.service")) {
                    restarted_at[i] = line.split(' ').next().and_then(|t| t.parse().ok());
                    // What systemd does on that call: the server stops and starts again.
                    agents[i].stop();
                    servers.push(start_server(&tb, i));
                }
            }
        }
        let mut serving = 0;
        for inst in &tb.instances {
            if matches!(
                Api::new(&both, &inst.ip).health().await,
                Some((200 | 429, _))
            ) {
                serving += 1;
            }
        }
        fewest = fewest.min(serving);
        assert!(
            serving >= 2,
            "only {serving} of 3 nodes serve {:?} in (restarts at {restarted_at:?}): two restarted together",
            start.elapsed()
        );
        if done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(420),
            "refresh-tls still running"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut times: Vec<f64> = Vec::new();
    for (i, r) in refreshers.iter_mut().enumerate() {
        let status = r.wait_exit(Duration::from_secs(5));
        assert!(status.success(), "node {i}'s refresh-tls:\n{}", r.stderr());
        times.push(restarted_at[i].unwrap_or_else(|| panic!("node {i} never asked for a restart")));
    }
    times.sort_by(f64::total_cmp);
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    println!("restarts {gaps:?} s apart; at least {fewest} of 3 nodes served at every sample");
    assert!(gaps.iter().all(|g| *g >= 5.0), "restarts {gaps:?} s apart");
    assert!(
        refreshers
            .iter()
            .any(|r| r.stderr().contains("not restarting the server yet")),
        "a node waited its turn"
    );
    wait_voters(&tb, 0, &root, 3).await;
    drop(servers);
}
