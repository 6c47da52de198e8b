"""The names of every key the job's store holds: one function per kind of key.

The master hosts the store; workers, the master and fault injection all name keys through this module, so
a key is spelled in one place. Values are signed (:mod:`oobleck.engine.signed_store`). What the step-commit
keys hold is described in :mod:`oobleck.engine.commit`.

In the master's store itself:

``gen{g}/``
    the prefix under which generation ``g``'s workers rendezvous and keep the keys below marked
    *generation* (so a new generation's keys never collide with an old one's);
``ended/gen{g}``
    written by the master when generation ``g`` ends;
``faults/NODE``
    the moment (seconds since the epoch) a fault injected by the config killed or stopped ``NODE``.
"""


def generation_prefix(generation: int) -> str:
    """The store prefix of ``generation``'s keys."""
    return f"gen{generation}/"


def ended_key(generation: int) -> str:
    """Written by the master when ``generation`` ends; every worker of it watches this key."""
    return f"ended/gen{generation}"


def fault_key(node: str) -> str:
    """Where a worker killed by an injected fault writes its last moment (seconds since the epoch)."""
    return f"faults/{node}"


def timing_key(rank: int) -> str:
    """Generation key where a worker reports how it joined the generation (JSON): the instants (seconds since
    the epoch) ``left_at`` (it had left the previous generation; null in a process's first), ``assigned_at``
    (it held this generation's assignment) and ``resumed_at`` (ready to train), and the seconds ``join_s``
    (``init_process_group``), ``groups_s`` (the gradient-sync groups) and ``transfer_s`` (taking its
    layers). The master reads it when the generation commits its first step, for the recovery report
    (:class:`~oobleck.control.records.RecoveryRecord`)."""
    return f"timing/r{rank}"


def ready_key(step: int, rank: int) -> str:
    """Generation key where ``rank`` reports that its gradients of ``step`` are ready."""
    return f"commit/{step}/r{rank}"


def decision_key(step: int) -> str:
    """Generation key where the master writes its decision on ``step`` (commit or abort)."""
    return f"commit/{step}/decision"
