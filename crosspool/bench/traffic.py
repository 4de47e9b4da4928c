"""Bytes a decode step must touch: the physical floor a decode step is measured against.

One decode step of B sequences reads, at the least: every attention-side weight (all layers' attention
projections and norms, the final norm, the whole lm_head; only B rows of the embedding), every FFN-side
weight that is not an expert (routers, shared experts, dense layers), the experts the batch actually routed
to in each layer (counted on the device: `FFNSide.expert_hits`), and each sequence's cached K/V (or MLA
latent) once. Activations, the new tokens' KV writes and the logits are a few MB and left out, so the floor
is a lower bound and the fraction of copy bandwidth it gives is conservative.
"""

from __future__ import annotations

import torch

from crosspool.models.attention_side import AttentionSide
from crosspool.models.ffn_side import FFNSide


def _bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes the tensors span, overlapping views of one weight counted once (each tensor is taken as
    the contiguous range from its first to its last element)."""
    ranges = sorted((t.data_ptr(), t.data_ptr() + _span(t)) for t in tensors if t.numel())
    total, end = 0, -1
    for lo, hi in ranges:
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def _span(t: torch.Tensor) -> int:
    return (sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()


def attention_bytes(attention: AttentionSide, batch: int) -> int:
    w = attention.w
    tensors = [t for layer in w.layers for t in layer.values()] + [w.final_norm, w.lm_head]
    tied = w.lm_head.untyped_storage().data_ptr() == w.embed.untyped_storage().data_ptr()
    rows = 0 if tied else batch * w.embed.shape[1] * w.embed.element_size()
    return _bytes(tensors) + rows


def ffn_bytes(ffn: FFNSide, experts_per_layer: list[float]) -> float:
    """Non-expert FFN weights + experts_per_layer[l] experts of layer l (MoE layers; ignored for dense)."""
    total = 0.0
    for layer, w in enumerate(ffn.w.layers):
        if "experts_gate_up" not in w:
            total += _bytes(list(w.values()))
            continue
        gu, down = w["experts_gate_up"], w["experts_down"]
        one_expert = (gu[0].numel() * gu.element_size()) + (down[0].numel() * down.element_size())
        total += _bytes([t for k, t in w.items() if not k.startswith("experts_")])
        total += experts_per_layer[layer] * one_expert
    return total


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on CPU): benchmarks time whole steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float = 2.0, repeats: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting read + write (the ceiling FACTS.md measured)."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / seconds
