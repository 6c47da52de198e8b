"""The job config: YAML loaded into typed dataclasses, validated with errors that name the field.

Every section has defaults, so the smallest valid config is ``model: {family: gpt}``. Errors are raised
as :class:`ConfigError` with one line of the form ``field: got VALUE; allowed ...``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from oobleck.config_checks import show_value, validate
from oobleck.errors import ConfigError

#: the families this project implements (models/), each with presets
BUILTIN_FAMILIES = ("gpt", "dit", "moe")
#: the families of a library's model classes, named by model.architecture and configured by model.config or
#: model.config_dir: hf (a transformers causal LM), diffusers (a diffusers model)
LIBRARY_FAMILIES = ("hf", "diffusers")
#: model.family may also name your own layers as package.module:object (docs/models.md)
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
DType = Literal["float32", "float64"]
#: training.precision: fp32 computes in model.dtype; bf16 and fp16 compute under autocast (oobleck.precision)
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    #: a built-in family (BUILTIN_FAMILIES), a library's (LIBRARY_FAMILIES), or package.module:object
    family: str = "gpt"
    #: built-in families: a named configuration of the family
    preset: str = "tiny"
    dtype: DType = "float32"
    #: preset fields to change, e.g. {n_layer: 4}; checked against the preset's own fields
    overrides: dict[str, Any] = field(default_factory=dict)
    #: DiT only: DiffFit parameter-efficient fine-tuning (freeze all but biases, norms, class
    #: embedding and per-block scale factors)
    difffit: bool = False
    #: a checkpoint to start from (e.g. a pretrained DiT for DiffFit fine-tuning)
    init_checkpoint: Optional[str] = None
    #: hf and diffusers: the model class (hf: gpt2, llama; diffusers: unet2d, dit); with config_dir it may be
    #: left out (read from config.json) but must agree when given
    architecture: Optional[str] = None
    #: hf and diffusers: the model's config inline (the fields of its config.json); your own layers: keyword
    #: arguments of the factory
    config: dict[str, Any] = field(default_factory=dict)
    #: hf and diffusers: a local directory holding config.json, and optionally weights saved by
    #: save_pretrained (each layer loads exactly its slice); read offline
    config_dir: Optional[str] = None


@dataclass
class DataConfig:
    #: pydoc (Python's own docs, GPT), digits (scikit-learn 8x8), fashion-mnist (IDX files), text-file (a UTF-8
    #: file), token-file (a flat binary array of token ids, read by memory map), image-folder (class
    #: subfolders of PNG/JPEG images; labels from the folder names)
    dataset: Literal["pydoc", "digits", "fashion-mnist", "text-file", "token-file", "image-folder"] = "pydoc"
    #: a file or folder for datasets read from disk (fashion-mnist, text-file, token-file, image-folder)
    path: Optional[str] = None
    #: text-file: a local directory holding tokenizer.json (Hugging Face tokenizers); null reads bytes
    tokenizer: Optional[str] = None
    #: token-file: the integer type of the stored token ids
    token_dtype: Literal["uint16", "uint32"] = "uint16"
    #: restrict image datasets to these class labels (e.g. to fine-tune on new classes)
    classes: Optional[list[int]] = None


@dataclass
class TrainingConfig:
    steps: int = 20
    global_batch: int = 32
    microbatch: int = 4
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    #: global gradient-norm clipping; null turns it off
    grad_clip: Optional[float] = 1.0
    seed: int = 0
    #: activation recomputation: none, full (every stage), auto (the stages the planner says)
    recompute: Literal["none", "full", "auto"] = "none"
    #: fp32 (model.dtype throughout), bf16 or fp16 (autocast compute and carries, fp32 parameters and
    #: optimizer state; fp16 with dynamic loss scaling): oobleck.precision
    precision: Precision = "fp32"
    #: start each layer's gradient all-reduce during the last backward pass (oobleck.engine.gradsync)
    overlap_grad_sync: bool = True


@dataclass
class ClusterConfig:
    nodes: int = 4
    devices_per_node: int = 1
    #: cpu (gloo), cuda (NCCL), or auto (cuda when available)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    #: memory of one device in GiB, used by the planner
    device_memory_gib: float = 16.0
    #: bandwidths in GB/s for boundary transfers, used by the planner
    intra_node_bandwidth_gbps: float = 10.0
    inter_node_bandwidth_gbps: float = 1.0
    launcher: Literal["local", "ray"] = "local"
    #: Ray cluster address for the ray launcher; null starts a local Ray instance
    ray_address: Optional[str] = None
    #: address the master's control plane binds; loopback unless told otherwise
    master_host: str = "127.0.0.1"
    master_port: int = 0
    #: TLS for the control plane (oobleck.control.tls): auto (on unless master_host is loopback), on or off.
    #: YAML reads a bare on/off (and true/false) as a boolean: taken as on/off
    tls: Literal["auto", "on", "off", True, False] = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.tls, str):  # True/False (1/0 compare equal to them)
            self.tls = "on" if self.tls else "off"


#: checkpoint interval (steps) per policy when the config gives none. Oobleck: off (recovery copies layers
#: from replicas; a user sets an interval for the every-copy-lost case). Varuna: 10, its own example's
#: ``--save-interval 10``. Bamboo: 100 (its redundancy makes frequent checkpoints unnecessary).
DEFAULT_CHECKPOINT_EVERY = {"oobleck": 0, "varuna": 10, "bamboo": 100}


@dataclass
class FaultToleranceConfig:
    #: simultaneous node failures the plan must survive
    f: int = 1
    #: ``oobleck`` (re-plan from surviving replicas), or a baseline of the same engine: ``varuna``
    #: (homogeneous pipelines, restart from the latest checkpoint on any failure) or ``bamboo`` (homogeneous
    #: pipelines, each stage shadowed by its predecessor, which takes over when it fails)
    policy: Literal["oobleck", "bamboo", "varuna"] = "oobleck"
    #: steps between periodic checkpoints; 0 turns them off. Unset: the policy's default
    #: (:data:`DEFAULT_CHECKPOINT_EVERY`)
    checkpoint_every: int | None = None
    #: complete checkpoints to keep (the newest; older folders are removed once a new one completes); 0 keeps all
    checkpoint_keep: int = 3
    heartbeat_interval_s: float = 0.1
    #: a node whose agent sent no heartbeat for this long is lost (sub-second: recovery starts fast)
    heartbeat_timeout_s: float = 0.8
    #: a worker whose heartbeat to its agent stopped for this long (e.g. a hung process) is killed
    worker_timeout_s: float = 5.0
    #: with too few nodes left to train (fewer than n0), how long to wait for nodes to join before failing
    wait_for_nodes_s: float = 60.0
    #: a worker still inside an ended generation this long after its end is stuck in a call the socket
    #: shutdown did not release: it exits and its node counts as lost (under ``varuna`` it restarts).
    #: Raise it if one step's work between two communications (a foreground checkpoint of a large model,
    #: say) can take longer; 0 turns the backstop off (the 120 s collective timeout remains)
    stuck_after_s: float = 30.0

    def __post_init__(self) -> None:
        if self.checkpoint_every is None:
            self.checkpoint_every = DEFAULT_CHECKPOINT_EVERY.get(self.policy, 0)


@dataclass
class FaultConfig:
    """One injected failure."""

    step: int = 0
    phase: Literal["forward", "backward", "sync", "optimizer", "recovery", "checkpoint", "exit"] = "forward"
    #: kill or hang the target; overflow (training.precision fp16 only) puts an inf into the target worker's
    #: gradients of ``step`` (``phase`` and ``target`` are not used): the whole job must skip that step
    kind: Literal["kill", "hang", "overflow"] = "kill"
    target: Literal["worker", "node"] = "node"
    #: node indices (several at once allowed)
    nodes: list[int] = field(default_factory=lambda: [0])
    #: device index within the node, for target=worker
    worker: int = 0


@dataclass
class TraceConfig:
    """Replay of a node-availability trace (``ms,add|remove,nodeN`` lines)."""

    path: str = ""
    #: trace seconds per wall second
    compression: float = 60.0


@dataclass
class ProfileConfig:
    #: where profiles are cached; the file name carries the fingerprint's hash
    cache_dir: str = ".oobleck/profiles"
    #: analytic (FLOPs and a device spec) or measured (run each layer)
    source: Literal["measured", "analytic"] = "measured"
    warmup: int = 2
    repeats: int = 5
    #: rounds go on past ``repeats`` until this many seconds of them are timed: the medians then span the
    #: machine's speed over that window, not over one moment of it
    seconds: float = 5.0


@dataclass
class SamplingConfig:
    """How ``oobleck train-local --samples`` draws its grid (diffusion models only)."""

    #: decay of the moving average of the weights that samples are drawn with
    #: (:class:`models.sampling.WeightAverage`, warm-up included); 0 samples with the last weights
    ema: float = 0.999
    #: classifier-free guidance scale; 1 is plain conditional sampling, other values need a model trained
    #: with label dropout (``model.overrides.class_dropout`` > 0)
    cfg_scale: float = 1.0
    #: DDIM denoising steps, at most the model's ``num_timesteps``
    steps: int = 50


@dataclass
class RunConfig:
    #: run directory for metrics, TensorBoard and checkpoints
    dir: str = "runs/latest"
    log_every: int = 1
    #: continue from the latest complete checkpoint in ``dir`` (the steps after it are trained; metrics are
    #: appended); without one the job starts from step 0
    resume: bool = False


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    faults: list[FaultConfig] = field(default_factory=list)
    trace: Optional[TraceConfig] = None
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def periodic_checkpoint_after(self, step: int) -> bool:
        """Whether a periodic checkpoint of the state after ``step`` (that of step ``step + 1``) is due:
        every ``fault_tolerance.checkpoint_every`` steps, except after the last step (the final checkpoint
        is written anyway)."""
        every = self.fault_tolerance.checkpoint_every
        return bool(every) and (step + 1) % every == 0 and step + 1 < self.training.steps


# ---------------------------------------------------------------------------------------------------
# Loading


#: a config is a few hundred bytes; anything past this is not one
MAX_CONFIG_BYTES = 1 << 20


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                mark = key_node.start_mark
                raise ConfigError(
                    f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1}; give each key once"
                )
        return super().construct_mapping(node, deep=deep)


#: PyYAML's scanner takes time quadratic in the nesting of flow collections ([...] and {...}): 3000
#: levels take seconds. A job config nests a few; refuse deep ones before parsing
MAX_FLOW_DEPTH = 64


def _flow_depth(text: str) -> int:
    """The deepest nesting of [ and { outside quotes and comments (an upper bound of YAML's flow depth)."""
    depth = deepest = 0
    quote = ""
    previous = "\n"
    chars = iter(text)
    for c in chars:
        if quote:
            if c == "\\" and quote == '"':
                next(chars, None)
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "#" and previous in " \t\n":
            for c in chars:  # a comment runs to the end of the line
                if c == "\n":
                    break
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
        previous = c
    return deepest


def load_config(path: str | Path) -> JobConfig:
    """Read and validate a YAML job config."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read ({e.strerror}); pass an existing YAML file") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; pass a YAML job config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path}: not UTF-8 text (byte {e.start}); pass a YAML job config") from None
    if "\0" in text:
        raise ConfigError(f"config {path}: holds NUL bytes (a binary file?); pass a YAML job config")
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        raise ConfigError(f"config {path}: nested too deeply (over {MAX_FLOW_DEPTH} levels of [ or {{); a job config is a few levels deep")
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"config {path}: {e}") from None
    except RecursionError:
        raise ConfigError(f"config {path}: nested too deeply; a job config is a few levels deep") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"config {path}: malformed YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    return config_from_dict(raw)


def config_from_dict(raw: Any) -> JobConfig:
    try:
        config = _build(JobConfig, raw, "")
    except RecursionError:
        raise ConfigError("config: nested too deeply; a job config is a few levels deep") from None
    validate(config)
    return config


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: got {raw!r}; expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; allowed keys are {', '.join(sorted(known))}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}.{name}" if prefix else name) for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: got {value!r}; allowed: {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: got {value!r}; expected a list")
        return [_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name}: got {value!r}; expected a list of {len(args)} numbers")
        return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: got {value!r}; expected a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: got {value!r}; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: got {show_value(value)}; expected an integer")
        if abs(value) > MAX_INT:
            raise ConfigError(f"{name}: got {show_value(value)}; out of range (at most {MAX_INT})")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML reads 1e-3 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: got {show_value(value)}; expected a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{name}: got {show_value(value)}; expected a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: got {show_value(value)}; expected a string")
        return value
    return value


#: no integer field needs more (the per-field bounds of :func:`oobleck.config_checks.validate` are far tighter)
MAX_INT = 2**63 - 1
