//! `doctor`: all PASS on a healthy node; the right FAIL line for each broken precondition;
//! which write-once control guards the escrow prefix (bucket policy, Object Lock, neither);
//! a WARN, which does not fail doctor, when the recovery shares are not PGP-wrapped.

mod common;
use common::*;
use std::time::Duration;

fn doctor(tb: &Testbed, env: &[(&str, &str)]) -> (i32, String) {
    let (code, out, err) = tb.run_agent_env(0, &["doctor"], env, Duration::from_secs(90));
    (code, format!("{out}\n--- stderr:\n{err}"))
}

fn line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| {
            ["PASS", "FAIL", "WARN"]
                .iter()
                .any(|v| l.starts_with(&format!("{v} {name}:")))
        })
        .unwrap_or_else(|| panic!("no {name} line:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_each_broken_precondition() {
    let (tb, mut agents) = form(39, 3, "");
    // A healthy node's escrow prefix is write-once in S3 (the shipped bucket policy).
    tb.escrow_write_once().await;

    let (code, out) = doctor(&tb, &[]);
    assert_eq!(code, 0, "{out}");
    for name in [
        "imds",
        "tag",
        "iam ec2",
        "iam s3",
        "tls",
        "kms seal",
        "kms escrow",
        "escrow write-once",
        "clock",
        "peers",
        "vault binary",
    ] {
        assert!(line(&out, name).starts_with("PASS"), "{name}:\n{out}");
    }

    // IMDS down.
    let (code, out) = doctor(
        &tb,
        &[(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            "http://127.0.39.11:1339",
        )],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        line(&out, "imds").starts_with("FAIL") && line(&out, "imds").contains("unreachable"),
        "{out}"
    );

    // Wrong KMS alias.
    tb.write_config(
        0,
        &NodeOpts {
            extra_toml: "[seal]\nkms_key_id = \"alias/no-such-key\"\n".into(),
            ..Default::default()
        },
    );
    let (code, out) = doctor(&tb, &[]);
    assert_eq!(code, 1);
    let l = line(&out, "kms seal");
    assert!(
        l.starts_with("FAIL") && l.contains("alias/no-such-key"),
        "{out}"
    );
    assert!(line(&out, "kms escrow").starts_with("PASS"), "{out}");
    tb.write_config(0, &NodeOpts::default());

    // Missing TLS object.
    tb.tls_variant("missing-key");
    let (code, out) = doctor(&tb, &[]);
    assert_eq!(code, 1);
    let l = line(&out, "iam s3");
    assert!(
        l.starts_with("FAIL") && l.contains("tls/server.key") && l.contains("NoSuchKey"),
        "{out}"
    );

    // Certificate and key that do not match.
    tb.tls_variant("mismatch");
    let (code, out) = doctor(&tb, &[]);
    assert_eq!(code, 1);
    let l = line(&out, "tls");
    assert!(
        l.starts_with("FAIL") && l.contains("does not match"),
        "{out}"
    );
    tb.tls_variant("good");

    // A peer's ports closed: its server is gone.
    agents[2].kill_servers();
    let (code, out) = doctor(&tb, &[]);
    assert_eq!(code, 1);
    let l = line(&out, "peers");
    assert!(
        l.starts_with("FAIL") && l.contains(&format!("{}:8200", tb.instances[2].ip)),
        "{out}"
    );
    assert!(line(&out, "tls").starts_with("PASS"), "{out}");

    for a in agents.iter_mut() {
        a.stop();
    }
}

/// Issue 14: `doctor` says which write-once control is in force on the escrow prefix: the
/// shipped bucket policy (both rules), S3 Object Lock with a default retention, or neither
/// (FAIL naming the shipped policy); and WARNs, without failing, while the shares are not
/// PGP-wrapped to their holders. One instance, no server: every other check passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_the_escrow_write_once_control_and_unwrapped_shares() {
    let started = std::time::Instant::now();
    let tb = Testbed::start(91, 1);
    tb.write_config(0, &NodeOpts::default());
    let s3 = aws_sdk_s3::Client::new(&tb.sdk().await);
    let fails = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.starts_with("FAIL "))
            .map(str::to_owned)
            .collect()
    };

    // 1. Neither: FAIL naming the shipped policy; the PGP WARN is there but not counted.
    let (code, out) = doctor(&tb, &[]);
    let l = line(&out, "escrow write-once");
    eprintln!("NEITHER: {l}");
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        fails(&out).len(),
        1,
        "only the write-once line fails: {out}"
    );
    assert!(
        l.starts_with("FAIL")
            && l.contains("packer/examples/escrow-bucket-policy.json")
            && l.contains("no bucket policy")
            && l.contains("no S3 Object Lock"),
        "{out}"
    );
    let w = line(&out, "recovery pgp");
    eprintln!("PGP: {w}");
    assert!(
        w.starts_with("WARN") && w.contains("init.recovery_pgp_keys"),
        "{out}"
    );
    assert!(out.contains("1 check(s) failed, 1 warning(s)"), "{out}");

    // 2. A bucket policy with the overwrite rule only: FAIL naming the missing delete rule.
    s3.put_bucket_policy()
        .bucket("vault-resources")
        .policy(write_once_policy(true))
        .send()
        .await
        .expect("PutBucketPolicy");
    let (code, out) = doctor(&tb, &[]);
    let l = line(&out, "escrow write-once");
    assert_eq!(code, 1, "{out}");
    assert!(
        l.starts_with("FAIL")
            && l.contains("no Deny of s3:DeleteObject")
            && !l.contains("no Deny of s3:PutObject"),
        "{out}"
    );

    // 3. Both rules: PASS, the policy named; the WARN alone leaves the exit code 0.
    s3.put_bucket_policy()
        .bucket("vault-resources")
        .policy(write_once_policy(false))
        .send()
        .await
        .expect("PutBucketPolicy");
    let (code, out) = doctor(&tb, &[]);
    let l = line(&out, "escrow write-once");
    eprintln!("POLICY: {l}");
    assert_eq!(code, 0, "{out}");
    assert!(
        l.starts_with("PASS") && l.contains("bucket policy"),
        "{out}"
    );
    assert!(line(&out, "recovery pgp").starts_with("WARN"), "{out}");
    assert!(out.contains("all checks passed, 1 warning(s)"), "{out}");

    // 4. An escrow bucket of its own with Object Lock: without a default retention it
    // locks nothing the agent writes (FAIL); with one, PASS naming mode and period. With
    // recovery_pgp_keys set, no WARN.
    s3.create_bucket()
        .bucket("vault-escrow-locked")
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .expect("CreateBucket with Object Lock");
    let pgp: Vec<String> = (1..=5)
        .map(|n| format!("\"s3://vault-resources/pgp/holder{n}.asc\""))
        .collect();
    tb.write_config(
        0,
        &NodeOpts {
            extra_toml: format!(
                "[init]\nescrow_bucket = \"vault-escrow-locked\"\nrecovery_pgp_keys = [{}]\n",
                pgp.join(", ")
            ),
            ..Default::default()
        },
    );
    let (code, out) = doctor(&tb, &[]);
    let l = line(&out, "escrow write-once");
    assert_eq!(code, 1, "{out}");
    assert!(
        l.starts_with("FAIL") && l.contains("no default retention"),
        "{out}"
    );
    use aws_sdk_s3::types::{
        DefaultRetention, ObjectLockConfiguration, ObjectLockEnabled, ObjectLockRetentionMode,
        ObjectLockRule,
    };
    s3.put_object_lock_configuration()
        .bucket("vault-escrow-locked")
        .object_lock_configuration(
            ObjectLockConfiguration::builder()
                .object_lock_enabled(ObjectLockEnabled::Enabled)
                .rule(
                    ObjectLockRule::builder()
                        .default_retention(
                            DefaultRetention::builder()
                                .mode(ObjectLockRetentionMode::Compliance)
                                .days(1)
                                .build(),
                        )
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .expect("PutObjectLockConfiguration");
    let (code, out) = doctor(&tb, &[]);
    let l = line(&out, "escrow write-once");
    eprintln!("OBJECT LOCK: {l}");
    assert_eq!(code, 0, "{out}");
    assert!(
        l.starts_with("PASS")
            && l.contains("S3 Object Lock, COMPLIANCE, default retention 1 day(s)"),
        "{out}"
    );
    assert!(line(&out, "recovery pgp").starts_with("PASS"), "{out}");
    assert!(
        !out.contains("WARN ") && out.contains("all checks passed\n"),
        "{out}"
    );
    eprintln!(
        "MEASURED doctor write-once test: {} ms",
        started.elapsed().as_millis()
    );
}
