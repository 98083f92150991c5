"""The shipped service configurations: systemd units, WinSW configs, the offline bundle.

What docs/operations.md ("Running as a service") promises: each systemd unit is rated
<= 2.5 by ``systemd-analyze security`` and still gives its service what it needs (notify,
watchdog, network, its state directory, its config); each Windows config runs a real
subcommand under a virtual service account; the offline bundle carries all of them; and,
where this machine can boot a throwaway systemd, both units run as shipped.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from shared_data import METIS, stdf_path

from edgegw.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
UNITS = sorted((PACKAGING / "systemd").glob("*.service"))
WINSW = sorted((PACKAGING / "windows").glob("*.xml"))
MAX_EXPOSURE = 2.5
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
VENV_EDGEGW = Path(sys.executable).parent / "edgegw"

# ---- helpers ----------------------------------------------------------------------------


def service_options(unit: Path) -> dict[str, list[str]]:
    """The [Service] section's settings, every value of repeatable keys in order."""
    options: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{unit.name}: line continuations are not used"
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        if section == "[Service]":
            options.setdefault(key, []).append(value)
    return options


def option(unit: Path, key: str) -> str:
    values = service_options(unit).get(key)
    assert values, f"{unit.name}: no {key}="
    return values[-1]


def in_venv(unit: Path, tmp_path: Path) -> Path:
    """A copy of ``unit`` whose ExecStart runs this test's venv, which really exists."""
    assert VENV_EDGEGW.exists(), f"{VENV_EDGEGW} missing: is edgegw installed in this venv?"
    text = unit.read_text()
    binary = option(unit, "ExecStart").split()[0]
    copy = tmp_path / unit.name
    copy.write_text(text.replace(f"ExecStart={binary} ", f"ExecStart={VENV_EDGEGW} "))
    assert f"ExecStart={VENV_EDGEGW} " in copy.read_text()
    return copy


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed")
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True,
                          timeout=120, check=False)


def check_command_line(argv: list[str], kind: str) -> None:
    """``argv`` (after the executable) names the real ``kind`` subcommand with --config, and
    its --set overrides are valid keys of that kind of config (checked on conf/<kind>.toml
    by ``edgegw check-config``)."""
    args = build_parser().parse_args(argv)
    assert args.command == kind
    assert args.config and args.config.endswith(f"{kind}.toml")
    overrides = [item for o in args.overrides for item in ("--set", o)]
    run = subprocess.run([sys.executable, "-m", "edgegw", "check-config",
                          str(REPO / "conf" / f"{kind}.toml"), *overrides],
                         capture_output=True, text=True, timeout=60, check=False)
    lines = run.stdout.strip().splitlines()
    assert (run.returncode, lines[-1:]) == (0, ["ok"]), run.stdout + run.stderr
    assert f"checked as a {kind} config" in lines[0]


# ---- what is shipped --------------------------------------------------------------------


def test_a_hub_and_a_gateway_each_have_a_systemd_unit_and_a_windows_config() -> None:
    names = {"edgegw-hub", "edgegw-gateway"}
    assert {u.stem for u in UNITS} == names
    assert {x.stem for x in WINSW} == names


