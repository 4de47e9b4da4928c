"""CUDA graphs of the decode step, one per (model, batch-size bucket, context class).

A decode step of B sequences (one new token each) runs as the replay of the graph captured for the
smallest bucket >= B: embedding, every layer's attention side and FFN side, the final norm and lm_head, all
on static input buffers. Per step the host writes the batch's metadata (token ids, positions, KV slots,
context lengths, block-table rows) into one pinned staging area, copies it to the device in two copies and
replays one graph; padding rows (B .. bucket) have context length 0 and KV slot -1, so the kernels skip them
(their FFN rows still run: the buckets are exact up to 8 sequences, where an extra row's experts would cost
the most).

The KV pool's per-model ranges keep their virtual addresses while pages are mapped and unmapped under them
(CUDA VMM), so a graph captured once stays valid while the pool grows and shrinks. Split-KV attention is
captured with a fixed split grid (`paged_attention.default_split_plan`), sized for the longest context of the
graph's context class; each sequence divides its own context among them, and splits past it exit at once. A
bucket has two classes when the model's longest context exceeds SHORT_CONTEXT: steps whose longest context is
at most that replay a graph sized for it (the two-wave grid short contexts want), longer ones a graph sized for
the model's longest context (more, longer splits; a short step there would launch their programs for nothing).

Each replay also leaves the rows' greedy tokens on the device (`DecodeInputs.tokens`), and a row's input
token may be given as "the token row r sampled in the previous replay" (`SRC_ROWS`): async decode
(`DecodeGraphs.launch`, `Engine._launch`) queues step n+1 before the host has read step n's tokens.

Graphs need the Triton kernels (the torch reference path syncs with the host and has data-dependent shapes)
and an FFN in this process, or across pool ranks one KV rank (`RemoteFFN.passes`): then the graph holds the
NCCL sends and receives of every layer's FFN call, the host sends one header before each replay
(`RemoteFFN.begin_pass`), and the weights ranks replay their graph of the same pass. Such a pass runs in a
*lane* (`transport` module docs): each lane has its own graph of every bucket (its communicator is captured in
it) and its own stream, so passes of different models in different lanes overlap; a model's passes stay in
order whatever their lanes. `capture=False` runs the same static-buffer path without capturing (CPU tests).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from crosspool.engine.scheduler import ScheduledSeq
from crosspool.kernels._common import cdiv, env_int
from crosspool.kernels.torch_ref import feed_ids
from crosspool.models.batch import ForwardBatch, PagedCache
from crosspool.models.model import MoEModel

if TYPE_CHECKING:
    from crosspool.kernels.megakernel.step import DecodeStep

BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
           384, 448, 512)
IDS, POSITIONS, SLOTS, CONTEXT_LENS, SRC_ROWS = range(5)
META_ROWS = 5          # the staged metadata's rows above (`DecodeInputs`)
# block tables larger than this go to the device by a copy engine, whose bandwidth then beats the SMs' reads of
# host memory (`kernels.host_copy`)
HOST_COPY_MAX_BYTES = 256 * 1024
# the longest context of a bucket's short class (CROSSPOOL_GRAPH_SHORT_CONTEXT; 0: one class, sized for the model's
# longest context)
SHORT_CONTEXT = env_int("CROSSPOOL_GRAPH_SHORT_CONTEXT", 4096, minimum=0)
# a whole-step graph's ends: 1, its input as one kernel and its last residual add inside the final norm
# (`embed_inputs`, `MoEModel.forward_logits`); 0, torch's ops there, as before session 11 (before/after runs)
FUSED_ENDS = env_int("CROSSPOOL_GRAPH_FUSED_ENDS", 1)
# a batch-1 step as one megakernel launch (`kernels.megakernel.step`; OLMoE-shaped models on an sm_90 GPU; the
# model's weights become views of the megakernel's layout when the graphs are built, before any capture): "auto"
# (the default) wherever it can run, quietly keeping the graph of kernels elsewhere; "1" the same, but a model
# that cannot have it logs a warning saying why; "0" never. On the H200 at context 1k the engine's batch-1 OLMoE
# step took 0.96 ms with it against 1.05 without (benchmarks.md section 7, session 19).
MEGAKERNEL = os.environ.get("CROSSPOOL_MEGAKERNEL", "").strip() or "auto"
if MEGAKERNEL not in ("auto", "0", "1"):
    raise ValueError(f"CROSSPOOL_MEGAKERNEL={MEGAKERNEL!r}: expected auto, 0 or 1")
MEGAKERNEL_WARPS = env_int("CROSSPOOL_MEGAKERNEL_WARPS", 8)        # its consumer warps a program (4 or 8)
# its split of the items: 0 fixed, 1 gate/up from counters (the default), 2 the larger sums too (`Chain(dynamic=,
# dynamic_sums=)`); and 1 to free ring slots with the proxy fence in the producer (`Chain(lean_release=)`)
MEGAKERNEL_DYNAMIC = env_int("CROSSPOOL_MEGAKERNEL_DYNAMIC", 1)
MEGAKERNEL_LEAN = env_int("CROSSPOOL_MEGAKERNEL_LEAN", 0)
# 1 (the default): its shared-memory carveout at what it uses, the rest of the SM's memory L1 (`Chain(prefer_l1=)`;
# 864-873 us a step against 879-886, session 25); 0: the most shared memory, as Triton sets every large kernel
MEGAKERNEL_L1 = env_int("CROSSPOOL_MEGAKERNEL_L1", 1)
MEGAKERNEL_SPARE = 256 << 20     # bytes kept free past the layout's own while it is built (its buffers, the ring)
log = logging.getLogger("crosspool.engine")


def context_classes(max_model_len: int) -> tuple[int, ...]:
    """The longest context of each context class of a model's decode graphs, ascending."""
    return (SHORT_CONTEXT, max_model_len) if 0 < SHORT_CONTEXT < max_model_len else (max_model_len,)


