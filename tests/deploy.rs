//! The deploy module (deploy/terraform/) applied to the test-bed's moto with the real
//! hashicorp/aws provider: what it made is read back through the AWS APIs (not from
//! Terraform's own state), and a second plan shows no change but moto's named drift
//! ([`moto_drift`]). moto's CloudFormation would silently drop the bucket policy,
//! the hooks and alarms; the provider's own API calls do not.
//!
//! Needs terraform on PATH and the hashicorp/aws provider as a filesystem mirror
//! (`VB_TF_MIRROR`, default /opt/tf-plugins); without them it says SKIPPED (a failure under
//! CI).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MODULE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/terraform");
const ROOT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/deploy/main.tf.in"
);
/// An apply of these ~45 resources took 40-80 s against moto on 2 cores.
const APPLY_BOUND: Duration = Duration::from_secs(600);

fn mirror() -> PathBuf {
    std::env::var_os("VB_TF_MIRROR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/opt/tf-plugins".into())
}

/// Why this machine cannot run the tier, if it cannot.
fn missing() -> Option<String> {
    let on_path = Command::new("terraform")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !on_path {
        return Some("terraform is not on PATH".into());
    }
    let provider = mirror().join("registry.terraform.io/hashicorp/aws");
    if !provider.is_dir() {
        return Some(format!(
            "no hashicorp/aws provider mirror at {}",
            provider.display()
        ));
    }
    None
}

struct Tf {
    dir: PathBuf,
    rc: PathBuf,
}

impl Tf {
    fn new(dir: &Path) -> Tf {
        let rc = dir.join("terraformrc");
        std::fs::write(
            &rc,
            format!(
                "provider_installation {{\n  filesystem_mirror {{\n    path    = \"{}\"\n    include = [\"registry.terraform.io/hashicorp/*\"]\n  }}\n  direct {{\n    exclude = [\"registry.terraform.io/*/*\"]\n  }}\n}}\n",
                mirror().display()
            ),
        )
        .unwrap();
        Tf {
            dir: dir.to_owned(),
            rc,
        }
    }

    /// Runs `terraform <args>` in the root (bounded); returns (exit code, stdout, stderr).
    fn run(&self, args: &[&str], bound: Duration) -> (i32, String, String) {
        let mut child = Command::new("terraform")
            .args(args)
            .current_dir(&self.dir)
            .env("TF_CLI_CONFIG_FILE", &self.rc)
            .env("CHECKPOINT_DISABLE", "1")
            .env("TF_IN_AUTOMATION", "1")
            .env_remove("TF_CLI_ARGS")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn terraform");
        // Drained on threads: a plan's JSON fills a pipe long before terraform exits.
        let drain = |mut r: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                String::from_utf8_lossy(&v).into_owned()
            })
        };
        let out = drain(Box::new(child.stdout.take().unwrap()));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > bound {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "terraform {args:?} did not finish within {bound:?}:\n{}\n{}",
                    out.join().unwrap(),
                    err.join().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        (
            status.code().unwrap_or(-1),
            out.join().unwrap(),
            err.join().unwrap(),
        )
    }

    fn ok(&self, args: &[&str], bound: Duration) -> String {
        let (code, out, err) = self.run(args, bound);
        assert_eq!(code, 0, "terraform {args:?}:\n{out}\n{err}");
        out
    }
}

/// One changed top-level attribute of a planned update: (name, before, after).
type Attr = (String, serde_json::Value, serde_json::Value);

/// The resource changes of a saved plan that are not no-ops: (address, actions, changed
/// top-level attributes).
fn changes(plan_json: &serde_json::Value) -> Vec<(String, Vec<String>, Vec<Attr>)> {
    let mut v = Vec::new();
    for rc in plan_json["resource_changes"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let actions: Vec<String> = rc["change"]["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        if actions == ["no-op"] || actions == ["read"] {
            continue;
        }
        let before = &rc["change"]["before"];
        let after = &rc["change"]["after"];
        let mut attrs: Vec<Attr> = after
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, a)| before.get(k.as_str()) != Some(a))
            .map(|(k, a)| (k.clone(), before[k.as_str()].clone(), a.clone()))
            .collect();
        attrs.sort_by(|x, y| x.0.cmp(&y.0));
        v.push((rc["address"].as_str().unwrap().to_owned(), actions, attrs));
    }
    v
}

