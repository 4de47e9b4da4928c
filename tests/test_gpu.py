"""GPU tests (run on the lent H200): bf16 parity with HF on real-shape checkpoints, full OLMoE load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from crosspool import LLM, SamplingParams
from crosspool.models.make_model import make_model
from crosspool.models.model import MoEModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _prefill_logits(model: MoEModel, ids: list[int]) -> torch.Tensor:
    from crosspool.engine.block_manager import BlockManager
    from crosspool.engine.runner import ModelRunner
    from crosspool.engine.sampling import SamplingParams as SP
    from crosspool.engine.scheduler import ScheduledSeq
    from crosspool.engine.sequence import Sequence
    from crosspool.pools.kv_pool import KVPool
    from crosspool.pools.vmm import CudaPageBackend

    dtype = model.attention.w.embed.dtype
    cache = KVPool(512 << 20, CudaPageBackend(0)).register("m", model.spec, 16, dtype)
    blocks = BlockManager(cache)
    seq = Sequence("s", "m", "", ids, SP())
    blocks.grow(seq, len(ids))
    return ModelRunner(model, cache, torch.device("cuda")).logits_for([ScheduledSeq(seq, len(ids))])


@pytest.mark.parametrize("preset", ["olmoe-1b-7b", "deepseek-v2-lite", "qwen3-30b-a3b"])
def test_bf16_logits_match_hf(preset: str, tmp_path: Path) -> None:
    """Our bf16 logits are as close to HF fp32 as HF's own bf16 logits are (real shapes, 2 layers)."""
    from transformers import AutoModelForCausalLM

    d = make_model(preset, tmp_path / preset, layers=2, seed=3, progress=False)
    ids = torch.randint(0, 1000, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref32 = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).cuda().eval()
        logits32 = ref32(torch.tensor([ids], device="cuda")).logits[0].float()
        del ref32
        ref16 = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
        logits16 = ref16(torch.tensor([ids], device="cuda")).logits[0].float()
        del ref16
    ours = _prefill_logits(MoEModel.load(d, torch.bfloat16, "cuda"), ids)
    scale = logits32.abs().max().item()
    hf_err = (logits16 - logits32).abs().max().item()
    our_err = (ours - logits32).abs().max().item()
    print(f"{preset}: max|logit| {scale:.3g} hf-bf16 err {hf_err:.3g} ours-bf16 err {our_err:.3g}")
    assert our_err <= 2 * hf_err + 1e-3 * scale
    agree = (ours.argmax(-1) == logits32.argmax(-1)).float().mean().item()
    hf_agree = (logits16.argmax(-1) == logits32.argmax(-1)).float().mean().item()
    assert agree >= hf_agree - 0.05, f"top-1 agreement {agree:.3f} vs HF bf16 {hf_agree:.3f}"


