"""Which devices a job runs on: the one reading of ``cluster.device`` that the trainers, the master and the
launchers share.

``cpu`` never uses CUDA; ``cuda`` always does; ``auto`` does when this process sees a CUDA device. torch is
imported only when the answer depends on it, so the master and the launchers can decide without loading it
for ``cpu``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oobleck.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICES = ("cpu", "cuda", "auto")


def wants_cuda(name: str, *, visible_here: bool = True) -> bool:
    """Whether ``cluster.device`` = ``name`` runs the job on CUDA devices (see the module notes).

    ``visible_here``: the devices are this process's machine's, so ``cuda`` without a visible CUDA device is a
    ConfigError. A launcher whose devices are on other machines (Ray) passes False: ``cuda`` is then True
    whatever this machine has. A name other than ``cpu``, ``cuda`` or ``auto`` is a ConfigError.
    """
    if name not in DEVICES:
        raise ConfigError(f"cluster.device: got {name!r}; allowed: {', '.join(DEVICES)}")
    if name == "cpu":
        return False
    if name == "cuda" and not visible_here:
        return True
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("cluster.device: got 'cuda' but no CUDA device is visible; use cpu or auto")
    return torch.cuda.is_available()


def resolve_device(name: str) -> torch.device:
    """The torch device of this process for ``cluster.device`` = ``name``: ``cuda`` or ``cpu`` as
    :func:`wants_cuda` decides (with the devices this machine's)."""
    import torch

    return torch.device("cuda" if wants_cuda(name) else "cpu")
