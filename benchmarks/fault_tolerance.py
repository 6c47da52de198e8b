"""Throughput under failures: Oobleck against the Bamboo-style and Varuna-style baselines of the same engine,
measured on local nodes with the tiny GPT, and the simulator checked against the measurements
(docs/benchmarks.md, "Throughput under failures, against the baselines").

``python -m benchmarks.fault_tolerance [--nodes 6] [--steps 250] [--every-s 6 --failures 3 --replace-after-s 1.5 |
--trace PATH --compression C] [--policies oobleck bamboo varuna] [--seed 0] [--run-timeout-s 300]
[--cpu-share node|shared] [--keep DIR] [--out benchmarks/results/fault_tolerance.json]
[--plot benchmarks/results/fault_tolerance.png]``

What runs
---------
For each policy (``fault_tolerance.policy``), two ``oobleck run`` jobs of the tiny float64 GPT of
:func:`benchmarks.jobs.tiny_gpt` (2 MiB devices, so n0 = 2 and every pipeline has two stages or more; f = 1;
global batch 16 in microbatches of 2) on the same named nodes, one after the other: fault-free, then under
the failure schedule. Float64 keeps n0 = 2: in float32 the model fits one 2 MiB device and every pipeline
would have one stage. Each policy checkpoints at its own default interval
(``oobleck.config.DEFAULT_CHECKPOINT_EVERY``).

Each node (its agent and workers) is held to ``cores / capacity`` CPUs (``--cpu-share node``, the default;
:mod:`benchmarks.cpu_shares`), capacity being the most nodes the schedule has alive at once. The local
nodes share this machine's cores: without the caps a job that lost a node would hand that node's CPU to the
survivors and run as fast as before, where a cluster loses the node's compute with it (and a starting
node would take CPU from the job). ``--cpu-share shared`` measures without the caps.

The failure schedule is the same for every policy, in wall seconds after the job's first committed step:

* fixed interval (default): :func:`benchmarks.sim_engine.fixed_interval_trace` with ``--seed``, the
  simulator's own generator: every ``--every-s`` seconds a node chosen by the seeded RNG among those alive in
  the schedule is lost, a new node (a new name) is added ``--replace-after-s`` seconds later; ``--failures``
  losses in all. The schedule ends, so every policy finishes its steps (a policy whose restart outlasts the
  interval would otherwise never finish).
* ``--trace PATH --compression C``: a node-availability trace (``ms,add|remove,node``), its times divided by
  ``C``: the nodes it adds at time 0 start the job, the later events are replayed.

The job's ``trace:`` config holds only the time-0 adds, so that the launcher starts the nodes under the
schedule's names; the harness replays the later events itself, timed from the job's first committed step
(a node lost before the first commit fails a job by design, and the launch-to-training time differs between
runs). A loss is what the launcher's own trace replay does: SIGKILL to the node's agent's process group (its
workers die with it). An add is ``oobleck inject RUN --add NODE``. The replayed times are recorded.

Figures
-------
Commit times: each ``RUN/metrics.jsonl`` row is stamped when the harness reads it (every 20 ms); within one
generation the rows' ``step_time_s`` are exact commit-to-commit times, so a generation's start is the
earliest ``stamp - cumulative step_time_s`` of its rows and each commit time follows from it.

The window of a run is from its first step start (every worker of the first generation ready to train, read
from the master's store by :func:`benchmarks.jobs.first_generation_ready`) to its last commit (to the moment
it was stopped, if it ran past ``--run-timeout-s``). Average throughput is the steps committed and never
rolled back times the global batch, over the window. The window is cut into (:func:`account`):

* ``useful``: steps kept, less their redundant and checkpoint seconds;
* ``redundant``: the rows' ``redundant_s`` (Bamboo's redundant forward and shadow refresh) of kept steps;
* ``recovery``: from a membership change (the node's loss, or a join's notice) to every worker ready, from
  each recovery record (``detect_s`` + ``resume_s``; a restart's process start and checkpoint load included;
  a join noticed before the last commit counts from that commit);
* ``checkpoint``: the rows' ``checkpoint_s`` (foreground checkpoint writes);
* ``lost``: lost work, the steps rolled back to a checkpoint (their rows' own times);
* ``partial``: the steps cut by a failure before their commit, and the time after the last commit.

The first step after a recovery is costed at the run's median step time (at most what is left between the
previous commit and its own); what lies before it splits at the change's notice (the recovery record's
``resume_s`` + ``detect_s`` before the ready moment) into ``partial`` and ``recovery``.

Simulator validation (:func:`validate_simulator`): for each policy a
:class:`benchmarks.simulator.MeasuredRun` of its run under failures: the tiny GPT's profile from the runs'
profile cache (measured once before the first run with one torch thread, as each worker has here:
:func:`measure_profile`), the nodes (capacity: the most alive at once), the schedule as replayed (seconds
from the window's start), the window's length, the measured costs (:func:`measured_costs`: medians of
:func:`recovery_durations` and of the checkpoint writes; the checkpoint intervals the runs used; Bamboo never
re-partitions for overload, as the engine's does not), the time from a node's add until it could join
(:func:`node_ready_s`, per run: a starting node competes for this machine's two cores) and the policy's
fault-free throughput, which scales its step times (:func:`steady_samples_per_s` of the fault-free run: no
first step, no checkpoint writes). The predicted throughput is compared with the measured one (acceptance:
within 20%). Other work on the machine moves step times between runs, so the prediction is also made with
the run's own first generation as the calibration (``in-run``), and the simulated event counts are printed
beside the measured recoveries: where they differ, the simulator's rules differ from the engine's.

Output: the table per policy, Oobleck's ratios to the baselines, the simulator's check and the acceptance
lines. The JSON (``--out``) holds every run's rows (commit times from the window's start), recovery
records, replayed events, breakdowns, the costs, the predictions and the machine (its load average at every
run's start and end); the PNG (``--plot``) the nodes alive and training and the throughput over a rolling
window for each policy. Exit status: 0 when Oobleck is faster than each baseline that ran and every
prediction is within 20%, 1 when not (or a run failed), 2 on a bad command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from benchmarks.cpu_shares import CpuShares, add_cpu_share_flag, cpus_per_node, flag_check, remove_stale_groups
from benchmarks.jobs import (
    SMALL_DEVICE_GIB,
    TAG_ENV,
    Job,
    bad_flag,
    first_generation_ready,
    launch,
    machine_info,
    median,
    read_jsonl,
    run_and_report,
    tiny_gpt,
    write_config,
)
from benchmarks.sim_engine import CATEGORIES, fixed_interval_trace
from benchmarks.sim_model import POLICIES, Costs
from launcher.trace import TraceEvent, load_trace, nodes_alive, replay_schedule
from oobleck.config import load_config
from oobleck.errors import OobleckError

PROG = "benchmarks.fault_tolerance"
RESULTS = Path(__file__).resolve().parent / "results"
#: the measured categories; the simulator's ``lost`` is ``lost`` + ``partial`` here (it has no ``waiting``
#: that a measurement could tell apart: waiting for nodes shows inside a recovery record)
MEASURED = ("useful", "redundant", "recovery", "checkpoint", "lost", "partial")
#: seconds between reads of ``RUN/metrics.jsonl``
POLL_S = 0.02
#: at most this many nodes alive at once on this machine (each is an agent and a worker importing torch)
MAX_NODES = 8
#: trailing window of the plotted throughput, and the spacing of its points, seconds
ROLLING_S = 3.0
PLOT_GRID_S = 0.1
#: acceptance bound of the simulator's relative error
MAX_SIM_ERROR = 0.20
#: the profile is measured once into the runs' cache with these (the planner and the simulator both use it)
PROFILE_WARMUP = 3
PROFILE_REPEATS = 15
#: stands for "never" in the simulator's checkpoint intervals (a policy run without checkpoints) and
#: Bamboo's re-partition threshold
NEVER = 10**9
#: the copy of layers is inside the measured recovery times; the simulator's copy term is made negligible
COPY_BANDWIDTH = 1e18
#: seconds ``oobleck inject --add`` may take
INJECT_TIMEOUT_S = 60.0


class HarnessError(RuntimeError):
    """A run failed or could not be measured; the message names the run and says why."""


class UsageError(ValueError):
    """A bad command line; the message names the flag and what is allowed."""


# ---------------------------------------------------------------------------------------------------------
# The failure schedule


@dataclass(frozen=True)
class Schedule:
    """The nodes that start every job (``initial``), the events replayed after the first commit (``events``,
    seconds after it, in time order) and a one-line description."""

    initial: tuple[str, ...]
    events: tuple[TraceEvent, ...]
    description: str

    @property
    def nodes(self) -> list[str]:
        """Every node name the schedule starts or adds."""
        return list(dict.fromkeys([*self.initial, *(e.node for e in self.events if e.kind == "add")]))

    @property
    def capacity(self) -> int:
        """The most nodes alive at once."""
        timeline = [TraceEvent(0.0, "add", n) for n in self.initial] + list(self.events)
        return max(count for _, count in nodes_alive(timeline))


def fixed_schedule(nodes: int, every_s: float, failures: int, replace_after_s: float, seed: int) -> Schedule:
    """``nodes`` nodes; ``failures`` losses ``every_s`` seconds apart, each replaced ``replace_after_s`` later:
    the first losses of the simulator's :func:`~benchmarks.sim_engine.fixed_interval_trace` with ``seed``, and
    their replacements."""
    last = failures * every_s + 1e-9
    timeline = fixed_interval_trace(nodes, every_s, (failures + 1) * every_s + replace_after_s, replace_after_s, seed)
    events = tuple(
        e for e in timeline if 0 < e.at_s <= (last if e.kind == "remove" else last + replace_after_s)
    )
    initial = tuple(f"node{i}" for i in range(1, nodes + 1))
    text = f"{nodes} nodes; a node lost every {every_s:g} s ({failures} in all), each replaced {replace_after_s:g} s later; seed {seed}"
    return Schedule(initial, events, text)


def trace_schedule(path: Path, compression: float) -> Schedule:
    """The trace at ``path`` replayed ``compression`` times faster: its time-0 adds start the job."""
    events = replay_schedule(load_trace(path), compression)
    initial = tuple(e.node for e in events if e.at_s == 0 and e.kind == "add")
    later = tuple(e for e in events if e.at_s > 0)
    if len(initial) < 4:
        raise OobleckError(f"--trace: {path} adds {len(initial)} nodes at time 0; the job needs at least 4")
    schedule = Schedule(initial, later, f"trace {path}, compression {compression:g}: {len(initial)} nodes at the start, {len(later)} events over {later[-1].at_s if later else 0:.0f} s")
    if schedule.capacity > MAX_NODES:
        raise OobleckError(f"--trace: {path} has {schedule.capacity} nodes alive at once; at most {MAX_NODES} fit this machine")
    return schedule


def write_initial_trace(path: Path, schedule: Schedule) -> Path:
    """The job's ``trace:`` file: only the schedule's time-0 adds (the launcher starts them by name)."""
    path.write_text("".join(f"0,add,{name}\n" for name in schedule.initial))
    return path


# ---------------------------------------------------------------------------------------------------------
# One run


@dataclass(frozen=True)
class Replayed:
    """An event as it was replayed: ``at`` (wall clock, time.time()) when the node was killed or the
    ``oobleck inject --add`` returned; ``note`` says why it did not happen (None when it did)."""

    at: float
    kind: str
    node: str
    note: str | None = None


class Replayer:
    """Replays ``events`` against ``job`` from a background thread, each at ``anchor + event.at_s``."""

    def __init__(self, job: Job, events: Sequence[TraceEvent], anchor: float) -> None:
        self.job = job
        self.events = list(events)
        self.anchor = anchor
        self.done: list[Replayed] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._adds: list[threading.Thread] = []
        self._injects: list[subprocess.Popen] = []
        self._thread = threading.Thread(target=self._run, name="replayer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for event in self.events:
            if self._stop.wait(max(0.0, self.anchor + event.at_s - time.time())) or self.job.proc.poll() is not None:
                return
            if event.kind == "remove":
                self._kill(event.node)
            else:
                adder = threading.Thread(target=self._add, args=(event.node,), name=f"add-{event.node}", daemon=True)
                adder.start()
                self._adds.append(adder)

    def _kill(self, node: str) -> None:
        agent = self.job.agent(node)
        if agent is None:
            self._record(Replayed(time.time(), "remove", node, "no agent running"))
            return
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            self._record(Replayed(time.time(), "remove", node, "the agent had exited"))
            return
        self._record(Replayed(time.time(), "remove", node))

    def _add(self, node: str) -> None:
        cmd = [sys.executable, "-m", "oobleck.cli", "inject", str(self.job.run_dir), "--add", node]
        env = dict(os.environ, **{TAG_ENV: self.job.tag})
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with self._lock:
            self._injects.append(proc)
        try:
            _, err = proc.communicate(timeout=INJECT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if self._stop.is_set() and proc.returncode != 0:
            note: str | None = "stopped: the run had committed its last step"
        elif proc.returncode != 0:
            note = (err.strip().splitlines() or [f"oobleck inject exited {proc.returncode}"])[-1]
        else:
            note = None
        self._record(Replayed(time.time(), "add", node, note))

    def _record(self, event: Replayed) -> None:
        with self._lock:
            self.done.append(event)

    def stop(self) -> list[Replayed]:
        """Stop replaying (an ``oobleck inject`` still running is killed); the events replayed so far, in
        time order."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            injects = list(self._injects)
        for proc in injects:
            if proc.poll() is None:
                proc.kill()
        for adder in self._adds:
            adder.join()
        with self._lock:
            return sorted(self.done, key=lambda e: e.at)


