"""Fuzzing the user's inputs: configs (valid ones mutated: wrong types, huge, negative and non-finite numbers,
empty strings, unknown and duplicate keys, deep nesting, binary bytes) and command lines (``oobleck plan``,
``--help`` of every command, ``oobleck inject`` with bad run directories).

Every run must exit 0, or print exactly one line on stderr and exit 2, within a time bound, and never
show a traceback. Runs go through ``oobleck.cli.main`` in-process (fast); a handful of real subprocess
runs show that the installed entry point behaves the same. ``make fuzz`` runs this file with many more
examples and fresh randomness (see tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from oobleck import cli
from oobleck.config import JobConfig
from tests.budget import examples

ROOT = Path(__file__).resolve().parent.parent
OOBLECK = Path(sys.executable).parent / "oobleck"
#: seconds any accepted or refused input may take (the largest accepted cluster plans in about a second)
TIME_BOUND_S = 5.0

#: a config that `oobleck plan` plans without torch (an analytic profile)
BASE: dict[str, Any] = {
    "model": {"family": "gpt", "preset": "gpt2"},
    "profile": {"source": "analytic"},
    "cluster": {"nodes": 8, "devices_per_node": 1, "device_memory_gib": 80},
    "training": {"global_batch": 32, "microbatch": 1},
    "fault_tolerance": {"f": 1},
}

SECTIONS = {f.name: f.type for f in dataclasses.fields(JobConfig)}
FIELDS = sorted(
    (section, f.name)
    for section, cls in (
        (name, getattr(JobConfig(), name).__class__) for name in SECTIONS if name not in ("faults", "trace")
    )
    for f in dataclasses.fields(cls)
)


def _deep(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


hostile_values = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, -1, 1, 2**31, 2**31 + 1, 2**53 + 1, 2**63, 4096, 4097, 10**6, 10**29]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e-300, 1e300, 1e29, 0.0, -0.0, 5e-324]),
    st.sampled_from(["", " ", "\t", "1e29", "nan", "inf", ".inf", "-1", "0x10", "yes", "\x00", "é", "127.0.0.1"]),
    st.text(max_size=12),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-3, 10), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    st.integers(5, 400).map(_deep),
)


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    raw = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "field", "field", "unknown", "section"]))
        if kind == "field":
            section, name = draw(st.sampled_from(FIELDS))
            if not isinstance(raw.get(section), dict):
                raw[section] = {}
            raw[section][name] = draw(hostile_values)
        elif kind == "unknown":
            section = draw(st.sampled_from(sorted(SECTIONS)))
            if not isinstance(raw.get(section), dict):
                raw[section] = {}
            raw[section][draw(st.text(min_size=1, max_size=6))] = 1
        else:
            raw[draw(st.sampled_from([*sorted(SECTIONS), "extra"]))] = draw(hostile_values)
    return raw


def _render(raw: dict[str, Any]) -> str:
    return yaml.safe_dump(raw, allow_unicode=True, sort_keys=False)


@st.composite
def config_texts(draw: st.DrawFn) -> bytes:
    """YAML of a mutated config, or text-level damage: a duplicate key, deep nesting, binary bytes."""
    how = draw(st.sampled_from(["yaml", "yaml", "yaml", "duplicate", "deep", "binary", "truncated"]))
    if how == "binary":
        return draw(st.binary(min_size=1, max_size=300))
    if how == "deep":
        depth = draw(st.integers(50, 5000))
        return ("model: {overrides: " + "[" * depth + "]" * depth + "}").encode()
    text = _render(draw(mutated_configs()))
    if how == "duplicate":
        section, name = draw(st.sampled_from(FIELDS))
        text += f"{section}: {{{name}: 1}}\n"  # the section again (a duplicate of it, or a first one)
    if how == "truncated":
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode("utf-8", "surrogatepass")


def _in_process(argv: list[str]) -> tuple[int, str, str, float]:
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse: --help (0), usage errors (2)
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue(), time.monotonic() - start


def _check(argv: list[str], code: int, err: str, elapsed: float, bound: float = TIME_BOUND_S) -> None:
    assert elapsed < bound, f"{argv}: took {elapsed:.1f} s"
    assert "Traceback" not in err, err[-2000:]
    if code == 0:
        return
    lines = err.splitlines()
    assert code == 2, f"{argv}: exit {code}: {err[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("oobleck"), f"{argv}: {err!r}"


def _run(argv: list[str], bound: float = TIME_BOUND_S) -> tuple[int, str]:
    code, _, err, elapsed = _in_process(argv)
    _check(argv, code, err, elapsed, bound)
    return code, err


#: commands whose module imports torch: the first import takes seconds on a loaded machine
TORCH_IMPORT_S = 60.0


# ---------------------------------------------------------------------------------------------------
# Configs


@settings(max_examples=examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@example(text=b"cluster:\n  nodes: 4\n  nodes: 8\n")
@example(text=b"cluster:\n  nodes: 100000000000000000000000000000\n")
@example(text=b"training:\n  lr: .inf\n")
@example(text=b"fault_tolerance:\n  heartbeat_interval_s: 1.0e-300\n")
@example(text=("model: {overrides: " + "[" * 3000 + "]" * 3000 + "}").encode())
@example(text=bytes(range(256)))
@given(text=config_texts())
def test_any_config_plans_or_fails_in_one_line(tmp_path_factory: pytest.TempPathFactory, text: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "job.yaml"
    path.write_bytes(text)
    # --model: an analytic profile whatever the config says (a measured one would profile with torch)
    _run(["plan", str(path), "--model", "gpt2", "--json"])


# ---------------------------------------------------------------------------------------------------
# Command lines

numbers = st.one_of(
    st.integers(-5, 5000).map(str),
    st.sampled_from(["0", "-1", "4096", "4097", "1000000", "2147483648", "2147483649", "99999999999999999999999", "9" * 5000]),
    st.sampled_from(["", "x", "1.5", "1e3", "nan", "inf", "0x10", " 3", "--"]),
)
PLAN_FLAGS = ["--nodes", "--devices-per-node", "--f", "--global-batch", "--microbatch"]


@st.composite
def plan_lines(draw: st.DrawFn) -> list[str]:
    argv = ["plan", "--model", draw(st.sampled_from(["gpt2", "gpt3-125m", "gpt3-1.3b", "dit-s/2", "nope", ""]))]
    flags = {"--nodes": draw(st.integers(1, 64).map(str))}
    for flag in draw(st.lists(st.sampled_from(PLAN_FLAGS), max_size=4)):
        flags[flag] = draw(numbers)
    for flag, value in flags.items():
        argv += [f"{flag}={value}"]
    if draw(st.booleans()):
        argv += ["--recompute", draw(st.sampled_from(["auto", "none", "full", "some"]))]
    return [*argv, "--json"]


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(argv=["plan", "--model", "gpt3-1.3b", "--nodes", "4", "--global-batch", "99999999999999999999999", "--json"])
@example(argv=["plan", "--model", "gpt3-1.3b", "--nodes", "1000000", "--json"])
@example(argv=["plan", "--model", "gpt2", "--nodes=--", "--json"])
@example(argv=["plan", "--model", "gpt3-1.3b", "--nodes", "4096", "--devices-per-node", "1", "--json"])
@example(argv=["plan", "--model", "gpt3-1.3b", "--nodes", "4", "--global-batch", "2147483648", "--json"])
@given(argv=plan_lines())
def test_any_plan_command_line_plans_or_fails_in_one_line(argv: list[str]) -> None:
    _run(argv)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_of_every_command(command: str) -> None:
    code, err = _run([command, "--help"], TORCH_IMPORT_S)
    assert code == 0 and err == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["profile", "/nonexistent/job.yaml"],
        ["train-local", "/nonexistent/job.yaml", "--steps", "0"],
        ["train-local", "/nonexistent/job.yaml", "--steps", "99999999999"],
        ["run", "/nonexistent/job.yaml", "--nodes", "1000000"],
        ["run", "/nonexistent/job.yaml"],
        ["inject", "/nonexistent", "--kill", "node0", "--timeout", "inf"],
        ["inject", "/nonexistent", "--kill", "node0", "--worker", "-1"],
        ["demo", "--no-such-flag"],
        ["nosuchcommand"],
        [],
    ],
)
def test_commands_that_would_train_fail_before_training(argv: list[str]) -> None:
    code, _ = _run(argv, TORCH_IMPORT_S)
    assert code == 2


control_contents = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=50).map(str.encode),
    st.builds(
        lambda master, token: json.dumps({"master": master, "token_file": token}).encode(),
        st.one_of(st.sampled_from(["127.0.0.1:9", "", "x", "[::1]:0"]), st.integers(), st.none()),
        st.one_of(st.sampled_from(["{token}", "token", "", "/nonexistent/token", "/etc/passwd"]), st.integers(), st.none()),
    ),
    st.integers(5, 3000).map(lambda depth: ("[" * depth + "]" * depth).encode()),
)


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(content=control_contents, token_mode=st.sampled_from([0o600, 0o400, 0o644, 0o666]), control_mode=st.sampled_from([0o644, 0o600, 0o664, 0o666]))
def test_inject_with_bad_run_dirs(tmp_path_factory: pytest.TempPathFactory, content: bytes, token_mode: int, control_mode: int) -> None:
    base = tmp_path_factory.mktemp("inject")
    run, secret = base / "run", base / "secret"
    run.mkdir()
    secret.mkdir(mode=0o700)
    token = secret / "token"
    token.write_text("t0ken")
    token.chmod(token_mode)
    control = run / "control.json"
    control.write_bytes(content.replace(b"{token}", str(token).encode()))
    control.chmod(control_mode)
    code, err = _run(["inject", str(run), "--kill", "node0", "--timeout", "0.05"])
    assert code == 2  # nothing listens: even a trusted control file ends in one line
    if control_mode & 0o022 or (b"{token}" in content and token_mode & 0o077):
        assert "RUN_DIR" in err


# ---------------------------------------------------------------------------------------------------
# The real entry point


def test_real_entry_point_behaves_the_same(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    nested = tmp_path / "nested.yaml"
    nested.write_text("[" * 3000 + "]" * 3000)
    run = tmp_path / "run"
    run.mkdir()
    (run / "control.json").write_text(json.dumps({"master": "127.0.0.1:9", "token_file": "/etc/passwd"}))
    os.chmod(run / "control.json", 0o666)
    lines = [
        ["plan", "--model", "gpt3-1.3b", "--nodes", "4", "--global-batch", "99999999999999999999999"],
        ["plan", "--model", "gpt3-1.3b", "--nodes", "1000000"],
        ["plan", str(binary)],
        ["plan", str(nested)],
        ["plan", "--model", "gpt3-1.3b", "--nodes", "4", "--profile", str(binary)],
        ["inject", str(run), "--kill", "node0"],
    ]
    entry = [str(OOBLECK)] if OOBLECK.exists() else [sys.executable, "-m", "oobleck.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    procs = [subprocess.Popen([*entry, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in lines]
    try:
        for argv, proc in zip(lines, procs):
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err[-1000:])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # six interpreters started at once on a shared 2-core machine; each alone takes about a second
    assert time.monotonic() - start < 60
