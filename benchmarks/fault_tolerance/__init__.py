"""Throughput under failures: Oobleck against the Bamboo-style and Varuna-style baselines of the same engine,
measured on local nodes with the tiny GPT, and the simulator checked against the measurements
(docs/benchmarks.md, "Throughput under failures, against the baselines").

``python -m benchmarks.fault_tolerance [--nodes 6] [--steps 250] [--schedule interval steps] [--failures 3]
[--every-s 6 --replace-after-s 1.5] [--every-steps 20 --replace-after-steps 10] [--seed 0 | --seeds 0 1 2]
[--trace PATH --compression C] [--policies oobleck bamboo varuna] [--run-timeout-s 300]
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

The failure schedule is the same for every policy, timed from the job's first committed step. Each
generated schedule (``--schedule``, one or both) runs once per seed (``--seed S``, or ``--seeds S ...``),
every policy under it:

* ``interval`` (the default), in wall seconds: :func:`benchmarks.sim.timeline.fixed_interval_trace` with the
  seed, the simulator's own generator: every ``--every-s`` seconds a node chosen by the seeded RNG among
  those alive in the schedule is lost, a new node (a new name) is added ``--replace-after-s`` seconds later;
  ``--failures`` losses in all. The schedule ends, so every policy finishes its steps (a policy whose
  restart outlasts the interval would otherwise never finish).
* ``steps``, in committed steps: the same generator and seed, counted in steps: a node is lost once the job
  has committed ``--every-steps`` steps (20, 40, ...; its highest committed step counts, so steps committed
  again after a restore do not), and replaced once it has committed ``--replace-after-steps`` more;
  ``--failures`` losses in all, the last replacement before ``--steps``. A slower policy meets the losses
  later in wall time, at the same points of training.
* ``--trace PATH --compression C``: a node-availability trace (``ms,add|remove,node``), its times divided by
  ``C``: the nodes it adds at time 0 start the job, the later events are replayed (one run per policy,
  under the name ``trace`` and seed 0).

The job's ``trace:`` config holds only the time-0 adds, so that the launcher starts the nodes under the
schedule's names; the harness replays the later events itself, timed from the job's first committed step
(a node lost before the first commit fails a job by design, and the launch-to-training time differs between
runs). A loss is what the launcher's own trace replay does: SIGKILL to the node's agent's process group (its
workers die with it). An add is ``oobleck inject RUN --add NODE``. The replayed times are recorded. A
``steps`` event is replayed when the harness reads the row that completes its step count (rows are read
every 20 ms): the loss lands in the next step, or a little later when steps take under 20 ms; the kill is
the same SIGKILL, so that the loss is recorded in wall time like the interval's and the simulator's check
needs nothing else.

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
:class:`benchmarks.sim.measured.MeasuredRun` of its run under failures: the tiny GPT's profile from the runs'
profile cache (measured once before the first run with one torch thread, as each worker has here:
:func:`measure_profile`), the nodes (capacity: the most alive at once), the schedule as replayed (seconds
from the window's start), the window's length, the measured costs (:func:`measured_costs`: medians of
:func:`recovery_durations`, of the restarts' process starts (a loss within one joins the restart) and of
the checkpoint writes; the checkpoint intervals the runs used; Bamboo never
re-partitions for overload, as the engine's does not, and re-partitions for every join, as the engine's
does), the time from a node's add until it could join (:func:`node_ready_s`, per run: a starting node
competes for this machine's two cores) and the policy's fault-free throughput, which scales its step times
(:func:`steady_samples_per_s`: every step of the fault-free run and of the failure run's first generation,
pooled; no first step, no checkpoint writes). The predicted throughput is compared with the measured one
(acceptance: within 20%). Other work on the machine moves step times between runs, so the prediction is
also made with each of the two runs alone as the calibration (``fault_free_run``, ``in_run``), and the
simulated event counts are printed beside the measured recoveries: where they differ, the simulator's rules
differ from the engine's.

Output: for each schedule and seed, the table per policy, Oobleck's ratios to the baselines, the
simulator's check and the acceptance lines; then for each schedule the table of its seeds (each policy's
samples/s, Oobleck's ratio to each baseline, the simulator's largest error) with the ratios' median and
spread. The JSON (``--out``) holds ``schedules: {NAME: {...}}``; each has the summary over its seeds
(:func:`~benchmarks.fault_tolerance.seeds.seed_summary`: ``median_ratio_vs_bamboo``,
``median_ratio_vs_varuna``, ``min_ratio_vs_*``, ``max_ratio_vs_*`` and ``sim_max_abs_error``, a fraction)
and ``seeds: {SEED: {...}}``, each seed's run: every policy's rows (commit times from the window's start),
recovery records, replayed events, breakdowns and ratios, the costs, the predictions and the machine (its
load average at every run's start and end). The PNG (``--plot``; ``STEM-NAME-seedS.png`` beside it when the
invocation makes several runs) shows the nodes alive and training and the throughput over a rolling window
for each policy. Exit status: 0 when in every run Oobleck is faster than each baseline that ran and every
prediction is within 20%, 1 when not (or a run failed), 2 on a bad command line.

Code
----
:mod:`~benchmarks.fault_tolerance.schedule` (the failure schedule), :mod:`~benchmarks.fault_tolerance.harness`
(one live run: launch, replay, rows), :mod:`~benchmarks.fault_tolerance.accounting` (the window's breakdown),
:mod:`~benchmarks.fault_tolerance.validation` (the simulator's check), :mod:`~benchmarks.fault_tolerance.report`
(summary and plot), :mod:`~benchmarks.fault_tolerance.seeds` (the summary over seeds),
:mod:`~benchmarks.fault_tolerance.bench` (every run and the JSON report) and
:mod:`~benchmarks.fault_tolerance.cli` (the command line).
"""

from benchmarks.fault_tolerance.accounting import (
    MEASURED,
    account,
    kept_rows,
    recovery_moments,
    rolling_throughput,
    summarize,
)
from benchmarks.fault_tolerance.cli import build_schedules, main, parse_args
from benchmarks.fault_tolerance.harness import HarnessError, Replayed, Replayer, Run, commit_times, run_policy
from benchmarks.fault_tolerance.schedule import UNITS, Schedule, fixed_schedule, trace_schedule
from benchmarks.fault_tolerance.seeds import seed_summary
from benchmarks.fault_tolerance.validation import (
    NEVER,
    measured_costs,
    node_ready_s,
    node_ready_times,
    recovery_durations,
    steady_samples_per_s,
)

__all__ = [
    "MEASURED",
    "NEVER",
    "UNITS",
    "HarnessError",
    "Replayed",
    "Replayer",
    "Run",
    "Schedule",
    "account",
    "build_schedules",
    "commit_times",
    "fixed_schedule",
    "kept_rows",
    "main",
    "measured_costs",
    "node_ready_s",
    "node_ready_times",
    "parse_args",
    "recovery_durations",
    "recovery_moments",
    "rolling_throughput",
    "run_policy",
    "seed_summary",
    "steady_samples_per_s",
    "summarize",
    "trace_schedule",
]
