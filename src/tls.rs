//! TLS material: fetched from the resources bucket, checked, then written into `tls_dir`.
//!
//! Nothing is written unless the whole set passes every check: PEMs parse, the key matches
//! the certificate, the certificate is inside its validity window, chains to the CA, and
//! covers the name clients use (`tls.server_name` when set, else the node's IP). A node that
//! served a bad certificate would join nothing and answer nobody, so refusing early, with the
//! object named, is the kind thing to do.

use crate::aws::s3::ObjectStore;
use crate::config::TlsConfig;
use crate::error::{Error, Result};
use crate::fsutil::{self, FileSpec, Outcome, Owner};
use crate::retry;
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use zeroize::Zeroizing;

pub const CERT_FILE: &str = "server.pem";
pub const KEY_FILE: &str = "server.key";
pub const CA_FILE: &str = "ca.pem";

/// The three PEM objects as fetched. The key is zeroized on drop.
pub struct Material {
    pub cert_pem: Vec<u8>,
    pub key_pem: Zeroizing<Vec<u8>>,
    pub ca_pem: Vec<u8>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("cert_pem", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .field("ca_pem", &self.ca_pem.len())
            .finish()
    }
}

/// Where each object came from, for error messages.
#[derive(Debug, Clone)]
pub struct Sources {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

impl Sources {
    pub fn from_config(c: &TlsConfig) -> Self {
        Sources {
            cert: format!("s3://{}/{}", c.bucket, c.cert_key),
            key: format!("s3://{}/{}", c.bucket, c.key_key),
            ca: format!("s3://{}/{}", c.bucket, c.ca_key),
        }
    }
}

/// What the certificate must cover.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub ip: IpAddr,
    pub server_name: Option<&'a str>,
}

/// Facts about a certificate that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub not_after_unix: i64,
    pub serial_hex: String,
}

/// Whole days until the certificate expires (negative once expired).
pub fn days_left(c: &Checked, now: SystemTime) -> i64 {
    (c.not_after_unix - unix(now)).div_euclid(86_400)
}

/// Fetches the three objects together, retrying transient S3 failures until `deadline`
/// (one bound for the step, not one per object).
pub async fn fetch<S: ObjectStore>(s3: &S, c: &TlsConfig, deadline: Duration) -> Result<Material> {
    let get = |key: &'_ str| {
        let key = key.to_owned();
        async move {
            retry::retry("fetch TLS material from S3", deadline, || {
                s3.get(&c.bucket, &key)
            })
            .await
        }
    };
    let (cert_pem, key_pem, ca_pem) =
        tokio::try_join!(get(&c.cert_key), get(&c.key_key), get(&c.ca_key))?;
    Ok(Material {
        cert_pem,
        key_pem: Zeroizing::new(key_pem),
        ca_pem,
    })
}

fn refuse(object: &str, problem: impl Into<String>) -> Error {
    Error::Tls {
        object: object.to_owned(),
        problem: problem.into(),
    }
}

fn certs(pem: &[u8], object: &str) -> Result<Vec<CertificateDer<'static>>> {
    pem_certs(pem).map_err(|problem| refuse(object, problem))
}

/// Every CERTIFICATE block of a PEM bundle, as DER; the problem when it is malformed or
/// holds none. Shared with the operator CA's checks (`access`), which report it their way.
pub fn pem_certs(pem: &[u8]) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("malformed PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM CERTIFICATE block found".into());
    }
    Ok(certs)
}

fn unix(now: SystemTime) -> i64 {
    now.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn date(ts: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(ts)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ts.to_string())
}

