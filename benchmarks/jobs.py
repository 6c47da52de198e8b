"""The one home of job launching for the benchmarks and the tests (``tests/run_helpers.py`` adds only
its assertions): the tiny float64 GPT job, its config file, ``oobleck run`` and ``oobleck train-local`` as
tagged subprocesses, the comparison of a run with the single-process reference, and a sampler of the job's
processes and TCP sockets.

Every process a job starts inherits ``OOBLECK_BENCH_TAG`` (a fresh value per job), which is how the
benchmarks find them (to sample them, to kill one node's agent, and to check that none outlives the run),
without touching any other process of the machine.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
TAG_ENV = "OOBLECK_BENCH_TAG"
#: device memory that makes the tiny GPT plan with n0 = 2 (two-stage pipelines, so failures move layers)
SMALL_DEVICE_GIB = 0.002


#: a profile's timing for jobs whose plan depends on memory, not on the layers' times: one timed round
QUICK_PROFILE = {"warmup": 0, "repeats": 1, "seconds": 0}


def tiny_gpt(
    profile_dir: Path,
    nodes: int,
    steps: int,
    *,
    layers_move: bool = True,
    f: int = 1,
    faults: list[dict[str, Any]] | None = None,
    trace: dict[str, Any] | None = None,
    init_checkpoint: str | None = None,
    heartbeat_timeout_s: float = 5.0,
) -> dict[str, Any]:
    """The tiny float64 GPT job of the benchmarks and the ``oobleck run`` tests, small enough for 5 CPU
    processes on 2 cores: 6 layers (d_model 32, 2 heads, seq_len 16), global batch 16 in microbatches of 2
    (8 a step), on ``nodes`` CPU nodes of one device each. With ``layers_move`` the planner sees 2 MiB
    devices (:data:`SMALL_DEVICE_GIB`) and picks n0 = 2. ``faults``, ``trace`` and ``init_checkpoint`` are
    set only when given."""
    cluster: dict[str, Any] = {"nodes": nodes, "devices_per_node": 1, "device": "cpu"}
    if layers_move:
        cluster["device_memory_gib"] = SMALL_DEVICE_GIB
    raw: dict[str, Any] = {
        "model": {"family": "gpt", "preset": "tiny", "dtype": "float64", "overrides": {"d_model": 32, "n_head": 2, "seq_len": 16}},
        "data": {"dataset": "pydoc"},
        "training": {"steps": steps, "global_batch": 16, "microbatch": 2, "lr": 1e-3, "seed": 3},
        "cluster": cluster,
        "fault_tolerance": {"f": f, "heartbeat_interval_s": 0.1, "heartbeat_timeout_s": heartbeat_timeout_s},
        "profile": {"cache_dir": str(profile_dir), **QUICK_PROFILE},
    }
    if faults:
        raw["faults"] = faults
    if trace:
        raw["trace"] = trace
    if init_checkpoint:
        raw["model"]["init_checkpoint"] = init_checkpoint
    return raw


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def tagged(tag: str, env: str = TAG_ENV) -> list[psutil.Process]:
    """Live processes (not zombies) whose environment variable ``env`` carries ``tag``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(env) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_tagged(tag: str, env: str = TAG_ENV, timeout_s: float = 10) -> list[int]:
    """SIGKILL every live process whose ``env`` carries ``tag`` and wait up to ``timeout_s`` for them to
    go; returns their pids."""
    left = tagged(tag, env)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=timeout_s)
    return [p.pid for p in left]


