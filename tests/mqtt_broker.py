"""A real Mosquitto for the tests, started by the tests with the "nothing lost" settings.

- ``mqtt_broker``: a broker shared by the test session (tests using it must not restart it
  and must use their own topics and client ids): one started for the session on a free
  port with the settings of docs/mqtt.md (no queue limit, no in-flight limit: the source
  acknowledges only what is durable).  ``EDGEGW_TEST_BROKER=HOST:PORT`` names another
  broker instead (``127.0.0.1:1883``: the machine's own; its settings are then its own).
- ``start_broker``: a factory for a broker of the test's own, on a free port, with a
  generated config in ``tmp_path``.  Tests that restart the broker, need the "nothing
  lost" settings (persistence, no queue limit) or a password file always use it.

With neither a mosquitto binary nor a running broker the tests skip with one line of
reason, except under CI (``CI=true``), where a missing broker is a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ports import free_port

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def no_broker(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a broker is required)")
    pytest.skip(reason)


@dataclasses.dataclass
class Broker:
    """A mosquitto process we own.  ``restart()`` keeps its port, config and persistence."""

    host: str
    port: int
    directory: Path
    config: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> None:
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, cwd=self.directory)
        deadline = time.monotonic() + 10
        while not port_open(self.host, self.port):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited at start: {err.strip()} "
                                   f"{self.log_text()[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not listen within 10 s")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file on the way out."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


def write_config(directory: Path, port: int, *, persistence: bool = True,
                 max_queued_messages: int = 0, max_inflight_messages: int = 0,
                 password_file: Path | None = None, extra: str = "") -> Path:
    """A broker config.  The defaults are the "nothing lost" ones (docs/mqtt.md):
    persistence on, no limit on the per-client queue (mosquitto's default of 1000 drops
    QoS 1 messages for a slow or absent subscriber), no limit on unacknowledged messages
    in flight to a client (the default of 20 would let the source, which acknowledges only
    what is durable, take 20 readings per window interval)."""
    lines = [
        # as root, mosquitto would switch to the "mosquitto" user, who cannot read tmp_path
        f"user {getpass.getuser()}",
        f"listener {port} 127.0.0.1",
        f"allow_anonymous {'false' if password_file else 'true'}",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {directory}/",
        f"max_queued_messages {max_queued_messages}",
        f"max_inflight_messages {max_inflight_messages}",
        f"log_dest file {directory}/mosquitto.log",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
    ]
    if password_file is not None:
        lines.append(f"password_file {password_file}")
    path = directory / "mosquitto.conf"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def make_password_file(directory: Path, users: dict[str, str]) -> Path:
    if shutil.which("mosquitto_passwd") is None:
        no_broker("no mosquitto_passwd to make a password file")
    path = directory / "passwd"
    path.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
    subprocess.run(["mosquitto_passwd", "-U", str(path)], check=True,
                   capture_output=True)
    return path


StartBroker = Callable[..., Broker]


@contextlib.contextmanager
def broker_factory(base: Path) -> Iterator[StartBroker]:
    started: list[Broker] = []

    def start(**options: object) -> Broker:
        if MOSQUITTO is None:
            no_broker("no mosquitto binary to start a broker of the test's own")
        directory = base / f"broker{len(started)}"
        directory.mkdir()
        port = free_port()
        password_users = options.pop("users", None)
        pw = make_password_file(directory, password_users) if password_users else None  # type: ignore[arg-type]
        config = write_config(directory, port, password_file=pw, **options)  # type: ignore[arg-type]
        broker = Broker("127.0.0.1", port, directory, config)
        broker.start()
        started.append(broker)
        return broker

    try:
        yield start
    finally:
        for broker in started:
            broker.stop()


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[StartBroker]:
    with broker_factory(tmp_path) as start:
        yield start


@dataclasses.dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerAddress]:
    """One broker of the session's own; ``EDGEGW_TEST_BROKER=HOST:PORT`` names another."""
    choice = os.environ.get("EDGEGW_TEST_BROKER", "")
    if choice and choice != "own":
        host, _, port = choice.rpartition(":")
        yield BrokerAddress(host or "127.0.0.1", int(port))
        return
    if MOSQUITTO is None:
        if port_open("127.0.0.1", 1883):  # no binary to start one: the machine's own
            yield BrokerAddress("127.0.0.1", 1883)
            return
        no_broker("no mosquitto binary to start a broker and none on 127.0.0.1:1883")
    with broker_factory(tmp_path_factory.mktemp("mqtt")) as start:
        broker = start()
        yield BrokerAddress(broker.host, broker.port)


class AckSwallowingProxy:
    """A TCP proxy between a client and the broker.  ``swallow()``: from then on the bytes
    the client sends vanish (so the broker never reads its PUBACKs) while everything the
    broker sends still reaches the client — acknowledgements lost on the way, on purpose.
    ``restore()``: bytes pass both ways again.  ``cut()`` closes every connection.  A side
    that closes closes both."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.listener = socket.create_server((host, 0))
        self.host = host
        self.port = self.listener.getsockname()[1]
        self.swallowing = False
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self.swallowing:
                    continue
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def swallow(self) -> None:
        self.swallowing = True

    def cut(self) -> None:
        """Close every connection now (new ones are accepted): a network failure."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def restore(self) -> None:
        self.swallowing = False

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.close()
