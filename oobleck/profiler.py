"""The layer profiler: measure each layer for real and cache the result under its fingerprint.

For layer ``i`` the profiler builds the layer alone (``spec.build_layer(i)``, as a pipeline stage does),
feeds it the carry that layers ``0 .. i-1`` produce on one real microbatch (detached, with
``requires_grad`` on floating tensors, as it arrives over a stage boundary), and times ``warmup + repeats``
forward and backward passes, keeping the median of the timed ones: at least ``repeats`` rounds, and rounds
until ``seconds`` have passed (``profile.seconds``, default 5). The window matters on a shared machine: a
core's speed here drifted by up to 28% between 5-second windows of one minute, so the median of a
second's passes timed whichever moment it fell on (six profiles of the tiny GPT in a row, 5 rounds each:
every layer's forward, backward and update summed to 0.039-0.059 s; 5 s each: 0.041-0.052 s).

Passes run in the order a stage runs them, not one layer's forward and backward back to back: each round
runs every layer's forward for :func:`in_flight` microbatches, then their backwards in reverse, so between
a layer's forward and its backward the other layers' weights and activations pass through the caches, as
in a 1F1B step with microbatches in flight. On CPU each forward runs under a saved-tensor hook like the
engine's memory counter (:mod:`oobleck.engine.memory`), whose Python calls a stage pays on every saved
tensor. Both raise a GPT block's passes by about 10% on this machine over back-to-back passes without the
hook, and bring them to within about 5% of what the engine's workers measure per microbatch.

On CPU each round then times every layer's once-a-step work (``update_s``): packing its gradients into
a flat buffer with their presence flags and back, their squared norm in float64 (the gradient sync's own
:class:`oobleck.grad_buffer.GradBuffer`) and an AdamW step made by
:func:`oobleck.training.make_optimizer` (at learning rate 0, so the layers do not change), as a worker does
after its last backward (:mod:`oobleck.engine.gradsync`, :mod:`oobleck.engine.worker`). On this machine a
GPT block's takes several times what AdamW on one flat tensor of its size takes: the optimizer steps every
parameter on its own, and the packing goes parameter by parameter. On accelerators it is not measured (0).

The median, because a step's time is the sum of many
passes, so the typical pass counts rather than the luckiest (the fastest was 10-20% below the median on
this machine's GPT blocks, and predicted local steps that much too short), and a burst of other processes'
load that hits fewer than half the passes leaves the median alone (:mod:`oobleck.engine.step_costs` accounts for
the cores a worker shares). When a local run's workers outnumber the cores, other processes compute the
model meanwhile (:mod:`oobleck.shared_cores`) and a pass is timed by its thread's CPU clock: the CPU it
costs a worker whose core switches between processes, which the planner then shares among the workers.
Sizes come from the tensors:

* ``param_bytes``: every parameter of the layer (a tied copy counts in each layer that holds it, since
  each stage keeps its own copy); ``grad_bytes``: the trainable ones; ``optimizer_bytes``: AdamW's two
  moments per trainable parameter, in the parameter's dtype;
* ``activation_bytes``: what autograd saves for backward during one forward pass, each storage once,
  not counting parameters (they are in ``param_bytes``);
* ``output_bytes``: the carry sent downstream; 0 for the last layer, whose output (the loss) crosses no
  stage boundary;
* and for the whole model, ``device_fixed_bytes``: on CUDA, cuBLAS's workspace, which the allocator's
  peak of every stage holds (:func:`_device_fixed_bytes`); 0 on the CPU.

:func:`ensure_profile` keeps one profile per fingerprint (model, microbatch, dtype, device, threads, the
processes computing beside it) in
``profile.cache_dir``, named by the fingerprint's hash. A cached file is used only when
``ModelProfile.load`` accepts it for the expected fingerprint; a stale or damaged one is measured again.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.base import Carry, MicroBatch, ModelSpec, carry_tensors
from models.data import BatchSource
from oobleck.config import JobConfig, TrainingConfig
from oobleck.devices import resolve_device
from oobleck.errors import ConfigError
from oobleck.grad_buffer import GradBuffer
from oobleck.model_building import build_batches, build_model, config_errors
from oobleck.shared_cores import computing_neighbours, job_neighbours, job_threads, torch_threads
from oobleck.training import make_optimizer, set_lr
from planner.errors import ProfileError
from planner.profile import LayerProfile, ModelProfile, fingerprint_hash


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _as_boundary_input(carry: Carry | None) -> Carry | None:
    """The carry as a stage receives it: a fresh leaf, requiring grad when it is floating point."""
    if carry is None:
        return None
    received = tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in carry_tensors(carry))
    return received if isinstance(carry, tuple) else received[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The device as the fingerprint records it: ``cpu``, or ``cuda:<model name>`` (timings differ by GPU)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def profile_fingerprint(
    spec: ModelSpec, microbatch: int, device: torch.device, threads: int | None = None, neighbours: int = 0
) -> dict:
    """What a profile depends on: the model's own fingerprint, microbatch size, dtype, device, the intra-op
    threads the layers ran with (``threads``; default: this process's current count) and the processes that
    computed beside the profiler (``neighbours``; :mod:`oobleck.shared_cores`)."""
    with config_errors():  # your own layers measure themselves here, and may refuse in one line
        model = spec.fingerprint()
    return {
        "model": model,
        "microbatch": microbatch,
        "dtype": str(spec.dtype).removeprefix("torch."),
        "device": device_name(device),
        "threads": torch.get_num_threads() if threads is None else threads,
        "source": "measured",
        # profiles that kept the fastest pass, or timed a layer's passes back to back, time too short a step
        "timing": "median of stage-order rounds, with the update",
        "neighbours": neighbours,
    }


class _SavedBytes:
    """Counts the bytes autograd saves for backward, each storage once, parameters excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.storages: dict[int, int] = {}
        self._exclude = exclude

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def backward_with_ones(out: Carry, mb: MicroBatch) -> None:
    """Backpropagate one forward pass as a stage would: a gradient of ones into every output that needs one
    (the last layer's loss gets exactly 1) and into the layer's auxiliary losses."""
    roots = [t for t in carry_tensors(out) if t.requires_grad] + list(mb.aux_losses)
    if roots:  # a frozen layer fed by nothing trainable has no backward pass
        torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])


