"""The CUDA path's parts that a CPU build can run: which groups' communicators oobleck.engine.nccl_abort
would abort, and oobleck.engine.p2p_stream's choice of stream. The abort itself and the streams are
unverified here (no NCCL in this build, and one GPU cannot host several NCCL ranks)."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
import torch.distributed as dist

from oobleck.engine.nccl_abort import abort_nccl_communicators, nccl_backends
from oobleck.engine.p2p_stream import comm_stream


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


def test_links_on_the_cpu_keep_the_calling_stream_and_on_cuda_get_their_own() -> None:
    assert comm_stream(torch.device("cpu")) is None  # the gloo path: interrupt.post and work.wait, as before
    if torch.cuda.is_available():
        stream = comm_stream(torch.device("cuda"))
        assert stream is not None and stream != torch.cuda.current_stream()
