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
  phase, ranked by every program at run time (`rank.py`: softmax, greedy), and a routed sum weights each expert.
  A router can be folded through its norm (`Phase.rms_of`): its outputs are then ranked before the normed input
  exists, and the experts' weights take the norm's scale from the routed phase's staging.
- `plan` checks a chain and lays it out as an int32 table plus word offsets; `reference` computes it in torch.
- `Chain` runs it on the GPU (`chain.py`): one program an SM. In each, a producer warp (`produce.py`) streams the
  weight tiles through a ring of shared-memory slots by TMA, and 4 or 8 consumer warps (`consume.py`) walk the
  work items (16 output rows) and compute from the landed slots. The ring's loads run ahead across phase
  boundaries, because the weights do not depend on the phase before. They follow a tile list built on the host
  (`tile_lists`), so issuing one costs one load, not a walk of the phase table. `common.py` holds what both sides use.
- Outputs go out two bf16 values a tagged word, tag = (epoch * 4096 + phase + 1) mod 2^31 in the high half.
  A consumer polls its input words until all of them carry the producer's tag. The epoch lives on the device,
  and the last program to finish advances it, so CUDA-graph replays need no host work and never see the previous
  step's words as ready.

- An attention phase (`attend.py`) runs batch-1 decode attention over the engine's paged KV cache: items are
  (head, split), the producer expands each into its key and value slots from the step's block table, and each
  head's last split to finish combines the head's splits.
- `step.py` lays out a whole model's batch-1 decode step (every layer, the final norm, lm_head) as one chain, and
  runs it on the engine's KV cache.

Needs Gluon (Triton >= 3.6) and an sm_90 GPU; `plan`, `tile_lists` and `reference` run anywhere.
"""

from crosspool.kernels.megakernel.chain import Chain
from crosspool.kernels.megakernel.plan import (
    ATTEND,
    ATTENTION,
    BLOCK,
    CHUNK,
    DYNAMIC,
    F_DYN,
    F_FAM,
    F_IN,
    F_IN_CHUNKS,
    F_IN_OFF,
    F_ITEMS,
    F_ITEMS_PER_SRC,
    F_KC,
    F_KIND,
    F_NORM,
    F_NORM_SEG,
    F_ORDINAL,
    F_OUT_OFF,
    F_PRODUCER_RANKS,
    F_RES,
    F_RES_OFF,
    F_ROUTE,
    F_ROUTE_LAST,
    F_ROUTE_N,
    F_ROUTE_OFF,
    F_ROUTE_SCALED,
    F_ROW0,
    F_SCALE,
    F_SCATTER,
    F_SOURCES,
    F_STRIDE,
    F_TAIL,
    F_UP,
    F_WAIT,
    F_WAIT_N,
    F_WAIT_OFF,
    FEW_EXPERTS,
    GROUP,
    HEAD_DIM,
    KV_SLOT,
    MAX_EXPERTS,
    MAX_ORDINALS,
    MAX_TOP_K,
    NCOL,
    NO_PHASE,
    ROUTED,
    ROWS,
    STAGE_CHUNKS,
    SUM,
    SWIGLU,
    TAG_PHASES,
    Phase,
    Plan,
    Step,
    dynamic_phases,
    first_item,
    plan,
    split_positions,
    tile_lists,
    unpack,
)
from crosspool.kernels.megakernel.reference import attend_reference, combine, reference

__all__ = [
    "Chain",
    "CHUNK",
    "attend_reference",
    "split_positions",
    "combine",
    "Step",
    "F_NORM_SEG",
    "F_SCALE",
    "F_SCATTER",
    "KV_SLOT",
    "HEAD_DIM",
    "BLOCK",
    "ATTEND",
    "ATTENTION",
    "DYNAMIC",
    "F_DYN",
    "dynamic_phases",
    "F_FAM",
    "F_IN",
    "F_IN_CHUNKS",
    "F_IN_OFF",
    "F_ITEMS",
    "F_ITEMS_PER_SRC",
    "F_KC",
    "F_KIND",
    "F_NORM",
    "F_ORDINAL",
    "F_OUT_OFF",
    "F_RES",
    "F_RES_OFF",
    "F_ROUTE",
    "F_ROUTE_LAST",
    "F_ROUTE_N",
    "F_ROUTE_OFF",
    "F_PRODUCER_RANKS",
    "F_ROUTE_SCALED",
    "FEW_EXPERTS",
    "F_ROW0",
    "F_SOURCES",
    "F_STRIDE",
    "F_TAIL",
    "first_item",
    "F_UP",
    "F_WAIT",
    "F_WAIT_N",
    "F_WAIT_OFF",
    "GROUP",
    "MAX_EXPERTS",
    "MAX_ORDINALS",
    "MAX_TOP_K",
    "NCOL",
    "NO_PHASE",
    "ROUTED",
    "ROWS",
    "STAGE_CHUNKS",
    "SUM",
    "SWIGLU",
    "TAG_PHASES",
    "Phase",
    "Plan",
    "plan",
    "reference",
    "tile_lists",
    "unpack",
]
