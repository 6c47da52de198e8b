"""The ``oobleck`` command line. Each subcommand lives in ``oobleck/commands/<module>.py`` and defines
``add_arguments(parser)`` and ``run(args) -> int``; its module docstring is the command's ``--help``
description, shown as plain text (:func:`plain_text`) with its line breaks and those of the parser's
epilog kept, so that example command lines are never wrapped. :data:`COMMANDS` names every subcommand with
its module and one-line help, so adding a command is one line there.

Only the module of the command being run is imported (``oobleck --help`` imports none): several commands
pull in torch, which costs seconds, and ``oobleck plan`` with an analytic profile needs none of it.

User errors (bad configs, profiles, impossible plans) print one line on stderr and exit with code 2;
Ctrl-C exits with code 130.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
from collections.abc import Sequence

from oobleck.errors import OobleckError, one_line
from planner.errors import PlanningError, ProfileError

USER_ERRORS = (OobleckError, PlanningError, ProfileError)

#: subcommand name -> (module under oobleck.commands, one-line help shown by ``oobleck --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("plan", "plan pipelines for a model and cluster (templates, instantiation, batch split, memory)"),
    "profile": ("profile", "profile the model's layers and cache the result"),
    "train-local": ("train_local", "train in a single process (the reference run)"),
    "run": ("run", "train a job on a cluster (local processes by default)"),
    "demo": ("demo", "train a tiny GPT on 5 local nodes, kill one, recover and check the losses"),
    "inject": ("inject", "kill, hang or add nodes of a running job"),
    "generate": ("generate", "continue text from a causal LM's checkpoint (family gpt or hf)"),
    "export": ("export", "write the whole model of a checkpoint (safetensors, or the library's own format)"),
    "sample": ("sample", "draw a PNG grid of samples from a diffusion model's checkpoint"),
}

PACKAGE = "oobleck.commands"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage dump is not one line; keep the exit code
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def plain_text(doc: str) -> str:
    """A docstring as a terminal shows it: reST inline literals lose their double backticks, and roles
    such as :func: or :mod: lose the role and backticks (with a leading ``~``, only the last dotted name
    stays), so that ``--help`` reads as plain text."""
    doc = re.sub(r":[a-z]+:`~[\w.]*?(\w+)`", r"\1", doc)
    doc = re.sub(r":[a-z]+:`([^`]+)`", r"\1", doc)
    return doc.replace("``", "")


def available() -> list[str]:
    """The commands of :data:`COMMANDS` whose module exists in this build (found without importing it)."""
    return [name for name, (module, _) in COMMANDS.items() if importlib.util.find_spec(f"{PACKAGE}.{module}")]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every available command listed; only ``command``'s module is imported, to add its
    arguments, description and handler (the other subparsers stay empty and are never parsed)."""
    parser = _Parser(
        prog="oobleck",
        description="Fault-tolerant pipeline-parallel training: plan, profile, train and recover from node failures.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in available():
        module_name, help_line = COMMANDS[name]
        p = sub.add_parser(name, help=help_line, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            module = importlib.import_module(f"{PACKAGE}.{module_name}")
            p.description = plain_text(module.__doc__ or "")
            module.add_arguments(p)
            p.set_defaults(handler=module.run)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand argparse will pick: the first word that is not an option (the top-level parser has
    no option that takes a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _check_flag_types(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse hands a flag whose value is ``--`` (``--nodes=--``) an empty list without calling its
    type: refuse any value of a bounded flag (:mod:`oobleck.bounds`) that its type did not produce."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    chosen = sub.choices.get(getattr(args, "command", None)) if sub is not None else None
    for action in chosen._actions if chosen is not None else ():
        kind = getattr(action.type, "produces", None)
        value = getattr(args, action.dest, None)
        if kind is not None and value is not None and not isinstance(value, kind):
            chosen.error(f"argument {'/'.join(action.option_strings)}: expected one value")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    prefix = f"oobleck {command}" if command in COMMANDS else "oobleck"
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        _check_flag_types(parser, args)
        return int(args.handler(args) or 0)
    except USER_ERRORS as e:
        print(f"{prefix}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
