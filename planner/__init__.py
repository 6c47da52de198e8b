"""The planner: profiles, pipeline templates, instantiation and batch distribution. Pure Python (never
imports torch), so plans for clusters far larger than this machine can be made anywhere."""

from planner.analytic import DEVICES, SHAPES, DeviceSpec, TransformerShape, analytic_profile
from planner.cluster import ClusterSpec
from planner.errors import PlanningError, ProfileError
from planner.instantiate import Instantiation, distribute_batch, instantiate
from planner.plan import Plan, make_plan
from planner.profile import LayerProfile, ModelProfile, fingerprint_hash
from planner.templates import PipelineTemplate, Stage, build_templates, min_nodes

__all__ = [
    "DEVICES",
    "SHAPES",
    "ClusterSpec",
    "DeviceSpec",
    "Instantiation",
    "LayerProfile",
    "ModelProfile",
    "PipelineTemplate",
    "Plan",
    "PlanningError",
    "ProfileError",
    "Stage",
    "TransformerShape",
    "analytic_profile",
    "build_templates",
    "distribute_batch",
    "fingerprint_hash",
    "instantiate",
    "make_plan",
    "min_nodes",
]
