"""The diffusers side of the adapter: which classes it wraps, their configs, weights and noise scheduler.

Everything here reads local files only (``HF_HUB_OFFLINE`` is set before diffusers is imported).
Errors are :class:`~models.errors.ModelConfigError` with one line naming the config field.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.base import layer_generator  # noqa: E402
from models.diffusion import NoiseSchedule  # noqa: E402
from models.errors import ModelConfigError  # noqa: E402

#: model.architecture -> the diffusers class name (also config.json's ``_class_name``)
CLASS_NAMES = {"unet2d": "UNet2DModel", "dit": "DiTTransformer2DModel"}
#: keys of model.config that configure the adapter rather than the diffusers class
SCHEDULER_KEY, CLASS_DROPOUT_KEY = "scheduler", "class_dropout"
#: the weights file ``save_pretrained`` writes (safetensors)
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
#: the scheduler config ``export_pretrained`` writes next to config.json and a config_dir may hold
SCHEDULER_FILE = "scheduler_config.json"
#: held while a build patches nn.Module or reseeds the global RNG, so that builds in two threads never mix
_BUILD_LOCK = threading.RLock()


def model_class(architecture: str) -> type[nn.Module]:
    """The diffusers class of ``architecture`` (unet2d or dit)."""
    import diffusers

    if architecture not in CLASS_NAMES:
        raise ModelConfigError(f"model.architecture: got {architecture!r}; allowed for diffusers: {', '.join(CLASS_NAMES)}")
    return getattr(diffusers, CLASS_NAMES[architecture])


def _read_json(path: Path, field: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelConfigError(f"{field}: cannot read {path} ({type(e).__name__}); it must be a JSON object") from None
    if not isinstance(value, dict):
        raise ModelConfigError(f"{field}: {path} holds no JSON object")
    return value


def resolve_config(
    architecture: str | None, config: dict[str, Any], config_dir: str | None
) -> tuple[str, dict[str, Any], dict[str, Any], Path | None]:
    """``(architecture, class kwargs, adapter options, weights file or None)`` from model.architecture and
    model.config, or from model.config_dir's config.json (its ``_class_name`` must agree with a given
    architecture) with its optional weights and scheduler_config.json. Adapter options are the keys
    ``scheduler`` and ``class_dropout`` (inline) or the scheduler file's fields under ``scheduler``."""
    options: dict[str, Any] = {}
    weights = None
    if config_dir is not None:
        folder = Path(config_dir)
        if not (folder / "config.json").is_file():
            raise ModelConfigError(
                f"model.config_dir: got {config_dir!r}; no config.json there (a folder written by save_pretrained)"
            )
        raw = _read_json(folder / "config.json", "model.config_dir")
        found = {v: k for k, v in CLASS_NAMES.items()}.get(raw.get("_class_name", ""))
        if found is None:
            raise ModelConfigError(
                f"model.config_dir: {folder / 'config.json'} describes {raw.get('_class_name')!r}; "
                f"supported: {', '.join(CLASS_NAMES.values())}"
            )
        if architecture is not None and architecture != found:
            raise ModelConfigError(
                f"model.architecture: got {architecture!r} but {folder / 'config.json'} is a {raw['_class_name']} "
                f"({found}); drop model.architecture or point model.config_dir at a {architecture} model"
            )
        architecture = found
        kwargs = {k: v for k, v in raw.items() if not k.startswith("_")}
        if (folder / SCHEDULER_FILE).is_file():
            options[SCHEDULER_KEY] = _read_json(folder / SCHEDULER_FILE, "model.config_dir")
        weights = folder / WEIGHTS_FILE if (folder / WEIGHTS_FILE).is_file() else None
    else:
        kwargs = dict(config)
        for key in (SCHEDULER_KEY, CLASS_DROPOUT_KEY):
            if key in kwargs:
                options[key] = kwargs.pop(key)
    assert architecture is not None  # config_checks requires one of the two
    cls = model_class(architecture)
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in kwargs:
        if key not in allowed:
            raise ModelConfigError(
                f"model.config.{key}: not a {cls.__name__} argument; allowed: {', '.join(allowed + [SCHEDULER_KEY, CLASS_DROPOUT_KEY])}"
            )
    return architecture, kwargs, options, weights


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules this thread constructs inside get their parameters on the meta device (no memory; their
    values are drawn later by :func:`materialize`), while buffers (e.g. fixed position tables) stay real.
    Other threads' modules are left alone."""
    original = nn.Module.register_parameter
    me = threading.get_ident()

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and threading.get_ident() == me:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    with _BUILD_LOCK:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
        try:
            yield
        finally:
            nn.Module.register_parameter = original  # type: ignore[method-assign]


