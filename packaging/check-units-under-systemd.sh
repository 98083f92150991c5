#!/usr/bin/env bash
# Runs the shipped units under a real systemd without touching the machine: boots a throwaway
# systemd (PID 1 of private PID, mount, network, IPC, UTS and cgroup namespaces) on a
# copy-on-write root whose writes land in memory, installs the offline bundle there with its
# own install.sh, starts edgegw-hub and edgegw-gateway as shipped (sandbox, DynamicUser,
# notify, watchdog) and checks them from outside.  Needs root; for developers and CI, not
# for production hosts.
#   LOT_ID=<the file's MIR lot> bash packaging/check-units-under-systemd.sh \
#     dist/edgegw-offline-<v>.tar.gz FILE.stdf
# Prints one "ok: ..." line per check and exits 0, or "FAIL: ..." and exits 1.
#
# Isolation, so that nothing the throwaway systemd starts can reach the host:
#   /  = overlay(lower: the host's /, upper: tmpfs)  -> every write is discarded
#   /tmp, /run, /dev = fresh tmpfs (a few device nodes bound in); /sys and /proc/sys read-only
#   unit search path = the bundle's two units plus empty stand-in targets, nothing else
#   (no tmpfiles, sysctl, udev or any unit of the host runs)
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "FAIL: needs root"; exit 1; }
bundle=$(realpath "$1")
stdf=$(realpath "$2")
systemd_bin=${SYSTEMD_BIN:-/lib/systemd/systemd}
work=$(mktemp -d /var/tmp/edgegw-unitcheck.XXXXXX)
cgroot=/sys/fs/cgroup
[ -f "$cgroot/cgroup.procs" ] && [ "$(stat -fc %T "$cgroot")" = cgroup2fs ] || cgroot=/sys/fs/cgroup/unified
cg=$cgroot/edgegw-unitcheck-$$
mkdir -p "$work/io/units" "$work/io/minimal" "$work/root" "$work/layers"
cp "$bundle" "$work/io/bundle.tar.gz"
cp "$stdf" "$work/io/lot.stdf"

# stand-ins for the targets and slice a service's default dependencies name
for t in sysinit basic network network-online shutdown; do
  printf '[Unit]\nDescription=stand-in %s\n' "$t" > "$work/io/minimal/$t.target"
done
printf '[Unit]\nDescription=stand-in system slice\n' > "$work/io/minimal/system.slice"
printf '[Unit]\nDescription=edgegw unit check\nWants=edgegw-hub.service edgegw-gateway.service\n' \
  > "$work/io/minimal/edgegw-check.target"

cat > "$work/inner.sh" <<'INNER'
set -euo pipefail
W=$1 R=$1/root SYSTEMD_BIN=$2 LOG_LEVEL=$3
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs "$W/layers"
mkdir "$W/layers/upper" "$W/layers/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$W/layers/upper,workdir=$W/layers/work" "$R"
mount -t proc proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys" && mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs -o ro sysfs "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=0755 tmpfs "$R/dev"
for d in null zero full random urandom tty; do
  touch "$R/dev/$d" && mount --bind "/dev/$d" "$R/dev/$d"
done
# systemd and its children log to "the kernel log": a pipe to systemd.log
touch "$R/dev/kmsg" && mount --bind "$W/io/kmsg" "$R/dev/kmsg"
mkdir "$R/dev/shm" && mount -t tmpfs -o mode=1777 tmpfs "$R/dev/shm"
mkdir "$R/dev/mqueue" && mount -t mqueue mqueue "$R/dev/mqueue"   # PrivateDevices= binds it
ln -s /proc/self/fd "$R/dev/fd"
ln -s pts/ptmx "$R/dev/ptmx"   # systemd mounts /dev/pts; PrivateDevices= needs ptmx
mount -t tmpfs -o mode=0755 tmpfs "$R/run"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
mkdir -p "$R/check" && mount --bind "$W/io" "$R/check"
ip link set lo up
cd "$R" && mkdir -p .oldroot && pivot_root . .oldroot && umount -l /.oldroot && cd /
# refuse to go on unless every write really is discarded
if [ "$(findmnt -no FSTYPE /)" != overlay ] || [ "$(findmnt -no FSTYPE /tmp)" != tmpfs ]; then
  echo "FAIL: root is not isolated"; exit 1
