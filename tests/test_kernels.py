"""Triton kernels against their torch references on fresh random inputs.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set here before
triton is imported) in fp32 and fp16; bf16 arithmetic is wrong in the interpreter. With CUDA the same tests
run compiled on the GPU, and `-m gpu` adds bf16 at real model shapes, CUDA-graph capture and timings.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
if not CUDA:
    pytest.importorskip("numpy")   # the interpreter needs it; triton does not declare it

from crosspool.kernels import fused_moe as fused_moe_module  # noqa: E402
from crosspool.kernels import torch_ref as ref  # noqa: E402
from crosspool.kernels._common import cdiv, tma_ok  # noqa: E402
from crosspool.kernels.fused_moe import fused_moe, moe_align, moe_block_m  # noqa: E402
from crosspool.kernels.gemv import MAX_GEMV_TOKENS, gemv  # noqa: E402
from crosspool.kernels.mla import (  # noqa: E402
    absorb_query,
    latent_to_output,
    mla_absorbed_attention_ref,
    split_kv_b_proj,
)
from crosspool.kernels.norm_rope import add_rms_norm, rms_norm, rope_write_kv  # noqa: E402
from crosspool.kernels.paged_attention import (  # noqa: E402
    DECODE_BLOCK_N,
    SplitPlan,
    _combine,
    mla_decode_attention,
    mla_prefill_attention,
    paged_decode_attention,
    paged_prefill_attention,
)
from crosspool.kernels.rope_decode import rope_decode_attention  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
# fp32: only summation order differs. fp16 (ulp 2^-10 ~ 1e-3 at 1.0): both sides round probabilities,
# intermediates and the output to fp16 at different points, a few ulp apart on O(1) outputs.
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def _close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


# ------------------------------------------------------------------------------------------------
# Paged attention inputs: the pool's layout, strided per-layer views, shuffled block tables


class Paged:
    """A varlen batch over a paged cache: sequence b has context_lens[b] cached keys, the last q_lens[b]
    of which are its new query tokens."""

    def __init__(self, context_lens: list[int], q_lens: list[int], heads: int, kv_heads: int, dim: int,
                 dtype: torch.dtype, *, mla_rope_dim: int = 0, block_size: int = 16,
                 table_dtype: torch.dtype = torch.int64, seed: int = 0, device: torch.device = DEVICE) -> None:
        g = torch.Generator().manual_seed(seed)
        b = len(context_lens)
        max_blocks = cdiv(max(context_lens), block_size)
        num_blocks = b * max_blocks + 3
        layers, layer = 3, 1
        if mla_rope_dim:
            # [blocks, layers, 1, block_size, 1, R + Rd]: one latent "head" per token
            buf = torch.randn(num_blocks, layers, 1, block_size, 1, dim + mla_rope_dim, generator=g)
            self.caches = list(buf.to(device, dtype)[:, layer].unbind(1))
        else:
            buf = torch.randn(num_blocks, layers, 2, block_size, kv_heads, dim, generator=g)
            self.caches = list(buf.to(device, dtype)[:, layer].unbind(1))
        perm = torch.randperm(num_blocks, generator=g)[: b * max_blocks]
        self.tables = perm.view(b, max_blocks).to(device, table_dtype)
        self.context_lens = torch.tensor(context_lens, device=device)
        qs = torch.tensor(q_lens)
        self.cu_seqlens = torch.zeros(b + 1, dtype=torch.int32)
        self.cu_seqlens[1:] = qs.cumsum(0)
        self.cu_seqlens = self.cu_seqlens.to(device)
        self.max_q_len = max(q_lens)
        self.seq = torch.repeat_interleave(torch.arange(b), qs).to(device)
        self.pos = torch.cat([torch.arange(c - n, c) for c, n in zip(context_lens, q_lens, strict=True)]).to(device)
        t = int(qs.sum())
        self.q = torch.randn(t, heads, dim, generator=g).to(device, dtype)
        self.q_pe = torch.randn(t, heads, mla_rope_dim, generator=g).to(device, dtype) if mla_rope_dim else None

    def reference(self, scale: float, q: torch.Tensor | None = None) -> torch.Tensor:
        q = self.q if q is None else q
        if self.q_pe is not None:
            return mla_absorbed_attention_ref(q, self.q_pe, self.caches[0], self.tables.long(), self.seq, self.pos,
                                              scale)
        k, v = (ref.gather_kv(c, self.tables.long()) for c in self.caches)
        return ref.padded_attention(q, k, v, self.seq, self.pos, scale)


GQA = [(4, 4, 64), (8, 2, 40), (16, 2, 128)]   # (query heads, kv heads, head dim): ratios 1, 4, 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,dim", GQA)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_attention(dtype: torch.dtype, heads: int, kv_heads: int, dim: int, num_splits: int) -> None:
    ctx = [1, 17, 100, 301]
    p = Paged(ctx, [1] * len(ctx), heads, kv_heads, dim, dtype, table_dtype=torch.int32, seed=heads + num_splits)
    out = paged_decode_attention(p.q, *p.caches, p.tables, p.context_lens, dim**-0.5, num_splits=num_splits)
    _close(out, p.reference(dim**-0.5), dtype)


def test_paged_decode_long_context_split() -> None:
    """Contexts of thousands of tokens, split-KV with uneven splits, into a caller-given output buffer."""
    ctx = [3001, 2049, 5]
    p = Paged(ctx, [1, 1, 1], 8, 2, 64, torch.float32, seed=7)
    out = torch.empty_like(p.q)
    got = paged_decode_attention(p.q, *p.caches, p.tables, p.context_lens, 0.125, num_splits=7, out=out)
    assert got is out
    _close(out, p.reference(0.125), torch.float32)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode_padding_rows(num_splits: int) -> None:
    """Rows with context_len 0 (padding of a CUDA-graph batch bucket) give zeros, never NaN."""
    p = Paged([40, 1, 9], [1, 1, 1], 8, 2, 32, torch.float32, seed=2)
    lens = p.context_lens.clone()
    lens[1] = 0
    out = paged_decode_attention(p.q, *p.caches, p.tables, lens, 0.2, num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = torch.tensor([0, 2], device=DEVICE)
    _close(out[keep], p.reference(0.2)[keep], torch.float32)


# 6 splits in the grid; a short context goes over 2 splits of <= 32 keys instead (blocks of 64 keys): empty splits
PLAN = SplitPlan(6, 2, 32)


@pytest.mark.parametrize("heads,kv_heads,dim", GQA)
def test_paged_decode_attention_split_plan(heads: int, kv_heads: int, dim: int) -> None:
    """A plan whose split count follows each sequence's context (`SplitPlan`): in blocks of 64 keys, 301 keys
    take 5 of the grid's 6 splits, 100 keys 2, 17 and 1 key one; the other splits exit at once and the combine
    skips them. Row 4 is padding (context 0): zeros."""
    ctx = [1, 17, 100, 301, 9]
    p = Paged(ctx, [1] * len(ctx), heads, kv_heads, dim, torch.float32, seed=heads + 40)
    assert [PLAN.used(c, DECODE_BLOCK_N) for c in ctx[:4]] == [1, 1, 2, 5]
    lens = p.context_lens.clone()
    lens[4] = 0
    out = paged_decode_attention(p.q, *p.caches, p.tables, lens, dim**-0.5, num_splits=PLAN)
    _close(out[:4], p.reference(dim**-0.5)[:4], torch.float32)
    assert torch.equal(out[4], torch.zeros_like(out[4]))


def test_combine_skips_empty_splits() -> None:
    """The combine reads no part of a split with log-sum-exp -inf (an empty split, which may not have stored
    one): NaN there changes nothing, and a row of only empty splits gives zeros."""
    g = torch.Generator().manual_seed(12)
    part = torch.randn(2, 3, 5, 32, generator=g)
    lse = 3 * torch.randn(2, 3, 5, generator=g)
    lse[:, :, 3:] = float("-inf")
    lse[1, 0] = float("-inf")
    w = torch.exp2(lse - lse.amax(-1, keepdim=True).nan_to_num(neginf=0.0))
    want = (w[..., None] * part.masked_fill(~(w > 0)[..., None], 0)).sum(2) / w.sum(2).clamp(min=1e-30)[..., None]
    part[:, :, 3:] = float("nan")
    part[1, 0] = float("nan")
    out = torch.empty(2, 3, 32, device=DEVICE)
    _combine(part.to(DEVICE), lse.to(DEVICE), out)
    assert torch.isfinite(out).all() and torch.equal(out[1, 0].cpu(), torch.zeros(32))
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-6)


def test_default_split_plan_follows_the_context(monkeypatch) -> None:  # noqa: ANN001
    """`default_split_plan` on an H200 (132 SMs), the session-11 and -12 sweeps' cases: a graph bucket of few
    tiles sized for a long context holds enough splits for it, while short contexts still run the two-wave count,
    and grids of many tiles run the two-wave count at any context."""
    from crosspool.kernels import paged_attention as pa

    monkeypatch.setattr(pa, "num_sms", lambda device: 132)
    for name, value in (("MIN_KEYS_PER_SPLIT", 128), ("TARGET_KEYS_PER_SPLIT", 1024), ("LONG_WAVES", 8),
                        ("LONG_SMS_PER_TILE", 4)):
        monkeypatch.setattr(pa, name, value)
    cpu = torch.device("cpu")
    # Qwen3-30B-A3B at batch 8 (32 sequence x KV-head tiles), a serving bucket of 40,960 keys, blocks of 64
    plan = pa.default_split_plan(32, cpu, 40960)
    assert (plan.splits, plan.wave_splits) == (33, 9)
    assert [plan.used(c, 64) for c in (1024, 4096, 32768, 40960)] == [8, 8, 32, 32]
    # OLMoE at batch 1 (16 tiles), 4,096 keys, the fused kernel's blocks of 128: the two-wave rule
    plan = pa.default_split_plan(16, cpu, 4096)
    assert plan.splits == 17 and [plan.used(c, 128) for c in (1024, 4096)] == [8, 16]
    # OLMoE at batch 8 or Qwen3 at batch 32 (128 tiles, more than one per 4 SMs): the two-wave 3 splits at any
    # context (session 12's sweep: 8 lost at 8k), an eager step of 300 keys too; 512 tiles: one split
    for longest in (4096, 8192, 40960):
        plan = pa.default_split_plan(128, cpu, longest)
        assert (plan.splits, plan.wave_splits) == (3, 3)
        assert [plan.used(c, 64) for c in (1024, 8192, longest)] == [3, 3, 3]
    assert pa.default_split_plan(128, cpu, 300).used(300, 64) == 3
    assert pa.default_split_plan(512, cpu, 40960).splits == 1
    # Qwen3 at batch 1 (4 tiles): the cap
    assert pa.default_split_plan(4, cpu, 40960).splits == pa.MAX_SPLITS
    # an explicit count divides every context evenly, as before plans
    for splits, ctx in ((3, 1), (3, 200), (7, 3001), (64, 40960)):
        assert SplitPlan.fixed(splits).keys_per_split(ctx, 64) == cdiv(cdiv(ctx, splits), 64) * 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,dim", GQA)
def test_paged_prefill_attention(dtype: torch.dtype, heads: int, kv_heads: int, dim: int) -> None:
    """Full prefill, a decode token, chunked prefill after a cached prefix, odd lengths, one batch."""
    ctx, q_lens = [5, 37, 130, 70], [5, 1, 67, 17]
    p = Paged(ctx, q_lens, heads, kv_heads, dim, dtype, seed=heads)
    out = paged_prefill_attention(p.q, *p.caches, p.tables, p.cu_seqlens, p.context_lens, 0.1, p.max_q_len)
    _close(out, p.reference(0.1), dtype)


def test_paged_prefill_split_kv() -> None:
    """Split-KV for a short chunk over a long cached prefix (rows whose split sees no visible key)."""
    p = Paged([900, 40], [3, 40], 8, 2, 32, torch.float32, seed=3)
    out = paged_prefill_attention(p.q, *p.caches, p.tables, p.cu_seqlens, p.context_lens, 0.2, p.max_q_len,
                                  num_splits=4)
    _close(out, p.reference(0.2), torch.float32)


def test_prefill_matches_decode_for_one_token_queries() -> None:
    p = Paged([33, 1, 64], [1, 1, 1], 8, 4, 64, torch.float32, seed=11)
    dec = paged_decode_attention(p.q, *p.caches, p.tables, p.context_lens, 0.125, num_splits=2)
    pre = paged_prefill_attention(p.q, *p.caches, p.tables, p.cu_seqlens, p.context_lens, 0.125, 1)
    _close(pre, dec, torch.float32)


# ------------------------------------------------------------------------------------------------
# MLA


def test_mla_absorbed_reference_equals_unabsorbed() -> None:
    """The absorbed form (attention over the latent, W_UK folded into q, W_UV after) equals the repository's
    unabsorbed path (latents expanded through kv_b_proj into per-head keys/values), fp32."""
    g = torch.Generator().manual_seed(0)
    heads, nope, rope, v_dim, rank = 5, 16, 8, 12, 32
    w = torch.randn(heads * (nope + v_dim), rank, generator=g) * rank**-0.5      # kv_b_proj
    p = Paged([1, 23, 50], [1, 7, 50], heads, 1, rank, torch.float32, mla_rope_dim=rope, device=torch.device("cpu"))
    q = torch.randn(p.q.shape[0], heads, nope + rope, generator=g)
    scale = (nope + rope) ** -0.5
    # unabsorbed, as AttentionSide._mla
    ctx = ref.gather_kv(p.caches[0], p.tables)[:, :, 0]
    kv = ref.linear(ctx[..., :rank], w).view(*ctx.shape[:2], heads, nope + v_dim)
    k_nope, v = kv.split([nope, v_dim], dim=-1)
    keys = torch.cat([k_nope, ctx[..., None, rank:].expand(-1, -1, heads, -1)], dim=-1)
    want = ref.padded_attention(q, keys, v, p.seq, p.pos, scale)
    # absorbed
    w_uk, w_uv = split_kv_b_proj(w, heads, nope, v_dim)
    o_latent = mla_absorbed_attention_ref(absorb_query(q[..., :nope], w_uk), q[..., nope:], p.caches[0], p.tables,
                                          p.seq, p.pos, scale)
    torch.testing.assert_close(latent_to_output(o_latent, w_uv), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,rank,rope", [(16, 64, 16), (5, 32, 8)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_mla_decode_attention(dtype: torch.dtype, heads: int, rank: int, rope: int, num_splits: int) -> None:
    p = Paged([1, 40, 200], [1, 1, 1], heads, 1, rank, dtype, mla_rope_dim=rope, seed=heads)
    out = mla_decode_attention(p.q, p.q_pe, p.caches[0], p.tables, p.context_lens, 0.1, num_splits=num_splits)
    _close(out, p.reference(0.1), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mla_prefill_attention(dtype: torch.dtype) -> None:
    p = Paged([1, 40, 90], [1, 10, 33], 16, 1, 32, dtype, mla_rope_dim=8, seed=5)
    out = mla_prefill_attention(p.q, p.q_pe, p.caches[0], p.tables, p.cu_seqlens, p.context_lens, 0.1, p.max_q_len)
    _close(out, p.reference(0.1), dtype)


# ------------------------------------------------------------------------------------------------
# Fused MoE


def _moe_inputs(t: int, experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype, seed: int,
                used_experts: int | None = None, device: torch.device = DEVICE) -> tuple[torch.Tensor, ...]:
    """Random weights ~ N(0, 1/fan_in); routing softmax-top-k over logits restricted to `used_experts`
    experts (the rest get no tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, hidden, generator=g)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    w_down = torch.randn(experts, hidden, inter, generator=g) * inter**-0.5
    logits = torch.randn(t, experts, generator=g)
    if used_experts is not None:
        logits[:, used_experts:] = float("-inf")
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return (x.to(device, dtype), w_gate_up.to(device, dtype), w_down.to(device, dtype), weights.to(device),
            ids.to(device))


