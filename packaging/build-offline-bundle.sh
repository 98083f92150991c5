#!/usr/bin/env bash
# Build an offline bundle: every wheel edgegw needs, the example configs, the systemd units,
# the Windows (WinSW) service configs and an install script, in one tarball, for test floors
# without internet.  Wheels are per platform: build on a connected machine of the same OS and
# Python as the target (on Windows under Git Bash, with PYTHON=python).
#   bash packaging/build-offline-bundle.sh  ->  dist/edgegw-offline-<version>.tar.gz
# Environment: PYTHON (default python3, must have pip), DIST (default dist).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
dist=${DIST:-dist}
version=$("$python" -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')
name=edgegw-offline-$version
out=$dist/$name
rm -rf "$out" && mkdir -p "$out/wheels" "$out/docs"
"$python" -m pip wheel -q -w "$out/wheels" . plugins/*/
# the Python the wheels are for (cbor2's is compiled: one minor version, one platform):
# install.sh compares its interpreter with it, instead of pip's "no matching distribution"
"$python" -c 'import sys, sysconfig; print(sys.implementation.name, "%d.%d" % sys.version_info[:2], sysconfig.get_platform())' > "$out/python-version"
cp -r conf "$out/"
cp -r packaging/systemd packaging/windows "$out/"
cp docs/operations.md "$out/docs/"
cat > "$out/install.sh" <<'INSTALL'
#!/usr/bin/env bash
# Installs edgegw from the wheels beside this script, without any network access.  As root:
#   ./install.sh      then  systemctl enable --now edgegw-gateway   (or edgegw-hub)
# Environment: PREFIX (/opt/edgegw), CONFDIR (/etc/edgegw), UNITDIR (/etc/systemd/system),
# PYTHON (python3).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prefix=${PREFIX:-/opt/edgegw}
confdir=${CONFDIR:-/etc/edgegw}
unitdir=${UNITDIR:-/etc/systemd/system}
python=${PYTHON:-python3}

# the wheels are for one Python and platform (python-version): another fails in pip with
# "No matching distribution found for cbor2", which names neither
built_for=$(cat "$here/python-version")
target=$("$python" -c 'import sys, sysconfig; print(sys.implementation.name, "%d.%d" % sys.version_info[:2], sysconfig.get_platform())') || {
  echo "install.sh: cannot run $python (PYTHON=)" >&2; exit 2; }
if [ "$target" != "$built_for" ]; then
  echo "install.sh: this bundle's wheels are for $built_for; $python is $target." \
    "Run it with PYTHON= naming a Python $built_for, or build the bundle with this one" \
    "(PYTHON=$python bash packaging/build-offline-bundle.sh, on a connected machine)" >&2
  exit 2
fi
"$python" -m venv "$prefix/venv"
# the units hide /home and /root (ProtectHome=yes): an interpreter there (pyenv, a user's
# build) would fail every start with status 203/EXEC
case $(realpath "$prefix/venv/bin/python3") in
  /home/*|/root/*|/run/user/*)
    echo "install.sh: $(realpath "$prefix/venv/bin/python3") is in a home directory, which" \
      "the services cannot see; use a system Python, e.g. PYTHON=/usr/bin/python3" >&2
    exit 2;;
esac
"$prefix/venv/bin/pip" install -q --no-index --find-links "$here/wheels" edgegw edgegw-atdf \
  edgegw-wat

# The services run as transient users (DynamicUser=yes) in the static group edgegw, the only
# one besides root that may read the configs: they hold tokens and key paths.  Only root may
# change them: a config another user owns, or the group may write, lets them change a token
# or a key path, so a kept config is made root:edgegw 0640 like a new one.
getent group edgegw >/dev/null || groupadd --system edgegw
install -d -m 0750 -o root -g edgegw "$confdir"
for f in gateway.toml hub.toml; do
  dest=$confdir/$f
  if [ -L "$dest" ]; then
    # not followed: a link may have been planted (to /etc/shadow) while the directory was
    # writable by others, and chown would then hand its target to the group
    echo "kept $dest: a symbolic link, left as it is; make its target root:edgegw 0640"
  elif [ -f "$dest" ]; then
    chown root:edgegw "$dest" && chmod 0640 "$dest"
    echo "kept $dest, made root:edgegw 0640 (only root may change it)"
  else
    install -m 0640 -o root -g edgegw "$here/conf/$f" "$dest"
  fi
done

# The units, pointed at this prefix and config directory.
mkdir -p "$unitdir"
for unit in "$here"/systemd/*.service; do
  sed -e "s#/opt/edgegw/venv/#$prefix/venv/#g" -e "s#/etc/edgegw/#$confdir/#g" \
    "$unit" > "$unitdir/$(basename "$unit")"
done
if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

"$prefix/venv/bin/edgegw" --help >/dev/null
echo "installed in $prefix, configs in $confdir, units in $unitdir"
echo "next: edit $confdir/<gateway|hub>.toml, then systemctl enable --now edgegw-<gateway|hub>"
INSTALL
chmod +x "$out/install.sh"
tar -C "$dist" -czf "$out.tar.gz" "$name"
echo "$out.tar.gz"
