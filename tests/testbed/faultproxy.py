#!/usr/bin/env python3
"""An HTTP forwarding proxy in front of moto that injects faults by rule.

Part of the local AWS test-bed for ``vault-bootstrap``.  moto does not enforce e.g.
``DisableKey``, and stopping moto takes every service down at once; pointing one
client's endpoint (S3, KMS, EC2 ...) at this proxy instead lets a test make single
operations fail, hang or vanish while everything else keeps working.

Every request (method, path+query, headers minus hop-by-hop ones, body) is forwarded to
``--upstream`` with the Host header rewritten, and the status, headers and body are
relayed back.  Chunked request bodies (``Transfer-Encoding: chunked``, as the AWS SDK
may send for S3 PutObject) are de-chunked and forwarded with a Content-Length;
``Content-Encoding`` (e.g. aws-chunked) and ``x-amz-*`` headers are kept as sent.

The rules file is read at every request (absent = forward everything); the first
matching rule wins; blank lines and lines starting with ``#`` are ignored:

    <METHOD|*> <python-regex searched in path+query[#X-Amz-Target]> <action>

    (requests with an X-Amz-Target header, as KMS's are, are matched against
    ``/path?query#TrentService.Encrypt``, and EC2 query requests against
    ``/#DescribeInstances`` (the Action in their form body), so one KMS or EC2 operation
    can be failed alone)

    status <code> [<ErrorCode>]   answer <code> with an AWS-style error body
                                  (S3/XML by default; JSON if the request carries
                                  X-Amz-Target, as KMS requests do; EC2 XML if it is an
                                  EC2 query request)
    delay <seconds>               sleep, then forward
    drop                          close the connection without answering

    A last word ``x<N>`` (e.g. ``x3``) makes a rule fire for its first N matching requests
    only, then let them through (a transient fault); the counts start again whenever the
    rules file changes.

Example:  ``GET .*server\\.key status 403 AccessDenied``
          ``POST ^/$ delay 5``   (KMS/EC2 requests all go to ``/``)

Prints READY on stdout once listening; one log line per request on stderr, naming the AWS
service and operation of forwarded requests (``svc=S3 op=GetObject``), which bench/ counts.

For a moto that enforces IAM (it checks SigV4 signatures, which cover the Host header):
``--keep-host`` forwards the client's Host header unchanged instead of rewriting it to the
upstream's, and ``--log-auth`` adds to each forwarded request's line the access key id that
signed it (``key=ASIA...``, from the Authorization header; never the secret or the
signature) and, for KMS requests, the EncryptionContext of the JSON body
(``ctx={"vault-bootstrap:class":"recovery",...}``, compact and last on the line; never the
plaintext or ciphertext), so a test can count who decrypted what.

``--lifecycle-state FILE``: Auto Scaling's ``CompleteLifecycleAction`` and
``RecordLifecycleActionHeartbeat`` (moto has neither) are answered here from that state file
by lifecycle.py (its docstring has the states and the file format) and never forwarded;
their log lines read ``svc=AutoScaling op=CompleteLifecycleAction emulated instance=i-...
state=...`` (or ``error=ValidationError (...)``).  Rules apply to them first, as to every
request: Auto Scaling query requests (Action in the form body, as the SDKs send them) are
matched against ``/#<Action>`` like EC2's (e.g.
``POST /#CompleteLifecycleAction status 503 ServiceUnavailable``), and an injected status
gets Auto Scaling's XML error body.  Signatures are not checked.  Without the option these
two calls are forwarded to moto like everything else.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lifecycle  # noqa: E402 - beside this file

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "expect",
}
FAULT_MESSAGE = "injected by faultproxy"


def log(msg: str) -> None:
    try:
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} faultproxy: {msg}\n")
        sys.stderr.flush()
    except Exception:
        pass


@dataclass
class Rule:
    method: str
    pattern: re.Pattern
    action: str
    args: list[str]
    text: str
    times: int | None = None  # fire only this often (``x<N>``), None: always


# Hits per rule text for ``x<N>`` rules, cleared when the rules file's text changes.
HITS: dict[str, int] = {}
HITS_FOR: list[str] = [""]
HITS_LOCK = threading.Lock()


def load_rules(path: Path | None) -> list[Rule]:
    if path is None:
        return []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        log(f"cannot read rules file: {e}")
        return []
    with HITS_LOCK:
        text = "\n".join(lines)
        if HITS_FOR[0] != text:
            HITS.clear()
            HITS_FOR[0] = text
    rules = []
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 3:
            log(f"rules line {n} ignored (need METHOD REGEX ACTION): {line!r}")
            continue
        method, regex, action, args = parts[0].upper(), parts[1], parts[2].lower(), parts[3:]
        times = None
        if args and re.fullmatch(r"x\d+", args[-1]):
            times = int(args[-1][1:])
            args = args[:-1]
        try:
            pattern = re.compile(regex)
        except re.error as e:
            log(f"rules line {n} ignored (bad regex: {e}): {line!r}")
            continue
        if action == "status":
            if not args or not args[0].isdigit():
                log(f"rules line {n} ignored (status needs a code): {line!r}")
                continue
        elif action == "delay":
            try:
                float(args[0])
            except (IndexError, ValueError):
                log(f"rules line {n} ignored (delay needs seconds): {line!r}")
                continue
        elif action != "drop":
            log(f"rules line {n} ignored (unknown action {action!r}): {line!r}")
            continue
        rules.append(Rule(method, pattern, action, args, line, times))
    return rules


AUTOSCALING_VERSION = "2011-01-01"


def query_form(target: str, body: bytes) -> dict[str, str]:
    """A query-protocol request's parameters (form body, else query string), first values."""
    query = target.partition("?")[2]
    text = body.decode("utf-8", "replace") if b"Action=" in body else query
    return {k: v[0] for k, v in urllib.parse.parse_qs(text, keep_blank_values=True).items()}