class MetricsTail:
    """Reads the rows appended to ``RUN/metrics.jsonl`` and stamps each with the wall time it was read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._offset = 0

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        now = time.time()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        for line in data[:end].splitlines():
            if line.strip():
                self.rows.append({**json.loads(line), "stamp": now})
        self._offset += end


@dataclass
class Run:
    """One measured ``oobleck run``: its rows with ``commit_at`` (wall clock), recovery records, replayed
    events, the window ``[start, end]`` (wall clock) and generation starts."""

    policy: str
    faults: bool
    run_dir: Path
    config: Path
    rows: list[dict[str, Any]]
    records: list[dict[str, Any]]
    replayed: list[Replayed]
    start: float
    end: float
    gen_starts: dict[int, float]
    timed_out: bool
    steps: int
    global_batch: int
    launch_to_start_s: float
    #: the machine's 1-minute load average at the launch and at the end (other work shares the machine)
    load_1m: tuple[float, float] = (math.nan, math.nan)


def commit_times(rows: Sequence[dict[str, Any]]) -> tuple[list[float], dict[int, float]]:
    """Each row's commit time and each generation's start, from the rows' read stamps (``stamp``, upper
    bounds of the commit times) and their exact commit-to-commit ``step_time_s`` within a generation (a
    generation's first row counts from the generation's start)."""
    cumulative: dict[int, float] = {}
    starts: dict[int, float] = {}
    offsets = []
    for row in rows:
        gen = row["generation"]
        cumulative[gen] = cumulative.get(gen, 0.0) + row["step_time_s"]
        offsets.append(cumulative[gen])
        starts[gen] = min(starts.get(gen, math.inf), row["stamp"] - cumulative[gen])
    return [starts[row["generation"]] + off for row, off in zip(rows, offsets)], starts


def job_config(work: Path, name: str, policy: str, schedule: Schedule, steps: int) -> Path:
    """The config of one run (``WORK/NAME.yaml``): the tiny GPT under ``policy`` on the schedule's nodes,
    its profile cached in ``WORK/profiles``."""
    trace = write_initial_trace(work / "initial-nodes.csv", schedule)
    raw = tiny_gpt(work / "profiles", len(schedule.initial), steps, trace={"path": str(trace), "compression": 1.0})
    raw["fault_tolerance"]["policy"] = policy
    raw["profile"].update(warmup=PROFILE_WARMUP, repeats=PROFILE_REPEATS)
    return write_config(work / f"{name}.yaml", raw)


def measure_profile(config: Path) -> None:
    """Profile the job's model into its cache now, with one torch thread as each worker has on this
    machine (``oobleck run`` would profile with every core, which on a shared 2-core machine inflates and
    scatters the layer times); every run and the simulator then use this profile."""
    import torch

    from oobleck.profiler import ensure_profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ensure_profile(load_config(config))
    finally:
        torch.set_num_threads(threads)


def run_policy(
    work: Path, policy: str, schedule: Schedule, steps: int, faults: bool, timeout_s: float, capped: bool
) -> Run:
    """``oobleck run`` of the tiny GPT under ``policy`` on the schedule's nodes, with the schedule's events
    replayed when ``faults``; stopped ``timeout_s`` after its launch if still running. When ``capped``,
    each node is held to its share of the cores (see the module notes)."""
    name = f"{policy}-{'failures' if faults else 'fault-free'}"
    config = job_config(work, name, policy, schedule, steps)
    load_at_launch = os.getloadavg()[0]
    # the groups and the job are made inside the try, so that a launch that fails still removes the groups
    shares: CpuShares | None = None
    job: Job | None = None
    replayer: Replayer | None = None
    try:
        shares = CpuShares(schedule.nodes, cpus_per_node(schedule.capacity)) if capped else None
        job = launch(config, work / name)
        if shares is not None:
            shares.follow(job)
        print(f"fault_tolerance: {name}: running in {job.run_dir}", flush=True)
        try:
            ready = first_generation_ready(job, timeout_s)
        except RuntimeError as e:
            raise HarnessError(f"{name}: {e}\n{job.output()[-2000:]}") from None
        start = job.launched_at + ready["ready_s"]
        tail = MetricsTail(job.run_dir / "metrics.jsonl")
        replayer = Replayer(job, schedule.events if faults else (), job.launched_at + ready["first_commit_seen_s"])
        deadline = job.launched_at + timeout_s
        replayed: list[Replayed] | None = None
        while job.proc.poll() is None and time.time() < deadline:
            tail.poll()
            if replayed is None and tail.rows and tail.rows[-1]["step"] == steps - 1:
                replayed = replayer.stop()  # the last step is committed: no event may hit the job's shutdown
            time.sleep(POLL_S)
        timed_out = job.proc.poll() is None
        stopped_at = time.time()
        if replayed is None:
            replayed = replayer.stop()
        replayer = None
        if timed_out:
            job.stop()
        tail.poll()
        code = job.proc.wait()
    finally:
        if replayer is not None:
            replayer.stop()
        if job is not None:
            job.stop()
        if shares is not None:
            shares.close()
    if code != 0 and not timed_out:
        lines = [line for line in job.output().splitlines() if not line.startswith("step ")]
        raise HarnessError(f"{name} failed (exit {code}):\n" + "\n".join(lines[-12:]))
    rows = tail.rows
    if not rows:
        raise HarnessError(f"{name}: no step was committed")
    times, gen_starts = commit_times(rows)
    for row, at in zip(rows, times):
        row["commit_at"] = at
    end = stopped_at if timed_out else times[-1]
    return Run(
        policy, faults, job.run_dir, config, rows, read_jsonl(job.run_dir / "recoveries.jsonl"), replayed,
        start, end, gen_starts, timed_out, steps, load_config(config).training.global_batch, ready["ready_s"],
        (load_at_launch, os.getloadavg()[0]),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Accounting (pure)


def kept_rows(rows: Sequence[dict[str, Any]]) -> list[bool]:
    """For each row, whether its step stays committed: a step committed again later (after a restore from
    a checkpoint) keeps only its last row."""
    last = {row["step"]: i for i, row in enumerate(rows)}
    return [last[row["step"]] == i for i, row in enumerate(rows)]


def first_rows(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the rows that open a generation (the first row of all included)."""
    return [i for i, row in enumerate(rows) if i == 0 or rows[i - 1]["generation"] != row["generation"]]


