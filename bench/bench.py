#!/usr/bin/env python3
"""The measuring half of bench/run.sh (run that, not this: it picks the binary, checks the
test-bed and owns the last-resort cleanup).

Against the local test-bed on 127.0.8.0/24 (moto on 127.0.8.1:5000, one IMDS per node on
:1338, real OpenBao servers), in one run (letters as in issue 7):

  a. the boot path (IMDS, discovery, TLS fetch + check, vault.hcl written), the agent against
     bench/baseline-userdata.sh (curl + AWS CLI + openssl + a heredoc), one node at a time,
     BOOT_REPS each, interleaved; then once each through a counting proxy; and the agent's
     boot path per step inside the 3-node boots below;
  b. cluster formation, agent vs floor (the same N bare `bao server` processes with the same
     config shape, initialised by this script), 3 nodes (REPS) and 5 nodes (once);
  c. SIGKILL of the active node's server -> a survivor answers 200 (each 3-node repetition,
     agent and floor);
  d. the agent's footprint: VmHWM and utime+stime at "node ready", binary size;
  e. the AWS calls of 3, 5 and 7 simultaneous boots, per agent, through one counting proxy
     per agent;
  f. reboot to serving: each formed 3-node cluster stopped as a reboot stops it (SIGTERM)
     and booted again with EC2 and S3 unreachable (the AWS endpoint on a closed port): until
     one node answers 200 and all are unsealed members, beside the same cluster's cold boot.

Every wait is bounded. Every process started here is written to PIDS (pid, kind, a string
its /proc/PID/cmdline must contain) before anything else happens, so run.sh can stop them
if this script dies; this script stops them itself on exit: agents SIGTERM first (they
forward it to their servers), then SIGKILL for what is left, by PID only.
The root token is read from the escrow (KMS) or the floor's init answer and is kept in
memory only: never printed, never written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import re
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig

BLOCK = "127.0.8"
MOTO_URL = f"http://{BLOCK}.1:5000"
REGION = "us-east-1"
BUCKET = "vault-resources"
TAG_KEY = "aws:autoscaling:groupName"
IMDS_PORT = 1338
HEALTH_POLL = 0.1  # seconds between sys/health polls of one node
FORM_BOUND = 240.0  # seconds for one cluster to form (all milestones)
FAILOVER_BOUND = 60.0

# Instance IPs: moto never frees an IP, so every agent cluster gets fresh ones.
#   .11-.13 .14-.16 .17-.19  3-node repetitions 1-3 (up to REPS=3); .11-.13 (tag bench-3n-r1)
#                            also serve the boot-path comparison first: it writes nothing to
#                            AWS and starts no server, so the cluster formed there later is new
#   .20-.24                  5-node cluster
#   .25-.27 .28-.32 .33-.39  AWS-call counts of 3, 5 and 7 simultaneous boots
# (the certificate seed.py makes covers .1-.40). The floor (bare servers, no EC2 instance
# needed) uses .31-.35 while no agent cluster runs; counting proxies .2-.8:5001.
CALL_SIZES = (3, 5, 7)
FLOOR_IPS = [f"{BLOCK}.{31 + i}" for i in range(5)]


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] bench: {msg}\n")
    sys.stderr.flush()


class BenchError(Exception):
    pass


class Interrupted(BaseException):
    pass


def on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


# ------------------------------------------------------------------ processes

def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat.rsplit(")", 1)[-1].strip().startswith("Z")


def children_of(pid: int) -> list[int]:
    out: set[int] = set()
    try:
        for t in Path(f"/proc/{pid}/task").iterdir():
            try:
                out.update(int(x) for x in (t / "children").read_text().split())
            except (OSError, ValueError):
                pass
    except OSError:
        pass
    return sorted(out)


def cmdline_has(pid: int, needle: str) -> bool:
    try:
        return needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def proc_cpu_ms(pid: int) -> float | None:
    """utime+stime of the process (all its threads), in ms."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tck = os.sysconf("SC_CLK_TCK")
    return (int(f[11]) + int(f[12])) * 1000.0 / tck


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Procs:
    """Every process this script starts; stopped by PID only."""

    def __init__(self, registry: Path, work: Path):
        self.registry = registry
        self.work = str(work)
        self.items: list[dict] = []
        self.lock = threading.Lock()

    def _record(self, pid: int, kind: str, needle: str) -> None:
        with open(self.registry, "a") as f:
            f.write(f"{pid}\t{kind}\t{needle}\n")

    def spawn(self, kind: str, argv: list[str], env: dict, log_path: Path, needle: str,
              group: str, stdout_pipe: bool = False) -> subprocess.Popen:
        f = open(log_path, "ab")
        p = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else f, stderr=f,
            start_new_session=True, cwd=self.work)
        f.close()
        with self.lock:
            self.items.append({"p": p, "kind": kind, "needle": needle, "group": group,
                               "children": []})
            self._record(p.pid, kind, needle)
        return p

    def track_children(self, group: str | None = None) -> None:
        """Remembers the servers the agents started (direct children), to stop them even
        if an agent dies first."""
        with self.lock:
            for it in self.items:
                if it["kind"] != "agent" or (group and it["group"] != group):
                    continue
                if it["p"].poll() is not None:
                    continue
                for c in children_of(it["p"].pid):
                    if c not in it["children"] and cmdline_has(c, self.work):
                        it["children"].append(c)
                        self._record(c, "child", self.work)

    def stop(self, group: str | None = None) -> None:
        """Agents: SIGTERM, 20 s, SIGKILL; then their leftover children; then floor
        servers (SIGTERM, 10 s, SIGKILL); then services (SIGTERM, 5 s, SIGKILL)."""
        self.track_children(group)
        sel = [it for it in self.items if group is None or it["group"] == group]
        for kinds, grace in ((("agent",), 20.0), (("server",), 10.0), (("service", "tool"), 5.0)):
            batch = [it for it in sel if it["kind"] in kinds and it["p"].poll() is None]
            for it in batch:
                try:
                    it["p"].send_signal(signal.SIGTERM)
                except OSError:
                    pass
            end = time.monotonic() + grace
            for it in batch:
                try:
                    it["p"].wait(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log(f"{it['kind']} pid {it['p'].pid} ignored SIGTERM for {grace:.0f} s: SIGKILL")
                    it["p"].kill()
                    try:
                        it["p"].wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
            if kinds == ("agent",):
                for it in sel:
                    if it["kind"] != "agent":
                        continue
                    for c in it["children"]:
                        if alive(c) and cmdline_has(c, self.work):
                            log(f"server pid {c} outlived its agent: SIGKILL")
                            try:
                                os.kill(c, signal.SIGKILL)
                            except OSError:
                                pass
        with self.lock:
            self.items = [it for it in self.items if it not in sel or it["p"].poll() is None]


# ------------------------------------------------------------------ Vault API

class Api:
    def __init__(self, ca: Path):
        self.ctx = ssl.create_default_context(cafile=str(ca))

    def call(self, ip: str, method: str, path: str, token: str | None = None,
             body: dict | None = None, timeout: float = 3.0) -> tuple[int, dict]:
        c = http.client.HTTPSConnection(ip, 8200, context=self.ctx, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"}
            if token:
                headers["X-Vault-Token"] = token
            c.request(method, "/v1/" + path,
                      body=json.dumps(body) if body is not None else None, headers=headers)
            r = c.getresponse()
            data = r.read()
            try:
                j = json.loads(data) if data else {}
            except ValueError:
                j = {}
            return r.status, j
        finally:
            c.close()

    def health(self, ip: str, timeout: float = 1.0) -> int | None:
        try:
            return self.call(ip, "GET", "sys/health", timeout=timeout)[0]
        except (OSError, http.client.HTTPException):
            return None


class HealthWatch(threading.Thread):
    """Polls one node's sys/health on a keep-alive connection; remembers when each status
    was first seen (time.monotonic)."""

    def __init__(self, api: Api, ip: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.api, self.ip, self.stop_ev = api, ip, stop
        self.first: dict[int, float] = {}
        self.last: int | None = None

    def run(self) -> None:
        conn = None
        while not self.stop_ev.is_set():
            code = None
            try:
                if conn is None:
                    conn = http.client.HTTPSConnection(self.ip, 8200, context=self.api.ctx, timeout=2)
                conn.request("GET", "/v1/sys/health")
                r = conn.getresponse()
                r.read()
                code = r.status
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
            now = time.monotonic()
            if code is not None and code not in self.first:
                self.first[code] = now
            self.last = code
            self.stop_ev.wait(HEALTH_POLL)
        if conn is not None:
            conn.close()

    def unsealed_at(self) -> float | None:
        ts = [self.first[c] for c in (200, 429) if c in self.first]
        return min(ts) if ts else None


def raft_voters(api: Api, ip: str, token: str) -> int | None:
    try:
        code, body = api.call(ip, "GET", "sys/storage/raft/configuration", token=token, timeout=3)
    except (OSError, http.client.HTTPException):
        return None
    if code != 200:
        return None
    servers = ((body.get("data") or {}).get("config") or {}).get("servers") or []
    return sum(1 for s in servers if s.get("voter"))


# ------------------------------------------------------------------ log parsing

STEPS = [
    ("imds", "phase done: imds+discovery"),
    ("tls", "phase done: tls"),
    ("render", "phase done: render"),
    ("spawned", "phase done: server started"),
    ("answering", "boot complete: the server answers sys/health"),
    ("ready", "node ready"),
]
TS_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)")
MS_RE = re.compile(r"elapsed_ms=(\d+)")


def parse_agent_log(text: str) -> dict:
    out: dict = {}
    for line in text.splitlines():
        for key, needle in STEPS:
            if key in out or needle not in line:
                continue
            m, t = MS_RE.search(line), TS_RE.match(line)
            if m and t:
                ts = dt.datetime.fromisoformat(t.group(1).replace("Z", "+00:00")).timestamp()
                out[key] = {"ms": int(m.group(1)), "wall": ts}
        if "init_ts" not in out and "sys/init succeeded" in line:
            t = TS_RE.match(line)
            if t:
                out["init_ts"] = dt.datetime.fromisoformat(t.group(1).replace("Z", "+00:00")).timestamp()
    return out


# ------------------------------------------------------------------ the bench

class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.root = Path(a.root)
        self.work = Path(a.work)
        self.venv = Path(a.venv)
        self.py = str(self.venv / "bin/python3")
        self.bin = a.bin
        self.bao = a.bao
        self.procs = Procs(self.work / "pids.tsv", self.work)
        self.t_start = time.monotonic()
        self.load_start = Path("/proc/loadavg").read_text().split()[:3]
        self.results: dict = {"agent3": [], "floor3": [], "agent5": [], "floor5": [],
                              "footprint": [], "calls": {}, "bootpath": None}
        self.user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip() or "root"

    # -------------------------------------------------------------- test-bed
    def base_env(self) -> dict:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.work),
                "LANG": "C.UTF-8"}

    def wait_listen(self, host: str, port: int, bound: float, proc: subprocess.Popen, what: str):
        import socket
        end = time.monotonic() + bound
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise BenchError(f"{what} exited at start (see {self.work})")
            try:
                socket.create_connection((host, port), timeout=0.3).close()
                return
            except OSError:
                time.sleep(0.1)
        raise BenchError(f"{what} did not listen on {host}:{port} within {bound:.0f} s")

    def wait_ready_line(self, proc: subprocess.Popen, bound: float, what: str):
        res: list[bool] = []

        def reader():
            for line in proc.stdout:
                if line.strip() == b"READY":
                    res.append(True)
                    break
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(bound)
        if not res:
            raise BenchError(f"{what} did not print READY within {bound:.0f} s")

    def setup(self) -> None:
        need = 9 + 5 + sum(CALL_SIZES)
        log(f"moto_server on {BLOCK}.1:5000")
        env = self.base_env()
        moto = self.procs.spawn("service", [str(self.venv / "bin/moto_server"), "-H", f"{BLOCK}.1", "-p", "5000"],
                                env, self.work / "moto.log", f"{BLOCK}.1", "testbed")
        self.wait_listen(f"{BLOCK}.1", 5000, 30, moto, "moto_server")
        log(f"seed.py up: {need} instances {BLOCK}.11-.{10 + need}, KMS keys, bucket with TLS")
        t = time.monotonic()
        r = subprocess.run([self.py, str(self.root / "tests/testbed/seed.py"), "up", "--moto", MOTO_URL,
                            "--region", REGION, "--block", BLOCK, "--nodes", str(need), "--asg", "bench-pool",
                            "--bucket", BUCKET, "--out", str(self.work / "seed")],
                           capture_output=True, text=True, timeout=300, env={**env, **self.aws_env_static()})
        if r.returncode != 0:
            raise BenchError(f"seed.py up failed:\n{r.stderr[-3000:]}")
        log(f"    seeded in {time.monotonic() - t:.1f} s")
        self.seed = json.loads((self.work / "seed/env.json").read_text())
        self.ips = [i["ip"] for i in self.seed["instances"]]
        self.ids = {i["ip"]: i["id"] for i in self.seed["instances"]}
        self.ca = self.work / "seed/ca.pem"
        self.api = Api(self.ca)
        bc = BotoConfig(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30)
        kw = dict(endpoint_url=MOTO_URL, region_name=REGION, aws_access_key_id="testing",
                  aws_secret_access_key="testing", config=bc)
        self.ec2 = boto3.client("ec2", **kw)
        self.s3 = boto3.client("s3", **kw)
        self.kms = boto3.client("kms", **kw)
        # One ASG tag value per cluster: a new cluster (and escrow prefix) every time.
        groups = {}
        for r_ in range(self.a.reps):
            groups[f"bench-3n-r{r_ + 1}"] = self.ips[3 * r_:3 * r_ + 3]
        groups["bench-5n"] = self.ips[9:14]
        at = 14
        for n in CALL_SIZES:
            groups[f"bench-calls-{n}"] = self.ips[at:at + n]
            at += n
        self.groups = groups
        for tag, ips in groups.items():
            self.ec2.create_tags(Resources=[self.ids[ip] for ip in ips],
                                 Tags=[{"Key": TAG_KEY, "Value": tag}])
        log("imds.py: one IMDSv2 listener per instance")
        (self.work / "imds-control").mkdir(exist_ok=True)
        argv = [self.py, str(self.root / "tests/testbed/imds.py"), "--moto", MOTO_URL, "--region", REGION,
                "--port", str(IMDS_PORT), "--control-dir", str(self.work / "imds-control")]
        for ip in self.ips:
            argv += ["--listen", ip]
        imds = self.procs.spawn("service", argv, {**env, **self.aws_env_static()}, self.work / "imds.log",
                                "imds.py", "testbed", stdout_pipe=True)
        self.wait_ready_line(imds, 30, "imds.py")

    def aws_env_static(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    # -------------------------------------------------------------- agents
    def agent_env(self, ip: str, node_dir: Path, endpoint: str) -> dict:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(node_dir),
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{ip}:{IMDS_PORT}",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_REGION": REGION,
            "VAULT_BOOTSTRAP_LOG": "info",
            # The bench reads the agent's stderr, also where a journald socket exists.
            "VAULT_BOOTSTRAP_LOG_TARGET": "stderr",
        }

    def write_agent_config(self, d: Path, n: int, keep_root: bool, binary: str | None = None,
                           flavor: str | None = None) -> Path:
        # audit_file_path is the same for every node of a cluster, as it would be in
        # production: OpenBao stores the declared audit device, and a node whose config
        # declares a different file_path cannot become active ("modifications to audit
        # devices are not allowed") -- per-node paths made every failover hang.
        (d / "etc").mkdir(parents=True, exist_ok=True)
        # An explicit flavor skips the `<binary> version` probe (the boot-path comparison
        # names it, as the baseline script hard-codes its config).
        flavor_line = f'flavor = "{flavor}"\n' if flavor else ""
        cfg = f'''[cluster]
tag_key = "{TAG_KEY}"
min_peers = 1
discovery_timeout_secs = 20

[tls]
bucket = "{BUCKET}"

[seal]
kms_key_id = "alias/vault-unseal"
endpoint = "{MOTO_URL}"

[vault]
binary = "{binary or self.bao}"
{flavor_line}config_file = "{d}/etc/vault.hcl"
data_dir = "{d}/data"
tls_dir = "{d}/tls"
bind_address = "private-ip"
launcher = "exec"
user = "{self.user}"
health_timeout_secs = 60
performance_multiplier = 1

[agent]
state_dir = "{d}/state"
imds_timeout_secs = 10
aws_timeout_secs = 10

[init]
escrow_kms_key_id = "alias/vault-escrow"
audit_file_path = "{d.parent}/audit/audit.log"
expected_size = {max(n, 3)}
join_timeout_secs = 120
'''
        if keep_root:
            cfg += "revoke_root_token = false\n"
        p = d / "config.toml"
        p.write_text(cfg)
        return p

    def escrow_root_token(self, tag: str) -> str | None:
        key = f"vault-bootstrap/{tag}/root-token.enc"
        try:
            blob = self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None
        except Exception:
            return None
        out = self.kms.decrypt(CiphertextBlob=blob, EncryptionContext={
            "vault-bootstrap:cluster": tag, "vault-bootstrap:item": "root-token",
            "vault-bootstrap:class": "recovery"})
        return out["Plaintext"].decode()

    def marker_exists(self, tag: str) -> bool:
        try:
            self.s3.head_object(Bucket=BUCKET, Key=f"vault-bootstrap/{tag}/cluster-initialized.json")
            return True
        except Exception:
            return False

    def run_verify(self, d: Path, ip: str) -> tuple[int, str]:
        env = self.agent_env(ip, d, MOTO_URL)
        try:
            r = subprocess.run([self.bin, "--config", str(d / "config.toml"), "escrow", "verify"],
                               env=env, capture_output=True, text=True, timeout=60, cwd=str(self.work))
        except subprocess.TimeoutExpired:
            return 124, "timeout"
        return r.returncode, r.stdout + r.stderr

    def agent_cluster(self, name: str, tag: str, ips: list[str], formation: bool, failover: bool,
                      endpoints: list[str] | None = None, reboot: bool = False) -> dict:
        n = len(ips)
        cdir = self.work / name
        dirs = [cdir / f"node-{i}" for i in range(n)]
        for d in dirs:
            self.write_agent_config(d, n, keep_root=formation)
        envs = [self.agent_env(ip, d, (endpoints[i] if endpoints else MOTO_URL))
                for i, (ip, d) in enumerate(zip(ips, dirs))]
        stop = threading.Event()
        watches = [HealthWatch(self.api, ip, stop) for ip in ips]
        for w in watches:
            w.start()
        agents, walls = [], []
        t0 = time.monotonic()
        for i, d in enumerate(dirs):
            walls.append(time.time())
            agents.append(self.procs.spawn("agent", [self.bin, "--config", str(d / "config.toml"), "boot"],
                                           envs[i], d / "agent.log", str(d), name))
        res: dict = {"name": name, "n": n, "t0": t0, "nodes": [], "milestones": {}}
        ms = res["milestones"]
        try:
            self._wait_formation(name, tag, ips, dirs, agents, watches, t0, res, formation)
            if failover:
                res["failover_s"] = self._failover(ips, agents=agents, group=name)
            if reboot:
                res["reboot"] = self._reboot(name, ips, dirs, envs)
        finally:
            stop.set()
            logs = [parse_agent_log((d / "agent.log").read_text(errors="replace")) for d in dirs]
            for i, lg in enumerate(logs):
                node = {"ip": ips[i], "spawn_wall": walls[i], "log": lg,
                        "winner": "init_ts" in lg}
                node.update(res.get("fp", {}).get(i, {}))
                res["nodes"].append(node)
            self.procs.stop(group=name)
        if formation:
            log(f"  {name}: first active {ms.get('first_active', float('nan')):.1f} s, "
                f"all unsealed {ms.get('all_unsealed', float('nan')):.1f} s, "
                f"{n} voters {ms.get('voters', float('nan')):.1f} s, "
                f"escrow verify ok {ms.get('verify', float('nan')):.1f} s"
                + (f", failover {res['failover_s']:.2f} s" if "failover_s" in res else ""))
        return res

    def _wait_formation(self, name, tag, ips, dirs, agents, watches, t0, res, formation):
        n = len(ips)
        ms = res["milestones"]
        fp: dict[int, dict] = {}
        res["fp"] = fp
        token: list[str] = []
        done = threading.Event()
        end = t0 + FORM_BOUND

        def token_thread():
            while not done.is_set() and time.monotonic() < end:
                try:
                    tok = self.escrow_root_token(tag)
                except Exception as e:  # noqa: BLE001
                    log(f"  root token from escrow: {type(e).__name__}")
                    tok = None
                if tok:
                    token.append(tok)
                    return
                done.wait(0.3)

        def voters_thread():
            while not done.is_set() and time.monotonic() < end:
                if token:
                    active = [w.ip for w in watches if w.last == 200] or [ips[0]]
                    v = raft_voters(self.api, active[0], token[0])
                    if v == n:
                        ms["voters"] = time.monotonic() - t0
                        return
                done.wait(0.25)

        def verify_thread():
            while not done.is_set() and time.monotonic() < end:
                if self.marker_exists(tag):
                    code, out = self.run_verify(dirs[1 % n], ips[1 % n])
                    if code == 0:
                        ms["verify"] = time.monotonic() - t0
                        return
                    res["verify_last"] = out[-500:]
                done.wait(0.3)

        threads = []
        if formation:
            threads = [threading.Thread(target=f, daemon=True) for f in (token_thread, voters_thread, verify_thread)]
            for t in threads:
                t.start()
        try:
            while True:
                now = time.monotonic()
                self.procs.track_children(name)
                for i, (a, d) in enumerate(zip(agents, dirs)):
                    if a.poll() is not None:
                        raise BenchError(f"{name}: agent {i} exited with {a.returncode} during the boot; "
                                         f"log {d / 'agent.log'}:\n" +
                                         "\n".join((d / "agent.log").read_text(errors="replace").splitlines()[-15:]))
                    if i not in fp and "node ready" in (d / "agent.log").read_text(errors="replace"):
                        # The agent idles after "node ready" (it only supervises): CPU read now
                        # is its boot's CPU. VmHWM is the kernel's own peak-RSS record.
                        fp[i] = {"cpu_ms": proc_cpu_ms(a.pid), "hwm_kb": proc_status_kb(a.pid, "VmHWM"),
                                 "rss_kb": proc_status_kb(a.pid, "VmRSS"), "ready_seen": now - t0}
                firsts = [w.first.get(200) for w in watches if 200 in w.first]
                if firsts and "first_active" not in ms:
                    ms["first_active"] = min(firsts) - t0
                uns = [w.unsealed_at() for w in watches]
                if all(u is not None for u in uns) and "all_unsealed" not in ms:
                    ms["all_unsealed"] = max(uns) - t0
                all_ready = len(fp) == n
                if all_ready and (not formation or ("voters" in ms and "verify" in ms and "all_unsealed" in ms)):
                    break
                if now > end:
                    raise BenchError(f"{name}: not formed within {FORM_BOUND:.0f} s: milestones {ms}, "
                                     f"ready {sorted(fp)}, {res.get('verify_last', '')}")
                time.sleep(0.1)
        finally:
            done.set()
            for t in threads:
                t.join(65)
        if formation:
            ms["formed"] = max(ms["voters"], ms["verify"], ms["all_unsealed"])

    def _reboot(self, name: str, ips: list[str], dirs: list[Path], envs: list[dict]) -> dict:
        """(f) Stop every agent and server of the cluster as a reboot does (SIGTERM), then
        boot them again with EC2 and S3 unreachable: nothing listens on the AWS endpoint.
        Seconds until one node answers 200, until all are unsealed, until every agent logs
        node ready (from its last known good files)."""
        self.procs.stop(group=name)
        dead = f"http://{BLOCK}.1:9"
        stop = threading.Event()
        watches = [HealthWatch(self.api, ip, stop) for ip in ips]
        for w in watches:
            w.start()
        logs = [d / "agent-reboot.log" for d in dirs]
        t0 = time.monotonic()
        for i, d in enumerate(dirs):
            self.procs.spawn("agent", [self.bin, "--config", str(d / "config.toml"), "boot"],
                             {**envs[i], "AWS_ENDPOINT_URL": dead}, logs[i], str(d), name)
        out: dict = {}
        end = t0 + FORM_BOUND
        try:
            while len(out) < 3:
                if time.monotonic() > end:
                    raise BenchError(f"{name}: reboot without EC2/S3 not serving within {FORM_BOUND:.0f} s: {out}")
                self.procs.track_children(name)
                firsts = [w.first[200] for w in watches if 200 in w.first]
                if firsts and "first_active" not in out:
                    out["first_active"] = min(firsts) - t0
                uns = [w.unsealed_at() for w in watches]
                if all(u is not None for u in uns) and "all_unsealed" not in out:
                    out["all_unsealed"] = max(uns) - t0
                texts = [p.read_text(errors="replace") if p.exists() else "" for p in logs]
                if all("node ready" in t for t in texts) and "ready" not in out:
                    if not all("started from its last known good files" in t for t in texts):
                        raise BenchError(f"{name}: a rebooted agent did not start from disk (see {logs})")
                    out["ready"] = time.monotonic() - t0
                time.sleep(0.05)
        finally:
            stop.set()
        log(f"  {name}: reboot without EC2/S3: first active {out['first_active']:.2f} s, "
            f"all unsealed {out['all_unsealed']:.2f} s, every agent ready {out['ready']:.2f} s")
        return out

    def _failover(self, ips, agents=None, group=None, servers=None) -> float:
        """SIGKILL the active node's server; seconds until a survivor answers 200."""
        active = None
        end = time.monotonic() + 30
        while active is None and time.monotonic() < end:
            for i, ip in enumerate(ips):
                if self.api.health(ip) == 200:
                    active = i
                    break
            else:
                time.sleep(0.2)
        if active is None:
            raise BenchError("failover: no active node found within 30 s")
        if agents is not None:
            self.procs.track_children(group)
            kids = [c for c in children_of(agents[active].pid) if cmdline_has(c, "server") and cmdline_has(c, str(self.work))]
            if len(kids) != 1:
                raise BenchError(f"failover: agent {active} has server children {kids}, expected one")
            victim = kids[0]
        else:
            victim = servers[active].pid
        survivors = [ip for i, ip in enumerate(ips) if i != active]
        os.kill(victim, signal.SIGKILL)
        t = time.monotonic()
        end = t + FAILOVER_BOUND
        while time.monotonic() < end:
            for ip in survivors:
                if self.api.health(ip, timeout=0.5) == 200:
                    return time.monotonic() - t
            time.sleep(0.05)
        raise BenchError(f"failover: no survivor answered 200 within {FAILOVER_BOUND:.0f} s")

    # -------------------------------------------------------------- floor
    def floor_hcl(self, d: Path, ip: str, node_id: str, peers: list[str]) -> str:
        # The shape the agent renders for OpenBao (see `vault-bootstrap render`), by hand.
        joins = "".join(f'''
  retry_join {{
    leader_api_addr       = "https://{p}:8200"
    leader_ca_cert_file   = "{d}/tls/ca.pem"
  }}
''' for p in peers)
        return f'''ui            = true
disable_mlock = true
api_addr      = "https://{ip}:8200"
cluster_addr  = "https://{ip}:8201"

storage "raft" {{
  path                   = "{d}/data"
  node_id                = "{node_id}"
  performance_multiplier = 1
{joins}}}

listener "tcp" {{
  address         = "{ip}:8200"
  cluster_address = "{ip}:8201"
  tls_cert_file   = "{d}/tls/server.pem"
  tls_key_file    = "{d}/tls/server.key"
  tls_min_version = "tls12"
}}

seal "awskms" {{
  region     = "{REGION}"
  kms_key_id = "alias/vault-unseal"
  endpoint   = "{MOTO_URL}"
}}

audit "file" "file" {{
  options {{
    file_path = "{d.parent}/audit/audit.log"
  }}
}}

telemetry {{
  prometheus_retention_time = "24h"
  disable_hostname          = true
}}
'''

    def floor_cluster(self, name: str, n: int, failover: bool) -> dict:
        ips = FLOOR_IPS[:n]
        cdir = self.work / name
        seed = self.work / "seed"
        servers = []
        dirs = []
        for i, ip in enumerate(ips):
            d = cdir / f"node-{i}"
            for sub, mode in (("tls", 0o750), ("data", 0o700), ("etc", 0o755), ("../audit", 0o750)):
                (d / sub).mkdir(parents=True, exist_ok=True)
                os.chmod(d / sub, mode)
            for f, mode in (("server.pem", 0o644), ("server.key", 0o600), ("ca.pem", 0o644)):
                (d / "tls" / f).write_bytes((seed / f).read_bytes())
                os.chmod(d / "tls" / f, mode)
            (d / "etc/vault.hcl").write_text(self.floor_hcl(d, ip, f"floor-{i}", [p for p in ips if p != ip]))
            dirs.append(d)
        env = {**self.base_env(), **self.aws_env_static()}
        stop = threading.Event()
        watches = [HealthWatch(self.api, ip, stop) for ip in ips]
        for w in watches:
            w.start()
        t0 = time.monotonic()
        for i, d in enumerate(dirs):
            servers.append(self.procs.spawn("server", [self.bao, "server", f"-config={d}/etc/vault.hcl"],
                                            {**env, "HOME": str(d)}, d / "server.log", str(d), name))
        res: dict = {"name": name, "n": n, "milestones": {}}
        ms = res["milestones"]
        token: list[str] = []
        init_err: list[str] = []

        def init_thread():
            end = t0 + FORM_BOUND
            while time.monotonic() < end:
                if self.api.health(ips[0], timeout=0.5) == 501:
                    break
                time.sleep(0.05)
            else:
                init_err.append("node 0 never answered 501")
                return
            ms["init_start"] = time.monotonic() - t0
            try:
                code, body = self.api.call(ips[0], "PUT", "sys/init",
                                           body={"recovery_shares": 5, "recovery_threshold": 3}, timeout=120)
            except (OSError, http.client.HTTPException) as e:
                init_err.append(f"sys/init: {type(e).__name__}")
                return
            if code != 200 or not body.get("root_token"):
                init_err.append(f"sys/init answered {code}")
                return
            ms["init_done"] = time.monotonic() - t0
            token.append(body["root_token"])
            body.clear()

        it = threading.Thread(target=init_thread, daemon=True)
        it.start()
        try:
            end = t0 + FORM_BOUND
            last_v = 0.0
            while True:
                now = time.monotonic()
                for i, s in enumerate(servers):
                    if s.poll() is not None:
                        raise BenchError(f"{name}: bao {i} exited with {s.returncode}; see {dirs[i] / 'server.log'}")
                if init_err:
                    raise BenchError(f"{name}: {init_err[0]}")
                firsts = [w.first.get(200) for w in watches if 200 in w.first]
                if firsts and "first_active" not in ms:
                    ms["first_active"] = min(firsts) - t0
                uns = [w.unsealed_at() for w in watches]
                if all(u is not None for u in uns) and "all_unsealed" not in ms:
                    ms["all_unsealed"] = max(uns) - t0
                if token and "voters" not in ms and now - last_v >= 0.25:
                    last_v = now
                    active = [w.ip for w in watches if w.last == 200] or [ips[0]]
                    if raft_voters(self.api, active[0], token[0]) == n:
                        ms["voters"] = time.monotonic() - t0
                if "voters" in ms and "all_unsealed" in ms:
                    ms["formed"] = max(ms["voters"], ms["all_unsealed"])
                    break
                if now > end:
                    raise BenchError(f"{name}: not formed within {FORM_BOUND:.0f} s: {ms}")
                time.sleep(0.1)
            if failover:
                res["failover_s"] = self._failover(ips, servers=servers)
        finally:
            stop.set()
            token.clear()
            it.join(5)
            self.procs.stop(group=name)
        log(f"  {name}: first active {ms.get('first_active', float('nan')):.1f} s, "
            f"all unsealed {ms.get('all_unsealed', float('nan')):.1f} s, {n} voters {ms.get('voters', float('nan')):.1f} s"
            + (f", failover {res['failover_s']:.2f} s" if "failover_s" in res else ""))
        return res

    # -------------------------------------------------------------- AWS calls
    def start_proxies(self, hosts: list[str], group: str, sub: str) -> tuple[list[str], list[Path]]:
        """One counting faultproxy (no rules) per host, on :5001; returns endpoints and logs."""
        (self.work / sub).mkdir(exist_ok=True)
        rules = self.work / sub / "empty.rules"
        rules.write_text("")
        endpoints, logs = [], []
        for i, host in enumerate(hosts):
            lp = self.work / sub / f"proxy-{i}.log"
            p = self.procs.spawn("service", [self.py, str(self.root / "tests/testbed/faultproxy.py"),
                                             "--listen", f"{host}:5001", "--upstream", MOTO_URL,
                                             "--rules", str(rules)],
                                 self.base_env(), lp, "faultproxy.py", group, stdout_pipe=True)
            self.wait_ready_line(p, 20, f"faultproxy {host}")
            endpoints.append(f"http://{host}:5001")
            logs.append(lp)
        return endpoints, logs

    @staticmethod
    def count_proxy_log(path: Path, start: int = 0) -> tuple[dict[str, int], dict[str, int]]:
        """(calls per service, calls per service:operation) in a proxy log from byte `start`."""
        counts: dict[str, int] = {"EC2": 0, "S3": 0, "KMS": 0}
        ops: dict[str, int] = {}
        for line in path.read_bytes()[start:].decode(errors="replace").splitlines():
            m = re.search(r" svc=(\S+) op=(\S+)", line)
            if not m:
                continue
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
            k = f"{m.group(1)}:{m.group(2)}"
            ops[k] = ops.get(k, 0) + 1
        return counts, ops

    def imds_count(self, ip: str, start: int) -> int:
        text = (self.work / "imds.log").read_bytes()[start:].decode(errors="replace")
        return sum(1 for line in text.splitlines() if f" imds: {ip} " in line)

    def calls_run(self, n: int) -> dict:
        """(e) n agents booted together, each through its own counting proxy, to node ready."""
        tag = f"bench-calls-{n}"
        ips = self.groups[tag]
        group = f"calls-{n}"
        endpoints, logs = self.start_proxies([f"{BLOCK}.{2 + i}" for i in range(n)], group, group)
        imds_before = (self.work / "imds.log").stat().st_size
        t = time.monotonic()
        res = self.agent_cluster(f"calls-{n}n", tag, ips, formation=False, failover=False, endpoints=endpoints)
        took = time.monotonic() - t
        # Stopping the proxies first: every request they relayed is in their logs by then.
        self.procs.stop(group=group)
        per = []
        for i, node in enumerate(res["nodes"]):
            counts, ops = self.count_proxy_log(logs[i])
            per.append({"ip": ips[i], "winner": node["winner"], "counts": counts, "ops": ops,
                        "imds": self.imds_count(ips[i], imds_before),
                        "ready_s": (node["log"]["ready"]["wall"] - node["spawn_wall"]) if "ready" in node["log"] else None})
        winners = sum(1 for p in per if p["winner"])
        if winners != 1:
            raise BenchError(f"{n}-node boot: {winners} nodes initialised, expected exactly one")
        log(f"  {n} agents all ready in {took:.1f} s; AWS calls initialiser "
            f"{sum(next(p for p in per if p['winner'])['counts'].values())}, joiners "
            f"{sorted(sum(p['counts'].values()) for p in per if not p['winner'])}")
        return {"n": n, "per": per, "all_ready_s": took}

    # -------------------------------------------------------------- (a) boot path
    def bootpath_agent(self, d: Path, ip: str, endpoint: str, stub: Path) -> float:
        """Seconds from spawning `boot` to its `phase done: render` line (vault.hcl and the TLS
        files written). The server is a stub that exits at once; the agent then exits too."""
        self.write_agent_config(d, 3, keep_root=False, binary=str(stub), flavor="openbao")
        env = self.agent_env(ip, d, endpoint)
        wall0 = time.time()
        p = self.procs.spawn("agent", [self.bin, "--config", str(d / "config.toml"), "boot"],
                             env, d / "agent.log", str(d), "bootpath")
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise BenchError(f"boot-path agent run in {d} did not exit within 60 s")
        text = (d / "agent.log").read_text(errors="replace")
        lg = parse_agent_log(text)
        if "render" not in lg:
            raise BenchError(f"boot-path agent run in {d}: no 'phase done: render' line:\n"
                             + "\n".join(text.splitlines()[-15:]))
        return lg["render"]["wall"] - wall0

    def bootpath_bash(self, d: Path, ip: str, endpoint: str) -> float:
        """Seconds from spawning bench/baseline-userdata.sh to its exit (status 0 required)."""
        d.mkdir(parents=True, exist_ok=True)
        env = {**self.base_env(), **self.aws_env_static(),
               "PATH": f"{self.venv}/bin:" + os.environ.get("PATH", "/usr/bin:/bin"),
               "HOME": str(d), "AWS_ENDPOINT_URL": endpoint,
               "IMDS_ENDPOINT": f"http://{ip}:{IMDS_PORT}", "VAULT_TLS_BUCKET": BUCKET,
               "VAULT_TAG_KEY": TAG_KEY, "VAULT_CONFIG_FILE": f"{d}/etc/vault.hcl",
               "VAULT_TLS_DIR": f"{d}/tls", "VAULT_DATA_DIR": f"{d}/data",
               "VAULT_AUDIT_FILE": f"{d.parent}/audit/audit.log", "VAULT_KMS_KEY_ID": "alias/vault-unseal",
               "VAULT_KMS_ENDPOINT": MOTO_URL, "VAULT_USER": self.user}
        t0 = time.monotonic()
        p = self.procs.spawn("tool", ["bash", str(self.root / "bench/baseline-userdata.sh")],
                             env, d / "userdata.log", "baseline-userdata.sh", "bootpath")
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # Its own session (Procs.spawn): the group is this script and its curl/aws children.
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)
            raise BenchError(f"baseline-userdata.sh in {d} did not finish within 60 s")
        took = time.monotonic() - t0
        if p.returncode != 0:
            raise BenchError(f"baseline-userdata.sh in {d} exited {p.returncode}:\n"
                             + (d / "userdata.log").read_text(errors="replace")[-2000:])
        return took

    @staticmethod
    def hcl_shape(path: Path) -> dict:
        text = path.read_text()
        return {"joins": len(re.findall(r"^\s*retry_join\s*\{", text, re.M)),
                "leaders": sorted(re.findall(r'leader_api_addr\s*=\s*"([^"]+)"', text)),
                "node_id": re.findall(r'node_id\s*=\s*"([^"]+)"', text),
                "api_addr": re.findall(r'^api_addr\s*=\s*"([^"]+)"', text, re.M),
                "seal": len(re.findall(r'^seal "awskms"', text, re.M))}

    def bootpath_compare(self) -> dict:
        tag = "bench-3n-r1"
        ip = self.groups[tag][0]
        bdir = self.work / "bootpath"
        bdir.mkdir(exist_ok=True)
        stub = bdir / "stub-server"
        stub.write_text("#!/bin/sh\n# bench: stands in for the server (both sides are timed up to "
                        "vault.hcl written); exits at once\nexit 0\n")
        stub.chmod(0o755)
        times: dict[str, list[float]] = {"agent": [], "bash": []}
        checks = []
        # Repetition 0 warms the page cache (the AWS CLI's Python modules, the agent binary)
        # and is dropped. The two sides alternate who goes first, so slow phases of whatever
        # else runs on the machine hit both alike.
        for r in range(self.a.boot_reps + 1):
            order = ("agent", "bash") if r % 2 == 0 else ("bash", "agent")
            for side in order:
                d = bdir / f"{side}-{r}"
                t = (self.bootpath_agent(d, ip, MOTO_URL, stub) if side == "agent"
                     else self.bootpath_bash(d, ip, MOTO_URL))
                if r > 0:
                    times[side].append(t)
            a, b = (self.hcl_shape(bdir / f"{s}-{r}/etc/vault.hcl") for s in ("agent", "bash"))
            same = all(a[k] == b[k] for k in ("joins", "leaders", "node_id", "api_addr", "seal"))
            checks.append({"agent_joins": a["joins"], "bash_joins": b["joins"], "same": same})
            if not same:
                log(f"  boot path rep {r}: vault.hcl differ in shape: agent {a}, bash {b}")
        log(f"  boot path to vault.hcl: agent median {statistics.median(times['agent']) * 1000:.0f} ms, "
            f"baseline median {statistics.median(times['bash']) * 1000:.0f} ms")
        # Once each through a counting proxy (not timed: the proxy adds a hop per call).
        endpoints, logs = self.start_proxies([f"{BLOCK}.2", f"{BLOCK}.3"], "bootpath-calls", "bootpath-calls")
        calls = {}
        for side, ep, lp in (("agent", endpoints[0], logs[0]), ("bash", endpoints[1], logs[1])):
            imds0 = (self.work / "imds.log").stat().st_size
            d = bdir / f"{side}-counted"
            if side == "agent":
                self.bootpath_agent(d, ip, ep, stub)
            else:
                self.bootpath_bash(d, ip, ep)
            calls[side] = {"imds": self.imds_count(ip, imds0)}
        self.procs.stop(group="bootpath-calls")
        for side, lp in (("agent", logs[0]), ("bash", logs[1])):
            calls[side]["counts"], calls[side]["ops"] = self.count_proxy_log(lp)
        self.procs.stop(group="bootpath")
        # What one AWS CLI start costs by itself: it explains most of the baseline's time.
        cli = []
        for _ in range(5):
            t = time.monotonic()
            subprocess.run([str(self.venv / "bin/aws"), "--version"], capture_output=True, timeout=60,
                           env={**self.base_env(), "PATH": f"{self.venv}/bin:/usr/bin:/bin"})
            cli.append(time.monotonic() - t)
        return {"ip": ip, "times": times, "checks": checks, "calls": calls,
                "aws_cli_start_s": statistics.median(cli)}

    # -------------------------------------------------------------- main
    def run(self) -> None:
        self.setup()
        log(f"(a) boot path, agent vs bench/baseline-userdata.sh: {self.a.boot_reps} repetitions each (+1 warm-up)")
        self.results["bootpath"] = self.bootpath_compare()
        for r in range(self.a.reps):
            log(f"3-node repetition {r + 1}/{self.a.reps}: agents")
            res = self.agent_cluster(f"agent3-r{r + 1}", f"bench-3n-r{r + 1}", self.groups[f"bench-3n-r{r + 1}"],
                                     formation=True, failover=True, reboot=True)
            self.results["agent3"].append(res)
            log(f"3-node repetition {r + 1}/{self.a.reps}: floor (bare bao servers)")
            self.results["floor3"].append(self.floor_cluster(f"floor3-r{r + 1}", 3, failover=True))
        log("5 nodes: agents")
        self.results["agent5"].append(self.agent_cluster("agent5", "bench-5n", self.groups["bench-5n"],
                                                         formation=True, failover=False))
        log("5 nodes: floor")
        self.results["floor5"].append(self.floor_cluster("floor5", 5, failover=False))
        for n in CALL_SIZES:
            log(f"(e) AWS calls of {n} simultaneous boots (one counting proxy per agent)")
            self.results["calls"][n] = self.calls_run(n)


