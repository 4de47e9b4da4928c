"""Batch-1 decode as one persistent kernel whose phases wait on tagged words, not on barriers (issue 4).

Why (docs/benchmarks.md section 7, sessions 9-14): at batch 1 each OLMoE layer is six dependent GEMV-like
phases. A kernel per phase loses ~2.5-4 us at every boundary even under PDL, and so does a grid barrier inside
one kernel, because its release fence waits for the loads in flight. A phase that instead polls the very words
it reads, each a 64-bit (value, tag) pair written by one relaxed atomic, costs ~1 us a boundary. The
synthetic step then reaches 0.89 of copy bandwidth (`scripts/tma_ring_probe.py`, `ring-phases-ll`).

This module is that kernel's core, a chain of dependent GEMV phases over stacked weight families:
- `Phase` describes one phase: a plain GEMV, or a sum of several matrices each applied to its own segment of the
  input (the experts' down projections), or a gated pair `silu(W_gate x) * (W_up x)` for several matrices (the
  experts' gate/up). Each phase can RMSNorm its input first (the layer norms), add a residual, and wait on one
  more phase whose words it does not read. A phase can be routed: its matrices are the top-k experts of a router
  phase, ranked by every program at run time (softmax, greedy), and a routed sum weights each expert.
- `plan` checks a chain and lays it out as an int32 table plus word offsets; `reference` computes it in torch.
- `Chain` runs it on the GPU: one program an SM, each walking its work items (16 output rows) and streaming their
  [16, 256] weight tiles through a ring of shared-memory slots filled by TMA. The ring's loads run ahead across
  phase boundaries, because the weights do not depend on the phase before. They follow a tile list built on
  the host (`tile_lists`), so issuing one costs one load, not a walk of the phase table.
- Outputs go out two bf16 values a tagged word, tag = (epoch * 4096 + phase + 1) mod 2^31 in the high half.
  A consumer polls its input words until all of them carry the producer's tag. The epoch lives on the device,
  and the last program to finish advances it, so CUDA-graph replays need no host work and never see the previous
  step's words as ready.

What is not here yet: attention, the embedding and lm_head (docs/progress.md). Needs Gluon (Triton >= 3.6) and
an sm_90 GPU; `plan`, `tile_lists` and `reference` run anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from crosspool.kernels._common import num_sms
from crosspool.kernels.torch_ref import rms_norm, route
from crosspool.models.spec import RoutingSpec

# names that differ across Triton releases (3.9 | 3.6)
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier

ROWS = 16                 # output rows of one work item, and rows of one weight tile
CHUNK = 256               # columns of one weight tile (512 B of bf16, the widest TMA box)
SUM, SWIGLU = 0, 1
NO_PHASE = -2             # `residual`/`wait`/`route` unset; -1 means the step's input vector
TAG_PHASES = 4096         # phases a step can have (tags are epoch * TAG_PHASES + phase + 1)
STAGE_CHUNKS = 32         # input chunks a program can stage (8,192 values)
(F_KIND, F_FAM, F_ROW0, F_ITEMS, F_KC, F_SOURCES, F_STRIDE, F_UP, F_ITEMS_PER_SRC, F_IN, F_IN_CHUNKS, F_IN_OFF,
 F_RES, F_RES_OFF, F_OUT_OFF, F_WAIT) = range(16)
F_WAIT_OFF, F_WAIT_N, F_NORM, F_ROUTE, F_ROUTE_OFF, F_ROUTE_N, F_ORDINAL, F_ROUTE_LAST = 16, 17, 18, 19, 20, 21, 22, 23
NCOL = 24
MAX_EXPERTS = 256         # router outputs a routed phase can rank
MAX_TOP_K = 16            # experts a routed phase takes
ROUTED = 1 << 30          # tile-code flag: the row is ordinal << 16 | source << 12 | row within the expert


@dataclass(frozen=True)
class Phase:
    """One phase of the chain. kind "sum": out[r] = sum over s < sources of W[row0 + s*stride + r, :] . x_s,
    where x_s is the input's s-th segment of `k` values (one source: a GEMV). kind "swiglu": for each of
    `sources` matrices s, rows_per_source outputs silu(W[g, :] . x) * (W[g + up_offset, :] . x), with
    g = row0 + s*stride + r and x the input's first `k` values. `family` indexes the weight tensors [rows, k]."""

    kind: str
    family: int
    row0: int
    out_rows: int
    k: int
    sources: int = 1
    stride: int = 0
    up_offset: int = 0
    input: int = -1               # phase whose outputs are the input (-1: the step's input vector)
    residual: int = NO_PHASE      # phase whose outputs are added to this one's (-1: the step's input)
    wait: int = NO_PHASE          # a phase this one waits for without reading it
    norm: int = -1                # RMSNorm of the input first, weights at this offset of the chain's `norms` (-1: none)
    route: int = NO_PHASE         # a router phase: the sources are its top-`sources` experts, not 0..sources-1, and
                                  # a "sum" weights source s by its softmax probability (OLMoE's rule: greedy, no
                                  # renormalization)


