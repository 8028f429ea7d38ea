//! After a compromise, `rotate` (operator role for AWS, the operator's token for the server)
//! makes the recovery key, the keyring and the node credentials new. Proved here on a real
//! OpenBao cluster against moto with IAM enforced:
//! - after each rotation the old shares fail generate-root and the new ones make a root
//!   token, also through `break-glass --from-escrow`;
//! - the old node credentials are dead (role_id changed, secret_id gone) and the nodes work
//!   with the new ones (`snapshot` logs in with the node role);
//! - killed at every step of a rotation (the steps in a seeded order) and run again, it
//!   leaves exactly one current generation, every older one superseded or abandoned, and
//!   the current one's shares are the ones in force.

mod common;
use common::*;
use std::time::Duration;
use vault_bootstrap::escrow::generation::{self, Generations};

const CLUSTER: &str = "test-vault";
const RUN: Duration = Duration::from_secs(120);

/// Every crash point of a rotation, in its order.
const POINTS: &[&str] = &[
    "rotation-claimed",
    "rotation-rekeyed",
    "rotation-staged-recovery-key-2",
    "rotation-staged-recovery-key-5",
    "rotation-escrowed",
    "rotation-verifying",
    "rotation-verified",
    "rotation-recorded",
    "rotation-keyring",
    "rotation-revoked-vault-bootstrap-snapshot",
    "rotation-revoked-vault-bootstrap-lifecycle",
    "rotation-credentials",
];

async fn generations(tb: &Testbed) -> Generations {
    let sdk = tb.sdk().await;
    generation::scan(
        &vault_bootstrap::aws::s3::SdkS3::new(&sdk),
        &tb.layout(CLUSTER),
        Duration::from_secs(10),
    )
    .await
    .expect("list generations")
}

async fn shares(tb: &Testbed, gen: u32, threshold: usize) -> Vec<String> {
    let mut v = Vec::new();
    for n in 1..=threshold {
        v.push(
            tb.escrowed_at(CLUSTER, gen, &format!("recovery-key-{n}"))
                .await,
        );
    }
    v
}

/// generate-root (through `break-glass` with typed keys) with `keys`: the token, or None.
async fn root_from(tb: &Testbed, runner: usize, keys: &[String]) -> Result<String, String> {
    let (code, out, err) = tb.run_agent_input(
        runner,
        &["break-glass", "--yes"],
        &format!("{}\n", keys.join("\n")),
        RUN,
    );
    if code == 0 {
        Ok(out.trim().to_string())
    } else {
        assert!(out.trim().is_empty(), "a failed break-glass printed {out}");
        Err(err)
    }
}

/// Whether the token administers the cluster; revokes it after.
async fn works_and_revoke(tb: &Testbed, token: &str) -> bool {
    let api = tb.api(0);
    let (code, _) = api
        .get("sys/storage/raft/configuration", Some(token))
        .await
        .unwrap();
    api.put("auth/token/revoke-self", Some(token), serde_json::json!({}))
        .await;
    code == 200
}

