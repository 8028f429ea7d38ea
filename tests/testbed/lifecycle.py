#!/usr/bin/env python3
"""An emulation of EC2 Auto Scaling lifecycle actions, for the test-bed.

Part of the local AWS test-bed for ``vault-bootstrap``.  moto has ``PutLifecycleHook`` but
not ``CompleteLifecycleAction``, ``RecordLifecycleActionHeartbeat``, nor the
``Pending:Wait`` / ``Terminating:Wait`` states.  This module emulates exactly those and
nothing else: one Auto Scaling group, its lifecycle hooks (at most one per transition), and
each instance's lifecycle state.  faultproxy.py (``--lifecycle-state``) answers the two API
calls from it, imds.py (``--lifecycle-state``) serves ``autoscaling/target-lifecycle-state``
from it, and a test driver moves instances with the command line below, standing in for the
ASG (an instance refresh: launch, wait for the launch hook, terminate, wait for the
terminate hook, terminate the instance in moto, ``terminated``).

States, as on AWS:
  launch:    Pending:Wait (a launch hook exists)  --CONTINUE-->  InService
                                                  --ABANDON--->  Terminated
             InService (no launch hook)
  terminate: Terminating:Wait (a terminate hook)  --CONTINUE or ABANDON-->  Terminating:Proceed
             Terminating:Proceed (no terminate hook)
  terminated (the driver terminated it in moto):  Terminating:Proceed  -->  Terminated
A heartbeat sets the wait's deadline to now + the hook's heartbeat timeout, but never past
the wait's global timeout, as on AWS: 100 x the heartbeat timeout or 48 hours from the wait's
start, whichever is less.  When a deadline
passes, the hook's default result is applied as if completed (checked lazily, at every read
and write of the state).  Completing or heartbeating for another group, an unknown hook, a
hook the instance is not waiting on, or an instance not in a Wait state is a 400
ValidationError, as on AWS.  An instance the file does not know (e.g. one seed.py created) is
treated as InService by ``terminate``.

State file (JSON; ``--state FILE``), written whole to a temporary file and renamed over, under
``fcntl.flock`` on ``FILE.lock``, so any process may read it at any time:
  {"group": "G",
   "hooks": {"NAME": {"transition": "autoscaling:EC2_INSTANCE_LAUNCHING" | "..._TERMINATING",
                      "heartbeat_timeout": SECONDS, "default_result": "CONTINUE" | "ABANDON"}},
   "instances": {"i-...": {"state": "Pending:Wait", "hook": "NAME" | null,
                           "deadline": EPOCH | null, "result": null | "CONTINUE" | "ABANDON",
                           "since": EPOCH, "token": "UUID" | null}},
   "events": [{"time": EPOCH, "instance": "i-...", "action": "launch" | "terminate" |
               "heartbeat" | "complete" | "timeout" | "terminated", "hook": "NAME" | null,
               "result": null | "CONTINUE" | "ABANDON", "state": "STATE AFTER"}]}
Times are Unix epoch seconds (floats).  ``token`` is the wait's LifecycleActionToken.

Command line (JSON or one value on stdout; exit 1 with a message on stderr on failure, 2 on
usage errors):
  lifecycle.py --state F init --group G
  lifecycle.py --state F hook --name N --transition launching|terminating
                              --heartbeat-timeout S --default-result CONTINUE|ABANDON
  lifecycle.py --state F launch --instance ID        # prints the state entered
  lifecycle.py --state F terminate --instance ID [--instance ID ...]  # one activity; prints each state entered
  lifecycle.py --state F terminated --instance ID    # prints Terminated
  lifecycle.py --state F state --instance ID         # prints the state
  lifecycle.py --state F wait --instance ID --for STATE[,STATE...] --timeout SECS
                                                     # prints the state reached; exit 1 on timeout
  lifecycle.py --state F events [--instance ID]      # JSON list
  lifecycle.py --state F show                        # the whole state, JSON
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from xml.sax.saxutils import escape

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
TRANSITIONS = {"launching": LAUNCHING, "terminating": TERMINATING}
RESULTS = ("CONTINUE", "ABANDON")
WAIT_STATES = ("Pending:Wait", "Terminating:Wait")
STATES = ("Pending:Wait", "InService", "Terminating:Wait", "Terminating:Proceed", "Terminated")
XMLNS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"
OPERATIONS = ("CompleteLifecycleAction", "RecordLifecycleActionHeartbeat")


class LifecycleError(Exception):
    """A refused request: ``code`` and ``status`` as AWS would answer it."""

    def __init__(self, message: str, code: str = "ValidationError", status: int = 400):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


# ----------------------------------------------------------------------------- the file
def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def _locked(path: Path):
    fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write(path: Path, doc: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise LifecycleError(f"no lifecycle state file {path} (run `lifecycle.py --state {path} init` first)")
    except (OSError, ValueError) as e:
        raise LifecycleError(f"cannot read lifecycle state file {path}: {e}")
    for k in ("group", "hooks", "instances", "events"):
        if k not in doc:
            raise LifecycleError(f"lifecycle state file {path} has no {k!r}: not made by lifecycle.py init")
    return doc


def _event(doc: dict, now: float, iid: str, action: str, hook: str | None, result: str | None) -> None:
    doc["events"].append({"time": round(now, 3), "instance": iid, "action": action, "hook": hook,
                          "result": result, "state": doc["instances"][iid]["state"]})


# AWS bounds every lifecycle wait, heartbeats or not: 100 x the hook's heartbeat timeout or
# 48 hours from the wait's start, whichever is less (the "global timeout").
GLOBAL_TIMEOUT_FACTOR = 100
GLOBAL_TIMEOUT_MAX = 48 * 3600


def _set(doc: dict, now: float, iid: str, state: str, hook: str | None = None,
         deadline: float | None = None, result: str | None = None, token: str | None = None) -> None:
    doc["instances"][iid] = {"state": state, "hook": hook, "deadline": deadline, "result": result,
                             "since": round(now, 3), "token": token}


def _finish(doc: dict, now: float, iid: str, result: str, action: str) -> None:
    """Ends the instance's wait with ``result`` (a completion or a timeout)."""
    inst = doc["instances"][iid]
    hook = inst["hook"]
    if inst["state"] == "Pending:Wait":
        state = "InService" if result == "CONTINUE" else "Terminated"
    else:  # Terminating:Wait: either result lets the termination go on
        state = "Terminating:Proceed"
    _set(doc, now, iid, state, hook=hook, result=result)
    _event(doc, now, iid, action, hook, result)


