"""`crosspool make-model`: write random-weight checkpoints in the hub's exact on-disk format.

Tensor names and shapes come from `checkpoint_layout` (the same list the loader checks), values are
drawn tensor by tensor from a seeded generator and written shard by shard, so a 90 GB preset needs only
one shard of memory. Scales keep activations O(1) through every layer in bf16: linears ~ N(0, 1/fan_in),
norms ~ 1, embeddings ~ N(0, 1).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from crosspool.models.spec import ModelSpec, TensorSpec, checkpoint_layout

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
DEFAULT_SHARD_BYTES = 4 * 1024**3


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def _init_tensor(t: TensorSpec, gen: torch.Generator) -> torch.Tensor:
    def randn() -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, device=gen.device)

    if t.kind == "norm":
        return 1.0 + 0.1 * randn()
    if t.kind == "embed":
        return randn()
    if t.kind == "bias":
        return 0.1 * randn()
    if t.kind == "score_bias":
        return 0.05 * randn()
    std = 1.0 / math.sqrt(t.shape[-1])
    if t.name == "lm_head.weight":
        std *= 2.0  # peakier next-token distributions: greedy choices are not near-ties
    return std * randn()


def _tensor_dtype(t: TensorSpec, spec: ModelSpec, dtype: torch.dtype) -> torch.dtype:
    # DeepSeek-V3 ships its score-correction bias in fp32 (transformers keeps it fp32 too).
    return torch.float32 if t.kind == "score_bias" else dtype


def _plan_shards(
    layout: list[TensorSpec], spec: ModelSpec, dtype: torch.dtype, max_bytes: int
) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in layout:
        nbytes = math.prod(t.shape) * torch.finfo(_tensor_dtype(t, spec, dtype)).bits // 8
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def write_weights(spec: ModelSpec, out_dir: Path, *, seed: int, dtype: torch.dtype,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, device: str = "cpu") -> int:
    """Write `*.safetensors` (+ index when sharded). Returns total bytes of tensor data. device: where the
    random values are drawn (a GPU is ~50x faster for large presets; its generator gives other values)."""
    layout = checkpoint_layout(spec)
    shards = _plan_shards(layout, spec, dtype, max_shard_bytes)
    total_bytes = sum(math.prod(t.shape) * torch.finfo(_tensor_dtype(t, spec, dtype)).bits // 8 for t in layout)
    weight_map: dict[str, str] = {}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"writing {out_dir.name}", disable=not progress)
    index_of = {t.name: i for i, t in enumerate(layout)}
    for n, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for t in shard:
            # per-tensor seed: values do not depend on how the checkpoint is sharded
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index_of[t.name])
            tensors[t.name] = _init_tensor(t, gen).to(_tensor_dtype(t, spec, dtype)).contiguous().cpu()
            weight_map[t.name] = fname
            bar.update(tensors[t.name].numel() * tensors[t.name].element_size())
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        del tensors
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total_bytes


def make_model(preset_name: str, out_dir: str | os.PathLike[str], *, layers: int | None = None, seed: int = 0,
               dtype: str = "bf16", max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
               device: str = "cpu", config_changes: dict[str, Any] | None = None) -> Path:
    """Write a full checkpoint directory (config, generation config, tokenizer, weights) for a preset;
    `config_changes` replace keys of its config.json (say, a tiny model with other widths)."""
    from crosspool.models.presets import get_preset
    from crosspool.models.tokenizer import write_tokenizer

    preset = get_preset(preset_name)
    torch_dtype = parse_dtype(dtype)
    config: dict[str, Any] = dict(preset.config) | dict(config_changes or {})
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        config["num_hidden_layers"] = layers
    config["torch_dtype"] = DTYPE_NAMES[torch_dtype]
    spec = ModelSpec.from_hf_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(preset.generation_config, indent=2) + "\n")
    write_tokenizer(out, vocab_size=spec.vocab_size, special_tokens=preset.special_tokens,
                    bos_token=preset.bos_token, eos_token=preset.eos_token, pad_token=preset.pad_token,
                    chat_template=preset.chat_template, add_bos_token=preset.add_bos_token)
    write_weights(spec, out, seed=seed, dtype=torch_dtype, max_shard_bytes=max_shard_bytes, progress=progress,
                  device=device)
    return out
