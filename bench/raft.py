"""A real OpenBao cluster on loopback, for scripts/cluster (and scripts/chaos, later): the Python
form of tests/e2e/support/raft.rs.

``bao server -config`` per node, with integrated (raft) storage in a directory of its own,
initialised with one key share, unsealed, the other nodes joined to the first, until every node
is a voter, a leader is known and every node serves a KV v2 read at the mount ``secret``.

Elections are quick (``performance_multiplier = 1``: a dead leader is noticed within about a
second) and autopilot promotes joined nodes to voters after a second of stability instead of
ten. Plain HTTP only (raft.rs can also give the API listeners a certificate).

    from raft import RaftCluster
    cluster = RaftCluster(bao_bin, workdir).start()   # 3 nodes, formed
    cluster.addrs()          # every node's API address, in node order
    cluster.leader()         # the index of the active node, or None
    cluster.kill(i)          # SIGKILL, as a crash would
    cluster.revive(i)        # the same node again, on its data, unsealed
    cluster.stop()

Processes are started through ``load.PROCS``: each in its own process group, stopped at exit.
"""

import http.client
import json
import os
import signal
import subprocess
import time

import load
from load import PROCS, BenchError, clean_env, free_port, wait_until

# The mount latchkey reads (its default `vault.mount`).
MOUNT = "secret"


class Node:
    def __init__(self, index, data, config, log, port):
        self.index, self.data, self.config, self.log, self.port = index, data, config, log, port
        self.addr = f"http://127.0.0.1:{port}"
        self.proc = None

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None


