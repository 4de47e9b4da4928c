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


def _sample_unseeded(rows: torch.Tensor, params: list[SamplingParams]) -> list[int]:
    """`_sample_row` for many rows at once (the global RNG: rows without a seed): one sort, one draw, one
    device->host copy instead of one of each per row. Same masks: top-k keeps every logit >= the k-th,
    top-p then drops tokens once the mass before them reaches top_p."""
    device, vocab = rows.device, rows.shape[1]
    temps = torch.tensor([p.temperature for p in params], device=device)[:, None]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    sorted_logits, order = torch.sort(rows / temps, dim=-1, descending=True)
    kth = sorted_logits.gather(1, (top_k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = (probs.cumsum(-1) - probs) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    picked = torch.multinomial(torch.softmax(sorted_logits, dim=-1), 1)
    return order.gather(1, picked)[:, 0].tolist()


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           output_ids: list[list[int]] | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] fp32 -> (one token id per row, its logprobs where asked). Seeded rows draw from their own
    generator (their tokens do not depend on the batch); the other sampled rows are drawn together."""
    output_ids = output_ids or [[] for _ in params]
    tokens = logits.argmax(dim=-1).tolist()
    together: list[int] = []
    for i, p in enumerate(params):
        if p.greedy and not p.penalized:
            continue                      # the batched argmax above (no per-row device work)
        if not p.greedy and generators[i] is None and not p.penalized:
            together.append(i)
            continue
        row = apply_penalties(logits[i], p, output_ids[i])
        tokens[i] = int(row.argmax()) if p.greedy else _sample_row(row, p, generators[i])
    if together:
        for i, token in zip(together, _sample_unseeded(logits[together], [params[i] for i in together]),
                            strict=True):
            tokens[i] = token
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:
        # every asking row at once: one log-softmax, one top-k (the largest k asked), one copy to the host
        lp = torch.log_softmax(logits[want], dim=-1)
        chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in want], device=lp.device))[:, 0].tolist()
        k_max = max(params[i].logprobs for i in want)
        top_v, top_i = (torch.topk(lp, k_max) if k_max else (lp[:, :0], lp[:, :0].long()))
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for row, i in enumerate(want):
            k = params[i].logprobs
            logprobs[i] = TokenLogprob(tokens[i], chosen[row], list(zip(top_i[row][:k], top_v[row][:k], strict=True)))
    return tokens, logprobs
