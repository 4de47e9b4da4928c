"""A whole decode step as one megakernel chain (`megakernel.step`): its reference against the engine's torch path
on the same weights and cache (issue 4)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosspool.kernels import megakernel as mk
from crosspool.kernels import torch_ref
from crosspool.kernels.megakernel.step import DecodeStep, chain_bytes, check_supported, decode_chain
from crosspool.models.attention_side import AttentionSide
from crosspool.models.batch import ForwardBatch
from crosspool.models.ffn_side import FFNSide
from crosspool.models.loader import AttentionWeights, FFNWeights
from crosspool.models.model import MoEModel
from crosspool.models.presets import get_preset
from crosspool.models.spec import ModelSpec

BS = mk.BLOCK


def _spec(top_k: int = 2) -> ModelSpec:
    """OLMoE in small, with the megakernel's shapes: 8 heads of 128, hidden 1024, 16 experts of 1024, top 2."""
    cfg = get_preset("olmoe-1b-7b").config | {"num_hidden_layers": 2, "hidden_size": 1024, "num_attention_heads": 8,
                                              "num_key_value_heads": 8, "intermediate_size": 1024, "num_experts": 16,
                                              "num_experts_per_tok": top_k, "vocab_size": 512}
    return ModelSpec.from_hf_config(cfg)


def _weights(spec: ModelSpec, seed: int) -> tuple[AttentionWeights, FFNWeights]:
    g = torch.Generator().manual_seed(seed)
    h, i, e = spec.hidden_size, spec.moe_intermediate_size, spec.routing.num_experts

    def rand(*shape: int, std: float = 0.8) -> torch.Tensor:    # std for unit rows: divided by sqrt(row length)
        return (torch.randn(*shape, generator=g) * std / shape[-1] ** 0.5).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:
        return (1 + 0.2 * torch.randn(n, generator=g)).to(torch.bfloat16)

    layers = [{"q_proj": rand(h, h), "k_proj": rand(h, h), "v_proj": rand(h, h), "o_proj": rand(h, h),
               "q_norm": norm(h), "k_norm": norm(h), "input_layernorm": norm(h),
               "post_attention_layernorm": norm(h)} for _ in range(spec.num_layers)]
    ffn = [{"router": rand(e, h, std=3.2), "experts_gate_up": rand(e, 2 * i, h), "experts_down": rand(e, h, i)}
           for _ in range(spec.num_layers)]
    attn = AttentionWeights(rand(spec.vocab_size, h, std=h ** 0.5), norm(h), rand(spec.vocab_size, h), layers)
    return attn, FFNWeights(layers=ffn)


class _Cache:
    """The engine's KV layout [blocks, layers, 2, BLOCK, heads, dim], as the torch path's PagedCache."""

    block_size = BS

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv

    def layer(self, layer: int) -> list[torch.Tensor]:
        return [self.kv[:, layer, 0], self.kv[:, layer, 1]]


