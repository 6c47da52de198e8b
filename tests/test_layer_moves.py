"""Layer moves (oobleck.engine.layer_moves) for real: three rank processes over gloo.

Ranks 0 and 1 hold trained layers; rank 2 and rank 1 receive copies in one recovery's moves, given in an
order that interleaves two pairs, once with each pair's layers in one message and once cut into messages
of at most 64 bytes. Every receiver must end with bitwise the sender's parameters, buffers (an int64 one,
an odd-sized float32 one, which leaves the float64 tensors after it unaligned in a packed message, and a
transposed one), AdamW moments and steps, layer step and loss scale; a parameter that never had a
gradient must stay without optimizer state.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import torch
from rank_processes import rank_results

from oobleck.engine.layer_moves import MESSAGE_BYTES, group_moves, messages

pytestmark = pytest.mark.timeout(300)

START_TIMEOUT = timedelta(seconds=180)
#: (layer, source, receiver), as a plan lists them: pairs (0 -> 2) and (1 -> 2) interleave, (0 -> 1) last
MOVES = ((0, 0, 2), (2, 1, 2), (1, 0, 2), (0, 0, 1))
HOLDS = {0: (0, 1), 1: (2,), 2: ()}
#: message sizes: the default (each pair's layers in one message) and 64 bytes (tensors above it travel
#: alone, from and into themselves; smaller ones, like the headers, are packed in runs)
LIMITS = (MESSAGE_BYTES, 64)


def test_moves_group_by_pair_in_first_appearance_order() -> None:
    assert group_moves(MOVES) == [(0, 2, [0, 1]), (1, 2, [2]), (0, 1, [0])]
    assert group_moves(()) == []


def test_messages_cut_at_tensor_boundaries_and_a_large_tensor_goes_alone() -> None:
    sizes = [3, 4, 20, 2, 2, 1]  # float64 elements: 24, 32, 160, 16, 16, 8 bytes
    tensors = [torch.zeros(n, dtype=torch.float64) for n in sizes]
    cut = messages(tensors, 64)
    assert [[t.numel() for t in m] for m in cut] == [[3, 4], [20], [2, 2, 1]]
    assert [id(t) for m in cut for t in m] == [id(t) for t in tensors]  # every tensor once, in order
    assert [len(m) for m in messages(tensors, 10**6)] == [6]
    assert messages([], 64) == []


def _rank_main(rank: int, store_port: int) -> None:
    import torch._dynamo  # noqa: F401  (before the first group: docs/design.md, "Releasing a blocked worker")
    import torch.distributed.nn  # noqa: F401

    import torch
    import torch.distributed as dist

    from oobleck.engine import layer_moves
    from oobleck.engine.layer_moves import run_moves
    from oobleck.engine.stage import HeldLayer
    from oobleck.precision import LossScale

    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=START_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=3, timeout=START_TIMEOUT)

    def layer(index: int, trained: bool) -> HeldLayer:
        torch.manual_seed(1000 * index + (rank if not trained else 99))
        module = torch.nn.Linear(5, 3, dtype=torch.float64)
        module.register_parameter("unused", torch.nn.Parameter(torch.randn(2, dtype=torch.float64)))
        module.register_buffer("counts", torch.arange(3) * (index + 1))
        module.register_buffer("odd", torch.randn(3, dtype=torch.float32))
        module.register_buffer("transposed", torch.randn(4, 2, dtype=torch.float64).t())  # not contiguous
        held = HeldLayer(index, module, torch.optim.AdamW(module.parameters(), lr=0.1))
        if trained:
            for _ in range(index + 1):
                module(torch.randn(4, 5, dtype=torch.float64)).pow(2).sum().backward()
                held.optimizer.step()
            held.step, held.scale = 7, LossScale(3 + index, 5)
        return held

    def describe(held: HeldLayer) -> dict[str, object]:
        params = dict(held.module.named_parameters())
        state = {n: {k: v.tolist() for k, v in held.optimizer.state[p].items()} for n, p in params.items() if held.optimizer.state.get(p)}
        return {
            "tensors": {k: v.tolist() for k, v in held.module.state_dict().items()},
            "dtypes": {k: str(v.dtype) for k, v in held.module.state_dict().items()},
            "moments": state,
            "step": held.step,
            "scale": held.scale.encode(),
        }

    pool = {i: layer(i, trained=True) for i in HOLDS[rank]}
    report: dict[str, object] = {"held": {i: describe(h) for i, h in pool.items()}}
    for limit in LIMITS:
        layer_moves.MESSAGE_BYTES = limit
        received = {i: layer(i, trained=False) for i, _, receiver in MOVES if receiver == rank}
        run_moves(MOVES, rank, pool, received, torch.device("cpu"))
        report[f"received/{limit}"] = {i: describe(h) for i, h in received.items()}
    dist.destroy_process_group()
    store.set(f"result/{rank}", json.dumps(report))
    store.wait(["finish"])


@pytest.mark.slow  # three rank processes and a gloo group: ~5 s
def test_received_layers_equal_their_sources_bitwise() -> None:
    results = rank_results(_rank_main, 3, START_TIMEOUT)
    checked = 0
    for limit in LIMITS:
        for index, source, receiver in MOVES:
            sent = results[source]["held"][str(index)]
            got = results[receiver][f"received/{limit}"][str(index)]
            assert got == sent, f"layer {index} from rank {source} to rank {receiver}, messages of {limit} bytes"
            assert set(sent["moments"]) == {"weight", "bias"}  # "unused" never had a gradient: no state travels
            assert sent["scale"] == [3 + index, 5] and sent["step"] == 7
            checked += 1
    assert checked == len(LIMITS) * len(MOVES)
