#!/usr/bin/env bash
# Sets up a fresh virtualenv (.venv) and runs the whole test suite (lint included).
#
# System packages: the MQTT tests need Mosquitto (they start their own broker on a free
# port; a system broker is never touched) and the dashboard test needs Chromium (it drives
# a real browser over its DevTools protocol); the packaging tests lint the shell scripts
# (with shellcheck); the hub cluster tests start a private redis-server and put their nodes behind
# HAProxy (tests/cluster_haproxy.py), and one puts PgBouncer before PostgreSQL; a packaging test
# cross-builds the Windows wheel with MinGW-w64.  When they are missing, this script says so and,
# run as root on a Debian/Ubuntu machine, installs them with apt-get after saying what and
# why; EDGEGW_NO_APT=1 skips that, and the tests that need them then skip.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
why=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  need_pkgs+=(mosquitto)
  why+=("  mosquitto: the MQTT tests start their own broker on a free port")
fi
if ! command -v chromium >/dev/null 2>&1; then
  need_pkgs+=(chromium)
  why+=("  chromium: the dashboard test drives a real browser (headless)")
fi
if ! command -v shellcheck >/dev/null 2>&1; then
  need_pkgs+=(shellcheck)
  why+=("  shellcheck: the packaging tests lint the install and service scripts")
fi
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  need_pkgs+=(haproxy)
  why+=("  haproxy: the hub cluster tests put their nodes behind a real TCP load balancer")
fi
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  need_pkgs+=(pgbouncer)
  why+=("  pgbouncer: a cluster test puts a transaction-mode pooler before PostgreSQL")
fi
if ! command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1; then
  need_pkgs+=(gcc-mingw-w64-x86-64)
  why+=("  gcc-mingw-w64-x86-64: a packaging test builds the Windows wheel's compiled decoder")
fi
if ! command -v redis-server >/dev/null 2>&1; then
  need_pkgs+=(redis-server)
  why+=("  redis-server: the cluster tests start their own private Redis on a free port")
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
      && [ "${EDGEGW_NO_APT:-0}" != 1 ]; then
    echo "scripts/test.sh: installing system packages with apt-get (EDGEGW_NO_APT=1 skips" \
      "this; the tests needing them then skip):"
    printf '%s\n' "${why[@]}"
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${need_pkgs[@]}") >/dev/null; then
      echo "scripts/test.sh: installed ${need_pkgs[*]}"
    else
      echo "scripts/test.sh: could not install ${need_pkgs[*]}; the tests needing them skip"
    fi
  else
    echo "scripts/test.sh: missing system packages; the tests needing them skip (as root on" \
      "Debian/Ubuntu this script installs them):"
    printf '%s\n' "${why[@]}"
  fi
fi

PY=${PYTHON:-python3}
# EDGEGW_VENV: another virtualenv, for the suite on another Python beside .venv's
# (PYTHON=python3.13 EDGEGW_VENV=.venv-3.13 bash scripts/test.sh; README, "Longer runs")
venv=${EDGEGW_VENV:-.venv}
echo "scripts/test.sh: installing edgegw, its plugins and test tools into $venv"
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
# shellcheck disable=SC2046  # one -e argument per plugin directory: split on purpose
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]" \
  $(for p in plugins/*/; do [ -f "$p/pyproject.toml" ] && printf -- '-e %s ' "$p"; done)
"$venv/bin/ruff" check .
# The layer map (README, "Architecture"): the import-linter contracts in pyproject.toml.
"$venv/bin/lint-imports" --no-cache
# The type hints ([tool.mypy] in pyproject.toml: the package, the plugins and the benches).
"$venv/bin/mypy"
# Long measurements (-m slow: 60 s outages timed against a 2 s goal) and soaks are
# documented commands outside the suite (README, "Longer runs"): on a busy CI machine a
# timing figure is a measurement, not a pass/fail.
# Three workers (pytest-xdist; EDGEGW_TEST_WORKERS=0 runs in one process): the suite mostly
# waits on servers, subprocesses and a browser, so three overlap well even on two cores --
# beside two CPU burners on a 2-core machine the suite took 658-706 s with three, 796-941 s
# with two -- and worksteal hands the long fault and cluster tests to whichever worker is
# free.  Every test is isolated per worker (free ports, its own tmp_path, brokers, Redis
# and databases).
# Its own base temporary directory: pytest's default (/tmp/pytest-of-$USER/pytest-N) keeps
# only the last three runs' and removes older ones as each run starts, so a run beside
# other pytest runs of the same user (another checkout's suite, a developer's test)
# had its tmp_path directories removed under it: hundreds of FileNotFoundError errors
# in one CI run beside five others.  Removed when the run passes, kept when it fails.
basetemp=$(mktemp -d "${TMPDIR:-/tmp}/edgegw-tests.XXXXXX")
status=0
"$venv/bin/python" -m pytest -q -m "not slow" -n "${EDGEGW_TEST_WORKERS:-3}" \
  --dist worksteal --basetemp "$basetemp" "$@" || status=$?
if [ "$status" = 0 ]; then
  rm -rf "$basetemp"
else
  echo "scripts/test.sh: the tests' temporary files are kept in $basetemp"
fi
exit "$status"
