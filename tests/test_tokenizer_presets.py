"""Model presets and generated tokenizers load unchanged with native transformers (CPU, offline)."""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from crosspool.models.presets import PRESETS, Preset, get_preset
from crosspool.models.tokenizer import CHATML_TEMPLATE, SIMPLE_TEMPLATE, write_tokenizer

ALL = sorted(PRESETS)
TINY = sorted(name for name in PRESETS if name.startswith("tiny-"))
REAL = sorted(name for name in PRESETS if not name.startswith("tiny-"))

ASCII_TEXT = "Hello world!  The model answers: 2 + 2 = 4.\n\tDone, isn't it? (yes) [ok] {x: 1}"
NON_ASCII_TEXT = "Grüße aus Zürich — naïve café, 東京と北京, Привет, 🚀🎉 ok"

_QWEN_FAMILY = {"qwen2_moe", "qwen3_moe"}


def _write_tokenizer_for(preset: Preset, out: Path) -> None:
    write_tokenizer(
        out,
        vocab_size=preset.config["vocab_size"],
        special_tokens=preset.special_tokens,
        bos_token=preset.bos_token,
        eos_token=preset.eos_token,
        pad_token=preset.pad_token,
        chat_template=preset.chat_template,
        add_bos_token=preset.add_bos_token,
        model_max_length=preset.config["max_position_embeddings"],
    )


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Config, generation config and tokenizer for every preset, written once."""
    dirs: dict[str, Path] = {}
    for name in ALL:
        preset = PRESETS[name]
        out = tmp_path_factory.mktemp(name)
        (out / "config.json").write_text(json.dumps(preset.config))
        (out / "generation_config.json").write_text(json.dumps(preset.generation_config))
        _write_tokenizer_for(preset, out)
        dirs[name] = out
    return dirs


@cache
def _load_tokenizer(path: Path) -> Any:
    return AutoTokenizer.from_pretrained(path)


def _first_id(value: int | list[int]) -> int:
    return value[0] if isinstance(value, list) else value


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", ALL)
def test_config_loads_with_auto_config(name: str, checkpoint_dirs: dict[str, Path]) -> None:
    preset = PRESETS[name]
    from_dir = AutoConfig.from_pretrained(checkpoint_dirs[name])
    from_dict = AutoConfig.for_model(**preset.config)
    for config in (from_dir, from_dict):
        assert config.model_type == preset.config["model_type"]
        assert config.vocab_size == preset.config["vocab_size"]
        assert config.hidden_size == preset.config["hidden_size"]
        assert config.num_hidden_layers == preset.config["num_hidden_layers"]
    assert type(from_dir).__name__.removesuffix("Config") + "ForCausalLM" == preset.config["architectures"][0]
    generation = GenerationConfig.from_pretrained(checkpoint_dirs[name])
    assert generation.eos_token_id == preset.generation_config["eos_token_id"]


@pytest.mark.parametrize("name", ALL)
def test_preset_shape(name: str) -> None:
    preset = PRESETS[name]
    config = preset.config
    assert preset.name == name
    assert config["torch_dtype"] == "bfloat16"
    assert "auto_map" not in config
    vocab = config["vocab_size"]
    assert all(0 <= i < vocab for i in preset.special_tokens)
    specials = set(preset.special_tokens.values())
    assert preset.eos_token in specials
    assert preset.bos_token is None or preset.bos_token in specials
    assert preset.pad_token is None or preset.pad_token in specials
    expected_template = CHATML_TEMPLATE if config["model_type"] in _QWEN_FAMILY else SIMPLE_TEMPLATE
    assert preset.chat_template == expected_template
    if name in TINY:
        assert vocab == 512 and config["hidden_size"] == 64 and config["num_hidden_layers"] == 3
        assert config["max_position_embeddings"] == 2048 and config["tie_word_embeddings"] is False
        assert sorted(preset.special_tokens) == [509, 510, 511]


def test_real_preset_values() -> None:
    """Spot checks of the public hub values the engine depends on most."""
    olmoe = PRESETS["olmoe-1b-7b"].config
    assert (olmoe["num_experts"], olmoe["num_experts_per_tok"], olmoe["eos_token_id"]) == (64, 8, 50279)
    qwen15 = PRESETS["qwen1.5-moe-a2.7b"].config
    assert (qwen15["num_experts"], qwen15["num_experts_per_tok"]) == (60, 4)
    assert qwen15["shared_expert_intermediate_size"] == 5632
    qwen3 = PRESETS["qwen3-30b-a3b"].config
    assert (qwen3["num_experts"], qwen3["head_dim"], qwen3["num_key_value_heads"]) == (128, 128, 4)
    deepseek = PRESETS["deepseek-v2-lite"].config
    assert deepseek["rope_scaling"]["type"] == "yarn" and deepseek["rope_scaling"]["factor"] == 40
    assert deepseek["architectures"] == ["DeepseekV2ForCausalLM"] and deepseek["model_type"] == "deepseek_v2"
    mixtral = PRESETS["mixtral-8x7b"].config
    assert (mixtral["num_local_experts"], mixtral["num_key_value_heads"]) == (8, 8)
    assert mixtral["vocab_size"] == 32000


def test_get_preset_unknown_lists_valid_names() -> None:
    with pytest.raises(ValueError) as excinfo:
        get_preset("no-such-model")
    for name in ALL:
        assert name in str(excinfo.value)


def test_get_preset_returns_independent_copy() -> None:
    preset = get_preset("tiny-olmoe")
    preset.config["num_hidden_layers"] = 99
    assert PRESETS["tiny-olmoe"].config["num_hidden_layers"] == 3


@pytest.mark.parametrize("name", TINY)
def test_tiny_config_builds_native_model(name: str) -> None:
    config = AutoConfig.for_model(**PRESETS[name].config)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == PRESETS[name].config["architectures"][0]
    with torch.no_grad():
        logits = model(torch.tensor([[3, 200, 400, 7]])).logits
    assert logits.shape == (1, 4, 512)


# ------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("name", ALL)
def test_special_token_ids_match_config(name: str, checkpoint_dirs: dict[str, Path]) -> None:
    preset = PRESETS[name]
    config = preset.config
    tok = _load_tokenizer(checkpoint_dirs[name])
    assert tok.eos_token_id == _first_id(config["eos_token_id"])
    if preset.bos_token is not None:
        assert tok.bos_token_id == config["bos_token_id"]
    else:
        assert tok.bos_token_id is None
    if config.get("pad_token_id") is not None:
        assert tok.pad_token_id == config["pad_token_id"]
    for token_id, text in preset.special_tokens.items():
        assert tok.convert_tokens_to_ids(text) == token_id
        # Registered as added tokens: never split by the byte-level pre-tokenizer.
        assert tok.encode(text, add_special_tokens=False) == [token_id]
    # Generation-time stop ids must be real special tokens of this tokenizer.
    eos = preset.generation_config["eos_token_id"]
    for token_id in eos if isinstance(eos, list) else [eos]:
        assert token_id in preset.special_tokens


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("text", [ASCII_TEXT, NON_ASCII_TEXT], ids=["ascii", "non-ascii"])
def test_roundtrip(name: str, text: str, checkpoint_dirs: dict[str, Path]) -> None:
    preset = PRESETS[name]
    tok = _load_tokenizer(checkpoint_dirs[name])
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert all(0 <= i < preset.config["vocab_size"] for i in ids)
    # The plain tokenizers library sees the same file, BOS handling included.
    raw = Tokenizer.from_file(str(checkpoint_dirs[name] / "tokenizer.json"))
    assert raw.encode(text).ids == ids
    assert raw.decode(ids) == text
    if preset.add_bos_token:
        assert ids[0] == preset.config["bos_token_id"] and ids.count(ids[0]) == 1
    else:
        assert not set(ids) & set(preset.special_tokens)


@pytest.mark.parametrize("name", ALL)
def test_every_id_decodes(name: str, checkpoint_dirs: dict[str, Path]) -> None:
    tok = _load_tokenizer(checkpoint_dirs[name])
    vocab_size = PRESETS[name].config["vocab_size"]
    step = 1 if name in TINY else 97
    sampled = list(range(0, vocab_size, step)) + [vocab_size - 1]
    for token_id in sampled:
        assert isinstance(tok.decode([token_id]), str)
        assert tok.convert_ids_to_tokens(token_id) is not None
    # A run of arbitrary ids, as a random-weight model emits, reads as text.
    tail = tok.decode(list(range(vocab_size - 30, vocab_size - 3)), skip_special_tokens=True)
    assert tail.strip() and "\ufffd" not in tail
    if name in TINY:
        assert len(tok) == vocab_size


@pytest.mark.parametrize("name", ALL)
def test_chat_template(name: str, checkpoint_dirs: dict[str, Path]) -> None:
    preset = PRESETS[name]
    tok = _load_tokenizer(checkpoint_dirs[name])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str)
    for message in messages:
        assert message["content"] in prompt
    if preset.chat_template == CHATML_TEMPLATE:
        assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    else:
        assert prompt.endswith("User: What is 2 + 2?\n\nAssistant:")
        assert prompt.startswith(preset.bos_token or "Be brief.")
    encoded = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    if preset.bos_token is not None:
        # The template writes BOS; tokenizing it must not add a second one.
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_common_words_are_single_tokens(checkpoint_dirs: dict[str, Path]) -> None:
    tok = _load_tokenizer(checkpoint_dirs["qwen3-30b-a3b"])
    for word in (" the", " and", " model", " expert", " token", " memory", " request", " answer"):
        assert len(tok.encode(word)) == 1, word
    assert len(tok.encode("The model serves the request with a few experts.")) <= 12


def test_tokenizer_files_are_deterministic(tmp_path: Path) -> None:
    preset = PRESETS["tiny-deepseek-v3"]
    _write_tokenizer_for(preset, tmp_path / "a")
    _write_tokenizer_for(preset, tmp_path / "b")
    for filename in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / filename).read_bytes() == (tmp_path / "b" / filename).read_bytes()


def test_large_vocab_is_fast(tmp_path: Path) -> None:
    preset = PRESETS["qwen3-30b-a3b"]
    start = time.perf_counter()
    _write_tokenizer_for(preset, tmp_path)
    written = time.perf_counter() - start
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    loaded = time.perf_counter() - start
    assert written < 3.0, f"write took {written:.2f}s"
    assert loaded < 5.0, f"load took {loaded:.2f}s"
    assert len(tok) == preset.config["vocab_size"]


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    common: dict[str, Any] = dict(chat_template=SIMPLE_TEMPLATE, pad_token=None)
    with pytest.raises(ValueError, match="outside"):
        write_tokenizer(tmp_path, vocab_size=300, special_tokens={300: "</s>"}, bos_token=None,
                        eos_token="</s>", add_bos_token=False, **common)
    with pytest.raises(ValueError, match="not one of the special tokens"):
        write_tokenizer(tmp_path, vocab_size=300, special_tokens={299: "</s>"}, bos_token=None,
                        eos_token="<eos>", add_bos_token=False, **common)
    with pytest.raises(ValueError, match="add_bos_token"):
        write_tokenizer(tmp_path, vocab_size=300, special_tokens={299: "</s>"}, bos_token=None,
                        eos_token="</s>", add_bos_token=True, **common)
    with pytest.raises(ValueError, match="cannot hold"):
        write_tokenizer(tmp_path, vocab_size=200, special_tokens={199: "</s>"}, bos_token=None,
                        eos_token="</s>", add_bos_token=False, **common)
