"""The megakernel's host side (issue 4; the package docstring has the design): a chain of phases (`Phase`),
checked and laid out as a table (`plan`), each program's ring slots as tile codes (`tile_lists`), the torch
reference of what the kernel computes (`reference`), and the values of its tagged words (`unpack`). No Gluon here:
all of it runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosspool.kernels.torch_ref import rms_norm, route
from crosspool.models.spec import RoutingSpec

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
MAX_ORDINALS = 128        # routed phases a chain can have
GROUP = 4                 # routed phases that can share one router (one ranking serves them all)
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
    if len(routed) > MAX_ORDINALS:
        raise ValueError(f"a chain has at most {MAX_ORDINALS} routed phases, got {len(routed)}")
    for first, phase in enumerate(routed):
        last = first
        while last + 1 < len(routed) and phases[routed[last + 1]].route == phases[phase].route:
            last += 1
        if last - first >= GROUP and (first == 0 or phases[routed[first - 1]].route != phases[phase].route):
            raise ValueError(f"phase {phase}: at most {GROUP} consecutive routed phases can share router "
                             f"{phases[phase].route}")
        rows[phase][F_ROUTE_LAST] = last
    return Plan(torch.tensor(rows, dtype=torch.int32), routed, offsets, total, input_len)


def reference(phases: list[Phase], families: list[torch.Tensor], x: torch.Tensor, norms: torch.Tensor | None = None,
              eps: float = 1e-5, given: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Every phase's outputs, as the kernel computes them: each input vector rounded to the weights' dtype (the
    kernel stages it in shared memory so), products and sums in fp32, each output rounded to bf16 (two go in a
    word). With `given` (say the kernel's own outputs), each phase reads its inputs, residual and router from
    those instead: every phase is then checked on its own, to one rounding, with no earlier rounding carried on."""
    outs: list[torch.Tensor] = []
    x = x.float()

    def vec(src: int) -> torch.Tensor:
        return x if src == -1 else (given[src].float() if given is not None else outs[src])

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
            spec = RoutingSpec(num_experts=len(vec(ph.route)), top_k=ph.sources, scoring="softmax",
                               norm_topk_prob=False, topk_method="greedy")
            weights, ids = route(vec(ph.route)[None], spec, None)
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
