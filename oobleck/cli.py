"""The ``oobleck`` command line. Each subcommand lives in ``oobleck/commands/<name>.py`` and defines
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.

User errors (bad configs, profiles, impossible plans) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from oobleck.errors import OobleckError
from planner.errors import PlanningError, ProfileError

USER_ERRORS = (OobleckError, PlanningError, ProfileError)

#: subcommand name -> module under oobleck.commands
COMMANDS = {
    "plan": "plan",
    "profile": "profile",
    "train-local": "train_local",
    "run": "run",
    "demo": "demo",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage dump is not one line; keep the exit code
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="oobleck",
        description="Fault-tolerant pipeline-parallel training: plan, profile, train and recover from node failures.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"oobleck.commands.{module_name}")
        except ModuleNotFoundError as e:
            if e.name != f"oobleck.commands.{module_name}":
                raise
            continue  # a command not built yet
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as e:
        print(f"oobleck {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"oobleck {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
