#!/usr/bin/env python3
"""Instructions per request, counted by callgrind: repeatable where wall-clock figures on a
shared machine are not. Starts the benchmark's upstream (nginx) and OpenBao, runs each given
latchkey binary under `valgrind --tool=callgrind` with one proxy worker, warms it
up, zeroes the counters, sends a fixed number of keep-alive gateway requests, and reports the
instructions latchkey executed per request: towards the plain upstream (`/bench/`) and towards
the HTTPS one (`/bench-tls/`, nginx over TLS on loopback, pooled keep-alive connections).

    python3 bench/callgrind.py --binary target/release/latchkey [--binary /tmp/other] [--requests 2000] \
        [--path plain|https|both] [--keep DIR] [--proxy-extra 'pool_idle_timeout = "5s"' ...] [--nginx]

A --proxy-extra goes into the [proxy] table of the latchkey of the --binary in the same place.
--nginx measures the benchmark's anchor too (bench/nginx/anchor.conf.tmpl, one worker, no master
process), with the same requests: the same work done by nginx, for scale.
"""

import argparse
import http.client
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402


def requests(port, path, n):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(n):
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise load.BenchError(f"status {r.status}")
    c.close()


PATHS = {"plain": "/bench/", "https": "/bench-tls/"}


def measure(bench, binary, n, keep=None, paths=("plain",), proxy_extra=""):
    """Instructions per request for each of `paths` (keys of PATHS), in one latchkey process."""
    name = Path(binary).name
    lk_dir = bench.workdir / f"cg-{name}-{os.getpid()}-{time.monotonic_ns()}"
    lk_dir.mkdir()
    port, admin = load.free_port(), load.free_port()
    config = lk_dir / "latchkey.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\nallow_private_destinations = ["127.0.0.0/8"]\n'
        f"workers = 1\n{proxy_extra}\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n"
        f'[vault]\naddress = "{bench.bao.addr}"\n\n'
        f'[tls]\nextra_roots = ["{bench.ca_pem}"]\n')
    out = lk_dir / "callgrind.out"
    # mimalloc's settings given here: latchkey would otherwise start itself again with them
    # (src/bin/latchkey/main.rs), and the new image would run outside valgrind.
    env = load.clean_env(VAULT_TOKEN=bench.bao.token, RUST_LOG="warn", MIMALLOC_PURGE_DELAY="0",
                         MIMALLOC_ARENA_EAGER_COMMIT="0")
    proc = load.PROCS.start(f"callgrind-{name}", [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
        str(Path(binary).resolve()), "serve", "--config", str(config)],
        env=env, log_path=lk_dir / "valgrind.log")
    load.wait_until("latchkey under callgrind", lambda: load.http_get(admin, "/healthz")[0] == 200,
                    timeout=120, proc=proc, interval=0.2)
    return count(proc, lk_dir, name, [(w, port, PATHS[w]) for w in paths], n, keep)


def count(proc, d, name, targets, n, keep=None):
    """Instructions per request in the process `proc` runs under callgrind (dumps into `d`), for
    each (which, port, path) of `targets`: all warmed first, then for each the counters zeroed,
    `n` keep-alive requests sent and a dump taken. Stops `proc`."""
    for _, port, path in targets:
        requests(port, path, 200)  # warm: connections open, caches and pools filled
    per = {}
    # Each dump asked for after zeroing (callgrind.out.1, .2 ...) holds one target's requests'
    # instructions, all threads together; the file without a number is the final dump at exit.
    for dump, (which, port, path) in enumerate(targets, start=1):
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        requests(port, path, n)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        out_n = d / f"callgrind.out.{dump}"
        load.wait_until(f"callgrind dump {dump}", lambda: out_n.exists() and "summary:" in out_n.read_text(
            errors="replace"), timeout=60, proc=proc, interval=0.2)
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
            kept = keep / f"callgrind.{name}.{which}.out"
            kept.write_bytes(out_n.read_bytes())
            print(f"profile: {kept} (callgrind_annotate --inclusive=yes {kept})", flush=True)
        total = next((int(line.split()[1]) for line in out_n.read_text(errors="replace").splitlines()
                      if line.startswith("summary:")), 0)
        per[which] = total / n
    load.PROCS.stop(proc, timeout=30)
    return per


def measure_nginx(bench, n, keep=None, paths=("plain",)):
    """Instructions per request of the anchor nginx (one worker, no master process)."""
    d = bench.workdir / f"cg-nginx-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir()
    for f in ("ca.pem", "server.pem", "server.key"):
        (d / f).write_bytes((bench.workdir / f).read_bytes())
    ports = {"plain": load.free_port(), "https": load.free_port()}
    out = d / "callgrind.out"
    nginx = load.Nginx(bench.nginx_bin, "callgrind-nginx", "anchor.conf.tmpl", d, {
        "NOFILE": 4096, "WORKERS": 1, "HTTP_PORT": ports["plain"], "HTTPS_PORT": ports["https"],
        "TLS_PORT": load.free_port(), "UP_HTTP_PORT": bench.up_http,
        "UP_HTTPS_PORT": bench.up_https, "UP_IDLE": "90s"},
        wrap=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no"],
        master=False)
    load.wait_until("nginx under callgrind", lambda: load.http_get(ports["plain"], "/")[0] == 200,
                    timeout=120, proc=nginx.proc, interval=0.2)
    return count(nginx.proc, d, "nginx", [(w, ports[w], "/") for w in paths], n, keep)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", action="append", required=True)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--keep", type=Path, help="copy each profile into this directory")
    p.add_argument("--proxy-extra", action="append", default=[],
                   help="a line for the [proxy] table of the --binary in the same place")
    p.add_argument("--path", choices=["plain", "https", "both"], default="both",
                   help="the upstream: plain HTTP, HTTPS, or both (default)")
    p.add_argument("--nginx", action="store_true",
                   help="measure the benchmark's anchor nginx (one worker) too, for scale")
    a = p.parse_args()
    args = load.argparse.Namespace(no_build=True, nginx=None, oha="/bin/true", stream_bytes=1 << 20,
                                   https_h2=False)
    bench = load.Bench(args)
    bench.setup()
    paths = ("plain", "https") if a.path == "both" else (a.path,)
    for i, b in enumerate(a.binary):
        extra = a.proxy_extra[i] if i < len(a.proxy_extra) else ""
        per = measure(bench, b, a.requests, a.keep, paths, extra)
        label = f"{b} ({extra})" if extra else b
        for which, n in per.items():
            upstream = "plain HTTP upstream" if which == "plain" else "HTTPS upstream"
            print(f"{label}: {n:,.0f} instructions per request (gateway form, {upstream}, {a.requests} requests)",
                  flush=True)
    if a.nginx:
        for which, n in measure_nginx(bench, a.requests, a.keep, paths).items():
            upstream = "plain HTTP upstream" if which == "plain" else "HTTPS upstream"
            print(f"nginx (anchor, 1 worker): {n:,.0f} instructions per request ({upstream}, {a.requests} requests)",
                  flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        load.PROCS.stop_all()  # OpenBao and nginx too, not only the profiled latchkey
