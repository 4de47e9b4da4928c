"""The megakernel's producer warp (issue 4): it walks its program's tile list and streams the weight tiles into
the ring by TMA as the consumers free slots (`chain.py` runs the consumers).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from crosspool.kernels.megakernel.common import (
    K_CHUNK,
    K_GROUP,
    K_MAX_TOP_K,
    K_ROWS,
    _tma_load,
)


@gluon.jit
def _smem_int(buf, i):
    """Element i of an int32 [n, 1] shared buffer, as a scalar, read by the producer's one warp."""
    return gl.max(buf.index(i).load(gl.BlockedLayout([1], [32], [1], [0])), axis=0)


@gluon.jit
def _produce(d0, d1, d2, d3, ring, full, empty, ranked, rowbase, mine, STAGES: gl.constexpr,
             BOXES: gl.constexpr):
    """The producer warp: down this program's tile list (`tile_lists`), one TMA load a ring slot as soon as the
    consumer frees it, across phase boundaries. A slot is one [BOXES, ROWS, CHUNK] box of the family's
    [chunks, rows, CHUNK] view: BOXES consecutive chunks of ROWS rows. A routed code's row is its expert's first row
    plus its row within the expert: the producer waits until the consumer has ranked that phase's router
    (`ranked`, one mbarrier a routed phase) and reads the expert's first row from `rowbase`. Codes are loaded two
    slots ahead, so no test waits on a load just issued (an L2 round trip under load is ~1 us)."""
    n_slots = gl.load(mine)
    code = gl.load(mine + 1)                         # the lists end in STAGES + 1 zero codes
    code2 = gl.load(mine + 2)
    for s in range(n_slots):
        stage = s % STAGES
        mbarrier.wait(empty.index(stage), ((s // STAGES) & 1) ^ 1)      # a fresh barrier passes parity 1
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
        code = code2
        code2 = gl.load(mine + 3 + s)
