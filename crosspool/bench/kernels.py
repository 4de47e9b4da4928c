"""The Triton kernels alone on the GPU: paged decode attention over long contexts, fused MoE over token
counts and the decode GEMV against torch's linear, each against the floor it is bound by.

    python -m crosspool.bench.kernels [--only attention splits moe moe_ffn gemv] [--json FILE]

- Paged decode attention (Qwen3-30B-A3B heads: 32 query, 4 KV, dim 128), contexts 4k..128k, batch 1 and 8:
  time and the KV bytes read over the copy bandwidth measured in the same run.
- Batch-1 decode attention against its split count (OLMoE and Qwen3 heads, 1k-32k context).
- Fused MoE at 1..64 tokens (both paths: GEMV and grouped GEMM): bytes of the experts the tokens route to
  over the copy bandwidth; at 4,096 tokens: TFLOP/s against torch's bf16 GEMM rate measured in the same run.
- A whole MoE FFN at 1 and 8 tokens (router GEMV, routing, gate/up, down: the four kernels the engine runs),
  bytes of the router and the routed experts over the copy bandwidth.
- Dense projections at 1, 4, 8 tokens (OLMoE and Qwen3-30B-A3B: fused QKV, o_proj, lm_head): torch's linear
  (cuBLAS) and `gemv` (its default split-K, and no split where that differs), bytes of the weights and
  activations over the copy bandwidth. The calls cycle through copies of the weight totalling >= 256 MB, so
  each reads it from HBM as in a decode step (one 8 MB o_proj would otherwise stay in the 50 MB L2).
Times are per call, from CUDA graphs of 20 calls (the kernels as the engine runs them, no launch overhead).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
from pathlib import Path

import torch

from crosspool.bench import provenance
from crosspool.bench.traffic import copy_bandwidth
from crosspool.kernels._common import cdiv
from crosspool.kernels.fused_moe import fused_moe
from crosspool.kernels.gemv import default_split_k, gemv
from crosspool.kernels.paged_attention import (
    DECODE_BLOCK_N,
    MAX_SPLITS,
    SplitPlan,
    default_split_plan,
    paged_decode_attention,
    two_wave_splits,
)

MOE_SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "olmoe-1b-7b": (64, 8, 2048, 1024)}
# dense projections (out N, in K): fused QKV, o_proj, lm_head, MoE router
LINEAR_SHAPES = {
    "olmoe-1b-7b": {"qkv": (6144, 2048), "o_proj": (2048, 2048), "lm_head": (50304, 2048), "router": (64, 2048)},
    "qwen3-30b-a3b": {"qkv": ((32 + 4 + 4) * 128, 2048), "o_proj": (2048, 32 * 128), "lm_head": (151936, 2048),
                      "router": (128, 2048)},
}
COLD_WEIGHT_BYTES = 256 << 20      # weight copies cycled per timing: well past the H200's 50 MB L2


def _ms(fn, reps: int = 20) -> float:  # noqa: ANN001
    """Device milliseconds of one fn call, replayed from a CUDA graph of `reps` calls (host launch cost
    excluded, as in the engine): median over 7 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()                   # compile / autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):     # on the warm-up's stream
        for _ in range(reps):
            fn()
    graph.replay()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def attention_rows(copy_bw: float, device: torch.device) -> list[dict]:
    heads, kv_heads, dim, page = 32, 4, 128, 16
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for ctx in (4096, 16384, 32768, 65536, 131072):
        for batch in (1, 8):
            blocks = batch * ctx // page
            k = torch.randn(blocks, page, kv_heads, dim, generator=g, device=device, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            tables = torch.randperm(blocks, generator=g, device=device).view(batch, -1)
            lens = torch.full((batch,), ctx, device=device)
            q = torch.randn(batch, heads, dim, generator=g, device=device, dtype=torch.bfloat16)
            ms = _ms(lambda q=q, k=k, v=v, t=tables, n=lens, c=ctx: paged_decode_attention(
                q, k, v, t, n, dim**-0.5, max_context_len=c))
            kv = 2 * k.numel() * k.element_size()
            rows.append({"context": ctx, "batch": batch, "us": ms * 1e3, "kv_bytes": kv,
                         "copy_bw_fraction": kv / (ms / 1e3) / copy_bw})
            del k, v
    return rows


def split_rows(copy_bw: float, device: torch.device, batches: tuple[int, ...] = (1,),
               contexts: tuple[int, ...] = (1024, 4096, 32768)) -> list[dict]:
    """Decode attention against its split count, for OLMoE's heads (16 query = 16 KV, MHA) and
    Qwen3-30B-A3B's (32 query, 4 KV): the default plan for the context (`default_split_plan`, "engine") and for
    the model's longest context, as a serving graph bucket holds it ("serving"), against fixed counts: the
    two-wave rule, half of it, finer splits, and about 512 keys per split."""
    rows = []
    g = torch.Generator(device=device).manual_seed(2)
    page = 16
    models = {"olmoe-1b-7b": (16, 16, 128, 4096), "qwen3-30b-a3b": (32, 4, 128, 40960)}
    for shape, (heads, kv_heads, dim, longest) in models.items():
        for batch in batches:
            for ctx in contexts:
                blocks = ctx // page
                k = torch.randn(batch * blocks, page, kv_heads, dim, generator=g, device=device,
                                dtype=torch.bfloat16)
                v = torch.randn_like(k)
                tables = torch.randperm(batch * blocks, generator=g, device=device).view(batch, -1)
                lens = torch.full((batch,), ctx, device=device)
                q = torch.randn(batch, heads, dim, generator=g, device=device, dtype=torch.bfloat16)
                wave = two_wave_splits(batch * kv_heads, device, ctx)
                kv = 2 * k.numel() * k.element_size()
                plans = {"engine": default_split_plan(batch * kv_heads, device, ctx),
                         "serving": default_split_plan(batch * kv_heads, device, max(longest, ctx))}
                for n in sorted({wave, max(1, wave // 2), min(cdiv(ctx, 512), MAX_SPLITS),
                                 *(min(wave * f, MAX_SPLITS, cdiv(ctx, 16)) for f in (2, 4, 8))}):
                    plans[str(n)] = SplitPlan.fixed(n)
                for name, plan in plans.items():
                    ms = _ms(lambda q=q, k=k, v=v, t=tables, n=lens, p=plan, d=dim: paged_decode_attention(
                        q, k, v, t, n, d**-0.5, num_splits=p))
                    used = plan.used(ctx, DECODE_BLOCK_N)
                    rows.append({"shape": shape, "batch": batch, "context": ctx, "plan": name, "splits": plan.splits,
                                 "used": used, "keys_per_split": plan.keys_per_split(ctx, DECODE_BLOCK_N),
                                 "us": ms * 1e3, "copy_bw_fraction": kv / (ms / 1e3) / copy_bw})
                del k, v
    return rows


def moe_rows(copy_bw: float, gemm_flops: float, device: torch.device) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    for name, (experts, top_k, hidden, inter) in MOE_SHAPES.items():
        wgu = torch.randn(experts, 2 * inter, hidden, generator=g, device=device, dtype=torch.bfloat16) / 45
        wd = torch.randn(experts, hidden, inter, generator=g, device=device, dtype=torch.bfloat16) / 28
        for t in (1, 2, 4, 8, 16, 32, 64, 4096):
            x = torch.randn(t, hidden, generator=g, device=device, dtype=torch.bfloat16)
            logits = torch.randn(t, experts, generator=g, device=device)
            weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
            used = ids.unique().numel()
            weight_bytes = used * (wgu[0].numel() + wd[0].numel()) * 2
            flops = 2 * t * top_k * 3 * hidden * inter
            for small in ((True, False) if t <= 64 else (False,)):
                ms = _ms(lambda x=x, w=weights, i=ids, s=small, gu=wgu, d=wd: fused_moe(x, gu, d, w, i, small=s))
                rows.append({"shape": name, "tokens": t, "path": "gemv" if small else "grouped", "us": ms * 1e3,
                             "experts_used": used, "copy_bw_fraction": weight_bytes / (ms / 1e3) / copy_bw,
                             "tflops": flops / (ms / 1e3) / 1e12, "gemm_fraction": flops / (ms / 1e3) / gemm_flops})
    return rows


def moe_ffn_rows(copy_bw: float, device: torch.device, shapes: list[str] | None = None,
                 tokens: tuple[int, ...] = (1, 8)) -> list[dict]:
    """A decode step's whole MoE FFN as the engine runs it: the router GEMV and routing (`route_linear`), then the
    expert GEMVs (`fused_moe`), at each token count (in that order: autotuned kernels tune at the first count that
    runs them); bytes of the router and the routed experts."""
    from crosspool.kernels.routing import route_linear
    from crosspool.models.spec import RoutingSpec

    rows = []
    g = torch.Generator(device=device).manual_seed(2)
    for name, (experts, top_k, hidden, inter) in MOE_SHAPES.items():
        if shapes and name not in shapes:
            continue
        wgu = torch.randn(experts, 2 * inter, hidden, generator=g, device=device, dtype=torch.bfloat16) / 45
        wd = torch.randn(experts, hidden, inter, generator=g, device=device, dtype=torch.bfloat16) / 28
        router = torch.randn(experts, hidden, generator=g, device=device, dtype=torch.bfloat16) / 45
        routing = RoutingSpec(num_experts=experts, top_k=top_k, scoring="softmax", norm_topk_prob=True,
                              topk_method="greedy")
        for t in tokens:
            x = torch.randn(t, hidden, generator=g, device=device, dtype=torch.bfloat16)
            _, ids = route_linear(x, router, routing)
            used = ids.unique().numel()
            bytes_read = (used * (wgu[0].numel() + wd[0].numel()) + router.numel()) * 2
            ms = _ms(lambda x=x, wgu=wgu, wd=wd, router=router, routing=routing: fused_moe(
                x, wgu, wd, *route_linear(x, router, routing), small=True, reduce=False))
            rows.append({"shape": name, "tokens": t, "us": ms * 1e3, "experts_used": used,
                         "copy_bw_fraction": bytes_read / (ms / 1e3) / copy_bw})
    return rows


def gemv_rows(copy_bw: float, device: torch.device, shapes: list[str] | None = None,
              tokens: tuple[int, ...] = (1, 4, 8)) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(2)
    for name, layers in LINEAR_SHAPES.items():
        if shapes and name not in shapes:
            continue
        for layer, (n, k) in layers.items():
            copies = min(20, cdiv(COLD_WEIGHT_BYTES, n * k * 2))
            ws = [torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
            split = default_split_k(n, k, device)
            for t in tokens:
                x = torch.randn(t, k, generator=g, device=device, dtype=torch.bfloat16)
                nbytes = (n * k + t * (k + n)) * 2
                paths = [("torch", None), ("gemv", split)] + ([("gemv", 1)] if split != 1 else [])
                for path, s in paths:
                    cycle = itertools.cycle(ws)
                    if path == "torch":
                        ms = _ms(lambda x=x, c=cycle: torch.nn.functional.linear(x, next(c)))
                    else:
                        ms = _ms(lambda x=x, c=cycle, s=s: gemv(x, next(c), split_k=s))
                    rows.append({"shape": name, "layer": layer, "n": n, "k": k, "tokens": t, "path": path,
                                 "split_k": s, "us": ms * 1e3, "bytes": nbytes,
                                 "copy_bw_fraction": nbytes / (ms / 1e3) / copy_bw})
            del ws
    return rows


def gemm_rate(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / (_ms(lambda: a @ b, reps=5) / 1e3)


SECTIONS = ("attention", "splits", "moe", "moe_ffn", "gemv")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run (default all)")
    p.add_argument("--json", default=None)
    p.add_argument("--shape", nargs="+", default=None, choices=sorted({*LINEAR_SHAPES, *MOE_SHAPES}),
                   help="only these models' shapes in the gemv and moe_ffn sections (default all)")
    p.add_argument("--batches", default="1", help="batch sizes of the splits section (default 1)")
    p.add_argument("--contexts", default="1024,4096,32768", help="contexts of the splits section")
    p.add_argument("--tokens", default="1,4,8",
                   help="token counts of the gemv and moe_ffn sections, in order (default 1,4,8)")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    copy_bw = copy_bandwidth(device)
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    results: dict = {"copy_bandwidth": copy_bw}
    if "attention" in args.only:
        attn = results["attention"] = attention_rows(copy_bw, device)
        print("| context | batch | decode attention us | frac of copy bw |\n|---:|---:|---:|---:|")
        for r in attn:
            print(f"| {r['context']} | {r['batch']} | {r['us']:.1f} | {r['copy_bw_fraction']:.2f} |")
    if "splits" in args.only:
        sp = results["splits"] = split_rows(copy_bw, device, tuple(int(b) for b in args.batches.split(",")),
                                            tuple(int(c) for c in args.contexts.split(",")))
        print("| heads | batch | context | plan | splits (used) | keys / split | us | frac of copy bw |")
        print("|---|---:|---:|---|---:|---:|---:|---:|")
        for r in sp:
            print(f"| {r['shape']} | {r['batch']} | {r['context']} | {r['plan']} | {r['splits']} ({r['used']}) | "
                  f"{r['keys_per_split']} | {r['us']:.1f} | {r['copy_bw_fraction']:.2f} |")
    if "moe" in args.only:
        gemm = results["gemm_flops"] = gemm_rate(device)
        print(f"bf16 GEMM (8192^3) {gemm / 1e12:.0f} TFLOP/s")
        moe = results["moe"] = moe_rows(copy_bw, gemm, device)
        print("| shape | tokens | path | us | experts | frac of copy bw | TFLOP/s | frac of GEMM rate |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        for r in moe:
            print(f"| {r['shape']} | {r['tokens']} | {r['path']} | {r['us']:.1f} | {r['experts_used']} | "
                  f"{r['copy_bw_fraction']:.2f} | {r['tflops']:.1f} | {r['gemm_fraction']:.2f} |")
    tokens = tuple(int(t) for t in args.tokens.split(","))
    if "moe_ffn" in args.only:
        ffn = results["moe_ffn"] = moe_ffn_rows(copy_bw, device, args.shape, tokens)
        print("| shape | tokens | MoE FFN us | experts | frac of copy bw |\n|---|---:|---:|---:|---:|")
        for r in ffn:
            print(f"| {r['shape']} | {r['tokens']} | {r['us']:.1f} | {r['experts_used']} | "
                  f"{r['copy_bw_fraction']:.2f} |")
    if "gemv" in args.only:
        lin = results["gemv"] = gemv_rows(copy_bw, device, args.shape, tokens)
        print("| shape | layer | N x K | tokens | path | split-K | us | frac of copy bw |")
        print("|---|---|---|---:|---|---:|---:|---:|")
        for r in lin:
            print(f"| {r['shape']} | {r['layer']} | {r['n']} x {r['k']} | {r['tokens']} | {r['path']} | "
                  f"{r['split_k'] or '-'} | {r['us']:.1f} | {r['copy_bw_fraction']:.2f} |")
    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out = Path(args.json) if args.json else Path("bench/results") / f"kernels-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**provenance.stamp(), **results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
