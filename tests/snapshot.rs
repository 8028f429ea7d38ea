//! Raft snapshots to S3 on a 3-node cluster: write a secret, snapshot, delete it, restore ->
//! it is back; a snapshot with a follower down still succeeds; with S3 PUTs failing it
//! exits non-zero and leaves no object and no temp file; `keep` prunes the oldest.
//!
//! The cluster keeps its root token (`revoke_root_token = false`) so the test can write
//! secrets; the snapshot itself logs in with the escrowed AppRole, restore with the
//! operator's VAULT_TOKEN (here the root token).

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

const CLUSTER: &str = "test-vault";
const PREFIX: &str = "vault-bootstrap-snapshots/test-vault/";

fn sha256_of(path: &std::path::Path) -> String {
    // coreutils, independent of the agent's own implementation.
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

async fn snaps(tb: &Testbed) -> Vec<String> {
    let s3 = aws_sdk_s3::Client::new(&tb.sdk().await);
    let out = s3
        .list_objects_v2()
        .bucket("vault-resources")
        .prefix(PREFIX)
        .send()
        .await
        .expect("ListObjectsV2");
    let mut keys: Vec<String> = out
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect();
    keys.sort();
    keys
}

fn temp_files(tb: &Testbed, i: usize) -> Vec<String> {
    tree(&tb.node_dir(i).join("state"))
        .into_iter()
        .filter(|f| f.ends_with(".tmp"))
        .collect()
}

/// Bound for one agent command run to its end.
const RUN: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_follower_down_s3_down_and_keep() {
    let n = 3;
    let extra = "[init]\nrevoke_root_token = false\n[snapshot]\nkeep = 2\n";
    let (mut tb, mut agents) = form(36, n, extra);
    let init_log: String = agents.iter().map(|a| a.stderr()).collect();
    assert!(
        init_log.contains("snapshot AppRole created and its credentials escrowed"),
        "{init_log}"
    );
    let root = tb.escrowed(CLUSTER, "root-token").await;
    let approle = tb.escrowed(CLUSTER, "snapshot-approle").await;
    assert!(approle.contains("role_id") && !approle.contains(&root));

    // A secret to lose and get back.
    let a = active(&tb, n).await;
    let api = tb.api(a);
    api.put_ok(
        "sys/mounts/secret",
        &root,
        serde_json::json!({"type": "kv"}),
    )
    .await;
    api.put_ok(
        "secret/probe",
        &root,
        serde_json::json!({"value": "before-snapshot"}),
    )
    .await;

    // 1. Snapshot as node 0.
    let t = Instant::now();
    let (code, out, err) = tb.run_agent_env(0, &["snapshot"], &[], RUN);
    let took = t.elapsed();
    let out = format!("{out}\n{err}");
    assert_eq!(code, 0, "{out}");
    let keys = snaps(&tb).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let url = format!("s3://vault-resources/{}", keys[0]);
    assert!(out.contains(&url), "{out}");
    assert!(
        keys[0].starts_with(&format!("{PREFIX}{CLUSTER}-")) && keys[0].ends_with("Z.snap"),
        "{keys:?}"
    );
    let s3 = aws_sdk_s3::Client::new(&tb.sdk().await);
    let head = s3
        .head_object()
        .bucket("vault-resources")
        .key(&keys[0])
        .send()
        .await
        .unwrap();
    let got = s3
        .get_object()
        .bucket("vault-resources")
        .key(&keys[0])
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    let local = tb.path().join("downloaded.snap");
    std::fs::write(&local, &got).unwrap();
    let meta = head.metadata().cloned().unwrap_or_default();
    assert_eq!(meta.get("sha256"), Some(&sha256_of(&local)), "{meta:?}");
    assert_eq!(meta.get("size"), Some(&got.len().to_string()));
    assert_eq!(head.content_length(), Some(got.len() as i64));
    assert_eq!(
        head.server_side_encryption(),
        Some(&aws_sdk_s3::types::ServerSideEncryption::AwsKms)
    );
    assert!(temp_files(&tb, 0).is_empty(), "{:?}", temp_files(&tb, 0));
    eprintln!(
        "MEASURED snapshot: {} bytes, whole command {} ms",
        got.len(),
        took.as_millis()
    );

    // 2. Delete the secret; restore; it is back.
    let r = api
        .http
        .delete(format!("{}/v1/secret/probe", api.base))
        .header("X-Vault-Token", &root)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(api.get("secret/probe", Some(&root)).await.unwrap().0, 404);

    let (code, out, err) = tb.run_agent_env(1, &["snapshot", "restore", "--from", &url], &[], RUN);
    let out = format!("{out}\n{err}");
    assert_eq!(code, 64, "refuses without --yes: {out}");
    assert!(out.contains("--yes"), "{out}");
    let (code, out, err) = tb.run_agent_env(
        1,
        &["snapshot", "restore", "--from", &url, "--yes"],
        &[],
        RUN,
    );
    let out = format!("{out}\n{err}");
    assert_eq!(code, 64, "refuses without VAULT_TOKEN: {out}");
    assert!(
        out.contains("VAULT_TOKEN") && out.contains("AppRole"),
        "{out}"
    );
    let t = Instant::now();
    let (code, out, err) = tb.run_agent_env(
        1,
        &["snapshot", "restore", "--from", &url, "--yes"],
        &[("VAULT_TOKEN", &root)],
        RUN,
    );
    let out = format!("{out}\n{err}");
    assert_eq!(code, 0, "{out}");
    let value = poll(
        "the secret back after restore",
        Duration::from_secs(60),
        || {
            let tb = &tb;
            let root = root.clone();
            async move {
                let a = roles(tb, n).await.0?;
                match tb.api(a).get("secret/probe", Some(&root)).await {
                    Some((200, b)) => b["data"]["value"].as_str().map(str::to_owned),
                    _ => None,
                }
            }
        },
    )
    .await;
    assert_eq!(value, "before-snapshot");
    eprintln!(
        "MEASURED restore: secret readable {} ms after the restore command started",
        t.elapsed().as_millis()
    );

    // 3. A follower's server is down: the snapshot still succeeds.
    let (a, standby) = poll("active and standbys", Duration::from_secs(60), || async {
        let (a, s) = roles(&tb, n).await;
        (a.is_some() && s.len() == n - 1).then(|| (a.unwrap(), s))
    })
    .await;
    let down = standby[0];
    agents[down].kill_servers();
    wait_for(
        "the follower's API to stop answering",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            std::net::TcpStream::connect_timeout(
                &format!("{}:8200", tb.instances[down].ip).parse().unwrap(),
                Duration::from_millis(300),
            )
            .is_err()
            .then_some(())
        },
    );
    // Run it on the node whose server is down, when that is not the leader's: the agent
    // must find the active node among its peers.
    let runner = if down != a { down } else { (a + 1) % n };
    let (code, out, err) = tb.run_agent_env(runner, &["snapshot"], &[], RUN);
    let out = format!("{out}\n{err}");
    assert_eq!(code, 0, "follower {down} down, run on {runner}: {out}");
    let before_fault = snaps(&tb).await;
    assert_eq!(before_fault.len(), 2, "{before_fault:?}");

    // 4. S3 PUT of the snapshot fails: non-zero, a clear message, no object, no temp file.
    tb.proxy_rules("PUT .*\\.snap status 503 ServiceUnavailable\n");
    tb.start_proxy();
    let ok_runner = (0..n).find(|i| *i != down).unwrap();
    tb.write_config(
        ok_runner,
        &NodeOpts {
            extra_toml: format!("{extra}[agent]\naws_timeout_secs = 3\n"),
            ..Default::default()
        },
    );
    let (code, out, err) = tb.run_agent_env(ok_runner, &["snapshot"], &[], RUN);
    let out = format!("{out}\n{err}");
    assert_eq!(code, 75, "{out}");
    if let Some(line) = out.lines().find(|l| l.contains("nothing was stored")) {
        eprintln!("S3 DOWN, the agent said: {line}");
    }
    assert!(
        out.contains("nothing was stored") && out.contains("PutObject"),
        "{out}"
    );
    assert_eq!(snaps(&tb).await, before_fault, "no new or partial object");
    assert!(
        temp_files(&tb, ok_runner).is_empty(),
        "{:?}",
        temp_files(&tb, ok_runner)
    );

    // 5. keep = 2: a third good snapshot leaves the two newest.
    tb.proxy_rules("");
    let (code, out, err) = tb.run_agent_env(ok_runner, &["snapshot"], &[], RUN);
    let out = format!("{out}\n{err}");
    assert_eq!(code, 0, "{out}");
    let after = snaps(&tb).await;
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(
        after[0], before_fault[1],
        "the oldest was pruned: {after:?}"
    );
    assert!(!after.contains(&before_fault[0]));
    assert!(out.contains("older snapshots pruned"), "{out}");

    for a in agents.iter_mut() {
        a.stop();
    }
}

