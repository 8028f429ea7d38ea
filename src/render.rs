//! `vault.hcl` as a pure function of (config, instance facts, peers).
//!
//! No I/O here: `boot` writes the result (atomically, only on change) and `render` prints it.
//! Golden files in `tests/fixtures/render/` pin the exact output.

use crate::config::{BindAddress, Config, Flavor};
use crate::discovery::Peer;
use crate::imds::InstanceFacts;
use crate::tls;
use std::fmt::Write;
use std::net::IpAddr;

/// Everything the file depends on.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub config: &'a Config,
    /// Resolved: `Vault` or `Openbao` (never `Auto`).
    pub flavor: Flavor,
    pub facts: &'a InstanceFacts,
    pub peers: &'a [Peer],
}

/// An HCL string literal: quotes, backslashes and control characters escaped, so a path or
/// tag value can never inject configuration, and the server reads back exactly `s`.
///
/// Vault and OpenBao parse `vault.hcl` with HCL1 (hashicorp/hcl v1), whose rules differ from
/// HCL2/Terraform's: `$${` is no escape (it stays `$${`), `%{` means nothing (so `%%{` would
/// stay doubled), and `${ ... }` is copied verbatim up to its matching `}`: escapes inside it
/// are not decoded, and an unbalanced `${` runs the string to the end of the file ("literal
/// not terminated"). So a `$` before `{` is written as the escape `\u0024`: the scanner then
/// never sees `${`, and the unquoting turns it back into `$`. Checked against the real
/// server in tests/render_server.rs.
pub fn hcl_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '$' if chars.peek() == Some(&'{') => out.push_str("\\u0024"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn host_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// The IP the listeners bind to.
pub fn bind_ip(config: &Config, facts: &InstanceFacts) -> IpAddr {
    match config.vault.bind() {
        BindAddress::Ip(ip) => ip,
        BindAddress::PrivateIp => facts.local_ipv4,
    }
}

/// The API URL of a node at `ip`.
pub fn api_url(ip: IpAddr, port: u16) -> String {
    format!("https://{}", host_port(ip, port))
}

/// Renders `vault.hcl`.
pub fn render(input: &Input<'_>) -> String {
    let c = input.config;
    let v = &c.vault;
    let f = input.facts;
    let (cert, key, ca) = tls::paths(&v.tls_dir);
    let path = |p: &std::path::Path| hcl_string(&p.to_string_lossy());
    let bind = bind_ip(c, f);

    let mut o = String::new();
    let _ = writeln!(
        o,
        "# Written by vault-bootstrap for {} ({}); do not edit:",
        f.instance_id, f.availability_zone
    );
    let _ = writeln!(
        o,
        "# the next boot rewrites it. Change /etc/vault-bootstrap/config.toml instead."
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "ui            = {}", v.ui);
    // mlock is unnecessary with raft storage (its pages are mmapped) and HashiCorp
    // recommends disabling it there; the systemd unit still grants CAP_IPC_LOCK.
    let _ = writeln!(o, "disable_mlock = true");
    let _ = writeln!(
        o,
        "api_addr      = {}",
        hcl_string(&api_url(f.local_ipv4, v.api_port))
    );
    let _ = writeln!(
        o,
        "cluster_addr  = {}",
        hcl_string(&api_url(f.local_ipv4, v.cluster_port))
    );
    if let Some(dir) = &v.plugin_directory {
        let _ = writeln!(o, "plugin_directory = {}", path(dir));
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "storage \"raft\" {{");
    let _ = writeln!(o, "  path                   = {}", path(&v.data_dir));
    let _ = writeln!(
        o,
        "  node_id                = {}",
        hcl_string(&f.instance_id)
    );
    let _ = writeln!(o, "  performance_multiplier = {}", v.performance_multiplier);
    for p in input.peers.iter().filter(|p| !p.is_self) {
        let _ = writeln!(o);
        let _ = writeln!(o, "  # {}", p.instance_id);
        let _ = writeln!(o, "  retry_join {{");
        let _ = writeln!(
            o,
            "    leader_api_addr       = {}",
            hcl_string(&api_url(p.ip, v.api_port))
        );
        let _ = writeln!(o, "    leader_ca_cert_file   = {}", path(&ca));
        if let Some(name) = &c.tls.server_name {
            let _ = writeln!(o, "    leader_tls_servername = {}", hcl_string(name));
        }
        let _ = writeln!(o, "  }}");
    }
    let _ = writeln!(o, "}}");
    let _ = writeln!(o);
    let _ = writeln!(o, "listener \"tcp\" {{");
    let _ = writeln!(
        o,
        "  address         = {}",
        hcl_string(&host_port(bind, v.api_port))
    );
    let _ = writeln!(
        o,
        "  cluster_address = {}",
        hcl_string(&host_port(bind, v.cluster_port))
    );
    let _ = writeln!(o, "  tls_cert_file   = {}", path(&cert));
    let _ = writeln!(o, "  tls_key_file    = {}", path(&key));
    let _ = writeln!(o, "  tls_min_version = \"tls12\"");
    if input.flavor == Flavor::Openbao {
        // Break-glass: OpenBao 2.6 closes the recovery-key path to a new root token by
        // default; with the root token revoked it is the only way back in (Vault keeps it open).
        let _ = writeln!(o, "  disable_unauthed_generate_root_endpoints = false");
    }
    let _ = writeln!(o, "}}");
    let _ = writeln!(o);
    let _ = writeln!(o, "seal \"awskms\" {{");
    let region = c.seal.region.as_deref().unwrap_or(&f.region);
    let _ = writeln!(o, "  region     = {}", hcl_string(region));
    let _ = writeln!(o, "  kms_key_id = {}", hcl_string(&c.seal.kms_key_id));
    if let Some(ep) = &c.seal.endpoint {
        let _ = writeln!(o, "  endpoint   = {}", hcl_string(ep));
    }
    let _ = writeln!(o, "}}");
    let _ = writeln!(o);
    if input.flavor == Flavor::Openbao {
        // OpenBao refuses to enable audit devices through the API; it takes them from the
        // configuration (created on the active node). Vault gets its device by API after init.
        let _ = writeln!(o, "audit \"file\" \"file\" {{");
        let _ = writeln!(o, "  options {{");
        let _ = writeln!(o, "    file_path = {}", path(&c.init.audit_file_path));
        let _ = writeln!(o, "  }}");
        let _ = writeln!(o, "}}");
        let _ = writeln!(o);
    }
    let _ = writeln!(o, "telemetry {{");
    let _ = writeln!(
        o,
        "  prometheus_retention_time = {}",
        hcl_string(&v.prometheus_retention)
    );
    // Per-host metric names break dashboards when the ASG replaces nodes.
    let _ = writeln!(o, "  disable_hostname          = true");
    let _ = writeln!(o, "}}");
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn facts() -> InstanceFacts {
        InstanceFacts {
            instance_id: "i-0b22a22eec53b9321".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1b".into(),
            local_ipv4: "10.0.2.17".parse().unwrap(),
        }
    }

    fn peers() -> Vec<Peer> {
        [
            ("i-0a11a11eec53b9321", "10.0.1.12", false),
            ("i-0b22a22eec53b9321", "10.0.2.17", true),
            ("i-0c33a33eec53b9321", "10.0.3.9", false),
        ]
        .into_iter()
        .map(|(id, ip, me)| Peer {
            instance_id: id.into(),
            ip: ip.parse().unwrap(),
            is_self: me,
        })
        .collect()
    }

    fn golden(name: &str, actual: &str) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/render")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, actual).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with UPDATE_GOLDEN=1 to create)",
                path.display()
            )
        });
        assert_eq!(actual, expected, "golden file {name} differs");
    }

    fn config(extra: &str) -> Config {
        let text = format!(
            "[tls]\nbucket = \"vault-resources\"\n[seal]\nkms_key_id = \"alias/vault-unseal\"\n{extra}"
        );
        Config::parse(&text, Path::new("test.toml")).unwrap()
    }

    #[test]
    fn golden_defaults_three_nodes() {
        let c = config("");
        golden(
            "defaults-3-nodes.hcl",
            &render(&Input {
                config: &c,
                flavor: Flavor::Vault,
                facts: &facts(),
                peers: &peers(),
            }),
        );
    }

    #[test]
    fn golden_private_ip_server_name_endpoint() {
        let c = config(
            "[vault]\nbind_address = \"private-ip\"\nperformance_multiplier = 2\ndata_dir = \"/data/raft\"\n\
             [cluster]\n[agent]\n",
        );
        let mut c = c;
        c.tls.server_name = Some("vault.internal".into());
        c.seal.endpoint = Some("https://kms.us-east-1.amazonaws.com".into());
        c.seal.region = Some("us-west-2".into());
        golden(
            "private-ip-server-name.hcl",
            &render(&Input {
                config: &c,
                flavor: Flavor::Vault,
                facts: &facts(),
                peers: &peers(),
            }),
        );
    }

    #[test]
    fn golden_template_sequences_reach_hcl1_unchanged() {
        // HCL1 reads `\u0024{` back as `${`; `%{` and a lone `$` are plain text there.
        let mut c = config(
            "[vault]\ndata_dir = \"/data/${cluster}/raft\"\ntls_dir = \"/opt/vault/tls-%{x}\"\n\
             [init]\naudit_file_path = \"/var/log/vault/${unbalanced/audit.log\"\n",
        );
        c.tls.server_name = Some("vault-${env}.internal".into());
        c.seal.endpoint = Some("https://kms.example/$${x}".into());
        let out = render(&Input {
            config: &c,
            flavor: Flavor::Openbao,
            facts: &facts(),
            peers: &peers(),
        });
        assert!(!out.contains("${"), "{out}");
        golden("template-sequences.hcl", &out);
    }

    #[test]
    fn golden_single_node_has_no_retry_join() {
        let c = config("");
        let me: Vec<Peer> = peers().into_iter().filter(|p| p.is_self).collect();
        let out = render(&Input {
            config: &c,
            flavor: Flavor::Vault,
            facts: &facts(),
            peers: &me,
        });
        assert!(!out.contains("retry_join"));
        golden("single-node.hcl", &out);
    }

    #[test]
    fn golden_openbao_declares_its_audit_device() {
        let c = config("");
        golden(
            "openbao-3-nodes.hcl",
            &render(&Input {
                config: &c,
                flavor: Flavor::Openbao,
                facts: &facts(),
                peers: &peers(),
            }),
        );
    }

    #[test]
    fn rendering_is_deterministic() {
        let c = config("");
        let a = render(&Input {
            config: &c,
            flavor: Flavor::Vault,
            facts: &facts(),
            peers: &peers(),
        });
        let b = render(&Input {
            config: &c,
            flavor: Flavor::Vault,
            facts: &facts(),
            peers: &peers(),
        });
        assert_eq!(a, b);
    }

    #[test]
    fn strings_cannot_inject() {
        assert_eq!(hcl_string(r#"a"b\c"#), r#""a\"b\\c""#);
        // HCL1: `$` before `{` as an escape (`$${` would reach the server doubled); `%{`
        // is plain text there.
        assert_eq!(hcl_string("${x} %{y}"), r#""\u0024{x} %{y}""#);
        assert_eq!(hcl_string("a${b"), r#""a\u0024{b""#);
        assert_eq!(hcl_string("$${x}"), r#""$\u0024{x}""#);
        assert_eq!(hcl_string("a\nb"), "\"a\\nb\"");
        assert_eq!(hcl_string("$5 100%"), "\"$5 100%\"");
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        assert_eq!(
            api_url("fd00::5".parse().unwrap(), 8200),
            "https://[fd00::5]:8200"
        );
    }
}
