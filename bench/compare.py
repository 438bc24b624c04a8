#!/usr/bin/env python3
"""A quick A/B of throughput: nginx (the anchor) against one or more latchkey binaries, gateway
form, on the same loopback upstream, alternating runs. For iterating on performance; the full
benchmark is ``scripts/bench-load``.

    python3 bench/compare.py --binary target/release/latchkey [--binary /tmp/old-latchkey] \\
        [--rounds 5] [--duration 5] [--https] [--proxy-extra 'pool_idle_timeout = "5s"' ...]

Prints req/s and the proxy's CPU µs/request per run (user + kernel), then medians.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", action="append", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--https", action="store_true", help="HTTPS upstream")
    p.add_argument("--workers", type=int, action="append",
                   help="proxy.workers for each --binary in turn (default: one per core)")
    p.add_argument("--proxy-extra", action="append", default=[],
                   help="TOML lines in [proxy] for each --binary in turn ('' for none)")
    a = p.parse_args()

    args = load.argparse.Namespace(no_build=True, nginx=None, oha="/bin/true", stream_bytes=1 << 20,
                                   https_h2=False)
    bench = load.Bench(args)
    bench.setup()
    conn = "bench-tls" if a.https else "bench"
    anchor_port = bench.anchor_https if a.https else bench.anchor_http
    targets = [("nginx", f"http://127.0.0.1:{anchor_port}/", bench.anchor.pids)]
    workers = a.workers or []
    for i, binary in enumerate(a.binary):
        w = workers[i] if i < len(workers) else None
        extra = a.proxy_extra[i] if i < len(a.proxy_extra) else ""
        lk = load.Latchkey(str(Path(binary).resolve()), f"b{i}", bench.workdir, bench.bao, bench.ca_pem,
                           workers=w, proxy_extra=extra + "\n" if extra else "")
        targets.append((f"{Path(binary).name}#{i}" + (f" w{w}" if w else "") + (f" [{extra}]" if extra else ""),
                        f"http://127.0.0.1:{lk.port}/{conn}/", lk.pids))
    script = load.BENCH / "lua/report.lua"
    for name, url, _ in targets:  # warm-up
        load.wrk_run(bench.wrk, url, 1, a.connections, script)
    results = {name: [] for name, _, _ in targets}
    for r in range(a.rounds):
        order = targets[r % len(targets):] + targets[: r % len(targets)]
        for name, url, pids in order:
            u0, s0 = load.cpu_ticks_split(pids())
            out = load.wrk_run(bench.wrk, url, a.duration, a.connections, script)
            u1, s1 = load.cpu_ticks_split(pids())
            per = load.CLK_TCK / 1e6 * max(out["requests"], 1)
            user, system = (u1 - u0) / per, (s1 - s0) / per
            results[name].append((out["rps"], user + system, user, system))
            print(f"round {r}: {name:<20} {out['rps']:>10,.0f} req/s  {user + system:6.1f} µs/req"
                  f" ({user:.1f} user + {system:.1f} kernel)  errors {out['errors']}", flush=True)
    print()
    base = statistics.median(r[0] for r in results["nginx"])
    for name, rs in results.items():
        rps, cpu, user, system = (statistics.median(r[i] for r in rs) for i in range(4))
        print(f"{name:<20} {rps:>10,.0f} req/s  {rps / base:5.2f}× nginx  {cpu:6.1f} µs/req"
              f" ({user:.1f} user + {system:.1f} kernel)")


if __name__ == "__main__":
    try:
        main()
    finally:
        load.PROCS.stop_all() if hasattr(load.PROCS, "stop_all") else None
