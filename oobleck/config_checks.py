"""The checks of a job config beyond each field's type: bounds on every number and string
(:mod:`oobleck.bounds`) and the relations between fields. Each failure is a one-line :class:`ConfigError`
of the form ``field: got VALUE; allowed ...``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

from oobleck.bounds import (
    MAX_BANDWIDTH_GBPS,
    MAX_BATCH,
    MAX_CFG_SCALE,
    MAX_CHECKPOINT_KEEP,
    MAX_DEVICES_PER_NODE,
    MAX_INTERVAL_S,
    MAX_MEMORY_GIB,
    MAX_NODES,
    MAX_SAMPLING_STEPS,
    MAX_SEED,
    MAX_STEPS,
    MIN_BANDWIDTH_GBPS,
    MIN_INTERVAL_S,
)
from oobleck.errors import ConfigError

if TYPE_CHECKING:
    from oobleck.config import JobConfig


def show_value(value: Any, limit: int = 60) -> str:
    """repr of a value for a one-line message, cut to ``limit`` characters."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # ints past Python's digit limit; deep structures
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: got {show_value(value)}; {allowed}")


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
    _require(
        t.precision == "fp32" or c.model.dtype == "float32", "training.precision", t.precision,
        f"mixed precision keeps float32 parameters: set model.dtype: float32 (got {c.model.dtype}) or training.precision: fp32",
    )  # fmt: skip

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
        _require(
            fault.phase != "exit" or fault.step == c.training.steps, f"faults[{i}].step", fault.step,
            f"must be training.steps ({c.training.steps}) for phase exit (the worker exits once, after the last step)",
        )  # fmt: skip
        _require(
            fault.kind != "overflow" or t.precision == "fp16", f"faults[{i}].kind", fault.kind,
            "overflow needs training.precision: fp16 (only loss-scaled runs skip a step whose gradients overflow)",
        )  # fmt: skip
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

    s = c.sampling
    _require(0 <= s.ema < 1, "sampling.ema", s.ema, "must be in [0, 1) (0 samples with the last weights)")
    _require(0 <= s.cfg_scale, "sampling.cfg_scale", s.cfg_scale, "must be at least 0 (1 turns guidance off)")
    _require(s.steps >= 1, "sampling.steps", s.steps, "must be at least 1")

    p = c.profile
    _require(p.warmup >= 0, "profile.warmup", p.warmup, "must be at least 0")
    _require(p.repeats >= 1, "profile.repeats", p.repeats, "must be at least 1")
    _in_range(c, "profile.seconds", 0, 3600)
    _require(c.run.log_every >= 1, "run.log_every", c.run.log_every, "must be at least 1")
    _check_family(c)
    _require(
        not c.model.difffit or c.model.family in ("dit", "diffusers"),
        "model.difffit",
        c.model.difffit,
        "DiffFit applies to family dit (and diffusers' dit) only",
    )


def _check_family(c: JobConfig) -> None:
    """model.family names a family that exists, and the fields each kind of family reads are the ones given."""
    from oobleck.config import BUILTIN_FAMILIES, IMPORT_PATH, LIBRARY_FAMILIES

    m = c.model
    kinds = ", ".join(BUILTIN_FAMILIES + LIBRARY_FAMILIES)
    _require(
        m.family in BUILTIN_FAMILIES + LIBRARY_FAMILIES or bool(IMPORT_PATH.match(m.family)), "model.family", m.family,
        f"allowed: {kinds}, or your own layers as package.module:object",
    )  # fmt: skip
    if m.family in LIBRARY_FAMILIES:
        _require(
            m.architecture is not None or m.config_dir is not None, "model.architecture", m.architecture,
            f"family {m.family} needs model.architecture (with model.config inline) or model.config_dir",
        )  # fmt: skip
        _require(
            not (m.config and m.config_dir), "model.config", show_value(m.config),
            "give the config inline or as model.config_dir, not both",
        )  # fmt: skip
    else:
        _require(m.architecture is None, "model.architecture", m.architecture, f"only families {', '.join(LIBRARY_FAMILIES)} read it; drop it")
        _require(m.config_dir is None, "model.config_dir", m.config_dir, f"only families {', '.join(LIBRARY_FAMILIES)} read it; drop it")
        _require(
            not m.config or m.family not in BUILTIN_FAMILIES, "model.config", show_value(m.config),
            "built-in families take model.overrides; drop model.config",
        )  # fmt: skip


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
        ("sampling.steps", MAX_SAMPLING_STEPS),
    ):
        section, field_name = name.split(".")
        value = getattr(getattr(c, section), field_name)
        _require(value <= hi, name, value, f"must be at most {hi}")
    t = c.training
    _require(t.lr <= 10, "training.lr", t.lr, "must be at most 10")
    _require(c.sampling.cfg_scale <= MAX_CFG_SCALE, "sampling.cfg_scale", c.sampling.cfg_scale, f"must be at most {MAX_CFG_SCALE:g}")
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
    _non_empty(c.model.architecture, "model.architecture", "name the model class, or use null")
    _non_empty(c.model.config_dir, "model.config_dir", "name a directory holding config.json, or use null")
    _non_empty(c.data.path, "data.path", "name a file or folder, or use null")
    _non_empty(c.profile.cache_dir, "profile.cache_dir", "name a folder for cached profiles")
    _non_empty(c.run.dir, "run.dir", "name the run directory (runs/latest by default)")
