"""Model presets: the exact HF files ``make-model`` writes for each supported model.

This module owns the catalogue of model shapes CrossPool knows how to build: for
each preset the ``config.json`` and ``generation_config.json`` contents and the
tokenizer layout (special token ids, bos/eos/pad, chat template) handed to
:func:`crosspool.models.tokenizer.write_tokenizer`.

Real presets copy the public ``config.json`` of the hub model field by field so a
random-weight checkpoint has the real tensor shapes, routing settings and rope
setup.  Two kinds of field are left out on purpose: ``transformers_version`` (it
records who wrote the file, not the model) and ``auto_map`` (remote code, which a
native transformers load must not use).  Tiny presets keep the same field set at a
size a CPU test can build in a fraction of a second.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from crosspool.models.tokenizer import CHATML_TEMPLATE, SIMPLE_TEMPLATE

__all__ = ["PRESETS", "Preset", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """One buildable model: its HF config files and its tokenizer layout."""

    name: str
    # Exactly what goes into config.json / generation_config.json.
    config: dict[str, Any]
    generation_config: dict[str, Any]
    # Token id -> text; written at exactly these ids by write_tokenizer.
    special_tokens: dict[int, str]
    bos_token: str | None
    eos_token: str
    pad_token: str | None
    chat_template: str
    add_bos_token: bool


# Token texts shared by several presets.
_QWEN_ENDOFTEXT = "<|endoftext|>"
_QWEN_IM_START = "<|im_start|>"
_QWEN_IM_END = "<|im_end|>"
_DS_BOS = "<｜begin▁of▁sentence｜>"
_DS_EOS = "<｜end▁of▁sentence｜>"
_DS_PAD = "<｜▁pad▁｜>"

# Every tiny preset shares this scale so tests can reason about one vocab layout.
_TINY_VOCAB = 512
_TINY_COMMON: dict[str, Any] = {
    "vocab_size": _TINY_VOCAB, "hidden_size": 64, "num_hidden_layers": 3, "max_position_embeddings": 2048,
    "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02, "attention_dropout": 0.0,
    "use_cache": True, "torch_dtype": "bfloat16",
}


def _olmoe_1b_7b() -> Preset:
    # https://huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json
    config = {
        "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 1024, "max_position_embeddings": 4096,
        "model_type": "olmoe", "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16,
        "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 50304,
    }
    return Preset(
        name="olmoe-1b-7b", config=config,
        generation_config={"eos_token_id": 50279, "pad_token_id": 1},
        # OLMo's GPT-NeoX-derived tokenizer: PII placeholders at 0 and 50277/50278.
        special_tokens={
            0: "|||IP_ADDRESS|||",
            1: "<|padding|>",
            50277: "|||EMAIL_ADDRESS|||",
            50278: "|||PHONE_NUMBER|||",
            50279: "<|endoftext|>",
        },
        bos_token=None, eos_token="<|endoftext|>", pad_token="<|padding|>",
        chat_template=SIMPLE_TEMPLATE, add_bos_token=False,
    )


def _qwen15_moe_a27b() -> Preset:
    # https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json
    config = {
        "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192,
        "max_window_layers": 21, "model_type": "qwen2_moe", "moe_intermediate_size": 1408,
        "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
        "num_hidden_layers": 24, "num_key_value_heads": 16, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    }
    return Preset(
        name="qwen1.5-moe-a2.7b", config=config,
        generation_config={
            "bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048,
        },
        special_tokens={151643: _QWEN_ENDOFTEXT, 151644: _QWEN_IM_START, 151645: _QWEN_IM_END},
        bos_token=None, eos_token=_QWEN_ENDOFTEXT, pad_token=_QWEN_ENDOFTEXT,
        chat_template=CHATML_TEMPLATE, add_bos_token=False,
    )


def _qwen3_30b_a3b() -> Preset:
    # https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
        "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    }
    return Preset(
        name="qwen3-30b-a3b", config=config,
        # https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/generation_config.json
        generation_config={
            "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
            "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
        },
        special_tokens={151643: _QWEN_ENDOFTEXT, 151644: _QWEN_IM_START, 151645: _QWEN_IM_END},
        bos_token=None, eos_token=_QWEN_IM_END, pad_token=_QWEN_ENDOFTEXT,
        chat_template=CHATML_TEMPLATE, add_bos_token=False,
    )


def _deepseek_v2_lite() -> Preset:
    # https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json
    # (auto_map dropped so the native DeepseekV2ForCausalLM is used.)
    config = {
        "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
        "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
        "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
        "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096, "type": "yarn",
        },
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
        "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
    }
    return Preset(
        name="deepseek-v2-lite", config=config,
        generation_config={"bos_token_id": 100000, "eos_token_id": 100001},
        special_tokens={100000: _DS_BOS, 100001: _DS_EOS},
        bos_token=_DS_BOS,
        eos_token=_DS_EOS,
        # DeepSeek's tokenizer pads with its end-of-sentence token.
        pad_token=_DS_EOS,
        chat_template=SIMPLE_TEMPLATE, add_bos_token=True,
    )


def _mixtral_8x7b() -> Preset:
    # https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json
    config = {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
        "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 32000,
    }
    return Preset(
        name="mixtral-8x7b", config=config,
        generation_config={"bos_token_id": 1, "eos_token_id": 2},
        special_tokens={0: "<unk>", 1: "<s>", 2: "</s>"},
        bos_token="<s>", eos_token="</s>", pad_token=None,
        chat_template=SIMPLE_TEMPLATE, add_bos_token=True,
    )


def _tiny_mixtral() -> Preset:
    config = {
        **_TINY_COMMON, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "bos_token_id": 510, "eos_token_id": 511, "intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02, "sliding_window": None,
    }
    return Preset(
        name="tiny-mixtral", config=config,
        generation_config={"bos_token_id": 510, "eos_token_id": 511},
        special_tokens={509: "<unk>", 510: "<s>", 511: "</s>"},
        bos_token="<s>", eos_token="</s>", pad_token=None,
        chat_template=SIMPLE_TEMPLATE, add_bos_token=True,
    )


_TINY_QWEN_SPECIALS = {509: _QWEN_ENDOFTEXT, 510: _QWEN_IM_START, 511: _QWEN_IM_END}


def _tiny_qwen2_moe() -> Preset:
    config = {
        **_TINY_COMMON, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "bos_token_id": 509, "eos_token_id": 509, "decoder_sparse_step": 1,
        # Layer 1 is dense so the plain-MLP path of a MoE model is exercised too.
        "mlp_only_layers": [1], "intermediate_size": 128, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "max_window_layers": 3, "sliding_window": None, "use_sliding_window": False,
    }
    return Preset(
        name="tiny-qwen2-moe", config=config,
        generation_config={"bos_token_id": 509, "eos_token_id": 509},
        special_tokens=dict(_TINY_QWEN_SPECIALS),
        bos_token=None, eos_token=_QWEN_ENDOFTEXT, pad_token=_QWEN_ENDOFTEXT,
        chat_template=CHATML_TEMPLATE, add_bos_token=False,
    )


def _tiny_qwen3_moe() -> Preset:
    config = {
        **_TINY_COMMON, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": False, "bos_token_id": 509, "eos_token_id": 511, "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        # Deliberately not hidden_size / num_attention_heads (= 16), as in the real
        # model, so code that derives head_dim from the hidden size is caught.
        "head_dim": 32, "intermediate_size": 128, "moe_intermediate_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
        "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001, "max_window_layers": 3, "sliding_window": None,
        "use_sliding_window": False,
    }
    return Preset(
        name="tiny-qwen3-moe", config=config,
        # A list of stop ids, like the real Qwen3 generation config.
        generation_config={"bos_token_id": 509, "eos_token_id": [511, 509], "pad_token_id": 509},
        special_tokens=dict(_TINY_QWEN_SPECIALS),
        bos_token=None, eos_token=_QWEN_IM_END, pad_token=_QWEN_ENDOFTEXT,
        chat_template=CHATML_TEMPLATE, add_bos_token=False,
    )


def _tiny_olmoe() -> Preset:
    config = {
        **_TINY_COMMON, "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
        "attention_bias": False, "clip_qkv": None, "eos_token_id": 511, "pad_token_id": 510,
        "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": False, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01,
    }
    return Preset(
        name="tiny-olmoe", config=config,
        generation_config={"eos_token_id": 511, "pad_token_id": 510},
        special_tokens={509: "|||IP_ADDRESS|||", 510: "<|padding|>", 511: "<|endoftext|>"},
        bos_token=None, eos_token="<|endoftext|>", pad_token="<|padding|>",
        chat_template=SIMPLE_TEMPLATE, add_bos_token=False,
    )


_TINY_DS_SPECIALS = {509: _DS_BOS, 510: _DS_EOS, 511: _DS_PAD}
# Multi-head latent attention at tiny scale, shared by the V2 and V3 presets.
_TINY_MLA: dict[str, Any] = {
    "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8, "v_head_dim": 16, "attention_bias": False,
}


def _tiny_deepseek_v2() -> Preset:
    config = {
        **_TINY_COMMON, **_TINY_MLA, "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2", "bos_token_id": 509, "eos_token_id": 510, "pad_token_id": 511,
        "q_lora_rank": None, "intermediate_size": 96, "moe_intermediate_size": 32, "n_routed_experts": 8,
        "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        # Group-limited routing (as in full DeepSeek-V2) rather than the Lite's
        # plain greedy, so the grouped top-k path is the one under test.
        "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5,
        "scoring_func": "softmax", "norm_topk_prob": False, "aux_loss_alpha": 0.001, "seq_aux": True,
        "pretraining_tp": 1, "rms_norm_eps": 1e-06,
        # max_position_embeddings (2048) = factor * original, as in the real model.
        "rope_scaling": {
            "beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 0.707, "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 512, "type": "yarn",
        },
        "rope_theta": 10000,
    }
    return Preset(
        name="tiny-deepseek-v2", config=config,
        generation_config={"bos_token_id": 509, "eos_token_id": 510, "pad_token_id": 511},
        special_tokens=dict(_TINY_DS_SPECIALS),
        bos_token=_DS_BOS, eos_token=_DS_EOS, pad_token=_DS_PAD,
        chat_template=SIMPLE_TEMPLATE, add_bos_token=True,
    )


def _tiny_deepseek_v3() -> Preset:
    config = {
        **_TINY_COMMON, **_TINY_MLA, "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3", "bos_token_id": 509, "eos_token_id": 510, "pad_token_id": 511,
        "q_lora_rank": 24, "intermediate_size": 96, "moe_intermediate_size": 32, "n_routed_experts": 8,
        "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "topk_method": "noaux_tc", "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "norm_topk_prob": True, "ep_size": 1,
        # No multi-token-prediction head: the engine serves next-token decoding only.
        "num_nextn_predict_layers": 0, "rope_interleave": True, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 10000,
    }
    return Preset(
        name="tiny-deepseek-v3", config=config,
        generation_config={"bos_token_id": 509, "eos_token_id": 510, "pad_token_id": 511},
        special_tokens=dict(_TINY_DS_SPECIALS),
        bos_token=_DS_BOS, eos_token=_DS_EOS, pad_token=_DS_PAD,
        chat_template=SIMPLE_TEMPLATE, add_bos_token=True,
    )


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        _olmoe_1b_7b(),
        _qwen15_moe_a27b(),
        _qwen3_30b_a3b(),
        _deepseek_v2_lite(),
        _mixtral_8x7b(),
        _tiny_mixtral(),
        _tiny_qwen2_moe(),
        _tiny_qwen3_moe(),
        _tiny_olmoe(),
        _tiny_deepseek_v2(),
        _tiny_deepseek_v3(),
    )
}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``.

    The result is a deep copy, so callers may adjust its dicts (say, a smaller
    ``num_hidden_layers``) without changing :data:`PRESETS` for everyone else.
    """
    try:
        preset = PRESETS[name]
    except KeyError:
        valid = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown model preset {name!r}; valid presets: {valid}") from None
    return copy.deepcopy(preset)
