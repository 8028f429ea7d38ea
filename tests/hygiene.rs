//! Secret hygiene audit (issue 7): one full life cycle on a real 3-node OpenBao cluster, then
//! a search for every secret that life cycle produced in everything the agents and servers
//! left behind or showed to other users of the machine.
//!
//! Life cycle: 3 agents `boot` together (init, escrow, post-init with operator cert auth),
//! `escrow verify`, an operator cert login, `break-glass --from-escrow`, one node removed
//! from raft and brought back by `rejoin` (with the break-glass token), a `snapshot`,
//! `status` and `doctor`.
//!
//! Secrets searched for: every recovery share (hex, as `sys/init` returns it in
//! `recovery_keys`, and base64, as in `recovery_keys_base64`), the initial root token, the
//! break-glass root token, the operator login token, the snapshot AppRole's secret_id, the
//! body lines of the server's TLS private key, of the operator's client key and of both CA
//! keys; and, when the sampler caught the pending init file, the KMS data key sealing it.
//! Shares and tokens also as the base64 of their text, the form KMS requests and responses
//! carry them in.
//!
//! Every agent runs with the most logging an operator can ask for: `VAULT_BOOTSTRAP_LOG=trace`
//! and the AWS SDK's own `LOG_SENSITIVE_BODIES`/`LOG_SIGNABLE_BODY`. The SDK then logs whole
//! KMS requests and responses at trace; without the caps in src/logging.rs this audit finds
//! every share, the root token, the secret_id and the pending data key in the agents' logs.
//!
//! Places searched: every file under the test-bed directory (agent logs, which hold the
//! servers' output too, the audit log, moto/IMDS logs, `vault.hcl`, TLS and state dirs, the
//! raft data `raft.db`/`vault.db`, which is seal-encrypted barrier data and must hold no
//! share or token in clear either, and the raft data a rejoin moved aside), every agent's
//! stdout but break-glass's (its one job is to print the token there), every object in the
//! S3 bucket (snapshots included), short-lived files in the state dirs when the sampler
//! catches them (the pending init file usually, a snapshot temp file rarely: not asserted), and
//! `/proc/<pid>/cmdline` and `/proc/<pid>/environ` of every process this test started and
//! their children, sampled every 50 ms through boot, init, break-glass, rejoin and snapshot.
//!
//! Allowed: the server key in `tls/server.key` (each node's, 0600 and owned by the agent's
//! user; the test-bed's source copy in `seed/` and S3), the test-bed CA key in `seed/ca.key`,
//! and the operator token in the environment of exactly the agent processes the test handed
//! it to as `VAULT_TOKEN` (never in their children). Everything else is a leak.
//!
//! Address block 127.0.45.0/24. `cargo test --test hygiene -- --nocapture` shows the
//! `HYGIENE SUMMARY` line: how many files, bytes, objects, processes and secrets it covered.

mod common;
use aho_corasick::AhoCorasick;
use base64::Engine;
use common::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK: u8 = 45;
/// Every agent runs with the most logging an operator can ask for: a secret that reaches a
/// trace or debug event (the agent's own, or the AWS SDK's and HTTP stack's, which print whole
/// requests and responses) must still reach no log. `LOG_SENSITIVE_BODIES` and
/// `LOG_SIGNABLE_BODY` are the SDK's own switches that lift its redaction of KMS bodies (the
/// `Plaintext` of every escrowed share) in those trace events.
const TRACE: &[(&str, &str)] = &[
    ("VAULT_BOOTSTRAP_LOG", "trace"),
    ("LOG_SENSITIVE_BODIES", "true"),
    ("LOG_SIGNABLE_BODY", "true"),
];
const N: usize = 3;
const CLUSTER: &str = "test-vault";
const BUCKET: &str = "vault-resources";

// ---------------------------------------------------------------------------------------
// What to look for

const SHARE: &str = "recovery-share";
const ROOT: &str = "root-token";
const BREAK_GLASS: &str = "break-glass-token";
const OPERATOR_TOKEN: &str = "operator-login-token";
const SECRET_ID: &str = "approle-secret-id";
const SERVER_KEY: &str = "server-tls-key";
const OPERATOR_KEY: &str = "operator-tls-key";
const CA_KEY: &str = "ca-key";
const DATA_KEY: &str = "pending-data-key";

/// Kinds the life cycle must have produced: the audit is vacuous without each of them.
const REQUIRED: &[&str] = &[
    SHARE,
    ROOT,
    BREAK_GLASS,
    OPERATOR_TOKEN,
    SECRET_ID,
    SERVER_KEY,
    OPERATOR_KEY,
    CA_KEY,
];

#[derive(Clone, Debug)]
struct Needle {
    kind: &'static str,
    /// Names the secret in reports; never the secret itself.
    label: String,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct Secrets {
    needles: Vec<Needle>,
}

impl Secrets {
    fn add(&mut self, kind: &'static str, label: impl Into<String>, value: &str) {
        let label = label.into();
        // Short strings would match by chance (and prove nothing when they do not).
        assert!(
            value.len() >= 16,
            "{label}: {} chars is too short to search for",
            value.len()
        );
        if self.needles.iter().any(|n| n.bytes == value.as_bytes()) {
            return;
        }
        self.needles.push(Needle {
            kind,
            label,
            bytes: value.as_bytes().to_vec(),
        });
    }

