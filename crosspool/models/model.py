"""One served model as the KV-cache pool sees it: its attention side plus a handle to its FFN.

`forward` runs layer by layer: attention (and the residual stream) here, the FFN wherever the weights
pool is — a plain call on one device, a transport round trip across ranks. The pipeline scheduler
drives the two sides separately.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from crosspool.models.attention_side import AttentionSide
from crosspool.models.batch import ForwardBatch, PagedCache
from crosspool.models.ffn_side import FFNSide
from crosspool.models.loader import load_checkpoint
from crosspool.models.spec import ModelSpec


class FFN(Protocol):
    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...


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
        hidden = self.attention.embed(batch.input_ids)
        rope = self.attention.rope_tables(batch.positions)
        for layer in range(self.spec.num_layers):
            hidden, x = self.attention.attention_block(layer, hidden, batch, cache, rope)
            hidden = hidden + self.ffn.forward(layer, x)
        return hidden

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.attention.logits(hidden)
