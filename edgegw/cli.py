"""The ``edgegw`` command line.

Each subcommand lives in the module that owns its idea and registers itself through an
``add_commands(subparsers)`` function; this module only dispatches.  ``main`` builds (and
imports) only the parsers of the module of the command it is given (``COMMANDS``): the
whole tree takes a few ms, more than ``edgegw stdf stats`` needs for a small file.  A
command handler returns the exit status.  Configuration errors exit with status 2 and one
line per problem; a service that cannot start exits with status 3 and one line; never a
traceback (docs/configuration.md, "Exit status").
"""

from __future__ import annotations

import argparse
import gettext
import importlib
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

#: modules that contribute subcommands (each has ``add_commands(subparsers)``)
COMMAND_MODULES = (
    "edgegw.commands",
    "edgegw.sim.cli",
    "edgegw.stdf.cli",
    "edgegw.plugins_cli",
    "edgegw.token_cli",
    "edgegw.deadletters_cli",
    "edgegw.status_cli",
)

#: the commands a SIGHUP reloads (edgegw/sighup.py)
TAKES_SIGHUP = ("hub", "gateway")

#: command word -> the module of ``COMMAND_MODULES`` that adds it (tests/test_cli.py holds
#: the two to each other): ``main`` builds that module's parsers only
COMMANDS = {
    "hub": "edgegw.commands",
    "gateway": "edgegw.commands",
    "check-config": "edgegw.commands",
    "demo": "edgegw.commands",
    "simulate": "edgegw.sim.cli",
    "stdf": "edgegw.stdf.cli",
    "plugins": "edgegw.plugins_cli",
    "token": "edgegw.token_cli",
    "dead-letters": "edgegw.deadletters_cli",
    "status": "edgegw.status_cli",
}


class HelpFormatter(argparse.HelpFormatter):
    """Wraps the paragraphs of a description or epilog to the terminal, and keeps indented
    lines (the examples) as written."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        # argparse makes a formatter at every add_argument and imports shutil (with bz2,
        # lzma, fnmatch) for the terminal's width: the same width, found without it
        if width is None:
            width = _terminal_columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        for para in text.split("\n\n"):
            lines = para.splitlines()
            if lines and all(line.startswith(" ") for line in lines[1:]):
                head = super()._fill_text(lines[0], width, indent) if lines[0] else ""
                out.append("\n".join([head, *(indent + line for line in lines[1:])]).lstrip("\n"))
            else:
                out.append(super()._fill_text(para, width, indent))
        return "\n\n".join(out)


#: the terminal's width while ``build_parser`` runs (0: ask)
_columns = 0


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else the terminal's, else 80."""
    if _columns:
        return _columns
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class Parser(argparse.ArgumentParser):
    """Every parser of the command tree: wraps help pages but keeps their examples, and
    takes the global options (``-v``) after any subcommand as well as before it.

    argparse fills each subcommand's options into a fresh namespace and copies it over the
    parent's, so one shared counter would lose the ``-v`` given before the subcommand:
    each parser counts into its own attribute and ``verbosity`` adds them up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                          dest=f"{_VERBOSE}{len(self.prog.split())}",
                          help="more logging: -v info, -vv debug (before or after the "
                               "subcommand)")


_VERBOSE = "verbose_"


def verbosity(args: argparse.Namespace) -> int:
    """How many ``-v`` were given, wherever they were on the command line."""
    return sum(v for k, v in vars(args).items() if k.startswith(_VERBOSE))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # only for --version

    try:
        return version("edgegw")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


class _VersionAction(argparse._VersionAction):
    """``--version``: the package metadata is read only when it is asked for."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        self.version = f"edgegw {_version()}"
        super().__call__(parser, namespace, values, option_string)


#: options of the top-level parser that may come before a command word without changing
#: what the parser does with it (``-h`` or ``--version`` there need every command)
_LEADING = re.compile(r"-v+|--verbose")