    /// A textual secret as base64 carries it wherever it stands in the encoded bytes: the
    /// KMS `Plaintext` of an escrowed item (a request or response body the AWS SDK traces)
    /// is the base64 of the item's text, or of a JSON document holding it. One needle per
    /// alignment (0, 1 or 2 bytes before it in the encoded run), each only the characters
    /// the secret's own bytes determine.
    fn add_base64_of(&mut self, kind: &'static str, label: &str, value: &str) {
        let e = base64::engine::general_purpose::STANDARD_NO_PAD;
        for k in 0..3usize {
            let mut bytes = vec![0u8; k];
            bytes.extend_from_slice(value.as_bytes());
            let full = e.encode(&bytes);
            // Characters before `skip` mix in the k bytes before; past `end`, the bytes after.
            let skip = [0, 2, 3][k];
            let end = bytes.len() * 8 / 6;
            self.add(
                kind,
                format!("{label} (base64 of its text, +{k})"),
                &full[skip..end],
            );
        }
    }

    /// A share as escrowed (hex, `recovery_keys`) and as `recovery_keys_base64` has it.
    fn add_share(&mut self, n: usize, hex: &str) {
        assert!(
            hex.len() >= 32
                && hex.len().is_multiple_of(2)
                && hex.chars().all(|c| c.is_ascii_hexdigit()),
            "recovery-key-{n} is not a hex share"
        );
        self.add(
            SHARE,
            format!("recovery-key-{n} (hex)"),
            &hex.to_lowercase(),
        );
        self.add(
            SHARE,
            format!("recovery-key-{n} (HEX)"),
            &hex.to_uppercase(),
        );
        let raw: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
        // Without its padding: a prefix of the padded and of the unpadded form alike.
        self.add(
            SHARE,
            format!("recovery-key-{n} (base64)"),
            b64.trim_end_matches('='),
        );
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw);
        self.add(SHARE, format!("recovery-key-{n} (base64url)"), &url);
        // The escrowed item is the hex text; KMS carries it base64-encoded.
        self.add_base64_of(SHARE, &format!("recovery-key-{n}"), &hex.to_lowercase());
    }

    /// The base64 body lines of a PEM private key (each a 48-byte slice of the key).
    fn add_pem(&mut self, kind: &'static str, label: &str, pem: &str) {
        assert!(pem.contains("PRIVATE KEY-----"), "{label} is not a key");
        let mut lines = 0;
        for (i, l) in pem.lines().map(str::trim).enumerate() {
            if l.starts_with("-----") || l.len() < 16 {
                continue;
            }
            self.add(kind, format!("{label} line {i}"), l);
            lines += 1;
        }
        assert!(lines > 0, "{label}: no body line to search for");
    }

    fn kinds(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for n in &self.needles {
            *m.entry(n.kind).or_default() += 1;
        }
        m
    }
}

/// Every needle at once, one pass per haystack.
struct Scanner {
    ac: AhoCorasick,
    needles: Vec<Needle>,
}

impl Scanner {
    fn new(s: &Secrets) -> Scanner {
        assert!(!s.needles.is_empty(), "nothing to search for");
        Scanner {
            ac: AhoCorasick::new(s.needles.iter().map(|n| &n.bytes)).expect("aho-corasick"),
            needles: s.needles.clone(),
        }
    }

    /// The needles found in `hay`.
    fn scan(&self, hay: &[u8]) -> Vec<&Needle> {
        let found: BTreeSet<usize> = self
            .ac
            .find_overlapping_iter(hay)
            .map(|m| m.pattern().as_usize())
            .collect();
        found.into_iter().map(|i| &self.needles[i]).collect()
    }
}

// ---------------------------------------------------------------------------------------
// Where to look

#[derive(Debug, Clone)]
struct FileInfo {
    rel: String,
    mode: u32,
    uid: u32,
    dir: bool,
}

/// Every directory and regular file under `root` (symlinks are not followed; none is
/// expected), with mode bits and owner.
fn walk(root: &Path) -> Vec<FileInfo> {
    fn go(root: &Path, d: &Path, out: &mut Vec<FileInfo>) {
        let Ok(rd) = std::fs::read_dir(d) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue; // removed meanwhile
            };
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if m.is_dir() {
                out.push(FileInfo {
                    rel,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    dir: true,
                });
                go(root, &p, out);
            } else if m.is_file() {
                out.push(FileInfo {
                    rel,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    dir: false,
                });
            }
        }
    }
    let mut out = Vec::new();
    go(root, root, &mut out);
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    out
}

/// A finding: where, and which secret.
fn finding(place: &str, n: &Needle) -> String {
    format!("{place}: {} [{}]", n.kind, n.label)
}

