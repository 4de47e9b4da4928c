"""Checkpoint loading: HF safetensors directories -> attention-side and FFN-side weights.

Reads `config.json` into a `ModelSpec`, then every tensor named by `checkpoint_layout` from the
(possibly sharded, indexed) safetensors files, checking presence and shape, and stacks per-expert
tensors into expert tensors. The two halves go to the two pools: `AttentionWeights` (embeddings, norms,
attention, lm_head) to the KV-cache pool and `FFNWeights` (routers, experts, shared experts, dense
MLPs) to the weights pool.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from crosspool.models.spec import (
    ModelSpec,
    checkpoint_layout,
    expert_names,
    router_name,
    shared_expert_prefix,
)


class CheckpointError(ValueError):
    """The checkpoint directory is incomplete, truncated or does not match its config."""


@dataclass
class AttentionWeights:
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[dict[str, torch.Tensor]]          # keys: short names, e.g. "q_proj", "q_proj.bias"


@dataclass
class FFNWeights:
    # dense layer: "gate_up" [2I, H], "down" [H, I]
    # MoE layer:   "router" [E, H], "score_bias" [E], "experts_gate_up" [E, 2I, H], "experts_down" [E, H, I],
    #              optional "shared_gate_up", "shared_down", "shared_gate" [1, H]
    layers: list[dict[str, torch.Tensor]] = field(default_factory=list)


def read_config(model_dir: str | os.PathLike[str]) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (is this an HF checkpoint directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON: {exc}") from exc


def load_spec(model_dir: str | os.PathLike[str]) -> ModelSpec:
    cfg = read_config(model_dir)
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        # generation_config's eos ids win, as in transformers' generate
        gcfg = json.loads(gen.read_text())
        if gcfg.get("eos_token_id") is not None:
            cfg = {**cfg, "eos_token_id": gcfg["eos_token_id"]}
    return ModelSpec.from_hf_config(cfg)


class _TensorSource:
    """Name -> tensor over one or many safetensors files, with clear errors."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir
        self._handles: dict[str, object] = {}
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{model_dir}: no *.safetensors files")
            weight_map = {}
            for f in files:
                for name in self._open(f).keys():
                    weight_map[name] = f.name
        self.weight_map = weight_map

    def _open(self, path: Path):  # noqa: ANN202 - safetensors handle type is private
        key = str(path)
        if key not in self._handles:
            if not path.is_file():
                raise CheckpointError(f"{path}: shard named in the index is missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{path}: unreadable safetensors file (truncated?): {exc}") from exc
            self._check_size(path, handle)
            self._handles[key] = handle
        return self._handles[key]

    @staticmethod
    def _check_size(path: Path, handle) -> None:  # noqa: ANN001
        # safe_open reads only the header; a file cut short must fail here, naming the file.
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        need = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        have = path.stat().st_size - 8 - header_len
        if have < need:
            raise CheckpointError(f"{path}: truncated ({have} data bytes, its header needs {need})")

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        handle = self._open(self.dir / file)
        try:
            t = handle.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{self.dir / file}: cannot read tensor {name!r}: {exc}") from exc
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.dir / file}: tensor {name!r} has shape {tuple(t.shape)}, config expects {tuple(shape)}"
            )
        return t.to(device=device, dtype=dtype)


