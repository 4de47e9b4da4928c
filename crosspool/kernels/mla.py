"""Absorbed MLA (DeepSeek): weight absorption and the torch reference of attention in latent space.

The cache holds, per token, the normed latent c [R] and the rotated shared key k_pe [Rd]. `kv_b_proj`
[H * (nope + v), R] expands c into per-head k_nope = W_UK[h] c and v = W_UV[h] c. Absorbing W_UK into the
query (q_latent[h] = q_nope[h] @ W_UK[h]) gives q_nope . k_nope = q_latent . c, and since the output is
linear in v, sum_j p_j v_j = W_UV[h] (sum_j p_j c_j). So attention runs over the latent directly (one KV
"head" shared by all H query heads, key dim R + Rd, value dim R) and W_UV is applied once per query token:
the cache is read once per step instead of being expanded to H heads.

`mla_absorbed_attention_ref` is the reference for `paged_attention.mla_decode_attention` and
`mla_prefill_attention`; pure torch (no triton needed).
"""

from __future__ import annotations

import torch

from crosspool.kernels import torch_ref as ref


def split_kv_b_proj(
    kv_b_proj: torch.Tensor, num_heads: int, nope_dim: int, v_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj [H * (nope + v), R] -> (W_UK [H, nope, R], W_UV [H, v, R]) as views."""
    w = kv_b_proj.view(num_heads, nope_dim + v_dim, kv_b_proj.shape[-1])
    return w[:, :nope_dim], w[:, nope_dim:]


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [T, H, nope] -> q_latent [T, H, R]."""
    return torch.einsum("thn,hnr->thr", q_nope, w_uk)


def latent_to_output(o_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """Latent-space attention output [T, H, R] -> per-head values [T, H, v]."""
    return torch.einsum("thr,hvr->thv", o_latent, w_uv)


def mla_absorbed_attention_ref(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor,
    q_seq: torch.Tensor, q_pos: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Causal attention of flat queries (latent q_latent [T, H, R] + rotated q_pe [T, H, Rd]) over the paged
    latent cache [blocks, block_size, 1, R + Rd]; q_seq / q_pos as in `torch_ref.padded_attention`.
    Returns the latent-space output [T, H, R]."""
    r = q_latent.shape[-1]
    ctx = ref.gather_kv(latent_cache, block_tables)            # [B, L, 1, R + Rd]
    queries = torch.cat([q_latent, q_pe], dim=-1)
    return ref.padded_attention(queries, ctx, ctx[..., :r], q_seq, q_pos, scale)
