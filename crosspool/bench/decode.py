"""Decode throughput of one model at fixed batch sizes: steady-state step time when every sequence of
the batch is decoding. Prints a markdown table row per batch size and writes JSON when asked.

    python -m crosspool.bench.decode --model DIR --batch-sizes 1,16 --prompt-len 128 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from crosspool.config import EngineConfig
from crosspool.engine.engine import Engine
from crosspool.engine.sampling import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_batch(engine: Engine, name: str, batch: int, prompt_len: int, output_len: int) -> dict:
    vocab = engine.models[name].model.spec.vocab_size
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(name, torch.randint(0, vocab - 10, (prompt_len,), generator=gen).tolist(), params)
    step_s: list[float] = []
    while engine.has_unfinished():
        running = engine.models[name].scheduler
        decoding = (not running.waiting and len(running.running) == batch
                    and all(s.num_computed == s.num_tokens - 1 for s in running.running))
        _sync(engine.device)
        t0 = time.perf_counter()
        engine.step()
        _sync(engine.device)
        if decoding:
            step_s.append(time.perf_counter() - t0)
    steady = step_s[2:] if len(step_s) > 4 else step_s   # skip the first steps (allocator warm-up)
    mean = statistics.mean(steady)
    return {"batch": batch, "steps": len(steady), "step_ms_mean": mean * 1e3,
            "step_ms_p50": statistics.median(steady) * 1e3, "tokens_per_s": batch / mean}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kv-cache-gb", type=float, default=None)
    p.add_argument("--json", default=None, help="write results to this file")
    p.add_argument("--kernels", choices=["torch", "triton"], default="torch")
    args = p.parse_args(argv)
    kv_bytes = int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None
    engine = Engine({"m": args.model}, EngineConfig(device=args.device, kv_cache_bytes=kv_bytes,
                                                    kernels=args.kernels))
    bench_batch(engine, "m", 1, 16, 4)   # warm-up
    rows = [bench_batch(engine, "m", int(b), args.prompt_len, args.output_len) for b in args.batch_sizes.split(",")]
    print("| batch | decode step ms (mean) | p50 | tokens/s |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['step_ms_mean']:.2f} | {r['step_ms_p50']:.2f} | {r['tokens_per_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": args.device, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