def classify(method: str, target: str, amz_target: str | None, body: bytes) -> tuple[str, str]:
    """(service, operation) of one AWS request, as far as the wire shows it."""
    if amz_target:  # awsJson: KMS is TrentService.<Op>
        prefix, _, op = amz_target.partition(".")
        return ("KMS" if prefix == "TrentService" else prefix), op or amz_target
    path, _, query = target.partition("?")
    if path == "/" and (b"Action=" in body or "Action=" in query):  # EC2 (and other) query protocol
        form = query_form(target, body)
        svc = "AutoScaling" if form.get("Version") == AUTOSCALING_VERSION else "EC2"
        return svc, form.get("Action", "?")
    q = urllib.parse.parse_qs(query, keep_blank_values=True)
    if q.get("x-id"):  # the Rust SDK names the S3 operation itself
        return "S3", q["x-id"][0]
    if method == "GET":
        op = "ListObjectsV2" if "list-type" in q else "ListObjects" if path.count("/") == 1 else "GetObject"
    else:
        op = {"PUT": "PutObject", "HEAD": "HeadObject", "DELETE": "DeleteObject",
              "POST": "PostObject"}.get(method, method)
    return "S3", op


def match_rule(rules: list[Rule], method: str, target: str) -> Rule | None:
    for r in rules:
        if (r.method == "*" or r.method == method) and r.pattern.search(target):
            if r.times is not None:
                with HITS_LOCK:
                    n = HITS.get(r.text, 0)
                    if n >= r.times:
                        continue  # spent: the next rule (or the upstream) answers
                    HITS[r.text] = n + 1
            return r
    return None


