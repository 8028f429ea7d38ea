#!/usr/bin/env python3
"""A per-instance EC2 instance metadata service (IMDSv2) backed by moto's EC2 data.

Part of the local AWS test-bed for ``vault-bootstrap``.  moto's own IMDS is a static
stub that the Rust AWS SDK rejects (its token reply lacks the TTL header), and every
node of a simulated cluster needs its *own* metadata.  This serves one HTTP listener
per node IP (``--listen 127.0.5.11 --listen 127.0.5.12 ...`` on ``--port``); all
clients connect from 127.0.0.1, so the instance is identified by the listener's own
address: it is the moto EC2 instance whose private IP equals that address.  An agent
finds its listener through ``AWS_EC2_METADATA_SERVICE_ENDPOINT=http://<ip>:<port>``.

``--by-source ADDR`` (instead of ``--listen``) is EC2's own arrangement, for the fleet tier
(tests/fleet/): ONE listener, normally ``169.254.169.254`` on ``--port 80`` on a bridge in a
network namespace, that tells instances apart by each request's source address; the
instance is the one whose private IP is that address.  Clients then need no override at
all.  A token is good only for the address that asked for it, and the token's answer leaves
with IP TTL 1, as on EC2 with ``HttpPutResponseHopLimit = 1``: it cannot cross a router.

IMDSv2 as the Rust SDK needs it: ``PUT /latest/api/token`` with
``X-aws-ec2-metadata-token-ttl-seconds`` (1..21600) returns a token and the
``x-aws-ec2-metadata-token-ttl-seconds`` response header; every GET needs a valid
``X-aws-ec2-metadata-token`` (else 401).  Served paths (under /latest/):
meta-data/{instance-id, local-ipv4, ami-id, instance-type, local-hostname, hostname,
placement/availability-zone, placement/region, tags/instance[/<key>],
autoscaling/target-lifecycle-state, iam/info, iam/security-credentials/[vault-node]}
and dynamic/instance-identity/document.

Faults: before every request the file ``<control-dir>/<node-ip>`` is read (the listener's
address, or with ``--by-source`` the request's source address; absent = healthy), one directive per line (``#`` starts a comment):
  status500               every request answers 500
  token403                PUT token answers 403
  v1only                  PUT token answers 405; GETs succeed without a token (IMDSv1)
  slow <seconds>          sleep that long before every answer
  notags                  meta-data/tags/instance and below answer 404
  lifecycle <value>       target-lifecycle-state answers <value> (e.g. Warmed:Running)
  get500 <path-substring> GETs whose path contains the substring answer 500

``autoscaling/target-lifecycle-state`` answers, in this order: the ``lifecycle`` directive
above; else, with ``--lifecycle-state FILE`` (lifecycle.py's emulation of ASG lifecycle
hooks, which faultproxy.py also serves), the instance's target state in that file:
``InService`` while it is Pending:Wait or InService, ``Terminated`` from Terminating:Wait on
(AWS reports the *target* state); else, for an instance the file does not know, ``Terminated``
when EC2 says shutting-down/terminated, ``InService`` otherwise.

Role credentials: ``iam/security-credentials/vault-node`` serves the dummy keys
``testing`` unless ``--credentials FILE`` is given: a JSON object {listen-ip: {AccessKeyId,
SecretAccessKey, Token, Expiration}} (``seed.py iam`` writes one, each instance's session of
the node role), read at every request; an IP it does not name still gets ``testing``.
``--moto-keys FILE`` ({AccessKeyId, SecretAccessKey}) signs this service's own moto calls,
for a moto that enforces IAM and refuses the dummy keys.

Instance data is looked up in moto (DescribeInstances, filter private-ip-address) and
cached for at most 1 s; if moto does not answer (e.g. a test stopped it to simulate a KMS
outage) the last known data is served, so IMDS itself keeps working.  Prints READY on
stdout once every listener is bound; one log line per request on stderr; exits cleanly
on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import secrets
import signal
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lifecycle  # noqa: E402 - beside this file

ROLE_NAME = "vault-node"
ACCOUNT_ID = "123456789012"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
CACHE_SECONDS = 1.0
STATE_RANK = {"running": 0, "pending": 1, "stopping": 2, "stopped": 3, "shutting-down": 4, "terminated": 5}


def log(msg: str) -> None:
    try:
        sys.stderr.write(f"{dt.datetime.now().strftime('%H:%M:%S.%f')[:-3]} imds: {msg}\n")
        sys.stderr.flush()
    except Exception:
        pass


def iso_z(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class InstanceSource:
    """DescribeInstances by private IP, cached briefly, stale data served on moto errors."""

    def __init__(self, moto: str, region: str, keys: tuple[str, str] = ("testing", "testing")):
        self.region = region
        session = boto3.session.Session(
            aws_access_key_id=keys[0], aws_secret_access_key=keys[1], region_name=region
        )
        # The SDK's IMDS client gives up on a read after 1 s: keep moto calls short.
        self.ec2 = session.client(
            "ec2", endpoint_url=moto,
            config=Config(connect_timeout=0.5, read_timeout=0.8,
                          retries={"max_attempts": 1, "mode": "standard"}),
        )
        self.ec2_slow = session.client(
            "ec2", endpoint_url=moto,
            config=Config(connect_timeout=5, read_timeout=120,
                          retries={"max_attempts": 1, "mode": "standard"}),
        )
        self._cache: dict[str, tuple[float, dict | None]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, ip: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(ip, threading.Lock())

    def _describe(self, ip: str, slow: bool = False) -> dict | None:
        ec2 = self.ec2_slow if slow else self.ec2
        res = ec2.describe_instances(Filters=[{"Name": "private-ip-address", "Values": [ip]}])
        found = [i for r in res["Reservations"] for i in r["Instances"]
                 if i.get("PrivateIpAddress") == ip]
        if not found:
            return None
        found.sort(key=lambda i: STATE_RANK.get(i["State"]["Name"], 9))
        return found[0]

    def warm(self, ip: str) -> None:
        """Startup lookup with a long timeout (moto's first EC2 call is slow)."""
        try:
            inst = self._describe(ip, slow=True)
            self._cache[ip] = (time.monotonic(), inst)
            if inst:
                log(f"{ip}: instance {inst['InstanceId']} ({inst['State']['Name']})")
            else:
                log(f"{ip}: no instance with this private IP in moto (yet)")
        except Exception as e:  # noqa: BLE001 - startup must not die on moto trouble
            log(f"{ip}: initial DescribeInstances failed: {e}")

    def get(self, ip: str) -> dict | None:
        entry = self._cache.get(ip)
        if entry and time.monotonic() - entry[0] <= CACHE_SECONDS:
            return entry[1]
        with self._lock(ip):
            entry = self._cache.get(ip)
            if entry and time.monotonic() - entry[0] <= CACHE_SECONDS:
                return entry[1]
            try:
                inst = self._describe(ip)
            except Exception as e:  # noqa: BLE001
                if entry:
                    log(f"{ip}: DescribeInstances failed ({type(e).__name__}); serving cached data")
                    return entry[1]
                raise
            self._cache[ip] = (time.monotonic(), inst)
            return inst


class Faults:
    def __init__(self, lines: list[str]):
        self.status500 = False
        self.token403 = False
        self.v1only = False
        self.notags = False
        self.slow = 0.0
        self.lifecycle: str | None = None
        self.get500: list[str] = []
        for raw in lines:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            word, _, rest = line.partition(" ")
            rest = rest.strip()
            if word == "status500":
                self.status500 = True
            elif word == "token403":
                self.token403 = True
            elif word == "v1only":
                self.v1only = True
            elif word == "notags":
                self.notags = True
            elif word == "slow":
                try:
                    self.slow = float(rest)
                except ValueError:
                    log(f"bad directive {line!r}")
            elif word == "lifecycle" and rest:
                self.lifecycle = rest
            elif word == "get500" and rest:
                self.get500.append(rest)
            else:
                log(f"unknown directive {line!r}")

    @classmethod
    def load(cls, control_dir: Path | None, ip: str) -> "Faults":
        if control_dir is None:
            return cls([])
        try:
            return cls((control_dir / ip).read_text().splitlines())
        except FileNotFoundError:
            return cls([])
        except OSError as e:
            log(f"cannot read control file for {ip}: {e}")
            return cls([])


class ImdsServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, ip: str, port: int, source: InstanceSource, control_dir: Path | None,
                 credentials: Path | None = None, by_source: bool = False,
                 lifecycle_state: Path | None = None):
        self.lifecycle_state = lifecycle_state
        self.listen_ip = ip
        # True: the instance is the request's source address, not the listener's.
        self.by_source = by_source
        self.source = source
        self.control_dir = control_dir
        self.credentials = credentials
        self.tokens: dict[str, tuple[float, str]] = {}
        self.tokens_lock = threading.Lock()
        super().__init__((ip, port), ImdsHandler)

    def handle_error(self, request, client_address):  # quiet on client disconnects
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, TimeoutError)):
            return
        log(f"{self.listen_ip}: error serving {client_address}: {exc!r}")

    def new_token(self, ttl: int, node_ip: str) -> str:
        token = secrets.token_urlsafe(40)
        now = time.monotonic()
        with self.tokens_lock:
            self.tokens = {t: v for t, v in self.tokens.items() if v[0] > now}
            self.tokens[token] = (now + ttl, node_ip)
        return token

    def token_valid(self, token: str | None, node_ip: str) -> bool:
        if not token:
            return False
        with self.tokens_lock:
            entry = self.tokens.get(token)
        return entry is not None and entry[0] > time.monotonic() and entry[1] == node_ip


class ImdsHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "EC2ws"
    # TCP_NODELAY: headers and body go out in two writes; with Nagle on, the body waits for
    # the client's delayed ACK (~40 ms) on every keep-alive request after the first. The Rust
    # SDK reuses its IMDS connection, so each of the agent's reads cost ~44 ms here that the
    # real IMDS does not charge (curl, one connection per request, never saw it).
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return self.server_version

    server: ImdsServer

    @property
    def node_ip(self) -> str:
        """The instance this request is about: the listener's address, or (``--by-source``)
        the address the request came from."""
        return self.client_address[0] if self.server.by_source else self.server.listen_ip

    def log_message(self, format, *args):  # noqa: A002 - silence default logging
        pass

    # -------------------------------------------------------------- plumbing
    def _drain_body(self) -> None:
        length = self.headers.get("Content-Length")
        if length:
            try:
                n = int(length)
            except ValueError:
                n = 0
            while n > 0:
                chunk = self.rfile.read(min(n, 65536))
                if not chunk:
                    break
                n -= len(chunk)
        elif "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True

    def _send(self, status: int, body: str | bytes = b"", headers: dict | None = None,
              content_type: str = "text/plain") -> None:
        data = body.encode() if isinstance(body, str) else body
        log(f"{self.node_ip} {self.command} {self.path} {status}")
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            self.wfile.flush()
        except (ConnectionError, socket.timeout, TimeoutError, ValueError):
            self.close_connection = True

    def _error(self, status: int) -> None:
        reasons = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
                   404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}
        self._send(status, f"{status} - {reasons.get(status, 'Error')}\n")

    def _prelude(self) -> Faults:
        self._drain_body()
        faults = Faults.load(self.server.control_dir, self.node_ip)
        if faults.slow > 0:
            time.sleep(faults.slow)
        return faults

    # -------------------------------------------------------------- methods
    def do_PUT(self) -> None:
        faults = self._prelude()
        if faults.status500:
            return self._error(500)
        path = urllib.parse.urlsplit(self.path).path
        if path != "/latest/api/token":
            return self._error(404)
        if self.headers.get("X-Forwarded-For") is not None:
            return self._error(403)
        if faults.v1only:
            return self._error(405)
        if faults.token403:
            return self._error(403)
        raw = self.headers.get(TTL_HEADER)
        try:
            ttl = int(raw) if raw is not None else 0
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= 21600:
            return self._error(400)
        token = self.server.new_token(ttl, self.node_ip)
        if self.server.by_source:
            # EC2's hop limit 1: the token answer dies at the first router it would cross.
            try:
                self.connection.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
            except OSError:
                pass
        self._send(200, token, {TTL_HEADER: str(ttl)})

    def do_GET(self) -> None:
        faults = self._prelude()
        if faults.status500:
            return self._error(500)
        raw_path = urllib.parse.urlsplit(self.path).path
        path = urllib.parse.unquote(raw_path)
        if any(s in path or s in raw_path for s in faults.get500):
            return self._error(500)
        if not faults.v1only and not self.server.token_valid(self.headers.get(TOKEN_HEADER), self.node_ip):
            return self._error(401)
        try:
            self._route(path, faults)
        except Exception as e:  # noqa: BLE001 - moto down and nothing cached, etc.
            log(f"{self.node_ip}: internal error on {path}: {e!r}")
            self._error(500)

    do_HEAD = do_GET

    def _other(self) -> None:
        self._prelude()
        self._error(405)

    do_POST = do_DELETE = do_PATCH = do_OPTIONS = _other

    # -------------------------------------------------------------- content
    def _route(self, path: str, faults: Faults) -> None:
        if not path.startswith("/latest/"):
            return self._error(404)
        rel = path[len("/latest/"):]

        if rel in ("meta-data", "meta-data/"):
            return self._send(200, "ami-id\nautoscaling/\nhostname\niam/\ninstance-id\n"
                                   "instance-type\nlocal-hostname\nlocal-ipv4\nplacement/\ntags/")
        if rel in ("dynamic", "dynamic/"):
            return self._send(200, "instance-identity/")

        inst = self.server.source.get(self.node_ip)
        if inst is None:
            return self._error(404)

        ip = self.node_ip
        iid = inst["InstanceId"]
        az = inst.get("Placement", {}).get("AvailabilityZone") or f"{self.server.source.region}a"
        region = self.server.source.region
        tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
        hostname = f"ip-{ip.replace('.', '-')}.ec2.internal"

        simple = {
            "meta-data/instance-id": iid,
            "meta-data/local-ipv4": ip,
            "meta-data/ami-id": inst.get("ImageId", ""),
            "meta-data/instance-type": inst.get("InstanceType", ""),
            "meta-data/local-hostname": hostname,
            "meta-data/hostname": hostname,
            "meta-data/placement/availability-zone": az,
            "meta-data/placement/region": region,
            "meta-data/placement/": "availability-zone\nregion",
            "meta-data/placement": "availability-zone\nregion",
            "meta-data/autoscaling/": "target-lifecycle-state",
            "meta-data/autoscaling": "target-lifecycle-state",
            "meta-data/iam/": "info\nsecurity-credentials/",
            "meta-data/iam": "info\nsecurity-credentials/",
            "meta-data/iam/security-credentials/": ROLE_NAME,
            "meta-data/iam/security-credentials": ROLE_NAME,
        }
        if rel in simple:
            return self._send(200, simple[rel])

        if rel == "meta-data/autoscaling/target-lifecycle-state":
            state = faults.lifecycle
            if state is None and self.server.lifecycle_state is not None:
                state = lifecycle.target_lifecycle_state(self.server.lifecycle_state, iid)
            if state is None:
                state = "Terminated" if inst["State"]["Name"] in ("shutting-down", "terminated") else "InService"
            return self._send(200, state)

        if rel == f"meta-data/iam/security-credentials/{ROLE_NAME}":
            now = dt.datetime.now(dt.timezone.utc)
            creds = {
                "AccessKeyId": "testing",
                "SecretAccessKey": "testing",
                "Token": "testing",
                "Expiration": iso_z(now + dt.timedelta(hours=6)),
            }
            if self.server.credentials is not None:
                session = json.loads(self.server.credentials.read_text()).get(ip)
                if session:
                    creds = {k: session[k] for k in creds}
            return self._send(200, json.dumps({
                "Code": "Success",
                "LastUpdated": iso_z(now),
                "Type": "AWS-HMAC",
                **creds,
            }, indent=2))

        if rel == "meta-data/iam/info":
            return self._send(200, json.dumps({
                "Code": "Success",
                "LastUpdated": iso_z(dt.datetime.now(dt.timezone.utc)),
                "InstanceProfileArn": f"arn:aws:iam::{ACCOUNT_ID}:instance-profile/{ROLE_NAME}",
                "InstanceProfileId": "AIPATESTBEDVAULTNODE",
            }, indent=2))

        if rel in ("meta-data/tags", "meta-data/tags/"):
            return self._error(404) if faults.notags else self._send(200, "instance")
        if rel in ("meta-data/tags/instance", "meta-data/tags/instance/"):
            if faults.notags:
                return self._error(404)
            return self._send(200, "\n".join(tags.keys()))
        if rel.startswith("meta-data/tags/instance/"):
            if faults.notags:
                return self._error(404)
            key = rel[len("meta-data/tags/instance/"):]
            if key in tags:
                return self._send(200, tags[key])
            return self._error(404)

        if rel in ("dynamic/instance-identity/document", "dynamic/instance-identity/document/"):
            launch = inst.get("LaunchTime")
            doc = {
                "accountId": ACCOUNT_ID,
                "architecture": inst.get("Architecture", "x86_64"),
                "availabilityZone": az,
                "billingProducts": None,
                "devpayProductCodes": None,
                "marketplaceProductCodes": None,
                "imageId": inst.get("ImageId", ""),
                "instanceId": iid,
                "instanceType": inst.get("InstanceType", ""),
                "kernelId": None,
                "pendingTime": iso_z(launch) if isinstance(launch, dt.datetime) else None,
                "privateIp": ip,
                "ramdiskId": None,
                "region": region,
                "version": "2017-09-30",
            }
            return self._send(200, json.dumps(doc, indent=2))
        if rel in ("dynamic/instance-identity", "dynamic/instance-identity/"):
            return self._send(200, "document")

        return self._error(404)


