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

Overlap (``training.overlap_grad_sync``)
    A bucket is all-reduced in *pieces*, each posted as soon as its gradients are final, and all are
    awaited only in :meth:`GradSync.reduce`, before the commit. The stage's last backward pass (the last
    microbatch's) is *armed* (:meth:`GradSync.arm` registers a post-accumulate-grad hook on every
    parameter; :meth:`~GradSync.reduce` and :meth:`~GradSync.abandon` remove them): from then on a
    parameter's gradient is final once autograd has accumulated into it (recomputation uses non-reentrant
    checkpoints, so each parameter accumulates once per backward pass). A bucket of a two-rank holder set
    is split into one piece per layer plus one for its flags: a two-way sum is a single addition, the
    same whichever piece an element travels in, so the sums are bitwise those of the unsplit bucket. A
    larger holder set keeps its bucket whole, because gloo's ring orders the additions by an element's
    position in the buffer. Pieces are
    posted in one order on every rank (from the last layer down, ties by bucket order), so the members of
    each group post its collectives alike; a piece waits for the ones before it, and :meth:`reduce` posts
    whatever the backward pass left (e.g. an MoE expert no token of the last microbatch reached). Without
    overlap every bucket is one piece, posted by :meth:`reduce` in bucket order.

Norm
    Each logical parameter is counted once in the global gradient norm: once a bucket is summed, its
    holders have the same buffer, and the holder at position p of the sorted set adds the squares of the
    p-th of as many equal slices of it as there are holders, whatever its pieces. Each holder's share is
    then a fraction of the work: with the whole buffer on the lowest rank, four single-stage pipelines of
    the tiny GPT had the other three ranks wait about 10 ms a step while rank 0 summed every square.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from models.base import TiedGroup
from oobleck.engine import interrupt
from oobleck.engine.api import PipelinePlan
from oobleck.engine.stage import HeldLayer
from oobleck.grad_buffer import GradBuffer

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


@dataclass
class Bucket:
    """The parameters of one (holder set, dtype) on this rank and their flat buffer (:meth:`finalize`
    builds it, in key order)."""

    ranks: tuple[int, ...]
    group: dist.ProcessGroup | None  # None when this rank is the only holder: nothing to sum
    entries: list[_Entry] = field(default_factory=list)
    buffer: GradBuffer = field(default_factory=lambda: GradBuffer([], torch.float32, torch.device("cpu")))

    def finalize(self, dtype: torch.dtype, device: torch.device) -> None:
        self.entries.sort(key=lambda e: e.key)
        self.buffer = GradBuffer([e.param for e in self.entries], dtype, device)

    def pieces(self, split: bool) -> list["_Piece"]:
        """The bucket as one piece, or (``split``) one piece per layer (tied parameters, at level -1, form
        one too) and a last one for the flags. A piece's level is its layer, the lowest of them when it has
        several: pieces are posted from the highest level down."""
        levels = [e.key[1] if e.key[0] == 1 else -1 for e in self.entries]
        everything = range(len(self.entries))
        buffer = self.buffer
        if not split:
            return [_Piece(self, min(levels), 0, buffer.flat.numel(), everything, everything)]
        pieces = []
        for level in sorted(set(levels), reverse=True):
            js = range(levels.index(level), len(levels) - levels[::-1].index(level))  # keys sort by level
            stop = buffer.offsets[js[-1]] + self.entries[js[-1]].param.numel()
            pieces.append(_Piece(self, level, buffer.offsets[js[0]], stop, js, js))
        pieces.append(_Piece(self, -1, buffer.numel, buffer.flat.numel(), range(0), everything))
        return pieces


@dataclass
class _Piece:
    """``bucket.buffer.flat[start:stop]``, all-reduced in one operation. It packs ``packs`` (entry indices) when it
    is posted, and it is ready once every entry in ``needs`` has its final gradient."""

    bucket: Bucket
    level: int
    start: int
    stop: int
    packs: range
    needs: range
    work: dist.Work | None = None
    done: int = 0  # entries of ``needs`` whose gradient is final (overlap only)

    @property
    def ready(self) -> bool:
        return self.done == len(self.needs)

    def post(self) -> None:
        """Pack and post the all-reduce (nothing to post when this rank is the only holder)."""
        self.bucket.buffer.pack(self.packs)
        if self.bucket.group is not None:
            flat = self.bucket.buffer.flat[self.start : self.stop]
            self.work = interrupt.post(dist.all_reduce, flat, group=self.bucket.group, async_op=True)