def _batch(ids: list[int], start: int, table: torch.Tensor) -> ForwardBatch:
    """One sequence's tokens at positions start.., its cache at the blocks of `table`."""
    pos = torch.arange(start, start + len(ids))
    ctx = start + len(ids)
    return ForwardBatch(torch.tensor(ids), pos, torch.zeros_like(pos), table[pos // BS].long() * BS + pos % BS,
                        table[None].long(), torch.tensor([ctx]), torch.tensor([len(ids) - 1]),
                        max_q_len=len(ids), max_context_len=ctx)


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("prompt_len", [5, 40])
def test_decode_chain_matches_the_engines_torch_path(prompt_len: int, fold: bool) -> None:
    """The chain's reference against the engine's torch path on one decode step; fold: the router's o_proj part
    computed in the attention's head combine and summed by a "heads" phase (`decode_chain(fold_heads=True)`)."""
    spec = _spec()
    attn, ffn = _weights(spec, 0)
    chain = decode_chain(spec, attn, ffn, splits=2, fold_heads=fold)
    if fold:                                         # the router's phase sums the heads' products, with no weights
        assert sum(ph.kind == "heads" for ph in chain.phases) == spec.num_layers
        assert all(ph.fold_rows == spec.routing.num_experts for ph in chain.phases if ph.kind == "attention")
    model = MoEModel(spec, AttentionSide(spec, attn, "torch"), FFNSide(spec, ffn, "torch"))
    g = torch.Generator().manual_seed(prompt_len)
    blocks = 8
    kv = torch.zeros(blocks, spec.num_layers, 2, BS, spec.num_heads, mk.HEAD_DIM, dtype=torch.bfloat16)
    table = torch.randperm(blocks, generator=g).to(torch.int32)
    cache = _Cache(kv)
    ids = torch.randint(0, spec.vocab_size, (prompt_len + 1,), generator=g).tolist()
    model.forward(_batch(ids[:-1], 0, table), cache)                      # prefill: the cache holds the prompt
    before = kv.clone()
    want = model.compute_logits(model.forward(_batch(ids[-1:], prompt_len, table), cache))[0].float()
    ctx = prompt_len + 1
    cos, sin = torch_ref.rope_cos_sin(spec.rope, torch.tensor([ctx - 1]), torch_ref.rope_inv_freq(spec.rope))
    step = mk.Step(before, table, ctx, cos[0], sin[0])
    x = attn.embed[ids[-1]].float()
    outs = mk.reference(chain.phases, chain.families, x, chain.norms, chain.eps, step=step)
    got = outs[chain.logits]
    # the engine rounds every op to bf16 (scores, probabilities, each expert's rows); the chain keeps sums in fp32
    err = (got - want).abs().max() / want.abs().max()
    # 5-7e-3 here; a wrong q or post-attention norm, 2.7e-2 or more
    assert err < 1.5e-2, f"logits off by {err:.2e} of their scale"
    assert got.argmax() == want.argmax() or want.topk(2).values.diff().abs().item() < 3e-2 * want.abs().max()
    # the new token's key/value: layer 0's from the step's input, value by value; a later layer's from the layers
    # before, whose rounding it carries (the chain folds the router, the engine rounds every op), so against its
    # scale, as the logits: 3e-3 at layer 0 and 5e-3-1.5e-2 at layer 1 over 8 seeds, folded router or not
    torch.testing.assert_close(step.kv[:, 0].float(), kv[:, 0].float(), rtol=2e-2, atol=2e-2)
    for layer in range(1, spec.num_layers):
        got_kv, want_kv = step.kv[:, layer].float(), kv[:, layer].float()
        assert (got_kv - want_kv).abs().max() < 2.5e-2 * want_kv.abs().max(), f"layer {layer}'s new key/value"
    mk.plan(chain.phases, chain.families, spec.hidden_size, chain.norms.numel())      # and the kernel takes it


def test_folded_router_ranks_the_experts_of_the_unfolded_one() -> None:
    """decode_chain(fold_heads=True) against the default chain on the same step: the same experts, and every
    phase's outputs within bf16 rounding (the heads' products are summed in fp32, then rounded once)."""
    spec = _spec(4)
    attn, ffn = _weights(spec, 1)
    g = torch.Generator().manual_seed(3)
    kv = (torch.randn(64, spec.num_layers, 2, BS, spec.num_heads, mk.HEAD_DIM, generator=g) * 0.5).to(torch.bfloat16)
    table = torch.randperm(64, generator=g).to(torch.int32)
    cos, sin = torch_ref.rope_cos_sin(spec.rope, torch.tensor([299]), torch_ref.rope_inv_freq(spec.rope))
    outs = []
    for fold in (False, True):
        dc = decode_chain(spec, attn, ffn, splits=2, fold_heads=fold)
        outs.append((dc, mk.reference(dc.phases, dc.families, attn.embed[7].float(), dc.norms, dc.eps,
                                      step=mk.Step(kv.clone(), table, 300, cos[0], sin[0]))))
    (plain, a), (folded, b) = outs
    for j, (ph, x, y) in enumerate(zip(folded.phases, a, b, strict=True)):
        if ph.kind == "attention":                   # (the fold's products follow the combined heads)
            heads = ph.out_rows // mk.HEAD_DIM
            assert y.numel() == x.numel() + heads * ph.fold_rows
            y = y[:x.numel()]
        assert plain.phases[j].kind == ph.kind or (plain.phases[j].kind, ph.kind) == ("sum", "heads")
        torch.testing.assert_close(y, x, rtol=2e-2, atol=2e-2 * x.abs().max().item(), msg=f"phase {j}")
    for j, ph in enumerate(folded.phases):
        if ph.route != mk.NO_PHASE:                  # the same experts: the routers' top k agree
            k = ph.sources
            assert set(a[ph.route].topk(k).indices.tolist()) == set(b[ph.route].topk(k).indices.tolist()), j


def test_plan_refuses_a_heads_phase_without_its_fold() -> None:
    spec = _spec()
    attn, ffn = _weights(spec, 0)
    dc = decode_chain(spec, attn, ffn, splits=2, fold_heads=True)
    att = next(j for j, ph in enumerate(dc.phases) if ph.kind == "attention")
    heads = next(j for j, ph in enumerate(dc.phases) if ph.kind == "heads")

    def with_phase(j: int, **change: object) -> list[mk.Phase]:
        return [dataclasses.replace(ph, **change) if i == j else ph for i, ph in enumerate(dc.phases)]

    for phases, match in ((with_phase(att, fold=-1, fold_rows=0), "attention phase with a fold"),
                          (with_phase(heads, input=att - 1), "attention phase with a fold"),
                          (with_phase(heads, norm=0), "no norm"),
                          (with_phase(att, fold_rows=8), "a multiple of 16"),
                          (with_phase(att, fold=dc.families[0].shape[0] - 8), "from row")):
        with pytest.raises(ValueError, match=match):
            mk.plan(phases, dc.families, spec.hidden_size, dc.norms.numel())


def test_decode_chain_adopts_the_models_weights_without_changing_its_outputs() -> None:
    """adopt=True: the model's weight tensors become views of the chain's families (one copy between the model and
    the megakernel; a tied embedding stays tied), with their values, and the model's logits do not move."""
    spec = _spec()
    attn, ffn = _weights(spec, 0)
    attn.embed = attn.lm_head                                        # tied, as many checkpoints are
    model = MoEModel(spec, AttentionSide(spec, attn, "torch"), FFNSide(spec, ffn, "torch"))
    table = torch.arange(4, dtype=torch.int32)
    ids = torch.randint(0, spec.vocab_size, (9,), generator=torch.Generator().manual_seed(1)).tolist()

    def logits() -> torch.Tensor:
        kv = torch.zeros(4, spec.num_layers, 2, BS, spec.num_heads, mk.HEAD_DIM, dtype=torch.bfloat16)
        return model.compute_logits(model.forward(_batch(ids, 0, table), _Cache(kv)))

    # (the router is folded into two other matrices: the model keeps its own, unchanged)
    keys = ("q_proj", "k_proj", "v_proj", "o_proj", "experts_gate_up", "experts_down")
    before = [{k: v.clone() for k, v in (a | f).items() if k in keys}
              for a, f in zip(attn.layers, ffn.layers, strict=True)]
    routers = [f["router"].clone() for f in ffn.layers]
    want = logits()
    chain = decode_chain(spec, attn, ffn, splits=2, adopt=True)
    stores = {f.untyped_storage().data_ptr() for f in chain.families}
    for old, a, f in zip(before, attn.layers, ffn.layers, strict=True):
        for k, v in old.items():
            now = (a | f)[k]
            assert now.untyped_storage().data_ptr() in stores and torch.equal(now, v), k
    assert attn.lm_head.untyped_storage().data_ptr() in stores and attn.embed is attn.lm_head
    assert all(torch.equal(r, f["router"]) and f["router"].untyped_storage().data_ptr() not in stores
               for r, f in zip(routers, ffn.layers, strict=True))
    assert torch.equal(logits(), want)
    assert torch.equal(chain.families[0][-spec.vocab_size:], attn.lm_head)
    assert chain_bytes(spec) == sum(f.numel() * f.element_size() for f in chain.families)


def test_decode_chain_refuses_other_models_with_the_reason() -> None:
    spec = _spec()
    check_supported(spec)
    for change, reason in ((dict(num_kv_heads=1), "kv heads"), (dict(head_dim=64), "head dim"),
                           (dict(qk_norm="head"), "q/k norm"), (dict(attention="mla"), "attention 'mla'"),
                           (dict(routing=dataclasses.replace(spec.routing, norm_topk_prob=True)), "routing"),
                           (dict(vocab_size=500), "multiples of 16")):
        with pytest.raises(ValueError, match=reason):
            check_supported(dataclasses.replace(spec, **change))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an sm_90 GPU")
@pytest.mark.parametrize("split", ["static", "dynamic", "dynamic sums", "dynamic lean", "dynamic weights",
                                   "dynamic counted", "dynamic pipelined", "dynamic fold",
                                   "dynamic fold pipelined", "dynamic scatter down",
                                   "static scatter down", "dynamic top 8"])
def test_decode_chain_kernel_matches_its_reference_phase_by_phase(graph_launch, split: str) -> None:  # noqa: ANN001
    """The whole small step on the GPU: every phase against the reference fed the kernel's own earlier outputs,
    the new token's key and value in the cache, over three steps of one sequence in a CUDA graph. Dynamic: the
    gate/up phases' items taken from counters (top 4: 256 items, more than the programs, so some come from there;
    the counters start each launch from zero); with sums, QKV's 192 items too; lean: the proxy fence that frees a
    ring slot in the producer (`Chain(lean_release=True)`); weights: the router ranked on its experts' weights, not
    on its logits as integer keys (`Chain(rank_keys=False)`); counted: each staging waits on its input phase's
    published count first (`Chain(counted_polls=True)`; the counts start each launch from zero too); pipelined:
    each slot's loads before the previous slot's arithmetic (`Chain(pipelined=True)`); fold: the router's o_proj
    part in the attention's head combine (`decode_chain(fold_heads=True)`); scatter down: the down's items one
    expert's rows each, added into fp32 sums and counted (`decode_chain(scatter_down=True)`), taken as the programs
    go or (static) dealt round-robin; top 8: the down's input takes both of a staging's rounds (a loop)."""
    dynamic = not split.startswith("static")
    spec = _spec(8 if split == "dynamic top 8" else 4 if dynamic else 2)
    attn, ffn = _weights(spec, 1)
    attn = AttentionWeights(attn.embed.cuda(), attn.final_norm.cuda(), attn.lm_head.cuda(),
                            [{k: v.cuda() for k, v in w.items()} for w in attn.layers])
    ffn = FFNWeights(layers=[{k: v.cuda() for k, v in w.items()} for w in ffn.layers])
    dc = decode_chain(spec, attn, ffn, splits=2, fold_heads=split.startswith("dynamic fold"),
                      scatter_down=split.endswith("scatter down"))
    g = torch.Generator().manual_seed(3)
    kv = (torch.randn(64, spec.num_layers, 2, BS, spec.num_heads, mk.HEAD_DIM, generator=g) * 0.5).to(
        "cuda", torch.bfloat16)
    table = torch.randperm(64, generator=g).to(torch.int32).cuda()
    chain = mk.Chain(dc.phases, dc.families, spec.hidden_size, norms=dc.norms, eps=dc.eps, kv=kv, max_blocks=64,
                     dynamic=dynamic, dynamic_sums=split == "dynamic sums", lean_release=split == "dynamic lean",
                     rank_keys=split != "dynamic weights", counted_polls=split == "dynamic counted",
                     pipelined=split.endswith("pipelined"))
    x = torch.empty(spec.hidden_size, device="cuda")
    for ctx in (300, 301, 302):
        cos, sin = torch_ref.rope_cos_sin(spec.rope, torch.tensor([ctx - 1]), torch_ref.rope_inv_freq(spec.rope))
        chain.set_step(ctx, table, cos[0].cuda(), sin[0].cuda())
        x.copy_(attn.embed[ctx % spec.vocab_size].float())
        before = kv.clone()
        graph_launch(lambda: chain.run(x))
        chain.check()
        got = chain.outputs()
        assert torch.equal(chain.last.to(torch.bfloat16).float(), got[-1])    # the logits in fp32, as published
        step = mk.Step(before, table, ctx, cos[0].cuda(), sin[0].cuda())
        want = mk.reference(dc.phases, dc.families, x, dc.norms, dc.eps, given=got, step=step)
        for j, (a, b) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-3, msg=lambda m, j=j, c=ctx: f"ctx {c} phase {j}: {m}")
        torch.testing.assert_close(kv.float(), step.kv.float(), rtol=1e-2, atol=1e-2)
    assert not chain.counters.any()                  # each launch's last program reset them for the next


