"""The megakernel's staging (issue 4): a phase's input vector polled from its tagged words (or read from the step's
input), rounded to bf16 into shared memory, and RMSNormed there as the model rounds it."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from crosspool.kernels.megakernel.common import (
    K_ATTENTION,
    K_CHUNK,
    K_F_IN_CHUNKS,
    K_F_IN_OFF,
    K_F_ITEMS,
    K_F_KIND,
    K_F_NORM,
    K_F_NORM_SEG,
    K_F_RES,
    K_F_WAIT,
    K_F_WAIT_N,
    K_F_WAIT_OFF,
    K_ROWS,
    K_STAGE_CHUNKS,
    _await_count,
    _cta_barrier,
    _field,
    _lap,
    _poll,
    _scattered,
    _stamp,
    _sums_at,
    _tag,
    _value,
    _view,
    _word_of,
)


@gluon.jit
def _stage(table_ptr, p, src, xs, x_ptr, norms_ptr, eps, words_ptr, epoch, err_ptr, skip, mark, t_poll,
           t_stage, WARPS: gl.constexpr, POLLS: gl.constexpr, PROFILE: gl.constexpr, SPLITS: gl.constexpr,
           published_ptr, COUNTED: gl.constexpr = False, polled_at=None, accf_ptr=None,
           SCATTER: gl.constexpr = False):
    """Consumers: stage phase p's input in `xs` (bf16), 16 chunks a round, after polling its tags (phase `src`, or
    the step's input `x_ptr` where src < 0); RMSNorm it where the phase has norm weights (an attention phase: q and
    k each over their own segment); wait on the phase's `wait` phase; then a CTA barrier. With `skip` (a program
    with no item of the phase) only the barrier: the program goes on to its next phase without waiting for this
    one's input. COUNTED: first wait until the input phase has published all its items (`published_ptr[src]`, one
    word, no reduction a round) unless it is attention, then poll its words as before. PROFILE: `t_poll` and
    `t_stage` plus the cycles of the polls and of the rest, and the time every word was polled at `polled_at` (not
    in an attention phase: its items stamp their own part there). SCATTER: an input or residual that is a scattered
    sum's (`Phase.scatter`) is waited for by its count (`published_ptr`), then read as fp32 sums (`accf_ptr`).
    The rounds are a loop, not unrolled: ~800 SASS instructions fewer, 843 us a step against 851-860 (session 26:
    the kernel's code outgrows the SM's instruction cache).
    Returns mark, t_poll, t_stage, and the norm's scale rsqrt(mean(x^2) + eps) (1 without a norm; attention: q's)."""
    stage_l: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [WARPS, 1], [1, 0])   # [16, 256] input words
    srow = gl.arange(0, K_ROWS, layout=gl.SliceLayout(1, stage_l))
    scol = gl.arange(0, K_CHUNK, layout=gl.SliceLayout(0, stage_l))
    n_in = _field(table_ptr, p, K_F_IN_CHUNKS)
    norm = _field(table_ptr, p, K_F_NORM)
    wait = _field(table_ptr, p, K_F_WAIT)
    seg = n_in                                   # chunks under the first norm (attention: q's; k has its own)
    if SPLITS > 0:                               # (a chain with attention: the code below compiles only there)
        seg = _field(table_ptr, p, K_F_NORM_SEG)
    if skip:
        n_in = 0                                 # no item of this phase here: nothing to stage or wait for
        norm = -1
        wait = -1
    squares = eps * 0.0                          # the input's sums of squares, for a phase with a norm
    # the first round's norm weights, loaded before the input's poll: their round trip is off the critical path
    g_first = gl.load(norms_ptr + norm + srow[:, None] * K_CHUNK + scol[None, :],
                      mask=(srow[:, None] < n_in) & (norm >= 0), other=0.0)
    squares2 = squares
    scat_in = n_in * 0                           # SCATTER: the input is a scattered sum's, at in_acc
    in_acc = n_in * 0
    if SCATTER:
        if (src >= 0) & (n_in > 0):
            scat_in = _scattered(table_ptr, src)
            if scat_in != 0:
                _await_count(published_ptr + src, _field(table_ptr, src, K_F_ITEMS), err_ptr, POLLS)
                in_acc = _sums_at(table_ptr, src, _field(table_ptr, p, K_F_IN_OFF), epoch)
            res = _field(table_ptr, p, K_F_RES)
            if res >= 0:                         # (the items read it; wait for it once, here)
                if _scattered(table_ptr, res) != 0:
                    _await_count(published_ptr + res, _field(table_ptr, res, K_F_ITEMS), err_ptr, POLLS)
    if COUNTED:
        if (src >= 0) & (n_in > 0):
            if _field(table_ptr, src, K_F_KIND) != K_ATTENTION:
                want = _field(table_ptr, src, K_F_ITEMS)
                count = gl.load(published_ptr + src, volatile=True)
                rounds = want * 0
                while (count < want) & (rounds < POLLS):
                    count = gl.load(published_ptr + src, volatile=True)
                    rounds += 1
    for r in range(0, K_STAGE_CHUNKS, K_ROWS):
        squares, squares2 = _stage_round(table_ptr, p, src, xs, x_ptr, words_ptr, epoch, err_ptr, r, n_in, norm, seg,
                                         squares, squares2, scat_in, in_acc, accf_ptr, WARPS, POLLS, SPLITS, SCATTER)
    mark, t_poll = _lap(mark, t_poll, PROFILE)
    if PROFILE:                                  # every word polled: before the norm, the wait and the barrier
        if _field(table_ptr, p, K_F_KIND) != K_ATTENTION:     # (an attention item stamps its own part there)
            _stamp(polled_at, PROFILE)
    rstd = squares * 0.0 + 1.0
    if norm >= 0:
        # RMSNorm as the model rounds it: bf16(g * bf16(x * rstd)); each thread rescales the values it staged
        rstd = gl.rsqrt(squares / (seg * K_CHUNK) + eps)
        rstd2 = rstd
        if SPLITS > 0:
            rstd2 = gl.rsqrt(squares2 / (gl.maximum(n_in - seg, 1) * K_CHUNK) + eps)
        for r in range(0, K_STAGE_CHUNKS, K_ROWS):
            _norm_round(xs, norms_ptr, norm, g_first, r, n_in, seg, rstd, rstd2, WARPS, SPLITS)
    if wait >= 0:
        offs = srow[:, None] * K_CHUNK + scol[None, :]
        _poll(words_ptr, _field(table_ptr, p, K_F_WAIT_OFF) + offs, offs < _field(table_ptr, p, K_F_WAIT_N),
              _tag(epoch, wait), err_ptr, POLLS)
    _cta_barrier()
    mark, t_stage = _lap(mark, t_stage, PROFILE)
    return mark, t_poll, t_stage, rstd


@gluon.jit
def _round_of(xs, r):
    """The staged chunks r.. of one round (ROWS chunks; r a multiple of ROWS)."""
    rounds = _view(xs, [K_STAGE_CHUNKS // K_ROWS, K_ROWS, K_CHUNK], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    return rounds.index(r // K_ROWS)             # (a view to index: its layout one rank less than its shape)


@gluon.jit
def _stage_round(table_ptr, p, src, xs, x_ptr, words_ptr, epoch, err_ptr, r, n_in, norm, seg, squares, squares2,
                 scat_in, in_acc, accf_ptr, WARPS: gl.constexpr, POLLS: gl.constexpr, SPLITS: gl.constexpr,
                 SCATTER: gl.constexpr):
    """`_stage`'s round of chunks r..r + ROWS: polled (or read), rounded to bf16 into `xs`, their squares added up
    for the norm (`squares`: the first `seg` chunks', `squares2` the rest's). Returns the two sums."""
    stage_l: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [WARPS, 1], [1, 0])   # [16, 256] input words
    srow = gl.arange(0, K_ROWS, layout=gl.SliceLayout(1, stage_l))
    scol = gl.arange(0, K_CHUNK, layout=gl.SliceLayout(0, stage_l))
    if r < n_in:
        offs = (r + srow)[:, None] * K_CHUNK + scol[None, :]            # value indices
        mask = (r + srow)[:, None] < n_in
        if src >= 0:
            # (the sums' load only where the chain has them: unguarded, Triton 3.6's LLVM lowering asserted)
            if SCATTER:
                if scat_in != 0:
                    vals = gl.load(accf_ptr + in_acc + offs, mask=mask, other=0.0, volatile=True)
                else:
                    vals = _polled(table_ptr, p, src, offs, mask, words_ptr, epoch, err_ptr, POLLS)
            else:
                vals = _polled(table_ptr, p, src, offs, mask, words_ptr, epoch, err_ptr, POLLS)
        else:
            vals = gl.load(x_ptr + offs, mask=mask, other=0.0).to(gl.float32)    # (fp32 or bf16)
        vals = vals.to(gl.bfloat16)
        if norm >= 0:
            sq = vals.to(gl.float32)
            by_row = gl.sum(sq * sq, axis=1)
            if SPLITS > 0:
                first = gl.sum(gl.where(r + srow < seg, by_row, 0.0), axis=0)
                squares += first
                squares2 += gl.sum(by_row, axis=0) - first
            else:
                squares += gl.sum(by_row, axis=0)
        _round_of(xs, r).store(vals)
    return squares, squares2


@gluon.jit
def _norm_round(xs, norms_ptr, norm, g_first, r, n_in, seg, rstd, rstd2, WARPS: gl.constexpr, SPLITS: gl.constexpr):
    """`_stage`'s RMSNorm of round r as the model rounds it, bf16(g * bf16(x * rstd)) (rstd2 past `seg` chunks), in
    place; `g_first`: the first round's norm weights, loaded early."""
    stage_l: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [WARPS, 1], [1, 0])
    srow = gl.arange(0, K_ROWS, layout=gl.SliceLayout(1, stage_l))
    scol = gl.arange(0, K_CHUNK, layout=gl.SliceLayout(0, stage_l))
    if r < n_in:
        offs = (r + srow)[:, None] * K_CHUNK + scol[None, :]
        mask = (r + srow)[:, None] < n_in
        if r == 0:
            g = g_first.to(gl.float32)
        else:
            g = gl.load(norms_ptr + norm + offs, mask=mask, other=0.0).to(gl.float32)
        rows = _round_of(xs, r)
        v = rows.load(stage_l).to(gl.float32)
        if SPLITS > 0:
            v = v * gl.where((r + srow)[:, None] < seg, rstd, rstd2)
        else:
            v = v * rstd
        rows.store((g * v.to(gl.bfloat16).to(gl.float32)).to(gl.bfloat16))


@gluon.jit
def _polled(table_ptr, p, src, offs, mask, words_ptr, epoch, err_ptr, POLLS: gl.constexpr):
    """Values `offs` of phase p's input (phase src's tagged words), once every word is tagged, as fp32."""
    q, h = _word_of(offs)
    return _value(_poll(words_ptr, _field(table_ptr, p, K_F_IN_OFF) + q, mask, _tag(epoch, src), err_ptr, POLLS), h)
