#!/usr/bin/env python3
"""What a cached connection costs in memory: latchkey's RSS as more and more distinct
connections are cached.

    python3 bench/cache_memory.py [--binary B ...] [--connections 4000] [--steps 4]

For each binary (default the release build), a fresh latchkey against one OpenBao dev server
(both from bench/load.py), the requests going to bench/fault_upstream.py. The connections are
`generic-bearer` ones with a 56-character key of letters and digits (a Stripe live key's
shape). Each step requests
the next share of them once, over 8 keep-alive connections, then reads RSS with the clients
gone. Prints a JSON line per binary: RSS at each step and the slope (KiB per cached connection,
least squares over the steps after the first).
"""

import argparse
import json
import os
import random
import string
import subprocess
import sys
import time
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import load  # noqa: E402
from load import PROCS, log, rss_kib  # noqa: E402

TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")


def key():
    """A live key as Stripe's look: `sk_live_` and 48 letters and digits of both cases (the
    alphabet matters: the matcher's size grows with the distinct bytes of the key's forms)."""
    alphabet = string.ascii_letters + string.digits
    return "sk_live_" + "".join(random.SystemRandom().choice(alphabet) for _ in range(48))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", action="append")
    ap.add_argument("--connections", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rereads", type=int, default=0,
                    help="then, this many times: wait out `cache.ttl` and request every connection "
                         "again (each one re-read from Vault); RSS after each round")
    ap.add_argument("--ttl", type=float, default=3600.0, help="cache.ttl in seconds")
    a = ap.parse_args()
    binaries = a.binary or [str(TARGET / "release/latchkey")]
    load.raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="latchkey-cachemem-"))
    load.make_certs(work)
    scripts = load.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]).strip()
    try:
        bao = load.Bao(load.find_program("bao", [scripts]), work)
        up = PROCS.start("upstream", [sys.executable, str(ROOT / "bench/fault_upstream.py")],
                         stdout=subprocess.PIPE, stderr=open(work / "upstream.log", "ab"))
        port = int(up.stdout.readline().decode().split()[1])
        ids = [f"mem-{i:05d}" for i in range(a.connections)]
        log(f"seeding {len(ids)} connections")
        bao.kv_put_many([(i, {"connector": "generic-bearer", "base_url": f"http://127.0.0.1:{port}",
                              "api_key": key()}) for i in ids])
        for n, binary in enumerate(binaries):
            lk = load.Latchkey(binary, f"m{n}", work, bao, work / "ca.pem",
                               extra=f'[cache]\nttl = "{int(a.ttl * 1000)}ms"\nmax_entries = 100000\n')
            points = [(0, rss_kib([lk.proc.pid]))]
            per = len(ids) // a.steps
            for s in range(a.steps):
                paths = work / "paths.txt"
                paths.write_text("".join(f"/{i}/ok\n" for i in ids[s * per:(s + 1) * per]))
                out = json.loads(load.run([sys.executable, str(ROOT / "bench/clients.py"), "requests",
                                           "--port", str(lk.port), "--paths-file", str(paths),
                                           "--concurrency", "8"]))
                if set(out["statuses"]) != {"200"}:
                    raise load.BenchError(f"statuses {out['statuses']}")
                points.append(((s + 1) * per, rss_kib([lk.proc.pid])))
            rounds = []
            for _ in range(a.rereads):
                time.sleep(a.ttl + 0.2)
                paths.write_text("".join(f"/{i}/ok\n" for i in ids))
                out = json.loads(load.run([sys.executable, str(ROOT / "bench/clients.py"), "requests",
                                           "--port", str(lk.port), "--paths-file", str(paths),
                                           "--concurrency", "8"]))
                rounds.append(rss_kib([lk.proc.pid]))
            xs, ys = [p[0] for p in points[1:]], [p[1] for p in points[1:]]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            print(json.dumps({"binary": binary, "rss_kib": points, "kib_per_connection": round(slope, 2),
                              "rss_kib_after_rereads": rounds}),
                  flush=True)
            lk.stop()
    finally:
        PROCS.stop_all()


if __name__ == "__main__":
    main()