def test_decode_step_reads_the_engines_buffers_in_place() -> None:
    """DecodeStep binds the chain to the engine's own context-length and block-table buffers (int64 views, no
    copies in the step's graph) and to its cos/sin rows; bad buffers and inputs are refused before any launch."""
    spec = _spec()
    attn, ffn = _weights(spec, 1)
    kv = torch.zeros(8, spec.num_layers, 2, BS, spec.num_heads, mk.HEAD_DIM, dtype=torch.bfloat16)
    meta, tables = torch.zeros(5, 4, dtype=torch.long), torch.zeros(4, 8, dtype=torch.long)
    step = DecodeStep(spec, attn, ffn, kv, meta[3, :1], tables[0])
    c = step.chain
    assert c.ctx.data_ptr() == meta[3].data_ptr() and c.block_table.data_ptr() == tables[0].data_ptr()
    assert (c.cos.data_ptr(), c.sin.data_ptr()) == (step.cos.data_ptr(), step.sin.data_ptr())
    assert c.last.shape == (spec.vocab_size,) and c.last.dtype == torch.float32
    c.set_step(20, torch.arange(2), step.cos[0], step.sin[0])             # writes into the engine's buffers
    assert meta[3, 0] == 20 and tables[0, :2].tolist() == [0, 1]
    for args, what in (((meta[:, 0], tables[0]), "ctx"), ((meta[3, :1], tables[0].float()), "block_table"),
                       ((meta[3, :1], tables[0, :4]), "block_table")):    # strided; float; shorter than max_blocks
        with pytest.raises(ValueError, match=what):
            c.bind_step(*args, step.cos[0], step.sin[0])
    with pytest.raises(ValueError, match="cos"):
        c.bind_step(meta[3, :1], tables[0], step.cos[0].double(), step.sin[0])
    with pytest.raises(ValueError, match="input"):
        step.run(torch.zeros(spec.hidden_size + 1, dtype=torch.bfloat16))


