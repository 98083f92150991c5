"""The layer map holds at import time: every module imports on its own; and the tests and
the ATDF plugin use only the public face (docs/plugins.md, "The public face").

The first part:

The import-linter contracts in pyproject.toml (run by scripts/test.sh) check the static
import graph; this checks what the graph cannot see: a module that imports only because
something else happened to be imported first (a cycle hidden by ``edgegw/__init__``
importing the gateway, as ``edgegw.spool`` once did).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import edgegw

PACKAGE = Path(edgegw.__file__).parent

# Each module is imported in a process forked from one that has imported only the
# third-party libraries (so the check takes seconds, not minutes): every edgegw module
# starts from an empty slate, as in a fresh interpreter; one child per core runs at a
# time (CI's second core is otherwise idle during this test).  Which third-party modules the
# package uses is learnt by a scout child importing every module once; the parent then
# imports those (not the standard library's, not edgegw's), so no child pays for jwt,
# cryptography or psycopg again (that was most of the ~20 s this test took).
CHILD = r"""
import importlib, os, sys, traceback
import cbor2, h11, paho.mqtt.client, trio, trio_websocket, wsproto  # noqa: F401

before = set(sys.modules)
r, w = os.pipe()
scout = os.fork()
if scout == 0:
    os.close(r)
    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
        except BaseException:
            pass  # reported by the check itself below
    used = [m for m in list(sys.modules) if m not in before
            and m.split(".")[0].lstrip("_") not in sys.stdlib_module_names
            and not m.startswith("edgegw")]
    with os.fdopen(w, "w") as out:
        out.write("\n".join(used))
    os._exit(0)
os.close(w)
with os.fdopen(r) as found:
    third_party = found.read().split()
os.waitpid(scout, 0)
for name in third_party:
    try:
        importlib.import_module(name)
    except BaseException:
        pass  # an alias in sys.modules, not importable by its name: the child imports it

import edgegw
early = sorted(m for m in sys.modules if m.startswith("edgegw."))
if early:
    print(f"import edgegw pre-imports {early}")
    sys.exit(1)
failed = 0
running = 0
for name in sys.argv[1:]:
    if running == (os.cpu_count() or 1):  # a child per core at a time
        _, status = os.wait()
        running -= 1
        failed += status != 0
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:  # one write: children running side by side do not interleave
            os.write(1, f"--- import {name} fails on its own:\n{traceback.format_exc()}".encode())
            os._exit(1)
        os._exit(0)
    running += 1
for _ in range(running):
    _, status = os.wait()
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


# --- the public face ---------------------------------------------------------------------


def is_public(module: str) -> bool:
    """``edgegw`` and its top-level modules and packages are public; below them, a module
    is public when its package names it in ``__all__``."""
    parts = module.split(".")
    if len(parts) <= 2:
        return not parts[-1].startswith("_")
    parent = ".".join(parts[:-1])
    return is_public(parent) and parts[-1] in getattr(importlib.import_module(parent),
                                                      "__all__", ())


def through_the_face(module: str, name: str) -> bool:
    if not is_public(module):
        return False
    if name in getattr(importlib.import_module(module), "__all__", ()):
        return True
    try:  # a submodule named in its package's __all__
        found = importlib.util.find_spec(f"{module}.{name}") is not None
    except ModuleNotFoundError:  # ``module`` is a module, not a package: no submodules
        return False
    return found and is_public(f"{module}.{name}")


def face_violations(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                    node.module == "edgegw" or node.module.startswith("edgegw.")):
                found += [f"{path.name}:{node.lineno}: from {node.module} import {a.name}"
                          for a in node.names if not through_the_face(node.module, a.name)]
            elif isinstance(node, ast.Import):
                found += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names
                          if a.name.startswith("edgegw.") and not is_public(a.name)]
    return found


def test_the_tests_and_the_example_plugins_import_only_the_public_face() -> None:
    repo = PACKAGE.parent
    paths = sorted([*(repo / "tests").glob("*.py"), *(repo / "plugins").rglob("*.py")])
    assert any(p.parent.name == "edgegw_wat" for p in paths)
    assert face_violations(paths) == []


def test_a_deep_import_is_not_the_public_face(tmp_path: Path) -> None:
    deep = tmp_path / "deep.py"
    deep.write_text("from edgegw.spool.segments import list_segments\n"
                    "from edgegw.gateway.service import Gateway\n"
                    "from edgegw.spool import list_segments, format\n"
                    "from edgegw.hub.topics import wafer\n")
    assert face_violations([deep]) == [
        "deep.py:1: from edgegw.spool.segments import list_segments",
        "deep.py:2: from edgegw.gateway.service import Gateway",
    ]
