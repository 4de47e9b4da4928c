"""Model spec: the one description of an MoE model that every other room reads.

`ModelSpec.from_hf_config` turns an HF `config.json` dict into a flat, validated description of the
architecture (attention kind, routing rule, which layers are MoE, RoPE). Nothing else in CrossPool
parses HF configs. `checkpoint_layout` lists every tensor a checkpoint of the spec holds, by its hub
name, shape and pool side; the loader checks against it and `make-model` writes exactly it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

ATTENTION_SIDE = "attention"
FFN_SIDE = "ffn"

# HF architecture name -> our family name.
ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}


class UnsupportedModelError(ValueError):
    """The checkpoint asks for an architecture or a config field CrossPool does not implement."""


@dataclass(frozen=True, slots=True)
class RopeSpec:
    dim: int                       # rotated dims per head
    theta: float
    interleaved: bool              # DeepSeek rotates pairs (x0, x1), others rotate halves
    scaling: str = "default"       # "default" | "yarn"
    factor: float = 1.0
    original_max_position: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def cos_sin_scale(self) -> float:
        """Factor YaRN multiplies into cos/sin (1.0 without scaling)."""
        if self.scaling != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor, 1.0)


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True, slots=True)
class RoutingSpec:
    num_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid"]
    norm_topk_prob: bool
    topk_method: Literal["greedy", "group_limited_greedy", "noaux_tc"]
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    score_bias: bool = False       # DeepSeek-V3 e_score_correction_bias
    router_fp32: bool = False      # DeepSeek computes router logits in fp32


@dataclass(frozen=True, slots=True)
class ModelSpec:
    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int                  # q/k head dim (MLA: nope + rope)
    v_head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeSpec
    softmax_scale: float
    attention: Literal["mha", "mla"]
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: Literal["none", "head", "full"] = "none"
    clip_qkv: float | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    moe_layers: tuple[bool, ...] = ()
    intermediate_size: int = 0     # dense MLP layers
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    routing: RoutingSpec | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived sizes used by the KV cache -------------------------------------------------
    @property
    def kv_cache_entries(self) -> tuple[int, int, int]:
        """(tensors per layer, heads, dim) of one token's cache: MHA caches K and V per kv head,
        MLA caches one latent vector (compressed kv + rotated k) shared by all heads."""
        if self.attention == "mla":
            return 1, 1, self.kv_lora_rank + self.qk_rope_head_dim
        return 2, self.num_kv_heads, self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        n, heads, dim = self.kv_cache_entries
        return self.num_layers * n * heads * dim * dtype_bytes

    @staticmethod
    def from_hf_config(cfg: dict[str, Any]) -> ModelSpec:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"CrossPool supports {sorted(ARCHITECTURES)}"
            )
        family = ARCHITECTURES[arch]
        return _PARSERS[family](cfg, arch)


# ------------------------------------------------------------------------------------------------
# Field helpers

def _req(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise UnsupportedModelError(f"config.json is missing required field {key!r}")
    return cfg[key]


def _reject(cfg: dict[str, Any], key: str, allowed: tuple[Any, ...], why: str = "") -> None:
    if key in cfg and cfg[key] not in allowed:
        raise UnsupportedModelError(
            f"unsupported config field {key}={cfg[key]!r} (supported: {list(allowed)}){why}"
        )


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """Merge hub-style (`rope_theta` + `rope_scaling`) and transformers-5 style (`rope_parameters`)."""
    params: dict[str, Any] = {}
    if isinstance(cfg.get("rope_parameters"), dict):
        params.update(cfg["rope_parameters"])
    if isinstance(cfg.get("rope_scaling"), dict):
        params.update(cfg["rope_scaling"])
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def _rope(cfg: dict[str, Any], dim: int, interleaved: bool) -> RopeSpec:
    p = _rope_params(cfg)
    kind = p["rope_type"]
    if kind == "default":
        return RopeSpec(dim=dim, theta=float(p["rope_theta"]), interleaved=interleaved)
    if kind != "yarn":
        raise UnsupportedModelError(f"unsupported config field rope_scaling.type={kind!r} (supported: yarn)")
    orig = p.get("original_max_position_embeddings") or _req(cfg, "max_position_embeddings")
    factor = p.get("factor") or _req(cfg, "max_position_embeddings") / orig
    return RopeSpec(
        dim=dim, theta=float(p["rope_theta"]), interleaved=interleaved, scaling="yarn",
        factor=float(factor), original_max_position=int(orig),
        beta_fast=float(p.get("beta_fast") or 32), beta_slow=float(p.get("beta_slow") or 1),
        mscale=p.get("mscale"), mscale_all_dim=p.get("mscale_all_dim"),
        attention_factor=p.get("attention_factor"), truncate=bool(p.get("truncate", True)),
    )


def _eos(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(cfg: dict[str, Any], arch: str, family: str) -> dict[str, Any]:
    _reject(cfg, "hidden_act", ("silu",))
    return dict(
        family=family, architecture=arch,
        vocab_size=int(_req(cfg, "vocab_size")), hidden_size=int(_req(cfg, "hidden_size")),
        num_layers=int(_req(cfg, "num_hidden_layers")), num_heads=int(_req(cfg, "num_attention_heads")),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(_req(cfg, "max_position_embeddings")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=_eos(cfg), bos_token_id=cfg.get("bos_token_id"),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
    )


def _softmax_routing(cfg: dict[str, Any], num_experts: int, norm_default: bool) -> RoutingSpec:
    return RoutingSpec(
        num_experts=num_experts, top_k=int(_req(cfg, "num_experts_per_tok")), scoring="softmax",
        norm_topk_prob=bool(cfg.get("norm_topk_prob", norm_default)), topk_method="greedy",
    )


def _gqa_dims(cfg: dict[str, Any]) -> tuple[int, int]:
    heads = int(_req(cfg, "num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise UnsupportedModelError(f"num_attention_heads={heads} not a multiple of num_key_value_heads={kv_heads}")
    head_dim = int(cfg.get("head_dim") or int(_req(cfg, "hidden_size")) // heads)
    return kv_heads, head_dim


def _no_sliding_window(cfg: dict[str, Any]) -> None:
    if cfg.get("use_sliding_window", cfg.get("sliding_window") is not None) and cfg.get("sliding_window"):
        raise UnsupportedModelError(
            f"unsupported config field sliding_window={cfg['sliding_window']!r} (only full attention)"
        )


def _sparse_layers(cfg: dict[str, Any], n_layers: int) -> tuple[bool, ...]:
    """Qwen-style layer selection: `mlp_only_layers` and `decoder_sparse_step`."""
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(n_layers))


# ------------------------------------------------------------------------------------------------
# Families

def _parse_mixtral(cfg: dict[str, Any], arch: str) -> ModelSpec:
    _no_sliding_window(cfg)
    kv_heads, head_dim = _gqa_dims(cfg)
    common = _common(cfg, arch, "mixtral")
    routing = RoutingSpec(
        num_experts=int(_req(cfg, "num_local_experts")), top_k=int(_req(cfg, "num_experts_per_tok")),
        scoring="softmax", norm_topk_prob=True, topk_method="greedy",
    )
    return ModelSpec(
        **common, num_kv_heads=kv_heads, head_dim=head_dim, v_head_dim=head_dim,
        rope=_rope(cfg, head_dim, interleaved=False), softmax_scale=head_dim**-0.5, attention="mha",
        moe_layers=(True,) * common["num_layers"], moe_intermediate_size=int(_req(cfg, "intermediate_size")),
        routing=routing,
    )


def _parse_qwen2_moe(cfg: dict[str, Any], arch: str) -> ModelSpec:
    _no_sliding_window(cfg)
    kv_heads, head_dim = _gqa_dims(cfg)
    common = _common(cfg, arch, "qwen2_moe")
    return ModelSpec(
        **common, num_kv_heads=kv_heads, head_dim=head_dim, v_head_dim=head_dim,
        rope=_rope(cfg, head_dim, interleaved=False), softmax_scale=head_dim**-0.5, attention="mha",
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        moe_layers=_sparse_layers(cfg, common["num_layers"]),
        intermediate_size=int(_req(cfg, "intermediate_size")),
        moe_intermediate_size=int(_req(cfg, "moe_intermediate_size")),
        shared_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
        shared_expert_gate=bool(cfg.get("shared_expert_intermediate_size")),
        routing=_softmax_routing(cfg, int(_req(cfg, "num_experts")), norm_default=False),
    )


def _parse_qwen3_moe(cfg: dict[str, Any], arch: str) -> ModelSpec:
    _no_sliding_window(cfg)
    kv_heads, head_dim = _gqa_dims(cfg)
    common = _common(cfg, arch, "qwen3_moe")
    bias = bool(cfg.get("attention_bias", False))
    return ModelSpec(
        **common, num_kv_heads=kv_heads, head_dim=head_dim, v_head_dim=head_dim,
        rope=_rope(cfg, head_dim, interleaved=False), softmax_scale=head_dim**-0.5, attention="mha",
        qkv_bias=bias, o_bias=bias, qk_norm="head",
        moe_layers=_sparse_layers(cfg, common["num_layers"]),
        intermediate_size=int(_req(cfg, "intermediate_size")),
        moe_intermediate_size=int(_req(cfg, "moe_intermediate_size")),
        routing=_softmax_routing(cfg, int(_req(cfg, "num_experts")), norm_default=True),
    )


def _parse_olmoe(cfg: dict[str, Any], arch: str) -> ModelSpec:
    kv_heads, head_dim = _gqa_dims(cfg)
    common = _common(cfg, arch, "olmoe")
    bias = bool(cfg.get("attention_bias", False))
    clip = cfg.get("clip_qkv")
    return ModelSpec(
        **common, num_kv_heads=kv_heads, head_dim=head_dim, v_head_dim=head_dim,
        rope=_rope(cfg, head_dim, interleaved=False), softmax_scale=head_dim**-0.5, attention="mha",
        qkv_bias=bias, o_bias=bias, qk_norm="full", clip_qkv=float(clip) if clip is not None else None,
        moe_layers=(True,) * common["num_layers"], moe_intermediate_size=int(_req(cfg, "intermediate_size")),
        routing=_softmax_routing(cfg, int(_req(cfg, "num_experts")), norm_default=False),
    )


def _parse_deepseek(cfg: dict[str, Any], arch: str) -> ModelSpec:
    family = ARCHITECTURES[arch]
    v3 = family == "deepseek_v3"
    common = _common(cfg, arch, family)
    n_layers = common["num_layers"]
    nope, rope_dim = int(_req(cfg, "qk_nope_head_dim")), int(_req(cfg, "qk_rope_head_dim"))
    v_dim = int(_req(cfg, "v_head_dim"))
    q_lora = cfg.get("q_lora_rank")
    if v3:
        _reject(cfg, "scoring_func", ("sigmoid",))
        _reject(cfg, "topk_method", ("noaux_tc",))
    else:
        _reject(cfg, "scoring_func", ("softmax",))
        _reject(cfg, "topk_method", ("greedy", "group_limited_greedy"))
    n_experts = int(_req(cfg, "n_routed_experts"))
    n_group = int(cfg.get("n_group") or 1)
    if n_experts % n_group:
        raise UnsupportedModelError(f"n_routed_experts={n_experts} not divisible by n_group={n_group}")
    routing = RoutingSpec(
        num_experts=n_experts, top_k=int(_req(cfg, "num_experts_per_tok")),
        scoring="sigmoid" if v3 else "softmax",
        # transformers' DeepSeek-V2 never renormalises top-k weights; V3 follows norm_topk_prob.
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)) if v3 else False,
        topk_method="noaux_tc" if v3 else cfg.get("topk_method", "greedy"),
        n_group=n_group, topk_group=int(cfg.get("topk_group") or 1),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        score_bias=v3, router_fp32=True,
    )
    first_dense = int(cfg.get("first_k_dense_replace", 0))
    freq = int(cfg.get("moe_layer_freq", 1) or 1)
    if freq != 1:
        raise UnsupportedModelError(f"unsupported config field moe_layer_freq={freq} (supported: [1])")
    rope = _rope(cfg, rope_dim, interleaved=bool(cfg.get("rope_interleave", True)) if v3 else True)
    scale = (nope + rope_dim) ** -0.5
    if rope.scaling == "yarn" and rope.mscale_all_dim:
        m = _yarn_mscale(rope.factor, float(rope.mscale_all_dim))
        scale *= m * m
    n_shared = int(cfg.get("n_shared_experts") or 0)
    bias = bool(cfg.get("attention_bias", False))
    return ModelSpec(
        **common, num_kv_heads=int(cfg.get("num_key_value_heads") or common["num_heads"]),
        head_dim=nope + rope_dim, v_head_dim=v_dim, rope=rope, softmax_scale=scale, attention="mla",
        qkv_bias=bias, o_bias=bias,
        q_lora_rank=int(q_lora) if q_lora else None, kv_lora_rank=int(_req(cfg, "kv_lora_rank")),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim,
        moe_layers=tuple(i >= first_dense for i in range(n_layers)),
        intermediate_size=int(_req(cfg, "intermediate_size")),
        moe_intermediate_size=int(_req(cfg, "moe_intermediate_size")),
        shared_intermediate_size=n_shared * int(_req(cfg, "moe_intermediate_size")),
        routing=routing,
    )


_PARSERS = {
    "mixtral": _parse_mixtral,
    "qwen2_moe": _parse_qwen2_moe,
    "qwen3_moe": _parse_qwen3_moe,
    "olmoe": _parse_olmoe,
    "deepseek_v2": _parse_deepseek,
    "deepseek_v3": _parse_deepseek,
}


# ------------------------------------------------------------------------------------------------
# Checkpoint layout

@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    side: str                      # ATTENTION_SIDE | FFN_SIDE
    kind: str                      # "embed" | "norm" | "linear" | "bias" | "router" | "score_bias"


def _expert_names(spec: ModelSpec, layer: int, e: int) -> tuple[str, str, str]:
    """Hub names of one expert's (gate, up, down) projections."""
    if spec.family == "mixtral":
        p = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
        return f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"
    p = f"model.layers.{layer}.mlp.experts.{e}"
    return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"


