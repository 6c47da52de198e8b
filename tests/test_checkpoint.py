"""Per-layer checkpoints: atomic files, completeness, and survival of a writer killed half way."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import threading
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from oobleck import checkpoint as ck
from oobleck import durable_files
from oobleck.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    layer_file,
    load_layer_state,
    read_meta,
    restore_layer,
    save_layer,
    write_meta,
)
from oobleck.config import TrainingConfig
from oobleck.training import make_optimizer

REPO = Path(__file__).resolve().parent.parent


def _trained_layer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    layer = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = make_optimizer(list(layer.named_parameters()), TrainingConfig(weight_decay=0.1))
    layer(torch.randn(2, 3)).sum().backward()
    opt.step()
    return layer, opt


def _save_checkpoint(run: Path, step: int, layers: list[tuple[nn.Module, torch.optim.Optimizer]]) -> Path:
    ckpt = checkpoint_dir(run, step)
    for i, (layer, opt) in enumerate(layers):
        save_layer(ckpt, step, i, layer, opt)
    write_meta(ckpt, step, len(layers), {"training": {"steps": step}})
    return ckpt


def test_round_trip_restores_parameters_and_optimizer_state(tmp_path: Path) -> None:
    layer, opt = _trained_layer(0)
    ckpt = _save_checkpoint(tmp_path, 3, [(layer, opt)])
    assert ckpt == tmp_path / "checkpoints" / "step_00000003"
    meta = read_meta(ckpt)
    assert {k: v for k, v in meta.items() if k != "layers"} == {
        "format": 2, "step": 3, "num_layers": 1, "config": {"training": {"steps": 3}},
    }  # fmt: skip
    data = layer_file(ckpt, 0).read_bytes()
    assert meta["layers"] == [{"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]

    fresh, fresh_opt = _trained_layer(1)
    state = load_layer_state(ckpt, 0)
    assert state["step"] == 3
    restore_layer(state, fresh, fresh_opt)
    for a, b in zip(layer.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], fresh_opt.state[b]["exp_avg_sq"])


def test_optimizer_state_for_other_parameters_is_refused(tmp_path: Path) -> None:
    layer, opt = _trained_layer(0)
    ckpt = _save_checkpoint(tmp_path, 1, [(layer, opt)])
    other, _ = _trained_layer(1)
    other[1].weight.requires_grad_(False)
    other_opt = make_optimizer(list(other.named_parameters()), TrainingConfig())
    with pytest.raises(CheckpointError, match="optimizer state covers"):
        restore_layer(load_layer_state(ckpt, 0), other, other_opt)
    restore_layer(load_layer_state(ckpt, 0), other)  # parameters alone still load
    assert torch.equal(other[0].weight, layer[0].weight)


def test_latest_skips_incomplete_checkpoints(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    layers = [_trained_layer(0), _trained_layer(1)]
    _save_checkpoint(tmp_path, 2, layers)
    newest = _save_checkpoint(tmp_path, 10, layers)
    assert latest_checkpoint(tmp_path) == newest

    layer_file(newest, 1).unlink()  # meta present, a layer file gone
    no_meta = checkpoint_dir(tmp_path, 12)
    save_layer(no_meta, 12, 0, *layers[0])
    save_layer(no_meta, 12, 1, *layers[1])
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)


def test_meta_before_all_layers_is_refused(tmp_path: Path) -> None:
    ckpt = checkpoint_dir(tmp_path, 1)
    save_layer(ckpt, 1, 0, *_trained_layer(0))
    with pytest.raises(CheckpointError, match=r"layer files \[1\] not written yet"):
        write_meta(ckpt, 1, 2, {})


def test_missing_layer_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="layer 5 missing"):
        load_layer_state(tmp_path, 5)


WRITER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from oobleck.checkpoint import checkpoint_dir, save_layer, write_meta
    run = sys.argv[1]
    small = nn.Linear(2, 2)
    with torch.no_grad():
        small.weight.fill_(1.0)
    ckpt = checkpoint_dir(run, 1)
    for i in range(3):
        save_layer(ckpt, 1, i, small, None)
    write_meta(ckpt, 1, 3, {})
    big = nn.Linear(1024, 1024)  # 4 MiB per file: the kill lands while one is being written
    ckpt = checkpoint_dir(run, 2)
    save_layer(ckpt, 2, 0, big, None)
    print("writing", flush=True)
    i = 1
    while True:  # never reaches meta.json
        save_layer(ckpt, 2, i, big, None)
        i += 1
    """
)