# ---- systemd units ----------------------------------------------------------------------


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_rates_each_unit_at_most_2_5(unit: Path, tmp_path: Path) -> None:
    run = systemd_analyze("security", "--offline=yes", "--no-pager", str(in_venv(unit, tmp_path)))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout)
    assert found, run.stdout + run.stderr
    exposure = float(found.group(1))
    print(f"{unit.name}: {found.group(0)}")
    assert exposure <= MAX_EXPOSURE, run.stdout


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_finds_nothing_wrong(unit: Path, tmp_path: Path) -> None:
    # verify exits 0 on unknown keys and bad values, but names the file when it warns
    copy = in_venv(unit, tmp_path)
    run = systemd_analyze("verify", "--no-pager", str(copy))
    complaints = [line for line in (run.stdout + run.stderr).splitlines() if copy.name in line]
    assert run.returncode == 0 and not complaints, run.stdout + run.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_each_unit_keeps_what_its_service_needs(unit: Path) -> None:
    kind = unit.stem.removeprefix("edgegw-")
    opts = service_options(unit)
    # notify and watchdog: only the service's own process may talk on $NOTIFY_SOCKET
    assert option(unit, "Type") == "notify"
    assert option(unit, "NotifyAccess") == "main"
    assert int(option(unit, "WatchdogSec")) > 0
    # a dedicated user, in the group that may read /etc/edgegw
    assert option(unit, "DynamicUser") == "yes"
    assert "edgegw" in " ".join(opts["SupplementaryGroups"]).split()
    # the state directory systemd creates is the one the service is told to use
    state = option(unit, "StateDirectory")
    assert option(unit, "ExecStart").split()[-1].endswith(f"=/var/lib/{state}")
    # the network: IPv4/IPv6 for the hub link, MQTT and listening; AF_UNIX for notify
    assert set(option(unit, "RestrictAddressFamilies").split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6"}
    assert opts.get("PrivateNetwork", ["no"])[-1] == "no"
    # descriptors: hundreds of gateways and dashboards on the hub
    assert int(option(unit, "LimitNOFILE")) >= (16384 if kind == "hub" else 4096)
    # "never stops", but a config error (status 2) is not retried in a loop
    assert option(unit, "Restart") == "always"
    assert option(unit, "RestartPreventExitStatus") == "2"


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_each_unit_runs_a_real_subcommand_with_its_config(unit: Path) -> None:
    kind = unit.stem.removeprefix("edgegw-")
    argv = option(unit, "ExecStart").split()
    assert argv[0] == "/opt/edgegw/venv/bin/edgegw"  # where install.sh puts it
    assert f"/etc/edgegw/{kind}.toml" in argv
    check_command_line(argv[1:], kind)


# ---- Windows (WinSW) --------------------------------------------------------------------


@pytest.mark.parametrize("xml", WINSW, ids=lambda x: x.name)
def test_each_winsw_config_has_what_winsw_needs(xml: Path) -> None:
    root = ET.parse(xml).getroot()
    assert root.tag == "service"
    for element in ("id", "name", "description", "executable", "arguments", "serviceaccount",
                    "onfailure", "log", "logpath", "stoptimeout"):
        assert root.find(element) is not None, f"{xml.name}: no <{element}>"
    service_id = root.findtext("id")
    assert service_id == xml.stem  # the wrapper is named after it: <id>.exe beside <id>.xml
    assert root.findtext("executable", "").endswith(r"\venv\Scripts\edgegw.exe")
    assert root.find("onfailure").get("action") == "restart"  # type: ignore[union-attr]
    assert root.find("log").get("mode")  # type: ignore[union-attr]


#: every element WinSW 2.x/3.x reads at the top level of <service> (its XML config reference)
WINSW_ELEMENTS = {
    "id", "name", "description", "executable", "arguments", "argument", "startargument",
    "startarguments", "stopargument", "stoparguments", "stopexecutable", "startmode",
    "delayedAutoStart", "depend", "logpath", "log", "logmode", "stoptimeout", "env",
    "interactive", "beeponshutdown", "download", "onfailure", "resetfailure",
    "securityDescriptor", "serviceaccount", "workingdirectory", "priority", "prestart",
    "poststart", "prestop", "poststop", "stopparentprocessfirst", "waithint", "sleeptime",
    "hidewindow", "autoRefresh", "sharedDirectoryMapping",
}
#: a WinSW duration: a number and sec/secs/min/mins/hour/hours/day/days, or ms
WINSW_DURATION = re.compile(r"\d+(\.\d+)?\s*(ms|secs?|mins?|hours?|days?)")


def winsw_problems(xml: bytes) -> list[str]:
    """What WinSW would refuse or misread in a service config: the root, the elements it
    does not know, and the values of those with a fixed syntax (its XML config reference:
    docs/xml-config-file.md and logging-and-error-reporting.md of winsw/winsw)."""
    root = ET.fromstring(xml)
    if root.tag != "service":
        return [f"the root element is <{root.tag}>, not <service>"]
    problems = [f"<{c.tag}> is not a WinSW element" for c in root
                if c.tag not in WINSW_ELEMENTS]
    for tag in ("id", "executable"):
        if not (root.findtext(tag) or "").strip():
            problems.append(f"<{tag}> is required")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", root.findtext("id", "")):
        problems.append("<id> must be letters, digits, '-' or '_'")
    for tag in ("stoptimeout", "resetfailure", "waithint", "sleeptime"):
        for el in root.findall(tag):
            if not WINSW_DURATION.fullmatch((el.text or "").strip()):
                problems.append(f"<{tag}> {el.text!r} is not a WinSW duration")
    for el in root.findall("onfailure"):
        if el.get("action") not in ("restart", "reboot", "none"):
            problems.append(f"<onfailure action={el.get('action')!r}>: restart|reboot|none")
        if el.get("delay") is not None and not WINSW_DURATION.fullmatch(el.get("delay", "")):
            problems.append(f"<onfailure delay={el.get('delay')!r}> is not a WinSW duration")
    mode = root.findtext("startmode")
    if mode is not None and mode not in ("Boot", "System", "Automatic", "Manual", "Disabled"):
        problems.append(f"<startmode> {mode!r}")
    for tag in ("delayedAutoStart", "stopparentprocessfirst", "interactive"):
        el = root.find(tag)
        if el is not None and (el.text or "").strip().lower() not in ("", "true", "false"):
            problems.append(f"<{tag}> {el.text!r} is not a boolean")
    priority = root.findtext("priority")
    if priority is not None and priority.lower() not in (
            "idle", "belownormal", "normal", "abovenormal", "high", "realtime"):
        problems.append(f"<priority> {priority!r}")
    for log in root.findall("log"):
        mode = log.get("mode", "append")
        if mode not in ("append", "reset", "none", "roll", "roll-by-size", "roll-by-time",
                        "roll-by-size-time"):
            problems.append(f"<log mode={mode!r}>")
        for tag in ("sizeThreshold", "keepFiles"):
            value = log.findtext(tag)
            if value is not None and not value.strip().isdigit():
                problems.append(f"<log><{tag}> {value!r} is not a whole number")
        if mode in ("roll-by-time", "roll-by-size-time") and log.find("pattern") is None:
            problems.append(f"<log mode={mode!r}> needs a <pattern>")
    return problems


@pytest.mark.parametrize("xml", WINSW, ids=lambda x: x.name)
def test_each_winsw_config_is_one_winsw_reads_as_meant(xml: Path) -> None:
    assert winsw_problems(xml.read_bytes()) == []


def test_winsw_problems_finds_what_winsw_would_refuse() -> None:
    bad = (b'<service><id>a b</id><executable>x</executable><stoptimeout>15 seconds'
           b'</stoptimeout><onfailure action="retry" delay="5"/><startmode>Auto</startmode>'
           b'<log mode="roll-by-time"><keepFiles>many</keepFiles></log><prority>low</prority>'
           b'</service>')
    assert winsw_problems(bad) == [
        "<prority> is not a WinSW element",
        "<id> must be letters, digits, '-' or '_'",
        "<stoptimeout> '15 seconds' is not a WinSW duration",
        "<onfailure action='retry'>: restart|reboot|none",
        "<onfailure delay='5'> is not a WinSW duration",
        "<startmode> 'Auto'",
        "<log><keepFiles> 'many' is not a whole number",
        "<log mode='roll-by-time'> needs a <pattern>",
    ]


@pytest.mark.parametrize("xml", WINSW, ids=lambda x: x.name)
def test_each_winsw_config_runs_under_its_virtual_service_account(xml: Path) -> None:
    root = ET.parse(xml).getroot()
    service_id = root.findtext("id")
    account = root.find("serviceaccount")
    assert account is not None
    # WinSW 3.x reads <username>; 2.x reads <domain> and <user>: both name the same account
    assert account.findtext("username") == rf"NT SERVICE\{service_id}"
    assert (account.findtext("domain"), account.findtext("user")) == ("NT SERVICE", service_id)
    # a virtual account has no password and needs no logon right granted
    assert account.find("password") is None
    assert account.findtext("allowservicelogon", "false") == "false"


@pytest.mark.parametrize("xml", WINSW, ids=lambda x: x.name)
def test_each_winsw_config_runs_a_real_subcommand_with_its_config(xml: Path) -> None:
    root = ET.parse(xml).getroot()
    kind = xml.stem.removeprefix("edgegw-")
    check_command_line(root.findtext("arguments", "").split(), kind)


# ---- the offline bundle -----------------------------------------------------------------


def source_tree(dest: Path) -> Path:
    """A copy of the project's files (tracked and new, not ignored), so that building the
    bundle leaves nothing in the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The offline bundle, built by packaging/build-offline-bundle.sh as documented (pip
    builds the project's wheels and takes its dependencies from the configured index)."""
    base = tmp_path_factory.mktemp("bundle")
    src = source_tree(base / "src")
    run = subprocess.run(["bash", "packaging/build-offline-bundle.sh"], cwd=src,
                         env={**os.environ, "PYTHON": sys.executable, "DIST": str(base / "dist")},
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    yield Path(run.stdout.strip().splitlines()[-1])


def requirement_names(dist: str) -> set[str]:
    """The wheel names of what ``dist`` needs on this Python (no extras)."""
    needed = (Requirement(r) for r in metadata.requires(dist) or [])
    return {canonicalize_name(r.name).replace("-", "_") for r in needed
            if r.marker is None or r.marker.evaluate({"extra": ""})}


def test_the_offline_bundle_carries_units_windows_configs_wheels_and_installer(
        bundle: Path) -> None:
    """Built by the real script (about 20 s here: pip builds the wheels), so it runs in
    the suite: a Windows floor installs from this tarball, and only from it."""
    with tarfile.open(bundle) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}

        def content(name: str) -> bytes:
            f = tar.extractfile(members[name])
            assert f is not None
            return f.read()

        for unit in UNITS:
            assert content(f"systemd/{unit.name}") == unit.read_bytes()
        for xml in WINSW:
            shipped = content(f"windows/{xml.name}")
            assert shipped == xml.read_bytes()
            assert winsw_problems(shipped) == []
        assert {n for n in members if n.startswith("windows/") and n.endswith(".xml")} == {
            f"windows/{xml.name}" for xml in WINSW}
        for conf in ("gateway.toml", "hub.toml"):
            assert content(f"conf/{conf}") == (REPO / "conf" / conf).read_bytes()
        assert content("docs/operations.md") == (REPO / "docs" / "operations.md").read_bytes()
        assert members["install.sh"].mode & 0o111
        installer = content("install.sh").decode()
        built_for = content("python-version")
        # the compiled STDF record loop, built against the stable ABI: one edgegw wheel
        # serves every CPython >= 3.11 of the platform
        (project,) = [n for n in members if n.startswith("wheels/edgegw-0")]
        assert "-cp311-abi3-" in project, project
        with zipfile.ZipFile(io.BytesIO(content(project))) as wheel:
            assert "edgegw/stdf/_accel.abi3.so" in wheel.namelist()
    wheels = {n.removeprefix("wheels/").split("-")[0].lower() for n in members
              if n.startswith("wheels/") and n.endswith(".whl")}
    # the project, its example plugins, and every dependency: pip installs with --no-index
    assert {"edgegw", "edgegw_atdf", "edgegw_wat"} | requirement_names("edgegw") <= wheels, wheels
    assert "edgegw edgegw-atdf" in installer and "edgegw-wat" in installer
    assert "--no-index" in installer and "groupadd --system edgegw" in installer
    syntax = subprocess.run(["bash", "-n"], input=installer, capture_output=True, text=True,
                            check=False)
    assert syntax.returncode == 0, syntax.stderr
    # the Python the wheels are for, which install.sh holds its interpreter to
    assert built_for.decode().strip() == python_tag(sys.executable)


def python_tag(python: str) -> str:
    """What install.sh compares: implementation, minor version and platform of ``python``."""
    return subprocess.run(
        [python, "-c", "import sys, sysconfig; print(sys.implementation.name, "
         "'%d.%d' % sys.version_info[:2], sysconfig.get_platform())"],
        capture_output=True, text=True, check=True).stdout.strip()


def test_install_sh_refuses_a_python_the_wheels_are_not_for_and_says_which(
        bundle: Path, tmp_path: Path) -> None:
    """The wheels are for one Python (cbor2's is compiled).  Run with another -- a bundle
    built on 3.13 installed with a floor's 3.11 -- pip failed with "No matching distribution
    found for cbor2", naming neither Python.  install.sh now says both, and what to do,
    before it creates anything."""
    unpack(bundle, tmp_path / "bundle")
    top = next((tmp_path / "bundle").glob("edgegw-offline-*"))
    (top / "python-version").write_text("cpython 3.99 linux-x86_64\n")  # as if built there
    prefix = tmp_path / "opt"
    run = subprocess.run(
        [str(top / "install.sh")],
        env={**os.environ, "PREFIX": str(prefix), "CONFDIR": str(tmp_path / "etc"),
             "UNITDIR": str(tmp_path / "units"), "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.startswith("install.sh: this bundle's wheels are for cpython 3.99 "
                                 f"linux-x86_64; {sys.executable} is {python_tag(sys.executable)}.")
    assert "PYTHON=" in run.stderr and "No matching distribution" not in run.stderr
    assert not prefix.exists() and not (tmp_path / "etc").exists()


def test_the_windows_wheel_carries_a_stable_abi_extension_linked_to_python3_dll(
        tmp_path: Path) -> None:
    """packaging/build-windows-wheel.sh on Linux: edgegw's win_amd64 wheel, its compiled
    STDF record loop a .pyd that exports PyInit__accel and imports python3.dll (the stable
    ABI's, any CPython >= 3.11), nothing of a version's python3XX.dll and no MinGW runtime
    DLL.  scripts/windows-check.sh runs it on Windows CPython (under wine)."""
    objdump = shutil.which("x86_64-w64-mingw32-objdump")
    if objdump is None or shutil.which("x86_64-w64-mingw32-gcc") is None:
        pytest.skip("MinGW-w64 is not installed (apt-get install gcc-mingw-w64-x86-64)")
    src = source_tree(tmp_path / "src")
    run = subprocess.run(["bash", "packaging/build-windows-wheel.sh", str(tmp_path / "out")],
                         cwd=src, env={**os.environ, "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    wheel = Path(run.stdout.strip().splitlines()[-1])
    assert wheel.name == "edgegw-0.1.0-cp311-abi3-win_amd64.whl"
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        assert "edgegw/stdf/_accel.pyd" in names
        assert not [n for n in names if n.endswith(".so")]
        assert "Tag: cp311-abi3-win_amd64" in whl.read("edgegw-0.1.0.dist-info/WHEEL").decode()
        (tmp_path / "_accel.pyd").write_bytes(whl.read("edgegw/stdf/_accel.pyd"))
    pe = subprocess.run([objdump, "-p", str(tmp_path / "_accel.pyd")], capture_output=True,
                        text=True, check=True).stdout
    dlls = set(re.findall(r"DLL Name: (\S+)", pe))
    assert dlls == {"python3.dll", "KERNEL32.dll", "msvcrt.dll"}, dlls
    assert "PyInit__accel" in pe


@pytest.mark.parametrize("script", ["build-offline-bundle.sh", "check-units-under-systemd.sh",
                                    "../scripts/test.sh", "../scripts/fault-soak.sh",
                                    "../scripts/windows-check.sh", "build-windows-wheel.sh"])
def test_the_packaging_scripts_are_shellcheck_clean(script: str, tmp_path: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    # the script, and the scripts it writes out from quoted here-documents (install.sh)
    text = (PACKAGING / script).read_text()
    embedded = re.findall(r"<<'(\w+)'\n(.*?)\n\1\n", text, flags=re.S)
    assert script != "build-offline-bundle.sh" or [n for n, _ in embedded] == ["INSTALL"]
    paths = [PACKAGING / script]
    for name, body in embedded:
        paths.append(tmp_path / f"{name}.sh")
        paths[-1].write_text("#!/usr/bin/env bash\n" + body + "\n")
    for path in paths:
        run = subprocess.run([shellcheck, "-s", "bash", str(path)],
                             capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 0, f"{path.name}:\n{run.stdout}"


def unpack(bundle: Path, into: Path) -> None:
    """``tar xzf`` the bundle, as docs/operations.md has the operator do (tarfile's
    ``filter=`` is missing from Python 3.11.0-3.11.3, Debian 12's 3.11.2 among them)."""
    into.mkdir()
    subprocess.run(["tar", "-xzf", str(bundle), "-C", str(into)], check=True)


def scratch_etc_missing() -> str | None:
    """Why install.sh cannot run here with a throwaway /etc, or None."""
    if os.geteuid() != 0:
        return "needs root (chown, a private mount namespace)"
    for tool in ("unshare", "groupadd", "getent"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return system_python_missing()


def system_python_missing() -> str | None:
    """Why /usr/bin/python3 cannot install this suite's bundle, or None.  install.sh
    refuses a Python in a home directory (the suite's venv may be one), and one other than
    the bundle's (built by this Python: tested above)."""
    if not Path("/usr/bin/python3").exists():
        return "no system Python at /usr/bin/python3 for the installed venv"
    system, ours = python_tag("/usr/bin/python3"), python_tag(sys.executable)
    if system != ours:
        return f"the bundle is built for this Python ({ours}), /usr/bin/python3 is {system}"
    return None


def test_install_sh_hands_a_kept_config_back_to_root_and_follows_no_link(
        bundle: Path, tmp_path: Path) -> None:
    """A config kept from before that another user owns, or the group may write, would let
    them change a token or a key path: install.sh makes it root:edgegw 0640, as a new one,
    and says so.  A config that is a symbolic link is left alone: it may point at
    /etc/shadow, planted while the directory was writable, and chown would hand that to the
    group.  The bundle's own install.sh runs as root in a private mount namespace whose /etc
    is an overlay thrown away afterwards (groupadd writes there), its places in tmp_path."""
    reason = scratch_etc_missing()
    if reason:
        pytest.skip(f"cannot run install.sh in a scratch /etc here: {reason}")
    unpack(bundle, tmp_path / "bundle")
    installer = next((tmp_path / "bundle").glob("edgegw-offline-*/install.sh"))
    confdir = tmp_path / "etc-edgegw"
    confdir.mkdir()
    confdir.chmod(0o777)  # an earlier, careless set-up
    kept = confdir / "gateway.toml"
    kept.write_text('[gateway]\nid = "ate-07"\ntoken = "the site token"\n')
    os.chown(kept, 4321, 4321)
    kept.chmod(0o666)
    shadow = tmp_path / "shadow"
    shadow.write_text("root:$6$secret\n")
    shadow.chmod(0o600)
    (confdir / "hub.toml").symlink_to(shadow)
    upper, work = tmp_path / "etc-upper", tmp_path / "etc-work"
    upper.mkdir()
    work.mkdir()
    script = (f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} "
              f"/etc && {installer} && getent group edgegw")
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
        env={**os.environ, "PREFIX": str(tmp_path / "opt"), "CONFDIR": str(confdir),
             "UNITDIR": str(tmp_path / "units"), "PYTHON": "/usr/bin/python3"},
        capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    gid = int(run.stdout.strip().splitlines()[-1].split(":")[2])
    st = kept.stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (0, gid, "0o640")
    assert kept.read_text() == '[gateway]\nid = "ate-07"\ntoken = "the site token"\n'
    assert f"kept {kept}, made root:edgegw 0640" in run.stdout
    st = confdir.stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (0, gid, "0o750")
    # the link's target is untouched, and the output says what to do
    st = shadow.stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (0, 0, "0o600")
    assert (confdir / "hub.toml").is_symlink()
    assert f"kept {confdir / 'hub.toml'}: a symbolic link, left as it is" in run.stdout


# ---- the units under a real systemd -----------------------------------------------------


def throwaway_systemd_missing() -> str | None:
    """Why packaging/check-units-under-systemd.sh cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (private namespaces and mounts)"
    for tool in ("unshare", "nsenter", "setpriv", "pgrep", "findmnt", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/lib/systemd/systemd").exists():
        return "systemd is not installed"
    reason = system_python_missing()
    if reason:
        return reason
    cgroup2 = [p for p in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
               if (p / "cgroup.procs").exists()]
    if not cgroup2 or not os.access(cgroup2[-1], os.W_OK):
        return "no writable cgroup2 hierarchy"
    return None


@pytest.mark.slow
def test_both_units_run_as_shipped_under_a_real_systemd(bundle: Path) -> None:
    reason = throwaway_systemd_missing()
    if reason:
        pytest.skip(f"cannot boot a throwaway systemd here: {reason}")
    run = subprocess.run(["bash", str(PACKAGING / "check-units-under-systemd.sh"), str(bundle),
                          str(stdf_path(METIS))],
                         env={**os.environ, "LOT_ID": "F6N910.1"},
                         capture_output=True, text=True, timeout=900, check=False)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    passed = [line for line in run.stdout.splitlines() if line.startswith("ok: ")]
    for check in ("edgegw-hub active", "edgegw-gateway active",
                  "edgegw-hub runs as dynamic user", "edgegw-gateway runs as dynamic user",
                  "edgegw-hub pings the watchdog", "edgegw-gateway pings the watchdog",
                  "records were applied", "lot F6N910.1", "files private",
                  "restarted after a crash", "reloads its config in place", "stops cleanly"):
        assert any(check in line for line in passed), check
