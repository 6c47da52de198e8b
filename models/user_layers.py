"""Your own layers: ``model.family: package.module:object`` turned into a :class:`~models.base.ModelSpec`.

The object the import path names is one of:

* a :class:`ModelSpec` instance, used as it is;
* a callable (a :class:`ModelSpec` subclass, or a factory function) called with ``model.config`` as keyword
  arguments, plus ``seed`` (``training.seed``) and ``dtype`` (``model.dtype`` as a torch dtype) when its
  signature declares parameters of those names. It returns a :class:`ModelSpec` (used as it is), or the
  layers: a list of constructors (callables taking no arguments and returning an ``nn.Module``, one per
  layer), or a :class:`LayerList` (the constructors with a loss and tied groups).

:class:`UserLayersSpec` turns such a list into a spec. Its calling convention, chosen so that the modules of
an ordinary ``nn.Sequential`` work unchanged:

* the first layer receives the batch's inputs: ``tokens`` (LongTensor ``[B, T]``) for text data, ``image``
  (``[B, C, H, W]`` in the model's dtype) for image data;
* every other layer receives the previous layer's output (a tuple is unpacked into positional arguments) and
  returns a tensor or a tuple of tensors: that is the carry that crosses a stage boundary;
* after the last layer, ``loss(output, targets)`` turns its output into the **summed** loss, with targets
  ``targets`` (``[B, T]``) for text, ``label`` (``[B]``) for images. The default loss is the summed
  cross-entropy over the output's last dimension; the loss counts ``targets.numel()`` units.

Layer ``i`` is constructed with torch's global generator seeded from ``layer_generator(seed, i)`` (inside
``torch.random.fork_rng``, so the caller's generator is untouched) and with ``dtype`` as the default dtype, so
a layer built alone in a pipeline stage equals the one ``build_all()`` builds. A tied group's later members
are overwritten with the first member's initial value, so separately built copies start equal.

Sizes come from one dry run on a one-sample batch of zeros shaped by ``model.config`` (``seq_len`` for text;
``image_size`` and ``channels`` for images): parameters counted, forward FLOPs measured by
``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions, a multiply-add counting 2;
elementwise operations count nothing), and the carry's elements (every tensor of it).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.base import Carry, Layer, LayerMeta, MicroBatch, ModelSpec, TiedGroup, layer_generator, set_parameter
from models.errors import ModelConfigError

#: (input key, target key) of the text and the image datasets, tried in this order
DATA_KEYS = (("tokens", "targets"), ("image", "label"))

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def summed_cross_entropy(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits ``[..., classes]`` against integer targets ``[...]``, summed (not averaged)."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1), reduction="sum")


@dataclass
class LayerList:
    """What a factory returns when a plain list of constructors is not enough.

    ``layers``: one constructor per layer (no arguments, returns an ``nn.Module``). ``loss``: maps the last
    layer's output and the targets to the summed loss. ``tied``: groups of ``(layer index, parameter name)``
    (names as in the constructed module) holding one logical weight."""

    layers: Sequence[Callable[[], nn.Module]]
    loss: LossFn = summed_cross_entropy
    tied: Sequence[TiedGroup] = field(default_factory=list)


def _fail(family: str, what: str) -> ModelConfigError:
    return ModelConfigError(f"model.family: got {family!r}; {what}")


def resolve(family: str) -> Any:
    """The object ``package.module:object`` names. The module is looked up on ``sys.path``, then in the current
    directory (appended to ``sys.path`` for that: the folder ``oobleck run`` starts in, which its local
    workers share). ModelConfigError naming ``model.family`` when the module or the attribute is missing or
    importing the module raises."""
    module_name, _, attr = family.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise _fail(family, f"no module {e.name!r} on the Python path or in the current directory; run from "
                        "the folder holding it, add it to PYTHONPATH or install it") from None
        raise _fail(family, f"importing {module_name} failed: {e}") from None
    except Exception as e:
        raise _fail(family, f"importing {module_name} failed ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _fail(family, f"{module_name} has no attribute {attr!r}; name an object the module defines")
        obj = getattr(obj, part)
    return obj


def _call(family: str, factory: Callable[..., Any], config: dict[str, Any], seed: int, dtype: torch.dtype) -> Any:
    """``factory(**config)``, plus ``seed`` and ``dtype`` when its signature names them."""
    for name in ("seed", "dtype"):
        if name in config:
            raise ModelConfigError(f"model.config.{name}: reserved (the factory gets training.seed and model.dtype); drop it")
    kwargs = dict(config)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if "seed" in params:
        kwargs["seed"] = seed
    if "dtype" in params:
        kwargs["dtype"] = dtype
    try:
        return factory(**kwargs)
    except ModelConfigError:
        raise
    except Exception as e:
        raise _fail(family, f"calling it with model.config raised {type(e).__name__}: {e}") from None


def user_spec(family: str, config: dict[str, Any], seed: int, dtype: torch.dtype) -> ModelSpec:
    """The spec ``model.family: package.module:object`` describes (see the module docstring)."""
    obj = resolve(family)
    if isinstance(obj, ModelSpec):
        if config:
            raise ModelConfigError("model.config: the object is a ModelSpec instance, which takes no arguments; drop model.config")
        return _with_fingerprint(family, obj)
    if not callable(obj):
        raise _fail(family, f"a {type(obj).__name__}, not a ModelSpec or a factory; name a ModelSpec (instance or "
                    "class) or a function returning one or a list of layer constructors")
    made = _call(family, obj, config, seed, dtype)
    if isinstance(made, ModelSpec):
        return _with_fingerprint(family, made)
    if isinstance(made, (list, tuple)):
        made = LayerList(list(made))
    if not isinstance(made, LayerList):
        raise _fail(family, f"it returned a {type(made).__name__}; return a ModelSpec, a list of layer constructors "
                    "or a models.user_layers.LayerList")
    return UserLayersSpec(family, made, config, seed, dtype)


def _with_fingerprint(family: str, spec: ModelSpec) -> ModelSpec:
    """``spec``, after checking that it overrides ``fingerprint`` (the profile cache and the planner need it)."""
    if type(spec).fingerprint is ModelSpec.fingerprint:
        raise _fail(family, f"{type(spec).__name__} does not implement fingerprint(); return a JSON-able description "
                    "of everything that changes its numbers or shapes")
    return spec


class UserLayer(Layer):
    """One of your modules under the calling convention of the module docstring."""

    def __init__(self, module: nn.Module, first: bool, loss: LossFn | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.first = first
        self.loss = loss
        self.dtype = dtype

    def forward(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        inputs, targets = next((k for k in DATA_KEYS if k[0] in mb.data), DATA_KEYS[0])
        if self.first:
            x = mb.data[inputs]
            args: tuple[Any, ...] = (x.to(self.dtype) if x.is_floating_point() else x,)
        else:
            args = carry if isinstance(carry, tuple) else (carry,)
        out = self.module(*args)
        if self.loss is not None:
            return self.loss(out, mb.data[targets])
        return out


def _dry_run_batch(config: SimpleNamespace) -> MicroBatch:
    """One sample of zeros shaped like the data the model's config describes (text or images)."""
    if hasattr(config, "seq_len"):
        tokens = torch.zeros(1, config.seq_len, dtype=torch.long)
        return MicroBatch({"tokens": tokens, "targets": tokens.clone()})
    if hasattr(config, "image_size") and hasattr(config, "channels"):
        size = config.image_size
        return MicroBatch({"image": torch.zeros(1, config.channels, size, size), "label": torch.zeros(1, dtype=torch.long)})
    raise ModelConfigError(
        "model.config: your own layers need the shape of their data: seq_len (and vocab_size) for text, or "
        "image_size, channels and num_classes for images; add them"
    )


