"""The decode graph's first kernel: each row's input id, its embedding row and its RoPE tables, in one launch.

A decode step's row takes the id staged from the host, or under async decode the token the previous replay
sampled in another row (`src_rows[b] >= 0`: `tokens[src_rows[b]]`, which the host has not read yet). Then come
the id's embedding row and the cos/sin of the row's position. In torch that is ten small kernels (compare,
clamp, index and where for the id, the embedding gather, the outer product with the inverse frequencies, cos,
sin and their two scalings), each a launch on a batch-1 step's critical path. Here one program per row does all
of it. The embedding rows are copied bit for bit; cos/sin are fp32 as `torch_ref.rope_cos_sin` computes them.
Reference: `embed_rope_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from crosspool.kernels import pdl
from crosspool.kernels import torch_ref as ref
from crosspool.kernels._common import next_pow2
from crosspool.kernels.pdl import enter as pdl_enter

BLOCK_HIDDEN = 1024


@triton.jit
def _embed_rope_kernel(
    ids_ptr, src_ptr, tokens_ptr, positions_ptr, embed_ptr, inv_freq_ptr, out_ptr, cos_ptr, sin_ptr,
    hidden, half, scale, stride_e, stride_o, stride_c, stride_s,
    BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Row b: id = tokens[src[b]] if src[b] >= 0 else ids[b]; out[b] = embed[id]; cos/sin[b] = cos/sin(position
    * inv_freq) * scale."""
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    src = tl.load(src_ptr + row)
    fed = tl.load(tokens_ptr + tl.maximum(src, 0))
    token = tl.where(src >= 0, fed, tl.load(ids_ptr + row)).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    for start in range(0, hidden, BLOCK_H):
        ok = start + offs < hidden
        x = tl.load(embed_ptr + token * stride_e + start + offs, mask=ok)
        tl.store(out_ptr + row * stride_o + start + offs, x, mask=ok)
    f = tl.arange(0, BLOCK_F)
    f_ok = f < half
    angle = tl.load(positions_ptr + row).to(tl.float32) * tl.load(inv_freq_ptr + f, mask=f_ok, other=0.0)
    tl.store(cos_ptr + row * stride_c + f, tl.cos(angle) * scale, mask=f_ok)
    tl.store(sin_ptr + row * stride_s + f, tl.sin(angle) * scale, mask=f_ok)


def embed_rope(ids: torch.Tensor, src_rows: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
               embed: torch.Tensor, inv_freq: torch.Tensor, scale: float, *, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """ids, src_rows, positions [B] int64 (contiguous); tokens [>= max src_rows + 1] int64; embed [V, H];
    inv_freq [D/2] fp32. Returns (embedding rows [B, H] in embed's dtype, (cos, sin) [B, D/2] fp32), the tables
    written into `cos` / `sin` when given (rows of at least D/2, last dim contiguous)."""
    b, (_, h), half = ids.shape[0], embed.shape, inv_freq.shape[0]
    assert src_rows.shape == positions.shape == (b,) and embed.stride(-1) == 1 and inv_freq.is_contiguous()
    assert ids.is_contiguous() and src_rows.is_contiguous() and positions.is_contiguous()
    out = torch.empty(b, h, dtype=embed.dtype, device=embed.device)
    cos = torch.empty(b, half, dtype=torch.float32, device=embed.device) if cos is None else cos[:b, :half]
    sin = torch.empty(b, half, dtype=torch.float32, device=embed.device) if sin is None else sin[:b, :half]
    assert cos.dtype == sin.dtype == torch.float32 and cos.stride(-1) == sin.stride(-1) == 1
    if b:
        _embed_rope_kernel[(b,)](
            ids, src_rows, tokens, positions, embed, inv_freq, out, cos, sin,
            h, half, scale, embed.stride(0), out.stride(0), cos.stride(0), sin.stride(0),
            BLOCK_H=min(BLOCK_HIDDEN, next_pow2(h)), BLOCK_F=next_pow2(half), **pdl.options(embed.device),
        )
    return out, (cos, sin)


def embed_rope_ref(ids: torch.Tensor, src_rows: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                   embed: torch.Tensor, inv_freq: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`embed_rope` in torch: the ids fed from `tokens`, the embedding gather, the RoPE tables."""
    return embed[ref.feed_ids(ids, src_rows, tokens)], ref.cos_sin(positions, inv_freq, scale)
