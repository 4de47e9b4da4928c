"""The megakernel's GPU side (issue 4; the package docstring has the design): the persistent Gluon kernel that
runs a planned chain (`_chain_kernel`: a producer warp, `produce.py`, and the consumer warps, `consume.py`), and
`Chain`, which binds a chain to its weights and device buffers.
Needs Gluon (Triton >= 3.6) and an sm_90 GPU to run; it imports anywhere Triton does.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from crosspool.kernels._common import num_sms
from crosspool.kernels.megakernel.attend import SLOT_BLOCKS
from crosspool.kernels.megakernel.common import (
    K_BLOCK,
    K_CHUNK,
    K_GROUP,
    K_HEAD_DIM,
    K_MAX_ORDINALS,
    K_MAX_TOP_K,
    K_ROWS,
    K_STAGE_CHUNKS,
    SHARED_KIB,
)
from crosspool.kernels.megakernel.consume import _consume
from crosspool.kernels.megakernel.plan import (
    ATTENTION,
    BLOCK,
    CHUNK,
    F_DYN,
    F_KC,
    F_KIND,
    F_PRODUCER_RANKS,
    F_ROUTE_N,
    FEW_EXPERTS,
    HEAD_DIM,
    MAX_TOP_K,
    ROWS,
    STAGE_CHUNKS,
    Phase,
    combined_offset,
    dynamic_phases,
    fold_offset,
    plan,
    tile_lists,
    unpack,
)
from crosspool.kernels.megakernel.produce import _produce


@gluon.jit
def _chain_kernel(d0, d1, d2, d3, dkv, table_ptr, num_phases, tiles_ptr, tiles_stride,
                  x_ptr, last_ptr, norms_ptr, eps, words_ptr, routes_ptr, experts_ptr, n_ord, epoch_ptr, done_ptr,
                  err_ptr, nprog, prof_ptr, kv_ptr, kv_layers, ctx_ptr, bt_ptr, cos_ptr, sin_ptr, counters_ptr,
                  fold_ptr, accf_ptr, STAGES: gl.constexpr, BOXES: gl.constexpr, WARPS: gl.constexpr,
                  POLLS: gl.constexpr,
                  COMPUTE: gl.constexpr = True, PROFILE: gl.constexpr = False, SPLITS: gl.constexpr = 0,
                  DYNAMIC: gl.constexpr = False, LEAN: gl.constexpr = False, KEYS: gl.constexpr = False,
                  COUNTED: gl.constexpr = False, PIPE: gl.constexpr = False, FOLD: gl.constexpr = False,
                  SCATTER: gl.constexpr = False, CRANK: gl.constexpr = True):
    """One program an SM: a producer warp streams the program's weight tiles into a ring of shared-memory slots
    (`_produce`), while WARPS consumer warps compute the phases from them (`_consume`). CRANK: some router is ranked
    by the consumers (`rank._rank`), not the producer; without one that code is not compiled (the OLMoE step's SASS
    7,160 instructions against 9,160: ~112 KB of code, not ~146; with the staging's rounds, the polls and the
    producer's loops rolled and `_word_of` as shifts, 5,504: session 26)."""
    pid = gl.program_id(0)
    ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BOXES, K_ROWS, K_CHUNK], d0.layout)
    xs = gl.allocate_shared_memory(gl.bfloat16, [K_STAGE_CHUNKS, K_CHUNK],
                                   gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))          # the staged input
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())    # a slot has landed
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())   # a slot is free
    ranked = gl.allocate_shared_memory(gl.int64, [K_MAX_ORDINALS, 1], mbarrier.MBarrierLayout())
    # KEYS: the producer's ranking (`rank._rank_by_producer`): the ids it picked and the logits, by the parity of its
    # rankings, and the router's keys as it compares them
    picked = gl.allocate_shared_memory(gl.int32, [2, K_MAX_TOP_K], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    keys = gl.allocate_shared_memory(gl.int32, [2, 32], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    lbuf = gl.allocate_shared_memory(gl.float32, [4, 32], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))   # logits
    # each ranked expert's first row, for the producer: [GROUP routed phases (ordinal % GROUP), MAX_TOP_K]
    rowbase = gl.allocate_shared_memory(gl.int32, [K_GROUP * K_MAX_TOP_K, 1],
                                        gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    # a dynamic phase's item of each ring slot (`produce._dynamic_items`)
    itemq = gl.allocate_shared_memory(gl.int32, [STAGES, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    # an attention item's rotated q, new key, and output (fp32), and its BLOCK rows' outputs to combine
    scratch = gl.allocate_shared_memory(gl.float32, [4, K_HEAD_DIM], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    rows = gl.allocate_shared_memory(gl.float32, [K_BLOCK, K_HEAD_DIM], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    for s in gl.static_range(STAGES):
        mbarrier.init(full.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    for o in range(n_ord):
        mbarrier.init(ranked.index(o), count=1)
    fence_async_shared()
    gl.warp_specialize([
        (_consume, (ring, full, empty, ranked, rowbase, picked, lbuf, itemq, xs, scratch, rows, table_ptr, num_phases,
                    x_ptr, last_ptr, norms_ptr, eps,
                    words_ptr, routes_ptr, experts_ptr, n_ord, epoch_ptr, done_ptr, err_ptr, nprog, prof_ptr, kv_ptr,
                    kv_layers, ctx_ptr, bt_ptr, cos_ptr, sin_ptr, STAGES, BOXES, WARPS, POLLS, COMPUTE, PROFILE,
                    SPLITS, DYNAMIC, LEAN, counters_ptr, KEYS, COUNTED, PIPE, fold_ptr, FOLD, accf_ptr,
                    SCATTER, CRANK)),
        (_produce, (d0, d1, d2, d3, dkv, ring, full, empty, ranked, rowbase, itemq, tiles_ptr + pid * tiles_stride,
                    table_ptr, ctx_ptr, bt_ptr, kv_layers, counters_ptr, nprog, routes_ptr, words_ptr, epoch_ptr,
                    err_ptr, experts_ptr + pid * n_ord * 2 * K_MAX_TOP_K, picked, keys, lbuf,
                    prof_ptr + pid * (16 + 8 * num_phases), STAGES, BOXES, SPLITS > 0, DYNAMIC, LEAN, KEYS, POLLS,
                    PROFILE)),
    ], [1], [56])
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(full.index(s))
        mbarrier.invalidate(empty.index(s))


def carveout_percent(shared_bytes: int, most: int) -> int:
    """The least shared-memory carveout, in percent of an SM's `most` bytes of shared memory, that holds a block of
    `shared_bytes` plus the 1 KiB the driver reserves a block (the driver rounds it up to a size it has)."""
    if not 0 <= shared_bytes + 1024 <= most:
        raise ValueError(f"a block of {shared_bytes} B of shared memory does not fit in the SM's {most} B")
    return -(-(shared_bytes + 1024) * 100 // most)


def prefer_shared_memory_of(function: int, shared_bytes: int, device: torch.device) -> int:
    """Set kernel `function`'s (a CUfunction handle) preferred shared-memory carveout to `carveout_percent`, so the
    rest of the SM's unified memory is L1; returns the percentage. Raises RuntimeError if the driver refuses."""
    from cuda.bindings import driver as cu

    from crosspool.pools.vmm import check_cu

    # (Hopper's 228 KiB where this torch does not say)
    most = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_multiprocessor", 228 * 1024)
    percent = carveout_percent(shared_bytes, most)
    check_cu(cu.cuFuncSetAttribute(cu.CUfunction(function),
                                   cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, percent))
    return percent


class Chain:
    """A planned chain bound to its weights and device buffers: `run(x)` launches it once (graph-capturable);
    `outputs()` reads every phase's values back, `check()` raises if a poll gave up. `rank_keys` (the default):
    routers of at most 64 experts ranked on their logits as integer keys, by the producer warp where the router's
    first routed phase is dynamic, else by the consumers, the weights computed after the staging
    (`rank._rank_by_producer`; session 20: ranked on the weights, a step took 10-25 us longer). `counted_polls`: each
    published item adds one to its phase's count, and a staging waits on that one word before it polls its input's
    words (`stage._stage(COUNTED=True)`; 25-30 us a step slower, session 20: the count's round trip comes before
    the words'). `pipelined`: each slot's loads are issued before the previous slot's arithmetic
    (`consume._pipelined_slots`; session 21: a step 891 / 906 us against 898 / 901 for the defaults, no gain).
    (Session 21, tried and removed: the down's two input rounds polled at once, +19 us a step; its second round
    polled only before its first slot that reads it, +17 us; the next layer's QKV asked of L2 while the producer
    waits for the ranking, +18-30 us. Session 23, tried and removed: the experts' weights computed before the down,
    not before the gate/up's first slot, no gain; the next phase's table row loaded a phase early, no gain, and asked
    of L1 by `prefetch.global.L1` in every consumer thread, +45 us; the down as two phases, the first experts' then
    the rest's, +16-31 us; a ranked router's expert tiles held until the phase's input is staged, +25 us. Session 24,
    tried and removed: the plain phases (not routed) held to 3 or 4 of a ring of 6 slots in flight, a tie or +15 us;
    3 ring slots more, a hold that took each next layer's QKV's first 3 slots a program while HBM idles in the
    attention and routing, +18-30 us: the QKV's first program was done no sooner (the consumers' ~0.6 us a slot sets
    its pace), and 225 KB of shared memory leave the SM little L1 (a guess, not measured). Session 25, tried and
    removed: a slot's 8 warps split by box, each reading its box's input only, +30 us; the down's second input round
    loaded at its start and staged before its fifth slot, +20 us (its first round's poll of long-ready words still
    took 2-4 us under the ring's loads).) `prefer_l1`: after the first launch, the kernel's shared-memory carveout at
    what it uses, the rest L1 (`prefer_shared_memory_of`; session 25: -13 us a step). The kernel's code
    outgrew the SM's instruction cache: a staging's two rounds rolled into a loop (~800 SASS instructions fewer) took
    843 us a step against 851-860 (session 26); the polls, the producer's ranking and KV slots are loops too.
    (Session 26, tried and removed, both a tie: a producer-ranked router's expert slots after the first 1 or 2 held
    until the gate/up's input is staged, 838-840 us against 835-841; the tagged words read by relaxed gpu-scope
    loads, not volatile (system-scope) ones, 836-850.)"""

    def __init__(self, phases: list[Phase], families: list[torch.Tensor], input_len: int, stages: int = 6,
                 boxes: int | None = None, warps: int = 4, polls: int = 1 << 22, compute: bool = True,
                 norms: torch.Tensor | None = None, eps: float = 1e-5, profile: bool = False,
                 kv: torch.Tensor | None = None, max_blocks: int = 1, dynamic: bool = False,
                 dynamic_sums: bool = False, lean_release: bool = False, rank_keys: bool = True,
                 counted_polls: bool = False, pipelined: bool = False, prefer_l1: bool = False) -> None:
        if not 1 <= len(families) <= 4:
            raise ValueError(f"a chain takes 1-4 weight families, got {len(families)}")
        dev = families[0].device
        for w in families:
            if w.device != dev or w.dtype != torch.bfloat16 or not w.is_contiguous():
                raise ValueError("weight families must be contiguous bf16 tensors on one device")
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        if norms is not None and (norms.dim() != 1 or norms.device != dev):
            raise ValueError("norms: a 1-D tensor of norm weights on the weights' device")
        self.plan = plan(phases, families, input_len, 0 if norms is None else norms.numel())
        attention = any(f[F_KIND] == ATTENTION for f in self.plan.table.tolist())
        if boxes is None:                    # the widest slot (up to 4 chunks) that every weight row fills whole
            kcs = [f[F_KC] for f in self.plan.table.tolist() if f[F_KIND] != ATTENTION]
            boxes = 4 if attention else next(b for b in (4, 2, 1) if all(kc % b == 0 for kc in kcs))
        if attention and boxes != 4:
            raise ValueError(f"a chain with attention needs 4 boxes a slot (a slot holds {SLOT_BLOCKS} KV blocks of "
                             f"a head: 32 KiB), got {boxes}")
        if (pipelined or counted_polls) and any(ph.scatter for ph in phases):
            raise ValueError("scattered sums take neither pipelined slots (an item's first source) nor counted polls "
                             "(they count their items themselves)")
        ring_kib = stages * boxes * ROWS * CHUNK * 2 // 1024
        if stages < 1 or boxes < 1 or ring_kib + STAGE_CHUNKS * CHUNK * 2 // 1024 > SHARED_KIB - 1:
            raise ValueError(f"a ring of {stages} x {boxes} boxes ({ring_kib} KiB) and the staged input "
                             f"({STAGE_CHUNKS * CHUNK * 2 // 1024} KiB) must fit in {SHARED_KIB - 1} KiB of shared "
                             "memory (e.g. 6 x 4, 13 x 2, 26 x 1)")
        self.norms = norms if norms is not None else torch.zeros(1, dtype=torch.bfloat16, device=dev)
        self.eps = eps
        self.phases = phases
        # each family [N, K] as its [K / CHUNK, N, CHUNK] view: one box is `boxes` chunks of ROWS rows, chunk-major
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)
        descs = [TensorDescriptor.from_tensor(w.view(w.shape[0], -1, CHUNK).permute(1, 0, 2), [boxes, ROWS, CHUNK],
                                              layout) for w in families]
        self.descs = descs + [descs[0]] * (4 - len(descs))
        self.families = families
        # the family an attention phase's fold reads (`Phase.fold`): one for the chain
        folds_read = sorted({ph.family for ph in phases if ph.kind == "attention" and ph.fold != -1})
        if len(folds_read) > 1:
            raise ValueError(f"the attention phases' folds read one family, got {folds_read}")
        self.fold_family = families[folds_read[0] if folds_read else 0]
        self.table = self.plan.table.to(dev)
        self.words = torch.zeros(self.plan.words, dtype=torch.int64, device=dev)
        self.last = torch.zeros(phases[-1].out_rows, dtype=torch.float32, device=dev)   # the last phase's, in fp32
        self.state = torch.zeros(3, dtype=torch.int32, device=dev)          # epoch, done count, error flag
        self.nprog = num_sms(dev)
        # dynamic=True: the programs take the gate/up items as they go, from a counter a phase (`dynamic_phases`);
        # dynamic_sums=True too: the sum phases of more items than programs (QKV, o_proj, lm_head)
        dyn = dynamic_phases(self.plan, self.nprog if dynamic_sums else None) if dynamic else []
        self.tiles = tile_lists(self.plan, self.nprog, boxes, pad=stages + 1, dynamic=dyn).to(dev)
        self.table[dyn, F_DYN] = 1
        # rank_keys: the producer ranks a router of at most FEW_EXPERTS experts where its first routed phase is
        # dynamic (every program's tile list then holds that phase's code, where the producer ranks it)
        routed = self.plan.routed
        consumer_ranks = False                       # a router the consumers rank (else `_rank` is compiled out)
        for j, q in enumerate(routed):
            first = j == 0 or phases[routed[j - 1]].route != phases[q].route
            if rank_keys and first and q in dyn and self.plan.table[q, F_ROUTE_N] <= FEW_EXPERTS:
                self.table[q, F_PRODUCER_RANKS] = 1
            elif first:
                consumer_ranks = True
        # the dynamic phases' item counters, then each phase's published items (`counted_polls`)
        self.counters = torch.zeros(2 * len(phases), dtype=torch.int32, device=dev)
        n_ord = max(1, len(self.plan.routed))
        self.routes = torch.tensor(self.plan.routed or [0], dtype=torch.int32, device=dev)
        # each program's ranking of each routed phase: MAX_TOP_K expert ids, then their weights' fp32 bits
        self.experts = torch.zeros(self.nprog, n_ord, 2 * MAX_TOP_K, dtype=torch.int32, device=dev)
        # compute=False (timing only): the weight tiles stream through the ring unread; the outputs are wrong
        # profile=True: each program counts its SM cycles by what it did (`profile.cycles_by_activity`)
        # and stamps the GPU's nanosecond timer at each phase's start, once its input is staged, when its first slot
        # lands (attention: when its item's partial is out), and at its end; then 4 more of a phase's parts: an
        # attention item's moments (`_attend_item`), a routed phase's ranking (`_rank`)
        self.prof = torch.zeros(self.nprog, 16 + 8 * len(phases), dtype=torch.int64, device=dev)
        self._bind_kv(kv, max_blocks, dev)
        # prefer_l1: after the first launch, the kernel's shared-memory carveout is set to what it uses, not the
        # most there is (Triton asks for that of every kernel over 48 KB: `prefer_shared_memory_of`), so the rest of
        # the SM's 256 KB serves as L1 for the phase table, norm weights and routing buffers
        self.prefer_l1 = prefer_l1
        self._carved: int | None = None              # the kernel (CUfunction) it was set for
        self.carveout: int | None = None             # and the percentage
        self.meta = dict(STAGES=stages, BOXES=boxes, WARPS=warps, POLLS=polls, COMPUTE=compute, PROFILE=profile,
                         DYNAMIC=dynamic, LEAN=lean_release, KEYS=rank_keys, COUNTED=counted_polls, PIPE=pipelined,
                         SCATTER=any(ph.scatter for ph in phases), FOLD=bool(folds_read),
                         CRANK=consumer_ranks,
                         SPLITS=max([ph.sources for ph in phases if ph.kind == "attention"], default=0),
                         num_warps=warps)

    def _bind_kv(self, kv: torch.Tensor | None, max_blocks: int, dev: torch.device) -> None:
        """The KV cache the attention phases read and write ([blocks, layers, 2, BLOCK, heads, HEAD_DIM]), as one TMA
        descriptor over its [blocks * layers * 2 * BLOCK, heads, HEAD_DIM] view (a box: one block of one head), and
        the step's buffers, which `set_step` fills (a CUDA graph reads them where they are)."""
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        attention = [ph for ph in self.phases if ph.kind == "attention"]
        if attention and kv is None:
            raise ValueError("a chain with attention phases needs the KV cache (kv=)")
        if kv is not None:
            heads = {ph.out_rows // HEAD_DIM for ph in attention}
            if kv.dim() != 6 or kv.shape[2:4] != (2, BLOCK) or kv.shape[5] != HEAD_DIM or kv.dtype != torch.bfloat16 \
                    or not kv.is_contiguous() or kv.device != dev or heads - {kv.shape[4]} or \
                    any(ph.row0 >= kv.shape[1] for ph in attention):
                raise ValueError(f"kv: a contiguous bf16 [blocks, layers, 2, {BLOCK}, heads, {HEAD_DIM}] tensor on the "
                                 f"weights' device with the attention phases' heads ({sorted(heads)}) and layers, got "
                                 f"{kv.dtype} {tuple(kv.shape)}")
        self.kv = kv if kv is not None else torch.zeros(1, 1, 2, BLOCK, 1, HEAD_DIM, dtype=torch.bfloat16, device=dev)
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)
        self.kv_desc = TensorDescriptor.from_tensor(self.kv.view(-1, self.kv.shape[4], HEAD_DIM), [BLOCK, 1, HEAD_DIM],
                                                    layout)
        self.ctx = torch.ones(1, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros(max(1, max_blocks), dtype=torch.int32, device=dev)
        self.cos = torch.ones(HEAD_DIM // 2, dtype=torch.float32, device=dev)
        self.sin = torch.zeros(HEAD_DIM // 2, dtype=torch.float32, device=dev)

    def set_step(self, ctx: int, block_table: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """The step's context length (the new token is at ctx - 1), block table and that position's cos/sin."""
        need = -(-ctx // BLOCK)
        if ctx < 1 or need > self.block_table.numel() or block_table.numel() < need:
            raise ValueError(f"a step of {ctx} tokens needs {need} blocks: the chain holds {self.block_table.numel()}"
                             f" (max_blocks), the table gives {block_table.numel()}")
        self.ctx.fill_(ctx)
        self.block_table[:need].copy_(block_table[:need])
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def bind_step(self, ctx: torch.Tensor, block_table: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Read every launch's step from these tensors where they are (an engine's static buffers, which a CUDA
        graph replays in place), not from copies: ctx [1] and block_table [max_blocks or more] int32 or int64,
        cos and sin [HEAD_DIM // 2] fp32, each 1-D and contiguous on the chain's device. `set_step` writes into
        them from then on."""
        ints, dev = (torch.int32, torch.int64), self.words.device
        for name, t, dtypes, n in (("ctx", ctx, ints, 1), ("block_table", block_table, ints, self.block_table.numel()),
                                   ("cos", cos, (torch.float32,), HEAD_DIM // 2),
                                   ("sin", sin, (torch.float32,), HEAD_DIM // 2)):
            if t.device != dev or t.dtype not in dtypes or t.dim() != 1 or not t.is_contiguous() or t.numel() < n:
                raise ValueError(f"{name}: a contiguous 1-D {' or '.join(str(d) for d in dtypes)} tensor of at least "
                                 f"{n} on {dev}, got {t.dtype} {tuple(t.shape)} on {t.device}")
        self.ctx, self.block_table, self.cos, self.sin = ctx, block_table, cos, sin

    def run(self, x: torch.Tensor) -> None:
        """One launch on the step's input vector x (fp32 or bf16 [input_len], contiguous, on the chain's device)."""
        if x.shape != (self.plan.input_len,) or x.dtype not in (torch.float32, torch.bfloat16) or \
                not x.is_contiguous() or x.device != self.words.device:
            raise ValueError(f"input: expected a contiguous fp32 or bf16 [{self.plan.input_len}] on "
                             f"{self.words.device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
        st = self.state
        kernel = _chain_kernel[(self.nprog,)](
            *self.descs, self.kv_desc, self.table, len(self.phases), self.tiles, self.tiles.shape[1], x, self.last,
            self.norms, self.eps, self.words, self.routes, self.experts, self.experts.shape[1], st[0:], st[1:], st[2:],
            self.nprog, self.prof, self.kv, self.kv.shape[1], self.ctx, self.block_table, self.cos, self.sin,
            self.counters, self.fold_family, self.words.view(torch.float32), **self.meta)
        if self.prefer_l1 and kernel is not None and kernel.function != self._carved:
            self.carveout = prefer_shared_memory_of(kernel.function, kernel.metadata.shared, self.words.device)
            self._carved = kernel.function

    def outputs(self) -> list[torch.Tensor]:
        """Every phase's outputs as `reference` gives them (an attention phase: its partials, their log-sum-exps,
        the combined heads)."""
        values = unpack(self.words)
        outs = []
        for o, ph in zip(self.plan.out_offsets, self.phases, strict=True):
            if ph.kind == "attention":
                n, c, f = ph.sources * ph.out_rows, o + combined_offset(ph), o + fold_offset(ph)
                lse = (self.words[o + n // 2:c] & 0xFFFFFFFF).to(torch.int32)
                folded = (self.words[f:f + (ph.out_rows // HEAD_DIM) * ph.fold_rows] & 0xFFFFFFFF).to(torch.int32)
                outs.append(torch.cat([values[2 * o:2 * o + n], lse.view(torch.float32),
                                       values[2 * c:2 * c + ph.out_rows], folded.view(torch.float32)]))
            elif ph.scatter:                 # the last launch's fp32 sums, rounded as a word would hold them
                last = (int(self.state[0]) - 1) & 1
                sums = self.words.view(torch.float32)[2 * o + last * ph.out_rows:2 * o + (last + 1) * ph.out_rows]
                outs.append(sums.to(torch.bfloat16).float())
            else:
                outs.append(values[2 * o:2 * o + ph.out_rows])
        return outs

    def check(self) -> None:
        if int(self.state[2]) != 0:
            raise RuntimeError("megakernel chain: a phase gave up waiting for its inputs (were all programs "
                               "resident at once?)")
