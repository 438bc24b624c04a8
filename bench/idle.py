#!/usr/bin/env python3
"""Memory per idle keep-alive client connection, alone: the idle-connection step of
``bench/load.py`` (its ``Bench.idle_connections``) without the load, cold-path and streaming
phases, for one or more latchkey builds or settings in turn. Needs nginx, OpenBao's ``bao`` and
openssl (``scripts/bench-load`` installs them), and a release build
(``cargo build --release --bin latchkey``).

    python3 bench/idle.py --binary target/release/latchkey [--binary OTHER] \\
        [--proxy-extra 'pool_idle_timeout = "5s"' ...] [--env MALLOC_ARENA_MAX=2 ...] \\
        [--steps 1000,10000]

``--proxy-extra`` (TOML lines in ``[proxy]``) and ``--env`` (``K=V[,K=V]``, ``-`` for none)
apply to the ``--binary`` in the same place. For each: a fresh latchkey (gateway form, HTTP
upstream, warm after ten requests), its RSS idle, then with each number of idle keep-alive
client connections held by ``bench/clients.py hold`` (each has made one ``GET /bench/`` and
read its answer), and after they close. Prints one line per step and a summary; KiB per
connection is (RSS with N - RSS idle) / N.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", action="append", required=True)
    p.add_argument("--proxy-extra", action="append", default=[])
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000])
    a = p.parse_args()

    load.raise_nofile()
    load.atexit.register(load.PROCS.stop_all)
    workdir = Path(tempfile.mkdtemp(prefix="latchkey-idle-"))
    os.chmod(workdir, 0o755)
    load.make_certs(workdir)
    bao_bin = load.find_program("bao", [load.run([sys.executable, "-c",
                                                  "import sysconfig; print(sysconfig.get_path('scripts'))"]).strip()])
    nginx_bin = load.find_program("nginx")
    if not bao_bin or not nginx_bin:
        raise SystemExit("missing bao or nginx (scripts/bench-load installs them)")
    bao = load.Bao(bao_bin, workdir)
    up_http, up_https = load.free_port(), load.free_port()
    upstream = load.Nginx(nginx_bin, "upstream", "upstream.conf.tmpl", workdir, {
        "HTTP_PORT": up_http, "HTTPS_PORT": up_https, "HTTP2": ""})
    upstream.wait(up_http)
    bao.kv_put("bench", connector="generic-bearer", name="bench (HTTP upstream)",
               base_url=f"http://127.0.0.1:{up_http}", api_key="bench_" + os.urandom(12).hex())

    bench = load.Bench.__new__(load.Bench)
    bench.args = argparse.Namespace(idle_steps=a.steps)
    bench.workdir = workdir
    summary = []
    for i, binary in enumerate(a.binary):
        extra = a.proxy_extra[i] if i < len(a.proxy_extra) else ""
        env = a.env[i] if i < len(a.env) and a.env[i] != "-" else ""
        saved = dict(os.environ)
        os.environ.update(kv.split("=", 1) for kv in env.split(",") if kv)
        try:
            lk = load.Latchkey(str(Path(binary).resolve()), f"idle{i}", workdir, bao,
                               workdir / "ca.pem", proxy_extra=extra + "\n" if extra else "")
        finally:
            os.environ.clear()
            os.environ.update(saved)
        for _ in range(10):
            load.http_get(lk.port, "/bench/")
        label = f"{binary}" + (f" [{extra}]" if extra else "") + (f" {env}" if env else "")
        res = bench.idle_connections(f"idle{i}", lk.port, "/bench/", lk.pids)
        lk.stop()
        summary.append((label, res))
    print()
    for label, res in summary:
        idle = res["idle_kib"]
        steps = "; ".join(f"{n:,}: {res[n]['rss_kib'] / 1024:.1f} MiB "
                          f"({(res[n]['rss_kib'] - idle) / n:.2f} KiB/conn, held {res[n]['held']}, "
                          f"failed {res[n]['failed']})" for n in a.steps)
        print(f"{label}: idle {idle / 1024:.1f} MiB; {steps}; after close "
              f"{res['after_close_kib'] / 1024:.1f} MiB")
    load.PROCS.stop_all()


if __name__ == "__main__":
    main()
