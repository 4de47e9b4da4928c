"""Pool sizing: from the models and their traffic to a `Plan`.

Owns the planner's decisions: per-model sizes read from each `ModelSpec` (KV bytes per token for MHA,
GQA and MLA; the attention-side and FFN-side weight bytes of its checkpoint layout; the pool bytes a KV
block occupies inside its page bundle), the KV pool size (the chosen percentile of simulated aggregate
demand plus `FRAGMENTATION_BUNDLES` partly used page bundles per model, in whole 2 MiB pages), per-model
KV caps, and which
devices serve which pool. The simulation and statistics are `simulate` and `quantile`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from crosspool.models.spec import ATTENTION_SIDE, ModelSpec, checkpoint_layout
from crosspool.planner.plan import ModelPlan, Plan, fmt_bytes
from crosspool.planner.quantile import WeightedSample, check_percentile, estimate_quantile, pool
from crosspool.planner.simulate import KVProfile, overflow_stats, simulate
from crosspool.planner.step_clock import StepTimeModel
from crosspool.planner.workload import NO_BURSTS, BurstProcess, ModelTraffic
from crosspool.pools.kv_pool import PAGE_BYTES, bundle_shape

DEFAULT_DECODE_TPS = 50.0                  # tokens/s per decoding sequence
DEFAULT_PREFILL_TPS = 5000.0               # prompt tokens/s per request
# A bundle goes back to the pool only when all its blocks are free, so a model with requests coming and
# going holds partly used bundles; replays through the engine saw up to about two per model.
FRAGMENTATION_BUNDLES = 2


def weight_bytes(spec: ModelSpec, dtype_bytes: int) -> tuple[int, int]:
    """(attention-side, FFN-side) weight bytes of a checkpoint of `spec`."""
    attention = ffn = 0
    for t in checkpoint_layout(spec):
        n = int(np.prod(t.shape)) * dtype_bytes
        if t.side == ATTENTION_SIDE:
            attention += n
        else:
            ffn += n
    return attention, ffn


def block_geometry(spec: ModelSpec, block_size: int, dtype_bytes: int,
                   page_bytes: int = PAGE_BYTES) -> tuple[int, int]:
    """(pool bytes per block, bytes per page bundle) as `KVPool.register` lays the model out."""
    block_bytes = spec.kv_bytes_per_token(dtype_bytes) * block_size
    pages, blocks = bundle_shape(block_bytes, page_bytes)
    return (pages * page_bytes) // blocks, pages * page_bytes


@dataclass(frozen=True)
class ModelInput:
    name: str
    spec: ModelSpec
    traffic: ModelTraffic
    path: str = ""
    decode_tps: float = DEFAULT_DECODE_TPS
    prefill_tps: float = DEFAULT_PREFILL_TPS
    max_model_len: int | None = None      # default: the model's max_position_embeddings


@dataclass(frozen=True)
class PlanSettings:
    percentile: float = 99.0
    confidence: float = 0.95
    horizon_s: float = 600.0
    trials: int = 200
    seed: int = 0
    block_size: int = 16
    dtype_bytes: int = 2                   # KV cache and weights (bf16)
    max_num_seqs: int = 64                 # per model: bounds the worst-case reservation
    prefill_chunk_tokens: int = 2048
    headroom_fraction: float = 0.10        # of each device left for activations, graphs, the runtime
    burst: BurstProcess = field(default=NO_BURSTS)
    workload: str = "sharegpt"
    step_time: StepTimeModel | None = None  # the engine's shared step clock instead of per-model speeds

    def __post_init__(self) -> None:
        check_percentile(self.percentile)
        if not 0 <= self.headroom_fraction < 1:
            raise ValueError(f"headroom fraction must be in [0, 1), got {self.headroom_fraction}")
        if self.trials < 2:
            raise ValueError(f"trials must be >= 2 (the confidence interval comes from trials), got {self.trials}")
        if self.horizon_s <= 0:
            raise ValueError(f"horizon must be > 0 s, got {self.horizon_s}")


def kv_profile(m: ModelInput, s: PlanSettings) -> KVProfile:
    limit = m.spec.max_position_embeddings
    return KVProfile(block_bytes=block_geometry(m.spec, s.block_size, s.dtype_bytes)[0], block_size=s.block_size,
                     decode_tps=m.decode_tps, prefill_tps=m.prefill_tps,
                     prefill_chunk_tokens=s.prefill_chunk_tokens,
                     max_model_len=min(m.max_model_len or limit, limit))


def round_up(n: float, unit: int) -> int:
    return int(-(-int(np.ceil(n)) // unit) * unit)


def assign_devices(devices: list[str], memory: list[int], kv_pool_bytes: int, attention_bytes: int,
                   ffn_bytes: int, headroom: float) -> tuple[list[str], list[str]]:
    """One device: both pools share it. Several: the split into KV devices (first) and weights devices
    (the rest) whose most loaded device has the lowest share of its usable memory."""
    if len(devices) != len(set(devices)):
        raise ValueError(f"devices repeat: {devices}")
    if len(devices) == 1:
        return devices[:], devices[:]

    def load(k: int) -> float:
        kv = [(attention_bytes + kv_pool_bytes / k) / m for m in memory[:k]]
        w = [(ffn_bytes / (len(devices) - k)) / m for m in memory[k:]]
        return max(kv + w) / (1 - headroom)

    k = min(range(1, len(devices)), key=load)
    return devices[:k], devices[k:]


def _histogram(pooled: WeightedSample, bins: int = 60) -> tuple[list[float], list[float]]:
    top = float(pooled.levels[-1]) if len(pooled.levels) else 1.0
    edges = np.linspace(0.0, max(top, 1.0) * 1.0001, bins + 1)
    frac, _ = np.histogram(pooled.levels, bins=edges, weights=pooled.weights / max(pooled.total, 1e-300))
    return edges.tolist(), frac.tolist()


def make_plan(models: list[ModelInput], settings: PlanSettings, devices: list[str],
              device_memory_bytes: list[int], progress: bool = False) -> Plan:
    """Simulate, estimate the quantile, size and place the pools. Does not check the fit (`Plan.check_fits`)."""
    if not models:
        raise ValueError("no models to plan for")
    if len({m.name for m in models}) != len(models):
        raise ValueError(f"model names repeat: {[m.name for m in models]}")
    if not devices or len(devices) != len(device_memory_bytes):
        raise ValueError(f"need one memory size per device, got devices {devices} and {device_memory_bytes}")
    s = settings
    traffic = {m.name: m.traffic for m in models}
    profiles = {m.name: kv_profile(m, s) for m in models}
    bar = tqdm(total=2 * s.trials, desc="simulating KV demand", unit="trial", disable=not progress)
    samples = simulate(traffic, profiles, s.horizon_s, s.trials, s.seed, s.burst, s.step_time, progress=bar.update)
    pooled = pool(samples.aggregate)
    est = estimate_quantile(samples.aggregate, s.percentile, s.confidence, pooled)
    alone = {n: pool(v).quantile(s.percentile / 100) for n, v in samples.per_model.items()}

    bundles = {m.name: block_geometry(m.spec, s.block_size, s.dtype_bytes)[1] for m in models}
    fragmentation = FRAGMENTATION_BUNDLES * sum(bundles.values())
    kv_pool_bytes = round_up(est.value + fragmentation, PAGE_BYTES)
    bar.set_description("checking overflow")
    over = overflow_stats(traffic, profiles, kv_pool_bytes - fragmentation, s.horizon_s, s.trials, s.seed,
                          s.burst, s.step_time, reservations=alone, progress=bar.update)
    bar.close()

    plans, warnings = [], []
    for m in models:
        prof = profiles[m.name]
        blocks_per_seq = -(-prof.max_model_len // s.block_size)
        worst = s.max_num_seqs * blocks_per_seq * prof.block_bytes
        attention, ffn = weight_bytes(m.spec, s.dtype_bytes)
        plans.append(ModelPlan(
            name=m.name, path=m.path, family=m.spec.family, kv_bytes_per_token=m.spec.kv_bytes_per_token(s.dtype_bytes),
            block_size=s.block_size, block_bytes=prof.block_bytes, attention_bytes=attention, ffn_bytes=ffn,
            rate_rps=m.traffic.rate_rps, burstiness=m.traffic.burstiness, decode_tps=m.decode_tps,
            prefill_tps=m.prefill_tps, max_model_len=prof.max_model_len, max_num_seqs=s.max_num_seqs,
            worst_case_kv_bytes=worst, demand_quantile_bytes=alone[m.name],
            kv_cap_bytes=min(worst, kv_pool_bytes),
        ))
        if m.traffic.lengths.prompt is not None and m.traffic.lengths.prompt.hi >= prof.max_model_len:
            warnings.append(f"{m.name}: {m.traffic.lengths.name} prompts are clipped to max_model_len "
                            f"{prof.max_model_len}")

    attention_total = sum(p.attention_bytes for p in plans)
    ffn_total = sum(p.ffn_bytes for p in plans)
    kv_devices, weights_devices = assign_devices(devices, device_memory_bytes, kv_pool_bytes, attention_total,
                                                 ffn_total, s.headroom_fraction)
    per_device_kv = kv_pool_bytes / len(kv_devices)
    for p in plans:
        longest = -(-p.max_model_len // p.block_size) * p.block_bytes
        if longest > per_device_kv:
            fits = int(per_device_kv // p.block_bytes) * p.block_size
            warnings.append(f"{p.name}: a {p.max_model_len}-token request needs {fmt_bytes(longest)} of KV, more than "
                            f"a KV device's share of the pool ({fmt_bytes(per_device_kv)}): the engine rejects "
                            f"requests over {fits} tokens (lower --max-model-len or size the pool up)")
    if est.value > 0 and (est.high - est.low) / est.value > 0.10:
        warnings.append(f"the {est.confidence:.0%} interval of the P{s.percentile:g} is wider than 10% of it: "
                        "raise --trials or --horizon-s")
    by_device = dict(zip(devices, device_memory_bytes, strict=True))
    order = list(dict.fromkeys(kv_devices + weights_devices))
    edges, frac = _histogram(pooled)
    return Plan(
        models=plans, workload=s.workload, percentile=s.percentile, confidence=s.confidence, trials=s.trials,
        horizon_s=s.horizon_s, seed=s.seed, burst=asdict(s.burst), demand_quantile_bytes=est.value,
        demand_ci_bytes=(est.low, est.high), demand_mean_bytes=pooled.mean(),
        demand_max_bytes=float(np.mean(samples.peak_bytes)), fragmentation_bytes=fragmentation,
        kv_pool_bytes=kv_pool_bytes, page_bytes=PAGE_BYTES, weights_pool_bytes=ffn_total,
        attention_bytes=attention_total, kv_devices=kv_devices, weights_devices=weights_devices,
        device_memory_bytes=[by_device[d] for d in order], headroom_fraction=s.headroom_fraction,
        overflow_probability=over.time_fraction, overflow_episodes_per_hour=over.episodes_per_hour,
        requests_delayed_fraction=over.requests_delayed_fraction,
        worst_case_total_bytes=sum(p.worst_case_kv_bytes for p in plans),
        per_model_quantile_sum_bytes=float(sum(round_up(v, PAGE_BYTES) for v in alone.values())),
        per_model_any_over_fraction=over.any_model_over_fraction, num_requests=samples.num_requests,
        histogram_edges_bytes=edges, histogram_time_fraction=frac, warnings=warnings,
        step_time_s=s.step_time.as_list() if s.step_time else None,
    )
