"""The shared engine step clock: holding times when every model's sequences advance one token per step.

The engine runs one step over all models with work: each running sequence gains one token per step and a
prompt chunk takes one step. So a request's KV *in steps* follows from its lengths alone; only how long a
step lasts depends on the load, and the load on the KV held. `StepTimeModel` gives a step's seconds as a
linear function of its load (models with work, sequences, prompt tokens in the step), fitted to the
engine's measured steps (`StepTimeModel.fit`). `run_step_clock` is a small event simulation of the fluid
step clock K(t) (steps done by time t): between load changes K grows at 1/step_s; a request arriving at
time a is at step K(a), and its event at step offset d happens when K reaches K(a) + d. It returns K's
knots, through which every KV event of every request is placed (`crosspool.planner.simulate.replay`).

With per-model constant speeds instead (`KVProfile.decode_tps`), requests are independent; that is the
default for GPU planning, where a decode step's time barely depends on the batch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class StepTimeModel:
    """Seconds of one engine step, linear in its load: base + per model with work + per sequence + per
    context token of the decoding sequences + per prompt chunk, per prompt token and per (prompt token x
    context) pair of the step's prefill chunks (attention over a prompt is quadratic in it)."""

    base_s: float = 0.0
    per_model_s: float = 0.0
    per_seq_s: float = 0.0
    per_context_token_s: float = 0.0
    per_prefill_chunk_s: float = 0.0
    per_prefill_token_s: float = 0.0
    per_prefill_pair_s: float = 0.0

    def __post_init__(self) -> None:
        if min(self.as_list()) < 0 or not self.step_s(1, 1) > 0:
            raise ValueError(f"step time coefficients must be >= 0 and give a positive step time, got {self.as_list()}")

    def step_s(self, models: float, seqs: float, context_tokens: float = 0.0, prefill_chunks: float = 0.0,
               prefill_tokens: float = 0.0, prefill_pairs: float = 0.0) -> float:
        return (self.base_s + self.per_model_s * models + self.per_seq_s * seqs
                + self.per_context_token_s * context_tokens + self.per_prefill_chunk_s * prefill_chunks
                + self.per_prefill_token_s * prefill_tokens + self.per_prefill_pair_s * prefill_pairs)

    def as_list(self) -> list[float]:
        return [self.base_s, self.per_model_s, self.per_seq_s, self.per_context_token_s, self.per_prefill_chunk_s,
                self.per_prefill_token_s, self.per_prefill_pair_s]

    def scaled(self, factor: float) -> StepTimeModel:
        return StepTimeModel(*(c * factor for c in self.as_list()))

    def stalled(self, load: np.ndarray, step_s: np.ndarray, factor: float) -> np.ndarray:
        """Which steps took more than `factor` times this model's time for their load: one-time costs (a kernel
        compiled or autotuned, a CUDA graph captured, a GC pause), not load. `load`: [steps, 6]; a step this
        model gives no time (no load, no base) is never called stalled."""
        predicted = self.step_s(*np.asarray(load, float).T)
        return (predicted > 0) & (np.asarray(step_s, float) > factor * predicted)

    @staticmethod
    def fit(load: np.ndarray, step_s: np.ndarray, stall_factor: float | None = None) -> StepTimeModel:
        """Fit to measured steps; `load`: [steps, 6] the arguments of `step_s` for each step. The decode
        terms come from the steps without prefill, then the prefill terms from what is left of the other
        steps' time, so the two do not trade off. With `stall_factor`, steps slower than that many times the
        fit for their load (`stalled`) are dropped and the rest refitted until none is left: on a GPU a few
        compile or capture stalls of a second each would otherwise outweigh thousands of 0.3 ms steps."""
        load = np.asarray(load, float)
        step_s = np.asarray(step_s, float)
        keep = np.ones(len(step_s), bool)
        while True:
            model = _fit_once(load[keep], step_s[keep])
            if stall_factor is None:
                return model
            drop = keep & model.stalled(load, step_s, stall_factor)
            if not drop.any() or drop.sum() == keep.sum():
                return model
            keep &= ~drop


