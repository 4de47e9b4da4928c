"""What does a phase boundary cost inside one persistent kernel, against a kernel boundary under PDL? (issue 4: the
0.85 goal at batch 1 is the ceiling of one kernel per phase; a persistent per-layer kernel is the design whose
ceiling is higher, if its grid barriers cost less than a launch.)

Run on the GPU: `python3 scripts/barrier_probe.py`. A synthetic decode step streams, per layer, the bytes of
OLMoE-1B-7B's six weight phases at batch 1 (QKV 25.2 MB, KV 8.4, o_proj 8.4, router 0.26, expert gate/up 67.1,
expert down 33.6), 16 layers. Each phase depends on the one before: a program adds the previous phase's total
(read from its partials) into its own partial, so the last phase's total is the sum of every byte only if each
phase saw all of the previous one's writes. Variants, each replayed from a CUDA graph over cold L2:
- `kernels`: one PDL kernel per phase (96), a persistent grid-stride grid each;
- `layer`: one persistent kernel per layer, its six phases separated by grid barriers (atomic count, acquire spin);
- `layer-prefetch`: as `layer`, each program loading its first chunk of the next phase before it waits;
- `step`: one persistent kernel for all 96 phases, with the prefetch;
- `layer-l2-N`, `step-l2-N`: as `layer-prefetch` and `step`, each program also requesting its next N chunks of the
  next phase into L2 before it waits (so the memory pipe stays busy through the barrier);
- `stream`: all of the bytes in one kernel, no phases (the ceiling).
Prints us per step, us per phase boundary over `stream`, fraction of copy bandwidth, and whether the total checks.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from stream_probe import graph_us  # scripts/ is on the path when a script runs

from crosspool.bench.traffic import copy_bandwidth
from crosspool.kernels import pdl
from crosspool.kernels._common import num_sms
from crosspool.kernels.pdl import enter as pdl_enter
from crosspool.kernels.prefetch import _prefetch_lines

LOAD_STAGES = tl.constexpr(1)   # the loop pipeliner's register copies would cut the programs an SM holds
PHASES_MB = (25.2, 8.4, 8.4, 0.26, 67.1, 33.6)


@triton.jit
def _grid_sync(counter_ptr, target, stuck_ptr):
    """Every program of the grid waits here until `target` arrivals are counted. That needs every program resident
    at once; if the count stalls for ~2^20 polls (the grid is not), the program sets `stuck` and goes on."""
    tl.debug_barrier()                                            # this program's stores are issued
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    polls = 0
    while (seen < target) & (polls < 1048576):
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        polls += 1
    if seen < target:
        tl.atomic_xchg(stuck_ptr, 1)
    tl.debug_barrier()


@triton.jit
def _phase_sum(x_ptr, n, first, prev_ptr, nprog, CHUNK: tl.constexpr, NPROG_BLOCK: tl.constexpr):
    """This program's partial of one phase: the grid-stride sum of x[0, n) plus its share of the previous total."""
    pid = tl.program_id(0)
    acc = first.to(tl.float32)
    for start in tl.range((pid + tl.num_programs(0)).to(tl.int64) * CHUNK, n, tl.num_programs(0) * CHUNK,
                          num_stages=LOAD_STAGES):
        offs = start + tl.arange(0, CHUNK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    total = tl.sum(acc, 0)
    if prev_ptr is not None:
        offs_p = tl.arange(0, NPROG_BLOCK)
        prev = tl.load(prev_ptr + offs_p, mask=offs_p < nprog, other=0.0, cache_modifier=".cg")
        total += tl.sum(prev, 0) / nprog
    return total


@triton.jit
def _first_chunk(x_ptr, n, CHUNK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    return tl.load(x_ptr + offs, mask=offs < n, other=0.0)


@triton.jit
def _request_l2(x_ptr, n, CHUNK: tl.constexpr, L2_CHUNKS: tl.constexpr):
    """Request chunks 1 .. L2_CHUNKS of this program's grid-stride walk over x[0, n) into L2 (one 128-byte line per
    thread request; past the end: the last line again)."""
    lines = (tl.arange(0, L2_CHUNKS * CHUNK // 64) // (CHUNK // 64) + 1).to(tl.int64)       # walk step of each line
    offs = (tl.program_id(0) + lines * tl.num_programs(0)) * CHUNK + (tl.arange(0, L2_CHUNKS * CHUNK // 64)
                                                                      % (CHUNK // 64)) * 64
    _prefetch_lines(x_ptr + tl.minimum(offs, n - 64))


@triton.jit
def _phase_input(ptrs_ptr, sizes_ptr, p):
    """Phase p's tensor and length; the host keeps both multiples of 16 elements, so the loads vectorize."""
    x_ptr = tl.multiple_of(tl.load(ptrs_ptr + p).to(tl.pointer_type(tl.bfloat16)), 16)
    return x_ptr, tl.multiple_of(tl.load(sizes_ptr + p), 16)


@triton.jit
def _one_phase_kernel(x_ptr, n, prev_ptr, out_ptr, nprog, CHUNK: tl.constexpr, NPROG_BLOCK: tl.constexpr,
                      HAS_PREV: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    first = _first_chunk(x_ptr, n, CHUNK)
    total = _phase_sum(x_ptr, n, first, prev_ptr if HAS_PREV else None, nprog, CHUNK, NPROG_BLOCK)
    tl.store(out_ptr + tl.program_id(0), total)


@triton.jit
def _phases_kernel(ptrs_ptr, sizes_ptr, out_ptr, counter_ptr, stuck_ptr, first_phase, num_phases, nprog,
                   CHUNK: tl.constexpr, NPROG_BLOCK: tl.constexpr, PREFETCH: tl.constexpr,
                   L2_CHUNKS: tl.constexpr = 0, USE_PDL: tl.constexpr = False):
    """Phases [first_phase, first_phase + num_phases) of the step, one grid barrier between each two."""
    pdl_enter(USE_PDL)
    pid = tl.program_id(0)
    p = first_phase
    x_ptr, n = _phase_input(ptrs_ptr, sizes_ptr, p)
    first = _first_chunk(x_ptr, n, CHUNK)
    for i in range(num_phases):
        p = first_phase + i
        if p == 0:
            total = _phase_sum(x_ptr, n, first, None, nprog, CHUNK, NPROG_BLOCK)
        else:
            total = _phase_sum(x_ptr, n, first, out_ptr + (p - 1) * nprog, nprog, CHUNK, NPROG_BLOCK)
        tl.store(out_ptr + p * nprog + pid, total)
        if i + 1 < num_phases:
            x_ptr, n = _phase_input(ptrs_ptr, sizes_ptr, p + 1)
            if L2_CHUNKS > 0:            # ... and request this program's next chunks into L2 while the grid waits
                _request_l2(x_ptr, n, CHUNK, L2_CHUNKS)
            if PREFETCH:                 # weights do not depend on the phase before: load them before waiting
                first = _first_chunk(x_ptr, n, CHUNK)
            _grid_sync(counter_ptr, (i + 1) * nprog, stuck_ptr)
            if not PREFETCH:
                first = _first_chunk(x_ptr, n, CHUNK)


def resident_per_sm(chunk: int, warps: int, nprog: int, nprog_block: int, dev: torch.device) -> int:
    """How many programs of the barrier kernel (either PREFETCH) one SM holds at once, from its registers and shared
    memory (the H100/H200 SM: 64K registers, 228 KB shared memory, 64 warps)."""
    buf = torch.zeros(chunk, device=dev, dtype=torch.bfloat16)
    ptrs = torch.tensor([buf.data_ptr()], device=dev, dtype=torch.int64)
    sizes = torch.tensor([chunk], device=dev, dtype=torch.int64)
    out, flags = torch.zeros(nprog_block, device=dev), torch.zeros(2, device=dev, dtype=torch.int32)
    fits = []
    for prefetch in (False, True):
        k = _phases_kernel[(1,)](ptrs, sizes, out, flags, flags[1:], 0, 1, nprog, CHUNK=chunk, NPROG_BLOCK=nprog_block,
                                 PREFETCH=prefetch, num_warps=warps, **pdl.options(dev))
        regs = -(-max(k.n_regs, 1) // 8) * 8 * 32 * warps          # allocated per warp in 256s
        fits.append(min(65536 // regs, (228 * 1024) // max(k.metadata.shared, 1), 64 // warps))
    torch.cuda.synchronize()
    return min(fits)


def print_table(names: list[str], times: dict[str, float], checks: dict[str, bool], ceiling: str, phases: int,
                total_bytes: int, copy_bw: float) -> None:
    """The probes' table: us a step, us a phase boundary over the no-phase `ceiling` row, fraction of copy bw."""
    print(f"| variant | us a step | us a boundary over {ceiling} | frac of copy bw | total checks |\n"
          "|---|---:|---:|---:|---|")
    for name in names:
        extra = (times[name] - times[ceiling]) / (phases - 1)
        print(f"| {name} | {times[name]:.1f} | {extra:.2f} | {total_bytes / (times[name] * 1e-6) / copy_bw:.3f} | "
              f"{'yes' if checks[name] else 'NO'} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--per-sm", type=int, default=4, help="resident programs per SM (the grid is SMs x this)")
    p.add_argument("--chunk", type=int, default=8192, help="bf16 elements a program reads per step")
    p.add_argument("--warps", type=int, default=8)
    p.add_argument("--l2-chunks", type=int, default=4,
                   help="the *-l2 variants: chunks of the next phase each program requests into L2 before waiting")
    args = p.parse_args()
    chunk, warps = args.chunk, args.warps
    dev = torch.device("cuda")
    copy_bw = copy_bandwidth(dev)
    nprog = num_sms(dev) * args.per_sm
    nprog_block = triton.next_power_of_2(nprog)
    resident = resident_per_sm(chunk, warps, nprog, nprog_block, dev)
    if resident < args.per_sm:
        print(f"only {resident} programs of {warps} warps fit an SM at once: the grid is SMs x {resident}")
        nprog = num_sms(dev) * resident
        nprog_block = triton.next_power_of_2(nprog)
    g = torch.Generator(device=dev).manual_seed(0)
    sizes = [int(mb * (1 << 20) // 32) * 16 for _ in range(args.layers) for mb in PHASES_MB]
    xs = [torch.rand(n, generator=g, device=dev).to(torch.bfloat16) for n in sizes]
    phases = len(xs)
    expected = sum(x.float().sum().item() for x in xs)
    total_bytes = sum(sizes) * 2
    ptrs = torch.tensor([x.data_ptr() for x in xs], device=dev, dtype=torch.int64)
    sizes_t = torch.tensor(sizes, device=dev, dtype=torch.int64)
    out = torch.zeros(phases * nprog, device=dev)
    counters = torch.zeros(phases, device=dev, dtype=torch.int32)
    stuck = torch.zeros(1, device=dev, dtype=torch.int32)
    launch = pdl.options(dev)
    big = torch.cat(xs)

    def kernels() -> None:
        for i, x in enumerate(xs):
            _one_phase_kernel[(nprog,)](x, x.numel(), out[(i - 1) * nprog:] if i else out, out[i * nprog:], nprog,
                                        CHUNK=chunk, NPROG_BLOCK=nprog_block, HAS_PREV=i > 0, num_warps=warps,
                                        **launch)

    def persistent(per_launch: int, prefetch: bool, l2_chunks: int = 0) -> None:
        counters.zero_()
        for j, first in enumerate(range(0, phases, per_launch)):
            _phases_kernel[(nprog,)](ptrs, sizes_t, out, counters[j:], stuck, first, min(per_launch, phases - first),
                                     nprog, CHUNK=chunk, NPROG_BLOCK=nprog_block, PREFETCH=prefetch,
                                     L2_CHUNKS=l2_chunks, num_warps=warps, **launch)

    def stream() -> None:
        _one_phase_kernel[(nprog,)](big, big.numel(), out, out, nprog, CHUNK=chunk, NPROG_BLOCK=nprog_block,
                                    HAS_PREV=False, num_warps=warps, **launch)

    per_layer = len(PHASES_MB)
    variants = {"kernels": kernels,
                "layer": lambda: persistent(per_layer, False),
                "layer-prefetch": lambda: persistent(per_layer, True),
                "step": lambda: persistent(phases, True),
                f"layer-l2-{args.l2_chunks}": lambda: persistent(per_layer, True, args.l2_chunks),
                f"step-l2-{args.l2_chunks}": lambda: persistent(phases, True, args.l2_chunks),
                "stream": stream}
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s; {total_bytes / 1e6:.0f} MB a step, {phases} phases, "
          f"grid {nprog} x {warps} warps, {chunk * 2 // 1024} KB a load")
    checks = {}
    for name, fn in variants.items():         # once each, eagerly: a grid that is not resident stops here
        out.zero_()
        fn()
        torch.cuda.synchronize()
        total = out[(phases - 1) * nprog:].sum().item()
        checks[name] = stuck.item() == 0 and (name == "stream" or abs(total - expected) <= 1e-4 * expected)
        if stuck.item():
            raise SystemExit(f"{name}: a grid barrier stalled (programs not all resident); nothing timed")
    times = {name: graph_us([fn], reps=9) for name, fn in variants.items()}
    print_table(list(variants), times, checks, "stream", phases, total_bytes, copy_bw)


if __name__ == "__main__":
    main()