class UserLayersSpec(ModelSpec):
    """A :class:`LayerList` as a spec. ``config`` is ``model.config`` as a namespace: the data checks read
    ``seq_len``/``vocab_size`` (text) or ``image_size``/``channels``/``num_classes`` (images) from it."""

    def __init__(self, family: str, layers: LayerList, config: dict[str, Any], seed: int, dtype: torch.dtype) -> None:
        if not layers.layers:
            raise _fail(family, "it returned no layers; return at least one layer constructor")
        for i, ctor in enumerate(layers.layers):
            if isinstance(ctor, nn.Module) or not callable(ctor):
                raise _fail(family, f"layer {i} is a {type(ctor).__name__}, not a constructor; return callables that "
                            "build the module (e.g. lambda: nn.Linear(64, 32)) so each stage builds its own layers")
        for group in layers.tied:
            if len(group) < 2 or not all(0 <= int(i) < len(layers.layers) for i, _ in group):
                raise _fail(family, f"tied group {list(group)} must list two or more (layer index, parameter name) pairs "
                            f"with indices in [0, {len(layers.layers) - 1}]")
        self.family = family
        self.layers = layers
        self.config = SimpleNamespace(**config)
        self._raw_config = dict(config)
        self.seed = seed
        self.dtype = dtype
        self._metas: list[LayerMeta] | None = None
        self._shapes: list[list[list[Any]]] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers.layers)

    @property
    def tied(self) -> list[TiedGroup]:
        """:attr:`LayerList.tied`, names prefixed with ``module.`` (your module sits in :class:`UserLayer`)."""
        return [tuple((int(i), f"module.{name}") for i, name in group) for group in self.layers.tied]

    def _construct(self, index: int) -> nn.Module:
        """Constructor ``index`` run under the ``(seed, index)`` rule, in ``self.dtype``."""
        previous = torch.get_default_dtype()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(layer_generator(self.seed, index).initial_seed())
            torch.set_default_dtype(self.dtype)
            try:
                module = self.layers.layers[index]()
            except Exception as e:
                raise _fail(self.family, f"layer {index}'s constructor raised {type(e).__name__}: {e}") from None
            finally:
                torch.set_default_dtype(previous)
        if not isinstance(module, nn.Module):
            raise _fail(self.family, f"layer {index}'s constructor returned a {type(module).__name__}, not an nn.Module")
        return module

    def build_layer(self, index: int) -> Layer:
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range [0, {self.num_layers})")
        module = self._construct(index)
        for group in self.layers.tied:
            (first, first_name), *rest = group
            for layer_index, name in rest:
                if layer_index == index:
                    self._copy_tied(module, name, self._construct(first), first_name)
        last = index == self.num_layers - 1
        return UserLayer(module, index == 0, self.layers.loss if last else None, self.dtype)

    def _copy_tied(self, module: nn.Module, name: str, source: nn.Module, source_name: str) -> None:
        try:
            target, value = module.get_parameter(name), source.get_parameter(source_name)
        except AttributeError as e:
            raise _fail(self.family, f"tied group names a missing parameter ({e}); use names of named_parameters()") from None
        if target.shape != value.shape:
            raise _fail(
                self.family, f"tied parameters {name} {tuple(target.shape)} and {source_name} {tuple(value.shape)} differ in shape"
            )
        set_parameter(module, name, nn.Parameter(value.detach().clone(), requires_grad=target.requires_grad))

    def _measure(self) -> list[LayerMeta]:
        """The dry run of the module docstring (once per spec)."""
        if self._metas is not None:
            return self._metas
        mb = _dry_run_batch(self.config)
        metas, shapes = [], []
        carry: Carry | None = None
        for index, layer in enumerate(self.build_all()):
            counter = FlopCounterMode(display=False)
            try:
                with torch.no_grad(), counter:
                    carry = layer(carry, mb)
            except Exception as e:
                raise _fail(self.family, f"layer {index} failed on a one-sample batch ({type(e).__name__}: {e}); check "
                            "the layer's input shape and model.config's data shape") from None
            outputs = carry if isinstance(carry, tuple) else (carry,)
            if not all(isinstance(t, torch.Tensor) for t in outputs):
                raise _fail(self.family, f"layer {index} returned {type(carry).__name__}; return a tensor or a tuple of tensors")
            last = index == self.num_layers - 1
            params = list(layer.parameters())
            metas.append(
                LayerMeta(
                    name=f"{index}:{type(layer.module).__name__}",
                    params=sum(p.numel() for p in params),
                    trainable_params=sum(p.numel() for p in params if p.requires_grad),
                    flops_per_sample=float(counter.get_total_flops()),
                    output_numel_per_sample=0 if last else sum(t.numel() for t in outputs),
                )
            )
            shapes.append([[name, list(p.shape)] for name, p in layer.module.named_parameters(remove_duplicate=False)])
        self._metas, self._shapes = metas, shapes
        return metas

    def layer_meta(self, index: int) -> LayerMeta:
        return self._measure()[index]

    def loss_units(self, mb: MicroBatch) -> int:
        """The elements of the targets tensor (``targets`` for text, ``label`` for images)."""
        _, targets = next((k for k in DATA_KEYS if k[0] in mb.data), DATA_KEYS[0])
        return int(mb.data[targets].numel())

    def fingerprint(self) -> dict:
        self._measure()
        return {
            "family": self.family,
            "config": self._raw_config,
            "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."),
            "tied": [list(map(list, group)) for group in self.tied],
            "shapes": self._shapes,
        }
