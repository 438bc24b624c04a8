#!/usr/bin/env python3
"""The HTTPS tail at low load, alone: open-loop runs (oha, latency correction) at one offered
rate against latchkey's gateway form to the HTTPS upstream and against nginx proxying to the
same upstream, alternating, with what latchkey's upstream pool did during each run (upstream
connections opened, pooled connections found closed) counted from its debug log. For finding
where latchkey-https's p99.9 comes from (issue 15); the full benchmark is
``scripts/bench-load``.

    python3 bench/tail.py --binary target/release/latchkey [--rate 6213] [--rounds 3] \\
        [--duration 8] [--pause 0] [--cold 4] [--plain] [--proxy-extra 'pool_idle_timeout = "5s"']

Needs what ``bench/compare.py`` needs, and oha (``scripts/bench-load`` builds it into
``target/bench-tools/bin``).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402

OPENED = "opening an upstream connection"
CLOSED = "a pooled upstream connection had closed"
RESUMED = '"resumed":true'  # on latchkey's "TLS with an upstream established" line


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", required=True)
    p.add_argument("--rate", type=int, default=6213)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=8)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--plain", action="store_true", help="the plain upstream instead")
    p.add_argument("--proxy-extra", default="", help="TOML lines in latchkey's [proxy]")
    p.add_argument("--pause", type=float, default=0,
                   help="seconds with no traffic before each run (the benchmark's runs of other "
                        "variants in between)")
    p.add_argument("--cold", type=float, default=0,
                   help="upstream connections idle this many seconds are closed, by latchkey "
                        "(proxy.pool_idle_timeout) and by nginx (keepalive_timeout) alike: with a "
                        "longer --pause, both meet an empty pool at the start of every run")
    a = p.parse_args()

    oha = load.find_program("oha", [load.ROOT / "target/bench-tools/bin"])
    if not oha:
        raise load.BenchError("oha is missing: scripts/bench-load builds it")
    args = load.argparse.Namespace(no_build=True, nginx=None, oha=oha, stream_bytes=1 << 20,
                                   https_h2=False, upstream_idle=f"{a.cold:g}s" if a.cold else None)
    bench = load.Bench(args)
    bench.setup()
    lk = load.Latchkey(str(Path(a.binary).resolve()), "tail", bench.workdir, bench.bao,
                       bench.ca_pem, proxy_extra=a.proxy_extra + "\n" + (
                           f'pool_idle_timeout = "{a.cold:g}s"\n' if a.cold else ""),
                       rust_log="warn,latchkey::upstream=debug")
    conn, port = ("bench", bench.anchor_http) if a.plain else ("bench-tls", bench.anchor_https)
    targets = [("latchkey", f"http://127.0.0.1:{lk.port}/{conn}/"),
               ("nginx", f"http://127.0.0.1:{port}/")]
    script = load.BENCH / "lua/report.lua"
    for _, url in targets:  # warm-up: the pools filled by a closed loop, as in the benchmark
        load.wrk_run(bench.wrk, url, 2, a.connections, script)

    def counts():
        text = lk.log_path.read_text(errors="replace")
        return text.count(OPENED), text.count(CLOSED), text.count(RESUMED)

    results = {name: [] for name, _ in targets}
    for r in range(a.rounds):
        for name, url in (targets if r % 2 == 0 else targets[::-1]):
            time.sleep(a.pause)
            before = counts()
            out = load.oha_run(oha, url, a.duration, a.rate, a.connections)
            after = counts()
            opened, closed, resumed = (x - y for x, y in zip(after, before))
            results[name].append(out)
            extra = f"  upstream connections opened {opened} ({resumed} TLS resumed), " \
                f"found closed {closed}" \
                if name == "latchkey" else ""
            print(f"round {r}: {name:<9} {a.rate}/s  p50 {out['p50_ms']:.3f}  p99 {out['p99_ms']:.3f}"
                  f"  p99.9 {out['p999_ms']:.3f} ms  errors {out['errors'] + out['non200']}{extra}",
                  flush=True)
    print()
    for name, rs in results.items():
        med = {k: statistics.median(x[k] for x in rs) for k in ("p50_ms", "p99_ms", "p999_ms")}
        print(f"{name:<9} median p50 {med['p50_ms']:.3f}  p99 {med['p99_ms']:.3f}  "
              f"p99.9 {med['p999_ms']:.3f} ms")
    load.PROCS.stop_all()


if __name__ == "__main__":
    try:
        main()
    except load.BenchError as e:
        load.PROCS.stop_all()
        sys.exit(f"tail: {e}")
