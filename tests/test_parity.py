"""Logits and greedy completions match HF transformers on the same checkpoint (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from crosspool import LLM, SamplingParams
from crosspool.engine.block_manager import BlockManager
from crosspool.engine.runner import ModelRunner
from crosspool.engine.sampling import SamplingParams as SP
from crosspool.engine.scheduler import ScheduledSeq
from crosspool.engine.sequence import Sequence
from crosspool.models.model import MoEModel
from crosspool.pools.kv_pool import KVPool

FAMILIES = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe", "tiny-deepseek-v2", "tiny-deepseek-v3"]
PROMPT_LENS = [3, 9, 17]          # with block_size 4: inside one block, crossing one, crossing four
BLOCK_SIZE = 4
DECODE_STEPS = 6


def _hf(model_dir) -> torch.nn.Module:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None   # compare raw greedy continuations
    return hf


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (ours - ref).abs().max().item()
    bound = 1e-4 * ref.abs().max().item()
    assert err <= bound, f"{what}: max |diff| {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("preset", FAMILIES)
def test_prefill_and_decode_logits_match_hf(preset: str, tiny_models) -> None:
    d = tiny_models(preset)
    hf = _hf(d)
    model = MoEModel.load(d, torch.float32, "cpu")
    cache = KVPool(16 << 20).register(preset, model.spec, BLOCK_SIZE, torch.float32)
    blocks = BlockManager(cache)
    # scatter block ids so tables are not contiguous
    taken = cache.alloc(64)
    cache.free([taken[i] for i in torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()])
    runner = ModelRunner(model, cache, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    seqs = [Sequence(f"s{i}", preset, "", torch.randint(0, model.spec.vocab_size - 3, (n,), generator=gen).tolist(),
                     SP()) for i, n in enumerate(PROMPT_LENS)]

    scheduled = []
    for s in seqs:
        blocks.grow(s, s.num_tokens)
        scheduled.append(ScheduledSeq(s, s.num_tokens))
    logits = runner.logits_for(scheduled)
    row = 0
    with torch.no_grad():
        for s in seqs:
            ref = hf(torch.tensor([s.all_token_ids])).logits[0]
            _assert_close(logits[row:row + s.num_tokens], ref, f"{preset} prefill len {s.num_tokens}")
            row += s.num_tokens
            s.num_computed = s.num_tokens
            s.output_token_ids.append(int(ref[-1].argmax()))

        for step in range(DECODE_STEPS):
            scheduled = []
            for s in seqs:
                blocks.grow(s, s.num_tokens)
                scheduled.append(ScheduledSeq(s, 1))
            logits = runner.logits_for(scheduled)
            for i, s in enumerate(seqs):
                ref = hf(torch.tensor([s.all_token_ids])).logits[0, -1]
                _assert_close(logits[i], ref, f"{preset} decode step {step} of seq {i}")
                s.num_computed = s.num_tokens
                s.output_token_ids.append(int(ref.argmax()))


@pytest.mark.parametrize("preset", FAMILIES)
def test_greedy_completions_match_hf_generate(preset: str, tiny_models) -> None:
    d = tiny_models(preset)
    hf = _hf(d)
    llm = LLM(d, block_size=BLOCK_SIZE)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (5, 11, 23)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs, strict=True):
        ids = torch.tensor([p])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)[0, len(p):]
        assert o.token_ids == ref.tolist(), f"{preset}: prompt of {len(p)} tokens diverges from HF generate"
