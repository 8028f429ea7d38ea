//! `refresh-tls`: a rotated certificate is served after a reload, by the same server
//! process (no restart); a bad new certificate is refused and the old one keeps serving.

mod common;
use common::*;
use std::time::Duration;

/// The serial of the certificate the server presents on a TLS handshake.
async fn served_serial(tb: &Testbed) -> String {
    let ca = std::fs::read(tb.seed_dir().join("ca.pem")).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&ca).unwrap())
        .tls_info(true)
        // A new connection each time: a pooled one would show the old handshake.
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .unwrap();
    let r = http
        .get(format!("https://{}:8200/v1/sys/health", tb.instances[0].ip))
        .send()
        .await
        .expect("TLS handshake");
    let info = r
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .expect("tls info");
    let der = info.peer_certificate().expect("peer certificate").to_vec();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.raw_serial_as_string().replace(':', "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_is_served_without_a_restart_and_bad_ones_are_refused() {
    let tb = Testbed::start(37, 1);
    tb.write_config(0, &NodeOpts::default());
    let mut a = tb.spawn_agent(0, &["boot"]);
    a.wait_log("node ready", Duration::from_secs(120));
    let server_pid = children_of(a.pid()).first().copied().expect("server child");
    let before = served_serial(&tb).await;

    // A bad new certificate: refused, nothing swapped, the old one keeps serving.
    let key_before = std::fs::read(tb.node_dir(0).join("tls/server.key")).unwrap();
    for (variant, needle) in [("expired", "expired"), ("mismatch", "does not match")] {
        tb.tls_variant(variant);
        let (code, _, log) = tb.run_agent(0, &["refresh-tls"], Duration::from_secs(60));
        assert_eq!(code, 65, "{variant}: {log}");
        assert!(log.contains(needle), "{variant}: {log}");
        assert_eq!(
            served_serial(&tb).await,
            before,
            "{variant}: the old certificate must keep serving"
        );
        assert_eq!(
            std::fs::read(tb.node_dir(0).join("tls/server.key")).unwrap(),
            key_before
        );
    }

    // A good new certificate (same CA): swapped and reloaded, same process.
    tb.tls_variant("good");
    let (code, _, log) = tb.run_agent(0, &["refresh-tls"], Duration::from_secs(60));
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("server reloaded (no restart)"), "{log}");
    let after = poll(
        "the new certificate served",
        Duration::from_secs(20),
        || {
            let tb = &tb;
            let before = before.clone();
            async move {
                let s = served_serial(tb).await;
                (s != before).then_some(s)
            }
        },
    )
    .await;
    assert!(
        log.contains(&after),
        "the served serial is the one refresh-tls installed: {after}\n{log}"
    );
    assert_eq!(
        children_of(a.pid()).first().copied(),
        Some(server_pid),
        "same server process"
    );

    // Unchanged material: nothing to do.
    let (code, _, log) = tb.run_agent(0, &["refresh-tls"], Duration::from_secs(60));
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("unchanged"), "{log}");
    a.stop();
}
