"""The MoE FFN of a decode step (router GEMV, routing, gate/up GEMV, down GEMV) as one persistent kernel.

Why: at batch 1 a MoE layer is four launches (`routing.route_linear`'s router GEMV and routing kernel, then
`fused_moe`'s gate/up and down GEMVs), and each boundary costs a few microseconds of ramp and tail while the
expert weights wait. Here one launch of resident programs (at most two per SM) loops over the same tiles in
three phases, with a grid barrier (`sync.grid_barrier`) where a phase needs the whole previous one:

1. the router's K-split partials (`gemv.gemv_tile`);
2. routing (`routing.route_row`; every program routes every token itself, so no barrier is needed after it:
   the same stores of the same values), then the gate/up tiles (`fused_moe.gate_up_tile`);
3. the down tiles (`fused_moe.down_tile`), after a barrier. Before it, each program requests its down tiles'
   weights into L2 (their experts are known), so that stream overlaps the others' gate/up tail and the wait.

The tiles are the same code as the four kernels', so with the same tile sizes the result is bit for bit theirs:
`TopKPartials` of the weighted expert rows, which the next add + RMSNorm sums.

All programs must be resident at once for the barrier. The grid is half the SMs by default (room for a second
such kernel of another lane beside it; `bench.kernels --only moe_ffn` also times 1 and 2 programs per SM), and
the next kernel is allowed to launch (PDL) only once this one is done with its barriers.

On CPU (interpreter: programs run one after another) each phase is its own launch (PHASE 0, 1, 2) and the
barrier is compiled out. The barrier's counters (`sync.counters`) are made outside any capture: by the eager run
before a capture, or, for the weights ranks' whole-pass graphs (captured without one), by `sync.prepare` in
`FFNGraphs.capture_passes`. Off until timed on the H200: CROSSPOOL_PERSISTENT_MOE=1 turns it on for steps of at
most SMALL_BATCH_TOKENS tokens (`models.ffn_side`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from crosspool.kernels import fused_moe, pdl, prefetch, sync
from crosspool.kernels._common import next_pow2, num_sms
from crosspool.kernels.fused_moe import down_tile, down_tile_prefetch, gate_up_tile
from crosspool.kernels.gemv import default_split_k, gemv_tile
from crosspool.kernels.routing import route_row
from crosspool.models.batch import TopKPartials
from crosspool.models.spec import RoutingSpec

ENABLED = os.environ.get("CROSSPOOL_PERSISTENT_MOE", "0") != "0"
BARRIER_COUNTERS = "moe-barrier"        # its `sync.counters` use: [arrivals, sense flag] per stream
# tiles (the interpreter's configs of the separate kernels, so the CPU tests compare bit for bit)
ROUTER_TILE = (16, 64) if os.environ.get("TRITON_INTERPRET") == "1" else (16, 128)
EXPERT_TILE = (16, 64) if os.environ.get("TRITON_INTERPRET") == "1" else (16, 128)


@triton.jit
def _moe_persistent_kernel(
    x_ptr, router_ptr, part_ptr, weights_ptr, ids_ptr, w_gate_up_ptr, inter_ptr, w_down_ptr, y_ptr, bar_ptr,
    T, hidden, num_experts, inter_size, scale, eps,
    stride_xt, stride_rn, stride_ps, stride_pt,
    stride_ge, stride_gn, stride_it, stride_de, stride_dn, stride_yt,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_KE: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr,
    SPLIT: tl.constexpr, ROUTE_SPLIT: tl.constexpr, ROUTER_N: tl.constexpr, ROUTER_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STREAM: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr,
    PHASE: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """PHASE -1: all three phases with grid barriers (GPU); 0, 1, 2: that phase alone (CPU)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    sense = 0
    if PHASE < 0:
        sense = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
    pairs = T * TOP_K
    if PHASE <= 0:     # 1. the router's K-split partials
        router_blocks = tl.cdiv(num_experts, ROUTER_N)
        for item in range(pid, router_blocks * SPLIT, programs):
            gemv_tile(x_ptr, router_ptr, router_ptr, part_ptr, item % router_blocks, item // router_blocks, T,
                      num_experts, hidden, stride_xt, stride_rn, stride_ps, stride_pt, BLOCK_T, SPLIT, False,
                      ROUTER_N, ROUTER_K)
    if PHASE < 0:
        sense = sync.grid_barrier(bar_ptr, sense, programs)
    if PHASE < 0 or PHASE == 1:     # 2. routing (every program, the same values), then gate/up
        for t in range(0, T):
            route_row(part_ptr, weights_ptr, ids_ptr, x_ptr, t, num_experts, stride_pt, stride_ps, scale, eps,
                      TOP_K, BLOCK_KE, BLOCK_E, SIGMOID, NORMALIZE, ROUTE_SPLIT)
        tl.debug_barrier()      # this program's own routing stores before its tiles load the ids
        i_blocks = tl.cdiv(inter_size, BLOCK_N)
        for item in range(pid, pairs * i_blocks, programs):
            gate_up_tile(x_ptr, w_gate_up_ptr, inter_ptr, ids_ptr, (item // i_blocks).to(tl.int64), item % i_blocks,
                         hidden, inter_size, stride_xt, stride_ge, stride_gn, stride_it, TOP_K, BLOCK_N, BLOCK_K,
                         STREAM)
    h_blocks = tl.cdiv(hidden, BLOCK_N)
    if PHASE < 0:
        if PREFETCH:    # this program's down weights into L2 while the others finish gate/up
            for item in range(pid, pairs * h_blocks, programs):
                down_tile_prefetch(w_down_ptr, ids_ptr, (item // h_blocks).to(tl.int64), item % h_blocks, hidden,
                                   inter_size, stride_de, stride_dn, BLOCK_N, BLOCK_K, LINE)
        sense = sync.grid_barrier(bar_ptr, sense, programs)
    if PHASE < 0 or PHASE == 2:     # 3. down
        for item in range(pid, pairs * h_blocks, programs):
            down_tile(inter_ptr, w_down_ptr, y_ptr, ids_ptr, weights_ptr, (item // h_blocks).to(tl.int64),
                      item % h_blocks, hidden, inter_size, stride_it, stride_de, stride_dn, stride_yt, BLOCK_N,
                      BLOCK_K, STREAM)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


def applies(x: torch.Tensor, routing: RoutingSpec) -> bool:
    """Decode-sized x (at most SMALL_BATCH_TOKENS tokens) on CUDA or in the interpreter, a greedy routing rule."""
    return (x.dim() == 2 and 0 < x.shape[0] <= fused_moe.SMALL_BATCH_TOKENS and routing.topk_method == "greedy"
            and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


def moe_persistent(x: torch.Tensor, router: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                   routing: RoutingSpec, *, programs: int | None = None, split_k: int | None = None
                   ) -> tuple[TopKPartials, torch.Tensor]:
    """`fused_moe(x, w_gate_up, w_down, *route_linear(x, router, routing), reduce=False)` in one launch (three on
    CPU): the weighted expert rows [T * top_k, hidden] fp32, and the expert ids [T, top_k] they came from.
    programs: the grid (default half the SMs; on CPU 3, so the tile loops wrap); split_k: the router's K-splits
    (default `gemv.default_split_k`, as `route_linear`)."""
    t, hidden = x.shape
    num_experts, two_i, _ = w_gate_up.shape
    inter_size = two_i // 2
    k = routing.top_k
    assert applies(x, routing) and router.shape == (num_experts, hidden)
    assert w_down.shape == (num_experts, hidden, inter_size)
    for w in (x, router, w_gate_up, w_down):
        assert w.stride(-1) == 1, "last dims must be contiguous"
    device = x.device
    split = split_k or default_split_k(num_experts, hidden, device)
    part = (torch.empty(split, t, num_experts, dtype=torch.float32, device=device) if split > 1
            else x.new_empty(1, t, num_experts))
    weights = torch.empty(t, k, dtype=torch.float32, device=device)
    ids = torch.empty(t, k, dtype=torch.int64, device=device)
    inter = x.new_empty(t * k, inter_size)
    y = torch.empty(t * k, hidden, dtype=torch.float32, device=device)
    interpret = os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda"
    grid = programs or (3 if interpret else max(1, num_sms(device) // 2))
    # more programs than fit on the GPU at once would wait forever at the first barrier
    assert interpret or grid <= 2 * num_sms(device), f"{grid} programs: at most two per SM stay resident"
    bar = sync.counters(BARRIER_COUNTERS, 2, device)
    sigmoid = routing.scoring == "sigmoid"
    args = (x, router, part, weights, ids, w_gate_up, inter, w_down, y, bar,
            t, hidden, num_experts, inter_size, float(routing.routed_scaling_factor), 1e-20 if sigmoid else 0.0,
            x.stride(0), router.stride(0), part.stride(0), part.stride(1),
            w_gate_up.stride(0), w_gate_up.stride(1), inter.stride(0), w_down.stride(0), w_down.stride(1),
            y.stride(0))
    constexprs = dict(TOP_K=k, BLOCK_T=next_pow2(t), BLOCK_KE=next_pow2(k), BLOCK_E=next_pow2(num_experts),
                      SIGMOID=sigmoid, NORMALIZE=routing.norm_topk_prob, SPLIT=split,
                      ROUTE_SPLIT=0 if split == 1 else split, ROUTER_N=ROUTER_TILE[0], ROUTER_K=ROUTER_TILE[1],
                      BLOCK_N=EXPERT_TILE[0], BLOCK_K=EXPERT_TILE[1], STREAM=fused_moe.EVICT_FIRST,
                      PREFETCH=not interpret, LINE=prefetch.LINE_BYTES // w_down.element_size())
    if interpret:
        for phase in range(3):
            _moe_persistent_kernel[(grid,)](*args, **constexprs, PHASE=phase)
    else:
        _moe_persistent_kernel[(grid,)](*args, **constexprs, PHASE=-1, **pdl.options(device), num_warps=4)
    return TopKPartials(y, k, x.dtype), ids
