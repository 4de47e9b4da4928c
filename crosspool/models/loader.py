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


def load_checkpoint(
    model_dir: str | os.PathLike[str], dtype: torch.dtype, device: torch.device | str = "cpu",
    spec: ModelSpec | None = None,
) -> tuple[ModelSpec, AttentionWeights, FFNWeights]:
    """Load and split a checkpoint. Router weights and DeepSeek's score bias stay fp32."""
    model_dir = Path(model_dir)
    spec = spec or load_spec(model_dir)
    device = torch.device(device)
    src = _TensorSource(model_dir)
    layout = {t.name: t for t in checkpoint_layout(spec)}
    fp32_routers = spec.routing is not None and spec.routing.router_fp32

    def get(name: str, keep_fp32: bool = False) -> torch.Tensor:
        t = layout[name]
        return src.get(name, t.shape, torch.float32 if keep_fp32 else dtype, device)

    attn_layers: list[dict[str, torch.Tensor]] = []
    ffn_layers: list[dict[str, torch.Tensor]] = []
    for layer in range(spec.num_layers):
        attn: dict[str, torch.Tensor] = {}
        for t in layout.values():
            if t.side == "attention" and t.name.startswith(f"model.layers.{layer}."):
                attn[_short(t.name, layer)] = get(t.name)
        attn_layers.append(attn)
        ffn_layers.append(_load_ffn_layer(spec, layer, get, fp32_routers))

    embed = get("model.embed_tokens.weight")
    lm_head = embed if spec.tie_word_embeddings else get("lm_head.weight")
    return spec, AttentionWeights(embed, get("model.norm.weight"), lm_head, attn_layers), FFNWeights(ffn_layers)


def _load_ffn_layer(spec: ModelSpec, layer: int, get, fp32_routers: bool) -> dict[str, torch.Tensor]:  # noqa: ANN001
    if not spec.moe_layers[layer]:
        p = f"model.layers.{layer}.mlp"
        return {
            "gate_up": torch.cat([get(f"{p}.gate_proj.weight"), get(f"{p}.up_proj.weight")]),
            "down": get(f"{p}.down_proj.weight"),
        }
    assert spec.routing is not None
    out = {"router": get(router_name(spec, layer), keep_fp32=fp32_routers)}
    if spec.routing.score_bias:
        out["score_bias"] = get(f"model.layers.{layer}.mlp.gate.e_score_correction_bias", keep_fp32=True)
    gate_up, down = [], []
    for e in range(spec.routing.num_experts):
        g, u, d = expert_names(spec, layer, e)
        gate_up.append(torch.cat([get(g), get(u)]))
        down.append(get(d))
    out["experts_gate_up"] = torch.stack(gate_up)
    out["experts_down"] = torch.stack(down)
    if spec.shared_intermediate_size:
        p = shared_expert_prefix(spec, layer)
        out["shared_gate_up"] = torch.cat([get(f"{p}.gate_proj.weight"), get(f"{p}.up_proj.weight")])
        out["shared_down"] = get(f"{p}.down_proj.weight")
    if spec.shared_expert_gate:
        out["shared_gate"] = get(f"model.layers.{layer}.mlp.shared_expert_gate.weight")
    return out
