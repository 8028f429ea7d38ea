//! `vault.hcl` values holding HCL template sequences reach the real server unchanged.
//!
//! Vault and OpenBao read `vault.hcl` with HCL1, where `$${` is no escape and `${ ... }` is
//! copied raw up to its matching `}` (an unbalanced one breaks the file). A node boots with
//! `${` (balanced and not), `$${` and `%{` in every path the server uses: its TLS files, its
//! raft directory, its plugin directory and its audit log. The server must start (it found
//! its certificate), create its raft data and audit log at exactly those paths, and report
//! the plugin directory and audit path back through its API as written in config.toml.
//!
//! Address block 127.0.80.0/24.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

const BLOCK: u8 = 80;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_sequences_in_paths_reach_the_server_unchanged() {
    let tb = Testbed::start(BLOCK, 1);
    let node = tb.node_dir(0);
    let tls = node.join("tls-${t}");
    // Unbalanced: raw in HCL1 it would run the string to the end of the file.
    let data = node.join("data-${d");
    let plugins = node.join("plugins-${p}-%{q}");
    // `$${c}` is the operator's literal text: it must arrive as `$${c}`, not as `${c}`.
    let audit = tb.path().join("audit-${a}-$${c}/audit.log");
    std::fs::create_dir_all(&plugins).unwrap();
    let toml = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    let extra = format!(
        "[vault]\ntls_dir = {}\ndata_dir = {}\nplugin_directory = {}\n\
         [init]\naudit_file_path = {}\nrevoke_root_token = false\n",
        toml(&tls),
        toml(&data),
        toml(&plugins),
        toml(&audit),
    );
    let mut agents = boot_all(&tb, 1, &extra);
    let hcl = std::fs::read_to_string(node.join("etc/vault.hcl")).unwrap();
    assert!(!hcl.contains("${"), "every `${{` escaped:\n{hcl}");

    // The server found its certificate and key in `tls-${t}` (it answers over TLS), and
    // wrote its raft data into `data-${d`.
    assert!(tls.join("server.pem").is_file(), "{:?}", tree(&node));
    assert!(
        data.join("raft/raft.db").is_file() || data.join("vault.db").is_file(),
        "raft data in {}: {:?}",
        data.display(),
        tree(&node)
    );

    // Read back through the API: the paths as the server holds them.
    let root = tb.escrowed("test-vault", "root-token").await;
    let api = tb.api(0);
    let (code, state) = api
        .get("sys/config/state/sanitized", Some(root.trim()))
        .await
        .expect("sys/config/state/sanitized");
    assert_eq!(code, 200, "{state}");
    assert_eq!(
        state["data"]["plugin_directory"].as_str(),
        Some(plugins.to_str().unwrap()),
        "{state}"
    );
    let (code, devices) = api
        .get("sys/audit", Some(root.trim()))
        .await
        .expect("sys/audit");
    assert_eq!(code, 200, "{devices}");
    assert_eq!(
        devices["data"]["file/"]["options"]["file_path"].as_str(),
        Some(audit.to_str().unwrap()),
        "{devices}"
    );
    // The device writes where it says it does.
    poll("the audit log", Duration::from_secs(10), || async {
        audit.is_file().then_some(())
    })
    .await;

    for a in agents.iter_mut() {
        a.stop();
    }
}