@dataclass(frozen=True)
class Plan:
    table: torch.Tensor           # int32 [phases, NCOL]
    routed: list[int]             # the routed phases, in order (a routed phase's ordinal is its index here)
    out_offsets: list[int]        # word offset of each phase's outputs (two values a word)
    words: int                    # words of the whole chain
    input_len: int                # values of the step's input vector


def plan(phases: list[Phase], families: list[torch.Tensor], input_len: int, norms_len: int = 0) -> Plan:
    """Check the chain against its weights (and `norms_len` norm weights) and lay it out; a bad chain is a
    ValueError naming the phase."""
    if not phases or len(phases) >= TAG_PHASES:
        raise ValueError(f"a chain has 1..{TAG_PHASES - 1} phases, got {len(phases)}")
    rows, offsets, total = [], [], 0
    lengths: list[int] = []
    routed: list[int] = []

    def length(src: int, i: int, what: str) -> int:
        if src == -1:
            return input_len
        if not 0 <= src < i:
            raise ValueError(f"phase {i}: {what} {src} is not an earlier phase")
        return lengths[src]

    for i, ph in enumerate(phases):
        if ph.kind not in ("sum", "swiglu"):
            raise ValueError(f"phase {i}: kind {ph.kind!r}, expected 'sum' or 'swiglu'")
        if not 0 <= ph.family < len(families):
            raise ValueError(f"phase {i}: family {ph.family}, there are {len(families)}")
        if ph.k <= 0 or ph.k % CHUNK or ph.sources < 1 or ph.out_rows <= 0 or \
                ph.out_rows % (ROWS * ph.sources if ph.kind == "swiglu" else ROWS):
            raise ValueError(f"phase {i}: k ({ph.k}) must be a positive multiple of {CHUNK}, and the outputs "
                             f"({ph.out_rows}) of {ROWS} a source ({ph.sources})")
        w = families[ph.family]
        if w.dim() != 2 or w.shape[1] != ph.k:
            raise ValueError(f"phase {i}: family {ph.family} is {tuple(w.shape)}, expected [rows, {ph.k}]")
        swiglu = ph.kind == "swiglu"
        per_src = ph.out_rows // ph.sources if swiglu else ph.out_rows
        experts = ph.sources
        if ph.route != NO_PHASE:
            experts = length(ph.route, i, "route")
            if ph.route < 0 or not ph.sources <= min(experts, MAX_TOP_K) or experts > MAX_EXPERTS or \
                    ph.stride <= 0 or per_src + (ph.up_offset if swiglu else 0) > 1 << 12:
                raise ValueError(f"phase {i}: routed by phase {ph.route} ({experts} experts) to {ph.sources}: needs "
                                 f"top-k <= {MAX_TOP_K} and <= experts <= {MAX_EXPERTS}, a positive stride, and "
                                 "expert rows below 4096")
        last_row = ph.row0 + (experts - 1) * ph.stride + per_src + (ph.up_offset if swiglu else 0)
        if ph.row0 < 0 or last_row > w.shape[0]:
            raise ValueError(f"phase {i}: rows up to {last_row} of family {ph.family}, which has {w.shape[0]}")
        need = ph.k if swiglu else ph.k * ph.sources
        have = length(ph.input, i, "input")
        if need > have or need > STAGE_CHUNKS * CHUNK:
            raise ValueError(f"phase {i}: reads {need} input values, its input has {have} (at most "
                             f"{STAGE_CHUNKS * CHUNK})")
        if ph.residual != NO_PHASE and length(ph.residual, i, "residual") < ph.out_rows:
            raise ValueError(f"phase {i}: residual {ph.residual} is shorter than its {ph.out_rows} outputs")
        if ph.wait != NO_PHASE and (ph.wait < 0 or length(ph.wait, i, "wait") > ROWS * CHUNK):
            raise ValueError(f"phase {i}: wait {ph.wait} must be an earlier phase of at most {ROWS * CHUNK} outputs")
        if ph.norm != -1 and (ph.norm < 0 or ph.norm + need > norms_len or (not swiglu and ph.sources != 1)):
            raise ValueError(f"phase {i}: norm weights at {ph.norm} need one input segment and {need} of the "
                             f"chain's {norms_len} norm weights")
        offsets.append(total)
        lengths.append(ph.out_rows)
        kc = ph.k // CHUNK
        src_off = (lambda s: offsets[s] if s >= 0 else 0)
        rows.append([SWIGLU if swiglu else SUM, ph.family, ph.row0, ph.out_rows // ROWS, kc, ph.sources, ph.stride,
                     ph.up_offset, per_src // ROWS, ph.input, need // CHUNK, src_off(ph.input), ph.residual,
                     src_off(ph.residual) if ph.residual != NO_PHASE else 0, total, ph.wait,
                     src_off(ph.wait) if ph.wait != NO_PHASE else 0,
                     lengths[ph.wait] // 2 if ph.wait >= 0 else 0, ph.norm, ph.route,
                     src_off(ph.route) if ph.route != NO_PHASE else 0,
                     lengths[ph.route] if ph.route != NO_PHASE else 0,
                     len(routed) if ph.route != NO_PHASE else -1, -1])
        if ph.route != NO_PHASE:
            routed.append(i)
        total += ph.out_rows // 2                 # two values a word
    # the last routed phase of each run that shares one router: ranking it once serves them all, so the ring can
    # load a later phase's experts (the down's) while an earlier one (the gate/up) computes
    for first, phase in enumerate(routed):
        last = first
        while last + 1 < len(routed) and phases[routed[last + 1]].route == phases[phase].route:
            last += 1
        rows[phase][F_ROUTE_LAST] = last
    return Plan(torch.tensor(rows, dtype=torch.int32), routed, offsets, total, input_len)