@dataclass
class Job:
    """One ``oobleck run`` in the background; its output goes to ``log``."""

    proc: subprocess.Popen
    tag: str
    run_dir: Path
    log: Path
    #: time.time() just before the process was started
    launched_at: float

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError(f"oobleck run did not finish within {timeout_s:g} s (log: {self.log})") from None

    def stop(self) -> None:
        """SIGTERM the run (it stops its agents and workers), then SIGKILL whatever of this job is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reap()

    def reap(self) -> list[int]:
        """SIGKILL every process of this job still alive (there should be none); returns their pids."""
        return kill_tagged(self.tag)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def agent(self, node: str) -> psutil.Process | None:
        """The agent process of ``node`` (found by its command line among this job's processes)."""
        for proc in tagged(self.tag):
            try:
                cmd = proc.cmdline()
            except psutil.Error:
                continue
            if "oobleck.control.agent" in cmd and node in cmd and cmd[cmd.index(node) - 1] == "--node":
                return proc
        return None


def cli_command(*args: str) -> list[str]:
    """``python -m oobleck.cli ARGS...`` with this interpreter."""
    return [sys.executable, "-m", "oobleck.cli", *args]


def start_tagged(cmd: Sequence[str], env: str = TAG_ENV, **popen: Any) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` in the repository root with a fresh tag (a uuid4 hex) in the environment variable
    ``env``; every process it starts inherits it, which is how :func:`tagged` finds them. ``popen`` goes to
    :class:`subprocess.Popen` (output redirection, ``text``). Returns the process and its tag."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(list(cmd), cwd=ROOT, env=dict(os.environ, **{env: tag}), **popen)
    return proc, tag


def run_command(config: Path, run_dir: Path, *extra: str) -> list[str]:
    """``oobleck run CONFIG --run-dir RUN_DIR EXTRA...`` as a command line."""
    return cli_command("run", str(config), "--run-dir", str(run_dir), *extra)


def launch(config: Path, run_dir: Path, *extra: str) -> Job:
    """``oobleck run CONFIG --run-dir RUN_DIR EXTRA...`` in the background, tagged (:data:`TAG_ENV`), its
    output in ``RUN_DIR.out`` beside the run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.out"
    with open(log, "w") as out:
        launched_at = time.time()
        proc, tag = start_tagged(run_command(config, run_dir, *extra), stdout=out, stderr=subprocess.STDOUT)
    return Job(proc, tag, run_dir, log, launched_at)


def train_reference(config: Path, run_dir: Path, timeout_s: float = 1800) -> Path:
    """``oobleck train-local CONFIG --run-dir RUN_DIR`` (one torch thread); returns the run directory."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = cli_command("train-local", str(config), "--run-dir", str(run_dir))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"oobleck train-local failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return run_dir


def non_step_lines(output: str, last: int) -> list[str]:
    """The last ``last`` lines of a run's output without its per-step lines (those starting ``step ``): what
    the launcher, the master and the agents said."""
    return [line for line in output.splitlines() if not line.startswith("step ")][-last:]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line being written right now
                break
    return rows


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from ``RUN/metrics.jsonl``; a step committed twice (re-run after a checkpoint restore)
    keeps its last loss."""
    return {int(r["step"]): float(r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl")}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def param_rel_diff(ckpt: Path, reference: Path) -> tuple[float, int]:
    """The largest ``||a - b|| / ||b||`` over every parameter and buffer of every layer of two checkpoints,
    and the number of tensors compared."""
    import torch

    from oobleck import checkpoint

    meta = checkpoint.read_meta(reference)
    worst, count = 0.0, 0
    for index in range(int(meta["num_layers"])):
        ours = checkpoint.load_layer_state(ckpt, index)["params"]
        theirs = checkpoint.load_layer_state(reference, index)["params"]
        if set(ours) != set(theirs):
            raise AssertionError(f"layer {index}: tensors {sorted(ours)} != {sorted(theirs)}")
        for key, want in theirs.items():
            got = ours[key]
            if not torch.is_floating_point(want):
                worst = max(worst, 0.0 if torch.equal(got, want) else math.inf)
            else:
                norm = float(torch.linalg.vector_norm(want.double()))
                diff = float(torch.linalg.vector_norm(got.double() - want.double()))
                worst = max(worst, diff / max(norm, 1e-300))
            count += 1
    return worst, count


def compare_with_reference(run_dir: Path, reference_dir: Path, steps: int, first_step: int = 0) -> dict[str, Any]:
    """How far ``oobleck run``'s losses (of steps ``[first_step, steps)``) and parameters after ``steps`` steps
    are from ``oobleck train-local``'s (whose run must hold a checkpoint of step ``steps``)."""
    from oobleck import checkpoint

    ours = step_losses(run_dir)
    theirs = step_losses(reference_dir)
    missing = [s for s in range(first_step, steps) if s not in ours]
    rel = [_rel(ours[s], theirs[s]) for s in range(first_step, steps) if s in ours]
    final = checkpoint.checkpoint_dir(run_dir, steps)
    param_diff, tensors = (math.inf, 0)
    if checkpoint.is_complete(final):
        param_diff, tensors = param_rel_diff(final, checkpoint.checkpoint_dir(reference_dir, steps))
    return {
        "steps_compared": len(rel),
        "missing_steps": missing,
        "max_loss_rel_diff": max(rel) if rel else math.inf,
        "max_param_rel_diff": param_diff,
        "tensors_compared": tensors,
        "final_checkpoint": str(final),
    }


def matches(comparison: dict[str, Any], tol: float = 1e-9) -> bool:
    return (
        not comparison["missing_steps"]
        and comparison["max_loss_rel_diff"] < tol
        and comparison["max_param_rel_diff"] < tol
    )


@dataclass
class Sample:
    t: float
    processes: int
    sockets: int
    #: of which listening sockets
    listening: int
    #: what ``Sampler.label`` returned at the time (e.g. the job's generation), if anything
    label: Any = None
    #: of the sockets, those whose peer has closed its end while this one is still open (CLOSE_WAIT): a
    #: socket of an ended generation that nobody closed stays in this state
    close_wait: int = 0


@dataclass
class Sampler:
    """Counts the job's processes and open TCP sockets every ``interval_s`` from a background thread;
    ``label`` (optional) names the job's state at each sample."""

    tag: str
    interval_s: float = 1.0
    label: Callable[[], Any] | None = None
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            procs = tagged(self.tag)
            sockets = listening = close_wait = 0
            for proc in procs:
                try:
                    conns = proc.net_connections(kind="tcp")
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                sockets += len(conns)
                listening += sum(1 for c in conns if c.status == psutil.CONN_LISTEN)
                close_wait += sum(1 for c in conns if c.status == psutil.CONN_CLOSE_WAIT)
            label = self.label() if self.label is not None else None
            now = time.monotonic() - self._start
            self.samples.append(Sample(now, len(procs), sockets, listening, label, close_wait))
            self._stop.wait(self.interval_s)

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join()
        return self.samples


def first_generation_ready(job: Job, timeout_s: float = 600) -> dict[str, Any]:
    """When every worker of the job's first generation was ready to train, read from the master's store.

    Each worker writes ``gen1/timing/r{rank}`` (``join_s``, ``transfer_s``, ``resumed_at``) once it has joined
    the process group and taken its layers (the same timestamp a recovery record's ``resume_s`` ends at). The
    store is the one TCP port the ``oobleck run`` process listens on besides the master's gRPC port
    (``RUN/control.json``). The keys are read once step 0 is committed (then every rank has written its key),
    so the job must run a few steps more than that. Their values are signed: they are verified with the job's
    token (the file ``RUN/control.json`` names)."""
    from torch.distributed import TCPStore

    from oobleck.control.channel import read_token
    from oobleck.engine.signed_store import SignedStore, store_key
    from oobleck.engine.store_keys import timing_key

    deadline = time.monotonic() + timeout_s
    control = job.run_dir / "control.json"
    store_port = None
    token_file = ""
    committed_at = None
    while time.monotonic() < deadline and job.proc.poll() is None:
        if store_port is None and control.exists():
            try:
                written = json.loads(control.read_text())
                grpc_port = int(written["master"].rsplit(":", 1)[1])
                token_file = written["token_file"]
                ports = {
                    c.laddr.port
                    for c in psutil.Process(job.proc.pid).net_connections(kind="tcp")
                    if c.status == psutil.CONN_LISTEN
                }
                others = ports - {grpc_port}
                if len(others) == 1:
                    store_port = others.pop()
            except (ValueError, KeyError, psutil.Error):
                pass
        if read_jsonl(job.run_dir / "metrics.jsonl"):
            committed_at = time.time()
            break
        time.sleep(0.01)
    if store_port is None or committed_at is None:
        raise RuntimeError(f"the job's first step was not committed within {timeout_s:g} s (log: {job.log})")
    base = TCPStore("127.0.0.1", store_port, is_master=False, timeout=timedelta(seconds=10))
    store = SignedStore(base, store_key(read_token(token_file)), "gen1/")
    timings = []
    rank = 0
    while (raw := store.get(timing_key(rank))) is not None:
        timings.append(json.loads(raw))
        rank += 1
    if not timings:
        raise RuntimeError("no gen1 timing keys in the master's store")
    ready = max(t["resumed_at"] for t in timings)
    return {
        "world_size": len(timings),
        "ready_s": ready - job.launched_at,
        "first_commit_seen_s": committed_at - job.launched_at,
        "slowest_join_s": max(t["join_s"] for t in timings),
        "slowest_layers_s": max(t["transfer_s"] for t in timings),
    }


def machine_info() -> dict[str, Any]:
    import torch

    mem = psutil.virtual_memory()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "git_head": commit,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(mem.total / 2**30, 1),
        "available_gib_at_start": round(mem.available / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_1m_at_start": os.getloadavg()[0],
    }


def median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else math.nan


#: the bound on one recovery from memory (issue 17: kill or ready join to training)
MEMORY_RECOVERY_BOUND_S = 1.0


def recovery_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's recovery records summed up: the longest recovery from memory (``total_s``, None without one)
    and how many took over :data:`MEMORY_RECOVERY_BOUND_S`; each joined node's ready-to-training seconds
    (the records' ``joined_ready_s``, in record order), their median (None without a join) and how many
    generations folded more than one node in."""
    memory = [r["total_s"] for r in records if r["mode"] == "memory"]
    times = [t for r in records for t in r.get("joined_ready_s", [])]
    return {
        "memory_recovery_max_s": max(memory, default=None),
        "memory_recoveries_over_1s": sum(t > MEMORY_RECOVERY_BOUND_S for t in memory),
        "join_ready_to_training_s": times,
        "join_ready_to_training_median_s": median(times) if times else None,
        "generations_folding_several_joins": sum(len(r["joined"]) > 1 for r in records),
    }


def recovery_lines(figures: dict[str, Any]) -> list[str]:
    """The summary lines of :func:`recovery_figures`."""
    longest = figures["memory_recovery_max_s"]
    lines = [
        "recoveries from memory: none"
        if longest is None
        else f"recoveries from memory: longest {longest * 1000:.0f} ms; "
        f"{figures['memory_recoveries_over_1s']} over {MEMORY_RECOVERY_BOUND_S:g} s"
    ]
    times = figures["join_ready_to_training_s"]
    if not times:
        return lines + ["joins: none folded in"]
    return lines + [
        f"joins ready-to-training: median {figures['join_ready_to_training_median_s'] * 1000:.0f} ms, "
        f"max {max(times) * 1000:.0f} ms over {len(times)} joined nodes; "
        f"{figures['generations_folding_several_joins']} generations folded several nodes in"
    ]


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """The closing lines of a checking benchmark's summary: its comparison with train-local
    (``report["reference"]``, from :func:`compare_with_reference`), the job's failure if any, and the checks."""
    r = report["reference"]
    lines = [
        f"vs train-local: {r['steps_compared']} steps, max relative difference {r['max_loss_rel_diff']:.1e} (losses), "
        f"{r['max_param_rel_diff']:.1e} (final parameters, {r['tensors_compared']} tensors)"
    ]
    if report.get("failure"):
        lines.append("the job FAILED: " + " | ".join(report["failure"][-3:]))
    lines.append(
        "checks: " + ", ".join(f"{name} {'ok' if ok else 'FAILED'}" for name, ok in report["checks"].items())
        + f" -> {'PASSED' if report['passed'] else 'FAILED'}"
    )
    return lines


def bad_flag(prog: str, checks: Sequence[tuple[str, Any, bool, str]]) -> bool:
    """Print ``PROG: error: FLAG: got VALUE; RULE`` for the first failed ``(flag, value, ok, rule)`` check
    and return True; False when all pass."""
    for flag, value, ok, rule in checks:
        if not ok:
            print(f"{prog}: error: {flag}: got {value}; {rule}", file=sys.stderr)
            return True
    return False


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write ``report`` to ``out`` as indented JSON (creating its folder) and say so on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def run_and_report(
    prog: str,
    work_prefix: str,
    keep: Path | None,
    out: Path,
    run: Callable[[Path], dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
    announce: Callable[[Path], str] | None = None,
) -> int:
    """Run a checking benchmark in ``keep`` (or a temporary directory, removed afterwards), print its summary
    and write its report (a dict with ``passed``) to ``out`` as JSON. Exit status: 0 passed, 1 failed or
    the run broke (one line on stderr)."""
    work = keep or Path(tempfile.mkdtemp(prefix=work_prefix))
    work.mkdir(parents=True, exist_ok=True)
    if announce is not None:
        print(announce(work), flush=True)
    try:
        report = run(work)
    except (RuntimeError, OSError) as e:  # OSError covers TimeoutError and a launch that cannot write its files
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(summary(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if report["passed"] else 1
