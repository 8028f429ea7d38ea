//! `doctor`: all PASS on a healthy node; the right FAIL line for each broken precondition.

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
            l.starts_with(&format!("PASS {name}:")) || l.starts_with(&format!("FAIL {name}:"))
        })
        .unwrap_or_else(|| panic!("no {name} line:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_each_broken_precondition() {
    let (tb, mut agents) = form(39, 3, "");

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