def typical_step_s(rows: Sequence[dict[str, Any]]) -> float:
    """The median step time without foreground checkpoints, over the rows that do not open a generation
    (all rows if every row does)."""
    firsts = set(first_rows(rows))
    plain = [r["step_time_s"] - r.get("checkpoint_s", 0.0) for i, r in enumerate(rows) if i not in firsts]
    return median(plain or [r["step_time_s"] - r.get("checkpoint_s", 0.0) for r in rows])


def recovery_moments(
    rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]], gen_starts: dict[int, float] | None = None
) -> dict[int, tuple[float, float]]:
    """generation -> (notice, ready) of the recovery that opened it (rows in commit order with ``commit_at``;
    ``records`` matched by generation). Its first step is taken to last :func:`typical_step_s` plus its own
    ``checkpoint_s``, within what is left after the previous commit, so ready = its commit minus that, but
    not before the generation's start (``gen_starts``, optional); the notice (the loss, or the moment the
    joining node was ready) is ``resume_s`` + ``detect_s`` before ready."""
    typical = typical_step_s(rows) if rows else 0.0
    by_gen = {rec["generation"]: rec for rec in records}
    out = {}
    for i in first_rows(rows)[1:]:
        row = rows[i]
        record = by_gen.get(row["generation"])
        if record is None:
            continue
        commit = row["commit_at"]
        ready = commit - min(typical + row.get("checkpoint_s", 0.0), commit - rows[i - 1]["commit_at"])
        if gen_starts and row["generation"] in gen_starts:
            ready = min(max(ready, gen_starts[row["generation"]]), commit)
        out[row["generation"]] = (ready - record["resume_s"] - (record.get("detect_s") or 0.0), ready)
    return out


