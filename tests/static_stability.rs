//! Static stability: a member that was healthy comes back from what is on its disk, with
//! the AWS control plane unreachable.
//!
//! The agents reach EC2 and S3 only through the fault proxy, whose rules make them
//! unreachable (connections dropped); the servers' awskms seal talks to KMS directly, as
//! through a KMS VPC endpoint. The shipped user-data's `min_peers = 3` is used, so a boot
//! that waited for discovery could not start a server with a peer gone.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// The bound for a member to serve again after a reboot without the control plane.
const SERVE_BOUND: Duration = Duration::from_secs(15);

/// Waits until nodes `nodes` are all unsealed members (200/429) and one is active; returns
/// how long that took from `since`.
async fn serving(tb: &Testbed, nodes: &[usize], since: Instant, bound: Duration) -> Duration {
    poll(
        "every node an unsealed member, one active",
        bound,
        || async {
            let mut active = false;
            for &i in nodes {
                match tb.api(i).health().await {
                    Some((200, _)) => active = true,
                    Some((429, _)) => {}
                    _ => return None,
                }
            }
            active.then(|| since.elapsed())
        },
    )
    .await
}

async fn cluster_ids(tb: &Testbed, n: usize) -> Vec<Option<String>> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(
            tb.api(i)
                .health()
                .await
                .and_then(|(_, b)| b["cluster_id"].as_str().map(str::to_owned)),
        );
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_come_back_without_ec2_or_s3() {
    let mut tb = Testbed::start(61, 3);
    tb.start_proxy();
    let extra = "[cluster]\nmin_peers = 3\n[init]\nrevoke_root_token = false\n";
    let mut agents = boot_all(&tb, 3, extra);
    let root = tb.escrowed("test-vault", "root-token").await;
    let voters = wait_voters(&tb, 0, &root, 3).await;
    let ids = cluster_ids(&tb, 3).await;
    assert!(ids.iter().all(|i| i.is_some() && *i == ids[0]), "{ids:?}");
    for i in 0..3 {
        assert!(
            tb.node_dir(i).join("state/member.json").exists(),
            "node {i} recorded its membership"
        );
    }

    // 1. The whole cluster loses power, and comes back with EC2 and S3 unreachable.
    for a in agents.iter_mut() {
        a.power_off();
    }
    tb.proxy_rules("* .* drop\n");
    let since = Instant::now();
    agents = (0..3)
        .map(|i| tb.respawn_agent(i, &["boot"], &[]))
        .collect();
    let took = serving(&tb, &[0, 1, 2], since, SERVE_BOUND).await;
    println!("whole cluster rebooted without EC2/S3: serving after {took:?}");
    for a in agents.iter_mut() {
        let log = a.wait_log("node ready", Duration::from_secs(30));
        assert!(
            log.contains("started from its last known good files"),
            "{log}"
        );
        assert!(!log.contains("sys/init succeeded"), "{log}");
    }
    assert_eq!(cluster_ids(&tb, 3).await, ids, "the same cluster came back");
    assert_eq!(wait_voters(&tb, 0, &root, 3).await, voters);
    // The refresh after serving fails (and says so), without failing the boot.
    for a in agents.iter_mut() {
        let log = a.wait_log(
            "refresh-tls timer and the next boot retry it",
            Duration::from_secs(90),
        );
        assert!(log.contains("peers not refreshed"), "{log}");
        assert!(
            a.exited().is_none(),
            "the agent stays with its server:\n{log}"
        );
    }

    // 2. With the control plane back, a member reboots while S3 alone is unreachable and
    //    one of its peers is gone from EC2 (its server still runs): below min_peers = 3.
    tb.proxy_rules("");
    let ec2 = aws_sdk_ec2::Client::new(&tb.sdk().await);
    ec2.terminate_instances()
        .instance_ids(&tb.instances[0].id)
        .send()
        .await
        .unwrap();
    agents[2].power_off();
    tb.proxy_rules("* ^/vault-resources drop\n");
    let since = Instant::now();
    agents[2] = tb.respawn_agent(2, &["boot"], &[]);
    let took = serving(&tb, &[0, 1, 2], since, SERVE_BOUND).await;
    println!("one member rebooted with S3 unreachable and a peer gone: member after {took:?}");
    let log = agents[2].wait_log("node ready", Duration::from_secs(30));
    assert!(
        log.contains("started from its last known good files"),
        "{log}"
    );
    assert_eq!(wait_voters(&tb, 1, &root, 3).await, voters);
    let log = agents[2].wait_log(
        "refresh-tls timer and the next boot retry it",
        Duration::from_secs(90),
    );
    // EC2 answered this time: the peers were refreshed, S3 was what failed.
    assert!(!log.contains("peers not refreshed"), "{log}");
    for a in agents.iter_mut() {
        a.stop();
    }
}

