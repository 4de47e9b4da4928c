"""How long does a kernel that only streams X MB take, as X grows? (issue 4: is the ~4 us a one-token GEMV of 25 MB
spends over bytes / copy bandwidth its own inefficiency, or the cost of any kernel of that size?)

Run on the GPU: `python3 scripts/stream_probe.py` prints, per size, the time of a pure-read kernel (each program
sums its chunk of a bf16 tensor and stores one fp32) in two shapes:
- one program per chunk (as the engine's GEMVs launch: a grid over the weight);
- persistent: a grid of SMs x 4 programs striding over the chunks;
each with and without PDL, replayed from a CUDA graph of calls on cycled copies (cold L2), plus the least-squares
fit time = fixed + bytes / rate over the sizes. `--ncu`: instead run, between cudaProfilerStart/Stop (for `ncu
--profile-from-start off`), the QKV-shaped GEMV (ours and cuBLAS), the expert gate/up GEMV at one token and the
25 MB read, once each after a warm-up. `--attention [--ncu]`: the same for OLMoE's batch-1 decode attention at
context 1k (the engine's fused RoPE kernel, the plain kernel, one split).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl

from crosspool.bench.traffic import copy_bandwidth
from crosspool.kernels import pdl
from crosspool.kernels._common import cdiv, num_sms
from crosspool.kernels.pdl import enter as pdl_enter

SIZES_MB = (2, 4, 8, 16, 25, 33, 67, 134, 268)
CHUNK = 8192                 # bf16 elements a program (or a persistent program's step) reads: 16 KB
PER_SM = 4


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, CHUNK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    offs = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(x, 0))


@triton.jit
def _read_persistent_kernel(x_ptr, out_ptr, n, CHUNK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    acc = tl.zeros([CHUNK], tl.float32)
    for start in tl.range(tl.program_id(0).to(tl.int64) * CHUNK, n, tl.num_programs(0) * CHUNK):
        offs = start + tl.arange(0, CHUNK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


def read(x: torch.Tensor, out: torch.Tensor, persistent: bool, use_pdl: bool) -> None:
    n = x.numel()
    launch = pdl.options(x.device) if use_pdl else {}
    if persistent:
        _read_persistent_kernel[(num_sms(x.device) * PER_SM,)](x, out, n, CHUNK=CHUNK, num_warps=8, **launch)
    else:
        _read_kernel[(cdiv(n, CHUNK),)](x, out, n, CHUNK=CHUNK, num_warps=8, **launch)


def graph_us(calls: list, reps: int = 7) -> float:    # noqa: ANN001
    """Microseconds per call of a CUDA graph of `calls` (one after another), median of `reps` replays."""
    for c in calls[:2]:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def sweep(dev: torch.device) -> None:
    copy_bw = copy_bandwidth(dev)
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    print("| MB | grid | PDL | us | frac of copy bw |\n|---:|---|---|---:|---:|")
    fits: dict[tuple[bool, bool], list[tuple[float, float]]] = {}
    for mb in SIZES_MB:
        n = mb * (1 << 20) // 2
        copies = max(2, min(24, cdiv(768, mb)))
        xs = [torch.randn(n, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        out = torch.empty(max(cdiv(n, CHUNK), num_sms(dev) * PER_SM), device=dev)
        for persistent in (False, True):
            for use_pdl in (False, True):
                us = graph_us([lambda x=x, o=out, p=persistent, u=use_pdl: read(x, o, p, u) for x in xs])
                fits.setdefault((persistent, use_pdl), []).append((n * 2, us))
                print(f"| {mb} | {'persistent' if persistent else 'one per chunk'} | {'on' if use_pdl else 'off'} | "
                      f"{us:.1f} | {n * 2 / (us * 1e-6) / copy_bw:.2f} |", flush=True)
        del xs
        torch.cuda.empty_cache()
    for (persistent, use_pdl), pts in fits.items():
        b = torch.tensor([p[0] for p in pts], dtype=torch.float64)
        t = torch.tensor([p[1] for p in pts], dtype=torch.float64)
        slope, fixed = torch.linalg.lstsq(torch.stack([b, torch.ones_like(b)], 1), t[:, None]).solution[:, 0].tolist()
        print(f"fit {'persistent' if persistent else 'one per chunk'}, PDL {'on' if use_pdl else 'off'}: "
              f"time = {fixed:.2f} us + bytes / {1e-6 / slope:.2f} TB/s")


def ncu_targets(dev: torch.device) -> None:
    from crosspool.kernels import fused_moe
    from crosspool.kernels.gemv import gemv

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(1, 2048, generator=g, device=dev, dtype=torch.bfloat16)
    w = torch.randn(6144, 2048, generator=g, device=dev, dtype=torch.bfloat16) / 45
    wgu = torch.randn(64, 2048, 2048, generator=g, device=dev, dtype=torch.bfloat16) / 45
    wd = torch.randn(64, 2048, 1024, generator=g, device=dev, dtype=torch.bfloat16) / 32
    ids = torch.randperm(64, generator=g, device=dev)[:8][None, :]
    weights = torch.full((1, 8), 0.125, device=dev)
    big = torch.randn(25 << 19, device=dev, dtype=torch.bfloat16)
    out = torch.empty(cdiv(big.numel(), CHUNK), device=dev)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    calls = [lambda: gemv(x, w), lambda: torch.nn.functional.linear(x, w),
             lambda: fused_moe.fused_moe(x, wgu, wd, weights, ids, small=True, reduce=False),
             lambda: read(big, out, False, False)]
    for c in calls:          # compile and autotune before the profiled range
        c()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for c in calls:
        flush.zero_()        # cold L2, as in a decode step
        c()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def attention_inputs(dev: torch.device, copies: int, ctx: int = 1024, heads: int = 16, dim: int = 128,
                     page: int = 16) -> tuple[list, dict]:
    """OLMoE's batch-1 decode attention at context `ctx` (16 heads, MHA, q/k norm over all heads): `copies` KV
    caches of the layer's size (cycled: cold L2), the rest shared."""
    g = torch.Generator(device=dev).manual_seed(1)
    blocks = ctx // page + 1
    caches = []
    for _ in range(copies):
        k = torch.randn(blocks, page, heads, dim, generator=g, device=dev, dtype=torch.bfloat16)
        caches.append((k, torch.randn_like(k)))
    q, k, v = (torch.randn(1, heads, dim, generator=g, device=dev, dtype=torch.bfloat16) for _ in range(3))
    angle = torch.rand(1, dim // 2, generator=g, device=dev) * 6.28
    norm = ("full", torch.rand(heads * dim, generator=g, device=dev, dtype=torch.bfloat16) + 0.5,
            torch.rand(heads * dim, generator=g, device=dev, dtype=torch.bfloat16) + 0.5, 1e-6)
    rest = dict(q=q, k=k, v=v, cos=angle.cos(), sin=angle.sin(), slots=torch.tensor([ctx - 1], device=dev),
                tables=torch.arange(blocks, device=dev)[None, :], lens=torch.tensor([ctx], device=dev),
                norm=norm, scale=dim**-0.5)
    return caches, rest


def attention_calls(dev: torch.device, copies: int) -> dict[str, list]:
    """Per variant, one call per cached copy: the engine's fused kernel (RoPE, q/k norm, KV write) + split
    combine at the engine's split count, the plain attention kernel + combine, and the fused kernel unsplit."""
    from crosspool.kernels.paged_attention import paged_decode_attention
    from crosspool.kernels.rope_decode import rope_decode_attention

    caches, a = attention_inputs(dev, copies)
    max_len = 1024 + 128         # `bench decode` at 1k: context + output tokens

    def fused(kc, vc, splits=None):     # noqa: ANN001, ANN202
        return lambda: rope_decode_attention(a["q"], a["k"], a["v"], a["cos"], a["sin"], a["slots"], kc, vc,
                                             a["tables"], a["lens"], a["scale"], False, a["norm"],
                                             num_splits=splits, max_context_len=max_len)

    def plain(kc, vc):                  # noqa: ANN001, ANN202
        return lambda: paged_decode_attention(a["q"], kc, vc, a["tables"], a["lens"], a["scale"],
                                              max_context_len=max_len)

    return {"fused (engine)": [fused(kc, vc) for kc, vc in caches],
            "plain + combine": [plain(kc, vc) for kc, vc in caches],
            "fused, 1 split": [fused(kc, vc, 1) for kc, vc in caches]}


def attention(dev: torch.device) -> None:
    """Graph-replayed times of `attention_calls` against the pure read of the same bytes."""
    calls = attention_calls(dev, copies=8)
    kv_bytes = 2 * 1024 * 16 * 128 * 2
    print(f"| attention variant (OLMoE, batch 1, ctx 1k: {kv_bytes / 1e6:.1f} MB of KV) | us |\n|---|---:|")
    for name, fns in calls.items():
        print(f"| {name} | {graph_us(fns):.1f} |", flush=True)


def ncu_attention(dev: torch.device) -> None:
    """The `attention_calls` variants once each (after a warm-up) between cudaProfilerStart/Stop, L2 flushed."""
    calls = attention_calls(dev, copies=1)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    for fns in calls.values():
        fns[0]()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for fns in calls.values():
        flush.zero_()
        fns[0]()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ncu", action="store_true", help="run the kernels to profile once each (see above)")
    p.add_argument("--attention", action="store_true",
                   help="OLMoE's batch-1 decode attention instead (graph times; with --ncu, once each to profile)")
    args = p.parse_args()
    dev = torch.device("cuda")
    if args.attention:
        (ncu_attention if args.ncu else attention)(dev)
    elif args.ncu:
        ncu_targets(dev)
    else:
        sweep(dev)


if __name__ == "__main__":
    main()
