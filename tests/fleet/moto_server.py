#!/usr/bin/env python3
"""moto's server (as ``moto_server -H HOST -p PORT`` runs it), with one fix: S3's conditional
writes are atomic, as S3 guarantees and the agent's init lock relies on.

moto 5.2.5 checks ``If-None-Match: *`` and then stores the object in two steps, on a thread
per request. On the fleet tier, with the machine under load, two hosts' lock writes to the
same ``init-lock/00000000.json`` both got 200: two hosts won the lock and initialised two
clusters (S3 answers all but the first such write with 412). Here every PUT carrying
``If-None-Match`` or ``If-Match`` runs under one lock, its response read to the end inside it;
everything else stays concurrent.

Usage: moto_server.py HOST PORT
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple

CONDITIONAL = threading.Lock()


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("MOTO_PORT", str(port))
    moto = DomainDispatcherApplication(create_backend_app)

    def app(environ, start_response):
        conditional = environ.get("REQUEST_METHOD") == "PUT" and (
            "HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MATCH" in environ
        )
        if not conditional:
            return moto(environ, start_response)
        with CONDITIONAL:
            result = moto(environ, start_response)
            try:
                return [b"".join(result)]
            finally:
                close = getattr(result, "close", None)
                if close:
                    close()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_simple(host, port, app, threaded=True, request_handler=MotoRequestHandler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
