"""The live harness: one ``oobleck run`` of the tiny GPT under a policy, with the schedule's events replayed
against it, its committed rows read as they come and stamped, and the window it is measured over (see the
package notes)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from benchmarks.cpu_shares import CpuShares, cpus_per_node
from benchmarks.fault_tolerance.schedule import Schedule, write_initial_trace
from benchmarks.jobs import TAG_ENV, Job, cli_command, first_generation_ready, launch, non_step_lines, read_jsonl, tiny_gpt, write_config
from oobleck.trace import TraceEvent
from oobleck.config import load_config

#: seconds between reads of ``RUN/metrics.jsonl``
POLL_S = 0.02
#: the profile is measured once into the runs' cache with these (the planner and the simulator both use it)
PROFILE_WARMUP = 3
PROFILE_REPEATS = 15
#: seconds ``oobleck inject --add`` may take
INJECT_TIMEOUT_S = 60.0


class HarnessError(RuntimeError):
    """A run failed or could not be measured; the message names the run and says why."""


@dataclass(frozen=True)
class Replayed:
    """An event as it was replayed: ``at`` (wall clock, time.time()) when the node was killed or the
    ``oobleck inject --add`` returned; ``note`` says why it did not happen (None when it did)."""

    at: float
    kind: str
    node: str
    note: str | None = None


class Replayer:
    """Replays ``events`` against ``job`` from a background thread. With ``unit`` ``s`` each at wall time
    ``anchor + event.at_s``; with ``steps`` as soon as :meth:`advance` has reported ``event.at_s`` steps
    committed (the run's loop reads the rows every :data:`POLL_S`, so a loss due after step ``k`` lands in
    step ``k`` or, for steps shorter than that, a little later)."""

    def __init__(self, job: Job, events: Sequence[TraceEvent], anchor: float, unit: str = "s") -> None:
        self.job = job
        self.events = list(events)
        self.anchor = anchor
        self.unit = unit
        self.done: list[Replayed] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._committed = 0
        self._adds: list[threading.Thread] = []
        self._injects: list[subprocess.Popen] = []
        self._thread = threading.Thread(target=self._run, name="replayer", daemon=True)
        self._thread.start()

    def advance(self, committed: int) -> None:
        """The job has committed ``committed`` steps (its highest step + 1; a step committed again after a
        restore does not count twice)."""
        with self._progress:
            if committed > self._committed:
                self._committed = committed
                self._progress.notify_all()

    def _wait(self, event: TraceEvent) -> bool:
        """Wait until ``event`` is due; True when stopped meanwhile."""
        if self.unit == "s":
            return self._stop.wait(max(0.0, self.anchor + event.at_s - time.time()))
        with self._progress:
            self._progress.wait_for(lambda: self._stop.is_set() or self._committed >= event.at_s)
        return self._stop.is_set()

    def _run(self) -> None:
        for event in self.events:
            if self._wait(event) or self.job.proc.poll() is not None:
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
        cmd = cli_command("inject", str(self.job.run_dir), "--add", node)
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
        with self._progress:
            self._progress.notify_all()
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
        anchor = job.launched_at + ready["first_commit_seen_s"]
        replayer = Replayer(job, schedule.events if faults else (), anchor, schedule.unit)
        deadline = job.launched_at + timeout_s
        replayed: list[Replayed] | None = None
        while job.proc.poll() is None and time.time() < deadline:
            tail.poll()
            if tail.rows:
                replayer.advance(max(r["step"] for r in tail.rows) + 1)
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
        raise HarnessError(f"{name} failed (exit {code}):\n" + "\n".join(non_step_lines(job.output(), 12)))
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
