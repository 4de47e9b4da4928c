"""Paged attention over the KV pool's per-layer views: decode and prefill/extend, MHA/GQA and absorbed MLA.

Replaces `torch_ref.gather_kv` + `torch_ref.padded_attention` (and, for MLA, the expansion through
`kv_b_proj`: see `crosspool.kernels.mla` for the absorbed form and its torch reference). One Triton kernel
serves all four entry points (its key walk and output store are also `rope_decode`'s):

- `paged_decode_attention`: one new token per sequence, split-KV (flash-decoding) for long contexts;
- `paged_prefill_attention`: a varlen batch of query chunks (prefill, chunked prefill, mixed with decodes);
- `mla_decode_attention` / `mla_prefill_attention`: the same over MLA's cached latent, queries already
  projected into the latent space; the output stays in latent space (the caller applies W_UV).

Cache views are `[num_blocks, block_size, kv_heads, dim]` with any strides except a contiguous last dim
(the pool's views are strided: one block of all layers is contiguous). Key `j` of sequence `b` lives in block
`block_tables[b, j // block_size]`, slot `j % block_size`; its keys must already be written (the new tokens'
too). Token `i` of a sequence with `q_len` new tokens and `context_len` cached keys sits at position
`context_len - q_len + i` and sees keys `<=` that position. A sequence with context_len 0 (a padding row of
a CUDA-graph batch bucket) reads nothing and gets zeros.

Tiling. A program owns BLOCK_Q query tokens of one sequence times BLOCK_H query heads of one KV head's group
(tile rows are (token, head) pairs, head fastest), so every K/V tile is loaded once for the whole group. Keys
are walked BLOCK_N at a time, each key's page looked up in the block table (a tile may span pages). With
split-KV the key range of a row tile is cut into NUM_SPLITS parts handled by different programs; each leaves
a normalized partial output and its log-sum-exp, and `_combine_kernel` merges them. Scores, softmax and the
output accumulate in fp32; probabilities are rounded to the value dtype before the P @ V product, as the torch
reference does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from crosspool.kernels import pdl
from crosspool.kernels._common import block_dim, cdiv, dot_precision, env_int, next_pow2, num_sms
from crosspool.kernels.pdl import enter as pdl_enter

LOG2E = math.log2(math.e)
MAX_SPLITS = 64
# Decode launch shape, tunable for before/after runs (the defaults are the measured best): keys per split at least
# (CROSSPOOL_MIN_KEYS_PER_SPLIT), keys per block of the cache walk (CROSSPOOL_DECODE_BLOCK_N, heads of <= 256
# dims), warps of a program of <= 32 query rows (CROSSPOOL_DECODE_WARPS).
MIN_KEYS_PER_SPLIT = env_int("CROSSPOOL_MIN_KEYS_PER_SPLIT", 128, minimum=1)
# Long contexts: a sequence's keys go to splits of about TARGET_KEYS_PER_SPLIT keys (CROSSPOOL_TARGET_KEYS_PER_SPLIT)
# beyond the two-wave count, up to about LONG_WAVES waves of programs (CROSSPOOL_LONG_SPLIT_WAVES; 2: the two-wave
# rule alone). The H200 sweep behind these is docs/benchmarks.md section 7, session 11.
TARGET_KEYS_PER_SPLIT = env_int("CROSSPOOL_TARGET_KEYS_PER_SPLIT", 1024, minimum=1)
LONG_WAVES = env_int("CROSSPOOL_LONG_SPLIT_WAVES", 8, minimum=1)
# ... only for grids of few (sequence, KV head, head block) tiles: at most one per LONG_SMS_PER_TILE SMs
# (CROSSPOOL_LONG_SMS_PER_TILE; 1: up to one per SM). Session 12's sweep: 32 tiles (Qwen3 at batch 8) gain at 32k
# (146.7 us with 36 splits against 167.4 with 9), while 128 tiles (Qwen3 at batch 32) lose at 8k (136.6 us with the
# two-wave 3 against 151.7 with 8), and 512 (OLMoE at batch 32) too (481.3 with 1 against 511.0 with 3).
LONG_SMS_PER_TILE = env_int("CROSSPOOL_LONG_SMS_PER_TILE", 4, minimum=1)
DECODE_BLOCK_N = env_int("CROSSPOOL_DECODE_BLOCK_N", 64, minimum=16)
DECODE_WARPS = env_int("CROSSPOOL_DECODE_WARPS", 4, minimum=1)

@triton.jit
def _attend(
    q, q_pe, k_ptr, v_ptr, block_tables_ptr, seq, kv_head, lo, hi, q_pos, m, l_sum, acc, scale_log2,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PE_DIM: tl.constexpr, BLOCK_PE: tl.constexpr,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, V_IS_K: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax of the tile's rows (queries q, plus q_pe against the D.. part of each cache row when
    PE_DIM > 0) over keys [lo, hi) of sequence `seq`, KV head `kv_head`, folded into (m, l_sum, acc)."""
    for start in tl.range(lo, hi, BLOCK_N):
        k_pos, k_ok, page, slot = _block_rows(block_tables_ptr, seq, start, hi, stride_bt, PAGE_SIZE, BLOCK_N)
        k = _cache_rows(k_ptr, page, slot, k_ok, kv_head, stride_kb, stride_ks, stride_kh, 0, D, BLOCK_D)
        m, l_sum, acc = _fold_block(q, q_pe, k, k, k, k_ptr, v_ptr, page, slot, k_pos, k_ok, kv_head, q_pos, m,
                                    l_sum, acc, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                    stride_vh, D, PE_DIM, BLOCK_PE, DV, BLOCK_DV, V_IS_K, False, DOT_PRECISION)
    return m, l_sum, acc


