#!/usr/bin/env bash
# The fault-injection suite, repeated under CPU pressure: the exactly-once promise must hold
# on a busy machine, every run.  Usage: bash scripts/fault-soak.sh [RUNS] [BURNERS]
# (default 10 runs beside 2 busy processes).  Needs the test venv (bash scripts/test.sh
# makes it).  Prints one line per run and a total; exits non-zero if any run lost or
# duplicated a record or failed a test.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
runs=${1:-10}
burners=${2:-2}
report=$(mktemp -t edgegw-fault-soak.XXXXXX.jsonl)
# its own pytest base directory (scripts/test.sh says why), emptied by pytest each run
basetemp=$(mktemp -d -t edgegw-fault-soak.XXXXXX)
pids=()
for _ in $(seq "$burners"); do sh -c 'while :; do :; done' & pids+=($!); done
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$report" "$basetemp"' EXIT
failed=0
for run in $(seq "$runs"); do
  : > "$report"
  start=$(date +%s)
  if EDGEGW_FAULT_REPORT=$report EDGEGW_FAULT_SEEDS=1,2,3 .venv/bin/python -m pytest -q -p no:cacheprovider \
      --basetemp "$basetemp" -m "not slow" tests/test_faults.py tests/test_exactly_once.py tests/test_mqtt_crash.py \
      tests/test_pause.py tests/test_cluster_pause.py tests/test_gateway_reload.py \
      tests/test_dead_letter_requeue.py tests/test_dead_letter_bound.py \
      >/tmp/edgegw-fault-soak-run.log 2>&1
  then status=passed; else status=FAILED; failed=1; cp /tmp/edgegw-fault-soak-run.log "fault-soak-run-$run.log"; fi
  .venv/bin/python - "$report" "$run" "$status" "$(( $(date +%s) - start ))" <<'PY' || failed=1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
lost = sum(r["lost"] for r in rows)
dup = sum(r["duplicated"] + r["duplicate_rids"] for r in rows)
recs = sum(r["records"] for r in rows)
print(f"run {sys.argv[2]}: {sys.argv[3]} in {sys.argv[4]} s; {len(rows)} whole-system checks, "
      f"{recs} records compared, {lost} lost, {dup} duplicated")
sys.exit(1 if lost or dup else 0)
PY
done
[ $failed -eq 0 ] && echo "all $runs runs: 0 lost, 0 duplicated" || echo "FAILURES (see fault-soak-run-*.log)"
exit $failed
