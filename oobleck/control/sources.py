"""Where a new generation's layers come from: a :class:`Sources` triple, and :func:`layer_moves`, the copies
from surviving holders (a pure function; the checkpoint fallback is :mod:`oobleck.control.checkpoints`)."""

from __future__ import annotations

from typing import NamedTuple, Sequence

from oobleck.engine.api import Restore

from oobleck.control.placement import Placement
from oobleck.control.policy import Holdings

#: (layer, source rank, receiving rank)
Move = tuple[int, int, int]


class Sources(NamedTuple):
    """A generation's start: ``restore`` is ``init`` (step 0, fresh layers), ``checkpoint`` or ``memory``
    (copies ``moves`` from surviving holders); ``start`` is its first step."""

    restore: Restore
    moves: tuple[Move, ...]
    start: int


#: the job's first generation without a checkpoint to resume from
FRESH = Sources(Restore.INIT, (), 0)


def layer_moves(
    placement: Placement, needed: Holdings, holdings: Holdings, layer_bytes: Sequence[int] | None
) -> tuple[Move, ...]:
    """The copies that give every worker of ``placement`` the layers it ``needed`` ((node, device) -> layers)
    from the workers that hold them (``holdings``, by the same keys; a holder outside ``placement`` is
    gone). ``layer_bytes``: each layer's size (None: all alike). Raises
    :class:`oobleck.engine.transfer.LayerLost` when some needed layer has no placed holder."""
    from oobleck.engine.transfer import plan_transfers

    needs: dict[int, set[int]] = {}
    holders: dict[int, set[int]] = {}
    for key, layers in needed.items():
        needs[placement.ranks[key]] = set(layers)
    for key, rank in placement.ranks.items():
        for layer in holdings.get(key, ()):
            holders.setdefault(layer, set()).add(rank)
    sizes = layer_bytes or [1] * (1 + max(layer for wanted in needs.values() for layer in wanted))
    plan = plan_transfers(holders, needs, dict(enumerate(sizes)))
    return tuple((t.layer, t.source, t.receiver) for t in plan.transfers)
