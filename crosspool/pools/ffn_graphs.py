"""CUDA graphs of a model's FFN sub-steps on a weights rank.

Across pool ranks the KV rank replays its attention sub-steps as graphs (`engine.substeps`) and sends each
layer's hidden states padded to the graph bucket, so a decode step arrives here as `bucket` rows. Each
(layer, bucket) FFN is one graph over a static input buffer: the received rows are copied in, the graph
replays, and the output is copied out to a fresh tensor (it is sent while the next layer's graph may
already write the static output). Other token counts (prefill, mixed steps) run eagerly.
`capture=False` (CPU) runs the same functions on the same buffers without graphs.
"""

from __future__ import annotations

import torch

from crosspool.engine.graphs import buckets_up_to, capture
from crosspool.models.ffn_side import FFNSide


class FFNGraphs:
    def __init__(self, ffn: FFNSide, dtype: torch.dtype, device: torch.device, max_batch: int,
                 capture: bool = True) -> None:
        self.ffn = ffn
        self.device = device
        self.capture = capture
        self.buckets = buckets_up_to(max_batch)
        self.x = torch.zeros(max_batch, ffn.spec.hidden_size, dtype=dtype, device=device)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def fits(self, tokens: int) -> bool:
        return tokens in self.buckets

    def capture_all(self) -> int:
        """Capture every (layer, bucket) now, largest bucket first; returns how many graphs were captured."""
        if self.capture:
            for bucket in reversed(self.buckets):
                for layer in range(self.ffn.spec.num_layers):
                    self._ensure(layer, bucket)
        return len(self.graphs)

    def _fn(self, layer: int, bucket: int):  # noqa: ANN202
        @torch.inference_mode()
        def ffn() -> torch.Tensor:
            return self.ffn.forward(layer, self.x[:bucket])
        return ffn

    def _ensure(self, layer: int, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if (layer, bucket) not in self.graphs:
            graph, out = capture(self._fn(layer, bucket), self.device, self.pool)
            assert out is not None
            self.graphs[layer, bucket] = graph, out
        return self.graphs[layer, bucket]

    def run(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The FFN of x (`fits(len(x))` rows) through the static buffers."""
        tokens = x.shape[0]
        self.x[:tokens].copy_(x)
        if not self.capture:
            return self._fn(layer, tokens)()
        graph, out = self._ensure(layer, tokens)
        graph.replay()
        return out.clone()
