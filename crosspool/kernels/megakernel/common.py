"""The megakernel's device-side basics (issue 4): Gluon's names that differ across Triton releases, the plan's
constants as the kernel sees them (module-level constants in a Gluon function must be `gl.constexpr`), and the
helpers that both the producer (`produce.py`) and the consumers (`consume.py`) use: table fields, tags, tagged
words (publish, poll, unpack), shared-memory views and the cycle counters.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

import crosspool.kernels.megakernel.plan as P

SHARED_KIB = 227          # shared memory a program can have on sm_90 (1 KiB of it kept for barriers and scratch)

# names that differ across Triton releases (3.9 | 3.6)
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier

# the plan's constants, as the kernel sees them
K_ROWS = gl.constexpr(P.ROWS)
K_ROWS_LOG2 = gl.constexpr(P.ROWS.bit_length() - 1)
K_CHUNK = gl.constexpr(P.CHUNK)
K_SUM = gl.constexpr(P.SUM)
K_SWIGLU = gl.constexpr(P.SWIGLU)
K_ATTENTION = gl.constexpr(P.ATTENTION)
K_HEADS = gl.constexpr(P.HEADS)
K_HEAD_DIM = gl.constexpr(P.HEAD_DIM)
K_KV_SLOT = gl.constexpr(P.KV_SLOT)
K_BLOCK = gl.constexpr(P.BLOCK)
K_TAG_PHASES = gl.constexpr(P.TAG_PHASES)
K_STAGE_CHUNKS = gl.constexpr(P.STAGE_CHUNKS)
K_NCOL = gl.constexpr(P.NCOL)
K_F_KIND = gl.constexpr(P.F_KIND)
K_F_ROW0 = gl.constexpr(P.F_ROW0)
K_F_ITEMS = gl.constexpr(P.F_ITEMS)
K_F_FAM = gl.constexpr(P.F_FAM)
K_F_UP = gl.constexpr(P.F_UP)
K_F_ITEMS_PER_SRC = gl.constexpr(P.F_ITEMS_PER_SRC)
K_F_DYN = gl.constexpr(P.F_DYN)
K_ROUTED = gl.constexpr(P.ROUTED)
K_F_KC = gl.constexpr(P.F_KC)
K_F_SOURCES = gl.constexpr(P.F_SOURCES)
K_F_STRIDE = gl.constexpr(P.F_STRIDE)
K_F_IN = gl.constexpr(P.F_IN)
K_F_IN_CHUNKS = gl.constexpr(P.F_IN_CHUNKS)
K_F_IN_OFF = gl.constexpr(P.F_IN_OFF)
K_F_RES = gl.constexpr(P.F_RES)
K_F_RES_OFF = gl.constexpr(P.F_RES_OFF)
K_F_OUT_OFF = gl.constexpr(P.F_OUT_OFF)
K_F_WAIT = gl.constexpr(P.F_WAIT)
K_F_WAIT_OFF = gl.constexpr(P.F_WAIT_OFF)
K_F_WAIT_N = gl.constexpr(P.F_WAIT_N)
K_F_NORM = gl.constexpr(P.F_NORM)
K_F_ROUTE = gl.constexpr(P.F_ROUTE)
K_F_ROUTE_OFF = gl.constexpr(P.F_ROUTE_OFF)
K_F_ROUTE_N = gl.constexpr(P.F_ROUTE_N)
K_F_ORDINAL = gl.constexpr(P.F_ORDINAL)
K_F_ROUTE_LAST = gl.constexpr(P.F_ROUTE_LAST)
K_F_SCALE = gl.constexpr(P.F_SCALE)
K_F_NORM_SEG = gl.constexpr(P.F_NORM_SEG)
K_F_TAIL = gl.constexpr(P.F_TAIL)
K_F_ROUTE_SCALED = gl.constexpr(P.F_ROUTE_SCALED)
K_F_PRODUCER_RANKS = gl.constexpr(P.F_PRODUCER_RANKS)
K_F_FOLD = gl.constexpr(P.F_FOLD)
K_F_FOLD_N = gl.constexpr(P.F_FOLD_N)
K_MAX_EXPERTS = gl.constexpr(P.MAX_EXPERTS)
K_MAX_TOP_K = gl.constexpr(P.MAX_TOP_K)
K_MAX_ORDINALS = gl.constexpr(P.MAX_ORDINALS)
K_GROUP = gl.constexpr(P.GROUP)


@gluon.jit
def _field(table_ptr, p, col: gl.constexpr):
    return gl.load(table_ptr + p * K_NCOL + col)


@gluon.jit
def _tag(epoch, p):
    return (epoch * K_TAG_PHASES + p + 1) & 0x7FFFFFFF


@gluon.jit
def _tiles_per_item(table_ptr, p):
    kc = _field(table_ptr, p, K_F_KC)
    if _field(table_ptr, p, K_F_KIND) == K_SWIGLU:
        n = 2 * kc
    elif _field(table_ptr, p, K_F_UP) != 0:      # a scattered sum (F_SCATTER): an item is one source's rows
        n = kc
    else:
        n = _field(table_ptr, p, K_F_SOURCES) * kc
    return n


@gluon.jit
def _scattered(table_ptr, p):
    """1 where phase p (>= 0) is a scattered sum (`Phase.scatter`: fp32 sums and a count, not tagged words)."""
    return gl.where((_field(table_ptr, p, K_F_KIND) == K_SUM) & (_field(table_ptr, p, K_F_UP) != 0), 1, 0)


@gluon.jit
def _sums_at(table_ptr, q, words_off, epoch):
    """Scattered sum q's fp32 sums for this launch, as an index into the words' memory as fp32: two buffers of its
    outputs from word `words_off` on, by the epoch's parity."""
    return 2 * words_off + (epoch & 1) * _field(table_ptr, q, K_F_ITEMS_PER_SRC) * K_ROWS


