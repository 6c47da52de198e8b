"""The pure parts of the fault-tolerance harness (benchmarks/fault_tolerance/): commit times from stamped
metrics rows, the time breakdown of a run from synthetic rows and recovery records, throughput, the
failure schedules, the measured costs, and the command line's errors. No job runs here."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import fault_tolerance as ft
from benchmarks.jobs import median, tiny_gpt, write_config
from oobleck.errors import OobleckError


def row(step: int, gen: int, commit_at: float, step_time_s: float, **extra: float) -> dict[str, Any]:
    return {"step": step, "generation": gen, "commit_at": commit_at, "step_time_s": step_time_s,
            "nodes_alive": 6, "pipelines": 3, **extra}  # fmt: skip


def record(gen: int, resume_s: float, lost: tuple[str, ...] = ("node2",), joined: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    return {"generation": gen, "resume_s": resume_s, "detect_s": None, "lost": list(lost), "joined": list(joined),
            "mode": "memory", "steps_lost": 0, "total_s": resume_s, **extra}  # fmt: skip


#: step 2 carries 0.25 s of redundant work; node2 is lost at 3.5 (gen 2 starts at 3.6, ready at 5.0); step 4
#: writes a 0.25 s checkpoint first; a loss at 7.75 restores the checkpoint of step 4 (gen 3 starts at 8.0,
#: ready at 10.0), so step 4 is committed twice
ROWS = [
    row(0, 1, 1.0, 9.0),
    row(1, 1, 2.0, 1.0),
    row(2, 1, 3.0, 1.0, redundant_s=0.25),
    row(3, 2, 6.0, 2.4),
    row(4, 2, 7.25, 1.25, checkpoint_s=0.25),
    row(4, 3, 11.0, 3.0),
    row(5, 3, 12.0, 1.0),
]
RECORDS = [record(2, 1.5), record(3, 2.25, lost=("node5",), mode="restart", steps_lost=1, leave_s=0.5, assign_s=1.0)]
GEN_STARTS = {1: -8.0, 2: 3.6, 3: 8.0}


def test_breakdown_of_a_run_with_a_recovery_a_restore_redundancy_and_a_checkpoint() -> None:
    seconds = ft.account(ROWS, RECORDS, 0.0, 12.0, GEN_STARTS)
    assert seconds == pytest.approx(
        {"useful": 5.75, "redundant": 0.25, "recovery": 3.75, "checkpoint": 0.25, "lost": 1.0, "partial": 1.0}
    )
    assert sum(seconds.values()) == pytest.approx(12.0)


def test_time_after_the_last_commit_is_partial() -> None:
    seconds = ft.account(ROWS, RECORDS, 0.0, 14.5, GEN_STARTS)
    assert seconds["partial"] == pytest.approx(3.5)
    assert sum(seconds.values()) == pytest.approx(14.5)


def test_missing_redundant_and_checkpoint_fields_count_as_zero() -> None:
    rows = [row(0, 1, 1.0, 5.0), row(1, 1, 2.0, 1.0)]
    assert ft.account(rows, [], 0.0, 2.0) == pytest.approx(dict.fromkeys(ft.MEASURED, 0.0) | {"useful": 2.0})


def test_a_join_noticed_before_the_last_commit_cuts_no_step() -> None:
    rows = [row(0, 1, 1.0, 5.0), row(1, 1, 2.0, 1.0), row(2, 1, 3.0, 1.0), row(3, 2, 4.5, 1.2)]
    joined = record(2, 2.0, lost=(), joined=("node7",))
    assert ft.recovery_moments(rows, [joined], {2: 3.3}) == {2: pytest.approx((1.5, 3.5))}
    seconds = ft.account(rows, [joined], 0.0, 4.5, {2: 3.3})
    assert seconds["partial"] == 0.0
    assert seconds["recovery"] == pytest.approx(0.5)
    assert seconds["useful"] == pytest.approx(4.0)


def test_ready_is_not_before_the_generation_start() -> None:
    rows = [row(0, 1, 1.0, 5.0), row(1, 1, 2.0, 1.0), row(2, 2, 6.0, 1.5)]
    # a typical step (1.0) would put ready at 5.0, but the generation started at 5.5
    assert ft.recovery_moments(rows, [record(2, 2.5)], {2: 5.5}) == {2: pytest.approx((3.0, 5.5))}


def test_rows_outside_the_window_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        ft.account(ROWS, RECORDS, 0.0, 11.0)
    with pytest.raises(ValueError, match="before it starts"):
        ft.account(ROWS, RECORDS, 5.0, 4.0)


def test_kept_rows_keep_the_last_commit_of_a_step() -> None:
    assert ft.kept_rows(ROWS) == [True, True, True, True, False, True, True]


def test_commit_times_from_stamps_and_step_times() -> None:
    rows = [
        {"generation": 1, "step_time_s": 5.0, "stamp": 10.02},
        {"generation": 1, "step_time_s": 1.0, "stamp": 11.0},
        {"generation": 1, "step_time_s": 1.0, "stamp": 12.05},
        {"generation": 2, "step_time_s": 2.0, "stamp": 15.01},
    ]
    times, starts = ft.commit_times(rows)
    assert times == pytest.approx([10.0, 11.0, 12.0, 15.01])
    assert starts == pytest.approx({1: 5.0, 2: 13.01})


def synthetic_run(policy: str = "oobleck", **overrides: Any) -> ft.Run:
    fields: dict[str, Any] = dict(
        policy=policy, faults=True, run_dir=Path("/nonexistent"), config=Path("/nonexistent.yaml"), rows=ROWS,
        records=RECORDS, replayed=[], start=0.0, end=12.0, gen_starts=GEN_STARTS, timed_out=False, steps=6,
        global_batch=16, launch_to_start_s=20.0,
    )  # fmt: skip
    fields.update(overrides)
    return ft.Run(**fields)


def test_summary_counts_kept_steps_over_the_window() -> None:
    summary = ft.summarize(synthetic_run())
    assert summary["samples_per_s"] == pytest.approx(6 * 16 / 12.0)
    assert summary["steps_lost"] == 1
    assert summary["recoveries"] == 2
    assert summary["recovery_modes"] == {"memory": 1, "restart": 1}
    assert summary["breakdown_share"]["recovery"] == pytest.approx(3.75 / 12.0)


def test_steady_throughput_pools_the_first_generations_of_the_runs() -> None:
    """Steps 1 and 2 of generation 1 (the first step and later generations left out): 2 x 16 samples in 2 s;
    a fault-free run of 3 steps of 0.5 s pooled with it: 4 x 16 samples in 3 s."""
    run = synthetic_run()
    assert ft.steady_samples_per_s(run) == pytest.approx(2 * 16 / 2.0)
    fault_free = synthetic_run(faults=False, rows=[row(i, 1, 1.0 + i, 9.0 if i == 0 else 0.5) for i in range(3)])
    assert ft.steady_samples_per_s(fault_free, run) == pytest.approx(4 * 16 / 3.0)
    # a foreground checkpoint's write is not part of the configuration's step
    with_write = synthetic_run(rows=[row(0, 1, 1.0, 9.0), row(1, 1, 2.0, 1.5, checkpoint_s=0.5)])
    assert ft.steady_samples_per_s(with_write) == pytest.approx(16 / 1.0)


def test_recovery_durations_run_from_the_generation_start_to_ready() -> None:
    durations = ft.recovery_durations(synthetic_run())
    assert [(r["generation"], d) for r, d in durations] == [(2, pytest.approx(1.4)), (3, pytest.approx(2.0))]


def test_node_ready_times_from_joins_and_lower_bounds_for_nodes_that_never_joined() -> None:
    rows = [row(0, 1, 1.0, 5.0), row(1, 1, 2.0, 1.0), row(2, 1, 3.0, 1.0), row(3, 2, 4.5, 1.2), row(4, 2, 5.5, 1.0)]
    replayed = [ft.Replayed(0.5, "add", "node7"), ft.Replayed(1.0, "add", "node8"), ft.Replayed(9.0, "add", "node9")]
    run = synthetic_run(rows=rows, records=[record(2, 2.0, lost=(), joined=("node7",))], replayed=replayed,
                        end=5.5, gen_starts={1: -4.0, 2: 3.3})  # fmt: skip
    seen, censored = ft.node_ready_times(run)
    assert seen == pytest.approx([1.0])  # noticed at 1.5, added at 0.5
    assert censored == pytest.approx([4.5])  # node8: not joined by 5.5; node9 was added after the window
    ready, _ = ft.node_ready_s({"oobleck": run, "bamboo": synthetic_run("bamboo", replayed=[ft.Replayed(2.0, "add", "node7")])})
    assert ready == pytest.approx({"oobleck": 1.0, "bamboo": 10.0})


def test_measured_costs_take_medians_of_the_runs(tmp_path: Path) -> None:
    configs = {}
    for policy in ("oobleck", "varuna"):
        raw = tiny_gpt(tmp_path, 6, 10)
        raw["fault_tolerance"]["policy"] = policy
        configs[policy] = write_config(tmp_path / f"{policy}.yaml", raw)
    runs = {
        "oobleck": synthetic_run(records=[record(2, 1.5), record(3, 2.25, lost=("node5",))], config=configs["oobleck"]),
        "varuna": synthetic_run("varuna", config=configs["varuna"]),
    }
    costs, sources = ft.measured_costs(runs)
    assert costs.recovery_fixed_s == pytest.approx(1.7)  # median of 1.4 and 2.0
    assert costs.restart_s == pytest.approx(2.0)  # varuna's generation 3
    assert costs.restart_join_s == pytest.approx(1.5)  # its leave_s + assign_s (the largest: the only one)
    assert costs.varuna_grows_only_if_faster is False  # the engine's master restarts for every join
    assert costs.checkpoint_write_s == pytest.approx(0.25)
    assert costs.checkpoint_every == 10 and costs.oobleck_checkpoint_every == ft.NEVER
    assert costs.bamboo_takeover_s == 0.0 and "none measured" in sources["bamboo_takeover_s"]


def test_rolling_throughput_on_a_grid() -> None:
    xs, ys = ft.rolling_throughput([0.5, 1.0, 1.5, 4.0], 16, 2.0, 4.0, 1.0)
    assert xs == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert ys == pytest.approx([0.0, 32.0, 24.0, 8.0, 8.0])


def test_fixed_schedule_is_seeded_and_counts_its_losses() -> None:
    a = ft.fixed_schedule(6, 3.0, 3, 1.5, 0)
    assert a == ft.fixed_schedule(6, 3.0, 3, 1.5, 0)
    assert a.initial == tuple(f"node{i}" for i in range(1, 7))
    assert [e.at_s for e in a.events if e.kind == "remove"] == [3.0, 6.0, 9.0]
    assert [(e.at_s, e.node) for e in a.events if e.kind == "add"] == [(4.5, "node7"), (7.5, "node8"), (10.5, "node9")]
    assert a.capacity == 6
    assert ft.fixed_schedule(6, 3.0, 3, 1.5, 1).events != a.events
    late = ft.fixed_schedule(6, 3.0, 2, 4.0, 0)  # a replacement arrives after the next loss
    assert [(e.at_s, e.kind) for e in late.events] == [(3.0, "remove"), (6.0, "remove"), (7.0, "add"), (10.0, "add")]
    assert late.events[0] == a.events[0]  # the same first victim: the RNG draws from the same nodes


def test_step_schedule_loses_a_seeded_node_every_20_steps_and_replaces_it_10_steps_later() -> None:
    a = ft.fixed_schedule(6, 20, 3, 10, 0, "steps")
    assert a.unit == "steps" and a.initial == tuple(f"node{i}" for i in range(1, 7))
    assert [(e.at_s, e.kind) for e in a.events] == [(20, "remove"), (30, "add"), (40, "remove"), (50, "add"), (60, "remove"), (70, "add")]
    assert [e.node for e in a.events if e.kind == "add"] == ["node7", "node8", "node9"]
    alive = set(a.initial)
    for e in a.events:  # every victim is alive when it is lost
        assert (e.node in alive) == (e.kind == "remove")
        alive ^= {e.node}
    assert a == ft.fixed_schedule(6, 20, 3, 10, 0, "steps")
    victims = {seed: [e.node for e in ft.fixed_schedule(6, 20, 3, 10, seed, "steps").events if e.kind == "remove"] for seed in range(4)}
    assert len({tuple(v) for v in victims.values()}) > 1  # the seed chooses the victims
    # the same draws as the interval schedule of the same seed, in steps instead of seconds
    assert [e.node for e in a.events] == [e.node for e in ft.fixed_schedule(6, 6.0, 3, 3.0, 0).events]


def test_schedules_and_seeds_from_the_command_line() -> None:
    opts = ft.parse_args(["--schedule", "interval", "steps", "--seeds", "0", "1", "2", "--failures", "2"])
    schedules = ft.build_schedules(opts)
    assert list(schedules) == ["interval", "steps"] and all(list(s) == [0, 1, 2] for s in schedules.values())
    assert schedules["steps"][1] == ft.fixed_schedule(6, 20, 2, 10, 1, "steps")
    assert schedules["interval"][2] == ft.fixed_schedule(6, 6.0, 2, 1.5, 2)
    assert ft.build_schedules(ft.parse_args([]))["interval"] == {0: ft.fixed_schedule(6, 6.0, 3, 1.5, 0)}
    assert ft.build_schedules(ft.parse_args(["--seed", "4", "--schedule", "steps", "--every-steps", "7"]))["steps"] == {
        4: ft.fixed_schedule(6, 7, 3, 10, 4, "steps")
    }


class _Job:
    """A job with no agent running: a loss is replayed as 'no agent running'."""

    class proc:
        @staticmethod
        def poll() -> None:
            return None

    @staticmethod
    def agent(node: str) -> None:
        return None


def test_step_events_are_replayed_once_enough_steps_are_committed() -> None:
    import time

    events = [ft.fixed_schedule(6, 20, 2, 10, 0, "steps").events[i] for i in (0, 2)]  # the losses at 20 and 40
    replayer = ft.Replayer(_Job(), events, 0.0, "steps")
    replayer.advance(25)
    deadline = time.monotonic() + 30
    while not replayer.done and time.monotonic() < deadline:  # the replayer's thread acts on its own
        time.sleep(0.01)
    replayer.advance(39)
    replayer.advance(12)  # a step committed again after a restore does not go back
    done = replayer.stop()
    assert [(e.kind, e.node, e.note) for e in done] == [("remove", events[0].node, "no agent running")]


def _report(ratios: dict[str, float | None], errors: list[float]) -> dict[str, Any]:
    return {
        "ratios": {f"oobleck/{b}": {"failures": r, "fault_free": 1.1} for b, r in ratios.items()},
        "simulator": {"policies": {f"p{i}": {"relative_error": e} for i, e in enumerate(errors)}},
    }


def test_seed_summary_takes_median_spread_and_the_largest_simulator_error() -> None:
    reports = {
        0: _report({"bamboo": 1.6, "varuna": 2.1}, [0.03, -0.13, 0.06]),
        1: _report({"bamboo": 2.4, "varuna": None}, [0.05, -0.34, 0.02]),  # Varuna committed nothing
        2: _report({"bamboo": 2.0, "varuna": 2.7}, [-0.18, 0.12, 0.2]),
    }
    summary = ft.seed_summary(reports)
    assert summary == pytest.approx({
        "median_ratio_vs_bamboo": 2.0, "min_ratio_vs_bamboo": 1.6, "max_ratio_vs_bamboo": 2.4,
        "median_ratio_vs_varuna": 2.7, "min_ratio_vs_varuna": 2.1, "max_ratio_vs_varuna": None,
        "sim_max_abs_error": 0.34,
    })  # fmt: skip
    alone = ft.seed_summary({0: _report({"varuna": 3.0}, [0.1])})  # no Bamboo run
    assert alone["median_ratio_vs_bamboo"] is None and alone["min_ratio_vs_varuna"] == 3.0


def test_trace_schedule_compresses_and_checks_the_trace(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("".join(f"0,add,n{i}\n" for i in range(5)) + "20000,remove,n1\n40000,add,n9\n")
    schedule = ft.trace_schedule(trace, 10.0)
    assert schedule.initial == ("n0", "n1", "n2", "n3", "n4")
    assert [(e.at_s, e.kind, e.node) for e in schedule.events] == [(2.0, "remove", "n1"), (4.0, "add", "n9")]
    trace.write_text("".join(f"0,add,n{i}\n" for i in range(3)))
    with pytest.raises(OobleckError, match="at least 4"):
        ft.trace_schedule(trace, 1.0)
    trace.write_text("".join(f"{1000 * (i > 5)},add,n{i}\n" for i in range(9)))
    with pytest.raises(OobleckError, match="9 nodes alive"):
        ft.trace_schedule(trace, 1.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nodes", "3"], "--nodes: got 3"),
        (["--steps", "5"], "--steps: got 5"),
        (["--every-s", "0"], "--every-s: got 0.0"),
        (["--failures", "0"], "--failures: got 0"),
        (["--replace-after-s", "-1"], "--replace-after-s: got -1.0"),
        (["--run-timeout-s", "nan"], "--run-timeout-s: got nan"),
        (["--compression", "2"], "--compression: applies to --trace only"),
        (["--trace", "t.csv"], "--trace: needs --compression"),
        (["--trace", "t.csv", "--compression", "2", "--nodes", "5"], "--nodes: applies to the generated schedules only"),
        (["--trace", "/nonexistent/t.csv", "--compression", "2"], "cannot read it"),
        (["--trace", "t.csv", "--compression", "0"], "--compression: got 0.0"),
        (["--seeds", "0", "1", "0"], "--seeds: got 0 1 0; each must be at least 0, and given once"),
        (["--seeds", "-1"], "--seeds: got -1"),
        (["--seed", "-1"], "--seed: got -1"),
        (["--schedule", "steps", "--every-steps", "0"], "--every-steps: got 0"),
        (["--schedule", "steps", "--replace-after-steps", "-1"], "--replace-after-steps: got -1"),
        (["--every-steps", "5"], "--every-steps: applies to --schedule steps only"),
        (["--schedule", "steps", "--every-s", "3"], "--every-s: applies to --schedule interval only"),
        (["--schedule", "interval", "steps", "--steps", "70"], "--steps: got 70; --schedule steps adds its last node after step 70"),
        (["--trace", "t.csv", "--compression", "2", "--seeds", "1"], "--seeds: applies to the generated schedules only"),
        (["--trace", "t.csv", "--compression", "2", "--schedule", "steps"], "--schedule: applies to the generated schedules only"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert ft.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_argparse_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as e:
        ft.main(["--policies", "deepspeed"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        ft.main(["--every-s", "3", "--trace", "t.csv"])
    assert e.value.code == 2
    for argv in (["--seed", "1", "--seeds", "2"], ["--schedule", "hourly"], ["--seeds"]):
        with pytest.raises(SystemExit) as e:
            ft.main(argv)
        assert e.value.code == 2


def test_nan_costs_do_not_pass_silently() -> None:
    assert math.isnan(median([]))


def test_recovery_figures_bound_memory_recoveries_and_summarize_joins() -> None:
    """The soak's and the trace replay's summary of their records: the longest recovery from memory and
    those over 1 s (restarts and checkpoint restores are not recoveries from memory), and the joins."""
    from benchmarks.jobs import recovery_figures, recovery_lines

    records = [
        record(2, 0.2),
        record(3, 1.4, lost=(), joined=("node7", "node8"), joined_ready_s=[1.4, 0.3]),
        record(4, 7.0, mode="restart"),
        record(5, 0.4, lost=(), joined=("node9",), joined_ready_s=[0.4]),
    ]
    figures = recovery_figures(records)
    assert figures["memory_recovery_max_s"] == 1.4 and figures["memory_recoveries_over_1s"] == 1
    assert figures["join_ready_to_training_s"] == [1.4, 0.3, 0.4] and figures["join_ready_to_training_median_s"] == 0.4
    assert figures["generations_folding_several_joins"] == 1
    assert recovery_lines(figures)[0] == "recoveries from memory: longest 1400 ms; 1 over 1 s"
    assert recovery_lines(recovery_figures([record(4, 7.0, mode="restart")])) == [
        "recoveries from memory: none",
        "joins: none folded in",
    ]
