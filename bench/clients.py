#!/usr/bin/env python3
"""Small asyncio HTTP/1.1 clients and a body sink for bench/load.py.

Each subcommand prints one JSON line on standard output (``hold`` prints one per step).

- ``requests``: GET a list of paths over C keep-alive connections, one path per request
  (used for the cold path: every path names a distinct connection, so every request costs
  latchkey one Vault read), and report latencies.
- ``burst``: open N connections first, then send one GET on each at the same instant (the
  cold burst on one connection ID), and report latencies.
- ``hold``: open connections that each send one request with keep-alive, read the answer and
  then stay open, idle; reads ``open N`` / ``quit`` commands on standard input and answers
  ``READY`` lines, so that the driver can read the proxy's RSS at each step.
- ``sink``: an upstream that reads request bodies to the end, discards them and answers with
  the number of bytes it read (the 1 GiB upload goes there).
- ``download`` / ``upload``: one large GET whose body is counted and dropped, or one PUT of
  n zero bytes; blocking sockets and 4 MiB buffers, so that the client is not the bottleneck.

Only the standard library is used, and every address is on loopback.
"""

import argparse
import asyncio
import json
import resource
import sys
import time


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(want, hard)), hard))
        if hard < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        pass


async def read_response(reader):
    """Reads one HTTP/1.1 response; returns (status, body length, keep_alive)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    keep_alive = headers.get("connection", "").lower() != "close"
    if "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            await reader.readexactly(n)
        return status, n, keep_alive
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                # trailers, then the blank line
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return status, total, keep_alive
            await reader.readexactly(size + 2)
            total += size
    if status in (204, 304) or 100 <= status < 200:
        return status, 0, keep_alive
    body = await reader.read()
    return status, len(body), False


def request_bytes(path, host):
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: latchkey-bench\r\n\r\n".encode()


def percentiles(values):
    if not values:
        return {}
    v = sorted(values)

    def p(q):
        return v[min(len(v) - 1, int(q / 100.0 * len(v)))]

    return {
        "p50_ms": p(50) * 1e3,
        "p90_ms": p(90) * 1e3,
        "p99_ms": p(99) * 1e3,
        "max_ms": v[-1] * 1e3,
        "mean_ms": sum(v) / len(v) * 1e3,
    }


def print_summary(latencies, statuses, errors, elapsed, rate=False):
    """One JSON line: counts, statuses, the first error and latency percentiles."""
    out = {"requests": len(latencies), "elapsed_s": elapsed}
    if rate:
        out["rate"] = len(latencies) / elapsed if elapsed else 0
    out.update(statuses=statuses, errors=len(errors), first_error=errors[0] if errors else None,
               **percentiles(latencies))
    print(json.dumps(out))


async def cmd_requests(args):
    paths = [line.strip() for line in open(args.paths_file) if line.strip()]
    queue = asyncio.Queue()
    for p in paths:
        queue.put_nowait(p)
    latencies, statuses, errors = [], {}, []
    host = f"{args.host}:{args.port}"

    async def worker():
        reader = writer = None
        while True:
            try:
                path = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(args.host, args.port)
                t0 = time.perf_counter()
                writer.write(request_bytes(path, host))
                status, _, keep = await read_response(reader)
                latencies.append(time.perf_counter() - t0)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if not keep:
                    writer.close()
                    writer = None
            except Exception as e:  # noqa: BLE001 (reported, not hidden)
                errors.append(repr(e))
                if writer is not None:
                    writer.close()
                writer = None
        if writer is not None:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - t0
    print_summary(latencies, statuses, errors, elapsed, rate=True)


async def cmd_burst(args):
    host = f"{args.host}:{args.port}"
    conns = []
    sem = asyncio.Semaphore(200)

    async def connect():
        async with sem:
            return await asyncio.open_connection(args.host, args.port)

    conns = await asyncio.gather(*(connect() for _ in range(args.n)))
    go = asyncio.Event()
    latencies, statuses, errors = [], {}, []

    async def one(reader, writer):
        await go.wait()
        t0 = time.perf_counter()
        try:
            writer.write(request_bytes(args.path, host))
            status, _, _ = await read_response(reader)
            latencies.append(time.perf_counter() - t0)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            writer.close()

    tasks = [asyncio.create_task(one(r, w)) for r, w in conns]
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    print_summary(latencies, statuses, errors, elapsed)


async def cmd_hold(args):
    host = f"{args.host}:{args.port}"
    held = []
    failed = 0
    sem = asyncio.Semaphore(args.parallel)

    async def open_one():
        nonlocal failed
        async with sem:
            try:
                reader, writer = await asyncio.open_connection(args.host, args.port)
                writer.write(request_bytes(args.path, host))
                status, _, keep = await read_response(reader)
                if status != 200 or not keep:
                    failed += 1
                held.append(writer)
            except Exception:  # noqa: BLE001
                failed += 1

    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        words = line.split()
        if not words:
            continue
        if words[0] == "open":
            target = int(words[1])
            t0 = time.perf_counter()
            await asyncio.gather(*(open_one() for _ in range(max(0, target - len(held)))))
            # Connections the server closed since are no longer held.
            open_now = sum(1 for w in held if not w.is_closing() and not w.transport.is_closing())
            print(json.dumps({"ready": len(held), "open": open_now, "failed": failed,
                              "elapsed_s": time.perf_counter() - t0}), flush=True)
        elif words[0] == "quit":
            break
    for w in held:
        w.close()
    print(json.dumps({"closed": len(held)}), flush=True)


class Buffered:
    """A blocking socket with a read buffer, for the streaming clients and the sink."""

    def __init__(self, sock):
        self.sock, self.buf = sock, bytearray()
        self.scratch = memoryview(bytearray(4 << 20))

    def read_until(self, delim):
        while True:
            i = self.buf.find(delim)
            if i >= 0:
                out = bytes(self.buf[:i + len(delim)])
                del self.buf[:i + len(delim)]
                return out
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            self.buf += data

    def read_exact(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def discard(self, n):
        """Reads n bytes and drops them (big reads straight into one scratch buffer)."""
        take = min(n, len(self.buf))
        del self.buf[:take]
        n -= take
        while n:
            k = self.sock.recv_into(self.scratch, min(n, len(self.scratch)))
            if not k:
                raise EOFError("connection closed")
            n -= k

    def discard_to_eof(self):
        total = len(self.buf)
        self.buf.clear()
        while True:
            k = self.sock.recv_into(self.scratch)
            if not k:
                return total
            total += k

    def read_head(self):
        head = self.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        return head[0], headers

    def read_body(self, headers, keep=False):
        """Reads a message body; returns its length (and the bytes if keep)."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            total, kept = 0, b""
            while True:
                size = int(self.read_until(b"\r\n").split(b";")[0].strip(), 16)
                if size == 0:
                    while self.read_until(b"\r\n") != b"\r\n":
                        pass
                    return total, kept
                if keep:
                    kept += self.read_exact(size)
                else:
                    self.discard(size)
                self.read_exact(2)
                total += size
        if "content-length" in headers:
            n = int(headers["content-length"])
            if keep:
                return n, self.read_exact(n)
            self.discard(n)
            return n, b""
        return None, b""


