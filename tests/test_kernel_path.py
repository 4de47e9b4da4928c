"""The engine on the Triton kernels (CPU: TRITON_INTERPRET=1) gives the torch path's outputs."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():   # CPU: Triton's interpreter; on a GPU the kernels compile
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from crosspool import LLM, EngineConfig, SamplingParams  # noqa: E402


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-deepseek-v3", "tiny-mixtral"])
def test_triton_kernels_match_torch_path(preset: str, tiny_models) -> None:
    d = tiny_models(preset)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (3, 11, 20)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = {}
    for kernels in ("torch", "triton"):
        # block_size 4 and a 5-token prefill budget: prompts cross blocks, prefill is chunked, decodes mix in
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with LLM(d, EngineConfig(device=device, dtype=torch.float32, kernels=kernels, block_size=4,
                                 max_num_batched_tokens=5)) as llm:
            outs[kernels] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["triton"] == outs["torch"]
