"""Greedy outputs of the fast path (Triton kernels + CUDA graphs) against the torch reference path.

    python -m crosspool.bench.fast_path_parity --model DIR [--prompts 8] [--prompt-len 64] [--max-tokens 64]

Both paths run the same prompts greedily on the same device and dtype. In bf16 two correct paths may still
part where the top two logits of a step lie within bf16 rounding of each other: for every completion that
differs the tool prints the first differing step and the gap between the two best log-probabilities there
(on the reference path), so a divergence can be told from a bug (a bug shows up as a large gap).
"""

from __future__ import annotations

import argparse
import json

import torch

from crosspool.config import EngineConfig
from crosspool.engine.llm import LLM
from crosspool.engine.sampling import SamplingParams


def run(model: str, kernels: str, graphs: bool, prompts: list[list[int]], max_tokens: int, device: str) -> list:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=2)
    config = EngineConfig(device=device, kernels=kernels, cuda_graphs=graphs, max_model_len=4096)
    with LLM(model, config) as llm:
        return llm.generate(prompts, params)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from crosspool.models.loader import load_spec

    vocab = load_spec(args.model).vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab - 10, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    ref = run(args.model, "torch", False, prompts, args.max_tokens, args.device)
    fast = run(args.model, "triton", args.device.startswith("cuda"), prompts, args.max_tokens, args.device)
    report = []
    for i, (a, b) in enumerate(zip(ref, fast, strict=True)):
        first = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y), None)
        row = {"prompt": i, "identical": first is None, "tokens": len(a.token_ids)}
        if first is not None:
            top = a.logprobs[first].top
            row.update({"first_divergence": first, "ref_token": a.token_ids[first], "fast_token": b.token_ids[first],
                        "ref_top2_logprob_gap": top[0][1] - top[1][1],
                        "fast_top2_logprob_gap": b.logprobs[first].top[0][1] - b.logprobs[first].top[1][1]})
        report.append(row)
        print(json.dumps(row))
    same = sum(r["identical"] for r in report)
    print(f"{same}/{len(report)} greedy completions identical ({args.max_tokens} tokens each)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
