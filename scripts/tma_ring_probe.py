"""Can a persistent kernel keep HBM busy through its phase boundaries when its weight loads run ahead of them?
(issue 4: `scripts/barrier_probe.py` found a grid barrier in plain Triton costs 2.8-3.3 us over pure streaming,
no less than a kernel boundary under PDL; there every load waits for the barrier. Weights do not depend on the
phase before, so a kernel that streams them through a shared-memory ring with TMA can keep the next phase's tiles
in flight while it waits.)

Run on the GPU: `python3 scripts/tma_ring_probe.py [--stages N] [--rows R]`. The same synthetic OLMoE batch-1 step
as barrier_probe.py (16 layers x 6 dependent phases, 2.4 GB), written as one [rows, 64] bf16 matrix that one TMA
descriptor covers; each program walks its tiles of [R, 64] (grid stride over the SMs, one program an SM) through a
ring of N shared-memory slots, each tracked by an mbarrier. The variants, graph-replayed over cold L2:
- `ring-phases`: one kernel, a grid barrier after each phase; the ring's loads already cross into the next phase
  (they are issued as soon as a slot frees, whatever phase the tile belongs to);
- `ring-phases-flag`: the same with a barrier whose last arriver raises a flag the others poll;
- `ring-phases-warp1`: the count barrier with its atomics issued by warp 1, not by the thread that issues the ring's
  TMA loads; `ring-phases-relaxed` (timing only): the count barrier with no fences;
- `ring-phases-ll`: no barrier; each partial goes out tagged with its phase in one 64-bit word, and the next phase
  polls the words until every one carries the tag (a dependency with no count and no fence);
- `ring-stream`: the same kernel with all bytes as one phase (the ceiling of this streaming loop);
- `ring-kernels`: one launch per phase (the ring refilled from empty each time);
- with `--l2-ahead D`, `-l2barrier` / `-l2stream`: the same with bulk prefetches into L2 (no shared memory) of the D
  tiles past the ring's, issued at each barrier / kept D tiles ahead of the ring's loads all along (HBM stays busy
  while a program with a full ring waits at a barrier);
- `barriers-only` (`-flag`): the phases with no tiles, so each barrier's own chain (count or flag, then the read of
  the previous phase's partials) alone.
Gluon (triton.experimental.gluon) is used because plain Triton does not expose the ring.
"""

from __future__ import annotations

import argparse

import torch
import triton
from barrier_probe import PHASES_MB, print_table
from stream_probe import graph_us  # scripts/ is on the path when a script runs
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from crosspool.bench.traffic import copy_bandwidth
from crosspool.kernels._common import num_sms

# the TMA load's name differs across Triton releases (3.9: async_load; older: async_copy_global_to_shared)
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier      # 3.9 | older releases
COLS = 64                     # bf16 columns: 128-byte rows, the widest box a swizzled TMA tile takes


@gluon.jit
def _tiles_of(tiles_ptr, p, pid, nprog):
    """How many of phase p's tiles this program walks (tiles pid, pid + nprog, ...)."""
    return gl.maximum(gl.load(tiles_ptr + p) - pid + nprog - 1, 0) // nprog


@gluon.jit
def _advance(pp, pj, tiles_ptr, num_phases, pid, nprog):
    """The producer's next (phase, local tile): the next tile of phase pp, else the first of the next phase that
    has one for this program; pp == num_phases when none is left."""
    pj += 1
    while (pp < num_phases) & (pj >= _tiles_of(tiles_ptr, gl.minimum(pp, num_phases - 1), pid, nprog)):
        pp += 1
        pj = 0
    return pp, pj


@gluon.jit
def _grid_count(counter_ptr, target):
    """Grid barrier: count this program in (release), then poll the count (acquire) until all `target` are in."""
    gl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = gl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = gl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")


@gluon.jit
def _grid_flag(counter_ptr, flag_ptr, target):
    """Grid barrier: count this program in (acq_rel); the last one in raises the phase's flag (release), the others
    poll the flag (acquire), so the polls do not contend with the count's atomics on one address."""
    before = gl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if before == target - 1:
        gl.atomic_xchg(flag_ptr, 1, sem="release", scope="gpu")
    else:
        seen = gl.atomic_add(flag_ptr, 0, sem="acquire", scope="gpu")
        while seen == 0:
            seen = gl.atomic_add(flag_ptr, 0, sem="acquire", scope="gpu")