def _short(name: str, layer: int) -> str:
    for prefix in (f"model.layers.{layer}.self_attn.", f"model.layers.{layer}."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.removesuffix(".weight")


@dataclass(frozen=True, slots=True)
class Shard:
    """This process's slice of the FFN intermediate dimension (tensor parallel over the weights pool)."""

    rank: int = 0
    world: int = 1

    def slice(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        if self.world == 1:
            return t
        return torch.tensor_split(t, self.world, dim=dim)[self.rank].contiguous()

    def gate_up(self, gate: torch.Tensor, up: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate this shard's gate rows and up rows (the fused layout silu_and_mul expects)."""
        return torch.cat([self.slice(gate, dim), self.slice(up, dim)], dim=dim)

    def view(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This shard's slice as a view (no copy): for copying straight into a preallocated tensor."""
        return t if self.world == 1 else torch.tensor_split(t, self.world, dim=dim)[self.rank]


class _Reader:
    def __init__(self, model_dir: Path, spec: ModelSpec, dtype: torch.dtype) -> None:
        self.src = _TensorSource(model_dir)
        self.layout = {t.name: t for t in checkpoint_layout(spec)}
        self.dtype = dtype

    def __call__(self, name: str, keep_fp32: bool = False) -> torch.Tensor:
        t = self.layout[name]
        return self.src.get(name, t.shape, torch.float32 if keep_fp32 else self.dtype, torch.device("cpu"))


def load_attention_weights(model_dir: str | os.PathLike[str], spec: ModelSpec, dtype: torch.dtype,
                           device: torch.device | str) -> AttentionWeights:
    """Embeddings, norms, attention and lm_head: the KV-cache pool's share of a checkpoint."""
    get = _Reader(Path(model_dir), spec, dtype)
    layers: list[dict[str, torch.Tensor]] = []
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        layers.append({_short(t.name, layer): get(t.name).to(device)
                       for t in get.layout.values() if t.side == "attention" and t.name.startswith(prefix)})
    embed = get("model.embed_tokens.weight").to(device)
    lm_head = embed if spec.tie_word_embeddings else get("lm_head.weight").to(device)
    return AttentionWeights(embed, get("model.norm.weight").to(device), lm_head, layers)


def load_ffn_weights(model_dir: str | os.PathLike[str], spec: ModelSpec, dtype: torch.dtype,
                     device: torch.device | str, shard: Shard | None = None) -> FFNWeights:
    """Routers, experts, shared experts and dense MLPs (this shard's intermediate slice): the weights
    pool's share. Router weights and DeepSeek's score bias stay fp32 where the family computes in fp32."""
    shard = shard or Shard()
    get = _Reader(Path(model_dir), spec, dtype)
    fp32_routers = spec.routing is not None and spec.routing.router_fp32
    layers = [{k: v.to(device) for k, v in _load_ffn_layer(spec, layer, get, fp32_routers, shard, device).items()}
              for layer in range(spec.num_layers)]
    return FFNWeights(layers)


def load_checkpoint(
    model_dir: str | os.PathLike[str], dtype: torch.dtype, device: torch.device | str = "cpu",
    spec: ModelSpec | None = None,
) -> tuple[ModelSpec, AttentionWeights, FFNWeights]:
    """Load both sides of a checkpoint onto one device."""
    spec = spec or load_spec(model_dir)
    return (spec, load_attention_weights(model_dir, spec, dtype, device),
            load_ffn_weights(model_dir, spec, dtype, device))


def _load_experts(spec: ModelSpec, layer: int, get: _Reader, shard: Shard,
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's experts as [E, 2I, H] gate/up rows and [E, H, I] down columns (this shard's slices), each
    checkpoint tensor copied once, from the file's mapping straight into the tensor on `device`: no
    concatenated or stacked copy on the host (for a 13 GB model those host copies were most of the load)."""
    assert spec.routing is not None
    n = spec.routing.num_experts
    gate_up = down = None
    for e in range(n):
        g, u, d = expert_names(spec, layer, e)
        gate, up, dn = shard.view(get(g), 0), shard.view(get(u), 0), shard.view(get(d), 1)
        if gate_up is None or down is None:
            gate_up = torch.empty(n, gate.shape[0] + up.shape[0], gate.shape[1], dtype=gate.dtype, device=device)
            down = torch.empty(n, *dn.shape, dtype=dn.dtype, device=device)
        gate_up[e, : gate.shape[0]].copy_(gate)
        gate_up[e, gate.shape[0]:].copy_(up)
        down[e].copy_(dn)
    assert gate_up is not None and down is not None
    return gate_up, down


def _load_ffn_layer(spec: ModelSpec, layer: int, get: _Reader, fp32_routers: bool,
                    shard: Shard, device: torch.device | str) -> dict[str, torch.Tensor]:
    if not spec.moe_layers[layer]:
        p = f"model.layers.{layer}.mlp"
        return {
            "gate_up": shard.gate_up(get(f"{p}.gate_proj.weight"), get(f"{p}.up_proj.weight"), 0),
            "down": shard.slice(get(f"{p}.down_proj.weight"), 1),
        }
    assert spec.routing is not None
    out = {"router": get(router_name(spec, layer), keep_fp32=fp32_routers)}
    if spec.routing.score_bias:
        out["score_bias"] = get(f"model.layers.{layer}.mlp.gate.e_score_correction_bias", keep_fp32=True)
    out["experts_gate_up"], out["experts_down"] = _load_experts(spec, layer, get, shard, device)
    if spec.shared_intermediate_size:
        p = shared_expert_prefix(spec, layer)
        out["shared_gate_up"] = shard.gate_up(get(f"{p}.gate_proj.weight"), get(f"{p}.up_proj.weight"), 0)
        out["shared_down"] = shard.slice(get(f"{p}.down_proj.weight"), 1)
    if spec.shared_expert_gate:
        out["shared_gate"] = get(f"model.layers.{layer}.mlp.shared_expert_gate.weight")
    return out
