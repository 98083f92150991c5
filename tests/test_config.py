"""Config errors name the file, the dotted key and what was expected; exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgegw.config import ConfigError, Key, iter_keys, load
from edgegw.gateway import Gateway, GatewayConfig, load_gateway_config
from edgegw.hub import HubConfig

REPO = Path(__file__).resolve().parents[1]

GOOD_GATEWAY = """
[gateway]
id = "ate-01"
token = "t"
[[sources]]
name = "tester"
type = "simulated"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.toml"
    p.write_text(text)
    return p


def errors_of(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_gateway_config(str(path), overrides)
    return exc.value.errors


def test_the_example_configs_are_valid() -> None:
    load(HubConfig, REPO / "conf" / "hub.toml")
    cfg = load_gateway_config(str(REPO / "conf" / "gateway.toml"))
    assert cfg.gateway.id == "ate-01" and cfg.source_entries()[0].type == "simulated"
    # as installed, `edgegw status` has a gateway to ask -- on this machine only
    assert (cfg.gateway.status_port, cfg.gateway.status_listen) == (8766, "127.0.0.1")


def test_an_unknown_key_is_named_with_what_is_allowed(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, GOOD_GATEWAY + "[batch]\nmax_recs = 5\n"))
    assert len(errs) == 1
    assert errs[0].startswith(f"{tmp_path / 'cfg.toml'}: batch.max_recs: unknown key")
    assert "max_records" in errs[0]


def test_a_wrong_type_says_what_was_expected_and_what_was_found(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, GOOD_GATEWAY + '[uplink]\nheartbeat_s = "fast"\n'))
    assert errs == [f"{tmp_path / 'cfg.toml'}: uplink.heartbeat_s: expected a number 1 to 3600, "
                    "got string 'fast'"]


def test_a_missing_required_value_is_named(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, '[gateway]\nid = "x"\n'))
    assert errs == [f"{tmp_path / 'cfg.toml'}: gateway.token: required key is missing "
                    "(expected a string)"]


def test_errors_inside_a_source_table_carry_its_index(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, GOOD_GATEWAY + "sites = 0\n"))
    assert errs == [f"{tmp_path / 'cfg.toml'}: sources[0].sites: expected an integer 1 to 255, "
                    "got integer 0"]
    errs = errors_of(write(tmp_path, GOOD_GATEWAY.replace('"simulated"', '"nosuch"')))
    assert "sources[0].type: unknown source type 'nosuch' (installed:" in errs[0]


@pytest.mark.parametrize("name", ["__rid__", "__after__", "__origins__", "__split__", "__x"])
def test_a_source_name_in_the_gateways_own_checkpoint_keys_is_refused(
        tmp_path: Path, name: str) -> None:
    # a source's checkpoint is kept under its name beside the gateway's own keys: a source
    # named like one of them would overwrite the gateway's state (or the other way round)
    errs = errors_of(write(tmp_path, GOOD_GATEWAY.replace('"tester"', repr(name))))
    assert errs == [f"{tmp_path / 'cfg.toml'}: sources[0].name: {name!r}: a source name must "
                    "not start with '__' (reserved for the gateway's own checkpoint keys)"]
    # one underscore, or two further in, is an ordinary name
    load_gateway_config(str(write(tmp_path, GOOD_GATEWAY.replace('"tester"', '"_t__x"'))))


def test_a_source_given_in_code_with_a_reserved_name_is_refused_too(tmp_path: Path) -> None:
    # sources passed as instances (embedding, tests) skip the configuration's check
    cfg = load_gateway_config(str(write(tmp_path, GOOD_GATEWAY)))
    with pytest.raises(ValueError, match="'__rid__': a source name must not start with '__'"):
        Gateway(cfg, extra_sources=[("__rid__", object())])  # type: ignore[list-item]
    Gateway(cfg, extra_sources=[("_t__x", object())])  # type: ignore[list-item]


def test_an_invalid_literal_lists_the_choices(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, GOOD_GATEWAY + '[queue]\npolicy = "drop_newest"\n'))
    assert errs[0].endswith("queue.policy: expected 'block' or 'drop_oldest', "
                            "got string 'drop_newest'")


def test_broken_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, "[gateway\nid = 1\n"))
    assert errs[0].startswith(f"{tmp_path / 'cfg.toml'}: not valid TOML:") and "line 1" in errs[0]


