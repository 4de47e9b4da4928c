"""The megakernel's host side (issue 4; the package docstring has the design): a chain of phases (`Phase`),
checked and laid out as a table (`plan`), each program's ring slots as tile codes (`tile_lists`), and the values
of its tagged words (`unpack`); `reference.py` has the torch reference of what the kernel computes. No Gluon here:
all of it runs on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ROWS = 16                 # output rows of one work item, and rows of one weight tile
CHUNK = 256               # columns of one weight tile (512 B of bf16, the widest TMA box)
SUM, SWIGLU, ATTENTION, HEADS = 0, 1, 2, 3
HEAD_DIM = 128            # an attention phase's head dimension
KV_SLOT = 128             # cached positions in one ring slot of keys or values (8 blocks of 16, one head)
BLOCK = 16                # tokens in a KV block (the engine's block_size)
NO_PHASE = -2             # `residual`/`wait`/`route` unset; -1 means the step's input vector
TAG_PHASES = 4096         # phases a step can have (tags are epoch * TAG_PHASES + phase + 1)
STAGE_CHUNKS = 32         # input chunks a program can stage (8,192 values)
(F_KIND, F_FAM, F_ROW0, F_ITEMS, F_KC, F_SOURCES, F_STRIDE, F_UP, F_ITEMS_PER_SRC, F_IN, F_IN_CHUNKS, F_IN_OFF,
 F_RES, F_RES_OFF, F_OUT_OFF, F_WAIT) = range(16)
F_WAIT_OFF, F_WAIT_N, F_NORM, F_ROUTE, F_ROUTE_OFF, F_ROUTE_N, F_ORDINAL, F_ROUTE_LAST = 16, 17, 18, 19, 20, 21, 22, 23
F_SCALE, F_NORM_SEG, F_DYN, F_TAIL, F_ROUTE_SCALED, F_PRODUCER_RANKS, F_FOLD, F_FOLD_N = 24, 25, 26, 27, 28, 29, 30, 31
NCOL = 32                 # (all used) a phase's row is one 128-B line: its fields are one L1 miss, not two
F_SCATTER = F_UP          # a sum: 1 where its items are one source's rows each (`Phase.scatter`); F_UP is a swiglu's
MAX_EXPERTS = 256         # router outputs a routed phase can rank
FEW_EXPERTS = 64          # router outputs a router with `rms_of` can have (the kernel's ranking by counting)
MAX_TOP_K = 16            # experts a routed phase takes
MAX_ORDINALS = 128        # routed phases a chain can have
GROUP = 4                 # routed phases that can share one router (one ranking serves them all)
ROUTED = 1 << 30          # tile-code flag: the row is ordinal << 16 | source << 12 | row within the expert
ATTEND = -(1 << 31)       # tile-code flag (bit 31): an attention item, phase << 16 | item, which the producer
                          # expands into its key and value slots for the step's context length
DYNAMIC = ATTEND | 1 << 30  # tile-code flag (bits 31, 30): a dynamic phase's items, DYNAMIC | phase: the
                          # program's own item, then items fetched from the phase's counter (`tile_lists`)


@dataclass(frozen=True)
class Phase:
    """One phase of the chain. kind "sum": out[r] = sum over s < sources of W[row0 + s*stride + r, :] . x_s,
    where x_s is the input's s-th segment of `k` values (one source: a GEMV). kind "swiglu": for each of
    `sources` matrices s, rows_per_source outputs silu(W[g, :] . x) * (W[g + up_offset, :] . x), with
    g = row0 + s*stride + r and x the input's first `k` values. `family` indexes the weight tensors [rows, k].
    kind "attention" (batch-1 decode, MHA): the input phase's outputs are q, k, v ([heads * k] each, k = HEAD_DIM);
    q and k are RMSNormed over their whole length (weights at `norm` and `norm + out_rows`, unless -1) and rotated
    (RoPE, halves) at the step's position, k and v are written into the KV cache at layer `row0`, and q attends
    over the step's context. `out_rows` = heads * k; each head's positions are split `sources` ways (a power of
    two): an item is a (head, split), and its output is that split's normalized partial with its log-sum-exp; the
    head's last split to finish combines them into the head's output, which a "sum" phase reading the attention
    phase takes as its input. `scale`: the softmax scale. With `fold` (a router folded through o_proj,
    `decode_chain(fold_heads=True)`): rows fold.. of `family` are [fold_rows, out_rows], and each head's combining
    split also publishes those rows' columns of the head times the head's output (fp32, one a word).
    kind "heads": the sum over the heads of its input attention phase's `fold` products ([out_rows] = fold_rows,
    in head order, fp32), plus its `residual`; no weights of its own, so no ring slots."""

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
    scale: float = 0.0            # attention: the softmax scale
    rms_of: int = NO_PHASE        # a router folded through a norm (`decode_chain`): its outputs are the logits times
                                  # the RMS of this earlier phase's outputs. Its routed phases rank them as they are
                                  # (the order is the same) and weigh their experts by softmax(outputs * rstd), rstd
                                  # = rsqrt(mean(rms_of's outputs^2) + eps); a ranking phase among them stages
                                  # rms_of's outputs whole with a norm (in the kernel, its staging gives rstd)
    fold: int = -1                # attention: the first row of a folded router's o_proj part (see above)
    fold_rows: int = 0            # attention: its rows (the router's experts; 16..FEW_EXPERTS, a multiple of 16)
    tail: bool = False            # a sum or swiglu phase's items on the last programs, not the first (item i on
                                  # program (i + P - items % P) % P of P): a small phase there runs beside a larger
                                  # one whose items fill the first programs (attention's, o_proj's)
    scatter: bool = False         # a sum whose items are one source's 16 rows each (sources x out_rows / 16 items,
                                  # source by source), added into fp32 sums by atomics (the first source's items add
                                  # the residual), with a count of the items done: its readers (inputs, residuals)
                                  # wait for the count, then read the sums, rounded to bf16 as a word would hold
                                  # them. Its words hold two fp32 buffers of out_rows, one a launch by the epoch's
                                  # parity; the other is zeroed during the launch (`decode_chain(scatter_down)`)


@dataclass(frozen=True)
class Step:
    """What a step's attention phases read beyond the chain's words: the KV cache [blocks, layers, 2, BLOCK, heads,
    HEAD_DIM] (the engine's layout), the sequence's block table, its context length counting the new token (at
    position ctx - 1), and cos/sin of that position [HEAD_DIM // 2] (fp32)."""

    kv: torch.Tensor
    block_table: torch.Tensor
    ctx: int
    cos: torch.Tensor
    sin: torch.Tensor


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

    def attention_source(src: int) -> bool:
        return 0 <= src < len(phases) and phases[src].kind == "attention"

    for i, ph in enumerate(phases):
        if ph.kind == "attention":
            rows.append(_attention_row(i, ph, phases, length(ph.input, i, "input"), norms_len, offsets, total,
                                       families))
            offsets.append(total)
            lengths.append(ph.out_rows)
            total += attention_words(ph)
            continue
        if ph.kind == "heads":
            rows.append(_heads_row(i, ph, phases, [length(s, i, "input, residual or rms_of") if s != NO_PHASE
                                                   else 0 for s in (ph.input, ph.residual, ph.rms_of)], offsets,
                                   total))
            offsets.append(total)
            lengths.append(ph.out_rows)
            total += ph.out_rows // 2
            continue
        if ph.kind not in ("sum", "swiglu"):
            raise ValueError(f"phase {i}: kind {ph.kind!r}, expected 'sum', 'swiglu', 'attention' or 'heads'")
        if ph.tail and ph.route != NO_PHASE:
            raise ValueError(f"phase {i}: a routed phase's items start at the first program (no tail)")
        if ph.scatter and (ph.kind != "sum" or ph.tail or i == len(phases) - 1):
            raise ValueError(f"phase {i}: only a sum that is not the last phase and has no tail can scatter")
        if any(0 <= s < i and phases[s].scatter for s in (ph.route, ph.wait, ph.rms_of)) or \
                (0 <= ph.input < i and phases[ph.input].scatter and ph.kind not in ("sum", "swiglu")):
            raise ValueError(f"phase {i}: a scattered phase's sums are only the input or residual of a sum or swiglu")
        if ph.rms_of != NO_PHASE and (ph.kind != "sum" or ph.out_rows > FEW_EXPERTS or attention_source(ph.rms_of)
                                      or not 0 <= ph.rms_of < i):
            raise ValueError(f"phase {i}: a router with rms_of is a sum of at most {FEW_EXPERTS} outputs, and "
                             f"rms_of ({ph.rms_of}) an earlier phase, not attention")
        if any(attention_source(s) for s in (ph.residual, ph.wait, ph.route)) or \
                (attention_source(ph.input) and (ph.kind != "sum" or ph.sources != 1 or ph.norm != -1)):
            raise ValueError(f"phase {i}: an attention phase's outputs are only the input of a one-source sum "
                             "with no norm")
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
        rows.append([SWIGLU if swiglu else SUM, ph.family, ph.row0, ph.out_rows // ROWS * (ph.sources if ph.scatter
                     else 1), kc, ph.sources, ph.stride, ph.up_offset if swiglu else int(ph.scatter), per_src // ROWS,
                     ph.input, need // CHUNK, src_off(ph.input), ph.residual,
                     src_off(ph.residual) if ph.residual != NO_PHASE else 0, total, ph.wait,
                     src_off(ph.wait) if ph.wait != NO_PHASE else 0,
                     lengths[ph.wait] // 2 if ph.wait >= 0 else 0, ph.norm, ph.route,
                     src_off(ph.route) if ph.route != NO_PHASE else 0,
                     lengths[ph.route] if ph.route != NO_PHASE else 0,
                     len(routed) if ph.route != NO_PHASE else -1, -1, 0, need // CHUNK, 0, int(ph.tail),
                     int(ph.route != NO_PHASE and phases[ph.route].rms_of != NO_PHASE)])
        if attention_source(ph.input):        # the heads' outputs, combined by each head's last split
            rows[-1][F_IN_OFF] += combined_offset(phases[ph.input])
        if ph.route != NO_PHASE:
            routed.append(i)
        total += ph.out_rows if ph.scatter else ph.out_rows // 2        # two fp32 buffers, or two values a word
    # the last routed phase of each run that shares one router: ranking it once serves them all, so the ring can
    # load a later phase's experts (the down's) while an earlier one (the gate/up) computes
    if len(routed) > MAX_ORDINALS:
        raise ValueError(f"a chain has at most {MAX_ORDINALS} routed phases, got {len(routed)}")
    for first, phase in enumerate(routed):
        last = first
        while last + 1 < len(routed) and phases[routed[last + 1]].route == phases[phase].route:
            last += 1
        ranks = first == 0 or phases[routed[first - 1]].route != phases[phase].route
        if last - first >= GROUP and ranks:
            raise ValueError(f"phase {phase}: at most {GROUP} consecutive routed phases can share router "
                             f"{phases[phase].route}")
        ph, rms_of = phases[phase], phases[phases[phase].route].rms_of
        if ranks and rms_of != NO_PHASE and (ph.input != rms_of or ph.norm == -1 or (ph.sources != 1 and
                                             ph.kind == "sum") or rows[phase][F_IN_CHUNKS] * CHUNK != lengths[rms_of]):
            raise ValueError(f"phase {phase}: ranks router {ph.route}, whose outputs are scaled by the RMS of "
                             f"phase {rms_of}: it must stage all of that phase's outputs with a norm")
        rows[phase][F_ROUTE_LAST] = last
    rows = [r + [0] * (NCOL - len(r)) for r in rows]
    return Plan(torch.tensor(rows, dtype=torch.int32), routed, offsets, total, input_len)


def _attention_row(i: int, ph: Phase, phases: list[Phase], have: int, norms_len: int, offsets: list[int],
                   total: int, families: list[torch.Tensor]) -> list[int]:
    """An attention phase's table row (see `Phase`), after checking it."""
    heads, splits = ph.out_rows // HEAD_DIM, ph.sources
    if ph.k != HEAD_DIM or ph.out_rows % HEAD_DIM or not 1 <= splits <= 8 or splits & (splits - 1):
        raise ValueError(f"phase {i}: attention takes heads of k = {HEAD_DIM} values (out_rows = heads * k, got "
                         f"{ph.out_rows}, k {ph.k}) and 1, 2, 4 or 8 splits (sources, got {splits})")
    if ph.input < 0 or have < 3 * ph.out_rows or 2 * ph.out_rows > STAGE_CHUNKS * CHUNK:
        raise ValueError(f"phase {i}: attention reads q, k and v ({3 * ph.out_rows} values) from an earlier phase "
                         f"(input {ph.input}, {have} values), and stages q and k (at most {STAGE_CHUNKS * CHUNK})")
    if any(p.kind == "attention" and p.sources != splits for p in phases):
        raise ValueError(f"phase {i}: every attention phase of a chain splits its heads alike")
    if ph.norm != -1 and (ph.norm < 0 or ph.norm + 2 * ph.out_rows > norms_len):
        raise ValueError(f"phase {i}: q and k norm weights at {ph.norm} need {2 * ph.out_rows} of the chain's "
                         f"{norms_len} norm weights")
    if ph.row0 < 0 or ph.scale <= 0 or ph.residual != NO_PHASE or ph.route != NO_PHASE or ph.wait != NO_PHASE \
            or ph.tail:
        raise ValueError(f"phase {i}: attention needs a KV layer (row0 >= 0) and a positive scale, and takes no "
                         "residual, router, wait or tail")
    scale_bits = int(torch.tensor([ph.scale * 1.4426950408889634]).view(torch.int32))   # scale * log2(e)
    row = [0] * NCOL
    row[F_KIND], row[F_ROW0], row[F_ITEMS], row[F_SOURCES], row[F_STRIDE] = ATTENTION, ph.row0, heads * splits, \
        splits, heads
    row[F_IN], row[F_IN_CHUNKS], row[F_IN_OFF], row[F_OUT_OFF] = ph.input, 2 * ph.out_rows // CHUNK, \
        offsets[ph.input], total
    row[F_RES], row[F_WAIT], row[F_NORM], row[F_ROUTE], row[F_ORDINAL], row[F_ROUTE_LAST] = NO_PHASE, NO_PHASE, \
        ph.norm, NO_PHASE, -1, -1
    row[F_SCALE], row[F_NORM_SEG] = scale_bits, ph.out_rows // CHUNK       # q's chunks: k has its own norm
    row[F_FOLD], row[F_FOLD_N], row[F_FAM] = ph.fold, ph.fold_rows, ph.family
    if ph.fold != -1:
        fam = families[ph.family] if 0 <= ph.family < len(families) else None
        if fam is None or fam.dim() != 2 or fam.shape[1] != ph.out_rows or ph.fold < 0 or \
                ph.fold + ph.fold_rows > fam.shape[0] or not ROWS <= ph.fold_rows <= FEW_EXPERTS or ph.fold_rows % ROWS:
            raise ValueError(f"phase {i}: a fold is {ROWS}..{FEW_EXPERTS} rows (a multiple of {ROWS}, got "
                             f"{ph.fold_rows}) from row {ph.fold} of a family [rows, {ph.out_rows}] (family "
                             f"{ph.family})")
    return row


def _heads_row(i: int, ph: Phase, phases: list[Phase], have: list[int], offsets: list[int], total: int) -> list[int]:
    """A "heads" phase's table row (see `Phase`), after checking it; `have`: the lengths of its input, residual
    and rms_of phases."""
    att = phases[ph.input] if 0 <= ph.input < i else None
    if att is None or att.kind != "attention" or att.fold == -1 or att.fold_rows != ph.out_rows:
        raise ValueError(f"phase {i}: a heads phase reads an earlier attention phase with a fold of its "
                         f"{ph.out_rows} outputs")
    if ph.norm != -1 or ph.route != NO_PHASE or ph.wait != NO_PHASE or ph.sources != 1 or \
            (ph.residual != NO_PHASE and (ph.residual < -1 or have[1] < ph.out_rows)) or \
            (ph.rms_of != NO_PHASE and (not 0 <= ph.rms_of < i or phases[ph.rms_of].kind == "attention")):
        raise ValueError(f"phase {i}: a heads phase takes no norm, router, wait or sources, a residual of at least "
                         f"its {ph.out_rows} outputs, and rms_of an earlier phase, not attention")
    row = [0] * NCOL
    row[F_KIND], row[F_ITEMS], row[F_SOURCES], row[F_STRIDE], row[F_ITEMS_PER_SRC] = HEADS, ph.out_rows // ROWS, 1, \
        att.out_rows // HEAD_DIM, ph.out_rows // ROWS
    row[F_IN], row[F_IN_OFF], row[F_OUT_OFF] = ph.input, offsets[ph.input] + fold_offset(att), total
    row[F_RES] = ph.residual
    row[F_RES_OFF] = offsets[ph.residual] if ph.residual >= 0 else 0
    row[F_WAIT], row[F_NORM], row[F_ROUTE], row[F_ORDINAL], row[F_ROUTE_LAST] = NO_PHASE, -1, NO_PHASE, -1, -1
    row[F_TAIL], row[F_FOLD] = int(ph.tail), -1
    return row


def combined_offset(ph: Phase) -> int:
    """Words of an attention phase's outputs before its combined ones: each split's partials (two values a word),
    then each (split, head)'s log-sum-exp (one a word)."""
    return ph.sources * (ph.out_rows // 2 + ph.out_rows // HEAD_DIM)


def fold_offset(ph: Phase) -> int:
    """Words of an attention phase's outputs before its fold's (`attention_words`)."""
    return combined_offset(ph) + ph.out_rows // 2 + ph.out_rows // HEAD_DIM


def attention_words(ph: Phase) -> int:
    """An attention phase's words: `combined_offset`'s, the heads' combined outputs (two values a word), one
    arrival count a head (untagged: the split that raises it to a multiple of the splits combines the head), then
    with a fold each head's fold_rows products (one fp32 value a word, head by head)."""
    return fold_offset(ph) + (ph.out_rows // HEAD_DIM) * ph.fold_rows


def split_positions(ctx: int, splits: int) -> int:
    """Cached positions a split of an attention phase covers: the context in `splits` parts, rounded up to whole
    ring slots (split s covers [s * P, (s + 1) * P))."""
    per_split = -(-ctx // splits)
    return -(-per_split // KV_SLOT) * KV_SLOT


def dynamic_phases(p: Plan, sums_above: int | None = None) -> list[int]:
    """Phases whose items the programs should take as they go (`tile_lists(dynamic=...)`): the swiglu and scatter
    phases, and with `sums_above` the sum phases of more items than that (the program count: a program with one item has
    nothing to rebalance). A static split leaves a phase's tail to its slowest programs, and a program's pace
    through the same bytes varies by ~30%."""
    return [q for q, f in enumerate(p.table.tolist()) if not f[F_TAIL] and (f[F_KIND] == SWIGLU or
            (f[F_KIND] == SUM and f[F_SCATTER]) or
            (sums_above is not None and f[F_KIND] == SUM and f[F_ITEMS] > sums_above))]


def tile_lists(p: Plan, nprog: int, boxes: int = 1, pad: int = 0, dynamic: Sequence[int] = ()) -> torch.Tensor:
    """Each program's ring slots in the order it consumes them (its items of phase 0, then of phase 1, ...; an
    item's tiles in order, `boxes` consecutive chunks a slot), as int32 codes family << 28 | first chunk << 24 | row;
    a routed phase's row is ROUTED | ordinal << 16 | source << 12 | row within the expert. Element 0 of program r's
    list is its count, and `pad` zero codes follow the last. The ring's producer only reads the next code, so its
    loads can run ahead across phases, up to the first routed tile whose routing is not known yet. An attention
    item is one code, ATTEND | phase << 16 | item, which stands for as many slots as the step's context needs.
    Each phase in `dynamic` (swiglu or sum, `dynamic_phases`) is one code for every program, DYNAMIC | phase: the
    producer takes the program's own item (its index), then the next items from the phase's counter, and makes
    their codes itself."""
    per_prog: list[list[torch.Tensor]] = [[] for _ in range(nprog)]
    dyn = set(dynamic)
    if any(p.table[q, F_KIND] not in (SUM, SWIGLU) or p.table[q, F_TAIL] for q in dyn):
        raise ValueError("only sum and swiglu phases with no tail can be dynamic")
    for phase, f in enumerate(p.table.tolist()):
        kind, fam, row0, items, kc = f[F_KIND], f[F_FAM], f[F_ROW0], f[F_ITEMS], f[F_KC]
        if kind == HEADS:                     # (no weights)
            continue
        if kind == ATTENTION:
            if phase >= 1 << 14 or items > 1 << 16:
                raise ValueError("a tile list codes attention at phases below 2^14, with at most 2^16 items")
            for r in range(min(nprog, items)):
                per_prog[r].append(ATTEND | (phase << 16) | torch.arange(r, items, nprog))
            continue
        item = torch.arange(items)[:, None]
        if kind == SWIGLU:
            t = torch.arange(2 * kc)[None, :]
            per = f[F_ITEMS_PER_SRC]
            src, within = item // per, (item % per) * ROWS + (t // kc) * f[F_UP]
        elif f[F_SCATTER]:                    # an item: one source's rows (items source by source)
            t = torch.arange(kc)[None, :]
            per = f[F_ITEMS_PER_SRC]
            src, within = item // per, (item % per) * ROWS
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
        if phase in dyn:                      # (its codes checked all the same: the producer makes these)
            if phase >= 1 << 16:
                raise ValueError("a tile list codes dynamic phases below 2^16")
            for r in range(nprog):
                per_prog[r].append(torch.tensor([DYNAMIC | phase]))
            continue
        for r in range(nprog):
            first = first_item(r, items, nprog, bool(f[F_TAIL]))
            if first < items:
                per_prog[r].append(codes[first::nprog].reshape(-1))
    flat = [torch.cat(c) if c else torch.zeros(0, dtype=torch.int64) for c in per_prog]
    width = 1 + max(len(c) for c in flat) + pad
    out = torch.zeros(nprog, width, dtype=torch.int32)
    for r, c in enumerate(flat):
        out[r, 0] = len(c)
        out[r, 1:1 + len(c)] = c.to(torch.int32)
    return out


def first_item(program: int, items: int, nprog: int, tail: bool) -> int:
    """A program's first item of a phase (its next ones follow nprog apart): item i goes to program i % nprog, or
    with `tail` (i + nprog - items % nprog) % nprog."""
    return (program + items) % nprog if tail else program


def unpack(words: torch.Tensor) -> torch.Tensor:
    """The values of tagged words, in order. Word j of a 16-value item holds value j in its low 16 bits and value
    j + 8 above them (bf16 each); the tag is the high 32 bits."""
    bits = (words & 0xFFFFFFFF).reshape(-1, ROWS // 2)
    pairs = torch.cat([bits & 0xFFFF, bits >> 16], dim=1).reshape(-1)
    return (pairs << 16).to(torch.int32).view(torch.float32)
