"""The job config: YAML loaded into typed dataclasses, validated with errors that name the field.

Every section has defaults, so the smallest valid config is ``model: {family: gpt}``. Errors are raised
as :class:`ConfigError` with one line of the form ``field: got VALUE; allowed ...``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from oobleck.bounds import (
    MAX_BANDWIDTH_GBPS,
    MAX_BATCH,
    MAX_DEVICES_PER_NODE,
    MAX_INTERVAL_S,
    MAX_MEMORY_GIB,
    MAX_NODES,
    MAX_SEED,
    MAX_STEPS,
    MIN_BANDWIDTH_GBPS,
    MIN_INTERVAL_S,
)
from oobleck.errors import ConfigError

Family = Literal["gpt", "dit", "moe"]
DType = Literal["float32", "float64"]


@dataclass
class ModelConfig:
    family: Family = "gpt"
    preset: str = "tiny"
    dtype: DType = "float32"
    #: preset fields to change, e.g. {n_layer: 4}; checked against the preset's own fields
    overrides: dict[str, Any] = field(default_factory=dict)
    #: DiT only: DiffFit parameter-efficient fine-tuning (freeze all but biases, norms, class
    #: embedding and per-block scale factors)
    difffit: bool = False
    #: a checkpoint to start from (e.g. a pretrained DiT for DiffFit fine-tuning)
    init_checkpoint: Optional[str] = None


@dataclass
class DataConfig:
    #: pydoc (Python's own docs, GPT), digits (scikit-learn 8x8), fashion-mnist (IDX files)
    dataset: Literal["pydoc", "digits", "fashion-mnist", "text-file"] = "pydoc"
    #: a file or folder for datasets read from disk (fashion-mnist, text-file)
    path: Optional[str] = None
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
#: upper bound of ``fault_tolerance.checkpoint_keep`` (a larger count is almost surely a typo; 0 keeps all)
MAX_CHECKPOINT_KEEP = 1000


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
    phase: Literal["forward", "backward", "sync", "optimizer", "recovery", "checkpoint"] = "forward"
    kind: Literal["kill", "hang"] = "kill"
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
            raise ConfigError(f"{name}: got {_show(value)}; expected an integer")
        if abs(value) > MAX_INT:
            raise ConfigError(f"{name}: got {_show(value)}; out of range (at most {MAX_INT})")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML reads 1e-3 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: got {_show(value)}; expected a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{name}: got {_show(value)}; expected a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: got {_show(value)}; expected a string")
        return value
    return value


#: no integer field needs more (the per-field bounds of :func:`validate` are far tighter)
MAX_INT = 2**63 - 1


def _show(value: Any, limit: int = 60) -> str:
    """repr of a value for a one-line message, cut to ``limit`` characters."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # ints past Python's digit limit; deep structures
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: got {_show(value)}; {allowed}")


def _in_range(c: JobConfig, name: str, lo: float, hi: float, what: str = "") -> None:
    section, field_name = name.split(".")
    value = getattr(getattr(c, section), field_name)
    _require(lo <= value <= hi, name, value, f"must be in [{lo:g}, {hi:g}]{what}")


def _non_empty(value: Optional[str], name: str, what: str) -> None:
    _require(value is None or bool(value.strip()), name, value, f"must not be empty; {what}")


