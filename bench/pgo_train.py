#!/usr/bin/env python3
"""The training run of a profile-guided build (``scripts/build-pgo``): the load benchmark's world
(OpenBao, nginx as the upstream over HTTP and HTTPS, latchkey's CA), an instrumented latchkey in
each of the benchmark's forms (gateway to the plain and the HTTPS upstream, forward proxy, tunnel
with keep-alive and with a new tunnel per request), each loaded for a few seconds by the
benchmark's own clients, then stopped with SIGTERM so that it writes its counts on the way out.

    python3 bench/pgo_train.py --binary target/pgo/generate/release/latchkey [--seconds 5]

The counts go where the binary was built to write them (``-Cprofile-generate=DIR``). Fails if a
form answers anything but 200 or a latchkey does not exit cleanly: a profile from a run that did
not do the work would mislead the compiler.
"""

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", required=True, help="latchkey built with -Cprofile-generate")
    p.add_argument("--seconds", type=int, default=5, help="load per form (default 5)")
    p.add_argument("--connections", type=int, default=64)
    a = p.parse_args()
    signal.signal(signal.SIGTERM, load._on_signal)  # interrupted: stop what it started
    signal.signal(signal.SIGHUP, load._on_signal)

    # The instrumented latchkey does everything, `latchkey ca init` of the setup included (no
    # other build need exist).
    args = argparse.Namespace(no_build=True, nginx=None, oha="/bin/true", stream_bytes=1 << 20,
                              https_h2=False, http1_server=None, latchkey_bin=str(Path(a.binary).resolve()))
    bench = load.Bench(args)
    try:
        bench.setup()
        bench.build_variants()  # each form answers 200 first, or this raises
        for name in ("latchkey", "latchkey-forward", "latchkey-https", "latchkey-tunnel",
                     "latchkey-tunnel-new"):
            r = bench.load_once(name, a.seconds, a.connections)
            load.log(f"trained {name}: {r['requests']} requests, {r['errors']} errors")
            if r["errors"]:
                raise load.BenchError(f"{name}: {r['errors']} errors under load")
        for name, lk in bench.lk.items():
            lk.stop()
            if lk.proc.returncode != 0:
                raise load.BenchError(f"latchkey {name} exited with {lk.proc.returncode} on SIGTERM "
                                      f"(its counts may be missing); log: {lk.log_path}")
    except load.BenchError as e:
        load.log(f"error: {e}")
        sys.exit(1)
    finally:
        load.PROCS.stop_all()


if __name__ == "__main__":
    main()