class RaftCluster:
    def __init__(self, bao, workdir, nodes=3, standby_reads=True, procs=PROCS):
        """``bao``: the ``bao`` program; ``workdir``: where each node keeps its data, config and
        log; ``standby_reads=False`` sets ``disable_standby_reads`` (standbys forward every
        request to the active node)."""
        if nodes < 1:
            raise ValueError("a cluster needs a node")
        self.bao, self.procs, self.standby_reads = bao, procs, standby_reads
        self.dir = workdir / "raft"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = nodes
        self.nodes = []
        self.token = None  # the root token `operator init` printed
        self.unseal_key = None

    # -- starting -----------------------------------------------------------------------------

    def start(self):
        for i in range(self.count):
            self.nodes.append(self._launch(i))
        self._form()
        return self

    def _launch(self, i):
        """Starts node ``i`` and waits until its API answers; on a port that another process
        took in the meantime (the node exits), tries again with other ports."""
        data = self.dir / f"n{i}"
        data.mkdir(exist_ok=True)
        for _attempt in range(3):
            api, cluster = free_port(), free_port()
            node = Node(i, data, self.dir / f"n{i}.hcl", self.dir / f"n{i}.log", api)
            node.config.write_text(
                f'storage "raft" {{\n  path = "{data}"\n  node_id = "n{i}"\n'
                '  performance_multiplier = 1\n  autopilot_reconcile_interval = "1s"\n'
                '  autopilot_update_interval = "500ms"\n}\n'
                f'listener "tcp" {{\n  address = "127.0.0.1:{api}"\n'
                f'  cluster_address = "127.0.0.1:{cluster}"\n  tls_disable = true\n}}\n'
                f'api_addr = "{node.addr}"\ncluster_addr = "https://127.0.0.1:{cluster}"\n'
                f"disable_mlock = true\ndisable_standby_reads = {str(not self.standby_reads).lower()}\n")
            if self._spawn(node):
                return node
        raise BenchError(f"OpenBao node {i} did not start:\n{self._tail(node)}")

    def _spawn(self, node):
        node.proc = self.procs.start(f"openbao-n{node.index}",
                                     [self.bao, "server", f"-config={node.config}"],
                                     env=clean_env(), log_path=node.log)
        try:
            # Any answer will do: an uninitialised or sealed node answers 501 or 503.
            wait_until(f"OpenBao node {node.index}", lambda: self._status(node, "/v1/sys/health") > 0,
                       timeout=15, proc=node.proc, interval=0.05)
        except BenchError:
            self.procs.stop(node.proc)
            node.proc = None
            return False
        return True

    def _form(self):
        """Init, unseal, join, and wait until the cluster serves KV v2 reads on every node."""
        first = self.nodes[0]
        init = json.loads(self.cli(first, "operator", "init", "-key-shares=1", "-key-threshold=1",
                                   "-format=json"))
        self.unseal_key = init["unseal_keys_b64"][0]
        self.token = init["root_token"]
        self.cli(first, "operator", "unseal", self.unseal_key)
        wait_until("the first node to be active", lambda: self._status(first, "/v1/sys/health") == 200,
                   timeout=30, interval=0.05)
        # Joined nodes become voters after this long without trouble (ten seconds by default).
        wait_until("autopilot to take its config",
                   lambda: self.try_cli(first, "operator", "raft", "autopilot", "set-config",
                                        "-server-stabilization-time=1s") is not None,
                   timeout=30, interval=0.2)
        for node in self.nodes[1:]:
            self.cli(node, "operator", "raft", "join", first.addr)
            self.cli(node, "operator", "unseal", self.unseal_key)

        def formed():
            peers = json.loads(self.cli(first, "operator", "raft", "list-peers", "-format=json"))
            servers = peers["data"]["config"]["servers"]
            return (len(servers) == self.count and all(s["voter"] for s in servers)
                    and sum(1 for s in servers if s["leader"]) == 1)
        wait_until("every node to be a voter, with a leader", formed, timeout=40, interval=0.2)
        self.cli(first, "secrets", "enable", f"-path={MOUNT}", "kv-v2")
        self.put("cluster-ready", {"ok": "1"})
        # A standby serves KV reads only once it has the mount, the upgraded layout and the token.
        for node in self.nodes:
            wait_until(f"node {node.index} to serve a KV read",
                       lambda: self.get("cluster-ready", node=node.index) is not None,
                       timeout=30, interval=0.1)

    # -- asking -------------------------------------------------------------------------------

    def addrs(self, first=0):
        """Every node's API address, starting at node ``first`` (what latchkey is given)."""
        return [self.nodes[(first + k) % self.count].addr for k in range(self.count)]

    def leader(self):
        """The index of the active node, by asking the live nodes (None while there is none)."""
        by_addr = {n.addr: n.index for n in self.nodes}
        for node in self.nodes:
            if not node.alive:
                continue
            try:
                status, body = self._request(node, "GET", "/v1/sys/leader")
                leader = json.loads(body).get("leader_address", "")
            except (OSError, ValueError, http.client.HTTPException):
                continue
            i = by_addr.get(leader)
            if status == 200 and i is not None and self.nodes[i].alive:
                return i
        return None

    def live(self):
        """A live node (the first one)."""
        for node in self.nodes:
            if node.alive:
                return node
        raise BenchError("no OpenBao node is running")

    def put(self, path, fields, node=None):
        """A KV v2 write of ``fields`` at ``{MOUNT}/{path}`` through a live node's API (a
        standby forwards it)."""
        n = self.live() if node is None else self.nodes[node]
        status, body = self._request(n, "POST", f"/v1/{MOUNT}/data/{path}", {"data": fields})
        if status not in (200, 204):
            raise BenchError(f"writing {path} through node {n.index}: HTTP {status} {body[:200]!r}")

    def get(self, path, node=None):
        """The fields at ``{MOUNT}/{path}`` as node ``node`` reads them (None if none)."""
        n = self.live() if node is None else self.nodes[node]
        try:
            status, body = self._request(n, "GET", f"/v1/{MOUNT}/data/{path}")
        except (OSError, http.client.HTTPException):
            return None
        if status != 200:
            return None
        return json.loads(body)["data"]["data"]

    # -- faults -------------------------------------------------------------------------------

    def kill(self, i):
        """SIGKILL, as a crash would."""
        node = self.nodes[i]
        if node.alive:
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait()
        if node.proc is not None:
            self.procs.stop(node.proc)
        node.proc = None

    def revive(self, i):
        """Node ``i`` again on its data and ports, unsealed: it rejoins the cluster."""
        node = self.nodes[i]
        if node.alive:
            return
        if not self._spawn(node):
            raise BenchError(f"OpenBao node {i} did not start again:\n{self._tail(node)}")
        self.cli(node, "operator", "unseal", self.unseal_key)
        wait_until(f"node {i} unsealed", lambda: self._status(node, "/v1/sys/health") in (200, 429),
                   timeout=30, interval=0.1)

    def stop(self):
        for i in range(len(self.nodes)):
            self.kill(i)

    # -- plumbing -----------------------------------------------------------------------------

    def cli(self, node, *args):
        """Runs the ``bao`` CLI against ``node``; its standard output."""
        env = clean_env(BAO_ADDR=node.addr, VAULT_ADDR=node.addr)
        if self.token:
            env.update(BAO_TOKEN=self.token, VAULT_TOKEN=self.token)
        try:
            return load.run([self.bao, *args], env=env, timeout=30)
        except (BenchError, subprocess.TimeoutExpired) as e:
            raise BenchError(f"bao {' '.join(args[:2])} on node {node.index}: {e}\n{self.logs()}") from None

    def try_cli(self, node, *args):
        try:
            return self.cli(node, *args)
        except BenchError:
            return None

    def _request(self, node, method, path, body=None, timeout=5.0):
        c = http.client.HTTPConnection("127.0.0.1", node.port, timeout=timeout)
        try:
            headers = {"X-Vault-Token": self.token} if self.token else {}
            data = None
            if body is not None:
                data = json.dumps(body)
                headers["Content-Type"] = "application/json"
            c.request(method, path, body=data, headers=headers)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def _status(self, node, path):
        try:
            return self._request(node, "GET", path, timeout=2.0)[0]
        except (OSError, http.client.HTTPException):
            return 0

    def _tail(self, node, lines=15):
        try:
            text = node.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def logs(self):
        """The tail of every node's log, for error messages."""
        return "\n".join(f"--- node {n.index} ({n.addr})\n{self._tail(n)}" for n in self.nodes)


def _selftest():
    """``python3 bench/raft.py``: forms a cluster, kills the leader, waits for a new one."""
    import sys
    import tempfile
    from pathlib import Path
    scripts = load.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]).strip()
    bao = load.find_program("bao", [scripts])
    work = Path(tempfile.mkdtemp(prefix="latchkey-raft-"))
    try:
        t0 = time.monotonic()
        c = RaftCluster(bao, work).start()
        load.log(f"formed in {time.monotonic() - t0:.1f} s: {c.addrs()}, leader n{c.leader()}")
        old = c.leader()
        c.kill(old)
        t1 = time.monotonic()
        wait_until("a new leader", lambda: c.leader() not in (None, old), timeout=30, interval=0.05)
        load.log(f"leader n{old} killed; n{c.leader()} leads {time.monotonic() - t1:.1f} s later")
        c.revive(old)
        load.log(f"n{old} back; reads {c.get('cluster-ready', node=old)}")
    finally:
        PROCS.stop_all()
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    _selftest()