def _expire(doc: dict, now: float) -> bool:
    """Applies the default result of every wait whose deadline passed; True if any did."""
    changed = False
    for iid, inst in sorted(doc["instances"].items(), key=lambda kv: kv[1].get("deadline") or 0):
        if inst["state"] in WAIT_STATES and inst.get("deadline") is not None and inst["deadline"] <= now:
            hook = doc["hooks"].get(inst["hook"] or "", {})
            result = hook.get("default_result", "ABANDON")
            _finish(doc, inst["deadline"], iid, result, "timeout")
            changed = True
    return changed


class LifecycleState:
    """The state file.  Every method takes the lock, applies expired deadlines, and writes
    the file back if anything changed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @contextlib.contextmanager
    def _txn(self, create: dict | None = None):
        with _locked(self.path):
            now = time.time()
            doc = create if create is not None else _read(self.path)
            before = json.dumps(doc, sort_keys=True) if create is None else None
            _expire(doc, now)
            try:
                yield doc, now
            except LifecycleError:
                # Refused before changing anything: keep the deadlines that expired meanwhile.
                if create is None and json.dumps(doc, sort_keys=True) != before:
                    _write(self.path, doc)
                raise
            if create is not None or json.dumps(doc, sort_keys=True) != before:
                _write(self.path, doc)

    # ------------------------------------------------------------------ driver side
    def init(self, group: str) -> dict:
        if not group:
            raise LifecycleError("init needs a group name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._txn(create={"group": group, "hooks": {}, "instances": {}, "events": []}) as (doc, _):
            return doc

    def add_hook(self, name: str, transition: str, heartbeat_timeout: float, default_result: str) -> dict:
        transition = TRANSITIONS.get(transition, transition)
        if transition not in (LAUNCHING, TERMINATING):
            raise LifecycleError(f"transition must be launching or terminating, not {transition!r}")
        if default_result not in RESULTS:
            raise LifecycleError(f"default result must be CONTINUE or ABANDON, not {default_result!r}")
        if not heartbeat_timeout > 0:
            raise LifecycleError(f"heartbeat timeout must be > 0, not {heartbeat_timeout}")
        with self._txn() as (doc, _):
            for other, h in doc["hooks"].items():
                if other != name and h["transition"] == transition:
                    raise LifecycleError(f"hook {other!r} already handles {transition}: this emulation "
                                         "supports one hook per transition")
            doc["hooks"][name] = {"transition": transition, "heartbeat_timeout": heartbeat_timeout,
                                  "default_result": default_result}
            return doc["hooks"][name]

    def _hook_for(self, doc: dict, transition: str) -> tuple[str, dict] | None:
        for name, h in doc["hooks"].items():
            if h["transition"] == transition:
                return name, h
        return None

    def launch(self, iid: str) -> str:
        with self._txn() as (doc, now):
            cur = doc["instances"].get(iid)
            if cur is not None:
                raise LifecycleError(f"instance {iid} was launched already (it is {cur['state']})")
            hook = self._hook_for(doc, LAUNCHING)
            if hook:
                _set(doc, now, iid, "Pending:Wait", hook=hook[0], deadline=now + hook[1]["heartbeat_timeout"],
                     token=str(uuid.uuid4()))
            else:
                _set(doc, now, iid, "InService")
            _event(doc, now, iid, "launch", hook[0] if hook else None, None)
            return doc["instances"][iid]["state"]

    def terminate(self, *iids: str) -> list[str]:
        """Starts terminating the instances in one write (all or none): what one scale-in
        activity does to several instances."""
        with self._txn() as (doc, now):
            hook = self._hook_for(doc, TERMINATING)
            for iid in iids:
                cur = doc["instances"].get(iid)
                if cur is not None and cur["state"] != "InService":
                    raise LifecycleError(f"instance {iid} is {cur['state']}, not InService: cannot terminate it")
            for iid in iids:
                if hook:
                    _set(doc, now, iid, "Terminating:Wait", hook=hook[0],
                         deadline=now + hook[1]["heartbeat_timeout"], token=str(uuid.uuid4()))
                else:
                    _set(doc, now, iid, "Terminating:Proceed")
                _event(doc, now, iid, "terminate", hook[0] if hook else None, None)
            return [doc["instances"][iid]["state"] for iid in iids]

    def terminated(self, iid: str) -> str:
        with self._txn() as (doc, now):
            cur = doc["instances"].get(iid)
            if cur is None:
                raise LifecycleError(f"instance {iid} is not in the lifecycle state file")
            if cur["state"] == "Terminated":
                return "Terminated"
            if cur["state"] != "Terminating:Proceed":
                raise LifecycleError(f"instance {iid} is {cur['state']}, not Terminating:Proceed: "
                                     "its terminate hook is not complete")
            _set(doc, now, iid, "Terminated", hook=cur["hook"], result=cur["result"])
            _event(doc, now, iid, "terminated", cur["hook"], cur["result"])
            return "Terminated"

    def state(self, iid: str) -> str | None:
        """The instance's state, None if the file does not know it."""
        with self._txn() as (doc, _):
            inst = doc["instances"].get(iid)
            return inst["state"] if inst else None

    def show(self) -> dict:
        with self._txn() as (doc, _):
            return doc

    def events(self, iid: str | None = None) -> list[dict]:
        with self._txn() as (doc, _):
            return [e for e in doc["events"] if iid is None or e["instance"] == iid]

    # ------------------------------------------------------------------ API side
    def _active(self, doc: dict, group: str, hook_name: str, iid: str | None, token: str | None) -> str:
        """The instance whose wait a request names; raises the ValidationError AWS would."""
        if not group:
            raise LifecycleError("AutoScalingGroupName is required")
        if not hook_name:
            raise LifecycleError("LifecycleHookName is required")
        if not iid and not token:
            raise LifecycleError("Either InstanceId or LifecycleActionToken must be specified")
        if group != doc["group"]:
            raise LifecycleError(f"Group {group} not found")
        if hook_name not in doc["hooks"]:
            raise LifecycleError(f"No Lifecycle Hook found with name {hook_name} for group {group}")
        if token and not iid:
            found = [i for i, v in doc["instances"].items()
                     if v.get("token") == token and v["state"] in WAIT_STATES]
            if not found:
                raise LifecycleError(f"No active Lifecycle Action found with token {token}")
            iid = found[0]
        assert iid is not None
        inst = doc["instances"].get(iid)
        if inst is None or inst["state"] not in WAIT_STATES or inst["hook"] != hook_name \
                or (token and inst.get("token") != token):
            raise LifecycleError(f"No active Lifecycle Action found with instance ID {iid}")
        return iid

    def complete(self, group: str, hook_name: str, iid: str | None, token: str | None, result: str) -> tuple[str, str]:
        """CompleteLifecycleAction; returns (instance id, its new state)."""
        if result not in RESULTS:
            raise LifecycleError(f"Value '{result}' at 'lifecycleActionResult' failed to satisfy "
                                 "constraint: Member must be CONTINUE or ABANDON")
        with self._txn() as (doc, now):
            iid = self._active(doc, group, hook_name, iid, token)
            _finish(doc, now, iid, result, "complete")
            return iid, doc["instances"][iid]["state"]

    def heartbeat(self, group: str, hook_name: str, iid: str | None, token: str | None) -> tuple[str, str]:
        """RecordLifecycleActionHeartbeat; returns (instance id, its state)."""
        with self._txn() as (doc, now):
            iid = self._active(doc, group, hook_name, iid, token)
            inst = doc["instances"][iid]
            timeout = doc["hooks"][hook_name]["heartbeat_timeout"]
            cap = inst["since"] + min(GLOBAL_TIMEOUT_FACTOR * timeout, GLOBAL_TIMEOUT_MAX)
            inst["deadline"] = min(now + timeout, cap)
            _event(doc, now, iid, "heartbeat", hook_name, None)
            return iid, inst["state"]


