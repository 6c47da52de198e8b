"""The engine's pieces on their own: 1F1B order, carry headers, a two-stage pipeline of one microbatch,
holder sets and the step commit."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from oobleck.config import config_from_dict

from oobleck.engine.api import PipelinePlan
from oobleck.engine.commit import CommitCoordinator, StepAborted, report_ready
from oobleck.engine.gradsync import layer_holders, sync_sets, tied_holders
from oobleck.engine.p2p import CarrySpec
from oobleck.engine.p2p_stream import Receives
from planner.schedule import max_in_flight, one_f_one_b
from oobleck.engine.signed_store import SignedStore, store_key
from oobleck.engine.stage import StageExecutor, _kept_apart, build_stage_layers
from oobleck.engine.store_keys import ready_key
from oobleck.model_building import build_batches, build_model
from oobleck.precision import forward_layers

KEY = store_key("engine-units-token")


@pytest.mark.parametrize("stages,microbatches", [(1, 3), (2, 1), (3, 2), (3, 7), (4, 4), (5, 12)])
def test_1f1b_runs_every_microbatch_once_and_never_deadlocks(stages: int, microbatches: int) -> None:
    schedules = [one_f_one_b(s, stages, microbatches) for s in range(stages)]
    for s, ops in enumerate(schedules):
        assert sorted(ops) == sorted([(f, k) for f in (True, False) for k in range(microbatches)])
        in_flight = peak = 0
        for op in ops:
            in_flight += 1 if op.forward else -1
            peak = max(peak, in_flight)
            assert in_flight >= 0  # a backward never precedes its forward
        assert peak == max_in_flight(s, stages, microbatches)
    # execute the stages against each other: an op runs when its input exists (the carry from the previous
    # stage, or the gradient from the next one); every op must eventually run
    done: set[tuple[int, bool, int]] = set()
    cursors = [0] * stages
    progress = True
    while progress:
        progress = False
        for s, ops in enumerate(schedules):
            if cursors[s] == len(ops):
                continue
            forward, k = ops[cursors[s]]
            needs = (s - 1, True, k) if forward else (s + 1, False, k)
            edge = (forward and s == 0) or (not forward and s == stages - 1)
            if edge or needs in done:
                done.add((s, forward, k))
                cursors[s] += 1
                progress = True
    assert cursors == [len(ops) for ops in schedules]


def test_carry_header_round_trips() -> None:
    x = torch.zeros(2, 3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(2, dtype=torch.int64)
    for carry in [x, (x, labels)]:
        spec = CarrySpec.of(carry)
        assert CarrySpec.decode(spec.encode(torch.device("cpu"))) == spec
    assert [t.shape for t in CarrySpec.of((x, labels)).grad_specs] == [(2, 3, 4)]
    with pytest.raises(ValueError, match="at most 6 dims"):
        CarrySpec.of(torch.zeros([1] * 7))


#: the tiny GPT of the engine tests: 6 layers (embedding, 4 blocks, head), tied embedding and head
_TINY = config_from_dict(
    {"model": {"family": "gpt", "dtype": "float64", "overrides": {"n_layer": 4, "d_model": 32, "n_head": 2, "seq_len": 16}}}
)


def _stage_of_one_microbatch(rank: int, init_file: str, out: dict) -> None:
    """Rank ``rank`` of a two-stage pipeline over the 6 layers (cut at 3) runs a step of one microbatch, in
    which stage 0 posts the gradient receive of its only backward before that microbatch's forward has run;
    records its loss and its blocks' gradients."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        spec = build_model(_TINY.model, 0)
        first, last = ((0, 3), (3, 6))[rank]
        layers = build_stage_layers(spec, first, last, _TINY.training, torch.device("cpu"))
        executor = StageExecutor(
            spec, layers, rank, 2, 1, prev=0 if rank else None, next_=None if rank else 1, device=torch.device("cpu")
        )
        loss, _ = executor.run([build_batches(_TINY, spec).microbatch(0, 0)])
        blocks = [h for h in layers if 1 <= h.index <= 4]
        out[rank] = (loss, {(h.index, n): p.grad.clone() for h in blocks for n, p in h.module.named_parameters()})
    finally:
        dist.destroy_process_group()


