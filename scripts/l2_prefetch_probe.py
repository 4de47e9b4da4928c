"""Does a layer's QKV weight, prefetched into L2, survive the experts streaming through and make the QKV GEMM
faster? (`crosspool.kernels.prefetch`; run on the GPU: `python3 scripts/l2_prefetch_probe.py`.)

OLMoE-1B-7B shapes at batch 1: QKV [6144, 2048] bf16 (25 MB), experts 8 of 64 (gate/up [2048, 2048], down
[2048, 1024]: 100 MB). Each variant is a CUDA graph replayed many times; the QKV GEMM's time in a variant is the
graph's time minus that of the same graph without the GEMM.

- cold: the experts stream (plain loads), then QKV;
- evict_first: the experts stream with evict_first loads, then QKV;
- prefetched: QKV prefetched into L2 (evict_last) first, the experts stream with evict_first, then QKV;
- hot: QKV right after QKV (all of it in L2): what the prefetch could reach at best.
"""

from __future__ import annotations

import torch

from crosspool.kernels import fused_moe, prefetch


def graph_ms(fn, replays: int = 200) -> float:    # noqa: ANN001
    for _ in range(3):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def main() -> None:
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(1, 2048, device=dev, dtype=bf16)
    qkv = torch.randn(6144, 2048, device=dev, dtype=bf16) * 0.02
    gate_up = torch.randn(64, 2048, 2048, device=dev, dtype=bf16) * 0.02
    down = torch.randn(64, 2048, 1024, device=dev, dtype=bf16) * 0.02
    ids = torch.arange(8, device=dev).view(1, 8) * 7
    weights = torch.full((1, 8), 0.125, device=dev)

    def experts(stream: bool) -> None:
        fused_moe.EVICT_FIRST = stream     # the GEMVs' expert weight loads marked evict_first in L2
        fused_moe.fused_moe(x, gate_up, down, weights, ids)

    def variant(stream: bool, pre: bool, gemm: bool) -> float:
        def fn() -> None:
            if pre:
                prefetch.prefetch_l2(qkv)
            experts(stream)
            if gemm:
                torch.nn.functional.linear(x, qkv)
        return graph_ms(fn)

    rows = {}
    for name, stream, pre in (("cold", False, False), ("evict_first", True, False), ("prefetched", True, True),
                              ("prefetched, plain expert loads", False, True)):
        rows[name] = (variant(stream, pre, True) - variant(stream, pre, False)) * 1000
    one = graph_ms(lambda: torch.nn.functional.linear(x, qkv))
    two = graph_ms(lambda: (torch.nn.functional.linear(x, qkv), torch.nn.functional.linear(x, qkv)))
    rows["hot (second of two back to back)"] = (two - one) * 1000
    rows["alone (graph of one GEMM, replayed)"] = one * 1000
    experts_us = variant(False, False, False) * 1000
    print(f"experts alone (100 MB): {experts_us:.1f} us = {100.7e6 / experts_us / 1e6:.2f} TB/s")
    print("| QKV 6144x2048 bf16 after the experts | us |")
    print("|---|---:|")
    for name, us in rows.items():
        print(f"| {name} | {us:.2f} |")


if __name__ == "__main__":
    main()
