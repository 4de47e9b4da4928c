"""ForwardBatch: the flat, per-token description of one model step that both pool sides read; TopKPartials:
an FFN output handed to the attention side before its top-k sum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class PagedCache(Protocol):
    """A model's paged KV storage as attention sees it (the KV pool's per-model range)."""

    block_size: int

    def layer(self, layer: int) -> list[torch.Tensor]:
        """[K, V] (MHA) or [latent] (MLA) views of shape [num_blocks, block_size, heads, dim]."""
        ...


@dataclass(slots=True)
class ForwardBatch:
    """Tokens of several sequences of ONE model, flattened. Sequence b owns the tokens whose
    `seq_index` is b; its KV lives in the blocks `block_tables[b]` (padded with 0 past its end)."""

    input_ids: torch.Tensor      # [T] int64
    positions: torch.Tensor      # [T] int64, absolute position of each token in its sequence
    seq_index: torch.Tensor      # [T] int64
    slot_mapping: torch.Tensor   # [T] int64, flat KV slot (block * block_size + offset) of each token
    block_tables: torch.Tensor   # [B, max_blocks] int64
    context_lens: torch.Tensor   # [B] int64, tokens in the cache after this step
    logits_index: torch.Tensor   # [N] int64, token rows whose next-token logits are wanted
    cu_seqlens_q: torch.Tensor | None = None   # [B+1] int32, start row of each sequence's tokens (kernels)
    max_q_len: int = 0           # most new tokens of one sequence in this batch
    max_context_len: int = 0     # most cached tokens of one sequence after this step

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def decode_only(self) -> bool:
        """Every sequence contributes exactly one new token."""
        return self.max_q_len == 1


@dataclass(slots=True)
class PendingNorm:
    """An attention block's post-attention residual add + RMSNorm, left to the FFN side, whose router GEMV can run
    it (`gemv.norm_gemv_parts`): x = rms_norm(residual + delta) * weight for the FFN, h = residual + delta for the
    next layer. `h` is set once it has run (`resolve`, or the FFN's fused router)."""

    delta: torch.Tensor
    residual: torch.Tensor
    weight: torch.Tensor
    eps: float
    h: torch.Tensor | None = None

    def resolve(self) -> torch.Tensor:
        """Run it on its own (the Triton add + norm kernel); returns x."""
        from crosspool.kernels import norm_rope

        x, self.h = norm_rope.add_rms_norm(self.delta, self.residual, self.weight, self.eps)
        return x


@dataclass(frozen=True, slots=True)
class TopKPartials:
    """A fused-MoE output before its top-k sum: row t * top_k + k of `y` [T * top_k, H] is token t's k-th routed
    expert output, already weighted. In one process the attention side adds these rows inside its residual
    add + RMSNorm (one kernel fewer per layer); `reduce` gives the [T, H] sum in `dtype` (what the fused MoE
    returns otherwise: the same fp32 sum in the same order, rounded once)."""

    y: torch.Tensor
    top_k: int
    dtype: torch.dtype

    def reduce(self) -> torch.Tensor:
        from crosspool.kernels.fused_moe import topk_sum

        return topk_sum(self.y, self.top_k, self.dtype)

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Keep the rows' memory for `stream` (the pipeline hands FFN outputs between the sides' streams)."""
        self.y.record_stream(stream)


def reduced(delta: torch.Tensor | TopKPartials) -> torch.Tensor:
    return delta.reduce() if isinstance(delta, TopKPartials) else delta