@triton.jit
def _block_rows(block_tables_ptr, seq, start, hi, stride_bt, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [start, start + BLOCK_N) of sequence `seq`: their positions, which are below `hi`, and their pages
    and slots in the cache (through the block table)."""
    k_pos = start + tl.arange(0, BLOCK_N)
    k_ok = k_pos < hi
    page = tl.load(block_tables_ptr + seq * stride_bt + k_pos // PAGE_SIZE, mask=k_ok, other=0).to(tl.int64)
    return k_pos, k_ok, page, k_pos % PAGE_SIZE


@triton.jit
def _cache_rows(ptr, page, slot, ok, head, stride_b, stride_s, stride_h, col, COLS: tl.constexpr,
                BLOCK: tl.constexpr):
    """Columns [col, col + COLS) of a block's cache rows (keys, MLA's shared rotated key, or values)."""
    row = page * stride_b + slot * stride_s + head * stride_h
    offs = tl.arange(0, BLOCK)
    return tl.load(ptr + row[:, None] + col + offs[None, :], mask=ok[:, None] & (offs < COLS)[None, :], other=0.0)


@triton.jit
def _fold_block(q, q_pe, k, k_pe, v, k_ptr, v_ptr, page, slot, k_pos, k_ok, kv_head, q_pos, m, l_sum, acc,
                scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, D: tl.constexpr,
                PE_DIM: tl.constexpr, BLOCK_PE: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                V_IS_K: tl.constexpr, LOADED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One block of keys k folded into the online softmax (m, l_sum, acc) of the rows q. With PE_DIM > 0, q_pe
    against the rows' D.. part (k_pe); the values are the keys when V_IS_K. LOADED: k_pe and v were loaded by the
    caller, ahead of time; else they are loaded here, k_pe after the first dot and v after the softmax (the order
    the pipelined cache walk has always had)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if PE_DIM > 0:
        if not LOADED:
            k_pe = _cache_rows(k_ptr, page, slot, k_ok, kv_head, stride_kb, stride_ks, stride_kh, D, PE_DIM, BLOCK_PE)
        s += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION)
    s = s * scale_log2
    visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    # rows that have seen no visible key yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_sum = l_sum * alpha + tl.sum(p, 1)
    if V_IS_K:
        v = k
    elif not LOADED:
        v = _cache_rows(v_ptr, page, slot, k_ok, kv_head, stride_vb, stride_vs, stride_vh, 0, DV, BLOCK_DV)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_sum, acc


@triton.jit
def split_keys(kv_end, NUM_SPLITS: tl.constexpr, wave_splits, target_keys, BLOCK_N: tl.constexpr):
    """Keys per split of a row tile that sees keys [0, kv_end) (`SplitPlan`): its context over the grid's
    NUM_SPLITS, or over `wave_splits` if that gives splits of fewer than `target_keys` keys, in whole blocks.
    Splits past the context are empty. With wave_splits == NUM_SPLITS: kv_end / NUM_SPLITS."""
    share = tl.maximum(tl.cdiv(kv_end, NUM_SPLITS), tl.minimum(target_keys, tl.cdiv(kv_end, wave_splits)))
    return tl.cdiv(share, BLOCK_N) * BLOCK_N


@triton.jit
def _store_rows(
    m, l_sum, acc, out_ptr, lse_ptr, tok, head, row_ok, split,
    stride_ot, stride_oh, stride_os, stride_lt, stride_lh,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    """The tile's normalized output: final with one split, else this split's fp32 part and log-sum-exp."""
    offs_dv = tl.arange(0, BLOCK_DV)
    o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    o_ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :]
    o_mask = row_ok[:, None] & (offs_dv < DV)[None, :]
    if NUM_SPLITS == 1:
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(o_ptrs + split * stride_os, o, mask=o_mask)
        lse = tl.where(l_sum > 0, m + tl.log2(tl.where(l_sum > 0, l_sum, 1.0)), float("-inf"))
        tl.store(lse_ptr + tok * stride_lt + head * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _paged_attention_kernel(
    q_ptr, q_pe_ptr, k_ptr, v_ptr, block_tables_ptr, cu_q_ptr, context_lens_ptr, out_ptr, lse_ptr,
    scale_log2, wave_splits, target_keys,
    stride_qt, stride_qh, stride_pt, stride_ph,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh, stride_os,
    stride_lt, stride_lh,
    GROUP: tl.constexpr, HEAD_BLOCKS: tl.constexpr, NUM_SPLITS: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PE_DIM: tl.constexpr, BLOCK_PE: tl.constexpr,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, V_IS_K: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_DECODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_enter(USE_PDL)
    pid = tl.program_id(0)
    q_block = tl.program_id(1)
    seq = tl.program_id(2)
    split = pid % NUM_SPLITS
    head_block = (pid // NUM_SPLITS) % HEAD_BLOCKS
    kv_head = pid // (NUM_SPLITS * HEAD_BLOCKS)

    if IS_DECODE:
        q_start = seq
        q_len = 1
    else:
        q_start = tl.load(cu_q_ptr + seq)
        q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    first_q = q_block * BLOCK_Q
    if first_q >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_Q * BLOCK_H)
    qi = first_q + rows // BLOCK_H
    hi = head_block * BLOCK_H + rows % BLOCK_H
    row_ok = (qi < q_len) & (hi < GROUP)
    head = kv_head * GROUP + hi
    q_pos = ctx - q_len + qi
    tok = (q_start + qi).to(tl.int64)
    m = tl.full([BLOCK_Q * BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_Q * BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_H, BLOCK_DV], tl.float32)

    # Keys this row tile may see: [0, kv_end); this split's share: [lo, hi). An empty split stores at once.
    kv_end = ctx - q_len + tl.minimum(q_len, first_q + BLOCK_Q)
    per_split = split_keys(kv_end, NUM_SPLITS, wave_splits, target_keys, BLOCK_N)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, kv_end)
    if lo >= kv_end:
        _store_rows(m, l_sum, acc, out_ptr, lse_ptr, tok, head, row_ok, split, stride_ot, stride_oh, stride_os,
                    stride_lt, stride_lh, DV, BLOCK_DV, NUM_SPLITS)
        return

    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    if PE_DIM > 0:
        offs_pe = tl.arange(0, BLOCK_PE)
        q_pe = tl.load(q_pe_ptr + tok[:, None] * stride_pt + head[:, None] * stride_ph + offs_pe[None, :],
                       mask=row_ok[:, None] & (offs_pe < PE_DIM)[None, :], other=0.0)
    else:
        q_pe = q

    m, l_sum, acc = _attend(q, q_pe, k_ptr, v_ptr, block_tables_ptr, seq, kv_head, lo, hi, q_pos, m, l_sum, acc,
                            scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                            D, BLOCK_D, PE_DIM, BLOCK_PE, DV, BLOCK_DV, V_IS_K, PAGE_SIZE, BLOCK_N, DOT_PRECISION)
    _store_rows(m, l_sum, acc, out_ptr, lse_ptr, tok, head, row_ok, split, stride_ot, stride_oh, stride_os,
                stride_lt, stride_lh, DV, BLOCK_DV, NUM_SPLITS)


@triton.jit
def _combine_kernel(
    part_ptr, lse_ptr, out_ptr, num_heads,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_HC: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """out[t, h] = sum_s 2^(lse_s - max) * part_s / sum_s 2^(lse_s - max) (log-sum-exp merge, base 2), for
    BLOCK_HC heads of one token per program, one split at a time (loading several splits' parts as one tile was
    slower on the H200: session 12, benchmarks section 7)."""
    pdl_enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HC + tl.arange(0, BLOCK_HC)
    h_ok = heads < num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_row = lse_ptr + t * stride_lt + heads * stride_lh
    lse = tl.load(lse_row[:, None] + offs_s[None, :], mask=h_ok[:, None] & (offs_s[None, :] < NUM_SPLITS),
                  other=float("-inf"))
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_HC], tl.float32)
    o = tl.zeros([BLOCK_HC, BLOCK_DV], tl.float32)
    o_mask = h_ok[:, None] & (offs_dv[None, :] < DV)
    part_rows = part_ptr + t * stride_pt + heads[:, None] * stride_ph + offs_dv[None, :]
    # an empty split's part (weight 0) is not read
    for s in tl.static_range(NUM_SPLITS):
        w = tl.exp2(tl.load(lse_row + s, mask=h_ok, other=float("-inf")) - m)
        total += w
        o += w[:, None] * tl.load(part_rows + s * stride_ps, mask=o_mask & (w > 0)[:, None], other=0.0)
    o = o / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + offs_dv[None, :], o.to(out_ptr.dtype.element_ty),
             mask=o_mask)


def _tiles(decode: bool, group: int, dv: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_H, BLOCK_N). Decode: one token, a whole group of heads per program (at least 16 rows
    for tl.dot). Prefill: about 64 rows (32 for MLA's 512-wide latent accumulator) of tokens x heads."""
    rows, block_n = (32, 32) if dv > 256 else (64, 64)
    if decode:
        return 1, max(16, min(next_pow2(group), rows)), block_n if dv > 256 else DECODE_BLOCK_N
    block_h = min(next_pow2(group), rows)
    return max(1, rows // block_h), block_h, block_n


@dataclass(frozen=True, slots=True)
class SplitPlan:
    """Split-KV launch shape: `splits` programs per (sequence, KV head, head block) in the grid, and how each
    row tile divides its own context among them (`split_keys`): over `splits`, or over `wave_splits` where that
    gives splits of fewer than `target_keys` keys. A graph keeps one plan per bucket; contexts shorter than the
    one it was sized for use fewer splits, and the rest exit at once (the combine skips them)."""

    splits: int
    wave_splits: int
    target_keys: int

    @classmethod
    def fixed(cls, splits: int) -> SplitPlan:
        """Exactly `splits` parts of every context (a caller's explicit split count)."""
        return cls(splits, splits, 1)

    def keys_per_split(self, context: int, block_n: int) -> int:
        """`split_keys` on the host: the keys each split of a `context`-key row tile reads."""
        share = max(cdiv(context, self.splits), min(self.target_keys, cdiv(context, self.wave_splits)))
        return cdiv(share, block_n) * block_n

    def used(self, context: int, block_n: int) -> int:
        """Splits that read keys for a `context`-key row tile (the others exit at once)."""
        return cdiv(context, self.keys_per_split(context, block_n))


def default_split_plan(programs: int, device: torch.device, max_context_len: int | None = None) -> SplitPlan:
    """Enough splits to fill about two waves of the GPU (never under MIN_KEYS_PER_SPLIT keys each when the
    longest context is known) and, for long contexts, splits of about TARGET_KEYS_PER_SPLIT keys up to about
    LONG_WAVES waves of programs (at most MAX_SPLITS). Fixed per (batch, heads) bucket, so a CUDA graph keeps
    it; each sequence divides its own context (`split_keys`), so short contexts run the two-wave count. Grids of
    more than one tile per LONG_SMS_PER_TILE SMs run the two-wave rule alone."""
    wave = two_wave_splits(programs, device)
    if programs * LONG_SMS_PER_TILE > num_sms(device):
        return SplitPlan(two_wave_splits(programs, device, max_context_len), wave, TARGET_KEYS_PER_SPLIT)
    long = cdiv(LONG_WAVES * num_sms(device), max(programs, 1))
    if max_context_len is not None:
        long = min(long, cdiv(max_context_len, TARGET_KEYS_PER_SPLIT))
    splits = max(two_wave_splits(programs, device, max_context_len), min(long, MAX_SPLITS))
    return SplitPlan(splits, wave, TARGET_KEYS_PER_SPLIT)


def two_wave_splits(programs: int, device: torch.device, max_context_len: int | None = None) -> int:
    """Splits so the grid fills about two waves of the GPU (at most MAX_SPLITS), never under MIN_KEYS_PER_SPLIT
    keys each when the longest context is known: the whole rule before session 11."""
    splits = cdiv(2 * num_sms(device), max(programs, 1))
    if max_context_len is not None:
        splits = min(splits, cdiv(max_context_len, MIN_KEYS_PER_SPLIT))
    return max(1, min(splits, MAX_SPLITS))


def split_plan(num_splits: int | SplitPlan | None, programs: int, device: torch.device,
               max_context_len: int | None) -> SplitPlan:
    """A caller's plan, or explicit split count as a fixed plan, else the default plan."""
    if num_splits is None:
        return default_split_plan(programs, device, max_context_len)
    if isinstance(num_splits, SplitPlan):
        return num_splits
    return SplitPlan.fixed(num_splits)


def _split_outputs(out: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """Where the attention kernel writes: `out` itself with one split, else fp32 parts [T, H, splits, Dv] and
    their log-sum-exps [T, H, splits] for `_combine`. Returns (target, lse, (stride_os, stride_lt, stride_lh))."""
    if num_splits == 1:
        return out, out, (0, 0, 0)
    t, hq, dv = out.shape
    part = torch.empty(t, hq, num_splits, dv, dtype=torch.float32, device=out.device)
    lse = torch.empty(t, hq, num_splits, dtype=torch.float32, device=out.device)
    return part, lse, (part.stride(2), lse.stride(0), lse.stride(1))


def _combine(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    """Merge the splits' parts into `out`."""
    t, hq, num_splits, dv = part.shape
    # enough programs to spread the merge over the GPU: at batch 1 one program per head (a single program
    # walking every head's splits took longer than the attention itself)
    block_hc = min(next_pow2(hq), max(1, 4096 // next_pow2(dv)), next_pow2(cdiv(t * hq, 2 * num_sms(out.device))))
    _combine_kernel[(t, cdiv(hq, block_hc))](
        part, lse, out, hq,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, BLOCK_S=next_pow2(num_splits), DV=dv, BLOCK_DV=next_pow2(dv), BLOCK_HC=block_hc,
        **pdl.options(out.device),
    )


def _attention(
    q: torch.Tensor, q_pe: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
    block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor | None, context_lens: torch.Tensor, scale: float,
    max_q_len: int, num_splits: int | SplitPlan | None, max_context_len: int | None, out: torch.Tensor | None,
    dv: int,
) -> torch.Tensor:
    t, hq, d = q.shape
    _, page_size, hkv, _ = k_cache.shape
    assert hq % hkv == 0, "query heads must be a multiple of KV heads"
    for x in (q, q_pe, k_cache, v_cache):
        assert x is None or x.stride(-1) == 1, "last dim must be contiguous"
    decode = cu_seqlens_q is None
    batch = context_lens.shape[0]
    group = hq // hkv
    block_q, block_h, block_n = _tiles(decode, group, dv)
    head_blocks = cdiv(group, block_h)
    q_blocks = cdiv(max_q_len, block_q)
    plan = split_plan(num_splits, batch * q_blocks * hkv * head_blocks, q.device, max_context_len)
    num_splits = plan.splits
    if out is None:
        out = q.new_empty(t, hq, dv)
    target, lse, (stride_os, stride_lt, stride_lh) = _split_outputs(out, num_splits)
    pe_dim = 0 if q_pe is None else q_pe.shape[-1]
    q_pe_arg = q if q_pe is None else q_pe
    v_arg = k_cache if v_cache is None else v_cache
    grid = (hkv * head_blocks * num_splits, q_blocks, batch)
    _paged_attention_kernel[grid](
        q, q_pe_arg, k_cache, v_arg, block_tables, context_lens if decode else cu_seqlens_q, context_lens,
        target, lse,
        scale * LOG2E, plan.wave_splits, plan.target_keys,
        q.stride(0), q.stride(1), q_pe_arg.stride(0), q_pe_arg.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_arg.stride(0), v_arg.stride(1), v_arg.stride(2),
        block_tables.stride(0),
        target.stride(0), target.stride(1), stride_os,
        stride_lt, stride_lh,
        GROUP=group, HEAD_BLOCKS=head_blocks, NUM_SPLITS=num_splits,
        D=d, BLOCK_D=block_dim(d), PE_DIM=pe_dim, BLOCK_PE=block_dim(pe_dim),
        DV=dv, BLOCK_DV=block_dim(dv), V_IS_K=v_cache is None,
        PAGE_SIZE=page_size, BLOCK_Q=block_q, BLOCK_H=block_h, BLOCK_N=block_n,
        IS_DECODE=decode, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=(DECODE_WARPS if decode else 4) if block_q * block_h <= 32 else 8, **pdl.options(q.device),
    )
    if num_splits > 1:
        _combine(target, lse, out)
    return out


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, *, num_splits: int | SplitPlan | None = None,
    max_context_len: int | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention, one query token per sequence.

    q [B, Hq, D]; k_cache [num_blocks, block_size, Hkv, D], v_cache [num_blocks, block_size, Hkv, Dv] (strided);
    block_tables [B, max_blocks] int32/int64; context_lens [B] (keys cached, the new token's included).
    Query head h reads KV head h // (Hq / Hkv). Returns (or fills `out`) [B, Hq, Dv] in q's dtype.
    num_splits: KV partitions per sequence, each of 1/num_splits of its context, or a `SplitPlan` (default:
    `default_split_plan` for max_context_len). Each sequence divides its own context, so the grid does not
    depend on context lengths (CUDA-graph friendly)."""
    return _attention(q, None, k_cache, v_cache, block_tables, None, context_lens, scale, 1, num_splits,
                      max_context_len, out, v_cache.shape[-1])


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float, max_q_len: int, *,
    num_splits: int = 1, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal prefill/extend attention of a varlen batch over paged KV (chunked prefill, mixed with decodes).

    q [T, Hq, D]: sequence b's new tokens are rows cu_seqlens_q[b]:cu_seqlens_q[b+1] (cu_seqlens_q [B+1]);
    context_lens [B]: keys cached after this step (its new tokens' keys already written); max_q_len: an upper
    bound of the per-sequence new-token counts (sets the grid). Other arguments as `paged_decode_attention`.
    Returns [T, Hq, Dv].
    """
    return _attention(q, None, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_q_len,
                      num_splits, None, out, v_cache.shape[-1])


def mla_decode_attention(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, *, num_splits: int | SplitPlan | None = None,
    max_context_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode: q_latent [B, H, R] (q_nope @ W_UK), q_pe [B, H, Rd] (rotated); latent_cache
    [num_blocks, block_size, 1, R + Rd] (normed latent, then rotated shared key). Score = (q_latent . c +
    q_pe . k_pe) * scale; returns the latent-space output [B, H, R] (apply W_UV next)."""
    r = q_latent.shape[-1]
    assert latent_cache.shape[2] == 1 and latent_cache.shape[-1] == r + q_pe.shape[-1]
    return _attention(q_latent, q_pe, latent_cache, None, block_tables, None, context_lens, scale, 1, num_splits,
                      max_context_len, out, r)


def mla_prefill_attention(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float, max_q_len: int, *,
    num_splits: int = 1, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA over a varlen batch (arguments as `paged_prefill_attention` and `mla_decode_attention`).
    Returns [T, H, R]."""
    r = q_latent.shape[-1]
    assert latent_cache.shape[2] == 1 and latent_cache.shape[-1] == r + q_pe.shape[-1]
    return _attention(q_latent, q_pe, latent_cache, None, block_tables, cu_seqlens_q, context_lens, scale,
                      max_q_len, num_splits, None, out, r)