def command_of(argv: Sequence[str]) -> str | None:
    """The command word of ``argv`` when only its module's parsers are needed to parse
    it; None when the whole tree is (no command, an unknown one, ``-h`` or an
    abbreviated option before it)."""
    for arg in argv:
        if arg in COMMANDS:
            return arg
        if not _LEADING.fullmatch(arg):
            return None
    return None


def build_parser(command: str | None = None,
                 action: str | None = None) -> argparse.ArgumentParser:
    """The ``edgegw`` parser: every command, or (``command``, a key of ``COMMANDS``) only
    those of its module -- the same parsers, the others left out; ``action``: the word
    after the command, when it is one of its module's ``ACTIONS`` only that action's
    parser under it (``edgegw stdf stats``)."""
    # argparse translates its own words ("options", "show this help message and exit")
    # through gettext.gettext, which searches the disk for the catalogue at every call:
    # half the time of building a parser.  The catalogue cannot change while the tree is
    # built: it is looked up once (as gettext.dgettext does it) and its gettext used.
    # The terminal's width, which argparse asks for at every argument, likewise.
    global _columns
    plain = argparse._  # type: ignore[attr-defined]
    domain = gettext.textdomain()
    catalogue = gettext.translation(domain, gettext.bindtextdomain(domain), fallback=True)
    argparse._ = catalogue.gettext  # type: ignore[attr-defined]
    _columns = _terminal_columns()
    try:
        return _build_parser(command, action)
    finally:
        argparse._ = plain  # type: ignore[attr-defined]
        _columns = 0


def _build_parser(command: str | None, action: str | None) -> argparse.ArgumentParser:
    parser = Parser(
        prog="edgegw",
        description="Edge gateway and hub for ATE test results and sensor feeds: a gateway "
                    "beside each tester streams its STDF results and sensor readings to a "
                    "hub, which applies each record exactly once and serves a live "
                    "dashboard.",
        epilog="Start with `edgegw demo`; `edgegw COMMAND --help` describes each command.\n"
               "Docs: README.md and docs/ (configuration.md has every config key).",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    for name in COMMAND_MODULES if command is None else (COMMANDS[command],):
        module = importlib.import_module(name)
        if action is not None and action in getattr(module, "ACTIONS", ()):
            module.add_commands(sub, only=action)
        else:
            module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    command = command_of(argv)
    if command in TAKES_SIGHUP:  # their reload: a SIGHUP while they start is kept for it
        from .sighup import hold_sighup

        hold_sighup()
    after = list(argv).index(command) + 1 if command is not None else len(argv)
    parser = build_parser(command, argv[after] if after < len(argv) else None)
    args = parser.parse_args(argv)
    # a command module that never logs says so (``LOGS = False``: ``edgegw stdf``), and
    # its commands start without importing and setting up logging
    if command is None or getattr(sys.modules[COMMANDS[command]], "LOGS", True):
        import logging

        level = logging.WARNING - 10 * verbosity(args)
        logging.basicConfig(level=max(level, logging.DEBUG),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        status = _exit_status(exc)
        if status is None:
            raise
        return status


def _exit_status(exc: Exception) -> int | None:
    """The exit status of a configuration error or a service that cannot start, after
    printing it; None for any other exception.  Their modules (and what they import)
    are looked up, not imported: a command that never loaded them cannot have raised
    their errors, and ``edgegw stdf stats`` starts faster without them."""
    config = sys.modules.get("edgegw.config")
    if config is not None and isinstance(exc, config.ConfigError):
        for line in exc.errors:
            print(f"edgegw: config error: {line}", file=sys.stderr)
        from .startup import EXIT_CONFIG

        return EXIT_CONFIG
    startup = sys.modules.get("edgegw.startup")
    if startup is not None and isinstance(exc, startup.StartupError):
        print(f"edgegw: cannot start: {exc}", file=sys.stderr)
        return int(startup.EXIT_CANNOT_START)
    if startup is not None and isinstance(exc, startup.ServiceFailed):
        print(f"edgegw: stopped: {exc}", file=sys.stderr)
        return int(startup.EXIT_FAILED)
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["COMMANDS", "COMMAND_MODULES", "build_parser", "command_of", "main", "verbosity"]
