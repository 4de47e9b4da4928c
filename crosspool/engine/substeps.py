"""CUDA graphs of a decode step's sub-steps: the units the pipeline scheduler orders.

`MoEModel.forward_stages` cuts a step into attention(0) (with the embedding), FFN(0), attention(1), ...,
FFN(L-1) and the head (final residual add + lm_head). Here each of those is one CUDA graph per (model,
batch bucket, context class (`graphs.context_classes`), slot), so the pipeline can replay attention(A, l) on
the attention side's stream while FFN(B, l) replays on the FFN side's, with one host launch per sub-step
instead of a dozen kernels' worth.

A slot is one set of static buffers: the step's metadata (`graphs.DecodeInputs`), the residual stream
`hidden`, the FFN input `x`, the FFN output `ffn` (each [max_batch, hidden]) and the RoPE tables. The
pipeline runs up to two batches of one model in a step (two micro-batches), so each model has two slots. A
sub-step reads and writes only its slot's buffers, so the sub-steps of one batch must run in order (the
pipeline's events do that) and two slots never share memory. Graphs of one (slot, side) share a memory pool:
they replay on one stream, one after another.

All graphs of a (slot, bucket) are captured together, before the slot's buffers hold a step (a capture runs
the sub-steps on padding rows and overwrites them). `capture=False` runs the same functions eagerly (CPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from crosspool.engine.graphs import (
    DecodeInputs,
    LaunchedStep,
    TokenReadback,
    bucket_for,
    buckets_up_to,
    capture,
    context_class,
    embed_inputs,
    longest_context,
)
from crosspool.engine.scheduler import ScheduledSeq
from crosspool.models.batch import PagedCache
from crosspool.models.model import ATTENTION_SIDE, FFN_SIDE, MoEModel, Stages, SubStep, run_stages

HEAD = "head"


@dataclass(slots=True)
class _Slot:
    inputs: DecodeInputs
    hidden: torch.Tensor
    x: torch.Tensor
    ffn: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    pools: dict[str, object] = field(default_factory=dict)    # side -> graph memory pool


class SubStepGraphs:
    def __init__(self, model: MoEModel, cache: PagedCache, device: torch.device, max_batch: int,
                 max_model_len: int, capture: bool = True, slots: int = 2) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.capture = capture
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = max_batch
        spec = model.spec
        dtype = model.attention.w.embed.dtype
        cos, _ = model.attention.rope_tables(torch.zeros(1, dtype=torch.long, device=device))
        self.slots = []
        for _ in range(slots):
            def buf() -> torch.Tensor:
                return torch.zeros(max_batch, spec.hidden_size, dtype=dtype, device=device)

            rope = torch.zeros(max_batch, cos.shape[-1], dtype=cos.dtype, device=device)
            pools = {side: torch.cuda.graph_pool_handle() for side in (ATTENTION_SIDE, FFN_SIDE)} if capture else {}
            self.slots.append(_Slot(DecodeInputs(device, max_batch, max_model_len, cache.block_size),
                                    buf(), buf(), buf(), rope, rope.clone(), pools))
        # (slot, bucket, context class, kind, layer) -> (graph or None, output); classes as `DecodeGraphs`'
        self.graphs: dict[tuple[int, int, int, str, int],
                          tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self.capture_s: dict[tuple[int, int, int], float] = {}
        # across pool ranks the FFN runs on the weights ranks (`RemoteFFN`): only the attention side and the
        # head are graphs here; the FFN sub-step sends the bucket's rows and the next attention sub-step copies
        # the output into the slot before its graph replays
        self.remote = hasattr(model.ffn, "forward_start")
        self.readback = TokenReadback(device, max_batch)

    def capture_all(self) -> float:
        """Capture every (slot, bucket, context class) now, largest bucket first; returns the seconds it took."""
        for slot in range(len(self.slots)):
            for bucket in reversed(self.buckets):
                for context in self.slots[slot].inputs.classes:
                    self._ensure_captured(slot, bucket, context)
        return sum(self.capture_s.values())

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.max_batch

    def release(self) -> None:
        """Destroy the captured graphs now (see `DecodeGraphs.release`)."""
        for graph, _ in self.graphs.values():
            if graph is not None:
                graph.reset()
        self.graphs.clear()

    def launch(self, scheduled: list[ScheduledSeq], src_rows: list[int]) -> LaunchedStep:
        """Async decode with the sub-steps of slot 0 (across pool ranks, where there is no whole-step graph):
        queue the greedy step, its sub-steps back to back, and the copy of its tokens; return without waiting.
        src_rows as in `DecodeInputs.fill`: rows fed the previous launched step's tokens on the device."""
        run_stages(self.stages(0, scheduled, src_rows, announce=True))
        return self.readback.queue(scheduled, self.slots[0].inputs.tokens)

    def stages(self, slot: int, scheduled: list[ScheduledSeq], src_rows: list[int] | None = None,
               announce: bool = False) -> Stages:
        """A decode step of the scheduled sequences (one new token each) as sub-steps, like
        `MoEModel.forward_stages`; returns the logits [n, vocab] (the head also leaves each row's greedy token
        in the slot's `inputs.tokens`). announce: as in `MoEModel.forward_stages` (a pass run on its own)."""
        n = len(scheduled)
        bucket = bucket_for(self.buckets, n)
        if bucket is None:
            raise ValueError(f"decode batch of {n} exceeds the largest graph bucket {self.max_batch}")
        context = context_class(self.slots[slot].inputs.classes, longest_context(scheduled))
        self._ensure_captured(slot, bucket, context)
        s = self.slots[slot]
        s.inputs.fill(scheduled, bucket, src_rows)
        yield SubStep(ATTENTION_SIDE, 0, None, bucket)
        if announce and self.remote:
            self.model.ffn.announce(bucket)
        pending = None
        for layer in range(self.model.spec.num_layers):
            if pending is not None:
                s.ffn[:bucket].copy_(pending.result())
            self._replay(slot, bucket, context, ATTENTION_SIDE, layer)
            yield SubStep(FFN_SIDE, layer, s.x[:bucket])
            if self.remote:    # padding rows go too: the weights ranks replay their graph of this bucket
                pending = self.model.ffn.forward_start(layer, s.x[:bucket])
                yield SubStep(ATTENTION_SIDE, layer + 1, None)
            else:
                self._replay(slot, bucket, context, FFN_SIDE, layer)
                yield SubStep(ATTENTION_SIDE, layer + 1, s.ffn[:bucket])
        if pending is not None:
            s.ffn[:bucket].copy_(pending.result())
        logits = self._replay(slot, bucket, context, HEAD, self.model.spec.num_layers)
        assert logits is not None
        return logits[:n]

    # ---- the sub-steps -------------------------------------------------------------------------------
    def _fn(self, slot: int, bucket: int, context: int, kind: str, layer: int) -> Callable[[], torch.Tensor | None]:
        s = self.slots[slot]
        model, b = self.model, bucket
        batch = s.inputs.batch(bucket, context)

        @torch.inference_mode()
        def attention() -> None:
            if layer == 0:
                hidden, _ = embed_inputs(model, s.inputs, batch, s.cos, s.sin)
                delta = None
            else:
                hidden, delta = s.hidden[:b], s.ffn[:b]
            hidden, x = model.attention.attention_block(layer, hidden, delta, batch, self.cache,
                                                        (s.cos[:b], s.sin[:b]))
            s.hidden[:b].copy_(hidden)
            s.x[:b].copy_(x)

        @torch.inference_mode()
        def ffn() -> None:
            s.ffn[:b].copy_(model.ffn.forward(layer, s.x[:b]))

        @torch.inference_mode()
        def head() -> torch.Tensor:
            logits = model.attention.head(model.attention.final_norm(s.ffn[:b], s.hidden[:b]))
            model.attention.greedy_tokens(logits, out=s.inputs.tokens[:b])
            return logits

        return {ATTENTION_SIDE: attention, FFN_SIDE: ffn, HEAD: head}[kind]

    def _replay(self, slot: int, bucket: int, context: int, kind: str, layer: int) -> torch.Tensor | None:
        graph, out = self.graphs[slot, bucket, context, kind, layer]
        if graph is None:
            return self._fn(slot, bucket, context, kind, layer)()
        graph.replay()
        return out

    def _ensure_captured(self, slot: int, bucket: int, context: int) -> None:
        if (slot, bucket, context, HEAD, self.model.spec.num_layers) in self.graphs:
            return
        t0 = time.perf_counter()
        s = self.slots[slot]
        sides = (ATTENTION_SIDE,) if self.remote else (ATTENTION_SIDE, FFN_SIDE)
        kinds = [(k, layer) for layer in range(self.model.spec.num_layers) for k in sides]
        kinds.append((HEAD, self.model.spec.num_layers))
        with s.inputs.padding_only(bucket):
            for kind, layer in kinds:
                fn = self._fn(slot, bucket, context, kind, layer)
                if self.capture:
                    side = FFN_SIDE if kind == FFN_SIDE else ATTENTION_SIDE
                    # the two sides replay at once: each captures on its own stream (`capture_stream`)
                    self.graphs[slot, bucket, context, kind, layer] = capture(fn, self.device, s.pools[side],
                                                                             ("side", side))
                else:
                    self.graphs[slot, bucket, context, kind, layer] = (None, None)
        self.capture_s[slot, bucket, context] = time.perf_counter() - t0
