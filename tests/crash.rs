//! Seeded randomized crash trials: the cold boot of a new cluster, with power losses.
//!
//! In each trial n agents boot together. One to three times, an agent and the server it
//! started are SIGKILLed together (a power loss) at a random moment: either a random node at
//! a random time, or the init lock's winner a random time after it won (the KMS data key,
//! the attempt record, `sys/init` and the escrow are all in that window), or the first node
//! to open a window named by a log line: a joiner's raft join before the leader's data
//! reached it, a node's membership record before its check against the escrow marker, the
//! winner's `sys/init` call (its answer lost, perhaps after peers joined), or the winner's
//! escrow once its pending file's copy is in S3.
//! Every agent that dies or exits non-zero is started again after a short random pause, as systemd's
//! `Restart=` does. Each trial must end with:
//! - every node an unsealed member reporting ready, all with one `cluster_id`, the one the
//!   escrow marker records (one cluster, nothing stranded);
//! - `escrow verify` passing;
//! - the escrowed recovery keys generating a root token (`break-glass --from-escrow`), with
//!   which the raft configuration lists exactly the n nodes;
//!
//! or, the one other right end, a `sys/init` answer lost after peers joined what it made:
//! the winner exits 80 naming them, one `sys/init` call, no store moved aside, at most one
//! `cluster_id` served.
//!
//! The seed is printed; replay with `VB_CRASH_SEED=<seed>`. `VB_CRASH_TRIALS=<a>,<b>` sets
//! the number of 3-node and 5-node trials (default 4,2 here; `tests/run-full-matrix.sh`
//! runs 30,10).

mod common;
use common::*;
use std::time::{Duration, Instant};

/// A restarted agent waits this long, at most, before it starts again (systemd's
/// `RestartSec=30` compressed: the pause only has to let the killed processes go).
const MAX_RESTART_PAUSE_MS: u64 = 1500;
/// How long one trial may take to settle after its last kill: cluster formation with
/// restarts (autopilot aside) takes well under a minute on 2 cores.
const SETTLE_BOUND: Duration = Duration::from_secs(240);

fn trials() -> (usize, usize) {
    let v = std::env::var("VB_CRASH_TRIALS").unwrap_or_else(|_| "4,2".into());
    let mut it = v
        .split(',')
        .map(|x| x.trim().parse::<usize>().expect("VB_CRASH_TRIALS=<a>,<b>"));
    (it.next().unwrap_or(4), it.next().unwrap_or(2))
}

fn seed() -> u64 {
    std::env::var("VB_CRASH_SEED")
        .ok()
        .map(|s| s.parse().expect("VB_CRASH_SEED is a u64"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// One kill: whom and when.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// Node `k` (of the trial), `ms` after the trial started.
    Node { k: usize, ms: u64 },
    /// Whoever logged "won the init lock", `ms` after it did.
    LockWinner { ms: u64 },
    /// The first node to log `Window`'s line after this kill's turn came, `ms` after it.
    Window { window: Window, ms: u64 },
}

/// Moments a kill is aimed at, each named by the log line that opens it.
#[derive(Debug, Clone, Copy)]
enum Window {
    /// A joiner's server wrote the leader's raft configuration and waits for its data.
    RaftJoined,
    /// A node's server is an unsealed member and its record is on disk; its check against
    /// the escrow marker and post-init are under way.
    Recorded,
    /// The winner called `sys/init`: the server commits, peers may join, and the answer
    /// may not have reached the agent yet.
    InitCalled,
    /// The winner's pending init file is copied to S3: the escrow of its keys (items, read
    /// back, marker) and post-init are under way, and its disk holds the only plaintext-able
    /// copy besides S3's.
    Escrowing,
}

impl Window {
    fn line(self) -> &'static str {
        match self {
            Window::RaftJoined => "successfully joined the raft cluster",
            Window::Recorded => "membership recorded",
            Window::InitCalled => "calling sys/init",
            Window::Escrowing => "is copied to S3",
        }
    }

    /// How far into the window a kill may come.
    fn max_ms(self) -> u64 {
        match self {
            // The leader's data follows within milliseconds.
            Window::RaftJoined => 10,
            Window::Recorded => 1000,
            Window::InitCalled => 3000,
            // Items, read-backs and the marker take a second or two on the test-bed.
            Window::Escrowing => 2000,
        }
    }
}

fn plan(rng: &mut fastrand::Rng, n: usize) -> Vec<Kill> {
    (0..rng.usize(1..=3))
        .map(|_| match rng.usize(0..6) {
            0 => Kill::LockWinner {
                ms: rng.u64(0..3000),
            },
            1 => Kill::Node {
                k: rng.usize(0..n),
                ms: rng.u64(0..8000),
            },
            w => {
                let window = match w {
                    2 => Window::RaftJoined,
                    3 => Window::Recorded,
                    4 => Window::InitCalled,
                    _ => Window::Escrowing,
                };
                Kill::Window {
                    window,
                    ms: rng.u64(0..=window.max_ms()),
                }
            }
        })
        .collect()
}

struct Trial<'a> {
    tb: &'a Testbed,
    nodes: Vec<usize>,
    agents: Vec<Agent>,
    cluster: String,
    restarts: usize,
    kills: usize,
}

