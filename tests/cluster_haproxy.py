"""HAProxy in front of hub nodes, and the hub node processes behind it (cluster tests,
issue 14; a helper module, not a fixture file: import it, never ``conftest``).

``HAProxy``: the distribution's ``haproxy`` (scripts/test.sh installs it as root), run in the
foreground (``-db``) on a free port with a config written per test: TCP mode, round robin,
no stickiness -- an ordinary load balancer that knows nothing of edgegw, which is what the
cluster promises to work behind.  Health checks are ``GET /healthz`` every 250 ms (two
failures mark a node down, one success up again), and a node marked down has its client
sessions shut at once, so clients of a dead or unhealthy node reconnect elsewhere within
about a second.  A stats socket tells a test which nodes HAProxy believes up.

``NodeSet``: N ``python -m edgegw hub --config <toml>`` processes on fixed ports (fixed, so
HAProxy's config and a restarted node agree), each killable with SIGKILL and restartable.
The config of node i is whatever TOML text the test gives; ``{port}`` and ``{node}`` in it
are filled in.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.ports import free_port
from tests.processes import REPO, get_json, spawn, wait_for


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)


def haproxy_config(port: int, backends: list[tuple[str, int]], stats_socket: Path,
                   check_path: str = "/healthz") -> str:
    servers = "\n".join(
        f"    server n{i} {host}:{p} check" for i, (host, p) in enumerate(backends))
    return f"""\
global
    maxconn 4096
    stats socket {stats_socket} mode 600 level admin

defaults
    mode tcp
    # a WebSocket is a long-lived TCP session: the client and server timeouts must outlast
    # the longest silence (heartbeats keep both sides talking well within this)
    timeout connect 1s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    # a connect refused by a dead node is retried on another (no sticky sessions)
    retries 3
    option redispatch

frontend edgegw
    bind 127.0.0.1:{port}
    default_backend nodes

backend nodes
    balance roundrobin
    option httpchk
    http-check send meth GET uri {check_path} ver HTTP/1.1 hdr Host edgegw-check
    http-check expect status 200
    # quick failover: a check every 250 ms, down after 2 failures, up after 1 success;
    # sessions on a node marked down are cut so their clients reconnect elsewhere
    default-server inter 250ms fastinter 250ms downinter 250ms fall 2 rise 1 \
on-marked-down shutdown-sessions
{servers}
"""


class HAProxy:
    """One HAProxy process balancing ``backends`` (``(host, port)``) on ``self.port``."""

    def __init__(self, workdir: Path, backends: list[tuple[str, int]],
                 check_path: str = "/healthz") -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy; "
                               "scripts/test.sh does it as root)")
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.stats_socket = workdir / "haproxy.sock"
        self.cfg = workdir / "haproxy.cfg"
        self.cfg.write_text(haproxy_config(self.port, backends, self.stats_socket, check_path))
        self.log = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HAProxy:
        check = subprocess.run([self.binary, "-c", "-f", str(self.cfg)], capture_output=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy config refused: {check.stdout!r} {check.stderr!r}")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([self.binary, "-db", "-f", str(self.cfg)],
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._listening, timeout=10)
        return self

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited: {self.log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        return self.stats_socket.exists()

    def command(self, line: str) -> str:
        """One command on the stats socket (``show stat``, ``disable server nodes/n0``)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.stats_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """Each backend server's status as HAProxy sees it: ``{"n0": "UP", "n1": "DOWN"}``."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        pxname, svname, status = (header.index(k) for k in ("pxname", "svname", "status"))
        out = {}
        for line in lines[1:]:
            cols = line.split(",")
            if len(cols) > status and cols[pxname] == "nodes" and cols[svname].startswith("n"):
                out[cols[svname]] = cols[status].split()[0]
        return out

    def wait_states(self, expected: dict[str, str], timeout: float = 20.0) -> None:
        wait_for(lambda: all(self.server_states().get(k) == v for k, v in expected.items()),
                 timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def node_toml(data_dir: Path | str, dsn: str, redis: str | list[str], prefix: str, *,
              partitions: int = 8, cluster: str = "", rest: str = "") -> str:
    """A cluster node's TOML for ``NodeSet`` (``{port}`` and ``{node}`` left for it):
    the settings every cluster test shares -- short leases and stale period, so failures
    play out in seconds -- then the test's own ``[hub.cluster]`` lines and sections.
    ``redis``: one URL, or the shards' URLs."""
    shards = (f'redis_url = "{redis}"' if isinstance(redis, str)
              else "redis_urls = [" + ", ".join(f'"{u}"' for u in redis) + "]")
    return f"""\
[hub]
listen = "127.0.0.1"
port = {{port}}
data_dir = "{data_dir}/{{node}}"
heartbeat_s = 1.0

[hub.cluster]
node_id = "{{node}}"
postgres_dsn = "{dsn}"
{shards}
key_prefix = "{prefix}"
partitions = {partitions}
lease_ttl_s = 2.0
stale_after_s = 2.0
{cluster}
{rest}"""