def validate(c: JobConfig) -> None:
    """Checks that span more than one field's type."""
    _bounds(c)
    t = c.training
    _require(t.steps >= 1, "training.steps", t.steps, "must be at least 1")
    _require(t.microbatch >= 1, "training.microbatch", t.microbatch, "must be at least 1")
    _require(t.global_batch >= 1, "training.global_batch", t.global_batch, "must be at least 1")
    _require(
        t.global_batch % t.microbatch == 0,
        "training.global_batch",
        t.global_batch,
        f"must be a multiple of training.microbatch ({t.microbatch})",
    )
    _require(t.lr > 0, "training.lr", t.lr, "must be positive")
    _require(0 <= t.min_lr <= t.lr, "training.min_lr", t.min_lr, f"must be in [0, training.lr={t.lr}]")
    _require(t.warmup_steps >= 0, "training.warmup_steps", t.warmup_steps, "must be at least 0")
    _require(t.weight_decay >= 0, "training.weight_decay", t.weight_decay, "must be at least 0")
    _require(all(0 <= b < 1 for b in t.betas), "training.betas", list(t.betas), "each must be in [0, 1)")
    _require(t.grad_clip is None or t.grad_clip > 0, "training.grad_clip", t.grad_clip, "must be positive or null")
    _require(t.seed >= 0, "training.seed", t.seed, "must be at least 0")

    k = c.cluster
    _require(k.nodes >= 1, "cluster.nodes", k.nodes, "must be at least 1")
    _require(k.devices_per_node >= 1, "cluster.devices_per_node", k.devices_per_node, "must be at least 1")
    _require(k.device_memory_gib > 0, "cluster.device_memory_gib", k.device_memory_gib, "must be positive")
    for name in ("intra_node_bandwidth_gbps", "inter_node_bandwidth_gbps"):
        v = getattr(k, name)
        _require(v > 0, f"cluster.{name}", v, "must be positive")
    _require(0 <= k.master_port <= 65535, "cluster.master_port", k.master_port, "must be in [0, 65535] (0 picks a free port)")

    ft = c.fault_tolerance
    _require(ft.f >= 0, "fault_tolerance.f", ft.f, "must be at least 0")
    _require(
        ft.policy != "bamboo" or k.devices_per_node == 1,
        "fault_tolerance.policy",
        ft.policy,
        f"bamboo needs cluster.devices_per_node 1 (got {k.devices_per_node}): its shadows and takeovers are per node",
    )
    _require(ft.checkpoint_every >= 0, "fault_tolerance.checkpoint_every", ft.checkpoint_every, "must be at least 0 (0 turns checkpoints off)")
    _require(
        0 <= ft.checkpoint_keep <= MAX_CHECKPOINT_KEEP, "fault_tolerance.checkpoint_keep", ft.checkpoint_keep,
        f"must be an integer in [0, {MAX_CHECKPOINT_KEEP}] (the newest complete checkpoints to keep; 0 keeps all)",
    )  # fmt: skip
    _require(ft.heartbeat_interval_s > 0, "fault_tolerance.heartbeat_interval_s", ft.heartbeat_interval_s, "must be positive")
    _require(
        ft.heartbeat_timeout_s > ft.heartbeat_interval_s,
        "fault_tolerance.heartbeat_timeout_s",
        ft.heartbeat_timeout_s,
        f"must exceed fault_tolerance.heartbeat_interval_s ({ft.heartbeat_interval_s})",
    )
    _require(
        ft.worker_timeout_s > ft.heartbeat_interval_s,
        "fault_tolerance.worker_timeout_s",
        ft.worker_timeout_s,
        f"must exceed fault_tolerance.heartbeat_interval_s ({ft.heartbeat_interval_s})",
    )
    _require(ft.wait_for_nodes_s >= 0, "fault_tolerance.wait_for_nodes_s", ft.wait_for_nodes_s, "must be at least 0")
    _require(
        math.isfinite(ft.stuck_after_s) and ft.stuck_after_s >= 0, "fault_tolerance.stuck_after_s", ft.stuck_after_s,
        "must be at least 0 seconds (0 turns the stuck-worker backstop off)",
    )  # fmt: skip

    for i, fault in enumerate(c.faults):
        _require(fault.step >= 0, f"faults[{i}].step", fault.step, "must be at least 0")
        _require(bool(fault.nodes), f"faults[{i}].nodes", fault.nodes, "must name at least one node")
        for n in fault.nodes:
            _require(0 <= n < k.nodes, f"faults[{i}].nodes", fault.nodes, f"node indices must be in [0, {k.nodes - 1}]")
        _require(
            0 <= fault.worker < k.devices_per_node,
            f"faults[{i}].worker",
            fault.worker,
            f"must be in [0, {k.devices_per_node - 1}]",
        )
    if c.trace is not None:
        _require(bool(c.trace.path), "trace.path", c.trace.path, "must name a trace file")
        _require(c.trace.compression > 0, "trace.compression", c.trace.compression, "must be positive")

    p = c.profile
    _require(p.warmup >= 0, "profile.warmup", p.warmup, "must be at least 0")
    _require(p.repeats >= 1, "profile.repeats", p.repeats, "must be at least 1")
    _require(c.run.log_every >= 1, "run.log_every", c.run.log_every, "must be at least 1")
    _require(
        not c.model.difffit or c.model.family == "dit",
        "model.difffit",
        c.model.difffit,
        "DiffFit applies to family dit only",
    )


