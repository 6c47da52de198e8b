"""What the control plane tells a worker: its place in the current generation's plan.

An :class:`Assignment` is plain data (JSON round-trips through :meth:`to_json`/:meth:`from_json`) so
that the master can send it over the control plane and a test can build one by hand.

Placement rule: pipeline ``p`` uses the ranks in ``pipelines[p].ranks``; stage ``i`` of that pipeline
runs layers ``[layer_ranges[i][0], layer_ranges[i][1])`` on rank ``ranks[i]``. Pipeline ``p`` runs
global microbatches ``[microbatch_start, microbatch_start + num_microbatches)`` of every step, so the
pipelines together cover each step's global batch exactly once. Stage ``i`` recomputes its activations in
backward when ``recompute[i]`` is true, and the plan predicts it needs ``predicted_bytes[i]`` of memory
(both empty for a plan made by hand: no stage recomputes unless ``training.recompute`` is ``full``, and there
is no prediction).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from typing import Any

#: the exit code of a worker that gave up on an ended generation it could not leave (an operation that
#: shutting the generation's sockets down did not release; after ``fault_tolerance.stuck_after_s``).
#: The master treats it as the loss of the worker's node, like a kill, not as the worker's own error.
STUCK_EXIT_CODE = 75
#: the exit code of a worker that stopped on bad input (its data, its config) after printing one line saying
#: so (``oobleck.worker_main``); the job fails with that line, as a user error
INPUT_ERROR_EXIT_CODE = 2


class Restore(str, enum.Enum):
    """Where a generation's layers come from. A ``str`` whose text is its value, so JSON (assignments,
    ``RUN/recoveries.jsonl``) and logs show ``init``, ``checkpoint`` or ``memory`` as before."""

    #: fresh layers, or ``model.init_checkpoint``'s
    INIT = "init"
    #: the run's checkpoint of the generation's start step
    CHECKPOINT = "checkpoint"
    #: the layers the workers already hold, plus the moves from surviving replicas
    MEMORY = "memory"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PipelinePlan:
    ranks: tuple[int, ...]
    layer_ranges: tuple[tuple[int, int], ...]
    microbatch_start: int
    num_microbatches: int
    #: per stage: whether it recomputes its activations in backward (the planner's decision)
    recompute: tuple[bool, ...] = ()
    #: per stage: the plan's predicted peak memory in bytes
    predicted_bytes: tuple[int, ...] = ()

    def recomputes(self, stage: int) -> bool:
        return bool(self.recompute) and self.recompute[stage]

    def prediction(self, stage: int) -> int:
        """The predicted peak bytes of ``stage``; 0 when the plan carries no prediction."""
        return self.predicted_bytes[stage] if self.predicted_bytes else 0

    def stage_of(self, rank: int) -> int | None:
        return self.ranks.index(rank) if rank in self.ranks else None

    def shadow_stage(self, stage: int) -> int | None:
        """Bamboo-style redundancy: the stage whose shadow copy ``stage`` holds, its successor in the ring
        of the pipeline's stages (the last stage shadows the first); None in a one-stage pipeline."""
        if len(self.ranks) < 2:
            return None
        return (stage + 1) % len(self.ranks)


@dataclass(frozen=True)
class Assignment:
    generation: int
    rank: int
    world_size: int
    store_host: str
    store_port: int
    #: key prefix of this generation in the shared store (groups of a new generation never collide)
    store_prefix: str
    backend: str  # "gloo" or "nccl"
    device: str  # "cpu" or "cuda:N"
    pipelines: tuple[PipelinePlan, ...]
    #: the job config as a dict (oobleck.config.JobConfig.to_dict())
    config: dict[str, Any]
    #: first step this generation runs (steps before it are committed)
    start_step: int = 0
    #: where the layers' state comes from (``start_step``'s checkpoint for :attr:`Restore.CHECKPOINT`)
    restore: Restore = Restore.INIT
    #: for ``memory``: ``(layer, source rank, receiver rank)``; each receiver gets the layer's parameters,
    #: optimizer state and step from the source; the moves between one pair of ranks travel packed together
    #: (see :mod:`oobleck.engine.layer_moves`)
    moves: tuple[tuple[int, int, int], ...] = ()
    #: the worker process restarts (a fresh interpreter) before joining this generation: the Varuna-style
    #: baseline's stop-everything restart (and Bamboo's after a fatal failure)
    restart: bool = False
    #: keep a shadow copy of the successor stage and run its forward redundantly (the Bamboo-style baseline)
    redundant: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Assignment":
        raw = json.loads(text)
        raw["pipelines"] = tuple(
            PipelinePlan(
                ranks=tuple(p["ranks"]),
                layer_ranges=tuple(tuple(r) for r in p["layer_ranges"]),
                microbatch_start=p["microbatch_start"],
                num_microbatches=p["num_microbatches"],
                recompute=tuple(bool(r) for r in p.get("recompute", ())),
                predicted_bytes=tuple(int(b) for b in p.get("predicted_bytes", ())),
            )
            for p in raw["pipelines"]
        )
        raw["moves"] = tuple(tuple(m) for m in raw.get("moves", ()))
        raw["restore"] = Restore(raw.get("restore", Restore.INIT))
        return cls(**raw)

    @property
    def my_pipeline(self) -> tuple[int, PipelinePlan]:
        for index, pipeline in enumerate(self.pipelines):
            if self.rank in pipeline.ranks:
                return index, pipeline
        raise ValueError(f"rank {self.rank} is in no pipeline")
