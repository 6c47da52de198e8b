"""Per-layer profiles: what the planner knows of each layer, and the JSON file that caches it.

A profile is only valid for the model config, microbatch size, dtype and device it was taken with; that
tuple is the profile's *fingerprint*. :meth:`ModelProfile.load` refuses a file whose fingerprint differs
from the one the caller expects (a stale profile crashed the reference system), and refuses truncated or
malformed files, each time with one line that says what is wrong and how to fix it.

File format (``oobleck-profile/1``)::

    {"format": "oobleck-profile/1",
     "fingerprint": {"model": {...}, "microbatch": 4, "dtype": "float32", "device": "cpu", ...},
     "fingerprint_hash": "<sha256 of the canonical JSON of fingerprint>",
     "layers": [{"name": "embed", "forward_s": ..., "backward_s": ..., "param_bytes": ...,
                 "grad_bytes": ..., "optimizer_bytes": ..., "activation_bytes": ...,
                 "output_bytes": ..., "update_s": ...}, ...],
     "device_fixed_bytes": ...}

``update_s`` may be left out (it then reads as 0: not measured), and so may ``device_fixed_bytes``: what
the device's libraries keep allocated in any process that computes on it, once per stage (cuBLAS's
workspace on CUDA, 64 MiB on an H200; 0 on the CPU, whose memory the engine counts tensor by tensor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import ProfileError

FORMAT = "oobleck-profile/1"

#: keys every fingerprint carries (others, such as ``source``, may be added)
FINGERPRINT_KEYS = ("model", "microbatch", "dtype", "device")

_NUMERIC_FIELDS = (
    "forward_s",
    "backward_s",
    "param_bytes",
    "grad_bytes",
    "optimizer_bytes",
    "activation_bytes",
    "output_bytes",
)
#: numeric fields a file may leave out (they then read as 0)
_OPTIONAL_FIELDS = ("update_s",)


#: a profile file is tens of kilobytes; a model has at most this many layers (template search is
#: quadratic in layers), a layer at most a day per microbatch and a petabyte
MAX_PROFILE_BYTES = 64 << 20
MAX_LAYERS = 4096
_LIMITS = {field: 86400.0 if field.endswith("_s") else float(2**50) for field in _NUMERIC_FIELDS + _OPTIONAL_FIELDS}


def _no_constant(name: str) -> Any:
    raise ValueError(f"holds {name}, not a finite number")


@dataclass(frozen=True)
class LayerProfile:
    """Costs of one layer for one microbatch.

    ``forward_s``/``backward_s``: seconds for one microbatch's forward/backward pass.
    ``param_bytes``, ``grad_bytes``, ``optimizer_bytes``: held for the whole run by the stage that owns
    the layer. ``activation_bytes``: kept from forward until backward, per microbatch in flight.
    ``output_bytes``: size of the layer's output (the carry sent downstream) for one microbatch; the
    gradient sent back upstream has the same size. ``update_s``: seconds of the work on the layer once per
    step, after its last backward: packing its gradients for the sync, their squared norm and its optimizer
    step (0: not measured; the planner then estimates the optimizer step from ``grad_bytes``).
    """

    name: str
    forward_s: float
    backward_s: float
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    output_bytes: int
    update_s: float = 0.0

    def __post_init__(self) -> None:
        for field in _NUMERIC_FIELDS + _OPTIONAL_FIELDS:
            value = getattr(self, field)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not 0 <= value <= _LIMITS[field]
            ):
                raise ProfileError(
                    f"layer {self.name[:40]!r}: {field} got {value!r:.40}; must be a finite number in [0, {_LIMITS[field]:g}]"
                )

    @property
    def static_bytes(self) -> int:
        """Bytes the layer occupies independently of the microbatches in flight."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelProfile:
    """The profile of a whole model: one :class:`LayerProfile` per layer, in layer order."""

    layers: tuple[LayerProfile, ...]
    fingerprint: dict[str, Any]
    #: bytes every stage holds on its device besides its layers (see the module notes)
    device_fixed_bytes: int = 0

    def __post_init__(self) -> None:
        value = self.device_fixed_bytes
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**50:
            raise ProfileError(f"device_fixed_bytes got {value!r:.40}; must be an integer in [0, 2**50]")
        if not self.layers:
            raise ProfileError("profile has no layers; a model needs at least one layer")
        if not any(layer.forward_s + layer.backward_s > 0 for layer in self.layers):
            raise ProfileError("every layer takes 0 s forward and backward; the profile holds no timings")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "fingerprint_hash": fingerprint_hash(self.fingerprint),
            "layers": [layer.to_dict() for layer in self.layers],
            "device_fixed_bytes": self.device_fixed_bytes,
        }

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON, atomically: a reader sees the old file or the new one, never half."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(self.to_dict(), out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | Path, expect: dict[str, Any] | None = None) -> "ModelProfile":
        """Read a profile file.

        Raises :class:`ProfileError` (one line) when the file cannot be read, is not complete JSON, lacks
        a field or holds a negative one, or, when ``expect`` is given, when its fingerprint differs from
        ``expect`` (the message names the differing keys).
        """
        path = Path(path)
        try:
            with open(path, "rb") as file:
                data = file.read(MAX_PROFILE_BYTES + 1)
        except OSError as e:
            raise ProfileError(f"profile {path}: cannot read ({e.strerror}); rerun `oobleck profile`") from None
        if len(data) > MAX_PROFILE_BYTES:
            raise ProfileError(f"profile {path}: larger than {MAX_PROFILE_BYTES >> 20} MiB; rerun `oobleck profile`")
        try:
            raw = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
        except UnicodeDecodeError as e:
            raise ProfileError(f"profile {path}: not UTF-8 text (byte {e.start}); rerun `oobleck profile`") from None
        except RecursionError:
            raise ProfileError(f"profile {path}: nested too deeply; rerun `oobleck profile`") from None
        except ValueError as e:
            if not isinstance(e, json.JSONDecodeError):  # NaN/Infinity, or an integer of too many digits
                raise ProfileError(f"profile {path}: {e}; rerun `oobleck profile`") from None
            raise ProfileError(
                f"profile {path}: truncated or malformed JSON at line {e.lineno}, column {e.colno} ({e.msg}); "
                "delete it and rerun `oobleck profile`"
            ) from None
        try:
            profile = cls.from_dict(raw)
        except ProfileError as e:
            raise ProfileError(f"profile {path}: {e}") from None
        if expect is not None:
            differ = fingerprint_diff(profile.fingerprint, expect)
            if differ:
                raise ProfileError(
                    f"profile {path} is stale: fingerprint differs in {', '.join(differ)}; rerun `oobleck profile`"
                )
        return profile

    @classmethod
    def from_dict(cls, raw: Any) -> "ModelProfile":
        """Validate and build a profile from the file's JSON object (see the module docstring)."""
        if not isinstance(raw, dict):
            raise ProfileError(f"expected a JSON object with format {FORMAT!r}; rerun `oobleck profile`")
        if raw.get("format") != FORMAT:
            raise ProfileError(f"format got {raw.get('format')!r}; expected {FORMAT!r}; rerun `oobleck profile`")
        fingerprint = raw.get("fingerprint")
        if not isinstance(fingerprint, dict):
            raise ProfileError("fingerprint missing or not an object; rerun `oobleck profile`")
        missing = [key for key in FINGERPRINT_KEYS if key not in fingerprint]
        if missing:
            raise ProfileError(f"fingerprint lacks {', '.join(missing)}; rerun `oobleck profile`")
        if raw.get("fingerprint_hash") != fingerprint_hash(fingerprint):
            raise ProfileError("fingerprint_hash does not match the fingerprint (edited file?); rerun `oobleck profile`")
        layers = raw.get("layers")
        if not isinstance(layers, list) or not layers:
            raise ProfileError("layers missing or empty; rerun `oobleck profile`")
        if len(layers) > MAX_LAYERS:
            raise ProfileError(f"{len(layers)} layers; at most {MAX_LAYERS} are supported")
        layer_profiles = tuple(_layer_from_dict(entry, i) for i, entry in enumerate(layers))
        return cls(layer_profiles, fingerprint, raw.get("device_fixed_bytes", 0))


def _layer_from_dict(entry: Any, index: int) -> LayerProfile:
    if not isinstance(entry, dict):
        raise ProfileError(f"layers[{index}]: got {entry!r}; expected an object")
    name = entry.get("name")
    if not isinstance(name, str):
        raise ProfileError(f"layers[{index}]: name missing or not a string")
    missing = [field for field in _NUMERIC_FIELDS if field not in entry]
    if missing:
        raise ProfileError(f"layer {index} ({name!r}): missing {', '.join(missing)}")
    present = [field for field in _NUMERIC_FIELDS + _OPTIONAL_FIELDS if field in entry]
    return LayerProfile(name=name, **{field: entry[field] for field in present})


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """sha256 (hex) of the fingerprint's canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def fingerprint_diff(found: dict[str, Any], expect: dict[str, Any]) -> list[str]:
    """Top-level keys whose values differ between two fingerprints (compared by canonical JSON), sorted."""
    keys = sorted(set(found) | set(expect))
    return [k for k in keys if fingerprint_hash({k: found.get(k)}) != fingerprint_hash({k: expect.get(k)})]