class NodeSet:
    """``n`` hub node processes (``edgegw hub --config``), one config each from
    ``config_text(i)``, with ``{port}`` and ``{node}`` filled in."""

    def __init__(self, workdir: Path, n: int, config_text: Callable[[int], str],
                 extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ports = [free_port() for _ in range(n)]
        self.names = [f"node-{i}" for i in range(n)]
        self.configs = []
        for i in range(n):
            path = workdir / f"{self.names[i]}.toml"
            path.write_text(config_text(i).replace("{port}", str(self.ports[i]))
                            .replace("{node}", self.names[i]))
            self.configs.append(path)
        self.extra_args = extra_args
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.starts = [0] * n

    @property
    def backends(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self.ports]

    def log(self, i: int) -> Path:
        return self.workdir / f"{self.names[i]}.log"

    def start(self, i: int, env: dict[str, str] | None = None) -> None:
        """Start node ``i`` (``env``: more environment, e.g. ``EDGEGW_FAILPOINTS``)."""
        assert self.procs[i] is None or self.procs[i].poll() is not None
        self.starts[i] += 1
        with open(self.log(i), "ab") as out:
            out.write(f"\n==== start {self.starts[i]} at {time.time():.3f}\n".encode())
        self.procs[i] = spawn("hub", "--config", str(self.configs[i]), *self.extra_args,
                              log=self.log(i), env=env)

    def start_all(self, timeout: float = 60.0) -> NodeSet:
        for i in range(len(self.procs)):
            self.start(i)
        for i in range(len(self.procs)):
            self.wait_healthy(i, timeout)
        return self

    def healthz(self, i: int) -> dict[str, object]:
        result: dict[str, object] = get_json(f"http://127.0.0.1:{self.ports[i]}/healthz")
        return result

    def wait_healthy(self, i: int, timeout: float = 60.0) -> None:
        def up() -> bool:
            proc = self.procs[i]
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{self.names[i]} exited with {proc.returncode}: "
                                   f"{self.log(i).read_text()[-3000:]}")
            return self.healthz(i).get("status") == "ok"
        try:
            wait_for(up, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"{self.names[i]} not healthy within {timeout} s: "
                                 f"{self.log(i).read_text()[-3000:]}") from None

    def kill(self, i: int) -> None:
        """SIGKILL: no shutdown code runs (a crash, a power cut of that node)."""
        proc = self.procs[i]
        assert proc is not None and proc.poll() is None, f"{self.names[i]} is not running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def restart(self, i: int, timeout: float = 60.0) -> None:
        self.start(i)
        self.wait_healthy(i, timeout)

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def __enter__(self) -> NodeSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


__all__ = ["REPO", "HAProxy", "NodeSet", "haproxy_binary", "haproxy_config"]
