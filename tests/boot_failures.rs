//! Bad input on the boot path: each case asserts the documented exit code, a message that
//! names the cause, and that nothing was left half-written (no vault.hcl, no TLS files, no
//! temp files). One test-bed (moto + IMDS + fault proxy) serves all cases, in sequence.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

/// Removes what a previous case may have written, keeping the config file.
fn reset(tb: &Testbed, i: usize) {
    for sub in ["etc", "tls", "data", "state"] {
        let _ = std::fs::remove_dir_all(tb.node_dir(i).join(sub));
    }
    std::fs::create_dir_all(tb.node_dir(i).join("etc")).unwrap();
}

/// Nothing but the config, the logs and the empty etc/ dir.
fn assert_nothing_written(tb: &Testbed, i: usize, case: &str) {
    let files: Vec<String> = tree(&tb.node_dir(i))
        .into_iter()
        .filter(|f| !f.ends_with(".log") && f != "config.toml" && f != "etc/")
        .collect();
    assert!(files.is_empty(), "{case}: files left behind: {files:?}");
}

fn assert_no_temp_files(dir: &Path, case: &str) {
    let tmp: Vec<String> = tree(dir)
        .into_iter()
        .filter(|f| f.ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "{case}: temp files left: {tmp:?}");
}

struct Case<'a> {
    name: &'a str,
    extra_toml: &'a str,
    env: Vec<(&'a str, String)>,
    code: i32,
    needles: &'a [&'a str],
}

