"""The MoE FFN of a decode step (router GEMV, routing, gate/up GEMV, down GEMV) as one persistent kernel.

Why: at batch 1 a MoE layer is four launches (`routing.route_linear`'s router GEMV and routing kernel, then
`fused_moe`'s gate/up and down GEMVs), and each boundary costs a few microseconds of ramp and tail while the
expert weights wait. Here one launch of resident programs loops over the work in three phases, with a grid
barrier (`sync.grid_barrier`) where a phase needs the whole previous one:

1. the router's K-split partials (`gemv.gemv_tile`, the router kernel's own tiles);
2. routing (`routing.route_row`; every program routes every token itself, so no barrier is needed after it:
   the same stores of the same values), then the gate/up items;
3. the down items, after a barrier.

An item is BLOCK_N weight rows of one (token, expert) pair over the whole K (hidden for gate/up, the
intermediate size for down): GU_TILE / DOWN_TILE elements, loaded at once. A program keeps its next item's
loads in flight while it reduces the current one (the loop carries the loaded tiles). Why: with one or two
programs per SM, the first version (session 7: the separate kernels' 16 x 128 tiles, a K loop per tile) had
~8 KB in flight per program and read the experts at 0.1-0.3 of copy bandwidth (OLMoE at batch 1: 76-215 us
against 35 us for the four kernels; docs/benchmarks.md section 7, session 8). Streaming an SM's share of
the weights needs tens of KB in flight per SM.

The router and routing are the four kernels' code, so the expert ids are theirs; the expert rows are summed
over K in another order (one tile instead of BLOCK_K chunks), so they match the four kernels within rounding,
not bit for bit. The result is `TopKPartials` of the weighted expert rows, which the next add + RMSNorm sums.

All programs must be resident at once for the barrier. `_capacity` reads the compiled kernel's
registers and shared memory and the launch asserts the grid fits; the default grid is half of what fits (room
for a second such kernel of another lane beside it), and the next kernel is allowed to launch (PDL) only once
this one is done with its barriers.

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

from crosspool.kernels import fused_moe, pdl, sync
from crosspool.kernels._common import next_pow2
from crosspool.kernels.fused_moe import load_expert_weights
from crosspool.kernels.gemv import default_split_k, gemv_tile
from crosspool.kernels.routing import route_row
from crosspool.models.batch import TopKPartials
from crosspool.models.spec import RoutingSpec

ENABLED = os.environ.get("CROSSPOOL_PERSISTENT_MOE", "0") != "0"
BARRIER_COUNTERS = "moe-barrier"        # its `sync.counters` use: [arrivals, sense flag] per stream
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# the router's tiles (the interpreter's config of the separate kernel, so the CPU tests get its ids bit for bit)
ROUTER_TILE = (16, 64) if _INTERPRET else (16, 128)
# elements of one item's weight tile: gate/up (each of the two), down; and warps per program
# (CROSSPOOL_PERSISTENT_MOE_CONFIG=GU,DOWN,WARPS to time others in the engine)
GU_TILE, DOWN_TILE, WARPS = map(int, os.environ.get("CROSSPOOL_PERSISTENT_MOE_CONFIG", "8192,8192,8").split(","))
# or the expert weights fetched by TMA in (rows, K chunk) boxes, so many stages ahead:
# CROSSPOOL_PERSISTENT_MOE_TMA=ROWS,CHUNK,STAGES (empty: whole-K items)
_tma = os.environ.get("CROSSPOOL_PERSISTENT_MOE_TMA", "")
TMA_CHUNKS = tuple(map(int, _tma.split(","))) if _tma else ()


@triton.jit
def _gate_up_load(x_ptr, w_ptr, ids_ptr, item, items, i_blocks, hidden, inter_size, stride_xt, stride_we,
                  stride_wn, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                  STREAM: tl.constexpr):
    """Item `item`'s gate and up rows [BLOCK_N, BLOCK_H] and its token's x row (nothing read past `items`)."""
    it = tl.minimum(item, items - 1)
    pair = (it // i_blocks).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = (it % i_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < tl.where(item < items, hidden, 0)       # past the last item: nothing read
    mask = (offs_n < inter_size)[:, None] & h_ok[None, :]
    g_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_h[None, :]
    g = load_expert_weights(g_ptrs, mask, STREAM)
    u = load_expert_weights(g_ptrs + inter_size * stride_wn, mask, STREAM)
    x = tl.load(x_ptr + (pair // TOP_K) * stride_xt + offs_h, mask=h_ok, other=0.0)
    return g, u, x


@triton.jit
def _gate_up_store(g, u, x, inter_ptr, item, i_blocks, inter_size, stride_it, BLOCK_N: tl.constexpr):
    """inter[pair, rows] = silu(x . gate) * (x . up) of a loaded item."""
    xf = x.to(tl.float32)[None, :]
    gs = tl.sum(g.to(tl.float32) * xf, 1)
    h = gs * tl.sigmoid(gs) * tl.sum(u.to(tl.float32) * xf, 1)
    offs_n = (item % i_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(inter_ptr + (item // i_blocks).to(tl.int64) * stride_it + offs_n, h.to(inter_ptr.dtype.element_ty),
             mask=offs_n < inter_size)


@triton.jit
def _down_load(inter_ptr, w_ptr, ids_ptr, weights_ptr, item, items, h_blocks, hidden, inter_size, stride_it,
               stride_we, stride_wn, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, STREAM: tl.constexpr):
    """Item `item`'s down rows [BLOCK_N, BLOCK_I], its pair's intermediate row and routing weight."""
    it = tl.minimum(item, items - 1)
    pair = (it // h_blocks).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = (it % h_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, BLOCK_I)
    i_ok = offs_i < tl.where(item < items, inter_size, 0)       # past the last item: nothing read
    mask = (offs_n < hidden)[:, None] & i_ok[None, :]
    w = load_expert_weights(w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_i[None, :], mask, STREAM)
    h = tl.load(inter_ptr + pair * stride_it + offs_i, mask=i_ok, other=0.0)
    return w, h, tl.load(weights_ptr + pair)


@triton.jit
def _down_store(w, h, weight, y_ptr, item, h_blocks, hidden, stride_yt, BLOCK_N: tl.constexpr):
    """y[pair, rows] = weight * (inter[pair] . w_down rows) in fp32, of a loaded item."""
    out = tl.sum(w.to(tl.float32) * h.to(tl.float32)[None, :], 1) * weight.to(tl.float32)
    offs_n = (item % h_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + (item // h_blocks).to(tl.int64) * stride_yt + offs_n, out, mask=offs_n < hidden)


@triton.jit
def _gate_up_tma(x_ptr, desc, ids_ptr, inter_ptr, pid, programs, pairs, hidden, inter_size, stride_xt, stride_it,
                 TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """This program's gate/up items as one loop over (item, K chunk), the weight chunks fetched by TMA (`desc`:
    [experts, 2 * inter, hidden] in [1, BLOCK_N, BLOCK_K] boxes) STAGES chunks ahead into shared memory. Rows of
    a last partial block read into the up rows (or past the end: zeros) and are never stored."""
    i_blocks = tl.cdiv(inter_size, BLOCK_N)
    items = pairs * i_blocks
    chunks = tl.cdiv(hidden, BLOCK_K)
    mine = tl.maximum(tl.cdiv(items - pid, programs), 0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    gs = tl.zeros([BLOCK_N], tl.float32)
    us = tl.zeros([BLOCK_N], tl.float32)
    for step in tl.range(0, mine * chunks, num_stages=STAGES):
        item = pid + (step // chunks) * programs
        k0 = (step % chunks) * BLOCK_K
        pair = item // i_blocks
        expert = tl.load(ids_ptr + pair).to(tl.int32)
        row = (item % i_blocks) * BLOCK_N
        g = desc.load([expert, row, k0]).reshape(BLOCK_N, BLOCK_K).to(tl.float32)
        u = desc.load([expert, inter_size + row, k0]).reshape(BLOCK_N, BLOCK_K).to(tl.float32)
        x = tl.load(x_ptr + (pair // TOP_K).to(tl.int64) * stride_xt + k0 + offs_k, mask=offs_k < hidden - k0,
                    other=0.0).to(tl.float32)
        gs += tl.sum(g * x[None, :], 1)
        us += tl.sum(u * x[None, :], 1)
        last = k0 + BLOCK_K >= hidden
        h = gs * tl.sigmoid(gs) * us
        tl.store(inter_ptr + pair.to(tl.int64) * stride_it + row + offs_n, h.to(inter_ptr.dtype.element_ty),
                 mask=row + offs_n < tl.where(last, inter_size, 0))     # stored after the last chunk
        gs = tl.where(last, 0.0, gs)
        us = tl.where(last, 0.0, us)


@triton.jit
def _down_tma(inter_ptr, desc, ids_ptr, weights_ptr, y_ptr, pid, programs, pairs, hidden, inter_size, stride_it,
              stride_yt, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """This program's down items as one loop over (item, K chunk), as `_gate_up_tma` (`desc`: [experts, hidden,
    inter] in [1, BLOCK_N, BLOCK_K] boxes; rows past hidden read as zeros)."""
    h_blocks = tl.cdiv(hidden, BLOCK_N)
    items = pairs * h_blocks
    chunks = tl.cdiv(inter_size, BLOCK_K)
    mine = tl.maximum(tl.cdiv(items - pid, programs), 0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for step in tl.range(0, mine * chunks, num_stages=STAGES):
        item = pid + (step // chunks) * programs
        k0 = (step % chunks) * BLOCK_K
        pair = item // h_blocks
        expert = tl.load(ids_ptr + pair).to(tl.int32)
        row = (item % h_blocks) * BLOCK_N
        w = desc.load([expert, row, k0]).reshape(BLOCK_N, BLOCK_K).to(tl.float32)
        h = tl.load(inter_ptr + pair.to(tl.int64) * stride_it + k0 + offs_k, mask=offs_k < inter_size - k0,
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * h[None, :], 1)
        last = k0 + BLOCK_K >= inter_size
        out = acc * tl.load(weights_ptr + pair)
        tl.store(y_ptr + pair.to(tl.int64) * stride_yt + row + offs_n, out,
                 mask=row + offs_n < tl.where(last, hidden, 0))
        acc = tl.where(last, 0.0, acc)


@triton.jit
def _moe_persistent_kernel(
    x_ptr, router_ptr, part_ptr, weights_ptr, ids_ptr, w_gate_up_ptr, inter_ptr, w_down_ptr, y_ptr, bar_ptr,
    gu_desc, down_desc, T, hidden, num_experts, inter_size, scale, eps,
    stride_xt, stride_rn, stride_ps, stride_pt,
    stride_ge, stride_gn, stride_it, stride_de, stride_dn, stride_yt,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_KE: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr,
    SPLIT: tl.constexpr, ROUTE_SPLIT: tl.constexpr, ROUTER_N: tl.constexpr, ROUTER_K: tl.constexpr,
    GU_N: tl.constexpr, BLOCK_H: tl.constexpr, DOWN_N: tl.constexpr, BLOCK_I: tl.constexpr, STREAM: tl.constexpr,
    PHASE: tl.constexpr, TMA: tl.constexpr = False, TMA_N: tl.constexpr = 16, TMA_K: tl.constexpr = 256,
    STAGES: tl.constexpr = 4, LAST_PHASE: tl.constexpr = 2, SPIN_LOAD: tl.constexpr = True,
    USE_PDL: tl.constexpr = False,
):
    """PHASE -1: all three phases with grid barriers (GPU); 0, 1, 2: that phase alone (CPU). TMA: the expert
    phases as `_gate_up_tma` / `_down_tma` (TMA_N x TMA_K chunks, STAGES ahead) instead of whole-K items.
    LAST_PHASE < 2 stops after that phase (the bench's time per phase); SPIN_LOAD: `sync.grid_barrier`'s way of
    waiting."""
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
    if PHASE < 0 and LAST_PHASE >= 1:
        sense = sync.grid_barrier(bar_ptr, sense, programs, SPIN_LOAD)
    if (PHASE < 0 and LAST_PHASE >= 1) or PHASE == 1:     # 2. routing (every program, the same values), then gate/up
        for t in range(0, T):
            route_row(part_ptr, weights_ptr, ids_ptr, x_ptr, t, num_experts, stride_pt, stride_ps, scale, eps,
                      TOP_K, BLOCK_KE, BLOCK_E, SIGMOID, NORMALIZE, ROUTE_SPLIT)
        tl.debug_barrier()      # this program's own routing stores before its items load the ids
        if TMA:
            _gate_up_tma(x_ptr, gu_desc, ids_ptr, inter_ptr, pid, programs, pairs, hidden, inter_size, stride_xt,
                         stride_it, TOP_K, TMA_N, TMA_K, STAGES)
        else:
            i_blocks = tl.cdiv(inter_size, GU_N)
            items = pairs * i_blocks
            g, u, xv = _gate_up_load(x_ptr, w_gate_up_ptr, ids_ptr, pid, items, i_blocks, hidden, inter_size,
                                     stride_xt, stride_ge, stride_gn, TOP_K, GU_N, BLOCK_H, STREAM)
            for item in range(pid, items, programs):    # the next item's loads in flight while this one reduces
                g2, u2, x2 = _gate_up_load(x_ptr, w_gate_up_ptr, ids_ptr, item + programs, items, i_blocks, hidden,
                                           inter_size, stride_xt, stride_ge, stride_gn, TOP_K, GU_N, BLOCK_H, STREAM)
                _gate_up_store(g, u, xv, inter_ptr, item, i_blocks, inter_size, stride_it, GU_N)
                g, u, xv = g2, u2, x2
    if PHASE < 0 and LAST_PHASE >= 2:
        sense = sync.grid_barrier(bar_ptr, sense, programs, SPIN_LOAD)
    if ((PHASE < 0 and LAST_PHASE >= 2) or PHASE == 2) and TMA:     # 3. down
        _down_tma(inter_ptr, down_desc, ids_ptr, weights_ptr, y_ptr, pid, programs, pairs, hidden, inter_size,
                  stride_it, stride_yt, TMA_N, TMA_K, STAGES)
    if ((PHASE < 0 and LAST_PHASE >= 2) or PHASE == 2) and not TMA:
        h_blocks = tl.cdiv(hidden, DOWN_N)
        items = pairs * h_blocks
        w, h, weight = _down_load(inter_ptr, w_down_ptr, ids_ptr, weights_ptr, pid, items, h_blocks, hidden,
                                  inter_size, stride_it, stride_de, stride_dn, DOWN_N, BLOCK_I, STREAM)
        for item in range(pid, items, programs):
            w2, h2, weight2 = _down_load(inter_ptr, w_down_ptr, ids_ptr, weights_ptr, item + programs, items,
                                         h_blocks, hidden, inter_size, stride_it, stride_de, stride_dn, DOWN_N,
                                         BLOCK_I, STREAM)
            _down_store(w, h, weight, y_ptr, item, h_blocks, hidden, stride_yt, DOWN_N)
            w, h, weight = w2, h2, weight2
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


def applies(x: torch.Tensor, routing: RoutingSpec) -> bool:
    """Decode-sized x (at most SMALL_BATCH_TOKENS tokens) on CUDA or in the interpreter, a greedy routing rule."""
    return (x.dim() == 2 and 0 < x.shape[0] <= fused_moe.SMALL_BATCH_TOKENS and routing.topk_method == "greedy"
            and (x.is_cuda or _INTERPRET))


def item_rows(tile: int, k: int) -> int:
    """Rows of an item whose tile holds `tile` elements over K = k (padded to a power of two): at least 1."""
    return max(1, tile // next_pow2(k))


_capacities: dict[tuple, int] = {}


def _capacity(args: tuple, options: dict, device: torch.device) -> int:
    """Programs of the kernel compiled for `options` that stay resident on `device` at once: its registers and
    shared memory against one SM's, times the SMs (compiled on the first call per options, not launched)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, *sorted(options.items()))
    if key not in _capacities:
        kernel = _moe_persistent_kernel.warmup(*args, grid=(1,), **options)
        kernel._init_handles()
        props = torch.cuda.get_device_properties(index)
        warps = kernel.metadata.num_warps
        regs_per_warp = -(-max(kernel.n_regs, 1) * 32 // 256) * 256      # allocated per warp in units of 256
        fits = [props.regs_per_multiprocessor // (regs_per_warp * warps),
                props.max_threads_per_multi_processor // (32 * warps), 32]
        if kernel.metadata.shared:
            fits.append(props.shared_memory_per_multiprocessor // kernel.metadata.shared)
        _capacities[key] = min(fits) * props.multi_processor_count
    return _capacities[key]


def moe_persistent(x: torch.Tensor, router: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                   routing: RoutingSpec, *, programs: int | None = None, split_k: int | None = None,
                   tiles: tuple[int, int] | None = None, warps: int | None = None,
                   tma: tuple[int, int, int] | None = None, **timing: object) -> tuple[TopKPartials, torch.Tensor]:
    """`fused_moe(x, w_gate_up, w_down, *route_linear(x, router, routing), reduce=False)` in one launch (three on
    CPU): the weighted expert rows [T * top_k, hidden] fp32, and the expert ids [T, top_k] they came from.
    programs: the grid (default half of what stays resident; on CPU 3, so the item loops wrap); split_k: the
    router's K-splits (default `gemv.default_split_k`, as `route_linear`); tiles: elements of a gate/up and of
    a down item (default GU_TILE, DOWN_TILE); warps: per program (default WARPS); tma: (rows, K chunk, stages)
    to fetch the expert weights by TMA instead (default TMA_CHUNKS; none: whole-K items); timing: LAST_PHASE /
    SPIN_LOAD (`bench.kernels`: the time per phase, the barrier's wait; GPU only)."""
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
    interpret = _INTERPRET or device.type != "cuda"
    bar = sync.counters(BARRIER_COUNTERS, 2, device)
    sigmoid = routing.scoring == "sigmoid"
    gu_tile, down_tile = tiles or (GU_TILE, DOWN_TILE)
    tma = tma if tma is not None else TMA_CHUNKS
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        descs = (TensorDescriptor.from_tensor(w_gate_up, [1, tma[0], tma[1]]),
                 TensorDescriptor.from_tensor(w_down, [1, tma[0], tma[1]]))
    else:
        descs = (None, None)
    args = (x, router, part, weights, ids, w_gate_up, inter, w_down, y, bar, *descs,
            t, hidden, num_experts, inter_size, float(routing.routed_scaling_factor), 1e-20 if sigmoid else 0.0,
            x.stride(0), router.stride(0), part.stride(0), part.stride(1),
            w_gate_up.stride(0), w_gate_up.stride(1), inter.stride(0), w_down.stride(0), w_down.stride(1),
            y.stride(0))
    constexprs = dict(TOP_K=k, BLOCK_T=next_pow2(t), BLOCK_KE=next_pow2(k), BLOCK_E=next_pow2(num_experts),
                      SIGMOID=sigmoid, NORMALIZE=routing.norm_topk_prob, SPLIT=split,
                      ROUTE_SPLIT=0 if split == 1 else split, ROUTER_N=ROUTER_TILE[0], ROUTER_K=ROUTER_TILE[1],
                      GU_N=item_rows(gu_tile, hidden), BLOCK_H=next_pow2(hidden),
                      DOWN_N=item_rows(down_tile, inter_size), BLOCK_I=next_pow2(inter_size),
                      STREAM=fused_moe.EVICT_FIRST)
    if tma:
        constexprs.update(TMA=True, TMA_N=tma[0], TMA_K=tma[1], STAGES=tma[2])
    if interpret:
        for phase in range(3):
            _moe_persistent_kernel[(programs or 3,)](*args, **constexprs, PHASE=phase)
        return TopKPartials(y, k, x.dtype), ids
    options = dict(constexprs, PHASE=-1, num_warps=warps or WARPS, **timing, **pdl.options(device))
    capacity = _capacity(args, options, device)
    grid = programs or max(1, capacity // 2)
    # more programs than fit on the GPU at once would wait forever at the first barrier
    assert 0 < grid <= capacity, f"{grid} programs: only {capacity} stay resident at once"
    _moe_persistent_kernel[(grid,)](*args, **options)
    return TopKPartials(y, k, x.dtype), ids