/// Whether an escrowed AppRole credential is the role's (its role_id), and whether its
/// secret_id is known to the server.
async fn credential_state(
    tb: &Testbed,
    root: &str,
    gen: u32,
    item: &str,
    role: &str,
) -> (bool, bool) {
    let creds: serde_json::Value =
        serde_json::from_str(&tb.escrowed_at(CLUSTER, gen, item).await).unwrap();
    let api = tb.api(0);
    let (code, body) = api
        .get(&format!("auth/approle/role/{role}/role-id"), Some(root))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let same_role = body["data"]["role_id"] == creds["role_id"];
    let (code, body) = api
        .put(
            &format!("auth/approle/role/{role}/secret-id/lookup"),
            Some(root),
            serde_json::json!({"secret_id": creds["secret_id"]}),
        )
        .await;
    (same_role, code == 200 && body["data"].is_object())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_killed_at_any_step_and_run_again_leaves_one_generation_whose_keys_work() {
    let seed = seed_from("VB_ROTATE_SEED");
    eprintln!("rotation trials: seed {seed} (VB_ROTATE_SEED={seed} repeats them)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = 3;
    let mut tb = Testbed::start_enforced(103, n, &IamOpts::default());
    tb.start_proxy();
    let mut agents = boot_all(&tb, n, "");
    // The root token stays valid here (no operator login path is configured): it is the
    // operator's token for the run.
    let root = tb.escrowed(CLUSTER, "root-token").await;
    let op = tb.operator_env();
    let mut env: Vec<(&str, &str)> = op.to_vec();
    env.push(("VAULT_TOKEN", root.as_str()));
    // Every level: no share or token may reach a log line at any of them.
    env.push(("VAULT_BOOTSTRAP_LOG", "trace"));
    let threshold = 3;

    // A node may write escrow objects, but never a generation: only a rotation does.
    let node = tb.iam.as_ref().unwrap().sessions[&tb.instances[0].ip].clone();
    let s3 = aws_sdk_s3::Client::new(&tb.sdk_as(&node).await);
    let prefix = tb.layout(CLUSTER).prefix;
    for (key, allowed) in [
        (format!("{prefix}node-write-probe.json"), true),
        (format!("{prefix}generations/2/rotated.json"), false),
    ] {
        let put = s3
            .put_object()
            .bucket("vault-resources")
            .key(&key)
            .body(b"{}".to_vec().into())
            .send()
            .await;
        assert_eq!(put.is_ok(), allowed, "node PutObject {key}: {put:?}");
    }

    // Without --yes, or without a token: refused, nothing changed.
    let (code, _, err) = tb.run_agent_env(0, &["rotate"], &env, RUN);
    assert_eq!(code, 64, "{err}");
    let (code, _, err) = tb.run_agent_env(0, &["rotate", "--yes"], &op, RUN);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("VAULT_TOKEN"), "{err}");
    assert_eq!(generations(&tb).await, Generations::default());

    let mut points = POINTS.to_vec();
    rng.shuffle(&mut points);
    eprintln!("seed {seed}: crash points in this order: {points:?}");
    let mut current = generation::FIRST;
    for point in points {
        let (runner, resumer) = (rng.usize(0..n), rng.usize(0..n));
        let mut crash = env.clone();
        crash.push(("VAULT_BOOTSTRAP_CRASH_AT", point));
        let (code, out, crashed_log) = tb.run_agent_env(runner, &["rotate", "--yes"], &crash, RUN);
        let err = crashed_log.clone();
        assert_eq!(
            code, -1,
            "seed {seed}: rotate on node {runner} was to be killed at {point}, it exited {code}:\n{out}\n{err}"
        );
        assert!(
            err.contains(&format!("point=\"{point}\"")) || err.contains(point),
            "{err}"
        );
        let (code, out, err) = tb.run_agent_env(resumer, &["rotate", "--yes"], &env, RUN);
        assert_eq!(
            code, 0,
            "seed {seed}: rotate on node {resumer} after a kill at {point}:\n{out}\n{err}"
        );
        assert!(!err.contains(&root), "the token must not be logged");
        let resumed_log = err.clone();

        // Exactly one current generation, newer than before; nothing left open.
        let g = generations(&tb).await;
        let now = g.current();
        assert!(now > current, "seed {seed}, {point}: {g:?}");
        assert_eq!(g.open_attempt(), None, "seed {seed}, {point}: {g:?}");
        assert!(
            g.unmarked_replaced().is_empty(),
            "seed {seed}, {point}: {g:?}"
        );
        for c in &g.claimed {
            assert!(
                g.recorded.contains(c) || g.abandoned.contains(c),
                "seed {seed}, {point}: attempt {c} neither current, replaced nor abandoned: {g:?}"
            );
        }
        assert!(
            g.superseded.contains(&current),
            "seed {seed}, {point}: {g:?}"
        );
        assert!(
            out.contains(&format!("generation {now} is current")),
            "{out}"
        );
        // Only a half-escrowed attempt is abandoned (its lost shares can never be written);
        // every other one is resumed, verification interrupted half-way included.
        let newly_abandoned = g.abandoned.iter().filter(|a| **a > current).count();
        let expected = usize::from(point == "rotation-staged-recovery-key-2");
        assert_eq!(
            newly_abandoned, expected,
            "seed {seed}, {point}: attempts abandoned: {g:?}"
        );

        // The old shares make no root token; the new ones do.
        let old = shares(&tb, current, threshold).await;
        let err = root_from(&tb, resumer, &old)
            .await
            .expect_err("the old shares must fail generate-root");
        assert!(
            err.contains("sys/generate-root/update answered HTTP 400"),
            "seed {seed}, {point}: the old shares failed for another reason:
{err}"
        );
        let new = shares(&tb, now, threshold).await;
        assert_ne!(old, new);
        // No share, old or new, reaches the logs of either run (at trace).
        for share in old.iter().chain(&new) {
            assert!(
                !crashed_log.contains(share.as_str()) && !resumed_log.contains(share.as_str()),
                "seed {seed}, {point}: a recovery share was logged"
            );
        }
        let token = root_from(&tb, runner, &new).await.unwrap_or_else(|e| {
            panic!("seed {seed}, {point}: the new shares of generation {now}: {e}")
        });
        assert!(works_and_revoke(&tb, &token).await);

        // The old node credentials are dead; the new ones are what the nodes use.
        for (item, role) in [
            ("snapshot-approle", "vault-bootstrap-snapshot"),
            ("lifecycle-approle", "vault-bootstrap-lifecycle"),
        ] {
            assert_eq!(
                credential_state(&tb, &root, current, item, role).await,
                (false, false),
                "seed {seed}, {point}: generation {current}'s {item}: (role_id current, secret_id known)"
            );
            assert_eq!(
                credential_state(&tb, &root, now, item, role).await,
                (true, true),
                "seed {seed}, {point}: generation {now}'s {item}: (role_id current, secret_id known)"
            );
        }
        current = now;
    }

    // The operator sees the generation; the nodes log in with the new credentials.
    let (code, out, err) = tb.run_agent_env(1, &["escrow", "verify"], &op, RUN);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains(&format!("generation: {current}")), "{out}");
    let (code, out, err) = tb.run_agent(0, &["status"], RUN);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["escrow"]["generation"]["current"], current, "{out}");
    let (code, out, err) = tb.run_agent(2, &["snapshot"], RUN);
    assert_eq!(
        code, 0,
        "snapshot with the node role after rotations:\n{out}\n{err}"
    );
    let (code, out, err) =
        tb.run_agent_env(2, &["break-glass", "--from-escrow", "--yes"], &op, RUN);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("generation={current}")), "{err}");
    assert!(works_and_revoke(&tb, out.trim()).await);

    // A repeat of a request already done does nothing.
    let from = format!("{}", current - 1);
    let (code, out, err) = tb.run_agent_env(
        0,
        &["rotate", "--yes", "--from-generation", &from],
        &env,
        RUN,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(generations(&tb).await.current(), current, "{out}\n{err}");
    assert!(out.contains("nothing to do"), "{out}");

    for a in agents.iter_mut() {
        a.stop();
    }
}
