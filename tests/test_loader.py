"""Checkpoint loading: clear errors for broken checkpoints, sharded checkpoints, the make-model and
generate CLI, and bf16 weight sanity (finite activations at every layer)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from crosspool import LLM, EngineConfig, SamplingParams
from crosspool.cli import main as cli_main
from crosspool.engine.engine import Engine
from crosspool.engine.runner import build_batch
from crosspool.engine.scheduler import ScheduledSeq
from crosspool.engine.sequence import Sequence
from crosspool.models.loader import CheckpointError, load_checkpoint, load_spec
from crosspool.models.make_model import make_model, write_weights
from crosspool.models.model import MoEModel
from crosspool.models.presets import PRESETS
from crosspool.models.spec import ModelSpec, UnsupportedModelError, checkpoint_layout
from crosspool.pools.kv_pool import KVPool

TinyModels = Callable[[str], Path]
TINY = sorted(name for name in PRESETS if name.startswith("tiny-"))
CPU = torch.device("cpu")


def _copy(tiny_models: TinyModels, preset: str, dst: Path) -> Path:
    return Path(shutil.copytree(tiny_models(preset), dst))


def _load(path: Path) -> None:
    load_checkpoint(path, torch.float32, CPU)


def _edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------------------------
# broken checkpoints


@pytest.mark.parametrize("keep", ["half", "all_but_one_byte", "inside_header", "eight_bytes"])
def test_truncated_safetensors_names_the_file(tiny_models: TinyModels, tmp_path: Path, keep: str) -> None:
    ckpt = _copy(tiny_models, "tiny-olmoe", tmp_path / "ckpt")
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    size = {"half": len(data) // 2, "all_but_one_byte": len(data) - 1, "inside_header": 8 + header_len // 2,
            "eight_bytes": 8}[keep]
    f.write_bytes(data[:size])
    with pytest.raises(CheckpointError, match=re.escape(str(f))):
        _load(ckpt)


def test_truncated_shard_names_the_shard(tiny_models: TinyModels, tmp_path: Path) -> None:
    ckpt = _sharded_copy(tiny_models, "tiny-olmoe", tmp_path / "sharded")
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=re.escape(str(shard)) + ".*truncated"):
        _load(ckpt)


def test_index_naming_a_missing_shard(tiny_models: TinyModels, tmp_path: Path) -> None:
    ckpt = _sharded_copy(tiny_models, "tiny-olmoe", tmp_path / "sharded")
    shard = sorted(ckpt.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name) + ".*missing"):
        _load(ckpt)


def test_missing_tensor_is_named(tiny_models: TinyModels, tmp_path: Path) -> None:
    ckpt = _copy(tiny_models, "tiny-qwen2-moe", tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    del tensors[name]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{name}' is missing")):
        _load(ckpt)


@pytest.mark.parametrize(
    ("preset", "name", "shape", "expected"),
    [
        ("tiny-olmoe", "model.layers.0.self_attn.q_proj.weight", (64, 32), (64, 64)),
        ("tiny-mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight", (96, 64), (64, 96)),
        ("tiny-deepseek-v2", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", (41, 64), (40, 64)),
    ],
)
def test_misshaped_tensor_names_tensor_and_both_shapes(
    tiny_models: TinyModels, tmp_path: Path, preset: str, name: str, shape: tuple[int, ...],
    expected: tuple[int, ...],
) -> None:
    ckpt = _copy(tiny_models, preset, tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    assert tuple(tensors[name].shape) == expected
    tensors[name] = torch.zeros(shape, dtype=tensors[name].dtype)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    message = f"{name!r} has shape {shape}, config expects {expected}"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        _load(ckpt)


def test_missing_config_json(tiny_models: TinyModels, tmp_path: Path) -> None:
    ckpt = _copy(tiny_models, "tiny-olmoe", tmp_path / "ckpt")
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        _load(ckpt)
    with pytest.raises(CheckpointError, match="no config.json"):
        Engine({"m": ckpt}, EngineConfig(num_kv_blocks=4))


def test_invalid_config_json(tiny_models: TinyModels, tmp_path: Path) -> None:
    ckpt = _copy(tiny_models, "tiny-olmoe", tmp_path / "ckpt")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        _load(ckpt)


def test_no_weights(tiny_models: TinyModels, tmp_path: Path) -> None:
    ckpt = _copy(tiny_models, "tiny-olmoe", tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        _load(ckpt)


def test_unsupported_architecture(tiny_models: TinyModels, tmp_path: Path) -> None:
    ckpt = _copy(tiny_models, "tiny-mixtral", tmp_path / "ckpt")
    _edit_config(ckpt, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(UnsupportedModelError, match="unsupported architecture.*LlamaForCausalLM"):
        _load(ckpt)
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        Engine({"m": ckpt}, EngineConfig(num_kv_blocks=4))


@pytest.mark.parametrize(
    ("preset", "changes", "field"),
    [
        ("tiny-olmoe", {"rope_scaling": {"type": "longrope", "factor": 4.0}}, "rope_scaling.type='longrope'"),
        ("tiny-qwen3-moe", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
         "rope_scaling.type='dynamic'"),
        ("tiny-mixtral", {"sliding_window": 4096}, "sliding_window=4096"),
        ("tiny-qwen2-moe", {"use_sliding_window": True, "sliding_window": 1024}, "sliding_window=1024"),
        ("tiny-olmoe", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("tiny-deepseek-v2", {"scoring_func": "sigmoid"}, "scoring_func='sigmoid'"),
        ("tiny-deepseek-v2", {"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ],
)
def test_unsupported_config_field_is_named(
    tiny_models: TinyModels, tmp_path: Path, preset: str, changes: dict[str, object], field: str,
) -> None:
    ckpt = _copy(tiny_models, preset, tmp_path / "ckpt")
    _edit_config(ckpt, **changes)
    with pytest.raises(UnsupportedModelError, match=re.escape(f"unsupported config field {field}")):
        _load(ckpt)


def test_missing_required_field_is_named(tiny_models: TinyModels, tmp_path: Path) -> None:
    ckpt = _copy(tiny_models, "tiny-olmoe", tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["num_experts_per_tok"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="missing required field 'num_experts_per_tok'"):
        _load(ckpt)


def test_disabled_sliding_window_is_accepted(tiny_models: TinyModels, tmp_path: Path) -> None:
    # Qwen configs carry a sliding_window value that use_sliding_window=False switches off
    ckpt = _copy(tiny_models, "tiny-qwen2-moe", tmp_path / "ckpt")
    _edit_config(ckpt, use_sliding_window=False, sliding_window=4096)
    _load(ckpt)


# ------------------------------------------------------------------------------------------------
# sharded checkpoints

SHARD_BYTES = 200_000


def _sharded_copy(tiny_models: TinyModels, preset: str, dst: Path) -> Path:
    """The preset's directory with its weights rewritten (same seed) in several small shards."""
    src = tiny_models(preset)
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    write_weights(load_spec(src), dst, seed=1, dtype=torch.bfloat16, max_shard_bytes=SHARD_BYTES,
                  progress=False)
    return dst


