"""KV pool mapping costs on the GPU: per-bundle map/unmap time and the time to grow one model by 1 GiB.

    python -m crosspool.bench.kv_pool [--pool-gb 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from crosspool.models.presets import get_preset
from crosspool.models.spec import ModelSpec
from crosspool.pools.kv_pool import PAGE_BYTES, KVPool


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool-gb", type=float, default=8.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from crosspool.pools.vmm import CudaPageBackend

    t0 = time.perf_counter()
    backend = CudaPageBackend(0)
    pool = KVPool(int(args.pool_gb * 2**30), backend)
    spec = ModelSpec.from_hf_config(get_preset("olmoe-1b-7b").config)     # 2 MiB blocks: one page a block
    kv = pool.register("olmoe", spec, 16, torch.bfloat16, reserve_bundles=0)
    reserve_s = time.perf_counter() - t0
    n = (1 << 30) // kv.block_bytes
    map_s, unmap_s = [], []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        blocks = kv.alloc(n)
        torch.cuda.synchronize()
        map_s.append(time.perf_counter() - t)
        kv.free(blocks)
        t = time.perf_counter()
        kv.shrink(keep_free_blocks=0)
        torch.cuda.synchronize()
        unmap_s.append(time.perf_counter() - t)
    bundles = n // kv.bundle_blocks
    res = {
        "pool_gb": args.pool_gb, "reserve_and_zero_map_s": reserve_s, "bundle_pages": kv.bundle_pages,
        "grow_1gib_s": statistics.median(map_s), "shrink_1gib_s": statistics.median(unmap_s),
        "map_us_per_page": statistics.median(map_s) / (bundles * kv.bundle_pages) * 1e6,
        "unmap_us_per_page": statistics.median(unmap_s) / (bundles * kv.bundle_pages) * 1e6,
    }
    pool.close()
    print("| measure | value |\n|---|---:|")
    print(f"| reserve {args.pool_gb:g} GiB range + map zero page everywhere | {reserve_s * 1e3:.0f} ms |")
    grow_ms = res["grow_1gib_s"] * 1e3
    print(f"| grow one model by 1 GiB ({bundles} bundles of {kv.bundle_pages} page) | {grow_ms:.1f} ms |")
    print(f"| shrink it by 1 GiB | {res['shrink_1gib_s'] * 1e3:.1f} ms |")
    print(f"| map, per 2 MiB page | {res['map_us_per_page']:.0f} us |")
    print(f"| unmap (+ zero-page remap), per 2 MiB page | {res['unmap_us_per_page']:.0f} us |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    assert PAGE_BYTES == kv.block_bytes
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