/// Checks the material; pure apart from reading `now`.
pub fn check(m: &Material, src: &Sources, expect: &Expect<'_>, now: SystemTime) -> Result<Checked> {
    let chain = certs(&m.cert_pem, &src.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&m.key_pem)
        .map_err(|e| refuse(&src.key, format!("malformed PEM private key: {e}")))?;
    let ca = certs(&m.ca_pem, &src.ca)?;

    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| refuse(&src.cert, format!("certificate does not parse: {e}")))?;
    let t = unix(now);
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    if t < nb {
        return Err(refuse(
            &src.cert,
            format!(
                "certificate is not valid yet (notBefore {}); check the clock or reissue",
                date(nb)
            ),
        ));
    }
    if t > na {
        return Err(refuse(
            &src.cert,
            format!(
                "certificate expired on {}; upload a renewed certificate",
                date(na)
            ),
        ));
    }

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| refuse(&src.key, format!("unsupported or invalid private key: {e}")))?;
    CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|_| {
            refuse(
                &src.key,
                format!("private key does not match the certificate in {}", src.cert),
            )
        })?;

    let mut roots = RootCertStore::empty();
    for c in &ca {
        roots
            .add(c.clone())
            .map_err(|e| refuse(&src.ca, format!("CA certificate is unusable: {e}")))?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| refuse(&src.ca, format!("CA certificate is unusable: {e}")))?;
    // Name coverage is checked separately below with a clearer message; give the chain
    // check a name the certificate is known to carry so it reports only chain problems.
    let san = sans(&leaf);
    let probe: ServerName<'static> = match (san.ips.first(), san.dns.first()) {
        (Some(ip), _) => ServerName::IpAddress((*ip).into()),
        (None, Some(d)) => ServerName::try_from(d.trim_start_matches("*.").to_owned())
            .map_err(|_| refuse(&src.cert, format!("SAN {d:?} is not a valid DNS name")))?,
        (None, None) => {
            return Err(refuse(
                &src.cert,
                "certificate has no subjectAltName: clients verify names only there",
            ))
        }
    };
    let now_pki = UnixTime::since_unix_epoch(Duration::from_secs(t.max(0) as u64));
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &probe, &[], now_pki)
        .map_err(|e| {
            refuse(
                &src.cert,
                format!("certificate does not chain to the CA in {} ({e})", src.ca),
            )
        })?;

    if let Some(name) = expect.server_name {
        if !san.dns.iter().any(|d| dns_matches(d, name)) {
            return Err(refuse(
                &src.cert,
                format!(
                    "certificate does not cover tls.server_name {name:?} (DNS SANs: {:?})",
                    san.dns
                ),
            ));
        }
    } else if !san.ips.contains(&expect.ip) {
        return Err(refuse(
            &src.cert,
            format!(
                "certificate does not cover this node's IP {} (IP SANs: {:?}); add it, or set tls.server_name to a DNS SAN it has",
                expect.ip, san.ips
            ),
        ));
    }

    Ok(Checked {
        not_after_unix: na,
        serial_hex: leaf.raw_serial_as_string().replace(':', ""),
    })
}

struct Sans {
    dns: Vec<String>,
    ips: Vec<IpAddr>,
}

fn sans(cert: &x509_parser::certificate::X509Certificate<'_>) -> Sans {
    use x509_parser::extensions::GeneralName;
    let mut out = Sans {
        dns: vec![],
        ips: vec![],
    };
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::DNSName(d) => out.dns.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => out
                        .ips
                        .push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())),
                    16 => out
                        .ips
                        .push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    out
}

/// RFC 6125 matching: exact, or a wildcard for the whole left-most label.
fn dns_matches(pattern: &str, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(rest) => name
            .split_once('.')
            .is_some_and(|(first, tail)| !first.is_empty() && tail == rest),
        None => pattern == name,
    }
}

/// The paths the material is written to.
pub fn paths(tls_dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        tls_dir.join(CERT_FILE),
        tls_dir.join(KEY_FILE),
        tls_dir.join(CA_FILE),
    )
}

/// The CAs a client of this cluster's nodes must trust: the CA fetched from S3 and, when it
/// differs, the one `tls_dir` holds (PEM, concatenated). During a CA rotation the nodes that
/// already refreshed serve certificates of the new CA and the others still of the old one;
/// trusting only one of them would count half the cluster as down. An unreadable or
/// unparseable file on disk adds nothing (a first boot has none).
pub fn trust_anchors(tls_dir: &Path, fetched_ca: &[u8]) -> Vec<u8> {
    let on_disk = std::fs::read(paths(tls_dir).2).unwrap_or_default();
    let ders = |pem: &[u8]| -> Vec<Vec<u8>> {
        CertificateDer::pem_slice_iter(pem)
            .map(|c| c.map(|c| c.as_ref().to_vec()))
            .collect::<std::result::Result<_, _>>()
            .unwrap_or_default()
    };
    let fetched = ders(fetched_ca);
    let old = ders(&on_disk);
    if old.is_empty() || old.iter().all(|c| fetched.contains(c)) {
        return fetched_ca.to_vec();
    }
    let mut both = fetched_ca.to_vec();
    if !both.ends_with(b"\n") {
        both.push(b'\n');
    }
    both.extend_from_slice(&on_disk);
    both
}

/// How fetched material differs from what `tls_dir` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    /// The CA differs: peers verify each other with it, so the server needs a restart.
    pub ca: bool,
    /// Any of the three files differs.
    pub any: bool,
}

