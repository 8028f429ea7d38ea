//! Never locked out: after a full boot with revocation, operators log in with a client
//! certificate signed by the operator CA with a listed common name (and nothing else does;
//! the cluster CA is refused as operator CA), and threshold-many
//! escrowed recovery keys produce a working root token through `break-glass` with no token,
//! also on a standby that has no active node to forward to for a while.

mod common;
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_log_in_by_certificate_and_break_glass_works_without_a_token() {
    let tb = Testbed::start(35, 3);
    let operators = ca("operators CA");
    tb.put_object("tls/operator-ca.pem", operators.pem.as_bytes())
        .await;
    // The operator CA is in S3 before any agent starts: post-init binds cert auth to it.
    let mut agents = boot_all(
        &tb,
        3,
        "[access]\noperator_ca_key = \"tls/operator-ca.pem\"\noperator_common_names = [\"alice\"]\n",
    );
    let winner = agents
        .iter()
        .find(|a| a.stderr().contains("sys/init succeeded"))
        .expect("one init");
    let log = winner.stderr();
    assert!(
        log.contains("operator login: cert auth bound to the operator CA"),
        "{log}"
    );
    assert!(log.contains("root token revoked"), "{log}");

    // The escrowed root token is revoked.
    let root = tb.escrowed("test-vault", "root-token").await;
    let api = tb.api(0);
    let (code, _) = api
        .get("sys/storage/raft/configuration", Some(&root))
        .await
        .unwrap();
    assert_eq!(code, 403, "root must be revoked");

    // An operator's certificate logs in; the token administers the cluster.
    let (code, token) = {
        let (c, k) = operator(&operators, "alice");
        cert_login(&tb, &c, &k).await
    };
    assert_eq!(code, 200);
    let token = token.expect("client token");
    let (code, body) = api
        .get("sys/storage/raft/configuration", Some(&token))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    api.put_ok(
        "sys/policies/acl/ops-test",
        &token,
        serde_json::json!({"policy": "path \"secret/*\" { capabilities = [\"read\"] }"}),
    )
    .await;

    // A certificate of the operator CA whose common name is not listed is refused.
    let (code, token) = {
        let (c, k) = operator(&operators, "mallory");
        cert_login(&tb, &c, &k).await
    };
    assert!(token.is_none() && code >= 400, "unlisted name: {code}");

    // A certificate from another CA is refused.
    let stranger = ca("someone else's CA");
    let (code, token) = {
        let (c, k) = operator(&stranger, "mallory");
        cert_login(&tb, &c, &k).await
    };
    assert!(token.is_none() && code >= 400, "{code}");

    // Break-glass with fewer than threshold keys: refused, no token.
    let two: Vec<String> = {
        let mut v = Vec::new();
        for n in 1..=2 {
            v.push(
                tb.escrowed("test-vault", &format!("recovery-key-{n}"))
                    .await,
            );
        }
        v
    };
    let (code, out, err) = tb.run_agent_input(
        1,
        &["break-glass", "--yes"],
        &format!("{}\n", two.join("\n")),
        Duration::from_secs(60),
    );
    assert_ne!(code, 0, "{err}");
    assert!(out.trim().is_empty(), "no token may be printed");
    assert!(err.contains("2 of the 3"), "{err}");

    // Threshold-many escrowed keys, no token at all: a working root token.
    let (code, out, err) = tb.run_agent(
        1,
        &["break-glass", "--from-escrow", "--yes"],
        Duration::from_secs(60),
    );
    assert_eq!(code, 0, "{err}");
    let new_root = out.trim().to_string();
    assert!(!new_root.is_empty());
    assert!(!err.contains(&new_root), "the token must not be logged");
    let (code, body) = api
        .get("sys/storage/raft/configuration", Some(&new_root))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    api.put_ok("auth/token/revoke-self", &new_root, serde_json::json!({}))
        .await;

    for a in agents.iter_mut() {
        a.stop();
    }
}

/// `break-glass` on a standby is forwarded to the active node. Right after a leader change
/// there is none for a moment, and the calls answer HTTP 500 ("active cluster node not
/// found") or not at all. Here the window is made long: the two other servers are down when
/// break-glass starts and come back (as systemd would restart them) only once it has met
/// such an answer. It waits them out, bounded, and its root token works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_on_a_standby_waits_out_a_missing_active_node() {
    let (tb, mut agents) = form(75, 3, "");
    let a = active(&tb, 3).await;
    let standby = (a + 1) % 3;
    let others: Vec<usize> = (0..3).filter(|i| *i != standby).collect();
    for &i in &others {
        agents[i].kill_servers();
    }
    let mut bg = tb.spawn_agent(standby, &["break-glass", "--from-escrow", "--yes"]);
    let out = Drain::of(&mut bg);
    bg.wait_log("not ready for this yet", Duration::from_secs(60));
    let mut back: Vec<Agent> = others
        .iter()
        .map(|&i| tb.spawn_agent(i, &["boot"]))
        .collect();
    let status = bg.wait_exit(Duration::from_secs(120));
    let log = bg.stderr();
    assert!(status.success(), "{status}: {log}");
    for l in log.lines().filter(|l| l.contains("not ready for this yet")) {
        eprintln!("break-glass waited: {l}");
    }
    let token = String::from_utf8_lossy(&out.get("break-glass"))
        .trim()
        .to_string();
    assert!(!token.is_empty(), "{log}");
    assert!(!log.contains(&token), "the token must not be logged");
    let api = tb.api(standby);
    let (code, body) = api
        .get("auth/token/lookup-self", Some(&token))
        .await
        .expect("lookup-self");
    assert_eq!(code, 200, "{body}");
    api.put_ok("auth/token/revoke-self", &token, serde_json::json!({}))
        .await;
    for a in back.iter_mut().chain(agents.iter_mut()) {
        a.stop();
    }
}

/// Issue 14: an operator CA that is the cluster CA is refused. Every node holds a server
/// certificate the cluster CA signed, so with one CA for both any node's own key would log in
/// as an administrator. Post-init stops before it writes any login path (exit 78,
/// configuration), naming the object, and the root token is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_ca_is_refused_as_operator_ca() {
    let tb = Testbed::start(92, 1);
    let cluster_ca = std::fs::read(tb.seed_dir().join("ca.pem")).unwrap();
    tb.put_object("tls/operator-ca.pem", &cluster_ca).await;
    tb.write_config(
        0,
        &NodeOpts {
            extra_toml: "[access]\noperator_ca_key = \"tls/operator-ca.pem\"\noperator_common_names = [\"alice\"]\n".into(),
            ..Default::default()
        },
    );
    let started = std::time::Instant::now();
    let mut a = tb.spawn_agent(0, &["boot"]);
    let status = a.wait_exit(Duration::from_secs(120));
    let log = a.stderr();
    a.stop();
    let line = log
        .lines()
        .find(|l| l.contains("operator CA") && l.contains("refused"))
        .unwrap_or_default();
    eprintln!(
        "REFUSED after {} ms, exit {:?}: {line}",
        started.elapsed().as_millis(),
        status.code()
    );
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(
        line.contains("s3://vault-resources/tls/operator-ca.pem")
            && line.contains("is the cluster CA"),
        "{log}"
    );
    // Refused before sys/init: no cluster exists whose root token would then be kept.
    assert!(!log.contains("calling sys/init"), "{log}");
    assert!(!log.contains("cert auth bound"), "{log}");
    assert!(!log.contains("root token revoked"), "{log}");
}
