#!/usr/bin/env bash
# Build an offline bundle: every wheel edgegw needs plus an install script, in one tarball,
# for test floors without internet.  Run on a connected machine of the same OS/Python:
#   bash packaging/build-offline-bundle.sh  ->  dist/edgegw-offline-<version>.tar.gz
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(python3 -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')
out=dist/edgegw-offline-$version
rm -rf "$out" && mkdir -p "$out/wheels"
python3 -m pip wheel -q -w "$out/wheels" . plugins/*/
cp -r conf packaging/systemd "$out/"
cat > "$out/install.sh" <<'INSTALL'
#!/usr/bin/env bash
# Installs edgegw from the wheels beside this script, without any network access.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prefix=${PREFIX:-/opt/edgegw}
python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install -q --no-index --find-links "$here/wheels" edgegw edgegw-atdf
mkdir -p /etc/edgegw
for f in gateway.toml hub.toml; do [ -f /etc/edgegw/$f ] || cp "$here/conf/$f" /etc/edgegw/; done
echo "installed in $prefix; service units are in $here/systemd"
"$prefix/venv/bin/edgegw" --help >/dev/null && echo ok
INSTALL
chmod +x "$out/install.sh"
tar -C dist -czf "$out.tar.gz" "$(basename "$out")"
echo "$out.tar.gz"