fn run_case(tb: &Testbed, c: Case<'_>) -> String {
    reset(tb, 0);
    tb.write_config(
        0,
        &NodeOpts {
            extra_toml: c.extra_toml.to_string(),
            ..Default::default()
        },
    );
    let env: Vec<(&str, &str)> = c.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut a = tb.spawn_agent_env(0, &["boot"], &env);
    let status = a.wait_exit(Duration::from_secs(90));
    let log = a.stderr();
    assert_eq!(
        status.code(),
        Some(c.code),
        "{}: wrong exit code; stderr:\n{log}",
        c.name
    );
    for n in c.needles {
        assert!(log.contains(n), "{}: stderr lacks {n:?}:\n{log}", c.name);
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_clearly_and_writes_nothing() {
    let mut tb = Testbed::start(22, 2);
    let ip0 = tb.instances[0].ip.clone();
    let fast = "[agent]\nimds_timeout_secs = 2\naws_timeout_secs = 2\n[cluster]\ndiscovery_timeout_secs = 2\n";

    // --- config ---------------------------------------------------------------------
    let (code, _, err) = {
        let missing = tb.path().join("nope.toml");
        let out = std::process::Command::new(AGENT)
            .arg("--config")
            .arg(&missing)
            .arg("boot")
            .output()
            .unwrap();
        (
            out.status.code(),
            (),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert_eq!(code, Some(66), "missing config: {err}");
    assert!(
        err.contains("nope.toml") && err.contains("not found"),
        "{err}"
    );

    // The env var names the file when --config is absent.
    let out = std::process::Command::new(AGENT)
        .env("VAULT_BOOTSTRAP_CONFIG", tb.path().join("via-env.toml"))
        .arg("render")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(66));
    assert!(String::from_utf8_lossy(&out.stderr).contains("via-env.toml"));

    let cfg = tb.write_config(0, &NodeOpts::default());
    let good = std::fs::read_to_string(&cfg).unwrap();
    let config_cases: [(&str, String, &[&str]); 3] = [
        (
            "unknown key",
            format!("{good}\n[escrow]\nbucket = \"x\"\n"),
            &["unknown field `escrow`"],
        ),
        (
            "wrong type",
            good.replace("launcher = \"exec\"", "launcher = 7"),
            &["launcher"],
        ),
        (
            "missing key",
            good.replace("bucket = \"vault-resources\"", ""),
            &["missing field `bucket`"],
        ),
    ];
    for (name, text, needles) in config_cases {
        std::fs::write(&cfg, &text).unwrap();
        reset(&tb, 0);
        let (code, _, log) = tb.run_agent(0, &["boot"], Duration::from_secs(20));
        assert_eq!(code, 78, "{name}: {log}");
        assert!(
            log.contains(cfg.to_str().unwrap()),
            "{name}: file not named: {log}"
        );
        for n in needles {
            assert!(log.contains(n), "{name}: lacks {n:?}: {log}");
        }
        assert_nothing_written(&tb, 0, name);
    }
    let nested_unknown = good.replace("[agent]\n", "[agent]\nstate_dri = \"/x\"\n");
    std::fs::write(&cfg, nested_unknown).unwrap();
    let (code, _, log) = tb.run_agent(0, &["boot"], Duration::from_secs(20));
    assert_eq!(code, 78, "{log}");
    assert!(log.contains("state_dri"), "{log}");

    // --- IMDS ---------------------------------------------------------------------------
    run_case(
        &tb,
        Case {
            name: "IMDS down",
            extra_toml: fast,
            env: vec![(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                format!("http://{ip0}:1339"),
            )],
            code: 75,
            needles: &["unreachable", "1339"],
        },
    );
    assert_nothing_written(&tb, 0, "IMDS down");

    tb.imds_fault(&ip0, "status500\n");
    run_case(
        &tb,
        Case {
            name: "IMDS 500",
            extra_toml: fast,
            env: vec![],
            code: 75,
            needles: &["HTTP 500"],
        },
    );
    assert_nothing_written(&tb, 0, "IMDS 500");

    tb.imds_fault(&ip0, "v1only\n");
    run_case(
        &tb,
        Case {
            name: "IMDS v1-only",
            extra_toml: fast,
            env: vec![],
            code: 76,
            needles: &["v1-only", "never falls back"],
        },
    );
    assert_nothing_written(&tb, 0, "IMDS v1-only");

    tb.imds_fault(&ip0, "token403\n");
    run_case(
        &tb,
        Case {
            name: "IMDS token 403",
            extra_toml: fast,
            env: vec![],
            code: 76,
            needles: &["HTTP 403"],
        },
    );

    tb.imds_fault(&ip0, "lifecycle Warmed:Running\n");
    run_case(
        &tb,
        Case {
            name: "warm pool",
            extra_toml: "[agent]\nwarm_pool_timeout_secs = 2\n",
            env: vec![],
            code: 75,
            needles: &["warm pool", "Warmed:Running"],
        },
    );
    assert_nothing_written(&tb, 0, "warm pool");
    tb.imds_fault(&ip0, "");

    // --- discovery ----------------------------------------------------------------------
    run_case(
        &tb,
        Case {
            name: "no peers",
            extra_toml: "[cluster]\ntag_value = \"no-such-cluster\"\ndiscovery_timeout_secs = 2\n",
            env: vec![],
            code: 75,
            needles: &["no instance tagged aws:autoscaling:groupName=no-such-cluster"],
        },
    );
    assert_nothing_written(&tb, 0, "no peers");
    run_case(
        &tb,
        Case {
            name: "too few peers",
            extra_toml: "[cluster]\nmin_peers = 3\ndiscovery_timeout_secs = 2\n",
            env: vec![],
            code: 75,
            needles: &["2 of the required 3"],
        },
    );

    // --- TLS ----------------------------------------------------------------------------
    let tls_cases: [(&str, i32, &[&str]); 7] = [
        (
            "missing-key",
            66,
            &["s3://vault-resources/tls/server.key", "NoSuchKey"],
        ),
        ("malformed-cert", 65, &["tls/server.pem", "malformed PEM"]),
        ("malformed-key", 65, &["tls/server.key"]),
        ("mismatch", 65, &["does not match"]),
        ("expired", 65, &["expired"]),
        ("notyet", 65, &["not valid yet"]),
        ("wrong-ca", 65, &["does not chain"]),
    ];
    for (variant, code, needles) in tls_cases {
        tb.tls_variant(variant);
        run_case(
            &tb,
            Case {
                name: variant,
                extra_toml: fast,
                env: vec![],
                code,
                needles,
            },
        );
        assert_nothing_written(&tb, 0, variant);
    }
    tb.tls_variant("san");
    run_case(
        &tb,
        Case {
            name: "san",
            extra_toml: fast,
            env: vec![],
            code: 65,
            needles: &["does not cover this node's IP", &ip0],
        },
    );
    assert_nothing_written(&tb, 0, "san");
    tb.tls_variant("good");

    // --- S3 through the fault proxy -------------------------------------------------------
    tb.start_proxy();
    tb.proxy_rules("GET .*server\\.key status 403 AccessDenied\n");
    run_case(
        &tb,
        Case {
            name: "S3 access denied",
            extra_toml: fast,
            env: vec![],
            code: 77,
            needles: &[
                "s3://vault-resources/tls/server.key",
                "AccessDenied",
                "IAM policy",
            ],
        },
    );
    assert_nothing_written(&tb, 0, "S3 access denied");
    tb.proxy_rules("GET .*server\\.key status 503 SlowDown\n");
    run_case(
        &tb,
        Case {
            name: "S3 503",
            extra_toml: fast,
            env: vec![],
            code: 75,
            needles: &["SlowDown"],
        },
    );
    tb.proxy_rules("");

    // --- Vault ----------------------------------------------------------------------------
    reset(&tb, 0);
    tb.write_config(
        0,
        &NodeOpts {
            binary: Some("/nonexistent/bao".into()),
            extra_toml: fast.into(),
        },
    );
    let (code, _, log) = tb.run_agent(0, &["boot"], Duration::from_secs(30));
    assert_eq!(code, 72, "{log}");
    assert!(
        log.contains("/nonexistent/bao") && log.contains("does not exist"),
        "{log}"
    );
    assert_nothing_written(&tb, 0, "binary missing");

    let squatter = std::net::TcpListener::bind(format!("{ip0}:8200")).unwrap();
    let log = run_case(
        &tb,
        Case {
            name: "port in use",
            extra_toml: fast,
            env: vec![],
            code: 69,
            needles: &[&format!("{ip0}:8200"), "already in use"],
        },
    );
    drop(squatter);
    assert!(!log.contains("spawned the server"), "{log}");
    assert_no_temp_files(&tb.node_dir(0), "port in use");

    // A server that dies at start (KMS unreachable -> exits 1) is reported, not waited on.
    let log = run_case(
        &tb,
        Case {
            name: "server exits",
            extra_toml:
                "[seal]\nendpoint = \"http://127.0.22.3:9\"\n[agent]\naws_timeout_secs = 2\n",
            env: vec![],
            code: 69,
            needles: &["exited before it answered"],
        },
    );
    assert!(log.contains("spawned the server"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_touches_nothing_and_falls_back_to_describe_tags() {
    let tb = Testbed::start(23, 3);
    let ip0 = tb.instances[0].ip.clone();
    tb.write_config(0, &NodeOpts::default());
    // Instance metadata tags off: the tag value must come from ec2:DescribeTags.
    tb.imds_fault(&ip0, "notags\n");
    let before = tree(&tb.node_dir(0));
    let (code, out, log) = tb.run_agent(0, &["render"], Duration::from_secs(60));
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("DescribeTags"), "{log}");
    assert_eq!(out.matches("retry_join {").count(), 2, "{out}");
    assert!(out.contains(&format!(
        "node_id                = \"{}\"",
        tb.instances[0].id
    )));
    assert!(
        out.contains(&format!("address         = \"{ip0}:8200\"")),
        "{out}"
    );
    assert!(out.contains(&format!("endpoint   = \"{}\"", tb.moto_url)));
    let after: Vec<String> = tree(&tb.node_dir(0))
        .into_iter()
        .filter(|f| !f.ends_with(".log"))
        .collect();
    let before: Vec<String> = before
        .into_iter()
        .filter(|f| !f.ends_with(".log"))
        .collect();
    assert_eq!(before, after, "render wrote files");
}