pub fn changes(m: &Material, tls_dir: &Path) -> Changes {
    let (cert, key, ca) = paths(tls_dir);
    let ca = !fsutil::holds(&ca, &m.ca_pem);
    Changes {
        ca,
        any: ca || !fsutil::holds(&cert, &m.cert_pem) || !fsutil::holds(&key, &m.key_pem),
    }
}

/// Writes checked material into `tls_dir`: key 0600, certificates 0644, all owned by the
/// Vault user. Returns whether anything changed.
pub fn write(m: &Material, tls_dir: &Path, owner: Owner) -> Result<bool> {
    // The directory holds the key: only the Vault user (and root) may list it.
    fsutil::ensure_dir(tls_dir, 0o750, owner)?;
    let (cert, key, ca) = paths(tls_dir);
    let outcomes = fsutil::write_files(&[
        FileSpec {
            path: &ca,
            contents: &m.ca_pem,
            mode: 0o644,
            owner,
        },
        FileSpec {
            path: &cert,
            contents: &m.cert_pem,
            mode: 0o644,
            owner,
        },
        FileSpec {
            path: &key,
            contents: &m.key_pem,
            mode: 0o600,
            owner,
        },
    ])?;
    Ok(outcomes.contains(&Outcome::Written))
}

#[cfg(test)]
pub(crate) mod testcerts {
    //! Certificates made on the fly with rcgen for the checks' tests.
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    use std::net::IpAddr;
    use time::{Duration, OffsetDateTime};

    pub struct Ca {
        pub params: CertificateParams,
        pub key: KeyPair,
        pub pem: String,
    }

    pub fn ca() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    /// (cert PEM, key PEM) signed by `ca`, valid `from_days`..`to_days` around now.
    pub fn leaf(
        ca: &Ca,
        ips: &[&str],
        dns: &[&str],
        from_days: i64,
        to_days: i64,
    ) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for ip in ips {
            params
                .subject_alt_names
                .push(SanType::IpAddress(ip.parse::<IpAddr>().unwrap()));
        }
        for d in dns {
            params
                .subject_alt_names
                .push(SanType::DnsName((*d).try_into().unwrap()));
        }
        let now = OffsetDateTime::now_utc();
        params.not_before = now + Duration::days(from_days);
        params.not_after = now + Duration::days(to_days);
        let key = KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

#[cfg(test)]
mod tests {
    use super::testcerts::*;
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn src() -> Sources {
        Sources {
            cert: "s3://b/tls/server.pem".into(),
            key: "s3://b/tls/server.key".into(),
            ca: "s3://b/tls/ca.pem".into(),
        }
    }

    fn material(cert: &str, key: &str, ca: &str) -> Material {
        Material {
            cert_pem: cert.as_bytes().to_vec(),
            key_pem: Zeroizing::new(key.as_bytes().to_vec()),
            ca_pem: ca.as_bytes().to_vec(),
        }
    }

    fn expect_ip() -> Expect<'static> {
        Expect {
            ip: "10.0.1.5".parse().unwrap(),
            server_name: None,
        }
    }

    fn refusal(m: &Material, e: &Expect<'_>) -> String {
        let err = check(m, &src(), e, SystemTime::now()).unwrap_err();
        assert_eq!(err.exit_code(), 65, "{err}");
        err.to_string()
    }

    #[test]
    fn a_good_set_passes() {
        let ca = ca();
        let (cert, key) = leaf(&ca, &["10.0.1.5"], &["vault.internal"], -1, 30);
        let m = material(&cert, &key, &ca.pem);
        let c = check(&m, &src(), &expect_ip(), SystemTime::now()).unwrap();
        assert!(!c.serial_hex.is_empty());
        let by_name = Expect {
            server_name: Some("vault.internal"),
            ..expect_ip()
        };
        check(&m, &src(), &by_name, SystemTime::now()).unwrap();
    }

    #[test]
    fn malformed_pems_are_refused_naming_the_object() {
        let ca = ca();
        let (cert, key) = leaf(&ca, &["10.0.1.5"], &[], -1, 30);
        let bad = "-----BEGIN CERTIFICATE-----\nnot base64!!\n-----END CERTIFICATE-----\n";
        let msg = refusal(&material(bad, &key, &ca.pem), &expect_ip());
        assert!(msg.contains("server.pem") && msg.contains("PEM"), "{msg}");
        let msg = refusal(&material(&cert, "garbage", &ca.pem), &expect_ip());
        assert!(msg.contains("server.key"), "{msg}");
        let msg = refusal(&material(&cert, &key, "nothing here"), &expect_ip());
        assert!(msg.contains("ca.pem"), "{msg}");
    }

