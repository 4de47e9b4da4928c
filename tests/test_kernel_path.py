"""The engine on the Triton kernels (CPU: TRITON_INTERPRET=1) gives the torch path's outputs, with and
without the static-buffer decode step of the CUDA graphs (on CPU replayed eagerly, padding rows included)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():   # CPU: Triton's interpreter; on a GPU the kernels compile
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from crosspool import LLM, EngineConfig, SamplingParams  # noqa: E402
from crosspool.engine import graphs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-deepseek-v3", "tiny-mixtral"])
def test_triton_kernels_match_torch_path(preset: str, tiny_models, monkeypatch) -> None:
    d = tiny_models(preset)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (3, 11, 20)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    # buckets 2 and 4: a decode batch of 3 replays bucket 4 with one padding row, a batch of 1 bucket 2
    monkeypatch.setattr(graphs, "BUCKETS", (2, 4))
    outs = {}
    for kernels, cuda_graphs in (("torch", False), ("triton", False), ("triton", True)):
        # block_size 4 and a 5-token prefill budget: prompts cross blocks, prefill is chunked, decodes mix in
        with LLM(d, EngineConfig(device=DEVICE, dtype=torch.float32, kernels=kernels, block_size=4,
                                 max_num_batched_tokens=5, cuda_graphs=cuda_graphs, max_num_seqs=8)) as llm:
            outs[kernels, cuda_graphs] = [o.token_ids for o in llm.generate(prompts, params)]
            runner = next(iter(llm.engine.models.values())).runner
            if cuda_graphs:
                assert sorted(runner.graphs.steps) == [2, 4]    # both buckets were used
    assert outs["triton", False] == outs["torch", False]
    assert outs["triton", True] == outs["torch", False]
