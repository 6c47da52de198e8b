"""The profile file: round trip, atomic save, and one-line errors for every kind of bad file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.errors import ProfileError
from planner.profile import LayerProfile, ModelProfile, fingerprint_hash
from tests.budget import examples

FP = {"model": {"family": "gpt", "n_layer": 2, "widths": (4, 8)}, "microbatch": 4, "dtype": "float32", "device": "cpu"}


def _profile(fp: dict = FP) -> ModelProfile:
    layers = (
        LayerProfile("embed", 0.001, 0.002, 400, 400, 800, 1000, 512),
        LayerProfile("block0", 0.01, 0.02, 4000, 4000, 8000, 20000, 512),
        LayerProfile("head", 0.005, 0.01, 400, 400, 800, 3000, 0),
    )
    return ModelProfile(layers, fp)


def _one_line_error(path: Path, expect: dict | None = None) -> str:
    with pytest.raises(ProfileError) as info:
        ModelProfile.load(path, expect=expect)
    message = str(info.value)
    assert "\n" not in message
    return message


layer_strategy = st.builds(
    LayerProfile,
    name=st.text(min_size=1, max_size=8),
    forward_s=st.floats(0, 10, allow_subnormal=False),
    backward_s=st.floats(0.001, 10),
    param_bytes=st.integers(0, 10**12),
    grad_bytes=st.integers(0, 10**12),
    optimizer_bytes=st.integers(0, 10**12),
    activation_bytes=st.integers(0, 10**12),
    output_bytes=st.integers(0, 10**12),
    update_s=st.floats(0, 10, allow_subnormal=False),
)


@settings(max_examples=examples(30), deadline=None)
@given(layers=st.lists(layer_strategy, min_size=1, max_size=6), microbatch=st.integers(1, 64))
def test_round_trip(tmp_path_factory: pytest.TempPathFactory, layers: list[LayerProfile], microbatch: int) -> None:
    path = tmp_path_factory.mktemp("p") / "profile.json"
    fp = {**FP, "microbatch": microbatch}
    profile = ModelProfile(tuple(layers), fp)
    profile.save(path)
    loaded = ModelProfile.load(path, expect=fp)
    assert loaded.layers == profile.layers
    assert fingerprint_hash(loaded.fingerprint) == fingerprint_hash(fp)


def test_file_layout_and_atomic_save(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "profile.json"
    _profile().save(path)
    raw = json.loads(path.read_text())
    assert raw["format"] == "oobleck-profile/1"
    assert raw["fingerprint_hash"] == fingerprint_hash(FP)
    assert [layer["name"] for layer in raw["layers"]] == ["embed", "block0", "head"]
    # overwrite in place: no temporary file is left behind
    _profile({**FP, "microbatch": 8}).save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["profile.json"]
    assert json.loads(path.read_text())["fingerprint"]["microbatch"] == 8


def test_fingerprint_hash_is_canonical() -> None:
    reordered = {"device": "cpu", "dtype": "float32", "microbatch": 4, "model": {"widths": [4, 8], "n_layer": 2, "family": "gpt"}}
    assert fingerprint_hash(reordered) == fingerprint_hash(FP)
    assert fingerprint_hash({**FP, "microbatch": 5}) != fingerprint_hash(FP)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    _profile().save(path)
    path.write_text(path.read_text()[:-40])
    message = _one_line_error(path)
    assert "truncated or malformed JSON" in message and "oobleck profile" in message


def test_unreadable_file(tmp_path: Path) -> None:
    message = _one_line_error(tmp_path / "missing.json")
    assert "cannot read" in message


def test_stale_fingerprint_names_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    _profile().save(path)
    message = _one_line_error(path, expect={**FP, "microbatch": 8, "device": "cuda:0"})
    assert "stale" in message and "device, microbatch" in message and "rerun `oobleck profile`" in message
    assert ModelProfile.load(path, expect=dict(FP)).fingerprint["microbatch"] == 4


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda raw: raw["layers"][1].pop("backward_s"), "layer 1 ('block0'): missing backward_s"),
        (lambda raw: raw["layers"][2].update(activation_bytes=-5), "layer 'head': activation_bytes got -5"),
        (lambda raw: raw["layers"][0].update(forward_s="fast"), "layer 'embed': forward_s got 'fast'"),
        (lambda raw: raw.update(format="other/2"), "format got 'other/2'"),
        (lambda raw: raw["fingerprint"].pop("dtype"), "fingerprint lacks dtype"),
        (lambda raw: raw["fingerprint"].update(microbatch=99), "fingerprint_hash does not match"),
        (lambda raw: raw.update(layers=[]), "layers missing or empty"),
        (lambda raw: raw["layers"].__setitem__(0, 7), "layers[0]: got 7"),
        (lambda raw: raw["layers"][1].update(update_s=-1.0), "layer 'block0': update_s got -1.0"),
        (lambda raw: raw.update(device_fixed_bytes=-1), "device_fixed_bytes got -1"),
        (lambda raw: raw.update(device_fixed_bytes=1.5), "device_fixed_bytes got 1.5"),
    ],
)
def test_malformed_fields(tmp_path: Path, edit, expected: str) -> None:
    path = tmp_path / "p.json"
    _profile().save(path)
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    assert expected in _one_line_error(path)


def test_a_file_without_update_times_reads_them_as_zero(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    profile = ModelProfile(tuple(dataclasses.replace(layer, update_s=0.5) for layer in _profile().layers), FP)
    profile.save(path)
    assert ModelProfile.load(path).layers == profile.layers
    raw = json.loads(path.read_text())
    for layer in raw["layers"]:
        del layer["update_s"]
    path.write_text(json.dumps(raw))
    assert [layer.update_s for layer in ModelProfile.load(path).layers] == [0.0, 0.0, 0.0]


def test_the_devices_fixed_bytes_round_trip_and_read_as_zero_when_left_out(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    profile = dataclasses.replace(_profile(), device_fixed_bytes=64 << 20)
    profile.save(path)
    assert ModelProfile.load(path).device_fixed_bytes == 64 << 20
    raw = json.loads(path.read_text())
    del raw["device_fixed_bytes"]
    path.write_text(json.dumps(raw))
    assert ModelProfile.load(path).device_fixed_bytes == 0


def test_all_zero_timings_rejected() -> None:
    with pytest.raises(ProfileError, match="holds no timings"):
        ModelProfile((LayerProfile("x", 0, 0, 1, 1, 1, 1, 1),), FP)


# ---------------------------------------------------------------------------------------------------
# Hostile files: binary, non-finite or absurd numbers, too many layers, deep nesting


def _edited(tmp_path: Path, edit) -> Path:
    raw = _profile().to_dict()
    text = edit(raw) if edit is not None else json.dumps(raw)
    path = tmp_path / "profile.json"
    path.write_bytes(text if isinstance(text, bytes) else str(text).encode())
    return path


def _set_layer(field: str, literal: str):
    def edit(raw: dict) -> str:
        raw["layers"][1][field] = "@@"
        return json.dumps(raw).replace('"@@"', literal)

    return edit


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda raw: bytes(range(256)) * 8, "not UTF-8 text"),
        (_set_layer("forward_s", "NaN"), "holds NaN, not a finite number"),
        (_set_layer("param_bytes", "Infinity"), "holds Infinity, not a finite number"),
        (_set_layer("activation_bytes", "1e309"), "activation_bytes got inf"),
        (_set_layer("param_bytes", "1e300"), "param_bytes got 1e+300; must be a finite number in [0, 1.1259e+15]"),
        (_set_layer("backward_s", "1e12"), "backward_s got 1000000000000.0; must be a finite number in [0, 86400]"),
        (_set_layer("output_bytes", "9" * 5000), "profile"),
        (lambda raw: json.dumps({**raw, "layers": raw["layers"] * 2000}), "6000 layers; at most 4096"),
        (lambda raw: "[" * 100000 + "]" * 100000, "nested too deeply"),
    ],
    ids=["binary", "nan", "infinity", "overflow", "absurd bytes", "absurd seconds", "huge integer", "too many layers", "deep"],
)
def test_hostile_profile_files_are_one_line(tmp_path: Path, edit, expected: str) -> None:
    message = _one_line_error(_edited(tmp_path, edit))
    assert expected in message and len(message) < 400, message


def test_largest_numbers_still_load(tmp_path: Path) -> None:
    ModelProfile.load(_edited(tmp_path, _set_layer("param_bytes", str(2**50))))