def in_flight(device: torch.device) -> int:
    """Microbatches whose forward passes a profiling round runs before their backwards: 2 on CPU (a stage
    of a 1F1B pipeline commonly holds one microbatch's activations while it runs another's passes); 1 on an
    accelerator, whose memory must hold every layer's activations of a round at once."""
    return 2 if device.type == "cpu" else 1


class _Update:
    """One layer's once-a-step work after its last backward, as a worker does it (module notes)."""

    def __init__(self, layer: torch.nn.Module, training: TrainingConfig) -> None:
        params = list(dict.fromkeys(p for p in layer.parameters() if p.requires_grad))
        dtype = params[0].dtype if params else torch.float32
        self.buffer = GradBuffer(params, dtype, torch.device("cpu"))
        self.optimizer = make_optimizer(layer.named_parameters(), training)
        set_lr(self.optimizer, 0.0)

    def run(self) -> None:
        self.buffer.pack()
        self.buffer.squared_norm()
        self.buffer.unpack()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _timed_round(
    layers: list[torch.nn.Module],
    carries: list[Carry | None],
    mb: MicroBatch,
    device: torch.device,
    clock: Callable[[], float],
    updates: list[_Update] | None,
) -> tuple[list[list[tuple[float, float]]], list[float]]:
    """One round of the module notes: per layer, the (forward, backward) seconds by ``clock`` of each of its
    :func:`in_flight` microbatches, every pass on a received copy of the layer's input carry; then, with
    ``updates`` (one per layer), each layer's update seconds (else none)."""
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    hook = _SavedBytes(set())
    forwards: list[tuple[int, Carry, MicroBatch, float]] = []
    for _ in range(in_flight(device)):
        for index, (layer, carry) in enumerate(zip(layers, carries)):
            inputs = _as_boundary_input(carry)
            run_mb = mb.fresh()
            _sync(device)
            start = clock()
            with _counting(hook, device):
                out = layer(inputs, run_mb)
            _sync(device)
            forwards.append((index, out, run_mb, clock() - start))
    seconds: list[list[tuple[float, float]]] = [[] for _ in layers]
    for index, out, run_mb, forward_s in reversed(forwards):
        start = clock()
        backward_with_ones(out, run_mb)
        _sync(device)
        seconds[index].append((forward_s, clock() - start))
    updated = []
    for update in updates or ():
        start = clock()
        update.run()
        updated.append(clock() - start)
    return seconds, updated