# ------------------------------------------------------------------ report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f1(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def calls_cell(c: dict) -> str:
    return f"EC2 {c.get('EC2', 0)} · S3 {c.get('S3', 0)} · KMS {c.get('KMS', 0)} = {sum(c.values())}"


def ops_text(ops: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items())) or "none"


def footprint(R: dict) -> dict:
    allnodes = [nd for k in ("agent3", "agent5") for res in R[k] for nd in res["nodes"]]
    out = {}
    for role, sel in (("I", [x for x in allnodes if x["winner"]]), ("J", [x for x in allnodes if not x["winner"]])):
        h = [x.get("hwm_kb") / 1024 for x in sel if x.get("hwm_kb")]
        c = [x.get("cpu_ms") for x in sel if x.get("cpu_ms") is not None]
        out[role] = {"n": len(sel), "hwm_med": med(h), "hwm_max": max(h) if h else None,
                     "cpu_med": med(c), "cpu_max": max(c) if c else None}
    return out


def joiner_stats(per: list[dict]) -> dict:
    js = [p for p in per if not p["winner"]]
    tot = [sum(p["counts"].values()) for p in js]
    return {"n": len(js), "med": {k: med([p["counts"].get(k, 0) for p in js]) for k in ("EC2", "S3", "KMS")},
            "tot_med": med(tot), "tot_min": min(tot) if tot else None, "tot_max": max(tot) if tot else None,
            "imds_med": med([p["imds"] for p in js])}