def test_moe_align() -> None:
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [5, 3]], device=DEVICE)
    pairs, experts = moe_align(ids, num_experts=8, block_m=4)
    n = ids.numel()
    assert pairs.shape[0] % 4 == 0 and experts.shape[0] == pairs.shape[0] // 4
    got = sorted(p for p in pairs.tolist() if p < n)
    assert got == list(range(n))                       # every pair exactly once
    flat = ids.reshape(-1).tolist()
    for tile, e in enumerate(experts.tolist()):
        rows = [p for p in pairs[tile * 4:(tile + 1) * 4].tolist() if p < n]
        if e < 0:
            assert not rows
        else:
            assert all(flat[p] == e for p in rows)
    assert experts.tolist()[:4] == [0, 1, 3, 5]        # expert 3's four pairs fill one tile


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,experts,top_k,hidden,inter,used", [
    (37, 16, 4, 64, 96, None),       # grouped GEMMs, several tiles per expert
    (70, 8, 2, 48, 40, 3),           # odd sizes, 5 of 8 experts get no tokens
    (5, 8, 2, 33, 17, None),         # GEMV path (<= 8 tokens), odd sizes
    (1, 64, 8, 128, 32, None),       # one decode token, top-8
    (8, 6, 1, 40, 24, 2),            # GEMV, top-1, empty experts
])
def test_fused_moe(dtype: torch.dtype, t: int, experts: int, top_k: int, hidden: int, inter: int,
                   used: int | None) -> None:
    x, wgu, wd, weights, ids = _moe_inputs(t, experts, top_k, hidden, inter, dtype, seed=t, used_experts=used)
    want = ref.experts(x, wgu, wd, weights, ids)
    _close(fused_moe(x, wgu, wd, weights, ids), want, dtype)


@pytest.mark.parametrize(("small", "evict_first", "tma"), [
    (True, True, None), (True, False, None), (True, True, "auto"), (False, True, None)])