def account(
    rows: Sequence[dict[str, Any]],
    records: Sequence[dict[str, Any]],
    start: float,
    end: float,
    gen_starts: dict[int, float] | None = None,
) -> dict[str, float]:
    """Seconds of ``[start, end]`` in each of :data:`MEASURED` (they sum to ``end - start``; see the module
    notes). ``rows`` are in commit order with ``commit_at`` inside the window, ``records`` the recovery
    records, ``gen_starts`` as for :func:`recovery_moments`. Between the commit before a recovery and its
    ready moment, the time up to the notice is ``partial`` (the step the failure cut; nothing when the notice
    came before that commit, as for a join) and the rest ``recovery``. ``redundant_s`` and ``checkpoint_s``
    missing from a row count as 0."""
    if end < start:
        raise ValueError(f"window ends ({end}) before it starts ({start})")
    acc = dict.fromkeys(MEASURED, 0.0)
    keep = kept_rows(rows)
    moments = recovery_moments(rows, records, gen_starts)
    firsts = set(first_rows(rows))
    prev = start
    for i, row in enumerate(rows):
        commit = row["commit_at"]
        if not prev <= commit <= end:
            raise ValueError(f"row of step {row['step']} committed at {commit}, outside [{prev}, {end}]")
        busy_until = prev
        if i in firsts and row["generation"] in moments:
            notice, ready = moments[row["generation"]]
            busy_until = max(prev, ready)
            cut = min(max(notice, prev), busy_until)
            acc["partial"] += cut - prev
            acc["recovery"] += busy_until - cut
        step_part = commit - busy_until
        checkpoint = min(row.get("checkpoint_s", 0.0), step_part)
        redundant = min(row.get("redundant_s", 0.0), step_part - checkpoint)
        acc["checkpoint"] += checkpoint
        if keep[i]:
            acc["useful"] += step_part - checkpoint - redundant
            acc["redundant"] += redundant
        else:
            acc["lost"] += step_part - checkpoint
        prev = commit
    acc["partial"] += end - prev
    return acc


def summarize(run: Run) -> dict[str, Any]:
    """Throughput, breakdown and counts of a run (see the module notes)."""
    window = run.end - run.start
    global_batch = run.global_batch
    kept = sum(kept_rows(run.rows))
    seconds = account(run.rows, run.records, run.start, run.end, run.gen_starts)
    changes = [r for r in run.records if r["lost"] or r["joined"]]
    return {
        "samples_per_s": kept * global_batch / window if window > 0 else 0.0,
        "window_s": window,
        "steps_kept": kept,
        "steps_of": run.steps,
        "timed_out": run.timed_out,
        "breakdown_s": seconds,
        "breakdown_share": {k: (v / window if window > 0 else 0.0) for k, v in seconds.items()},
        "steps_lost": sum(r["steps_lost"] for r in run.records),
        "recoveries": len(changes),
        "recovery_modes": {m: sum(r["mode"] == m for r in changes) for m in sorted({r["mode"] for r in changes})},
        "median_step_s": median([r["step_time_s"] for r in run.rows[1:]]),
        "launch_to_start_s": run.launch_to_start_s,
        "load_1m": list(run.load_1m),
    }


