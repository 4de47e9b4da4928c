"""The megakernel's attention (issue 4): batch-1 decode attention over the engine's paged KV cache, as items of a
chain. An attention phase's item is one (head, split): the producer (`_kv_slots`) streams the split's cached keys
and values through the ring, a key slot then a value slot for every 128 positions, and the consumers
(`_attend_item`) rotate q, fold in the new token's key and value, write those into the cache and publish the
split's normalized partial and its log-sum-exp. The head's last split to finish (an arrival count a head)
combines the head's splits into its output, which the next phase stages like any other input.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from crosspool.kernels.megakernel.common import (
    K_BLOCK,
    K_CHUNK,
    K_F_FOLD,
    K_F_FOLD_N,
    K_F_IN,
    K_F_IN_OFF,
    K_F_OUT_OFF,
    K_F_ROW0,
    K_F_SCALE,
    K_F_SOURCES,
    K_F_STRIDE,
    K_HEAD_DIM,
    K_KV_SLOT,
    K_STAGE_CHUNKS,
    _claim,
    _cta_barrier,
    _field,
    _lap,
    _poll,
    _poll_pair,
    _publish,
    _publish_where,
    _release,
    _stamp,
    _tag,
    _tagged,
    _tma_load,
    _value,
    _view,
    _word_of,
)
from crosspool.kernels.megakernel.plan import FEW_EXPERTS

SLOT_BLOCKS = gl.constexpr(8)     # KV blocks of one head in a ring slot (KV_SLOT positions)
K_FOLD = gl.constexpr(FEW_EXPERTS)  # rows a fold can have (`Phase.fold_rows`)


@gluon.jit
def _split_bounds(table_ptr, p, item, ctx):
    """Item `item` of attention phase p: its head, split, and the cached positions [lo, hi) it reads (the new
    token, at ctx - 1, comes from registers), and the end of its split's range (`plan.split_positions`)."""
    splits = _field(table_ptr, p, K_F_SOURCES)
    span = ((ctx + splits - 1) // splits + K_KV_SLOT - 1) // K_KV_SLOT * K_KV_SLOT
    lo = (item % splits) * span
    return item // splits, item % splits, lo, gl.minimum(lo + span, ctx - 1), lo + span


@gluon.jit
def _kv_slots(dkv, kvring, full, empty, s, table_ptr, code, ctx, bt_ptr, kv_layers, STAGES: gl.constexpr,
              LEAN: gl.constexpr = False):
    """Producer: an attention code's slots, from ring slot count s on; returns the new count. A slot holds one head's
    keys (or values) of SLOT_BLOCKS blocks, one TMA box a block; blocks past the split's last cached position
    repeat that block's id (the consumer masks those positions)."""
    p = (code >> 16) & 0x7FFF
    head, split, lo, hi, end = _split_bounds(table_ptr, p, code & 0xFFFF, ctx)
    layer = _field(table_ptr, p, K_F_ROW0)
    last = gl.maximum(hi - 1, 0) // K_BLOCK           # (an item with no cached positions reads entry 0, unused)
    j8 = gl.arange(0, SLOT_BLOCKS, layout=gl.BlockedLayout([1], [32], [1], [0]))
    # a slot's block ids by one load, the next slot's loaded before this one's loads wait for free slots
    ids = gl.load(bt_ptr + gl.minimum(lo // K_BLOCK + j8, last)).to(gl.int32)     # (int32 or int64 tables)
    for t in range(lo, hi, K_KV_SLOT):
        rows = (ids * kv_layers + layer) * 2 * K_BLOCK
        ids = gl.load(bt_ptr + gl.minimum((t + K_KV_SLOT) // K_BLOCK + j8, last)).to(gl.int32)
        for kv in range(2):                          # (loops, not unrolled: the kernel's code size, session 26)
            stage = _claim(empty, s, STAGES, LEAN)
            bar = full.index(stage)
            mbarrier.expect(bar, K_KV_SLOT * K_HEAD_DIM * 2)
            for j in range(SLOT_BLOCKS):
                row = gl.sum(gl.where(j8 == j, rows, 0), axis=0) + kv * K_BLOCK
                _tma_load(dkv, [row, head, 0], bar, kvring.index(stage * SLOT_BLOCKS + j))
            s += 1
    return s


@gluon.jit
def _wait_full(full, slot, consumed, t_wait, STAGES: gl.constexpr, PROFILE: gl.constexpr):
    """Wait for ring slot `slot` to land; PROFILE: `t_wait` plus the cycles that took."""
    start, _t = _lap(t_wait, t_wait, PROFILE)
    mbarrier.wait(full.index(slot), (consumed // STAGES) & 1)
    _m, t_wait = _lap(start, t_wait, PROFILE)
    return t_wait


@gluon.jit
def _rotate(xrows, row, cos, sin, half_l: gl.constexpr):
    """The head whose halves are rows `row`, `row + 1` of the staged input (64 values a row), rotated (RoPE,
    halves) and rounded to bf16."""
    a = xrows.index(row).load(half_l).to(gl.float32)
    b = xrows.index(row + 1).load(half_l).to(gl.float32)
    return (a * cos - b * sin).to(gl.bfloat16), (b * cos + a * sin).to(gl.bfloat16)


@gluon.jit
def _attend_item(ring, full, empty, consumed, xs, scratch, rows, table_ptr, p, item, ctx, words_ptr, epoch, err_ptr,
                 kv_ptr, bt_ptr, kv_layers, cos, sin, t_wait, stamp_at, STAGES: gl.constexpr, WARPS: gl.constexpr,
                 POLLS: gl.constexpr, PROFILE: gl.constexpr, SPLITS: gl.constexpr, LEAN: gl.constexpr = False,
                 parts_at=None, fold_ptr=None, FOLD: gl.constexpr = False):
    """Consumers: one attention item (head, split) of phase p (split SPLITS ways), whose q and k the staging left
    normed in xs. Returns the ring's consumed-slot count, and (PROFILE) `t_wait` plus the cycles it waited for
    slots to land; PROFILE also stamps the time at `stamp_at` once the item's partial is out, and at `parts_at`
    + 0..3 once q is rotated, after the slots, once the rows are combined, once the new token is folded in."""
    # a slot [SLOT_BLOCKS, BLOCK, HEAD_DIM] in registers: each thread holds 8 consecutive values of one token row
    # in every block (and with 4 warps 8 more, 64 further on), so a warp reads whole 128-B lines. Each of the BLOCK
    # rows (a token's place in its block) keeps its own running max, sum and output, combined once at the item's
    # end: a slot's scores reduce across a few lanes, and nothing is exchanged between warps a slot
    kv3: gl.constexpr = gl.BlockedLayout([SLOT_BLOCKS, 1, 8], [1, K_BLOCK // WARPS, 32 * WARPS // K_BLOCK],
                                         [1, WARPS, 1], [2, 1, 0])
    q_l: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, kv3))                  # [HEAD_DIM] against a slot
    sc_l: gl.constexpr = gl.SliceLayout(2, kv3)                                      # [SLOT_BLOCKS, BLOCK]
    row_l: gl.constexpr = gl.SliceLayout(0, sc_l)                                    # [BLOCK]: each row's state
    out_l: gl.constexpr = gl.SliceLayout(0, kv3)                                     # [BLOCK, HEAD_DIM]
    # the rows' combine: every row of one output column in one thread
    comb_l: gl.constexpr = gl.BlockedLayout([K_BLOCK, 1], [1, 32], [1, WARPS], [0, 1])   # [BLOCK, HEAD_DIM]
    vec_l: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, kv3))                 # [HEAD_DIM], rows combined
    half_l: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])               # [HEAD_DIM // 2]
    plain3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0])
    head, split, lo, hi, end = _split_bounds(table_ptr, p, item, ctx)
    heads = _field(table_ptr, p, K_F_STRIDE)
    hd = heads * K_HEAD_DIM
    scale = _field(table_ptr, p, K_F_SCALE).to(gl.float32, bitcast=True)          # softmax scale * log2(e)
    owner = (lo <= ctx - 1) & (ctx - 1 < end)                                     # the new token is in this split
    # q (and the owner's new k), rotated, into scratch rows 0 and 1
    rows_of: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])          # [n, m] viewed as rows of m
    xrows = _view(xs, [K_STAGE_CHUNKS * K_CHUNK // (K_HEAD_DIM // 2), K_HEAD_DIM // 2], rows_of)
    halves = _view(scratch, [8, K_HEAD_DIM // 2], rows_of)
    qa, qb = _rotate(xrows, 2 * head, cos, sin, half_l)
    halves.index(0).store(qa.to(gl.float32))
    halves.index(1).store(qb.to(gl.float32))
    if owner:                                        # only the new token's split needs its key
        ka, kb = _rotate(xrows, 2 * (heads + head), cos, sin, half_l)
        halves.index(2).store(ka.to(gl.float32))
        halves.index(3).store(kb.to(gl.float32))
    _cta_barrier()
    _stamp(parts_at + 0, PROFILE)
    d = gl.arange(0, K_HEAD_DIM, layout=vec_l)
    # the owner's new value and cache block, loaded now: their round trips pass under the slots' arithmetic
    src = _field(table_ptr, p, K_F_IN)
    vq, vh = _word_of(2 * hd + head * K_HEAD_DIM + d[None, :])
    v_at = _field(table_ptr, p, K_F_IN_OFF) + vq
    v_mask = (d[None, :] < K_HEAD_DIM) & owner
    vw = gl.load(words_ptr + v_at, mask=v_mask, other=0, volatile=True)
    new_block = gl.load(bt_ptr + gl.maximum(ctx - 1, 0) // K_BLOCK).to(gl.int64)
    layer = _field(table_ptr, p, K_F_ROW0)
    q3 = gl.expand_dims(gl.expand_dims(scratch.index(0).load(q_l), 0), 0)
    # the new token's key and score (the owner's; garbage elsewhere, unused), before the slots: off the item's path
    k_new = scratch.index(1).load(vec_l)
    s_new = gl.sum(scratch.index(0).load(vec_l) * k_new, axis=0) * scale
    blk = gl.arange(0, SLOT_BLOCKS, layout=gl.SliceLayout(1, sc_l))[:, None]
    tok = gl.arange(0, K_BLOCK, layout=row_l)[None, :]
    m = gl.full([K_BLOCK], -1.0e30, gl.float32, row_l)                           # finite: no inf - inf
    lsum = gl.zeros([K_BLOCK], gl.float32, row_l)
    acc = gl.zeros([K_BLOCK, K_HEAD_DIM], gl.float32, out_l)
    for t in range(lo, hi, K_KV_SLOT):
        # a slot of keys to registers, freed, then its scores; a slot of values likewise, weighed
        slot = consumed % STAGES
        t_wait = _wait_full(full, slot, consumed, t_wait, STAGES, PROFILE)
        keys = _view(ring.index(slot), [SLOT_BLOCKS, K_BLOCK, K_HEAD_DIM], plain3).load(kv3)
        consumed = _release(empty, slot, consumed, LEAN)
        s = gl.sum(keys.to(gl.float32) * q3, axis=2) * scale
        s = gl.where(t + blk * K_BLOCK + tok < hi, s, float("-inf"))
        m_new = gl.maximum(m, gl.max(s, axis=0))
        alpha = gl.exp2(m - m_new)
        pr = gl.exp2(s - m_new[None, :])
        lsum = lsum * alpha + gl.sum(pr, axis=0)
        slot = consumed % STAGES
        t_wait = _wait_full(full, slot, consumed, t_wait, STAGES, PROFILE)
        vals = _view(ring.index(slot), [SLOT_BLOCKS, K_BLOCK, K_HEAD_DIM], plain3).load(kv3)
        consumed = _release(empty, slot, consumed, LEAN)
        a_rows = gl.convert_layout(alpha, gl.SliceLayout(1, out_l))                # (the same rows: no move)
        acc = acc * a_rows[:, None] + gl.sum(vals.to(gl.float32) * gl.expand_dims(pr, 2), axis=0)
        m = m_new
    _stamp(parts_at + 1, PROFILE)
    # the rows combined (a row with no position weighs nothing: its sum and output are zero), through shared memory
    # in one exchange: each thread then sums one column's rows
    rows.store(acc)
    scratch.index(3).slice(0, K_BLOCK).store(m)
    scratch.index(3).slice(K_BLOCK, K_BLOCK).store(lsum)
    _cta_barrier()
    m_all = scratch.index(3).slice(0, K_BLOCK).load(gl.SliceLayout(1, comb_l))
    top = gl.max(m_all, axis=0)
    w = gl.exp2(m_all - top)
    lsum = gl.sum(scratch.index(3).slice(K_BLOCK, K_BLOCK).load(gl.SliceLayout(1, comb_l)) * w, axis=0)
    scratch.index(2).store(gl.sum(rows.load(comb_l) * w[:, None], axis=0))
    m = top
    _cta_barrier()
    acc = scratch.index(2).load(vec_l)
    _stamp(parts_at + 2, PROFILE)
    if owner:
        # the new token: its key (rotated) and value, folded in from registers and written into the cache
        if _tagged(vw, v_mask, _tag(epoch, src)) == 0:
            vw = _poll(words_ptr, v_at, v_mask, _tag(epoch, src), err_ptr, POLLS)
        v_new = gl.sum(_value(vw, vh), axis=0)
        m_new = gl.maximum(m, s_new)
        alpha = gl.exp2(m - m_new)
        pn = gl.exp2(s_new - m_new)
        lsum = lsum * alpha + pn
        acc = acc * alpha + pn * v_new
        m = m_new
        row = ((new_block * kv_layers + layer) * 2) * K_BLOCK + (ctx - 1) % K_BLOCK
        at = kv_ptr + (row * heads + head) * K_HEAD_DIM + d
        gl.store(at, k_new.to(gl.bfloat16))
        gl.store(at + K_BLOCK * heads * K_HEAD_DIM, v_new.to(gl.bfloat16))               # kv = 1: the values
    # publish the normalized partial (64 words) and its log-sum-exp (one word, fp32 bits); an empty split (past
    # the context) publishes zeros and -inf
    _stamp(parts_at + 3, PROFILE)
    some = lsum > 0.0
    scratch.index(0).store(gl.where(some, acc / gl.maximum(lsum, 1e-30), 0.0))    # (q's row: read before the slots)
    _cta_barrier()
    tag = _tag(epoch, p)
    out = words_ptr + _field(table_ptr, p, K_F_OUT_OFF)
    _publish_head(scratch.index(0), out + (split * hd + head * K_HEAD_DIM) // 2, tag, WARPS)
    lse = gl.where(some, m + gl.log2(gl.maximum(lsum, 1e-30)), float("-inf"))
    lse_word = (lse.to(gl.int32, bitcast=True).to(gl.int64) & 0xFFFFFFFF) | (tag.to(gl.int64) << 32)
    one = gl.arange(0, 1, layout=half_l)
    _publish(out + SPLITS * hd // 2 + split * heads + head + one, gl.full([1], 0, gl.int64, half_l) + lse_word)
    _stamp(stamp_at, PROFILE)                        # (profiling: the partial is out)
    # the head's last split to arrive combines its splits and publishes the head's output. The count is relaxed:
    # the last split polls the splits' words (each carries this step's tag), so it needs no ordering from the count
    _cta_barrier()
    combined = out + SPLITS * (hd // 2 + heads)                                   # then an arrival count a head
    arrived = gl.atomic_add(combined + hd // 2 + head, (head * 0 + 1).to(gl.int64), sem="relaxed", scope="gpu")
    if arrived % SPLITS == SPLITS - 1:
        # FOLD: a fold's rows of the head's columns (`Phase.fold`), loaded first: their round trip passes under the
        # poll
        fold_l: gl.constexpr = gl.BlockedLayout([2, 16], [4, 8], [WARPS, 1], [1, 0])     # [K_FOLD, HEAD_DIM]
        fe = gl.arange(0, K_FOLD, layout=gl.SliceLayout(1, fold_l))
        n_fold = head * 0
        fw = gl.zeros([K_FOLD, K_HEAD_DIM], gl.bfloat16, fold_l)
        if FOLD:
            n_fold = _field(table_ptr, p, K_F_FOLD_N)
            fd = gl.arange(0, K_HEAD_DIM, layout=gl.SliceLayout(0, fold_l))[None, :]
            fw = gl.load(fold_ptr + (_field(table_ptr, p, K_F_FOLD) + fe[:, None]).to(gl.int64) * hd +
                         head * K_HEAD_DIM + fd, mask=(fe[:, None] < n_fold) & (fd < K_HEAD_DIM), other=0.0)
        c2: gl.constexpr = gl.BlockedLayout([SPLITS, 1], [1, 32], [1, WARPS], [1, 0])     # [SPLITS, HEAD_DIM]
        sp = gl.arange(0, SPLITS, layout=gl.SliceLayout(1, c2))[:, None]
        dd = gl.arange(0, K_HEAD_DIM, layout=gl.SliceLayout(0, c2))[None, :]
        wq, wh = _word_of(sp * hd + head * K_HEAD_DIM + dd)
        pw, lw = _poll_pair(out, wq, SPLITS * hd // 2 + sp * heads + head + dd * 0, (sp < SPLITS) & (dd < K_HEAD_DIM),
                            tag, err_ptr, POLLS)
        lse_s = (lw & 0xFFFFFFFF).to(gl.int32).to(gl.float32, bitcast=True)
        big = gl.max(lse_s, axis=0)
        wgt = gl.exp2(lse_s - gl.expand_dims(gl.where(big == float("-inf"), 0.0, big), 0))
        # (a head with no position, a padding step's context 0: zeros, not NaN)
        scratch.index(3).store(gl.sum(wgt * _value(pw, wh), axis=0) / gl.maximum(gl.sum(wgt, axis=0), 1e-30))
        _cta_barrier()
        _publish_head(scratch.index(3), combined + head * K_HEAD_DIM // 2, tag, WARPS)
        if FOLD and n_fold > 0:                      # the fold's products with the head's output, as published
            a = scratch.index(3).load(gl.SliceLayout(0, fold_l)).to(gl.bfloat16).to(gl.float32)
            r = gl.sum(fw.to(gl.float32) * a[None, :], axis=1)
            word = r.to(gl.int32, bitcast=True).to(gl.int64) & 0xFFFFFFFF | (tag.to(gl.int64) << 32)
            _publish_where(combined + hd // 2 + heads + head * n_fold + fe, word, (fe < n_fold).to(gl.int32))
    _cta_barrier()                                   # scratch is reused by the next item
    return consumed, t_wait


@gluon.jit
def _publish_head(row, at, tag, WARPS: gl.constexpr):
    """A head's HEAD_DIM fp32 values in shared memory (`row`), published as 64 words from `at` on (bf16 pairs,
    `_word_of`'s order) with `tag`."""
    word_l: gl.constexpr = gl.BlockedLayout([1, 2, 1], [4, 1, 8], [WARPS, 1, 1], [2, 1, 0])   # [8, 2, 8]
    o = _view(row, [8, 2, 8], gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0])).load(word_l)
    bits = o.to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    hf = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, word_l)))[None, :, None]
    word = gl.sum(bits << (hf * 16), axis=1).to(gl.int64) & 0xFFFFFFFF | (tag.to(gl.int64) << 32)
    g = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(1, word_l)))[:, None]
    w8 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, word_l)))[None, :]
    _publish(at + g * 8 + w8, word)