def reference(phases: list[Phase], families: list[torch.Tensor], x: torch.Tensor, norms: torch.Tensor | None = None,
              eps: float = 1e-5) -> list[torch.Tensor]:
    """Every phase's outputs, as the kernel computes them: each input vector rounded to the weights' dtype (the
    kernel stages it in shared memory so), products and sums in fp32, each output rounded to bf16 (two go in a
    word)."""
    outs: list[torch.Tensor] = []
    x = x.float()

    def vec(src: int) -> torch.Tensor:
        return x if src == -1 else outs[src]

    for ph in phases:
        w = families[ph.family]
        inp = vec(ph.input).to(w.dtype)
        if ph.norm != -1:
            assert norms is not None
            n = ph.k if ph.kind == "swiglu" else ph.k * ph.sources
            inp = rms_norm(inp[:n], norms[ph.norm:ph.norm + n].to(w.dtype), eps)
        inp = inp.float()
        experts, gates = list(range(ph.sources)), [1.0] * ph.sources
        if ph.route != NO_PHASE:
            spec = RoutingSpec(num_experts=len(outs[ph.route]), top_k=ph.sources, scoring="softmax",
                               norm_topk_prob=False, topk_method="greedy")
            weights, ids = route(outs[ph.route][None], spec, None)
            experts, gates = ids[0].tolist(), weights[0].tolist()
        if ph.kind == "sum":
            y = torch.zeros(ph.out_rows, dtype=torch.float32, device=w.device)
            for s, (e, gate) in enumerate(zip(experts, gates, strict=True)):
                rows = w[ph.row0 + e * ph.stride: ph.row0 + e * ph.stride + ph.out_rows].float()
                y += gate * (rows @ inp[s * ph.k:(s + 1) * ph.k])
        else:
            per = ph.out_rows // ph.sources
            parts = []
            for e in experts:
                g0 = ph.row0 + e * ph.stride
                gate = w[g0:g0 + per].float() @ inp[:ph.k]
                up = w[g0 + ph.up_offset:g0 + ph.up_offset + per].float() @ inp[:ph.k]
                parts.append(torch.nn.functional.silu(gate) * up)
            y = torch.cat(parts)
        if ph.residual != NO_PHASE:
            y = y + vec(ph.residual)[:ph.out_rows]
        outs.append(y.to(w.dtype).float())        # a word carries two bf16 values
    return outs


