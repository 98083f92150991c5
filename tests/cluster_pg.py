"""PostgreSQL for the cluster tests (a helper module with fixtures; conftest imports them).

- ``pg_dsn``: a fresh database ``edgegw_t_<random>`` per test on the machine's server when
  127.0.0.1:5432 answers (user ``postgres``, or ``EDGEGW_TEST_PG_DSN`` naming a server to
  use), else on a private server this module starts; dropped after the test.  Made ahead
  and dropped behind in a worker thread (``DatabasePool``).
- ``PrivatePg``: a private server (initdb + pg_ctl) on a free port in its own directory, as
  the ``postgres`` user when the tests run as root (PostgreSQL refuses to run as root).
  initdb runs once per session; each server starts from a copy of that fresh cluster
  (``cp -a``: 0.1 s, against 2-3 s for initdb on a busy machine).
  Tests that restart PostgreSQL always use one: the machine's server is never restarted.

Without PostgreSQL binaries and without a server the tests skip -- except under CI=true,
where they fail.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import queue
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import free_port

MACHINE_DSN = os.environ.get("EDGEGW_TEST_PG_DSN",
                             "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _unavailable(why: str) -> None:
    if _in_ci():
        pytest.fail(f"PostgreSQL needed under CI=true: {why}")
    pytest.skip(f"no PostgreSQL: {why}")


def pg_bindir() -> Path | None:
    for path in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(path, "pg_ctl")):
            return Path(path)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def answers(dsn: str, timeout: int = 3) -> bool:
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=timeout) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


#: a fresh cluster made by initdb once per session (copied by each PrivatePg)
_template: Path | None = None


def with_db(dsn: str, dbname: str) -> str:
    import psycopg.conninfo

    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]


class PrivatePg:
    """A PostgreSQL server of the test's own: ``start``, ``stop``, ``restart``, ``dsn``."""

    def __init__(self) -> None:
        bindir = pg_bindir()
        if bindir is None:
            _unavailable("no pg_ctl (apt-get install postgresql)")
        self.bindir = bindir
        self.port = free_port()
        # not under pytest's tmp_path: that is root's 0700 directory, closed to postgres
        self.dir = Path(tempfile.mkdtemp(prefix="edgegw-pg-", dir="/var/tmp"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                _unavailable("running as root and there is no postgres user to run it as")
            self.user = "postgres"
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        subprocess.run(["cp", "-a", str(self._template()), str(self.data)], check=True,
                       timeout=120)
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _template(self) -> Path:
        global _template
        if _template is None:
            base = Path(tempfile.mkdtemp(prefix="edgegw-pg-template-", dir="/var/tmp"))
            atexit.register(shutil.rmtree, base, ignore_errors=True)
            if self.user is not None:
                entry = pwd.getpwnam(self.user)
                os.chown(base, entry.pw_uid, entry.pw_gid)
            self._run("initdb", "-D", str(base / "data"), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8")
            _template = base / "data"
        return _template

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / tool), *args]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=check)

    def start(self) -> None:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                f"-c unix_socket_directories={self.dir} -c max_connections=100 "
                "-c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                  check=False)

    def restart(self, pause_s: float = 0.0) -> None:
        self.stop()
        time.sleep(pause_s)
        self.start()

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def private_pg() -> Iterator[PrivatePg]:
    server = PrivatePg()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A DSN (database ``postgres``) of a server the tests may create databases on."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed (pip install -e '.[test]')")
    if answers(MACHINE_DSN):
        yield MACHINE_DSN
        return
    with private_pg() as server:
        yield server.dsn


def create_database(server_dsn: str) -> tuple[str, str]:
    import psycopg

    name = f"edgegw_t_{secrets.token_hex(6)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return name, with_db(server_dsn, name)


def drop_database(server_dsn: str, name: str) -> None:
    import psycopg

    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class DatabasePool:
    """Fresh databases made ahead and dropped behind by a worker thread, off the tests'
    critical path: ``CREATE DATABASE`` and ``DROP DATABASE ... WITH (FORCE)`` took 0.3-1.5 s
    each on a busy machine, twice per test, while the tests before and after mostly wait
    on their own processes.  A database is made fresh for one test and never given out
    again; ``take`` makes one on the spot when none is ready."""

    def __init__(self, server_dsn: str, spare: int = 1) -> None:
        self.server_dsn = server_dsn
        self.spare = spare
        self._ready: queue.Queue[tuple[str, str]] = queue.Queue()
        self._jobs: queue.Queue[str | None] = queue.Queue()  # "" makes one, a name drops it
        self._worker = threading.Thread(target=self._work, name="pg-pool", daemon=True)
        self._worker.start()
        for _ in range(spare):
            self._jobs.put("")

    def take(self) -> tuple[str, str]:
        """A fresh database: ``(name, dsn)``."""
        try:
            item = self._ready.get_nowait()
        except queue.Empty:
            item = create_database(self.server_dsn)
        self._jobs.put("")  # the next test's
        return item

    def give_back(self, name: str) -> None:
        self._jobs.put(name)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if job:
                    drop_database(self.server_dsn, job)
                elif self._ready.qsize() < self.spare:
                    self._ready.put(create_database(self.server_dsn))
            except Exception:  # a server gone (a private one, stopped): nothing to keep
                pass

    def close(self) -> None:
        """Drop what is pending and the spare databases (at the end of the session)."""
        while True:
            try:
                self._jobs.put(self._ready.get_nowait()[0])
            except queue.Empty:
                break
        self._jobs.put(None)
        self._worker.join(120)


_pools: dict[str, DatabasePool] = {}


def database_pool(server_dsn: str) -> DatabasePool:
    pool = _pools.get(server_dsn)
    if pool is None:
        pool = _pools[server_dsn] = DatabasePool(server_dsn)
        atexit.register(pool.close)
    return pool


@pytest.fixture
def pg_dsn(pg_server: str) -> Iterator[str]:
    """A fresh, empty database for one test (dropped after it, in the background)."""
    pool = database_pool(pg_server)
    name, dsn = pool.take()
    try:
        yield dsn
    finally:
        pool.give_back(name)
