"""Weights pool: every model's FFN side (routers, experts, shared experts, dense MLPs) in one place.

In one process it holds full weights; on a weights-pool rank it holds that rank's slice of every
intermediate dimension (tensor parallel), and the partial outputs of all ranks sum to the FFN output.
It runs the FFN of (model, layer, hidden states) for any model it holds; it never sees KV or requests.
"""

from __future__ import annotations

import os

import torch

from crosspool.models.ffn_side import FFNSide
from crosspool.models.loader import Shard, load_ffn_weights, load_spec
from crosspool.models.spec import ModelSpec
from crosspool.pools.ffn_graphs import FFNGraphs


class WeightsPool:
    def __init__(self, device: torch.device | str, dtype: torch.dtype, shard: Shard | None = None,
                 kernels: str = "torch") -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.shard = shard or Shard()
        self.kernels = kernels
        self.models: dict[str, FFNSide] = {}
        self.graphs: dict[str, FFNGraphs] = {}     # decode-sized FFN calls as graph replays (weights ranks)

    def load(self, name: str, model_dir: str | os.PathLike[str], spec: ModelSpec | None = None) -> FFNSide:
        if name in self.models:
            raise ValueError(f"model {name!r} is already in the weights pool")
        spec = spec or load_spec(model_dir)
        side = FFNSide(spec, load_ffn_weights(model_dir, spec, self.dtype, self.device, self.shard), self.kernels)
        self.models[name] = side
        return side

    def add_graphs(self, name: str, max_batch: int) -> FFNGraphs:
        """Serve `name`'s decode-sized calls (one row per sequence, padded to a bucket) from FFN graphs,
        captured now on a GPU; on CPU the same static buffers run eagerly."""
        graphs = FFNGraphs(self.models[name], self.dtype, self.device, max_batch, self.device.type == "cuda")
        graphs.capture_all()
        self.graphs[name] = graphs
        return graphs

    def remove(self, name: str) -> None:
        del self.models[name]
        self.graphs.pop(name, None)

    def ffn(self, name: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        graphs = self.graphs.get(name)
        if graphs is not None and graphs.fits(x.shape[0]):
            return graphs.run(layer, x)
        return self.models[name].forward(layer, x)

    def model_bytes(self, name: str) -> int:
        return sum(t.numel() * t.element_size() for layer in self.models[name].w.layers for t in layer.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.model_bytes(n) for n in self.models)
