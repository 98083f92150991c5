"""The command line explains itself: every subcommand and option has help, the examples in
the help pages run as written, ``-v`` works before or after the subcommand, and
``check-config`` says which kind of config it took a file for and takes every conf/*.toml.
"""

from __future__ import annotations

import argparse
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgegw.cli import COMMAND_MODULES, COMMANDS, build_parser, command_of, main, verbosity
from edgegw.commands import KINDS
from edgegw.demo import demo_configs

REPO = Path(__file__).resolve().parents[1]
CONFS = sorted((REPO / "conf").glob("*.toml"))


def parsers(parser: argparse.ArgumentParser | None = None,
            ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the command tree, top level first, with its command words."""
    parser = parser or build_parser()
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from parsers(sub)


PARSERS = dict(parsers())


def examples(parser: argparse.ArgumentParser) -> list[list[str]]:
    """The command lines in a help page's examples (pipes and comments left off)."""
    found = []
    for line in parser.format_help().splitlines():
        if line.startswith("  edgegw "):
            text = line.split("|")[0].split("#")[0]
            found.append(shlex.split(text)[1:])
    return found


def set_examples(parser: argparse.ArgumentParser) -> list[str]:
    """The KEY=VALUE of every ``--set`` example in the help of a parser's options."""
    helps = " ".join(a.help or "" for a in parser._actions)
    return re.findall(r"--set\s+(\S+=\S+)", helps)


def check_config(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    """``edgegw check-config ARGV`` in this process: its exit status must be 0."""
    status = main(["check-config", *argv])
    out = capsys.readouterr().out.splitlines()
    assert status == 0, out
    return out


# ---- help -------------------------------------------------------------------------------


@pytest.mark.parametrize("prog", list(PARSERS))
def test_every_command_has_a_description_and_every_option_a_help_text(prog: str) -> None:
    parser = PARSERS[prog]
    assert parser.description and len(parser.description) > 40, f"{prog}: no description"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"{prog} {choice.dest}: no help in the command list"
            continue
        assert action.help, f"{prog} {'/'.join(action.option_strings) or action.dest}: no help"


@pytest.mark.parametrize("prog", [p for p, parser in PARSERS.items()
                                  if not parser._subparsers and p != "edgegw"])
def test_every_command_page_shows_examples_that_parse(prog: str) -> None:
    found = examples(PARSERS[prog])
    assert found, f"{prog}: no examples"
    for argv in found:
        args = build_parser().parse_args(argv)  # SystemExit here fails the test
        assert " ".join(["edgegw", *argv]).startswith(prog)
        assert args.func is not None


@pytest.mark.parametrize("argv", [argv for _, p in PARSERS.items() for argv in examples(p)
                                  if argv[0] == "check-config" and (REPO / argv[1]).exists()],
                         ids=" ".join)
def test_each_check_config_example_passes(argv: list[str], capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert check_config(capsys, *argv[1:])[-1] == "ok"


@pytest.mark.parametrize("argv", [argv for _, p in PARSERS.items() for argv in examples(p)
                                  if argv[0] in ("hub", "gateway") and "--config" in argv],
                         ids=" ".join)
def test_each_service_example_names_a_valid_config_and_valid_overrides(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(argv)
    sets = [a for o in args.overrides for a in ("--set", o)]
    out = check_config(capsys, str(REPO / args.config), "--kind", args.command, *sets)
    assert out[-1] == "ok"


def test_the_set_examples_in_the_help_are_keys_of_the_right_kind_of_config(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`edgegw gateway --help` once offered --set hub.port=9000, which check-config then
    read as a hub config."""
    for prog, kind in (("edgegw hub", "hub"), ("edgegw gateway", "gateway")):
        (example,) = set_examples(PARSERS[prog])
        out = check_config(capsys, str(REPO / "conf" / f"{kind}.toml"), "--set", example)
        assert out[0].startswith(f"{REPO / 'conf' / kind}.toml: checked as a {kind} config")
    gateway_example, hub_example = set_examples(PARSERS["edgegw check-config"])
    check_config(capsys, str(REPO / "conf" / "gateway.toml"), "--set", gateway_example)
    check_config(capsys, str(REPO / "conf" / "hub.toml"), "--set", hub_example)
    demo = PARSERS["edgegw demo"]
    for argv in [["demo", "--set", o] for o in set_examples(demo)] + examples(demo):
        args = build_parser().parse_args(argv)
        with tempfile.TemporaryDirectory() as tmp:
            demo_configs(args, Path(tmp), "token", 8765)  # ConfigError fails the test


# ---- a command builds its own parsers only -----------------------------------------------


def commands(parser: argparse.ArgumentParser) -> list[str]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def test_the_command_table_names_every_command_and_the_module_that_adds_it() -> None:
    assert list(COMMANDS) == commands(build_parser())
    assert set(COMMANDS.values()) == set(COMMAND_MODULES)
    for name, module in COMMANDS.items():
        assert commands(build_parser(name)) == [
            n for n, m in COMMANDS.items() if m == module], name


@pytest.mark.parametrize("prog", [p for p in PARSERS if p != "edgegw"])
def test_a_command_built_alone_has_the_help_page_of_the_whole_tree(prog: str) -> None:
    alone = dict(parsers(build_parser(prog.split()[1])))
    assert alone[prog].format_help() == PARSERS[prog].format_help()
    assert alone["edgegw"].format_usage() == PARSERS["edgegw"].format_usage()


#: arguments each action takes (every action of ``stdf`` the same)
ACTION_ARGS = {"stdf": ["f.stdf", "--partial"], "dead-letters list": ["state", "--json"],
               "dead-letters requeue": ["--config", "gateway.toml", "--set", "a.b=1"],
               "plugins check": ["stdf", "f.stdf", "--option", "a=1", "--json"]}


@pytest.mark.parametrize("prog", [p for p in PARSERS if len(p.split()) == 3])
def test_an_action_built_alone_has_the_help_page_and_parse_of_the_whole_tree(
        prog: str) -> None:
    """``edgegw stdf stats FILE`` builds the stats parser alone (a module's ``ACTIONS``);
    a module without them builds all its actions: the same pages either way."""
    _, command, action = prog.split()
    alone = dict(parsers(build_parser(command, action)))
    assert alone[prog].format_help() == PARSERS[prog].format_help()
    assert alone[f"edgegw {command}"].format_usage() == \
        PARSERS[f"edgegw {command}"].format_usage()
    given = ACTION_ARGS.get(command) or ACTION_ARGS[f"{command} {action}"]
    args = [command, action, *given, "-v"]
    assert vars(build_parser(command, action).parse_args(args)) == \
        vars(build_parser().parse_args(args))


@pytest.mark.parametrize(("argv", "command"), [
    (["stdf", "stats", "x.stdf"], "stdf"),
    (["-v", "-vv", "--verbose", "hub", "--config", "h.toml"], "hub"),
    (["check-config", "stdf"], "check-config"),
    ([], None),                      # the usage error lists nothing, but needs the tree
    (["-h", "stdf"], None),          # the top-level help page lists every command
    (["--version"], None),
    (["--verb", "stdf"], None),      # an abbreviation: argparse decides what it is
    (["nosuch"], None),              # "invalid choice" names every command
])
def test_only_a_plain_command_word_builds_one_module(argv: list[str],
                                                     command: str | None) -> None:
    assert command_of(argv) == command


def test_the_usage_errors_and_version_are_those_of_the_whole_tree(
        capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["nosuch"], ["stdf"], ["stdf", "stats"], ["--version"], ["-v", "-h"]):
        outputs = []
        for parse in (lambda a: build_parser().parse_args(a), main):
            with pytest.raises(SystemExit) as exc:
                parse(argv)
            outputs.append((exc.value.code, capsys.readouterr()))
        assert outputs[0] == outputs[1], argv
    assert outputs[0][1].out.startswith("usage: edgegw")  # -h: the whole tree's page


# ---- global options ---------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["-v", "-v", "check-config", "x.toml"],
    ["check-config", "-vv", "x.toml"],
    ["-v", "check-config", "x.toml", "-v"],
    ["-v", "stdf", "-v", "dump", "x.stdf"],
    ["stdf", "dump", "x.stdf", "-v", "-v"],
])
def test_v_counts_wherever_it_is_given(argv: list[str]) -> None:
    assert verbosity(build_parser().parse_args(argv)) == 2


def test_v_after_the_subcommand_turns_on_debug_output(tmp_path: Path) -> None:
    """A hub that cannot start is one line; with -vv (here after the subcommand) the
    lines held back during its start and the traceback follow."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["hub", "--set", f"hub.port={port}", "--set",
                f'hub.data_dir="{tmp_path / "hub"}"']
        runs = [subprocess.run([sys.executable, "-m", "edgegw", *a], capture_output=True,
                               text=True, timeout=60, check=False)
                for a in (argv, [*argv, "-vv"], ["-v", *argv, "-v"])]
    quiet, loud, split = runs
    line = (f"edgegw: cannot start: hub.listen/hub.port: cannot listen on 127.0.0.1:{port}: "
            "address already in use")
    assert (quiet.returncode, quiet.stderr.splitlines()) == (3, [line])
    for run in (loud, split):
        assert run.returncode == 3 and run.stderr.splitlines()[-1] == line
        assert "Traceback" in run.stderr and " DEBUG " in run.stderr


def test_version() -> None:
    run = subprocess.run([sys.executable, "-m", "edgegw", "--version"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert re.fullmatch(r"edgegw \d+\.\d+\.\d+\S*\n", run.stdout), run.stdout


# ---- check-config: which kind of config -------------------------------------------------


@pytest.mark.parametrize("conf", CONFS, ids=lambda p: p.name)
def test_check_config_takes_every_shipped_example(conf: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    first, last = check_config(capsys, str(conf))
    assert last == "ok"
    kind = {"hub.toml": "hub config", "hub-cluster.toml": "hub config",
            "gateway.toml": "gateway config",
            "gateway-tail.example.toml": "gateway config"}.get(
        conf.name, "sources fragment")
    assert first.startswith(f"{conf}: checked as a {kind} (")
    assert "--kind" in first  # how to check it as another kind


def test_an_override_does_not_change_the_kind_of_a_file(
        capsys: pytest.CaptureFixture[str]) -> None:
    """--set hub.port=9000 on a gateway config is an unknown gateway key, not a reason to
    read the file as a hub config."""
    gateway = REPO / "conf" / "gateway.toml"
    assert main(["check-config", str(gateway), "--set", "hub.port=9000"]) == 2
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"{gateway}: hub: unknown key (allowed here: batch, gateway, queue, sources, spool, "
        "uplink)"]


@pytest.mark.parametrize(("text", "kind", "why"), [
    ('[hub]\nport = 9000\n', "hub config", "it has a [hub] table"),
    ('[gateways.ate-01]\ntoken = "t"\n', "hub config", "it has [gateways.<id>] tables"),
    ('[gateway]\nid = "a"\ntoken = "t"\n', "gateway config", "it has a [gateway] table"),
    ('[[sources]]\nname = "t"\ntype = "simulated"\n', "sources fragment",
     "it holds [[sources]] tables only"),
])
def test_check_config_says_why_it_took_a_file_for_its_kind(
        tmp_path: Path, text: str, kind: str, why: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    first, last = check_config(capsys, str(path))
    assert first.startswith(f"{path}: checked as a {kind} ({why}")
    assert last == "ok"


def test_kind_forces_the_reading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[gateway]\nid = "a"\ntoken = "t"\n')
    assert main(["check-config", str(path), "--kind", "hub"]) == 2
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: checked as a hub config (--kind hub)",
        f"{path}: gateway: unknown key (allowed here: alerts, auth, gateways, http, hub, live, "
        "tls)"]
    fragment = REPO / "conf" / "gateway-mqtt.example.toml"
    assert main(["check-config", str(fragment), "--kind", "gateway"]) == 2
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"{fragment}: gateway: required key is missing (expected a table)"]


def test_a_file_of_no_known_kind_says_so_and_how_to_choose(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[batch]\nmax_records = 5\n")
    assert main(["check-config", str(path)]) == 2
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{path}: not checked: it has no [gateway] table")
    assert line.endswith("--kind gateway|hub|sources chooses one")


def test_a_sources_fragment_is_checked_as_the_gateway_checks_its_sources(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[sources]]\nname = "t"\ntype = "simulated"\nsites = 0\n'
                    '[[sources]]\nname = "m"\ntype = "mqtt"\nport = 70000\n')
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"{path}: sources[0].sites: expected an integer 1 to 255, got integer 0",
        f"{path}: sources[1].port: expected an integer 1 to 65535, got integer 70000"]
    assert main(["check-config", str(path), "--kind", "sources", "--set", "batch.x=1"]) == 2
    assert f"{path}: batch: unknown key (a sources fragment holds [[sources]] tables only)" \
        in capsys.readouterr().out.splitlines()


def test_kinds_are_the_ones_the_help_names() -> None:
    kind = next(a for a in PARSERS["edgegw check-config"]._actions if a.dest == "kind")
    assert tuple(kind.choices or ()) == KINDS == ("gateway", "hub", "sources")
