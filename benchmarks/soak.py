"""Soak: a long run with random node kills and joins, checked for exactness and for leaks.

``python -m benchmarks.soak [--steps 300] [--nodes 6] [--max-nodes 8] [--min-alive 4] [--every 6-15]
[--seed 0] [--keep DIR] [--out PATH]`` (``--steps 60`` is a quick check of a few minutes)

The tiny float64 GPT (n0 = 2 through 2 MiB devices, f = 1) trains ``--steps`` steps with ``oobleck run`` on
``--nodes`` local nodes. A seeded controller watches ``RUN/metrics.jsonl`` and ``RUN/recoveries.jsonl`` and,
every ``--every`` steps (a random count in that range), either

* kills a random node of the job, when that leaves at least ``--min-alive`` nodes in it (default
  n0 * (f + 1) = 4, so every layer keeps a replica): half of the kills through ``oobleck inject --kill``
  (the master tells the node's agent to SIGKILL its workers and itself), the other half by SIGKILL to the
  node's agent process found with psutil among this job's processes (its worker dies with it, like a
  machine); each kill is followed 1 to 3 steps later by a join, and the next kill waits until the last one
  has been recovered; or
* adds a node (``oobleck inject --add``), while fewer than ``--max-nodes`` nodes are in the job or joining:
  half the time under the name of a node killed earlier, otherwise under a new name.

No event is started in the last fifth of the steps (at least 10). Once a second the job's processes (every process carries
``OOBLECK_BENCH_TAG``) are counted with their open TCP sockets. Checks: the job completes; the process
count stays at most 1 + 2 * max-nodes (the launcher, then an agent and a worker per node); the socket count
stays under a bound for ``--max-nodes`` nodes (:func:`socket_bound`: it depends on the plan, a full mesh of
gloo pairs per process group, not on how many generations there were), and the sockets left in CLOSE_WAIT
(peer gone, ours never closed: what a leak of ended generations' sockets looks like) do not grow in the last
third of the run; no process outlives the run; and the losses of all steps and the final parameters equal ``oobleck train-local``'s
(float64, relative difference < 1e-9). Writes ``benchmarks/results/soak.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import random
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.jobs import (
    Job,
    Sample,
    Sampler,
    bad_flag,
    compare_with_reference,
    launch,
    machine_info,
    matches,
    non_step_lines,
    read_jsonl,
    recovery_figures,
    recovery_lines,
    run_and_report,
    tiny_gpt,
    train_reference,
    verdict_lines,
    write_config,
)
from oobleck.nodes import node_name

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
#: no event starts in the last fifth of the steps (at least 10): training should end with a settled cluster,
#: every joining node up (a node lost while it is still starting after the last step is committed fails the
#: job, see the report)
QUIET_TAIL_FRACTION = 0.2
QUIET_TAIL_STEPS = 10


def quiet_tail(steps: int) -> int:
    return max(QUIET_TAIL_STEPS, int(steps * QUIET_TAIL_FRACTION))


def inject(run_dir: Path, action: str, node: str) -> str:
    """``oobleck inject RUN_DIR --ACTION NODE`` (in this process: the same code path without a Python start)."""
    from oobleck.commands import inject as command

    args = argparse.Namespace(run_dir=str(run_dir), kill=None, hang=None, add=None, worker=None, timeout=10.0)
    setattr(args, action, [node])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        command.run(args)
    return out.getvalue().strip()


class Controller:
    """Chooses and carries out the kills and joins (see the module notes)."""

    def __init__(self, job: Job, args: argparse.Namespace) -> None:
        self.job = job
        self.args = args
        self.rng = random.Random(args.seed)
        self.in_job = {node_name(i) for i in range(args.nodes)}
        self.killed: list[str] = []  # every node killed so far (names that may join again)
        self.kill_pending: str | None = None
        self.joins_pending: set[str] = set()
        self.next_name = args.nodes
        self.next_event = self._gap(0)
        self.join_at: int | None = None
        self.seen_records = 0
        self.events: list[dict[str, Any]] = []
        #: the generation of the last committed step, and each generation's plan: (nodes in it, pipelines)
        self.generation = 0
        self.plans: dict[int, tuple[int, int]] = {}
        self._t0 = time.monotonic()

    def label(self) -> int | None:
        """The sampler's label: the generation of the last committed step (None before the first)."""
        return self.generation or None

    def _gap(self, now: int) -> int:
        low, high = self.args.every
        return now + self.rng.randint(low, high)

    def _log(self, step: int, what: str, node: str, how: str) -> None:
        event = {"t_s": round(time.monotonic() - self._t0, 2), "step": step, "event": what, "node": node, "how": how}
        self.events.append(event)
        print(f"  [{event['t_s']:7.1f} s] step {step:>4}: {what} {node} ({how}); in job: {len(self.in_job)}", flush=True)

    def poll(self) -> None:
        rows = read_jsonl(self.job.run_dir / "metrics.jsonl")
        committed = rows[-1]["step"] + 1 if rows else 0
        if rows:
            self.plans.setdefault(1, (rows[0]["nodes_alive"], rows[0]["pipelines"]))
            self.generation = rows[-1]["generation"]
        records = read_jsonl(self.job.run_dir / "recoveries.jsonl")
        for record in records[self.seen_records :]:
            self.plans[record["generation"]] = (record["nodes_alive"], record["pipelines"])
            for node in record["lost"]:
                self.in_job.discard(node)
                if node == self.kill_pending:
                    self.kill_pending = None
            for node in record["joined"]:
                self.in_job.add(node)
                self.joins_pending.discard(node)
        self.seen_records = len(records)
        if committed == 0 or committed >= self.args.steps - quiet_tail(self.args.steps):
            return
        if self.join_at is not None and committed >= self.join_at:
            self.join_at = None
            self._add(committed)
        if committed < self.next_event:
            return
        self.next_event = self._gap(committed)
        if self.kill_pending is None and len(self.in_job) - 1 >= self.args.min_alive and self.rng.random() < 0.6:
            self._kill(committed)
        else:
            self._add(committed)

    def _kill(self, step: int) -> None:
        node = self.rng.choice(sorted(self.in_job))
        if self.rng.random() < 0.5:
            how = inject(self.job.run_dir, "kill", node)
        else:
            agent = self.job.agent(node)
            if agent is None:
                return
            agent.kill()
            how = f"SIGKILL to agent pid {agent.pid}"
        self.in_job.discard(node)
        self.kill_pending = node
        self.killed.append(node)
        self.join_at = step + self.rng.randint(1, 3)
        self._log(step, "kill", node, how)

    def _add(self, step: int) -> None:
        if len(self.in_job) + len(self.joins_pending) >= self.args.max_nodes:
            return
        reusable = sorted(set(self.killed) - self.in_job - self.joins_pending - {self.kill_pending})
        if reusable and self.rng.random() < 0.5:
            node = self.rng.choice(reusable)
        else:
            node = node_name(self.next_name)
            self.next_name += 1
        self.joins_pending.add(node)
        self._log(step, "add", node, inject(self.job.run_dir, "add", node))