def router_name(spec: ModelSpec, layer: int) -> str:
    if spec.family == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"
    return f"model.layers.{layer}.mlp.gate.weight"


def expert_names(spec: ModelSpec, layer: int, e: int) -> tuple[str, str, str]:
    return _expert_names(spec, layer, e)


def shared_expert_prefix(spec: ModelSpec, layer: int) -> str:
    if spec.family == "qwen2_moe":
        return f"model.layers.{layer}.mlp.shared_expert"
    return f"model.layers.{layer}.mlp.shared_experts"


def _attention_tensors(spec: ModelSpec, layer: int) -> list[TensorSpec]:
    p = f"model.layers.{layer}.self_attn"
    h, a = spec.hidden_size, ATTENTION_SIDE
    out: list[TensorSpec] = []

    def lin(name: str, rows: int, cols: int, bias: bool) -> None:
        out.append(TensorSpec(f"{p}.{name}.weight", (rows, cols), a, "linear"))
        if bias:
            out.append(TensorSpec(f"{p}.{name}.bias", (rows,), a, "bias"))

    if spec.attention == "mla":
        qk = spec.head_dim
        if spec.q_lora_rank:
            lin("q_a_proj", spec.q_lora_rank, h, spec.qkv_bias)
            out.append(TensorSpec(f"{p}.q_a_layernorm.weight", (spec.q_lora_rank,), a, "norm"))
            lin("q_b_proj", spec.num_heads * qk, spec.q_lora_rank, False)
        else:
            lin("q_proj", spec.num_heads * qk, h, False)
        lin("kv_a_proj_with_mqa", spec.kv_lora_rank + spec.qk_rope_head_dim, h, spec.qkv_bias)
        out.append(TensorSpec(f"{p}.kv_a_layernorm.weight", (spec.kv_lora_rank,), a, "norm"))
        lin("kv_b_proj", spec.num_heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank, False)
        lin("o_proj", h, spec.num_heads * spec.v_head_dim, spec.o_bias)
        return out
    d, kvh = spec.head_dim, spec.num_kv_heads
    lin("q_proj", spec.num_heads * d, h, spec.qkv_bias)
    lin("k_proj", kvh * d, h, spec.qkv_bias)
    lin("v_proj", kvh * d, h, spec.qkv_bias)
    lin("o_proj", h, spec.num_heads * d, spec.o_bias)
    if spec.qk_norm == "head":
        out += [TensorSpec(f"{p}.q_norm.weight", (d,), a, "norm"), TensorSpec(f"{p}.k_norm.weight", (d,), a, "norm")]
    elif spec.qk_norm == "full":
        out += [TensorSpec(f"{p}.q_norm.weight", (spec.num_heads * d,), a, "norm"),
                TensorSpec(f"{p}.k_norm.weight", (kvh * d,), a, "norm")]
    return out