def summary(b: "Bench", meta: dict) -> list[str]:
    """The one table: a line per question of issue 7, details in the sections below."""
    R = b.results
    L = ["## Summary", "",
         "Baseline: (a) bench/baseline-userdata.sh (bash + curl + AWS CLI + openssl, as user-data "
         "does it); (b), (c) the floor: bare `bao server` processes with the same config shape and "
         "`sys/init` sent by the bench script. Times are medians; details and every sample below.", "",
         "| | measure | agent | baseline | baseline ÷ agent / agent − baseline |",
         "|---|---|---:|---:|---:|"]
    bp = R.get("bootpath")
    if bp:
        a, s = med(bp["times"]["agent"]), med(bp["times"]["bash"])
        L.append(f"| a | boot path, one node: IMDS + discovery + TLS fetch/check + vault.hcl written "
                 f"(wall ms, median of {len(bp['times']['agent'])}) | {a * 1000:.0f} | {s * 1000:.0f} | "
                 f"× {s / a:.1f} |")
        ca, cb = bp["calls"]["agent"], bp["calls"]["bash"]
        L.append(f"| a | AWS calls; IMDS requests on that path | {calls_cell(ca['counts'])}; IMDS {ca['imds']} | "
                 f"{calls_cell(cb['counts'])}; IMDS {cb['imds']} | |")
    for n, ak, fk in ((3, "agent3", "floor3"), (5, "agent5", "floor5")):
        a = med([r["milestones"].get("formed") for r in R[ak]])
        f = med([r["milestones"].get("formed") for r in R[fk]])
        reps = len(R[ak])
        L.append(f"| b | {n}-node cluster formed: all unsealed, {n} voters (agent: and escrow verified) "
                 f"(s, {'median of ' + str(reps) if reps > 1 else '1 run'}) | "
                 f"{f1(a)} | {f1(f)} | {f'{a - f:+.1f}' if a is not None and f is not None else '-'} |")
    fa = med([r.get("failover_s") for r in R["agent3"]])
    ff = med([r.get("failover_s") for r in R["floor3"]])
    L.append(f"| c | SIGKILL of the active server → a survivor answers 200 (s, 3 nodes, median of "
             f"{len(R['agent3'])}) | {f1(fa, 2)} | {f1(ff, 2)} | "
             f"{f'{fa - ff:+.2f}' if fa is not None and ff is not None else '-'} |")
    rb = [r["reboot"] for r in R["agent3"] if "reboot" in r]
    if rb:
        cold = med([r["milestones"].get("all_unsealed") for r in R["agent3"]])
        L.append(f"| f | reboot to serving, 3 nodes, EC2 and S3 unreachable: one active; all unsealed "
                 f"(s, median of {len(rb)}); baseline: the same cluster's cold boot, all unsealed | "
                 f"{f1(med([x['first_active'] for x in rb]), 2)}; {f1(med([x['all_unsealed'] for x in rb]), 2)} | "
                 f"{f1(cold, 2)} | |")
    fp = footprint(R)
    L.append(f"| d | agent peak RSS (VmHWM), initialiser / joiner (MB, median) | "
             f"{f1(fp['I']['hwm_med'])} / {f1(fp['J']['hwm_med'])} | - | |")
    L.append(f"| d | agent CPU time for a whole boot, initialiser / joiner (ms, median) | "
             f"{f1(fp['I']['cpu_med'], 0)} / {f1(fp['J']['cpu_med'], 0)} | - | |")
    L.append(f"| d | binary size ({meta['bin_kind']}, {meta['bin_file']}) | {meta['bin_size_mb']:.1f} MB | - | |")
    for n in CALL_SIZES:
        c = R["calls"].get(n)
        if not c:
            continue
        ini = next(p for p in c["per"] if p["winner"])
        js = joiner_stats(c["per"])
        L.append(f"| e | AWS calls per agent, {n} simultaneous boots: initialiser; joiner (median of {js['n']}) | "
                 f"{sum(ini['counts'].values())}; {f1(js['tot_med'], 0)} | - | |")
    L.append("")
    return L