def longest_context(scheduled: list[ScheduledSeq]) -> int:
    """The most keys a sequence of this decode step attends to (its new token's included)."""
    return max((s.seq.num_computed + 1 for s in scheduled), default=0)


def context_class(classes: tuple[int, ...], longest: int) -> int:
    """The class a step whose longest context is `longest` replays: the first that holds it."""
    return next((c for c in classes if longest <= c), classes[-1])


def buckets_up_to(max_batch: int) -> list[int]:
    return sorted({b for b in BUCKETS if b < max_batch} | {max_batch})


@dataclass(slots=True)
class LaunchedStep:
    """A decode step queued on the device whose greedy tokens the host has not read yet."""

    scheduled: list[ScheduledSeq]
    tokens: torch.Tensor                   # pinned host [n], valid once `event` has completed
    event: torch.cuda.Event | None         # None on CPU (the copy was synchronous)
    source: torch.Tensor | None = None     # the device buffer holding the tokens: a next step fed from it must
                                           # replay graphs that read this buffer (`DecodeInputs.tokens`)

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.tokens.tolist()


class TokenReadback:
    """Two pinned host buffers for launched steps' greedy tokens: one being filled while the other is read."""

    def __init__(self, device: torch.device, max_batch: int) -> None:
        self.device = device
        pin = device.type == "cuda"
        self._host = [torch.zeros(max_batch, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        # a GPU writes the tokens into the pinned buffers itself (`host_copy`: no copy engine after the step)
        self._views = self._sm_copy = None
        if pin:
            from crosspool.kernels import host_copy
            self._views = [host_copy.host_view(h, device) for h in self._host]
            self._sm_copy = host_copy.copy
        self._flip = 0

    def queue(self, scheduled: list[ScheduledSeq], tokens: torch.Tensor) -> LaunchedStep:
        """Queue the copy of the device `tokens` [n] to the host after the work queued so far; no wait."""
        n = len(scheduled)
        host = self._host[self._flip]
        if self._sm_copy is not None:
            self._sm_copy(self._views[self._flip][:n], tokens[:n])
        else:
            host[:n].copy_(tokens[:n], non_blocking=True)
        self._flip ^= 1
        event = torch.cuda.Event() if self.device.type == "cuda" else None
        if event is not None:
            event.record()
        return LaunchedStep(scheduled, host[:n], event, tokens)


def embed_inputs(model: MoEModel, inputs: DecodeInputs, batch: ForwardBatch, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The step's embedding rows and RoPE tables (`AttentionSide.embed_step`). A row with SRC_ROWS >= 0 takes
    the token the previous replay left in that row of `inputs.tokens` (async decode: the host has not read it
    yet), the others the ids staged from the host."""
    src = inputs.meta[SRC_ROWS, :batch.input_ids.shape[0]]
    return model.attention.embed_step(batch.input_ids, src, inputs.tokens, batch.positions, cos, sin)


@dataclass(slots=True)
class CapturedStep:
    graph: torch.cuda.CUDAGraph | None    # None: replayed eagerly (capture=False)
    batch: ForwardBatch                   # views of the static buffers, sized to the bucket
    logits: torch.Tensor | None           # [bucket, vocab] fp32, written by each replay
    capture_s: float


def bucket_for(buckets: list[int], batch_size: int) -> int | None:
    """The smallest bucket that holds the batch, None if it is too large for graphs."""
    return next((b for b in buckets if b >= batch_size), None)


class DecodeInputs:
    """The static metadata of a decode step: host (pinned) staging and the device buffers graphs read."""

    def __init__(self, device: torch.device, max_batch: int, max_model_len: int, block_size: int) -> None:
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.classes = context_classes(max_model_len)
        self.max_blocks = cdiv(max_model_len, block_size)
        pin = device.type == "cuda"
        # rows: token ids, positions, KV slots, context lengths, source rows (padding: 0, 0, -1, 0, -1).
        # A source row >= 0 says the token id is not known on the host: it is the token the previous step
        # sampled in that row (`tokens`), read on the device (async decode).
        # two staging areas, used in turn: with async decode the host fills step n+1's while step n's copy to
        # the device may still be queued (step n-1's completion, which the host waits for, frees the other)
        self._host_meta = [torch.zeros(META_ROWS, max_batch, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._host_tables = [torch.zeros(max_batch, self.max_blocks, dtype=torch.long, pin_memory=pin)
                             for _ in range(2)]
        # per staging area and row: (the block-table list last written there, entries written). Tables only
        # grow while a sequence runs (a preempted one gets a new list), so a row needs just its new entries.
        self._written: list[list[tuple[list[int], int] | None]] = [[None] * max_batch for _ in range(2)]
        self._turn = 0
        # on a GPU the SMs read the staging areas through their device addresses (`host_copy`): a copy engine
        # between the step's kernels left the device idle ~15 us a step
        self._meta_views = self._table_views = self._sm_copy = None
        if pin:
            from crosspool.kernels import host_copy  # (triton, imported only on a GPU)
            self._meta_views = [host_copy.host_view(m, device) for m in self._host_meta]
            self._table_views = [host_copy.host_view(t, device) for t in self._host_tables]
            self._sm_copy = host_copy.copy
        self.meta = torch.zeros(META_ROWS, max_batch, dtype=torch.long, device=device)
        self.meta[SLOTS] = -1
        self.meta[SRC_ROWS] = -1
        self.tables = torch.zeros(max_batch, self.max_blocks, dtype=torch.long, device=device)
        self.rows = torch.arange(max_batch, device=device)
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=device)   # greedy tokens of the last step

    def batch(self, bucket: int, context: int | None = None) -> ForwardBatch:
        """A ForwardBatch of views of the buffers, `bucket` rows, for contexts of at most `context` keys (the
        split-KV grid's sizing; default: the model's longest)."""
        return ForwardBatch(
            input_ids=self.meta[IDS, :bucket], positions=self.meta[POSITIONS, :bucket],
            seq_index=self.rows[:bucket], slot_mapping=self.meta[SLOTS, :bucket],
            block_tables=self.tables[:bucket], context_lens=self.meta[CONTEXT_LENS, :bucket],
            logits_index=self.rows[:bucket], cu_seqlens_q=None, max_q_len=1,
            max_context_len=context or self.max_model_len,
        )

    def fill(self, scheduled: list[ScheduledSeq], bucket: int, src_rows: list[int] | None = None) -> None:
        """Write one decode step of the scheduled sequences (one new token each) into rows [0, n) and
        padding into [n, bucket), and queue the copies to the device. src_rows[b] >= 0: sequence b's token
        is the one the previous step sampled in that row, on the device."""
        bs = self.block_size
        ids, positions, slots, lens = [], [], [], []
        src_rows = src_rows or [-1] * len(scheduled)
        turn = self._turn
        meta, host_tables = self._host_meta[turn], self._host_tables[turn]
        written = self._written[turn]
        self._turn ^= 1
        for b, s in enumerate(scheduled):
            seq = s.seq
            pos = seq.num_computed
            table = seq.block_table
            ids.append(seq.token_at(pos) if src_rows[b] < 0 else 0)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            lens.append(pos + 1)
            last = written[b]
            done = last[1] if last is not None and last[0] is table else 0
            if len(table) > done:
                host_tables[b, done: len(table)] = torch.tensor(table[done:], dtype=torch.long)
            written[b] = (table, len(table))
        n = len(scheduled)
        meta[:, :n] = torch.tensor([ids, positions, slots, lens, src_rows], dtype=torch.long)
        meta[:, n:bucket] = 0
        meta[SLOTS, n:bucket] = -1
        meta[SRC_ROWS, n:bucket] = -1
        # contiguous copies (a strided one would stage through pageable memory and sync): all of the
        # metadata (a few KB), whole rows of the tables; columns past a sequence's blocks keep stale entries,
        # which the kernels never read (they stop at context_len)
        if self._sm_copy is not None and n * self.max_blocks * 8 <= HOST_COPY_MAX_BYTES:
            self._sm_copy(self.meta, self._meta_views[turn], self.tables[:n], self._table_views[turn][:n])
        else:
            self.meta.copy_(meta, non_blocking=True)
            self.tables[:n].copy_(host_tables[:n], non_blocking=True)

    @contextmanager
    def padding_only(self, bucket: int) -> Iterator[None]:
        """Rows [0, bucket) as padding while a graph is warmed up and captured (the rows may belong to live
        sequences, whose KV a capture-time run must not touch), and the previous step's tokens kept (a step
        being launched may read them: async decode)."""
        saved, tokens = self.meta[:, :bucket].clone(), self.tokens.clone()
        self.meta[:, :bucket] = 0
        self.meta[SLOTS, :bucket] = -1
        self.meta[SRC_ROWS, :bucket] = -1
        try:
            yield
        finally:
            self.meta[:, :bucket].copy_(saved)
            self.tokens.copy_(tokens)


_capture_streams: dict[tuple[torch.device, object], torch.cuda.Stream] = {}


def capture_stream(device: torch.device, key: object = "default") -> torch.cuda.Stream:
    """The stream graphs of `key` are captured on (a lane, a pipeline side, or "default").

    cuBLAS keeps one workspace per stream, and a captured GEMM keeps the workspace of the stream it was captured
    on: graphs that may replay at the same time (two lanes, the pipeline's two sides) must be captured on
    different streams, or their GEMMs would share one workspace. Each stream's workspace is set up here, outside
    any capture, so it is ordinary memory rather than a part of the first graph's pool (which is freed with it)."""
    k = (device, key)
    if k not in _capture_streams:
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            a = torch.ones(8, 8, device=device)
            torch.nn.functional.linear(a, a, a[0])      # cuBLAS (and cuBLASLt) set up on this stream
            _ = a @ a
        torch.cuda.synchronize(device)
        _capture_streams[k] = stream
    return _capture_streams[k]


def capture(fn: Callable[[], torch.Tensor | None], device: torch.device, pool: object, key: object = "default"
            ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None]:
    """A CUDA graph of fn (run once first, on the capture stream of `key` (`capture_stream`): kernels compile and
    autotune, cuBLAS sets up, outside the capture) and the output tensor the graph writes."""
    stream = capture_stream(device, key)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = fn()
    torch.cuda.synchronize(device)
    return graph, out


class DecodeGraphs:
    """Static buffers + one captured decode step per bucket, for one model."""

    def __init__(self, model: MoEModel, cache: PagedCache, device: torch.device, max_batch: int,
                 max_model_len: int, capture: bool = True, lanes: int = 1) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.capture = capture
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = max_batch
        self.inputs = DecodeInputs(device, max_batch, max_model_len, cache.block_size)
        # (bucket, context class, lane) -> its captured step
        self.steps: dict[tuple[int, int, int], CapturedStep] = {}
        # one memory pool for every lane: a model's passes never run at once (`_done` chains them)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.readback = TokenReadback(device, max_batch)
        self.remote = getattr(model.ffn, "passes", False)     # the FFN runs on the weights ranks
        self.lanes = lanes if self.remote else 1              # lanes its passes may run in (across ranks)
        self._done: torch.cuda.Event | None = None             # after this model's last pass, on its lane
        # benchmarks: a list to receive (lane, start, end) timing events around each pass on its lane's stream
        self.spans: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] | None = None
        self.megakernel = self._megakernel() if MEGAKERNEL != "0" else None

    def _megakernel(self) -> DecodeStep | None:
        """Batch-1 steps as one megakernel launch, where this model and device allow it; else None, and why is
        logged. Built before any graph is captured: the model's weights become views of the megakernel's."""
        from crosspool.kernels.megakernel.plan import BLOCK
        from crosspool.kernels.megakernel.step import DecodeStep, chain_bytes, check_supported

        kv = getattr(self.cache, "buffer", None)
        why = []
        if self.remote:
            why.append("the FFN runs on other ranks")
        if self.device.type != "cuda" or torch.cuda.get_device_capability(self.device) < (9, 0):
            why.append("it needs an sm_90 GPU")
        if kv is None or self.cache.block_size != BLOCK or kv.dtype != torch.bfloat16:
            why.append(f"it needs a bf16 KV cache of {BLOCK}-token blocks")
        try:
            check_supported(self.model.spec)
        except ValueError as e:
            why.append(str(e))
        if not why:
            # the build holds the model's weights twice until each old tensor is freed (`decode_chain`)
            need = chain_bytes(self.model.spec)
            free = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device) \
                - torch.cuda.memory_allocated(self.device)
            if free < need + MEGAKERNEL_SPARE:
                why.append(f"its weight layout needs {(need + MEGAKERNEL_SPARE) / 2**30:.2f} GiB free while it is "
                           f"built, {free / 2**30:.2f} GiB are")
        if why:
            (log.warning if MEGAKERNEL == "1" else log.info)(
                "%s: batch-1 steps keep the graph of kernels, not the megakernel: %s", self.model.spec.architecture,
                "; ".join(why))
            return None
        t0 = time.perf_counter()
        step = DecodeStep(self.model.spec, self.model.attention.w, self.model.ffn.w, kv,
                          self.inputs.meta[CONTEXT_LENS, :1], self.inputs.tables[0], warps=MEGAKERNEL_WARPS,
                          dynamic=MEGAKERNEL_DYNAMIC >= 1, dynamic_sums=MEGAKERNEL_DYNAMIC >= 2,
                          lean_release=MEGAKERNEL_LEAN == 1, prefer_l1=MEGAKERNEL_L1 == 1)
        torch.cuda.empty_cache()       # the old weights' memory back to the device, where the KV pool maps pages
        log.info("%s: batch-1 steps run as one megakernel (weights laid out in %.1f s; its first launch, at the "
                 "graphs' capture, compiles it unless Triton's cache has it)", self.model.spec.architecture,
                 time.perf_counter() - t0)
        return step

    def _ffn_calls(self, lane: int, rehearse: bool = False) -> AbstractContextManager[None]:
        """Across pool ranks: the FFN calls of a whole pass (no header each; see `RemoteFFN.pass_calls`)."""
        return self.model.ffn.pass_calls(rehearse, lane) if self.remote else nullcontext()

    @contextmanager
    def _on_lane(self, lane: int) -> Iterator[None]:
        """Queue the work inside on the lane's stream, after what the current stream holds (eager steps) and
        after this model's previous pass (maybe in the other lane); without lane streams, in place."""
        stream = self.model.ffn.exchange.lane_stream(lane) if self.remote else None
        if stream is None:
            yield
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))
        if self._done is not None:
            stream.wait_event(self._done)
        with torch.cuda.stream(stream):
            timed = self.spans is not None
            start = torch.cuda.Event(enable_timing=True) if timed else None
            if start is not None:
                start.record()               # when the lane reaches the pass (its waits are met)
            yield
            self._done = torch.cuda.Event(enable_timing=timed)
            self._done.record()
            if start is not None and self.spans is not None:
                self.spans.append((lane, start, self._done))

    def release(self) -> None:
        """Destroy the captured graphs now (across ranks they hold NCCL resources the world's teardown waits
        for, whoever still refers to this object)."""
        for step in self.steps.values():
            if step.graph is not None:
                step.graph.reset()
        self.steps.clear()
        self._done = None

    def bucket(self, batch_size: int) -> int | None:
        """The bucket a decode batch of this size replays, None if it is too large for graphs."""
        return bucket_for(self.buckets, batch_size)

    def capture_all(self) -> tuple[dict[int, float], int]:
        """Capture every bucket (in every lane) now, largest first (so smaller ones reuse its memory).
        Returns ({bucket: capture seconds, lanes summed}, device bytes the graphs' memory pool grew by)."""
        def reserved() -> int:
            # cached free blocks released first, both times: what stays reserved is memory in use, and the
            # graphs' private pool, which empty_cache cannot release while they live (a capture may release
            # cached blocks of its own, which made the difference negative without this)
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            return torch.cuda.memory_reserved(self.device)

        before = reserved() if self.capture else 0
        for b in reversed(self.buckets):
            for context in self.inputs.classes:
                for lane in range(self.lanes):
                    self._step(b, context, lane)
        grown = reserved() - before if self.capture else 0
        seconds: dict[int, float] = {}
        for (b, _, _), s in sorted(self.steps.items()):
            seconds[b] = seconds.get(b, 0.0) + s.capture_s
        return seconds, grown

    def run(self, scheduled: list[ScheduledSeq], src_rows: list[int] | None = None, lane: int = 0) -> torch.Tensor:
        """Logits [B, vocab] (fp32) of one decode step of the B scheduled sequences (one new token each).
        Each replay also leaves the rows' greedy tokens in `inputs.tokens` (see `launch`). Across ranks the
        pass runs in `lane`, and the current stream waits for it (the logits are read there)."""
        with self._on_lane(lane):
            logits = self._queue(scheduled, src_rows, lane)
        if self.remote and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_event(self._done)
        return logits

    def launch(self, scheduled: list[ScheduledSeq], src_rows: list[int], lane: int = 0) -> LaunchedStep:
        """Queue a greedy decode step (across ranks: in `lane`) and the copy of its tokens to the host; return
        without waiting."""
        with self._on_lane(lane):
            self._queue(scheduled, src_rows, lane)
            return self.readback.queue(scheduled, self.inputs.tokens)

    def _queue(self, scheduled: list[ScheduledSeq], src_rows: list[int] | None, lane: int) -> torch.Tensor:
        n = len(scheduled)
        bucket = self.bucket(n)
        if bucket is None:
            raise ValueError(f"decode batch of {n} exceeds the largest graph bucket {self.max_batch}")
        lane = lane if self.remote else 0
        self.inputs.fill(scheduled, bucket, src_rows)
        step = self._step(bucket, context_class(self.inputs.classes, longest_context(scheduled)), lane)
        if self.remote:
            self.model.ffn.begin_pass(bucket, lane)     # the weights ranks replay their graph of this pass
        if step.graph is not None:
            step.graph.replay()
            logits = step.logits
        else:
            with self._ffn_calls(lane):
                logits = self._forward(step.batch)
        return logits[:n]

    # ---- capture ---------------------------------------------------------------------------------
    def _step(self, bucket: int, context: int, lane: int = 0) -> CapturedStep:
        step = self.steps.get((bucket, context, lane))
        if step is not None:
            return step
        batch = self.inputs.batch(bucket, context)
        t0 = time.perf_counter()
        graph = logits = None
        if self.capture:
            # across ranks the run before the capture sends nothing (no weights rank expects it)
            with self.inputs.padding_only(bucket), self._ffn_calls(lane, rehearse=True):
                # lanes replay at once: each captures on its own stream (`capture_stream`)
                graph, logits = capture(lambda: self._forward(batch), self.device, self.pool,
                                        ("lane", lane) if self.remote else "default")
        step = CapturedStep(graph, batch, logits, time.perf_counter() - t0)
        self.steps[bucket, context, lane] = step
        return step

    @torch.inference_mode()
    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        rows = batch.input_ids.shape[0]
        if rows == 1 and self.megakernel is not None:
            # one launch: it reads the step's context length and block table from `inputs`, where the batch's
            # are, and the RoPE tables from where the embedding kernel writes them
            x, _ = embed_inputs(self.model, self.inputs, batch, self.megakernel.cos, self.megakernel.sin)
            logits = self.megakernel.run(x[0])
            self.model.attention.greedy_tokens(logits, out=self.inputs.tokens[:rows])
            return logits
        if FUSED_ENDS:
            logits = self.model.forward_logits(batch, self.cache, embed_inputs(self.model, self.inputs, batch))
            self.model.attention.greedy_tokens(logits, out=self.inputs.tokens[:rows])
            return logits
        tokens = self.inputs.tokens
        ids = feed_ids(batch.input_ids, self.inputs.meta[SRC_ROWS, :rows], tokens)
        logits = self.model.compute_logits(self.model.forward(dataclasses.replace(batch, input_ids=ids), self.cache))
        tokens[:rows].copy_(self.model.attention.greedy_tokens(logits))
        return logits
