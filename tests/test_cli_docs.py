"""``oobleck COMMAND --help`` against the manual: for every command, the flags argparse knows are exactly the
flags docs/cli.md documents for it (its section's flag table, and its heading's synopsis unless that says
``[flags]``), and every flag the README or docs/cli.md's examples pass to a command exists. The help itself
is plain text (no reST markup) and keeps its example command lines whole."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

import pytest

from oobleck.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = ROOT / "docs" / "cli.md"
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _parser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def parser_flags(command: str) -> set[str]:
    """The long options of ``command`` (``--help`` aside)."""
    return {o for a in _parser(command)._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def doc_sections() -> dict[str, str]:
    """docs/cli.md's section of each command: the text from its ``## `oobleck COMMAND ...``` heading to the
    next heading of that level."""
    sections: dict[str, str] = {}
    for part in re.split(r"^(?=## )", CLI_DOC.read_text(encoding="utf-8"), flags=re.M):
        heading = re.match(r"## `oobleck ([a-z-]+)", part)
        if heading:
            sections[heading.group(1)] = part
    return sections


def table_flags(section: str) -> set[str]:
    """The flags in the first cell of the section's table rows."""
    return {flag for row in re.findall(r"^\| `([^`]*)`", section, flags=re.M) for flag in _FLAG.findall(row)}


def examples(text: str, command: str) -> list[str]:
    """Lines of code in ``text`` that run ``oobleck COMMAND`` (from the command name on, comments cut)."""
    found = re.findall(rf"(?:^|[\s`/])oobleck {re.escape(command)}(?![\w-])([^\n`#]*)", text, flags=re.M)
    return [f"oobleck {command}{rest}" for rest in found]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_flag_table_matches_the_parser(command: str) -> None:
    section = doc_sections().get(command)
    assert section is not None, f"docs/cli.md has no section for `oobleck {command}`"
    known, documented = parser_flags(command), table_flags(section)
    assert documented == known, (
        f"oobleck {command}: undocumented {sorted(known - documented)}, documented but unknown {sorted(documented - known)}"
    )


@pytest.mark.parametrize("command", list(COMMANDS))
def test_synopsis_lists_every_flag(command: str) -> None:
    heading = doc_sections()[command].splitlines()[0]
    listed = set(_FLAG.findall(heading))
    if "[flags]" in heading:
        assert listed <= parser_flags(command), heading
    else:
        assert listed == parser_flags(command), f"{heading}: missing {sorted(parser_flags(command) - listed)}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_flags_in_the_readme_and_examples_exist(command: str) -> None:
    uses = examples((ROOT / "README.md").read_text(encoding="utf-8"), command)
    uses += examples(re.sub(r"^## .*$", "", CLI_DOC.read_text(encoding="utf-8"), flags=re.M), command)
    unknown = {flag for line in uses for flag in _FLAG.findall(line)} - parser_flags(command) - {"--help"}
    assert not unknown, f"oobleck {command}: {sorted(unknown)} used in the docs but unknown to the parser"


def _help(command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return out.getvalue()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_is_plain_text(command: str) -> None:
    text = _help(command)
    assert "`" not in text and not re.search(r":(func|mod|class|data|meth):", text), text


def test_help_keeps_example_lines_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from oobleck.commands.plan import EXAMPLES

    monkeypatch.setenv("COLUMNS", "60")  # narrower than every example: argparse would wrap them
    lines = [line.strip() for line in _help("plan").splitlines()]
    assert all(example in lines for example in EXAMPLES), lines


def test_the_demo_takes_the_same_time_everywhere() -> None:
    """``oobleck demo --help``, the README and docs/cli.md state one duration for the demo."""
    said = re.compile(r"takes about (\d+) s on two\s+idle cores")
    texts = {"--help": _help("demo"), "README.md": (ROOT / "README.md").read_text(), "cli.md": CLI_DOC.read_text()}
    durations = {name: said.findall(text) for name, text in texts.items()}
    assert all(len(found) == 1 for found in durations.values()), durations
    assert len({found[0] for found in durations.values()}) == 1, durations


def test_the_comparison_sees_a_missing_flag() -> None:
    """The helpers find what a drifted manual would lack: the run table's rows without --address."""
    section = doc_sections()["run"]
    assert "--address" in table_flags(section)
    pruned = "\n".join(line for line in section.splitlines() if not line.startswith("| `--address"))
    assert parser_flags("run") - table_flags(pruned) == {"--address"}