def loopback_ip(value: str) -> str:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {value!r}")
    if addr.version != 4 or not addr.is_loopback:
        raise argparse.ArgumentTypeError(f"--listen must be in 127.0.0.0/8, got {value}")
    return value


def by_source_ip(value: str) -> str:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {value!r}")
    if addr.version != 4 or not (addr.is_loopback or addr.is_link_local):
        raise argparse.ArgumentTypeError(
            f"--by-source must be 169.254.169.254 (or another link-local or loopback address), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moto", required=True, help="moto endpoint URL, e.g. http://127.0.0.1:5000")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--port", type=int, default=1338)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", type=loopback_ip, action="append",
                       help="a node IP to serve (repeatable); the instance is the one with this private IP")
    where.add_argument("--by-source", type=by_source_ip, metavar="ADDR",
                       help="one listener on ADDR (EC2: 169.254.169.254, --port 80); the instance is the "
                            "one whose private IP is the request's source address")
    p.add_argument("--warm", action="append", default=[], metavar="IP",
                   help="with --by-source: instance IPs to look up at start (moto's first call is slow)")
    p.add_argument("--control-dir", type=Path, default=None,
                   help="directory with one fault file per listen IP (read at every request)")
    p.add_argument("--credentials", type=Path, default=None,
                   help="JSON {ip: {AccessKeyId, SecretAccessKey, Token, Expiration}}: the role "
                        "credentials each instance gets (default: the dummy keys `testing`)")
    p.add_argument("--moto-keys", type=Path, default=None,
                   help="JSON {AccessKeyId, SecretAccessKey} for this service's own moto calls")
    p.add_argument("--lifecycle-state", type=Path, default=None, metavar="FILE",
                   help="lifecycle.py state file: target-lifecycle-state follows it for the "
                        "instances it knows")
    args = p.parse_args(argv)

    keys = ("testing", "testing")
    if args.moto_keys is not None:
        k = json.loads(args.moto_keys.read_text())
        keys = (k["AccessKeyId"], k["SecretAccessKey"])
    source = InstanceSource(args.moto, args.region, keys)
    servers: list[ImdsServer] = []
    try:
        if args.by_source:
            servers.append(ImdsServer(args.by_source, args.port, source, args.control_dir,
                                      args.credentials, by_source=True,
                                      lifecycle_state=args.lifecycle_state))
        else:
            for ip in dict.fromkeys(args.listen):
                servers.append(ImdsServer(ip, args.port, source, args.control_dir, args.credentials,
                                          lifecycle_state=args.lifecycle_state))
    except OSError as e:
        log(f"cannot bind: {e}")
        for s in servers:
            s.server_close()
        return 1

    for ip in dict.fromkeys(args.listen or args.warm):
        source.warm(ip)

    threads = []
    for s in servers:
        t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2},
                             name=f"imds-{s.listen_ip}", daemon=True)
        t.start()
        threads.append(t)

    stop = threading.Event()

    def on_signal(signum, _frame):
        log(f"signal {signum}: shutting down")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    log("listening on " + ", ".join(f"{s.listen_ip}:{args.port}" for s in servers))
    print("READY", flush=True)
    while not stop.wait(1.0):
        pass
    for s in servers:
        s.shutdown()
        s.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
