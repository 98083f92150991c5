"""The layer map holds at import time: every module imports on its own.

The import-linter contracts in pyproject.toml (run by scripts/test.sh) check the static
import graph; this checks what the graph cannot see: a module that imports only because
something else happened to be imported first (a cycle hidden by ``edgegw/__init__``
importing the gateway, as ``edgegw.spool`` once did).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import edgegw

PACKAGE = Path(edgegw.__file__).parent

# Each module is imported in a process forked from one that has imported only the
# third-party libraries (so the check takes seconds, not minutes): every edgegw module
# starts from an empty slate, as in a fresh interpreter.
CHILD = r"""
import importlib, os, sys, traceback
import cbor2, h11, paho.mqtt.client, trio, trio_websocket, wsproto  # noqa: F401

import edgegw
early = sorted(m for m in sys.modules if m.startswith("edgegw."))
if early:
    print(f"import edgegw pre-imports {early}")
    sys.exit(1)
failed = 0
for name in sys.argv[1:]:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            print(f"--- import {name} fails on its own:")
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    failed += status != 0
sys.exit(1 if failed else 0)
"""


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue  # runs the CLI when imported
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def test_the_package_lists_the_modules_this_test_walks() -> None:
    names = module_names()
    for expected in ("edgegw.spool", "edgegw.spool.format", "edgegw.store", "edgegw.web",
                     "edgegw.gateway.service", "edgegw.hub.app"):
        assert expected in names


def test_every_module_imports_in_a_fresh_interpreter_without_edgegw_preimporting() -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, *module_names()],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
