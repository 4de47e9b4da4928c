"""KV-cache planner: simulated demand against closed forms, interval coverage, bursts, plan files, CLI."""

from __future__ import annotations

import json
import re
from math import gcd
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import poisson

from crosspool.cli import main as plan_main
from crosspool.models.presets import get_preset
from crosspool.models.spec import ModelSpec
from crosspool.planner import (
    BurstProcess,
    KVProfile,
    LengthDist,
    ModelInput,
    ModelTraffic,
    PlanSettings,
    Requests,
    estimate_quantile,
    load_plan,
    make_plan,
    replay,
    simulate,
    write_trace,
)
from crosspool.planner.quantile import pool
from crosspool.planner.sizing import assign_devices, block_geometry, weight_bytes
from crosspool.planner.step_clock import StepTimeModel
from crosspool.planner.workload import NO_BURSTS, Fixed, generate
from crosspool.pools.kv_pool import KVPool

GIB = 1 << 30


def _fixed(prompt: int, output: int) -> LengthDist:
    return LengthDist("fixed", Fixed(prompt), Fixed(output))


def _exact_quantile(components: list[tuple[float, int]], p: float) -> int:
    """p-quantile of sum_j c_j * N_j, N_j ~ Poisson(mean_j) independent; components = (mean_j, c_j) with
    integer c_j. This is the demand of M/G/inf traffic: requests with age in a band form a Poisson count."""
    unit = 0
    for _, c in components:
        unit = gcd(unit, c)
    pmf = np.array([1.0])
    for mean, c in components:
        n = np.arange(int(poisson.ppf(1 - 1e-13, mean)) + 1)
        step = np.zeros(len(n) * (c // unit) - (c // unit) + 1)
        step[n * (c // unit)] = poisson.pmf(n, mean)
        pmf = np.convolve(pmf, step)
    return int(np.searchsorted(np.cumsum(pmf), p - 1e-12)) * unit


# ---- holding model --------------------------------------------------------------------------------

def test_one_request_holds_blocks_as_the_engine_allocates() -> None:
    # 40-token prompt (3 blocks of 16) in chunks of 32, 30 output tokens: KV for 69 tokens at the end.
    prof = KVProfile(block_bytes=1, block_size=16, decode_tps=10, prefill_tps=40, prefill_chunk_tokens=32)
    tl = replay(Requests(["a"], np.array([0]), np.array([1.0]), np.array([40]), np.array([30])), {"a": prof}, 0, 9)
    steps = list(zip(tl.times.round(6), tl.levels, strict=True))
    # chunk 0 (2 blocks) at 1.0, chunk 1 at 1.8 (+1), first token at 2.0, decode step k holds 40+k
    # tokens: block 4 at k=9 (49 tokens, t=2.8), block 5 at k=25 (t=4.4); done after k=29 (t=4.9)
    assert steps == [(1.0, 2), (1.8, 3), (2.8, 4), (4.4, 5), (4.9, 0)]
    assert prof.peak_blocks(40, 30) == 5 and prof.hold_s(40, 30) == pytest.approx(3.9)
    # on the engine's step clock (0.1 s steps): a chunk per step, then a token per step
    tl = replay(Requests(["a"], np.array([0]), np.array([1.0]), np.array([40]), np.array([30])), {"a": prof}, 0, 9,
                clock=StepTimeModel(base_s=0.1))
    assert list(zip(tl.times.round(6), tl.levels, strict=True)) == [(1.0, 2), (1.1, 3), (2.0, 4), (3.6, 5), (4.1, 0)]


def test_step_clock_shares_steps_between_sequences() -> None:
    """Step time grows with the sequences in the engine, so two overlapping requests slow each other."""
    clock = StepTimeModel(per_seq_s=0.01)
    prof = {"a": KVProfile(block_bytes=1, block_size=16), "b": KVProfile(block_bytes=1, block_size=16)}
    alone = replay(Requests(["a", "b"], np.array([0]), np.array([0.0]), np.array([16]), np.array([101])), prof, 0,
                   99, clock)
    both = replay(Requests(["a", "b"], np.array([0, 1]), np.array([0.0, 0.0]), np.array([16, 16]),
                           np.array([101, 101])), prof, 0, 99, clock)
    assert alone.release_s[0] == pytest.approx(101 * 0.01)            # 1 prefill step (token 1) + 100 decode steps
    assert both.release_s.tolist() == pytest.approx([101 * 0.02] * 2)
    # fitting recovers a step-time model from noisy steps, half of them with a prefill chunk
    rng = np.random.default_rng(0)
    models, seqs = rng.integers(1, 4, 600), rng.integers(1, 17, 600)
    tokens = np.where(np.arange(600) % 2 == 0, 0, rng.integers(1, 1000, 600))
    chunks = np.where(tokens > 0, rng.integers(1, 4, 600), 0)
    load = np.column_stack([models, np.maximum(seqs, models), seqs * rng.integers(16, 1000, 600), chunks, tokens,
                            tokens**2])
    truth = StepTimeModel(0.0002, 0.0015, 0.0004, 6e-7, 0.003, 2e-5, 7e-8)
    fitted = StepTimeModel.fit(load, np.array([truth.step_s(*row) for row in load]) + rng.normal(0, 2e-5, 600))
    assert fitted.as_list() == pytest.approx(truth.as_list(), rel=0.05, abs=2e-5)


def test_fit_leaves_out_one_time_stalls() -> None:
    """GPU-like steps (a fraction of a millisecond) with 36 compile/capture stalls of 0.2-1 s among them: a plain
    fit is pulled several-fold off (the first H200 calibration: scale 0.17), the stall-excluding fit is not."""
    rng = np.random.default_rng(1)
    n = 3000
    models, seqs = rng.integers(1, 4, n), rng.integers(1, 33, n)
    tokens = np.where(rng.random(n) < 0.9, 0, rng.integers(16, 1024, n))
    chunks = (tokens > 0).astype(int)
    load = np.column_stack([models, np.maximum(seqs, models), seqs * rng.integers(16, 1000, n), chunks, tokens,
                            tokens**2])
    truth = StepTimeModel(0.0002, 0.0001, 1e-5, 1e-8, 0.001, 2e-6, 1e-10)
    step_s = np.array([truth.step_s(*row) for row in load]) * rng.normal(1, 0.05, n)
    stalls = rng.choice(n, 36, replace=False)
    step_s[stalls] += rng.uniform(0.2, 1.0, 36)
    plain = StepTimeModel.fit(load, step_s)
    assert plain.step_s(1, 1) > 3 * truth.step_s(1, 1)
    fitted = StepTimeModel.fit(load, step_s, stall_factor=10)
    for row in load[:200]:
        assert fitted.step_s(*row) == pytest.approx(truth.step_s(*row), rel=0.05)
    assert np.flatnonzero(fitted.stalled(load, step_s, 10)).tolist() == sorted(stalls.tolist())
    # without stalls nothing is left out: the same fit as the plain one
    clean = np.array([truth.step_s(*row) for row in load]) * rng.normal(1, 0.05, n)
    assert StepTimeModel.fit(load, clean, 10).as_list() == StepTimeModel.fit(load, clean).as_list()


def _hardest_case() -> tuple[dict[str, ModelTraffic], dict[str, KVProfile], int]:
    """One model whose Poisson mean makes P(N <= 8) exactly 0.99, so the estimate flips between 8 and 9."""
    mean = brentq(lambda m: poisson.cdf(8, m) - 0.99, 0.5, 8)
    prof = {"a": KVProfile(block_bytes=7, block_size=16, prefill_tps=32, decode_tps=16)}
    return {"a": ModelTraffic(mean, 1.0, _fixed(32, 1))}, prof, 8 * 14      # holds 2 blocks for 1 s


def _two_models() -> tuple[dict[str, ModelTraffic], dict[str, KVProfile], int]:
    """Two models of different block bytes, one growing while it decodes.
    a: prompt 32 (2 blocks, 1 s of prefill), one output token -> holds 2 blocks (6 B) for 1 s;
    b: prompt 32, 33 output tokens -> 2 blocks for 1 s, 3 for 1 s, 4 for 1 s (10, 15, 20 B)."""
    profiles = {"a": KVProfile(block_bytes=3, block_size=16, prefill_tps=32, decode_tps=16),
                "b": KVProfile(block_bytes=5, block_size=16, prefill_tps=32, decode_tps=16)}
    traffic = {"a": ModelTraffic(4.0, 1.0, _fixed(32, 1)), "b": ModelTraffic(1.5, 1.0, _fixed(32, 33))}
    return traffic, profiles, _exact_quantile([(4.0, 6), (1.5, 10), (1.5, 15), (1.5, 20)], 0.99)


def test_poisson_demand_matches_closed_form() -> None:
    """Two models, fixed lengths, Poisson arrivals: demand = sum of Poisson counts x block bytes."""
    traffic, profiles, exact = _two_models()
    samples = simulate(traffic, profiles, horizon_s=400, trials=40, seed=3)
    est = estimate_quantile(samples.aggregate, 99)
    assert est.covers(exact), (est, exact)
    assert abs(est.value - exact) <= 0.05 * exact
    assert pool(samples.aggregate).mean() == pytest.approx(4.0 * 6 + 1.5 * 45, rel=0.03)


@pytest.mark.parametrize("case", [_hardest_case, _two_models])
def test_confidence_interval_coverage(case) -> None:  # noqa: ANN001
    """Nominal 95% intervals from 30 trials cover the exact P99 in >= 85% of 40 repetitions."""
    traffic, profiles, exact = case()
    estimates = [estimate_quantile(simulate(traffic, profiles, 200, 30, seed=100 + r).aggregate, 99)
                 for r in range(40)]
    covered = sum(e.covers(exact) for e in estimates)
    assert covered >= 34, [(e.low, e.value, e.high) for e in estimates]
    assert np.median([e.high - e.low for e in estimates]) <= 0.15 * exact    # informative, not the whole range


# ---- arrivals -------------------------------------------------------------------------------------

def test_bursts_keep_the_mean_rate() -> None:
    rng = np.random.default_rng(0)
    traffic = {n: ModelTraffic(2.0, 0.5, _fixed(16, 1)) for n in ("a", "b")}
    for burst in (BurstProcess(), BurstProcess(5, 10, 90, True), BurstProcess(5, 10, 90, False)):
        reqs = generate(traffic, {"a": 64, "b": 64}, 0, 20000, rng, burst)
        assert len(reqs) / 20000 == pytest.approx(4.0, rel=0.06)
    with pytest.raises(ValueError, match="burst factor"):
        BurstProcess(20, 10, 90)


def _p99(traffic: dict[str, ModelTraffic], burst: BurstProcess = NO_BURSTS) -> tuple[float, float]:
    profiles = {n: KVProfile(block_bytes=1000) for n in traffic}
    s = simulate(traffic, profiles, horizon_s=600, trials=30, seed=1, burst=burst)
    return estimate_quantile(s.aggregate, 99).value, pool(s.aggregate).mean()


def test_gamma_burstiness_raises_the_tail() -> None:
    poisson_p99, poisson_mean = _p99({"a": ModelTraffic(1.0, 1.0)})
    bursty_p99, bursty_mean = _p99({"a": ModelTraffic(1.0, 0.1)})
    assert bursty_mean == pytest.approx(poisson_mean, rel=0.1)
    assert bursty_p99 > 1.2 * poisson_p99


def test_correlated_bursts_raise_the_aggregate_tail() -> None:
    traffic = {n: ModelTraffic(0.5, 1.0) for n in "abcd"}
    indep_p99, indep_mean = _p99(traffic, BurstProcess(6, 10, 90, correlated=False))
    corr_p99, corr_mean = _p99(traffic, BurstProcess(6, 10, 90, correlated=True))
    assert corr_mean == pytest.approx(indep_mean, rel=0.1)
    assert corr_p99 > 1.2 * indep_p99


def test_replay_of_a_trace_is_exact() -> None:
    reqs = Requests(["a"], np.array([0, 0]), np.array([0.0, 0.5]), np.array([16, 16]), np.array([1, 1]))
    tl = replay(reqs, {"a": KVProfile(block_bytes=10, prefill_tps=16)}, 0.0, 2.0)   # each: 1 block for 1 s
    s = tl.sample()
    assert s.levels.tolist() == [0, 10, 20] and s.weights.tolist() == [0.5, 1.0, 0.5]


# ---- sizes and plans ------------------------------------------------------------------------------

def _spec(preset: str, layers: int | None = None) -> ModelSpec:
    cfg = get_preset(preset).config
    if layers:
        cfg["num_hidden_layers"] = layers
    return ModelSpec.from_hf_config(cfg)


@pytest.mark.parametrize("preset", ["tiny-olmoe", "tiny-qwen3-moe", "tiny-deepseek-v2"])
def test_block_geometry_matches_the_kv_pool(preset: str) -> None:
    spec = _spec(preset)
    kv = KVPool(64 << 20).register("m", spec, 16, torch.bfloat16)
    stride, bundle = block_geometry(spec, 16, 2)
    assert bundle == kv.bundle_pages * (2 << 20)
    assert stride == bundle // kv.bundle_blocks >= kv.block_bytes
    attention, ffn = weight_bytes(spec, 2)
    assert attention > 0 and ffn > 0


def _plan(n_models: int = 2, memory_gb: float = 141.0, devices: tuple[str, ...] = ("cuda:0",)):
    models = [ModelInput(f"m{i}", _spec("olmoe-1b-7b"), ModelTraffic(0.5)) for i in range(n_models)]
    return make_plan(models, PlanSettings(trials=10, horizon_s=120), list(devices),
                     [int(memory_gb * GIB)] * len(devices))


def test_plan_json_round_trip(tmp_path: Path) -> None:
    plan = _plan()
    plan.save(tmp_path / "plan.json")
    back = load_plan(tmp_path / "plan.json")
    assert back == plan
    assert back.kv_pool_bytes % (2 << 20) == 0 and back.kv_pool_bytes >= back.demand_quantile_bytes
    assert back.per_model_kv_caps == {"m0": back.models[0].kv_cap_bytes, "m1": back.models[1].kv_cap_bytes}
    assert back.weights_pool_bytes == 2 * weight_bytes(_spec("olmoe-1b-7b"), 2)[1]
    assert back.demand_ci_bytes[0] <= back.demand_quantile_bytes <= back.demand_ci_bytes[1]
    assert "KV pool" in back.summary()
    bad = json.loads((tmp_path / "plan.json").read_text())
    del bad["kv_pool_bytes"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="kv_pool_bytes"):
        load_plan(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="crosspool plan"):
        load_plan(tmp_path / "none.json")


def test_fit_check() -> None:
    plan = _plan()
    plan.check_fits([141 * GIB])
    with pytest.raises(ValueError, match=r"cuda:0 needs .* FFN weights .* Lower the percentile"):
        plan.check_fits([8 * GIB])
    with pytest.raises(ValueError, match="1 device"):
        plan.check_fits([141 * GIB, 141 * GIB])


def test_devices_split_between_the_pools() -> None:
    assert assign_devices(["cuda:0"], [GIB], 1, 1, 1, 0.1) == (["cuda:0"], ["cuda:0"])
    # big FFN, small KV: one KV device, three weights devices
    assert assign_devices([f"cuda:{i}" for i in range(4)], [80 * GIB] * 4, 10 * GIB, 2 * GIB, 150 * GIB, 0.1) == (
        ["cuda:0"], ["cuda:1", "cuda:2", "cuda:3"])
    plan = _plan(devices=("cuda:0", "cuda:1"))
    assert plan.kv_devices == ["cuda:0"] and plan.weights_devices == ["cuda:1"]
    assert len(plan.device_needs()) == 2


# ---- the command line -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pair(tiny_models) -> list[str]:  # noqa: ANN001
    return [f"o={tiny_models('tiny-olmoe')}", f"d={tiny_models('tiny-deepseek-v2')}"]


def _cli(tmp_path: Path, models: list[str], *extra: str) -> int:
    argv = ["plan", "--trials", "10", "--horizon-s", "60", "--device-memory-gb", "1", "--quiet",
            "--out", str(tmp_path / "plan.json")]
    for m in models:
        argv += ["--model", m]
    return plan_main(argv + list(extra))


def test_cli_end_to_end(tmp_path: Path, tiny_pair: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(tmp_path, tiny_pair, "--rate", "o=2", "--rate", "d=1", "--workload", "sharegpt",
                "--burstiness", "0.5", "--burst-factor", "3", "--decode-tps", "o=80") == 0
    out = capsys.readouterr().out
    assert "P99" in out and "wrote" in out
    plan = load_plan(tmp_path / "plan.json")
    assert [m.name for m in plan.models] == ["o", "d"] and plan.models[0].decode_tps == 80
    assert plan.models[1].kv_bytes_per_token == 3 * 40 * 2          # MLA: layers x (latent + rope) x bf16
    assert (tmp_path / "plan.png").stat().st_size > 1000
    # a trace file: rates and lengths come from it
    reqs = Requests(["o", "d"], np.array([0, 1] * 50), np.arange(100) * 0.5, np.full(100, 64), np.full(100, 8))
    write_trace(reqs, tmp_path / "trace.jsonl")
    assert _cli(tmp_path, tiny_pair, "--workload", str(tmp_path / "trace.jsonl")) == 0
    assert load_plan(tmp_path / "plan.json").models[0].rate_rps == pytest.approx(1.0, rel=0.05)
    # holding times from a fitted engine step-time model
    step_time = "0,0.0015,3e-4,1e-6,0,0,5e-8"
    assert _cli(tmp_path, tiny_pair, "--rate", "o=2", "--rate", "d=1", "--step-time", step_time) == 0
    assert load_plan(tmp_path / "plan.json").step_time_s == [0, 0.0015, 3e-4, 1e-6, 0, 0, 5e-8]


@pytest.mark.parametrize("extra, message", [
    (["--rate", "o=1", "--rate", "x=1"], "unknown model 'x'"),
    (["--rate", "o=-1", "--rate", "d=1"], "must be a finite number >= 0"),
    (["--rate", "o=1"], "no --rate for model 'd'"),
    (["--rate", "o=1", "--rate", "d=1", "--workload", "/nonexistent/trace.jsonl"], "not found"),
    (["--rate", "o=1", "--rate", "d=1", "--percentile", "150"], r"percentile must be in \(0, 100\)"),
    (["--rate", "o=1", "--rate", "d=1", "--device-memory-gb", "0.0001"], "does not fit"),
    (["--rate", "o=1", "--rate", "d=1", "--step-time", "0.1,0.2"], "needs 7 coefficients"),
])
def test_cli_bad_inputs(tmp_path: Path, tiny_pair: list[str], capsys: pytest.CaptureFixture[str],
                        extra: list[str], message: str) -> None:
    assert _cli(tmp_path, tiny_pair, *extra) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "plan.json").exists()


def test_serve_takes_its_pool_sizes_and_caps_from_a_plan(tmp_path: Path, tiny_pair: list[str]) -> None:
    import json

    from crosspool.config import EngineConfig
    from crosspool.engine.engine import Engine
    from crosspool.server.serve import apply_plan

    assert _cli(tmp_path, tiny_pair, "--devices", "cpu", "--rate", "o=2", "--rate", "d=1") == 0
    plan_file = tmp_path / "plan.json"
    plan = json.loads(plan_file.read_text())
    models, layout = apply_plan(str(plan_file), {}, {"device": "cpu"}, layout_given=False)
    assert set(models) == {"o", "d"} and layout["kv_cache_bytes"] == plan["kv_pool_bytes"]
    caps = {m["name"]: m["kv_cap_bytes"] for m in plan["models"]}
    assert layout["kv_caps_bytes"] == caps
    engine = Engine(models, EngineConfig(**layout))
    try:
        assert engine.kv_pool.total_pages * engine.kv_pool.page_bytes == plan["kv_pool_bytes"]
        for name, served in engine.models.items():
            assert served.blocks.num_blocks * served.blocks.kv.block_bytes <= caps[name]
    finally:
        engine.close()
    with pytest.raises(ValueError, match="no traffic model"):
        apply_plan(str(plan_file), {"other": models["o"]}, {"device": "cpu"}, layout_given=False)
    plan["kv_pool_bytes"] = 1 << 50                                     # a petabyte of KV: cannot fit
    plan_file.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="does not fit"):
        apply_plan(str(plan_file), {}, {"device": "cpu"}, layout_given=False)