# ----------------------------------------------------------------------------- for imds.py
def target_lifecycle_state(path: str | os.PathLike, iid: str) -> str | None:
    """What IMDS ``autoscaling/target-lifecycle-state`` says for ``iid`` (AWS reports the
    *target* state: InService while Pending:Wait, Terminated from Terminating:Wait on), or
    None when the file does not exist or does not know the instance."""
    if not Path(path).exists():
        return None
    state = LifecycleState(path).state(iid)
    if state is None:
        return None
    return "InService" if state in ("Pending:Wait", "InService") else "Terminated"


# ----------------------------------------------------------------------------- for faultproxy.py
def _xml(op: str, request_id: str) -> bytes:
    return (f'<{op}Response xmlns="{XMLNS}"><{op}Result/><ResponseMetadata>'
            f"<RequestId>{request_id}</RequestId></ResponseMetadata></{op}Response>").encode()


def error_xml(code: str, message: str, request_id: str, kind: str = "Sender") -> bytes:
    """An awsQuery (Auto Scaling) error body."""
    return (f'<ErrorResponse xmlns="{XMLNS}"><Error><Type>{kind}</Type><Code>{escape(code)}</Code>'
            f"<Message>{escape(message)}</Message></Error><RequestId>{request_id}</RequestId>"
            "</ErrorResponse>").encode()


