"""A model's whole batch-1 decode step as one megakernel chain (issue 4): its weights laid out as the chain's
families and norms, and the phases of every layer plus the final norm and lm_head (`decode_chain`). The step's
input is the new token's embedding row; its last phase's outputs are the logits.

OLMoE's shape only, for now: MHA with a 128-wide head, q/k RMSNorm over all heads ("full"), RoPE on halves, no
biases or clipping, softmax routing to the top k with no renormalization, no shared experts. Other models are
refused with the reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from crosspool.kernels.megakernel.plan import CHUNK, HEAD_DIM, ROWS, Phase
from crosspool.models.loader import AttentionWeights, FFNWeights
from crosspool.models.spec import ModelSpec

SLOT = 4 * CHUNK                                  # the values of a weight row in one 32-KiB ring slot


@dataclass
class DecodeChain:
    phases: list[Phase]
    families: list[torch.Tensor]  # attention rows + routers + lm_head [*, hidden]; experts' gate/up; their down
    norms: torch.Tensor           # per layer: input norm, post-attention norm, q norm, k norm; then the final norm
    eps: float

    @property
    def logits(self) -> int:
        return len(self.phases) - 1


def check_supported(spec: ModelSpec) -> None:
    """Raise ValueError naming what keeps this model off the megakernel."""
    r = spec.routing
    why = [
        (spec.attention != "mha", f"attention {spec.attention!r} (needs MHA)"),
        (spec.num_kv_heads != spec.num_heads, f"{spec.num_kv_heads} kv heads for {spec.num_heads} (needs MHA)"),
        (spec.head_dim != HEAD_DIM, f"head dim {spec.head_dim} (needs {HEAD_DIM})"),
        (spec.num_heads * spec.head_dim != spec.hidden_size, "q's width differs from the hidden size"),
        (spec.qk_norm not in ("full", "none"), f"q/k norm {spec.qk_norm!r}"),
        (spec.qkv_bias or spec.o_bias or spec.clip_qkv is not None, "attention biases or qkv clipping"),
        (spec.rope.interleaved or spec.rope.scaling == "yarn", "interleaved or YaRN RoPE"),
        (r is None or r.scoring != "softmax" or r.norm_topk_prob or r.topk_method != "greedy" or r.score_bias,
         "routing other than softmax, greedy top-k, no renormalization"),
        (not all(spec.moe_layers) or spec.shared_intermediate_size > 0, "dense layers or shared experts"),
        (spec.hidden_size % SLOT or spec.moe_intermediate_size % SLOT,
         f"hidden or expert sizes not multiples of {SLOT} (a ring slot's row)"),
        (spec.vocab_size % ROWS or (r is not None and r.num_experts % ROWS),
         f"vocabulary or expert count not multiples of {ROWS}"),
    ]
    reasons = [text for bad, text in why if bad]
    if reasons:
        raise ValueError(f"{spec.architecture}: not on the megakernel yet: " + "; ".join(reasons))


def family_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """The shapes of the chain's three weight families for this model (`decode_chain`): every layer's q, k, v,
    o_proj, R g and R g W_o rows, then lm_head's; the experts' gate/up rows; their down rows."""
    assert spec.routing is not None
    h, hd, n_exp, inter = spec.hidden_size, spec.num_heads * HEAD_DIM, spec.routing.num_experts, \
        spec.moe_intermediate_size
    layers = spec.num_layers
    return [(layers * (3 * hd + h + 2 * n_exp) + spec.vocab_size, h), (layers * n_exp * 2 * inter, h),
            (layers * n_exp * h, inter)]


def chain_bytes(spec: ModelSpec, itemsize: int = 2) -> int:
    """The bytes of the chain's weight families for this model: what its build allocates beside the model's own
    weights, which it frees layer by layer as they become views of the families."""
    return itemsize * sum(rows * cols for rows, cols in family_shapes(spec))


def decode_chain(spec: ModelSpec, attn: AttentionWeights, ffn: FFNWeights, splits: int = 4,
                 adopt: bool = False, fold_heads: bool = False, scatter_down: bool = False) -> DecodeChain:
    """The step's chain over the model's weights, copied into the chain's families (three tensors, filled layer by
    layer). The router is folded through the post-attention norm and o_proj, so the experts can be ranked while
    o_proj runs, not after it: with x = h + W_o a (h the layer's input, a the attention's output) and the norm's
    weights g, the router's logits are rstd(x) * (R g) x = rstd(x) * ((R g) h + (R g W_o) a). A phase of the rows
    R g reads h (beside QKV, on the last programs), and one of the rows R g W_o reads a with the first's outputs
    as its residual (beside o_proj, on the programs o_proj leaves free). The ranking needs no rstd (it scales
    every logit alike); the experts' weights take it from the gate/up's staging (`Phase.rms_of`). The folded
    logits differ from the engine's by about the engine's own bf16 rounding of them (session 19, on the step
    test's random weights: 0.01-0.05 off an fp64 router's logits of scale 5-10, the engine's 0.014-0.029).
    adopt=True: the model's own weight tensors (the router aside) then become views of the families (the same
    values), so the model and the chain hold one copy once the build is done (two during it). Only do that before
    anything captures a CUDA graph over the old tensors, and only where nothing else refers to them. Layer l's KV
    cache layer is l; attention heads are split `splits` ways. fold_heads=True: the R g W_o part is computed inside
    the attention's head combine instead (each head's combining split multiplies its output by its columns of
    R g W_o, `Phase.fold`), and a "heads" phase sums the heads' products with (R g) h: the logits are out once the
    last head is, not after a phase of their own (untimed, session 20). scatter_down=True: the down's items are one
    expert's 16 rows each, taken as the programs go and added into fp32 sums (`Phase.scatter`), not 16 rows of
    every expert (a 256-KB item a program, whose last slots stream after the staging: the down's programs finished
    over 10.7 us, session 23; untimed)."""
    check_supported(spec)
    assert spec.routing is not None
    h, hd, n_exp, inter = spec.hidden_size, spec.num_heads * HEAD_DIM, spec.routing.num_experts, \
        spec.moe_intermediate_size
    layers = len(attn.layers)
    rows_a = 3 * hd + h + 2 * n_exp                  # a layer's rows of family 0: q, k, v, o_proj, R g, R g W_o
    norms_a = 2 * h + 2 * hd                         # a layer's norm weights: input, post-attention, q, k
    like = attn.layers[0]["o_proj"]
    families = [torch.empty(shape, dtype=like.dtype, device=like.device)
                for shape in family_shapes(dataclasses.replace(spec, num_layers=layers))]

    def place(family: int, row: int, owner: dict[str, torch.Tensor], key: str) -> None:
        """Copy owner[key] into the family from `row` on; with adopt, owner[key] becomes that view."""
        w = owner[key]
        view = families[family][row:row + w.numel() // families[family].shape[1]]
        view.copy_(w.reshape(view.shape))
        if adopt and w.dtype == view.dtype:
            owner[key] = view.view(w.shape)

    ones = torch.ones(hd, dtype=like.dtype, device=like.device)    # q/k norm weights of a model without them
    norms: list[torch.Tensor] = []
    phases: list[Phase] = []
    resid = -1                                       # the residual stream: the step's input, then each down's sum
    for layer, (aw, fw) in enumerate(zip(attn.layers, ffn.layers, strict=True)):
        base, at = layer * rows_a, layer * norms_a               # this layer's rows and norms start here
        qkv = ["qkv_proj"] if "qkv_proj" in aw else ["q_proj", "k_proj", "v_proj"]    # (fused on the Triton path)
        for j, key in enumerate(qkv):
            place(0, base + j * hd, aw, key)
        place(0, base + 3 * hd, aw, "o_proj")
        # the folded router's two parts, from fp32 (the model keeps its own router for the graph of kernels)
        r_g = fw["router"].float() * aw["post_attention_layernorm"].float()[None, :]
        families[0][base + 3 * hd + h:base + 3 * hd + h + n_exp] = r_g
        families[0][base + 3 * hd + h + n_exp:base + rows_a] = r_g @ aw["o_proj"].float()
        place(1, layer * n_exp * 2 * inter, fw, "experts_gate_up")
        place(2, layer * n_exp * h, fw, "experts_down")
        norms += [aw["input_layernorm"], aw["post_attention_layernorm"], aw.get("q_norm", ones),
                  aw.get("k_norm", ones)]
        p = len(phases)
        phases += [
            Phase("sum", 0, base, 3 * hd, h, input=resid, norm=at),                                  # QKV
            Phase("sum", 0, base + 3 * hd + h, n_exp, h, input=resid, tail=True),                    # (R g) h
            Phase("attention", 0, layer, hd, HEAD_DIM, sources=splits, input=p,
                  norm=at + 2 * h if spec.qk_norm == "full" else -1, scale=spec.softmax_scale,
                  fold=base + 3 * hd + h + n_exp if fold_heads else -1, fold_rows=n_exp if fold_heads else 0),
            Phase("sum", 0, base + 3 * hd, h, hd, input=p + 2, residual=resid),                      # o_proj: x
            Phase("heads", 0, 0, n_exp, HEAD_DIM, input=p + 2, residual=p + 1, rms_of=p + 3, tail=True)
            if fold_heads else
            Phase("sum", 0, base + 3 * hd + h + n_exp, n_exp, hd, input=p + 2, residual=p + 1, rms_of=p + 3,
                  tail=True),                                                                        # the router
            Phase("swiglu", 1, layer * n_exp * 2 * inter, spec.routing.top_k * inter, h, sources=spec.routing.top_k,
                  stride=2 * inter, up_offset=inter, input=p + 3, norm=at + h, route=p + 4),
            Phase("sum", 2, layer * n_exp * h, h, inter, sources=spec.routing.top_k, stride=h, input=p + 5,
                  residual=p + 3, route=p + 4, scatter=scatter_down),
        ]
        resid = p + 6
    norms.append(attn.final_norm)
    phases.append(Phase("sum", 0, layers * rows_a, spec.vocab_size, h, input=resid, norm=layers * norms_a))
    head = {"lm_head": attn.lm_head}
    place(0, layers * rows_a, head, "lm_head")
    if adopt:                                        # a tied embedding stays tied: both become the one view
        tied = attn.embed.untyped_storage().data_ptr() == attn.lm_head.untyped_storage().data_ptr()
        attn.lm_head = head["lm_head"]
        if tied and attn.embed.shape == attn.lm_head.shape:
            attn.embed = attn.lm_head
    return DecodeChain(phases, families, torch.cat(norms), spec.rms_norm_eps)


class DecodeStep:
    """A model's batch-1 decode step as one megakernel launch over the engine's KV cache (`kv`, [blocks, layers, 2,
    BLOCK, heads, HEAD_DIM]), graph-capturable. The launch reads the step where the engine keeps it: the context
    length (`context_len`, [1]) and block table (`block_table`, [max_blocks]) from the engine's buffers (int64 or
    int32), and RoPE cos/sin of the new position from `cos` / `sin` ([1, HEAD_DIM // 2] fp32), which the engine's
    embedding kernel fills. The model's weights become views of the chain's (`decode_chain(adopt=True)`): build it
    before any CUDA graph is captured over the model. `dynamic`: the programs take the gate/up items from counters
    as they go (`Chain(dynamic=True)`; 1,004-1,011 us a step against 1,041-1,045 with a fixed split, session 18);
    `splits`: each attention head's context in 8 parts (890-898 us a step against 906-910 with 4, session 20);
    `stages`: a ring of 3 slots of 32 KB (875-888 us a step against 890-907 with 6, session 23: fewer bytes in
    flight a program, shorter waits for the loads a phase boundary makes);
    `prefer_l1`: the kernel's shared-memory carveout at what it uses, the rest of the SM's memory L1 (864-873 us a
    step against 879-886 with Triton's most shared memory, session 25);
    `dynamic_sums`, `lean_release`, `rank_keys`, `counted_polls` and `prefer_l1` as `Chain`'s; `fold_heads` and
    `scatter_down` as `decode_chain`'s."""

    def __init__(self, spec: ModelSpec, attn: AttentionWeights, ffn: FFNWeights, kv: torch.Tensor,
                 context_len: torch.Tensor, block_table: torch.Tensor, splits: int = 8, stages: int = 3,
                 warps: int = 8, dynamic: bool = True, dynamic_sums: bool = False,
                 lean_release: bool = False, rank_keys: bool = True, counted_polls: bool = False,
                 fold_heads: bool = False, scatter_down: bool = False, prefer_l1: bool = True) -> None:
        from crosspool.kernels.megakernel.chain import Chain

        d = decode_chain(spec, attn, ffn, splits, adopt=True, fold_heads=fold_heads, scatter_down=scatter_down)
        self.chain = Chain(d.phases, d.families, spec.hidden_size, stages=stages, warps=warps, norms=d.norms,
                           eps=d.eps, kv=kv, max_blocks=block_table.numel(), dynamic=dynamic,
                           dynamic_sums=dynamic_sums, lean_release=lean_release, rank_keys=rank_keys,
                           counted_polls=counted_polls, prefer_l1=prefer_l1)
        self.cos = torch.ones(1, HEAD_DIM // 2, dtype=torch.float32, device=kv.device)
        self.sin = torch.zeros(1, HEAD_DIM // 2, dtype=torch.float32, device=kv.device)
        self.chain.bind_step(context_len, block_table, self.cos[0], self.sin[0])

    def run(self, embed_row: torch.Tensor) -> torch.Tensor:
        """Launch the step on the new token's embedding row ([hidden], bf16 or fp32; at position context_len - 1,
        whose cos/sin are in `cos` / `sin`), and return its logits: fp32 [1, vocab], rewritten by every launch."""
        self.chain.run(embed_row)
        return self.chain.last[None]