def _bounds(c: JobConfig) -> None:
    """Finite, bounded numbers and non-empty strings (checked before the relations between fields)."""
    for name, hi in (
        ("training.steps", MAX_STEPS),
        ("training.global_batch", MAX_BATCH),
        ("training.microbatch", MAX_BATCH),
        ("training.warmup_steps", MAX_STEPS),
        ("cluster.nodes", MAX_NODES),
        ("cluster.devices_per_node", MAX_DEVICES_PER_NODE),
        ("fault_tolerance.f", MAX_NODES - 1),
        ("fault_tolerance.checkpoint_every", MAX_STEPS),
        ("profile.warmup", 1000),
        ("profile.repeats", 1000),
        ("run.log_every", MAX_STEPS),
    ):
        section, field_name = name.split(".")
        value = getattr(getattr(c, section), field_name)
        _require(value <= hi, name, value, f"must be at most {hi}")
    t = c.training
    _require(t.lr <= 10, "training.lr", t.lr, "must be at most 10")
    _require(t.weight_decay <= 10, "training.weight_decay", t.weight_decay, "must be at most 10")
    _require(t.grad_clip is None or t.grad_clip <= 1e9, "training.grad_clip", t.grad_clip, "must be at most 1e9 (null turns clipping off)")
    _require(0 <= t.seed <= MAX_SEED, "training.seed", t.seed, f"must be in [0, {MAX_SEED}]")
    k = c.cluster
    _require(k.device_memory_gib <= MAX_MEMORY_GIB, "cluster.device_memory_gib", k.device_memory_gib, f"must be at most {MAX_MEMORY_GIB} GiB")
    for name in ("intra_node_bandwidth_gbps", "inter_node_bandwidth_gbps"):
        _in_range(c, f"cluster.{name}", MIN_BANDWIDTH_GBPS, MAX_BANDWIDTH_GBPS, " GB/s")
    _non_empty(k.master_host, "cluster.master_host", "give a host name or address (127.0.0.1 by default)")
    _non_empty(k.ray_address, "cluster.ray_address", "give an address or null for a local Ray instance")
    ft = c.fault_tolerance
    for name in ("heartbeat_interval_s", "heartbeat_timeout_s", "worker_timeout_s"):
        _in_range(c, f"fault_tolerance.{name}", MIN_INTERVAL_S, MAX_INTERVAL_S, " seconds")
    _in_range(c, "fault_tolerance.wait_for_nodes_s", 0, MAX_INTERVAL_S, " seconds")
    _require(
        ft.stuck_after_s <= 0 or MIN_INTERVAL_S <= ft.stuck_after_s <= MAX_INTERVAL_S, "fault_tolerance.stuck_after_s",
        ft.stuck_after_s, f"must be 0 (off) or in [{MIN_INTERVAL_S:g}, {MAX_INTERVAL_S:g}] seconds",
    )  # fmt: skip
    for i, fault in enumerate(c.faults):
        _require(fault.step <= MAX_STEPS, f"faults[{i}].step", fault.step, f"must be at most {MAX_STEPS}")
    if c.trace is not None:
        _require(c.trace.compression <= 1e6, "trace.compression", c.trace.compression, "must be at most 1e6")
    if c.data.classes is not None:
        _require(all(0 <= x < MAX_BATCH for x in c.data.classes), "data.classes", c.data.classes, "labels must be integers >= 0")
    _non_empty(c.model.preset, "model.preset", "name a preset of the model family")
    _non_empty(c.model.init_checkpoint, "model.init_checkpoint", "name a checkpoint or use null")
    _non_empty(c.data.path, "data.path", "name a file or folder, or use null")
    _non_empty(c.profile.cache_dir, "profile.cache_dir", "name a folder for cached profiles")
    _non_empty(c.run.dir, "run.dir", "name the run directory (runs/latest by default)")
