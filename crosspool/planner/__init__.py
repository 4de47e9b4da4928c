"""KV-cache planner: size the shared KV pool from traffic by Monte-Carlo simulation (ARCHITECTURE.md).

`workload` (arrivals, lengths, traces) -> `simulate` (aggregate KV demand over time) -> `quantile`
(percentile with a confidence interval) -> `sizing` (pool sizes, devices) -> `plan` (the plan file that
`crosspool serve --plan` reads). `cli` is the `crosspool plan` command.
"""

from crosspool.planner.plan import ModelPlan, Plan, load_plan
from crosspool.planner.quantile import QuantileEstimate, WeightedSample, estimate_quantile
from crosspool.planner.simulate import KVProfile, overflow_stats, replay, simulate
from crosspool.planner.sizing import ModelInput, PlanSettings, make_plan
from crosspool.planner.step_clock import StepTimeModel
from crosspool.planner.workload import BurstProcess, LengthDist, ModelTraffic, Requests, read_trace, write_trace

__all__ = [
    "BurstProcess", "KVProfile", "LengthDist", "ModelInput", "ModelPlan", "ModelTraffic", "Plan", "PlanSettings",
    "QuantileEstimate", "Requests", "StepTimeModel", "WeightedSample", "estimate_quantile", "load_plan", "make_plan",
    "overflow_stats", "read_trace", "replay", "simulate", "write_trace",
]