class GradSync:
    """Creates the gradient-sync groups (collectively: every rank must construct it at the same point) and
    sums this rank's gradients each step; ``overlap`` posts pieces during the last backward pass (see the
    module notes)."""

    def __init__(
        self,
        rank: int,
        pipelines: tuple[PipelinePlan, ...],
        num_layers: int,
        tied: list[TiedGroup],
        layers: list[HeldLayer],
        device: torch.device,
        timeout: timedelta,
        overlap: bool = False,
    ) -> None:
        self.rank = rank
        holders = layer_holders(pipelines, num_layers)
        tied_sets = tied_holders(holders, tied)
        groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        started = time.perf_counter()
        for ranks in sync_sets(holders, tied):
            group = interrupt.build(dist.new_group, list(ranks), timeout=timeout)
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
                bucket.entries.append(_Entry(key, param))
        # same order on every member of a group: by holder set, then dtype
        self.buckets = [buckets[k] for k in sorted(buckets, key=lambda k: (k[0], str(k[1])))]
        for (_, dtype), bucket in buckets.items():
            bucket.finalize(dtype, device)
        #: the pieces in posting order (see the module notes)
        self.pieces = [piece for b in self.buckets for piece in b.pieces(split=overlap and len(b.ranks) == 2)]
        if overlap:
            self.pieces.sort(key=lambda piece: -piece.level)  # a stable sort: ties keep bucket order
        self._posted = 0  # pieces posted so far this step
        #: each trainable parameter with the pieces that need its gradient
        self._waiting: list[tuple[torch.nn.Parameter, list[_Piece]]] = [
            (e.param, [piece for piece in self.pieces if any(piece.bucket.entries[j] is e for j in piece.needs)])
            for b in self.buckets
            for e in b.entries
        ]
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def arm(self) -> None:
        """Called before the stage's last backward pass of the step (overlap only): from now until
        :meth:`reduce` or :meth:`abandon`, a parameter's gradient accumulation is its last of the step, and
        pieces are posted as they become ready."""
        self._hooks = [
            param.register_post_accumulate_grad_hook(functools.partial(self._gradient_final, pieces))
            for param, pieces in self._waiting
        ]

    def _gradient_final(self, pieces: list[_Piece], param: torch.Tensor) -> None:
        for piece in pieces:
            piece.done += 1
        self._post_ready()

    def _post_ready(self) -> None:
        while self._posted < len(self.pieces) and self.pieces[self._posted].ready:
            self.pieces[self._posted].post()
            self._posted += 1

    def reduce(self) -> float:
        """Sum every gradient over its holders and return this rank's share of the squared global norm (its
        slice of each bucket, module notes), as float64. Posts the pieces not posted yet (all of them
        without overlap), then waits for every piece, bucket by bucket. If the generation ends meanwhile,
        every piece still in flight is abandoned (:func:`oobleck.engine.interrupt.abandon`) and the error
        is raised; the gradients are then partial and must be dropped."""
        squares = []
        try:
            for piece in self.pieces:
                piece.done = len(piece.needs)  # the backward pass is over: every gradient is final
            self._post_ready()
            for bucket in self.buckets:
                for piece in self.pieces:
                    if piece.bucket is bucket and piece.work is not None:
                        interrupt.wait(piece.work, bucket.group)
                bucket.buffer.unpack()
                squares.append(bucket.buffer.squared_norm(bucket.ranks.index(self.rank), len(bucket.ranks)))
        except Exception:  # the generation ended: pieces still in flight must not block its groups' end
            self.abandon()
            raise
        self._reset()
        return float(torch.stack(squares).sum()) if squares else 0.0

    def abandon(self) -> None:
        """Give up on this step's pieces in flight (the step failed): keep them referenced until they finish
        (:func:`oobleck.engine.interrupt.abandon`) and start the next step afresh."""
        interrupt.abandon((piece.work, piece.bucket.group) for piece in self.pieces)
        self._reset()

    def _reset(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for piece in self.pieces:
            piece.work, piece.done = None, 0
        self._posted = 0

    def scale(self, factor: float) -> None:
        """Multiply every summed gradient by ``factor`` (the gradients are views of the flat buffers)."""
        for bucket in self.buckets:
            bucket.buffer.scale(factor)
