"""The megakernel's consumer warps (issue 4; the package docstring has the design): each phase's input staged
(`stage.py`), a router ranked or its ranking taken from the producer (`rank.py`), the items computed from the
ring's slots (attention items in `attend.py`) and their outputs published as tagged words. `chain._chain_kernel`
runs them beside the producer warp (`produce.py`).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from crosspool.kernels.megakernel.attend import _attend_item
from crosspool.kernels.megakernel.common import (
    K_ATTENTION,
    K_CHUNK,
    K_F_DYN,
    K_F_IN,
    K_F_IN_OFF,
    K_F_ITEMS,
    K_F_ITEMS_PER_SRC,
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
    K_F_STRIDE,
    K_HEAD_DIM,
    K_HEADS,
    K_MAX_TOP_K,
    K_ROWS,
    K_STAGE_CHUNKS,
    K_SWIGLU,
    _cta_barrier,
    _field,
    _first_item,
    _items_of,
    _lap,
    _poll,
    _publish,
    _release,
    _scattered,
    _stamp,
    _sums_at,
    _tag,
    _tagged,
    _tiles_per_item,
    _value,
    _view,
    _word_of,
)
from crosspool.kernels.megakernel.rank import K_FEW, _gates, _producer_ranking, _rank
from crosspool.kernels.megakernel.stage import _stage


@gluon.jit
def _consume(ring, full, empty, ranked, rowbase, picked, lbuf, itemq, xs, scratch, attn_rows, table_ptr, num_phases,
             x_ptr, last_ptr, norms_ptr, eps, words_ptr, routes_ptr, experts_ptr, n_ord, epoch_ptr, done_ptr, err_ptr,
             nprog, prof_ptr, kv_ptr, kv_layers, ctx_ptr, bt_ptr, cos_ptr, sin_ptr, STAGES: gl.constexpr,
             BOXES: gl.constexpr, WARPS: gl.constexpr, POLLS: gl.constexpr, COMPUTE: gl.constexpr,
             PROFILE: gl.constexpr,
             SPLITS: gl.constexpr, DYNAMIC: gl.constexpr, LEAN: gl.constexpr, counters_ptr, KEYS: gl.constexpr,
             COUNTED: gl.constexpr, PIPE: gl.constexpr = False, fold_ptr=None,
             FOLD: gl.constexpr = False, accf_ptr=None, SCATTER: gl.constexpr = False, CRANK: gl.constexpr = True):
    """The consumer warps: each phase's input staged (polled, normed), the router ranked, the items computed from
    the ring's slots, and their outputs published as tagged words. SCATTER (a chain with scattered sums,
    `Phase.scatter`): such a phase's items add their rows into fp32 sums at `accf_ptr` (the words' memory as fp32)
    and count themselves; the phases that read them wait for the count (`_stage`). CRANK: some routed phase's router is
    ranked here (`_rank`), not by the producer; else that code is left out."""
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
    handed = zero                                    # rankings the producer has handed over (KEYS)
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
    t_handed = t_stage                               # the producer's ranking read (`_producer_ranking`)
    t_gates = t_stage
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
        scatter = zero
        if SCATTER:
            scatter = _scattered(table_ptr, p)
            if scatter != 0:                         # the next launch's sums start from zero
                _zero_share(accf_ptr, table_ptr, p, epoch, pid, nprog, WARPS)
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
            elif CRANK:
                ready, ids, logits, defer = _rank(table_ptr, p, router, ordinal, words_ptr, epoch, err_ptr,
                                                  routes_ptr, expert_base, rowbase, ranked, prof + 20 + 8 * p, scaled,
                                                  WARPS, POLLS, PROFILE)
            mark, t_rank = _lap(mark, t_rank, PROFILE)
        # a program with no item of a fixed split's phase skips its staging (a routed phase's ranking still
        # serves the phases that share its router)
        skip = (n_items == 0) & (dyn == 0) & (router < 0)
        mark, t_poll, t_stage, rstd = _stage(table_ptr, p, src, xs, x_ptr, norms_ptr, eps, words_ptr, epoch,
                                             err_ptr, skip, mark, t_poll, t_stage, WARPS, POLLS, PROFILE, SPLITS,
                                             counters_ptr + num_phases, COUNTED,
                                             prof + 23 + 8 * p, accf_ptr, SCATTER)
        if defer != 0:                               # the weights left to the end of the staging: a folded
            # router's need the norm's scale
            if KEYS:
                if produced != 0:
                    ids, logits, experts = _producer_ranking(ordinal, handed % 2, ranked, picked, lbuf, WARPS)
                    handed += 1
            mark, t_handed = _lap(mark, t_handed, PROFILE)
            _gates(table_ptr, p, ordinal, ids, logits, experts, gl.where(scaled != 0, rstd, 1.0), expert_base, WARPS)
            mark, t_gates = _lap(mark, t_gates, PROFILE)
        gates = expert_base + ordinal * 2 * K_MAX_TOP_K + K_MAX_TOP_K     # a routed sum's per-source weights

        _stamp(prof + 17 + 8 * p, PROFILE)            # the input staged (and the router ranked)
        res = _field(table_ptr, p, K_F_RES)
        res_off = _field(table_ptr, p, K_F_RES_OFF)
        res_scat = zero                              # the residual is a scattered sum's (`_stage` waited for it)
        res_acc = zero
        out_acc = zero
        per_rows = zero
        if SCATTER:
            if res >= 0:
                res_scat = _scattered(table_ptr, res)
                res_acc = _sums_at(table_ptr, res, res_off, epoch)
            if scatter != 0:
                out_acc = _sums_at(table_ptr, p, _field(table_ptr, p, K_F_OUT_OFF), epoch)
                per_rows = _field(table_ptr, p, K_F_ITEMS_PER_SRC)
        if SPLITS > 0:                               # (a chain with attention phases)
            if kind == K_ATTENTION:
                for il in range(n_items):
                    consumed, t_kv_wait = _attend_item(ring, full, empty, consumed, xs, scratch, attn_rows,
                                                       table_ptr, p,
                                                       first + il * nprog, ctx, words_ptr, epoch, err_ptr,
                                                       kv_ptr, bt_ptr, kv_layers, cos, sin, t_kv_wait,
                                                       prof + 18 + 8 * p, STAGES, WARPS, POLLS, PROFILE, SPLITS,
                                                       LEAN, prof + 20 + 8 * p, fold_ptr, FOLD)
                mark, t_attend = _lap(mark, t_attend, PROFILE)
                n_items = 0
        # this program's items: i = first + il * nprog, or (a dynamic phase) as the producer took them (`itemq`)
        i = gl.where(n_items > 0, first, -1)
        if dyn != 0:
            i, consumed = _next_item(full, empty, itemq, consumed, STAGES, WARPS, LEAN)
        il = zero
        n_slots = _tiles_per_item(table_ptr, p) // BOXES          # (the phase's fields once, not an item)
        out_words = words_ptr + _field(table_ptr, p, K_F_OUT_OFF)
        while i >= 0:
            row_item = i                                 # the item's rows (a scattered sum: of its source)
            src0 = zero                                  # its first source
            if SCATTER:
                if scatter != 0:
                    src0 = i // per_rows
                    row_item = i - src0 * per_rows
            # the residual's words, loaded before the tiles so their round trip hides behind the arithmetic
            res_q, res_h = _word_of(row_item * K_ROWS + rows[:, None])
            res_words = gl.load(words_ptr + res_off + res_q, mask=(rows[:, None] < K_ROWS) & (res >= 0) &
                                (res_scat == 0), other=0, volatile=True)
            res_f = gl.zeros([K_ROWS], gl.float32, rows_l)
            if SCATTER:
                if res_scat != 0:
                    res_f = gl.load(accf_ptr + res_acc + row_item * K_ROWS + rows, volatile=True)
            acc = gl.zeros([K_ROWS, K_CHUNK], gl.float32, acc_l)
            acc_up = gl.zeros([K_ROWS, K_CHUNK], gl.float32, acc_l)
            src = src0                                   # the source of slot j (a routed sum's expert)
            if PIPE:                                 # the next slot's loads before this one's arithmetic
                if n_slots > 0:                      # (a heads phase's items have none)
                    acc, acc_up, consumed = _pipelined_slots(ring, full, empty, xgroups, consumed, n_slots, kc,
                                                             kind, router, gates, acc, acc_up, tile3, STAGES, BOXES,
                                                             LEAN)
            else:
                for j in range(n_slots):
                    slot = consumed % STAGES
                    mark, t_start = _lap(mark, t_start, PROFILE)
                    mbarrier.wait(full.index(slot), (consumed // STAGES) & 1)
                    mark, t_wait = _lap(mark, t_wait, PROFILE)
                    if PROFILE:
                        if (il == 0) & (j == 0):
                            _stamp(prof + 18 + 8 * p, PROFILE)      # the phase's first slot landed
                    t0 = src0 * kc + j * BOXES   # the slot's first chunk (a slot never spans two sources: kc % BOXES)
                    if COMPUTE:              # (compute=False, timing only: the tiles stream, nothing is read)
                        # the slot's input too, before the release: Triton's barrier analysis puts a CTA barrier
                        # between an mbarrier arrive and the next shared-memory read
                        wt, xc = _slot_in(ring, xgroups, slot, t0, kc, kind, tile3, BOXES)
                    # every warp has its part of the slot in registers: free the slot now, not after the
                    # arithmetic, so the ring keeps STAGES slots in flight (at ~7 us loaded latency, bytes in flight
                    # set the rate)
                    consumed = _release(empty, slot, consumed, LEAN)
                    mark, t_release = _lap(mark, t_release, PROFILE)
                    if COMPUTE:
                        acc, acc_up, src = _slot_math(_products(wt, xc), t0, kc, kind, router, gates, src, acc,
                                                      acc_up, BOXES)
                    mark, t_math = _lap(mark, t_math, PROFILE)
            y = gl.sum(acc, axis=1)
            if kind == K_SWIGLU:
                y = y / (1.0 + gl.exp(-y)) * gl.sum(acc_up, axis=1)
            if FOLD and kind == K_HEADS:             # no slots: the attention's fold products, summed over heads
                y += _heads_sum(table_ptr, p, i, words_ptr, _tag(epoch, _field(table_ptr, p, K_F_IN)), err_ptr, acc,
                                POLLS)
            if src0 == 0:                            # (a scattered sum: its first source's items add it)
                if res_scat != 0:
                    y += res_f
                elif res >= 0:
                    if _tagged(res_words, rows[:, None] < K_ROWS, _tag(epoch, res)) == 0:
                        res_words = _poll(words_ptr, res_off + res_q, rows[:, None] < K_ROWS, _tag(epoch, res),
                                          err_ptr, POLLS)
                    y += gl.sum(_value(res_words, res_h), axis=1)
                elif res == -1:
                    y += gl.load(x_ptr + row_item * K_ROWS + rows).to(gl.float32)
            if p == num_phases - 1:                  # the last phase's outputs in fp32 too (the logits)
                gl.store(last_ptr + i * K_ROWS + rows, y)
            # two bf16 values a word (rows j and j + 8 of the item), then the tag
            # rows j and j + 8 of the item share a warp (the slot layout deals rows to warps round-robin), so
            # [16] as [2, 8] pairs them in registers: no exchange between warps
            summed = zero
            if SCATTER:
                if scatter != 0:                     # into the sums (counted once the program's items are in)
                    gl.atomic_add(accf_ptr + out_acc + row_item * K_ROWS + rows, y, sem="relaxed", scope="gpu")
                    summed = zero + 1
            if summed == 0:
                bits = gl.reshape(y.to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF,
                                  [2, K_ROWS // 2])
                pairs_l: gl.constexpr = bits.type.layout
                hf = gl.arange(0, 2, layout=gl.SliceLayout(1, pairs_l))[:, None]
                pair = gl.arange(0, K_ROWS // 2, layout=gl.SliceLayout(0, pairs_l))
                word = gl.sum(bits << (hf * 16), axis=0).to(gl.int64) & 0xFFFFFFFF | \
                    (_tag(epoch, p).to(gl.int64) << 32)
                _publish(out_words + i * (K_ROWS // 2) + pair, word)
            if COUNTED:                          # one more of the phase's items out (`_stage(COUNTED=True)`)
                gl.atomic_add(counters_ptr + num_phases + p, 1, sem="relaxed", scope="gpu")
            mark, t_end = _lap(mark, t_end, PROFILE)
            il += 1
            i = gl.where(il < n_items, first + il * nprog, -1)
            if dyn != 0:
                i, consumed = _next_item(full, empty, itemq, consumed, STAGES, WARPS, LEAN)
        if SCATTER:
            if scatter != 0:
                if il > 0:                           # one release for all of them: each waits on the adds before
                    _scatter_count(counters_ptr + num_phases + p, il, WARPS)
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
        gl.store(prof + 11, t_handed)
        gl.store(prof + 12, t_gates)

    # the last program out advances the epoch for the next launch (every program read it at its start)
    _cta_barrier()
    if gl.atomic_add(done_ptr, 1, sem="acq_rel", scope="gpu") == nprog - 1:
        gl.atomic_xchg(done_ptr, 0, sem="relaxed", scope="gpu")
        gl.atomic_add(epoch_ptr, 1, sem="relaxed", scope="gpu")
        if DYNAMIC or COUNTED or SCATTER:            # the item counters and published counts, for the next launch
            q = gl.arange(0, 128, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
            for q0 in range(0, 2 * num_phases, 128):
                gl.store(counters_ptr + q0 + q, 0, mask=q0 + q < 2 * num_phases)


@gluon.jit
def _scatter_count(count_ptr, n, WARPS: gl.constexpr):
    """A scattered sum's count raised by the program's n items, once every warp has issued their adds: one release
    increment (its fence waits for the adds in flight; one an item would cost a round trip each)."""
    _cta_barrier()
    one_l: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    gl.atomic_add(count_ptr + gl.arange(0, 1, layout=one_l), gl.full([1], n, gl.int32, one_l), sem="release",
                  scope="gpu")


@gluon.jit
def _zero_share(accf_ptr, table_ptr, p, epoch, pid, nprog, WARPS: gl.constexpr):
    """This program's share of scattered sum p's buffer for the next launch (the other parity), zeroed: nothing
    reads it in this one, and the next starts after this one ends."""
    n = _field(table_ptr, p, K_F_ITEMS_PER_SRC) * K_ROWS
    at = _sums_at(table_ptr, p, _field(table_ptr, p, K_F_OUT_OFF), epoch + 1)
    zl: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    z = gl.arange(0, K_ROWS, layout=zl)
    for z0 in range(pid * K_ROWS, n, nprog * K_ROWS):
        gl.store(accf_ptr + at + z0 + z, gl.zeros([K_ROWS], gl.float32, zl), mask=z0 + z < n)


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
def _input_chunk(t0, kc, kind):
    """The first staged input chunk that a slot of chunks t0.. multiplies."""
    if kind == K_SWIGLU:
        c0 = gl.where(t0 >= kc, t0 - kc, t0)    # gate chunks, then up chunks, over the same input (t0 < 2 kc; not
        # t0 % kc: a division by a runtime value is ~25 dependent instructions ahead of the input's load, a slot)
    else:
        c0 = t0                                  # source t0 // kc reads its own input segment
    return c0


@gluon.jit
def _slot_in(ring, xgroups, slot, t0, kc, kind, tile3: gl.constexpr, BOXES: gl.constexpr):
    """Ring slot `slot` (chunks t0.. of its item) and the staged input it multiplies, in registers."""
    return ring.index(slot).load(tile3), xgroups.index(_input_chunk(t0, kc, kind) // BOXES).load(tile3)


@gluon.jit
def _products(wt, xc):
    """A slot's products with its input, summed over its boxes in each thread (acc's [ROWS, CHUNK])."""
    return gl.sum(wt.to(gl.float32) * xc.to(gl.float32), axis=0)


@gluon.jit
def _slot_math(part, t0, kc, kind, router, gates, src, acc, acc_up, BOXES: gl.constexpr):
    """A slot's products, partly summed (`part`, acc's shape), added into the item's accumulators (a swiglu's up
    chunks into acc_up); returns them and the next slot's source (a routed sum's: t0 // kc, counted, not divided)."""
    if router >= 0:
        if kind != K_SWIGLU:                     # a routed sum: the source weighs its routing probability
            part = part * gl.load(gates + src).to(gl.float32, bitcast=True)
    if (kind == K_SWIGLU) & (t0 >= kc):
        acc_up += part
    else:
        acc += part
    wrap = t0 + BOXES - src * kc == kc
    return acc, acc_up, gl.where(wrap, src + 1, src)


