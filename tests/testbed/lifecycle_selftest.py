#!/usr/bin/env python3
"""Self-test of the lifecycle-hook emulation (lifecycle.py) through faultproxy.py and imds.py.

Starts moto (``<block>.1:5000``), faultproxy.py ``--lifecycle-state`` (``<block>.2:5001``)
and imds.py ``--lifecycle-state`` (``<block>.11:1338``), then drives the state with
lifecycle.py's command line and calls CompleteLifecycleAction / RecordLifecycleActionHeartbeat
with boto3 through the proxy, as the agent's SDK would.  Checks: success answers, AWS's
ValidationError shape (boto3 parses it into ClientError code ValidationError), heartbeats
pushing the deadline, default results on timeout, an injected fault by rule, concurrent
writers losing nothing, and IMDS target-lifecycle-state.  About 15 s.

    $VENV/bin/python3 tests/testbed/lifecycle_selftest.py [--block 127.0.9]

Only loopback addresses; stops only the processes it started, by PID; every wait bounded.
Prints PASS (exit 0) or the first failed check (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

HERE = Path(__file__).resolve().parent
PY = sys.executable
GROUP = "selftest-asg"


class Fail(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Fail(what)
    print(f"ok   {what}", flush=True)


def wait_port(host: str, port: int, bound: float) -> None:
    end = time.monotonic() + bound
    while time.monotonic() < end:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise Fail(f"nothing listens on {host}:{port} after {bound} s")


def wait_ready(p: subprocess.Popen, name: str, bound: float) -> None:
    got = threading.Event()

    def read():
        for line in p.stdout:
            if line.strip() == "READY":
                got.set()

    threading.Thread(target=read, daemon=True).start()
    if not got.wait(bound):
        raise Fail(f"{name} did not print READY within {bound} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--block", default="127.0.9", help="the 127.0.N address block to use")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    # A SIGTERM (the Rust harness's timeout) must still run the `finally` that stops the
    # servers this script started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    moto_url = f"http://{a.block}.1:5000"
    proxy_url = f"http://{a.block}.2:5001"
    node_ip = f"{a.block}.11"
    work = Path(tempfile.mkdtemp(prefix="lifecycle-selftest-"))
    state = work / "lifecycle.json"
    rules = work / "proxy.rules"
    control = work / "imds-control"
    control.mkdir()
    procs: list[subprocess.Popen] = []

    def spawn(name: str, cmd: list[str], ready: bool) -> subprocess.Popen:
        log = open(work / f"{name}.log", "w")
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if ready else log,
                             stderr=log, text=True, start_new_session=True)
        procs.append(p)
        return p

    def cli(*args: str, ok: bool = True) -> str:
        r = subprocess.run([PY, str(HERE / "lifecycle.py"), "--state", str(state), *args],
                           capture_output=True, text=True, timeout=60)
        if ok and r.returncode != 0:
            raise Fail(f"lifecycle.py {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        if not ok and r.returncode == 0:
            raise Fail(f"lifecycle.py {' '.join(args)} succeeded, expected failure: {r.stdout.strip()}")
        return (r.stdout if ok else r.stderr).strip()

    def show() -> dict:
        return json.loads(state.read_text())  # without the lock: must always parse

    def imds_state() -> str:
        token = subprocess.run(
            ["curl", "-sS", "--max-time", "5", "-X", "PUT", f"http://{node_ip}:1338/latest/api/token",
             "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60"],
            capture_output=True, text=True, timeout=10).stdout
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "5", "-w", " %{http_code}", "-H", f"X-aws-ec2-metadata-token: {token}",
             f"http://{node_ip}:1338/latest/meta-data/autoscaling/target-lifecycle-state"],
            capture_output=True, text=True, timeout=10)
        body, _, code = r.stdout.rpartition(" ")
        if code != "200":
            raise Fail(f"IMDS target-lifecycle-state answered {code}: {body!r}")
        return body

    def client(retries: int = 1):
        return boto3.client("autoscaling", endpoint_url=proxy_url, region_name="us-east-1",
                            aws_access_key_id="AKIASELFTEST", aws_secret_access_key="testing",
                            config=Config(retries={"total_max_attempts": retries, "mode": "standard"},
                                          connect_timeout=5, read_timeout=30))

    def refused(fn, code: str, text: str, what: str) -> None:
        try:
            fn()
        except ClientError as e:
            err = e.response["Error"]
            check(err.get("Code") == code and text in err.get("Message", "")
                  and e.response["ResponseMetadata"]["HTTPStatusCode"] == (400 if code == "ValidationError" else 503),
                  f"{what}: ClientError {err.get('Code')} {err.get('Message')!r}")
            return
        raise Fail(f"{what}: succeeded, expected {code}")

    try:
        spawn("moto", [str(Path(PY).parent / "moto_server"), "-H", f"{a.block}.1", "-p", "5000"], False)
        wait_port(f"{a.block}.1", 5000, 30)
        ec2 = boto3.client("ec2", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="testing",
                           aws_secret_access_key="testing", config=Config(read_timeout=120))
        vpc = ec2.create_vpc(CidrBlock="127.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=f"{a.block}.0/24")["Subnet"]["SubnetId"]
        ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        iid = ec2.run_instances(ImageId=ami, InstanceType="t3.micro", MinCount=1, MaxCount=1, SubnetId=subnet,
                                PrivateIpAddress=node_ip)["Instances"][0]["InstanceId"]

        cli("init", "--group", GROUP)
        cli("hook", "--name", "launch", "--transition", "launching", "--heartbeat-timeout", "5",
            "--default-result", "ABANDON")
        cli("hook", "--name", "leave", "--transition", "terminating", "--heartbeat-timeout", "300",
            "--default-result", "CONTINUE")

        p = spawn("proxy", [PY, str(HERE / "faultproxy.py"), "--listen", f"{a.block}.2:5001", "--upstream",
                            moto_url, "--rules", str(rules), "--log-auth", "--lifecycle-state", str(state)], True)
        wait_ready(p, "faultproxy.py", 20)
        p = spawn("imds", [PY, str(HERE / "imds.py"), "--moto", moto_url, "--listen", node_ip, "--port", "1338",
                           "--control-dir", str(control), "--lifecycle-state", str(state)], True)
        wait_ready(p, "imds.py", 60)

        asg = client()
        check(imds_state() == "InService", "IMDS: an instance the state file does not know -> EC2 fallback InService")

        # ---- launch hook: heartbeats push the deadline, CONTINUE -> InService
        check(cli("launch", "--instance", iid) == "Pending:Wait", "launch with a launch hook -> Pending:Wait")
        check(imds_state() == "InService", "IMDS: Pending:Wait -> target InService")
        d0 = show()["instances"][iid]["deadline"]
        for _ in range(3):  # 3 x 2 s > the 5 s heartbeat timeout: only heartbeats keep it waiting
            time.sleep(2.0)
            r = asg.record_lifecycle_action_heartbeat(AutoScalingGroupName=GROUP, LifecycleHookName="launch",
                                                      InstanceId=iid)
            check(r["ResponseMetadata"]["HTTPStatusCode"] == 200, "RecordLifecycleActionHeartbeat -> 200")
        inst = show()["instances"][iid]
        check(inst["state"] == "Pending:Wait" and inst["deadline"] > d0 + 5,
              f"heartbeats pushed the deadline by {inst['deadline'] - d0:.1f} s, still Pending:Wait after 6 s")
        refused(lambda: asg.complete_lifecycle_action(AutoScalingGroupName=GROUP, LifecycleHookName="leave",
                                                      InstanceId=iid, LifecycleActionResult="CONTINUE"),
                "ValidationError", "No active Lifecycle Action found with instance ID", "complete for the other hook")
        refused(lambda: asg.complete_lifecycle_action(AutoScalingGroupName="other", LifecycleHookName="launch",
                                                      InstanceId=iid, LifecycleActionResult="CONTINUE"),
                "ValidationError", "not found", "complete for another group")
        refused(lambda: asg.complete_lifecycle_action(AutoScalingGroupName=GROUP, LifecycleHookName="nope",
                                                      InstanceId=iid, LifecycleActionResult="CONTINUE"),
                "ValidationError", "No Lifecycle Hook found", "complete for an unknown hook")
        refused(lambda: asg.complete_lifecycle_action(AutoScalingGroupName=GROUP, LifecycleHookName="launch",
                                                      InstanceId=iid, LifecycleActionResult="MAYBE"),
                "ValidationError", "lifecycleActionResult", "complete with a bad result")
        # An injected fault by rule, first: the call never reaches the emulation.
        rules.write_text("POST /#CompleteLifecycleAction status 503 ServiceUnavailable x1\n")
        refused(lambda: asg.complete_lifecycle_action(AutoScalingGroupName=GROUP, LifecycleHookName="launch",
                                                      InstanceId=iid, LifecycleActionResult="CONTINUE"),
                "ServiceUnavailable", "injected", "a rule fails CompleteLifecycleAction (503, awsQuery error body)")
        check(show()["instances"][iid]["state"] == "Pending:Wait", "the injected fault changed nothing")
        asg.complete_lifecycle_action(AutoScalingGroupName=GROUP, LifecycleHookName="launch", InstanceId=iid,
                                      LifecycleActionResult="CONTINUE")
        rules.write_text("")
        check(cli("state", "--instance", iid) == "InService", "CompleteLifecycleAction CONTINUE -> InService")
        refused(lambda: asg.complete_lifecycle_action(AutoScalingGroupName=GROUP, LifecycleHookName="launch",
                                                      InstanceId=iid, LifecycleActionResult="CONTINUE"),
                "ValidationError", f"No active Lifecycle Action found with instance ID {iid}",
                "a second complete (not in a Wait state)")
        refused(lambda: asg.record_lifecycle_action_heartbeat(AutoScalingGroupName=GROUP, LifecycleHookName="launch",
                                                              InstanceId=iid),
                "ValidationError", "No active Lifecycle Action", "a heartbeat outside a Wait state")
        ev = json.loads(cli("events", "--instance", iid))
        check([e["action"] for e in ev] == ["launch", "heartbeat", "heartbeat", "heartbeat", "complete"]
              and ev[-1]["result"] == "CONTINUE", "events: launch, 3 heartbeats, complete CONTINUE")

        # ---- terminate hook, completed by token; IMDS says Terminated; the IMDS directive wins
        check(cli("terminate", "--instance", iid) == "Terminating:Wait", "terminate with a hook -> Terminating:Wait")
        check(imds_state() == "Terminated", "IMDS: Terminating:Wait -> target Terminated")
        (control / node_ip).write_text("lifecycle Warmed:Running\n")
        check(imds_state() == "Warmed:Running", "IMDS: the lifecycle directive still comes first")
        (control / node_ip).write_text("")
        cli("terminated", "--instance", iid, ok=False)
        token = show()["instances"][iid]["token"]
        asg.complete_lifecycle_action(AutoScalingGroupName=GROUP, LifecycleHookName="leave",
                                      LifecycleActionToken=token, LifecycleActionResult="ABANDON")
        check(cli("wait", "--instance", iid, "--for", "Terminating:Proceed", "--timeout", "5") == "Terminating:Proceed",
              "complete by LifecycleActionToken (ABANDON) -> Terminating:Proceed")
        check(cli("terminated", "--instance", iid) == "Terminated" and imds_state() == "Terminated",
              "terminated -> Terminated; IMDS Terminated")

        # ---- timeouts apply the default result
        cli("launch", "--instance", "i-timeout1")
        msg = cli("wait", "--instance", "i-timeout1", "--for", "InService", "--timeout", "0.5", ok=False)
        check("Pending:Wait" in msg, f"wait times out naming the state: {msg!r}")
        check(cli("wait", "--instance", "i-timeout1", "--for", "InService,Terminated", "--timeout", "10") == "Terminated",
              "launch hook timeout -> default ABANDON -> Terminated")
        e = json.loads(cli("events", "--instance", "i-timeout1"))[-1]
        check(e["action"] == "timeout" and e["result"] == "ABANDON", "timeout event with result ABANDON")
        refused(lambda: asg.record_lifecycle_action_heartbeat(AutoScalingGroupName=GROUP, LifecycleHookName="launch",
                                                              InstanceId="i-timeout1"),
                "ValidationError", "No active Lifecycle Action", "a heartbeat after the timeout")
        cli("hook", "--name", "leave", "--transition", "terminating", "--heartbeat-timeout", "1",
            "--default-result", "CONTINUE")
        cli("terminate", "--instance", "i-timeout2")  # unknown to the file: taken as InService
        check(cli("wait", "--instance", "i-timeout2", "--for", "Terminating:Proceed", "--timeout", "10")
              == "Terminating:Proceed", "terminate hook timeout -> default CONTINUE -> Terminating:Proceed")

        # ---- concurrent writers lose nothing; unlocked readers always see whole JSON
        cli("hook", "--name", "launch", "--transition", "launching", "--heartbeat-timeout", "300",
            "--default-result", "ABANDON")
        ids = [f"i-conc{n}" for n in range(4)]
        for i in ids:
            cli("launch", "--instance", i)
        errors: list[str] = []
        stop = threading.Event()

        def beat(i: str) -> None:
            c = client(retries=1)
            for _ in range(15):
                try:
                    c.record_lifecycle_action_heartbeat(AutoScalingGroupName=GROUP, LifecycleHookName="launch",
                                                        InstanceId=i)
                except Exception as ex:  # noqa: BLE001
                    errors.append(repr(ex))

        def read() -> None:
            while not stop.is_set():
                try:
                    show()
                except Exception as ex:  # noqa: BLE001
                    errors.append(f"reader: {ex!r}")

        r = threading.Thread(target=read)
        r.start()
        ts = [threading.Thread(target=beat, args=(i,)) for i in ids]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        stop.set()
        r.join(10)
        n = sum(1 for e in show()["events"] if e["action"] == "heartbeat" and e["instance"] in ids)
        check(not errors and n == 60, f"4 x 15 concurrent heartbeats: {n} recorded, errors {errors[:2]}")

        # ---- the global timeout: heartbeats never push a wait past 100 x the heartbeat
        # timeout from its start (here 30000 s; the wait is made to have started 29990 s ago)
        doc = show()
        doc["instances"][ids[0]]["since"] -= 29990
        state.write_text(json.dumps(doc))  # nothing else writes the file now
        asg.record_lifecycle_action_heartbeat(AutoScalingGroupName=GROUP, LifecycleHookName="launch",
                                              InstanceId=ids[0])
        left = show()["instances"][ids[0]]["deadline"] - time.time()
        check(0 < left <= 12, f"a heartbeat near the global timeout extends the wait by {left:.0f} s, not 300")

        log = (work / "proxy.log").read_text()
        check("svc=AutoScaling op=CompleteLifecycleAction emulated instance=" in log
              and "svc=AutoScaling op=RecordLifecycleActionHeartbeat emulated" in log
              and "key=AKIASELFTEST" in log and "error=ValidationError" in log,
              "proxy log names svc=AutoScaling op=..., the outcome and key=")
        asg.describe_auto_scaling_groups()
        until = time.monotonic() + 5  # the proxy logs after it answers
        while ("svc=AutoScaling op=DescribeAutoScalingGroups key=" not in (work / "proxy.log").read_text()
               and time.monotonic() < until):
            time.sleep(0.1)
        check("svc=AutoScaling op=DescribeAutoScalingGroups key=" in (work / "proxy.log").read_text(),
              "other Auto Scaling calls are still forwarded to moto")
        print("PASS")
        return 0
    except Fail as e:
        print(f"FAIL {e}  (logs in {work})", file=sys.stderr)
        a.keep = True
        return 1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(5)
        if not a.keep:
            import shutil
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