def _fit_once(load: np.ndarray, step_s: np.ndarray) -> StepTimeModel:
    decode = load[:, 3] == 0
    x = np.column_stack([np.ones(len(load)), load[:, :3]])
    decode_terms = _nnls(x[decode], step_s[decode])
    rest = step_s[~decode] - x[~decode] @ np.array(decode_terms)
    prefill_terms = _nnls(load[~decode, 3:6], rest) if (~decode).any() else [0.0, 0.0, 0.0]
    return StepTimeModel(*decode_terms, *prefill_terms)


def _nnls(x: np.ndarray, y: np.ndarray) -> list[float]:
    """Least squares with non-negative coefficients: a term that comes out negative is dropped and the
    rest refitted (enough for a handful of well-scaled terms)."""
    keep = list(range(x.shape[1]))
    coef = np.zeros(0)
    while keep:
        coef, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        if coef.min() >= 0:
            break
        del keep[int(np.argmin(coef))]
    full = np.zeros(x.shape[1])
    full[keep] = coef if keep else 0.0
    return full.tolist()


@dataclass(frozen=True, slots=True)
class LoadEvents:
    """Where a request changes the engine's load, in steps after its arrival."""

    owner: np.ndarray                      # request index
    offset: np.ndarray                     # steps after arrival
    d_seqs: np.ndarray
    d_context: np.ndarray                  # context tokens of decoding sequences (each at its mean length)
    d_chunks: np.ndarray                   # prompt chunks in the step from here on
    d_prefill: np.ndarray                  # their prompt tokens
    d_pairs: np.ndarray                    # their (token x context) pairs


def run_step_clock(arrival_s: np.ndarray, model: np.ndarray, num_models: int, load: LoadEvents,
                   clock: StepTimeModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(knot times, steps done at the knots, each request's arrival step). `arrival_s` sorted."""
    by_owner: list[list[tuple]] = [[] for _ in range(len(arrival_s))]
    for o, *row in zip(load.owner.tolist(), load.offset.tolist(), load.d_seqs.tolist(), load.d_context.tolist(),
                       load.d_chunks.tolist(), load.d_prefill.tolist(), load.d_pairs.tolist(), strict=True):
        by_owner[o].append(tuple(row))
    idle_s = max(clock.step_s(0, 0), 1e-6)
    t = float(arrival_s[0]) if len(arrival_s) else 0.0
    k, seqs, context, chunks, prefill, pairs, active = 0.0, 0, 0.0, 0, 0, 0, 0
    per_model = [0] * num_models
    step, i, n = idle_s, 0, len(arrival_s)
    heap: list[tuple] = []                 # (step, tie-break, request, load deltas)
    knots_t, knots_k, arrival_k = [t], [k], np.zeros(n)
    tie = 0
    while i < n or heap:
        t_event = t + (heap[0][0] - k) * step if heap else np.inf
        if i < n and arrival_s[i] <= t_event:
            k += (arrival_s[i] - t) / step
            t = float(arrival_s[i])
            arrival_k[i] = k
            for off, *deltas in by_owner[i]:
                heapq.heappush(heap, (k + off, tie, i, *deltas))
                tie += 1
            i += 1
            continue
        kt, _, r, dq, dc, dch, dp, dpp = heapq.heappop(heap)
        t, k = t + (kt - k) * step, kt
        m = int(model[r])
        if dq:
            before = per_model[m]
            per_model[m] += dq
            active += (per_model[m] > 0) - (before > 0)
        seqs += dq
        context += dc
        chunks += dch
        prefill += dp
        pairs += dpp
        step = clock.step_s(active, seqs, context, chunks, prefill, pairs) if seqs else idle_s
        knots_t.append(t)
        knots_k.append(k)
    return np.array(knots_t), np.array(knots_k), arrival_k


def steps_to_times(target_k: np.ndarray, knots_t: np.ndarray, knots_k: np.ndarray, idle_s: float) -> np.ndarray:
    """Invert K: the time each step target is reached (after the last knot K grows at the idle rate)."""
    out = np.interp(target_k, knots_k, knots_t)
    late = target_k > knots_k[-1]
    out[late] = knots_t[-1] + (target_k[late] - knots_k[-1]) * idle_s
    return out
