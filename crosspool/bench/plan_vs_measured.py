"""The KV-cache planner against the engine: predicted vs measured P99 aggregate KV demand.

`replay` part: three traces over tiny models of three families (Poisson, gamma-bursty, and correlated
on/off bursts across models) are replayed through the real engine, requests added at their arrival
times on a clock that skips idle gaps: it advances by the time of each loop iteration (the engine
thread's CPU time on a CPU shared with other work, so other processes do not stretch it; wall time on a
GPU machine), and when nothing runs it jumps to the next arrival. Aggregate demand = sum over models of
used blocks x the pool bytes per block, sampled after every engine step and weighted by the time until
the next sample.
The simulator's step-time model is calibrated first: its shape from a designed sweep of batches (1-3
models, 1-32 sequences each, the workload's lengths, single prompts), its scale from a short Poisson trace;
steps over `STALL_FACTOR` x the model's time for their load (one-time costs) are left out of both and counted.
On a GPU the engine is warmed first (fused-MoE tuning and every CUDA graph captured, then one unrecorded pass
of the sweep, so its Triton kernels are compiled), and the rates are scaled by `GPU_RATE_SCALE` unless
`--rate-scale` is given: see there.
Predictions: the simulator replaying the same trace (trace-conditional), and the planner's Monte-Carlo
from the traffic description alone (with its interval and the 5-95% range of single-trace P99s).

`table` part: per-model worst-case reservation vs the planned shared pool for 4-8 real-shape models
(specs from the presets; no checkpoints).

    python -m crosspool.bench.plan_vs_measured [--part replay|table|all] [--horizon-s 120] [--rate-scale R]
        [--device cpu|cuda] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crosspool.planner.plan import GIB, fmt_bytes
from crosspool.planner.quantile import WeightedSample, estimate_quantile, pool
from crosspool.planner.simulate import KVProfile, replay, simulate
from crosspool.planner.sizing import (
    FRAGMENTATION_BUNDLES,
    ModelInput,
    PlanSettings,
    block_geometry,
    make_plan,
    round_up,
)
from crosspool.planner.step_clock import StepTimeModel
from crosspool.planner.workload import SHAREGPT, BurstProcess, LengthDist, Lognormal, ModelTraffic, Requests, generate
from crosspool.pools.kv_pool import PAGE_BYTES

TINY = {"olmoe": "tiny-olmoe", "qwen2moe": "tiny-qwen2-moe", "dsv2": "tiny-deepseek-v2"}
RATES = {"olmoe": 0.4, "qwen2moe": 0.25, "dsv2": 0.5}    # cold: the CPU engine is busy ~1/3 of the time
# ShareGPT-like means with CPU-sized caps (tiny models' context is 2048)
CPU_SHAREGPT = LengthDist("sharegpt-cpu", prompt=Lognormal(250, 1.0, 4, 1024), output=Lognormal(200, 1.0, 1, 1024))
# On an H200 these tiny models finish a request in ~60 ms (~0.5 s on the CPU): at the CPU's rates ~0.06 requests
# are in flight, the engine is busy 4-9% of the time and one request sets the P99 (the first H200 run). x16
# gives 1-1.5 requests in flight and a P99 of 4-8 requests' KV, the CPU run's regime (still far from saturated).
GPU_RATE_SCALE = 16.0
STALL_FACTOR = 10.0                    # a step this many times slower than the model for its load: a one-time cost


@dataclass(frozen=True)
class Scenario:
    name: str
    burstiness: float
    burst: BurstProcess


SCENARIOS = (
    Scenario("poisson", 1.0, BurstProcess()),
    Scenario("gamma-0.25", 0.25, BurstProcess()),
    Scenario("correlated-bursts", 1.0, BurstProcess(factor=3.0, on_s=8.0, off_s=40.0, correlated=True)),
)


def _traffic(s: Scenario, rate_scale: float = 1.0) -> dict[str, ModelTraffic]:
    return {n: ModelTraffic(r * rate_scale, s.burstiness, CPU_SHAREGPT) for n, r in RATES.items()}


@dataclass
class Measured:
    demand: WeightedSample                 # used blocks x pool bytes per block, over [0, horizon]
    pinned: WeightedSample                 # page bundles with a used block
    requests: list[tuple[str, int, int, float, float, float]]   # model, P, O, admitted, first token, done
    wall_s: float
    preemptions: int
    steps: np.ndarray                      # [steps, 7]: the step's load (`_load`) and its seconds


def run_engine(engine, reqs: Requests, horizon_s: float, stride: dict[str, int],  # noqa: ANN001
               timer: Callable[[], float] = time.thread_time) -> Measured:
    """Replay `reqs` through the engine; see the module docstring for the clock (`timer`: the engine
    thread's CPU time on a shared CPU, wall time on a GPU machine)."""
    from crosspool.engine.sampling import SamplingParams

    rng = np.random.default_rng(0)
    wall_start, start, skipped, i = time.perf_counter(), timer(), 0.0, 0
    ids: dict[str, tuple[str, int, int, float]] = {}
    done: list[tuple[str, int, int, float, float, float]] = []
    first_token: dict[str, float] = {}
    samples: list[tuple[float, float, float]] = []       # (clock, demand, pinned) after each step
    steps: list[tuple[int, int, int, int, int, int, float]] = []

    def clock() -> float:
        return timer() - start + skipped

    while i < len(reqs) or engine.has_unfinished():
        now = clock()
        while i < len(reqs) and reqs.arrival_s[i] <= now:
            name, p, o = reqs.models[reqs.model[i]], int(reqs.prompt_tokens[i]), int(reqs.output_tokens[i])
            prompt = rng.integers(0, 509, p).tolist()
            rid = engine.add_request(name, prompt, SamplingParams(max_tokens=o, temperature=0, ignore_eos=True))
            ids[rid] = (name, p, o, now)
            i += 1
        if not engine.has_unfinished():
            samples.append((now, 0.0, _pinned(engine)))
            skipped += float(reqs.arrival_s[i]) - now
            continue
        load = _load(engine)
        for out in engine.step():
            t = clock()
            first_token.setdefault(out.request_id, t)
            if out.finished:
                name, p, o, arrived = ids.pop(out.request_id)
                done.append((name, p, o, arrived, first_token.pop(out.request_id), t))
        used = sum(m.blocks.num_used * stride[n] for n, m in engine.models.items())
        samples.append((clock(), float(used), _pinned(engine)))
        steps.append((*load, samples[-1][0] - now))       # the whole iteration: what the clock advanced
    t, demand, pinned = (np.array(c) for c in zip(*samples, strict=True))
    dur = np.diff(np.append(np.clip(t, 0, horizon_s), horizon_s))
    preempt = sum(m.scheduler.num_preemptions for m in engine.models.values())
    return Measured(WeightedSample.of(demand, dur), WeightedSample.of(pinned, dur), done,
                    time.perf_counter() - wall_start, preempt, np.array(steps))


def _stalls(model: StepTimeModel, m: Measured) -> dict:
    """Steps of a run that took over `STALL_FACTOR` x the model's time for their load: count, seconds."""
    slow = model.stalled(m.steps[:, :6], m.steps[:, 6], STALL_FACTOR)
    return {"steps": int(slow.sum()), "s": float(m.steps[slow, 6].sum()), "max_step_s": float(m.steps[:, 6].max())}


def _load(engine) -> tuple[int, int, int, int, int, int]:  # noqa: ANN001
    """The arguments of `StepTimeModel.step_s` for the coming step: models with work, sequences in the
    engine, context tokens of the decoding ones, prefill chunks, their prompt tokens and pairs."""
    models = seqs = context = chunks = prefill = pairs = 0
    budget = engine.config.max_num_batched_tokens
    for m in engine.models.values():
        s = m.scheduler
        if s.has_work():
            models += 1
        for seq in list(s.running) + list(s.waiting):
            seqs += 1
            left = seq.num_tokens - seq.num_computed
            if left > 1:
                chunk = min(left, budget)
                chunks += 1
                prefill += chunk
                pairs += chunk * (seq.num_computed + chunk)
            else:
                context += seq.num_tokens
    return models, seqs, context, chunks, prefill, pairs


def _pinned(engine) -> float:  # noqa: ANN001
    """Bytes of page bundles holding at least one used block (what the pool cannot take back)."""
    return float(sum(kv.mapped_bytes - kv.idle_bundles() * kv.bundle_pages * kv.pool.page_bytes
                     for kv in engine.kv_pool.models.values()))


def calibration_trace(models: list[str], lengths: LengthDist, max_model_len: int, seed: int,
                      max_output: int = 256) -> Requests:
    """Batches far apart (idle gaps cost nothing): 1-3 models with 1-32 sequences each, lengths drawn
    from the workload (outputs capped to keep it short), so the decode terms are measured over the load
    and the mix of contexts they will see; then single prompts of 64-1024 tokens for the prefill terms."""
    rng = np.random.default_rng(seed)
    rows = []
    t = 0.0
    for active in range(1, len(models) + 1):
        for per_model in (1, 4, 16, 32):
            p, o = lengths.sample(rng, active * per_model, max_model_len)
            rows += [(j % active, t, pj, min(oj, max_output)) for j, (pj, oj) in enumerate(zip(p, o, strict=True))]
            t += 1000.0
    for length in (64, 128, 256, 512, 768, 1024):
        for m in range(len(models)):
            rows.append((m, t, length, 2))
            t += 1000.0
    model, arrival, p, o = (np.array(c) for c in zip(*rows, strict=True))
    return Requests(models, model, arrival.astype(float), p, o)


def constant_speeds(measured: Measured, profiles: dict[str, KVProfile]) -> dict[str, KVProfile]:
    """Per-model speeds from the engine's own requests: prefill = prompt tokens / (admission to first
    token), decode = (output - 1) / (first token to last)."""
    out = {}
    for name, prof in profiles.items():
        rows = [r for r in measured.requests if r[0] == name]
        prefill = sum(r[1] for r in rows) / sum(r[4] - r[3] for r in rows)
        decode = sum(r[2] - 1 for r in rows) / sum(r[5] - r[4] for r in rows)
        out[name] = KVProfile(prof.block_bytes, prof.block_size, decode, prefill, prof.prefill_chunk_tokens,
                              prof.max_model_len)
    return out


def part_replay(models_dir: Path, horizon_s: float, calib_s: float, trials: int, seed: int,
                device: str = "cpu", rate_scale: float | None = None) -> dict:
    from crosspool.config import EngineConfig
    from crosspool.engine.engine import Engine
    from crosspool.models.loader import load_spec
    from crosspool.models.make_model import make_model

    torch.set_num_threads(1)               # on CPU the engine's time is then its thread's time
    if rate_scale is None:
        rate_scale = 1.0 if device == "cpu" else GPU_RATE_SCALE
    timer = time.thread_time if device == "cpu" else time.perf_counter
    dtype_bytes = 4 if device == "cpu" else 2                              # fp32 on CPU, bf16 on GPU
    dirs = {}
    for name, preset in TINY.items():
        d = models_dir / preset
        dirs[name] = d if (d / "config.json").is_file() else make_model(preset, d, seed=1, progress=False)
    specs = {n: load_spec(d) for n, d in dirs.items()}
    cfg = EngineConfig(device=device, kv_cache_bytes=512 << 20, block_size=16)     # never full
    stride = {n: block_geometry(s, cfg.block_size, dtype_bytes)[0] for n, s in specs.items()}
    slack = FRAGMENTATION_BUNDLES * sum(block_geometry(s, cfg.block_size, dtype_bytes)[1] for s in specs.values())
    base = {n: KVProfile(stride[n], cfg.block_size, max_model_len=s.max_position_embeddings)
            for n, s in specs.items()}
    max_len = {n: p.max_model_len for n, p in base.items()}
    results: dict = {"models": {n: TINY[n] for n in dirs}, "rate_scale": rate_scale,
                     "rates_rps": {n: r * rate_scale for n, r in RATES.items()}, "horizon_s": horizon_s,
                     "device": device, "clock": "thread CPU time" if device == "cpu" else "wall time",
                     "lengths": "prompt lognormal mean 250 sigma 1 in [4, 1024], output mean 200 sigma 1 in [1, 1024]"}
    engine = Engine({n: str(d) for n, d in dirs.items()}, cfg)
    try:
        warm: dict = {}
        if device != "cpu":                # tuning and graph captures at startup, as a server does
            warm["capture_graphs_s"] = engine.capture_graphs()
        run_engine(engine, generate(_traffic(SCENARIOS[0], rate_scale), max_len, 0.0, 5.0,
                                    np.random.default_rng(seed + 98)), 5.0, stride, timer)   # first-call costs
        calib_reqs = calibration_trace(list(dirs), CPU_SHAREGPT, min(max_len.values()), seed + 97)
        calib_end = float(calib_reqs.arrival_s[-1]) + 1000.0
        if device != "cpu":                # the sweep's shapes compile their Triton kernels here, not in the fit
            warm["sweep_pass_s"] = run_engine(engine, calib_reqs, calib_end, stride, timer).wall_s
        calib = run_engine(engine, calib_reqs, calib_end, stride, timer)
        shape = StepTimeModel.fit(calib.steps[:, :6], calib.steps[:, 6], STALL_FACTOR)
        # a short Poisson trace of the traffic: the step model's overall scale (the engine's per-step cost
        # drifts by ~10% between runs on this shared CPU), and constant per-model speeds for comparison
        poisson = run_engine(engine, generate(_traffic(SCENARIOS[0], rate_scale), max_len, 0.0, calib_s,
                                              np.random.default_rng(seed + 99)), calib_s, stride, timer)
        ok = ~shape.stalled(poisson.steps[:, :6], poisson.steps[:, 6], STALL_FACTOR)
        scale = float(poisson.steps[ok, 6].sum()) / float(shape.step_s(*poisson.steps[ok, :6].T).sum())
        clock = shape.scaled(scale)
        const = constant_speeds(poisson, base)
        results["calibration"] = {"steps": len(calib.steps), "step_time_s": clock.as_list(), "scale": scale,
                                  "calib_wall_s": calib.wall_s, "warmup": warm,
                                  "stalls": _stalls(shape, calib) | {"poisson_trace": _stalls(shape, poisson)},
                                  "poisson_trace_s": calib_s,
                                  "constant_speeds": {n: [p.decode_tps, p.prefill_tps] for n, p in const.items()}}
        print("calibrated:", json.dumps(results["calibration"]), flush=True)
        rows = []
        for k, sc in enumerate(SCENARIOS):
            traffic = _traffic(sc, rate_scale)
            reqs = generate(traffic, max_len, 0.0, horizon_s, np.random.default_rng(seed + k), sc.burst)
            m = run_engine(engine, reqs, horizon_s, stride, timer)
            timeline = replay(reqs, base, 0.0, horizon_s, clock)
            same = timeline.sample()
            same_const = replay(reqs, const, 0.0, horizon_s).sample()
            mc = simulate(traffic, base, horizon_s, trials, seed, sc.burst, clock)
            est = estimate_quantile(mc.aggregate, 99)
            per_trial = [s.quantile(0.99) for s in mc.aggregate]
            row = {
                "scenario": sc.name, "requests": len(reqs), "wall_s": m.wall_s, "preemptions": m.preemptions,
                "measured_p99": m.demand.quantile(0.99), "measured_mean": m.demand.mean(),
                "measured_pinned_p99": m.pinned.quantile(0.99),
                "planned_pool": round_up(same.quantile(0.99) + slack, PAGE_BYTES),
                "replay_p99": same.quantile(0.99), "replay_mean": same.mean(),
                "replay_const_p99": same_const.quantile(0.99), "replay_const_mean": same_const.mean(),
                "mc_p99": est.value, "mc_ci": [est.low, est.high], "mc_mean": pool(mc.aggregate).mean(),
                "mc_single_trace_p99_5_95": [float(np.percentile(per_trial, 5)), float(np.percentile(per_trial, 95))],
                # the calibrated step-time model on this trace's own steps: predicted / measured busy time
                "step_model_time_ratio": sum(clock.step_s(*row[:6]) for row in m.steps) / float(m.steps[:, 6].sum()),
                # the same for each request's admission to last token (what sets its KV-seconds)
                "hold_time_ratio": float(np.mean(timeline.release_s - reqs.arrival_s))
                / float(np.mean([r[5] - r[3] for r in m.requests])),
                "stalls": _stalls(clock, m),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        engine.close()
    results["traces"] = rows
    return results


# ---- the 4-8 model table ------------------------------------------------------------------------

TABLE_SETS = {
    4: ["olmoe-1b-7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "deepseek-v2-lite"],
    6: ["olmoe-1b-7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b", "olmoe-1b-7b"],
    8: ["olmoe-1b-7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b", "olmoe-1b-7b",
        "qwen3-30b-a3b", "deepseek-v2-lite"],
}


def part_table(trials: int, horizon_s: float, seed: int, max_num_seqs: int, max_model_len: int) -> list[dict]:
    from crosspool.models.presets import get_preset
    from crosspool.models.spec import ModelSpec

    rows = []
    for n, presets in TABLE_SETS.items():
        for label, burst in (("Poisson", BurstProcess()), ("correlated bursts", SCENARIOS[2].burst)):
            models = []
            for i, preset in enumerate(presets):
                spec = ModelSpec.from_hf_config(get_preset(preset).config)
                rate = (0.2, 0.5, 1.0)[i % 3]
                models.append(ModelInput(f"{preset}#{i}", spec, ModelTraffic(rate, 1.0, SHAREGPT),
                                         max_model_len=max_model_len))
            settings = PlanSettings(trials=trials, horizon_s=horizon_s, seed=seed, max_num_seqs=max_num_seqs,
                                    burst=burst)
            plan = make_plan(models, settings, ["cuda:0"], [141 * GIB])
            row = {
                "models": n, "traffic": label, "total_rps": sum(m.traffic.rate_rps for m in models),
                "worst_case_gib": plan.worst_case_total_bytes / GIB,
                "per_model_p99_gib": plan.per_model_quantile_sum_bytes / GIB,
                "shared_pool_gib": plan.kv_pool_bytes / GIB,
                "p99_gib": plan.demand_quantile_bytes / GIB,
                "ci_gib": [x / GIB for x in plan.demand_ci_bytes],
                "saved_vs_worst_gib": (plan.worst_case_total_bytes - plan.kv_pool_bytes) / GIB,
                "saved_vs_per_model_gib": (plan.per_model_quantile_sum_bytes - plan.kv_pool_bytes) / GIB,
                "overflow_shared": plan.overflow_probability,
                "overflow_per_model_any": plan.per_model_any_over_fraction,
                "requests_delayed": plan.requests_delayed_fraction,
                "weights_pool_gib": plan.weights_pool_bytes / GIB, "attention_gib": plan.attention_bytes / GIB,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _markdown(results: dict) -> str:
    lines = []
    if "traces" in results:
        cal = results["calibration"]
        warm = (f"tuning + CUDA graphs {sum(cal['warmup']['capture_graphs_s'].values()):.1f} s, a 5 s trace, "
                f"an unrecorded sweep {cal['warmup']['sweep_pass_s']:.1f} s" if cal["warmup"] else "a 5 s trace")
        lines += [f"replay on {results['device']}: rates x{results['rate_scale']:g} "
                  f"({', '.join(f'{n} {r:g}' for n, r in results['rates_rps'].items())} requests/s), "
                  f"{results['horizon_s']:g} s traces; warm-up: {warm}; calibration sweep {cal['calib_wall_s']:.1f} s, "
                  f"{cal['stalls']['steps']} of {cal['steps']} steps stalled ({cal['stalls']['s']:.2f} s), "
                  f"scale x{cal['scale']:.3f}", "",
                  "| trace | requests | measured P99 | predicted P99, same trace, step clock (error) | same trace, "
                  "constant speeds (error) | Monte-Carlo P99 [95% CI] | single-trace P99, 5-95% of trials |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in results["traces"]:
            meas = r["measured_p99"]
            lines.append(
                f"| {r['scenario']} | {r['requests']} | {fmt_bytes(meas)} | {fmt_bytes(r['replay_p99'])} "
                f"({r['replay_p99'] / meas - 1:+.1%}) | {fmt_bytes(r['replay_const_p99'])} "
                f"({r['replay_const_p99'] / meas - 1:+.1%}) | {fmt_bytes(r['mc_p99'])} "
                f"[{fmt_bytes(r['mc_ci'][0])}, {fmt_bytes(r['mc_ci'][1])}] | "
                f"{fmt_bytes(r['mc_single_trace_p99_5_95'][0])} - {fmt_bytes(r['mc_single_trace_p99_5_95'][1])} |")
        lines += ["", "| trace | step model / measured: busy time | request hold time | stalled steps (s) | "
                  "planned pool (P99 + 2 bundles per model) | measured P99 of bundles in use | preemptions |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in results["traces"]:
            lines.append(f"| {r['scenario']} | {r['step_model_time_ratio']:.3f} | {r['hold_time_ratio']:.3f} | "
                         f"{r['stalls']['steps']} ({r['stalls']['s']:.2f}) | {fmt_bytes(r['planned_pool'])} | "
                         f"{fmt_bytes(r['measured_pinned_p99'])} | {r['preemptions']} |")
    if "table" in results:
        lines += ["", "| models | traffic | worst-case reservations | per-model P99 reservations | shared pool "
                  "(P99 [CI]) | saved vs worst case | saved vs per-model P99 | overflow: shared | overflow: "
                  "per-model (any) |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["table"]:
            lines.append(
                f"| {r['models']} | {r['traffic']} | {r['worst_case_gib']:.1f} GiB | "
                f"{r['per_model_p99_gib']:.2f} GiB | "
                f"{r['shared_pool_gib']:.2f} GiB ({r['p99_gib']:.2f} [{r['ci_gib'][0]:.2f}, {r['ci_gib'][1]:.2f}]) | "
                f"{r['saved_vs_worst_gib']:.1f} GiB | {r['saved_vs_per_model_gib']:.2f} GiB | "
                f"{r['overflow_shared']:.2%} | {r['overflow_per_model_any']:.2%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["replay", "table", "all"], default="all")
    p.add_argument("--models-dir", default="models/plan_bench")
    p.add_argument("--horizon-s", type=float, default=120.0, help="seconds of traffic per replayed trace")
    p.add_argument("--calib-s", type=float, default=30.0, help="seconds of the calibration trace")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table-max-num-seqs", type=int, default=16)
    p.add_argument("--table-max-model-len", type=int, default=8192)
    p.add_argument("--rate-scale", type=float, default=None,
                   help=f"multiply the replayed traces' rates (default: 1 on cpu, {GPU_RATE_SCALE:g} on a GPU)")
    p.add_argument("--device", default="cpu", help="engine device for the replay part (cpu | cuda)")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    results: dict = {}
    if args.part in ("replay", "all"):
        results.update(part_replay(Path(args.models_dir), args.horizon_s, args.calib_s, args.trials, args.seed,
                                   args.device, args.rate_scale))
    if args.part in ("table", "all"):
        results["table"] = part_table(args.trials, 600.0, args.seed, args.table_max_num_seqs,
                                      args.table_max_model_len)
    print(_markdown(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
