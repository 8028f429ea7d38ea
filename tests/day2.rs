//! Day 2 on the test-bed: the active node's server is killed (SIGKILL) and a survivor takes
//! over; its instance is then terminated in EC2 and a replacement with a new IP boots its
//! agent: it joins as a voter with no human step, autopilot removes the dead peer, and the
//! cluster tolerates one failure again.

mod common;
use common::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_then_replaced_by_a_new_instance() {
    // Autopilot's dead-server cleanup, at its minimum threshold, removes the dead voter.
    let extra = "[init]\nrevoke_root_token = false\ncleanup_dead_servers = true\ndead_server_last_contact_threshold = \"1m\"\n";
    let (mut tb, mut agents) = form(38, 3, extra);
    let root = tb.escrowed("test-vault", "root-token").await;
    // A healthy cluster first: joiners are promoted to voters by autopilot (~20 s).
    wait_voters(&tb, 0, &root, 3).await;

    let leader = active(&tb, 3).await;

    // SIGKILL its server: a survivor must answer 200 within the bound.
    let pids = children_of(agents[leader].pid());
    assert!(!pids.is_empty());
    agents[leader].kill_servers();
    let killed = Instant::now();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let new_leader = poll(
        "a survivor answers 200",
        Duration::from_secs(30),
        || async { roles(&tb, 3).await.0.filter(|i| *i != leader) },
    )
    .await;
    eprintln!(
        "failover: node {new_leader} active {:.2} s after SIGKILL",
        killed.elapsed().as_secs_f64()
    );
    let status = agents[leader].wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "the agent exits with its killed server");

    // The dead node's instance is terminated; a replacement with a new IP boots.
    let dead_id = tb.instances[leader].id.clone();
    let ec2 = aws_sdk_ec2::Client::new(&tb.sdk().await);
    ec2.terminate_instances()
        .instance_ids(&dead_id)
        .send()
        .await
        .unwrap();
    let new = tb.add_instance("127.0.38.14");
    tb.write_config(
        new,
        &NodeOpts {
            extra_toml: extra.into(),
            ..Default::default()
        },
    );
    let mut replacement = tb.spawn_agent(new, &["boot"]);
    let log = replacement.wait_log("node ready", Duration::from_secs(120));
    assert!(
        !log.contains("sys/init succeeded"),
        "the replacement must join, not init:\n{log}"
    );
    let hcl = std::fs::read_to_string(tb.node_dir(new).join("etc/vault.hcl")).unwrap();
    let dead_api = format!("https://{}:8200", tb.instances[leader].ip);
    assert!(
        !hcl.contains(&dead_api),
        "no retry_join to the terminated node:\n{hcl}"
    );
    assert_eq!(hcl.matches("retry_join {").count(), 2, "{hcl}");

    // Voters: the two survivors and the replacement; the dead peer removed by autopilot.
    let api = tb.api(new_leader);
    let mut want: Vec<String> = survivors
        .iter()
        .map(|i| tb.instances[*i].id.clone())
        .collect();
    want.push(tb.instances[new].id.clone());
    want.sort();
    // Exactly 3 servers, all voters: the replacement is a member since its "node ready"
    // (unsealed means joined), so the dead peer is gone, and `want` says it is not one of them.
    let got = wait_voters(&tb, new_leader, &root, 3).await;
    assert_eq!(got, want);
    poll("failure tolerance 1", Duration::from_secs(60), || {
        let api = &api;
        let root = &root;
        async move {
            let (code, body) = api
                .get("sys/storage/raft/autopilot/state", Some(root))
                .await?;
            let t = body["data"]["failure_tolerance"].as_u64()?;
            (code == 200 && t == 1).then_some(())
        }
    })
    .await;

    replacement.stop();
    for a in agents.iter_mut() {
        a.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sealed_on_purpose_is_left_sealed() {
    let (tb, mut agents) = form(42, 3, "[init]\nrevoke_root_token = false\n");
    let root = tb.escrowed("test-vault", "root-token").await;
    wait_voters(&tb, 0, &root, 3).await;
    tb.api(2)
        .put_ok("sys/seal", &root, serde_json::json!({}))
        .await;
    assert_eq!(tb.api(2).health().await.map(|h| h.0), Some(503));

    // The node reboots its agent under systemd (the server keeps running, sealed): a stub
    // systemctl says the unit is active and records every call.
    let bin = tb.path().join("stub-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = tb.path().join("systemctl.calls");
    std::fs::write(
        bin.join("systemctl"),
        format!("#!/bin/sh\necho \"$*\" >> {}\nexit 0\n", calls.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("systemctl"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    tb.write_config(
        2,
        &NodeOpts {
            extra_toml: "[init]\nrevoke_root_token = false\n[vault]\nlauncher = \"systemd\"\n"
                .into(),
            ..Default::default()
        },
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut b = tb.spawn_agent_env(2, &["boot"], &[("PATH", path.as_str())]);
    let status = b.wait_exit(Duration::from_secs(60));
    let log = b.stderr();
    assert!(status.success(), "{log}");
    assert!(log.contains("left sealed"), "{log}");
    let recorded = std::fs::read_to_string(&calls).unwrap();
    assert!(
        recorded.lines().all(|l| l.starts_with("is-active")),
        "only asked, never started: {recorded}"
    );
    assert_eq!(
        tb.api(2).health().await.map(|h| h.0),
        Some(503),
        "still sealed"
    );
    for a in agents.iter_mut() {
        a.stop();
    }
}
