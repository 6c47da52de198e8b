"""The layer-list interface every model in the zoo implements.

A model is an ordered list of layers. The planner cuts that list into contiguous stages, and the engine
runs each stage in its own process, so a layer must be buildable on its own and must compute the same
numbers wherever it runs:

* ``ModelSpec.build_layer(i)`` builds layer ``i`` alone, initialised from a generator seeded by
  ``(seed, i)``, so a stage that builds layers 3..5 gets exactly the weights that a single process
  building all layers gets.
* ``Layer.forward(carry, mb)`` takes the carry that crosses a stage boundary (a tensor or a small tuple
  of tensors) and the microbatch ``mb``. Every stage has the whole microbatch (data is a deterministic
  function of seed and step), so the first layer reads inputs from it and the last layer reads targets.
* The last layer returns the **summed** loss of the microbatch as a 0-dim tensor (sum over samples or
  tokens, never a mean), so the engine can divide by the global count once. ``ModelSpec.loss_units``
  says how many units (samples or tokens) a batch counts.
* Auxiliary losses (MoE load balancing) are appended by a layer to ``mb.aux_losses`` in the same summed
  units as the main loss. Each stage adds its own before its backward pass; nothing extra crosses stages.
* Tied weights (GPT's embedding and head) are declared in ``ModelSpec.tied``: each group lists
  ``(layer_index, parameter_name)`` pairs that must stay identical. ``build_all`` shares one Parameter
  per group; separately built layers hold equal copies, and the engine sums their gradients.

Models know nothing of distribution: no torch.distributed here.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

Carry = Union[torch.Tensor, tuple[torch.Tensor, ...]]


def carry_tensors(carry: Carry | None) -> tuple[torch.Tensor, ...]:
    """The tensors of a carry, in order: a tuple as it is, one tensor as a 1-tuple, None as no tensor."""
    if carry is None:
        return ()
    return carry if isinstance(carry, tuple) else (carry,)


@dataclass
class MicroBatch:
    """One microbatch as a layer sees it.

    ``data`` holds the tensors of the samples (inputs, targets, and per-sample randomness such as a
    diffusion timestep and noise, drawn from generators seeded by (seed, step, global sample index)).
    ``aux_losses`` collects auxiliary losses added by layers during this microbatch's forward pass.
    """

    data: dict[str, torch.Tensor]
    aux_losses: list[torch.Tensor] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(next(iter(self.data.values())).shape[0])

    def fresh(self) -> "MicroBatch":
        """The same samples with an empty auxiliary-loss list (one per stage and microbatch)."""
        return MicroBatch(self.data)


class Layer(nn.Module, abc.ABC):
    """One entry of a model's layer list."""

    @abc.abstractmethod
    def forward(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        """Map the incoming carry (None for the first layer) to the outgoing one (the summed loss for the
        last layer)."""


@dataclass(frozen=True)
class LayerMeta:
    """What the planner and the reports need to know of a layer without running it."""

    name: str
    params: int
    trainable_params: int
    flops_per_sample: float  # forward FLOPs for one sample; backward is about twice that
    output_numel_per_sample: int  # elements of the carry sent downstream per sample


TiedGroup = tuple[tuple[int, str], ...]


class ModelSpec(abc.ABC):
    """A model described as a list of independently buildable layers."""

    #: dtype the layers are built in
    dtype: torch.dtype = torch.float32

    @property
    @abc.abstractmethod
    def num_layers(self) -> int: ...

    @abc.abstractmethod
    def build_layer(self, index: int) -> Layer:
        """Build layer ``index`` alone, deterministically from the spec's seed and ``index``."""

    @abc.abstractmethod
    def layer_meta(self, index: int) -> LayerMeta: ...

    @abc.abstractmethod
    def loss_units(self, mb: MicroBatch) -> int:
        """How many units (samples or tokens) the summed loss of ``mb`` counts."""

    @property
    def tied(self) -> list[TiedGroup]:
        """Groups of (layer_index, parameter_name) that hold one logical weight."""
        return []

    def build_all(self) -> list[Layer]:
        """Every layer, with each tied group sharing one Parameter (the single-process view)."""
        layers = [self.build_layer(i) for i in range(self.num_layers)]
        for group in self.tied:
            (first_layer, first_name), *rest = group
            shared = layers[first_layer].get_parameter(first_name)
            for layer_index, name in rest:
                set_parameter(layers[layer_index], name, shared)
        return layers

    def sample_randomness(self, sample: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample random inputs (a diffusion timestep and noise), drawn only from ``gen``, which is
        seeded by (seed, step, global sample index). Models without randomness return {}."""
        return {}

    def export_pretrained(self, states: list[dict[str, torch.Tensor]], out_dir: str) -> bool:
        """Write the whole model, assembled from ``states`` (each layer's ``state_dict``, in layer order), in
        its library's own format under ``out_dir`` (a directory ``from_pretrained`` loads). Returns False when
        the model has no library format; the caller then writes safetensors and the config itself."""
        return False

    def fingerprint(self) -> dict:
        """A JSON-able description of everything that changes the model's numbers or shapes."""
        raise NotImplementedError


def set_parameter(module: nn.Module, dotted: str, param: nn.Parameter) -> None:
    """Make ``param`` the parameter that ``module.get_parameter(dotted)`` returns (sharing a tied weight)."""
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, param)



def run_layers(layers: list[Layer], mb: MicroBatch, carry: Carry | None = None) -> Carry:
    """Run a contiguous run of layers on one microbatch (a stage, or the whole model)."""
    for layer in layers:
        carry = layer(carry, mb)
    return carry


def layer_generator(seed: int, index: int) -> torch.Generator:
    """The generator a layer's initialisation draws from: a function of (seed, layer index) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)