def test_a_pipeline_of_one_microbatch_computes_the_whole_models_numbers(tmp_path: Path) -> None:
    """A pipeline the plan gives a single microbatch runs, and its loss and its (untied) blocks' gradients
    are those of the whole model in one process."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_stage_of_one_microbatch, args=(str(tmp_path / "init"), out), nprocs=2)
        (_, first), (loss, second) = out[0], out[1]
    spec = build_model(_TINY.model, 0)
    layers = spec.build_all()
    mb = build_batches(_TINY, spec).microbatch(0, 0)
    whole = forward_layers(layers, None, mb.fresh(), "fp32", torch.device("cpu"), ends_model=True)
    whole.backward()
    want = {(i, n): p.grad for i in range(1, 5) for n, p in layers[i].named_parameters()}
    assert loss == whole.item()
    assert first.keys() | second.keys() == want.keys()
    # float64 reductions (layer norms' backward) may run over other thread counts here than in the workers
    assert all((g - want[key]).abs().max() <= 1e-12 * want[key].abs().max() for key, g in (first | second).items())


def _stage_with_queued_redundancy(rank: int, init_file: str, gate: str, out: dict) -> None:
    """Rank ``rank`` of a two-stage pipeline (cut at 3) runs a step of four microbatches with a recording
    stand-in for the redundant forward. Stage 1 starts only once stage 0 has made its first redundant call,
    so stage 0's first backward waits for a gradient that cannot have come yet."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        spec = build_model(_TINY.model, 0)
        layers = build_stage_layers(spec, *((0, 3), (3, 6))[rank], _TINY.training, torch.device("cpu"))
        #: per call: its microbatch, those forwarded and not yet backwarded, whether B0's gradient has come
        #: (stage 0, before B0 took it; else None), whether the carry is None
        calls: list[tuple[int, list[int], bool | None, bool]] = []
        batches = build_batches(_TINY, spec)
        mbs = [batches.microbatch(0, j) for j in range(4)]

        def redundant(carry: object, mb: object) -> None:
            k = next(j for j, m in enumerate(mbs) if m is mb)
            pending = executor.next.ready(0) if rank == 0 and 0 in executor.next._pending else None
            calls.append((k, sorted(executor._saved), pending, carry is None))
            if rank == 0:
                Path(gate).touch()

        executor = StageExecutor(
            spec, layers, rank, 2, 4, prev=0 if rank else None, next_=None if rank else 1, device=torch.device("cpu"),
            redundant=redundant,
        )  # fmt: skip
        if rank == 1:
            deadline = time.monotonic() + 60
            while not Path(gate).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        loss, _ = executor.run(mbs)
        out[rank] = (loss, calls, len(executor._queued))
    finally:
        dist.destroy_process_group()