@pytest.mark.parametrize("preset", ["tiny-olmoe", "tiny-deepseek-v2"])
def test_sharded_checkpoint_matches_unsharded(tiny_models: TinyModels, tmp_path: Path, preset: str) -> None:
    ckpt = _sharded_copy(tiny_models, preset, tmp_path / "sharded")
    shards = sorted(ckpt.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert [s.name for s in shards] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    spec = load_spec(ckpt)
    layout = checkpoint_layout(spec)
    assert set(index["weight_map"]) == {t.name for t in layout}
    total = 0
    for shard in shards:
        assert shard.stat().st_size < SHARD_BYTES + 100_000  # small shards, except one oversized tensor
        with safe_open(str(shard), framework="pt") as h:
            names = set(h.keys())
            total += sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in names)
        assert names == {k for k, v in index["weight_map"].items() if v == shard.name}
    assert index["metadata"]["total_size"] == total

    _, attn_a, ffn_a = load_checkpoint(tiny_models(preset), torch.float32, CPU)
    _, attn_b, ffn_b = load_checkpoint(ckpt, torch.float32, CPU)
    for a, b in ((attn_a.embed, attn_b.embed), (attn_a.lm_head, attn_b.lm_head),
                 (attn_a.final_norm, attn_b.final_norm)):
        assert torch.equal(a, b)
    for la, lb in zip(attn_a.layers + ffn_a.layers, attn_b.layers + ffn_b.layers, strict=True):
        assert la.keys() == lb.keys()
        for k in la:
            assert torch.equal(la[k], lb[k]), k
    # a different seed really gives different weights (the comparison above is not vacuous)
    other = tmp_path / "other"
    other.mkdir()
    write_weights(spec, other, seed=2, dtype=torch.bfloat16, progress=False)
    assert not torch.equal(load_file(other / "model.safetensors")["model.embed_tokens.weight"].float(),
                           attn_b.embed)