@gluon.jit
def _await_count(count_ptr, want, err_ptr, POLLS: gl.constexpr):
    """Wait until the count at count_ptr reaches `want`, by acquire loads (the writes released before each
    increment are then visible); after POLLS loads in vain, sets *err_ptr."""
    n = _load_acquire(count_ptr)
    polls = want * 0
    while (n < want) & (polls < POLLS):
        n = _load_acquire(count_ptr)
        polls += 1
    if n < want:
        gl.atomic_xchg(err_ptr, 1, sem="relaxed", scope="gpu")


@gluon.jit
def _load_acquire(ptr):
    return gl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _first_item(table_ptr, p, pid, nprog):
    """This program's first item of phase p (`plan.first_item`): its next ones follow nprog apart."""
    first = pid
    if _field(table_ptr, p, K_F_TAIL) != 0:
        first = (pid + _field(table_ptr, p, K_F_ITEMS)) % nprog
    return first


@gluon.jit
def _items_of(table_ptr, p, first, nprog):
    """How many of phase p's items the program whose first item is `first` takes."""
    return gl.maximum(_field(table_ptr, p, K_F_ITEMS) - first + nprog - 1, 0) // nprog


@gluon.jit
def _release(empty, slot, consumed, LEAN: gl.constexpr):
    """Consumers: every warp is done reading ring slot `slot` (its values are in registers): hand it back to the
    producer (one arrive after a barrier of the consumer warps); returns consumed + 1. The TMA that refills the
    slot writes through the async proxy after these generic reads, so a proxy fence orders the two: here in every
    consumer thread, or with LEAN in the producer, after it has taken the slot (`_claim`). Each thread's fence
    compiles to MEMBAR.ALL.CTA, which also waits for that thread's global loads and stores in flight (the residual
    loaded ahead of an item, the last item's published words)."""
    if not LEAN:
        fence_async_shared()
    _cta_barrier()
    mbarrier.arrive(empty.index(slot), count=1)
    return consumed + 1


