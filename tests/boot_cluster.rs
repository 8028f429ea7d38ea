//! Three agents started at the same moment for instances 127.0.N.11-13 bring up three
//! OpenBao servers through the whole boot path; the test then inits one node by API and
//! checks that the cluster converges: 3 raft voters, one cluster id.

mod common;
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_form_one_cluster() {
    let tb = Testbed::start(21, 3);
    for i in 0..3 {
        tb.write_config(i, &NodeOpts::default());
    }
    let mut agents: Vec<Agent> = (0..3).map(|i| tb.spawn_agent(i, &["boot"])).collect();

    // Every server answers: uninitialized (501) at first.
    for i in 0..3 {
        let api = tb.api(i);
        let (code, _) = poll("sys/health answers", Duration::from_secs(60), || async {
            api.health().await
        })
        .await;
        assert!([501, 503, 200, 429].contains(&code), "node {i}: {code}");
        agents[i].track_children();
    }
    for a in &agents {
        let log = a.stderr();
        assert!(log.contains("boot complete"), "agent {}:\n{log}", a.index);
        assert!(log.contains("peer_count=3"), "agent {}:\n{log}", a.index);
    }
    // Each node got one retry_join per other node, and its own node_id.
    for (i, inst) in tb.instances.iter().enumerate() {
        let hcl = std::fs::read_to_string(tb.node_dir(i).join("etc/vault.hcl")).unwrap();
        assert_eq!(hcl.matches("retry_join {").count(), 2, "{hcl}");
        assert!(hcl.contains(&format!("node_id                = \"{}\"", inst.id)));
        for other in tb.instances.iter().filter(|o| o.ip != inst.ip) {
            assert!(hcl.contains(&format!("https://{}:8200", other.ip)), "{hcl}");
        }
    }

    // Init belongs to the next issue: do it by API on one node.
    let api0 = tb.api(0);
    let (code, init) = api0
        .put(
            "sys/init",
            None,
            serde_json::json!({"recovery_shares": 1, "recovery_threshold": 1}),
        )
        .await;
    assert_eq!(code, 200, "{init}");
    let token = init["root_token"].as_str().unwrap().to_string();

    // 3 voters (joiners arrive as non-voters and are promoted by autopilot).
    let voters = poll("3 raft voters", Duration::from_secs(120), || {
        let api0 = &api0;
        let token = &token;
        async move {
            let (code, body) = api0
                .get("sys/storage/raft/configuration", Some(token))
                .await?;
            if code != 200 {
                return None;
            }
            let servers = body["data"]["config"]["servers"].as_array()?.clone();
            let voters: Vec<String> = servers
                .iter()
                .filter(|s| s["voter"].as_bool() == Some(true))
                .map(|s| s["node_id"].as_str().unwrap_or("").to_string())
                .collect();
            (voters.len() == 3).then_some(voters)
        }
    })
    .await;
    let mut ids: Vec<String> = tb.instances.iter().map(|i| i.id.clone()).collect();
    ids.sort();
    let mut got = voters.clone();
    got.sort();
    assert_eq!(got, ids, "voters are the three instances by id");

    // One cluster id, every node unsealed.
    let mut cluster_ids = Vec::new();
    for i in 0..3 {
        let api = tb.api(i);
        let (code, body) = poll("node unsealed", Duration::from_secs(60), || async {
            let (c, b) = api.health().await?;
            (c == 200 || c == 429).then_some((c, b))
        })
        .await;
        assert!(code == 200 || code == 429);
        cluster_ids.push(body["cluster_id"].as_str().unwrap_or_default().to_string());
    }
    assert!(!cluster_ids[0].is_empty());
    assert!(
        cluster_ids.iter().all(|c| c == &cluster_ids[0]),
        "{cluster_ids:?}"
    );

    // The agents stay with their servers (exec launcher) and stop them on SIGTERM.
    for a in agents.iter_mut() {
        assert!(
            a.child.try_wait().unwrap().is_none(),
            "agent {} exited early",
            a.index
        );
        a.stop();
    }
}
