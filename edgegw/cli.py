"""The ``edgegw`` command line.

Each subcommand lives in the module that owns its idea and registers itself through an
``add_commands(subparsers)`` function; this module only dispatches.  A command handler
returns the exit status.  Configuration errors exit with status 2 and one line per
problem; a service that cannot start exits with status 3 and one line; never a traceback
(docs/configuration.md, "Exit status").
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .config import ConfigError
from .startup import EXIT_CANNOT_START, EXIT_CONFIG, StartupError

#: modules that contribute subcommands (each has ``add_commands(subparsers)``)
COMMAND_MODULES = (
    "edgegw.commands",
    "edgegw.sim.cli",
    "edgegw.stdf.cli",
    "edgegw.plugins_cli",
    "edgegw.auth.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgegw",
        description="Edge gateway and hub for ATE test results and sensor feeds.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"edgegw: config error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as exc:
        print(f"edgegw: cannot start: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