def socket_bound(max_nodes: int) -> int:
    """At most this many TCP sockets for a job of ``max_nodes`` single-device nodes: gloo's full mesh of
    pairs (measured here at up to ~3.5 socket ends per ordered pair of ranks, over the world group, the
    pipelines' and the gradient-sync groups) plus up to 4 control-plane and store sockets per process."""
    return 4 * max_nodes * (max_nodes - 1) + 4 * (1 + 2 * max_nodes)


def per_generation(samples: list[Sample]) -> list[dict[str, int]]:
    """For each generation (the label), the samples' extremes: how the counts move with the plan."""
    groups: dict[int, list[Sample]] = {}
    for sample in samples:
        if sample.label is not None:
            groups.setdefault(sample.label, []).append(sample)
    return [
        {
            "generation": g,
            "samples": len(group),
            "processes_max": max(x.processes for x in group),
            "sockets_min": min(x.sockets for x in group),
            "sockets_max": max(x.sockets for x in group),
            "close_wait_max": max(x.close_wait for x in group),
        }
        for g, group in sorted(groups.items())
    ]


def run_soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    machine = machine_info()
    raw = tiny_gpt(work / "profiles", args.nodes, args.steps)
    config = write_config(work / "soak.yaml", raw)
    started = time.monotonic()
    job = launch(config, work / "soak")
    controller = Controller(job, args)
    sampler = Sampler(job.tag, 1.0, label=controller.label)
    try:
        deadline = time.monotonic() + args.timeout
        while job.proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the soak run did not finish within {args.timeout:g} s (log: {job.log})")
            try:
                controller.poll()
            except Exception as e:  # an inject refused (e.g. the job just finished): note it, go on
                print(f"  controller: {type(e).__name__}: {e}", flush=True)
            time.sleep(0.05)
        code = job.proc.wait()
    finally:
        samples = sampler.stop()
        if job.proc.poll() is None:
            job.stop()
    wall = time.monotonic() - started
    time.sleep(1.0)  # agents that were told to stop exit within their grace period
    leftover = job.reap()
    machine["loadavg_1m_at_end"] = os.getloadavg()[0]
    output = job.output()
    failure = None
    if code != 0:
        failure = non_step_lines(output, 12)
        print(f"soak: the job failed ({code}):\n" + "\n".join(failure), flush=True)
        comparison = {"steps_compared": 0, "missing_steps": list(range(args.steps)), "max_loss_rel_diff": math.inf,
                      "max_param_rel_diff": math.inf, "tensors_compared": 0, "final_checkpoint": None}
    else:
        reference = train_reference(config, work / "reference")
        comparison = compare_with_reference(job.run_dir, reference, args.steps)
    records = read_jsonl(job.run_dir / "recoveries.jsonl")

    live = [s for s in samples if s.processes > 1]  # the launcher alone: before the start, after the end
    max_procs = max((s.processes for s in live), default=0)
    max_sockets = max((s.sockets for s in live), default=0)
    # sockets whose peer closed them linger in CLOSE_WAIT until their owner closes them: a leak of an ended
    # generation's sockets accumulates them; in the last third of the run there must be no more than in the rest
    third = max(1, len(live) // 3)
    stale_before = max((s.close_wait for s in live[:-third]), default=0)
    stale_last = max((s.close_wait for s in live[-third:]), default=0)
    checks = {
        "completed": code == 0,
        "processes_bounded": max_procs <= 1 + 2 * args.max_nodes,
        "sockets_bounded": max_sockets <= socket_bound(args.max_nodes),
        "close_wait_not_growing": stale_last <= stale_before + 4,
        "no_process_left": not leftover,
        "matches_reference": matches(comparison),
    }
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "model": "gpt tiny (d_model 32, n_head 2, seq_len 16), float64, global batch 16, microbatch 2",
            "steps": args.steps,
            "nodes": args.nodes,
            "max_nodes": args.max_nodes,
            "min_alive": args.min_alive,
            "every": list(args.every),
            "seed": args.seed,
            "n0": 2,
            "f": 1,
        },
        "machine": machine,
        "wall_s": wall,
        "events": controller.events,
        "kills": sum(e["event"] == "kill" for e in controller.events),
        "adds": sum(e["event"] == "add" for e in controller.events),
        "recoveries": records,
        "recovery_modes": {m: sum(r["mode"] == m for r in records) for m in {r["mode"] for r in records}},
        "steps_lost": sum(r["steps_lost"] for r in records),
        "generations": 1 + len(records),
        **recovery_figures(records),
        "samples": {
            "count": len(live),
            "processes": {"min": min((s.processes for s in live), default=0), "max": max_procs},
            "sockets": {
                "min": min((s.sockets for s in live), default=0),
                "max": max_sockets,
                "bound": socket_bound(args.max_nodes),
            },
            "close_wait": {"max_before_last_third": stale_before, "max_in_last_third": stale_last},
            "per_generation": [
                {**g, "plan_nodes_pipelines": controller.plans.get(g["generation"])} for g in per_generation(live)
            ],
            "listening": {"min": min((s.listening for s in live), default=0), "max": max((s.listening for s in live), default=0)},
            "series": [asdict(s) for s in samples],
        },
        "reference": comparison,
        "processes_left": leftover,
        "checks": checks,
        "passed": all(checks.values()),
        "failure": failure,
        "trace_lines": non_step_lines(output, 80),
    }