def _mlp_tensors(prefix: str, hidden: int, inter: int) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.gate_proj.weight", (inter, hidden), FFN_SIDE, "linear"),
        TensorSpec(f"{prefix}.up_proj.weight", (inter, hidden), FFN_SIDE, "linear"),
        TensorSpec(f"{prefix}.down_proj.weight", (hidden, inter), FFN_SIDE, "linear"),
    ]


def _ffn_tensors(spec: ModelSpec, layer: int) -> list[TensorSpec]:
    h = spec.hidden_size
    if not spec.moe_layers[layer]:
        return _mlp_tensors(f"model.layers.{layer}.mlp", h, spec.intermediate_size)
    assert spec.routing is not None
    out = [TensorSpec(router_name(spec, layer), (spec.routing.num_experts, h), FFN_SIDE, "router")]
    if spec.routing.score_bias:
        out.append(TensorSpec(f"model.layers.{layer}.mlp.gate.e_score_correction_bias",
                              (spec.routing.num_experts,), FFN_SIDE, "score_bias"))
    i = spec.moe_intermediate_size
    for e in range(spec.routing.num_experts):
        g, u, d = _expert_names(spec, layer, e)
        out += [TensorSpec(g, (i, h), FFN_SIDE, "linear"), TensorSpec(u, (i, h), FFN_SIDE, "linear"),
                TensorSpec(d, (h, i), FFN_SIDE, "linear")]
    if spec.shared_intermediate_size:
        out += _mlp_tensors(shared_expert_prefix(spec, layer), h, spec.shared_intermediate_size)
    if spec.shared_expert_gate:
        out.append(TensorSpec(f"model.layers.{layer}.mlp.shared_expert_gate.weight", (1, h), FFN_SIDE, "router"))
    return out


def checkpoint_layout(spec: ModelSpec) -> list[TensorSpec]:
    """Every tensor of a hub checkpoint of `spec`, in hub order."""
    h, a = spec.hidden_size, ATTENTION_SIDE
    out = [TensorSpec("model.embed_tokens.weight", (spec.vocab_size, h), a, "embed")]
    for layer in range(spec.num_layers):
        out.append(TensorSpec(f"model.layers.{layer}.input_layernorm.weight", (h,), a, "norm"))
        out += _attention_tensors(spec, layer)
        out.append(TensorSpec(f"model.layers.{layer}.post_attention_layernorm.weight", (h,), a, "norm"))
        out += _ffn_tensors(spec, layer)
    out.append(TensorSpec("model.norm.weight", (h,), a, "norm"))
    if not spec.tie_word_embeddings:
        out.append(TensorSpec("lm_head.weight", (spec.vocab_size, h), a, "linear"))
    return out