def tile_lists(p: Plan, nprog: int, boxes: int = 1, pad: int = 0) -> torch.Tensor:
    """Each program's ring slots in the order it consumes them (its items of phase 0, then of phase 1, ...; an
    item's tiles in order, `boxes` consecutive chunks a slot), as int32 codes family << 28 | first chunk << 24 | row;
    a routed phase's row is ROUTED | ordinal << 16 | source << 12 | row within the expert. Element 0 of program r's
    list is its count, and `pad` zero codes follow the last. The ring's producer only reads the next code, so its
    loads can run ahead across phases, up to the first routed tile whose routing is not known yet."""
    per_prog: list[list[torch.Tensor]] = [[] for _ in range(nprog)]
    for f in p.table.tolist():
        kind, fam, row0, items, kc = f[F_KIND], f[F_FAM], f[F_ROW0], f[F_ITEMS], f[F_KC]
        item = torch.arange(items)[:, None]
        if kind == SWIGLU:
            t = torch.arange(2 * kc)[None, :]
            per = f[F_ITEMS_PER_SRC]
            src, within = item // per, (item % per) * ROWS + (t // kc) * f[F_UP]
        else:
            t = torch.arange(f[F_SOURCES] * kc)[None, :]
            src, within = t // kc, item * ROWS
        if f[F_ORDINAL] >= 0:                 # the expert is known only once the consumer has ranked the router
            rows = ROUTED | (f[F_ORDINAL] << 16) | (src << 12) | within
            if f[F_ORDINAL] >= 1 << 8:
                raise ValueError("a tile list codes at most 256 routed phases")
        else:
            rows = row0 + src * f[F_STRIDE] + within
            if rows.max() >= 1 << 24:
                raise ValueError(f"a tile list codes rows below 2^24 (row {rows.max()})")
        if fam >= 1 << 2:
            raise ValueError(f"a tile list codes families below 4 (family {fam})")
        if kc % boxes or kc > 16:
            raise ValueError(f"{boxes} boxes a slot do not divide a row's {kc} chunks (at most 16 are coded)")
        codes = ((fam << 28) | ((t % kc) << 24) | rows)[:, ::boxes]
        for r in range(min(nprog, items)):
            per_prog[r].append(codes[r::nprog].reshape(-1))
    flat = [torch.cat(c) if c else torch.zeros(0, dtype=torch.int64) for c in per_prog]
    width = 1 + max(len(c) for c in flat) + pad
    out = torch.zeros(nprog, width, dtype=torch.int32)
    for r, c in enumerate(flat):
        out[r, 0] = len(c)
        out[r, 1:1 + len(c)] = c.to(torch.int32)
    return out