def test_fused_moe_paths_agree(small: bool, evict_first: bool, tma: str | None, monkeypatch) -> None:  # noqa: ANN001
    """Both paths on the same inputs (either may serve any token count), int32 ids, strided weights; the GEMV
    path's register-tile kernels (with and without their evict_first weight loads) and its TMA kernels."""
    monkeypatch.setattr(fused_moe_module, "EVICT_FIRST", evict_first)
    monkeypatch.setattr(fused_moe_module, "TMA_TILE", tma)
    x, wgu, wd, weights, ids = _moe_inputs(12, 8, 2, 64, 48, torch.float32, seed=1)
    wgu_strided = torch.empty(wgu.shape[0], wgu.shape[1], wgu.shape[2] + 8, device=DEVICE)[..., :wgu.shape[2]]
    wgu_strided.copy_(wgu)
    out = fused_moe(x, wgu_strided, wd, weights, ids.int(), small=small)
    _close(out, ref.experts(x, wgu, wd, weights, ids), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,top_k,hidden,inter", [(1, 8, 200, 40), (5, 2, 136, 24)])
@pytest.mark.parametrize("tile", [(16, 64, 3, 4), "auto"])
def test_fused_moe_tma_gemvs(dtype: torch.dtype, t: int, top_k: int, hidden: int, inter: int,
                             tile: tuple[int, ...] | str, monkeypatch) -> None:  # noqa: ANN001
    """The GEMV path with TMA-fetched expert weights (`CROSSPOOL_EXPERTS_TMA`, a fixed tile or autotuned: each
    config sets the descriptors' box): hidden and intermediate sizes past the last tile (a partial gate block reads
    up rows; TMA reads zeros past the ends), a row-padded gate/up weight, reduced and per-pair outputs. A weight
    whose rows break TMA's 16-byte rule takes the plain kernels."""
    monkeypatch.setattr(fused_moe_module, "TMA_TILE", tile)
    monkeypatch.setattr(fused_moe_module, "TMA_MIN_TOKENS", 1)
    x, wgu, wd, weights, ids = _moe_inputs(t, 8, top_k, hidden, inter, dtype, seed=t + hidden)
    want = ref.experts(x, wgu, wd, weights, ids)
    padded = torch.zeros(wgu.shape[0], wgu.shape[1], hidden + 8, device=DEVICE, dtype=dtype)[..., :hidden]
    padded.copy_(wgu)
    assert tma_ok(padded) and tma_ok(wd)
    _close(fused_moe(x, padded, wd, weights, ids, small=True), want, dtype)
    _close(fused_moe(x, wgu, wd, weights, ids, small=True, reduce=False).reduce(), want, dtype)
    odd = torch.zeros(wgu.shape[0], wgu.shape[1], hidden + 1, device=DEVICE, dtype=dtype)[..., :hidden]
    odd.copy_(wgu)
    assert not tma_ok(odd)
    _close(fused_moe(x, odd, wd, weights, ids, small=True), want, dtype)


def test_tune_runs_each_path_at_a_size_that_picks_it() -> None:
    """`tune` (startup tuning) runs the GEMV path at one token (the register-tile kernels) and at a count that
    takes the TMA kernels, and the grouped GEMMs at each tile height `moe_block_m` picks."""
    _, wgu, wd, _, _ = _moe_inputs(1, 4, 2, 32, 16, torch.float32, seed=2)
    counts = fused_moe_module.tune(wgu, wd, top_k=2)
    assert counts[0] < fused_moe_module.TMA_MIN_TOKENS <= counts[1] <= fused_moe_module.SMALL_BATCH_TOKENS
    assert [moe_block_m(t, 4) for t in counts[2:]] == [16, 32, 64]


# ------------------------------------------------------------------------------------------------
# Skinny GEMM (decode linears)


def _gemv_inputs(t: int, n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [t, k] ~ N(0, 1), w [n, k] ~ N(0, 1/k): outputs O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    w = torch.randn(n, k, generator=g) * k**-0.5
    return x.to(DEVICE, dtype), w.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t", range(1, MAX_GEMV_TOKENS + 1))
@pytest.mark.parametrize("n,k,split_k", [
    (37, 33, 1),        # one N-block, one K-step, both partial
    (203, 257, 1),      # odd sizes over several blocks and steps
    (100, 130, 3),      # split-K, the last split past K (masked steps)
])
def test_gemv(dtype: torch.dtype, t: int, n: int, k: int, split_k: int) -> None:
    x, w = _gemv_inputs(t, n, k, dtype, seed=1000 * t + n + k)
    _close(gemv(x, w, split_k=split_k), torch.nn.functional.linear(x, w), dtype)


def test_env_int_settings_say_which_variable_is_wrong(monkeypatch) -> None:  # noqa: ANN001
    """The kernels' integer switches (`_common.env_int`): unset or empty gives the default, an integer at or above
    the minimum is taken, anything else is a clear error naming the variable."""
    from crosspool.kernels._common import env_int

    monkeypatch.delenv("CROSSPOOL_TEST_INT", raising=False)
    assert env_int("CROSSPOOL_TEST_INT", 4) == 4
    monkeypatch.setenv("CROSSPOOL_TEST_INT", " ")
    assert env_int("CROSSPOOL_TEST_INT", 4) == 4
    monkeypatch.setenv("CROSSPOOL_TEST_INT", " 2 ")
    assert env_int("CROSSPOOL_TEST_INT", 4, minimum=1) == 2
    for bad in ("x", "1.5", "0"):
        monkeypatch.setenv("CROSSPOOL_TEST_INT", bad)
        with pytest.raises(ValueError, match="CROSSPOOL_TEST_INT=.*expected an integer >= 1"):
            env_int("CROSSPOOL_TEST_INT", 4, minimum=1)


def test_experts_tma_setting_reads_auto_off_or_a_tile_or_says_what_it_wanted() -> None:
    """`CROSSPOOL_EXPERTS_TMA`: unset, empty or "auto" autotunes, "0"/"off" turns TMA off, four integers are the
    tile, anything else is a clear error naming the variable."""
    setting = fused_moe_module.tma_setting
    assert setting(None) == setting(" ") == setting("Auto") == "auto"
    assert setting("0") is None and setting("off") is None
    assert setting("16,256,4,8") == (16, 256, 4, 8)
    for bad in ("16,256", "16,256,4,x", "on"):
        with pytest.raises(ValueError, match="CROSSPOOL_EXPERTS_TMA.*auto, off or BLOCK_N,BLOCK_K,STAGES,WARPS"):
            setting(bad)


@pytest.mark.parametrize("split_k", [None, 1, 4])
def test_gemv_bias_strided_rows(split_k: int | None) -> None:
    """Rows of a wider buffer (row stride != K), a bias (added before the one rounding), fp16; no tokens."""
    x, w = _gemv_inputs(5, 70, 300, torch.float16, seed=3)
    wide = torch.zeros(5, 320, device=DEVICE, dtype=torch.float16)
    wide[:, 7:307] = x
    bias = torch.randn(70, generator=torch.Generator().manual_seed(4)).to(DEVICE, torch.float16)
    out = gemv(wide[:, 7:307], w, bias, split_k=split_k)
    assert out.shape == (5, 70) and out.dtype == torch.float16 and out.is_contiguous()
    _close(out, torch.nn.functional.linear(x, w, bias), torch.float16)
    assert gemv(x[:0], w).shape == (0, 70)


# ------------------------------------------------------------------------------------------------
# RMSNorm (+ residual), RoPE + KV write


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,n", [(7, 100), (3, 2048)])
def test_rms_norm(dtype: torch.dtype, rows: int, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x, res = (torch.randn(rows, n, generator=g).to(DEVICE, dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    normed, new_res = add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(new_res, res + x, atol=0, rtol=0)
    _close(normed, ref.rms_norm(res + x, w, 1e-6), dtype)
    _close(rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), dtype)
    heads = x.view(rows, 4, n // 4)          # per-head q/k norm
    _close(rms_norm(heads, w[: n // 4], 1e-6), ref.rms_norm(heads, w[: n // 4], 1e-6), dtype)


def _rope_tables(t: int, dim: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.randint(0, 4096, (t,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    f = pos.float()[:, None] * inv[None, :]
    return f.cos().to(DEVICE), f.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (6, 6, 40)])
def test_rope_write_kv(dtype: torch.dtype, interleaved: bool, heads: int, kv_heads: int, dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    t, block_size, blocks = 9, 16, 12
    q, k, v = (torch.randn(t, h, dim, generator=g).to(DEVICE, dtype) for h in (heads, kv_heads, kv_heads))
    cos, sin = _rope_tables(t, dim, g)
    slots = torch.randperm(blocks * block_size, generator=g)[:t].to(DEVICE)
    slots[4] = -1                                       # a padding token: no cache write
    buf = torch.randn(blocks, 3, 2, block_size, kv_heads, dim, generator=g).to(DEVICE, dtype)
    want_buf = buf.clone()
    q_out = q.clone()
    rope_write_kv(q_out, k, v, cos, sin, slots, *buf[:, 1].unbind(1), interleaved)
    k_cache, v_cache = want_buf[:, 1].unbind(1)
    keep = slots >= 0
    ref.write_kv(k_cache, slots[keep], ref.apply_rope(k, cos, sin, interleaved)[keep])
    ref.write_kv(v_cache, slots[keep], v[keep])
    _close(q_out, ref.apply_rope(q, cos, sin, interleaved), dtype)
    _close(buf, want_buf, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["head", "full"])          # Qwen3-MoE, OLMoE
def test_rope_write_kv_with_qk_norm(dtype: torch.dtype, kind: str) -> None:
    """q/k RMSNorm fused in front of the rotation: q and k are slices of one fused QKV row, as in the engine."""
    g = torch.Generator().manual_seed(5)
    t, heads, kv_heads, dim, block_size, blocks, eps = 7, 8, 2, 32, 16, 4, 1e-6
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim, generator=g).to(DEVICE, dtype)
    q, k, v = (x.view(t, -1, dim) for x in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1))
    n_q, n_k = (dim, dim) if kind == "head" else (heads * dim, kv_heads * dim)
    q_w, k_w = ((1 + 0.1 * torch.randn(n, generator=g)).to(DEVICE, dtype) for n in (n_q, n_k))
    cos, sin = _rope_tables(t, dim, g)
    slots = torch.randperm(blocks * block_size, generator=g)[:t].to(DEVICE)
    buf = torch.zeros(blocks, 2, block_size, kv_heads, dim, device=DEVICE, dtype=dtype)
    want = buf.clone()

    def normed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ref.rms_norm(x, w, eps) if kind == "head" else ref.rms_norm(x.reshape(t, -1), w, eps).view(x.shape)

    want_q = ref.apply_rope(normed(q, q_w), cos, sin, False)
    ref.write_kv(want[:, 0], slots, ref.apply_rope(normed(k, k_w), cos, sin, False))
    ref.write_kv(want[:, 1], slots, v)
    q_out = q.clone()
    rope_write_kv(q_out, k, v, cos, sin, slots, buf[:, 0], buf[:, 1], False, qk_norm=(kind, q_w, k_w, eps))
    _close(q_out, want_q, dtype)
    _close(buf, want, dtype)


def test_rope_write_kv_mla() -> None:
    """DeepSeek: rotate q's rope part in place inside q, write [latent, rotated k_pe] into the latent cache."""
    g = torch.Generator().manual_seed(0)
    t, heads, nope, rd, rank, block_size = 6, 4, 16, 8, 32, 16
    q = torch.randn(t, heads, nope + rd, generator=g).to(DEVICE)
    latent = torch.randn(t, 1, rank, generator=g).to(DEVICE)
    k_pe = torch.randn(t, 1, rd, generator=g).to(DEVICE)
    cos, sin = _rope_tables(t, rd, g)
    slots = torch.randperm(4 * block_size, generator=g)[:t].to(DEVICE)
    buf = torch.zeros(4, 2, 1, block_size, 1, rank + rd, device=DEVICE)
    cache = buf[:, 1, 0]
    want_q = torch.cat([q[..., :nope], ref.apply_rope(q[..., nope:], cos, sin, True)], dim=-1)
    want_cache = cache.clone()
    ref.write_kv(want_cache, slots, torch.cat([latent, ref.apply_rope(k_pe, cos, sin, True)], dim=-1))
    rope_write_kv(q[..., nope:], k_pe, latent, cos, sin, slots, cache[..., rank:], cache[..., :rank], True)
    _close(q, want_q, torch.float32)
    _close(cache, want_cache, torch.float32)


# ------------------------------------------------------------------------------------------------
# Decode with q/k norm, RoPE and the KV write inside the attention kernel (`rope_decode_attention`)


def _rope_decode_inputs(ctx: list[int], heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int,
                        kind: str | None, eps: float = 1e-6) -> tuple:
    """One decode row per context in `ctx` (0: a padding row, slot -1): q, k, v as slices of one QKV row (as in the
    engine), cos/sin, the new tokens' slots, the q/k norm argument of `kind` (None, "head", "full") and the normed
    q and k, and three paged caches with the same contents."""
    b = len(ctx)
    pages = tuple(Paged(ctx, [1] * b, heads, kv_heads, dim, dtype, seed=seed) for _ in range(3))
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, (heads + 2 * kv_heads) * dim, generator=g).to(DEVICE, dtype)
    q, k, v = (x.view(b, -1, dim) for x in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1))
    cos, sin = _rope_tables(b, dim, g)
    lens, tables, block_size = pages[0].context_lens, pages[0].tables, pages[0].caches[0].shape[1]
    last = (lens - 1).clamp(min=0)
    slots = torch.where(lens > 0, tables.gather(1, (last // block_size)[:, None])[:, 0] * block_size
                        + last % block_size, -1)
    qk_norm, q_n, k_n = None, q, k
    if kind is not None:
        n_q, n_k = (dim, dim) if kind == "head" else (heads * dim, kv_heads * dim)
        q_w, k_w = ((1 + 0.1 * torch.randn(n, generator=g)).to(DEVICE, dtype) for n in (n_q, n_k))
        qk_norm = (kind, q_w, k_w, eps)
        q_n, k_n = (ref.rms_norm(x, w, eps) if kind == "head" else ref.rms_norm(x.reshape(b, -1), w, eps).view(x.shape)
                    for x, w in ((q, q_w), (k, k_w)))
    return q, k, v, cos, sin, slots, qk_norm, q_n, k_n, pages


@pytest.mark.parametrize("dtype,num_splits", [(torch.float32, 1), (torch.float32, 3), (torch.float16, 3)])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 1)])        # GQA groups 1 and 4
@pytest.mark.parametrize("kind", [None, "head", "full"])             # Mixtral / Qwen2-MoE, Qwen3-MoE, OLMoE
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_decode_attention(dtype: torch.dtype, heads: int, kv_heads: int, kind: str | None, interleaved: bool,
                               num_splits: int | SplitPlan, monkeypatch, block_n: int = 64) -> None:  # noqa: ANN001
    """The fused kernel's output and the caches after it equal those of `rope_write_kv` +
    `paged_decode_attention` and of the torch reference. q, k, v are slices of one QKV row, as in the engine.
    Contexts cross blocks of 16; with 3 splits of 64 keys (the walk's blocks pinned to 64 keys) the new token of
    context 129 is alone in the third split and that of 200 ends the second; row 2 is padding (context 0, slot
    -1)."""
    from crosspool.kernels import rope_decode

    monkeypatch.setattr(rope_decode, "BLOCK_N_KEYS", block_n)
    dim, scale = 32, 32**-0.5
    seed = heads + 2 * getattr(num_splits, "splits", num_splits) + int(interleaved)
    q, k, v, cos, sin, slots, qk_norm, q_n, k_n, (pf, pu, pr) = _rope_decode_inputs(
        [1, 17, 0, 129, 200], heads, kv_heads, dim, dtype, seed, kind)
    lens = pf.context_lens
    keep = lens > 0
    q_rot = ref.apply_rope(q_n, cos, sin, interleaved)
    ref.write_kv(pr.caches[0], slots[keep], ref.apply_rope(k_n, cos, sin, interleaved)[keep])
    ref.write_kv(pr.caches[1], slots[keep], v[keep])
    want = pr.reference(scale, q_rot)

    q_unfused = q.clone()
    rope_write_kv(q_unfused, k, v, cos, sin, slots, *pu.caches, interleaved, qk_norm)
    unfused = paged_decode_attention(q_unfused, *pu.caches, pu.tables, lens, scale, num_splits=num_splits)

    q_before = q.clone()
    out = rope_decode_attention(q, k, v, cos, sin, slots, *pf.caches, pf.tables, lens, scale, interleaved, qk_norm,
                                num_splits=num_splits)
    assert torch.equal(q, q_before)          # q is read, not rotated in place
    _close(out[keep], unfused[keep], dtype)
    _close(out[keep], want[keep], dtype)
    for fused_cache, unfused_cache, want_cache in zip(pf.caches, pu.caches, pr.caches, strict=True):
        _close(fused_cache, unfused_cache, dtype)
        _close(fused_cache, want_cache, dtype)


@pytest.mark.parametrize("kind", [None, "full"])
def test_rope_decode_attention_split_plan(kind: str | None, monkeypatch) -> None:  # noqa: ANN001
    """The fused kernel on a plan whose split count follows the context (`PLAN`, blocks of 64 keys): 200 keys
    take 4 of the grid's 6 splits (the new token ends the fourth), 129 keys 3 (the new token alone in the
    third), 17 and 1 key one; the empty splits exit before the q/k norm and the rotation, and write no KV."""
    assert [PLAN.used(c, 64) for c in (200, 129, 17, 1)] == [4, 3, 1, 1]
    test_rope_decode_attention(torch.float32, 4, 2, kind, False, PLAN, monkeypatch)


@pytest.mark.parametrize("kind", [None, "head", "full"])
def test_rope_decode_attention_in_blocks_of_128_keys(kind: str | None, monkeypatch) -> None:  # noqa: ANN001
    """The fused kernel walking 128-key blocks (`rope_decode.BLOCK_N_KEYS`, the default): 3 splits of 128
    keys, so the new token of context 129 is alone in the second split and the third is empty."""
    test_rope_decode_attention(torch.float16, 4, 2, kind, False, 3, monkeypatch, block_n=128)


def _same_greedy_tokens_with_switch(model: str, monkeypatch, seed: int, switch: tuple, spy: tuple) -> None:  # noqa: ANN001
    """The engine on the Triton kernels with CUDA graphs (on CPU replayed eagerly) decodes three prompts (positions
    crossing blocks of 4; a batch of 3 replays bucket 4, one padding row) with `switch` = (module, name) at 0 and at
    64 rows: the same greedy tokens, and the function `spy` = (module, name) runs only with the switch on."""
    from crosspool import LLM, EngineConfig, SamplingParams
    from crosspool.engine import graphs

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (3, 9, 14)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    monkeypatch.setattr(graphs, "BUCKETS", (2, 4))
    calls = []
    spy_module, spy_name = spy
    real = getattr(spy_module, spy_name)
    monkeypatch.setattr(spy_module, spy_name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    config = EngineConfig(device=DEVICE.type, dtype=torch.float32, kernels="triton", block_size=4, cuda_graphs=True,
                          max_num_seqs=8)
    outs = {}
    for rows in (0, 64):
        monkeypatch.setattr(*switch, rows)
        with LLM(model, config) as llm:
            outs[rows] = [o.token_ids for o in llm.generate(prompts, params)]
        assert bool(calls) == bool(rows)
    assert outs[64] == outs[0]


@pytest.mark.parametrize("dtype,hidden,scale", [(torch.float32, 40, 1.0), (torch.float16, 2050, 1.25)])
def test_embed_rope_is_feed_gather_and_tables(dtype: torch.dtype, hidden: int, scale: float) -> None:
    """`embed_rope` (the decode graph's first kernel) against torch: rows fed from the previous step's tokens
    (src >= 0) or staged ids, the embedding rows bit for bit (2050 wide: two 1024 chunks and a tail), the fp32
    RoPE tables at positions up to 40k (a YaRN-style scale), into given wider table buffers too."""
    from crosspool.kernels.embed import embed_rope, embed_rope_ref

    g = torch.Generator().manual_seed(hidden)
    vocab, half, b = 300, 24, 5
    embed = torch.randn(vocab, hidden, generator=g).to(DEVICE, dtype)
    inv_freq = (1.0 / 10000 ** (torch.arange(half) / half)).to(DEVICE)
    ids = torch.randint(0, vocab, (b,), generator=g).to(DEVICE)
    src = torch.tensor([-1, 3, 0, -1, 3], device=DEVICE)
    tokens = torch.randint(0, vocab, (8,), generator=g).to(DEVICE)
    positions = torch.tensor([0, 1, 17, 4095, 40000], device=DEVICE)
    want, (wc, ws) = embed_rope_ref(ids, src, tokens, positions, embed, inv_freq, scale)
    got, (cos, sin) = embed_rope(ids, src, tokens, positions, embed, inv_freq, scale)
    assert torch.equal(got, want)
    assert torch.equal(got[1], embed[tokens[3]]) and torch.equal(got[0], embed[ids[0]])
    torch.testing.assert_close(cos, wc, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, ws, rtol=1e-6, atol=1e-6)
    bufs = torch.zeros(2, 8, half + 8, device=DEVICE)
    _, (cos2, sin2) = embed_rope(ids, src, tokens, positions, embed, inv_freq, scale, cos=bufs[0], sin=bufs[1])
    assert cos2.data_ptr() == bufs[0].data_ptr() and torch.equal(bufs[0, :b, :half], cos)
    assert torch.equal(bufs[1, :b, :half], sin) and not bufs[:, b:].any() and not bufs[:, :, half:].any()


def test_argmax_into_a_given_buffer() -> None:
    from crosspool.kernels.argmax import argmax

    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
    assert argmax(logits, out=out[:3]).data_ptr() == out.data_ptr()
    assert torch.equal(out[:3], logits.argmax(-1)) and int(out[3]) == -1


@pytest.mark.parametrize("preset", ["tiny-olmoe", "tiny-qwen3-moe"])
def test_forward_logits_fold_the_last_add_into_the_final_norm(preset: str, tiny_models) -> None:  # noqa: ANN001
    """`MoEModel.forward_logits` (the decode graphs' path: the last FFN's expert rows summed inside the final
    norm, the embedding and RoPE tables given) gives the logits of `compute_logits(forward(...))` bit for bit, on
    the Triton path."""
    from crosspool import SamplingParams
    from crosspool.engine.runner import build_batch
    from crosspool.engine.scheduler import ScheduledSeq
    from crosspool.engine.sequence import Sequence
    from crosspool.models.model import MoEModel
    from crosspool.pools.kv_pool import KVPool

    model = MoEModel.load(tiny_models(preset), torch.float32, DEVICE, kernels="triton")
    ids = torch.randint(0, 500, (11,), generator=torch.Generator().manual_seed(5)).tolist()
    if CUDA:
        from crosspool.pools.vmm import CudaPageBackend

        pool = KVPool(512 << 20, CudaPageBackend(DEVICE.index or 0))
    else:
        pool = KVPool(64 << 20)
    cache = pool.register("m", model.spec, 4, torch.float32)
    seq = Sequence("r", "m", "", ids, SamplingParams())
    seq.block_table = cache.alloc(3)
    batch = build_batch([ScheduledSeq(seq, len(ids))], 4, DEVICE)
    with torch.inference_mode():
        want = model.compute_logits(model.forward(batch, cache))
        assert torch.equal(model.forward_logits(batch, cache), want)
        given = model.attention.embed(batch.input_ids), model.attention.rope_tables(batch.positions)
        assert torch.equal(model.forward_logits(batch, cache, given), want)
        # the one-kernel input: the same embedding rows; its cos/sin may differ from torch's in the last bit
        src = torch.full_like(batch.input_ids, -1)
        first = model.attention.embed_step(batch.input_ids, src, batch.input_ids, batch.positions)
        assert torch.equal(first[0], given[0])
        torch.testing.assert_close(model.forward_logits(batch, cache, first), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["tiny-olmoe", "tiny-deepseek-v2"])     # MHA, MLA
def test_graph_ends_fused_keep_greedy_tokens(preset: str, tiny_models, monkeypatch) -> None:  # noqa: ANN001
    """The decode graphs' fused ends (`graphs.FUSED_ENDS`: the input as one kernel, the last add inside the final
    norm) give the same greedy tokens as torch's ops there, and on they run `embed_rope`."""
    from crosspool.engine import graphs
    from crosspool.kernels import embed

    _same_greedy_tokens_with_switch(tiny_models(preset), monkeypatch, 8, (graphs, "FUSED_ENDS"),
                                    (embed, "embed_rope"))


@pytest.mark.parametrize("preset", ["tiny-olmoe", "tiny-qwen3-moe"])
def test_router_norm_keeps_greedy_tokens(preset: str, tiny_models, monkeypatch) -> None:  # noqa: ANN001
    """The post-attention norm inside the router GEMV in decode graphs (`gemv.ROUTER_NORM`): the same greedy
    tokens as the norm kernel before the router, and on it runs `norm_gemv_parts`."""
    from crosspool.kernels import gemv as gemv_module

    _same_greedy_tokens_with_switch(tiny_models(preset), monkeypatch, 10, (gemv_module, "ROUTER_NORM"),
                                    (gemv_module, "norm_gemv_parts"))


def test_decode_graphs_pick_their_context_class(tiny_models, monkeypatch) -> None:  # noqa: ANN001
    """With `graphs.SHORT_CONTEXT` 8, decode steps whose longest context is at most 8 keys replay graphs whose
    split-KV grid is sized for 8 keys, and longer ones graphs sized for max_model_len (64); 0 (one class) sizes
    every graph for 64. The greedy tokens are the same; prompts of 3 and 5 tokens decode 6 tokens each, so the
    longest context crosses 8."""
    from crosspool import LLM, EngineConfig, SamplingParams
    from crosspool.engine import graphs
    from crosspool.kernels import paged_attention

    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (3, 5)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    monkeypatch.setattr(graphs, "BUCKETS", (2, 4))
    sized_for: set[int | None] = set()
    real = paged_attention.default_split_plan

    def spy(programs: int, device: torch.device, max_context_len: int | None = None) -> SplitPlan:
        sized_for.add(max_context_len)
        return real(programs, device, max_context_len)

    monkeypatch.setattr(paged_attention, "default_split_plan", spy)
    config = EngineConfig(device=DEVICE.type, dtype=torch.float32, kernels="triton", block_size=4, cuda_graphs=True,
                          max_num_seqs=8, max_model_len=64)
    outs, seen = {}, {}
    for short in (0, 8):
        monkeypatch.setattr(graphs, "SHORT_CONTEXT", short)
        sized_for.clear()
        with LLM(tiny_models("tiny-olmoe"), config) as llm:
            outs[short] = [o.token_ids for o in llm.generate(prompts, params)]
        seen[short] = set(sized_for)
    assert outs[8] == outs[0]
    assert {8, 64} <= seen[8] and 8 not in seen[0] and 64 in seen[0]
    assert graphs.context_classes(64) == (8, 64) and graphs.context_classes(8) == (8,)
    assert [graphs.context_class((8, 64), n) for n in (0, 8, 9, 64, 65)] == [8, 8, 64, 64, 64]


@pytest.mark.parametrize("preset", ["tiny-olmoe", "tiny-qwen3-moe"])     # q/k norm over all heads, per head
def test_fused_rope_decode_keeps_greedy_tokens(preset: str, tiny_models, monkeypatch) -> None:  # noqa: ANN001
    """The same greedy tokens with the fused RoPE + KV write off (`FUSED_ROPE_ROWS` 0) as on for every step, and
    on it decodes through the fused kernel."""
    from crosspool.kernels import rope_decode

    _same_greedy_tokens_with_switch(tiny_models(preset), monkeypatch, 4, (rope_decode, "FUSED_ROPE_ROWS"),
                                    (rope_decode, "rope_decode_attention"))


def test_fused_rope_only_for_steps_of_few_rows(tiny_models, monkeypatch) -> None:  # noqa: ANN001
    """With `FUSED_ROPE_ROWS` 2, a lone sequence's decode steps (bucket 2) take the fused kernel and a batch of
    three (bucket 4) the two-kernel path, with the same tokens as the fused kernel never used."""
    from crosspool import LLM, EngineConfig, SamplingParams
    from crosspool.engine import graphs
    from crosspool.kernels import rope_decode

    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (5, 7, 11)]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    monkeypatch.setattr(graphs, "BUCKETS", (2, 4))
    rows_seen = []
    fused = rope_decode.rope_decode_attention
    monkeypatch.setattr(rope_decode, "rope_decode_attention",
                        lambda q, *a, **kw: rows_seen.append(q.shape[0]) or fused(q, *a, **kw))
    config = EngineConfig(device=DEVICE.type, dtype=torch.float32, kernels="triton", block_size=4, cuda_graphs=True,
                          max_num_seqs=8)
    outs = {}
    for limit in (0, 2):
        monkeypatch.setattr(rope_decode, "FUSED_ROPE_ROWS", limit)
        rows_seen.clear()
        with LLM(tiny_models("tiny-olmoe"), config) as llm:
            outs[limit] = ([o.token_ids for o in llm.generate(prompts[:1], params)],
                           [o.token_ids for o in llm.generate(prompts, params)])
        assert set(rows_seen) == ({2} if limit else set())
    assert outs[2] == outs[0]


def test_package_imports_without_triton() -> None:
    code = ("import sys; sys.modules['triton'] = None\n"
            "import crosspool, crosspool.kernels, crosspool.kernels.mla, crosspool.kernels.torch_ref\n"
            "from crosspool.kernels import triton_available\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# GPU: bf16 at real shapes, CUDA graphs, timings (run on the H200 with `pytest -m gpu`)
#
# bf16 tolerance: the kernel's error against an fp32 evaluation of the same bf16 inputs must stay within
# twice the torch reference's own bf16 error (plus 1e-3 of the output's scale for near-zero references).
# Both round to bf16 (8-bit mantissa, relative ulp 2^-8) at similar places; summation order and the
# online-softmax rescaling differ, so an absolute bound would be arbitrary, while a kernel bug (a wrong
# stride, mask or page) makes errors of the size of the values themselves.


def _bf16_check(kernel_out: torch.Tensor, ref_bf16: torch.Tensor, ref_fp32: torch.Tensor) -> None:
    scale = ref_fp32.abs().max().item()
    ours = (kernel_out.float() - ref_fp32).abs().max().item()
    theirs = (ref_bf16.float() - ref_fp32).abs().max().item()
    print(f"bf16 max err: kernel {ours:.3g}, torch_ref {theirs:.3g}, scale {scale:.3g}")
    assert ours <= 2 * theirs + 1e-3 * scale


@gpu
@needs_cuda
@pytest.mark.parametrize("heads,kv_heads,dim,ctx", [
    (32, 4, 128, [1, 900, 4097, 32768]),        # Qwen3-30B-A3B
    (16, 16, 128, [77, 1025, 8000]),            # OLMoE
    (32, 4, 128, [131072]),                     # 128k tokens, one sequence: split-KV must fill the GPU
])
def test_gpu_decode_bf16(heads: int, kv_heads: int, dim: int, ctx: list[int]) -> None:
    p = Paged(ctx, [1] * len(ctx), heads, kv_heads, dim, torch.bfloat16, seed=1)
    scale = dim**-0.5
    out = paged_decode_attention(p.q, *p.caches, p.tables, p.context_lens, scale, max_context_len=max(ctx))
    want = p.reference(scale)
    p.caches = [c.float() for c in p.caches]
    _bf16_check(out, want, p.reference(scale, p.q.float()))


@gpu
@needs_cuda
def test_gpu_prefill_bf16() -> None:
    ctx, q_lens = [2048, 4096, 300, 9000], [2048, 512, 1, 1000]
    p = Paged(ctx, q_lens, 32, 4, 128, torch.bfloat16, seed=2)
    out = paged_prefill_attention(p.q, *p.caches, p.tables, p.cu_seqlens, p.context_lens, 0.088, p.max_q_len)
    want = p.reference(0.088)
    p.caches = [c.float() for c in p.caches]
    _bf16_check(out, want, p.reference(0.088, p.q.float()))


@gpu
@needs_cuda
@pytest.mark.parametrize("heads", [16, 128])        # DeepSeek-V2-Lite, V3
def test_gpu_mla_bf16(heads: int) -> None:
    rank, rope, scale = 512, 64, 192**-0.5
    p = Paged([1, 500, 4100, 20000], [1, 1, 1, 1], heads, 1, rank, torch.bfloat16, mla_rope_dim=rope, seed=3)
    out = mla_decode_attention(p.q, p.q_pe, p.caches[0], p.tables, p.context_lens, scale)
    want = p.reference(scale)
    q_pe = p.q_pe
    p.caches, p.q_pe = [p.caches[0].float()], q_pe.float()
    _bf16_check(out, want, p.reference(scale, p.q.float()))
    pp = Paged([700, 64], [300, 64], heads, 1, rank, torch.bfloat16, mla_rope_dim=rope, seed=4)
    out = mla_prefill_attention(pp.q, pp.q_pe, pp.caches[0], pp.tables, pp.cu_seqlens, pp.context_lens, scale,
                                pp.max_q_len)
    want = pp.reference(scale)
    pp.caches, pp.q_pe = [pp.caches[0].float()], pp.q_pe.float()
    _bf16_check(out, want, pp.reference(scale, pp.q.float()))


@gpu
@needs_cuda
@pytest.mark.parametrize("experts,top_k,hidden,inter", [(128, 8, 2048, 768), (64, 8, 2048, 1024)])  # Qwen3, OLMoE
@pytest.mark.parametrize("t", [1, 8, 64, 4096])
def test_gpu_fused_moe_bf16(experts: int, top_k: int, hidden: int, inter: int, t: int) -> None:
    x, wgu, wd, weights, ids = _moe_inputs(t, experts, top_k, hidden, inter, torch.bfloat16, seed=t)
    out = fused_moe(x, wgu, wd, weights, ids)
    want32 = ref.experts(x.float(), wgu.float(), wd.float(), weights, ids)
    _bf16_check(out, ref.experts(x, wgu, wd, weights, ids), want32)


@gpu
@needs_cuda
def test_gpu_tune_covers_every_tile_height() -> None:
    """After `tune`, every autotuned fused-MoE kernel has a choice for this shape at each tile height the
    engine can pick, so serving never tunes (the tuner's cache is keyed by the `key` arguments first)."""
    experts, top_k, hidden, inter = 32, 4, 256, 128
    _, wgu, wd, _, _ = _moe_inputs(1, experts, top_k, hidden, inter, torch.bfloat16, seed=3)
    counts = fused_moe_module.tune(wgu, wd, top_k)
    assert {moe_block_m(t, experts) for t in counts[2:]} == {16, 32, 64}
    for kernel in (fused_moe_module._gate_up_kernel, fused_moe_module._down_kernel):
        assert {k[2] for k in kernel.cache if k[:2] == (hidden, inter)} >= {16, 32, 64}
    for kernel in (fused_moe_module._gate_up_gemv_kernel, fused_moe_module._down_gemv_kernel,
                   fused_moe_module._gate_up_gemv_tma_tuned):
        assert any(k[:3] == (hidden, inter, top_k) for k in kernel.cache)
    assert any(k[:2] == (hidden, inter) for k in fused_moe_module._down_gemv_tma_tuned.cache)
    # the timings are kept on disk for the next process (`kernels.tuning`), where this Triton can
    import inspect

    import triton

    if "cache_results" in inspect.signature(triton.autotune).parameters:
        assert all(k.cache_results for k in (fused_moe_module._gate_up_kernel, fused_moe_module._down_gemv_kernel))


@gpu
@needs_cuda
def test_gpu_ffn_tuning_covers_the_routers_skinny_gemm(tmp_path) -> None:  # noqa: ANN001
    """`FFNSide.tune_kernels` (startup) also runs the router's skinny GEMM at each token tile, so a decode or a
    short prefill never autotunes it mid-serving (graph capture's warm-up covers it only with graphs on)."""
    from crosspool.kernels import gemv as gemv_module
    from crosspool.models.make_model import make_model
    from crosspool.models.model import MoEModel

    d = make_model("tiny-qwen3-moe", tmp_path / "m", seed=1, progress=False)
    model = MoEModel.load(d, torch.bfloat16, "cuda", kernels="triton")
    assert model.ffn.tune_kernels() >= 1
    router = next(w["router"] for w in model.ffn.w.layers if "router" in w)
    n, k = router.shape
    tuned = {key[2] for key in gemv_module._gemv_kernel.cache if key[:2] == (n, k)}
    assert tuned >= set(gemv_module.token_tiles())


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k", [(6144, 2048), (2048, 2048), (50304, 2048), (64, 2048)])   # OLMoE QKV, o_proj,
# lm_head, router
@pytest.mark.parametrize("t", [1, 4, 8])
def test_gpu_gemv_bf16(n: int, k: int, t: int) -> None:
    x, w = _gemv_inputs(t, n, k, torch.bfloat16, seed=n + t)
    want32 = torch.nn.functional.linear(x.float(), w.float())
    want = torch.nn.functional.linear(x, w)
    _bf16_check(gemv(x, w), want, want32)
    _bf16_check(gemv(x, w, split_k=1), want, want32)


def test_gemv_linear_falls_back_off_the_gpu_or_when_disabled(monkeypatch) -> None:  # noqa: ANN001
    """`gemv.linear` (what the Triton path's projections and router call) is torch's linear unless enabled, on
    CUDA, at decode sizes."""
    from crosspool.kernels import gemv as gemv_module

    x, w = (t.cpu() for t in _gemv_inputs(3, 24, 40, torch.float32, seed=5))
    calls = []
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **k: calls.append(a) or torch.zeros(1))
    for enabled, rows in ((False, 0), (True, 0), (False, 8)):
        monkeypatch.setattr(gemv_module, "ENABLED", enabled)
        monkeypatch.setattr(gemv_module, "ROWS", rows)
        torch.testing.assert_close(gemv_module.linear(x, w), torch.nn.functional.linear(x, w))
        torch.testing.assert_close(gemv_module.linear(x, w, use=True), torch.nn.functional.linear(x, w))
    assert calls == []                     # CPU tensors never take the kernel, enabled or not


@gpu
@needs_cuda
def test_gpu_gemv_linear_takes_the_kernel_when_asked(monkeypatch) -> None:  # noqa: ANN001
    """On CUDA at decode sizes: `use=True` (the router, `gemv.ROUTER`) takes the kernel whatever ENABLED says,
    `use=False` never does, and the default follows ENABLED; more than MAX_GEMV_TOKENS rows never do."""
    from crosspool.kernels import gemv as gemv_module

    x, w = _gemv_inputs(3, 64, 2048, torch.bfloat16, seed=6)
    calls = []
    real = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(gemv_module, "ENABLED", False)
    gemv_module.linear(x, w)
    gemv_module.linear(x, w, use=False)
    assert calls == []
    y = gemv_module.linear(x, w, use=True)
    assert len(calls) == 1
    _bf16_check(y, torch.nn.functional.linear(x, w), torch.nn.functional.linear(x.float(), w.float()))
    monkeypatch.setattr(gemv_module, "ENABLED", True)
    gemv_module.linear(x, w)
    big = torch.randn(gemv_module.MAX_GEMV_TOKENS + 1, 2048, device=x.device, dtype=x.dtype)
    gemv_module.linear(big, w, use=True)
    assert len(calls) == 2


@gpu
@needs_cuda
def test_gpu_cuda_graph_gemv() -> None:
    """QKV and o_proj shapes (o_proj split-K by default, with a bias) captured once, replayed on new x in
    place: same bits as eager calls (the split-K sum is deterministic)."""
    x, w_qkv = _gemv_inputs(4, 6144, 2048, torch.bfloat16, seed=8)
    _, w_o = _gemv_inputs(4, 2048, 2048, torch.bfloat16, seed=9)
    bias = torch.randn(2048, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(2):   # warm up (compile, autotune) outside the capture
        gemv(x, w_qkv)
        gemv(x, w_o, bias)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_qkv = gemv(x, w_qkv)
        y_o = gemv(x, w_o, bias)
    x.copy_(_gemv_inputs(4, 1, 2048, torch.bfloat16, seed=10)[0])
    graph.replay()
    assert torch.equal(y_qkv, gemv(x, w_qkv))
    assert torch.equal(y_o, gemv(x, w_o, bias))
    _bf16_check(y_o, torch.nn.functional.linear(x, w_o, bias),
                torch.nn.functional.linear(x.float(), w_o.float(), bias.float()))


@gpu
@needs_cuda
def test_gpu_norm_rope_bf16() -> None:
    g = torch.Generator().manual_seed(0)
    x, res = (torch.randn(300, 4096, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
    w = (1 + 0.1 * torch.randn(4096, generator=g)).to(DEVICE, torch.bfloat16)
    normed, new_res = add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(new_res, res + x, atol=0, rtol=0)
    # normalize in fp32 then two bf16 roundings, as the reference: at most 1 ulp apart (fp32 sum order)
    torch.testing.assert_close(normed, ref.rms_norm(res + x, w, 1e-6), atol=0, rtol=2**-7)
    for interleaved in (False, True):
        q = torch.randn(300, 32, 128, generator=g).to(DEVICE, torch.bfloat16)
        k, v = (torch.randn(300, 4, 128, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
        cos, sin = _rope_tables(300, 128, g)
        buf = torch.zeros(40, 2, 2, 16, 4, 128, device=DEVICE, dtype=torch.bfloat16)
        slots = torch.randperm(40 * 16, generator=g)[:300].to(DEVICE)
        q_out = q.clone()
        rope_write_kv(q_out, k, v, cos, sin, slots, *buf[:, 1].unbind(1), interleaved)
        want_q = ref.apply_rope(q.float(), cos, sin, interleaved)
        _bf16_check(q_out, ref.apply_rope(q, cos, sin, interleaved), want_q)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind,heads,kv_heads", [("head", 32, 4), ("full", 16, 16)])   # Qwen3, OLMoE
def test_gpu_rope_write_kv_qk_norm_bf16(kind: str, heads: int, kv_heads: int) -> None:
    g = torch.Generator().manual_seed(1)
    t, dim, eps = 300, 128, 1e-6
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim, generator=g).to(DEVICE, torch.bfloat16)
    q, k, v = (x.view(t, -1, dim) for x in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1))
    n_q, n_k = (dim, dim) if kind == "head" else (heads * dim, kv_heads * dim)
    q_w, k_w = ((1 + 0.1 * torch.randn(n, generator=g)).to(DEVICE, torch.bfloat16) for n in (n_q, n_k))
    cos, sin = _rope_tables(t, dim, g)
    slots = torch.randperm(40 * 16, generator=g)[:t].to(DEVICE)
    buf = torch.zeros(40, 2, 16, kv_heads, dim, device=DEVICE, dtype=torch.bfloat16)

    def want(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        normed = ref.rms_norm(x, w, eps) if kind == "head" else ref.rms_norm(x.reshape(t, -1), w, eps).view(x.shape)
        return ref.apply_rope(normed, cos, sin, False)

    q_out = q.clone()
    rope_write_kv(q_out, k, v, cos, sin, slots, buf[:, 0], buf[:, 1], False, qk_norm=(kind, q_w, k_w, eps))
    _bf16_check(q_out, want(q, q_w), want(q.float(), q_w.float()))
    _bf16_check(buf[:, 0].flatten(0, 1)[slots], want(k, k_w), want(k.float(), k_w.float()))


@gpu
@needs_cuda
def test_gpu_cuda_graph_decode_and_moe() -> None:
    """Decode attention and fused MoE captured once, replayed with new context lengths / routing in place."""
    p = Paged([100, 3000], [1, 1], 32, 4, 128, torch.bfloat16, seed=5)
    x, wgu, wd, weights, ids = _moe_inputs(32, 64, 8, 1024, 512, torch.bfloat16, seed=6)
    lens = torch.tensor([50, 10], device=DEVICE)
    for _ in range(2):   # warm up (compile) outside the capture
        paged_decode_attention(p.q, *p.caches, p.tables, lens, 0.088, num_splits=8)
        fused_moe(x, wgu, wd, weights, ids)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn = paged_decode_attention(p.q, *p.caches, p.tables, lens, 0.088, num_splits=8)
        moe = fused_moe(x, wgu, wd, weights, ids)
    lens.copy_(p.context_lens)
    _, _, _, new_w, new_ids = _moe_inputs(32, 64, 8, 1024, 512, torch.bfloat16, seed=7)
    weights.copy_(new_w)
    ids.copy_(new_ids)
    graph.replay()
    torch.testing.assert_close(attn, paged_decode_attention(p.q, *p.caches, p.tables, lens, 0.088, num_splits=8))
    torch.testing.assert_close(moe, fused_moe(x, wgu, wd, weights, ids))


@gpu
@needs_cuda
def test_gpu_timings() -> None:
    """Prints time and fraction of copy bandwidth (4.25 TB/s measured, FACTS.md); asserts nothing about speed.
    Tuning (split counts, MoE tiles per shape) comes from reading these numbers."""
    from triton.testing import do_bench

    copy_bw = 4.25e12
    for ctx in (4096, 32768, 131072):
        for batch in (1, 8):
            p = Paged([ctx] * batch, [1] * batch, 32, 4, 128, torch.bfloat16, seed=0)
            ms = do_bench(lambda p=p, ctx=ctx: paged_decode_attention(
                p.q, *p.caches, p.tables, p.context_lens, 0.088, max_context_len=ctx))
            kv_bytes = batch * ctx * 2 * 4 * 128 * 2
            print(f"decode attn ctx {ctx:6d} batch {batch}: {ms * 1e3:8.1f} us, "
                  f"{kv_bytes / (ms * 1e-3) / copy_bw:.2f} of copy bw")
    experts, top_k, hidden, inter = 128, 8, 2048, 768
    for t in (1, 8, 64, 4096):
        x, wgu, wd, weights, ids = _moe_inputs(t, experts, top_k, hidden, inter, torch.bfloat16, seed=0)
        ms = do_bench(lambda x=x, wgu=wgu, wd=wd, weights=weights, ids=ids: fused_moe(x, wgu, wd, weights, ids))
        used = ids.unique().numel()
        weight_bytes = used * 3 * hidden * inter * 2
        flops = 2 * t * top_k * 3 * hidden * inter
        print(f"fused moe tokens {t:5d}: {ms * 1e3:8.1f} us, {weight_bytes / (ms * 1e-3) / copy_bw:.2f} of copy bw, "
              f"{flops / (ms * 1e-3) / 1e12:.1f} TFLOP/s")


# ------------------------------------------------------------------------------------------------
# Fused routing


@pytest.mark.parametrize("scoring,norm,k,experts,scale", [
    ("softmax", False, 8, 64, 1.0),      # OLMoE
    ("softmax", True, 8, 128, 1.0),      # Qwen3-MoE
    ("softmax", True, 2, 8, 1.0),        # Mixtral
    ("softmax", False, 6, 64, 1.0),      # DeepSeek-V2-Lite (greedy), top-k not a power of two
    ("sigmoid", True, 4, 60, 2.5),       # sigmoid scores, odd expert count, routed scaling
])
def test_fused_route(scoring: str, norm: bool, k: int, experts: int, scale: float) -> None:
    from crosspool.kernels.routing import route
    from crosspool.models.spec import RoutingSpec

    spec = RoutingSpec(num_experts=experts, top_k=k, scoring=scoring, norm_topk_prob=norm, topk_method="greedy",
                       routed_scaling_factor=scale)
    g = torch.Generator().manual_seed(experts + k)
    logits = (3 * torch.randn(37, experts, generator=g)).to(DEVICE)
    weights, ids = route(logits, spec)
    want_w, want_ids = ref.route(logits, spec, None)
    torch.testing.assert_close(ids, want_ids)     # random fp32 scores: no ties
    torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")    # the interpreter's sigmoid(-2000)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_fused_route_ties_and_zero_scores(scoring: str) -> None:
    """Ties go to the lowest expert index; scores that underflow to exactly 0 still rank above the padding lanes
    (60 experts in a block of 64), and among themselves by index; weights are the chosen scores."""
    from crosspool.kernels.routing import route
    from crosspool.models.spec import RoutingSpec

    experts, k = 60, 8
    spec = RoutingSpec(num_experts=experts, top_k=k, scoring=scoring, norm_topk_prob=False, topk_method="greedy",
                       routed_scaling_factor=1.0)
    g = torch.Generator().manual_seed(7)
    logits = torch.randint(-2, 3, (16, experts), generator=g).float()      # 5 values: ties everywhere
    logits[3] = -2000.0                                                   # every score 0 (softmax) / ~0
    logits[3, [40, 7]] = 0.0                                              # two equal winners, then zeros
    logits[5, 59] = 9.0                                                   # the last real expert wins
    weights, ids = route(logits.to(DEVICE), spec)
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    for row in range(logits.shape[0]):
        ranked = sorted(range(experts), key=lambda e, r=row: (-scores[r, e].item(), e))[:k]
        assert ids[row].tolist() == ranked, row
        torch.testing.assert_close(weights[row].cpu(), scores[row, ranked], atol=1e-6, rtol=1e-5)
    assert ids[5, 0] == 59 and (ids < experts).all()
    if scoring == "softmax":
        assert ids[3].tolist() == [7, 40, 0, 1, 2, 3, 4, 5] and (weights[3, 2:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_k", [1, 2, 4])
@pytest.mark.parametrize("t", [1, 3, 8])
@pytest.mark.parametrize("scoring,norm,k,experts", [("softmax", False, 8, 64), ("sigmoid", True, 4, 60)])
def test_route_linear_sums_the_routers_splits_in_the_routing_kernel(
        dtype: torch.dtype, split_k: int, t: int, scoring: str, norm: bool, k: int, experts: int) -> None:
    """The router's skinny GEMM with its K-split partials summed inside the routing kernel: bit for bit the
    routing of `gemv`'s own logits (same sum order and rounding), and the reference routing of the reference
    logits up to the logits' rounding."""
    from crosspool.kernels.routing import route, route_linear
    from crosspool.models.spec import RoutingSpec

    spec = RoutingSpec(num_experts=experts, top_k=k, scoring=scoring, norm_topk_prob=norm, topk_method="greedy",
                       routed_scaling_factor=1.0)
    x, w = _gemv_inputs(t, experts, 512, dtype, seed=t * 10 + split_k)
    x = 4 * x                                 # spread the logits: no near-ties between the k-th and the next
    weights, ids = route_linear(x, w, spec, split_k=split_k)
    want_w, want_ids = route(gemv(x, w, split_k=split_k), spec)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_w)
    ref_w, ref_ids = ref.route(torch.nn.functional.linear(x.float(), w.float()), spec, None)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, atol=5e-3 if dtype == torch.float16 else 1e-5, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,split_k", [(1, 1), (1, 4), (3, 2)])
def test_norm_route_linear_is_add_norm_then_route_linear(dtype: torch.dtype, t: int, split_k: int) -> None:
    """The post-attention residual add + RMSNorm inside the router's GEMV (`norm_route_linear`): h bit for bit the
    add kernel's, x the norm kernel's up to the order of the squares' sum (one rounding step), and the routing
    that of `route_linear` on the norm kernel's x. K = 600: the row is read in a chunk past its end."""
    from crosspool.kernels.routing import norm_route_linear, route_linear
    from crosspool.models.spec import RoutingSpec

    spec = RoutingSpec(num_experts=64, top_k=8, scoring="softmax", norm_topk_prob=False, topk_method="greedy",
                       routed_scaling_factor=1.0)
    g = torch.Generator().manual_seed(t + 7 * split_k)
    k = 600
    delta, residual = (torch.randn(t, k, generator=g).to(DEVICE, dtype) for _ in range(2))
    norm_w = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    router = (torch.randn(64, k, generator=g) / 6).to(DEVICE, dtype)
    want_x, want_h = add_rms_norm(delta, residual, norm_w, 1e-6)
    x, h, weights, ids = norm_route_linear(delta, residual, norm_w, 1e-6, router, spec, split_k=split_k)
    assert torch.equal(h, want_h) and x.dtype == want_x.dtype
    torch.testing.assert_close(x, want_x, rtol=2e-3 if dtype == torch.float16 else 1e-6, atol=1e-6)
    want_w, want_ids = route_linear(want_x, router, spec, split_k=split_k)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=2e-3 if dtype == torch.float16 else 1e-5, atol=1e-5)


def test_moe_tuning_skips_tiles_larger_than_the_problem() -> None:
    """Tiny shapes try only the tiles that fit them (each tile tried costs a compile and a timing at startup);
    real shapes keep every tile; the smallest tile always stays."""
    import triton

    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n in (64, 128) for k in (64, 128)
               for w in (4, 8)]
    prune = fused_moe_module.fits("inter_size", "hidden")
    tiny = prune(configs, {"hidden": 64, "inter_size": 32})
    assert {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in tiny} == {(64, 64)} and len(tiny) == 2
    mid = prune(configs, {"hidden": 128, "inter_size": 32})
    assert {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in mid} == {(64, 64), (64, 128)}
    assert prune(configs, {"hidden": 2048, "inter_size": 1024}) == configs          # OLMoE: all of them
    down = fused_moe_module.fits("hidden", "inter_size")(configs, {"hidden": 128, "inter_size": 32})
    assert {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in down} == {(64, 64), (128, 64)}


def test_pdl_stays_off_on_the_cpu_and_in_the_interpreter(monkeypatch) -> None:  # noqa: ANN001
    """`pdl.options` asks for programmatic dependent launch only for CUDA devices (never the interpreter), and
    only when enabled; the kernels take USE_PDL=False everywhere else (the CPU tests run them that way)."""
    from crosspool.kernels import pdl

    for enabled in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", enabled)
        assert pdl.options(torch.device("cpu")) == {"USE_PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.options(torch.device("cuda", 0)) == {"USE_PDL": False}


def test_pdl_is_on_unless_the_environment_turns_it_off() -> None:
    """On by default (measured faster on the H200, bit for bit equal); CROSSPOOL_PDL=0 turns it off, in this
    process and in spawned ranks, which read the same variable at import."""
    code = "from crosspool.kernels import pdl; print(pdl.ENABLED)"
    env = {k: v for k, v in os.environ.items() if k != "CROSSPOOL_PDL"}
    for value, want in ((None, "True"), ("0", "False"), ("1", "True")):
        run_env = env if value is None else {**env, "CROSSPOOL_PDL": value}
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want, (value, out)


def test_every_triton_kernel_compiles_for_hopper() -> None:
    """`python -m crosspool.kernels.aot`: every kernel, with a real call's constexprs and with and without PDL,
    lowers to a sm_90 cubin on this CPU machine (Triton needs no GPU to compile), so a code-generation error
    shows in CI rather than in device time."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-m", "crosspool.kernels.aot"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    from crosspool.kernels.aot import CASES

    assert f"{2 * len(CASES)}/{2 * len(CASES)} compiled for sm_90" in run.stdout


@pytest.mark.parametrize("rows,vocab", [(1, 50304), (3, 4097), (2, 1000), (1, 151936)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_argmax_matches_torch_with_ties_to_the_lowest_index(rows: int, vocab: int, dtype: torch.dtype) -> None:
    from crosspool.kernels.argmax import BLOCK, argmax

    g = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=g).to(DEVICE, dtype)
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))
    # the maximum repeated in a later chunk and later in its own chunk: the first one wins, as torch's does
    top = logits.max() + 1
    first = min(vocab - 1, BLOCK + 7) if vocab > BLOCK + 7 else vocab // 2
    for col in (vocab - 1, first + 3, first):
        logits[-1, col] = top
    assert int(argmax(logits)[-1]) == first == int(logits.argmax(dim=-1)[-1])
    strided = torch.randn(rows, vocab + 5, generator=g).to(DEVICE, dtype)[:, :vocab]    # rows not contiguous
    assert torch.equal(argmax(strided), strided.argmax(dim=-1))


def test_split_rows_time_each_candidate_split_count(monkeypatch) -> None:  # noqa: ANN001
    """`bench.kernels --only splits`: each (heads, batch, context) cell runs the default plan for the context
    ("engine") and for the model's longest context ("serving") and fixed alternatives (half, finer, ~512 keys a
    split), each a finite attention output (the timer stubbed); the used splits cover the context."""
    from crosspool.bench import kernels as bench_kernels
    from crosspool.kernels import paged_attention

    def run_once(fn, **kwargs) -> float:  # noqa: ANN001, ANN003
        out = fn()
        assert torch.isfinite(out.float()).all()
        return 1e-3

    monkeypatch.setattr(bench_kernels, "_ms", run_once)
    monkeypatch.setattr(paged_attention, "MAX_SPLITS", 8)
    monkeypatch.setattr(bench_kernels, "MAX_SPLITS", 8)
    rows = bench_kernels.split_rows(4e12, DEVICE, batches=(1, 2), contexts=(64,))
    cells = {(r["shape"], r["batch"], r["context"]) for r in rows}
    assert cells == {(s, b, 64) for s in ("olmoe-1b-7b", "qwen3-30b-a3b") for b in (1, 2)}
    for cell in cells:
        mine = [r for r in rows if (r["shape"], r["batch"], r["context"]) == cell]
        names = [r["plan"] for r in mine]
        assert names.count("engine") == names.count("serving") == 1
        fixed = [r for r in mine if r["plan"] not in ("engine", "serving")]
        assert len({r["splits"] for r in fixed}) == len(fixed) >= 2
        for r in mine:
            assert r["used"] <= r["splits"] and r["used"] * r["keys_per_split"] >= r["context"]