def test_full_olmoe_loads_and_generates(tmp_path_factory: pytest.TempPathFactory) -> None:
    d = os.environ.get("CROSSPOOL_OLMOE_DIR")
    if not d:
        d = str(make_model("olmoe-1b-7b", tmp_path_factory.mktemp("olmoe") / "olmoe", progress=False))
    llm = LLM(d, device="cuda", kv_cache_bytes=8 << 30)
    spec = llm.engine.models[llm.model_names[0]].model.spec
    assert spec.num_layers == 16 and spec.routing.num_experts == 64
    outs = llm.generate(["The capital of France is", "Mixture of experts"],
                        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for o in outs:
        assert len(o.token_ids) == 24 and o.text
        assert all(0 <= t < spec.vocab_size for t in o.token_ids)
    # bf16 forward stays finite and greedy decoding is deterministic
    again = llm.generate(["The capital of France is"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert again[0].token_ids == outs[0].token_ids


@pytest.mark.parametrize("green", [None, 64])
def test_pipeline_over_sub_step_graphs_on_two_streams(tmp_path: Path, green: int | None) -> None:
    """The pipeline with its sub-steps as CUDA graphs replayed on the two sides' streams (and, with `green`,
    green contexts splitting the SMs) gives the unpipelined engine's tokens (fp32, three tiny models)."""
    from crosspool import EngineConfig

    models = {n: str(make_model(n, tmp_path / n, seed=2, progress=False))
              for n in ("tiny-olmoe", "tiny-qwen3-moe", "tiny-deepseek-v3")}
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (int(k),), generator=g).tolist() for k in torch.randint(4, 40, (9,), generator=g)]
    names = [list(models)[i % 3] for i in range(9)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = {}
    for pipeline in (False, True):
        config = EngineConfig(device="cuda", dtype=torch.float32, pipeline=pipeline,
                              pipeline_attention_sms=green if pipeline else None, kv_cache_bytes=1 << 30)
        with LLM(models, config) as llm:
            outs[pipeline] = [o.token_ids for o in llm.generate(prompts, params, model=names)]
    assert outs[True] == outs[False]


def _same_with_switch(model: str, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch, module: object,
                      switch: str, max_tokens: int) -> None:
    """The engine's greedy tokens and log-probabilities with `module.switch` off and on are the same bits (the
    first prompt alone: batch 1; then all of them)."""
    from crosspool import EngineConfig

    runs = {}
    for on in (False, True):
        monkeypatch.setattr(module, switch, on)
        with LLM(model, EngineConfig(device="cuda", kv_cache_bytes=2 << 30)) as llm:
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0)
            outs = llm.generate(prompts[:1], params) + llm.generate(prompts, params)
        runs[on] = [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in outs]
    assert runs[True] == runs[False]


def test_experts_evict_first_changes_no_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The expert GEMVs' evict_first loads (`fused_moe.EVICT_FIRST`) only change what L2 keeps: tokens and
    log-probabilities are bit for bit those without them (bf16, real OLMoE shapes, 2 layers, batches of 1 and 8;
    TMA off, so batch 8 takes the register-tile kernels that have the hint too)."""
    from crosspool.kernels import fused_moe

    monkeypatch.setattr(fused_moe, "TMA_TILE", None)

    model = str(make_model("olmoe-1b-7b", tmp_path / "olmoe", layers=2, seed=5, progress=False))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 50000, (k,), generator=g).tolist() for k in torch.randint(8, 300, (8,), generator=g)]
    _same_with_switch(model, prompts, monkeypatch, fused_moe, "EVICT_FIRST", 32)


def test_prefetch_kernel_covers_odd_sizes() -> None:
    """`prefetch_l2` on tensors whose size is not a multiple of a line or of a program's step, in a CUDA graph
    too: no fault, and the data are unchanged."""
    from crosspool.kernels import prefetch

    for n in (1, 63, 64 * 257 + 5, 3 << 20):
        t = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        before = t.clone()
        prefetch.prefetch_l2(t)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            prefetch.prefetch_l2(t)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(t, before)


def test_programmatic_dependent_launch_changes_no_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PDL (`kernels.pdl`) lets each decode kernel launch while the previous one finishes; every kernel waits
    for its predecessor before touching memory, so tokens and log-probabilities are bit for bit those without
    it (bf16, real OLMoE shapes, 2 layers; batches of 8 take the MoE GEMV path, the prefill the grouped GEMMs;
    decode steps replay CUDA graphs captured with PDL edges)."""
    from crosspool import EngineConfig
    from crosspool.kernels import pdl

    model = str(make_model("olmoe-1b-7b", tmp_path / "olmoe", layers=2, seed=4, progress=False))
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, 300, (8,), generator=g).tolist()
    prompts = [torch.randint(0, 50000, (k,), generator=g).tolist() for k in lengths]
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", on)
        with LLM(model, EngineConfig(device="cuda", kv_cache_bytes=2 << 30)) as llm:
            greedy = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
            scored = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0))
        runs[on] = ([o.token_ids for o in greedy], [[lp.logprob for lp in o.logprobs] for o in scored])
    assert runs[True] == runs[False]
