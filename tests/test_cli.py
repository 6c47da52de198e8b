"""The ``oobleck`` dispatcher: commands load lazily (``--help`` and analytic plans never import torch),
every command is listed with its help line, and errors and Ctrl-C keep their exit codes."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from oobleck import cli

ROOT = Path(__file__).resolve().parent.parent

#: runs in a fresh interpreter: a plan from --model, a plan from an analytic config, then --help
NO_TORCH_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys
    import oobleck.cli
    codes = []
    with contextlib.redirect_stdout(io.StringIO()):
        codes.append(oobleck.cli.main(["plan", "--model", "gpt2", "--nodes", "8", "--json"]))
        codes.append(oobleck.cli.main(["plan", "examples/gpt3-175b.yaml", "--json"]))
    help_text = io.StringIO()
    try:
        with contextlib.redirect_stdout(help_text):
            oobleck.cli.main(["--help"])
    except SystemExit as e:
        codes.append(e.code)
    print(json.dumps({"codes": codes, "torch": "torch" in sys.modules, "help": help_text.getvalue()}))
    """
)


def test_plan_and_help_do_not_import_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["codes"] == [0, 0, 0]
    assert not result["torch"], "an analytic `oobleck plan` or `oobleck --help` imported torch"
    help_text = " ".join(result["help"].split())  # argparse wraps long help lines
    for name, (_, help_line) in cli.COMMANDS.items():
        assert f"{name} {help_line}" in help_text


def test_every_command_module_is_in_the_table() -> None:
    package = ROOT / "oobleck" / "commands"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    listed = {module for module, _ in cli.COMMANDS.values()}
    assert modules <= listed, f"add {sorted(modules - listed)} to oobleck.cli.COMMANDS"


@pytest.mark.parametrize("name", cli.available())
def test_table_matches_the_command_modules(name: str) -> None:
    module_name, help_line = cli.COMMANDS[name]
    module = importlib.import_module(f"{cli.PACKAGE}.{module_name}")
    assert callable(module.add_arguments) and callable(module.run)
    assert getattr(module, "HELP", help_line) == help_line, "keep the module's HELP and cli.COMMANDS in step"


def test_a_command_not_built_yet_is_not_listed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(cli.COMMANDS, "later", ("no_such_command_module", "a command still being written"))
    assert "later" not in cli.available()
    with pytest.raises(SystemExit) as e:
        cli.main(["later"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'later'" in err[0]


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    plan = importlib.import_module(f"{cli.PACKAGE}.plan")

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(plan, "run", interrupted)
    assert cli.main(["plan", "--model", "gpt2", "--nodes", "8"]) == 130
    assert capsys.readouterr().err.strip() == "oobleck plan: interrupted"


def test_user_error_is_one_line_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:  # argparse checks the flag's range
        cli.main(["plan", "--model", "gpt2", "--nodes", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "oobleck plan: error: argument --nodes: got 0; must be in [1, 4096] (see --help)"
    assert cli.main(["plan", "--model", "gpt2", "--nodes", "2", "--f", "4"]) == 2
    assert capsys.readouterr().err.strip().startswith("oobleck plan: error: f=4 needs at least")


def test_multi_line_errors_print_as_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """torch's refusal of a pickled layer file spans several lines with terminal colours: the checkpoint error
    keeps one line of it, and the CLI folds any error that still spans several lines into one."""
    import torch

    from oobleck import checkpoint
    from oobleck.errors import OobleckError

    layer = checkpoint.layer_file(tmp_path, 0)
    layer.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": Path("/")}, layer)  # a PosixPath: weights_only loading refuses it
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_layer_state(tmp_path, 0)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    plan = importlib.import_module(f"{cli.PACKAGE}.plan")

    def fails(args: object) -> int:
        raise OobleckError("checkpoint X: cannot read layer_0000.pt (UnpicklingError: \x1b[1mWeights only load failed.\x1b[0m\n"
                           "Re-running `torch.load` with `weights_only` set to `False`\n\nmight work)")

    monkeypatch.setattr(plan, "run", fails)
    assert cli.main(["plan", "--model", "gpt2", "--nodes", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("oobleck plan: error: checkpoint "), err
    assert "\x1b" not in err and "Weights only load failed" in err and "might work" in err
