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
                assert sorted(b for b, _, _ in runner.graphs.steps) == [2, 4]    # both buckets were used
    assert outs["triton", False] == outs["torch", False]
    assert outs["triton", True] == outs["torch", False]


def _prefill_logits(model, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    from crosspool.engine.block_manager import BlockManager
    from crosspool.engine.runner import ModelRunner
    from crosspool.engine.sampling import SamplingParams as SP
    from crosspool.engine.scheduler import ScheduledSeq
    from crosspool.engine.sequence import Sequence
    from crosspool.pools.kv_pool import KVPool

    cache = KVPool(64 << 20).register("m", model.spec, 4, model.attention.w.embed.dtype)
    seq = Sequence("s", "m", "", ids, SP())
    BlockManager(cache).grow(seq, len(ids))
    return ModelRunner(model, cache, torch.device("cpu")).logits_for([ScheduledSeq(seq, len(ids))])


@pytest.mark.parametrize("preset", ["tiny-olmoe", "tiny-qwen2-moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_expert_rows_summed_in_the_next_norm_change_no_bit(preset: str, dtype: torch.dtype, tiny_models,
                                                           monkeypatch) -> None:
    """In one process the FFN hands its expert rows over unsummed and the attention side's residual add + norm
    sums them (one kernel fewer per layer): logits are bit for bit those of the separate top-k sum, on the GEMV
    path (5 tokens) and the grouped GEMMs (20 tokens). Qwen2-MoE's shared expert keeps the sum in the FFN."""
    from crosspool.models.batch import reduced
    from crosspool.models.ffn_side import FFNSide
    from crosspool.models.model import MoEModel

    if DEVICE == "cuda":
        pytest.skip("CPU interpreter test (fp16 on CPU)")
    model = MoEModel.load(tiny_models(preset), dtype, "cpu", kernels="triton")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (5, 20)]
    fused = [_prefill_logits(model, ids) for ids in prompts]
    partial = FFNSide.forward_partial
    monkeypatch.setattr(FFNSide, "forward_partial", lambda self, layer, x: reduced(partial(self, layer, x)))
    separate = [_prefill_logits(model, ids) for ids in prompts]
    for a, b in zip(fused, separate, strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b)