def _counting(hook: _SavedBytes, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """On CPU, ``hook`` on every tensor autograd saves, as the engine's memory counter is; elsewhere nothing."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(hook.pack, _unpacked)


def _unpacked(t: torch.Tensor) -> torch.Tensor:
    return t


def profile_model(
    spec: ModelSpec,
    batches: BatchSource,
    microbatch: int,
    device: torch.device,
    warmup: int = 2,
    repeats: int = 5,
    neighbours: int = 0,
    training: TrainingConfig | None = None,
    seconds: float = 0.0,
) -> ModelProfile:
    """Measure every layer of ``spec`` on samples ``[0, microbatch)`` of step 0 of ``batches`` on
    ``device`` (see the module docstring): ``warmup`` untimed rounds, then timed rounds until there are at
    least ``repeats`` and they have taken at least ``seconds``. With ``neighbours`` > 0, that many processes
    the caller started compute meanwhile (:func:`oobleck.shared_cores.computing_neighbours`), and passes
    are timed by this thread's CPU clock rather than the wall clock. The update's optimizer is
    ``training``'s (default: the default training config's).

    Timing goes round by round over all layers (each round as the module notes say), so a burst of load
    from other processes spreads over every layer instead of inflating the one measured at that moment.
    """
    if repeats < 1 or warmup < 0 or not seconds >= 0:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and seconds >= 0, got {repeats}, {warmup}, {seconds}")
    sample = batches.samples(0, 0, microbatch)
    mb = MicroBatch({k: v.to(device) for k, v in sample.data.items()})
    layers = [spec.build_layer(i).to(device) for i in range(spec.num_layers)]

    # One pass with the saved-tensor hook: each layer's input carry and its activation bytes.
    carries: list[Carry | None] = []
    activation_bytes = []
    carry: Carry | None = None
    for layer in layers:
        carries.append(carry)
        saved = _SavedBytes({p.untyped_storage().data_ptr() for p in layer.parameters()})
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            out = layer(_as_boundary_input(carry), mb.fresh())
        activation_bytes.append(saved.total)
        carry = tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()

    fixed = _device_fixed_bytes(device)
    clock = time.thread_time if neighbours else time.perf_counter
    times: list[list[tuple[float, float]]] = [[] for _ in layers]
    update_times: list[list[float]] = [[] for _ in layers]
    updates = [_Update(layer, training or TrainingConfig()) for layer in layers] if device.type == "cpu" else None
    for _ in range(warmup):
        _timed_round(layers, carries, mb, device, clock, updates)
    timed, started = 0, time.perf_counter()
    while timed < repeats or time.perf_counter() - started < seconds:
        passes_s, updated = _timed_round(layers, carries, mb, device, clock, updates)
        for measured, passes in zip(times, passes_s):
            measured.extend(passes)
        for measured, update_s in zip(update_times, updated):
            measured.append(update_s)
        timed += 1

    profiles = []
    for index, layer in enumerate(layers):
        params = list(layer.parameters())
        trainable = [p for p in params if p.requires_grad]
        outgoing = carries[index + 1] if index + 1 < len(layers) else None  # the loss crosses no boundary
        profiles.append(
            LayerProfile(
                name=spec.layer_meta(index).name,
                forward_s=statistics.median(f for f, _ in times[index]),
                backward_s=statistics.median(b for _, b in times[index]),
                param_bytes=sum(_nbytes(p) for p in params),
                grad_bytes=sum(_nbytes(p) for p in trainable),
                optimizer_bytes=2 * sum(_nbytes(p) for p in trainable),
                activation_bytes=activation_bytes[index],
                output_bytes=0 if outgoing is None else sum(_nbytes(t) for t in carry_tensors(outgoing)),
                update_s=statistics.median(update_times[index]) if update_times[index] else 0.0,
            )
        )
    return ModelProfile(tuple(profiles), profile_fingerprint(spec, microbatch, device, neighbours=neighbours), fixed)


def _device_fixed_bytes(device: torch.device) -> int:
    """On CUDA, what a process's first matrix product and its backward leave allocated: cuBLAS's workspace,
    which the caching allocator holds for the process's life (64 MiB on an H200). Timed after freeing
    cuBLAS's workspaces, so that earlier work in this process does not hide it. 0 elsewhere."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    before = torch.cuda.memory_allocated(device)
    a = torch.ones(64, 64, device=device, requires_grad=True)
    (a @ a).sum().backward()
    del a
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.memory_allocated(device) - before)


