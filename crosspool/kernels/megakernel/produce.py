"""The megakernel's producer warp (issue 4): it walks its program's tile list and streams the weight tiles into
the ring by TMA as the consumers (`consume.py`) free slots.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from crosspool.kernels.megakernel.attend import SLOT_BLOCKS, _kv_slots
from crosspool.kernels.megakernel.common import (
    K_BLOCK,
    K_CHUNK,
    K_F_FAM,
    K_F_ITEMS,
    K_F_ITEMS_PER_SRC,
    K_F_KC,
    K_F_KIND,
    K_F_ORDINAL,
    K_F_PRODUCER_RANKS,
    K_F_ROW0,
    K_F_SOURCES,
    K_F_STRIDE,
    K_F_UP,
    K_GROUP,
    K_HEAD_DIM,
    K_MAX_TOP_K,
    K_ROUTED,
    K_ROWS,
    K_SWIGLU,
    _claim,
    _field,
    _tma_load,
    _view,
)
from crosspool.kernels.megakernel.rank import _rank_by_producer


@gluon.jit
def _smem_int(buf, i):
    """Element i of an int32 [n, 1] shared buffer, as a scalar, read by the producer's one warp."""
    return gl.max(buf.index(i).load(gl.BlockedLayout([1], [32], [1], [0])), axis=0)


@gluon.jit
def _produce(d0, d1, d2, d3, dkv, ring, full, empty, ranked, rowbase, itemq, mine, table_ptr, ctx_ptr, bt_ptr,
             kv_layers, counters_ptr, nprog, routes_ptr, words_ptr, epoch_ptr, err_ptr, expert_base, picked, keys,
             lbuf, prof, STAGES: gl.constexpr, BOXES: gl.constexpr, ATTENTION: gl.constexpr, DYNAMIC: gl.constexpr,
             LEAN: gl.constexpr = False, KEYS: gl.constexpr = False, POLLS: gl.constexpr = 1,
             PROFILE: gl.constexpr = False):
    """The producer warp: down this program's tile list (`tile_lists`), one TMA load a ring slot as soon as the
    consumer frees it, across phase boundaries. A slot is one [BOXES, ROWS, CHUNK] box of the family's
    [chunks, rows, CHUNK] view: BOXES consecutive chunks of ROWS rows. A routed code's row is its expert's first row
    plus its row within the expert, from `rowbase`: with KEYS the producer ranks the router itself at the code of a
    phase the table marks (F_PRODUCER_RANKS: a dynamic phase, first of its router's, `rank._rank_by_producer`);
    otherwise it waits until the consumers have (`ranked`, one mbarrier a routed phase). Codes are loaded two
    slots ahead, so no test waits on a load just issued (an L2 round trip under load is ~1 us). An attention code
    stands for its item's key and value slots (`attend._kv_slots`); a dynamic code for a dynamic phase's items
    (`_dynamic_items`)."""
    n_codes = gl.load(mine)
    code = gl.load(mine + 1)                         # the lists end in STAGES + 1 zero codes
    code2 = gl.load(mine + 2)
    ctx = gl.load(ctx_ptr).to(gl.int32)              # (the engine's buffers are int64)
    box_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)   # as `Chain`'s
    kvring = _view(ring, [STAGES * SLOT_BLOCKS, K_BLOCK, 1, K_HEAD_DIM], box_l)
    s = ctx * 0                                      # ring slots issued
    epoch = gl.load(epoch_ptr)
    rankings = s                                     # routers this warp has ranked (KEYS)
    for c in range(n_codes):
        if DYNAMIC and (code < 0) & (((code >> 30) & 1) != 0):
            if KEYS:
                if _field(table_ptr, code & 0xFFFF, K_F_PRODUCER_RANKS) != 0:     # rank its router first
                    _rank_by_producer(table_ptr, _field(table_ptr, code & 0xFFFF, K_F_ORDINAL), rankings % 2,
                                      routes_ptr, words_ptr, epoch, err_ptr, expert_base, rowbase, picked, keys, lbuf,
                                      ranked, prof, POLLS, PROFILE)
                    rankings += 1
            s = _dynamic_items(d0, d1, d2, d3, ring, full, empty, ranked, rowbase, itemq, s, table_ptr,
                               code & 0xFFFF, counters_ptr, nprog, STAGES, BOXES, LEAN)
        elif ATTENTION and code < 0:
            s = _kv_slots(dkv, kvring, full, empty, s, table_ptr, code, ctx, bt_ptr, kv_layers, STAGES, LEAN)
        else:
            s = _weight_slot(d0, d1, d2, d3, ring, full, empty, ranked, rowbase, s, code, STAGES, BOXES, LEAN)
        code = code2
        code2 = gl.load(mine + 3 + c)


