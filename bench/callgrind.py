#!/usr/bin/env python3
"""Instructions per request, counted by callgrind: repeatable where wall-clock figures on a
shared machine are not. Starts the benchmark's upstream (nginx) and OpenBao, runs each given
latchkey binary under `valgrind --tool=callgrind` with one proxy worker, warms it
up, zeroes the counters, sends a fixed number of keep-alive gateway requests, and reports the
instructions latchkey executed per request.

    python3 bench/callgrind.py --binary target/release/latchkey [--binary /tmp/other] [--requests 2000] \
        [--keep DIR]
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


def measure(bench, binary, n, keep=None):
    name = Path(binary).name
    lk_dir = bench.workdir / f"cg-{name}-{os.getpid()}-{time.monotonic_ns()}"
    lk_dir.mkdir()
    port, admin = load.free_port(), load.free_port()
    config = lk_dir / "latchkey.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\nallow_private_destinations = ["127.0.0.0/8"]\n'
        f"workers = 1\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n"
        f'[vault]\naddress = "{bench.bao.addr}"\n')
    out = lk_dir / "callgrind.out"
    env = load.clean_env(VAULT_TOKEN=bench.bao.token, RUST_LOG="warn")
    proc = load.PROCS.start(f"callgrind-{name}", [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
        str(Path(binary).resolve()), "serve", "--config", str(config)],
        env=env, log_path=lk_dir / "valgrind.log")
    load.wait_until("latchkey under callgrind", lambda: load.http_get(admin, "/healthz")[0] == 200,
                    timeout=120, proc=proc, interval=0.2)
    requests(port, "/bench/", 200)  # warm: the connection is cached, pools are filled
    subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
    requests(port, "/bench/", n)
    subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
    load.PROCS.stop(proc, timeout=30)
    # Dump 1 (callgrind.out.1) is the one asked for after zeroing: the requests' instructions,
    # all threads together; the file without a number is the final dump at exit.
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
        kept = keep / f"callgrind.{name}.out"
        kept.write_bytes((lk_dir / "callgrind.out.1").read_bytes())
        print(f"profile: {kept} (callgrind_annotate --inclusive=yes {kept})", flush=True)
    total = 0
    for line in (lk_dir / "callgrind.out.1").read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            total = int(line.split()[1])
            break
    return total / n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", action="append", required=True)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--keep", type=Path, help="copy each profile into this directory")
    a = p.parse_args()
    args = load.argparse.Namespace(no_build=True, nginx=None, oha="/bin/true", stream_bytes=1 << 20,
                                   https_h2=False)
    bench = load.Bench(args)
    bench.setup()
    for b in a.binary:
        per = measure(bench, b, a.requests, a.keep)
        print(f"{b}: {per:,.0f} instructions per request (gateway form, {a.requests} requests)", flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        load.PROCS.stop_all()  # OpenBao and nginx too, not only the profiled latchkey
