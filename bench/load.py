#!/usr/bin/env python3
"""latchkey's load benchmark: one command, one run, every variant on the same loopback upstream.

Run it with ``scripts/bench-load`` (``--quick`` for a short smoke run of the harness itself).
It writes ``bench/results/latest.md`` (tables, the exact command, the settings),
``bench/results/latest.json`` (every raw figure) and ``bench/results/latency.png`` (latency
against offered rate, one line per variant). ``--quick`` writes to ``bench/results/quick/``.

What runs (all on 127.0.0.1, ports picked at run time, every process stopped at exit):

- an OpenBao dev server (``bao server -dev``) with a file audit device declared in its config
  file, so that Vault reads are counted at OpenBao itself; the benchmark's connections are
  written with ``bao kv put`` (the 1,000 connections of the cold-path test through the same KV
  HTTP API, which is quicker than 1,000 CLI processes);
- the upstream: nginx, one worker, answering ``ok\\n`` on an HTTP port and an HTTPS port (a
  CA and a server certificate made with openssl), and serving a sparse 1 GiB file;
- the anchor: a second nginx, one worker per core, as a reverse proxy that injects a static
  ``Authorization`` header, with upstream keep-alive, over HTTP and over HTTPS;
- latchkey (``cargo build --release``), one process per variant, ``RUST_LOG=warn`` so that the
  access log (info level) is off the hot path, no ``[[clients]]`` (open on loopback),
  ``proxy.allow_private_destinations = ["127.0.0.0/8"]``, the CA in ``tls.extra_roots``.

The variants, alternated (each round runs every variant once, in a rotated order; figures are
medians over rounds):

==================  ========================================================================
direct              the client straight to the upstream
nginx               the anchor, HTTP upstream
latchkey            gateway form ``GET /bench/``, warm cache, HTTP upstream
latchkey-forward    forward form: absolute-form ``GET http://upstream/`` with
                    ``Proxy-Authorization: Basic base64(bench:x)`` (wrk via bench/lua/forward.lua)
latchkey-https      gateway form, HTTPS upstream (HTTP/1.1 unless ``--https-h2``)
nginx-https         the anchor, same HTTPS upstream
latchkey-tunnel     tunnel form: ``CONNECT api.bench.test:443`` (pinned to the HTTPS upstream
                    by ``proxy.resolve``), TLS to latchkey with its leaf, keep-alive GETs inside
nginx-tls           the anchor terminating TLS (a certificate for api.bench.test), same upstream
latchkey-tunnel-new every request a new tunnel: CONNECT and a full TLS handshake, leaf cached
nginx-tls-new       every request a new TLS connection to the anchor, no session resumption
==================  ========================================================================

The four TLS variants are driven by ``examples/tunnel_load.rs`` (built with latchkey), the same
client on both sides; the others by wrk (throughput) and oha (latency).

Measurements:

1. Throughput, closed loop: wrk, ``-c`` connections, 2 threads. During each run the driver
   reads utime+stime of the proxy's processes (nginx: master and workers) and of the upstream
   from ``/proc/PID/stat`` and divides by the requests completed (CPU microseconds per
   request), and the peak RSS (``VmHWM``, reset before each run through
   ``/proc/PID/clear_refs`` when the kernel allows it, else the process-lifetime peak).
2. Latency, open loop: oha with ``--latency-correction`` (no coordinated omission) at 25%, 50%
   and 75% of a saturation rate measured in step 1, p50/p99/p99.9: the variants to the plain
   upstream at fractions of the lower of latchkey's and nginx's plain rates, those to the HTTPS
   upstream at fractions of the lower of their HTTPS rates (``LATENCY_GROUPS``); ``direct`` at
   both sets of rates.
3. Cold path (a fresh latchkey): requests on many distinct connections, each one a cache miss
   and a Vault read, then the same again warm; then a burst of concurrent requests on one new
   connection; Vault reads counted in the audit log.
   The TLS variants run in the same rotated rounds, with the tunnel_load client; its
   latencies are those of the closed loop (every connection busy: queueing included).
4. Memory (a fresh latchkey, and the anchor for comparison): RSS idle, with 1,000 and 10,000
   idle keep-alive client connections, and while streaming a 1 GiB body through in each
   direction (download from the upstream, upload to a sink that discards it), sampled every
   10 ms plus ``VmHWM``.

Nothing is pinned: the load generator, the proxy and the upstream share the machine's cores,
and the output says so.
"""

import argparse
import atexit
import base64
import datetime as dt
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
# Seconds every held connection waits before the memory step reads RSS (see idle_connections).
IDLE_SETTLE = 5
GiB = 1 << 30

VARIANTS = ["direct", "nginx", "latchkey", "latchkey-forward", "latchkey-https", "nginx-https"]
# The open-loop latency runs, in two groups, each at 25, 50 and 75% of the saturation of its pair
# (the lower of the two throughputs of step 1): the variants to the plain upstream, and those to
# the HTTPS one; `direct` runs at both groups' rates, for the latency each adds.
LATENCY_GROUPS = {
    "plain": {"variants": ["direct", "nginx", "latchkey", "latchkey-forward"],
              "pair": ("latchkey", "nginx")},
    "https": {"variants": ["direct", "nginx-https", "latchkey-https"],
              "pair": ("latchkey-https", "nginx-https")},
}
LATENCY_FRACTIONS = (0.25, 0.50, 0.75)
# Driven by examples/tunnel_load.rs (both sides), in the same rounds as VARIANTS.
TLS_VARIANTS = ["latchkey-tunnel", "nginx-tls", "latchkey-tunnel-new", "nginx-tls-new"]
# latchkey's against nginx's, for the ratios.
TLS_PAIRS = [("latchkey-tunnel", "nginx-tls"), ("latchkey-tunnel-new", "nginx-tls-new")]
# The service's name in the tunnel variants: pinned to the HTTPS upstream by proxy.resolve, and
# in the upstream's (and the anchor's TLS port's) certificate.
TUNNEL_HOST = "api.bench.test"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
DESCRIPTIONS = {
    "direct": "client → upstream, no proxy",
    "nginx": "nginx reverse proxy, static Authorization header (the anchor)",
    "latchkey": "latchkey gateway form, warm cache",
    "latchkey-forward": "latchkey forward form (absolute-form + Proxy-Authorization)",
    "latchkey-https": "latchkey gateway form → HTTPS upstream",
    "nginx-https": "nginx reverse proxy → same HTTPS upstream",
    "latchkey-tunnel": "latchkey tunnel form: one CONNECT and TLS handshake per client connection "
                       "(leaf cached), keep-alive requests inside → HTTPS upstream",
    "nginx-tls": "nginx terminating TLS (no session resumption), keep-alive → same HTTPS upstream",
    "latchkey-tunnel-new": "latchkey tunnel form, every request a new TCP connection, CONNECT and "
                           "full TLS handshake (leaf cached) → HTTPS upstream",
    "nginx-tls-new": "nginx terminating TLS, every request a new TCP connection and full TLS "
                     "handshake → same HTTPS upstream",
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Processes: every child in its own process group, stopped at exit (also on error or Ctrl-C).

class Procs:
    def __init__(self):
        self.children = []  # (name, Popen)

    def start(self, name, argv, env=None, stdout=None, stderr=None, stdin=None, log_path=None):
        if log_path is not None:
            f = open(log_path, "ab")
            stdout = stdout if stdout is not None else f
            stderr = stderr if stderr is not None else f
        p = subprocess.Popen(
            argv, env=env, stdout=stdout or subprocess.DEVNULL, stderr=stderr or subprocess.DEVNULL,
            stdin=stdin if stdin is not None else subprocess.DEVNULL, start_new_session=True)
        if log_path is not None:
            f.close()  # the child has its own copy
        self.children.append((name, p))
        return p

    def stop(self, p, timeout=5.0):
        if p.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)  # the group we created for this child only
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.children = [(n, c) for n, c in self.children if c is not p]

    def stop_all(self):
        for _, p in list(reversed(self.children)):
            try:
                self.stop(p, timeout=3.0)
            except Exception:  # noqa: BLE001 (best effort at exit)
                pass


PROCS = Procs()


def _on_signal(signum, _frame):
    raise SystemExit(f"interrupted by signal {signum}")


# ---------------------------------------------------------------------------------------------
# Small helpers.

_used_ports = set()


def free_port():
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise BenchError("no free port")


def wait_until(what, check, timeout=30.0, proc=None, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: the process exited with status {proc.returncode}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 (not ready yet)
            pass
        time.sleep(interval)
    raise BenchError(f"{what}: not ready after {timeout:.0f}s")


def http_get(port, path, headers=None, timeout=5.0, host="127.0.0.1"):
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def run(argv, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and not k.startswith("VAULT_") and not k.startswith("BAO_")
           and not k.startswith("LATCHKEY_")}
    env.update(extra)
    return env


def find_program(name, extra_dirs=()):
    p = shutil.which(name)
    if p:
        return p
    for d in list(extra_dirs) + ["/usr/sbin", "/usr/local/sbin"]:
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def raise_nofile(want=65536):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))  # root may raise the hard limit
        else:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------------
# /proc readings.

def stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (field 3 first), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def all_stats():
    """(pid, stat fields) for every process on the machine."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            fields = stat_fields(d)
            if fields is not None:
                yield int(d), fields


def proc_children(pid):
    kids = []
    for d, fields in all_stats():
        ppid = int(fields[1])
        if ppid == pid:
            kids.append(int(d))
    return kids


def proc_tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(proc_children(p))
    return out


def cpu_ticks(pids):
    user, system = cpu_ticks_split(pids)
    return user + system


def cpu_ticks_split(pids):
    """(user, system) clock ticks of the processes: utime and stime, fields 14 and 15."""
    user = system = 0
    for pid in pids:
        fields = stat_fields(pid)
        if fields is None:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pids):
    return sum(status_kib(p, "VmRSS") for p in pids)


def hwm_kib(pids):
    return sum(status_kib(p, "VmHWM") for p in pids)


def reset_hwm(pids):
    """Resets VmHWM to the current RSS (writing 5 to clear_refs); False if not allowed."""
    ok = True
    for p in pids:
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


def socket_count(pid):
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    n += 1
            except OSError:
                pass
    except OSError:
        pass
    return n


def all_ticks():
    """{pid: (start time, utime+stime, cutime+cstime)} for every process on the machine."""
    out = {}
    for d, fields in all_stats():
        out[d] = (fields[19], int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    return out


class Foreign:
    """CPU used during a run by processes that are not the benchmark's (another build, a test
    suite...): the processes on the machine that are not in the driver's process tree."""

    def __init__(self):
        self.ours = set(proc_tree(os.getpid()))
        self.t0, self.s0 = time.monotonic(), all_ticks()

    def share(self):
        s1, elapsed = all_ticks(), time.monotonic() - self.t0
        ours = self.ours | set(proc_tree(os.getpid()))
        ticks = 0
        for pid, (start, t, ct) in s1.items():
            if pid in ours:
                continue
            before = self.s0.get(pid)
            if before and before[0] == start:
                ticks += (t - before[1]) + (ct - before[2])
            else:
                ticks += t + ct  # started during the run
        return ticks / CLK_TCK / max(elapsed * CORES, 1e-9)


def machine_ticks():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + vals[4]
    return sum(vals[:8]), idle


class RssSampler(threading.Thread):
    def __init__(self, pids, interval=0.01):
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peak, self.samples, self._halt = 0, 0, threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, rss_kib(self.pids))
            self.samples += 1
            time.sleep(self.interval)

    def stop(self):
        self._halt.set()
        self.join()
        return self.peak


# ---------------------------------------------------------------------------------------------
# The pieces: OpenBao, certificates, nginx, latchkey.

class Bao:
    def __init__(self, bao, workdir):
        self.bao = bao
        self.dir = workdir / "bao"
        self.dir.mkdir()
        self.audit = self.dir / "audit.log"
        config = self.dir / "bao.hcl"
        config.write_text(
            f'audit "file" "reads" {{\n  options {{\n    file_path = "{self.audit}"\n  }}\n}}\n')
        self.token = "bench-root-" + os.urandom(8).hex()
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.proc = PROCS.start("openbao", [
            bao, "server", "-dev", f"-dev-listen-address=127.0.0.1:{self.port}",
            f"-dev-root-token-id={self.token}", "-dev-no-store-token", f"-config={config}",
        ], env=clean_env(), log_path=self.dir / "bao.log")
        wait_until("OpenBao", lambda: http_get(self.port, "/v1/sys/health")[0] == 200,
                   timeout=60, proc=self.proc, interval=0.05)
        self._conn = None

    def cli_env(self):
        return clean_env(VAULT_ADDR=self.addr, VAULT_TOKEN=self.token,
                         BAO_ADDR=self.addr, BAO_TOKEN=self.token)

    def kv_put(self, conn_id, **fields):
        """``bao kv put -mount=secret latchkey/connections/{id} k=v ...``"""
        run([self.bao, "kv", "put", "-mount=secret", f"latchkey/connections/{conn_id}"]
            + [f"{k}={v}" for k, v in fields.items()], env=self.cli_env())

    def kv_put_many(self, items, threads=8):
        """The same write as ``bao kv put``, through the KV v2 HTTP API, for bulk seeding."""
        def put(item):
            conn_id, fields = item
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                c.request("POST", f"/v1/secret/data/latchkey/connections/{conn_id}",
                          body=json.dumps({"data": fields}),
                          headers={"X-Vault-Token": self.token, "Content-Type": "application/json"})
                r = c.getresponse()
                r.read()
                if r.status not in (200, 204):
                    raise BenchError(f"seeding {conn_id}: HTTP {r.status}")
            finally:
                c.close()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(put, items))

    def reads(self, prefix_ids):
        """Vault reads per connection ID, from the audit log (request entries only)."""
        want = {f"secret/data/latchkey/connections/{i}": i for i in prefix_ids}
        counts = dict.fromkeys(prefix_ids, 0)
        try:
            with open(self.audit) as f:
                for line in f:
                    if '"read"' not in line:
                        continue
                    try:
                        v = json.loads(line)
                    except ValueError:
                        continue
                    if v.get("type") != "request":
                        continue
                    req = v.get("request", {})
                    if req.get("operation") == "read" and req.get("path") in want:
                        counts[want[req["path"]]] += 1
        except FileNotFoundError:
            pass
        return counts