class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, upstream: urllib.parse.SplitResult, rules: Path | None, timeout: float,
                 keep_host: bool = False, log_auth: bool = False, lifecycle_state: Path | None = None):
        self.lifecycle_state = lifecycle_state
        self.keep_host = keep_host
        self.log_auth = log_auth
        self.upstream = upstream
        self.upstream_host = upstream.hostname or "127.0.0.1"
        self.upstream_port = upstream.port or 80
        self.upstream_netloc = upstream.netloc
        self.upstream_prefix = upstream.path.rstrip("/")
        self.rules_path = rules
        self.upstream_timeout = timeout
        super().__init__(addr, ProxyHandler)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, TimeoutError)):
            return
        log(f"error serving {client_address}: {exc!r}")


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle on, a client reusing the
    # connection waits ~40 ms for every answer after the first (delayed ACK).
    disable_nagle_algorithm = True
    server: ProxyServer

    def log_message(self, format, *args):  # noqa: A002
        pass

    # ------------------------------------------------------------------ body
    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        n = int(length)
        data = bytearray()
        while len(data) < n:
            chunk = self.rfile.read(n - len(data))
            if not chunk:
                raise ConnectionError("client closed while sending the body")
            data += chunk
        return bytes(data)

    def _read_chunked(self) -> bytes:
        data = bytearray()
        while True:
            line = self.rfile.readline(65537)
            if not line:
                raise ConnectionError("client closed inside a chunked body")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # trailers (e.g. x-amz-checksum-*) up to the empty line; dropped, like
                # every hop-by-hop framing detail.
                while True:
                    t = self.rfile.readline(65537)
                    if not t or t in (b"\r\n", b"\n"):
                        break
                return bytes(data)
            while size > 0:
                chunk = self.rfile.read(size)
                if not chunk:
                    raise ConnectionError("client closed inside a chunk")
                data += chunk
                size -= len(chunk)
            self.rfile.readline(65537)  # CRLF after the chunk

    # ------------------------------------------------------------------ answers
    def _respond(self, status: int, headers: list[tuple[str, str]], body: bytes,
                 reason: str | None = None) -> None:
        try:
            self.send_response_only(status, reason)
            self.send_header("Date", self.date_time_string())
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
        except (ConnectionError, socket.timeout, TimeoutError, ValueError):
            self.close_connection = True

    def _fault_body(self, code: str, body: bytes, message: str = FAULT_MESSAGE) -> tuple[str, bytes]:
        xml_msg = message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        target = self.headers.get("X-Amz-Target")
        if target:  # awsJson protocols (KMS, ...)
            return "application/x-amz-json-1.1", json.dumps(
                {"__type": code, "message": message}).encode()
        query = urllib.parse.urlsplit(self.path).query
        if f"Version={AUTOSCALING_VERSION}".encode() in body or f"Version={AUTOSCALING_VERSION}" in query:
            return "text/xml", lifecycle.error_xml(code, message, "fault",
                                                   "Receiver" if code.startswith(("Service", "Internal")) else "Sender")
        if b"Version=2016-11-15" in body or "Version=2016-11-15" in query:  # EC2 query protocol
            return "text/xml;charset=UTF-8", (
                '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
                f"<Code>{code}</Code><Message>{xml_msg}</Message></Error></Errors>"
                "<RequestID>fault</RequestID></Response>").encode()
        return "application/xml", (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f"<Error><Code>{code}</Code><Message>{xml_msg}</Message>"
            "<RequestId>fault</RequestId></Error>").encode()

    def _inject_status(self, rule: Rule, body: bytes) -> None:
        status = int(rule.args[0])
        code = rule.args[1] if len(rule.args) > 1 else "InjectedFault"
        ctype, payload = self._fault_body(code, body)
        headers = [("Content-Type", ctype), ("Content-Length", str(len(payload))),
                   ("x-amz-request-id", "fault"), ("x-amzn-RequestId", "fault")]
        if self.headers.get("X-Amz-Target"):
            headers.append(("x-amzn-ErrorType", code))
        self._respond(status, headers, payload)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ------------------------------------------------------------------ forwarding
    def _forward(self, target: str, body: bytes) -> int:
        srv = self.server
        conn = http.client.HTTPConnection(srv.upstream_host, srv.upstream_port, timeout=srv.upstream_timeout)
        try:
            conn.putrequest(self.command, srv.upstream_prefix + target,
                            skip_host=True, skip_accept_encoding=True)
            extra_hop = {h.strip().lower() for h in (self.headers.get("Connection") or "").split(",")}
            for k, v in self.headers.items():
                lk = k.lower()
                if lk in HOP_BY_HOP or lk in extra_hop or lk in ("host", "content-length"):
                    continue
                conn.putheader(k, v)
            # A SigV4 signature covers Host: with --keep-host it reaches moto as signed.
            host = self.headers.get("Host") if srv.keep_host else None
            conn.putheader("Host", host or srv.upstream_netloc)
            if body or self.headers.get("Content-Length") is not None or \
                    self.headers.get("Transfer-Encoding") or self.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            data = resp.read()
            headers = []
            resp_hop = {h.strip().lower() for h in (resp.getheader("Connection") or "").split(",")}
            has_length = False
            for k, v in resp.getheaders():
                lk = k.lower()
                if lk in HOP_BY_HOP or lk in resp_hop or lk in ("date", "server"):
                    continue
                if lk == "content-length":
                    if self.command == "HEAD" or resp.status in (204, 304):
                        has_length = True
                        headers.append((k, v))
                    continue
                headers.append((k, v))
            if not has_length and not (self.command == "HEAD" or resp.status in (204, 304)) \
                    and resp.status >= 200:
                headers.append(("Content-Length", str(len(data))))
            self._respond(resp.status, headers, data, resp.reason)
            return resp.status
        except (OSError, http.client.HTTPException) as e:
            log(f"upstream error for {self.command} {target}: {e!r}")
            ctype, payload = self._fault_body(
                "BadGateway", body, f"faultproxy: upstream {srv.upstream_netloc} failed: {type(e).__name__}")
            self._respond(502, [("Content-Type", ctype),
                                ("Content-Length", str(len(payload)))], payload)
            return 502
        finally:
            conn.close()

    def _answer(self, target: str, body: bytes) -> tuple[int, str]:
        """Forwards the request, or answers it from the lifecycle emulation: (status, log note)."""
        if self.server.lifecycle_state is not None and not self.headers.get("X-Amz-Target") \
                and target.partition("?")[0] == "/":
            form = query_form(target, body)
            if form.get("Version") == AUTOSCALING_VERSION and form.get("Action") in lifecycle.OPERATIONS:
                try:
                    status, payload, note = lifecycle.handle(self.server.lifecycle_state, form)
                except Exception as e:  # noqa: BLE001 - a bug or an unreadable file: say so, as a 500
                    log(f"lifecycle emulation failed: {e!r}")
                    status, note = 500, f"error=InternalFailure ({e!r})"
                    payload = lifecycle.error_xml("InternalFailure", f"faultproxy: {e!r}", "fault", "Receiver")
                rid = re.search(rb"<RequestId>([^<]*)</RequestId>", payload)
                self._respond(status, [("Content-Type", "text/xml"), ("Content-Length", str(len(payload))),
                                       ("x-amzn-RequestId", rid.group(1).decode() if rid else "fault")], payload)
                return status, f" emulated {note}"
        return self._forward(target, body), ""

    def _auth_note(self, svc: str, body: bytes) -> str:
        """With --log-auth: ` key=<access key id>` and, for KMS, ` ctx=<EncryptionContext>`."""
        if not self.server.log_auth:
            return ""
        m = re.search(r"Credential=([A-Z0-9]+)/", self.headers.get("Authorization") or "")
        note = f" key={m.group(1) if m else '-'}"
        if svc == "KMS":
            try:
                ctx = json.loads(body or b"{}").get("EncryptionContext")
            except (ValueError, AttributeError):
                ctx = None
            note += " ctx=" + json.dumps(ctx, sort_keys=True, separators=(",", ":"))
        return note

    def _handle(self) -> None:
        target = self.path
        if target.startswith(("http://", "https://")):  # absolute-form request target
            parts = urllib.parse.urlsplit(target)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
        if not target.startswith("/"):
            target = "/" + target
        try:
            body = self._read_body()
        except (ValueError, ConnectionError, socket.timeout) as e:
            log(f"{self.command} {target}: bad request body ({e})")
            self.close_connection = True
            return

        amz_target = self.headers.get("X-Amz-Target")
        match_on = f"{target}#{amz_target}" if amz_target else target
        if not amz_target and target == "/" and b"Action=" in body:
            match_on = f"{target}#{classify(self.command, target, None, body)[1]}"
        rule = match_rule(load_rules(self.server.rules_path), self.command, match_on)
        if rule is None:
            status, note = self._answer(target, body)
            svc, op = classify(self.command, target, amz_target, body)
            log(f"{self.command} {target} -> {status} svc={svc} op={op}{note}{self._auth_note(svc, body)}")
        elif rule.action == "status":
            self._inject_status(rule, body)
            log(f"{self.command} {target} -> {rule.args[0]} (injected by rule {rule.text!r})")
        elif rule.action == "delay":
            secs = float(rule.args[0])
            time.sleep(secs)
            status, note = self._answer(target, body)
            log(f"{self.command} {target} -> {status}{note} (delayed {secs}s by rule {rule.text!r})")
        else:  # drop
            self._drop()
            log(f"{self.command} {target} -> dropped (rule {rule.text!r})")

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle


def listen_addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError("--listen must be HOST:PORT")
    try:
        ip = ipaddress.ip_address(host)
        p = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --listen {value!r}")
    if ip.version != 4 or not ip.is_loopback:
        raise argparse.ArgumentTypeError(f"--listen must be in 127.0.0.0/8, got {host}")
    return host, p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=listen_addr, required=True, help="HOST:PORT, e.g. 127.0.0.1:6001")
    p.add_argument("--upstream", required=True, help="upstream base URL, e.g. http://127.0.0.1:5000")
    p.add_argument("--rules", type=Path, default=None, help="rules file (read at every request)")
    p.add_argument("--upstream-timeout", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument("--keep-host", action="store_true",
                   help="forward the client's Host header unchanged (SigV4 checked upstream)")
    p.add_argument("--log-auth", action="store_true",
                   help="log the signing access key id, and each KMS request's EncryptionContext")
    p.add_argument("--lifecycle-state", type=Path, default=None, metavar="FILE",
                   help="answer CompleteLifecycleAction and RecordLifecycleActionHeartbeat from this "
                        "lifecycle.py state file instead of forwarding them")
    args = p.parse_args(argv)

    up = urllib.parse.urlsplit(args.upstream)
    if up.scheme != "http" or not up.hostname:
        p.error("--upstream must be an http:// URL")
    try:
        if not ipaddress.ip_address(socket.gethostbyname(up.hostname)).is_loopback:
            p.error("--upstream must be on 127.0.0.0/8")
    except OSError as e:
        p.error(f"cannot resolve upstream host: {e}")

    try:
        server = ProxyServer(args.listen, up, args.rules, args.upstream_timeout,
                             args.keep_host, args.log_auth, args.lifecycle_state)
    except OSError as e:
        log(f"cannot bind {args.listen[0]}:{args.listen[1]}: {e}")
        return 1

    stop = threading.Event()

    def on_signal(signum, _frame):
        log(f"signal {signum}: shutting down")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    t.start()
    log(f"listening on {args.listen[0]}:{args.listen[1]} -> {args.upstream}")
    print("READY", flush=True)
    while not stop.wait(1.0):
        pass
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