def report(b: Bench, meta: dict) -> str:
    R = b.results
    L: list[str] = []
    L.append("# vault-bootstrap bench")
    L.append("")
    L.append(f"- date: {meta['date']}")
    L.append(f"- machine: {meta['machine']}")
    L.append(f"- binary: `{meta['bin']}` ({meta['bin_kind']}; {meta['bin_size_mb']:.1f} MB; {meta['bin_file']})")
    L.append(f"- server: {meta['bao_version']}; moto {meta['moto_version']}; test-bed block {BLOCK}.0/24")
    L.append(f"- repetitions: (a) {b.a.boot_reps} per side (+1 warm-up, dropped); {b.a.reps} for 3 nodes "
             "(fresh cluster tag + fresh instances each), 1 for 5 nodes, 1 boot each of 3, 5, 7 nodes for (e); "
             f"sys/health polled every {HEALTH_POLL:.1f} s per node; whole run {meta['run_s']:.0f} s")
    L.append(f"- baseline tools: {meta['awscli_version']}; {meta['openssl_version']}; {meta['curl_version']}; "
             f"bash {meta['bash_version']}")
    L.append(f"- load average (1/5/15 min) at start: {' '.join(b.load_start)}, at end: {meta['load_end']}. "
             "On 2 cores every time carries the noise of whatever else runs (the load average says how "
             "much); compare sides measured in the same run, not runs.")
    L.append("")
    L.extend(summary(b, meta))

    # 1a. boot path vs the user-data baseline
    bp = R.get("bootpath")
    if bp:
        L.append("## 1. (a) Boot path, one node: agent vs a user-data script")
        L.append("")
        L.append(f"One node ({bp['ip']}, 3 instances in its group), nothing else booting. Both sides: IMDSv2 "
                 "token + instance facts + cluster tag, EC2 DescribeInstances on the tag, the three TLS "
                 "objects from S3, key/cert match + chain + validity + IP SAN checked, TLS files and "
                 "vault.hcl (one retry_join per other peer) written. Neither starts a server.")
        L.append("")
        L.append("- **agent**: `vault-bootstrap boot`, wall time from spawning the process to its "
                 "`phase done: render` log line (written after vault.hcl and the TLS files are on disk). "
                 "`vault.binary` is a stub that exits at once, so nothing after that line costs the "
                 "machine anything; `vault.flavor = \"openbao\"` as the baseline hard-codes its config "
                 f"(the default `auto` adds one `bao version`, {meta['bao_version_s'] * 1000:.0f} ms). "
                 "`render` alone would not do: it fetches no TLS. The agent also reads the warm-pool "
                 "lifecycle state from IMDS.")
        L.append("- **baseline**: `bash bench/baseline-userdata.sh`, wall time from spawn to exit: "
                 "`curl` for IMDS (1 PUT + 5 GETs), `aws ec2 describe-instances`, 3 × `aws s3 cp`, "
                 "`openssl` x509/pkey/verify, a heredoc. No retries, no timeouts (as such scripts are).")
        L.append(f"- Repetitions alternate which side goes first; AWS/IMDS counts come from one extra run "
                 f"per side through a counting proxy. One `aws --version` alone takes "
                 f"{bp['aws_cli_start_s'] * 1000:.0f} ms here (median of 5): the baseline starts the AWS "
                 "CLI four times.")
        L.append("")
        ta, tb = bp["times"]["agent"], bp["times"]["bash"]
        L.append("| side | median ms | min ms | max ms | runs (ms) |")
        L.append("|---|---:|---:|---:|---|")
        for name, xs in (("agent (`boot` → vault.hcl)", ta), ("baseline (bash + AWS CLI)", tb)):
            L.append(f"| {name} | {med(xs) * 1000:.0f} | {min(xs) * 1000:.0f} | {max(xs) * 1000:.0f} | "
                     f"{', '.join(f'{x * 1000:.0f}' for x in xs)} |")
        L.append(f"| **baseline ÷ agent** | **× {med(tb) / med(ta):.1f}** | | | |")
        L.append("")
        L.append("| side | EC2 | S3 | KMS | IMDS requests | operations |")
        L.append("|---|---:|---:|---:|---:|---|")
        for name, k in (("agent", "agent"), ("baseline", "bash")):
            c = bp["calls"][k]
            L.append(f"| {name} | {c['counts'].get('EC2', 0)} | {c['counts'].get('S3', 0)} | "
                     f"{c['counts'].get('KMS', 0)} | {c['imds']} | {ops_text(c['ops'])} |")
        L.append("")
        ok = sum(1 for c in bp["checks"] if c["same"])
        joins = sorted({(c["agent_joins"], c["bash_joins"]) for c in bp["checks"]})
        L.append(f"vault.hcl check, all {len(bp['checks'])} runs (warm-up included): retry_join blocks "
                 f"agent/baseline {', '.join(f'{x}/{y}' for x, y in joins)}; the same leader addresses, "
                 f"node_id, api_addr and one awskms seal in {ok} of {len(bp['checks'])}.")
        L.append("")

    # 1b. boot path per step
    L.append("## 1b. Agent boot path per step, 3 nodes started together")
    L.append("")
    L.append("Step durations come from the agent's own `elapsed_ms` (deltas between consecutive "
             "`phase done` lines); the last three columns are wall time from the moment the "
             "agent process was spawned (log timestamp minus spawn time), so they include exec, "
             "config load and runtime start (`pre-run`). `role`: I = won the init lock and "
             "initialised, J = joined.")
    L.append("")
    L.append(f"The render step runs `<binary> version` to pick the flavor (`vault.flavor = \"auto\"`, the "
             f"default); that alone takes {meta['bao_version_s'] * 1000:.0f} ms on an idle machine "
             "(median of 3, the 196 MB static `bao`).")
    L.append("")
    L.append("| rep | node | role | pre-run ms | imds+discovery ms | tls ms | render ms | spawn ms | "
             "→ server spawned s | → server answering s | → node ready s |")
    L.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    cols: dict[str, list] = {k: [] for k in ("pre", "imds", "tls", "render", "spawn", "w_spawned", "w_answer", "w_ready")}
    for r, res in enumerate(R["agent3"]):
        for i, nd in enumerate(res["nodes"]):
            lg = nd["log"]
            if not all(k in lg for k, _ in STEPS):
                L.append(f"| {r + 1} | {i} | ? | incomplete log |||||||| ")
                continue
            pre = (lg["imds"]["wall"] - nd["spawn_wall"]) * 1000 - lg["imds"]["ms"]
            v = {"pre": pre, "imds": lg["imds"]["ms"], "tls": lg["tls"]["ms"] - lg["imds"]["ms"],
                 "render": lg["render"]["ms"] - lg["tls"]["ms"], "spawn": lg["spawned"]["ms"] - lg["render"]["ms"],
                 "w_spawned": lg["spawned"]["wall"] - nd["spawn_wall"],
                 "w_answer": lg["answering"]["wall"] - nd["spawn_wall"],
                 "w_ready": lg["ready"]["wall"] - nd["spawn_wall"]}
            for k, x in v.items():
                cols[k].append(x)
            L.append(f"| {r + 1} | {i} | {'I' if nd['winner'] else 'J'} | {v['pre']:.0f} | {v['imds']} | {v['tls']} | "
                     f"{v['render']} | {v['spawn']} | {v['w_spawned']:.2f} | {v['w_answer']:.2f} | {v['w_ready']:.2f} |")
    L.append(f"| **median** | | | **{f1(med(cols['pre']), 0)}** | **{f1(med(cols['imds']), 0)}** | **{f1(med(cols['tls']), 0)}** | "
             f"**{f1(med(cols['render']), 0)}** | **{f1(med(cols['spawn']), 0)}** | **{f1(med(cols['w_spawned']), 2)}** | "
             f"**{f1(med(cols['w_answer']), 2)}** | **{f1(med(cols['w_ready']), 2)}** |")
    L.append("")

    # 2. formation
    L.append("## 2. (b) Cluster formation: agent vs floor")
    L.append("")
    L.append("t = 0 when the N agents (agent) or the N bare `bao server` processes (floor) are spawned "
             "together. Floor: the same config shape (raft retry_join to every peer, the same TLS files, "
             "awskms seal on moto, performance_multiplier = 1, audit + telemetry stanzas), `PUT sys/init` "
             "(5 shares / threshold 3) by this script on node 1 as soon as it answers 501. "
             "Voters: `sys/storage/raft/configuration` with the root token (agent: decrypted from the "
             "escrow; floor: from the init answer). `escrow verify`: started as soon as the "
             "cluster-initialized marker exists, retried until it exits 0 (agent only). "
             "formed = max(all unsealed, N voters, verify). Medians over the repetitions; seconds.")
    L.append("")
    L.append("| N | milestone | agent | floor | agent − floor |")
    L.append("|---|---|---:|---:|---:|")
    for n, ak, fk in ((3, "agent3", "floor3"), (5, "agent5", "floor5")):
        for key, label in (("first_active", "(a) first node active (200)"),
                           ("all_unsealed", "(b) all nodes 200/429"),
                           ("voters", f"(c) {n} voters"),
                           ("verify", "(d) escrow verify exits 0"),
                           ("formed", "formed (all of the above)")):
            a = med([r["milestones"].get(key) for r in R[ak]])
            f = med([r["milestones"].get(key) for r in R[fk]])
            diff = f"{a - f:+.1f}" if a is not None and f is not None else "-"
            L.append(f"| {n} | {label} | {f1(a)} | {f1(f)} | {diff} |")
    L.append("")
    L.append("Per repetition (agent / floor), seconds: first active, all unsealed, voters, verify:")
    L.append("")
    for ak, fk in (("agent3", "floor3"), ("agent5", "floor5")):
        for ra, rf in zip(R[ak], R[fk]):
            ma, mf = ra["milestones"], rf["milestones"]
            L.append(f"- {ra['name']}: {f1(ma.get('first_active'))} / {f1(ma.get('all_unsealed'))} / "
                     f"{f1(ma.get('voters'))} / {f1(ma.get('verify'))};  {rf['name']}: "
                     f"{f1(mf.get('first_active'))} / {f1(mf.get('all_unsealed'))} / {f1(mf.get('voters'))} "
                     f"(script's sys/init sent at {f1(mf.get('init_start'))}, answered at {f1(mf.get('init_done'))})")
    L.append("")

    # 3. failover
    L.append("## 3. (c) SIGKILL of the active node's server → a survivor answers 200 (3 nodes)")
    L.append("")
    fa = [r.get("failover_s") for r in R["agent3"]]
    ff = [r.get("failover_s") for r in R["floor3"]]
    L.append("| cluster | runs (s) | median s |")
    L.append("|---|---|---:|")
    L.append(f"| agent-formed | {', '.join(f1(x, 2) for x in fa)} | {f1(med(fa), 2)} |")
    L.append(f"| floor | {', '.join(f1(x, 2) for x in ff)} | {f1(med(ff), 2)} |")
    L.append("")
    L.append("The agent plays no part in a failover (its server child died, so it exits too); "
             "the two rows should agree.")
    L.append("")

    # 4. footprint
    L.append("## 4. (d) Agent footprint during a boot")
    L.append("")
    L.append("Read from /proc/<agent pid> when its `node ready` line appears (the agent then only "
             "supervises its server): VmHWM = the kernel's peak-RSS record for the process; CPU = "
             "utime + stime in 10 ms clock ticks (the server child not included). Boots of "
             "sections 1b and 2 (3- and 5-node clusters).")
    L.append("")
    L.append("| role | boots | peak RSS (VmHWM) median / max MB | CPU time median / max ms |")
    L.append("|---|---:|---:|---:|")
    fp = footprint(R)
    for role, k in (("initialiser (I)", "I"), ("joiner (J)", "J")):
        x = fp[k]
        L.append(f"| {role} | {x['n']} | {f1(x['hwm_med'])} / {f1(x['hwm_max'])} | "
                 f"{f1(x['cpu_med'], 0)} / {f1(x['cpu_max'], 0)} |")
    L.append(f"| binary size | | {meta['bin_size_mb']:.1f} MB ({meta['bin_kind']}) | |")
    L.append("")

    # 5. calls
    L.append("## 5. (e) AWS calls per boot as the cluster grows (per agent, start → node ready)")
    L.append("")
    if R["calls"]:
        L.append("N agents spawned together on N fresh instances (a new cluster tag each), default config "
                 "(root token revoked after post-init), each run to its `node ready` line. Each agent's "
                 "`AWS_ENDPOINT_URL` pointed at its own proxy (tests/testbed/faultproxy.py, whose log names "
                 "each call's service and operation) in front of moto, so calls are per agent; the servers' "
                 "KMS seal talks to moto directly and is not counted. IMDS = requests to the node's own "
                 "IMDS (token PUTs included). I = the node that won the init lock and initialised; "
                 "J = joiners (median, and the range of their totals).")
        L.append("")
        L.append("| N | all ready s | I: EC2 | I: S3 | I: KMS | I: total | J: EC2 | J: S3 | J: KMS | "
                 "J: total (min–max) | all N agents | IMDS per agent (I / J median) |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
        for n in CALL_SIZES:
            c = R["calls"].get(n)
            if not c:
                continue
            ini = next(p for p in c["per"] if p["winner"])
            js = joiner_stats(c["per"])
            ic = ini["counts"]
            L.append(f"| {n} | {c['all_ready_s']:.1f} | {ic.get('EC2', 0)} | {ic.get('S3', 0)} | {ic.get('KMS', 0)} | "
                     f"{sum(ic.values())} | {f1(js['med']['EC2'], 0)} | {f1(js['med']['S3'], 0)} | "
                     f"{f1(js['med']['KMS'], 0)} | {f1(js['tot_med'], 0)} ({js['tot_min']}–{js['tot_max']}) | "
                     f"{sum(sum(p['counts'].values()) for p in c['per'])} | {ini['imds']} / {f1(js['imds_med'], 0)} |")
        L.append("")
        L.append("Per agent, by operation:")
        L.append("")
        for n in CALL_SIZES:
            c = R["calls"].get(n)
            if not c:
                continue
            for i, p in enumerate(c["per"]):
                L.append(f"- N={n} node {i} ({'I' if p['winner'] else 'J'}): {ops_text(p['ops'])}")
    L.append("")
    L.append("## Notes")
    L.append("")
    L.append("- Every node of a cluster is given the same `init.audit_file_path` (floor: the same audit "
             "stanza). With a per-node path (as tests/common/mod.rs writes) the first SIGKILL failover "
             "never completed: OpenBao stores the declared audit device, and a standby whose vault.hcl "
             "declares another `file_path` fails post-unseal setup with \"modifications to audit devices "
             "are not allowed ... file_path differs\", so no survivor became active within 60 s.")
    L.append("- Failover is the server's own election; 3 samples per row are noisy (the notes' floor range "
             "is 1.7-2.7 s).")
    L.append("- `escrow verify` runs while the cluster is still forming, on the same 2 cores.")
    L.append("- (a) tests/testbed/imds.py sets TCP_NODELAY since commit e5b82c2: before, each "
             "IMDS read after the first on a kept-alive connection waited ~44 ms for a delayed ACK "
             "(Nagle), which the agent (the SDK reuses its connection, 8 reads) paid and curl (a new "
             "connection per read) did not: the agent's boot path measured ~0.32 s then. faultproxy.py "
             "still has that stall, so (e)'s `all ready s` includes it; (e) counts calls, it does not time them.")
    L.append("- (a) What the baseline's time is made of: four AWS CLI starts (see `aws --version` above) "
             "dominate; `aws s3 sync` or one `aws s3 cp --recursive` would save two of them. Its S3 count "
             "is a HeadObject + GetObject per `aws s3 cp`.")
    L.append("- (e) A joiner's count depends on what it finds at its first look: if the cluster-initialized "
             "marker is still missing it tries the init lock (a list, a read of the holder's lock object, and "
             "a conditional PutObject answered 412 when it raced the initialiser), checks the holder is alive "
             "(DescribeInstances), then polls the marker until it appears; if the marker "
             "is already there it reads it once and waits for retry_join "
             "to unseal its server: EC2 1 + S3 3 (TLS) + 1. Nothing per agent grows with N except the "
             "size of the one DescribeInstances page; the cluster's total grows by one joiner's count per node.")
    L.append("")
    return "\n".join(L)


def file_kind(out: str) -> str:
    if "not stripped" in out:
        return "not stripped"
    if "stripped" in out:
        return "stripped"
    return "strip state unknown (file(1) missing)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--venv", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--bin-kind", required=True)
    ap.add_argument("--bao", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--boot-reps", type=int, default=10)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not 1 <= a.reps <= 3:
        ap.error("--reps must be 1..3 (instance IPs are budgeted for 3)")
    if not 1 <= a.boot_reps <= 50:
        ap.error("--boot-reps must be 1..50")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    b = Bench(a)
    rc = 0
    try:
        b.run()
    except (BenchError, Interrupted) as e:
        log(f"FAILED: {e}")
        rc = 1
    except Exception as e:  # noqa: BLE001
        log(f"FAILED: {type(e).__name__}: {e}")
        import traceback
        traceback.print_exc()
        rc = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log("stopping every process this run started")
        b.procs.stop()
    if rc:
        return rc

    def sh(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            return "?"
    free = sh(["free", "-g"]).splitlines()
    mem = " ".join(free[1].split()[:3]) if len(free) > 1 else "?"
    meta = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"nproc {sh(['nproc'])}; free -g: {mem} (total GiB, used GiB); {sh(['uname', '-srm'])}",
        "bin": a.bin, "bin_kind": a.bin_kind,
        "bin_size_mb": os.path.getsize(a.bin) / 1e6,
        "bin_file": file_kind(sh(["file", "-L", a.bin])),
        "bao_version": sh([a.bao, "version"]).splitlines()[0] if sh([a.bao, "version"]) else "?",
        "moto_version": sh([str(Path(a.venv) / "bin/python3"), "-c", "import moto; print(moto.__version__)"]),
        "run_s": time.monotonic() - b.t_start,
        "load_end": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "awscli_version": (sh([str(Path(a.venv) / "bin/aws"), "--version"]).split() or ["?"])[0],
        "openssl_version": " ".join(sh(["openssl", "version"]).split()[:2]) or "?",
        "curl_version": " ".join(sh(["curl", "--version"]).split()[:2]) or "?",
        "bash_version": sh(["bash", "-c", "echo $BASH_VERSION"]) or "?",
    }
    vt = []
    for _ in range(3):
        t = time.monotonic()
        sh([a.bao, "version"])
        vt.append(time.monotonic() - t)
    meta["bao_version_s"] = statistics.median(vt)
    text = report(b, meta)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