@gluon.jit
def _weight_slot(d0, d1, d2, d3, ring, full, empty, ranked, rowbase, s, code, STAGES: gl.constexpr,
                 BOXES: gl.constexpr, LEAN: gl.constexpr = False, itemq=None, item=-1):
    """One weight tile's slot (`tile_lists`' code), as ring slot s; returns s + 1. With `itemq` (a dynamic phase),
    the slot's item goes there first."""
    stage = _claim(empty, s, STAGES, LEAN)
    if itemq is not None:
        itemq.index(stage).store(gl.full([1], item, gl.int32, gl.BlockedLayout([1], [32], [1], [0])))
    fam = (code >> 28) & 3
    row = code & 0xFFFFFF
    chunk = (code >> 24) & 15
    if ((code >> 30) & 1) != 0:
        o = (row >> 16) & 0xFF
        mbarrier.wait(ranked.index(o), 0)
        row = _smem_int(rowbase, (o % K_GROUP) * K_MAX_TOP_K + ((row >> 12) & 15)) + (row & 0xFFF)
    bar = full.index(stage)
    mbarrier.expect(bar, BOXES * K_ROWS * K_CHUNK * 2)
    if fam == 0:
        _tma_load(d0, [chunk, row, 0], bar, ring.index(stage))
    elif fam == 1:
        _tma_load(d1, [chunk, row, 0], bar, ring.index(stage))
    elif fam == 2:
        _tma_load(d2, [chunk, row, 0], bar, ring.index(stage))
    else:
        _tma_load(d3, [chunk, row, 0], bar, ring.index(stage))
    return s + 1


@gluon.jit
def _dynamic_items(d0, d1, d2, d3, ring, full, empty, ranked, rowbase, itemq, s, table_ptr, p, counters_ptr, nprog,
                   STAGES: gl.constexpr, BOXES: gl.constexpr, LEAN: gl.constexpr):
    """Producer: (swiglu or sum) phase p's items as this program takes them: its own (item pid), then each next one
    from the phase's counter (an atomic, issued an item ahead, so its round trip passes under that item's loads);
    the codes as `tile_lists` makes them. Each slot's item goes into `itemq` beside the ring; -1 in a slot with no
    bytes ends the phase for the consumers. Returns the ring slot count."""
    one_l: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    items = _field(table_ptr, p, K_F_ITEMS)
    kc = _field(table_ptr, p, K_F_KC)
    kind = _field(table_ptr, p, K_F_KIND)
    swiglu = kind == K_SWIGLU
    up = _field(table_ptr, p, K_F_UP)
    scatter = (up != 0) & (kind != K_SWIGLU)            # a scattered sum (F_SCATTER): one source an item
    tiles = gl.where(swiglu, 2 * kc, gl.where(scatter, kc, _field(table_ptr, p, K_F_SOURCES) * kc))
    fam = _field(table_ptr, p, K_F_FAM)
    per = _field(table_ptr, p, K_F_ITEMS_PER_SRC)
    ordinal = _field(table_ptr, p, K_F_ORDINAL)
    row0 = _field(table_ptr, p, K_F_ROW0)
    stride = _field(table_ptr, p, K_F_STRIDE)
    at = counters_ptr + p + gl.arange(0, 1, layout=one_l)
    nxt = gl.atomic_add(at, gl.full([1], 1, gl.int32, one_l), sem="relaxed", scope="gpu") + nprog
    item = gl.program_id(0)
    while item < items:
        expert = item // per                             # (swiglu, scatter: the item's expert, first row in it)
        first = (item % per) * K_ROWS
        part = item * 0                                  # t // kc: a sum's source, a swiglu's gate (0) or up (1)
        chunk = part                                     # t % kc (counted: no division a slot)
        for _j in range(tiles // BOXES):
            src = part                                   # a sum: source s reads its own matrix, item rows
            within = item * K_ROWS
            if swiglu:                                   # swiglu: the item's expert, its gate rows then up rows
                src = expert
                within = first + part * up
            if scatter:                                  # (one part: the item's kc chunks)
                src = expert
                within = first
            if ordinal >= 0:
                row = K_ROUTED | (ordinal << 16) | (src << 12) | within
            else:
                row = row0 + src * stride + within
            s = _weight_slot(d0, d1, d2, d3, ring, full, empty, ranked, rowbase, s, (fam << 28) | (chunk << 24) |
                             row, STAGES, BOXES, LEAN, itemq, item)
            chunk += BOXES
            part = gl.where(chunk == kc, part + 1, part)
            chunk = gl.where(chunk == kc, 0, chunk)
        item = gl.max(nxt, axis=0)
        nxt = gl.atomic_add(at, gl.full([1], 1, gl.int32, one_l), sem="relaxed", scope="gpu") + nprog
    stage = _claim(empty, s, STAGES, LEAN)      # (no TMA into this one: nothing to fence, but it does no harm)
    # -1, made from the last (unused) counter value: the phase ends only once that atomic is done, so the last
    # program's reset of the counters (`_chain_kernel`) comes after every increment
    itemq.index(stage).store(gl.where(nxt < 0, 0, -1))
    mbarrier.arrive(full.index(stage), count=1)
    return s + 1