def test_a_config_saved_by_a_windows_editor_is_read_or_named_for_what_it_is(
        tmp_path: Path) -> None:
    """TOML is UTF-8.  Notepad saves UTF-8 with a byte order mark (the same text: read),
    UTF-16 ("Unicode"), or the ANSI code page when a comment holds a degree sign; the
    last two were a UnicodeDecodeError traceback and exit 1, the first "Invalid
    statement (at line 1, column 1)"."""
    text = GOOD_GATEWAY + "# the chuck runs at 150 \u00b0C\n"
    plain, path = tmp_path / "plain.toml", tmp_path / "notepad.toml"
    plain.write_bytes(text.encode("utf-8"))
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_gateway_config(str(path)) == load_gateway_config(str(plain))
    path.write_bytes(text.encode("utf-16"))
    assert errors_of(path) == [f"{path}: saved as UTF-16 (Notepad's \"Unicode\"); TOML "
                               "files are UTF-8: save it as UTF-8"]
    path.write_bytes(text.encode("cp1252"))
    line = text.count("\n")  # the comment's line, the last
    assert errors_of(path) == [
        f"{path}: not UTF-8 (byte 0xb0 at line {line}, column 25); TOML files are UTF-8: "
        "save it as UTF-8, not in a code page such as ANSI or Latin-1"]
    bad = run_cli("gateway", "--config", str(path))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_a_set_in_bytes_that_are_not_utf8_is_a_config_error_not_a_gateway_that_cannot_send(
        tmp_path: Path) -> None:
    """A shell in Latin-1 hands ``--set gateway.id=ab\xe9`` over as a string with a lone
    surrogate; check-config took it, and the gateway could never encode its HELLO."""
    errs = errors_of(write(tmp_path, GOOD_GATEWAY), [os.fsdecode(b"gateway.id=ab\xe9")])
    assert errs == [f"{tmp_path / 'cfg.toml'}: gateway.id: expected text, got string "
                    "'ab\\udce9': bytes that are not UTF-8 (a --set typed in another "
                    "encoding?)"]