    #[test]
    fn key_mismatch_is_refused() {
        let ca = ca();
        let (cert, _) = leaf(&ca, &["10.0.1.5"], &[], -1, 30);
        let (_, other_key) = leaf(&ca, &["10.0.1.5"], &[], -1, 30);
        let msg = refusal(&material(&cert, &other_key, &ca.pem), &expect_ip());
        assert!(msg.contains("does not match"), "{msg}");
    }

    #[test]
    fn expired_and_not_yet_valid_are_refused() {
        let ca = ca();
        let (cert, key) = leaf(&ca, &["10.0.1.5"], &[], -30, -1);
        assert!(refusal(&material(&cert, &key, &ca.pem), &expect_ip()).contains("expired"));
        let (cert, key) = leaf(&ca, &["10.0.1.5"], &[], 1, 30);
        assert!(refusal(&material(&cert, &key, &ca.pem), &expect_ip()).contains("not valid yet"));
    }

    #[test]
    fn other_ca_is_refused() {
        let ca1 = ca();
        let ca2 = ca();
        let (cert, key) = leaf(&ca2, &["10.0.1.5"], &[], -1, 30);
        let msg = refusal(&material(&cert, &key, &ca1.pem), &expect_ip());
        assert!(msg.contains("does not chain"), "{msg}");
    }

    #[test]
    fn san_mismatch_is_refused() {
        let ca = ca();
        let (cert, key) = leaf(&ca, &["10.9.9.9"], &["other.example"], -1, 30);
        let m = material(&cert, &key, &ca.pem);
        assert!(refusal(&m, &expect_ip()).contains("10.0.1.5"));
        let by_name = Expect {
            server_name: Some("vault.internal"),
            ..expect_ip()
        };
        assert!(refusal(&m, &by_name).contains("vault.internal"));
    }

    #[test]
    fn wildcards_match_one_label() {
        assert!(dns_matches("*.example.com", "vault.example.com"));
        assert!(!dns_matches("*.example.com", "a.b.example.com"));
        assert!(!dns_matches("*.example.com", "example.com"));
        assert!(dns_matches("vault.internal", "VAULT.internal"));
    }

    #[test]
    fn trust_anchors_hold_both_cas_during_a_rotation() {
        let d = tempfile::tempdir().unwrap();
        let (old, new) = (ca(), ca());
        // Nothing on disk yet (first boot): the fetched CA alone.
        assert_eq!(
            trust_anchors(d.path(), new.pem.as_bytes()),
            new.pem.as_bytes()
        );
        std::fs::write(d.path().join(CA_FILE), &old.pem).unwrap();
        let both = trust_anchors(d.path(), new.pem.as_bytes());
        assert_eq!(CertificateDer::pem_slice_iter(&both).count(), 2);
        // Peers serving either CA's certificate verify against the bundle.
        for issuer in [&old, &new] {
            let (cert, key) = leaf(issuer, &["10.0.1.5"], &[], -1, 30);
            let m = material(&cert, &key, std::str::from_utf8(&both).unwrap());
            check(&m, &src(), &expect_ip(), SystemTime::now()).unwrap();
        }
        // Rotation finished (the file is the new CA): the fetched CA alone again.
        std::fs::write(d.path().join(CA_FILE), &new.pem).unwrap();
        assert_eq!(
            trust_anchors(d.path(), new.pem.as_bytes()),
            new.pem.as_bytes()
        );
        // A file that is not PEM adds nothing.
        std::fs::write(d.path().join(CA_FILE), "garbage").unwrap();
        assert_eq!(
            trust_anchors(d.path(), new.pem.as_bytes()),
            new.pem.as_bytes()
        );
    }

    #[test]
    fn write_sets_modes() {
        let ca = ca();
        let (cert, key) = leaf(&ca, &["10.0.1.5"], &[], -1, 30);
        let m = material(&cert, &key, &ca.pem);
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("tls");
        assert!(write(&m, &dir, Owner::default()).unwrap());
        let (c, k, a) = paths(&dir);
        assert_eq!(std::fs::metadata(&k).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&c).unwrap().mode() & 0o777, 0o644);
        assert_eq!(std::fs::read(&a).unwrap(), ca.pem.as_bytes());
        assert!(!write(&m, &dir, Owner::default()).unwrap());
    }
}
