"""Engine configuration: one dataclass, validated on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class EngineConfig:
    device: str = "cpu"
    dtype: torch.dtype | None = None          # default: fp32 on CPU, bf16 on GPU
    block_size: int = 16                      # tokens per KV block
    kv_cache_bytes: int | None = None         # KV budget over all models (default: see Engine)
    num_kv_blocks: int | None = None          # per-model block count override (tests force preemption)
    kv_caps_bytes: dict[str, int] | None = None   # most KV bytes each named model may hold (a plan's caps)
    max_num_seqs: int = 64                    # running sequences per model
    max_num_batched_tokens: int = 2048        # tokens per model step (prefill chunks + decodes)
    enable_chunked_prefill: bool = True
    max_model_len: int | None = None          # default: the model's max_position_embeddings
    kv_devices: tuple[str, ...] = ()          # >1: KV-pool ranks, data-parallel over requests (first = device)
    weights_ranks: int = 0                    # >0: FFN weights sharded over this many worker processes
    weights_devices: tuple[str, ...] = ()     # one per weights rank (default: the engine's device type)
    kv_background_maintenance: bool | None = None   # map/unmap KV pages on a thread (default: on GPU)
    kernels: str | None = None                # "torch" reference ops | "triton" (default: triton on GPU)
    cuda_graphs: bool | None = None           # decode steps as CUDA graph replays (default: on with GPU + triton)
    # greedy decode steps with graphs: launch step n+1 (its tokens fed on the device) before reading step n's
    async_decode: bool = True
    # layer-wise pipeline (crosspool.engine.pipeline): interleave attention and FFN sub-steps of two batches;
    # across pool ranks (KV rank 0's schedule) the FFN sub-step sends and the next attention sub-step reads back
    pipeline: bool = False
    tbt_target_s: float = 0.1                 # per-model TBT target; the pipeline serves the least slack first
    tbt_targets_s: dict[str, float] = field(default_factory=dict)   # per-model overrides of tbt_target_s
    pipeline_max_batches: int | None = None   # batches per pipelined step, chosen by slack (default: all models)
    pipeline_attention_sms: int | None = None  # GPU: green contexts, at least this many SMs for the attention side
    # a lone batch as two micro-batches, so the sides still alternate (default: only across pool ranks, where
    # the sides are on different devices; on one device the two would each read every weight, and a lone
    # batch runs as a whole step: one graph, async decode)
    pipeline_micro_batches: bool | None = None

    def __post_init__(self) -> None:
        if self.dtype is None:
            self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_devices and self.kv_devices[0] != self.device:
            raise ValueError(f"device {self.device} must be the first KV device {self.kv_devices[0]}")
        if self.weights_devices and not self.weights_ranks:
            self.weights_ranks = len(self.weights_devices)
        if self.weights_ranks and not self.weights_devices:
            self.weights_devices = (self.device,) * self.weights_ranks
        if self.kernels is None:
            from crosspool.kernels import triton_available

            self.kernels = "triton" if self.device.startswith("cuda") and triton_available() else "torch"
        if self.kernels not in ("torch", "triton"):
            raise ValueError(f"kernels must be 'torch' or 'triton', got {self.kernels!r}")
        if self.kernels == "triton":
            from crosspool.kernels import triton_available

            if not triton_available():
                raise ValueError("kernels='triton' needs triton installed (pip install 'crosspool[triton]')")
            if not self.device.startswith("cuda"):
                # Triton compiles for GPUs only; on the CPU its kernels run in the interpreter (slow, exact)
                os.environ.setdefault("TRITON_INTERPRET", "1")
        if self.cuda_graphs is None:
            self.cuda_graphs = self.device.startswith("cuda") and self.kernels == "triton"
        if self.cuda_graphs and self.kernels != "triton":
            raise ValueError("cuda_graphs needs kernels='triton' (the torch reference path syncs with the host)")
        if self.weights_ranks < 0:
            raise ValueError(f"weights_ranks must be >= 0, got {self.weights_ranks}")
        if self.weights_devices and len(self.weights_devices) != self.weights_ranks:
            raise ValueError(f"{len(self.weights_devices)} weights devices for {self.weights_ranks} weights ranks")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        bad = {k: v for k, v in {"*": self.tbt_target_s, **self.tbt_targets_s}.items() if not v > 0}
        if bad:
            raise ValueError(f"TBT targets must be > 0 seconds, got {bad}")
        if self.pipeline_attention_sms is not None and self.pipeline_attention_sms < 1:
            raise ValueError(f"pipeline_attention_sms must be >= 1, got {self.pipeline_attention_sms}")
        if self.pipeline_max_batches is not None and self.pipeline_max_batches < 1:
            raise ValueError(f"pipeline_max_batches must be >= 1, got {self.pipeline_max_batches}")


def layout_settings(kv_devices: str | None = None, weights_devices: str | None = None,
                    kv_ranks: int | None = None, weights_ranks: int | None = None,
                    default_device: str = "cpu") -> dict[str, object]:
    """EngineConfig fields from the layout flags: `--kv-devices` / `--weights-devices` (comma lists,
    e.g. `cuda:0` for both pools on one GPU, `cuda:0,cuda:1` + `cuda:2,cuda:3` for 2 + 2 GPUs) or, on
    CPU, `--kv-ranks N --weights-ranks M` (gloo processes)."""
    kv = tuple(d.strip() for d in kv_devices.split(",")) if kv_devices else (default_device,) * (kv_ranks or 1)
    out: dict[str, object] = {"device": kv[0]}
    if weights_devices:
        wd = tuple(d.strip() for d in weights_devices.split(","))
        if wd == kv[:1] and len(kv) == 1:
            return out                                     # both pools on one device, in-process
        if set(wd) & set(kv) and kv[0] != "cpu":
            raise ValueError(f"weights devices {list(wd)} overlap the KV devices {list(kv)}")
    else:
        wd = (kv[0],) * (weights_ranks or 0)
    if len(kv) > 1:
        out["kv_devices"] = kv
        if not wd:
            raise ValueError("several KV devices need weights devices (the weights pool) too")
    if wd:
        out["weights_ranks"] = len(wd)
        out["weights_devices"] = wd
    return out


def is_distributed(config: EngineConfig) -> bool:
    return config.weights_ranks > 0 or len(config.kv_devices) > 1