def test_a_file_far_larger_than_any_config_is_refused_not_read_to_its_end(
        tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    path.write_bytes(b"# x\n" * (1 << 20) + b"# past 4 MiB\n")
    assert errors_of(path) == [f"{path}: larger than 4 MiB: not a config file"]


def test_overrides_apply_with_toml_typing(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_GATEWAY)
    cfg = load_gateway_config(str(path), ["batch.max_records=7", "gateway.hub_url=ws://h:1/x"])
    assert cfg.batch.max_records == 7 and cfg.gateway.hub_url == "ws://h:1/x"
    errs = errors_of(path, ["batch.max_records=many"])
    assert errs[0].endswith("batch.max_records: expected an integer 1 to 100000, "
                            "got string 'many'")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgegw", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def findings(stdout: str) -> list[str]:
    """check-config's output after its first line, which says what kind of config the
    file was checked as: ["ok"], or one line per problem."""
    lines = stdout.strip().splitlines()
    assert ": checked as a " in lines[0], lines
    return lines[1:]


def test_check_config_prints_ok_or_every_error(tmp_path: Path) -> None:
    ok = run_cli("check-config", str(REPO / "conf" / "gateway.toml"))
    assert (ok.returncode, findings(ok.stdout)) == (0, ["ok"])
    ok = run_cli("check-config", str(REPO / "conf" / "hub.toml"))
    assert (ok.returncode, findings(ok.stdout)) == (0, ["ok"])
    bad = run_cli("check-config", str(write(tmp_path, GOOD_GATEWAY + "[batch]\nx=1\ny=2\n")))
    assert bad.returncode == 2
    assert len(findings(bad.stdout)) == 2


def test_a_broken_config_stops_a_command_with_one_line_and_status_2(tmp_path: Path) -> None:
    bad = run_cli("gateway", "--config", str(write(tmp_path, GOOD_GATEWAY + "[batch]\nx=1\n")))
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"edgegw: config error: {tmp_path / 'cfg.toml'}: batch.x: unknown key "
        "(allowed here: max_delay_ms, max_records)"]
    missing = run_cli("hub", "--config", str(tmp_path / "absent.toml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


# -- values check-config used to accept that crash or stall a service (issue 10, finding 4) --

HUB_TOML = REPO / "conf" / "hub.toml"
GATEWAY_TOML = REPO / "conf" / "gateway.toml"


@pytest.mark.parametrize(("config", "override", "error"), [
    # the hub died when a gateway connected
    (HUB_TOML, "hub.apply_queue_frames=-1",
     "hub.apply_queue_frames: expected an integer 1 to 65536, got integer -1"),
    (HUB_TOML, "hub.hello_timeout_s=-1",
     "hub.hello_timeout_s: expected a number 1 to 600, got integer -1"),
    (HUB_TOML, "hub.heartbeat_s=nan",
     "hub.heartbeat_s: expected a finite number 1 to 3600, got number nan"),
    (HUB_TOML, "hub.heartbeat_s=inf",
     "hub.heartbeat_s: expected a finite number 1 to 3600, got number inf"),
    # every gateway refused forever
    (HUB_TOML, "hub.max_records_per_frame=0",
     "hub.max_records_per_frame: expected an integer 1 to 1000000, got integer 0"),
    (HUB_TOML, 'hub.listen="not-an-ip!"',
     "hub.listen: expected an IP address or a host name, got string 'not-an-ip!'"),
    (HUB_TOML, "hub.port=65536", "hub.port: expected an integer 0 or 1 to 65535, "
                                 "got integer 65536"),
    # listened on 4464 (70000 mod 65536); -1 was an 81-line traceback
    (GATEWAY_TOML, "gateway.status_port=70000",
     "gateway.status_port: expected an integer 0 or 1 to 65535, got integer 70000"),
    (GATEWAY_TOML, "gateway.status_port=-1",
     "gateway.status_port: expected an integer 0 or 1 to 65535, got integer -1"),
    # connected, then a silent stall
    (GATEWAY_TOML, "queue.max_frames=0",
     "queue.max_frames: expected an integer 1 to 10000000, got integer 0"),
    # reconnected forever
    (GATEWAY_TOML, "uplink.connect_timeout_s=0",
     "uplink.connect_timeout_s: expected a number 1 to 600, got integer 0"),
    (GATEWAY_TOML, 'gateway.hub_url="ws://hub:70000"',
     "gateway.hub_url: not a valid URL (Port out of range 0-65535): 'ws://hub:70000'"),
    (GATEWAY_TOML, "gateway.token=''",
     "gateway.token: must not be empty (the hub refuses an empty token)"),
    # an invalid spool.* value named the [spool] table instead of the key
    (GATEWAY_TOML, "spool.max_bytes=-1",
     "spool.max_bytes: expected an integer >= 16384, got integer -1"),
    (GATEWAY_TOML, 'spool.policy="drop_newest"',
     "spool.policy: expected 'block' or 'drop_oldest', got string 'drop_newest'"),
    (GATEWAY_TOML, "spool.segment_bytes=1073741824",
     "spool.max_bytes: must hold at least 4 segments: >= 4 x segment_bytes = 4294967296"),
    # the gateway stopped at its first frame larger than a quarter of the spool
    (GATEWAY_TOML, "spool.max_bytes=1048576 spool.segment_bytes=65536",
     "spool.max_bytes: must hold 4 frames of batch.max_records records: >= 4 x 8000 x 256 "
     "= 8192000"),
    # a touchdown of 255 x 1001 records stopped the gateway's event loop for seconds
    (GATEWAY_TOML, "sources.0.sites=255 sources.0.tests_per_part=1000",
     "sources[0].tests_per_part: sites x (tests_per_part + 1) = 255255 records per "
     "touchdown; at most 20000"),
    (GATEWAY_TOML, "spool.max_bytz=1", "spool.max_bytz: unknown key (allowed here: "
                                       "commit_max_delay_ms, commit_max_frames, dir, "
                                       "max_bytes, policy, segment_bytes, stall_timeout_s)"),
    (GATEWAY_TOML, "sources.0.parts_per_second=0",
     "sources[0].parts_per_second: expected a number 0.001 to 1000000, got integer 0"),
])
def test_check_config_rejects_a_value_a_service_cannot_run_with_one_line_naming_the_key(
        config: Path, override: str, error: str, capsys: pytest.CaptureFixture[str]) -> None:
    from edgegw.cli import main

    sets = [a for o in override.split() for a in ("--set", o)]
    assert main(["check-config", str(config), *sets]) == 2
    assert findings(capsys.readouterr().out) == [f"{config}: {error}"]


@pytest.mark.parametrize(("override", "error"), [
    ("sources.5.sites=8", "--set sources.5.sites=8: sources.5: no such item (sources has 2)"),
    ("sources.x.sites=8", "--set sources.x.sites=8: sources is a list: 'x' is not an index"),
    ("batch.max_records.x=1",
     "--set batch.max_records.x=1: batch.max_records is integer 8000, not a table"),
])
def test_a_set_path_that_cannot_be_followed_is_one_error_line(override: str, error: str) -> None:
    for command in (["check-config", str(GATEWAY_TOML)], ["gateway", "--config",
                                                          str(GATEWAY_TOML)]):
        out = run_cli(*command, "--set", override)
        assert out.returncode == 2
        if command[0] == "check-config":
            assert (findings(out.stdout), out.stderr) == ([error], "")
        else:
            assert out.stderr.strip().splitlines() == [f"edgegw: config error: {error}"]


def test_set_replaces_a_whole_list_item_and_its_type_is_checked() -> None:
    out = run_cli("check-config", str(GATEWAY_TOML), "--set", "sources.0=5")
    assert (out.returncode, findings(out.stdout), out.stderr) == (
        2, [f"{GATEWAY_TOML}: sources[0]: expected a table, got integer 5"], "")
    out = run_cli("check-config", str(GATEWAY_TOML), "--set",
                  'sources.0={name = "t2", type = "simulated", sites = 2}')
    assert (out.returncode, findings(out.stdout)) == (0, ["ok"])


def test_live_event_prefixes_is_read_from_a_toml_list(tmp_path: Path) -> None:
    cfg = load(HubConfig, write(tmp_path, '[hub]\n[live]\nevent_prefixes = ["alert/", "gw/"]\n'))
    assert cfg.live.event_prefixes == ("alert/", "gw/")
    with pytest.raises(ConfigError) as exc:
        load(HubConfig, write(tmp_path, '[hub]\n[live]\nevent_prefixes = ["alert/", 3]\n'))
    assert exc.value.errors == [f"{tmp_path / 'cfg.toml'}: live.event_prefixes[1]: "
                                "expected a string, got integer 3"]


def test_errors_in_an_optional_section_name_every_bad_key(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, GOOD_GATEWAY + "[spool]\ncommit_max_frames = 0\n"
                                                    "stall_timeout_s = nan\n"))
    assert [e.split(": ")[1] for e in errs] == ["spool.commit_max_frames",
                                               "spool.stall_timeout_s"]


def test_integers_beyond_64_bits_are_refused(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, GOOD_GATEWAY + "seed = 99999999999999999999\n"))
    assert errs == [f"{tmp_path / 'cfg.toml'}: sources[0].seed: expected an integer within "
                    "64 bits, got integer 99999999999999999999"]


