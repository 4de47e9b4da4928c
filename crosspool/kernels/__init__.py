"""Kernels: the torch reference ops and the Triton kernels that replace them.

`torch_ref` is the executable definition (and the path used without a GPU). Each Triton module states its
shapes and strides and is tested against the reference on random inputs (`tests/test_kernels.py`: CPU
through TRITON_INTERPRET=1 in fp32/fp16, `-m gpu` in bf16 on CUDA). Importing this package never imports
triton; the Triton modules do, so import them only where `triton_available()`.

Which kernel replaces which reference:

- `paged_attention.paged_decode_attention`: `gather_kv` + `padded_attention` for one token per sequence
  (split-KV for long contexts, GQA groups share K/V loads);
- `paged_attention.paged_prefill_attention`: `gather_kv` + `padded_attention` for a varlen batch (prefill,
  chunked prefill, decodes mixed in);
- `paged_attention.mla_decode_attention` / `mla_prefill_attention`: MLA's `gather_kv` + `kv_b_proj`
  expansion + `padded_attention`, in the absorbed form (reference: `mla.mla_absorbed_attention_ref`);
- `fused_moe.fused_moe`: `experts` (after `route`);
- `norm_rope.rms_norm`, `norm_rope.add_rms_norm`: `rms_norm` (and the residual add before it);
  `norm_rope.topk_add_rms_norm` also sums a fused MoE's expert rows (`fused_moe(..., reduce=False)`) first;
- `norm_rope.rope_write_kv`: `apply_rope` on q and k + `write_kv` of k and v.
- `gemv.gemv`: `linear` at decode sizes (<= 8 tokens; the attention side's QKV, o_proj and lm_head, behind
  `gemv.ENABLED`);
- `routing.route`: `route` for the greedy rules; `routing.route_linear`: `linear` + `route` for the MoE router
  at decode sizes (`gemv.ROUTER`), the GEMM's K-split partials summed in the routing kernel.

- `argmax.argmax`: `torch.argmax` over the vocabulary (the CUDA graphs' greedy tokens), in two short kernels.

`pdl` holds programmatic dependent launch for the decode kernels (on for sm_90+ unless `pdl.ENABLED = False`
or `CROSSPOOL_PDL=0`).

`mla` (pure torch) holds MLA weight absorption (`split_kv_b_proj`, `absorb_query`, `latent_to_output`).
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None
