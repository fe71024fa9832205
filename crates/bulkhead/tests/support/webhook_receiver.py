#!/usr/bin/env python3
"""A real webhook receiver for the alert tests.

usage: webhook_receiver.py LOG_FILE SECRET FAIL_FIRST
Listens on 127.0.0.1 (a free port, printed as the first line of stdout), answers the first
FAIL_FIRST POSTs with 500, and appends one JSON line per acknowledged (2xx) delivery to LOG_FILE:
{"id", "type", "agent", "header_id", "signature_ok", "body"}.
"""
import hashlib
import hmac
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG, SECRET, FAIL_FIRST = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
lock = threading.Lock()
seen = {"posts": 0}


def signature_ok(header, body):
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        want = hmac.new(SECRET, parts["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(want, parts["v1"])
    except Exception:
        return False


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        with lock:
            seen["posts"] += 1
            fail = seen["posts"] <= FAIL_FIRST
            if not fail:
                alert = json.loads(body)
                line = {
                    "id": alert.get("id"),
                    "type": alert.get("type"),
                    "agent": alert.get("agent"),
                    "header_id": self.headers.get("bulkhead-alert-id"),
                    "signature_ok": signature_ok(self.headers.get("bulkhead-signature", ""), body),
                    "body": alert,
                }
                with open(LOG, "a") as f:
                    f.write(json.dumps(line) + "\n")
        self.send_response(500 if fail else 204)
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[4]) if len(sys.argv) > 4 else 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