def rolling_throughput(times: Sequence[float], batch: int, window_s: float, end: float, grid_s: float) -> tuple[list[float], list[float]]:
    """Throughput over time: at every ``grid_s`` from 0 to ``end``, the samples committed (``times``, sorted,
    from the window's start) in the trailing ``window_s`` per second (over the time elapsed, at first)."""
    xs, ys = [], []
    first = last = 0
    for k in range(int(end / grid_s) + 1):
        t = k * grid_s
        while last < len(times) and times[last] <= t:
            last += 1
        while first < last and times[first] <= t - window_s:
            first += 1
        xs.append(t)
        ys.append((last - first) * batch / min(window_s, t) if t > 0 else 0.0)
    return xs, ys


# ---------------------------------------------------------------------------------------------------------
# Simulator validation


def recovery_durations(run: Run) -> list[tuple[dict[str, Any], float]]:
    """Each recovery record of the run with its duration as the simulator costs it: from its generation's
    start (the last membership change it recovers from, re-planned; for a Varuna-style grow, the checkpoint
    written) to every worker ready. Detection and planning take milliseconds here and are left out; the
    record's own ``total_s`` also counts time the job kept training (a join noticed steps before the boundary
    it folds in at), or several restarts when a loss cut the previous one."""
    moments = recovery_moments(run.rows, run.records, run.gen_starts)
    by_gen = {rec["generation"]: rec for rec in run.records}
    return [(by_gen[g], ready - run.gen_starts[g]) for g, (_, ready) in moments.items()]


def node_ready_times(run: Run) -> tuple[list[float], list[float]]:
    """Seconds from a node's add (``oobleck inject --add`` returned) to its join's notice (all its workers
    up and waiting), over the run's join-only recoveries; and, for each added node that had not joined when
    the window ended, the lower bound ``end - add``."""
    added = {e.node: e.at for e in run.replayed if e.kind == "add" and e.note is None and e.at <= run.end}
    moments = recovery_moments(run.rows, run.records, run.gen_starts)
    seen, joined = [], set()
    for record in run.records:
        joined.update(record["joined"])
        times = [added[n] for n in record["joined"] if n in added]
        if times and not record["lost"] and record["generation"] in moments:
            seen.append(moments[record["generation"]][0] - min(times))
    return seen, [run.end - at for node, at in added.items() if node not in joined]


def node_ready_s(runs: dict[str, Run]) -> tuple[dict[str, float], str]:
    """``node_ready_s`` for each run's simulation, and how it was found. A node's start (an agent and a worker
    importing torch) competes for this machine's cores with the job, so it is taken per run: the median of
    the run's own joins; without one, the median over all runs' joins, raised to the run's largest lower
    bound (a node that never joined in the window took at least that long); with neither, that bound (0
    when nothing was added)."""
    found = {policy: node_ready_times(run) for policy, run in runs.items()}
    pooled = [t for seen, _ in found.values() for t in seen]
    out = {}
    for policy, (seen, censored) in found.items():
        bound = max(censored, default=0.0)
        out[policy] = median(seen) if seen else (max(median(pooled), bound) if pooled else bound)
    how = f"per run: its joins' median (add to notice), else the median of all {len(pooled)} joins raised to its never-joined nodes' lower bound"
    return out, how


def checkpoint_every(config: Path) -> int:
    """The checkpoint interval a run used (its policy's default unless the config sets one), :data:`NEVER`
    for none."""
    every = load_config(config).fault_tolerance.checkpoint_every
    return every or NEVER


def measured_costs(runs: dict[str, Run]) -> tuple[Costs, dict[str, str]]:
    """The simulator's :class:`~benchmarks.sim_model.Costs` from the runs under failures (by policy), and
    where each figure came from. Medians of :func:`recovery_durations`: Oobleck's
    recoveries (``recovery_fixed_s``; the layer copy is inside, so ``copy_bandwidth`` is made negligible),
    restarts of any policy (``restart_s``, also Bamboo's restart after a fatal loss), Bamboo's takeovers (losses) and its re-plans for joins (its
    ``reconfigure``); the median foreground checkpoint write; each policy's checkpoint interval. A figure no
    run produced is 0 (no event of that kind happened, so the simulator should not need it either). The
    simulator's Bamboo re-partitions after a takeover once 2 x overloaded / active nodes exceeds a threshold
    (the Oobleck artifact's rule); the engine's never does (it re-plans when nodes join), so the threshold is
    :data:`NEVER`."""
    durations = {policy: recovery_durations(run) for policy, run in runs.items()}

    def pick(policies: Sequence[str], keep: Any) -> list[float]:
        return [d for p in policies if p in durations for record, d in durations[p] if keep(record)]

    not_restart = lambda r: r["mode"] != "restart"  # noqa: E731
    figures = {
        "recovery_fixed_s": (pick(["oobleck"], not_restart), "Oobleck recoveries"),
        "restart_s": (pick(list(runs), lambda r: r["mode"] == "restart"), "restarts (process restart + checkpoint load)"),
        "bamboo_takeover_s": (pick(["bamboo"], lambda r: bool(r["lost"]) and not_restart(r)), "Bamboo takeovers"),
        "bamboo_reconfigure_s": (
            pick(["bamboo"], lambda r: bool(r["joined"]) and not r["lost"] and not_restart(r)),
            "Bamboo re-plans for joining nodes",
        ),
        "checkpoint_write_s": (
            [r.get("checkpoint_s", 0.0) for run in runs.values() for r in run.rows if r.get("checkpoint_s", 0.0) > 0],
            "foreground checkpoint writes",
        ),
    }
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (samples, what) in figures.items():
        values[key] = median(samples) if samples else 0.0
        sources[key] = f"median of {len(samples)} {what}" if samples else f"none measured ({what}): 0"
    values["copy_bandwidth"] = COPY_BANDWIDTH
    sources["copy_bandwidth"] = "negligible: the copies are inside the measured recovery times"
    for key, policy in (("checkpoint_every", "varuna"), ("oobleck_checkpoint_every", "oobleck"), ("bamboo_checkpoint_every", "bamboo")):
        if policy in runs:
            values[key] = checkpoint_every(runs[policy].config)
            sources[key] = f"the {policy} run's interval" + (" (none)" if values[key] == NEVER else "")
    # the engine's Bamboo restarts after a fatal loss exactly as Varuna restarts: a process restart
    values["bamboo_restart_s"] = values["restart_s"]
    sources["bamboo_restart_s"] = "the restarts' figure (restart_s): the engine restarts Bamboo's processes as Varuna's"
    values["bamboo_reconfigure_threshold"] = float(NEVER)
    sources["bamboo_reconfigure_threshold"] = (
        "never: the engine's Bamboo keeps its taken-over pipelines until nodes join (no overload rule)"
    )
    return Costs(**values), sources


