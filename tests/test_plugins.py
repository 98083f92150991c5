"""Tester formats are plugins: ``edgegw plugins``, the registry, and config errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from edgegw.cli import main
from edgegw.config import ConfigError, build
from edgegw.sources import TailConfig, UnknownFormat, get_format, installed_formats


def test_edgegw_plugins_lists_the_stdf_and_atdf_formats_and_the_source_types(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    formats = {f["name"]: f for f in listing["formats"]}
    assert formats["stdf"]["entry_point"] == "edgegw.stdf.format:STDF"
    assert formats["stdf"]["suffixes"] == [".stdf", ".std"]
    assert formats["atdf"]["entry_point"] == "edgegw_atdf:ATDF"
    assert formats["atdf"]["package"].startswith("edgegw-atdf ")
    sources = {s["name"]: s for s in listing["sources"]}
    assert sources["stdf"]["entry_point"] == "edgegw.sources.tail:TailSource"
    assert "simulated" in sources

    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "Tester formats (entry-point group edgegw.formats):" in text
    assert "  atdf " in text and "  stdf " in text and "[.atdf .atd]" in text


def test_a_config_naming_a_missing_format_says_which_formats_exist() -> None:
    with pytest.raises(ConfigError) as err:
        build(TailConfig, {"paths": ["/data/ate1"], "format": "vendor-xyz"}, "gateway.toml")
    assert err.value.errors == [
        "gateway.toml: format: unknown tester format 'vendor-xyz' "
        "(installed formats: atdf, stdf, wat)"]
    with pytest.raises(UnknownFormat, match=r"installed formats: atdf, stdf, wat"):
        get_format("vendor-xyz")


def _install_fake_plugin(root: Path, name: str, module: str, source: str, target: str) -> None:
    """A plugin package as pip leaves it: a module and a dist-info with entry points."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[edgegw.formats]\n{target}\n")


def test_a_third_party_format_is_found_and_a_broken_one_does_not_hide_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _install_fake_plugin(tmp_path, "lines_fmt", "lines_fmt", """
        class LinesFormat:
            name = "lines"
            description = "one record per line"
            suffixes = (".lines",)
            def new_parser(self):
                raise NotImplementedError
        """, "lines = lines_fmt:LinesFormat")
    _install_fake_plugin(tmp_path, "broken_fmt", "broken_fmt", "raise ImportError('no lib')\n",
                         "broken = broken_fmt:FORMAT")
    monkeypatch.syspath_prepend(str(tmp_path))
    formats = installed_formats()
    assert {"stdf", "atdf", "lines"} <= set(formats) and "broken" not in formats
    assert formats["lines"].suffixes == (".lines",)  # a class is instantiated
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "  lines      one record per line  [.lines]  (lines_fmt 1.0)" in text
    assert "  broken     BROKEN  broken_fmt:FORMAT: ImportError: no lib" in text
