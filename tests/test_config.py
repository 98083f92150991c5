"""Config errors name the file, the dotted key and what was expected; exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgegw.config import ConfigError, load
from edgegw.gateway.config import load_gateway_config
from edgegw.hub.config import HubConfig

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


def test_an_unknown_key_is_named_with_what_is_allowed(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, GOOD_GATEWAY + "[batch]\nmax_recs = 5\n"))
    assert len(errs) == 1
    assert errs[0].startswith(f"{tmp_path / 'cfg.toml'}: batch.max_recs: unknown key")
    assert "max_records" in errs[0]


def test_a_wrong_type_says_what_was_expected_and_what_was_found(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, GOOD_GATEWAY + '[uplink]\nheartbeat_s = "fast"\n'))
    assert errs == [f"{tmp_path / 'cfg.toml'}: uplink.heartbeat_s: expected a number, "
                    "got string 'fast'"]


def test_a_missing_required_value_is_named(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, '[gateway]\nid = "x"\n'))
    assert errs == [f"{tmp_path / 'cfg.toml'}: gateway.token: required key is missing "
                    "(expected a string)"]


def test_errors_inside_a_source_table_carry_its_index(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, GOOD_GATEWAY + "sites = 0\n"))
    assert errs == [f"{tmp_path / 'cfg.toml'}: sources[0].sites: must be between 1 and 255"]
    errs = errors_of(write(tmp_path, GOOD_GATEWAY.replace('"simulated"', '"nosuch"')))
    assert "sources[0].type: unknown source type 'nosuch' (installed:" in errs[0]


def test_an_invalid_literal_lists_the_choices(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, GOOD_GATEWAY + '[queue]\npolicy = "drop_newest"\n'))
    assert errs[0].endswith("queue.policy: expected 'block' or 'drop_oldest', "
                            "got string 'drop_newest'")


def test_broken_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    errs = errors_of(write(tmp_path, "[gateway\nid = 1\n"))
    assert errs[0].startswith(f"{tmp_path / 'cfg.toml'}: not valid TOML:") and "line 1" in errs[0]


def test_overrides_apply_with_toml_typing(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_GATEWAY)
    cfg = load_gateway_config(str(path), ["batch.max_records=7", "gateway.hub_url=ws://h:1/x"])
    assert cfg.batch.max_records == 7 and cfg.gateway.hub_url == "ws://h:1/x"
    errs = errors_of(path, ["batch.max_records=many"])
    assert errs[0].endswith("batch.max_records: expected an integer, got string 'many'")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgegw", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def test_check_config_prints_ok_or_every_error(tmp_path: Path) -> None:
    ok = run_cli("check-config", str(REPO / "conf" / "gateway.toml"))
    assert (ok.returncode, ok.stdout.strip()) == (0, "ok")
    ok = run_cli("check-config", str(REPO / "conf" / "hub.toml"))
    assert (ok.returncode, ok.stdout.strip()) == (0, "ok")
    bad = run_cli("check-config", str(write(tmp_path, GOOD_GATEWAY + "[batch]\nx=1\ny=2\n")))
    assert bad.returncode == 2
    assert len(bad.stdout.strip().splitlines()) == 2


def test_a_broken_config_stops_a_command_with_one_line_and_status_2(tmp_path: Path) -> None:
    bad = run_cli("gateway", "--config", str(write(tmp_path, GOOD_GATEWAY + "[batch]\nx=1\n")))
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"edgegw: config error: {tmp_path / 'cfg.toml'}: batch.x: unknown key "
        "(allowed here: max_delay_ms, max_records)"]
    missing = run_cli("hub", "--config", str(tmp_path / "absent.toml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
