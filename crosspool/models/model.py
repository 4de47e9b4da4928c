"""One served model: its attention side and FFN side, run layer by layer over a ForwardBatch.

`forward` is the single-device composition (the hand-off between the sides is a plain call); the
pools and the pipeline scheduler drive the two sides separately.
"""

from __future__ import annotations

import os

import torch

from crosspool.models.attention_side import AttentionSide
from crosspool.models.batch import ForwardBatch
from crosspool.models.ffn_side import FFNSide
from crosspool.models.loader import load_checkpoint
from crosspool.models.spec import ModelSpec
from crosspool.pools.kv_cache import PagedKVCache


class MoEModel:
    def __init__(self, spec: ModelSpec, attention: AttentionSide, ffn: FFNSide) -> None:
        self.spec = spec
        self.attention = attention
        self.ffn = ffn

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str], dtype: torch.dtype, device: torch.device | str) -> MoEModel:
        spec, attn_w, ffn_w = load_checkpoint(model_dir, dtype, device)
        return cls(spec, AttentionSide(spec, attn_w), FFNSide(spec, ffn_w))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
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