@gluon.jit
def _claim(empty, s, STAGES: gl.constexpr, LEAN: gl.constexpr):
    """Producer: wait until ring slot count s's stage is free (a fresh barrier passes parity 1); with LEAN, the
    proxy fence that orders the consumers' reads of it before the TMA that will overwrite it (`_release`).
    Returns the stage."""
    stage = s % STAGES
    mbarrier.wait(empty.index(stage), ((s // STAGES) & 1) ^ 1)
    if LEAN:
        fence_async_shared()
    return stage


@gluon.jit
def _publish(ptrs, words):
    """Store tagged words, each by one relaxed gpu-scope 64-bit store: atomic for its readers, and with no value to
    return, nothing waits for it (an atomic exchange's return is an L2 round trip, ~1 us under load)."""
    gl.inline_asm_elementwise("st.relaxed.gpu.global.b64 [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,l", [ptrs, words],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _publish_where(ptrs, words, mask):
    """`_publish` where `mask` (int32, nonzero) only."""
    gl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.relaxed.gpu.global.b64 [$1], $2; }\n\t"
                              "mov.u32 $0, 0;", "=r,l,l,r", [ptrs, words, mask], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def _lap(mark, total, ON: gl.constexpr):
    """Profiling (ON): the SM's clock now, and `total` plus the cycles since `mark`; otherwise both unchanged."""
    if ON:
        now = gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,l", [mark], dtype=gl.int64, is_pure=False,
                                        pack=1)
        total += now - mark
        mark = now
    return mark, total


@gluon.jit
def _stamp(at, ON: gl.constexpr):
    """Profiling (ON): the GPU's global nanosecond timer (one clock for every SM) stored at `at`."""
    if ON:
        now = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [at.to(gl.int64, bitcast=True)],
                                        dtype=gl.int64, is_pure=False, pack=1)
        gl.store(at, now)


@gluon.jit
def _tagged(w, mask, tag):
    """1 if every word of w (2-D or 3-D, where mask) carries `tag`, else 0."""
    ok = gl.where(mask & ((w >> 32).to(gl.int32) != tag), 0, 1)
    if len(w.shape) == 3:
        ok = gl.min(ok, axis=2)
    return gl.min(gl.min(ok, axis=1), axis=0)


@gluon.jit
def _poll_pair(words_ptr, offs, offs2, mask, tag, err_ptr, POLLS: gl.constexpr):
    """`_poll` of two sets of words at once (one round trip a poll for both), both where `mask`."""
    w = gl.where(mask, offs, offs).to(gl.int64) * 0        # (one copy of the loads and checks: the code's size)
    w2 = w
    ready = tag * 0
    n = tag * 0
    while (ready == 0) & (n < POLLS):
        w = gl.load(words_ptr + offs, mask=mask, other=0, volatile=True)
        w2 = gl.load(words_ptr + offs2, mask=mask, other=0, volatile=True)
        ready = _tagged(w, mask, tag) & _tagged(w2, mask, tag)
        n += 1
    if ready == 0:
        gl.atomic_xchg(err_ptr, 1, sem="relaxed", scope="gpu")
    return w, w2


@gluon.jit
def _poll(words_ptr, offs, mask, tag, err_ptr, POLLS: gl.constexpr):
    """The words at offs (where mask), once every one carries `tag`; after POLLS polls in vain, sets *err_ptr
    and returns them as they are (a grid whose programs are not all resident would otherwise hang). The first poll
    is the loop's first round: one copy of the loads and checks (the kernel's code outgrew the instruction cache:
    session 26)."""
    w = gl.where(mask, offs, offs).to(gl.int64) * 0
    ready = tag * 0
    n = tag * 0
    while (ready == 0) & (n < POLLS):
        w = gl.load(words_ptr + offs, mask=mask, other=0, volatile=True)
        ready = _tagged(w, mask, tag)
        n += 1
    if ready == 0:
        gl.atomic_xchg(err_ptr, 1, sem="relaxed", scope="gpu")
    return w


if hasattr(gl.shared_memory_descriptor, "reinterpret"):          # Triton 3.9
    @gluon.jit
    def _view(mem, shape: gl.constexpr, layout: gl.constexpr):
        return mem.reinterpret(mem.dtype, shape, layout)
else:                                                              # 3.6
    @gluon.jit
    def _view(mem, shape: gl.constexpr, layout: gl.constexpr):
        return mem._reinterpret(mem.dtype, shape, layout)


@gluon.jit
def _word_of(v):
    """The word holding value v >= 0 of a phase's outputs (item v // ROWS, pair v % 8), and which half (0 low, 1
    high). As shifts and masks (ROWS a power of two): signed division and remainder take a few instructions more an
    element, and the kernel's code outgrows the instruction cache."""
    gl.static_assert((K_ROWS & (K_ROWS - 1)) == 0)
    return ((v >> 1) & -(K_ROWS // 2)) | (v & (K_ROWS // 2 - 1)), (v >> K_ROWS_LOG2 - 1) & 1


@gluon.jit
def _value(w, half):
    """The bf16 value in half `half` of each word, as fp32."""
    return (((w >> (half * 16)) & 0xFFFF) << 16).to(gl.int32).to(gl.float32, bitcast=True)