def test_engine_keeps_its_graphs_where_the_megakernel_cannot_run(tiny_models, monkeypatch, caplog) -> None:  # noqa: ANN001
    """CROSSPOOL_MEGAKERNEL=1 on a machine or model it cannot serve: the decode graphs stay as they are, and the
    log says why (here: no sm_90 GPU, a 16-wide head, not a bf16 cache of 16-token blocks)."""
    from crosspool.engine import graphs
    from crosspool.pools.kv_pool import KVPool

    monkeypatch.setattr(graphs, "MEGAKERNEL", "1")
    model = MoEModel.load(tiny_models("tiny-olmoe"), torch.float32, "cpu", kernels="torch")
    cache = KVPool(64 << 20).register("m", model.spec, 4, torch.float32)
    with caplog.at_level("WARNING", logger="crosspool.engine"):
        g = graphs.DecodeGraphs(model, cache, torch.device("cpu"), 4, 64, capture=False)
    assert g.megakernel is None
    text = caplog.text
    assert "sm_90" in text and "head dim 16 (needs 128)" in text and "16-token blocks" in text


def test_engine_megakernel_setting_by_default_falls_back_without_a_warning(tiny_models, monkeypatch,  # noqa: ANN001
                                                                           caplog) -> None:  # noqa: ANN001
    """The default ("auto"): a model the megakernel cannot serve keeps its graphs, and the reason is logged at INFO
    only (most models are not OLMoE-shaped: that is no cause for a warning). A value other than auto, 0 or 1 is a
    clear error when the engine's graphs module loads."""
    from crosspool.engine import graphs
    from crosspool.pools.kv_pool import KVPool

    assert graphs.MEGAKERNEL == "auto"
    model = MoEModel.load(tiny_models("tiny-olmoe"), torch.float32, "cpu", kernels="torch")
    cache = KVPool(64 << 20).register("m", model.spec, 4, torch.float32)
    with caplog.at_level("INFO", logger="crosspool.engine"):
        g = graphs.DecodeGraphs(model, cache, torch.device("cpu"), 4, 64, capture=False)
    assert g.megakernel is None
    records = [r for r in caplog.records if "megakernel" in r.getMessage()]
    assert records and all(r.levelname == "INFO" for r in records) and "sm_90" in records[0].getMessage()
    monkeypatch.setattr(graphs, "MEGAKERNEL", "0")
    caplog.clear()
    with caplog.at_level("INFO", logger="crosspool.engine"):
        assert graphs.DecodeGraphs(model, cache, torch.device("cpu"), 4, 64, capture=False).megakernel is None
    assert "megakernel" not in caplog.text                       # off: not even looked at
    env = dict(os.environ, CROSSPOOL_MEGAKERNEL="yes")
    run = subprocess.run([sys.executable, "-c", "import crosspool.engine.graphs"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0 and "CROSSPOOL_MEGAKERNEL='yes': expected auto, 0 or 1" in run.stderr


def _megakernel_olmoe(tmp_path) -> Path:  # noqa: ANN001
    """A small OLMoE checkpoint with the megakernel's widths."""
    from crosspool.models.make_model import make_model

    return make_model("tiny-olmoe", tmp_path / "m", seed=4, progress=False,
                      config_changes={"hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 8,
                                      "intermediate_size": 1024, "num_experts": 16})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an sm_90 GPU")
def test_engine_skips_the_megakernel_without_memory_for_its_layout(tmp_path, monkeypatch, caplog) -> None:  # noqa: ANN001
    """Building the megakernel's weight layout holds the weights twice for a while: without room for that, the
    engine keeps the graph of kernels and says why (here the room asked for is made too large to exist)."""
    from crosspool import LLM, EngineConfig, SamplingParams
    from crosspool.engine import graphs

    monkeypatch.setattr(graphs, "MEGAKERNEL", "1")
    monkeypatch.setattr(graphs, "MEGAKERNEL_SPARE", 1 << 50)
    with caplog.at_level("WARNING", logger="crosspool.engine"), \
            LLM(_megakernel_olmoe(tmp_path), EngineConfig(device="cuda", dtype=torch.bfloat16, kernels="triton",
                                                          cuda_graphs=True, max_num_seqs=1)) as llm:
        assert next(iter(llm.engine.models.values())).runner.graphs.megakernel is None
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    assert "GiB free while it is built" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an sm_90 GPU")
def test_engine_greedy_tokens_with_the_megakernel_match_the_graph_of_kernels(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """CROSSPOOL_MEGAKERNEL=1: the engine's batch-1 decode steps run as one megakernel launch (in its CUDA graph),
    and greedy generation follows the graph of kernels on a small OLMoE with the megakernel's widths. The two
    round differently (the engine rounds every op to bf16, the megakernel sums in fp32), so they may part where
    two tokens nearly tie. Up to where they part (the same history on both sides), each step's top logprobs agree:
    on the H200, to 0.04 or less at most steps and 0.17 at one (as a router near-tie picking another expert would
    give); where they part, the graph of kernels' top two are within 0.3."""
    from crosspool import LLM, EngineConfig, SamplingParams
    from crosspool.engine import graphs

    d = _megakernel_olmoe(tmp_path)
    prompts = [torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 70)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=3)
    outs = {}
    for on in (0, 1):
        monkeypatch.setattr(graphs, "MEGAKERNEL", str(on))
        with LLM(d, EngineConfig(device="cuda", dtype=torch.bfloat16, kernels="triton", cuda_graphs=True,
                                 max_num_seqs=1)) as llm:
            outs[on] = llm.generate(prompts, params)
            runner = next(iter(llm.engine.models.values())).runner
            assert (runner.graphs.megakernel is not None) == bool(on)
    diffs = []
    for a, b in zip(outs[0], outs[1], strict=True):
        part = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y),
                    len(a.token_ids))
        for j in range(1, min(part + 1, len(a.token_ids))):          # decode steps with the same history
            la, lb = dict(a.logprobs[j].top), dict(b.logprobs[j].top)
            shared = la.keys() & lb.keys()
            assert shared, f"step {j}: no token in both top-3 lists ({la} against {lb})"
            diffs.append(max(abs(la[t] - lb[t]) for t in shared))
            assert diffs[-1] < 0.25, f"step {j}: top logprobs differ by {diffs[-1]:.3f} ({la} against {lb})"
        if part < len(a.token_ids):
            (_, first), (_, second) = a.logprobs[part].top[:2]
            assert first - second < 0.3, f"tokens part at {part} with a logprob gap of {first - second:.3f}"
    assert sorted(diffs)[len(diffs) // 2] < 0.05, f"the median step's logprobs differ by more than 0.05: {diffs}"