def test_writer_killed_mid_checkpoint_leaves_previous_one(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_dir(tmp_path, 2).is_dir()
    latest = latest_checkpoint(tmp_path)
    assert latest == checkpoint_dir(tmp_path, 1)
    for i in range(3):
        state = load_layer_state(latest, i)
        assert state["step"] == 1 and torch.equal(state["params"]["weight"], torch.ones(2, 2))


# ---------------------------------------------------------------------------------------------------
# Concurrent completers (several threads of the master, and processes such as a foreground rank 0)

ROUNDS = 12
COMPLETERS = 6

COMPLETER = textwrap.dedent(
    """
    import sys, threading
    from oobleck.checkpoint import checkpoint_dir, complete_if_written
    run, rounds, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    barrier = threading.Barrier(threads)
    errors = []
    def complete():
        for step in range(1, rounds + 1):
            barrier.wait()
            try:
                assert complete_if_written(checkpoint_dir(run, step), step, 2, {"run": step})
            except BaseException as e:
                errors.append(f"step {step}: {type(e).__name__}: {e}")
    workers = [threading.Thread(target=complete) for _ in range(threads)]
    for w in workers: w.start()
    for w in workers: w.join()
    print("\\n".join(errors) or "ok", flush=True)
    """
)


def test_racing_completers_in_threads_and_processes_all_succeed(tmp_path: Path) -> None:
    """The CI failure: two master threads completed one checkpoint and one rename took the other's
    temporary file. Here COMPLETERS threads in this process and in each of 3 processes complete the same
    ROUNDS checkpoints at once: every call succeeds and every meta.json is valid and verifies."""
    layers = [_trained_layer(0), _trained_layer(1)]
    for step in range(1, ROUNDS + 1):
        for i, (layer, opt) in enumerate(layers):
            save_layer(checkpoint_dir(tmp_path, step), step, i, layer, opt)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", COMPLETER, str(tmp_path), str(ROUNDS), str(COMPLETERS)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        for _ in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        barrier = threading.Barrier(COMPLETERS)
        errors: list[str] = []

        def complete() -> None:
            for step in range(1, ROUNDS + 1):
                barrier.wait()
                try:
                    assert ck.complete_if_written(checkpoint_dir(tmp_path, step), step, 2, {"run": step})
                except BaseException as e:
                    errors.append(f"step {step}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=complete) for _ in range(COMPLETERS)]
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert errors == [] and outputs == ["ok"] * 3, (errors, outputs)
    for step in range(1, ROUNDS + 1):
        ckpt = checkpoint_dir(tmp_path, step)
        meta = json.loads((ckpt / "meta.json").read_text())
        assert meta["step"] == step and meta["num_layers"] == 2 and meta["config"] == {"run": step}
        assert not [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    for step in range(1, ROUNDS + 1):
        ck.verify(checkpoint_dir(tmp_path, step))


def test_temporary_names_are_unique_per_thread_and_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(durable_files.os, "replace", lambda src, dst: (names.append(Path(src).name), real_replace(src, dst)))
    threads = [threading.Thread(target=ck.write_layer, args=(tmp_path, 0, {"step": 0})) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ck.write_layer(tmp_path, 0, {"step": 0})
    assert len(names) == 5 and len(set(names)) == 5, names
    assert all(n.startswith(".layer_0000.pt.") and n.endswith(".tmp") for n in names)


# ---------------------------------------------------------------------------------------------------
# Damaged checkpoints: verified before use, the newest that verifies is used


def _two_checkpoints(run: Path) -> tuple[Path, Path]:
    layers = [_trained_layer(0), _trained_layer(1)]
    return _save_checkpoint(run, 2, layers), _save_checkpoint(run, 4, layers)


def _rewrite_meta(ckpt: Path, change) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    change(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))


DAMAGES = {
    "truncated": lambda c: layer_file(c, 1).write_bytes(layer_file(c, 1).read_bytes()[:100]),
    "empty": lambda c: layer_file(c, 0).write_bytes(b""),
    "random_bytes_same_size": lambda c: layer_file(c, 1).write_bytes(os.urandom(layer_file(c, 1).stat().st_size)),
    "one_flipped_byte": lambda c: layer_file(c, 0).write_bytes(
        (lambda b: b[:-9] + bytes([b[-9] ^ 1]) + b[-8:])(layer_file(c, 0).read_bytes())
    ),
    "meta_without_step": lambda c: _rewrite_meta(c, lambda m: m.pop("step")),
    "meta_step_a_string": lambda c: _rewrite_meta(c, lambda m: m.update(step="4")),
    "meta_num_layers_a_float": lambda c: _rewrite_meta(c, lambda m: m.update(num_layers=2.0)),
    "meta_other_step": lambda c: _rewrite_meta(c, lambda m: m.update(step=7)),
    "meta_a_list": lambda c: (c / "meta.json").write_text("[1, 2]"),
    "meta_garbage": lambda c: (c / "meta.json").write_bytes(os.urandom(64)),
    "meta_empty": lambda c: (c / "meta.json").write_bytes(b""),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    older, newest = _two_checkpoints(tmp_path)
    DAMAGES[damage](newest)
    with caplog.at_level(logging.WARNING, logger="oobleck.checkpoint"):
        assert latest_checkpoint(tmp_path) == older
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step_00000004" in warnings[0] and "\n" not in warnings[0], warnings
    with pytest.raises(CheckpointError) as err:
        ck.verify(newest)
    assert "\n" not in str(err.value) and str(newest) in str(err.value)


def test_error_names_the_damage(tmp_path: Path) -> None:
    _, newest = _two_checkpoints(tmp_path)
    _rewrite_meta(newest, lambda m: m.pop("step"))
    with pytest.raises(CheckpointError, match="meta.json lacks 'step'; the checkpoint is damaged"):
        read_meta(newest)
    DAMAGES["truncated"](checkpoint_dir(tmp_path, 2))
    with pytest.raises(CheckpointError, match=r"layer_0001.pt has 100 bytes, meta.json records \d+ \(truncated"):
        ck.verify(checkpoint_dir(tmp_path, 2))
    assert latest_checkpoint(tmp_path) is None


def test_format_1_checkpoint_is_used_unverified_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, newest = _two_checkpoints(tmp_path)
    _rewrite_meta(newest, lambda m: (m.pop("layers"), m.update(format=1)))
    with caplog.at_level(logging.WARNING, logger="oobleck.checkpoint"):
        assert latest_checkpoint(tmp_path) == newest
    assert any("format 1" in r.getMessage() and "unverified" in r.getMessage() for r in caplog.records)
    assert read_meta(newest)["format"] == 1


def test_unreadable_layer_file_error_is_one_line(tmp_path: Path) -> None:
    """torch's weights-only refusal spans six lines; the checkpoint error keeps the one that names it."""
    torch.save({"step": 1, "odd": Path("/x")}, layer_file(tmp_path, 0))
    with pytest.raises(CheckpointError) as err:
        load_layer_state(tmp_path, 0)
    message = str(err.value)
    assert "\n" not in message and "\x1b" not in message, message
    assert "cannot read layer_0000.pt (UnpicklingError: WeightsUnpickler error: Unsupported global" in message


def test_digest_streams_and_sees_every_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable_files, "_CHUNK", 7)
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert durable_files.file_digest(path) == (100, hashlib.sha256(b"x" * 100).hexdigest())
    old = os.stat(path)
    os.utime(path, ns=(old.st_atime_ns - 10**10, old.st_mtime_ns - 10**10))  # ctime stays new: not cached yet
    path.write_bytes(b"y" * 100)  # same size, same second
    assert durable_files.file_digest(path)[1] == hashlib.sha256(b"y" * 100).hexdigest()


def test_digest_cache_is_keyed_by_the_file_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable_files, "_RACY_NS", -(10**18))  # treat every file as settled, so that it is cached
    path = tmp_path / "f"
    path.write_bytes(b"a" * 10)
    first = durable_files.file_digest(path)
    real_sha256 = durable_files.hashlib.sha256
    monkeypatch.setattr(durable_files.hashlib, "sha256", lambda: pytest.fail("hashed again"))
    assert durable_files.file_digest(path) == first  # unchanged: from the cache
    monkeypatch.setattr(durable_files.hashlib, "sha256", real_sha256)
    (tmp_path / "g").write_bytes(b"b" * 10)
    os.replace(tmp_path / "g", path)  # another file (inode) at the same path
    assert durable_files.file_digest(path) == (10, hashlib.sha256(b"b" * 10).hexdigest())


# ---------------------------------------------------------------------------------------------------
# Retention, discarding later steps, stale temporary files


def _checkpoints(run: Path, steps: list[int]) -> list[Path]:
    layers = [_trained_layer(0)]
    return [_save_checkpoint(run, step, layers) for step in steps]


def _step_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path: Path) -> None:
    _checkpoints(tmp_path, [1, 2, 3, 4, 5])
    save_layer(checkpoint_dir(tmp_path, 6), 6, 0, *_trained_layer(0))  # being written: stays
    save_layer(checkpoint_dir(tmp_path, 0), 0, 0, *_trained_layer(0))  # incomplete and old: removed
    removed = ck.prune(tmp_path, 3)
    assert sorted(p.name for p in removed) == ["step_00000000", "step_00000001", "step_00000002"]
    assert _step_names(tmp_path) == ["step_00000003", "step_00000004", "step_00000005", "step_00000006"]
    assert ck.prune(tmp_path, 0) == [] and ck.prune(tmp_path, 3) == []


def test_prune_never_removes_the_only_checkpoint_that_verifies_nor_a_protected_one(tmp_path: Path) -> None:
    _checkpoints(tmp_path, [1, 2, 3, 4])
    for step in (3, 4):  # complete by their sizes, not by their digests
        path = layer_file(checkpoint_dir(tmp_path, step), 0)
        path.write_bytes(os.urandom(path.stat().st_size))
    ck.prune(tmp_path, 2, protect=[checkpoint_dir(tmp_path, 1)])
    # kept 4 and 3 (neither verifies), 2 (the newest that does) and the protected 1
    assert _step_names(tmp_path) == ["step_00000001", "step_00000002", "step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)
    ck.prune(tmp_path, 2)
    assert _step_names(tmp_path) == ["step_00000002", "step_00000003", "step_00000004"]


def test_removal_hides_the_folder_before_deleting_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash half way through deleting must not leave something that counts as a checkpoint: the folder
    leaves the step_* namespace in one rename, and the leftover is cleaned up when the next run starts."""
    _checkpoints(tmp_path, [1, 2])
    monkeypatch.setattr(ck.shutil, "rmtree", lambda *a, **k: None)  # "crash" before anything is deleted
    ck.prune(tmp_path, 1)
    monkeypatch.undo()
    left = _step_names(tmp_path)
    assert left[1] == "step_00000002" and left[0].startswith(".deleting-step_00000001.")
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)
    ck.remove_stale_temporaries(tmp_path, older_than=9e18)
    assert _step_names(tmp_path) == ["step_00000002"]


def test_restore_removes_the_folders_of_later_steps(tmp_path: Path) -> None:
    """After a restore to step 2, nothing of steps 3 and 4 may stay: a re-run would otherwise complete a
    checkpoint of step 4 from its own files and the leftovers of the first run."""
    _checkpoints(tmp_path, [1, 2, 4])
    layer_file(checkpoint_dir(tmp_path, 4), 0).write_bytes(b"x")  # damaged
    save_layer(checkpoint_dir(tmp_path, 3), 3, 0, *_trained_layer(0))  # a killed writer's share
    assert ck.restore_latest(tmp_path) == checkpoint_dir(tmp_path, 2)
    assert _step_names(tmp_path) == ["step_00000001", "step_00000002"]
    # a pending checkpoint whose files are all written counts: it is completed and restored
    save_layer(checkpoint_dir(tmp_path, 6), 6, 0, *_trained_layer(0))
    assert ck.restore_latest(tmp_path, [6], 1, {}) == checkpoint_dir(tmp_path, 6)
    assert _step_names(tmp_path) == ["step_00000001", "step_00000002", "step_00000006"]


def test_a_removed_folder_is_not_recreated_by_a_late_completer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder disappears (a restore removed it) between the hashing and the rename of meta.json: the
    completer must not create it again holding only a meta.json for files a re-run writes later."""
    (ckpt,) = _checkpoints(tmp_path, [1])
    (ckpt / "meta.json").unlink()
    real = ck.atomic_write

    def vanish(path: Path, write, **kw) -> None:
        durable_files.remove_folder(ckpt)
        real(path, write, **kw)

    monkeypatch.setattr(ck, "atomic_write", vanish)
    with pytest.raises(CheckpointError, match="removed while meta.json was written"):
        ck.write_meta(ckpt, 1, 1, {})
    assert not ckpt.exists()


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    (ckpt,) = _checkpoints(tmp_path, [1])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = durable_files.HOST
    names = {
        "dead": f".layer_0000.pt.{host}.{dead_pid}.1.abcd.tmp",
        "alive": f".layer_0000.pt.{host}.{os.getpid()}.1.abcd.tmp",
        "other_host": f".meta.json.elsewhere.{dead_pid}.1.abcd.tmp",
        "old_format": f".layer_0000.pt.{dead_pid}.tmp",
    }
    for name in names.values():
        (ckpt / name).write_bytes(b"partial")
    assert {p.name for p in ck.remove_stale_temporaries(tmp_path)} == {names["dead"]}
    # at the start of a run every temporary file older than the run is a dead writer's
    removed = ck.remove_stale_temporaries(tmp_path, older_than=9e18)
    assert {p.name for p in removed} == {names["alive"], names["other_host"], names["old_format"]}
    assert sorted(p.name for p in ckpt.iterdir()) == ["layer_0000.pt", "meta.json"]
    # completing a checkpoint removes dead writers' leftovers in its folder
    (ckpt / names["dead"]).write_bytes(b"partial")
    (ckpt / "meta.json").unlink()
    assert ck.complete_if_written(ckpt, 1, 1, {})
    assert sorted(p.name for p in ckpt.iterdir()) == ["layer_0000.pt", "meta.json"]


def test_train_local_keeps_checkpoint_keep_checkpoints(tmp_path: Path) -> None:
    from oobleck.config import config_from_dict
    from oobleck.train_local import train_local

    raw = {
        "model": {"family": "gpt", "preset": "tiny", "overrides": {"d_model": 16, "n_head": 2, "seq_len": 8, "n_layer": 2}},
        "data": {"dataset": "pydoc"},
        "training": {"steps": 5, "global_batch": 2, "microbatch": 2},
        "fault_tolerance": {"checkpoint_every": 1, "checkpoint_keep": 2},
    }
    train_local(config_from_dict(raw), run_dir=tmp_path)
    assert _step_names(tmp_path) == ["step_00000004", "step_00000005"]
