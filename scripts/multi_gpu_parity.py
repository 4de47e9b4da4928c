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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kv", default="cuda:0")
    p.add_argument("--weights", default="cuda:1")
    a = p.parse_args()
    root = tempfile.mkdtemp()
    models = {n: str(make_model(n, f"{root}/{n}", seed=1, progress=False))
              for n in ("tiny-olmoe", "tiny-qwen3-moe", "tiny-deepseek-v3")}
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (int(n),), generator=gen).tolist() for n in torch.randint(5, 60, (12,))]
    names = [list(models)[i % 3] for i in range(12)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for dtype in (torch.float32, torch.bfloat16):
        with LLM(models, EngineConfig(device=a.kv, dtype=dtype)) as single:
            ref = [o.token_ids for o in single.generate(prompts, params, model=names)]
        t = time.perf_counter()
        cfg = EngineConfig(dtype=dtype, **layout_settings(a.kv, a.weights))
        with LLM(models, cfg) as split:
            out = [o.token_ids for o in split.generate(prompts, params, model=names)]
        same = sum(x == y for x, y in zip(out, ref, strict=True))
        print(f"{dtype}: KV {a.kv} + weights {a.weights}: {same}/{len(ref)} requests identical to one GPU "
              f"({time.perf_counter() - t:.1f} s)")
        if dtype == torch.float32:
            assert same == len(ref)


if __name__ == "__main__":
    main()
