"""Pool layout: where this process's pools live, built from the engine config.

- one device (or CPU), no exchange: both pools in this process; the FFN hand-off is a plain call;
- a KV rank of a distributed world (`exchange` given): the KV pool is here and every FFN goes to the
  weights ranks through `crosspool.pools.transport`.
"""

from __future__ import annotations

import os

import torch

from crosspool.config import EngineConfig
from crosspool.models.model import FFN
from crosspool.models.spec import ModelSpec
from crosspool.pools.kv_pool import CpuPageBackend, KVPool
from crosspool.pools.transport import Exchange, RemoteFFN
from crosspool.pools.weights_pool import WeightsPool

CPU_KV_BYTES = 1 << 30
GPU_KV_FRACTION = 0.85


class PoolLayout:
    def __init__(self, config: EngineConfig, exchange: Exchange | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.exchange = exchange
        self.weights = None if exchange is not None else WeightsPool(self.device, config.dtype,
                                                                    kernels=config.kernels)

    def load_ffn(self, name: str, model_dir: str | os.PathLike[str], spec: ModelSpec) -> FFN:
        if self.exchange is not None:
            # the weights ranks load their shards of the same models, in the same order
            self.exchange.hidden_sizes.append(spec.hidden_size)
            return RemoteFFN(self.exchange, len(self.exchange.hidden_sizes) - 1, spec)
        return self.weights.load(name, model_dir, spec)

    def build_kv_pool(self) -> KVPool:
        """The KV pool gets the configured budget, or what memory is left once weights are loaded."""
        budget = self.config.kv_cache_bytes
        if self.device.type == "cuda":
            from crosspool.pools.vmm import CudaPageBackend

            if budget is None:
                budget = int(torch.cuda.mem_get_info(self.device)[0] * GPU_KV_FRACTION)
            return KVPool(budget, CudaPageBackend(self.device))
        return KVPool(budget or CPU_KV_BYTES, CpuPageBackend())