def make_certs(d):
    """A CA and a server certificate (localhost, api.bench.test, 127.0.0.1), EC P-256, with
    openssl."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(["openssl", "req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.pem",
         "-days", "2", "-subj", "/CN=latchkey bench CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    run(["openssl", "req", "-new", *ec, "-keyout", d / "server.key", "-out", d / "server.csr",
         "-subj", "/CN=localhost"])
    (d / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,DNS:{TUNNEL_HOST},IP:127.0.0.1\n")
    run(["openssl", "x509", "-req", "-in", d / "server.csr", "-CA", d / "ca.pem",
         "-CAkey", d / "ca.key", "-set_serial", "2", "-days", "2",
         "-extfile", d / "server.ext", "-out", d / "server.pem"])
    for name in ("ca.pem", "server.pem", "server.key"):
        os.chmod(d / name, 0o644)


class Nginx:
    """An nginx from a template of bench/nginx. `subs` fills its placeholders (DIR, USER and
    NOFILE have defaults); `wrap` goes before nginx's command line (a profiler); `master=False`
    runs it without a master process."""

    def __init__(self, nginx, name, template, workdir, subs, wrap=(), master=True):
        self.name = name
        text = (BENCH / "nginx" / template).read_text()
        subs = dict(dict(DIR=str(workdir), USER="user root;" if os.geteuid() == 0 else "",
                         NOFILE=resource.getrlimit(resource.RLIMIT_NOFILE)[0]), **subs)
        for k, v in subs.items():
            text = text.replace(f"@{k}@", str(v))
        if "@" in "".join(l for l in text.splitlines() if not l.lstrip().startswith("#")):
            raise BenchError(f"{template}: a placeholder was left unfilled")
        if not master:
            text = text.replace("master_process on;", "master_process off;")
        conf = workdir / f"{name}.conf"
        conf.write_text(text)
        self.proc = PROCS.start(name, [*wrap, nginx, "-c", str(conf), "-p", str(workdir),
                                       "-e", str(workdir / f"{name}-error.log")],
                                log_path=workdir / f"{name}.out")

    def pids(self):
        return proc_tree(self.proc.pid)

    def wait(self, port, tls_port=None):
        wait_until(f"{self.name} on {port}", lambda: http_get(port, "/")[0] == 200,
                   proc=self.proc)
        # Every worker up, so that the CPU and RSS readings see them all.
        want = 1 + (CORES if self.name == "anchor" else 1)
        wait_until(f"{self.name} workers", lambda: len(self.pids()) >= want, proc=self.proc)


class Latchkey:
    def __init__(self, binary, name, workdir, bao, ca_pem, workers=None, proxy_extra="", tls_extra="",
                 extra="", vault_auth='{ method = "token" }', token=None, rust_log="warn",
                 vault_address=None):
        """``extra``: TOML tables after the generated ones (``[cache]``...); ``vault_auth`` and
        ``token`` (``VAULT_TOKEN``: default the dev server's root token, ``""`` none) for another
        login; ``vault_address``: a list of Vault nodes instead of ``bao``'s address."""
        self.name = name
        self.port, self.admin = free_port(), free_port()
        config = workdir / f"latchkey-{name}.toml"
        config.write_text(
            "[proxy]\n"
            f'listen = "127.0.0.1:{self.port}"\n'
            'allow_private_destinations = ["127.0.0.0/8"]\n'
            + (f"workers = {workers}\n" if workers else "") + proxy_extra + "\n"
            "[admin]\n"
            f'listen = "127.0.0.1:{self.admin}"\n\n'
            "[vault]\n"
            f"address = {json.dumps(vault_address or bao.addr)}\n"
            f"auth = {vault_auth}\n\n"
            "[tls]\n"
            f'extra_roots = ["{ca_pem}"]\n' + tls_extra + "\n" + extra)
        self.config = config
        env = clean_env(RUST_LOG=rust_log)
        if token != "":  # "": no VAULT_TOKEN, for a vault_auth with a token_file
            env["VAULT_TOKEN"] = token or bao.token
        self.log_path = workdir / f"latchkey-{name}.log"
        self.proc = PROCS.start(f"latchkey-{name}", [binary, "serve", "--config", str(config)],
                                env=env, log_path=self.log_path)
        wait_until(f"latchkey {name} /readyz",
                   lambda: http_get(self.admin, "/readyz")[0] == 200, proc=self.proc)
        wait_until(f"latchkey {name} proxy port", lambda: self._tcp(), proc=self.proc)

    def _tcp(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def pids(self):
        return [self.proc.pid]

    def metrics(self):
        status, body = http_get(self.admin, "/metrics")
        out = {}
        for line in body.decode().splitlines():
            if line.startswith(("latchkey_errors_total", "latchkey_cache_lookups_total",
                                "latchkey_vault_requests_total", "latchkey_requests_total",
                                "latchkey_tunnel_leaf_certificates_total")):
                k, _, v = line.rpartition(" ")
                try:
                    out[k] = float(v)
                except ValueError:
                    pass
        return out

    def stop(self):
        PROCS.stop(self.proc)


# ---------------------------------------------------------------------------------------------
# Load tools.

def children_cpu():
    """CPU seconds of the children waited for so far (the load generator's, once it exits)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wrk_run(wrk, url, seconds, conns, script, env=None):
    argv = [wrk, "-t", "2", "-c", str(conns), "-d", f"{seconds}s", "--timeout", "5s",
            "-s", str(script), url]
    c0 = children_cpu()
    r = subprocess.run(argv, capture_output=True, text=True, env=env or clean_env())
    client_cpu = children_cpu() - c0
    line = next((l for l in r.stdout.splitlines() if l.startswith("WRKJSON ")), None)
    if r.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({r.returncode}): {r.stdout}\n{r.stderr}")
    out = json.loads(line[len("WRKJSON "):])
    out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
    out["errors"] = out["connect"] + out["read"] + out["write"] + out["status"] + out["timeout"]
    out["client_cpu_us"] = client_cpu * 1e6 / max(out["requests"], 1)
    return out


def oha_run(oha, url, seconds, rate, conns, proxy=None, proxy_headers=()):
    argv = [oha, "-z", f"{seconds}s", "-q", str(rate), "-c", str(conns),
            "--latency-correction", "--no-tui", "--output-format", "json"]
    if proxy:
        argv += ["-x", proxy]
        for h in proxy_headers:
            argv += ["--proxy-header", h]
    argv.append(url)
    c0 = children_cpu()
    r = subprocess.run(argv, capture_output=True, text=True, env=clean_env())
    client_cpu = children_cpu() - c0
    if r.returncode != 0:
        raise BenchError(f"oha failed ({r.returncode}): {r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    j = json.loads(r.stdout)
    lp = j["latencyPercentiles"]
    statuses = j.get("statusCodeDistribution", {})
    errors = {k: v for k, v in (j.get("errorDistribution") or {}).items()
              if "deadline" not in k}  # in flight at the end of -z: not failures
    ok = statuses.get("200", 0)
    return {
        "offered": rate,
        "achieved": j["summary"]["requestsPerSec"],
        "p50_ms": (lp.get("p50") or 0) * 1e3,
        "p99_ms": (lp.get("p99") or 0) * 1e3,
        "p999_ms": (lp.get("p99.9") or 0) * 1e3,
        "ok": ok,
        "non200": sum(v for k, v in statuses.items() if k != "200"),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "client_cpu_us": client_cpu * 1e6 / max(ok, 1),
    }


def merge_counts(dicts):
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def tls_run(tool, seconds, conns, args):
    """examples/tunnel_load.rs: closed loop over TLS (through a tunnel or straight), one JSON
    object out."""
    argv = [tool, "--duration", str(seconds), "--connections", str(conns), "--threads", "2", *args]
    c0 = children_cpu()
    r = subprocess.run(argv, capture_output=True, text=True, env=clean_env())
    client_cpu = children_cpu() - c0
    if r.returncode != 0:
        raise BenchError(f"tunnel_load failed ({r.returncode}): {r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    out = json.loads(r.stdout)
    out["errors"] += out["non200"]
    out["client_cpu_us"] = client_cpu * 1e6 / max(out["requests"], 1)
    return out


# ---------------------------------------------------------------------------------------------
# The benchmark.

class Bench:
    def __init__(self, args):
        self.args = args
        self.results = {"variants": {}, "tls": {}, "latency": {}, "cold": {}, "memory": {}, "notes": []}
        self.workdir = Path(tempfile.mkdtemp(prefix="latchkey-bench-"))
        os.chmod(self.workdir, 0o755)

    def note(self, s):
        self.results["notes"].append(s)
        log("note: " + s)

    # -- setup --------------------------------------------------------------------------------

    def setup(self):
        a = self.args
        self.nginx_bin = find_program("nginx") or a.nginx
        self.wrk = find_program("wrk")
        self.oha = a.oha or find_program("oha", [ROOT / "target/bench-tools/bin"])
        self.bao_bin = find_program("bao", [run([sys.executable, "-c",
                                                 "import sysconfig; print(sysconfig.get_path('scripts'))"]).strip()])
        missing = [n for n, p in [("nginx", self.nginx_bin), ("wrk", self.wrk), ("oha", self.oha),
                                  ("bao", self.bao_bin), ("openssl", find_program("openssl")),
                                  ("curl", find_program("curl"))] if not p]
        if missing:
            raise BenchError(f"missing tools: {', '.join(missing)} (scripts/bench-load installs them)")
        self.nofile = raise_nofile()

        pgo = getattr(a, "pgo", False)
        if not a.no_build:
            log("cargo build --release (a cargo lock wait is normal when others build)")
            # Two builds: with the example in the same one, the dev-dependencies' features
            # (tokio's test-util...) would be compiled into the latchkey that is measured.
            if not pgo:  # scripts/build-pgo built it
                subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "latchkey"], cwd=ROOT,
                               check=True)
            subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "tunnel_load"],
                           cwd=ROOT, check=True)
        self.latchkey_bin = (getattr(a, "latchkey_bin", None)  # bench/pgo_train.py's instrumented one
                             or str(TARGET / ("pgo/latchkey" if pgo else "release/latchkey")))
        self.tls_tool = str(TARGET / "release/examples/tunnel_load")
        if not os.access(self.latchkey_bin, os.X_OK):
            raise BenchError(f"{self.latchkey_bin} is missing: "
                             + ("scripts/build-pgo" if pgo else "cargo build --release --bin latchkey"))

        d = self.workdir
        log(f"work directory {d}")
        make_certs(d)
        # latchkey's own CA, for the tunnel's leaves; the load client trusts it and the
        # benchmark's CA (nginx's certificate), the same file on both sides.
        self.lk_ca, self.lk_ca_key = d / "latchkey-ca.pem", d / "latchkey-ca-key.pem"
        run([self.latchkey_bin, "ca", "init", "--cert", self.lk_ca, "--key", self.lk_ca_key], env=clean_env())
        self.trust = d / "trust.pem"
        self.trust.write_text(self.lk_ca.read_text() + (d / "ca.pem").read_text())
        with open(d / "big.bin", "wb") as f:
            f.truncate(a.stream_bytes)  # sparse: no disk space, nginx sends zeros
        os.chmod(d / "big.bin", 0o644)

        self.bao = Bao(self.bao_bin, d)
        log(f"OpenBao dev server at {self.bao.addr}, audit log {self.bao.audit}")

        self.up_http, self.up_https = free_port(), free_port()
        self.upstream = Nginx(self.nginx_bin, "upstream", "upstream.conf.tmpl", d, {
            "HTTP_PORT": self.up_http, "HTTPS_PORT": self.up_https,
            "HTTP2": "http2" if a.https_h2 else ""})
        self.upstream.wait(self.up_http)
        wait_until("upstream HTTPS", lambda: self._https_ok(self.up_https), proc=self.upstream.proc)

        self.anchor_http, self.anchor_https, self.anchor_tls = free_port(), free_port(), free_port()
        self.anchor = Nginx(self.nginx_bin, "anchor", "anchor.conf.tmpl", d, {
            "WORKERS": CORES, "HTTP_PORT": self.anchor_http, "HTTPS_PORT": self.anchor_https,
            "TLS_PORT": self.anchor_tls, "UP_HTTP_PORT": self.up_http, "UP_HTTPS_PORT": self.up_https,
            "UP_IDLE": getattr(a, "upstream_idle", None) or "90s"})
        self.anchor.wait(self.anchor_http)
        wait_until("anchor → HTTPS upstream", lambda: http_get(self.anchor_https, "/")[0] == 200,
                   proc=self.anchor.proc)

        self.sink_port = free_port()
        self.sink = PROCS.start("sink", [sys.executable, str(BENCH / "clients.py"), "sink",
                                         "--port", str(self.sink_port)], log_path=d / "sink.log")
        wait_until("sink", lambda: socket.create_connection(("127.0.0.1", self.sink_port), 1).close() or True,
                   proc=self.sink)

        self.api_key = "bench_" + os.urandom(12).hex()
        self.bao.kv_put("bench", connector="generic-bearer", name="bench (HTTP upstream)",
                        base_url=f"http://127.0.0.1:{self.up_http}", api_key=self.api_key)
        self.bao.kv_put("bench-tls", connector="generic-bearer", name="bench (HTTPS upstream)",
                        base_url=f"https://127.0.0.1:{self.up_https}", api_key=self.api_key)
        self.bao.kv_put("bench-tunnel", connector="generic-bearer", name="bench (tunnel, HTTPS upstream)",
                        base_url=f"https://{TUNNEL_HOST}", api_key=self.api_key)
        self.bao.kv_put("sink", connector="generic-bearer", name="bench (upload sink)",
                        base_url=f"http://127.0.0.1:{self.sink_port}", api_key=self.api_key)
        self.ca_pem = d / "ca.pem"

    def _https_ok(self, port):
        r = subprocess.run(["curl", "-sf", "-o", "/dev/null", "--noproxy", "*", "--cacert",
                            str(self.workdir / "ca.pem"), f"https://127.0.0.1:{port}/"])
        return r.returncode == 0

    def start_latchkey(self, name, tunnel=False):
        extra = {}
        if tunnel:  # latchkey's CA, and the service's name pinned to the HTTPS upstream
            extra = dict(proxy_extra=f'resolve = {{ "{TUNNEL_HOST}:443" = "127.0.0.1:{self.up_https}" }}\n',
                         tls_extra=f'ca_cert = "{self.lk_ca}"\nca_key = "{self.lk_ca_key}"\n')
        if self.args.http1_server:  # which HTTP/1.1 server reads client connections
            extra["proxy_extra"] = (extra.get("proxy_extra", "")
                                    + f'http1_server = "{self.args.http1_server}"\n')
        lk = Latchkey(self.latchkey_bin, name, self.workdir, self.bao, self.ca_pem, **extra)
        return lk

    # -- variants -----------------------------------------------------------------------------

    def build_variants(self):
        self.lk = {n: self.start_latchkey(n) for n in ("gateway", "forward", "https")}
        self.lk.update({n: self.start_latchkey(n, tunnel=True) for n in ("tunnel", "tunnel-new")})
        fwd_auth = base64.b64encode(b"bench:x").decode()
        up = f"127.0.0.1:{self.up_http}"
        report = BENCH / "lua/report.lua"
        self.variants = {
            "direct": dict(url=f"http://{up}/", script=report, proxy=None),
            "nginx": dict(url=f"http://127.0.0.1:{self.anchor_http}/", script=report, proxy=self.anchor),
            "latchkey": dict(url=f"http://127.0.0.1:{self.lk['gateway'].port}/bench/", script=report,
                             proxy=self.lk["gateway"]),
            "latchkey-forward": dict(
                url=f"http://127.0.0.1:{self.lk['forward'].port}/", script=BENCH / "lua/forward.lua",
                proxy=self.lk["forward"],
                env=clean_env(LK_FORWARD_TARGET=up, LK_FORWARD_AUTH=fwd_auth),
                oha=dict(url=f"http://{up}/", proxy=f"http://127.0.0.1:{self.lk['forward'].port}",
                         proxy_headers=[f"Proxy-Authorization: Basic {fwd_auth}"])),
            "latchkey-https": dict(url=f"http://127.0.0.1:{self.lk['https'].port}/bench-tls/",
                                   script=report, proxy=self.lk["https"]),
            "nginx-https": dict(url=f"http://127.0.0.1:{self.anchor_https}/", script=report,
                                proxy=self.anchor),
        }
        # Each path answers 200 before any load (and warms latchkey's caches and pools).
        for name, v in self.variants.items():
            if name == "latchkey-forward":
                r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                    "-x", v["oha"]["proxy"], "--proxy-user", "bench:x", v["oha"]["url"]],
                                   capture_output=True, text=True, env=clean_env())
                status = int(r.stdout or 0)
            else:
                port = int(v["url"].split(":")[2].split("/")[0])
                status = http_get(port, "/" + v["url"].split("/", 3)[3])[0]
            if status != 200:
                raise BenchError(f"{name}: {v['url']} answered {status}, not 200")
        # The HTTPS variants compare like with like only if both proxies speak the same TLS to the
        # upstream (nginx 1.22 offered upstreams TLS 1.2 at most unless told: its resumption has no
        # key exchange, a far cheaper handshake than TLS 1.3's).
        for name, port, path in (("latchkey-https", self.lk["https"].port, "/bench-tls/tls-protocol"),
                                 ("nginx-https", self.anchor_https, "/tls-protocol")):
            status, body = http_get(port, path)
            if status != 200 or body != b"TLSv1.3":
                raise BenchError(f"{name}: its connection to the HTTPS upstream speaks {body!r} "
                                 f"(HTTP {status}), not TLSv1.3")
        # The TLS variants: the same client (examples/tunnel_load.rs) and the same trust on both
        # sides; latchkey's through a tunnel to api.bench.test:443, nginx's straight to its TLS port.
        tunnel_auth = "Basic " + base64.b64encode(b"bench-tunnel:x").decode()
        common = ["--host", TUNNEL_HOST, "--cacert", str(self.trust)]

        def via(lk):
            return ["--connect", f"127.0.0.1:{lk.port}", "--tunnel-port", "443",
                    "--proxy-authorization", tunnel_auth, *common]
        nginx_tls = ["--connect", f"127.0.0.1:{self.anchor_tls}", *common]
        self.tls_variants = {
            "latchkey-tunnel": dict(args=via(self.lk["tunnel"]), proxy=self.lk["tunnel"]),
            "nginx-tls": dict(args=nginx_tls, proxy=self.anchor),
            "latchkey-tunnel-new": dict(args=via(self.lk["tunnel-new"]) + ["--new-connections"],
                                        proxy=self.lk["tunnel-new"]),
            "nginx-tls-new": dict(args=nginx_tls + ["--new-connections"], proxy=self.anchor),
        }
        # Each answers 200 to curl first (an independent client), which also mints each tunnel
        # latchkey's leaf, so that the load finds it cached.
        for name, lk in (("latchkey-tunnel", self.lk["tunnel"]), ("latchkey-tunnel-new", self.lk["tunnel-new"])):
            self._curl_200(name, ["-x", f"http://127.0.0.1:{lk.port}", "--proxy-user", "bench-tunnel:x",
                                  "--cacert", str(self.lk_ca), f"https://{TUNNEL_HOST}/"])
        self._curl_200("nginx-tls", ["--resolve", f"{TUNNEL_HOST}:{self.anchor_tls}:127.0.0.1",
                                     "--cacert", str(self.workdir / "ca.pem"),
                                     f"https://{TUNNEL_HOST}:{self.anchor_tls}/"])

    def _curl_200(self, name, args):
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *args],
                           capture_output=True, text=True, env=clean_env())
        if r.stdout.strip() != "200":
            raise BenchError(f"{name}: curl {' '.join(args)} answered {r.stdout.strip() or '-'} "
                             f"(exit {r.returncode}): {r.stderr.strip()}")

    def load_once(self, name, seconds, connections):
        """One closed-loop run of variant `name`: wrk, or tunnel_load for the TLS variants."""
        if name in self.tls_variants:
            if not os.access(self.tls_tool, os.X_OK):
                raise BenchError(f"{self.tls_tool} is missing: cargo build --release --example tunnel_load")
            return tls_run(self.tls_tool, seconds, connections, self.tls_variants[name]["args"])
        v = self.variants[name]
        return wrk_run(self.wrk, v["url"], seconds, connections, v["script"], v.get("env"))

    def throughput(self):
        a = self.args
        log(f"throughput: wrk (tunnel_load for the TLS variants), {a.connections} connections, "
            f"{a.duration}s per run, {a.rounds} rounds, variants alternated")
        everything = VARIANTS + TLS_VARIANTS

        def load(name, seconds):
            return self.load_once(name, seconds, a.connections)

        for name in everything:  # warm-up: pools, caches, JIT-free but page-cache and TLS sessions
            load(name, a.warmup)
        runs = {n: [] for n in everything}
        for rnd in range(a.rounds):
            order = everything[rnd % len(everything):] + everything[:rnd % len(everything)]
            for name in order:
                v = self.tls_variants.get(name) or self.variants[name]
                ppids = v["proxy"].pids() if v["proxy"] else []
                upids = self.upstream.pids()
                hwm_reset = reset_hwm(ppids) if ppids else True
                p0, u0, m0 = cpu_ticks(ppids), cpu_ticks(upids), machine_ticks()
                foreign = Foreign()
                r = load(name, a.duration)
                r["foreign"] = foreign.share()
                p1, u1, m1 = cpu_ticks(ppids), cpu_ticks(upids), machine_ticks()
                n = max(r["requests"], 1)
                r["proxy_cpu_us"] = (p1 - p0) / CLK_TCK * 1e6 / n if ppids else None
                r["upstream_cpu_us"] = (u1 - u0) / CLK_TCK * 1e6 / n
                busy = (m1[0] - m0[0]) - (m1[1] - m0[1])
                r["machine_busy"] = busy / max(m1[0] - m0[0], 1)
                r["proxy_peak_rss_kib"] = hwm_kib(ppids) if ppids else None
                r["hwm_reset"] = hwm_reset
                runs[name].append(r)
                log(f"  round {rnd + 1} {name:19s} {r['rps']:9.0f} req/s  errors {r['errors']}"
                    + (f"  proxy {r['proxy_cpu_us']:.1f} µs/req" if ppids else "")
                    + (f"  p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} ms" if "p50_ms" in r else "")
                    + (f"  (other processes used {r['foreign'] * 100:.0f}% of the machine)"
                       if r["foreign"] > 0.02 else ""))
        for name in everything:
            rs = runs[name]
            self.results["tls" if name in TLS_VARIANTS else "variants"][name] = {
                "runs": rs,
                "rps": median([r["rps"] for r in rs]),
                "rps_min": min(r["rps"] for r in rs),
                "rps_max": max(r["rps"] for r in rs),
                "proxy_cpu_us": median([r["proxy_cpu_us"] for r in rs]),
                "upstream_cpu_us": median([r["upstream_cpu_us"] for r in rs]),
                "client_cpu_us": median([r["client_cpu_us"] for r in rs]),
                "machine_busy": median([r["machine_busy"] for r in rs]),
                "foreign_max": max(r["foreign"] for r in rs),
                "proxy_peak_rss_kib": max((r["proxy_peak_rss_kib"] or 0) for r in rs) or None,
                "hwm_reset": all(r["hwm_reset"] for r in rs),
                "errors": sum(r["errors"] for r in rs),
                **({k: median([r[k] for r in rs]) for k in ("p50_ms", "p99_ms", "p999_ms")}
                   if name in TLS_VARIANTS else {}),
                **({"connections_opened": sum(r["connections_opened"] for r in rs),
                    "error_kinds": merge_counts(r["error_kinds"] for r in rs)}
                   if name in TLS_VARIANTS else {}),
            }

    def latency(self):
        a = self.args
        groups = {}
        for g, spec in LATENCY_GROUPS.items():
            pair = spec["pair"]
            saturation = min(self.results["variants"][n]["rps"] for n in pair)
            lowest = min(pair, key=lambda n: self.results["variants"][n]["rps"])
            rates = [max(1, int(saturation * f)) for f in LATENCY_FRACTIONS]
            groups[g] = {"variants": spec["variants"], "pair": list(pair), "saturation": saturation,
                         "lowest_variant": lowest, "rates": rates}
            log(f"latency ({g}): oha open loop, latency correction, rates {rates} req/s "
                f"(25/50/75% of {saturation:.0f}, {lowest}), {a.latency_duration}s per run, "
                f"{a.latency_rounds} rounds")
        self.results["latency_rates"] = {"groups": groups}
        runs = {}
        for g in groups.values():
            for name in g["variants"]:
                for rate in g["rates"]:
                    runs.setdefault(name, {})[rate] = []
        for rnd in range(a.latency_rounds):
            for g in groups.values():
                names = g["variants"]
                for rate in g["rates"]:
                    order = names[rnd % len(names):] + names[:rnd % len(names)]
                    for name in order:
                        v = self.variants[name]
                        o = v.get("oha", {"url": v["url"]})
                        ppids = v["proxy"].pids() if v["proxy"] else []
                        # Not measured: the same rate for a moment first, so that a pool the
                        # variant's last run left to expire (over 90 s ago) is filled again and
                        # the run measures the steady state (bench/tail.py measures a cold pool).
                        oha_run(self.oha, o["url"], a.latency_warmup, rate, a.connections,
                                o.get("proxy"), o.get("proxy_headers", ()))
                        p0 = cpu_ticks(ppids)
                        foreign = Foreign()
                        r = oha_run(self.oha, o["url"], a.latency_duration, rate, a.connections,
                                    o.get("proxy"), o.get("proxy_headers", ()))
                        r["foreign"] = foreign.share()
                        p1 = cpu_ticks(ppids)
                        r["proxy_cpu_us"] = ((p1 - p0) / CLK_TCK * 1e6 / max(r["ok"], 1)) if ppids else None
                        runs[name][rate].append(r)
                        log(f"  round {rnd + 1} {rate:6d}/s {name:17s} p50 {r['p50_ms']:.3f} "
                            f"p99 {r['p99_ms']:.3f} p99.9 {r['p999_ms']:.3f} ms  "
                            f"errors {r['errors'] + r['non200']}"
                            + (f"  (other processes used {r['foreign'] * 100:.0f}% of the machine)"
                               if r["foreign"] > 0.02 else ""))
        for name, by_rate in runs.items():
            self.results["latency"][name] = {}
            for rate, rs in by_rate.items():
                self.results["latency"][name][rate] = {
                    "runs": rs,
                    **{k: median([r[k] for r in rs]) for k in
                       ("achieved", "p50_ms", "p99_ms", "p999_ms", "proxy_cpu_us", "client_cpu_us")},
                    "errors": sum(r["errors"] + r["non200"] for r in rs),
                    "foreign_max": max(r["foreign"] for r in rs),
                }

    def latchkey_health(self):
        out = {}
        for name, lk in self.lk.items():
            # Before the scrape: with nothing reading /metrics during the load, this shows
            # whether what the metrics keep grows with the requests served.
            rss = rss_kib(lk.pids())
            m = lk.metrics()
            out[name] = {
                "rss_kib": rss,
                "errors": {k: v for k, v in m.items() if k.startswith("latchkey_errors_total")},
                "cache": {k.split("outcome=\"")[1].split("\"")[0]: v for k, v in m.items()
                          if k.startswith("latchkey_cache_lookups_total")},
                "vault_reads": sum(v for k, v in m.items()
                                   if k.startswith("latchkey_vault_requests_total") and 'op="read"' in k),
                "leaves": {k.split("outcome=\"")[1].split("\"")[0]: v for k, v in m.items()
                           if k.startswith("latchkey_tunnel_leaf_certificates_total")},
            }
        self.results["latchkey_metrics"] = out
        for lk in self.lk.values():
            lk.stop()

    # -- cold path ----------------------------------------------------------------------------

    def cold(self):
        a = self.args
        lk = self.start_latchkey("cold")
        ids = [f"cold-{i:05d}" for i in range(a.cold_connections)]
        log(f"cold path: seeding {len(ids)} connections")
        self.bao.kv_put_many([(i, {"connector": "generic-bearer",
                                   "base_url": f"http://127.0.0.1:{self.up_http}",
                                   "api_key": f"{self.api_key}_{n}"}) for n, i in enumerate(ids)])
        paths = self.workdir / "cold-paths.txt"
        paths.write_text("".join(f"/{i}/\n" for i in ids))

        def distinct(label):
            before = sum(self.bao.reads(ids).values())
            out = json.loads(run([sys.executable, str(BENCH / "clients.py"), "requests",
                                  "--port", str(lk.port), "--paths-file", str(paths),
                                  "--concurrency", str(a.cold_concurrency)]))
            out["vault_reads"] = sum(self.bao.reads(ids).values()) - before
            log(f"  {label}: {out['requests']} requests, {out['rate']:.0f}/s, p50 {out['p50_ms']:.2f} ms, "
                f"p99 {out['p99_ms']:.2f} ms, Vault reads {out['vault_reads']}, statuses {out['statuses']}")
            return out

        self.results["cold"]["distinct_cold"] = distinct("distinct connections, cold")
        self.results["cold"]["distinct_warm"] = distinct("same connections, warm")

        self.bao.kv_put("burst", connector="generic-bearer",
                        base_url=f"http://127.0.0.1:{self.up_http}", api_key=self.api_key + "_burst")
        before = self.bao.reads(["burst"])["burst"]
        out = json.loads(run([sys.executable, str(BENCH / "clients.py"), "burst",
                              "--port", str(lk.port), "--path", "/burst/", "--n", str(a.burst)]))
        out["vault_reads"] = self.bao.reads(["burst"])["burst"] - before
        log(f"  cold burst: {out['requests']} concurrent requests on one connection, "
            f"p50 {out['p50_ms']:.2f} ms, max {out['max_ms']:.2f} ms, Vault reads {out['vault_reads']}, "
            f"statuses {out['statuses']}")
        self.results["cold"]["burst"] = out
        self.results["cold"]["connections"] = len(ids)
        self.results["cold"]["concurrency"] = a.cold_concurrency
        lk.stop()

    # -- memory -------------------------------------------------------------------------------

    def idle_connections(self, label, port, path, pids_fn):
        """RSS with each number of idle keep-alive client connections (each made one request)."""
        res = {}
        holder = PROCS.start(f"hold-{label}", [sys.executable, str(BENCH / "clients.py"), "hold",
                                               "--port", str(port), "--path", path],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             log_path=self.workdir / f"hold-{label}.log")
        try:
            res["idle_kib"] = rss_kib(pids_fn())
            for n in self.args.idle_steps:
                holder.stdin.write(f"open {n}\n".encode())
                holder.stdin.flush()
                line = holder.stdout.readline()
                if not line:
                    raise BenchError(f"the connection holder for {label} stopped")
                st = json.loads(line)
                pids = pids_fn()
                fresh = rss_kib(pids)
                # Idle means idle for a while: latchkey lets a connection's HTTP machinery go
                # after a quiet spell of one second (src/release.rs), so RSS is read again once
                # every connection has waited IDLE_SETTLE seconds (the first reading stays in
                # the record as `fresh_kib`).
                time.sleep(IDLE_SETTLE)
                res[n] = {"rss_kib": rss_kib(pids), "fresh_kib": fresh, "held": st["open"],
                          "failed": st["failed"],
                          "server_sockets": sum(socket_count(p) for p in pids)}
                log(f"  {label}: {n} idle connections: RSS {res[n]['rss_kib'] / 1024:.1f} MiB "
                    f"after {IDLE_SETTLE} s idle ({fresh / 1024:.1f} MiB at once; held {st['open']}, "
                    f"failed {st['failed']}, server sockets {res[n]['server_sockets']})")
            holder.stdin.write(b"quit\n")
            holder.stdin.flush()
            holder.stdout.readline()
            holder.wait(timeout=60)
            wait_until(f"{label} sockets closed",
                       lambda: sum(socket_count(p) for p in pids_fn()) < 300, timeout=30)
            res["after_close_kib"] = rss_kib(pids_fn())
        finally:
            PROCS.stop(holder)
        return res

    def stream(self, lk, direction):
        a = self.args
        pids = lk.pids()
        idle = rss_kib(pids)
        reset_hwm(pids)
        sampler = RssSampler(pids)
        sampler.start()
        t0 = time.perf_counter()
        path = "/bench/big" if direction == "down" else "/sink/upload"
        r = subprocess.run([sys.executable, str(BENCH / "clients.py"),
                            "download" if direction == "down" else "upload", "--port", str(lk.port),
                            "--path", path, "--bytes", str(a.stream_bytes)],
                           capture_output=True, text=True, env=clean_env())
        elapsed = time.perf_counter() - t0
        peak = sampler.stop()
        hwm = hwm_kib(pids)
        try:
            res = json.loads(r.stdout)
        except ValueError:
            raise BenchError(f"streaming {direction}: {r.stdout} {r.stderr}") from None
        # Upload: the sink answers with the number of bytes it received.
        received = int(res["body"]) if direction == "up" else res["bytes"]
        if r.returncode != 0 or res["status"] != 200 or received != a.stream_bytes:
            raise BenchError(f"streaming {direction}: {r.stdout} {r.stderr}")
        elapsed = res["seconds"]
        out = {"idle_kib": idle, "peak_sampled_kib": peak, "hwm_kib": hwm, "samples": sampler.samples,
               "seconds": elapsed, "mib_s": a.stream_bytes / (1 << 20) / elapsed,
               "after_kib": rss_kib(pids), "response_framing": res["headers"]}
        log(f"  stream {direction} {a.stream_bytes / GiB:.2f} GiB: {out['mib_s']:.0f} MiB/s, RSS idle "
            f"{idle / 1024:.1f} MiB, peak {max(peak, hwm) / 1024:.1f} MiB")
        return out

    def memory(self):
        a = self.args
        lk = self.start_latchkey("memory")
        mem = self.results["memory"]
        mem["start_kib"] = rss_kib(lk.pids())
        for _ in range(10):
            http_get(lk.port, "/bench/")
        mem["idle_kib"] = rss_kib(lk.pids())
        log(f"memory: latchkey RSS at start {mem['start_kib'] / 1024:.1f} MiB, idle after a few "
            f"requests {mem['idle_kib'] / 1024:.1f} MiB")
        mem["latchkey_idle_conns"] = self.idle_connections("latchkey", lk.port, "/bench/", lk.pids)
        mem["nginx_idle_conns"] = self.idle_connections("nginx", self.anchor_http, "/", self.anchor.pids)
        lk.stop()
        # The same transfers straight to the upstream first: the transfer rates without a proxy,
        # and the sparse file's pages in the page cache (a first read of a sparse file allocates
        # them, which would slow down whichever transfer came first).
        for _ in range(2):
            res = json.loads(run([sys.executable, str(BENCH / "clients.py"), "download",
                                  "--port", str(self.up_http), "--path", "/big"]))
        mem["direct_down_mib_s"] = res["bytes"] / (1 << 20) / res["seconds"]
        res = json.loads(run([sys.executable, str(BENCH / "clients.py"), "upload",
                              "--port", str(self.sink_port), "--path", "/upload",
                              "--bytes", str(a.stream_bytes)]))
        mem["direct_up_mib_s"] = res["bytes"] / (1 << 20) / res["seconds"]
        # A fresh process for the streams: memory freed after the idle connections stays in the
        # allocator and would hide a growth while streaming.
        lk = self.start_latchkey("stream")
        http_get(lk.port, "/bench/")
        mem["stream_down"] = self.stream(lk, "down")
        mem["stream_up"] = self.stream(lk, "up")
        lk.stop()

    # -- everything ---------------------------------------------------------------------------

    def run(self):
        a = self.args
        t_start = time.time()
        self.results["started"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.results["loadavg_start"] = open("/proc/loadavg").read().split()[:3]
        if float(self.results["loadavg_start"][0]) > 1.0:
            self.note(f"the machine was not idle at the start (load average "
                      f"{' '.join(self.results['loadavg_start'])}); see the others' CPU columns")
        self.setup()
        self.results["env"] = self.environment()
        self.build_variants()
        if not a.skip_load:
            self.throughput()
            self.latency()
        self.latchkey_health()
        if not a.skip_cold:
            self.cold()
        if not a.skip_memory:
            self.memory()
        self.results["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        self.results["elapsed_s"] = time.time() - t_start
        # --pgo is what scripts/bench-load adds by default (and drops for --no-pgo)
        self.results["command"] = "scripts/bench-load" + "".join(f" {x}" for x in sys.argv[1:] if x != "--pgo")
        self.results["args"] = {k: v for k, v in vars(a).items() if k != "render"}
        self.write()

    def environment(self):
        def ver(argv, pick=lambda s: s.splitlines()[0]):
            try:
                r = subprocess.run(argv, capture_output=True, text=True)
                return pick((r.stdout + r.stderr).strip())
            except Exception:  # noqa: BLE001
                return "?"
        cpu = "?"
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        commit = ver(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "Cargo.toml",
                                "Cargo.lock"], capture_output=True, text=True).stdout.strip()
        return {
            "commit": commit + (" (with uncommitted changes in src/ or Cargo)" if dirty else ""),
            "cpu": cpu, "cores": CORES, "kernel": platform.release(),
            "nginx": ver([self.nginx_bin, "-v"]), "wrk": ver([self.wrk, "--version"]).split(" [")[0],
            "oha": ver([self.oha, "--version"]), "bao": ver([self.bao_bin, "version"]),
            "openssl": ver(["openssl", "version"]), "nofile": self.nofile,
        }

    # -- output -------------------------------------------------------------------------------

    def write(self):
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "latest.json").write_text(json.dumps(self.results, indent=1, default=str))
        plotted = self.plot(out / "latency.png")
        (out / "latest.md").write_text(self.markdown(plotted))
        log(f"wrote {out / 'latest.md'}, {out / 'latest.json'}" + (f", {out / 'latency.png'}" if plotted else ""))

    def plot(self, path):
        if not self.results["latency"]:
            return False
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import matplotlib.ticker
        except ImportError:
            self.note("matplotlib is missing: no plot (scripts/bench-load installs it)")
            return False
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharex=True)
        styles = {"direct": ("black", "-", "o"), "nginx": ("tab:green", "-", "s"),
                  "latchkey": ("tab:blue", "-", "D"), "latchkey-forward": ("tab:cyan", "--", "v"),
                  "latchkey-https": ("tab:purple", "-", "^"), "nginx-https": ("tab:olive", "--", "s")}
        for ax, (key, title) in zip(axes, [("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")]):
            for name in VARIANTS:
                pts = self.results["latency"][name]
                rates = sorted(pts)
                color, ls, marker = styles[name]
                ys = [pts[r][key] for r in rates]
                ax.plot(rates, ys, color=color, linestyle=ls, marker=marker, label=name)
                sat = [(r, y) for r, y in zip(rates, ys) if pts[r]["achieved"] < 0.95 * r]
                if sat:
                    ax.plot([r for r, _ in sat], [y for _, y in sat], linestyle="none", marker=marker,
                            markersize=11, markerfacecolor="white", markeredgecolor=color)
            ax.set_title(f"{title} latency")
            ax.set_xlabel("offered rate (req/s, open loop)")
            ax.set_ylabel("ms")
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
                lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "25" else ""))
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        env = self.results["env"]
        fig.suptitle(f"latchkey load benchmark, {env['cores']} cores shared by load generator, proxy "
                     f"and upstream (oha, latency correction; hollow marker: rate not sustained) - "
                     f"{self.results['started']}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True

    def markdown(self, plotted):
        R, a = self.results, self.args
        env = R["env"]
        L = []
        w = L.append
        cmd = R["command"]
        w("# latchkey load benchmark\n")
        w(f"Command: `{cmd}` (run {R['started']}, {R['elapsed_s'] / 60:.1f} min)\n")
        w(f"- Machine: {env['cpu']}, {env['cores']} cores, Linux {env['kernel']}; load average at "
          f"start {' '.join(R['loadavg_start'])}, at end {' '.join(R['loadavg_end'])}.")
        h1 = getattr(a, "http1_server", None)
        server = f'`proxy.http1_server = "{h1}"`' if h1 else "the default HTTP/1.1 server"
        build = ("`scripts/build-pgo` (the release profile, guided by a training run of each form)"
                 if getattr(a, "pgo", False) else "`cargo build --release`")
        w(f"- latchkey {env['commit']}, {build}, `RUST_LOG=warn` (the access log, at "
          f"info, is off the hot path), no `[[clients]]`, default cache settings; client connections "
          f"read by {server}.")
        w(f"- Tools: {env['nginx']}; {env['wrk']}; {env['oha']}; {env['bao']}; {env['openssl']}.")
        w(f"- **Nothing is pinned**: the load generator, the proxy and the upstream share the same "
          f"{env['cores']} cores, so every figure includes that contention (it hurts proxies with more "
          f"processes or threads than cores the most).")
        w(f"- Upstream: nginx, 1 worker, `return 200 \"ok\\n\"`; HTTPS on TLS 1.3 with an EC P-256 "
          f"certificate, {'h2 and ' if a.https_h2 else ''}HTTP/1.1. Anchor: nginx, {CORES} workers, upstream "
          f"keep-alive, `proxy_set_header Authorization \"Bearer static\"`, `proxy_ssl_protocols TLSv1.2 TLSv1.3` "
          f"(TLS 1.3 to the upstream, as latchkey).")
        w(f"- Throughput: wrk, 2 threads, {a.connections} connections, {a.duration} s per run after a "
          f"{a.warmup} s warm-up, {a.rounds} round(s) alternating the variants (rotated order); figures are "
          f"medians (min–max in brackets).")
        w("- CPU µs/request: utime+stime from `/proc/PID/stat` over the wrk run divided by the requests "
          "completed (nginx: master and workers). Peak RSS: `VmHWM` " +
          ("reset before each run (`/proc/PID/clear_refs`), so it is the peak during the run; nginx: "
           "sum over its processes." if all(v.get("hwm_reset", True) for v in R["variants"].values())
           else "(could not be reset: the process-lifetime peak)."))
        w("")
        if R["variants"]:
            anchor = R["variants"]["nginx"]["rps"]
            direct_v = R["variants"]["direct"]["rps"]
            w("## Throughput (closed loop, wrk)\n")
            w("| variant | req/s | vs nginx | vs direct | proxy CPU µs/req | upstream CPU µs/req | "
              "wrk CPU µs/req | machine busy | others' CPU (max) | proxy peak RSS | errors |")
            w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for name in VARIANTS:
                v = R["variants"][name]
                cmp_anchor = R["variants"]["nginx-https"]["rps"] if name.endswith("https") else anchor
                w(f"| {name} | {v['rps']:,.0f} ({v['rps_min']:,.0f}–{v['rps_max']:,.0f}) | "
                  f"{v['rps'] / cmp_anchor:.2f}× | {v['rps'] / direct_v:.2f}× | "
                  f"{fmt(v['proxy_cpu_us'], '.1f')} | {v['upstream_cpu_us']:.1f} | "
                  f"{v['client_cpu_us']:.1f} | {v['machine_busy'] * 100:.0f}% | {v['foreign_max'] * 100:.0f}% | {fmt_kib(v['proxy_peak_rss_kib'])} | {v['errors']} |")
            w("\n`vs nginx` compares HTTPS variants with nginx-https, the others with nginx. "
              "`machine busy` is the share of all cores not idle during the run; `others' CPU` is the "
              "largest share of the machine that processes outside the benchmark used during one of "
              "the runs (another build or test suite): above a few percent, that run is disturbed.\n")
            for name in VARIANTS:
                w(f"- `{name}`: {DESCRIPTIONS[name]}")
            w("")
        if R.get("tls"):
            self.tls_markdown(w)
        if R["latency"]:
            groups = latency_groups(R)
            w("## Latency at fixed offered rates (open loop, oha with latency correction)\n")
            warm = getattr(a, "latency_warmup", None)
            w(f"{a.connections} connections, {a.latency_duration} s per run"
              + (f" after {warm} s at the same rate, not measured (a pool the variant's last run left "
                 f"to expire is filled again: the steady state)" if warm else "")
              + f", {a.latency_rounds} round(s), medians. `added` is the difference from `direct` at "
              f"the same rate.\n")
            for g in groups.values():
                pair = " and ".join(f"`{n}`" for n in g["pair"])
                of = "the lowest saturation rate of all variants" if g.get("shared") else f"the lower saturation rate of {pair}"
                w(f"Offered rates for {', '.join(f'`{n}`' for n in g['variants'])}: 25%, 50% and 75% of "
                  f"{of} ({g['saturation']:,.0f} req/s, {g['lowest_variant']}).\n")
                w("| variant | offered req/s | achieved | p50 ms | p99 ms | p99.9 ms | added p50 | added p99 | "
                  "proxy CPU µs/req | oha CPU µs/req | errors |")
                w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
                for rate in g["rates"]:
                    d = R["latency"]["direct"][rate]
                    for name in g["variants"]:
                        v = R["latency"][name][rate]
                        added = "" if name == "direct" else f"{v['p50_ms'] - d['p50_ms']:+.3f}"
                        added99 = "" if name == "direct" else f"{v['p99_ms'] - d['p99_ms']:+.3f}"
                        sat = " (saturated)" if v["achieved"] < 0.95 * rate else ""
                        w(f"| {name} | {rate:,} | {v['achieved']:,.0f}{sat} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} | "
                          f"{v['p999_ms']:.3f} | {added} | {added99} | {fmt(v['proxy_cpu_us'], '.1f')} | "
                          f"{v['client_cpu_us']:.1f} | {v['errors']} |")
                w("")
            fmax = max(v["foreign_max"] for n in R["latency"] for v in R["latency"][n].values())
            w(f"Processes outside the benchmark used at most {fmax * 100:.0f}% of the machine during "
              "one of these runs.")
            w("\n`saturated`: the variant did not sustain the offered rate (achieved < 95%); its latencies "
              "there are queueing. oha costs more CPU per request than wrk (see its column), and it shares "
              "the cores with the proxy, so a variant can saturate under oha below its wrk rate.\n")
            if plotted:
                w("![latency against offered rate](latency.png)\n")
        if R.get("latchkey_metrics"):
            w("latchkey's own counters after the load phases (one process per variant):\n")
            w("| process | cache lookups | Vault reads | tunnel leaves | latchkey errors | RSS at the end (`/metrics` not read before) |")
            w("|---|---|---:|---|---|---:|")
            for name, m in R["latchkey_metrics"].items():
                cache = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(m["cache"].items())) or "-"
                errs = ", ".join(f"{k.split('code=')[1].rstrip('}')} {v:,.0f}" for k, v in m["errors"].items()) or "none"
                rss = f"{m['rss_kib'] / 1024:.1f} MiB" if m.get("rss_kib") else "-"
                leaves = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(m.get("leaves", {}).items())) or "-"
                w(f"| {name} | {cache} | {m['vault_reads']:.0f} | {leaves} | {errs} | {rss} |")
            w("")
        c = R["cold"]
        if c:
            w("## Cold path (a fresh latchkey; Vault reads counted in OpenBao's audit log)\n")
            w("| test | requests | Vault reads | req/s | p50 ms | p99 ms | max ms | statuses |")
            w("|---|---:|---:|---:|---:|---:|---:|---|")
            for key, label in [("distinct_cold", f"{c['connections']:,} distinct connections, cold "
                                                  f"({c['concurrency']} keep-alive client connections)"),
                               ("distinct_warm", "the same connections again, warm"),
                               ("burst", f"burst: {a.burst:,} concurrent requests on one new connection")]:
                v = c[key]
                rate = f"{v['rate']:,.0f}" if "rate" in v else "-"
                w(f"| {label} | {v['requests']:,} | {v['vault_reads']} | {rate} | {v['p50_ms']:.2f} | "
                  f"{v['p99_ms']:.2f} | {v['max_ms']:.2f} | {fmt_statuses(v['statuses'], v['errors'])} |")
            w("\nThe cold-path client is Python (asyncio), so its rates are the client's and Vault's limit "
              "as much as latchkey's; the Vault read counts are the point.\n")
        m = R["memory"]
        if m:
            w("## Memory (RSS)\n")
            w(f"latchkey, a fresh process: {fmt_kib(m['start_kib'])} at start, {fmt_kib(m['idle_kib'])} idle "
              f"after a few requests.\n")
            w("| idle keep-alive client connections | latchkey RSS | per connection | nginx anchor RSS "
              "(all processes) | per connection |")
            w("|---|---:|---:|---:|---:|")
            li, ni = m["latchkey_idle_conns"], m["nginx_idle_conns"]
            w(f"| 0 | {fmt_kib(li['idle_kib'])} | | {fmt_kib(ni['idle_kib'])} | |")
            for n in a.idle_steps:
                lkn, ngn = li[n], ni[n]
                w(f"| {n:,} (held {lkn['held']:,} / {ngn['held']:,}) | {fmt_kib(lkn['rss_kib'])} | "
                  f"{(lkn['rss_kib'] - li['idle_kib']) / n:.1f} KiB | {fmt_kib(ngn['rss_kib'])} | "
                  f"{(ngn['rss_kib'] - ni['idle_kib']) / n:.1f} KiB |")
            w(f"| after closing them | {fmt_kib(li['after_close_kib'])} | | {fmt_kib(ni['after_close_kib'])} | |")
            w("")
            w(f"Streaming {a.stream_bytes / GiB:g} GiB through latchkey, one request each way, in a fresh "
              f"process (RSS sampled every 10 ms, and VmHWM reset before the transfer):\n")
            w("| direction | MiB/s | RSS before | peak during | after |")
            w("|---|---:|---:|---:|---:|")
            for key, label in [("stream_down", "download (upstream → client)"),
                               ("stream_up", "upload (client → upstream sink)")]:
                s = m[key]
                w(f"| {label} | {s['mib_s']:,.0f} | {fmt_kib(s['idle_kib'])} | "
                  f"{fmt_kib(max(s['peak_sampled_kib'], s['hwm_kib']))} | {fmt_kib(s['after_kib'])} |")
            w(f"\nWithout latchkey: download {m['direct_down_mib_s']:,.0f} MiB/s, upload "
              f"{m['direct_up_mib_s']:,.0f} MiB/s. The client (bench/clients.py) and the upload sink are "
              "Python with 4 MiB socket buffers; the sink reads the body and discards it.\n")
        w("## Performance targets (PRODUCT.md section 9)\n")
        for line in self.targets():
            w(f"- {line}")
        if R["notes"]:
            w("\n## Notes\n")
            for n in R["notes"]:
                w(f"- {n}")
        w("")
        return "\n".join(L)

    def tls_markdown(self, w):
        R, a = self.results, self.args
        T = R["tls"]
        w("## Tunnel form against nginx terminating TLS (closed loop, examples/tunnel_load.rs)\n")
        w(f"The same client on both sides (`examples/tunnel_load.rs`: tokio, rustls with ring, HTTP/1.1, "
          f"{a.connections} connections, 2 threads, no TLS session resumption), the same trust (latchkey's "
          f"CA and the benchmark's CA in one file), the same HTTPS upstream behind both (the upstream "
          f"nginx, TLS 1.3, pooled keep-alive connections from latchkey and from the anchor). latchkey: "
          f"`CONNECT {TUNNEL_HOST}:443` with `Proxy-Authorization: Basic base64(bench-tunnel:x)`, the host "
          f"pinned to the HTTPS upstream by `proxy.resolve`, then TLS with a leaf minted by latchkey's CA "
          f"(`latchkey ca init`; minted once before the load, cached after), and `GET /` inside; latchkey "
          f"injects the connection's bearer key. nginx: the anchor's TLS port, a P-256 certificate for "
          f"{TUNNEL_HOST} from the benchmark's CA, `ssl_session_cache off`, `ssl_session_tickets off`, "
          f"`proxy_set_header Authorization`. These run in the same rotated rounds as the wrk variants "
          f"({a.duration} s per run, {a.rounds} round(s), medians, min–max in brackets). Latencies are "
          f"the closed loop's: every connection always busy, so they include queueing; a `-new` "
          f"variant's latency includes the TCP connection, the CONNECT and the full handshake.\n")
        w("| variant | req/s | latchkey/nginx | p50 ms | p99 ms | p99.9 ms | proxy CPU µs/req | "
          "upstream CPU µs/req | client CPU µs/req | machine busy | others' CPU (max) | proxy peak RSS | "
          "connections opened | errors |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        pair = {lk: ng for lk, ng in TLS_PAIRS}
        for name in TLS_VARIANTS:
            v = T[name]
            ratio = f"{v['rps'] / T[pair[name]]['rps']:.2f}×" if name in pair else ""
            w(f"| {name} | {v['rps']:,.0f} ({v['rps_min']:,.0f}–{v['rps_max']:,.0f}) | {ratio} | "
              f"{v['p50_ms']:.3f} | {v['p99_ms']:.3f} | {v['p999_ms']:.3f} | {fmt(v['proxy_cpu_us'], '.1f')} | "
              f"{v['upstream_cpu_us']:.1f} | {v['client_cpu_us']:.1f} | {v['machine_busy'] * 100:.0f}% | "
              f"{v['foreign_max'] * 100:.0f}% | {fmt_kib(v['proxy_peak_rss_kib'])} | "
              f"{v['connections_opened']:,} | {v['errors']} |")
        w("\nRatios, latchkey over nginx (median of each):\n")
        w("| | req/s | p50 | p99 | proxy CPU µs/req |")
        w("|---|---:|---:|---:|---:|")
        for lk, ng in TLS_PAIRS:
            L, N = T[lk], T[ng]
            cpu = (f"{L['proxy_cpu_us'] / N['proxy_cpu_us']:.2f}×"
                   if L["proxy_cpu_us"] and N["proxy_cpu_us"] else "-")
            w(f"| {lk} / {ng} | {L['rps'] / N['rps']:.2f}× | {L['p50_ms'] / N['p50_ms']:.2f}× | "
              f"{L['p99_ms'] / N['p99_ms']:.2f}× | {cpu} |")
        w("")
        for name in TLS_VARIANTS:
            w(f"- `{name}`: {DESCRIPTIONS[name]}")
        kinds = {n: T[n].get("error_kinds") for n in TLS_VARIANTS if T[n].get("error_kinds")}
        for n, k in kinds.items():
            w(f"- errors of `{n}`: " + "; ".join(f"{e} ×{c}" for e, c in k.items()))
        w("")

    def targets(self):
        """Each target of PRODUCT.md section 9 (issue 15's list) with its verdict in this run."""
        R = self.results
        out = []
        verdict = lambda ok: f"**{'met' if ok else 'not met'}**"  # noqa: E731
        V = R["variants"]
        for lk, ng, what in (("latchkey", "nginx", "gateway form, plain upstream"),
                             ("latchkey-https", "nginx-https", "gateway form, HTTPS upstream")):
            if V:
                a, b = V[lk]["rps"], V[ng]["rps"]
                out.append(f"{what}: throughput at least nginx's: {a:,.0f} vs {b:,.0f} req/s "
                           f"({a / b:.2f}×): {verdict(a >= b)}")
            if R["latency"]:
                g = next(g for g in latency_groups(R).values() if lk in g["variants"])
                points = [(r, R["latency"][lk][r]["p99_ms"], R["latency"][ng][r]["p99_ms"]) for r in g["rates"]]
                shown = "; ".join(f"{r:,}/s: {x:.3f} vs {y:.3f} ms" for r, x, y in points)
                out.append(f"{what}: p99 no worse than nginx's at 25, 50 and 75% of saturation: {shown}: "
                           f"{verdict(all(x <= y for _, x, y in points))}")
        if R.get("tls"):
            T = R["tls"]
            for lk, ng in TLS_PAIRS:
                a, b = T[lk]["rps"], T[ng]["rps"]
                out.append(f"tunnel form, {'a new tunnel per request' if lk.endswith('-new') else 'keep-alive inside'}, "
                           f"against nginx terminating TLS: {a:,.0f} vs {b:,.0f} req/s ({a / b:.2f}×): "
                           f"{verdict(a >= b)}")
        c = R["cold"]
        if c:
            b = c["burst"]["vault_reads"]
            out.append(f"a cold burst of {self.args.burst:,} concurrent requests on one connection costs "
                       f"exactly 1 Vault read: {b}: **{'met' if b == 1 else 'not met'}**")
            d = c["distinct_cold"]
            out.append(f"a cache miss costs exactly one Vault read: {d['vault_reads']:,} reads for "
                       f"{c['connections']:,} distinct connections, {c['distinct_warm']['vault_reads']} when "
                       f"warm: **{'met' if d['vault_reads'] == c['connections'] and c['distinct_warm']['vault_reads'] == 0 else 'not met'}**")
        m = R["memory"]
        if m:
            grow = max(max(m[k]["peak_sampled_kib"], m[k]["hwm_kib"]) - m[k]["idle_kib"]
                       for k in ("stream_down", "stream_up"))
            out.append(f"memory flat while streaming {self.args.stream_bytes / GiB:g} GiB: peak RSS at most "
                       f"{grow / 1024:.1f} MiB above idle")
            li = m["latchkey_idle_conns"]
            steps = list(self.args.idle_steps)
            each = {n: (li[n]["rss_kib"] - li["idle_kib"]) / n for n in steps}
            out.append("at most 4 KiB per idle client connection: "
                       + "; ".join(f"{e:.1f} KiB each with {n:,}" for n, e in each.items())
                       + f": {verdict(all(e <= 4.0 for e in each.values()))}")
            n = max(steps)
            if n >= 10_000:
                out.append(f"{n:,} idle connections under 64 MiB in all: {li[n]['rss_kib'] / 1024:.1f} MiB: "
                           f"{verdict(li[n]['rss_kib'] < 64 * 1024)}")
        return out


def latency_groups(R):
    """The latency runs' groups (LATENCY_GROUPS with their saturation and rates), also from a
    results file of before the groups, when every variant ran at one set of rates."""
    lr = R["latency_rates"]
    if "groups" in lr:
        return lr["groups"]
    return {g: {"variants": spec["variants"], "pair": list(spec["pair"]),
                "saturation": lr["lowest_saturation"], "lowest_variant": lr["lowest_variant"],
                "rates": lr["rates"], "shared": True}
            for g, spec in LATENCY_GROUPS.items()}


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def fmt_kib(k):
    return "-" if not k else f"{k / 1024:.1f} MiB"


def fmt_statuses(st, errors):
    s = ", ".join(f"{k}×{v:,}" for k, v in sorted(st.items()))
    return s + (f", {errors} errors" if errors else "")


def render(path, out):
    """Writes latest.md and latency.png again from a results JSON file (e.g. after changing the
    presentation), without running anything."""
    results = json.loads(Path(path).read_text())

    def int_keys(d):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in d.items()}

    for name, rates in results.get("latency", {}).items():
        results["latency"][name] = int_keys(rates)
    for key in ("latchkey_idle_conns", "nginx_idle_conns"):
        if key in results.get("memory", {}):
            results["memory"][key] = int_keys(results["memory"][key])
    args = argparse.Namespace(**results["args"])
    args.out = out or str(Path(path).parent)
    bench = Bench.__new__(Bench)
    bench.args, bench.results = args, results
    bench.write()


def main():
    ap = argparse.ArgumentParser(description="latchkey's load benchmark (see the module docstring).")
    ap.add_argument("--quick", action="store_true", help="short runs, to smoke-test the harness")
    ap.add_argument("--duration", type=int, help="seconds per wrk run (default 10, quick 2)")
    ap.add_argument("--warmup", type=int, help="seconds of wrk warm-up per variant (default 2, quick 1)")
    ap.add_argument("--rounds", type=int, help="wrk rounds (default 5, quick 1)")
    ap.add_argument("--latency-duration", type=int, help="seconds per oha run (default 8, quick 2)")
    ap.add_argument("--latency-rounds", type=int, help="oha rounds (default 5, quick 1)")
    ap.add_argument("--latency-warmup", type=int,
                    help="seconds of oha at the same rate before each measured oha run (default 2, quick 1)")
    ap.add_argument("--connections", type=int, default=64, help="client connections for wrk and oha")
    ap.add_argument("--cold-connections", type=int, help="distinct connections (default 1000, quick 200)")
    ap.add_argument("--cold-concurrency", type=int, default=32)
    ap.add_argument("--burst", type=int, default=1000, help="concurrent requests of the cold burst")
    ap.add_argument("--idle-steps", type=lambda s: [int(x) for x in s.split(",")],
                    help="idle connection counts (default 1000,10000; quick 1000,2000)")
    ap.add_argument("--stream-bytes", type=int, help="bytes streamed each way (default 1 GiB, quick 128 MiB)")
    ap.add_argument("--https-h2", action="store_true", help="offer h2 on the HTTPS upstream too")
    ap.add_argument("--http1-server", choices=["hyper", "latchkey"],
                    help="latchkey's proxy.http1_server in every variant (default: its default)")
    ap.add_argument("--no-build", action="store_true",
                    help="use the build as it is (target/release/latchkey, or target/pgo/latchkey with --pgo)")
    ap.add_argument("--pgo", action="store_true",
                    help="measure target/pgo/latchkey, the profile-guided build of scripts/build-pgo "
                         "(scripts/bench-load passes this after running it)")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    ap.add_argument("--oha", help="path of oha (default: PATH, then target/bench-tools/bin)")
    ap.add_argument("--nginx", default="/usr/sbin/nginx")
    ap.add_argument("--out", help="results directory (default bench/results, quick bench/results/quick)")
    ap.add_argument("--render", metavar="JSON",
                    help="only write the markdown and the plot again from a results JSON file")
    a = ap.parse_args()
    if a.render:
        render(a.render, a.out)
        return
    q = a.quick
    defaults = dict(duration=(2, 10), warmup=(1, 2), rounds=(1, 5), latency_duration=(2, 8),
                    latency_rounds=(1, 5), latency_warmup=(1, 2), cold_connections=(200, 1000), idle_steps=([1000, 2000], [1000, 10000]),
                    stream_bytes=(128 << 20, GiB), out=(str(BENCH / "results/quick"), str(BENCH / "results")))
    for k, (quick, full) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)

    t = len(VARIANTS) + len(TLS_VARIANTS)
    est = (t * a.warmup + t * a.rounds * (a.duration + 0.3)
           + len(LATENCY_FRACTIONS) * sum(len(g["variants"]) for g in LATENCY_GROUPS.values())
           * a.latency_rounds * (a.latency_warmup + a.latency_duration + 0.6)) if not a.skip_load else 0
    log(f"load phases take about {est / 60:.1f} min, plus setup, cold path and memory (a minute or two)")
    log(f"{CORES} cores shared by the load generator, the proxies and the upstream (nothing pinned)")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(PROCS.stop_all)
    bench = Bench(a)
    try:
        bench.run()
    except BenchError as e:
        log(f"error: {e}")
        log(f"logs and configs are in {bench.workdir}")
        a.keep = True
        sys.exit(1)
    finally:
        PROCS.stop_all()
        if not a.keep:
            shutil.rmtree(bench.workdir, ignore_errors=True)
        else:
            log(f"work directory kept: {bench.workdir}")


if __name__ == "__main__":
    main()