# -- the schema declares every number's range, and the docs show it ------------------------

def _schemas() -> dict[str, type]:
    from edgegw.sources import source_types

    out: dict[str, type] = {"hub": HubConfig, "gateway": GatewayConfig}
    for name in ("simulated", "tail", "mqtt"):
        out[name] = source_types()[name].Config
    return out


# Numbers whose allowed values depend on another key or are listed, checked by validate()
# (each with its own message); every other number declares a Range on its type.
RANGE_IN_VALIDATE = {
    ("hub", "alerts.rules[].threshold"),  # 0 to 1 for yield kinds, any for test_cpk
    ("hub", "alerts.rules[].low"), ("hub", "alerts.rules[].high"),  # low <= high
    ("mqtt", "qos"), ("mqtt", "subscriptions[].qos"),  # 0 or 1: "must be 0 or 1"
}


def test_every_numeric_key_declares_its_range() -> None:
    from typing import get_args, get_origin

    missing = []
    for schema, cls in _schemas().items():
        for key in iter_keys(cls):
            base = key.base
            if get_origin(base) is list:  # a list of numbers: the items' range
                item = Key(key.path + "[]", get_args(base)[0], None)
                base, rng = item.base, item.range
            else:
                rng = key.range
            if base in (int, float) and rng is None and (schema, key.path) not in \
                    RANGE_IN_VALIDATE:
                missing.append(f"{schema}: {key.path}")
    assert missing == [], "declare a Range on these keys' types (edgegw.config.Range)"


def _documented() -> dict[str, list[str]]:
    """docs/configuration.md's table rows: the first cell's key -> the other cells."""
    rows: dict[str, list[str]] = {}
    for line in (REPO / "docs" / "configuration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            rows[cells[0].replace(" (tail)", "").replace(" (mqtt)", "").strip("`")] = cells[1:]
    return rows


def test_every_key_is_documented_with_its_range() -> None:
    from typing import get_args, get_origin

    rows = _documented()
    problems = []
    for schema, cls in _schemas().items():
        for key in iter_keys(cls):
            if key.path == "sources":
                continue  # documented per source type
            row = rows.get(key.path)
            if row is None:
                problems.append(f"{schema}: {key.path}: not in docs/configuration.md")
                continue
            range_cell = row[1]
            rng = key.range
            if rng is None and get_origin(key.base) is list:
                rng = Key("", get_args(key.base)[0], None).range
            if not range_cell:
                problems.append(f"{key.path}: no range documented")
            elif rng is not None and rng.describe() not in range_cell:
                problems.append(f"{key.path}: documented {range_cell!r}, declared "
                                f"{rng.describe()!r}")
    assert problems == []