def test_transformers_loads_the_sharded_checkpoint(tiny_models: TinyModels, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = _sharded_copy(tiny_models, "tiny-qwen2-moe", tmp_path / "sharded")
    assert len(list(ckpt.glob("model-*.safetensors"))) >= 3
    sharded, info = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    plain = AutoModelForCausalLM.from_pretrained(tiny_models("tiny-qwen2-moe"), dtype=torch.float32)
    ids = torch.tensor([[5, 77, 300, 12, 41, 9]])
    with torch.no_grad():
        assert torch.equal(sharded(ids).logits, plain(ids).logits)
    _, attn, _ = load_checkpoint(ckpt, torch.float32, CPU)
    assert torch.equal(sharded.get_input_embeddings().weight, attn.embed)


def test_engine_serves_a_sharded_checkpoint(tiny_models: TinyModels, tmp_path: Path) -> None:
    ckpt = _sharded_copy(tiny_models, "tiny-olmoe", tmp_path / "sharded")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    a = LLM({"m": ckpt}, num_kv_blocks=16).generate([[3, 4, 5, 6]], params)[0]
    b = LLM({"m": tiny_models("tiny-olmoe")}, num_kv_blocks=16).generate([[3, 4, 5, 6]], params)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_make_model_writes_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mixtral"
    assert cli_main(["make-model", "--preset", "tiny-mixtral", "--out", str(out), "--quiet"]) == 0
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    spec = load_spec(out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        assert set(h.keys()) == {t.name for t in checkpoint_layout(spec)}
    capsys.readouterr()


def test_cli_make_model_layers_and_seed(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert cli_main(["make-model", "--preset", "tiny-olmoe", "--out", str(a), "--quiet", "--layers", "1",
                     "--seed", "3"]) == 0
    assert cli_main(["make-model", "--preset", "tiny-olmoe", "--out", str(b), "--quiet", "--layers", "1",
                     "--seed", "3"]) == 0
    assert cli_main(["make-model", "--preset", "tiny-olmoe", "--out", str(c), "--quiet", "--layers", "1",
                     "--seed", "4"]) == 0
    assert load_spec(a).num_layers == 1
    ta, tb, tc = (load_file(d / "model.safetensors") for d in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["lm_head.weight"], tc["lm_head.weight"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "no-such-model"], "unknown model preset 'no-such-model'"),
        (["--preset", "tiny-olmoe", "--layers", "0"], "--layers must be >= 1"),
        (["--preset", "tiny-olmoe", "--dtype", "int3"], "unknown dtype 'int3'"),
    ],
)
def test_cli_make_model_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                               message: str) -> None:
    assert cli_main(["make-model", "--out", str(tmp_path / "x"), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_cli_generate_json(tiny_models: TinyModels, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_models("tiny-olmoe")
    argv = ["generate", "--model", str(model), "--prompt", "Hello there, how are", "--max-tokens", "9",
            "--ignore-eos", "--json", "--device", "cpu"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 9 and out["finish_reason"] == "length"
    assert out["prompt_token_ids"] and all(0 <= t < 512 for t in out["token_ids"])
    assert isinstance(out["text"], str) and out["ttft_s"] > 0 and len(out["tbt_s"]) == 8
    # the CLI's tokens are the engine's greedy tokens
    ref = LLM({"m": model}, num_kv_blocks=16).generate("Hello there, how are", SamplingParams(
        max_tokens=9, temperature=0.0, ignore_eos=True))[0]
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text


def test_cli_generate_missing_model_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "hi", "--device", "cpu"])
    assert code == 2
    assert "error" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# bf16 weight sanity


States = list[tuple[str, torch.Tensor]]


def _layer_states(model: MoEModel, ids: list[int], block_size: int = 16) -> tuple[States, torch.Tensor]:
    """Run one prefill layer by layer: the residual stream after embedding, every attention and every
    FFN, and the logits."""
    spec = model.spec
    dtype = model.attention.w.embed.dtype
    blocks = -(-len(ids) // block_size)
    cache = KVPool(blocks * block_size * spec.kv_bytes_per_token(4) + (8 << 20)).register("m", spec, block_size, dtype)
    seq = Sequence("r", "m", "", ids, SamplingParams())
    seq.block_table = cache.alloc(blocks)
    batch = build_batch([ScheduledSeq(seq, len(ids))], block_size, CPU)
    states: list[tuple[str, torch.Tensor]] = []
    with torch.inference_mode():
        hidden = model.attention.embed(batch.input_ids)
        states.append(("embed", hidden))
        rope = model.attention.rope_tables(batch.positions)
        for layer in range(spec.num_layers):
            hidden, x = model.attention.attention_block(layer, hidden, None, batch, cache, rope)
            states.append((f"layer {layer} attention", hidden))
            hidden = hidden + model.ffn.forward(layer, x)
            states.append((f"layer {layer} ffn", hidden))
        assert torch.equal(hidden, model.forward(batch, cache))  # the same computation as the engine's
        return states, model.compute_logits(hidden)


def _check_states(states: States) -> None:
    for name, h in states:
        assert h.dtype == torch.bfloat16, name
        assert torch.isfinite(h).all(), f"non-finite hidden states after {name}"
        rms = float(h.float().pow(2).mean().sqrt())
        assert 0.1 < rms < 10, f"hidden RMS {rms:.3g} after {name}"


PROMPT_IDS = torch.randint(0, 509, (37,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.mark.parametrize("preset", TINY)
def test_tiny_presets_run_in_bf16(tiny_models: TinyModels, preset: str) -> None:
    path = tiny_models(preset)
    engine = Engine({preset: path}, EngineConfig(dtype=torch.bfloat16, num_kv_blocks=16, block_size=8))
    served = engine.models[preset]
    assert served.runner is not None and served.blocks is not None
    seq = Sequence("probe", preset, "", PROMPT_IDS, SamplingParams())
    served.blocks.grow(seq, len(PROMPT_IDS))
    logits = served.runner.logits_for([ScheduledSeq(seq, len(PROMPT_IDS))])
    served.blocks.release(seq)
    assert logits.shape == (len(PROMPT_IDS), 512) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()

    states, logits16 = _layer_states(served.runner.model, PROMPT_IDS)
    _check_states(states)
    assert torch.equal(logits16, logits)
    # bf16 tracks fp32 to within bf16 rounding, per token; a rare token may pick another expert where two
    # router scores nearly tie, so a few tokens may differ more
    states32, logits32 = _layer_states(MoEModel.load(path, torch.float32, CPU), PROMPT_IDS)
    final16, final32 = states[-1][1].float(), states32[-1][1]
    err = (final16 - final32).norm(dim=-1) / final32.norm(dim=-1)
    assert float(err.median()) < 0.03
    assert float(err.mean()) < 0.1
    assert float((logits16.argmax(-1) == logits32.argmax(-1)).float().mean()) >= 0.75

    out = LLM({preset: path}, dtype=torch.bfloat16, num_kv_blocks=16, block_size=8).generate(
        [PROMPT_IDS], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and all(0 <= t < 512 for t in out.token_ids)


def test_real_preset_one_layer_stays_finite_in_bf16(tmp_path_factory: pytest.TempPathFactory) -> None:
    """olmoe-1b-7b at its real width (2048 hidden, 64 experts, 50k vocab), one layer: ~1.2 GB of bf16."""
    path = make_model("olmoe-1b-7b", tmp_path_factory.mktemp("olmoe"), layers=1, seed=1, progress=False)
    spec: ModelSpec = load_spec(path)
    assert spec.num_layers == 1 and spec.hidden_size == 2048 and spec.routing is not None
    assert spec.routing.num_experts == 64
    model = MoEModel.load(path, torch.bfloat16, CPU)
    ids = torch.randint(0, spec.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    states, logits = _layer_states(model, ids)
    _check_states(states)
    assert logits.shape == (24, spec.vocab_size) and torch.isfinite(logits).all()
    shutil.rmtree(path)
