"""Sampler: next tokens from fp32 logits, per-sequence penalties / temperature / top-k / top-p / seed,
and the log-probabilities a request asked for (of the raw model distribution, before any processing)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosspool.engine.sampling import SamplingParams


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]          # the k most likely tokens and their logprobs


def apply_penalties(row: torch.Tensor, p: SamplingParams, output_ids: list[int]) -> torch.Tensor:
    if not p.penalized or not output_ids:
        return row
    counts = torch.bincount(torch.tensor(output_ids, device=row.device), minlength=row.shape[0]).to(row.dtype)
    return row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)


def _sample_row(row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop tokens once the mass before them already reaches top_p (always keep the best one)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(torch.softmax(row, dim=-1), 1, generator=generator).item())


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           output_ids: list[list[int]] | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] fp32 -> (one token id per row, its logprobs where asked)."""
    output_ids = output_ids or [[] for _ in params]
    tokens = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy and not p.penalized:
            continue                      # the batched argmax above (no per-row device work)
        row = apply_penalties(logits[i], p, output_ids[i])
        tokens[i] = int(row.argmax()) if p.greedy else _sample_row(row, p, generators[i])
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:
        lp = torch.log_softmax(logits[want], dim=-1)
        for row, i in enumerate(want):
            k = params[i].logprobs
            top = torch.topk(lp[row], k) if k else None
            logprobs[i] = TokenLogprob(
                tokens[i], float(lp[row, tokens[i]]),
                list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else [],
            )
    return tokens, logprobs
