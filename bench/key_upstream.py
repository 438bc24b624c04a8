#!/usr/bin/env python3
"""An upstream service that accepts only the API keys it is told to, for scripts/cluster.

    python3 bench/key_upstream.py

Prints ``listening PORT CONTROL_PORT`` on its first line of standard output, then serves
HTTP/1.1 with keep-alive, one thread per connection, on two ports:

- the service port: any method and path. A request whose ``Authorization: Bearer KEY`` names a
  key it accepts gets ``200`` with ``{"key": LABEL}`` (the key's label, never the key); any other
  gets ``401``. A request body is read and discarded. ``?delay_ms=N`` answers N ms later.
- the control port (never reached through latchkey): ``PUT /keys`` with
  ``{"LABEL": "KEY", ...}`` sets the keys accepted from then on; ``GET /stats`` answers
  ``{"by_label": {...}, "unauthorized": N}``.
"""

import http.server
import json
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

LOCK = threading.Lock()
KEYS = {}  # key -> label
STATS = {"by_label": {}, "unauthorized": 0}


class Service(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the head and the body are two writes

    def log_message(self, *_):
        pass

    def _answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        auth = self.headers.get("Authorization") or ""
        key = auth[7:] if auth.startswith("Bearer ") else None
        with LOCK:
            label = KEYS.get(key) if key else None
            if label is None:
                STATS["unauthorized"] += 1
            else:
                STATS["by_label"][label] = STATS["by_label"].get(label, 0) + 1
        q = parse_qs(urlsplit(self.path).query)
        delay = q.get("delay_ms")
        if delay:
            time.sleep(min(int(delay[0]), 60_000) / 1000)
        if label is None:
            self._answer(401, {"error": "invalid api key"})
        else:
            self._answer(200, {"key": label})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle


class Control(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *_):
        pass

    def _answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        with LOCK:
            KEYS.clear()
            KEYS.update({key: label for label, key in body.items()})
        self._answer(200, {"accepted": sorted(body)})

    def do_GET(self):
        with LOCK:
            stats = json.loads(json.dumps(STATS))
        self._answer(200, stats)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512


def main():
    service = Server(("127.0.0.1", 0), Service)
    control = Server(("127.0.0.1", 0), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    print(f"listening {service.server_address[1]} {control.server_address[1]}", flush=True)
    sys.stdout.close()
    service.serve_forever()


if __name__ == "__main__":
    main()