fi

tar -C /check -xzf /check/bundle.tar.gz
installer=$(echo /check/edgegw-offline-*/install.sh)
PYTHON=/usr/bin/python3 UNITDIR=/check/units "$installer" > /check/install.log 2>&1
# a tester directory that only root and group edgegw may read
install -d -m 0750 -g edgegw /opt/tester/stdf
install -m 0640 -g edgegw /check/lot.stdf /opt/tester/stdf/lot.stdf
cat >> /etc/edgegw/gateway.toml <<'EOF'

[[sources]]
name = "ate"
type = "stdf"
paths = ["/opt/tester/stdf"]
EOF
for u in hub gateway; do
  mkdir -p "/check/units/edgegw-$u.service.d"
  printf '[Service]\nStandardOutput=append:/check/edgegw-%s.log\nStandardError=inherit\n' "$u" \
    > "/check/units/edgegw-$u.service.d/output.conf"
done
exec env -i container=edgegw-unitcheck PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  SYSTEMD_UNIT_PATH=/check/units:/check/minimal \
  "$SYSTEMD_BIN" --system --unit=edgegw-check.target --log-target=kmsg --show-status=no \
  --log-level="$LOG_LEVEL"
INNER

# the log reader holds the pipe open for writing too, so it never sees an end of file
mkfifo "$work/io/kmsg"
( exec 3<>"$work/io/kmsg"; exec cat <&3 >> "$work/io/systemd.log" ) &
log_pid=$!
mkdir "$cg"
# --pdeathsig and --kill-child: if this script dies, unshare and then the namespace's PID 1
# (and with it everything inside) are killed too
( echo "$BASHPID" > "$cg/cgroup.procs"
  exec setpriv --pdeathsig KILL unshare --kill-child=SIGKILL --mount --pid --fork --net --uts --ipc --cgroup --propagation private \
    bash "$work/inner.sh" "$work" "$systemd_bin" "${LOG_LEVEL:-info}" ) > "$work/io/setup.log" 2>&1 &
unshare_pid=$!
init=""
stop() {
  # the namespace's PID 1 takes everything in it along
  [ -n "$init" ] || init=$(pgrep -P "$unshare_pid" || true)
  [ -n "$init" ] && kill -KILL "$init" 2>/dev/null
  wait "$unshare_pid" 2>/dev/null || true
  kill "$log_pid" 2>/dev/null || true
  find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "logs kept in $work/io"; else rm -rf "$work"; fi
}
trap stop EXIT
trap 'exit 1' INT TERM HUP

fail() { echo "FAIL: $*"; [ -n "${HOLD:-}" ] && sleep "$HOLD"; tail -n 30 "$work/io/setup.log" "$work/io/systemd.log" "$work/io/install.log" \
  "$work/io/"edgegw-*.log 2>/dev/null; exit 1; }
# the setup (install.sh included) runs first, then it becomes systemd
for _ in $(seq 1500); do
  init=$(pgrep -P "$unshare_pid" -x systemd || true)
  [ -n "$init" ] && break
  kill -0 "$unshare_pid" 2>/dev/null || fail "the throwaway systemd did not start"
  sleep 0.2
done
[ -n "$init" ] || fail "the throwaway systemd did not start"
inside() { nsenter -t "$init" -m -p -n -u -i -r -w "$@"; }
# wait for observable conditions, never a fixed time: poll up to $1 seconds
until_true() { local t=$1; shift; for _ in $(seq $((t * 5))); do "$@" && return 0; sleep 0.2; done; return 1; }