def skeleton(cls: type[nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    """The whole diffusers model with meta parameters (its shapes and structure, for free); a constructor's
    refusal becomes one ModelConfigError line."""
    try:
        with parameters_on_meta():
            return cls(**kwargs)
    except (ValueError, TypeError, KeyError, NotImplementedError, AttributeError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelConfigError(f"model.config: {cls.__name__} rejects it ({first[:300]})") from None


def materialize(module: nn.Module, seed: int, index: int, dtype: torch.dtype) -> None:
    """Give ``module``'s meta parameters real values in place, drawn as the library's constructors draw
    them (every parameter-owning submodule's ``reset_parameters``, in registration order) from the global
    RNG seeded by ``layer_generator(seed, index)``'s seed, which is restored afterwards; then cast to
    ``dtype``. So the same (seed, index) and module give the same values in any process."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_generator(seed, index).initial_seed())
        for name, sub in module.named_modules():
            if next(sub.parameters(recurse=False), None) is None:
                continue
            if not hasattr(sub, "reset_parameters"):
                raise ModelConfigError(f"model.config: {type(sub).__name__} ({name}) has no initialiser this adapter knows")
            sub.reset_parameters()
    module.to(dtype)


def load_slice(module: nn.Module, weights: Path, prefix: str = "") -> None:
    """Copy exactly this module's tensors from a safetensors file, reading only them (``safe_open``): the
    entry of state name ``n`` is ``prefix + n``. A missing entry or a shape mismatch is a ModelConfigError."""
    from safetensors import safe_open

    state = module.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        loaded = {}
        for name, current in state.items():
            key = prefix + name
            if key not in keys:
                raise ModelConfigError(f"model.config_dir: {weights.name} lacks {key!r}; it does not match config.json")
            value = f.get_tensor(key)
            if value.shape != current.shape:
                raise ModelConfigError(
                    f"model.config_dir: {weights.name} {key!r} has shape {tuple(value.shape)}, the model {tuple(current.shape)}"
                )
            loaded[name] = value.to(current.dtype)
    module.load_state_dict(loaded)


class DiffusersSchedule(NoiseSchedule):
    """A diffusers ``DDPMScheduler`` in the shape :mod:`models.sampling` expects: ``num_timesteps`` and
    float64 ``alphas_cumprod`` (the scheduler's own values, widened), and ``q_sample`` = the scheduler's
    ``add_noise``. Only epsilon prediction is trained."""

    def __init__(self, config: dict[str, Any]) -> None:
        from diffusers import DDPMScheduler

        allowed = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
        for key in config:
            if key not in allowed and not key.startswith("_"):
                raise ModelConfigError(f"model.config.scheduler.{key}: not a DDPMScheduler argument; allowed: {', '.join(sorted(allowed))}")
        try:
            self.scheduler = DDPMScheduler(**{k: v for k, v in config.items() if not k.startswith("_")})
        except (ValueError, TypeError, NotImplementedError) as e:
            raise ModelConfigError(f"model.config.scheduler: DDPMScheduler rejects it ({str(e).splitlines()[0][:200]})") from None
        if self.scheduler.config.prediction_type != "epsilon":
            raise ModelConfigError(
                f"model.config.scheduler.prediction_type: got {self.scheduler.config.prediction_type!r}; only epsilon is trained"
            )
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.betas = self.scheduler.betas.to(torch.float64)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The scheduler's ``add_noise(x0, noise, t)`` (``t`` is ``[N]``)."""
        return self.scheduler.add_noise(x0, noise.to(x0.dtype), t.long())

    def to_dict(self) -> dict[str, Any]:
        """The scheduler's config (JSON-able), for fingerprints and export."""
        return {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}
