//! `vault-bootstrap install --root <tempdir>`: the image layout exactly as docs/operations.md "Install
//! layout" documents it, idempotence, and refusal of a release whose SHA-256 is not the
//! pinned one. Runs the real binary; needs root (chown), as CI is.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const AGENT: &str = env!("CARGO_BIN_EXE_vault-bootstrap");
const FAKE_SERVER: &[u8] = b"#!/bin/sh\necho 'Vault v0.0.0 (fake server for the install test)'\n";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn sha256_of(path: &Path) -> String {
    // coreutils, independent of the agent's own implementation.
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

fn install(args: &[&str]) -> Output {
    Command::new(AGENT)
        .arg("install")
        .args(args)
        .env_remove("VAULT_SHA256")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// (kind, mode, uid, gid, size, mtime, mtime_nsec) of one path.
type Meta = (char, u32, u32, u32, u64, i64, i64);

/// Every path under `root` ("/"-prefixed, as in the image) with its [`Meta`].
fn listing(root: &Path) -> BTreeMap<String, Meta> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Meta>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let kind = if m.file_type().is_symlink() {
                'l'
            } else if m.is_dir() {
                'd'
            } else {
                'f'
            };
            let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
            out.insert(
                rel,
                (
                    kind,
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec(),
                ),
            );
            if kind == 'd' {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The vault user's (uid, gid) from the staging root's passwd.
fn vault_ids(root: &Path) -> (u32, u32) {
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("vault:"))
        .expect("a vault entry in etc/passwd");
    let f: Vec<&str> = line.split(':').collect();
    assert_eq!(
        &f[4..],
        ["Vault server", "/nonexistent", "/usr/sbin/nologin"],
        "{line}"
    );
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

enum Own {
    Root,
    RootVault,
    Vault,
}

/// docs/operations.md "Install layout" plus the parents a staging root gets: (path, kind, mode, owner).
fn documented(server: &str) -> Vec<(String, char, u32, Own)> {
    let mut v: Vec<(String, char, u32, Own)> = [
        ("/etc", 'd', 0o755, Own::Root),
        ("/etc/passwd", 'f', 0o644, Own::Root),
        ("/etc/group", 'f', 0o644, Own::Root),
        ("/etc/systemd", 'd', 0o755, Own::Root),
        ("/etc/systemd/system", 'd', 0o755, Own::Root),
        ("/etc/systemd/system/vault.service", 'f', 0o644, Own::Root),
        (
            "/etc/systemd/system/vault-bootstrap.service",
            'f',
            0o644,
            Own::Root,
        ),
        (
            "/etc/systemd/system/multi-user.target.wants",
            'd',
            0o755,
            Own::Root,
        ),
        (
            "/etc/systemd/system/multi-user.target.wants/vault-bootstrap.service",
            'l',
            0o777,
            Own::Root,
        ),
        (
            "/etc/systemd/system/vault-bootstrap-watch.service",
            'f',
            0o644,
            Own::Root,
        ),
        (
            "/etc/systemd/system/multi-user.target.wants/vault-bootstrap-watch.service",
            'l',
            0o777,
            Own::Root,
        ),
        (
            "/etc/systemd/system/vault-bootstrap-snapshot.service",
            'f',
            0o644,
            Own::Root,
        ),
        (
            "/etc/systemd/system/vault-bootstrap-snapshot.timer",
            'f',
            0o644,
            Own::Root,
        ),
        (
            "/etc/systemd/system/vault-bootstrap-refresh-tls.service",
            'f',
            0o644,
            Own::Root,
        ),
        (
            "/etc/systemd/system/vault-bootstrap-refresh-tls.timer",
            'f',
            0o644,
            Own::Root,
        ),
        (
            "/etc/systemd/system/timers.target.wants",
            'd',
            0o755,
            Own::Root,
        ),
        (
            "/etc/systemd/system/timers.target.wants/vault-bootstrap-snapshot.timer",
            'l',
            0o777,
            Own::Root,
        ),
        (
            "/etc/systemd/system/timers.target.wants/vault-bootstrap-refresh-tls.timer",
            'l',
            0o777,
            Own::Root,
        ),
        ("/etc/vault.d", 'd', 0o750, Own::RootVault),
        ("/etc/vault-bootstrap", 'd', 0o750, Own::Root),
        ("/opt", 'd', 0o755, Own::Root),
        ("/opt/vault", 'd', 0o755, Own::Root),
        ("/opt/vault/data", 'd', 0o700, Own::Vault),
        ("/opt/vault/tls", 'd', 0o750, Own::Vault),
        ("/usr", 'd', 0o755, Own::Root),
        ("/usr/local", 'd', 0o755, Own::Root),
        ("/usr/local/bin", 'd', 0o755, Own::Root),
        ("/usr/local/bin/vault-bootstrap", 'f', 0o755, Own::Root),
        ("/var", 'd', 0o755, Own::Root),
        ("/var/lib", 'd', 0o755, Own::Root),
        ("/var/lib/vault-bootstrap", 'd', 0o700, Own::Root),
        ("/var/log", 'd', 0o755, Own::Root),
        ("/var/log/vault", 'd', 0o750, Own::Vault),
    ]
    .into_iter()
    .map(|(p, k, m, o)| (p.to_owned(), k, m, o))
    .collect();
    v.push((format!("/usr/local/bin/{server}"), 'f', 0o755, Own::Root));
    if server == "bao" {
        v.push((
            "/etc/systemd/system/vault.service.d".into(),
            'd',
            0o755,
            Own::Root,
        ));
        v.push((
            "/etc/systemd/system/vault.service.d/openbao.conf".into(),
            'f',
            0o644,
            Own::Root,
        ));
    }
    v
}

/// Asserts the tree under `root` is exactly the documented layout, nothing more.
fn assert_layout(root: &Path, server: &str) {
    let (vuid, vgid) = vault_ids(root);
    assert_ne!(vuid, 0);
    let got = listing(root);
    let want = documented(server);
    let want_paths: Vec<&str> = want.iter().map(|w| w.0.as_str()).collect();
    let extra: Vec<&String> = got
        .keys()
        .filter(|k| !want_paths.contains(&k.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "paths not in the documented layout: {extra:?}"
    );
    for (path, kind, mode, own) in &want {
        let (k, m, uid, gid, ..) = got.get(path).unwrap_or_else(|| panic!("{path} is missing"));
        let (wu, wg) = match own {
            Own::Root => (0, 0),
            Own::RootVault => (0, vgid),
            Own::Vault => (vuid, vgid),
        };
        assert_eq!(
            (*k, format!("{m:04o}"), *uid, *gid),
            (*kind, format!("{mode:04o}"), wu, wg),
            "{path}: (kind, mode, uid, gid)"
        );
    }
    // Contents: the repo's units, the agent itself, the enablement link as systemctl makes it.
    let unit = |n: &str| fs::read_to_string(root.join("etc/systemd/system").join(n)).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    for n in [
        "vault.service",
        "vault-bootstrap.service",
        "vault-bootstrap-watch.service",
        "vault-bootstrap-snapshot.service",
        "vault-bootstrap-snapshot.timer",
        "vault-bootstrap-refresh-tls.service",
        "vault-bootstrap-refresh-tls.timer",
    ] {
        assert_eq!(unit(n), fs::read_to_string(repo.join(n)).unwrap(), "{n}");
    }
    for t in [
        "vault-bootstrap-snapshot.timer",
        "vault-bootstrap-refresh-tls.timer",
    ] {
        assert_eq!(
            fs::read_link(root.join("etc/systemd/system/timers.target.wants").join(t)).unwrap(),
            Path::new("/etc/systemd/system").join(t),
            "{t} enabled as systemctl enable would"
        );
    }
    assert_eq!(
        fs::read_link(
            root.join("etc/systemd/system/multi-user.target.wants/vault-bootstrap.service")
        )
        .unwrap(),
        Path::new("/etc/systemd/system/vault-bootstrap.service")
    );
    assert_eq!(
        sha256_of(&root.join("usr/local/bin/vault-bootstrap")),
        sha256_of(Path::new(AGENT))
    );
    // No secret and no config baked in.
    assert_eq!(
        fs::read_dir(root.join("etc/vault-bootstrap"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(fs::read_dir(root.join("etc/vault.d")).unwrap().count(), 0);
}

/// The report lines about paths (not the header, the digest line or the summary).
fn path_lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| {
            !l.starts_with("vault-bootstrap install into")
                && !l.starts_with("verified")
                && !l.starts_with("install:")
        })
        .collect()
}

struct Staging {
    _dir: tempfile::TempDir,
    root: PathBuf,
    work: PathBuf,
}

fn staging() -> Staging {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let work = dir.path().join("work");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&work).unwrap();
    Staging {
        _dir: dir,
        root,
        work,
    }
}

fn fake_server(work: &Path, name: &str) -> PathBuf {
    let p = work.join(name);
    fs::write(&p, FAKE_SERVER).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    p
}

#[test]
fn installs_the_documented_layout_and_a_second_run_changes_nothing() {
    if !is_root() {
        eprintln!("SKIPPED: install sets owners, which needs root (CI runs as root)");
        return;
    }
    let s = staging();
    let server = fake_server(&s.work, "vault");
    let digest = sha256_of(&server);
    let root = s.root.to_str().unwrap();
    let args = [
        "--root",
        root,
        "--vault-binary",
        server.to_str().unwrap(),
        "--sha256",
        &digest,
    ];

    let first = install(&args);
    let out = text(&first.stdout);
    assert!(first.status.success(), "{out}\n{}", text(&first.stderr));
    assert_layout(&s.root, "vault");
    assert_eq!(
        fs::read(s.root.join("usr/local/bin/vault")).unwrap(),
        FAKE_SERVER
    );
    let lines = path_lines(&out);
    assert!(
        lines.iter().all(|l| l.starts_with("created")),
        "a fresh root: everything created\n{out}"
    );
    for path in ["/opt/vault/data", "/usr/local/bin/vault", "user vault"] {
        assert!(
            lines.iter().any(|l| l.contains(&format!(" {path}  "))),
            "{path} reported\n{out}"
        );
    }

    let before = listing(&s.root);
    let second = install(&args);
    let out2 = text(&second.stdout);
    assert!(second.status.success(), "{out2}\n{}", text(&second.stderr));
    let lines2 = path_lines(&out2);
    assert_eq!(lines2.len(), lines.len(), "one line per path again\n{out2}");
    assert!(
        lines2.iter().all(|l| l.starts_with("unchanged")),
        "second run must change nothing\n{out2}"
    );
    assert!(out2.contains("nothing changed"), "{out2}");
    assert_eq!(
        listing(&s.root),
        before,
        "path, kind, mode, uid, gid, size, mtime"
    );

    // A loosened mode is put back and reported as updated, nothing else changes.
    fs::set_permissions(
        s.root.join("opt/vault/data"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let third = install(&args);
    let out3 = text(&third.stdout);
    assert!(third.status.success(), "{out3}");
    let changed: Vec<&str> = path_lines(&out3)
        .into_iter()
        .filter(|l| !l.starts_with("unchanged"))
        .collect();
    assert_eq!(changed.len(), 1, "{out3}");
    assert!(
        changed[0].starts_with("updated   /opt/vault/data"),
        "{out3}"
    );
    assert_layout(&s.root, "vault");
}

#[test]
fn a_wrong_checksum_installs_nothing_and_exits_65() {
    let s = staging();
    let server = fake_server(&s.work, "vault");
    let actual = sha256_of(&server);
    let expected = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let r = install(&[
        "--root",
        s.root.to_str().unwrap(),
        "--vault-binary",
        server.to_str().unwrap(),
        "--sha256",
        expected,
    ]);
    assert_eq!(r.status.code(), Some(65), "{}", text(&r.stderr));
    let err = text(&r.stderr);
    for part in [server.to_str().unwrap(), expected, actual.as_str()] {
        assert!(err.contains(part), "stderr names {part}:\n{err}");
    }
    assert!(err.contains("nothing was installed"), "{err}");
    assert_eq!(
        fs::read_dir(&s.root).unwrap().count(),
        0,
        "the staging root stays empty"
    );

    // The digest may also come from VAULT_SHA256 (Packer's environment_vars).
    let r = Command::new(AGENT)
        .args([
            "install",
            "--root",
            s.root.to_str().unwrap(),
            "--vault-archive",
        ])
        .arg(&server)
        .env("VAULT_SHA256", expected)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(65), "{}", text(&r.stderr));
    assert_eq!(fs::read_dir(&s.root).unwrap().count(), 0);
}

#[test]
fn bad_arguments_and_missing_files_are_refused_before_any_write() {
    let s = staging();
    let root = s.root.to_str().unwrap();
    // Not a digest: a usage error from the argument parser.
    let r = install(&["--root", root, "--vault-binary", "/x", "--sha256", "abc"]);
    assert_eq!(r.status.code(), Some(2), "{}", text(&r.stderr));
    assert!(text(&r.stderr).contains("64 hex digits"));
    // No --sha256 at all.
    let r = install(&["--root", root, "--vault-binary", "/x"]);
    assert_eq!(r.status.code(), Some(2));
    // A release file that does not exist: 66, named.
    let missing = s.work.join("vault_1.2.3_linux_amd64.zip");
    let r = install(&[
        "--root",
        root,
        "--vault-archive",
        missing.to_str().unwrap(),
        "--sha256",
        &"a".repeat(64),
    ]);
    assert_eq!(r.status.code(), Some(66), "{}", text(&r.stderr));
    assert!(text(&r.stderr).contains(missing.to_str().unwrap()));
    assert_eq!(fs::read_dir(&s.root).unwrap().count(), 0);
}

fn release_zip(path: &Path, entries: &[(&str, &[u8])]) {
    let mut w = zip::ZipWriter::new(fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(0o755);
    for (name, data) in entries {
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn installs_from_a_release_zip_and_openbao_gets_its_drop_in() {
    if !is_root() {
        eprintln!("SKIPPED: install sets owners, which needs root (CI runs as root)");
        return;
    }
    let s = staging();
    let root = s.root.to_str().unwrap();
    // HashiCorp's layout: the binary beside the licence.
    let zip = s.work.join("vault_1.19.0_linux_amd64.zip");
    release_zip(
        &zip,
        &[("LICENSE.txt", b"MPL-2.0\n"), ("vault", FAKE_SERVER)],
    );
    let r = install(&[
        "--root",
        root,
        "--vault-archive",
        zip.to_str().unwrap(),
        "--sha256",
        &sha256_of(&zip),
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert_layout(&s.root, "vault");
    assert_eq!(
        fs::read(s.root.join("usr/local/bin/vault")).unwrap(),
        FAKE_SERVER
    );

    // OpenBao in a fresh root: installed as bao, vault.service runs it through a drop-in.
    let s = staging();
    let root = s.root.to_str().unwrap();
    let zip = s.work.join("bao.zip");
    release_zip(&zip, &[("bao", FAKE_SERVER)]);
    let r = install(&[
        "--root",
        root,
        "--vault-archive",
        zip.to_str().unwrap(),
        "--sha256",
        &sha256_of(&zip),
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert_layout(&s.root, "bao");
    let dropin = fs::read_to_string(
        s.root
            .join("etc/systemd/system/vault.service.d/openbao.conf"),
    )
    .unwrap();
    assert!(
        dropin.contains("\nExecStart=/usr/local/bin/bao server -config=/etc/vault.d/vault.hcl\n")
    );

    // A zip without a server binary is refused before any write.
    let s = staging();
    let zip = s.work.join("empty.zip");
    release_zip(&zip, &[("README", b"nothing here")]);
    let r = install(&[
        "--root",
        s.root.to_str().unwrap(),
        "--vault-archive",
        zip.to_str().unwrap(),
        "--sha256",
        &sha256_of(&zip),
    ]);
    assert_eq!(r.status.code(), Some(65), "{}", text(&r.stderr));
    assert!(text(&r.stderr).contains("no file named `vault` or `bao`"));
    assert_eq!(fs::read_dir(&s.root).unwrap().count(), 0);
}

#[test]
fn an_existing_account_in_the_root_is_kept() {
    if !is_root() {
        eprintln!("SKIPPED: install sets owners, which needs root (CI runs as root)");
        return;
    }
    let s = staging();
    fs::create_dir(s.root.join("etc")).unwrap();
    let passwd = "root:x:0:0:root:/root:/bin/bash\nvault:x:990:991:Vault server:/nonexistent:/usr/sbin/nologin";
    fs::write(s.root.join("etc/passwd"), passwd).unwrap();
    fs::write(s.root.join("etc/group"), "root:x:0:\nvault:x:991:\n").unwrap();
    let server = fake_server(&s.work, "vault");
    let r = install(&[
        "--root",
        s.root.to_str().unwrap(),
        "--vault-binary",
        server.to_str().unwrap(),
        "--sha256",
        &sha256_of(&server),
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert_eq!(
        fs::read_to_string(s.root.join("etc/passwd")).unwrap(),
        passwd
    );
    let data = fs::metadata(s.root.join("opt/vault/data")).unwrap();
    assert_eq!((data.uid(), data.gid()), (990, 991));
    assert!(text(&r.stdout).contains("unchanged user vault  (uid 990 gid 991)"));
}

fn example(name: &str) -> String {
    fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("packer/examples")
            .join(name),
    )
    .unwrap()
}

#[test]
fn the_user_data_example_writes_a_config_the_agent_accepts() {
    let script = example("user-data.sh");
    let start = script.find("<<'CONFIG'\n").expect("a CONFIG heredoc") + "<<'CONFIG'\n".len();
    let len = script[start..].find("\nCONFIG\n").expect("its end");
    let toml = &script[start..start + len];
    let cfg =
        vault_bootstrap::config::Config::parse(toml, Path::new("/etc/vault-bootstrap/config.toml"))
            .unwrap_or_else(|e| panic!("packer/examples/user-data.sh: {e}"));
    // It must fit the image `install` lays out.
    assert_eq!(cfg.vault.binary, Path::new("/usr/local/bin/vault"));
    assert_eq!(cfg.vault.unit, "vault.service");
    assert_eq!(cfg.vault.config_file, Path::new("/etc/vault.d/vault.hcl"));
    assert_eq!(cfg.vault.data_dir, Path::new("/opt/vault/data"));
    assert_eq!(cfg.vault.tls_dir, Path::new("/opt/vault/tls"));
    assert_eq!(cfg.agent.state_dir, Path::new("/var/lib/vault-bootstrap"));
    assert!(cfg.init.audit_file_path.starts_with("/var/log/vault"));
    // And start the enabled units itself on the first boot, without waiting for them.
    assert!(script.contains(
        "\nsystemctl start --no-block vault-bootstrap.service vault-bootstrap-watch.service\n"
    ));
}

/// The rolling-upgrade examples: launch before terminate, one extra instance at a time, and
/// hooks whose defaults never let an unready node count (docs/operations.md "Rolling upgrades").
#[test]
fn the_rolling_upgrade_examples_launch_before_terminate() {
    let r: serde_json::Value = serde_json::from_str(&example("instance-refresh.json")).unwrap();
    let p = &r["Preferences"];
    let (min, max) = (
        p["MinHealthyPercentage"].as_u64().unwrap(),
        p["MaxHealthyPercentage"].as_u64().unwrap(),
    );
    assert_eq!(min, 100, "never fewer healthy instances than desired");
    // Three nodes: 4 of 3 is 133 %; more would launch two at once.
    assert!((134..150).contains(&max), "{max}");
    let hooks: serde_json::Value = serde_json::from_str(&example("lifecycle-hooks.json")).unwrap();
    let by = |t: &str| {
        hooks
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["LifecycleTransition"] == t)
            .cloned()
            .unwrap()
    };
    let launch = by("autoscaling:EC2_INSTANCE_LAUNCHING");
    let term = by("autoscaling:EC2_INSTANCE_TERMINATING");
    // An agent that never answers must not put an unready node InService.
    assert_eq!(launch["DefaultResult"], "ABANDON");
    // The agent heartbeats every lifecycle.heartbeat_secs (60 s by default).
    for h in [&launch, &term] {
        assert!(h["HeartbeatTimeout"].as_u64().unwrap() >= 180, "{h}");
    }
    // The names the user-data's config gives the agent.
    let ud = example("user-data.sh");
    assert!(ud.contains(&format!("launch_hook = {}", launch["LifecycleHookName"])));
    assert!(ud.contains(&format!("terminate_hook = {}", term["LifecycleHookName"])));
}

#[test]
fn the_json_examples_parse_and_require_imdsv2() {
    let lt: serde_json::Value = serde_json::from_str(&example("launch-template.json")).unwrap();
    let md = &lt["MetadataOptions"];
    assert_eq!(md["HttpTokens"], "required");
    assert_eq!(md["HttpPutResponseHopLimit"], 1);
    assert_eq!(md["InstanceMetadataTags"], "enabled");
    assert_eq!(md["HttpEndpoint"], "enabled");
    let policy: serde_json::Value = serde_json::from_str(&example("iam-policy.json")).unwrap();
    let actions: Vec<String> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| match &s["Action"] {
            serde_json::Value::String(a) => vec![a.clone()],
            serde_json::Value::Array(a) => {
                a.iter().map(|v| v.as_str().unwrap().to_owned()).collect()
            }
            other => panic!("Action {other}"),
        })
        .collect();
    for a in [
        "ec2:DescribeInstances",
        "ec2:DescribeTags",
        "s3:GetObject",
        "s3:PutObject",
        "s3:ListBucket",
        "kms:Encrypt",
        "kms:Decrypt",
        "kms:GenerateDataKey",
        "kms:DescribeKey",
    ] {
        assert!(actions.iter().any(|x| x == a), "{a} granted");
    }
    // Least privilege: nothing wildcarded, no write beyond the escrow and snapshot
    // prefixes, deletes only of snapshots (the escrow is write-once).
    assert!(actions.iter().all(|a| !a.contains('*')), "{actions:?}");
    for s in policy["Statement"].as_array().unwrap() {
        let acts = s["Action"].to_string();
        let res = s["Resource"].as_str().unwrap_or_default();
        if acts.contains("s3:PutObject") {
            assert!(
                res.contains("/vault-bootstrap/") || res.contains("/vault-bootstrap-snapshots/"),
                "{res}"
            );
        }
        if acts.contains("s3:DeleteObject") {
            assert!(res.contains("/vault-bootstrap-snapshots/"), "{res}");
        }
    }
}