def format_summary(report: dict[str, Any]) -> str:
    c, s = report["config"], report["samples"]
    total = [r["total_s"] for r in report["recoveries"]]
    lines = [
        f"soak: {c['steps']} steps of the tiny GPT (float64), {c['nodes']} nodes at start (at most {c['max_nodes']}, "
        f"at least {c['min_alive']} in the job), an event every {c['every'][0]}-{c['every'][1]} steps, seed {c['seed']}",
        f"events: {report['kills']} kills, {report['adds']} joins; {len(report['recoveries'])} recoveries "
        f"({', '.join(f'{n} {m}' for m, n in sorted(report['recovery_modes'].items()))}), "
        f"{report['steps_lost']} steps lost, {report['generations']} generations, wall {report['wall_s']:.0f} s",
    ]
    if total:
        total.sort()
        lines.append(
            f"recovery total_s: min {total[0] * 1000:.0f} ms, median {total[len(total) // 2] * 1000:.0f} ms, "
            f"max {total[-1] * 1000:.0f} ms; {sum(t > 5.0 for t in total)} over 5 s"
        )
    lines.extend(recovery_lines(report))
    lines.append(
        f"sampled {s['count']} times: processes {s['processes']['min']}-{s['processes']['max']}, TCP sockets "
        f"{s['sockets']['min']}-{s['sockets']['max']}, listening {s['listening']['min']}-{s['listening']['max']}"
    )
    lines.append(
        f"  sockets bound for {report['config']['max_nodes']} nodes: {s['sockets']['bound']}; CLOSE_WAIT sockets: at most "
        f"{s['close_wait']['max_before_last_third']} before the last third of the run, {s['close_wait']['max_in_last_third']} in it"
    )
    per_gen = ", ".join(f"{g['generation']}: {g['sockets_min']}-{g['sockets_max']}" for g in s["per_generation"])
    lines.append(f"  sockets per generation (min-max): {per_gen}")
    lines.extend(verdict_lines(report))
    return "\n".join(lines)


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    a, b = int(low), int(high or low)
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"got {text!r}; use LOW-HIGH with 1 <= LOW <= HIGH")
    return a, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300; 60 for a quick check)")
    parser.add_argument("--nodes", type=int, default=6, help="nodes at the start (default 6)")
    parser.add_argument("--max-nodes", type=int, default=8, help="at most this many nodes in the job or joining")
    parser.add_argument("--min-alive", type=int, default=4, help="never kill below this many nodes (n0 * (f + 1))")
    parser.add_argument("--every", type=_range, default=(6, 15), help="steps between events, LOW-HIGH (default 6-15)")
    parser.add_argument("--seed", type=int, default=0, help="the controller's random seed")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run counts as hung")
    parser.add_argument("--keep", type=Path, help="keep the run in this directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where to write the JSON (default {RESULTS})")
    args = parser.parse_args(argv)
    if bad_flag(
        "benchmarks.soak",
        [
            ("--steps", args.steps, args.steps >= 2 * QUIET_TAIL_STEPS, f"must be at least {2 * QUIET_TAIL_STEPS}"),
            ("--nodes", args.nodes, 4 <= args.nodes <= args.max_nodes, "must be in [4, --max-nodes]"),
            ("--max-nodes", args.max_nodes, args.max_nodes <= 8, "must be at most 8 on this machine"),
            ("--min-alive", args.min_alive, 4 <= args.min_alive <= args.nodes, "must be in [4 (n0 * (f + 1)), --nodes]"),
        ],
    ):
        return 2
    return run_and_report(
        "benchmarks.soak",
        "oobleck-soak-",
        args.keep,
        args.out,
        lambda work: run_soak(args, work),
        format_summary,
        lambda work: f"soak: {args.steps} steps on {args.nodes} nodes; runs in {work}",
    )


if __name__ == "__main__":
    sys.exit(main())