@gluon.jit
def _grid_relaxed(counter_ptr, target):
    """Timing only: the count barrier with relaxed atomics (no fence: nothing orders the partials' stores before the
    count, so its checks may fail). Were the fences the cost, it would show here."""
    gl.atomic_add(counter_ptr, 1, sem="relaxed", scope="gpu")
    seen = gl.atomic_add(counter_ptr, 0, sem="relaxed", scope="gpu")
    while seen < target:
        seen = gl.atomic_add(counter_ptr, 0, sem="relaxed", scope="gpu")


@gluon.jit
def _grid_count_warp1(counter_ptr, target, WARPS: gl.constexpr):
    """`_grid_count` with its atomics issued by thread 32 (warp 1), not thread 0, which issues the ring's TMA loads:
    does the release fence wait for the loads that thread has in flight?"""
    flat: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    lane = gl.arange(0, 32 * WARPS, layout=flat)
    mine = lane == 32
    ptrs = counter_ptr + lane * 0
    gl.atomic_add(ptrs, lane * 0 + 1, mask=mine, sem="release", scope="gpu")
    got = gl.atomic_add(ptrs, lane * 0, mask=mine, sem="acquire", scope="gpu")
    seen = gl.max(gl.where(mine, got, 0), axis=0)
    while seen < target:
        got = gl.atomic_add(ptrs, lane * 0, mask=mine, sem="acquire", scope="gpu")
        seen = gl.max(gl.where(mine, got, 0), axis=0)