def expected_fingerprint(config: JobConfig) -> dict:
    """The fingerprint a measured profile of ``config`` must carry (builds the spec, not its layers)."""
    spec = build_model(config.model, config.training.seed)
    device = resolve_device(config.cluster.device)
    return profile_fingerprint(spec, config.training.microbatch, device, job_threads(config), job_neighbours(config))


def profile_path(config: JobConfig) -> Path:
    """The cache file of ``config``'s profile: ``<profile.cache_dir>/<family>-<16 hex of the fingerprint
    hash>.json``, so every model, microbatch, dtype and device gets its own file. In the family, every run of
    characters other than letters, digits, ``_`` and ``-`` becomes one ``_`` (``pkg.mod:obj`` -> ``pkg_mod_obj``),
    so an import path gives a plain file name."""
    digest = fingerprint_hash(expected_fingerprint(config))[:16]
    family = re.sub(r"[^A-Za-z0-9_-]+", "_", config.model.family)
    return Path(config.profile.cache_dir) / f"{family}-{digest}.json"


def ensure_profile(
    config: JobConfig,
    *,
    path: str | Path | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> ModelProfile:
    """The profile of ``config``'s model, microbatch, dtype and device.

    Reads ``path``, or else the cache file :func:`profile_path`. An existing file is reused only when
    ``ModelProfile.load`` accepts it for the expected fingerprint; a stale, truncated or malformed one is
    reported through ``log`` and measured again, as is any file when ``force`` is set. A new profile is
    saved (atomically) to that file. The layers are timed with the intra-op threads each worker of a
    local run of ``config`` gets (:func:`oobleck.shared_cores.job_threads`).
    """
    if config.profile.source != "measured":
        raise ConfigError(
            f"profile.source: got {config.profile.source!r}; only measured profiles are implemented; set measured"
        )
    spec = build_model(config.model, config.training.seed)
    device = resolve_device(config.cluster.device)
    microbatch = config.training.microbatch
    neighbours = job_neighbours(config)
    expect = profile_fingerprint(spec, microbatch, device, job_threads(config), neighbours)
    target = Path(path) if path is not None else profile_path(config)
    if target.exists() and not force:
        try:
            return ModelProfile.load(target, expect=expect)
        except ProfileError as e:
            if log is not None:
                log(f"{e}; profiling again")
    if log is not None:
        p = config.profile
        log(
            f"profiling {spec.num_layers} layers ({p.warmup} rounds of warm-up, then at least {p.repeats} timed "
            f"rounds and {p.seconds:g} s) into {target}"
        )
    with torch_threads(job_threads(config)), computing_neighbours(config, neighbours, job_threads(config)):
        profile = profile_model(
            spec,
            build_batches(config, spec),
            microbatch,
            device,
            config.profile.warmup,
            config.profile.repeats,
            neighbours,
            config.training,
            config.profile.seconds,
        )
    profile.save(target)
    return profile
