"""Pool layouts: 1 KV rank + 2 weights ranks over gloo give the single-process outputs, every family."""

from __future__ import annotations

import pytest
import torch

from crosspool import LLM, SamplingParams
from crosspool.config import EngineConfig, layout_settings
from crosspool.engine.scheduler import ScheduledSeq
from crosspool.engine.sequence import Sequence

FAMILIES = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe", "tiny-deepseek-v2", "tiny-deepseek-v3"]


def _prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (int(k),), generator=gen).tolist() for k in torch.randint(3, 40, (n,), generator=gen)]


def _prefill_logits(llm: LLM, name: str, ids: list[int]) -> torch.Tensor:
    served = llm.engine.models[name]
    seq = Sequence("probe", name, "", ids, SamplingParams())
    served.blocks.grow(seq, len(ids))

    def run() -> torch.Tensor:
        return served.runner.logits_for([ScheduledSeq(seq, len(ids))])

    try:
        distributed = getattr(llm.engine, "run_in_round", None)
        return distributed(run) if distributed else run()
    finally:
        served.blocks.release(seq)


def test_two_weights_ranks_match_single_process(tiny_models) -> None:
    models = {p: tiny_models(p) for p in FAMILIES}
    prompts = _prompts(12, seed=0)
    names = [FAMILIES[i % len(FAMILIES)] for i in range(len(prompts))]
    params = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    single = LLM(models, EngineConfig(block_size=4))
    ref = single.generate(prompts, params, model=names)
    ref_logits = {n: _prefill_logits(single, n, prompts[0]) for n in FAMILIES}
    single.engine.close()

    for layout in (dict(kv_ranks=1, weights_ranks=2), dict(kv_ranks=2, weights_ranks=2)):
        dist_llm = LLM(models, EngineConfig(block_size=4, **layout_settings(**layout)))
        try:
            procs = dist_llm.engine.procs
            assert len(procs) == layout["kv_ranks"] + layout["weights_ranks"] - 1
            assert all(p.poll() is None for p in procs)
            out = dist_llm.generate(prompts, params, model=names)
            for n in FAMILIES:
                got = _prefill_logits(dist_llm, n, prompts[0])
                err = (got - ref_logits[n]).abs().max().item()
                assert err <= 1e-5 * ref_logits[n].abs().max().item(), f"{layout} {n}: logits differ by {err:.3g}"
        finally:
            dist_llm.engine.close()
        assert [o.token_ids for o in out] == [o.token_ids for o in ref], f"{layout}: outputs differ"
        assert all(p.wait(timeout=30) == 0 for p in procs)       # ranks shut down cleanly


def test_layout_flags() -> None:
    assert layout_settings("cuda:0", "cuda:0") == {"device": "cuda:0"}
    assert layout_settings("cuda:0", "cuda:1,cuda:2") == {
        "device": "cuda:0", "weights_ranks": 2, "weights_devices": ("cuda:1", "cuda:2")}
    assert layout_settings(kv_ranks=1, weights_ranks=3) == {
        "device": "cpu", "weights_ranks": 3, "weights_devices": ("cpu", "cpu", "cpu")}
    with pytest.raises(ValueError, match="overlap"):
        layout_settings("cuda:0", "cuda:0,cuda:1")
    assert layout_settings("cuda:0,cuda:1", "cuda:2,cuda:3") == {
        "device": "cuda:0", "kv_devices": ("cuda:0", "cuda:1"), "weights_ranks": 2,
        "weights_devices": ("cuda:2", "cuda:3")}
    with pytest.raises(ValueError, match="need weights devices"):
        layout_settings("cuda:0,cuda:1")
    with pytest.raises(ValueError, match="weights devices"):
        EngineConfig(weights_ranks=1, weights_devices=("cpu", "cpu"))


def test_torchrun_world_gives_the_single_process_output(tiny_models, tmp_path) -> None:
    """The same command under torchrun (3 ranks: 1 KV + 2 weights) prints the same completion."""
    import json
    import shutil
    import subprocess
    import sys

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    model = str(tiny_models("tiny-qwen3-moe"))
    args = ["generate", "--model", model, "--prompt", "Pools of experts", "--max-tokens", "12", "--ignore-eos",
            "--json", "--device", "cpu"]
    single = subprocess.run([sys.executable, "-m", "crosspool.cli", *args], capture_output=True, text=True,
                            check=True, cwd=tmp_path)
    multi = subprocess.run(["torchrun", "--nproc-per-node", "3", "-m", "crosspool.cli", *args,
                            "--weights-ranks", "2"], capture_output=True, text=True, check=True, cwd=tmp_path,
                           timeout=300)
    assert json.loads(multi.stdout)["token_ids"] == json.loads(single.stdout)["token_ids"]
