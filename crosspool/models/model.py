"""One served model as the KV-cache pool sees it: its attention side plus a handle to its FFN.

`forward` runs layer by layer: attention (and the residual stream) here, the FFN wherever the weights
pool is — a plain call on one device, a transport round trip across ranks (there the FFN sub-step only sends
the hidden states, and the next attention sub-step of the batch reads the output, so whoever drives the
sub-steps can run another batch's attention while the weights ranks compute). `forward_stages` is the same
computation cut into sub-steps (one attention, one FFN per layer) so the pipeline scheduler can drive
the two sides of several batches in its own order; `forward` just runs those sub-steps back to back.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass
from typing import Protocol

import torch

from crosspool.models.attention_side import AttentionSide
from crosspool.models.batch import ForwardBatch, PagedCache, PendingNorm, TopKPartials, reduced
from crosspool.models.ffn_side import FFNSide
from crosspool.models.loader import load_checkpoint
from crosspool.models.spec import ModelSpec

ATTENTION_SIDE, FFN_SIDE = "attention", "ffn"


class FFN(Protocol):
    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...
    # optional (`pools.transport.RemoteFFN`): forward_start(layer, x) -> object with .result() -> Tensor, and
    # announce(rows): the next num_layers calls are this pass's, with `rows` rows each


@dataclass(frozen=True, slots=True)
class SubStep:
    """The sub-step the next resume of `forward_stages` runs. `handoff` is the one [tokens, hidden] tensor
    it takes from the other side (None for the first), so whoever drives the sides can order that hand-off
    (an FFN output may come as its unsummed expert rows, `TopKPartials`, which has `record_stream` too)."""

    side: str                      # ATTENTION_SIDE | FFN_SIDE
    layer: int                     # on the attention side, num_layers means the final residual add
    handoff: torch.Tensor | TopKPartials | None
    rows: int = 0                  # the first sub-step: rows of every FFN call of the pass (padding included)


Stages = Generator[SubStep, None, torch.Tensor]


def run_stages(stages: Stages) -> torch.Tensor:
    """Run every sub-step in order; the final hidden states."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value


class MoEModel:
    def __init__(self, spec: ModelSpec, attention: AttentionSide, ffn: FFN) -> None:
        self.spec = spec
        self.attention = attention
        self.ffn = ffn

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str], dtype: torch.dtype, device: torch.device | str,
             kernels: str = "torch") -> MoEModel:
        """Both sides on one device, FFN in-process (tests, benchmarks, tools)."""
        spec, attn_w, ffn_w = load_checkpoint(model_dir, dtype, device)
        return cls(spec, AttentionSide(spec, attn_w, kernels), FFNSide(spec, ffn_w, kernels))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: PagedCache) -> torch.Tensor:
        """Final hidden states (before the final norm) of every token in the batch."""
        return run_stages(self.forward_stages(batch, cache, announce=True))

    @torch.inference_mode()
    def forward_stages(self, batch: ForwardBatch, cache: PagedCache, announce: bool = False,
                       first: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None,
                       final_norm: bool = False, defer_norm: bool = False) -> Stages:
        """`forward` as a generator of sub-steps: it yields the SubStep it will run next and runs it on the
        following resume, so nothing runs until the first resume after the first yield. Sides alternate:
        attention(0) [with the embedding], FFN(0), attention(1) [with the residual add of FFN(0)], ...,
        FFN(L-1), then the final residual add (attention side, layer L), whose result is returned.
        announce: an FFN on other ranks is told this pass's calls up front (`RemoteFFN.announce`), as a pass run
        on its own does; the pipeline, which interleaves passes, announces their calls in its own order.
        first: the embedding rows and RoPE tables, already computed (else from batch.input_ids / positions);
        final_norm: return the final norm of the last residual add instead (one kernel on the Triton path);
        defer_norm: hand the FFN each post-attention add + norm still to run (`PendingNorm`; an FFN in this
        process that `takes_pending_norm`), for its router GEMV to run."""
        rows = batch.input_ids.shape[0]
        yield SubStep(ATTENTION_SIDE, 0, None, rows)
        if announce and hasattr(self.ffn, "announce"):
            self.ffn.announce(rows)
        if first is None:
            hidden, rope = self.attention.embed(batch.input_ids), self.attention.rope_tables(batch.positions)
        else:
            hidden, rope = first
        ffn_out: torch.Tensor | TopKPartials | None = None
        start = getattr(self.ffn, "forward_start", None)      # an FFN on other ranks: issue now, read later
        # in process, the FFN may hand over its expert rows unsummed (the attention side's add + norm sums them)
        forward = getattr(self.ffn, "forward_partial", self.ffn.forward)
        pending = None
        defer = defer_norm and start is None and getattr(self.ffn, "takes_pending_norm", lambda: False)()
        for layer in range(self.spec.num_layers):
            if pending is not None:
                ffn_out = pending.result()
            hidden, x = self.attention.attention_block(layer, hidden, ffn_out, batch, cache, rope, defer)
            yield SubStep(FFN_SIDE, layer, x)
            if start is not None:
                pending = start(layer, x)
                yield SubStep(ATTENTION_SIDE, layer + 1, None)
            else:
                ffn_out = forward(layer, x)
                if isinstance(x, PendingNorm):      # the FFN ran the post-attention add: its sum goes on
                    assert x.h is not None
                    hidden = x.h
                yield SubStep(ATTENTION_SIDE, layer + 1, ffn_out)
        if pending is not None:
            ffn_out = pending.result()
        if final_norm:
            return self.attention.final_norm(ffn_out, hidden)
        return hidden + reduced(ffn_out)

    @torch.inference_mode()
    def forward_logits(self, batch: ForwardBatch, cache: PagedCache,
                       first: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """`compute_logits(forward(batch, cache))` for a batch whose every row wants logits (decode), with the
        last residual add folded into the final norm, and each post-attention norm inside the router GEMV when
        the FFN takes it (`FFNSide.takes_pending_norm`); `first`: the embedding rows and RoPE tables, already
        computed (`AttentionSide.embed_step`)."""
        stages = self.forward_stages(batch, cache, True, first, final_norm=True, defer_norm=True)
        return self.attention.head(run_stages(stages))

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.attention.logits(hidden)
