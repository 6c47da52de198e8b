"""Copying layers in a recovery: packed per pair of workers against one message per tensor.

``python -m benchmarks.layer_copy [--config examples/gpt-tiny.yaml] [--dtype float64] [--rounds 10] [--out PATH]``

Two processes over a gloo group on 127.0.0.1. Rank 0 holds every layer of the config's model with AdamW
state (one optimizer step taken); rank 1 holds fresh copies. Each round copies all of them from rank 0 to
rank 1 twice, alternating which goes first:

* ``packed``: :func:`oobleck.engine.layer_moves.send_layers` / ``recv_layers``, what a recovery does: the
  layers' records back to back in messages of up to 64 MiB (one for the tiny GPT's 20 MiB), unpacked into
  the receiver's layers;
* ``per tensor`` (the baseline, what recoveries did before): the same records' tensors sent one blocking
  message each, received into fresh buffers (not unpacked, which favours the baseline).

A round's time runs from a barrier to a barrier after the copy. Both run twice: with each process on a core
of its own (when the machine has two) and with both processes on one core, as when more workers than cores
share a machine (the local nodes of the fault-tolerance harness, a third of a CPU each). The table gives
the median over the rounds and the baseline's median over the packed one. After the packed copies, rank 1's
layers must equal rank 0's bitwise. Writes ``benchmarks/results/layer_copy.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from benchmarks.jobs import bad_flag, machine_info, write_report
from oobleck.config import load_config
from oobleck.errors import ConfigError

START_TIMEOUT = timedelta(seconds=120)
RESULTS = Path(__file__).resolve().parent / "results" / "layer_copy.json"


def _copy_rounds(rank: int, port: int, config: str, dtype: str, rounds: int, cores: list[int], out: Any) -> None:
    os.sched_setaffinity(0, cores)
    import torch
    import torch.distributed as dist

    from oobleck.engine.layer_moves import export_layer, layer_record, moments_by_param, recv_layers, send_layers
    from oobleck.engine.stage import build_stage_layers
    from oobleck.model_building import build_model

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=START_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=START_TIMEOUT)
    cfg = load_config(config)
    spec = build_model(dataclasses.replace(cfg.model, dtype=dtype), seed=rank)
    cpu = torch.device("cpu")
    layers = build_stage_layers(spec, 0, spec.num_layers, cfg.training, cpu)
    if rank == 0:
        for held in layers:
            for p in held.module.parameters():
                p.grad = torch.randn_like(p)
            held.optimizer.step()

    def packed() -> None:
        if rank == 0:
            send_layers(layers, moments_by_param(layers), 1, cpu)
        else:
            recv_layers(layers, 0, cpu)

    def per_tensor() -> None:
        moments = moments_by_param(layers)
        for held in layers:
            for tensor in layer_record(export_layer(held, moments), held, cpu):
                if rank == 0:
                    dist.isend(tensor, 1).wait()
                else:
                    dist.irecv(torch.empty_like(tensor), 0).wait()

    times: dict[str, list[float]] = {"packed": [], "per tensor": []}
    for r in range(rounds):
        order = [("packed", packed), ("per tensor", per_tensor)]
        for name, copy in order if r % 2 == 0 else order[::-1]:
            dist.barrier()
            started = time.perf_counter()
            copy()
            dist.barrier()
            times[name].append(time.perf_counter() - started)
    held = [
        {
            "tensors": {k: v.tolist() for k, v in h.module.state_dict().items()},
            "moments": [{k: v.tolist() for k, v in h.optimizer.state.get(p, {}).items()} for p in h.module.parameters()],
            "step": h.step,
        }
        for h in layers
    ]
    out.put((rank, times, held, spec.num_layers))
    dist.destroy_process_group()


def measure(config: str, dtype: str, rounds: int, cores: list[int]) -> dict[str, Any]:
    """One two-process run on ``cores`` (one per rank, or both on one); medians in seconds."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=START_TIMEOUT)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    ranks = [
        context.Process(target=_copy_rounds, args=(r, store.port, config, dtype, rounds, [cores[r % len(cores)]], queue))
        for r in range(2)
    ]
    for p in ranks:
        p.start()
    try:
        results = {}
        for _ in ranks:
            rank, times, held, layers = queue.get(timeout=600)
            results[rank] = (times, held, layers)
    finally:
        for p in ranks:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    times = results[1][0]
    return {
        "cores": sorted(set(cores)),
        "layers": results[1][2],
        "packed_s": statistics.median(times["packed"]),
        "per_tensor_s": statistics.median(times["per tensor"]),
        "copies_equal": results[0][1] == results[1][1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/gpt-tiny.yaml", help="the model to copy (default the tiny GPT)")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="the model's dtype (default float64, as the fault-tolerance harness trains)")
    parser.add_argument("--rounds", type=int, default=10, help="copies of each kind per run (default 10)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where to write the JSON (default {RESULTS})")
    args = parser.parse_args(argv)
    if bad_flag("layer_copy", [("--rounds", args.rounds, args.rounds >= 1, "must be at least 1")]):
        return 2
    try:
        load_config(args.config)  # here, so that a bad config is one line and not a rank's traceback
    except ConfigError as e:
        print(f"layer_copy: error: --config: {e}", file=sys.stderr)
        return 2
    available = sorted(os.sched_getaffinity(0))
    placements = ([available[:2]] if len(available) >= 2 else []) + [available[:1]]
    machine = machine_info()
    rows = [measure(args.config, args.dtype, args.rounds, cores) for cores in placements]
    print(f"layer copy of {args.config} ({args.dtype}), rank 0 to rank 1 over gloo, median of {args.rounds} rounds")
    print(f"{'cores':<10} {'layers':>6} {'packed ms':>10} {'per tensor ms':>14} {'per tensor / packed':>20} {'copies equal':>13}")
    for row in rows:
        ratio = row["per_tensor_s"] / row["packed_s"]
        cores = ",".join(map(str, row["cores"]))
        print(
            f"{cores:<10} {row['layers']:>6} {row['packed_s'] * 1e3:>10.1f} {row['per_tensor_s'] * 1e3:>14.1f}"
            f" {ratio:>19.1f}x {str(row['copies_equal']):>13}"
        )
    report = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": args.config,
        "dtype": args.dtype,
        "rounds": args.rounds,
        "machine": machine,
        "rows": rows,
    }
    write_report(args.out, report)
    return 0 if all(row["copies_equal"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