def measured_events(run: Run, schedule: Schedule) -> list[TraceEvent]:
    """The run's schedule as replayed, in seconds from its window's start: the initial nodes at 0, then
    the losses and adds that happened inside the window."""
    events = [TraceEvent(0.0, "add", name) for name in schedule.initial]
    for e in run.replayed:
        if e.note is None and run.start < e.at <= run.end:
            events.append(TraceEvent(e.at - run.start, "remove" if e.kind == "remove" else "add", e.node))
    return events


def steady_samples_per_s(run: Run) -> float:
    """The run's fault-free throughput as the simulator means it (all nodes, no failure, no checkpoint):
    the steps of its first generation after the first, over their step times less foreground checkpoint
    writes (Bamboo's redundant work stays in: it is part of its step)."""
    rows = [r for r in run.rows[1:] if r["generation"] == run.rows[0]["generation"]]
    seconds = sum(r["step_time_s"] - r.get("checkpoint_s", 0.0) for r in rows)
    return len(rows) * run.global_batch / seconds if seconds > 0 else math.nan


def validate_simulator(runs: dict[str, Run], fault_free: dict[str, Run], schedule: Schedule) -> dict[str, Any]:
    """Predict each policy's run under failures with :func:`benchmarks.simulator.predict` and compare with
    the measurement. The policy's step times are scaled to its fault-free run's steady throughput
    (:func:`steady_samples_per_s`); as a check on the machine's drift (other work shares it), the prediction
    is also made with the throughput of the run's own first generation, before its first failure."""
    from benchmarks.simulator import MeasuredRun, predict
    from oobleck.control.planning import cluster_spec
    from oobleck.profiler import ensure_profile

    costs, sources = measured_costs(runs)
    ready, sources["node_ready_s"] = node_ready_s(runs)
    out: dict[str, Any] = {"costs": costs.to_dict(), "cost_sources": sources, "policies": {}}
    for policy, run in runs.items():
        config = load_config(run.config)
        t = config.training
        measured = summarize(run)["samples_per_s"]
        entry: dict[str, Any] = {"measured_samples_per_s": measured, "node_ready_s": ready[policy]}
        for key, calibration in (("", steady_samples_per_s(fault_free[policy])), ("_in_run", steady_samples_per_s(run))):
            measured_run = MeasuredRun(
                profile=ensure_profile(config),
                cluster=cluster_spec(config).with_nodes(schedule.capacity),
                f=config.fault_tolerance.f,
                global_batch=t.global_batch,
                microbatch=t.microbatch,
                costs=costs,
                events=measured_events(run, schedule),
                duration_s=run.end - run.start,
                node_ready_s=ready[policy],
                fault_free_samples_per_s={policy: calibration},
            )
            result = predict(measured_run, [policy])[policy]
            error = (result.samples_per_s - measured) / measured if measured > 0 else math.inf
            entry |= {
                f"calibration{key}_samples_per_s": calibration,
                f"predicted{key}_samples_per_s": result.samples_per_s,
                f"relative_error{key}": error,
                f"simulated{key}": result.to_dict(),
            }
        entry |= {
            "within_bound": abs(entry["relative_error"]) <= MAX_SIM_ERROR,
            "events": [dataclasses.asdict(e) for e in measured_run.events],
            "duration_s": measured_run.duration_s,
        }
        out["policies"][policy] = entry
    return out


# ---------------------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Options:
    nodes: int
    steps: int
    every_s: float
    failures: int
    replace_after_s: float
    trace: Path | None
    compression: float
    policies: list[str]
    seed: int
    run_timeout_s: float
    out: Path
    plot: Path | None
    keep: Path | None
    argv: list[str] = field(default_factory=list)
    cpu_share: str = "node"


def run_rows(run: Run, initial: int) -> list[dict[str, Any]]:
    """A run's rows for the JSON: commit time from the window's start and what the plot needs
    (``nodes_placed``: the nodes the step's generation trains on, ``initial`` in the first, a recovery
    record's ``nodes_alive`` after it)."""
    keep = kept_rows(run.rows)
    placed = {rec["generation"]: rec["nodes_alive"] for rec in run.records}
    return [
        {
            "t": row["commit_at"] - run.start,
            "step": row["step"],
            "generation": row["generation"],
            "nodes_alive": row["nodes_alive"],
            "nodes_placed": placed.get(row["generation"], initial),
            "pipelines": row["pipelines"],
            "step_time_s": row["step_time_s"],
            "redundant_s": row.get("redundant_s", 0.0),
            "checkpoint_s": row.get("checkpoint_s", 0.0),
            "kept": k,
        }
        for row, k in zip(run.rows, keep)
    ]


