#!/usr/bin/env python3
"""An HTTP/1.1 upstream that misbehaves on request, for scripts/chaos and tests/e2e/faults.rs.

    python3 bench/fault_upstream.py [--port 0]

Prints ``listening PORT`` on its first line of standard output, then serves one thread per
connection. Paths (query parameters in brackets, with their defaults):

=====================================  ===========================================================
``/ok`` (and any other path)           200, ``ok``, Content-Length, kept alive
``/slow?ms=[1000]``                    the same after ``ms`` milliseconds
``/reset?after=[65536]&length=[1MiB]`` a head announcing ``length`` bytes, ``after`` of them, then
                                       a TCP reset (SO_LINGER 0): the body is cut mid-way
``/reset-head``                        a TCP reset before any byte of an answer
``/stall?after=[1024]&length=[1MiB]``  a head and ``after`` bytes, then nothing, until the peer
                                       closes the connection
``/close``                             200 ``ok`` without ``Connection: close``, then the connection
                                       is closed: a kept-alive connection that dies after its answer
``/stream?bytes=[256MiB]``             a chunked body of zeros in 64 KiB chunks, until it is all
                                       sent or the peer goes away
``/_stats``                            JSON: connections open and accepted, requests (these
                                       aside), streams open, slow answers in flight, failed
                                       accepts (``EMFILE`` and the like)
=====================================  ===========================================================

Out of descriptors (``prlimit --pid PID --nofile=N``), the accept loop waits 50 ms and tries
again, as nginx does: new connections wait in the kernel's backlog, unanswered.
"""

import argparse
import json
import socket
import struct
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024
ZEROS = bytes(CHUNK)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.v = {"open": 0, "accepted": 0, "requests": 0, "streams_open": 0,
                  "accept_errors": 0, "in_flight": 0}

    def add(self, key, n=1):
        with self.lock:
            self.v[key] += n

    def snapshot(self):
        with self.lock:
            return dict(self.v)


STATS = Stats()


def read_head(sock, buf):
    """(request line and headers, rest of buf) or None at EOF."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
        if len(buf) > 65536:
            return None
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = (lines[0].split(" ") + ["", "", ""])[:3]
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return (method, target, headers), rest


def read_body(sock, headers, rest):
    """Reads (and drops) the request body; the bytes past it."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        buf = rest
        while True:
            while b"\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    return b""
                buf += data
            line, _, buf = buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            while len(buf) < size + 2:
                data = sock.recv(65536)
                if not data:
                    return b""
                buf += data
            buf = buf[size + 2:]
            if size == 0:
                return buf
    length = int(headers.get("content-length", "0") or 0)
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            return b""
        rest += data
    return rest[length:]


def reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def answer(sock, status, body, content_type="text/plain", extra=""):
    sock.sendall((f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n"
                  f"content-length: {len(body)}\r\n{extra}\r\n").encode() + body)


def serve(sock):
    """One connection: requests until it is closed. Returns when the connection is done."""
    buf = b""
    while True:
        got = read_head(sock, buf)
        if got is None:
            return
        (method, target, headers), rest = got
        buf = read_body(sock, headers, rest)
        url = urlsplit(target)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path != "/_stats":
            STATS.add("requests")
        if path == "/_stats":
            answer(sock, "200 OK", json.dumps(STATS.snapshot()).encode(), "application/json")
        elif path == "/slow":
            STATS.add("in_flight")
            try:
                time.sleep(int(q.get("ms", "1000")) / 1000)
            finally:
                STATS.add("in_flight", -1)
            answer(sock, "200 OK", b"ok\n")
        elif path == "/reset":
            length, after = int(q.get("length", 1 << 20)), int(q.get("after", CHUNK))
            sock.sendall(f"HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n".encode())
            sock.sendall(bytes(min(after, length)))
            reset(sock)
            return
        elif path == "/reset-head":
            reset(sock)
            return
        elif path == "/stall":
            length, after = int(q.get("length", 1 << 20)), int(q.get("after", 1024))
            sock.sendall(f"HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n".encode())
            sock.sendall(bytes(min(after, length)))
            # Nothing more, until the peer gives up on it.
            while sock.recv(65536):
                pass
            return
        elif path == "/close":
            answer(sock, "200 OK", b"ok\n")
            sock.close()
            return
        elif path == "/stream":
            left = int(q.get("bytes", 256 << 20))
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            STATS.add("streams_open")
            try:
                while left > 0:
                    n = min(left, CHUNK)
                    sock.sendall(b"%x\r\n" % n + ZEROS[:n] + b"\r\n")
                    left -= n
                sock.sendall(b"0\r\n\r\n")
            finally:
                STATS.add("streams_open", -1)
        else:
            answer(sock, "200 OK", b"ok\n")


def connection(sock):
    STATS.add("open")
    try:
        serve(sock)
    except OSError:
        pass
    finally:
        STATS.add("open", -1)
        try:
            sock.close()
        except OSError:
            pass


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    a = p.parse_args()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((a.host, a.port))
    listener.listen(128)
    print(f"listening {listener.getsockname()[1]}", flush=True)
    while True:
        try:
            sock, _ = listener.accept()
        except OSError:
            # EMFILE and the like: the connection stays in the backlog; try again shortly.
            STATS.add("accept_errors")
            time.sleep(0.05)
            continue
        STATS.add("accepted")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=connection, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
