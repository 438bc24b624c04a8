#!/usr/bin/env python3
"""A CPU profile of latchkey under load, as a flame graph, with the share of its CPU time that
each layer takes (the kernel, hyper, tokio, the allocator, latchkey's own code).

Starts the benchmark's upstream (nginx) and OpenBao, runs latchkey (gateway form, warm cache),
drives it with wrk and records it with `perf record --call-graph dwarf`. Needs `perf`, and
inferno's `inferno-collapse-perf` and `inferno-flamegraph` (`cargo install inferno --locked
--root target/bench-tools`).

    python3 bench/flame.py --binary target/release/latchkey [--seconds 4] \\
        [--svg bench/results/flamegraph.svg]
    python3 bench/flame.py --nginx     the anchor (nginx injecting a static header), the same way

The layers are told apart by the leaf frame's name, so for nginx only the kernel's share (and
libc's) is meaningful.
"""

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402

# The layer a stack's leaf belongs to, by the first matching substring of its frame.
LAYERS = [
    ("kernel (TCP on loopback, system calls, scheduling)", ("_[k]",)),
    ("allocator", ("malloc", "free", "_int_", "__rust_alloc", "__rust_dealloc", "realloc",
                   "mimalloc", "cfree")),
    ("httparse", ("httparse::",)),
    ("hyper", ("hyper::", "hyper_util::", "h2::", "http::", "http_body")),
    ("tokio", ("tokio::", "mio::")),
    ("rustls", ("rustls::", "ring::", "aws_lc")),
    ("metrics and tracing", ("metrics", "tracing", "sketches_ddsketch", "quanta::")),
    ("latchkey", ("latchkey::",)),
    ("libc, std and other", ("",)),
]


def layer(leaf):
    for name, needles in LAYERS:
        if any(n in leaf for n in needles):
            return name
    return "libc, std and other"


def tool(name):
    found = shutil.which(name) or shutil.which(name, path=str(load.ROOT / "target/bench-tools/bin"))
    if not found:
        raise load.BenchError(f"{name} is not installed (see this script's docstring)")
    return found


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", default=str(load.ROOT / "target/release/latchkey"))
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--frequency", type=int, default=499)
    p.add_argument("--svg", type=Path)
    p.add_argument("--nginx", action="store_true", help="profile the nginx anchor instead")
    a = p.parse_args()
    if a.svg is None:
        a.svg = load.ROOT / "bench/results" / ("flamegraph-nginx.svg" if a.nginx else "flamegraph.svg")
    perf = tool("perf")
    collapse, flamegraph = tool("inferno-collapse-perf"), tool("inferno-flamegraph")

    args = load.argparse.Namespace(no_build=True, nginx=None, oha="/bin/true", stream_bytes=1 << 20,
                                   https_h2=False)
    bench = load.Bench(args)
    bench.setup()
    if a.nginx:
        name, url, pids = "nginx", f"http://127.0.0.1:{bench.anchor_http}/", bench.anchor.pids()
    else:
        lk = load.Latchkey(str(Path(a.binary).resolve()), "flame", bench.workdir, bench.bao, bench.ca_pem)
        name, url, pids = "latchkey", f"http://127.0.0.1:{lk.port}/bench/", lk.pids()
    script = load.BENCH / "lua/report.lua"
    load.wrk_run(bench.wrk, url, 2, 64, script)  # warm: the cache and the pools are full

    data = bench.workdir / "perf.data"
    rec = subprocess.Popen([perf, "record", "-F", str(a.frequency), "-g", "--call-graph", "dwarf,16384",
                            "-p", ",".join(map(str, pids)), "-o", str(data)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # perf attaches before the load starts
    t0 = load.cpu_ticks(pids)
    out = load.wrk_run(bench.wrk, url, a.seconds, 64, script)
    cpu = (load.cpu_ticks(pids) - t0) / load.CLK_TCK * 1e6 / max(out["requests"], 1)
    rec.send_signal(2)
    rec.wait(timeout=60)
    load.log(f"wrk: {out['rps']:,.0f} req/s during the profile, {name} CPU {cpu:.1f} µs/request"
             " (perf's own overhead included)")

    script_out = subprocess.run([perf, "script", "-i", str(data)], capture_output=True, check=True).stdout
    # --all marks kernel frames with `_[k]`.
    folded = subprocess.run([collapse, "--all"], input=script_out, capture_output=True, check=True).stdout
    a.svg.parent.mkdir(parents=True, exist_ok=True)
    svg = subprocess.run([flamegraph, "--minwidth", "0.3", "--title", f"{name} under wrk ({out['rps']:,.0f} req/s)"],
                         input=folded, capture_output=True, check=True).stdout
    a.svg.write_bytes(svg)

    # Self time by layer: the leaf frame of each sample.
    by_layer = collections.Counter()
    total = 0
    for line in folded.decode(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        by_layer[layer(stack.split(";")[-1])] += n
        total += n
    print(f"\n{name}'s CPU time by layer (the leaf frame of each sample, weighted by its period):")
    for layer_name, n in by_layer.most_common():
        print(f"  {layer_name:<50} {100 * n / total:5.1f}%  {cpu * n / total:5.1f} µs/request")
    print(f"\nflame graph: {a.svg}")


if __name__ == "__main__":
    try:
        main()
    finally:
        load.PROCS.stop_all()
