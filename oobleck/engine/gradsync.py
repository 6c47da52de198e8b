"""Gradient synchronisation across pipelines: every logical parameter's gradient is summed over all the
ranks holding a copy of it.

Holder sets
    A layer's holders are the ranks whose stage range contains it (one per pipeline). A tied group (GPT's
    embedding and head weight) is one logical parameter whose holders are the union of its layers'
    holders. Every rank creates one process group per distinct holder set of size >= 2, all in the same
    (sorted) order, as ``new_group`` requires; the sets follow from the plan alone, so no rank needs to
    know the parameters of layers it does not hold.

Buckets
    A rank's trainable parameters are grouped by (holder set, dtype) into buckets. A bucket is one flat
    buffer laid out identically on every member (logical parameters sorted by key), followed by one
    presence flag per parameter; a single all-reduce per bucket sums gradients and flags. A flag sum of 0
    means no holder produced a gradient (e.g. an MoE expert no token reached), and the parameter keeps
    ``grad = None``, exactly as in a single process, so its optimizer skips it.

Norm
    Each logical parameter is counted once in the global gradient norm: only the lowest rank of its
    holder set adds its squares.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from models.base import TiedGroup
from oobleck.engine import interrupt
from oobleck.engine.api import PipelinePlan
from oobleck.engine.stage import HeldLayer

#: sort key of a logical parameter: (0, tied group, "") or (1, layer index, parameter name)
ParamKey = tuple[int, int, str]


def layer_holders(pipelines: tuple[PipelinePlan, ...], num_layers: int) -> list[frozenset[int]]:
    """For each layer, the ranks (one per pipeline) whose stage holds it."""
    holders: list[set[int]] = [set() for _ in range(num_layers)]
    for pipeline in pipelines:
        for rank, (first, last) in zip(pipeline.ranks, pipeline.layer_ranges):
            for i in range(first, last):
                holders[i].add(rank)
    return [frozenset(h) for h in holders]


def tied_holders(holders: list[frozenset[int]], tied: list[TiedGroup]) -> list[frozenset[int]]:
    """For each tied group, the union of the holders of its layers."""
    return [frozenset().union(*(holders[i] for i, _ in group)) for group in tied]


def sync_sets(holders: list[frozenset[int]], tied: list[TiedGroup]) -> list[tuple[int, ...]]:
    """Every distinct holder set with at least two ranks, sorted: the groups every rank creates in order."""
    sets = {tuple(sorted(h)) for h in holders + tied_holders(holders, tied) if len(h) > 1}
    return sorted(sets)


@dataclass
class _Entry:
    key: ParamKey
    param: torch.nn.Parameter
    offset: int


@dataclass
class Bucket:
    """The parameters of one (holder set, dtype) on this rank and their flat buffer."""

    ranks: tuple[int, ...]
    group: dist.ProcessGroup | None  # None when this rank is the only holder: nothing to sum
    entries: list[_Entry] = field(default_factory=list)
    flat: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    numel: int = 0  # gradient elements; flags follow

    def finalize(self, dtype: torch.dtype, device: torch.device) -> None:
        self.entries.sort(key=lambda e: e.key)
        offset = 0
        for e in self.entries:
            e.offset = offset
            offset += e.param.numel()
        self.numel = offset
        self.flat = torch.zeros(offset + len(self.entries), dtype=dtype, device=device)

    def pack(self) -> None:
        flags = self.flat[self.numel :]
        for j, e in enumerate(self.entries):
            view = self.flat[e.offset : e.offset + e.param.numel()]
            if e.param.grad is None:
                view.zero_()
                flags[j] = 0
            else:
                view.copy_(e.param.grad.reshape(-1))
                flags[j] = 1

    def unpack(self) -> None:
        """Point every parameter's gradient at its summed slice (None where no holder had one)."""
        present = self.flat[self.numel :].tolist()
        for e, flag in zip(self.entries, present):
            n = e.param.numel()
            e.param.grad = self.flat[e.offset : e.offset + n].view_as(e.param) if flag > 0 else None


class GradSync:
    """Creates the gradient-sync groups (collectively: every rank must construct it at the same point) and
    sums this rank's gradients each step."""

    def __init__(
        self,
        rank: int,
        pipelines: tuple[PipelinePlan, ...],
        num_layers: int,
        tied: list[TiedGroup],
        layers: list[HeldLayer],
        device: torch.device,
        timeout: timedelta,
    ) -> None:
        self.rank = rank
        holders = layer_holders(pipelines, num_layers)
        tied_sets = tied_holders(holders, tied)
        groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        started = time.perf_counter()
        for ranks in sync_sets(holders, tied):
            group = dist.new_group(list(ranks), timeout=timeout)
            if rank in ranks:
                groups[ranks] = group
        #: seconds the ``new_group`` calls took on this rank (part of a recovery's rebuild)
        self.groups_s = time.perf_counter() - started

        tied_key = {(i, name): g for g, group in enumerate(tied) for i, name in group}
        buckets: dict[tuple[tuple[int, ...], torch.dtype], Bucket] = {}
        seen: set[ParamKey] = set()
        for held in layers:
            for name, param in held.module.named_parameters():
                if not param.requires_grad:
                    continue  # frozen (DiffFit): no sync, no optimizer state
                g = tied_key.get((held.index, name))
                key: ParamKey = (0, g, "") if g is not None else (1, held.index, name)
                if key in seen:
                    continue  # a tied weight shared by two layers of this stage
                seen.add(key)
                ranks = tuple(sorted(tied_sets[g] if g is not None else holders[held.index]))
                bucket = buckets.setdefault((ranks, param.dtype), Bucket(ranks, groups.get(ranks)))
                bucket.entries.append(_Entry(key, param, 0))
        # same order on every member of a group: by holder set, then dtype
        self.buckets = [buckets[k] for k in sorted(buckets, key=lambda k: (k[0], str(k[1])))]
        for (_, dtype), bucket in buckets.items():
            bucket.finalize(dtype, device)

    def reduce(self) -> float:
        """Sum every gradient over its holders (all buckets in flight at once) and return this rank's share
        of the squared global norm (the buckets whose lowest holder is this rank), as float64."""
        works: list[dist.Work | None] = []
        squares = []
        try:
            for bucket in self.buckets:
                bucket.pack()
                if bucket.group is not None:
                    works.append(interrupt.post(dist.all_reduce, bucket.flat, group=bucket.group, async_op=True))
                else:
                    works.append(None)
            for bucket, work in zip(self.buckets, works):
                if work is not None:
                    interrupt.wait(work, bucket.group)
                bucket.unpack()
                if bucket.ranks[0] == self.rank:
                    squares.append(bucket.flat[: bucket.numel].double().pow(2).sum())
        except Exception:  # the generation ended: buckets still in flight must not block its groups' end
            interrupt.abandon((work, bucket.group) for bucket, work in zip(self.buckets, works))
            raise
        return float(torch.stack(squares).sum()) if squares else 0.0

    def scale(self, factor: float) -> None:
        """Multiply every summed gradient by ``factor`` (the gradients are views of the flat buffers)."""
        for bucket in self.buckets:
            bucket.flat[: bucket.numel].mul_(factor)