def test_redundant_forwards_wait_for_a_bubble_and_all_run_within_the_step(tmp_path: Path) -> None:
    """The Bamboo-style redundant forwards are queued, not run after each forward: stage 0's first one runs
    once both of its first forwards are done, while its first backward's gradient receive is still pending
    (``ready`` False); every microbatch's runs exactly once, oldest first, before ``run`` returns; the last
    stage passes None (its successor, the first stage, starts from the microbatch)."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_stage_with_queued_redundancy, args=(str(tmp_path / "init"), str(tmp_path / "gate"), out), nprocs=2)
        (_, first, left_first), (loss, last, left_last) = out[0], out[1]
    assert left_first == left_last == 0
    assert [c[0] for c in first] == [c[0] for c in last] == [0, 1, 2, 3]
    assert first[0] == (0, [0, 1], False, False)  # in the bubble before B0: F0 and F1 done, gradient pending
    assert all(not none for *_, none in first) and all(none for *_, none in last)
    spec = build_model(_TINY.model, 0)
    layers, batches = spec.build_all(), build_batches(_TINY, spec)
    with torch.no_grad():
        want = sum(
            float(forward_layers(layers, None, batches.microbatch(0, j).fresh(), "fp32", torch.device("cpu"), True))
            for j in range(4)
        )
    assert abs(loss - want) <= 1e-12 * abs(want)


def test_a_queued_carry_copies_what_aliases_a_receive_buffer() -> None:
    """A carry kept for a later redundant forward is detached, and a tensor the stage passed through from its
    received input (a receive buffer, refilled for a later microbatch) is a copy; the stage's own output is
    not copied."""
    received = (torch.ones(2, 3).requires_grad_(), torch.arange(3.0))
    own = received[0] * 2
    kept = _kept_apart((own, received[1]), received)
    assert isinstance(kept, tuple) and not kept[0].requires_grad and kept[0].data_ptr() == own.data_ptr()
    assert kept[1].data_ptr() != received[1].data_ptr() and torch.equal(kept[1], received[1])
    assert _kept_apart(own, None).data_ptr() == own.data_ptr() and _kept_apart(None, received) is None


class _HeldWork:
    """A stand-in for a receive's work handle: ``wait`` returns once ``arrive`` is set, raising ``error`` if
    given."""

    def __init__(self, error: Exception | None = None) -> None:
        self.arrive = threading.Event()
        self.error = error

    def wait(self) -> bool:
        self.arrive.wait(30)
        if self.error is not None:
            raise self.error
        return True


def test_a_receive_tells_whether_it_came_and_passes_on_its_error() -> None:
    """On CPU a receive is waited for by a thread of its own from its posting: ``ready`` is False until every
    work has completed and True after, without blocking; ``wait`` then returns, or raises the error a work
    failed with (a generation's end releasing the receive)."""
    works = [_HeldWork(), _HeldWork()]
    receives = Receives(works, None)
    assert not receives.ready()
    works[0].arrive.set()
    time.sleep(0.05)
    assert not receives.ready()
    works[1].arrive.set()
    deadline = time.monotonic() + 10
    while not receives.ready() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert receives.ready()
    receives.wait()
    failing = _HeldWork(RuntimeError("connection closed"))
    failed = Receives([failing], None)
    assert not failed.ready()
    failing.arrive.set()
    with pytest.raises(RuntimeError, match="connection closed"):
        failed.wait()


def test_holder_sets_follow_the_plan_and_tied_groups() -> None:
    pipelines = (
        PipelinePlan(ranks=(0, 1), layer_ranges=((0, 3), (3, 6)), microbatch_start=0, num_microbatches=2),
        PipelinePlan(ranks=(2, 3, 4), layer_ranges=((0, 2), (2, 4), (4, 6)), microbatch_start=2, num_microbatches=4),
    )
    holders = layer_holders(pipelines, 6)
    assert holders == [{0, 2}, {0, 2}, {0, 3}, {1, 3}, {1, 4}, {1, 4}]
    tied = [((0, "wte.weight"), (5, "lm_head.weight"))]
    assert tied_holders(holders, tied) == [{0, 1, 2, 4}]
    assert sync_sets(holders, tied) == [(0, 1, 2, 4), (0, 2), (0, 3), (1, 3), (1, 4)]
    # one pipeline: nothing to sum, no groups
    alone = (PipelinePlan(ranks=(0,), layer_ranges=((0, 6),), microbatch_start=0, num_microbatches=1),)
    assert sync_sets(layer_holders(alone, 6), tied) == []


@pytest.fixture
def server() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


@pytest.fixture
def store(server: dist.TCPStore) -> SignedStore:
    return SignedStore(server, KEY, "gen7/")


def _workers(port: int, step: int, ranks: list[int], outcome: dict) -> list[threading.Thread]:
    """Threads acting as workers (each with its own store connection) reporting ``step`` ready."""

    def work(rank: int) -> None:
        client = SignedStore(dist.TCPStore("127.0.0.1", port, is_master=False), KEY, "gen7/")
        try:
            outcome[rank] = report_ready(client, step, rank, loss_sum=2.0 * rank, units=rank, grad_norm=0.5,
                                         timeout=timedelta(seconds=30))  # fmt: skip
        except StepAborted as e:
            outcome[rank] = e

    threads = [threading.Thread(target=work, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    return threads


def test_commit_waits_for_every_rank_then_releases_them(server, store) -> None:
    coordinator = CommitCoordinator(store, world_size=3)
    outcome: dict = {}
    threads = _workers(server.port, 4, [0, 1, 2], outcome)
    report = coordinator.wait_step(4, should_abort=lambda: False)
    assert report is not None and outcome == {}  # nobody steps before the commit
    assert (report.step, report.units, report.loss, report.grad_norm) == (4, 3.0, 6.0 / 3.0, 0.5)
    coordinator.commit(4)
    for t in threads:
        t.join(10)
    assert outcome == {0: True, 1: True, 2: True}


def test_abort_before_everyone_is_ready_raises_in_the_workers(server, store) -> None:
    coordinator = CommitCoordinator(store, world_size=3)
    outcome: dict = {}
    threads = _workers(server.port, 0, [0, 2], outcome)  # rank 1 never reports: it died
    # abort once the survivors wait for the decision
    ready = [ready_key(0, 0), ready_key(0, 2)]
    assert coordinator.wait_step(0, lambda: all(store.get(k) is not None for k in ready), poll_s=0.01) is None
    for t in threads:
        t.join(10)
    assert sorted(outcome) == [0, 2] and all(isinstance(v, StepAborted) and v.step == 0 for v in outcome.values())


def test_worker_cli_refuses_a_bad_assignment_file_in_one_line(tmp_path) -> None:
    bad = tmp_path / "assignment.json"
    bad.write_text("{not json")
    proc = subprocess.run(
        [sys.executable, "-m", "oobleck.engine.worker", "--assignment-file", str(bad), "--token-file", str(bad)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--assignment-file" in proc.stderr


def test_a_grad_buffer_packs_gradients_and_flags_and_unpacks_none_where_no_gradient_was() -> None:
    """Round trip through the flat buffer the gradient sync all-reduces (and the profiler times): values,
    flags, the float64 squared norm, and None back where a parameter had no gradient."""
    from oobleck.grad_buffer import NORM_CHUNK, GradBuffer

    a, b, c = (torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64)) for shape in [(2, 3), (4,), (1,)])
    a.grad = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    c.grad = torch.tensor([-2.0], dtype=torch.float64)
    buffer = GradBuffer([a, b, c], torch.float64, torch.device("cpu"))
    assert buffer.offsets == [0, 6, 10] and buffer.numel == 11 and buffer.flat.numel() == 14
    b.grad = torch.ones(4, dtype=torch.float64)
    buffer.pack([0, 2])  # b is not packed: its slice and flag keep their zeros
    assert buffer.flat.tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 0, 0, -2, 1, 0, 1]
    assert buffer.squared_norm().item() == 55 + 4
    # three holders' shares: slices [0, 3), [3, 7), [7, 11) of the gradients, never the flags
    assert [buffer.squared_norm(p, 3).item() for p in range(3)] == [0 + 1 + 4, 9 + 16 + 25, 4]
    with pytest.raises(ValueError, match="share 3 of 3"):
        buffer.squared_norm(3, 3)
    # longer than a chunk: the chunks' sums add up to the whole
    long = torch.nn.Parameter(torch.zeros(3 * NORM_CHUNK + 5, dtype=torch.float64))
    long.grad = torch.full_like(long, 2.0)
    chunked = GradBuffer([long], torch.float64, torch.device("cpu"))
    chunked.pack()
    assert chunked.squared_norm().item() == 4 * long.numel()
    assert sum(chunked.squared_norm(p, 2).item() for p in range(2)) == 4 * long.numel()
    buffer.scale(0.5)
    buffer.unpack()
    assert a.grad.tolist() == [[0, 0.5, 1], [1.5, 2, 2.5]] and b.grad is None and c.grad.tolist() == [-1.0]
    assert a.grad.data_ptr() == buffer.flat.data_ptr()  # a view of the buffer, not a copy
