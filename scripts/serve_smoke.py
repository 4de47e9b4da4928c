"""Drive a running `crosspool serve` with the official openai client: every served model at once.

    python scripts/serve_smoke.py --base-url http://127.0.0.1:8000/v1 [--per-model 4] [--max-tokens 64]

For each model in /v1/models: `per-model` requests at once, half chat and half completions, half streamed
(with usage), greedy; plus one seeded sampled completion sent twice (its two outputs must be equal). Prints a
table per model (requests, failures, completion tokens, TTFT and mean time between tokens of the streamed
ones), checks /health and the crosspool: metrics, and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import urllib.request

from openai import AsyncOpenAI


async def one(client: AsyncOpenAI, model: str, i: int, max_tokens: int) -> dict:
    chat, stream = i % 2 == 0, i % 4 < 2
    args = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    if chat:
        messages = [{"role": "user", "content": f"Request {i}: say something about pools."}]
        if stream:
            async for chunk in await client.chat.completions.create(
                    messages=messages, stream=True, stream_options={"include_usage": True}, **args):
                if chunk.choices and chunk.choices[0].delta.content:
                    times.append(time.perf_counter())
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
        else:
            tokens = (await client.chat.completions.create(messages=messages, **args)).usage.completion_tokens
    else:
        prompt = f"Request {i}: the weights pool and the KV pool"
        if stream:
            async for chunk in await client.completions.create(
                    prompt=prompt, stream=True, stream_options={"include_usage": True}, **args):
                if chunk.choices and chunk.choices[0].text:
                    times.append(time.perf_counter())
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
        else:
            tokens = (await client.completions.create(prompt=prompt, **args)).usage.completion_tokens
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"tokens": tokens, "ttft_s": times[0] - t0 if times else None, "gaps": gaps}


async def seeded_twice(client: AsyncOpenAI, model: str, max_tokens: int) -> bool:
    args = {"model": model, "prompt": "Seeded:", "max_tokens": max_tokens, "temperature": 0.9, "seed": 7}
    a, b = await asyncio.gather(client.completions.create(**args), client.completions.create(**args))
    return a.choices[0].text == b.choices[0].text


async def main_async(args: argparse.Namespace) -> int:
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "none", timeout=600)
    models = [m.id for m in (await client.models.list()).data]
    print(f"models: {models}")
    jobs = {(m, i): one(client, m, i, args.max_tokens) for m in models for i in range(args.per_model)}
    t0 = time.perf_counter()
    results = await asyncio.gather(*jobs.values(), return_exceptions=True)
    wall = time.perf_counter() - t0
    seeded = await asyncio.gather(*(seeded_twice(client, m, 24) for m in models), return_exceptions=True)
    failures = 0
    print(f"{len(jobs)} requests over {len(models)} models in {wall:.1f} s")
    print("| model | requests | failed | completion tokens | TTFT p50 s | mean TBT ms | seeded repeat equal |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for k, m in enumerate(models):
        mine = [r for (mm, _), r in zip(jobs, results, strict=True) if mm == m]
        bad = [r for r in mine if isinstance(r, BaseException)]
        ok = [r for r in mine if not isinstance(r, BaseException)]
        failures += len(bad) + (seeded[k] is not True)
        for r in bad:
            print(f"  {m}: {r!r}", file=sys.stderr)
        ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
        gaps = [g for r in ok for g in r["gaps"]]
        print(f"| {m} | {len(mine)} | {len(bad)} | {sum(r['tokens'] for r in ok)} | "
              f"{statistics.median(ttft) if ttft else float('nan'):.3f} | "
              f"{statistics.mean(gaps) * 1e3 if gaps else float('nan'):.1f} | {seeded[k]} |")
    root = args.base_url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{root}/health") as r:
        print(f"/health: {r.status}")
    with urllib.request.urlopen(f"{root}/metrics") as r:
        metrics = r.read().decode()
    keys = ("kv_cache_usage_perc", "kv_bytes_mapped", "weights_pool", "generation_tokens_total")
    lines = [line for line in metrics.splitlines() if line.startswith("crosspool:") and any(k in line for k in keys)]
    print("\n".join(lines[: 4 * len(models) + 4]))
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None)
    p.add_argument("--per-model", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
