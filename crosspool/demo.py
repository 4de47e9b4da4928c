"""`crosspool demo`: tiny models of three families, one mixed workload, per-model latency table."""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

from crosspool.config import EngineConfig
from crosspool.engine.engine import Engine
from crosspool.engine.llm import create_engine
from crosspool.engine.sampling import SamplingParams

DEMO_PRESETS = ("tiny-olmoe", "tiny-qwen3-moe", "tiny-deepseek-v3")
PROMPTS = (
    "The cold models wake up when",
    "Explain paged attention in one sentence:",
    "A mixture of experts routes each token to",
    "Write a haiku about GPU memory.",
    "List three reasons to share a KV cache:",
    "Once upon a time, a tiny model",
)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def ensure_models(models_dir: Path) -> dict[str, str]:
    from crosspool.models.make_model import make_model

    out = {}
    for preset in DEMO_PRESETS:
        d = models_dir / preset
        if not (d / "config.json").is_file():
            print(f"building {preset} in {d}")
            make_model(preset, d, seed=1, progress=False)
        out[preset] = str(d)
    return out


def run_demo(models_dir: Path, layout: dict[str, object], num_requests: int, max_tokens: int, seed: int) -> int:
    models = ensure_models(models_dir)
    engine = create_engine(models, EngineConfig(**layout))
    try:
        return _serve(engine, models, num_requests, max_tokens, seed)
    finally:
        engine.close()


def _serve(engine: Engine, models: dict[str, str], num_requests: int, max_tokens: int, seed: int) -> int:
    cfg = engine.config
    where = f"KV on {list(cfg.kv_devices) or [cfg.device]}" + (
        f", weights on {list(cfg.weights_devices)}" if cfg.weights_ranks else "")
    print(f"serving {list(models)} on {where} ({cfg.dtype}); KV pool {engine.kv_pool.total_pages} pages "
          f"of {engine.kv_pool.page_bytes >> 20} MiB")
    rng = random.Random(seed)
    names = list(models)
    # warm-up so the first request's TTFT does not include one-time initialisation
    for name in names:
        engine.add_request(name, "warm up", SamplingParams(max_tokens=2))
    while engine.has_unfinished():
        engine.step()
    pending = []
    for i in range(num_requests):
        chat = rng.random() < 0.5
        name = names[i % len(names)]
        prompt = rng.choice(PROMPTS)
        if chat:
            tok = engine.models[name].tokenizer
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        params = SamplingParams(max_tokens=rng.randint(max_tokens // 2, max_tokens), temperature=0.8,
                                top_p=0.95, seed=seed + i, ignore_eos=True)
        pending.append((rng.random() * 0.2, name, prompt, params))   # arrivals spread over 0.2 s
    pending.sort(key=lambda p: p[0])
    start = time.perf_counter()
    finished = []
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            _, name, prompt, params = pending.pop(0)
            engine.add_request(name, prompt, params)
        finished += [o for o in engine.step() if o.finished]
        if not engine.has_unfinished() and pending:
            time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))
    wall = time.perf_counter() - start
    for o in sorted(finished, key=lambda o: o.request_id):
        print(f"[{o.model}] {o.request_id}: {o.text[:70]!r}")
    print(f"\n{len(finished)} requests in {wall:.2f} s")
    header = ("model", "reqs", "tokens", "TTFT p50 ms", "TTFT p99 ms", "TBT p50 ms", "TBT p99 ms")
    print(f"{header[0]:<20}{header[1]:>5}{header[2]:>8}{header[3]:>13}{header[4]:>13}{header[5]:>12}{header[6]:>12}")
    for name in names:
        outs = [o for o in finished if o.model == name]
        ttft = [o.ttft_s * 1e3 for o in outs if o.ttft_s is not None]
        tbt = [t * 1e3 for o in outs for t in o.tbt_s]
        toks = sum(len(o.token_ids) for o in outs)
        print(f"{name:<20}{len(outs):>5}{toks:>8}{_pct(ttft, .5):>13.1f}{_pct(ttft, .99):>13.1f}"
              f"{_pct(tbt, .5):>12.2f}{_pct(tbt, .99):>12.2f}")
    mean_tbt = statistics.mean(t for o in finished for t in o.tbt_s) * 1e3 if finished else float("nan")
    print(f"mean TBT over all models: {mean_tbt:.2f} ms")
    for name, kv in engine.kv_pool.models.items():
        print(f"KV {name}: high-water {kv.stats().high_water_bytes / 2**20:.0f} MiB mapped")
    return 0