/// Scans every regular file under `root`; returns (findings as (rel path, needle), bytes).
fn scan_tree<'a>(root: &Path, sc: &'a Scanner) -> (Vec<(String, &'a Needle)>, u64, usize) {
    let mut hits = Vec::new();
    let mut bytes = 0;
    let mut files = 0;
    for f in walk(root).into_iter().filter(|f| !f.dir) {
        let Ok(body) = std::fs::read(root.join(&f.rel)) else {
            continue;
        };
        bytes += body.len() as u64;
        files += 1;
        for n in sc.scan(&body) {
            hits.push((f.rel.clone(), n));
        }
    }
    (hits, bytes, files)
}

fn read_proc(pid: u32) -> Option<(Vec<u8>, Vec<u8>)> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some((cmdline, environ))
}

/// This process's descendants, all generations (the agents, their servers, moto, IMDS...).
fn descendants(root: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = children_of(root);
    while let Some(p) = todo.pop() {
        if out.contains(&p) {
            continue;
        }
        out.push(p);
        todo.extend(children_of(p));
    }
    out
}

fn args_of(cmdline: &[u8]) -> Vec<String> {
    cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// What a sampled process is: `agent <command>`, `server`, or its program name.
fn role_of(cmdline: &[u8]) -> String {
    let args = args_of(cmdline);
    let Some(prog) = args.first() else {
        return "?".into();
    };
    if prog == AGENT {
        // The harness runs `AGENT --config PATH <command...>`.
        return format!("agent {}", args.get(3..).unwrap_or_default().join(" "));
    }
    if prog.ends_with("/bao") && args.get(1).map(String::as_str) == Some("server") {
        return "server".into();
    }
    Path::new(prog)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

struct ProcSample {
    pid: u32,
    cmdline: Vec<u8>,
    environ: Vec<u8>,
    phases: BTreeSet<&'static str>,
}

/// A transient file seen in a state dir while it existed.
struct Transient {
    rel: String,
    mode: u32,
    uid: u32,
    body: Vec<u8>,
}

#[derive(Default)]
struct Samples {
    /// (pid, hash of cmdline+environ): a process is sampled again after an exec.
    procs: HashMap<(u32, u64), ProcSample>,
    transient: HashMap<(String, u64), Transient>,
    reads: usize,
    ticks: usize,
}

fn hash(parts: &[&[u8]]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// Samples /proc of every descendant and the nodes' state dirs every 50 ms until stopped.
struct Sampler {
    phase: Arc<Mutex<&'static str>>,
    stop: Arc<AtomicBool>,
    data: Arc<Mutex<Samples>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(tb_dir: PathBuf, phase: &'static str) -> Sampler {
        let phase = Arc::new(Mutex::new(phase));
        let stop = Arc::new(AtomicBool::new(false));
        let data = Arc::new(Mutex::new(Samples::default()));
        let (ph, st, d) = (phase.clone(), stop.clone(), data.clone());
        let me = std::process::id();
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let now = *ph.lock().unwrap();
                let mut seen = Vec::new();
                for pid in descendants(me) {
                    if let Some((c, e)) = read_proc(pid) {
                        seen.push((pid, c, e));
                    }
                }
                let mut transient = Vec::new();
                for i in 0..N {
                    let state = tb_dir.join(format!("node-{i}/state"));
                    for f in walk(&state).into_iter().filter(|f| !f.dir) {
                        let name = f.rel.rsplit('/').next().unwrap_or("").to_owned();
                        if name == "pending-init.json" || name.ends_with(".tmp") {
                            if let Ok(body) = std::fs::read(state.join(&f.rel)) {
                                transient.push(Transient {
                                    rel: format!("node-{i}/state/{}", f.rel),
                                    mode: f.mode,
                                    uid: f.uid,
                                    body,
                                });
                            }
                        }
                    }
                }
                {
                    let mut d = d.lock().unwrap();
                    d.ticks += 1;
                    for (pid, c, e) in seen {
                        d.reads += 1;
                        let k = (pid, hash(&[&c, &e]));
                        d.procs
                            .entry(k)
                            .or_insert_with(|| ProcSample {
                                pid,
                                cmdline: c,
                                environ: e,
                                phases: BTreeSet::new(),
                            })
                            .phases
                            .insert(now);
                    }
                    for t in transient {
                        let k = (t.rel.clone(), hash(&[&t.body]));
                        d.transient.entry(k).or_insert(t);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Sampler {
            phase,
            stop,
            data,
            thread: Some(thread),
        }
    }

    fn phase(&self, p: &'static str) {
        *self.phase.lock().unwrap() = p;
    }

    fn finish(&mut self) -> Samples {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("sampler thread");
        }
        std::mem::take(&mut *self.data.lock().unwrap())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------
// Driving the life cycle

/// Runs one agent command to its end (bounded); returns (exit code, stdout, stderr) and
/// records, when `token` is given, the PID it was handed to as VAULT_TOKEN.
fn run_cmd(
    tb: &Testbed,
    i: usize,
    args: &[&str],
    token: Option<&str>,
    holders: &mut Vec<u32>,
) -> (i32, Vec<u8>, String) {
    let mut env: Vec<(&str, &str)> = token.map(|t| ("VAULT_TOKEN", t)).into_iter().collect();
    env.extend(TRACE);
    let mut a = tb.spawn_agent_env(i, args, &env);
    if token.is_some() {
        holders.push(a.pid());
    }
    let out = Drain::of(&mut a);
    let status = a.wait_exit(Duration::from_secs(120));
    let out = out.get(&args.join(" "));
    (status.code().unwrap_or(-1), out, a.stderr())
}

async fn s3_objects(tb: &Testbed) -> Vec<(String, Vec<u8>)> {
    let s3 = aws_sdk_s3::Client::new(&tb.sdk().await);
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let page = s3
            .list_objects_v2()
            .bucket(BUCKET)
            .set_continuation_token(token)
            .send()
            .await
            .expect("ListObjectsV2");
        for o in page.contents() {
            let key = o.key().unwrap().to_owned();
            let body = s3
                .get_object()
                .bucket(BUCKET)
                .key(&key)
                .send()
                .await
                .expect("GetObject")
                .body
                .collect()
                .await
                .unwrap()
                .into_bytes()
                .to_vec();
            out.push((key, body));
        }
        match page.next_continuation_token() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    out
}

/// The KMS data key a captured `pending-init.json` was sealed with.
async fn pending_data_key(tb: &Testbed, body: &[u8]) -> Option<Vec<u8>> {
    use vault_bootstrap::aws::kms::Kms;
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let ek = base64::engine::general_purpose::STANDARD
        .decode(v["encrypted_data_key"].as_str()?)
        .ok()?;
    let kms = vault_bootstrap::aws::kms::SdkKms::new(&tb.sdk().await);
    let ctx = tb.layout(CLUSTER).context("pending-init-response");
    kms.decrypt(&ek, &ctx).await.ok().map(|k| k.to_vec())
}

fn euid() -> u32 {
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// Files whose role makes them secret-bearing, whatever they hold right now.
fn secret_bearing_by_name(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    name.ends_with(".key")
        || name == "pending-init.json"
        || (name.starts_with(".snapshot-") || name.starts_with(".restore-"))
            && name.ends_with(".tmp")
        || name.contains("token")
        || name.contains("secret")
}

/// Searches every file under the test-bed dir and checks the modes of secret-bearing ones;
/// returns (files, bytes, raft db files) searched. `r` is the node that rejoined.
fn audit_files(
    tb: &Testbed,
    sc: &Scanner,
    r: usize,
    leaks: &mut Vec<String>,
) -> (usize, u64, usize) {
    let me_uid = euid();
    let files = walk(tb.path());
    let mut bytes = 0u64;
    let mut nfiles = 0usize;
    let mut raft_files = 0usize;
    let mut holding: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    for f in files.iter().filter(|f| !f.dir) {
        let body = std::fs::read(tb.path().join(&f.rel)).expect("read a test-bed file");
        bytes += body.len() as u64;
        nfiles += 1;
        if f.rel.ends_with("raft.db") || f.rel.ends_with("vault.db") {
            raft_files += 1;
        }
        let is_node_key = (0..N).any(|i| f.rel == format!("node-{i}/tls/server.key"));
        for n in sc.scan(&body) {
            let allowed = match n.kind {
                SERVER_KEY => is_node_key || f.rel == "seed/server.key",
                // The test-bed's own CA key, written by seed.py; no agent reads it.
                CA_KEY => f.rel == "seed/ca.key" && n.label.starts_with("test-bed"),
                _ => false,
            };
            if allowed {
                holding.entry(f.rel.clone()).or_default().insert(n.kind);
            } else {
                leaks.push(finding(&format!("file {}", f.rel), n));
            }
        }
        let is_key = body
            .windows(b"PRIVATE KEY-----".len())
            .any(|w| w == b"PRIVATE KEY-----");
        if is_key || secret_bearing_by_name(&f.rel) || holding.contains_key(&f.rel) {
            if f.mode != 0o600 {
                leaks.push(format!(
                    "file {} is secret-bearing but mode {:04o}",
                    f.rel, f.mode
                ));
            }
            if f.uid != me_uid {
                leaks.push(format!(
                    "file {} is secret-bearing but owned by uid {}",
                    f.rel, f.uid
                ));
            }
        }
    }
    for i in 0..N {
        let key = format!("node-{i}/tls/server.key");
        assert!(
            holding.get(&key).is_some_and(|k| k.contains(SERVER_KEY)),
            "{key} does not hold the server key: the allowance is wrong"
        );
        assert!(
            !tb.node_dir(i).join("state/pending-init.json").exists(),
            "node {i}: the pending init file is left"
        );
        for (dir, want) in [("tls", 0o750), ("state", 0o700)] {
            let f = files
                .iter()
                .find(|f| f.rel == format!("node-{i}/{dir}"))
                .unwrap_or_else(|| panic!("node {i} has no {dir} dir"));
            if f.mode & !want != 0 || f.mode & 0o007 != 0 {
                leaks.push(format!(
                    "dir node-{i}/{dir} is mode {:04o}, more open than {want:04o}",
                    f.mode
                ));
            }
        }
    }
    assert!(
        files
            .iter()
            .any(|f| f.rel.starts_with(&format!("node-{r}/data.removed-"))),
        "the raft data the rejoin moved aside is part of the search"
    );
    assert!(raft_files >= N, "raft.db/vault.db searched: {raft_files}");
    let audit = std::fs::read_to_string(tb.path().join("audit/audit.log")).unwrap_or_default();
    assert!(
        audit.lines().count() > 10 && audit.contains("hmac-sha256:"),
        "the audit log exists and HMACs what it records"
    );

    (nfiles, bytes, raft_files)
}

type Coverage = BTreeMap<&'static str, BTreeMap<String, BTreeSet<u32>>>;

/// Searches every sampled argv and environment; returns the PIDs sampled and, per phase and
/// role (`agent <command>`, `server`, ...), the PIDs seen.
fn audit_processes(
    samples: &Samples,
    sc: &Scanner,
    holders: &[u32],
    leaks: &mut Vec<String>,
) -> (BTreeSet<u32>, Coverage) {
    let mut by_phase = Coverage::new();
    let mut pids = BTreeSet::new();
    for s in samples.procs.values() {
        pids.insert(s.pid);
        let role = role_of(&s.cmdline);
        for p in &s.phases {
            by_phase
                .entry(p)
                .or_default()
                .entry(role.clone())
                .or_default()
                .insert(s.pid);
        }
        for n in sc.scan(&s.cmdline) {
            leaks.push(finding(&format!("argv of pid {} ({role})", s.pid), n));
        }
        for n in sc.scan(&s.environ) {
            // The test itself handed this token to exactly these agents as VAULT_TOKEN.
            let handed = holders.contains(&s.pid) && n.kind == BREAK_GLASS;
            if !handed {
                leaks.push(finding(
                    &format!("environment of pid {} ({role})", s.pid),
                    n,
                ));
            }
        }
    }
    (pids, by_phase)
}

// ---------------------------------------------------------------------------------------

/// The scanner finds what is planted, in files and in a process's argv and environment, in
/// every encoding it searches: without this the audit below could pass by finding nothing.
/// The base64-of-text needles match wherever the secret stands in the encoded document (KMS
/// `Plaintext` of a bare item, or of a JSON document holding it), and nothing else.
#[test]
fn base64_of_a_secret_is_found_at_any_alignment() {
    let token = "s.PlantedTokenNotARealOne1234";
    let mut s = Secrets::default();
    s.add_base64_of(ROOT, "planted token", token);
    let sc = Scanner::new(&s);
    let e = base64::engine::general_purpose::STANDARD;
    for before in ["", "x", "xy", "{\"secret_id\":\"", "{\"k\":\""] {
        for after in ["", "\"}", "!"] {
            let doc = e.encode(format!("{before}{token}{after}"));
            let hay = format!(
                "body: SdkBody {{ inner: Once(Some(b\"{{\\\"Plaintext\\\":\\\"{doc}\\\"}}\")) }}"
            );
            assert!(
                !sc.scan(hay.as_bytes()).is_empty(),
                "{before:?} + token + {after:?} not found in {hay}"
            );
        }
    }
    let other = e.encode("s.AnotherTokenNotARealOne12");
    assert!(sc.scan(other.as_bytes()).is_empty());
}

#[test]
fn the_scanner_finds_planted_secrets() {
    let share = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9011";
    let mut s = Secrets::default();
    s.add_share(1, share);
    s.add(ROOT, "planted token", "s.PlantedTokenNotARealOne1234");
    let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    s.add_pem(SERVER_KEY, "planted key", &key);
    let sc = Scanner::new(&s);

    let d = tempfile::tempdir().unwrap();
    let raw: Vec<u8> = (0..share.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&share[i..i + 2], 16).unwrap())
        .collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
    std::fs::create_dir_all(d.path().join("a/b")).unwrap();
    std::fs::write(d.path().join("a/b/hex.log"), format!("x={share}\n")).unwrap();
    std::fs::write(
        d.path().join("a/upper.json"),
        format!("{{\"k\":\"{}\"}}", share.to_uppercase()),
    )
    .unwrap();
    std::fs::write(d.path().join("b64.txt"), format!("key: {b64}")).unwrap();
    std::fs::write(d.path().join("pem"), key.replace('\n', "\\n")).unwrap();
    std::fs::write(d.path().join("clean"), "nothing here").unwrap();
    let (hits, _, files) = scan_tree(d.path(), &sc);
    assert_eq!(files, 5);
    let by_file = |f: &str| -> Vec<String> {
        hits.iter()
            .filter(|(p, _)| p == f)
            .map(|(_, n)| n.label.clone())
            .collect()
    };
    assert_eq!(by_file("a/b/hex.log"), ["recovery-key-1 (hex)"]);
    assert_eq!(by_file("a/upper.json"), ["recovery-key-1 (HEX)"]);
    assert_eq!(by_file("b64.txt"), ["recovery-key-1 (base64)"]);
    assert!(by_file("pem").iter().all(|l| l.starts_with("planted key")));
    assert!(!by_file("pem").is_empty());
    assert!(by_file("clean").is_empty());

    // A process with the token in its argv and a share in its environment: `cat - FILE`
    // blocks on its stdin (a pipe we hold) before it ever looks at FILE.
    let mut child = std::process::Command::new("cat")
        .arg("-")
        .arg("s.PlantedTokenNotARealOne1234")
        .env("PLANTED", &b64)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (cmdline, environ) = wait_for(
        "the planted process's /proc entries",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || read_proc(child.id()).filter(|(c, _)| c.starts_with(b"cat\0")),
    );
    let _ = child.kill();
    let _ = child.wait();
    let c: Vec<_> = sc.scan(&cmdline).iter().map(|n| n.kind).collect();
    let e: Vec<_> = sc.scan(&environ).iter().map(|n| n.label.clone()).collect();
    assert_eq!(c, [ROOT]);
    assert_eq!(e, ["recovery-key-1 (base64)"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_leaks_through_a_whole_life_cycle() {
    let started = Instant::now();
    let tb = Testbed::start(BLOCK, N);
    // The operator CA goes to S3 before any agent starts (post-init binds cert auth to it),
    // so this forms the cluster as `form()` does, with that one step first.
    let operators = ca("hygiene operators CA");
    tb.put_object("tls/operator-ca.pem", operators.pem.as_bytes())
        .await;
    let mut sampler = Sampler::start(tb.path().to_path_buf(), "boot");
    let mut agents = boot_all_env(
        &tb,
        N,
        "[access]\noperator_ca_key = \"tls/operator-ca.pem\"\noperator_common_names = [\"hygiene-operator\"]\n",
        TRACE,
    );
    // Read from now on; what the boots wrote so far waits in the pipes (a boot blocked on a
    // full pipe would not have reported ready).
    let mut boot_out: Vec<Drain> = agents.iter_mut().map(Drain::of).collect();
    sampler.phase("after-init");
    let formed = started.elapsed();
    let boot_log: String = agents.iter().map(|a| a.stderr()).collect();
    assert_eq!(boot_log.matches("sys/init succeeded").count(), 1);
    assert!(boot_log.contains("root token revoked"), "root not revoked");

    let mut holders: Vec<u32> = Vec::new();
    let mut streams: Vec<(String, Vec<u8>)> = Vec::new();
    let mut secrets = Secrets::default();

    // Everything the escrow holds.
    for n in 1..=5 {
        let share = tb.escrowed(CLUSTER, &format!("recovery-key-{n}")).await;
        secrets.add_share(n, share.trim());
    }
    let root = tb.escrowed(CLUSTER, "root-token").await;
    secrets.add(ROOT, "initial root token", root.trim());
    secrets.add_base64_of(ROOT, "initial root token", root.trim());
    let approle: serde_json::Value =
        serde_json::from_str(&tb.escrowed(CLUSTER, "snapshot-approle").await).unwrap();
    let secret_id = approle["secret_id"].as_str().expect("secret_id");
    secrets.add(SECRET_ID, "snapshot AppRole secret_id", secret_id);
    secrets.add_base64_of(SECRET_ID, "snapshot AppRole secret_id", secret_id);
    let lifecycle: serde_json::Value =
        serde_json::from_str(&tb.escrowed(CLUSTER, "lifecycle-approle").await).unwrap();
    let secret_id = lifecycle["secret_id"].as_str().expect("secret_id");
    secrets.add(SECRET_ID, "lifecycle AppRole secret_id", secret_id);
    secrets.add_base64_of(SECRET_ID, "lifecycle AppRole secret_id", secret_id);

    let (code, out, err) = run_cmd(&tb, 1, &["escrow", "verify"], None, &mut holders);
    let text = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "escrow verify: {text}\n{err}");
    assert!(text.contains("recovery keys: 5/5 present and decrypt"));
    streams.push(("stdout of escrow verify".into(), out));

    // An operator logs in with a client certificate.
    let (op_cert, op_key) = operator(&operators, "hygiene-operator");
    secrets.add_pem(OPERATOR_KEY, "operator client key", &op_key);
    secrets.add_pem(CA_KEY, "operator CA key", &operators.key.serialize_pem());
    let (code, op_token) = cert_login(&tb, &op_cert, &op_key).await;
    assert_eq!(code, 200, "operator cert login");
    let op_token = op_token.expect("client token");
    secrets.add(OPERATOR_TOKEN, "operator cert-login token", &op_token);
    secrets.add_base64_of(OPERATOR_TOKEN, "operator cert-login token", &op_token);

    // Break-glass from the escrow: a root token printed once, on stdout only.
    sampler.phase("break-glass");
    let (code, out, err) = run_cmd(
        &tb,
        1,
        &["break-glass", "--from-escrow", "--yes"],
        None,
        &mut holders,
    );
    assert_eq!(code, 0, "break-glass failed: {err}");
    let bg = String::from_utf8(out).unwrap().trim().to_owned();
    assert!(!bg.is_empty() && !bg.contains('\n'), "one token on stdout");
    secrets.add(BREAK_GLASS, "break-glass root token", &bg);
    secrets.add_base64_of(BREAK_GLASS, "break-glass root token", &bg);

    // Rejoin: the cluster forgets a standby, which comes back with the operator token. (A
    // standby, not the leader: this test is about what the rejoin leaks, not about a removed
    // leader's shutdown.)
    sampler.phase("voters");
    wait_voters(&tb, 0, &bg, N).await;
    let (leader, r) = poll(
        "a leader and a standby",
        Duration::from_secs(60),
        || async {
            let (leader, standby) = roles(&tb, N).await;
            leader.zip(standby.last().copied())
        },
    )
    .await;
    let me = tb.instances[r].id.clone();
    forget(&tb, leader, &bg, &me).await;
    sampler.phase("rejoin");
    let mut rejoin = tb.spawn_agent_env(
        r,
        &["rejoin"],
        &[&[("VAULT_TOKEN", bg.as_str())], TRACE].concat(),
    );
    holders.push(rejoin.pid());
    let rejoin_out = Drain::of(&mut rejoin);
    let t0 = Instant::now();
    while !rejoin.stderr().contains("rejoin complete") {
        // The harness's wait_log, plus the node's boot log (its old server's end) on failure.
        if rejoin.child.try_wait().unwrap().is_some() || t0.elapsed() > Duration::from_secs(180) {
            let boot = agents[r].stderr();
            let tail: Vec<&str> = boot.lines().rev().take(40).collect::<Vec<_>>();
            panic!(
                "node {r}: no rejoin complete:\n{}\n--- its boot log, last lines:\n{}",
                rejoin.stderr(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(raft_servers(&tb, leader, &bg)
        .await
        .expect("raft configuration")
        .contains(&(me.clone(), true)));

    // A snapshot (the agent logs in with the escrowed AppRole).
    sampler.phase("snapshot");
    let (code, out, err) = run_cmd(&tb, 0, &["snapshot"], None, &mut holders);
    assert_eq!(code, 0, "snapshot: {err}");
    assert!(String::from_utf8_lossy(&out).contains("s3://"), "{err}");
    streams.push(("stdout of snapshot".into(), out));

    sampler.phase("status+doctor");
    let (code, out, err) = run_cmd(&tb, 0, &["status"], Some(&bg), &mut holders);
    assert_eq!(code, 0, "status: {err}");
    streams.push(("stdout of status".into(), out));
    // doctor passes only where S3 makes the escrow write-once.
    tb.escrow_write_once().await;
    let (code, out, err) = run_cmd(&tb, 1, &["doctor"], None, &mut holders);
    assert_eq!(code, 0, "doctor: {}\n{err}", String::from_utf8_lossy(&out));
    streams.push(("stdout of doctor".into(), out));

    // Done: the break-glass token is revoked, every process stopped (logs complete).
    tb.api(0)
        .put_ok("auth/token/revoke-self", &bg, serde_json::json!({}))
        .await;
    let samples = sampler.finish();
    let life_cycle = started.elapsed();
    rejoin.stop();
    for a in agents.iter_mut() {
        a.stop();
    }
    streams.push(("stdout of rejoin".into(), rejoin_out.get("rejoin")));
    for (i, d) in boot_out.drain(..).enumerate() {
        streams.push((format!("stdout of boot on node {i}"), d.get("boot")));
    }

    // TLS keys: the server's (what the agent installs), the test-bed CA's.
    let server_key = std::fs::read_to_string(tb.seed_dir().join("server.key")).unwrap();
    secrets.add_pem(SERVER_KEY, "server TLS key", &server_key);
    let ca_key = std::fs::read_to_string(tb.seed_dir().join("ca.key")).unwrap();
    secrets.add_pem(CA_KEY, "test-bed CA key", &ca_key);

    // The pending init file, when the sampler caught it between init and escrow: its
    // plaintext data key is a secret too, and the file must hold ciphertext only.
    let mut caught_pending = 0;
    for t in samples.transient.values() {
        if t.rel.ends_with("pending-init.json") {
            if let Some(k) = pending_data_key(&tb, &t.body).await {
                caught_pending += 1;
                let e = base64::engine::general_purpose::STANDARD;
                secrets.add(DATA_KEY, "pending data key (base64)", &e.encode(&k));
                let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
                secrets.add(DATA_KEY, "pending data key (hex)", &hex);
            }
        }
    }

    // Not vacuous: every kind of secret is there.
    let kinds = secrets.kinds();
    for k in REQUIRED {
        assert!(kinds.contains_key(k), "no {k} to search for: {kinds:?}");
    }
    for n in 1..=5 {
        for form in ["hex", "HEX", "base64"] {
            let label = format!("recovery-key-{n} ({form})");
            assert!(
                secrets.needles.iter().any(|s| s.label == label),
                "no {label}"
            );
        }
    }
    let sc = Scanner::new(&secrets);

    // The scanner finds these very secrets when they are planted.
    {
        let scratch = tempfile::tempdir().unwrap();
        let share_hex = secrets.needles.iter().find(|n| n.kind == SHARE).unwrap();
        let share_b64 = secrets
            .needles
            .iter()
            .find(|n| n.label.ends_with("(base64)"))
            .unwrap();
        let key_line = secrets
            .needles
            .iter()
            .find(|n| n.kind == SERVER_KEY)
            .unwrap();
        std::fs::create_dir_all(scratch.path().join("deep")).unwrap();
        let mut planted = b"log line: ".to_vec();
        planted.extend(&share_hex.bytes);
        std::fs::write(scratch.path().join("deep/planted.log"), &planted).unwrap();
        std::fs::write(scratch.path().join("b64"), &share_b64.bytes).unwrap();
        std::fs::write(scratch.path().join("key"), &key_line.bytes).unwrap();
        let (hits, _, _) = scan_tree(scratch.path(), &sc);
        let labels: BTreeSet<_> = hits.iter().map(|(f, n)| (f.as_str(), &n.label)).collect();
        assert!(labels.contains(&("deep/planted.log", &share_hex.label)));
        assert!(labels.contains(&("b64", &share_b64.label)));
        assert!(labels.contains(&("key", &key_line.label)));
        scratch.close().unwrap();
    }

    let mut leaks: Vec<String> = Vec::new();
    let me_uid = euid();

    // 1. Files: every one under the test-bed directory.
    let (nfiles, bytes, raft_files) = audit_files(&tb, &sc, r, &mut leaks);

    // 2. Streams: every agent's stdout (break-glass's carried its token, as it must).
    let mut stream_bytes = 0;
    for (what, body) in &streams {
        stream_bytes += body.len();
        for n in sc.scan(body) {
            leaks.push(finding(what, n));
        }
    }

    // 3. S3: every object (the server key's source object aside).
    let objects = s3_objects(&tb).await;
    let object_bytes: usize = objects.iter().map(|(_, b)| b.len()).sum();
    assert!(
        objects.iter().any(|(k, _)| k.ends_with(".snap")),
        "the snapshot is in the search"
    );
    for (key, body) in &objects {
        for n in sc.scan(body) {
            if !(n.kind == SERVER_KEY && key == "tls/server.key") {
                leaks.push(finding(&format!("s3://{BUCKET}/{key}"), n));
            }
        }
    }

    // 4. Transient files caught while they existed.
    for t in samples.transient.values() {
        // Other temp files (e.g. `.server.pid.*.tmp`) hold nothing secret; the search below
        // still covers them.
        let bearing = secret_bearing_by_name(&t.rel)
            || t.rel.contains("/.snapshot-")
            || t.rel.contains("/.restore-")
            || t.rel.contains("/.pending-init.json");
        if bearing && (t.mode != 0o600 || t.uid != me_uid) {
            leaks.push(format!(
                "transient {} was mode {:04o} uid {}",
                t.rel, t.mode, t.uid
            ));
        }
        for n in sc.scan(&t.body) {
            leaks.push(finding(&format!("transient {}", t.rel), n));
        }
    }

    // 5. Processes: argv and environment of everything this test started. The test itself
    // handed the break-glass token to exactly the `holders` as VAULT_TOKEN.
    let (pids, by_phase) = audit_processes(&samples, &sc, &holders, &mut leaks);
    let seen = |phase: &str, role: &str| -> usize {
        by_phase
            .get(phase)
            .and_then(|r| r.get(role))
            .map_or(0, |p| p.len())
    };
    let coverage = format!("{by_phase:?}");
    assert!(seen("boot", "agent boot") >= N, "boot sampled: {coverage}");
    assert!(seen("boot", "server") >= 1, "boot sampled: {coverage}");
    assert!(seen("after-init", "server") >= N, "after init: {coverage}");
    assert!(seen("break-glass", "agent break-glass --from-escrow --yes") >= 1);
    assert!(seen("rejoin", "agent rejoin") >= 1, "rejoin: {coverage}");
    assert!(seen("rejoin", "server") >= N, "rejoin: {coverage}");
    assert!(
        seen("snapshot", "agent snapshot") >= 1,
        "snapshot: {coverage}"
    );

    eprintln!(
        "HYGIENE SUMMARY: {nfiles} files ({bytes} bytes, {raft_files} raft db files) under the \
         test-bed dir; {} S3 objects ({object_bytes} bytes); {} stdout streams ({stream_bytes} \
         bytes); {} transient state files caught ({caught_pending} pending-init); {} processes \
         sampled ({} /proc reads in {} ticks, phases {:?}); {} secret needles of {} kinds {kinds:?}; \
         formed in {:.1} s, life cycle {:.1} s; leaks: {}",
        objects.len(),
        streams.len(),
        samples.transient.len(),
        pids.len(),
        samples.reads,
        samples.ticks,
        by_phase.keys().collect::<Vec<_>>(),
        secrets.needles.len(),
        kinds.len(),
        formed.as_secs_f64(),
        life_cycle.as_secs_f64(),
        leaks.len(),
    );
    assert!(
        leaks.is_empty(),
        "{} secret leak(s):\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}
