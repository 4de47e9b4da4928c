"""Decode step time of one model with and without another model's KV growing at the same time.

Model A decodes a batch; meanwhile a thread grows and shrinks model B's KV range in the same pool (page
bundles mapped and unmapped through the driver). Reports A's decode step times in both cases and how
many page maps ran on A's own decode path (the scheduler's thread).

    python -m crosspool.bench.kv_growth --model DIR [--batch 16] [--steps 64] [--grow-gb 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from crosspool.bench.traffic import sync
from crosspool.config import EngineConfig
from crosspool.engine.engine import Engine
from crosspool.engine.sampling import SamplingParams


def _decode_steps(engine: Engine, batch: int, steps: int, maps: dict[str, int]) -> list[float]:
    """A's steady-state decode step times; `maps` counts page maps on this thread during them."""
    vocab = engine.models["a"].model.spec.vocab_size
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request("a", torch.randint(0, vocab - 10, (128,), generator=gen).tolist(), params)
    sched = engine.models["a"].scheduler
    times = []
    while engine.has_unfinished():
        decoding = not sched.waiting and all(s.num_computed == s.num_tokens - 1 for s in sched.running)
        sync(engine.device)
        t = time.perf_counter()
        engine.step()
        sync(engine.device)
        if decoding:
            times.append(time.perf_counter() - t)
            if len(times) == 2:
                maps["maps"] = 0          # count from the first measured step on
    return times[2:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--grow-gb", type=float, default=1.0)
    p.add_argument("--pool-gb", type=float, default=16.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--grow-mode", choices=["vmm", "bookkeeping"], default="vmm",
                   help="bookkeeping: B's growth runs the same Python but skips the driver calls")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    engine = Engine({"a": args.model, "b": args.model},
                    EngineConfig(device=args.device, kv_cache_bytes=int(args.pool_gb * 2**30),
                                 kv_background_maintenance=True))
    main_thread = threading.get_ident()
    on_decode_path = {"maps": 0}
    backend = engine.kv_pool.backend
    orig_map = backend.map

    orig_unmap = backend.unmap
    b_range = engine.kv_pool.models["b"].vrange
    skip_b = args.grow_mode == "bookkeeping"

    def counting_map(vrange, *a):   # noqa: ANN001, ANN002
        if threading.get_ident() == main_thread:
            on_decode_path["maps"] += 1
        if skip_b and vrange is b_range:
            return None
        return orig_map(vrange, *a)

    def maybe_unmap(vrange, *a):   # noqa: ANN001, ANN002
        if skip_b and vrange is b_range:
            return None
        return orig_unmap(vrange, *a)

    backend.map, backend.unmap = counting_map, maybe_unmap
    _decode_steps(engine, 2, 8, on_decode_path)                        # warm-up
    alone = _decode_steps(engine, args.batch, args.steps, on_decode_path)
    maps_alone = on_decode_path["maps"]

    b = engine.kv_pool.models["b"]
    n_blocks = int(args.grow_gb * 2**30) // b.block_bytes
    stop = threading.Event()
    cycles = {"n": 0, "grow_s": []}

    chunk = max(1, (64 << 20) // b.block_bytes)     # B grows like a long prefill: 64 MiB at a time

    def grow_b() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            held: list[int] = []
            while len(held) < n_blocks and not stop.is_set():
                held += b.alloc(min(chunk, n_blocks - len(held)))
                time.sleep(0.002)
            cycles["grow_s"].append(time.perf_counter() - t)
            b.free(held)
            b.shrink(keep_free_blocks=0)
            cycles["n"] += 1

    grower = threading.Thread(target=grow_b, daemon=True)
    grower.start()
    busy = _decode_steps(engine, args.batch, args.steps, on_decode_path)
    stop.set()
    grower.join()
    engine.close()
    res = {
        "batch": args.batch, "alone_ms_mean": statistics.mean(alone) * 1e3,
        "alone_ms_p99": sorted(alone)[int(0.99 * (len(alone) - 1))] * 1e3,
        "growing_ms_mean": statistics.mean(busy) * 1e3,
        "growing_ms_p99": sorted(busy)[int(0.99 * (len(busy) - 1))] * 1e3,
        "b_grow_cycles": cycles["n"], "b_grow_gb_s_median": statistics.median(cycles["grow_s"]),
        "maps_on_decode_path_alone": maps_alone, "maps_on_decode_path_growing": on_decode_path["maps"],
    }
    print(f"| model A decode (batch {args.batch}) | step ms mean | p99 | page maps on A's path |")
    print("|---|---:|---:|---:|")
    print(f"| alone | {res['alone_ms_mean']:.2f} | {res['alone_ms_p99']:.2f} | {maps_alone} |")
    print(f"| while B grows/shrinks by {args.grow_gb:g} GiB [{args.grow_mode}] ({cycles['n']} cycles, "
          f"{res['b_grow_gb_s_median'] * 1e3:.0f} ms per grow) | {res['growing_ms_mean']:.2f} | "
          f"{res['growing_ms_p99']:.2f} | {on_decode_path['maps']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