/// The secret `secret/probe` as the active node (of `n`) serves it, once one answers.
async fn probe(tb: &Testbed, n: usize, root: &str) -> String {
    poll(
        "secret/probe readable",
        Duration::from_secs(60),
        || async move {
            let a = roles(tb, n).await.0?;
            match tb.api(a).get("secret/probe", Some(root)).await {
                Some((200, b)) => b["data"]["value"].as_str().map(str::to_owned),
                _ => None,
            }
        },
    )
    .await
}

/// Deletes `secret/probe` through the active node (of `n`).
async fn delete_probe(tb: &Testbed, n: usize, root: &str) {
    let api = tb.api(active(tb, n).await);
    let r = api
        .http
        .delete(format!("{}/v1/secret/probe", api.base))
        .header("X-Vault-Token", root)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
}

/// `snapshot restore` guards: a URL outside this cluster's prefix is refused before anything
/// is read unless `--foreign`; by default the restore goes through `sys/storage/raft/snapshot`
/// (the server checks the snapshot's seal), so a token that may not force-restore suffices;
/// `--force` asks for `snapshot-force`, warning that the snapshot's seal must be this
/// cluster's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_takes_this_clusters_snapshots_and_forces_only_when_asked() {
    let n = 3;
    let (tb, mut agents) = form(73, n, "[init]\nrevoke_root_token = false\n");
    let root = tb.escrowed(CLUSTER, "root-token").await;
    let api = tb.api(active(&tb, n).await);
    api.put_ok(
        "sys/mounts/secret",
        &root,
        serde_json::json!({"type": "kv"}),
    )
    .await;
    api.put_ok(
        "secret/probe",
        &root,
        serde_json::json!({"value": "before-snapshot"}),
    )
    .await;
    // An operator who may restore but not force-restore (no rights on snapshot-force).
    // Created before the snapshot, so that restoring it keeps the token valid.
    api.put_ok(
        "sys/policies/acl/restorer",
        &root,
        serde_json::json!({"policy": "path \"sys/storage/raft/snapshot\" {\n  capabilities = [\"update\", \"sudo\"]\n}\n"}),
    )
    .await;
    let created = api
        .put_ok(
            "auth/token/create",
            &root,
            serde_json::json!({"policies": ["restorer"], "ttl": "30m"}),
        )
        .await;
    let restorer = created["auth"]["client_token"]
        .as_str()
        .expect("client_token")
        .to_owned();
    let env = [("VAULT_TOKEN", restorer.as_str())];

    let (code, out, err) = tb.run_agent_env(0, &["snapshot"], &[], RUN);
    assert_eq!(code, 0, "{out}\n{err}");
    let keys = snaps(&tb).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let url = format!("s3://vault-resources/{}", keys[0]);
    // The same bytes (and sha256 metadata) under another cluster's prefix.
    let foreign_key = "vault-bootstrap-snapshots/other-cluster/other-cluster-20260101T000000Z.snap";
    aws_sdk_s3::Client::new(&tb.sdk().await)
        .copy_object()
        .copy_source(format!("vault-resources/{}", keys[0]))
        .bucket("vault-resources")
        .key(foreign_key)
        .send()
        .await
        .expect("CopyObject");
    let foreign = format!("s3://vault-resources/{foreign_key}");
    delete_probe(&tb, n, &root).await;

    // 1. Another cluster's prefix: refused before anything is read.
    let t = Instant::now();
    let (code, out, err) = tb.run_agent_env(
        1,
        &["snapshot", "restore", "--from", &foreign, "--yes"],
        &env,
        RUN,
    );
    assert_eq!(code, 64, "{out}\n{err}");
    assert!(
        err.contains("--foreign") && err.contains(&format!("s3://vault-resources/{PREFIX}")),
        "{err}"
    );
    assert!(!err.contains("downloaded"), "nothing read: {err}");
    assert!(temp_files(&tb, 1).is_empty());
    eprintln!("MEASURED foreign refusal: {} ms", t.elapsed().as_millis());

    // 2. This cluster's snapshot, default: the checked endpoint, which this token may use.
    let (code, out, err) = tb.run_agent_env(
        1,
        &["snapshot", "restore", "--from", &url, "--yes"],
        &env,
        RUN,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(probe(&tb, n, &root).await, "before-snapshot");

    // 3. --force: snapshot-force, with the seal warning; this token may not.
    let (code, out, err) = tb.run_agent_env(
        1,
        &["snapshot", "restore", "--from", &url, "--yes", "--force"],
        &env,
        RUN,
    );
    assert_eq!(code, 77, "{out}\n{err}");
    assert!(
        err.contains("snapshot-force") && err.contains("seal must be this cluster's"),
        "{err}"
    );

    // 4. --foreign: the other prefix is accepted (and restored, checked).
    delete_probe(&tb, n, &root).await;
    let (code, out, err) = tb.run_agent_env(
        1,
        &[
            "snapshot",
            "restore",
            "--from",
            &foreign,
            "--yes",
            "--foreign",
        ],
        &env,
        RUN,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(probe(&tb, n, &root).await, "before-snapshot");
    for a in agents.iter_mut() {
        a.stop();
    }
}

/// A client for node `ip`'s API whose connections leave from `source` (None: whatever the
/// kernel picks, 127.0.0.1 towards the test-bed's loopback addresses).
fn client_from(tb: &Testbed, source: Option<&str>) -> reqwest::Client {
    let ca = std::fs::read(tb.seed_dir().join("ca.pem")).unwrap();
    reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&ca).unwrap())
        .local_address(source.map(|s| s.parse::<std::net::IpAddr>().unwrap()))
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap()
}

