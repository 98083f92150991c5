#!/usr/bin/env bash
# Build edgegw's Windows wheel (win_amd64, stable ABI: one wheel for every CPython >= 3.11)
# on Linux, with the compiled STDF record loop (edgegw/stdf/_accel.c) in it:
#   - the Python files are this tree's own wheel's (pip wheel);
#   - _accel.c is compiled by MinGW-w64 against the Python headers of PYTHON (any CPython
#     >= 3.11: under Py_LIMITED_API 3.11 they declare the same stable ABI) with
#     packaging/windows/pyconfig-mingw64.h, the win_amd64 facts those headers need;
#   - it links to python3.dll (the stable ABI's DLL) through an import library made here
#     from the Python symbols the object file uses: no Windows Python is needed to build.
# scripts/windows-check.sh installs the wheel into Windows CPython (under wine) and runs
# the equality tests there (tests/test_stdf_accel.py).
# Usage: bash packaging/build-windows-wheel.sh OUTDIR   (the last line out: the wheel's path)
# Needs: x86_64-w64-mingw32-gcc (Debian: gcc-mingw-w64-x86-64); PYTHON (default .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: build-windows-wheel.sh OUTDIR}
python=${PYTHON:-.venv/bin/python}
target=x86_64-w64-mingw32
command -v "$target-gcc" >/dev/null || {
  echo "build-windows-wheel: $target-gcc not found (apt-get install gcc-mingw-w64-x86-64)" >&2
  exit 2
}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# the public headers, with the Windows pyconfig.h in place of this platform's (Python.h
# includes "pyconfig.h" from its own directory first)
include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
mkdir "$tmp/include"
cp -r "$include/." "$tmp/include/"
cp packaging/windows/pyconfig-mingw64.h "$tmp/include/pyconfig.h"
"$target-gcc" -O2 -Wall -Wno-unused-parameter -Werror -DPy_LIMITED_API=0x030B0000 \
  -I "$tmp/include" -c edgegw/stdf/_accel.c -o "$tmp/_accel.o"
# python3.dll's import library: the object's Python symbols (data marked DATA)
{
  echo "LIBRARY python3.dll"
  echo "EXPORTS"
  "$target-nm" -u "$tmp/_accel.o" | awk '{print $2}' | sed 's/^__imp_//' | grep -E '^_?Py' \
    | sort -u | awk '/_Type$|^PyExc_|Struct$/ {print $1 " DATA"; next} {print}'
} > "$tmp/python3.def"
"$target-dlltool" -d "$tmp/python3.def" -l "$tmp/libpython3.a"
"$target-gcc" -shared -static-libgcc -s -o "$tmp/_accel.pyd" "$tmp/_accel.o" "$tmp/libpython3.a"

# this tree's wheel (for this platform), its extension replaced by the Windows one
"$python" -m pip wheel -q --disable-pip-version-check --no-deps -w "$tmp/linux" .
linux=("$tmp"/linux/edgegw-*.whl)
"$python" packaging/windows/repack_wheel.py "${linux[0]}" "$tmp/_accel.pyd" "$out"