def unpack(words: torch.Tensor) -> torch.Tensor:
    """The values of tagged words, in order. Word j of a 16-value item holds value j in its low 16 bits and value
    j + 8 above them (bf16 each); the tag is the high 32 bits."""
    bits = (words & 0xFFFFFFFF).reshape(-1, ROWS // 2)
    pairs = torch.cat([bits & 0xFFFF, bits >> 16], dim=1).reshape(-1)
    return (pairs << 16).to(torch.int32).view(torch.float32)


# ---------------------------------------------------------------------------------------------------- the kernel
# the constants above, as the kernel sees them
K_ROWS = gl.constexpr(ROWS)
K_CHUNK = gl.constexpr(CHUNK)
K_SWIGLU = gl.constexpr(SWIGLU)
K_TAG_PHASES = gl.constexpr(TAG_PHASES)
K_STAGE_CHUNKS = gl.constexpr(STAGE_CHUNKS)
K_NCOL = gl.constexpr(NCOL)
K_F_KIND = gl.constexpr(F_KIND)
K_F_FAM = gl.constexpr(F_FAM)
K_F_ROW0 = gl.constexpr(F_ROW0)
K_F_ITEMS = gl.constexpr(F_ITEMS)
K_F_KC = gl.constexpr(F_KC)
K_F_SOURCES = gl.constexpr(F_SOURCES)
K_F_STRIDE = gl.constexpr(F_STRIDE)
K_F_UP = gl.constexpr(F_UP)
K_F_ITEMS_PER_SRC = gl.constexpr(F_ITEMS_PER_SRC)
K_F_IN = gl.constexpr(F_IN)
K_F_IN_CHUNKS = gl.constexpr(F_IN_CHUNKS)
K_F_IN_OFF = gl.constexpr(F_IN_OFF)
K_F_RES = gl.constexpr(F_RES)
K_F_RES_OFF = gl.constexpr(F_RES_OFF)
K_F_OUT_OFF = gl.constexpr(F_OUT_OFF)
K_F_WAIT = gl.constexpr(F_WAIT)
K_F_WAIT_OFF = gl.constexpr(F_WAIT_OFF)
K_F_WAIT_N = gl.constexpr(F_WAIT_N)
K_F_NORM = gl.constexpr(F_NORM)
K_F_ROUTE = gl.constexpr(F_ROUTE)
K_F_ROUTE_OFF = gl.constexpr(F_ROUTE_OFF)
K_F_ROUTE_N = gl.constexpr(F_ROUTE_N)
K_F_ORDINAL = gl.constexpr(F_ORDINAL)
K_F_ROUTE_LAST = gl.constexpr(F_ROUTE_LAST)
K_MAX_EXPERTS = gl.constexpr(MAX_EXPERTS)
K_MAX_TOP_K = gl.constexpr(MAX_TOP_K)


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
    else:
        n = _field(table_ptr, p, K_F_SOURCES) * kc
    return n


@gluon.jit
def _items_of(table_ptr, p, pid, nprog):
    """Work items of phase p this program takes (items pid, pid + nprog, ...)."""
    return gl.maximum(_field(table_ptr, p, K_F_ITEMS) - pid + nprog - 1, 0) // nprog


@gluon.jit
def _issuable(code, ready):
    """A static tile, or a routed one whose phase this program has already ranked (`ready` routed phases)."""
    return (((code >> 30) & 1) == 0) | (((code >> 16) & 0xFF) < ready)


@gluon.jit
def _issue(d0, d1, d2, d3, code, bar, slot, table_ptr, routes_ptr, expert_base, n_ord, BOXES: gl.constexpr):
    """Start the TMA load of the slot `code` names (`tile_lists`): one [BOXES, ROWS, CHUNK] box of the family's
    [chunks, rows, CHUNK] view, so BOXES consecutive chunks of ROWS rows land chunk by chunk. A routed code's row
    is its phase's row0 + expert * stride + its row within the expert, the expert from this program's ranking
    (`expert_base`: the program's [n_ord, 2 * MAX_TOP_K] ids and weights)."""
    fam = (code >> 28) & 3
    row = code & 0xFFFFFF
    chunk = (code >> 24) & 15
    if ((code >> 30) & 1) != 0:
        o = (row >> 16) & 0xFF
        ph = gl.load(routes_ptr + o)
        expert = gl.load(expert_base + o * 2 * K_MAX_TOP_K + ((row >> 12) & 15))
        row = _field(table_ptr, ph, K_F_ROW0) + expert * _field(table_ptr, ph, K_F_STRIDE) + (row & 0xFFF)
    mbarrier.expect(bar, BOXES * K_ROWS * K_CHUNK * 2)
    if fam == 0:
        _tma_load(d0, [chunk, row, 0], bar, slot)
    elif fam == 1:
        _tma_load(d1, [chunk, row, 0], bar, slot)
    elif fam == 2:
        _tma_load(d2, [chunk, row, 0], bar, slot)
    else:
        _tma_load(d3, [chunk, row, 0], bar, slot)


@gluon.jit
def _tagged(w, mask, tag):
    """1 if every word of w (where mask) carries `tag`, else 0."""
    return gl.min(gl.min(gl.where(mask & ((w >> 32).to(gl.int32) != tag), 0, 1), axis=1), axis=0)


@gluon.jit
def _poll(words_ptr, offs, mask, tag, err_ptr, POLLS: gl.constexpr):
    """The words at offs (where mask), once every one carries `tag`; after POLLS polls in vain, sets *err_ptr
    and returns them as they are (a grid whose programs are not all resident would otherwise hang)."""
    w = gl.load(words_ptr + offs, mask=mask, other=0, volatile=True)
    ready = _tagged(w, mask, tag)
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
    """The word holding value v of a phase's outputs (item v // ROWS, pair v % 8), and which half (0 low, 1 high)."""
    return (v // K_ROWS) * (K_ROWS // 2) + v % (K_ROWS // 2), (v // (K_ROWS // 2)) % 2


@gluon.jit
def _value(w, half):
    """The bf16 value in half `half` of each word, as fp32."""
    return (((w >> (half * 16)) & 0xFFFF) << 16).to(gl.int32).to(gl.float32, bitcast=True)


@gluon.jit
def _chain_kernel(d0, d1, d2, d3, table_ptr, num_phases, tiles_ptr, tiles_stride, x_ptr, norms_ptr, eps, words_ptr,
                  routes_ptr, experts_ptr, n_ord, epoch_ptr, done_ptr, err_ptr, nprog,
                  STAGES: gl.constexpr, BOXES: gl.constexpr, WARPS: gl.constexpr, POLLS: gl.constexpr,
                  COMPUTE: gl.constexpr = True):
    pid = gl.program_id(0)
    tile: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [WARPS, 1], [1, 0])     # a warp reads a 512-B row
    rows_l: gl.constexpr = gl.SliceLayout(1, tile)
    stage_l: gl.constexpr = gl.BlockedLayout([1, 2], [1, 32], [WARPS, 1], [1, 0])   # [16, 256] input words
    ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BOXES, K_ROWS, K_CHUNK], d0.layout)
    flat_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    boxes = _view(ring, [STAGES, BOXES * K_ROWS, K_CHUNK], flat_l)     # slot s, box b: rows b*ROWS.. of index(s)
    # the staged input, [chunks, CHUNK]; `xrows.index(c)` is chunk c as a [1, CHUNK] row (`tile` layout)
    x_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    xs = gl.allocate_shared_memory(gl.bfloat16, [K_STAGE_CHUNKS, K_CHUNK], x_l)
    xrows = _view(xs, [K_STAGE_CHUNKS, 1, K_CHUNK], x_l)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    fence_async_shared()
    epoch = gl.load(epoch_ptr)

    # the producer runs STAGES slots ahead of the consumer, across phase boundaries, down this program's list;
    # the next slot's code is loaded one refill early, so its latency hides behind a slot's arithmetic
    # (in order: it stops at a routed tile until the consumer has ranked that tile's router, then catches up)
    mine = tiles_ptr + pid * tiles_stride
    n_slots = gl.load(mine)
    zero = pid * 0
    expert_base = experts_ptr + pid * n_ord * 2 * K_MAX_TOP_K
    ready = zero                                     # routed phases this program has ranked
    issued = zero
    code = gl.load(mine + 1)                         # the lists end in STAGES + 1 zero codes
    while (issued < gl.minimum(n_slots, STAGES)) & _issuable(code, ready):
        _issue(d0, d1, d2, d3, code, bars.index(issued % STAGES), ring.index(issued % STAGES), table_ptr,
               routes_ptr, expert_base, n_ord, BOXES)
        issued += 1
        code = gl.load(mine + 1 + issued)

    consumed = zero
    srow = gl.arange(0, K_ROWS, layout=gl.SliceLayout(1, stage_l))
    scol = gl.arange(0, K_CHUNK, layout=gl.SliceLayout(0, stage_l))
    rows = gl.arange(0, K_ROWS, layout=rows_l)
    for p in range(num_phases):
        kind = _field(table_ptr, p, K_F_KIND)
        kc = _field(table_ptr, p, K_F_KC)
        src = _field(table_ptr, p, K_F_IN)
        # stage the input vector in shared memory (bf16), 16 chunks a round, after polling its tags
        _cta_barrier()                               # every warp is done with the previous phase's input
        n_in = _field(table_ptr, p, K_F_IN_CHUNKS)
        norm = _field(table_ptr, p, K_F_NORM)
        squares = eps * 0.0                          # the input's sum of squares, for a phase with a norm
        for r in gl.static_range(0, K_STAGE_CHUNKS, K_ROWS):
            if r < n_in:
                offs = (r + srow)[:, None] * K_CHUNK + scol[None, :]            # value indices
                mask = (r + srow)[:, None] < n_in
                if src >= 0:
                    q, h = _word_of(offs)
                    w = _poll(words_ptr, _field(table_ptr, p, K_F_IN_OFF) + q, mask, _tag(epoch, src), err_ptr,
                              POLLS)
                    vals = _value(w, h)
                else:
                    vals = gl.load(x_ptr + offs, mask=mask, other=0.0)
                vals = vals.to(gl.bfloat16)
                if norm >= 0:
                    sq = vals.to(gl.float32)
                    squares += gl.sum(gl.sum(sq * sq, axis=1), axis=0)
                xs.slice(r, K_ROWS).store(vals)
        if norm >= 0:
            # RMSNorm as the model rounds it: bf16(g * bf16(x * rstd)); each thread rescales the values it staged
            rstd = gl.rsqrt(squares / (n_in * K_CHUNK) + eps)
            for r in gl.static_range(0, K_STAGE_CHUNKS, K_ROWS):
                if r < n_in:
                    offs = (r + srow)[:, None] * K_CHUNK + scol[None, :]
                    mask = (r + srow)[:, None] < n_in
                    g = gl.load(norms_ptr + norm + offs, mask=mask, other=0.0).to(gl.float32)
                    v = xs.slice(r, K_ROWS).load(stage_l).to(gl.float32)
                    xs.slice(r, K_ROWS).store((g * (v * rstd).to(gl.bfloat16).to(gl.float32)).to(gl.bfloat16))
        wait = _field(table_ptr, p, K_F_WAIT)
        if wait >= 0:
            offs = srow[:, None] * K_CHUNK + scol[None, :]
            _poll(words_ptr, _field(table_ptr, p, K_F_WAIT_OFF) + offs, offs < _field(table_ptr, p, K_F_WAIT_N),
                  _tag(epoch, wait), err_ptr, POLLS)
        _cta_barrier()

        router = _field(table_ptr, p, K_F_ROUTE)
        ordinal = gl.maximum(_field(table_ptr, p, K_F_ORDINAL), 0)
        if (router >= 0) & (ordinal >= ready):
            # rank the router's logits (softmax, greedy top-k, as `torch_ref.route` for OLMoE): every program
            # ranks them for itself and writes ids and weights to its own rows, for this routed phase and the
            # following ones that share its router; then it issues the tiles it held back
            eoffs = gl.arange(0, K_MAX_EXPERTS, layout=gl.SliceLayout(0, stage_l))[None, :]
            valid = eoffs < _field(table_ptr, p, K_F_ROUTE_N)
            q, h = _word_of(eoffs)
            w = _poll(words_ptr, _field(table_ptr, p, K_F_ROUTE_OFF) + q, valid, _tag(epoch, router), err_ptr, POLLS)
            logit = gl.where(valid, _value(w, h), float("-inf"))
            ex = gl.where(valid, gl.exp(logit - gl.max(gl.max(logit, axis=1), axis=0)), 0.0)
            sel = gl.where(valid, ex / gl.sum(gl.sum(ex, axis=1), axis=0), -1.0)
            last = _field(table_ptr, p, K_F_ROUTE_LAST)
            for k in gl.static_range(K_MAX_TOP_K):
                if k < _field(table_ptr, p, K_F_SOURCES):
                    best = gl.max(gl.max(sel, axis=1), axis=0)
                    idx = gl.min(gl.min(gl.where(sel == best, eoffs, 1 << 30), axis=1), axis=0)
                    for o in range(ordinal, last + 1):
                        gl.store(expert_base + o * 2 * K_MAX_TOP_K + k, idx)
                        gl.store(expert_base + o * 2 * K_MAX_TOP_K + K_MAX_TOP_K + k, best.to(gl.int32, bitcast=True))
                    sel = gl.where(eoffs == idx, -2.0, sel)
            _cta_barrier()                           # the ranking is visible to the producer's thread
            ready = last + 1
            while (issued < gl.minimum(n_slots, consumed + STAGES)) & _issuable(code, ready):
                _issue(d0, d1, d2, d3, code, bars.index(issued % STAGES), ring.index(issued % STAGES), table_ptr,
                       routes_ptr, expert_base, n_ord, BOXES)
                issued += 1
                code = gl.load(mine + 1 + issued)
        gates = expert_base + ordinal * 2 * K_MAX_TOP_K + K_MAX_TOP_K     # a routed sum's per-source weights

        res = _field(table_ptr, p, K_F_RES)
        res_off = _field(table_ptr, p, K_F_RES_OFF)
        for il in range(_items_of(table_ptr, p, pid, nprog)):
            i = pid + il * nprog
            # the residual's words, loaded before the tiles so their round trip hides behind the arithmetic
            res_q, res_h = _word_of(i * K_ROWS + rows[:, None])
            res_words = gl.load(words_ptr + res_off + res_q, mask=(rows[:, None] < K_ROWS) & (res >= 0), other=0,
                                volatile=True)
            acc = gl.zeros([K_ROWS, K_CHUNK], gl.float32, tile)
            acc_up = gl.zeros([K_ROWS, K_CHUNK], gl.float32, tile)
            for j in range(_tiles_per_item(table_ptr, p) // BOXES):
                slot = consumed % STAGES
                mbarrier.wait(bars.index(slot), (consumed // STAGES) & 1)
                for b in gl.static_range(BOXES):
                    t = j * BOXES + b
                    if not COMPUTE:          # timing only (`compute=False`): the tiles stream, nothing is read
                        pass
                    elif kind == K_SWIGLU:
                        wt = boxes.index(slot).slice(b * K_ROWS, K_ROWS).load(tile).to(gl.float32)
                        xc = xrows.index(t % kc).load(tile).to(gl.float32)
                        if t >= kc:
                            acc_up += wt * xc
                        else:
                            acc += wt * xc
                    else:
                        wt = boxes.index(slot).slice(b * K_ROWS, K_ROWS).load(tile).to(gl.float32)
                        xc = xrows.index(t).load(tile).to(gl.float32)
                        if router >= 0:              # a routed sum: source t // kc weighs its routing probability
                            xc = xc * gl.load(gates + t // kc).to(gl.float32, bitcast=True)
                        acc += wt * xc
                _cta_barrier()                       # every warp has read the slot: refill it
                consumed += 1
                while (issued < gl.minimum(n_slots, consumed + STAGES)) & _issuable(code, ready):
                    _issue(d0, d1, d2, d3, code, bars.index(issued % STAGES), ring.index(issued % STAGES),
                           table_ptr, routes_ptr, expert_base, n_ord, BOXES)
                    issued += 1
                    code = gl.load(mine + 1 + issued)
            y = gl.sum(acc, axis=1)
            if kind == K_SWIGLU:
                y = y / (1.0 + gl.exp(-y)) * gl.sum(acc_up, axis=1)
            if res >= 0:
                if _tagged(res_words, rows[:, None] < K_ROWS, _tag(epoch, res)) == 0:
                    res_words = _poll(words_ptr, res_off + res_q, rows[:, None] < K_ROWS, _tag(epoch, res), err_ptr,
                                      POLLS)
                y += gl.sum(_value(res_words, res_h), axis=1)
            elif res == -1:
                y += gl.load(x_ptr + i * K_ROWS + rows)
            # two bf16 values a word (rows j and j + 8 of the item: a select-and-sum over the rows), then the tag
            bits = y.to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
            pair = gl.arange(0, K_ROWS // 2, layout=gl.SliceLayout(0, tile))
            lo = gl.sum(gl.where(rows[:, None] == pair[None, :], bits[:, None], 0), axis=0)
            hi = gl.sum(gl.where(rows[:, None] == pair[None, :] + K_ROWS // 2, bits[:, None], 0), axis=0)
            word = (lo | (hi << 16)).to(gl.int64) & 0xFFFFFFFF | (_tag(epoch, p).to(gl.int64) << 32)
            gl.atomic_xchg(words_ptr + _field(table_ptr, p, K_F_OUT_OFF) + i * (K_ROWS // 2) + pair, word,
                           sem="relaxed", scope="gpu")

    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))
    # the last program out advances the epoch for the next launch (every program read it at its start)
    _cta_barrier()
    if gl.atomic_add(done_ptr, 1, sem="acq_rel", scope="gpu") == nprog - 1:
        gl.atomic_xchg(done_ptr, 0, sem="relaxed", scope="gpu")
        gl.atomic_add(epoch_ptr, 1, sem="relaxed", scope="gpu")


class Chain:
    """A planned chain bound to its weights and device buffers: `run(x)` launches it once (graph-capturable);
    `outputs()` reads every phase's values back, `check()` raises if a poll gave up."""

    def __init__(self, phases: list[Phase], families: list[torch.Tensor], input_len: int, stages: int = 6,
                 boxes: int = 4, warps: int = 4, polls: int = 1 << 22, compute: bool = True,
                 norms: torch.Tensor | None = None, eps: float = 1e-5) -> None:
        if not 1 <= len(families) <= 4:
            raise ValueError(f"a chain takes 1-4 weight families, got {len(families)}")
        dev = families[0].device
        for w in families:
            if w.device != dev or w.dtype != torch.bfloat16 or not w.is_contiguous():
                raise ValueError("weight families must be contiguous bf16 tensors on one device")
        ring_kib = stages * boxes * ROWS * CHUNK * 2 // 1024
        if stages < 1 or boxes < 1 or ring_kib + STAGE_CHUNKS * CHUNK * 2 // 1024 > 208:
            raise ValueError(f"a ring of {stages} x {boxes} boxes ({ring_kib} KiB) and the staged input must fit "
                             "in 208 KiB of shared memory (e.g. 6 x 4, 12 x 2, 24 x 1)")
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        if norms is not None and (norms.dim() != 1 or norms.device != dev):
            raise ValueError("norms: a 1-D tensor of norm weights on the weights' device")
        self.plan = plan(phases, families, input_len, 0 if norms is None else norms.numel())
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
        self.state = torch.zeros(3, dtype=torch.int32, device=dev)          # epoch, done count, error flag
        self.nprog = num_sms(dev)
        self.tiles = tile_lists(self.plan, self.nprog, boxes, pad=stages + 1).to(dev)
        n_ord = max(1, len(self.plan.routed))
        self.routes = torch.tensor(self.plan.routed or [0], dtype=torch.int32, device=dev)
        # each program's ranking of each routed phase: MAX_TOP_K expert ids, then their weights' fp32 bits
        self.experts = torch.zeros(self.nprog, n_ord, 2 * MAX_TOP_K, dtype=torch.int32, device=dev)
        # compute=False (timing only): the weight tiles stream through the ring unread; the outputs are wrong
        self.meta = dict(STAGES=stages, BOXES=boxes, WARPS=warps, POLLS=polls, COMPUTE=compute, num_warps=warps)

    def run(self, x: torch.Tensor) -> None:
        if x.shape != (self.plan.input_len,) or x.dtype != torch.float32:
            raise ValueError(f"input: expected fp32 [{self.plan.input_len}], got {x.dtype} {tuple(x.shape)}")
        st = self.state
        _chain_kernel[(self.nprog,)](*self.descs, self.table, len(self.phases), self.tiles, self.tiles.shape[1], x,
                                     self.norms, self.eps, self.words, self.routes, self.experts,
                                     self.experts.shape[1], st[0:], st[1:], st[2:], self.nprog, **self.meta)

    def outputs(self) -> list[torch.Tensor]:
        values = unpack(self.words)
        return [values[2 * o:2 * o + ph.out_rows] for o, ph in zip(self.plan.out_offsets, self.phases, strict=True)]

    def check(self) -> None:
        if int(self.state[2]) != 0:
            raise RuntimeError("megakernel chain: a phase gave up waiting for its inputs (were all programs "
                               "resident at once?)")