/// A node records its membership as soon as its server is an unsealed member, before any S3
/// read: here every read of the escrow marker takes 10 s, so the joiners lose power while
/// their check against the marker is still under way, within a second of recording. The
/// whole cluster then comes back with EC2 and S3 unreachable, from disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_rebooted_right_after_it_formed_comes_back_without_ec2_or_s3() {
    let mut tb = Testbed::start(94, 3);
    tb.start_proxy();
    let extra = "[init]\nrevoke_root_token = false\n[agent]\naws_timeout_secs = 30\n";
    let mut agents = boot_all(&tb, 1, extra);
    tb.proxy_rules("GET cluster-initialized\\.json delay 10\n");
    for i in 1..3 {
        tb.write_config(
            i,
            &NodeOpts {
                extra_toml: extra.into(),
                ..Default::default()
            },
        );
        agents.push(tb.spawn_agent(i, &["boot"]));
    }
    // Each joiner's record is on disk within a few seconds of its server reporting it an
    // unsealed member (the agent polls sys/health at most 3 s apart), not after the 10 s
    // marker read.
    for (i, agent) in agents.iter().enumerate().skip(1) {
        let api = tb.api(i);
        poll(
            "the joiner's server unsealed",
            Duration::from_secs(120),
            || async { matches!(api.health().await, Some((200 | 429, _))).then_some(()) },
        )
        .await;
        let record = tb.node_dir(i).join("state/member.json");
        poll(
            "the joiner's membership record",
            Duration::from_secs(5),
            || async { record.exists().then_some(()) },
        )
        .await;
        let log = agent.stderr();
        assert!(
            log.contains("no membership record: this instance never settled"),
            "a new node's first boot says why it does not start from disk:\n{log}"
        );
    }
    let recorded = Instant::now();
    for a in agents.iter_mut() {
        a.power_off();
    }
    let window = recorded.elapsed();
    for a in agents.iter().skip(1) {
        assert!(
            !a.stderr().contains("node ready"),
            "the joiners lost power before their marker check finished:\n{}",
            a.stderr()
        );
    }
    println!("power lost {window:?} after the last joiner's membership record appeared");

    tb.proxy_rules("* .* drop\n");
    let since = Instant::now();
    agents = (0..3)
        .map(|i| tb.respawn_agent(i, &["boot"], &[]))
        .collect();
    let took = serving(&tb, &[0, 1, 2], since, SERVE_BOUND).await;
    println!("cluster rebooted right after it formed, without EC2/S3: serving after {took:?}");
    for a in agents.iter_mut() {
        // "node ready" waits for the refresh, which waits out the AWS timeout.
        a.wait_log(
            "serving from the last known good files",
            Duration::from_secs(30),
        );
    }
    let root = tb.escrowed("test-vault", "root-token").await;
    assert_eq!(wait_voters(&tb, 0, &root, 3).await.len(), 3);
    for a in agents.iter_mut() {
        a.stop();
    }
}