def run_bench(opts: Options, schedule: Schedule, work: Path) -> dict[str, Any]:
    """Every policy fault-free and under the schedule, the summaries, ratios and the simulator's check; the
    plot is written too. ``passed``: each acceptance check that applies holds (Oobleck faster than every
    baseline run, when both ran; every simulator error within :data:`MAX_SIM_ERROR`)."""
    if opts.cpu_share == "node":
        remove_stale_groups()  # those of an earlier benchmark that was killed
    machine = machine_info()
    started = time.monotonic()
    measure_profile(job_config(work, "profile", opts.policies[0], schedule, opts.steps))
    fault_free: dict[str, Run] = {}
    failing: dict[str, Run] = {}
    for policy in opts.policies:  # a policy's pair back to back: the machine's load drifts between pairs
        capped = opts.cpu_share == "node"
        fault_free[policy] = run_policy(work, policy, schedule, opts.steps, False, opts.run_timeout_s, capped)
        failing[policy] = run_policy(work, policy, schedule, opts.steps, True, opts.run_timeout_s, capped)
    machine["loadavg_1m_at_end"] = os.getloadavg()[0]
    ff = {p: summarize(r)["samples_per_s"] for p, r in fault_free.items()}
    policies: dict[str, Any] = {}
    for policy in opts.policies:
        run = failing[policy]
        policies[policy] = {
            **summarize(run),
            "fault_free": summarize(fault_free[policy]),
            "run_dir": str(run.run_dir),
            "recovery_records": run.records,
            "replayed": [dataclasses.asdict(e) | {"at": e.at - run.start} for e in run.replayed],
            "rows": run_rows(run, len(schedule.initial)),
        }
    ratios = {}
    if "oobleck" in policies:
        for policy in opts.policies:
            if policy != "oobleck":
                theirs, theirs_ff = policies[policy]["samples_per_s"], ff[policy]
                ratios[f"oobleck/{policy}"] = {
                    "failures": policies["oobleck"]["samples_per_s"] / theirs if theirs > 0 else None,
                    "fault_free": ff["oobleck"] / theirs_ff if theirs_ff > 0 else None,
                }
    simulator = validate_simulator(failing, fault_free, schedule)
    acceptance = {
        "oobleck_faster_than_baselines": (
            all(r["failures"] is None or r["failures"] > 1 for r in ratios.values()) if ratios else None
        ),
        "simulator_within_20pct": all(v["within_bound"] for v in simulator["policies"].values()),
    }
    report = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.fault_tolerance " + " ".join(opts.argv),
        "config": {
            "model": "gpt tiny (d_model 32, n_head 2, seq_len 16), float64, global batch 16, microbatch 2",
            "device_memory_gib": SMALL_DEVICE_GIB,
            "f": 1,
            "global_batch": next(iter(failing.values())).global_batch,
            "steps": opts.steps,
            "policies": opts.policies,
            "schedule": schedule.description,
            "initial_nodes": list(schedule.initial),
            "events": [dataclasses.asdict(e) for e in schedule.events],
            "run_timeout_s": opts.run_timeout_s,
            "cpus_per_node": cpus_per_node(schedule.capacity) if opts.cpu_share == "node" else None,
        },
        "machine": machine,
        "wall_s": time.monotonic() - started,
        "policies": policies,
        "ratios": ratios,
        "simulator": simulator,
        "acceptance": acceptance,
        "passed": all(ok is not False for ok in acceptance.values()),
        "plot": str(opts.plot) if opts.plot is not None else None,
    }
    if opts.plot is not None:
        plot(report, opts.plot)
    return report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ratio(x: float | None) -> str:
    return "inf" if x is None else f"{x:.2f}x"