/// The name of a second-plan difference that comes from moto's answers, not from the
/// module; None for anything else (a real drift, which fails the test).
fn moto_drift(address: &str, (name, before, after): &Attr) -> Option<&'static str> {
    let rule = address.contains("aws_vpc_security_group_ingress_rule")
        || address.contains("aws_vpc_security_group_egress_rule");
    match name.as_str() {
        // moto keeps no description on a rule that references a security group.
        "description" if rule && before.is_null() && after.is_string() => {
            Some("moto drops the description of a rule that references a security group")
        }
        // moto echoes the template's own tags back as a `launch-template` tag spec.
        "tag_specifications" if address.ends_with("aws_launch_template.nodes") => {
            let extra: Vec<&serde_json::Value> = before
                .as_array()?
                .iter()
                .filter(|t| !after.as_array().is_some_and(|a| a.contains(t)))
                .collect();
            let only_echo = extra
                .iter()
                .all(|t| t["resource_type"] == "launch-template")
                && after
                    .as_array()?
                    .iter()
                    .all(|t| before.as_array().is_some_and(|b| b.contains(t)));
            only_echo.then_some("moto echoes the launch template's tags as a tag specification")
        }
        // moto answers no capacity reservation preference where the provider expects "".
        "capacity_reservation_specification"
            if address.ends_with("aws_autoscaling_group.nodes") =>
        {
            (before[0]["capacity_reservation_preference"].is_null()
                && after[0]["capacity_reservation_preference"] == "")
                .then_some("moto answers a null capacity reservation preference")
        }
        // The template's update (above) makes its next version unknown until applied.
        "launch_template" if address.ends_with("aws_autoscaling_group.nodes") => {
            (before[0]["id"] == after[0]["id"] && after[0].get("version").is_none())
                .then_some("the launch template's version follows its moto-echo update")
        }
        // moto answers every hook with made-up notification and role ARNs.
        "notification_target_arn" | "role_arn"
            if address.contains("aws_autoscaling_lifecycle_hook")
                && after.is_null()
                && before.as_str().is_some_and(|a| {
                    a.ends_with(":my-queue") || a.ends_with("/my-auto-scaling-role")
                }) =>
        {
            Some("moto answers lifecycle hooks with made-up notification and role ARNs")
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_applies_to_moto_its_user_data_boots_a_cluster_and_a_second_plan_shows_only_moto_drift(
) {
    if let Some(why) = missing() {
        println!("SKIPPED: {why}: the deploy module's apply was not run");
        return;
    }
    let mut tb = Testbed::start(104, 1);
    let sdk = tb.sdk().await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let ami = ec2
        .describe_images()
        .send()
        .await
        .expect("DescribeImages")
        .images()
        .iter()
        .filter_map(|i| i.image_id().map(str::to_owned))
        .find(|id| id.len() <= 21)
        .expect("moto lists an AMI");
    let cidr = format!("{}.0/24", tb.block);
    let root = tb.path().join("deploy");
    std::fs::create_dir_all(&root).unwrap();
    let main = std::fs::read_to_string(ROOT)
        .unwrap()
        .replace("@MOTO@", &tb.moto_url)
        .replace("@MODULE@", MODULE)
        .replace("@CIDR@", &cidr)
        .replace("@AMI@", &ami)
        .replace(
            "@SERVER_NAME@",
            tb.env["server_name"].as_str().unwrap_or("vault.internal"),
        );
    std::fs::write(root.join("main.tf"), main).unwrap();
    let tf = Tf::new(&root);
    tf.ok(
        &["init", "-input=false", "-no-color"],
        Duration::from_secs(120),
    );
    let t = Instant::now();
    tf.ok(
        &["apply", "-auto-approve", "-input=false", "-no-color"],
        APPLY_BOUND,
    );
    let applied = t.elapsed();
    let outputs: serde_json::Value =
        serde_json::from_str(&tf.ok(&["output", "-json"], Duration::from_secs(60))).unwrap();
    let out = |k: &str| outputs[k]["value"].as_str().unwrap().to_owned();

    // The bucket and its write-once policy (moto's GetBucketVersioning answer does not parse
    // in the Rust SDK; the mocked plan test covers versioning).
    let s3 = aws_sdk_s3::Client::new(&sdk);
    let bucket = out("bucket");
    let policy = s3
        .get_bucket_policy()
        .bucket(&bucket)
        .send()
        .await
        .expect("the bucket policy is in place")
        .policy()
        .unwrap()
        .to_owned();
    let policy: serde_json::Value = serde_json::from_str(&policy).unwrap();
    let sids: Vec<&str> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["Sid"].as_str())
        .collect();
    assert!(
        sids.contains(&"EscrowWriteOnceOnly") && sids.contains(&"EscrowNeverDeleted"),
        "{policy}"
    );
    // The keys: two, each with its own policy; only the escrow key's grants by class.
    let kms = aws_sdk_kms::Client::new(&sdk);
    let (seal, escrow) = (out("seal_key_arn"), out("escrow_key_arn"));
    assert_ne!(seal, escrow);
    let key_policy = |arn: String| {
        let kms = kms.clone();
        async move {
            kms.get_key_policy()
                .key_id(arn)
                .policy_name("default")
                .send()
                .await
                .expect("GetKeyPolicy")
                .policy()
                .unwrap()
                .to_owned()
        }
    };
    let (seal_policy, escrow_policy) = (key_policy(seal).await, key_policy(escrow).await);
    assert!(
        !seal_policy.contains("vault-bootstrap:class"),
        "{seal_policy}"
    );
    assert!(escrow_policy.contains("node-credential"), "{escrow_policy}");

    // The group: its hooks exist (set at creation), its instances on the loopback block.
    let asg = aws_sdk_autoscaling::Client::new(&sdk);
    let name = out("autoscaling_group_name");
    let hooks = asg
        .describe_lifecycle_hooks()
        .auto_scaling_group_name(&name)
        .send()
        .await
        .expect("DescribeLifecycleHooks");
    let mut got: Vec<String> = hooks
        .lifecycle_hooks()
        .iter()
        .map(|h| {
            format!(
                "{}/{}/{}",
                h.lifecycle_transition().unwrap_or_default(),
                h.default_result().unwrap_or_default(),
                h.heartbeat_timeout().unwrap_or_default()
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "autoscaling:EC2_INSTANCE_LAUNCHING/ABANDON/1800",
            "autoscaling:EC2_INSTANCE_TERMINATING/CONTINUE/1800"
        ]
    );
    let groups = asg
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(&name)
        .send()
        .await
        .unwrap();
    let group = &groups.auto_scaling_groups()[0];
    assert_eq!(group.health_check_type(), Some("EC2"));
    let ids: Vec<String> = group
        .instances()
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 3, "{group:?}");
    let reservations = ec2
        .describe_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await
        .unwrap();
    for i in reservations
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
    {
        let ip = i.private_ip_address().unwrap_or_default();
        assert!(
            ip.starts_with(&format!("{}.", tb.block)),
            "{ip}: the group's instances must get addresses on the test's loopback block"
        );
        assert!(
            i.tags()
                .iter()
                .any(|t| t.key() == Some("aws:autoscaling:groupName") && t.value() == Some(&name)),
            "{i:?}"
        );
    }
    // moto gives the instances neither the template's profile nor its metadata options:
    // those are checked on the template itself.
    let template = group
        .launch_template()
        .and_then(|t| t.launch_template_id())
        .expect("the group launches from a template")
        .to_owned();
    let versions = ec2
        .describe_launch_template_versions()
        .launch_template_id(&template)
        .versions("$Latest")
        .send()
        .await
        .expect("DescribeLaunchTemplateVersions");
    let data = versions.launch_template_versions()[0]
        .launch_template_data()
        .expect("template data");
    let md = data.metadata_options().expect("metadata options");
    assert_eq!(md.http_tokens().map(|t| t.as_str()), Some("required"));
    assert_eq!(md.http_put_response_hop_limit(), Some(1));
    assert_eq!(
        md.instance_metadata_tags().map(|t| t.as_str()),
        Some("enabled")
    );
    let nic = &data.network_interfaces()[0];
    assert_eq!(nic.associate_public_ip_address(), Some(false));
    assert!(data.iam_instance_profile().is_some());

    // A second plan: only the named drift.
    let (code, _, err) = tf.run(
        &[
            "plan",
            "-input=false",
            "-no-color",
            "-detailed-exitcode",
            "-out=second.tfplan",
        ],
        APPLY_BOUND,
    );
    assert!(code == 0 || code == 2, "second plan failed:\n{err}");
    let plan: serde_json::Value =
        serde_json::from_str(&tf.ok(&["show", "-json", "second.tfplan"], Duration::from_secs(60)))
            .unwrap();
    let drift = changes(&plan);
    let mut named = std::collections::BTreeSet::new();
    for (address, actions, attrs) in &drift {
        assert_eq!(
            actions,
            &["update"],
            "a second plan may only update in place: {address}\nall: {drift:?}"
        );
        for attr in attrs {
            let why = moto_drift(address, attr).unwrap_or_else(|| {
                panic!(
                    "a second plan changes {address} {}: {} -> {}, which is not moto's named drift\nall: {drift:?}",
                    attr.0, attr.1, attr.2
                )
            });
            named.insert(why);
        }
    }
    println!(
        "deploy module: applied to moto in {:.1} s; second plan: {} resource(s) differ, all of it moto's named drift: {named:?}",
        applied.as_secs_f64(),
        drift.len()
    );

    // moto evaluates bucket policies but fills none of these statements' condition keys
    // (aws:SecureTransport over the test-bed's plain HTTP, s3:if-none-match, the SSE-KMS
    // keys): each Deny would refuse every request. The policy was read back above; its
    // conditions are evaluated by tests/policy/. For the boot it goes.
    s3.delete_bucket_policy()
        .bucket(&bucket)
        .send()
        .await
        .expect("DeleteBucketPolicy");
    // The TLS set goes into the module's bucket, as an operator uploads it after the apply.
    for key in ["tls/server.pem", "tls/server.key", "tls/ca.pem"] {
        let body = tb.get_object(key).await;
        s3.put_object()
            .bucket(&bucket)
            .key(key)
            .body(body.into())
            .send()
            .await
            .unwrap();
    }
    // Each of the group's instances gets its IMDS, and an agent whose config is the
    // module's user-data's, with only what a process on this host needs instead of an
    // EC2 instance changed (local paths, the exec launcher, the server binary, the moto
    // endpoint for the seal). Lifecycle hooks are left out: completing them is the
    // test-bed's emulation's, not moto's (tests/rolling.rs).
    let config = out("user_data")
        .split("<<'CONFIG'\n")
        .nth(1)
        .and_then(|rest| rest.split("\nCONFIG\n").next())
        .expect("the user-data writes config.toml from a heredoc")
        .to_owned();
    let first = tb.instances.len();
    for i in reservations
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
    {
        tb.instances.push(Instance {
            id: i.instance_id().unwrap().to_owned(),
            ip: i.private_ip_address().unwrap().to_owned(),
        });
    }
    tb.start_imds();
    let nodes: Vec<usize> = (first..tb.instances.len()).collect();
    for &i in &nodes {
        tb.write_config(i, &NodeOpts::default());
        let local: toml::Table = std::fs::read_to_string(tb.config_path(i))
            .unwrap()
            .parse()
            .unwrap();
        let mut merged: toml::Table = config.parse().expect("the module's config.toml parses");
        merged.remove("lifecycle");
        for (table, keys) in [
            (
                "vault",
                &[
                    "binary",
                    "config_file",
                    "data_dir",
                    "tls_dir",
                    "bind_address",
                    "launcher",
                    "user",
                    "health_timeout_secs",
                ][..],
            ),
            (
                "agent",
                &["state_dir", "imds_timeout_secs", "aws_timeout_secs"][..],
            ),
            ("seal", &["endpoint"][..]),
            ("init", &["audit_file_path", "join_timeout_secs"][..]),
        ] {
            let t = merged
                .entry(table)
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .unwrap();
            for k in keys {
                t.insert((*k).into(), local[table][*k].clone());
            }
        }
        std::fs::write(tb.config_path(i), toml::to_string(&merged).unwrap()).unwrap();
    }
    let t = Instant::now();
    let mut agents: Vec<Agent> = nodes
        .iter()
        .map(|&i| tb.spawn_agent(i, &["boot"]))
        .collect();
    for a in agents.iter_mut() {
        a.wait_log("node ready", Duration::from_secs(240));
    }
    let formed = t.elapsed();
    let inits: usize = agents
        .iter()
        .map(|a| a.stderr().matches("sys/init succeeded").count())
        .sum();
    assert_eq!(inits, 1, "exactly one node initializes the cluster");

    // escrow verify with the module's operator role (AssumeRole; moto here enforces no
    // IAM, so this shows the plumbing and the layout, not the grants: tests/policy/ does).
    let assumed = Command::new(python())
        .args([
            "-c",
            "import boto3, json, sys; c = boto3.client('sts', endpoint_url=sys.argv[1], region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing').assume_role(RoleArn=sys.argv[2], RoleSessionName='operator')['Credentials']; print(json.dumps([c['AccessKeyId'], c['SecretAccessKey'], c['SessionToken']]))",
            &tb.moto_url,
            &out("operator_role_arn"),
        ])
        .output()
        .expect("AssumeRole through boto3");
    assert!(
        assumed.status.success(),
        "AssumeRole of the module's operator role: {}",
        String::from_utf8_lossy(&assumed.stderr)
    );
    let creds: Vec<String> = serde_json::from_slice(&assumed.stdout).unwrap();
    let env = [
        ("AWS_ACCESS_KEY_ID", creds[0].clone()),
        ("AWS_SECRET_ACCESS_KEY", creds[1].clone()),
        ("AWS_SESSION_TOKEN", creds[2].clone()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, verified, err) = tb.run_agent_env(
        nodes[0],
        &["escrow", "verify"],
        &env,
        Duration::from_secs(60),
    );
    assert_eq!(
        code, 0,
        "escrow verify with the operator role:\n{verified}\n{err}"
    );
    assert!(
        verified.contains(&format!("s3://{bucket}/vault-bootstrap/deploy-vault/")),
        "{verified}"
    );
    println!(
        "deploy module: its user-data's config booted {} nodes into one cluster in {:.1} s; escrow verify passed with the operator role",
        nodes.len(),
        formed.as_secs_f64()
    );
    for a in agents.iter_mut() {
        a.stop();
    }
}
