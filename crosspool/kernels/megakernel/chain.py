"""The megakernel's GPU side (issue 4; the package docstring has the design): the persistent Gluon kernel that
runs a planned chain (`_chain_kernel`: a producer warp, `produce.py`, and the consumer warps, `_consume`), and
`Chain`, which binds a chain to its weights and device buffers.
Needs Gluon (Triton >= 3.6) and an sm_90 GPU to run; it imports anywhere Triton does.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from crosspool.kernels._common import num_sms
from crosspool.kernels.megakernel.attend import SLOT_BLOCKS, _attend_item
from crosspool.kernels.megakernel.common import (
    K_ATTENTION,
    K_BLOCK,
    K_CHUNK,
    K_F_DYN,
    K_F_IN,
    K_F_KC,
    K_F_KIND,
    K_F_ORDINAL,
    K_F_OUT_OFF,
    K_F_PRODUCER_RANKS,
    K_F_RES,
    K_F_RES_OFF,
    K_F_ROUTE,
    K_F_ROUTE_LAST,
    K_F_ROUTE_SCALED,
    K_GROUP,
    K_HEAD_DIM,
    K_MAX_ORDINALS,
    K_MAX_TOP_K,
    K_ROWS,
    K_STAGE_CHUNKS,
    K_SWIGLU,
    SHARED_KIB,
    _cta_barrier,
    _field,
    _first_item,
    _items_of,
    _lap,
    _poll,
    _publish,
    _release,
    _stamp,
    _tag,
    _tagged,
    _tiles_per_item,
    _value,
    _view,
    _word_of,
)
from crosspool.kernels.megakernel.plan import (
    ATTENTION,
    BLOCK,
    CHUNK,
    F_DYN,
    F_KC,
    F_KIND,
    F_PRODUCER_RANKS,
    F_ROUTE_N,
    FEW_EXPERTS,
    HEAD_DIM,
    MAX_TOP_K,
    ROWS,
    STAGE_CHUNKS,
    Phase,
    combined_offset,
    dynamic_phases,
    plan,
    tile_lists,
    unpack,
)
from crosspool.kernels.megakernel.produce import _produce
from crosspool.kernels.megakernel.rank import K_FEW, _gates, _producer_ranking, _rank
from crosspool.kernels.megakernel.stage import _stage


@gluon.jit
def _consume(ring, full, empty, ranked, rowbase, picked, lbuf, itemq, xs, scratch, attn_rows, table_ptr, num_phases,
             x_ptr, last_ptr, norms_ptr, eps, words_ptr, routes_ptr, experts_ptr, n_ord, epoch_ptr, done_ptr, err_ptr,
             nprog, prof_ptr, kv_ptr, kv_layers, ctx_ptr, bt_ptr, cos_ptr, sin_ptr, STAGES: gl.constexpr,
             BOXES: gl.constexpr, WARPS: gl.constexpr, POLLS: gl.constexpr, COMPUTE: gl.constexpr,
             PROFILE: gl.constexpr,
             SPLITS: gl.constexpr, DYNAMIC: gl.constexpr, LEAN: gl.constexpr, counters_ptr, KEYS: gl.constexpr,
             COUNTED: gl.constexpr):
    """The consumer warps: each phase's input staged (polled, normed), the router ranked, the items computed from
    the ring's slots, and their outputs published as tagged words."""
    pid = gl.program_id(0)
    # a ring slot in registers: each thread holds 8 columns of every box (its 4-box sum is in-thread); a warp
    # reads a 512-B row
    tile3: gl.constexpr = gl.BlockedLayout([BOXES, 1, 8], [1, 1, 32], [1, WARPS, 1], [2, 1, 0])
    acc_l: gl.constexpr = gl.SliceLayout(0, tile3)                                    # [ROWS, CHUNK]
    rows_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    stage_l: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [WARPS, 1], [1, 0])     # the ranking's
    # `xgroups.index(g)` is staged chunks g * BOXES.. as [BOXES, 1, CHUNK], the input of one ring slot (a slot's
    # first chunk is a multiple of BOXES)
    xgroups = _view(xs, [K_STAGE_CHUNKS // BOXES, BOXES, 1, K_CHUNK],
                    gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0]))
    epoch = gl.load(epoch_ptr)
    zero = pid * 0
    # the step's context length and RoPE cos/sin (attention), loaded once: no item waits on them
    ctx = gl.load(ctx_ptr).to(gl.int32)
    rope_j = gl.arange(0, K_HEAD_DIM // 2, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
    cos = gl.load(cos_ptr + rope_j)
    sin = gl.load(sin_ptr + rope_j)
    expert_base = experts_ptr + pid * n_ord * 2 * K_MAX_TOP_K
    ready = zero                                     # routed phases this program has ranked
    consumed = zero
    # profiling (PROFILE): SM cycles spent polling and staging inputs, on the rest of staging (norms, waits,
    # barriers), ranking, on items' starts and ends (reductions, the residual, the stores), waiting for slots to
    # land, loading a slot + releasing it, and on the arithmetic
    mark, _t = _lap(zero.to(gl.int64), zero.to(gl.int64), PROFILE)
    start = mark
    prof = prof_ptr + pid * (16 + 8 * num_phases)    # this program's counters, then 8 timestamps a phase
    t_stage = zero.to(gl.int64)
    t_poll = t_stage
    t_rank = t_stage
    t_start = t_stage
    t_end = t_stage
    t_wait = t_stage
    t_release = t_stage
    t_math = t_stage
    t_attend = t_stage
    t_kv_wait = t_stage
    rows = gl.arange(0, K_ROWS, layout=rows_l)
    for p in range(num_phases):
        kind = _field(table_ptr, p, K_F_KIND)
        kc = _field(table_ptr, p, K_F_KC)
        src = _field(table_ptr, p, K_F_IN)
        router = _field(table_ptr, p, K_F_ROUTE)
        first = _first_item(table_ptr, p, pid, nprog)
        n_items = _items_of(table_ptr, p, first, nprog)
        dyn = zero
        if DYNAMIC:
            dyn = _field(table_ptr, p, K_F_DYN)
        _cta_barrier()                               # every warp is done with the previous phase's input
        _stamp(prof + 16 + 8 * p, PROFILE)
        # the router ranked before the input is staged: the producer can start on the experts' tiles meanwhile
        # (staged first, the step took 25 us longer: session 19)
        ordinal = gl.maximum(_field(table_ptr, p, K_F_ORDINAL), 0)
        ranks = (router >= 0) & (ordinal >= ready)
        scaled = zero
        defer = zero
        ids = gl.zeros([K_MAX_TOP_K, 1], gl.int32, stage_l)
        logits = gl.zeros([1, K_FEW], gl.float32, stage_l)
        experts = gl.arange(0, K_FEW, layout=gl.SliceLayout(0, stage_l))[None, :]     # each logit's expert
        produced = zero                              # the producer ranked this phase's router (KEYS)
        if ranks:
            scaled = _field(table_ptr, p, K_F_ROUTE_SCALED)
            if KEYS:
                produced = _field(table_ptr, p, K_F_PRODUCER_RANKS)
            if produced != 0:                        # (its ids and the weights come after the staging)
                ready = _field(table_ptr, p, K_F_ROUTE_LAST) + 1
                defer = zero + 1
            else:
                ready, ids, logits, defer = _rank(table_ptr, p, router, ordinal, words_ptr, epoch, err_ptr,
                                                  routes_ptr, expert_base, rowbase, ranked, prof + 20 + 8 * p, scaled,
                                                  WARPS, POLLS, PROFILE)
            mark, t_rank = _lap(mark, t_rank, PROFILE)
        # a program with no item of a fixed split's phase skips its staging (a routed phase's ranking still
        # serves the phases that share its router)
        skip = (n_items == 0) & (dyn == 0) & (router < 0)
        mark, t_poll, t_stage, rstd = _stage(table_ptr, p, src, xs, x_ptr, norms_ptr, eps, words_ptr, epoch,
                                             err_ptr, skip, mark, t_poll, t_stage, WARPS, POLLS, PROFILE, SPLITS,
                                             counters_ptr + num_phases, COUNTED)
        if defer != 0:                               # the weights left to the end of the staging: a folded
            # router's need the norm's scale
            if KEYS:
                if produced != 0:
                    ids, logits, experts = _producer_ranking(ordinal, ranked, picked, lbuf, WARPS)
            _gates(table_ptr, p, ordinal, ids, logits, experts, gl.where(scaled != 0, rstd, 1.0), expert_base, WARPS)
        gates = expert_base + ordinal * 2 * K_MAX_TOP_K + K_MAX_TOP_K     # a routed sum's per-source weights

        _stamp(prof + 17 + 8 * p, PROFILE)            # the input staged (and the router ranked)
        res = _field(table_ptr, p, K_F_RES)
        res_off = _field(table_ptr, p, K_F_RES_OFF)
        if SPLITS > 0:                               # (a chain with attention phases)
            if kind == K_ATTENTION:
                for il in range(n_items):
                    consumed, t_kv_wait = _attend_item(ring, full, empty, consumed, xs, scratch, attn_rows,
                                                       table_ptr, p,
                                                       first + il * nprog, ctx, words_ptr, epoch, err_ptr,
                                                       kv_ptr, bt_ptr, kv_layers, cos, sin, t_kv_wait,
                                                       prof + 18 + 8 * p, STAGES, WARPS, POLLS, PROFILE, SPLITS,
                                                       LEAN, prof + 20 + 8 * p)
                mark, t_attend = _lap(mark, t_attend, PROFILE)
                n_items = 0
        # this program's items: i = first + il * nprog, or (a dynamic phase) as the producer took them (`itemq`)
        i = gl.where(n_items > 0, first, -1)
        if dyn != 0:
            i, consumed = _next_item(full, empty, itemq, consumed, STAGES, WARPS, LEAN)
        il = zero
        while i >= 0:
            # the residual's words, loaded before the tiles so their round trip hides behind the arithmetic
            res_q, res_h = _word_of(i * K_ROWS + rows[:, None])
            res_words = gl.load(words_ptr + res_off + res_q, mask=(rows[:, None] < K_ROWS) & (res >= 0), other=0,
                                volatile=True)
            acc = gl.zeros([K_ROWS, K_CHUNK], gl.float32, acc_l)
            acc_up = gl.zeros([K_ROWS, K_CHUNK], gl.float32, acc_l)
            src = zero                                   # the source of slot j (a routed sum's expert)
            for j in range(_tiles_per_item(table_ptr, p) // BOXES):
                slot = consumed % STAGES
                mark, t_start = _lap(mark, t_start, PROFILE)
                mbarrier.wait(full.index(slot), (consumed // STAGES) & 1)
                mark, t_wait = _lap(mark, t_wait, PROFILE)
                if PROFILE:
                    if (il == 0) & (j == 0):
                        _stamp(prof + 18 + 8 * p, PROFILE)      # the phase's first slot landed
                t0 = j * BOXES                   # the slot's first chunk (a slot never spans two sources: kc % BOXES)
                if COMPUTE:                  # (compute=False, timing only: the tiles stream, nothing is read)
                    wt = ring.index(slot).load(tile3)
                    if kind == K_SWIGLU:
                        c0 = gl.where(t0 >= kc, t0 - kc, t0)    # gate chunks, then up chunks, over the same
                        # input (t0 < 2 kc; not t0 % kc: a division by a runtime value is ~25 dependent instructions
                        # ahead of the input's load, in every slot)
                    else:
                        c0 = t0                  # source t0 // kc reads its own input segment
                    # the slot's input too, before the release: Triton's barrier analysis puts a CTA barrier between
                    # an mbarrier arrive and the next shared-memory read
                    xc = xgroups.index(c0 // BOXES).load(tile3)
                # every warp has its part of the slot in registers: free the slot now, not after the arithmetic,
                # so the ring keeps STAGES slots in flight (at ~7 us loaded latency, bytes in flight set the rate)
                consumed = _release(empty, slot, consumed, LEAN)
                mark, t_release = _lap(mark, t_release, PROFILE)
                if COMPUTE:
                    part = gl.sum(wt.to(gl.float32) * xc.to(gl.float32), axis=0)
                    if router >= 0:
                        if kind != K_SWIGLU:     # a routed sum: the source weighs its routing probability
                            part = part * gl.load(gates + src).to(gl.float32, bitcast=True)
                    if (kind == K_SWIGLU) & (t0 >= kc):
                        acc_up += part
                    else:
                        acc += part
                    # the next slot's source (t0 // kc, counted, not divided)
                    wrap = t0 + BOXES - src * kc == kc
                    src = gl.where(wrap, src + 1, src)
                mark, t_math = _lap(mark, t_math, PROFILE)
            y = gl.sum(acc, axis=1)
            if kind == K_SWIGLU:
                y = y / (1.0 + gl.exp(-y)) * gl.sum(acc_up, axis=1)
            if res >= 0:
                if _tagged(res_words, rows[:, None] < K_ROWS, _tag(epoch, res)) == 0:
                    res_words = _poll(words_ptr, res_off + res_q, rows[:, None] < K_ROWS, _tag(epoch, res), err_ptr,
                                      POLLS)
                y += gl.sum(_value(res_words, res_h), axis=1)
            elif res == -1:
                y += gl.load(x_ptr + i * K_ROWS + rows).to(gl.float32)
            if p == num_phases - 1:                  # the last phase's outputs in fp32 too (the logits)
                gl.store(last_ptr + i * K_ROWS + rows, y)
            # two bf16 values a word (rows j and j + 8 of the item), then the tag
            # rows j and j + 8 of the item share a warp (the slot layout deals rows to warps round-robin), so
            # [16] as [2, 8] pairs them in registers: no exchange between warps
            bits = gl.reshape(y.to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF, [2, K_ROWS // 2])
            pairs_l: gl.constexpr = bits.type.layout
            hf = gl.arange(0, 2, layout=gl.SliceLayout(1, pairs_l))[:, None]
            pair = gl.arange(0, K_ROWS // 2, layout=gl.SliceLayout(0, pairs_l))
            word = gl.sum(bits << (hf * 16), axis=0).to(gl.int64) & 0xFFFFFFFF | (_tag(epoch, p).to(gl.int64) << 32)
            _publish(words_ptr + _field(table_ptr, p, K_F_OUT_OFF) + i * (K_ROWS // 2) + pair, word)
            if COUNTED:                          # one more of the phase's items out (`_stage(COUNTED=True)`)
                gl.atomic_add(counters_ptr + num_phases + p, 1, sem="relaxed", scope="gpu")
            mark, t_end = _lap(mark, t_end, PROFILE)
            il += 1
            i = gl.where(il < n_items, first + il * nprog, -1)
            if dyn != 0:
                i, consumed = _next_item(full, empty, itemq, consumed, STAGES, WARPS, LEAN)
        _stamp(prof + 19 + 8 * p, PROFILE)            # this program's items of the phase published

    if PROFILE:
        mark, total = _lap(start, zero.to(gl.int64), PROFILE)
        gl.store(prof + 0, t_poll)
        gl.store(prof + 1, t_stage)
        gl.store(prof + 2, t_rank)
        gl.store(prof + 3, t_start)
        gl.store(prof + 4, t_end)
        gl.store(prof + 5, t_wait)
        gl.store(prof + 6, t_release)
        gl.store(prof + 7, t_math)
        gl.store(prof + 8, total)
        gl.store(prof + 9, t_attend)
        gl.store(prof + 10, t_kv_wait)

    # the last program out advances the epoch for the next launch (every program read it at its start)
    _cta_barrier()
    if gl.atomic_add(done_ptr, 1, sem="acq_rel", scope="gpu") == nprog - 1:
        gl.atomic_xchg(done_ptr, 0, sem="relaxed", scope="gpu")
        gl.atomic_add(epoch_ptr, 1, sem="relaxed", scope="gpu")
        if DYNAMIC or COUNTED:                       # the item counters and published counts, for the next launch
            q = gl.arange(0, 128, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
            for q0 in range(0, 2 * num_phases, 128):
                gl.store(counters_ptr + q0 + q, 0, mask=q0 + q < 2 * num_phases)


@gluon.jit
def _next_item(full, empty, itemq, consumed, STAGES: gl.constexpr, WARPS: gl.constexpr, LEAN: gl.constexpr):
    """A dynamic phase's next item for the consumers: the item of the ring's next slot once it lands (`itemq`), or
    -1 where the producer ended the phase there (that slot, with no bytes, is handed back)."""
    slot = consumed % STAGES
    mbarrier.wait(full.index(slot), (consumed // STAGES) & 1)
    i = gl.max(itemq.index(slot).load(gl.BlockedLayout([1], [32], [WARPS], [0])), axis=0)
    if i < 0:
        consumed = _release(empty, slot, consumed, LEAN)
    return i, consumed


@gluon.jit
def _chain_kernel(d0, d1, d2, d3, dkv, table_ptr, num_phases, tiles_ptr, tiles_stride,
                  x_ptr, last_ptr, norms_ptr, eps, words_ptr, routes_ptr, experts_ptr, n_ord, epoch_ptr, done_ptr,
                  err_ptr, nprog, prof_ptr, kv_ptr, kv_layers, ctx_ptr, bt_ptr, cos_ptr, sin_ptr, counters_ptr,
                  STAGES: gl.constexpr, BOXES: gl.constexpr, WARPS: gl.constexpr, POLLS: gl.constexpr,
                  COMPUTE: gl.constexpr = True, PROFILE: gl.constexpr = False, SPLITS: gl.constexpr = 0,
                  DYNAMIC: gl.constexpr = False, LEAN: gl.constexpr = False, KEYS: gl.constexpr = False,
                  COUNTED: gl.constexpr = False):
    """One program an SM: a producer warp streams the program's weight tiles into a ring of shared-memory slots
    (`_produce`), while WARPS consumer warps compute the phases from them (`_consume`)."""
    pid = gl.program_id(0)
    ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BOXES, K_ROWS, K_CHUNK], d0.layout)
    xs = gl.allocate_shared_memory(gl.bfloat16, [K_STAGE_CHUNKS, K_CHUNK],
                                   gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))          # the staged input
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())    # a slot has landed
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())   # a slot is free
    ranked = gl.allocate_shared_memory(gl.int64, [K_MAX_ORDINALS, 1], mbarrier.MBarrierLayout())
    # KEYS: the producer's ranking (`rank._rank_by_producer`): the ids it picked, by the routed phase's parity, and
    # the router's keys as it compares them
    picked = gl.allocate_shared_memory(gl.int32, [2, K_MAX_TOP_K], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    keys = gl.allocate_shared_memory(gl.int32, [2, 32], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    lbuf = gl.allocate_shared_memory(gl.float32, [4, 32], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))   # logits
    # each ranked expert's first row, for the producer: [GROUP routed phases (ordinal % GROUP), MAX_TOP_K]
    rowbase = gl.allocate_shared_memory(gl.int32, [K_GROUP * K_MAX_TOP_K, 1],
                                        gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    # a dynamic phase's item of each ring slot (`produce._dynamic_items`)
    itemq = gl.allocate_shared_memory(gl.int32, [STAGES, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    # an attention item's rotated q, new key, and output (fp32), and its BLOCK rows' outputs to combine
    scratch = gl.allocate_shared_memory(gl.float32, [4, K_HEAD_DIM], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    rows = gl.allocate_shared_memory(gl.float32, [K_BLOCK, K_HEAD_DIM], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    for s in gl.static_range(STAGES):
        mbarrier.init(full.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    for o in range(n_ord):
        mbarrier.init(ranked.index(o), count=1)
    fence_async_shared()
    gl.warp_specialize([
        (_consume, (ring, full, empty, ranked, rowbase, picked, lbuf, itemq, xs, scratch, rows, table_ptr, num_phases,
                    x_ptr, last_ptr, norms_ptr, eps,
                    words_ptr, routes_ptr, experts_ptr, n_ord, epoch_ptr, done_ptr, err_ptr, nprog, prof_ptr, kv_ptr,
                    kv_layers, ctx_ptr, bt_ptr, cos_ptr, sin_ptr, STAGES, BOXES, WARPS, POLLS, COMPUTE, PROFILE,
                    SPLITS, DYNAMIC, LEAN, counters_ptr, KEYS, COUNTED)),
        (_produce, (d0, d1, d2, d3, dkv, ring, full, empty, ranked, rowbase, itemq, tiles_ptr + pid * tiles_stride,
                    table_ptr, ctx_ptr, bt_ptr, kv_layers, counters_ptr, nprog, routes_ptr, words_ptr, epoch_ptr,
                    err_ptr, experts_ptr + pid * n_ord * 2 * K_MAX_TOP_K, picked, keys, lbuf,
                    prof_ptr + pid * (16 + 8 * num_phases), STAGES, BOXES, SPLITS > 0, DYNAMIC, LEAN, KEYS, POLLS,
                    PROFILE)),
    ], [1], [56])
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(full.index(s))
        mbarrier.invalidate(empty.index(s))


class Chain:
    """A planned chain bound to its weights and device buffers: `run(x)` launches it once (graph-capturable);
    `outputs()` reads every phase's values back, `check()` raises if a poll gave up. `rank_keys` (the default):
    routers of at most 64 experts ranked on their logits as integer keys, the weights computed after the staging
    (`rank._rank_keys`; 903-909 us a step against 913-922 ranked on the weights, session 20). `counted_polls`: each
    published item adds one to its phase's count, and a staging waits on that one word before it polls its input's
    words (`stage._stage(COUNTED=True)`; 25-30 us a step slower, session 20: the count's round trip comes before
    the words')."""

    def __init__(self, phases: list[Phase], families: list[torch.Tensor], input_len: int, stages: int = 6,
                 boxes: int | None = None, warps: int = 4, polls: int = 1 << 22, compute: bool = True,
                 norms: torch.Tensor | None = None, eps: float = 1e-5, profile: bool = False,
                 kv: torch.Tensor | None = None, max_blocks: int = 1, dynamic: bool = False,
                 dynamic_sums: bool = False, lean_release: bool = False, rank_keys: bool = True,
                 counted_polls: bool = False) -> None:
        if not 1 <= len(families) <= 4:
            raise ValueError(f"a chain takes 1-4 weight families, got {len(families)}")
        dev = families[0].device
        for w in families:
            if w.device != dev or w.dtype != torch.bfloat16 or not w.is_contiguous():
                raise ValueError("weight families must be contiguous bf16 tensors on one device")
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        if norms is not None and (norms.dim() != 1 or norms.device != dev):
            raise ValueError("norms: a 1-D tensor of norm weights on the weights' device")
        self.plan = plan(phases, families, input_len, 0 if norms is None else norms.numel())
        attention = any(f[F_KIND] == ATTENTION for f in self.plan.table.tolist())
        if boxes is None:                    # the widest slot (up to 4 chunks) that every weight row fills whole
            kcs = [f[F_KC] for f in self.plan.table.tolist() if f[F_KIND] != ATTENTION]
            boxes = 4 if attention else next(b for b in (4, 2, 1) if all(kc % b == 0 for kc in kcs))
        if attention and boxes != 4:
            raise ValueError(f"a chain with attention needs 4 boxes a slot (a slot holds {SLOT_BLOCKS} KV blocks of "
                             f"a head: 32 KiB), got {boxes}")
        ring_kib = stages * boxes * ROWS * CHUNK * 2 // 1024
        if stages < 1 or boxes < 1 or ring_kib + STAGE_CHUNKS * CHUNK * 2 // 1024 > SHARED_KIB - 1:
            raise ValueError(f"a ring of {stages} x {boxes} boxes ({ring_kib} KiB) and the staged input "
                             f"({STAGE_CHUNKS * CHUNK * 2 // 1024} KiB) must fit in {SHARED_KIB - 1} KiB of shared "
                             "memory (e.g. 6 x 4, 13 x 2, 26 x 1)")
        self.norms = norms if norms is not None else torch.zeros(1, dtype=torch.bfloat16, device=dev)
        self.eps = eps
        self.phases = phases
        # each family [N, K] as its [K / CHUNK, N, CHUNK] view: one box is `boxes` chunks of ROWS rows, chunk-major
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)
        descs = [TensorDescriptor.from_tensor(w.view(w.shape[0], -1, CHUNK).permute(1, 0, 2), [boxes, ROWS, CHUNK],
                                              layout) for w in families]
        self.descs = descs + [descs[0]] * (4 - len(descs))
        self.families = families
        self.table = self.plan.table.to(dev)
        self.words = torch.zeros(self.plan.words, dtype=torch.int64, device=dev)
        self.last = torch.zeros(phases[-1].out_rows, dtype=torch.float32, device=dev)   # the last phase's, in fp32
        self.state = torch.zeros(3, dtype=torch.int32, device=dev)          # epoch, done count, error flag
        self.nprog = num_sms(dev)
        # dynamic=True: the programs take the gate/up items as they go, from a counter a phase (`dynamic_phases`);
        # dynamic_sums=True too: the sum phases of more items than programs (QKV, o_proj, lm_head)
        dyn = dynamic_phases(self.plan, self.nprog if dynamic_sums else None) if dynamic else []
        self.tiles = tile_lists(self.plan, self.nprog, boxes, pad=stages + 1, dynamic=dyn).to(dev)
        self.table[dyn, F_DYN] = 1
        # rank_keys: the producer ranks a router of at most FEW_EXPERTS experts where its first routed phase is
        # dynamic (every program's tile list then holds that phase's code, where the producer ranks it)
        routed = self.plan.routed
        for j, q in enumerate(routed):
            first = j == 0 or phases[routed[j - 1]].route != phases[q].route
            if rank_keys and first and q in dyn and self.plan.table[q, F_ROUTE_N] <= FEW_EXPERTS:
                self.table[q, F_PRODUCER_RANKS] = 1
        # the dynamic phases' item counters, then each phase's published items (`counted_polls`)
        self.counters = torch.zeros(2 * len(phases), dtype=torch.int32, device=dev)
        n_ord = max(1, len(self.plan.routed))
        self.routes = torch.tensor(self.plan.routed or [0], dtype=torch.int32, device=dev)
        # each program's ranking of each routed phase: MAX_TOP_K expert ids, then their weights' fp32 bits
        self.experts = torch.zeros(self.nprog, n_ord, 2 * MAX_TOP_K, dtype=torch.int32, device=dev)
        # compute=False (timing only): the weight tiles stream through the ring unread; the outputs are wrong
        # profile=True: each program counts its SM cycles by what it did (`profile.cycles_by_activity`)
        # and stamps the GPU's nanosecond timer at each phase's start, once its input is staged, when its first slot
        # lands (attention: when its item's partial is out), and at its end; then 4 more of a phase's parts: an
        # attention item's moments (`_attend_item`), a routed phase's ranking (`_rank`)
        self.prof = torch.zeros(self.nprog, 16 + 8 * len(phases), dtype=torch.int64, device=dev)
        self._bind_kv(kv, max_blocks, dev)
        self.meta = dict(STAGES=stages, BOXES=boxes, WARPS=warps, POLLS=polls, COMPUTE=compute, PROFILE=profile,
                         DYNAMIC=dynamic, LEAN=lean_release, KEYS=rank_keys, COUNTED=counted_polls,
                         SPLITS=max([ph.sources for ph in phases if ph.kind == "attention"], default=0),
                         num_warps=warps)

    def _bind_kv(self, kv: torch.Tensor | None, max_blocks: int, dev: torch.device) -> None:
        """The KV cache the attention phases read and write ([blocks, layers, 2, BLOCK, heads, HEAD_DIM]), as one TMA
        descriptor over its [blocks * layers * 2 * BLOCK, heads, HEAD_DIM] view (a box: one block of one head), and
        the step's buffers, which `set_step` fills (a CUDA graph reads them where they are)."""
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        attention = [ph for ph in self.phases if ph.kind == "attention"]
        if attention and kv is None:
            raise ValueError("a chain with attention phases needs the KV cache (kv=)")
        if kv is not None:
            heads = {ph.out_rows // HEAD_DIM for ph in attention}
            if kv.dim() != 6 or kv.shape[2:4] != (2, BLOCK) or kv.shape[5] != HEAD_DIM or kv.dtype != torch.bfloat16 \
                    or not kv.is_contiguous() or kv.device != dev or heads - {kv.shape[4]} or \
                    any(ph.row0 >= kv.shape[1] for ph in attention):
                raise ValueError(f"kv: a contiguous bf16 [blocks, layers, 2, {BLOCK}, heads, {HEAD_DIM}] tensor on the "
                                 f"weights' device with the attention phases' heads ({sorted(heads)}) and layers, got "
                                 f"{kv.dtype} {tuple(kv.shape)}")
        self.kv = kv if kv is not None else torch.zeros(1, 1, 2, BLOCK, 1, HEAD_DIM, dtype=torch.bfloat16, device=dev)
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)
        self.kv_desc = TensorDescriptor.from_tensor(self.kv.view(-1, self.kv.shape[4], HEAD_DIM), [BLOCK, 1, HEAD_DIM],
                                                    layout)
        self.ctx = torch.ones(1, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros(max(1, max_blocks), dtype=torch.int32, device=dev)
        self.cos = torch.ones(HEAD_DIM // 2, dtype=torch.float32, device=dev)
        self.sin = torch.zeros(HEAD_DIM // 2, dtype=torch.float32, device=dev)

    def set_step(self, ctx: int, block_table: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """The step's context length (the new token is at ctx - 1), block table and that position's cos/sin."""
        need = -(-ctx // BLOCK)
        if ctx < 1 or need > self.block_table.numel() or block_table.numel() < need:
            raise ValueError(f"a step of {ctx} tokens needs {need} blocks: the chain holds {self.block_table.numel()}"
                             f" (max_blocks), the table gives {block_table.numel()}")
        self.ctx.fill_(ctx)
        self.block_table[:need].copy_(block_table[:need])
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def bind_step(self, ctx: torch.Tensor, block_table: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Read every launch's step from these tensors where they are (an engine's static buffers, which a CUDA
        graph replays in place), not from copies: ctx [1] and block_table [max_blocks or more] int32 or int64,
        cos and sin [HEAD_DIM // 2] fp32, each 1-D and contiguous on the chain's device. `set_step` writes into
        them from then on."""
        ints, dev = (torch.int32, torch.int64), self.words.device
        for name, t, dtypes, n in (("ctx", ctx, ints, 1), ("block_table", block_table, ints, self.block_table.numel()),
                                   ("cos", cos, (torch.float32,), HEAD_DIM // 2),
                                   ("sin", sin, (torch.float32,), HEAD_DIM // 2)):
            if t.device != dev or t.dtype not in dtypes or t.dim() != 1 or not t.is_contiguous() or t.numel() < n:
                raise ValueError(f"{name}: a contiguous 1-D {' or '.join(str(d) for d in dtypes)} tensor of at least "
                                 f"{n} on {dev}, got {t.dtype} {tuple(t.shape)} on {t.device}")
        self.ctx, self.block_table, self.cos, self.sin = ctx, block_table, cos, sin

    def run(self, x: torch.Tensor) -> None:
        """One launch on the step's input vector x (fp32 or bf16 [input_len], contiguous, on the chain's device)."""
        if x.shape != (self.plan.input_len,) or x.dtype not in (torch.float32, torch.bfloat16) or \
                not x.is_contiguous() or x.device != self.words.device:
            raise ValueError(f"input: expected a contiguous fp32 or bf16 [{self.plan.input_len}] on "
                             f"{self.words.device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
        st = self.state
        _chain_kernel[(self.nprog,)](*self.descs, self.kv_desc, self.table, len(self.phases), self.tiles,
                                     self.tiles.shape[1], x, self.last, self.norms, self.eps, self.words, self.routes,
                                     self.experts, self.experts.shape[1], st[0:], st[1:], st[2:], self.nprog,
                                     self.prof, self.kv, self.kv.shape[1], self.ctx, self.block_table, self.cos,
                                     self.sin, self.counters, **self.meta)

    def outputs(self) -> list[torch.Tensor]:
        """Every phase's outputs as `reference` gives them (an attention phase: its partials, their log-sum-exps,
        the combined heads)."""
        values = unpack(self.words)
        outs = []
        for o, ph in zip(self.plan.out_offsets, self.phases, strict=True):
            if ph.kind == "attention":
                n, c = ph.sources * ph.out_rows, o + combined_offset(ph)
                lse = (self.words[o + n // 2:c] & 0xFFFFFFFF).to(torch.int32)
                outs.append(torch.cat([values[2 * o:2 * o + n], lse.view(torch.float32),
                                       values[2 * c:2 * c + ph.out_rows]]))
            else:
                outs.append(values[2 * o:2 * o + ph.out_rows])
        return outs

    def check(self) -> None:
        if int(self.state[2]) != 0:
            raise RuntimeError("megakernel chain: a phase gave up waiting for its inputs (were all programs "
                               "resident at once?)")
