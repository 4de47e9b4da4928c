"""The plan file: what the KV-cache planner decided, read back by `crosspool serve --plan`.

Owns the `Plan` dataclass (pool sizes, device assignment, per-model KV caps, the demand estimate and its
interval, the overflow figures), its JSON form (`Plan.save`, `load_plan`), the check that it fits the
devices (`Plan.check_fits`), the human-readable summary, and the PNG of the demand distribution. It
computes nothing about traffic; `crosspool.planner.sizing` fills it in.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PLAN_VERSION = 1
GIB = 1 << 30


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass
class ModelPlan:
    name: str
    path: str
    family: str
    kv_bytes_per_token: int
    block_size: int
    block_bytes: int                        # pool bytes one block occupies (page-bundle stride)
    attention_bytes: int                    # embeddings, norms, attention, lm_head: KV-pool side
    ffn_bytes: int                          # routers + experts (+ shared, dense MLPs): weights-pool side
    rate_rps: float
    burstiness: float
    decode_tps: float
    prefill_tps: float
    max_model_len: int
    max_num_seqs: int
    worst_case_kv_bytes: int                # max_num_seqs sequences of max_model_len tokens
    demand_quantile_bytes: float            # this model's own demand at the plan's percentile
    kv_cap_bytes: int                       # most KV this model may hold in the shared pool


@dataclass
class Plan:
    models: list[ModelPlan]
    workload: str
    percentile: float
    confidence: float
    trials: int
    horizon_s: float
    seed: int
    burst: dict[str, float | bool]
    demand_quantile_bytes: float            # the expected peak: the percentile of aggregate demand
    demand_ci_bytes: tuple[float, float]
    demand_mean_bytes: float
    demand_max_bytes: float                 # mean over trials of each trial's maximum
    fragmentation_bytes: int                # partly used page bundles (`sizing.FRAGMENTATION_BUNDLES` per model)
    kv_pool_bytes: int                      # quantile + fragmentation, rounded up to whole pages
    page_bytes: int
    weights_pool_bytes: int
    attention_bytes: int
    kv_devices: list[str]
    weights_devices: list[str]
    device_memory_bytes: list[int]          # per device of `devices`
    headroom_fraction: float
    overflow_probability: float             # fraction of time demand exceeds the pool
    overflow_episodes_per_hour: float
    requests_delayed_fraction: float        # requests alive during an overflow (would queue or be preempted)
    worst_case_total_bytes: int
    per_model_quantile_sum_bytes: float     # each model reserving its own percentile, in whole pages
    per_model_any_over_fraction: float      # of time some model exceeds its own per-model quantile
    num_requests: int
    histogram_edges_bytes: list[float] = field(default_factory=list)
    histogram_time_fraction: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    step_time_s: list[float] | None = None  # engine step-time model used for holding times, if any
    version: int = PLAN_VERSION

    # ---- what serve reads --------------------------------------------------------------------
    @property
    def per_model_kv_caps(self) -> dict[str, int]:
        return {m.name: m.kv_cap_bytes for m in self.models}

    @property
    def devices(self) -> list[str]:
        return list(dict.fromkeys(self.kv_devices + self.weights_devices))

    def device_needs(self) -> list[int]:
        """Bytes each device of `devices` must hold: KV devices the attention side plus their share of
        the KV pool; weights devices their share of the FFN weights (tensor-parallel)."""
        needs = []
        for d in self.devices:
            need = 0.0
            if d in self.kv_devices:
                need += self.attention_bytes + self.kv_pool_bytes / len(self.kv_devices)
            if d in self.weights_devices:
                need += self.weights_pool_bytes / len(self.weights_devices)
            needs.append(int(need))
        return needs

    def check_fits(self, device_memory_bytes: list[int]) -> None:
        """Raise ValueError unless every device of `devices` (in that order) holds its share with the
        plan's headroom left free."""
        devices = self.devices
        if len(device_memory_bytes) != len(devices):
            raise ValueError(f"the plan uses {len(devices)} device(s) {devices}, got memory sizes for "
                             f"{len(device_memory_bytes)}")
        problems = []
        for d, need, mem in zip(devices, self.device_needs(), device_memory_bytes, strict=True):
            usable = mem * (1 - self.headroom_fraction)
            if need > usable:
                problems.append(f"{d} needs {fmt_bytes(need)} ({self._need_parts(d)}) but has {fmt_bytes(mem)}, "
                                f"{fmt_bytes(usable)} usable with {self.headroom_fraction:.0%} headroom")
        if problems:
            raise ValueError("plan does not fit the devices: " + "; ".join(problems)
                             + ". Lower the percentile, serve fewer models, or add devices.")

    def _need_parts(self, device: str) -> str:
        parts = []
        if device in self.kv_devices:
            parts.append(f"KV pool {fmt_bytes(self.kv_pool_bytes / len(self.kv_devices))}")
            parts.append(f"attention weights {fmt_bytes(self.attention_bytes)}")
        if device in self.weights_devices:
            parts.append(f"FFN weights {fmt_bytes(self.weights_pool_bytes / len(self.weights_devices))}")
        return " + ".join(parts)

    # ---- files ---------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(self.to_json())

    @staticmethod
    def from_dict(d: dict) -> Plan:
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
        names = {f.name for f in dataclasses.fields(Plan)}
        missing = names - set(d) - {"histogram_edges_bytes", "histogram_time_fraction", "warnings", "step_time_s"}
        if missing:
            raise ValueError(f"plan is missing fields {sorted(missing)}")
        fields = {k: v for k, v in d.items() if k in names}
        fields["models"] = [ModelPlan(**m) for m in d["models"]]
        fields["demand_ci_bytes"] = tuple(d["demand_ci_bytes"])
        return Plan(**fields)

    # ---- for people ----------------------------------------------------------------------------
    def summary(self) -> str:
        burst = self.burst
        arrivals = "correlated on/off bursts" if burst.get("factor", 1) > 1 and burst.get("correlated") else (
            "independent on/off bursts" if burst.get("factor", 1) > 1 else "no burst state")
        lines = [
            f"CrossPool plan: {len(self.models)} model(s), workload {self.workload}, {arrivals}; "
            f"P{self.percentile:g} of aggregate KV demand from {self.trials} trials x {self.horizon_s:g} s "
            f"({self.num_requests} requests)",
            f"  {'model':<20}{'KV/token':>11}{'rate/s':>8}{'gamma':>7}{'dec tok/s':>10}"
            f"{f'P{self.percentile:g} alone':>12}{'worst case':>12}{'KV cap':>12}",
        ]
        for m in self.models:
            lines.append(f"  {m.name:<20}{fmt_bytes(m.kv_bytes_per_token):>11}{m.rate_rps:>8.3g}{m.burstiness:>7.3g}"
                         f"{m.decode_tps:>10.4g}{fmt_bytes(m.demand_quantile_bytes):>12}"
                         f"{fmt_bytes(m.worst_case_kv_bytes):>12}{fmt_bytes(m.kv_cap_bytes):>12}")
        if self.step_time_s:
            lines.append("  holding times: the engine's shared step clock, step seconds = "
                         f"{' / '.join(f'{c:.3g}' for c in self.step_time_s)} (base / model / sequence / "
                         "context token / prompt chunk / prompt token / prompt pair); per-model speeds unused")
        lo, hi = self.demand_ci_bytes
        saved = self.worst_case_total_bytes - self.kv_pool_bytes
        lines += [
            f"Aggregate KV demand: mean {fmt_bytes(self.demand_mean_bytes)}, P{self.percentile:g} "
            f"{fmt_bytes(self.demand_quantile_bytes)} ({self.confidence:.0%} CI {fmt_bytes(lo)} - {fmt_bytes(hi)}), "
            f"mean peak per trial {fmt_bytes(self.demand_max_bytes)}",
            f"KV pool: {fmt_bytes(self.kv_pool_bytes)} (P{self.percentile:g} + {fmt_bytes(self.fragmentation_bytes)} "
            f"for partly used page bundles, whole {fmt_bytes(self.page_bytes)} pages)",
            f"  overflow {self.overflow_probability:.2%} of the time, "
            f"{self.overflow_episodes_per_hour:.3g} episodes/h; "
            f"{self.requests_delayed_fraction:.2%} of requests alive during one would queue or be preempted "
            f"(upper bound; none fails)",
            f"  vs per-model worst-case reservations {fmt_bytes(self.worst_case_total_bytes)}: saves {fmt_bytes(saved)}"
            f" ({saved / max(self.worst_case_total_bytes, 1):.1%})",
            f"  vs per-model P{self.percentile:g} reservations {fmt_bytes(self.per_model_quantile_sum_bytes)}: "
            f"saves {fmt_bytes(self.per_model_quantile_sum_bytes - self.kv_pool_bytes)}, and those overflow "
            f"(some model) {self.per_model_any_over_fraction:.2%} of the time",
            f"Weights pool: {fmt_bytes(self.weights_pool_bytes)} of FFN weights; attention side "
            f"{fmt_bytes(self.attention_bytes)} (with the KV pool)",
        ]
        for d, need, mem in zip(self.devices, self.device_needs(), self.device_memory_bytes, strict=True):
            role = " + ".join(r for r, devs in (("KV pool", self.kv_devices), ("weights pool", self.weights_devices))
                              if d in devs)
            usable = mem * (1 - self.headroom_fraction)
            lines.append(f"  {d}: {role}, needs {fmt_bytes(need)} of {fmt_bytes(usable)} usable "
                         f"({'fits' if need <= usable else 'DOES NOT FIT'})")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def write_png(self, path: str | os.PathLike[str]) -> None:
        """Histogram and CDF of aggregate demand, the quantile with its interval, and the pool size."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        unit, scale = ("GiB", GIB) if self.kv_pool_bytes >= GIB else ("MiB", 1 << 20)
        edges = np.array(self.histogram_edges_bytes) / scale
        frac = np.array(self.histogram_time_fraction)
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.bar(edges[:-1], frac, width=np.diff(edges), align="edge", color="#8fb3d9", label="time at demand")
        ax.set_xlabel(f"aggregate KV demand ({unit})")
        ax.set_ylabel("fraction of time")
        cdf_ax = ax.twinx()
        cdf_ax.plot(edges[1:], np.cumsum(frac), color="#1f4e79", label="CDF")
        cdf_ax.set_ylim(0, 1.02)
        cdf_ax.set_ylabel("CDF")
        lo, hi = (x / scale for x in self.demand_ci_bytes)
        ax.axvspan(lo, hi, color="#f4a261", alpha=0.35, label=f"{self.confidence:.0%} CI")
        ax.axvline(self.demand_quantile_bytes / scale, color="#e76f51", label=f"P{self.percentile:g}")
        ax.axvline(self.kv_pool_bytes / scale, color="k", linestyle="--", label="KV pool")
        ax.legend(loc="center right")
        ax.set_title(f"KV demand, {len(self.models)} models, {self.workload} (P{self.percentile:g} = "
                     f"{fmt_bytes(self.demand_quantile_bytes)}, pool {fmt_bytes(self.kv_pool_bytes)})")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def load_plan(path: str | os.PathLike[str]) -> Plan:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"plan file {str(p)!r} not found (write one with `crosspool plan --out`)")
    try:
        return Plan.from_dict(json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise ValueError(f"{p}: not a valid CrossPool plan: {exc}") from exc