def cmd_sink(args):
    import socketserver

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            conn = Buffered(self.request)
            try:
                while True:
                    _, headers = conn.read_head()
                    if headers.get("expect", "").lower() == "100-continue":
                        self.request.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    total, _ = conn.read_body(headers)
                    body = str(total or 0).encode()
                    self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                         b"Content-Length: " + str(len(body)).encode()
                                         + b"\r\n\r\n" + body)
            except (EOFError, ConnectionError):
                return

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 1024

    with Server(("127.0.0.1", args.port), Handler) as server:
        print(json.dumps({"listening": args.port}), flush=True)
        server.serve_forever()


def cmd_stream(args):
    """``download``: GET a path and count the body; ``upload``: PUT n zero bytes."""
    import socket

    sock = socket.create_connection((args.host, args.port))
    conn = Buffered(sock)
    t0 = time.perf_counter()
    if args.cmd == "download":
        sock.sendall(f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n\r\n".encode())
        status, headers = conn.read_head()
        n, _ = conn.read_body(headers)
        if n is None:
            n = conn.discard_to_eof()
        body = None
    else:
        sock.sendall(f"PUT {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
                     f"Content-Type: application/octet-stream\r\nContent-Length: {args.bytes}\r\n\r\n".encode())
        zeros = bytes(4 << 20)
        left = args.bytes
        while left:
            k = min(left, len(zeros))
            sock.sendall(zeros[:k] if k < len(zeros) else zeros)
            left -= k
        n = args.bytes
        status, headers = conn.read_head()
        _, body = conn.read_body(headers, keep=True)
        body = body.decode("latin-1")
    elapsed = time.perf_counter() - t0
    sock.close()
    print(json.dumps({"status": int(status.split()[1]), "bytes": n, "seconds": elapsed,
                      "body": body, "headers": {k: v for k, v in headers.items()
                                                if k in ("content-length", "transfer-encoding")}}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("requests")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--paths-file", required=True)
    r.add_argument("--concurrency", type=int, default=16)
    b = sub.add_parser("burst")
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--path", required=True)
    b.add_argument("--n", type=int, default=1000)
    h = sub.add_parser("hold")
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--path", required=True)
    h.add_argument("--parallel", type=int, default=200)
    s = sub.add_parser("sink")
    s.add_argument("--port", type=int, required=True)
    for name in ("download", "upload"):
        t = sub.add_parser(name)
        t.add_argument("--host", default="127.0.0.1")
        t.add_argument("--port", type=int, required=True)
        t.add_argument("--path", required=True)
        t.add_argument("--bytes", type=int, default=0)
    args = ap.parse_args()
    raise_nofile()
    if args.cmd == "sink":
        cmd_sink(args)
    elif args.cmd in ("download", "upload"):
        cmd_stream(args)
    else:
        fn = {"requests": cmd_requests, "burst": cmd_burst, "hold": cmd_hold}
        asyncio.run(fn[args.cmd](args))


if __name__ == "__main__":
    main()