def format_report(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"fault tolerance: tiny GPT (float64, n0=2, f=1), {c['steps']} steps; {c['schedule']}; "
        + (f"{c['cpus_per_node']:.2f} CPUs per node" if c.get("cpus_per_node") else "nodes share the CPUs"),
        f"{'policy':<9}{'samples/s':>10}{'useful':>8}{'redund.':>8}{'recovery':>9}{'ckpt':>7}{'lost':>7}"
        f"{'partial':>8}{'steps lost':>11}{'changes':>8}{'window s':>9}{'fault-free':>11}",
    ]
    for policy, p in report["policies"].items():
        s = p["breakdown_share"]
        note = f"  (stopped: {p['steps_kept']} of {p['steps_of']} steps)" if p["timed_out"] else ""
        lines.append(
            f"{policy:<9}{p['samples_per_s']:>10.1f}{_pct(s['useful']):>8}{_pct(s['redundant']):>8}{_pct(s['recovery']):>9}"
            f"{_pct(s['checkpoint']):>7}{_pct(s['lost']):>7}{_pct(s['partial']):>8}{p['steps_lost']:>11}{p['recoveries']:>8}"
            f"{p['window_s']:>9.1f}{p['fault_free']['samples_per_s']:>11.1f}{note}"
        )
    for name, r in report["ratios"].items():
        lines.append(f"{name}: {_ratio(r['failures'])} under failures, {_ratio(r['fault_free'])} fault-free")
    for policy, p in report["policies"].items():
        modes = ", ".join(f"{n} {m}" for m, n in p["recovery_modes"].items()) or "none"
        lines.append(f"  {policy}: recoveries by mode: {modes}; median step {1000 * p['median_step_s']:.0f} ms")
    sim = report["simulator"]
    lines.append("simulator (benchmarks.simulator.predict on each measured run; measured costs):")
    lines.append("  costs: " + ", ".join(f"{k}={v:g}" for k, v in sim["costs"].items()))
    lines.append(
        f"  {'policy':<9}{'measured':>10}{'predicted':>11}{'error':>8}{'(in-run':>9}{'error)':>8}{'node ready s':>14}"
        "   simulated breakdown: " + " / ".join(CATEGORIES)
    )
    for policy, v in sim["policies"].items():
        share = v["simulated"]["breakdown_share"]
        lines.append(
            f"  {policy:<9}{v['measured_samples_per_s']:>10.1f}{v['predicted_samples_per_s']:>11.1f}"
            f"{100 * v['relative_error']:>7.1f}%{v['predicted_in_run_samples_per_s']:>9.1f}"
            f"{100 * v['relative_error_in_run']:>7.1f}%{v['node_ready_s']:>14.1f}   "
            + " / ".join(_pct(share[k]) for k in CATEGORIES)
            + ("" if v["within_bound"] else f"   OUTSIDE {100 * MAX_SIM_ERROR:.0f}%")
        )
    lines.append("  (predicted: step times scaled to the fault-free run; in-run: to the run's own first generation)")
    for policy, v in sim["policies"].items():
        counts = ", ".join(f"{k} {n}" for k, n in v["simulated"]["counts"].items() if n) or "none"
        measured = report["policies"][policy]
        modes = ", ".join(f"{m} {n}" for m, n in measured["recovery_modes"].items()) or "none"
        lines.append(f"  {policy}: simulated events: {counts}; measured recoveries: {modes}, {measured['steps_lost']} steps lost")
    a = report["acceptance"]
    faster = {True: "yes", False: "NO", None: "not measured"}[a["oobleck_faster_than_baselines"]]
    lines.append(
        f"acceptance: Oobleck faster than the baselines: {faster}; "
        f"simulator within {100 * MAX_SIM_ERROR:.0f}%: {'yes' if a['simulator_within_20pct'] else 'NO'}"
    )
    loads = [x for p in report["policies"].values() for x in (*p["load_1m"], *p["fault_free"]["load_1m"])]
    lines.append(
        f"machine: {report['machine']['cpu_count']} cores, load average (1 min) {min(loads):.1f}-{max(loads):.1f} "
        f"at the runs' starts and ends; {report['wall_s']:.0f} s in all"
        + (f"; plot {report['plot']}" if report["plot"] else "")
    )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Per policy: nodes alive as replayed and nodes its generations train on (top), throughput over a
    trailing :data:`ROLLING_S` window (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = {"oobleck": "tab:blue", "bamboo": "tab:green", "varuna": "tab:orange"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    batch = report["config"]["global_batch"]
    nodes = len(report["config"]["initial_nodes"])
    for policy, p in report["policies"].items():
        color = colors.get(policy, "gray")
        xs, ys = [0.0], [nodes]
        for e in p["replayed"]:
            if e["note"] is None:
                xs.append(e["at"])
                ys.append(ys[-1] + (1 if e["kind"] == "add" else -1))
        xs.append(p["window_s"])
        ys.append(ys[-1])
        top.step(xs, ys, where="post", color=color, label=f"{policy}: alive")
        placed_t = [0.0] + [r["t"] for r in p["rows"]]
        placed_n = [p["rows"][0]["nodes_placed"]] + [r["nodes_placed"] for r in p["rows"]]
        top.step(placed_t, placed_n, where="pre", color=color, linestyle="--", linewidth=1, label=f"{policy}: training")
        xs, ys = rolling_throughput([r["t"] for r in p["rows"]], batch, ROLLING_S, p["window_s"], PLOT_GRID_S)
        bottom.plot(xs, ys, color=color, label=f"{policy} ({p['samples_per_s']:.1f} avg)")
        bottom.axhline(p["fault_free"]["samples_per_s"], color=color, linestyle=":", linewidth=1)
    top.set_ylabel("nodes")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    top.grid(alpha=0.3)
    bottom.set_ylabel(f"samples/s ({ROLLING_S:g} s window)")
    bottom.set_xlabel("seconds from the first step's start (dotted: fault-free throughput)")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    top.set_title(report["config"]["schedule"], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str]) -> Options:
    """The command line. argparse exits 2 on what it checks itself; the rest raises :class:`UsageError`
    (flags that do not go together) or is left to :func:`flag_checks`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fault_tolerance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=None, help="nodes (fixed interval only; default 6; 4 to 8)")
    parser.add_argument("--steps", type=int, default=250, help="training steps of every run (default 250)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--every-s", type=float, default=None, help="a node lost every S wall seconds (default 6)")
    how.add_argument("--trace", type=Path, help="replay this node-availability trace instead")
    parser.add_argument("--compression", type=float, default=None, help="with --trace: trace seconds per wall second")
    parser.add_argument("--failures", type=int, default=None, help="fixed interval: losses in all (default 3)")
    parser.add_argument(
        "--replace-after-s", type=float, default=None, help="fixed interval: a replacement is added S s after each loss (default 1.5)"
    )
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=["oobleck", "bamboo", "varuna"])
    parser.add_argument("--seed", type=int, default=0, help="which nodes the fixed schedule kills (default 0)")
    parser.add_argument("--run-timeout-s", type=float, default=300.0, help="stop a run this long after its launch (default 300)")
    add_cpu_share_flag(parser, "cores/capacity")
    parser.add_argument("--keep", type=Path, help="keep the runs in this directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fault_tolerance.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "fault_tolerance.png", help="PNG path; 'none' to skip")
    args = parser.parse_args(argv)
    fixed = args.trace is None
    if fixed and args.compression is not None:
        raise UsageError("--compression: applies to --trace only")
    if not fixed:
        for flag, value in (("--nodes", args.nodes), ("--failures", args.failures), ("--replace-after-s", args.replace_after_s)):
            if value is not None:
                raise UsageError(f"{flag}: applies to the fixed interval only (the trace names its nodes and events)")
        if args.compression is None:
            raise UsageError("--trace: needs --compression C (trace seconds per wall second)")
    return Options(
        nodes=6 if args.nodes is None else args.nodes,
        steps=args.steps,
        every_s=6.0 if args.every_s is None else args.every_s,
        failures=3 if args.failures is None else args.failures,
        replace_after_s=1.5 if args.replace_after_s is None else args.replace_after_s,
        trace=args.trace,
        compression=1.0 if args.compression is None else args.compression,
        policies=list(dict.fromkeys(args.policies)),
        seed=args.seed,
        run_timeout_s=args.run_timeout_s,
        out=args.out,
        plot=None if str(args.plot).lower() == "none" else args.plot,
        keep=args.keep,
        argv=list(argv),
        cpu_share=args.cpu_share,
    )


def flag_checks(opts: Options) -> list[tuple[str, Any, bool, str]]:
    """``(flag, value, ok, rule)`` for :func:`benchmarks.jobs.bad_flag`."""
    finite = math.isfinite
    return [
        ("--nodes", opts.nodes, 4 <= opts.nodes <= MAX_NODES, f"must be in [4, {MAX_NODES}]"),
        ("--steps", opts.steps, opts.steps >= 10, "must be at least 10"),
        ("--every-s", opts.every_s, finite(opts.every_s) and opts.every_s > 0, "must be a positive number of seconds"),
        ("--failures", opts.failures, opts.failures >= 1, "must be at least 1"),
        ("--replace-after-s", opts.replace_after_s, finite(opts.replace_after_s) and opts.replace_after_s >= 0, "must be at least 0"),
        ("--compression", opts.compression, finite(opts.compression) and opts.compression > 0, "must be positive"),
        ("--run-timeout-s", opts.run_timeout_s, finite(opts.run_timeout_s) and opts.run_timeout_s > 0, "must be positive"),
        ("--seed", opts.seed, opts.seed >= 0, "must be at least 0"),
        flag_check(opts.cpu_share),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 when the acceptance checks pass, 1 when they do not or a run broke, 2 on a bad
    command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(argv)
        if bad_flag(PROG, flag_checks(opts)):
            return 2
        schedule = (
            trace_schedule(opts.trace, opts.compression)
            if opts.trace is not None
            else fixed_schedule(opts.nodes, opts.every_s, opts.failures, opts.replace_after_s, opts.seed)
        )
    except (UsageError, OobleckError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return run_and_report(
        PROG,
        "oobleck-ft-",
        opts.keep,
        opts.out,
        lambda work: run_bench(opts, schedule, work),
        format_report,
        announce=lambda work: f"fault_tolerance: {schedule.description}; {opts.steps} steps per run; runs in {work}",
    )


if __name__ == "__main__":
    sys.exit(main())
