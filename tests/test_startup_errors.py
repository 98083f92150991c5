"""A service that cannot start says why in one line and exits with status 3.

Each case runs the real CLI (``python -m edgegw hub|gateway``) against a valid config on a
machine where it cannot run: the port is taken, the address is not local or unknown, a
directory is a file or cannot be written.  Before, each was a 60-85-line exception-group
traceback and status 1 (issue 10, finding 5).  An invalid config is status 2 (test_config).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import free_port

REPO = Path(__file__).resolve().parents[1]


def edgegw(*args: str, drop_root: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the CLI; ``drop_root``: without root's power to write anywhere, as a service
    user would run it (file permissions then apply to this test's root user too)."""
    cmd = [sys.executable, "-m", "edgegw", *args]
    if drop_root and os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def assert_cannot_start(out: subprocess.CompletedProcess[str], reason: str) -> None:
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [f"edgegw: cannot start: {reason}"]
    assert out.stdout == ""  # no banner: it never was ready
    assert out.returncode == 3


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: every directory is writable")
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


def hub(tmp_path: Path, *sets: str, drop_root: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["hub", "--set", "hub.port=0", "--set", f'hub.data_dir="{tmp_path / "hub"}"']
    for s in sets:
        args += ["--set", s]
    return edgegw(*args, drop_root=drop_root)


def gateway(tmp_path: Path, extra: str = "", *sets: str, drop_root: bool = False,
            verbose: int = 0) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
id = "ate-01"
token = "t"
hub_url = "ws://127.0.0.1:{free_port()}/ws/gateway"
state_dir = "{tmp_path / 'gw'}"
{extra}
""")
    args = ["-v"] * verbose + ["gateway", "--config", str(cfg)]
    for s in sets:
        args += ["--set", s]
    return edgegw(*args, drop_root=drop_root)


def test_hub_port_already_in_use(tmp_path: Path, taken_port: int) -> None:
    assert_cannot_start(hub(tmp_path, f"hub.port={taken_port}"),
                        f"hub.listen/hub.port: cannot listen on 127.0.0.1:{taken_port}: "
                        "address already in use")


def test_hub_listen_address_that_is_not_an_address_is_a_config_error(tmp_path: Path) -> None:
    out = hub(tmp_path, 'hub.listen="not an ip"')
    assert (out.returncode, out.stderr.splitlines()) == (2, [
        "edgegw: config error: <defaults>: hub.listen: expected an IP address or a host "
        "name, got string 'not an ip'"])


def test_hub_listen_name_that_does_not_resolve(tmp_path: Path) -> None:
    out = hub(tmp_path, 'hub.listen="no-such-host.invalid"')
    assert out.stderr.startswith("edgegw: cannot start: hub.listen: cannot resolve "
                                 "'no-such-host.invalid': ")
    assert_cannot_start(out, out.stderr.strip().removeprefix("edgegw: cannot start: "))


def test_hub_listen_address_that_is_not_on_this_machine(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never a local address (open on purpose: a non-loopback
    # address without [auth] would be refused before the bind, test_auth.py)
    assert_cannot_start(hub(tmp_path, 'hub.listen="192.0.2.1"', 'auth.mode="none"'),
                        "hub.listen/hub.port: cannot listen on 192.0.2.1:0: "
                        "cannot assign requested address")


def test_hub_data_dir_that_is_a_file(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    data.write_text("not a directory")
    assert_cannot_start(hub(tmp_path), f"hub.data_dir: '{data}' exists and is not a directory")


def test_hub_data_dir_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "hub"
    assert_cannot_start(hub(tmp_path, f'hub.data_dir="{bad}"'),
                        f"hub.data_dir: cannot create directory '{bad}': not a directory")


def test_hub_data_dir_not_writable(tmp_path: Path, read_only_dir: Path) -> None:
    assert_cannot_start(hub(tmp_path, f'hub.data_dir="{read_only_dir}"', drop_root=True),
                        f"hub.data_dir: cannot write in '{read_only_dir}': permission denied")


def test_gateway_state_dir_not_writable(tmp_path: Path, read_only_dir: Path) -> None:
    out = gateway(tmp_path, "", f'gateway.state_dir="{read_only_dir / "gw"}"', drop_root=True)
    assert_cannot_start(out, f"gateway.state_dir: cannot create directory "
                             f"'{read_only_dir / 'gw'}': permission denied")


def test_gateway_spool_dir_not_writable(tmp_path: Path, read_only_dir: Path) -> None:
    out = gateway(tmp_path, f'[spool]\ndir = "{read_only_dir}"', drop_root=True)
    assert_cannot_start(out, f"spool.dir: cannot write in '{read_only_dir}': permission denied")


def test_gateway_default_spool_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "gw").mkdir()
    (tmp_path / "gw" / "spool").write_text("x")
    out = gateway(tmp_path, "[spool]")
    assert_cannot_start(out, f"gateway.state_dir (its spool/): '{tmp_path / 'gw' / 'spool'}' "
                             "exists and is not a directory")


def test_gateway_status_port_already_in_use(tmp_path: Path, taken_port: int) -> None:
    # the uplink is already retrying its (absent) hub when the status port fails: its log
    # lines are held back, the one line is the reason
    out = gateway(tmp_path, "", f"gateway.status_port={taken_port}")
    assert_cannot_start(out, f"gateway.status_listen/status_port: cannot listen on "
                             f"127.0.0.1:{taken_port}: address already in use")


def test_gateway_unreadable_ca_file(tmp_path: Path) -> None:
    out = gateway(tmp_path, "[uplink]\nca_file = \"/nonexistent/ca.pem\"",
                  'gateway.hub_url="wss://127.0.0.1:9/ws/gateway"')
    assert_cannot_start(out, "uplink.ca_file: cannot read '/nonexistent/ca.pem': "
                             "No such file or directory")


def test_with_vv_the_failed_start_shows_its_log_lines_and_traceback(
        tmp_path: Path, taken_port: int) -> None:
    out = gateway(tmp_path, "", f"gateway.status_port={taken_port}", verbose=2)
    assert out.returncode == 3 and "Traceback" in out.stderr
    assert out.stderr.splitlines()[-1] == (
        f"edgegw: cannot start: gateway.status_listen/status_port: cannot listen on "
        f"127.0.0.1:{taken_port}: address already in use")


@pytest.mark.parametrize("name", ["hub.sqlite3", "history.sqlite3"])
def test_a_damaged_database_is_named_with_what_to_do_and_never_started_afresh(
        tmp_path: Path, name: str) -> None:
    """A hub's SQLite file damaged (a failing disk, a copy taken mid-write): one line naming
    the file and pointing to docs/operations.md; the file is kept as it is (started afresh
    the hub would forget what it applied).  Before: "DatabaseError: database disk image is
    malformed", no file named."""
    data_dir = tmp_path / "hub"
    data_dir.mkdir()
    damaged = data_dir / name
    damaged.write_bytes(b"SQLite format 3\0" + b"\xde\xad" * 4096)
    before = damaged.read_bytes()
    out = hub(tmp_path)
    assert_cannot_start(out, f"hub.data_dir: {str(damaged)!r} is damaged (file is not a "
                             "database): stop, keep the file, and restore it from a backup "
                             "or recover it (docs/operations.md, \"A damaged database\")")
    assert damaged.read_bytes() == before
