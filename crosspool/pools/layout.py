"""Pool layout: where the KV-cache pool and the weights pool live, built from the engine config.

- one device (or CPU): both pools in this process; the FFN hand-off is a plain call;
- weights ranks (`weights_ranks > 0`): FFN weights sharded over separate processes, reached through
  `crosspool.pools.transport` (gloo on CPU, NCCL on GPUs); this process is the KV rank.
"""

from __future__ import annotations

import os

import torch

from crosspool.config import EngineConfig
from crosspool.models.model import FFN
from crosspool.models.spec import ModelSpec
from crosspool.pools.kv_pool import CpuPageBackend, KVPool
from crosspool.pools.weights_pool import WeightsPool

CPU_KV_BYTES = 1 << 30
GPU_KV_FRACTION = 0.85


class PoolLayout:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.remote = None
        if config.weights_ranks:
            from crosspool.pools.transport import RemoteWeightsPool

            self.remote = RemoteWeightsPool(config)
            self.weights = None
        else:
            self.weights = WeightsPool(self.device, config.dtype)

    def load_ffn(self, name: str, model_dir: str | os.PathLike[str], spec: ModelSpec) -> FFN:
        if self.remote is not None:
            return self.remote.load(name, model_dir, spec)
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

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
