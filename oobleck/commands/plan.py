"""Plan a job: pipeline templates for every node count from n0 up, the pipelines instantiated on all nodes
(at least f+1, so that any f node failures leave a copy of every layer), the microbatches each pipeline
runs per step, and the predicted step time and memory per stage.

The profile is analytic (from FLOPs and a device spec) with --model NAME (a GPT-3, GPT-2 or DiT shape,
e.g. gpt3-175b), or when CONFIG sets profile.source: analytic and its model.preset names such a shape.
Otherwise it is the measured profile of CONFIG's model (measured now, or read from the cache when it
matches), or the file given with --profile. Flags override CONFIG's values."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from oobleck.bounds import MAX_BATCH, MAX_DEVICES_PER_NODE, MAX_NODES, int_flag
from oobleck.cluster_spec import GB, GIB, cluster_spec
from oobleck.errors import OobleckError
from planner.analytic import DEVICES, SHAPES, DeviceSpec, analytic_profile, device_named, shape_named
from planner.cluster import ClusterSpec
from planner.errors import PlanningError, ProfileError
from planner.plan import Plan, make_plan
from planner.profile import ModelProfile
from planner.local_step import StepCosts

if TYPE_CHECKING:
    from oobleck.config import ClusterConfig

HELP = "plan pipelines for a model and cluster (templates, instantiation, batch split, memory)"


#: the examples ``oobleck plan --help`` ends with
EXAMPLES = (
    "oobleck plan --model gpt3-175b --nodes 64 --devices-per-node 8 --f 3",
    "oobleck plan examples/gpt3-175b.yaml --json",
    "oobleck plan job.yaml --nodes 8",
)

#: values used with --model and no CONFIG when a flag is left out
ANALYTIC_DEFAULTS = {"devices_per_node": 8, "f": 1, "global_batch": 512, "microbatch": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # one example per line: the CLI keeps the epilog's line breaks (argparse would wrap a command mid-way)
    parser.epilog = "examples:\n" + "".join(f"  {example}\n" for example in EXAMPLES)
    parser.add_argument("config", nargs="?", help="job config (YAML); optional with --model")
    parser.add_argument(
        "--model", metavar="NAME", help=f"plan an analytic profile of this shape instead: {', '.join(SHAPES)}"
    )
    parser.add_argument("--profile", metavar="PATH", help="plan from this profile file (checked against CONFIG or --model)")
    parser.add_argument("--nodes", type=int_flag(1, MAX_NODES), metavar="N", help="nodes in the cluster (required with --model and no CONFIG)")
    parser.add_argument("--devices-per-node", type=int_flag(1, MAX_DEVICES_PER_NODE), metavar="G", help="devices per node (--model default: 8)")
    parser.add_argument("--f", type=int_flag(0, MAX_NODES - 1), metavar="F", help="simultaneous node failures to survive (--model default: 1)")
    parser.add_argument(
        "--device-spec",
        metavar="NAME",
        help=f"device for analytic timings, and its memory and link bandwidths: {', '.join(DEVICES)} "
        "(default a100-80g; with CONFIG, memory and bandwidths come from the config unless this is given)",
    )
    parser.add_argument("--global-batch", type=int_flag(1, MAX_BATCH), metavar="B", help="samples per step (--model default: 512)")
    parser.add_argument("--microbatch", type=int_flag(1, MAX_BATCH), metavar="M", help="samples per microbatch (--model default: 1)")
    parser.add_argument(
        "--recompute",
        choices=("auto", "none", "full"),
        default="auto",
        help="analytic profiles: full activation recomputation per block; auto uses it only when the plan "
        "needs it (default auto)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON only")


@dataclass
class _Inputs:
    nodes: int
    devices_per_node: int
    f: int
    global_batch: int
    microbatch: int
    device: DeviceSpec
    #: the config's cluster (its memory and bandwidths), unless --device-spec names the device
    cluster: ClusterConfig | None


def _pick(flag: Any, from_config: Any, default: Any, name: str) -> Any:
    value = flag if flag is not None else from_config if from_config is not None else default
    if value is None:
        raise OobleckError(f"{name}: missing; pass {name} (or a CONFIG that sets it)")
    return value


def _inputs(args: argparse.Namespace, config: Any) -> _Inputs:
    c = config
    device = device_named(args.device_spec or "a100-80g")
    d = ANALYTIC_DEFAULTS
    inputs = _Inputs(
        nodes=_pick(args.nodes, c and c.cluster.nodes, None, "--nodes"),
        devices_per_node=_pick(args.devices_per_node, c and c.cluster.devices_per_node, d["devices_per_node"], "--devices-per-node"),
        f=_pick(args.f, c and c.fault_tolerance.f, d["f"], "--f"),
        global_batch=_pick(args.global_batch, c and c.training.global_batch, d["global_batch"], "--global-batch"),
        microbatch=_pick(args.microbatch, c and c.training.microbatch, d["microbatch"], "--microbatch"),
        device=device,
        cluster=c.cluster if c is not None and args.device_spec is None else None,
    )
    for flag, value, least in (
        ("--nodes", inputs.nodes, 1),
        ("--devices-per-node", inputs.devices_per_node, 1),
        ("--f", inputs.f, 0),
        ("--global-batch", inputs.global_batch, 1),
        ("--microbatch", inputs.microbatch, 1),
    ):
        if value < least:
            raise OobleckError(f"{flag}: got {value}; must be at least {least}")
    return inputs


def _cluster(i: _Inputs) -> ClusterSpec:
    if i.cluster is not None:
        return cluster_spec(i.cluster, i.nodes, i.devices_per_node)
    d = i.device
    return ClusterSpec(i.nodes, i.devices_per_node, d.memory_bytes, d.intra_node_bandwidth, d.inter_node_bandwidth)


def _analytic_plan(name: str, i: _Inputs, recompute: str, profile_file: str | None) -> tuple[Plan, str]:
    shape = shape_named(name)
    cluster = _cluster(i)
    choices = {"none": [False], "full": [True], "auto": [False, True]}[recompute]
    failure: PlanningError | ProfileError | None = None
    for full in choices:
        profile = analytic_profile(shape, i.microbatch, i.device, recompute=full)
        try:
            if profile_file is not None:
                profile = ModelProfile.load(profile_file, expect=profile.fingerprint)
            return make_plan(profile, cluster, i.f, i.global_batch, i.microbatch), f"analytic {name} on {i.device.name}" + (
                ", full activation recomputation" if full else ""
            )
        except (PlanningError, ProfileError) as e:
            # with auto, a plan (or a cached file) that fails without recomputation may work with it;
            # if neither works, the error with recomputation (the last tried) is the one to report
            failure = e
    assert failure is not None
    raise failure


def _plan(args: argparse.Namespace) -> tuple[Plan, str, StepCosts | None]:
    """The plan, where its profile comes from, and for a measured profile the costs of a local run's
    steps on this machine (None for analytic profiles, which describe another cluster's devices)."""
    config = None
    if args.config is not None:
        from oobleck.config import load_config

        config = load_config(args.config)
    elif args.model is None:
        raise OobleckError("CONFIG: missing; pass a job config, or --model NAME for an analytic profile")
    i = _inputs(args, config)
    if args.model is not None:
        return (*_analytic_plan(args.model, i, args.recompute, args.profile), None)
    assert config is not None
    if config.profile.source == "analytic":
        if config.model.preset not in SHAPES:
            raise OobleckError(
                f"model.preset: got {config.model.preset!r}; profile.source analytic needs one of {', '.join(SHAPES)} "
                "(or set profile.source: measured)"
            )
        return (*_analytic_plan(config.model.preset, i, args.recompute, args.profile), None)
    # measured profiles need the models (torch): import only on this path
    from oobleck import profiler
    from oobleck.control.planning import local_step_costs

    if args.profile is not None:
        profile = ModelProfile.load(args.profile, expect=profiler.expected_fingerprint(config))
        source = f"measured, {args.profile}"
    else:
        profile = profiler.ensure_profile(config)
        source = f"measured, {profiler.profile_path(config)}"
    recompute = config.training.recompute
    plan = make_plan(profile, _cluster(i), i.f, i.global_batch, i.microbatch, recompute)
    return plan, source, local_step_costs(config, profile)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _ranges(ranges: tuple[tuple[int, int], ...], limit: int = 4) -> str:
    shown = [f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in ranges]
    return " ".join(shown) if len(shown) <= limit else " ".join(shown[:limit]) + f" ... ({len(shown)} stages)"


def _seconds(x: float) -> str:
    """Seconds with 4 significant digits, trailing zeros kept (every time in the plan's output is in seconds)."""
    return f"{x:#.4g}" if x < 1e4 else f"{x:.0f}"


def _assumptions(plan: Plan) -> str:
    """Two lines on what the predicted times and memory rest on: for an analytic profile the precision,
    optimizer, device throughput and sequence length of its formulas, for a measured one where and how it
    was measured; then the link bandwidths the planner charges the transfers between stages to."""
    fp, c = plan.profile_fingerprint, plan.cluster
    model = fp.get("model", {})
    seq = f"sequence length {model['seq_len']}, " if "seq_len" in model else ""
    if fp.get("source") == "analytic":
        d = DEVICES[fp["device"]]
        basis = (
            f"{fp['dtype']} mixed precision, {model['optimizer']} with fp32 state; {d.peak_flops / 1e12:.3g} TFLOP/s "
            f"peak at {d.efficiency:.0%} efficiency"
        )
    else:
        basis = f"each layer's time and memory as measured on {fp['device']} in {fp['dtype']}"
    return (
        f"assumes: {basis}; {seq}microbatch {fp['microbatch']}\nlinks: {c.intra_node_bandwidth / GB:.3g} GB/s "
        f"within a node, {c.inter_node_bandwidth / GB:.3g} GB/s between nodes (for the transfers between stages)"
    )


#: what the tables' figures are (printed after them)
LEGEND = (
    "bottleneck s: the slowest stage's forward + backward time per microbatch; fill s: one microbatch through "
    "every stage and back, transfers included",
    "iteration s = fill s + (microbatches - 1) x bottleneck s (1F1B); GiB: the fullest stage's parameters, "
    "gradients, optimizer state and activations in flight / a device's memory",
)


def _local(plan: Plan, costs: StepCosts) -> str:
    """The legend's line on a local run of the plan: the cores its workers share, the overheads measured
    here, and the step time and throughput they give (:mod:`planner.local_step`)."""
    c = costs
    step = plan.local_step_time_s(c)
    workers = sum(t.num_stages for t, _ in plan.instantiation.pipelines)
    ms, per_mib = 1e3, 1e3 * 2**20
    return (
        f"local run on this machine: {workers} workers of {c.threads} threads "
        + (f"share {c.cores:g} cores ({c.cores / workers:.3g} per worker)" if math.isfinite(c.cores) else "on devices of their own")
        + (f", {c.busy_cores:.2g} of them busy with the control plane" if c.busy_cores else "")
        + f"; p2p {c.message_s * ms:.3g} ms per message, all-reduce "
        f"{c.allreduce_s * ms:.3g} ms + {c.allreduce_byte_s * per_mib:.3g} ms/MiB, AdamW "
        f"{c.optimizer_byte_s * per_mib:.3g} ms/MiB, commit {c.commit_s * ms:.3g} ms: predicted local step time "
        f"{_seconds(step)} s, {plan.num_microbatches * plan.microbatch / step:.1f} samples/s"
    )


def _show(plan: Plan, source: str, costs: StepCosts | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    c = plan.cluster
    mem = c.device_memory_bytes
    console.print(
        f"profile: {source}\n{_assumptions(plan)}\ncluster: {c.nodes} nodes x {c.devices_per_node} devices, "
        f"{_gib(mem)} GiB each; f={plan.f}; n0={plan.n0}; global batch {plan.global_batch} = "
        f"{plan.num_microbatches} x {plan.microbatch}",
        highlight=False,
        soft_wrap=True,
    )
    templates = Table(title="pipeline templates")
    for col in ("nodes", "stages", "bottleneck s", "fill s", "max stage GiB", "layers per stage"):
        templates.add_column(col, justify="right" if col != "layers per stage" else "left")
    for n, t in sorted(plan.templates.items()):
        templates.add_row(
            str(n),
            str(t.num_stages),
            _seconds(t.bottleneck_s),
            _seconds(t.fill_s),
            f"{_gib(max(s.memory_bytes for s in t.stages))} / {_gib(mem)}",
            _ranges(t.layer_ranges),
        )
    console.print(templates)
    chosen = Table(title="instantiated pipelines")
    for col in ("#", "nodes", "stages", "microbatches", "iteration s", "peak stage GiB"):
        chosen.add_column(col, justify="right")
    for p, (t, m) in enumerate(plan.instantiation.pipelines):
        chosen.add_row(
            str(p), str(t.num_nodes), str(t.num_stages), str(m), _seconds(t.iteration_time(m)),
            f"{_gib(max(t.stage_memory(m)))} / {_gib(mem)}",
        )
    console.print(chosen)
    inst = plan.instantiation
    extra = f"; {inst.idle_nodes} idle nodes (no template mix covers all)" if inst.idle_nodes else ""
    extra += "; DEGRADED: fewer than f+1 pipelines" if plan.degraded else ""
    console.print("\n".join(LEGEND), highlight=False, soft_wrap=True)
    if costs is not None:
        console.print(_local(plan, costs), highlight=False, soft_wrap=True)
    console.print(
        f"{len(inst.pipelines)} pipelines on {inst.num_nodes} nodes{extra}; predicted step time "
        f"{_seconds(plan.step_time_s)} s (the slowest pipeline's iteration), {plan.samples_per_s:.1f} samples/s",
        highlight=False,
        soft_wrap=True,
    )


def run(args: argparse.Namespace) -> int:
    plan, source, costs = _plan(args)
    if args.json:
        local = {} if costs is None else {"local": {
            **asdict(costs), "cores": costs.cores if math.isfinite(costs.cores) else None,  # JSON has no infinity
            "step_time_s": plan.local_step_time_s(costs),
        }}  # fmt: skip
        print(json.dumps({**plan.to_dict(), **local}, indent=1))
    else:
        _show(plan, source, costs)
    return 0