@gluon.jit
def _prefetch_l2(data_ptr, row, nbytes, WARPS: gl.constexpr):
    """One bulk prefetch into L2 of `nbytes` contiguous bytes from row `row` of the [*, 64] bf16 matrix (issued by
    thread 0 alone; it takes no shared memory and no barrier)."""
    flat: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    lane = gl.arange(0, 32 * WARPS, layout=flat)
    ptrs = data_ptr + row.to(gl.int64) * 64 + lane * 0
    gl.inline_asm_elementwise(
        "{ .reg .pred p; setp.eq.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
        "=r,l,r,r", [ptrs, lane, lane * 0 + nbytes], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _ring_kernel(desc, data_ptr, tiles_ptr, base_ptr, out_ptr, counter_ptr, ll_ptr, first_phase, num_phases, nprog,
                 ROWS: gl.constexpr, STAGES: gl.constexpr, NPROG_BLOCK: gl.constexpr, WARPS: gl.constexpr,
                 BARRIER: gl.constexpr, L2_AHEAD: gl.constexpr, L2_MODE: gl.constexpr):
    """Phases [first_phase, first_phase + num_phases) of the step (`tiles_ptr`/`base_ptr` index from first_phase):
    sum each phase's tiles, plus the previous phase's total, into out[phase, pid]. BARRIER between phases: "" none
    (one phase a launch), "count" (`_grid_count`), "flag" (`_grid_flag`; the flags follow the count in counter_ptr,
    one a phase), "ll" (no barrier: each program's partial goes out with its phase's tag in one 64-bit word, and the
    next phase polls those words until all carry the tag, as NCCL's LL protocol does; ll_ptr, zeroed each run).
    L2_MODE "barrier": before each barrier, prefetch into L2 the L2_AHEAD tiles that follow the ring's
    (so HBM keeps reading while the program waits with a full ring); "stream": keep prefetches L2_AHEAD tiles ahead
    of the ring's loads all the time (one with each load)."""
    pid = gl.program_id(0)
    tile: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    flat: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, ROWS, 64], desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    fence_async_shared()

    # the producer runs STAGES tiles ahead of the consumer, across phase boundaries
    zero = pid * 0                                   # a runtime 0: the cursors are loop-carried
    pp, pj = _advance(zero, zero - 1, tiles_ptr, num_phases, pid, nprog)
    for s in gl.static_range(STAGES):
        if pp < num_phases:
            mbarrier.expect(bars.index(s), ROWS * 64 * 2)
            _tma_load(desc, [gl.load(base_ptr + pp) + (pid + pj * nprog) * ROWS, 0], bars.index(s), ring.index(s))
            pp, pj = _advance(pp, pj, tiles_ptr, num_phases, pid, nprog)
    lp, lj = pp, pj                                  # the L2 cursor ("stream"): L2_AHEAD tiles past the ring's
    if L2_MODE == "stream":
        for _d in gl.static_range(L2_AHEAD):
            if lp < num_phases:
                _prefetch_l2(data_ptr, gl.load(base_ptr + lp) + (pid + lj * nprog) * ROWS, ROWS * 128, WARPS)
                lp, lj = _advance(lp, lj, tiles_ptr, num_phases, pid, nprog)

    consumed = zero
    for p in range(num_phases):
        acc = gl.zeros([ROWS, 64], gl.float32, tile)
        for _ in range(_tiles_of(tiles_ptr, p, pid, nprog)):
            slot = consumed % STAGES
            mbarrier.wait(bars.index(slot), (consumed // STAGES) & 1)
            acc += ring.index(slot).load(tile).to(gl.float32)
            _cta_barrier()                                  # every warp has read the slot: refill it
            if pp < num_phases:
                mbarrier.expect(bars.index(slot), ROWS * 64 * 2)
                _tma_load(desc, [gl.load(base_ptr + pp) + (pid + pj * nprog) * ROWS, 0], bars.index(slot),
                          ring.index(slot))
                pp, pj = _advance(pp, pj, tiles_ptr, num_phases, pid, nprog)
            if L2_MODE == "stream":
                if lp < num_phases:
                    _prefetch_l2(data_ptr, gl.load(base_ptr + lp) + (pid + lj * nprog) * ROWS, ROWS * 128, WARPS)
                    lp, lj = _advance(lp, lj, tiles_ptr, num_phases, pid, nprog)
            consumed += 1
        total = gl.sum(gl.sum(acc, axis=1), axis=0)
        phase = first_phase + p
        if phase > 0:
            if p > 0:
                if L2_MODE == "barrier":
                    qp, qj = pp, pj
                    for _d in gl.static_range(L2_AHEAD):
                        if qp < num_phases:
                            _prefetch_l2(data_ptr, gl.load(base_ptr + qp) + (pid + qj * nprog) * ROWS, ROWS * 128,
                                         WARPS)
                            qp, qj = _advance(qp, qj, tiles_ptr, num_phases, pid, nprog)
                if (BARRIER != "") & (BARRIER != "ll"):     # a grid barrier, bracketed by the CTA's own
                    _cta_barrier()
                    if BARRIER == "count":
                        _grid_count(counter_ptr, p * nprog)
                    elif BARRIER == "flag":
                        _grid_flag(counter_ptr, counter_ptr + p, p * nprog)
                    elif BARRIER == "relaxed":
                        _grid_relaxed(counter_ptr, p * nprog)
                    else:
                        _grid_count_warp1(counter_ptr, p * nprog, WARPS)
                    _cta_barrier()
            offs = gl.arange(0, NPROG_BLOCK, layout=flat)
            if BARRIER == "ll":
                # no barrier: poll the previous phase's words until each carries that phase's tag (phase - 1 + 1)
                words = gl.load(ll_ptr + (phase - 1) * nprog + offs, mask=offs < nprog, other=0, volatile=True)
                while gl.min(gl.where((offs >= nprog) | ((words >> 32).to(gl.int32) == phase), 1, 0), axis=0) == 0:
                    words = gl.load(ll_ptr + (phase - 1) * nprog + offs, mask=offs < nprog, other=0, volatile=True)
                prev = (words & 0xFFFFFFFF).to(gl.int32).to(gl.float32, bitcast=True)
            else:
                prev = gl.load(out_ptr + (phase - 1) * nprog + offs, mask=offs < nprog, other=0.0,
                               cache_modifier=".cg")
            total += gl.sum(prev, axis=0) / nprog
        gl.store(out_ptr + phase * nprog + pid, total)
        if BARRIER == "ll":         # the value and its phase's tag in one 64-bit word, one relaxed store
            word = (total.to(gl.int32, bitcast=True).to(gl.int64) & 0xFFFFFFFF) | ((phase + 1).to(gl.int64) << 32)
            gl.atomic_xchg(ll_ptr + phase * nprog + pid, word, sem="relaxed", scope="gpu")
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--stages", type=int, default=16, help="shared-memory slots in each program's ring")
    p.add_argument("--rows", type=int, default=64, help="rows of 64 bf16 in a tile (64: 8 KB)")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--balanced", action="store_true",
                   help="round each phase up to a whole number of tiles per program (no program waits at a barrier "
                        "for another's extra tile; the router phase grows to one tile a program)")
    p.add_argument("--l2-ahead", type=int, default=0,
                   help="also time the L2 prefetch variants, this many tiles past the ring (0: not)")
    args = p.parse_args()
    dev = torch.device("cuda")
    copy_bw = copy_bandwidth(dev)
    rows, stages, warps = args.rows, args.stages, args.warps
    nprog = num_sms(dev)
    nprog_block = triton.next_power_of_2(nprog)
    tile_bytes = rows * COLS * 2
    tiles = [max(1, round(mb * (1 << 20) / tile_bytes)) for _ in range(args.layers) for mb in PHASES_MB]
    if args.balanced:
        tiles = [-(-t // nprog) * nprog for t in tiles]
    phases = len(tiles)
    data = torch.rand(sum(tiles) * rows, COLS, device=dev).to(torch.bfloat16)
    base = [0]
    for t in tiles[:-1]:
        base.append(base[-1] + t * rows)
    expected = data.float().sum().item()
    layout = gl.NVMMASharedLayout.get_default_for([rows, COLS], gl.bfloat16)
    desc = TensorDescriptor.from_tensor(data, [rows, COLS], layout)
    tiles_t = torch.tensor(tiles, device=dev, dtype=torch.int32)
    base_t = torch.tensor(base, device=dev, dtype=torch.int32)
    all_tiles = torch.tensor([sum(tiles)], device=dev, dtype=torch.int32)
    zero = torch.zeros(1, device=dev, dtype=torch.int32)
    out = torch.zeros(phases * nprog, device=dev)
    counter = torch.zeros(1 + phases, device=dev, dtype=torch.int32)     # the count, then one flag a phase
    ll = torch.zeros(phases * nprog, device=dev, dtype=torch.int64)      # "ll": tagged partials
    meta = dict(ROWS=rows, STAGES=stages, NPROG_BLOCK=nprog_block, WARPS=warps, num_warps=warps,
                L2_AHEAD=args.l2_ahead)

    no_tiles = torch.zeros_like(tiles_t)

    def phased(barrier: str, tiles_of: torch.Tensor = tiles_t, l2: str = "") -> None:
        counter.zero_()
        ll.zero_()
        _ring_kernel[(nprog,)](desc, data, tiles_of, base_t, out, counter, ll, 0, phases, nprog, BARRIER=barrier,
                               L2_MODE=l2, **meta)

    def stream(l2: str = "") -> None:
        _ring_kernel[(nprog,)](desc, data, all_tiles, zero, out, counter, ll, 0, 1, nprog, BARRIER="", L2_MODE=l2,
                               **meta)

    def kernels() -> None:
        for i in range(phases):
            _ring_kernel[(nprog,)](desc, data, tiles_t[i:], base_t[i:], out, counter, ll, i, 1, nprog, BARRIER="",
                                   L2_MODE="", **meta)

    variants = {"ring-phases": lambda: phased("count"), "ring-phases-flag": lambda: phased("flag"),
                "ring-phases-warp1": lambda: phased("warp1"), "ring-phases-relaxed": lambda: phased("relaxed"),
                "ring-phases-ll": lambda: phased("ll"),
                "ring-kernels": kernels, "ring-stream": stream}
    if args.l2_ahead:
        variants |= {"ring-phases-flag-l2barrier": lambda: phased("flag", l2="barrier"),
                     "ring-phases-flag-l2stream": lambda: phased("flag", l2="stream"),
                     "ring-phases-l2stream": lambda: phased("count", l2="stream"),
                     "ring-stream-l2stream": lambda: stream("stream")}
    # the barriers alone: the same phases with no tiles (each barrier's own chain, with the partials' read after it)
    empty = {f"barriers-only{suffix}": (lambda b=b: phased(b, no_tiles))
             for suffix, b in (("", "count"), ("-flag", "flag"), ("-warp1", "warp1"), ("-relaxed", "relaxed"),
                                                                              ("-ll", "ll"))}
    total_bytes = data.numel() * 2
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s; {total_bytes / 1e6:.0f} MB a step, {phases} phases; grid "
          f"{nprog} x {warps} warps, a ring of {stages} x {tile_bytes // 1024} KB a program")
    checks = {}
    for name, fn in variants.items():
        out.zero_()
        fn()
        torch.cuda.synchronize()
        last = 0 if name.startswith("ring-stream") else phases - 1
        got = out[last * nprog:(last + 1) * nprog].sum().item()
        checks[name] = abs(got - expected) <= 1e-4 * expected
    times = {name: graph_us([fn], reps=9) for name, fn in (variants | empty).items()}
    print_table(list(variants), times, checks, "ring-stream", phases, total_bytes, copy_bw)
    for name in empty:
        print(f"{name}: {times[name]:.1f} us for {phases - 1} barriers, {times[name] / (phases - 1):.2f} us each "
              "(no bytes, so no total to check)", flush=True)


if __name__ == "__main__":
    main()
