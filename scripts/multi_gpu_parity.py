"""Multi-GPU layout parity (issue 8's first check): the same requests on one GPU and on a KV GPU + a
weights GPU (NCCL) give the same tokens. Usage: python3 scripts/multi_gpu_parity.py [--kv cuda:0]
[--weights cuda:1]. Needs >= 2 GPUs; keeps NVLink multicast off (NCCL_NVLS_ENABLE=0)."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

from crosspool import LLM, EngineConfig, SamplingParams  # noqa: E402
from crosspool.config import layout_settings  # noqa: E402
from crosspool.models.make_model import make_model  # noqa: E402
from crosspool.pools.world import dump_stacks_later  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kv", default="cuda:0")
    p.add_argument("--weights", default="cuda:1")
    p.add_argument("--no-graphs", action="store_true", help="eager steps on every rank (no CUDA graphs)")
    p.add_argument("--pipeline", action="store_true",
                   help="the split layout with the pipeline on (with one KV rank: passes in lanes, at once)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma separated: float32, bfloat16")
    a = p.parse_args()
    dump_stacks_later()     # CROSSPOOL_DUMP_STACKS_S=N: every rank prints its stacks after N s (hang hunting)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    graphs = {"cuda_graphs": False} if a.no_graphs else {}
    root = tempfile.mkdtemp()
    models = {n: str(make_model(n, f"{root}/{n}", seed=1, progress=False))
              for n in ("tiny-olmoe", "tiny-qwen3-moe", "tiny-deepseek-v3")}
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (int(n),), generator=gen).tolist() for n in torch.randint(5, 60, (12,))]
    names = [list(models)[i % 3] for i in range(12)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for dtype in (getattr(torch, name) for name in a.dtypes.split(",")):
        with LLM(models, EngineConfig(device=a.kv, dtype=dtype, **graphs)) as single:
            log(f"{dtype}: one device loaded")
            ref = [o.token_ids for o in single.generate(prompts, params, model=names)]
        log(f"{dtype}: one device done")
        t = time.perf_counter()
        cfg = EngineConfig(dtype=dtype, pipeline=a.pipeline, **graphs, **layout_settings(a.kv, a.weights))
        with LLM(models, cfg) as split:
            log(f"{dtype}: split layout loaded")
            out = [o.token_ids for o in split.generate(prompts, params, model=names)]
            same = sum(x == y for x, y in zip(out, ref, strict=True))
            print(f"{dtype}: KV {a.kv} + weights {a.weights}: {same}/{len(ref)} requests identical to one GPU "
                  f"({time.perf_counter() - t:.1f} s)", flush=True)
        log(f"{dtype}: split layout closed")
        if dtype == torch.float32:
            assert same == len(ref)


if __name__ == "__main__":
    main()
