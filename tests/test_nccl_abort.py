"""oobleck.engine.nccl_abort on this CPU build: which groups' communicators it would abort. Only the
selection can run here (no NCCL in the build, and one GPU cannot host several NCCL ranks); the abort itself
is unverified."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
import torch.distributed as dist

from oobleck.engine.nccl_abort import abort_nccl_communicators, nccl_backends


@pytest.fixture
def world() -> Iterator[None]:
    """A one-rank gloo world in this process, destroyed afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_gloo_groups_and_cpu_only_groups_are_never_aborted(world: None) -> None:
    gloo = dist.new_group([0])  # gloo serves CUDA tensors too: its CUDA backend is gloo's
    cpu_only = dist.new_group([0], backend="cpu:gloo")  # no backend for CUDA tensors at all
    assert gloo._get_backend(torch.device("cuda")).name() == "gloo"
    with pytest.raises(RuntimeError):
        cpu_only._get_backend(torch.device("cuda"))
    assert nccl_backends([dist.group.WORLD, gloo, cpu_only]) == []
    assert abort_nccl_communicators() == 0  # every group this process holds
    flat = torch.ones(3)
    dist.all_reduce(flat, group=gloo)
    assert flat.tolist() == [1.0, 1.0, 1.0]
