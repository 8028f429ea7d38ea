//! `rejoin`: a node whose raft data the cluster removed comes back as a voter with its old
//! data kept aside; `--dry-run` changes nothing; with two of three nodes down it refuses.

mod common;
use common::*;
use std::time::Duration;

/// Files under node `i` (logs aside) with their contents' lengths: what `--dry-run` must keep.
fn snapshot_tree(tb: &Testbed, i: usize) -> Vec<String> {
    tree(&tb.node_dir(i))
        .into_iter()
        // node.lock names whoever held it last: bookkeeping of the lock, not node state.
        .filter(|f| !f.ends_with(".log") && !f.starts_with("data/") && f != "state/node.lock")
        .map(|f| {
            let p = tb.node_dir(i).join(&f);
            let len = std::fs::metadata(&p)
                .map(|m| if m.is_file() { m.len() } else { 0 })
                .unwrap_or(0);
            let body = if p.is_file() {
                std::fs::read(&p).unwrap_or_default()
            } else {
                vec![]
            };
            format!(
                "{f} {len} {:x}",
                body.iter()
                    .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(*b as u64))
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_rejoins_as_a_voter_and_dry_run_changes_nothing() {
    let (tb, mut agents) = form(40, 3, "[init]\nrevoke_root_token = false\n");
    let root = tb.escrowed("test-vault", "root-token").await;
    wait_voters(&tb, 0, &root, 3).await;
    let me = tb.instances[2].id.clone();

    // The cluster forgets node 2.
    forget(&tb, 0, &root, &me).await;
    assert!(!raft_servers(&tb, 0, &root)
        .await
        .expect("raft configuration")
        .iter()
        .any(|(id, _)| id == &me));

    // --dry-run: shows the plan, changes nothing (files, raft state).
    let before = (
        snapshot_tree(&tb, 2),
        raft_servers(&tb, 0, &root)
            .await
            .expect("raft configuration"),
    );
    let (code, out, err) = tb.run_agent_env(
        2,
        &["rejoin", "--dry-run"],
        &[("VAULT_TOKEN", root.as_str())],
        Duration::from_secs(60),
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("not in the cluster's raft configuration"),
        "{out}"
    );
    assert!(
        out.contains("would move") && out.contains("dry run: nothing changed"),
        "{out}"
    );
    let after = (
        snapshot_tree(&tb, 2),
        raft_servers(&tb, 0, &root)
            .await
            .expect("raft configuration"),
    );
    assert_eq!(before, after, "--dry-run changed something");
    assert!(tree(&tb.node_dir(2))
        .iter()
        .all(|f| !f.contains(".removed-")));

    // rejoin: data aside, restart, back as a voter.
    let mut r = tb.spawn_agent_env(2, &["rejoin"], &[("VAULT_TOKEN", root.as_str())]);
    let stdout = Drain::of(&mut r);
    r.wait_log("rejoin complete", Duration::from_secs(180));
    wait_voters(&tb, 0, &root, 3).await;
    assert!(raft_servers(&tb, 0, &root)
        .await
        .expect("raft configuration")
        .contains(&(me.clone(), true)));
    let aside: Vec<String> = std::fs::read_dir(tb.node_dir(2))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("data.removed-"))
        .collect();
    assert_eq!(aside.len(), 1, "old raft data kept aside");
    let kept = tree(&tb.node_dir(2).join(&aside[0]));
    assert!(!kept.is_empty(), "the aside dir holds the old data");
    r.stop();
    let out = String::from_utf8_lossy(&stdout.get("rejoin")).into_owned();
    assert!(
        out.contains("raft data moved aside") && out.contains("done in"),
        "{out}"
    );
    for a in agents.iter_mut() {
        a.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_refuses_when_two_of_three_nodes_are_down() {
    let (tb, mut agents) = form(41, 3, "");
    agents[0].kill_servers();
    agents[1].kill_servers();
    let before = snapshot_tree(&tb, 2);
    let (code, out, err) = tb.run_agent(2, &["rejoin"], Duration::from_secs(60));
    assert_eq!(code, 75, "{out}\n{err}");
    assert!(err.contains("could cost the cluster its quorum"), "{err}");
    assert_eq!(
        snapshot_tree(&tb, 2),
        before,
        "a refused rejoin changes nothing"
    );
    assert!(
        tb.api(2).health().await.is_some(),
        "node 2's server still runs"
    );
    for a in agents.iter_mut() {
        a.stop();
    }
}

/// A boot (systemd restarting the agent) racing an operator's rejoin on the same node: the
/// node lock lets one change the node at a time, the other waits and says for whom; the
/// node ends as a voter with its server started once and its old data kept aside once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_racing_a_rejoin_waits_for_it_and_the_node_comes_back() {
    let (tb, mut agents) = form(43, 3, "[init]\nrevoke_root_token = false\n");
    let root = tb.escrowed("test-vault", "root-token").await;
    wait_voters(&tb, 0, &root, 3).await;
    let me = tb.instances[2].id.clone();
    forget(&tb, 0, &root, &me).await;
    agents[2].stop();

    // Both at once.
    let mut r = tb.spawn_agent_env(2, &["rejoin"], &[("VAULT_TOKEN", root.as_str())]);
    let mut b = tb.spawn_agent(2, &["boot"]);
    r.wait_log("rejoin complete", Duration::from_secs(180));
    wait_voters(&tb, 0, &root, 3).await;
    assert!(raft_servers(&tb, 0, &root)
        .await
        .expect("raft configuration")
        .contains(&(me.clone(), true)));

    // The boot waited for the rejoin (it reached the lock second: the rejoin takes it
    // before its first network call), then found the node settled and its port served:
    // it stops with a clear cause and changes nothing.
    let status = b.wait_exit(Duration::from_secs(60));
    let blog = b.stderr();
    assert!(
        blog.contains("another vault-bootstrap command is changing this node")
            && blog.contains("rejoin (pid"),
        "the boot did not wait for the rejoin:\n{blog}"
    );
    match status.code() {
        Some(69) => assert!(blog.contains("already in use"), "{blog}"),
        Some(75) => assert!(blog.contains("did not finish within"), "{blog}"),
        other => panic!("boot exited {other:?}:\n{blog}"),
    }
    assert!(
        !blog.contains("spawned the server"),
        "a second server was started:\n{blog}"
    );
    let aside = std::fs::read_dir(tb.node_dir(2))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("data.removed-"))
        .count();
    assert_eq!(aside, 1, "the old raft data is moved aside exactly once");
    // Still a voter after the boot gave up (it did not disturb the rejoined server).
    assert!(tb.api(2).health().await.is_some(), "node 2 still serves");
    assert!(raft_servers(&tb, 0, &root)
        .await
        .expect("raft configuration")
        .contains(&(me.clone(), true)));
    r.stop();
    for a in agents.iter_mut() {
        a.stop();
    }
}

/// Terminates instance `i` in EC2 (moto): discovery no longer lists it.
fn terminate(tb: &Testbed, i: usize) {
    let out = std::process::Command::new(python())
        .arg(testbed_script("seed.py"))
        .args([
            "terminate",
            "--moto",
            &tb.moto_url,
            "--id",
            &tb.instances[i].id,
        ])
        .output()
        .expect("seed.py terminate");
    assert!(
        out.status.success(),
        "terminate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With VAULT_TOKEN the quorum is counted on the raft configuration, dead voters included.
/// Four voters; node 3 dies and its instance is terminated, so EC2 lists three instances
/// while raft still counts four voters (autopilot removes a dead server only after
/// `dead_server_last_contact_threshold`, 10 min). Restarting node 2 would leave two of four
/// serving, below the quorum of three, although two of EC2's three looks like a majority:
/// rejoin must refuse and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_rejoin_counts_raft_voters_dead_ones_included() {
    let (tb, mut agents) = form(71, 4, "[init]\nrevoke_root_token = false\n");
    let root = tb.escrowed("test-vault", "root-token").await;
    wait_voters(&tb, 0, &root, 4).await;
    agents[3].kill_servers();
    terminate(&tb, 3);
    // The three others still hold a quorum of four: wait for their leader.
    active(&tb, 3).await;
    let dead = tb.instances[3].id.clone();
    assert!(raft_servers(&tb, 0, &root)
        .await
        .expect("raft configuration")
        .contains(&(dead.clone(), true)));

    let before = snapshot_tree(&tb, 2);
    let (code, out, err) = tb.run_agent_env(
        2,
        &["rejoin"],
        &[("VAULT_TOKEN", root.as_str())],
        Duration::from_secs(60),
    );
    assert_eq!(code, 75, "{out}\n{err}");
    assert!(
        err.contains("4 voter(s)") && err.contains(&dead) && err.contains("quorum"),
        "{err}"
    );
    assert!(out.contains("3 instance(s)"), "EC2 lists three: {out}");
    assert_eq!(
        snapshot_tree(&tb, 2),
        before,
        "a refused rejoin changes nothing"
    );
    let (code, _) = tb.api(2).health().await.expect("node 2 still serves");
    assert!(code == 200 || code == 429, "node 2 unsealed: {code}");
    for a in agents.iter_mut() {
        a.stop();
    }
}

/// A sealed node is no evidence that the cluster forgot it. Without a token rejoin cannot
/// tell, so it refuses and moves nothing (it used to move the raft data aside and join the
/// node afresh). With the token the raft configuration lists the node: it is restarted with
/// its own data and is an unsealed voter again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_node_keeps_its_data() {
    let (tb, mut agents) = form(72, 3, "[init]\nrevoke_root_token = false\n");
    let root = tb.escrowed("test-vault", "root-token").await;
    wait_voters(&tb, 0, &root, 3).await;
    let me = tb.instances[2].id.clone();
    tb.api(2)
        .put_ok("sys/seal", &root, serde_json::json!({}))
        .await;
    assert_eq!(tb.api(2).health().await.map(|h| h.0), Some(503));
    let removed = || {
        std::fs::read_dir(tb.node_dir(2))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("data.removed-"))
            .count()
    };

    let before = snapshot_tree(&tb, 2);
    let (code, out, err) = tb.run_agent(2, &["rejoin"], Duration::from_secs(60));
    assert_eq!(code, 75, "{out}\n{err}");
    assert!(
        err.contains("cannot tell whether the cluster still knows this node")
            && err.contains("sealed")
            && err.contains("VAULT_TOKEN"),
        "{err}"
    );
    assert_eq!(snapshot_tree(&tb, 2), before, "nothing changed");
    assert_eq!(removed(), 0, "no raft data moved aside");
    assert_eq!(tb.api(2).health().await.map(|h| h.0), Some(503));

    let mut r = tb.spawn_agent_env(2, &["rejoin"], &[("VAULT_TOKEN", root.as_str())]);
    let stdout = Drain::of(&mut r);
    r.wait_log("rejoin complete", Duration::from_secs(180));
    assert_eq!(removed(), 0, "restarted with its own data");
    assert!(wait_voters(&tb, 0, &root, 3).await.contains(&me));
    let (code, _) = tb.api(2).health().await.expect("node 2 serves");
    assert!(code == 200 || code == 429, "unsealed again: {code}");
    r.stop();
    let out = String::from_utf8_lossy(&stdout.get("rejoin")).into_owned();
    assert!(
        out.contains("Known(") && !out.contains("moved aside"),
        "{out}"
    );
    for a in agents.iter_mut() {
        a.stop();
    }
}
