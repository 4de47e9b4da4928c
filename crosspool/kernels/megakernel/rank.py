"""The megakernel's routing (issue 4): a routed phase's router logits ranked inside the kernel (softmax, greedy
top-k, as `torch_ref.route` for OLMoE; ties go to the lower expert id, as in `reference.reference`): by the producer
warp where the router has at most FEW_EXPERTS experts (`_rank_by_producer`, `Chain(rank_keys=True)`, the default),
else by the consumers (`_rank`)."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from crosspool.kernels.megakernel.common import (
    K_F_ROUTE,
    K_F_ROUTE_LAST,
    K_F_ROUTE_N,
    K_F_ROUTE_OFF,
    K_F_ROW0,
    K_F_SOURCES,
    K_F_STRIDE,
    K_GROUP,
    K_MAX_EXPERTS,
    K_MAX_TOP_K,
    _cta_barrier,
    _field,
    _poll,
    _stamp,
    _tag,
    _value,
    _view,
    _word_of,
)
from crosspool.kernels.megakernel.plan import FEW_EXPERTS

K_FEW = gl.constexpr(FEW_EXPERTS)  # routers of at most this many experts rank by counting (`_rank_few`)


@gluon.jit
def _probs(words_ptr, route_off, eoffs, n_route, tag, err_ptr, stamp_at, POLLS: gl.constexpr,
           PROFILE: gl.constexpr):
    """The router's logits at `eoffs` ([1, E]), once tagged, as softmax probabilities (-1 past the router's
    `n_route` experts, so they rank last), and the logits themselves (-inf past them)."""
    valid = eoffs < n_route
    q, h = _word_of(eoffs)
    w = _poll(words_ptr, route_off + q, valid, tag, err_ptr, POLLS)
    _stamp(stamp_at, PROFILE)
    logit = gl.where(valid, _value(w, h), float("-inf"))
    return gl.where(valid, _softmax(logit, valid), -1.0), logit


@gluon.jit
def _softmax(logit, valid):
    """Softmax of [1, E] logits over the `valid` ones (0 elsewhere)."""
    ex = gl.where(valid, gl.exp(logit - gl.max(gl.max(logit, axis=1), axis=0)), 0.0)
    return ex / gl.sum(gl.sum(ex, axis=1), axis=0)


@gluon.jit
def _rank_few(words_ptr, route_off, n_route, tag, err_ptr, stamp_at, kk, WARPS: gl.constexpr, POLLS: gl.constexpr,
              PROFILE: gl.constexpr):
    """Top-k of at most K_FEW experts by counting, in no dependent rounds: expert i's rank is how many experts
    beat it (a higher probability, or an equal one and a lower id); the expert of rank k is the k-th pick, as the
    greedy loop in `_rank` would make it. Returns the ids and probabilities of ranks `kk` ([MAX_TOP_K, 1]), and
    the logits ([1, K_FEW], -inf past `n_route`)."""
    stage_l: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [WARPS, 1], [1, 0])
    # [j, i]: every j of one i in one thread, so a rank sums in-thread
    pair_l: gl.constexpr = gl.BlockedLayout([K_FEW, 1], [1, 32], [1, WARPS], [0, 1])
    eoffs = gl.arange(0, K_FEW, layout=gl.SliceLayout(0, stage_l))[None, :]
    sel, logit = _probs(words_ptr, route_off, eoffs, n_route, tag, err_ptr, stamp_at, POLLS, PROFILE)
    flat = gl.max(sel, axis=0)                                                     # [K_FEW] (axis 0 has one row)
    si = gl.convert_layout(flat, gl.SliceLayout(0, pair_l))[None, :]
    sj = gl.convert_layout(flat, gl.SliceLayout(1, pair_l))[:, None]
    ii = gl.arange(0, K_FEW, layout=gl.SliceLayout(0, pair_l))[None, :]
    jj = gl.arange(0, K_FEW, layout=gl.SliceLayout(1, pair_l))[:, None]
    beats = (sj > si) | ((sj == si) & (jj < ii))
    rank = gl.convert_layout(gl.sum(beats.to(gl.int32), axis=0), gl.SliceLayout(0, stage_l))[None, :]
    hit = rank == kk                                                               # [MAX_TOP_K, K_FEW]
    return gl.sum(gl.where(hit, eoffs, 0), axis=1, keep_dims=True), gl.sum(gl.where(hit, sel, 0.0), axis=1,
                                                                           keep_dims=True), logit


@gluon.jit
def _key(w, half: gl.constexpr, e, valid):
    """Ranking keys (`_rank_by_producer`): the bf16 logit in half `half` of words w, of experts e, as a signed
    magnitude times K_FEW, plus K_FEW - 1 - e (-2^30 where not `valid`)."""
    bits = ((w >> (16 * half)) & 0xFFFF).to(gl.int32)
    magnitude = bits & 0x7FFF
    return gl.where(valid, gl.where(bits >= 0x8000, -magnitude, magnitude) * K_FEW + (K_FEW - 1 - e), -(1 << 30))


@gluon.jit
def _rank_by_producer(table_ptr, o, buf, routes_ptr, words_ptr, epoch, err_ptr, expert_base, rowbase, picked, keys,
                      lbuf, ranked, prof, POLLS: gl.constexpr, PROFILE: gl.constexpr):
    """The producer warp ranks routed ordinal o's router itself (`Chain(rank_keys=True)`; the table marks where,
    F_PRODUCER_RANKS: at most K_FEW experts) as soon as its logits are published: it needs the experts before it can
    load their tiles, and the consumers may still be busy with the phases before (o_proj's items, say). The keys
    (`_key`) are distinct and order as (logit descending, expert ascending), which is the probabilities' order
    (softmax keeps it, and distinct bf16 logits stay distinct in fp32 but where both probabilities underflow, or for
    logits within fp32's rounding of the maximum's exponent, neither of which reaches a top k). An expert's rank is
    how many keys beat its own. The producer writes each expert's first row for itself (`rowbase`, for ordinals
    o..the router's last), the ids and logits for the consumers (`picked` and `lbuf` half `buf`, the parity of its
    rankings so far; the ids in the experts buffer too), then arrives on `ranked`: the consumers weigh the experts
    once their staging has the norm's scale (`_gates`). Profiling: the time at prof + 20 + 8 p + 0..2 once the
    logits are polled, once ranked, once stored."""
    word_l: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, 1], [1, 0])         # [1, 32]: word i in lane i
    sel_l: gl.constexpr = gl.BlockedLayout([K_MAX_TOP_K, 1], [1, 32], [1, 1], [0, 1])  # [MAX_TOP_K, 32]
    cmp_l: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [1, 1], [1, 0])           # [32, 8]: 8 keys in each lane
    p = gl.load(routes_ptr + o)
    last = _field(table_ptr, p, K_F_ROUTE_LAST)
    n_route = _field(table_ptr, p, K_F_ROUTE_N)
    stamp_at = prof + 20 + 8 * p
    n_src = _field(table_ptr, p, K_F_SOURCES)
    # the routed phases' first rows and strides, loaded before the logits' poll (as dependent loads after the
    # ranking, they took ~1 us: session 20)
    og = gl.arange(0, K_GROUP, layout=gl.SliceLayout(1, sel_l))
    o_ph = gl.load(routes_ptr + o + og, mask=o + og <= last, other=0)
    o_row0 = _field(table_ptr, o_ph, K_F_ROW0)
    o_stride = _field(table_ptr, o_ph, K_F_STRIDE)
    wi = gl.arange(0, 32, layout=gl.SliceLayout(0, word_l))[None, :]
    e_lo = (wi // 8) * 16 + wi % 8               # word i holds experts e_lo (low half) and e_lo + 8 (`_word_of`)
    valid = e_lo < n_route                       # (n_route is a multiple of 16)
    w = _poll(words_ptr, _field(table_ptr, p, K_F_ROUTE_OFF) + wi, valid, _tag(epoch, _field(table_ptr, p,
              K_F_ROUTE)), err_ptr, POLLS)
    _stamp(stamp_at, PROFILE)
    vals = _view(lbuf, [4, 32], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    vals.index(2 * buf).store(gl.max(gl.where(valid, _value(w, 0), float("-inf")), axis=0))
    vals.index(2 * buf + 1).store(gl.max(gl.where(valid, _value(w, 1), float("-inf")), axis=0))
    k_lo = _key(w, 0, e_lo, valid)
    k_hi = _key(w, 1, e_lo + 8, valid)
    keys.index(0).store(gl.max(k_lo, axis=0))
    keys.index(1).store(gl.max(k_hi, axis=0))
    _cta_barrier()                               # (the warp's keys in, before every lane reads them all)
    mine_lo = gl.convert_layout(gl.max(k_lo, axis=0), gl.SliceLayout(1, cmp_l))[:, None]
    mine_hi = gl.convert_layout(gl.max(k_hi, axis=0), gl.SliceLayout(1, cmp_l))[:, None]
    r_lo = gl.zeros([32], gl.int32, gl.SliceLayout(1, cmp_l))
    r_hi = r_lo
    keys8 = _view(keys, [2 * 32 // 8, 8], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    for c in range(2 * 32 // 8):                 # every key against 8 of them a round, each lane all 8 (looped:
        other = keys8.index(c).load(gl.SliceLayout(0, cmp_l))[None, :]        # the code's size, session 26)
        r_lo += gl.sum((other > mine_lo).to(gl.int32), axis=1)
        r_hi += gl.sum((other > mine_hi).to(gl.int32), axis=1)
    kk = gl.arange(0, K_MAX_TOP_K, layout=gl.SliceLayout(1, sel_l))[:, None]
    rl = gl.convert_layout(r_lo, gl.SliceLayout(0, sel_l))[None, :]
    rh = gl.convert_layout(r_hi, gl.SliceLayout(0, sel_l))[None, :]
    el = gl.convert_layout(gl.max(e_lo, axis=0), gl.SliceLayout(0, sel_l))[None, :]
    ids = gl.sum(gl.where(rl == kk, el, 0) + gl.where(rh == kk, el + 8, 0), axis=1)      # [MAX_TOP_K]
    _stamp(stamp_at + 1, PROFILE)
    k1 = gl.arange(0, K_MAX_TOP_K, layout=gl.SliceLayout(1, sel_l))
    picked.index(buf).store(ids)
    for q in range(o, last + 1):
        gl.store(expert_base + q * 2 * K_MAX_TOP_K + k1, ids, mask=k1 < n_src)
        pick = og == q - o
        first = gl.sum(gl.where(pick, o_row0, 0), axis=0) + ids * gl.sum(gl.where(pick, o_stride, 0), axis=0)
        _view(rowbase, [K_GROUP, K_MAX_TOP_K], gl.SwizzledSharedLayout(1, 1, 1, order=[0])).index(
            q % K_GROUP).store(first)
    _cta_barrier()                               # the warp's stores are in: release them to the consumers
    for q in range(o, last + 1):
        mbarrier.arrive(ranked.index(q), count=1)
    _stamp(stamp_at + 2, PROFILE)


@gluon.jit
def _producer_ranking(ordinal, buf, ranked, picked, lbuf, WARPS: gl.constexpr):
    """Consumers: what the producer ranked for routed ordinal `ordinal` (`_rank_by_producer`, into half `buf` of
    its buffers), once it has: the ids
    ([MAX_TOP_K, 1]), the router's logits in its words' order ([1, K_FEW], -inf past its experts) and the expert
    of each ([1, K_FEW]), for `_gates`. All from shared memory: nothing waits on a load while the experts' tiles
    crowd the memory system (the logits loaded after the staging took 1-7 us: session 20)."""
    stage_l: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [WARPS, 1], [1, 0])
    j = gl.arange(0, K_FEW, layout=gl.SliceLayout(0, stage_l))
    mbarrier.wait(ranked.index(ordinal), 0)
    ids = picked.index(buf).load(gl.SliceLayout(1, stage_l))[:, None]
    logits = _view(lbuf, [2, K_FEW], gl.SwizzledSharedLayout(1, 1, 1, order=[0])).index(buf).load(
        gl.SliceLayout(0, stage_l))[None, :]
    word = j % 32                                    # position j: half j // 32 of word j % 32 (`_word_of`)
    return ids, logits, ((word // 8) * 16 + (j // 32) * 8 + word % 8)[None, :]


@gluon.jit
def _rank_greedy(words_ptr, route_off, n_route, n_src, tag, err_ptr, stamp_at, kk, WARPS: gl.constexpr,
                 POLLS: gl.constexpr, PROFILE: gl.constexpr):
    """Top-k of up to MAX_EXPERTS experts, one pick at a time (the highest probability, the lower id on a tie).
    Returns the ids and probabilities of ranks `kk` ([MAX_TOP_K, 1])."""
    stage_l: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [WARPS, 1], [1, 0])
    eoffs = gl.arange(0, K_MAX_EXPERTS, layout=gl.SliceLayout(0, stage_l))[None, :]
    sel, _ = _probs(words_ptr, route_off, eoffs, n_route, tag, err_ptr, stamp_at, POLLS, PROFILE)
    ids = gl.zeros([K_MAX_TOP_K, 1], gl.int32, stage_l)
    bests = gl.zeros([K_MAX_TOP_K, 1], gl.float32, stage_l)
    for k in gl.static_range(K_MAX_TOP_K):
        if k < n_src:
            best = gl.max(gl.max(sel, axis=1), axis=0)
            idx = gl.min(gl.min(gl.where(sel == best, eoffs, 1 << 30), axis=1), axis=0)
            sel = gl.where(eoffs == idx, -2.0, sel)
            ids = gl.where(kk == k, idx, ids)
            bests = gl.where(kk == k, best, bests)
    return ids, bests


@gluon.jit
def _rank(table_ptr, p, router, ordinal, words_ptr, epoch, err_ptr, routes_ptr, expert_base, rowbase, ranked,
          parts_at, scaled, WARPS: gl.constexpr, POLLS: gl.constexpr, PROFILE: gl.constexpr = False):
    """Rank routed phase p's router logits: every program ranks them for itself and writes the expert ids and
    weights to its own rows, for phase p and the following routed phases that share its router (ordinals
    `ordinal`..the table's last), then arrives on their `ranked` mbarriers: the producer held their tiles back
    until now, and reads each expert's first row from `rowbase`. With `scaled` (a folded router, `Phase.rms_of`)
    the weights are left to `_gates`, once the staging has the scale. Returns the ordinal after the last one
    ranked, the ids ([MAX_TOP_K, 1]), for a router of at most K_FEW experts the logits ([1, K_FEW]), and whether
    the weights are left to `_gates`. (With `Chain(rank_keys=True)` the producer ranks the routers of at most
    K_FEW experts itself: `_rank_by_producer`.)
    Profiling: the time at `parts_at` + 0..2 once the logits are polled, once ranked, once stored."""
    stage_l: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [WARPS, 1], [1, 0])
    n_route = _field(table_ptr, p, K_F_ROUTE_N)
    last = _field(table_ptr, p, K_F_ROUTE_LAST)
    n_src = _field(table_ptr, p, K_F_SOURCES)
    # the routed phases' first rows and strides, loaded before the logits' poll (dependent loads, each a
    # round trip, in the ranking itself took ~5 us a layer)
    og = gl.arange(0, K_GROUP, layout=gl.SliceLayout(0, stage_l))[None, :]
    o_ph = gl.load(routes_ptr + ordinal + og, mask=ordinal + og <= last, other=0)
    o_row0 = _field(table_ptr, o_ph, K_F_ROW0)
    o_stride = _field(table_ptr, o_ph, K_F_STRIDE)
    route_off = _field(table_ptr, p, K_F_ROUTE_OFF)
    kk = gl.arange(0, K_MAX_TOP_K, layout=gl.SliceLayout(1, stage_l))[:, None]     # [MAX_TOP_K, 1]
    logits = gl.zeros([1, K_FEW], gl.float32, stage_l)
    defer = scaled
    if n_route <= K_FEW:
        ids, bests, logits = _rank_few(words_ptr, route_off, n_route, _tag(epoch, router), err_ptr, parts_at, kk,
                                       WARPS, POLLS, PROFILE)
    else:
        ids, bests = _rank_greedy(words_ptr, route_off, n_route, n_src, _tag(epoch, router), err_ptr, parts_at, kk,
                                  WARPS, POLLS, PROFILE)
    _stamp(parts_at + 1, PROFILE)
    for o in range(ordinal, last + 1):
        at = expert_base + o * 2 * K_MAX_TOP_K + kk
        gl.store(at, ids, mask=kk < n_src)
        gl.store(at + K_MAX_TOP_K, bests.to(gl.int32, bitcast=True), mask=(kk < n_src) & (defer == 0))
        # the producer's copy: each expert's first row in phase o's family
        pick = og == o - ordinal
        first = gl.sum(gl.where(pick, o_row0, 0), axis=1, keep_dims=True) + \
            ids * gl.sum(gl.where(pick, o_stride, 0), axis=1, keep_dims=True)
        _view(rowbase, [K_GROUP, K_MAX_TOP_K], gl.SwizzledSharedLayout(1, 1, 1, order=[0])).index(
            o % K_GROUP).store(gl.sum(first, axis=1))
    _cta_barrier()                           # every warp's stores are in: release them to the producer
    _stamp(parts_at + 2, PROFILE)
    for o in range(ordinal, last + 1):
        mbarrier.arrive(ranked.index(o), count=1)
    return last + 1, ids, logits, defer


@gluon.jit
def _gates(table_ptr, p, ordinal, ids, logits, experts, rstd, expert_base, WARPS: gl.constexpr):
    """The experts' weights `_rank` left to the end of the staging (a folded router's, `Phase.rms_of`, and any
    router's that the producer ranked, `_rank_by_producer`), for routed phase p and those sharing its router (ordinals
    `ordinal`..): softmax(logits * rstd) at the ranked `ids`, where rstd is the norm's scale from the staging of
    the phase that ranked them (a folded router), else 1. `experts`: the expert of each logit ([1, K_FEW])."""
    stage_l: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [WARPS, 1], [1, 0])
    probs = _softmax(logits * rstd, experts < _field(table_ptr, p, K_F_ROUTE_N))
    gates = gl.sum(gl.where(experts == ids, probs, 0.0), axis=1, keep_dims=True)             # [MAX_TOP_K, 1]
    kk = gl.arange(0, K_MAX_TOP_K, layout=gl.SliceLayout(1, stage_l))[:, None]
    for o in range(ordinal, _field(table_ptr, p, K_F_ROUTE_LAST) + 1):
        gl.store(expert_base + o * 2 * K_MAX_TOP_K + K_MAX_TOP_K + kk, gates.to(gl.int32, bitcast=True),
                 mask=kk < _field(table_ptr, p, K_F_SOURCES))
