"""Paged KV storage of one model: a block-major tensor whose per-layer views attention reads.

Layout [num_blocks, num_layers, n, block_size, heads, dim] keeps one block of every layer's K and V
contiguous, so growing a model by a range of blocks touches one contiguous byte range: the "page
bundle" the KV virtualizer maps. MHA caches K and V (n=2) per kv head; MLA caches one latent (n=1).
"""

from __future__ import annotations

import torch

from crosspool.models.spec import ModelSpec


class PagedKVCache:
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        n, heads, dim = spec.kv_cache_entries
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.buffer = torch.zeros(num_blocks, spec.num_layers, n, block_size, heads, dim, dtype=dtype,
                                  device=device)

    def layer(self, layer: int) -> list[torch.Tensor]:
        """[K, V] (MHA) or [latent] (MLA) views of shape [num_blocks, block_size, heads, dim]."""
        return list(self.buffer[:, layer].unbind(1))

    @staticmethod
    def block_bytes(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
        return spec.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * block_size