# started or given up (a unit that exits with status 2 is not restarted)
settled() { inside systemctl is-active -q "$1" || inside systemctl is-failed -q "$1"; }
for u in hub gateway; do
  until_true 120 settled "edgegw-$u" || true
  inside systemctl is-active -q "edgegw-$u" \
    || fail "edgegw-$u is not active: $(inside systemctl status --no-pager "edgegw-$u" 2>&1 | head -20)"
  echo "ok: edgegw-$u active (Type=notify: it sent READY=1)"
  pid=$(inside systemctl show -P MainPID "edgegw-$u")
  uid=$(inside ps -o uid= -p "$pid" | tr -d ' ')
  { [ "$uid" -ge 61184 ] && [ "$uid" -le 65519 ]; } || fail "edgegw-$u runs as uid $uid"
  echo "ok: edgegw-$u runs as dynamic user uid $uid"
  until_true 60 test "$(inside systemctl show -P WatchdogTimestampMonotonic "edgegw-$u")" -gt 0 \
    || fail "edgegw-$u never pinged the watchdog"
  echo "ok: edgegw-$u pings the watchdog"
done

# evaluate a Python expression over the JSON answer of a hub API path, from inside the
# namespace (its loopback is the hub's); exit status 0 when it is true
api() { inside /opt/edgegw/venv/bin/python -c 'import json,sys,urllib.request as u
a=json.load(u.urlopen("http://127.0.0.1:8765" + sys.argv[1], timeout=5))
sys.exit(0 if eval(sys.argv[2], {"a": a, "lot": sys.argv[3]}) else 1)' "$@"; }
applied='a["gateways"]["ate-01"]["records_applied"] > 0'
until_true 120 api /api/stats "$applied" "" || fail "the hub applied nothing from ate-01"
echo "ok: gateway ate-01 reached the hub over the network and its records were applied"
if [ -n "${LOT_ID:-}" ]; then
  has_lot='any(row.get("lot_id") == lot for row in a["lots"])'
  until_true 120 api /api/lots "$has_lot" "$LOT_ID" \
    || fail "lot $LOT_ID of the 0640 root:edgegw STDF file never reached the hub"
  echo "ok: the gateway read a 0640 root:edgegw STDF file (lot $LOT_ID; SupplementaryGroups=edgegw)"
fi

mode=$(inside stat -c '%a %u' /var/lib/private/edgegw-hub)
[ "${mode%% *}" = 700 ] || fail "hub state directory mode $mode"
loose=$(inside find /var/lib/private/edgegw-hub -type f -perm /077 | head -3)
[ -z "$loose" ] || fail "hub files readable by others: $loose"
echo "ok: hub state in /var/lib/private/edgegw-hub, 0700, files private (UMask=0077)"

old=$(inside systemctl show -P MainPID edgegw-hub)
inside systemctl kill -s KILL edgegw-hub
back() { local p; p=$(inside systemctl show -P MainPID edgegw-hub)
  [ "$p" != 0 ] && [ "$p" != "$old" ] && inside systemctl is-active -q edgegw-hub; }
until_true 60 back || fail "edgegw-hub was not restarted after SIGKILL"
echo "ok: edgegw-hub restarted after a crash (Restart=always)"

# systemctl reload (ExecReload: SIGHUP): the gateway restarts from its file inside the
# same process -- the service stays active under the same main PID
pid=$(inside systemctl show -P MainPID edgegw-gateway)
inside systemctl reload edgegw-gateway || fail "systemctl reload edgegw-gateway failed"
reloaded() { inside systemctl is-active -q edgegw-gateway \
  && [ "$(inside systemctl show -P MainPID edgegw-gateway)" = "$pid" ] \
  && grep -q "running with the config file read again" "$work/io/edgegw-gateway.log"; }
until_true 60 reloaded || fail "edgegw-gateway did not reload in place (main PID $pid)"
echo "ok: edgegw-gateway reloads its config in place (systemctl reload, main PID $pid kept)"

inside systemctl stop edgegw-gateway
result=$(inside systemctl show -P Result edgegw-gateway)
[ "$result" = success ] || fail "edgegw-gateway stop result: $result"
echo "ok: edgegw-gateway stops cleanly on SIGTERM (result $result)"