def handle(path: str | os.PathLike, form: dict[str, str]) -> tuple[int, bytes, str]:
    """Answers one CompleteLifecycleAction or RecordLifecycleActionHeartbeat request (its
    form fields, first values): (HTTP status, XML body, a short note for the log)."""
    op = form.get("Action", "")
    request_id = str(uuid.uuid4())
    st = LifecycleState(path)
    try:
        if op == "CompleteLifecycleAction":
            iid, state = st.complete(form.get("AutoScalingGroupName", ""), form.get("LifecycleHookName", ""),
                                     form.get("InstanceId") or None, form.get("LifecycleActionToken") or None,
                                     form.get("LifecycleActionResult", ""))
        elif op == "RecordLifecycleActionHeartbeat":
            iid, state = st.heartbeat(form.get("AutoScalingGroupName", ""), form.get("LifecycleHookName", ""),
                                      form.get("InstanceId") or None, form.get("LifecycleActionToken") or None)
        else:
            raise LifecycleError(f"lifecycle.py does not emulate {op!r}", code="InvalidAction")
    except LifecycleError as e:
        return e.status, error_xml(e.code, e.message, request_id), f"error={e.code} ({e.message})"
    return 200, _xml(op, request_id), f"instance={iid} state={state}"


# ----------------------------------------------------------------------------- command line
def _wait(st: LifecycleState, iid: str, want: list[str], timeout: float) -> tuple[bool, str | None]:
    end = time.monotonic() + timeout
    while True:
        state = st.state(iid)
        if state in want:
            return True, state
        if time.monotonic() >= end:
            return False, state
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", type=Path, required=True, help="the JSON state file")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("init", help="a new state file for one group (replaces an existing one)")
    s.add_argument("--group", required=True)
    s = sub.add_parser("hook", help="add or replace a lifecycle hook")
    s.add_argument("--name", required=True)
    s.add_argument("--transition", required=True, choices=sorted(TRANSITIONS))
    s.add_argument("--heartbeat-timeout", type=float, required=True, metavar="SECS")
    s.add_argument("--default-result", required=True, choices=RESULTS)
    s = sub.add_parser("terminate", help="the ASG starts terminating the instances (one scale-in"
                       " activity: every one at the same instant)")
    s.add_argument("--instance", required=True, action="append")
    for name, text in (("launch", "the ASG launches the instance"),
                       ("terminated", "the driver terminated the instance (after Terminating:Proceed)"),
                       ("state", "print the instance's state")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--instance", required=True)
    s = sub.add_parser("wait", help="wait (bounded) until the instance is in one of the states")
    s.add_argument("--instance", required=True)
    s.add_argument("--for", dest="states", required=True, metavar="STATE[,STATE...]")
    s.add_argument("--timeout", type=float, required=True, metavar="SECS")
    s = sub.add_parser("events", help="the events, oldest first (JSON)")
    s.add_argument("--instance")
    sub.add_parser("show", help="the whole state (JSON)")
    a = p.parse_args(argv)

    st = LifecycleState(a.state)
    try:
        if a.cmd == "init":
            print(json.dumps(st.init(a.group), indent=1, sort_keys=True))
        elif a.cmd == "hook":
            print(json.dumps(st.add_hook(a.name, a.transition, a.heartbeat_timeout, a.default_result),
                             sort_keys=True))
        elif a.cmd == "launch":
            print(st.launch(a.instance))
        elif a.cmd == "terminate":
            print("\n".join(st.terminate(*a.instance)))
        elif a.cmd == "terminated":
            print(st.terminated(a.instance))
        elif a.cmd == "state":
            state = st.state(a.instance)
            if state is None:
                raise LifecycleError(f"instance {a.instance} is not in the lifecycle state file")
            print(state)
        elif a.cmd == "wait":
            want = [w.strip() for w in a.states.split(",") if w.strip()]
            bad = [w for w in want if w not in STATES]
            if bad or not want:
                p.error(f"--for: unknown state(s) {bad or a.states!r}; states: {', '.join(STATES)}")
            if not 0 <= a.timeout <= 86400:
                p.error("--timeout must be within 0..86400 seconds")
            ok, state = _wait(st, a.instance, want, a.timeout)
            if not ok:
                raise LifecycleError(f"timed out after {a.timeout:g} s waiting for {a.instance} to be "
                                     f"{' or '.join(want)}: it is {state or 'not in the state file'}")
            print(state)
        elif a.cmd == "events":
            print(json.dumps(st.events(a.instance), indent=1))
        elif a.cmd == "show":
            print(json.dumps(st.show(), indent=1, sort_keys=True))
    except LifecycleError as e:
        print(f"lifecycle.py {a.cmd}: {e.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