/// Issue 14, snapshot credential scope: post-init binds the snapshot AppRole to the
/// cluster's addresses (by default each discovered instance's IP as a /32) for login and for
/// its tokens, with 10-minute tokens and a policy of exactly the snapshot paths. The same
/// escrowed credentials log in from a node's address and are refused from any other (the
/// test's own 127.0.0.1, and a fourth instance launched after init); a token taken at a
/// node's address is refused from elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_approle_is_bound_to_the_clusters_addresses_and_short_lived() {
    use vault_bootstrap::snapshot::{NAME, POLICY_HCL};
    let n = 3;
    let (mut tb, mut agents) = form(90, n, "[init]\nrevoke_root_token = false\n");
    let root = tb.escrowed(CLUSTER, "root-token").await;
    let api = tb.api(0);

    // 1. What the role and its policy read back as.
    let (code, role) = api
        .get(&format!("auth/approle/role/{NAME}"), Some(&root))
        .await
        .expect("role read");
    assert_eq!(code, 200, "{role}");
    let mut nodes: Vec<String> = tb
        .instances
        .iter()
        .map(|i| format!("{}/32", i.ip))
        .collect();
    nodes.sort();
    let d = &role["data"];
    eprintln!(
        "ROLE READ BACK: secret_id_bound_cidrs={} token_bound_cidrs={} token_ttl={} token_max_ttl={} token_policies={}",
        d["secret_id_bound_cidrs"], d["token_bound_cidrs"], d["token_ttl"], d["token_max_ttl"], d["token_policies"]
    );
    assert_eq!(
        d["secret_id_bound_cidrs"],
        serde_json::json!(nodes),
        "{role}"
    );
    // The server writes a /32 of token_bound_cidrs back as the bare address.
    let bare: Vec<String> = d["token_bound_cidrs"]
        .as_array()
        .expect("token_bound_cidrs")
        .iter()
        .map(|c| c.as_str().unwrap().trim_end_matches("/32").to_owned())
        .collect();
    let ips: Vec<&str> = nodes.iter().map(|c| c.trim_end_matches("/32")).collect();
    assert_eq!(bare, ips, "{role}");
    assert_eq!(d["token_ttl"], 600, "{role}");
    assert_eq!(d["token_max_ttl"], 600, "{role}");
    assert_eq!(d["token_policies"], serde_json::json!([NAME]), "{role}");
    let (code, policy) = api
        .get(&format!("sys/policies/acl/{NAME}"), Some(&root))
        .await
        .expect("policy read");
    assert_eq!(code, 200, "{policy}");
    assert_eq!(policy["data"]["policy"], POLICY_HCL);

    // 2. The agent's own snapshot, from a node's address, works.
    let (code, out, err) = tb.run_agent(0, &["snapshot"], RUN);
    assert_eq!(code, 0, "{out}\n{err}");

    // 3. The escrowed credentials, by hand: refused from 127.0.0.1, accepted from a node's
    // address; the token works from there and nowhere else.
    let creds: serde_json::Value =
        serde_json::from_str(&tb.escrowed(CLUSTER, "snapshot-approle").await).unwrap();
    let url = |p: &str| format!("https://{}:8200/v1/{p}", tb.instances[0].ip);
    let login = |c: reqwest::Client| {
        let creds = creds.clone();
        let u = url("auth/approle/login");
        async move {
            let r = c.post(u).json(&creds).send().await.expect("login");
            let s = r.status().as_u16();
            (s, r.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    let outside = client_from(&tb, None);
    let inside = client_from(&tb, Some(&tb.instances[1].ip));
    let (code, body) = login(outside.clone()).await;
    eprintln!("LOGIN FROM 127.0.0.1: HTTP {code} {}", body["errors"]);
    assert!(code >= 400 && body["auth"].is_null(), "{code} {body}");
    let (code, body) = login(inside.clone()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["auth"]["lease_duration"], 600, "{body}");
    let token = body["auth"]["client_token"].as_str().unwrap().to_owned();
    let read = |c: reqwest::Client| {
        let u = url("sys/storage/raft/configuration");
        let t = token.clone();
        async move {
            let r = c.get(u).header("X-Vault-Token", t).send().await.unwrap();
            r.status().as_u16()
        }
    };
    assert_eq!(read(inside.clone()).await, 200);
    let from_outside = read(outside).await;
    eprintln!("TOKEN USED FROM 127.0.0.1: HTTP {from_outside}");
    assert_eq!(from_outside, 403);

    // 4. An instance launched after init (a replacement) has an address outside the
    // default binding: its snapshot is refused, and the message says why and what to do.
    let ip = format!("{}.14", tb.block);
    let i = tb.add_instance(&ip);
    tb.write_config(i, &NodeOpts::default());
    std::fs::create_dir_all(tb.node_dir(i).join("tls")).unwrap();
    std::fs::copy(
        tb.seed_dir().join("ca.pem"),
        tb.node_dir(i).join("tls/ca.pem"),
    )
    .unwrap();
    let (code, out, err) = tb.run_agent(i, &["snapshot"], RUN);
    let line = err
        .lines()
        .find(|l| l.contains("refused"))
        .unwrap_or_default();
    eprintln!("REPLACEMENT NODE: exit {code}: {line}");
    assert_eq!(code, 77, "{out}\n{err}");
    assert!(
        err.contains(&ip) && err.contains("bound") && err.contains("snapshot.bound_cidrs"),
        "{err}"
    );
    for a in agents.iter_mut() {
        a.stop();
    }
}