@gluon.jit
def _pipelined_slots(ring, full, empty, xgroups, consumed, n_slots, kc, kind, router, gates, acc, acc_up,
                     tile3: gl.constexpr, STAGES: gl.constexpr, BOXES: gl.constexpr, LEAN: gl.constexpr):
    """An item's n_slots (> 0) slots with the next slot's loads issued before this slot's arithmetic
    (`Chain(pipelined=True)`), so their shared-memory latency passes under it; each slot is still freed before its
    own arithmetic. Returns the accumulators and the ring's consumed count."""
    slot = consumed % STAGES
    mbarrier.wait(full.index(slot), (consumed // STAGES) & 1)
    wt, xc = _slot_in(ring, xgroups, slot, consumed * 0, kc, kind, tile3, BOXES)
    consumed = _release(empty, slot, consumed, LEAN)
    src = consumed * 0
    for j in range(n_slots):
        t0 = j * BOXES
        wt_next = wt
        xc_next = xc
        if j + 1 < n_slots:
            slot = consumed % STAGES
            mbarrier.wait(full.index(slot), (consumed // STAGES) & 1)
            wt_next, xc_next = _slot_in(ring, xgroups, slot, t0 + BOXES, kc, kind, tile3, BOXES)
        acc, acc_up, src = _slot_math(_products(wt, xc), t0, kc, kind, router, gates, src, acc, acc_up, BOXES)
        if j + 1 < n_slots:
            consumed = _release(empty, slot, consumed, LEAN)
        wt = wt_next
        xc = xc_next
    return acc, acc_up, consumed


@gluon.jit
def _heads_sum(table_ptr, p, i, words_ptr, tag, err_ptr, acc, POLLS: gl.constexpr):
    """A "heads" phase's item i: its rows of the attention's fold products ([heads, out_rows] fp32 words), once
    tagged, summed over the heads (as [ROWS], the layout of acc's row sums)."""
    rows = gl.arange(0, K_ROWS, layout=gl.SliceLayout(1, acc.type.layout))[:, None]
    heads = gl.arange(0, K_CHUNK, layout=gl.SliceLayout(0, acc.type.layout))[None, :]
    mask = (heads < _field(table_ptr, p, K_F_STRIDE)) & (rows < K_ROWS)
    w = _poll(words_ptr, _field(table_ptr, p, K_F_IN_OFF) + heads * (_field(table_ptr, p, K_F_ITEMS) * K_ROWS) +
              i * K_ROWS + rows, mask, tag, err_ptr, POLLS)
    return gl.sum(gl.where(mask, (w & 0xFFFFFFFF).to(gl.int32).to(gl.float32, bitcast=True), 0.0), axis=1)
