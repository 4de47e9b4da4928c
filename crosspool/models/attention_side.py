"""Attention side of a model: everything the KV-cache pool holds and runs.

Embeddings, per-layer norms and attention (MHA/GQA with optional q/k norm, or DeepSeek MLA), the final
norm and lm_head. Attention reads and writes the model's paged KV cache. The residual stream lives here:
each layer returns the post-attention-normed hidden states the FFN side consumes.
"""

from __future__ import annotations

import torch

from crosspool.kernels import torch_ref as ref
from crosspool.models.batch import ForwardBatch, PagedCache, PendingNorm, TopKPartials, reduced
from crosspool.models.loader import AttentionWeights
from crosspool.models.spec import ModelSpec


class AttentionSide:
    def __init__(self, spec: ModelSpec, weights: AttentionWeights, kernels: str = "torch") -> None:
        """kernels: "torch" (the reference ops) or "triton" (`crosspool.kernels`: paged attention, RoPE +
        KV write, absorbed MLA, and the decode GEMV for the dense projections when `gemv.ENABLED`)."""
        if kernels not in ("torch", "triton"):
            raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
        self.spec = spec
        self.w = weights
        self.triton = kernels == "triton"
        self.inv_freq = ref.rope_inv_freq(spec.rope).to(weights.embed.device)
        if self.triton and spec.attention != "mla":
            # one [q + k + v, hidden] projection: one GEMM (one launch, one pass over x) instead of three
            for w in weights.layers:
                for suffix in ("weight", "bias"):
                    names = [f"{p}_proj" + ("" if suffix == "weight" else ".bias") for p in "qkv"]
                    if all(n in w for n in names):
                        w["qkv_proj" + ("" if suffix == "weight" else ".bias")] = torch.cat([w.pop(n) for n in names])
        if self.triton and spec.attention == "mla":
            from crosspool.kernels import mla

            # absorbed MLA: per layer W_UK [H, nope, R] and W_UV [H, v, R] (views of kv_b_proj)
            for w in weights.layers:
                w["w_uk"], w["w_uv"] = mla.split_kv_b_proj(w["kv_b_proj"], spec.num_heads, spec.qk_nope_head_dim,
                                                           spec.v_head_dim)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.w.embed[input_ids]

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ref.rope_cos_sin(self.spec.rope, positions, self.inv_freq)

    def embed_step(self, ids: torch.Tensor, src_rows: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                   cos: torch.Tensor | None = None, sin: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """A decode graph's input: the embedding rows of its ids, where row b's id is tokens[src_rows[b]] when
        src_rows[b] >= 0 (async decode: the token a previous replay sampled), and the RoPE tables of its
        positions (written into `cos` / `sin` when given). One kernel on the Triton path (`kernels.embed`)."""
        if self.triton:
            from crosspool.kernels.embed import embed_rope

            return embed_rope(ids, src_rows, tokens, positions, self.w.embed, self.inv_freq,
                              self.spec.rope.cos_sin_scale(), cos=cos, sin=sin)
        hidden = self.embed(ref.feed_ids(ids, src_rows, tokens))
        tables = self.rope_tables(positions)
        if cos is not None and sin is not None:
            n, half = tables[0].shape
            cos[:n, :half].copy_(tables[0])
            sin[:n, :half].copy_(tables[1])
            tables = (cos[:n, :half], sin[:n, :half])
        return hidden, tables

    def attention_block(
        self, layer: int, hidden: torch.Tensor, delta: torch.Tensor | TopKPartials | None, batch: ForwardBatch,
        cache: PagedCache, rope: tuple[torch.Tensor, torch.Tensor], defer_norm: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | PendingNorm]:
        """(hidden, the previous FFN's output or None) -> (h + attention(norm(h)), post-attention norm of
        that) for the FFN side, where h = hidden + delta. defer_norm: (h, the post-attention add + norm still to
        run, `PendingNorm`) instead; its `h` is the next layer's hidden once the FFN side has run it."""
        w = self.w.layers[layer]
        x, hidden = self._add_norm(delta, hidden, w["input_layernorm"])
        attend = self._mla if self.spec.attention == "mla" else self._mha
        out = attend(w, x, batch, cache.layer(layer), rope)
        if defer_norm:
            return hidden, PendingNorm(out, hidden, w["post_attention_layernorm"], self.spec.rms_norm_eps)
        x, hidden = self._add_norm(out, hidden, w["post_attention_layernorm"])
        return hidden, x

    def _add_norm(self, delta: torch.Tensor | TopKPartials | None, hidden: torch.Tensor, weight: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(hidden + delta), hidden + delta); the Triton path fuses the add into the norm (and, for an
        FFN output still in its expert rows, their top-k sum too)."""
        eps = self.spec.rms_norm_eps
        if self.triton:
            from crosspool.kernels import norm_rope

            if delta is None:
                return norm_rope.rms_norm(hidden, weight, eps), hidden
            if isinstance(delta, TopKPartials):
                return norm_rope.topk_add_rms_norm(delta, hidden, weight, eps)
            return norm_rope.add_rms_norm(delta, hidden, weight, eps)
        delta = reduced(delta)
        if delta is not None:
            hidden = hidden + delta
        return ref.rms_norm(hidden, weight, eps), hidden

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.triton:
            from crosspool.kernels import norm_rope

            return norm_rope.rms_norm(x, weight, self.spec.rms_norm_eps)
        return ref.rms_norm(x, weight, self.spec.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head on the rows given (fp32 logits)."""
        return self.head(self._norm(hidden, self.w.final_norm))

    def final_norm(self, delta: torch.Tensor | TopKPartials, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm of hidden + delta (the last FFN's output): on the Triton path one kernel, which also
        sums an FFN output still in its expert rows."""
        return self._add_norm(delta, hidden, self.w.final_norm)[0]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """lm_head on final-normed rows: fp32 logits."""
        return self._linear(x, self.w.lm_head).float()

    def greedy_tokens(self, logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The argmax token of each row of `logits` [B, vocab], on the device (the CUDA graphs' head), into
        `out` (int64 [B]) when given."""
        if self.triton:
            from crosspool.kernels.argmax import argmax

            return argmax(logits, out=out)
        return torch.argmax(logits, dim=-1, out=out) if out is not None else logits.argmax(dim=-1)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """The Triton path's dense projections (fused QKV, o_proj, lm_head): `gemv` at decode sizes
        (T <= MAX_GEMV_TOKENS) on CUDA when `crosspool.kernels.gemv.ENABLED` is set, else torch's linear."""
        if self.triton:
            from crosspool.kernels import gemv

            return gemv.linear(x, w, b)
        return ref.linear(x, w, b)

    # ---- MHA / GQA -----------------------------------------------------------------------------
    def _mha(self, w: dict[str, torch.Tensor], x: torch.Tensor, batch: ForwardBatch,
             cache: list[torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        s = self.spec
        t = x.shape[0]
        if "qkv_proj" in w:
            q, k, v = self._linear(x, w["qkv_proj"], w.get("qkv_proj.bias")).split(
                [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim], dim=-1)
        else:
            q = ref.linear(x, w["q_proj"], w.get("q_proj.bias"))
            k = ref.linear(x, w["k_proj"], w.get("k_proj.bias"))
            v = ref.linear(x, w["v_proj"], w.get("v_proj.bias"))
        # the Triton path folds q/k RMSNorm into its RoPE + KV-write kernel (unless clipping sits in between)
        fused_norm = self.triton and s.qk_norm != "none" and s.clip_qkv is None
        if s.qk_norm == "full" and not fused_norm:
            q, k = self._norm(q, w["q_norm"]), self._norm(k, w["k_norm"])
        if s.clip_qkv is not None:
            q, k, v = (z.clamp(-s.clip_qkv, s.clip_qkv) for z in (q, k, v))
        q = q.view(t, s.num_heads, s.head_dim)
        k = k.view(t, s.num_kv_heads, s.head_dim)
        v = v.view(t, s.num_kv_heads, s.head_dim)
        if s.qk_norm == "head" and not fused_norm:
            q, k = self._norm(q, w["q_norm"]), self._norm(k, w["k_norm"])
        if self.triton:
            qk_norm = (s.qk_norm, w["q_norm"], w["k_norm"], s.rms_norm_eps) if fused_norm else None
            out = _kernel_attention(q, k, v, batch, cache, rope, s.rope.interleaved, s.softmax_scale, qk_norm)
        else:
            cos, sin = rope
            q = ref.apply_rope(q, cos, sin, s.rope.interleaved)
            k = ref.apply_rope(k, cos, sin, s.rope.interleaved)
            k_cache, v_cache = cache
            ref.write_kv(k_cache, batch.slot_mapping, k)
            ref.write_kv(v_cache, batch.slot_mapping, v)
            out = ref.padded_attention(
                q, ref.gather_kv(k_cache, batch.block_tables), ref.gather_kv(v_cache, batch.block_tables),
                batch.seq_index, batch.positions, s.softmax_scale,
            )
        return self._linear(out.reshape(t, -1), w["o_proj"], w.get("o_proj.bias"))

    # ---- MLA (DeepSeek) ------------------------------------------------------------------------
    def _mla(self, w: dict[str, torch.Tensor], x: torch.Tensor, batch: ForwardBatch,
             cache: list[torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        s = self.spec
        t, nope, rd, r = x.shape[0], s.qk_nope_head_dim, s.qk_rope_head_dim, s.kv_lora_rank
        if s.q_lora_rank:
            qa = ref.rms_norm(ref.linear(x, w["q_a_proj"], w.get("q_a_proj.bias")), w["q_a_layernorm"],
                              s.rms_norm_eps)
            q = ref.linear(qa, w["q_b_proj"])
        else:
            q = ref.linear(x, w["q_proj"])
        q = q.view(t, s.num_heads, nope + rd)
        ckv = ref.linear(x, w["kv_a_proj_with_mqa"], w.get("kv_a_proj_with_mqa.bias"))
        latent, k_pe = ckv.split([r, rd], dim=-1)
        latent = ref.rms_norm(latent, w["kv_a_layernorm"], s.rms_norm_eps)
        if self.triton:
            out = _kernel_mla(q, latent, k_pe, w, batch, cache[0], rope, s)
            return self._linear(out.reshape(t, -1), w["o_proj"], w.get("o_proj.bias"))
        cos, sin = rope
        q_pe = ref.apply_rope(q[..., nope:], cos, sin, s.rope.interleaved)
        k_pe = ref.apply_rope(k_pe[:, None, :], cos, sin, s.rope.interleaved)
        (latent_cache,) = cache
        ref.write_kv(latent_cache, batch.slot_mapping, torch.cat([latent[:, None, :], k_pe], dim=-1))
        # Expand the cached latents into per-head keys/values (transformers' unabsorbed MLA).
        ctx = ref.gather_kv(latent_cache, batch.block_tables)[:, :, 0]          # [B, L, r + rd]
        kv = ref.linear(ctx[..., :r], w["kv_b_proj"]).view(*ctx.shape[:2], s.num_heads, nope + s.v_head_dim)
        k_nope, v = kv.split([nope, s.v_head_dim], dim=-1)
        keys = torch.cat([k_nope, ctx[..., None, r:].expand(-1, -1, s.num_heads, -1)], dim=-1)
        queries = torch.cat([q[..., :nope], q_pe], dim=-1)
        out = ref.padded_attention(queries, keys, v, batch.seq_index, batch.positions, s.softmax_scale)
        return ref.linear(out.reshape(t, -1), w["o_proj"], w.get("o_proj.bias"))


# ---- the Triton path (crosspool.kernels) --------------------------------------------------------

def _kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                      cache: list[torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor], interleaved: bool,
                      scale: float, qk_norm: tuple | None = None) -> torch.Tensor:
    """(q/k norm +) RoPE + KV write in one kernel, then paged attention (decode or varlen prefill); with
    a decode step of few rows (`rope_decode.fused_for`) does both in the attention kernel."""
    from crosspool.kernels import norm_rope, paged_attention, rope_decode

    k_cache, v_cache = cache
    cos, sin = rope
    if batch.decode_only and rope_decode.fused_for(q.shape[0]):
        return rope_decode.rope_decode_attention(q, k, v, cos, sin, batch.slot_mapping, k_cache, v_cache,
                                                     batch.block_tables, batch.context_lens, scale, interleaved,
                                                     qk_norm, max_context_len=batch.max_context_len)
    norm_rope.rope_write_kv(q, k, v, cos, sin, batch.slot_mapping, k_cache, v_cache, interleaved, qk_norm)
    if batch.decode_only:
        return paged_attention.paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                                      scale, max_context_len=batch.max_context_len)
    return paged_attention.paged_prefill_attention(q, k_cache, v_cache, batch.block_tables, batch.cu_seqlens_q,
                                                   batch.context_lens, scale, batch.max_q_len)


def _kernel_mla(q: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, w: dict[str, torch.Tensor],
                batch: ForwardBatch, latent_cache: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                s: ModelSpec) -> torch.Tensor:
    """Absorbed MLA: queries move into the latent space, attention runs over the cached latents
    directly (no per-head K/V expansion), and W_UV maps the result back to per-head values."""
    from crosspool.kernels import mla, norm_rope, paged_attention

    nope, r = s.qk_nope_head_dim, s.kv_lora_rank
    cos, sin = rope
    q_pe = q[..., nope:]
    norm_rope.rope_write_kv(q_pe, k_pe[:, None, :], latent[:, None, :], cos, sin, batch.slot_mapping,
                            latent_cache[..., r:], latent_cache[..., :r], s.rope.interleaved)
    q_latent = mla.absorb_query(q[..., :nope], w["w_uk"])
    if batch.decode_only:
        o = paged_attention.mla_decode_attention(q_latent, q_pe, latent_cache, batch.block_tables,
                                                 batch.context_lens, s.softmax_scale,
                                                 max_context_len=batch.max_context_len)
    else:
        o = paged_attention.mla_prefill_attention(q_latent, q_pe, latent_cache, batch.block_tables,
                                                  batch.cu_seqlens_q, batch.context_lens, s.softmax_scale,
                                                  batch.max_q_len)
    return mla.latent_to_output(o, w["w_uv"])