impl Trial<'_> {
    fn boot(&mut self, k: usize) {
        self.agents[k] = self.tb.respawn_agent(self.nodes[k], &["boot"], &[]);
    }

    /// Restarts every agent that exited, as systemd would (also exit 0: with the exec
    /// launcher a `boot` that exits has lost its server).
    fn supervise(&mut self, rng: &mut fastrand::Rng) {
        for k in 0..self.agents.len() {
            if self.agents[k].exited().is_some() {
                self.agents[k].kill_servers();
                std::thread::sleep(Duration::from_millis(rng.u64(100..MAX_RESTART_PAUSE_MS)));
                self.restarts += 1;
                self.boot(k);
            }
        }
    }

    fn kill(&mut self, k: usize, rng: &mut fastrand::Rng) {
        self.agents[k].power_off();
        self.kills += 1;
        std::thread::sleep(Duration::from_millis(rng.u64(100..MAX_RESTART_PAUSE_MS)));
        self.boot(k);
    }

    /// The first node whose current run logs `needle` from now on (polled every
    /// millisecond, restarting what exits meanwhile); `None` if none does within `bound`,
    /// or once every node is ready.
    fn first_to_log(
        &mut self,
        needle: &str,
        bound: Duration,
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        let count = |a: &Agent| a.stderr().matches(needle).count();
        let len = |a: &Agent| std::fs::metadata(&a.stderr_path).map_or(0, |m| m.len());
        let mut seen: Vec<usize> = self.agents.iter().map(count).collect();
        let mut lens: Vec<u64> = self.agents.iter().map(len).collect();
        let end = Instant::now() + bound;
        let mut polls = 0u32;
        while Instant::now() < end {
            // Read a log only when it grew: cheap enough to poll every millisecond.
            for (k, a) in self.agents.iter().enumerate() {
                let l = len(a);
                if l != lens[k] {
                    lens[k] = l;
                    if count(a) > seen[k] {
                        return Some(k);
                    }
                }
            }
            polls += 1;
            if polls.is_multiple_of(20) {
                // Formed: no window of a cold boot opens any more.
                if self
                    .agents
                    .iter()
                    .all(|a| a.stderr().contains("node ready"))
                {
                    return None;
                }
                let before: Vec<u32> = self.agents.iter().map(Agent::pid).collect();
                self.supervise(rng);
                // A restarted agent's log starts empty.
                for (k, a) in self.agents.iter().enumerate() {
                    if a.pid() != before[k] {
                        seen[k] = 0;
                        lens[k] = 0;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// The node that won the init lock, in this run of its agent or an earlier one.
    fn winner(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&k| self.node_log(k).contains("won the init lock"))
    }

    /// Every run's log of node `k`, oldest last.
    fn node_log(&self, k: usize) -> String {
        let dir = self.tb.node_dir(self.nodes[k]);
        tree(&dir)
            .into_iter()
            .filter(|f| f.starts_with("agent-boot.log"))
            .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
            .collect()
    }

    fn logs(&self) -> String {
        (0..self.nodes.len())
            .map(|k| format!("\n===== node {}\n{}", self.nodes[k], self.node_log(k)))
            .collect()
    }
}

async fn run_trial(tb: &Testbed, t: usize, nodes: Vec<usize>, rng: &mut fastrand::Rng) -> String {
    let n = nodes.len();
    let cluster = format!("crash-{t}");
    for &i in &nodes {
        tb.tag(i, "Cluster", &cluster).await;
        tb.write_config(
            i,
            &NodeOpts {
                extra_toml: format!(
                    "[cluster]\ntag_key = \"Cluster\"\ntag_value = \"{cluster}\"\n[init]\nexpected_size = {n}\nrevoke_root_token = false\n[agent]\naws_timeout_secs = 5\n"
                ),
                ..Default::default()
            },
        );
    }
    let kills = plan(rng, n);
    let started = Instant::now();
    let mut trial = Trial {
        tb,
        agents: nodes
            .iter()
            .map(|&i| tb.spawn_agent(i, &["boot"]))
            .collect(),
        nodes: nodes.clone(),
        cluster: cluster.clone(),
        restarts: 0,
        kills: 0,
    };
    for kill in &kills {
        match *kill {
            Kill::Node { k, ms } => {
                let at = Duration::from_millis(ms);
                while started.elapsed() < at {
                    trial.supervise(rng);
                    std::thread::sleep(Duration::from_millis(20));
                }
                trial.kill(k, rng);
            }
            Kill::LockWinner { ms } => {
                // The winner is known within a few seconds of the boot (bounded wait).
                let bound = Instant::now() + Duration::from_secs(60);
                let k = loop {
                    if let Some(k) = trial.winner() {
                        break Some(k);
                    }
                    if Instant::now() > bound {
                        break None;
                    }
                    trial.supervise(rng);
                    std::thread::sleep(Duration::from_millis(10));
                };
                let Some(k) = k else { continue };
                let at = Instant::now() + Duration::from_millis(ms);
                while Instant::now() < at {
                    trial.supervise(rng);
                    std::thread::sleep(Duration::from_millis(10));
                }
                trial.kill(k, rng);
            }
            Kill::Window { window, ms } => {
                // A window that no node opens any more (the cluster formed) is passed by.
                let bound = Duration::from_secs(60);
                let Some(k) = trial.first_to_log(window.line(), bound, rng) else {
                    continue;
                };
                std::thread::sleep(Duration::from_millis(ms));
                trial.kill(k, rng);
            }
        }
    }
    // Settle: every agent ready, restarting what fails (bounded).
    let deadline = Instant::now() + SETTLE_BOUND;
    loop {
        trial.supervise(rng);
        let ready = trial
            .agents
            .iter()
            .filter(|a| a.stderr().contains("node ready"))
            .count();
        if ready == n {
            break;
        }
        if trial.logs().contains(LOST_ANSWER_JOINED) {
            // The one end that is not a formed cluster, and is right: sys/init committed,
            // peers joined, the answer was lost. Nobody holds keys, and a second init would
            // make a second cluster; an operator starts over.
            let summary = lost_answer(tb, &trial, t).await;
            for a in trial.agents.iter_mut() {
                a.stop();
            }
            return format!("trial {t}: {n} nodes, kills {kills:?}: {summary}");
        }
        assert!(
            Instant::now() < deadline,
            "trial {t} ({cluster}, kills {kills:?}): only {ready}/{n} nodes ready after {SETTLE_BOUND:?} (restarts {}); logs:{}",
            trial.restarts,
            trial.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let settled = started.elapsed();
    let summary = check(tb, &trial, t).await;
    for a in trial.agents.iter_mut() {
        a.stop();
    }
    format!(
        "trial {t}: {n} nodes, kills {kills:?}, {} restarts, settled in {:.1} s; {summary}",
        trial.restarts,
        settled.as_secs_f64()
    )
}

/// What the initializer says when its `sys/init` answer was lost after peers joined.
const LOST_ANSWER_JOINED: &str = "other nodes joined the cluster it made";

/// A lost answer that peers joined: no second init, no store moved aside, one cluster id
/// among the nodes that serve.
async fn lost_answer(tb: &Testbed, trial: &Trial<'_>, t: usize) -> String {
    let logs = trial.logs();
    let ctx = || format!("trial {t} ({}); logs:{logs}", trial.cluster);
    assert_eq!(logs.matches("calling sys/init").count(), 1, "{}", ctx());
    assert!(
        !logs.contains("which nobody holds a key or token for, was moved aside"),
        "{}",
        ctx()
    );
    let mut ids = Vec::new();
    for &i in &trial.nodes {
        if let Some((_, b)) = tb.api(i).health().await {
            if let Some(id) = b["cluster_id"].as_str() {
                ids.push(id.to_owned());
            }
        }
    }
    ids.sort();
    ids.dedup();
    assert!(ids.len() <= 1, "one cluster at most: {ids:?}\n{}", ctx());
    "the sys/init answer was lost after peers joined: refused with exit 80, no second init, no store moved (the operator's runbook)".into()
}

/// The trial's end state: one cluster, escrow verified, keys that make a root token.
async fn check(tb: &Testbed, trial: &Trial<'_>, t: usize) -> String {
    let n = trial.nodes.len();
    let ctx = || format!("trial {t} ({}); logs:{}", trial.cluster, trial.logs());
    let first = trial.nodes[0];
    let (code, out) = tb.escrow_verify(first);
    assert_eq!(code, 0, "escrow verify: {out}\n{}", ctx());
    let marker = vault_bootstrap::escrow::read_marker(
        &vault_bootstrap::aws::s3::SdkS3::new(&tb.sdk().await),
        &tb.layout(&trial.cluster),
        Duration::from_secs(10),
    )
    .await
    .unwrap()
    .expect("marker");
    let want = marker
        .cluster_id
        .clone()
        .expect("the marker records the cluster id");
    for &i in &trial.nodes {
        let (_, body) = tb
            .api(i)
            .health()
            .await
            .unwrap_or_else(|| panic!("node {i} answers\n{}", ctx()));
        assert_eq!(
            body["cluster_id"].as_str(),
            Some(want.as_str()),
            "node {i} serves another cluster\n{}",
            ctx()
        );
    }
    // A leader change may still be under way after a restart: break-glass needs an active
    // node to answer generate-root.
    poll("an active node", Duration::from_secs(60), || async {
        for &i in &trial.nodes {
            if let Some((200, _)) = tb.api(i).health().await {
                return Some(());
            }
        }
        None
    })
    .await;
    let (code, token, err) = tb.run_agent(
        first,
        &["break-glass", "--from-escrow", "--yes"],
        Duration::from_secs(90),
    );
    assert_eq!(code, 0, "break-glass: {err}\n{}", ctx());
    let token = token.trim().to_string();
    let servers = poll("the raft configuration", Duration::from_secs(30), || {
        let token = token.clone();
        async move { raft_servers(tb, first, &token).await }
    })
    .await;
    assert_eq!(servers.len(), n, "raft servers {servers:?}\n{}", ctx());
    let logs = trial.logs();
    let moved = logs
        .matches("which nobody holds a key or token for, was moved aside")
        .count();
    let stale = logs
        .matches("joined the cluster but never received its data")
        .count();
    let inits = logs.matches("sys/init succeeded").count();
    format!("one cluster ({n} servers), escrow verified, root token generated; {inits} init(s), {moved} stranded store(s) and {stale} store(s) joined without data moved aside")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_losses_at_random_moments_never_strand_a_cluster_or_its_keys() {
    let seed = seed();
    let (threes, fives) = trials();
    say(&format!("crash trials: seed {seed} (replay: VB_CRASH_SEED={seed}), {threes} x 3 nodes, {fives} x 5 nodes"));
    let mut rng = fastrand::Rng::with_seed(seed);
    let total = threes * 3 + fives * 5;
    let tb = Testbed::start(60, total);
    let mut next = 0;
    let mut lines = Vec::new();
    for t in 0..threes + fives {
        let n = if t < threes { 3 } else { 5 };
        let nodes: Vec<usize> = (next..next + n).collect();
        next += n;
        let line = run_trial(&tb, t, nodes, &mut rng).await;
        say(&line);
        lines.push(line);
    }
    say(&format!(
        "crash trials: seed {seed}: {} trials, 0 clusters stranded",
        lines.len()
    ));
}

/// Straight to stderr: the test harness captures `println!`, and the seed must be seen
/// also when every trial passes.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A joiner loses power a few milliseconds after its server logged "successfully joined the
/// raft cluster", before the leader's data reached it: its store then holds the leader's
/// raft configuration and nothing else, and its server answers "not initialized" on every
/// later start while `retry_join` fails with "cluster already has state". Restarted as
/// systemd would, it must become a member again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_killed_right_after_its_raft_join_joins_again() {
    const JOINED: &str = "successfully joined the raft cluster";
    let tb = Testbed::start(93, 3);
    let extra = "[init]\nrevoke_root_token = false\n";
    let mut agents = boot_all(&tb, 2, extra);
    tb.write_config(
        2,
        &NodeOpts {
            extra_toml: extra.into(),
            ..Default::default()
        },
    );
    let mut joiner = tb.spawn_agent(2, &["boot"]);
    let after = joiner.power_off_on_log(JOINED, Duration::from_millis(2), Duration::from_secs(120));
    say(&format!(
        "joiner killed {after:?} after its server's join line"
    ));
    let mut restarts = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    joiner = tb.respawn_agent(2, &["boot"], &[]);
    loop {
        if joiner.stderr().contains("node ready") {
            break;
        }
        if joiner.exited().is_some() {
            // systemd's Restart=on-failure.
            joiner.kill_servers();
            restarts += 1;
            joiner = tb.respawn_agent(2, &["boot"], &[]);
        }
        assert!(
            Instant::now() < deadline,
            "the killed joiner never became a member again ({restarts} restarts):\n{}",
            tail(&joiner.stderr(), 60)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let root = tb.escrowed("test-vault", "root-token").await;
    let voters = wait_voters(&tb, 0, &root, 3).await;
    say(&format!(
        "the joiner is a member again after {restarts} restart(s); voters {voters:?}"
    ));
    let log: String = tree(&tb.node_dir(2))
        .into_iter()
        .filter(|f| f.starts_with("agent-boot.log"))
        .map(|f| std::fs::read_to_string(tb.node_dir(2).join(f)).unwrap_or_default())
        .collect();
    assert!(
        log.contains("joined the cluster but never received its data"),
        "the agent said why it moved the store aside:\n{}",
        tail(&log, 60)
    );
    joiner.stop();
    for a in agents.iter_mut() {
        a.stop();
    }
}
