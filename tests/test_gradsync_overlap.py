"""Overlapped gradient sync (oobleck.engine.gradsync) for real: three rank processes, real gloo groups.

Pipeline 0 is rank 0 holding layers 0-2; pipeline 1 is rank 1 (layers 0-1) and rank 2 (layer 2). Rank 0's
bucket {0, 1} is split into the pieces of layers 1 and 0 and its flags, its bucket {0, 2} into layer 2's
piece and its flags. Every rank runs two microbatches' backward passes (the second armed), once with an
overlapped sync and once with the plain one, on the same gradients: the pieces go out during the armed
pass, and both syncs give bitwise the same sums, flags and norm share.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from rank_processes import rank_results

pytestmark = pytest.mark.timeout(300)

START_TIMEOUT = timedelta(seconds=180)
PIPELINES = (((0,), ((0, 3),)), ((1, 2), ((0, 2), (2, 3))))


def _rank_main(rank: int, store_port: int) -> None:
    import torch._dynamo  # noqa: F401  (before the first group: docs/design.md, "Releasing a blocked worker")
    import torch.distributed.nn  # noqa: F401

    import torch
    import torch.distributed as dist

    from oobleck.engine.api import PipelinePlan
    from oobleck.engine.gradsync import GradSync
    from oobleck.engine.stage import HeldLayer

    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=START_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=3, timeout=START_TIMEOUT)
    pipelines = tuple(PipelinePlan(ranks, ranges, 0, 2) for ranks, ranges in PIPELINES)
    first, last = next(r for ranks, ranges in PIPELINES for rk, r in zip(ranks, ranges) if rk == rank)
    torch.manual_seed(rank)
    layers = []
    for i in range(first, last):
        module = torch.nn.Linear(5, 5, dtype=torch.float64)
        # layer 1's extra weight gets a gradient from the first microbatch only (an MoE expert the last
        # microbatch did not reach): the backward pass cannot post its pieces, reduce does
        module.register_parameter("extra", torch.nn.Parameter(torch.randn(5, dtype=torch.float64)) if i == 1 else None)
        layers.append(HeldLayer(i, module, torch.optim.AdamW(module.parameters())))
    syncs = {
        overlap: GradSync(rank, pipelines, 3, [], layers, torch.device("cpu"), START_TIMEOUT, overlap=overlap)
        for overlap in (True, False)
    }

    def backward(k: int) -> None:
        x = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * rank + k))
        for held in layers:
            x = held.module(x) + (held.module.extra.sum() if k == 0 and held.index == 1 else 0)
        x.pow(2).sum().backward()

    report: dict[str, object] = {}
    for overlap, sync in syncs.items():
        torch.manual_seed(100 + rank)
        for held in layers:
            held.optimizer.zero_grad(set_to_none=True)
        backward(0)
        if overlap:
            sync.arm()
        backward(1)
        posted_early = sync._posted
        squares = sync.reduce()
        grads = {f"{h.index}.{n}": p.grad.tolist() if p.grad is not None else None for h in layers for n, p in h.module.named_parameters()}
        report[str(overlap)] = {"posted_early": posted_early, "pieces": len(sync.pieces), "squares": squares, "grads": grads}
    # the hooks live only from arm() to reduce(): none is left on the parameters
    report["hooks_left"] = sum(len(p._post_accumulate_grad_hooks or {}) for h in layers for p in h.module.parameters())
    dist.destroy_process_group()
    store.set(f"result/{rank}", json.dumps(report))
    store.wait(["finish"])


@pytest.mark.slow  # three rank processes and gloo groups: ~5 s (30 s on a loaded machine)
def test_overlapped_sync_posts_during_the_last_backward_and_sums_bitwise_alike() -> None:
    results = rank_results(_rank_main, 3, START_TIMEOUT)
    for rank, result in results.items():
        assert result["hooks_left"] == 0
        on, off = result["True"], result["False"]
        assert on["grads"] == off["grads"] and on["squares"] == off["squares"], rank
        assert off["posted_early"] == 0
    # rank 0: layer 2's piece and layer 1's went out during the backward pass; layer 1's extra weight had no
    # gradient in it, so layer 1's piece, and every piece after it in the posting order, waited for reduce
    assert results[0]["True"]["pieces"] == 5 and results[0]["True"]["posted_early"] == 1
    assert results[2]["True"]["posted_early"] == 2  # layer 2's piece and its bucket's flags
    # the two holders of layer 1 summed the same gradients, including the extra weight's (first microbatch)
    assert results[0]["True"]["grads"]["1.extra"] == results[1]["True"]["grads"]["1.extra"] is not None
    assert results[0]["True"]["grads"]["2.weight"] == results[2]["True"]["grads"]["2.weight"]
