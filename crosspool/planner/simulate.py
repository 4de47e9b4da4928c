"""Monte-Carlo simulation of aggregate KV demand: what the shared KV pool must hold over time.

Owns the holding model and the trials. A request is admitted on arrival (an infinite server: demand
is what the pool *would* hold, never limited by it) and holds KV blocks as the engine allocates them:
its prompt in chunks of `prefill_chunk_tokens`, then one block each time decoding crosses a block
boundary, until its last token is sampled, when all its blocks are freed. A request of P prompt and O
output tokens thus peaks at ceil((P+O-1)/block) blocks (the last sampled token's KV is never written), as
in the engine's scheduler. Time runs at per-model constant speeds (`prefill_tps`, `decode_tps` per
sequence: requests independent, the GPU default) or on the engine's shared step clock
(`crosspool.planner.step_clock`: a chunk or a token per step, step time from the load).

`simulate` runs independent trials (each a fresh warm-up plus `horizon_s` of traffic) and returns each
trial's time-weighted demand distribution, aggregate and per model; `overflow_stats` replays the same
trials against a pool size; `replay` turns one given trace into a demand timeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from crosspool.planner.quantile import WeightedSample
from crosspool.planner.step_clock import LoadEvents, StepTimeModel, run_step_clock, steps_to_times
from crosspool.planner.workload import NO_BURSTS, BurstProcess, ModelTraffic, Requests, generate


@dataclass(frozen=True, slots=True)
class KVProfile:
    """How one model's requests hold KV: block geometry and speeds."""

    block_bytes: int                       # pool bytes one block occupies
    block_size: int = 16                   # tokens per block
    decode_tps: float = 50.0               # tokens/s per sequence while decoding
    prefill_tps: float = 5000.0            # prompt tokens/s per sequence
    prefill_chunk_tokens: int = 2048       # blocks for a prompt are taken chunk by chunk
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        for name in ("block_bytes", "block_size", "prefill_chunk_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("decode_tps", "prefill_tps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def hold_s(self, prompt: np.ndarray | int, output: np.ndarray | int) -> np.ndarray | float:
        """Seconds from admission to the last token."""
        return np.asarray(prompt) / self.prefill_tps + (np.asarray(output) - 1) / self.decode_tps

    def peak_blocks(self, prompt: np.ndarray | int, output: np.ndarray | int) -> np.ndarray | int:
        return -(-(np.asarray(prompt) + np.asarray(output) - 1) // self.block_size)


def _ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner row, index within its row) for rows of the given lengths."""
    owner = np.repeat(np.arange(len(counts)), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return owner, np.arange(int(counts.sum())) - starts


def kv_events(prompt: np.ndarray, output: np.ndarray, prof: KVProfile,
              in_steps: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(request, offset after arrival, block delta) of each KV event of a model's requests: prefill chunks,
    decode growth, release. Offsets in seconds at the profile's speeds, or `in_steps` of the engine
    (a chunk per step, then a token per step)."""
    bs, chunk = prof.block_size, prof.prefill_chunk_tokens
    chunks = -(-prompt // chunk)
    # prefill: chunk c takes tokens [c*chunk, min(P, (c+1)*chunk)) at its start
    owner_c, c = _ragged(chunks)
    first, last = c * chunk, np.minimum(prompt[owner_c], (c + 1) * chunk)
    d_chunk = -(-last // bs) + (first // -bs)
    # decode step k (1..O-1) holds P+k tokens; a new block when P+k-1 is a multiple of the block size
    k1 = (-prompt) % bs + 1
    owner_g, m = _ragged(np.where(output - 1 >= k1, (output - 1 - k1) // bs + 1, 0))
    k = k1[owner_g] + m * bs
    if in_steps:
        off_chunk, first_token, per_token = c.astype(float), chunks.astype(float), 1.0
    else:
        off_chunk, first_token, per_token = first / prof.prefill_tps, prompt / prof.prefill_tps, 1 / prof.decode_tps
    off_grow = first_token[owner_g] + (k - 1) * per_token
    off_done = first_token + (output - 1) * per_token          # release after the last token
    idx = np.arange(len(prompt))
    owner = np.concatenate([owner_c, owner_g, idx])
    offset = np.concatenate([off_chunk, off_grow, off_done])
    delta = np.concatenate([d_chunk, np.ones(len(owner_g), np.int64), -prof.peak_blocks(prompt, output)])
    return owner, offset, delta


def load_events(prompt: np.ndarray, output: np.ndarray, prof: KVProfile) -> LoadEvents:
    """The engine load a model's requests add, in steps: a sequence from arrival to release, its mean
    context while it decodes, and each prompt chunk's tokens during its step."""
    chunk = prof.prefill_chunk_tokens
    chunks = -(-prompt // chunk)
    owner_c, c = _ragged(chunks)
    tokens = np.minimum(prompt[owner_c], (c + 1) * chunk) - c * chunk
    pairs = tokens * (c * chunk + tokens)
    idx = np.arange(len(prompt))
    context = prompt + (output - 1) / 2                        # mean context while decoding
    zeros_c, zeros_r = np.zeros(len(owner_c), np.int64), np.zeros(len(idx), np.int64)
    ones = np.ones(len(idx), np.int64)
    return LoadEvents(
        owner=np.concatenate([idx, idx, idx, idx, owner_c, owner_c]),
        offset=np.concatenate([np.zeros(len(idx)), chunks + output - 1.0, chunks.astype(float),
                               chunks + output - 1.0, c.astype(float), c + 1.0]),
        d_seqs=np.concatenate([ones, -ones, zeros_r, zeros_r, zeros_c, zeros_c]),
        d_context=np.concatenate([zeros_r, zeros_r, context, -context, zeros_c, zeros_c]),
        d_chunks=np.concatenate([zeros_r, zeros_r, zeros_r, zeros_r, np.ones_like(tokens), -np.ones_like(tokens)]),
        d_prefill=np.concatenate([zeros_r, zeros_r, zeros_r, zeros_r, tokens, -tokens]),
        d_pairs=np.concatenate([zeros_r, zeros_r, zeros_r, zeros_r, pairs, -pairs]),
    )


@dataclass(eq=False)
class Timeline:
    """Demand as a step function over [start_s, end_s]: `levels[i]` (bytes, all models) holds from
    `times[i]` to `times[i+1]` (the last to `end_s`). `deltas`/`model` keep the per-model split."""

    times: np.ndarray
    levels: np.ndarray
    deltas: np.ndarray
    model: np.ndarray
    models: list[str]
    start_s: float
    end_s: float
    release_s: np.ndarray                  # when each request (in arrival order) frees its KV

    @property
    def durations(self) -> np.ndarray:
        t = np.clip(self.times, self.start_s, self.end_s)
        return np.diff(np.append(t, self.end_s))

    def sample(self) -> WeightedSample:
        return WeightedSample.of(self.levels, self.durations)

    def model_levels(self, name: str) -> np.ndarray:
        return np.cumsum(np.where(self.model == self.models.index(name), self.deltas, 0))

    def model_sample(self, name: str) -> WeightedSample:
        return WeightedSample.of(self.model_levels(name), self.durations)


def replay(requests: Requests, profiles: Mapping[str, KVProfile], start_s: float, end_s: float,
           clock: StepTimeModel | None = None) -> Timeline:
    """Demand timeline of exactly these requests (bytes), observed over [start_s, end_s]. With `clock`,
    requests share the engine's step clock; otherwise each runs at its model's constant speeds."""
    reqs = requests.sorted()
    n = len(reqs)
    parts, loads = [], []
    for i, name in enumerate(reqs.models):
        sel = np.flatnonzero(reqs.model == i)
        if not len(sel):
            continue
        prof = profiles[name]
        p, o = reqs.prompt_tokens[sel], reqs.output_tokens[sel]
        owner, offset, delta = kv_events(p, o, prof, in_steps=clock is not None)
        parts.append((sel[owner], offset, delta * prof.block_bytes, np.full(len(owner), i, np.int64)))
        if clock is not None:
            ev = load_events(p, o, prof)
            loads.append(LoadEvents(sel[ev.owner], ev.offset, ev.d_seqs, ev.d_context, ev.d_chunks, ev.d_prefill,
                                    ev.d_pairs))
    if not parts:
        empty = np.empty(0)
        return Timeline(empty, empty, empty, np.empty(0, np.int64), reqs.models, start_s, end_s, empty)
    owner, offset, deltas, model = (np.concatenate([p[k] for p in parts]) for k in range(4))
    if clock is None:
        times = reqs.arrival_s[owner] + offset
    else:
        load = LoadEvents(*(np.concatenate([getattr(x, f) for x in loads]) for f in LoadEvents.__slots__))
        knots_t, knots_k, arrival_k = run_step_clock(reqs.arrival_s, reqs.model, len(reqs.models), load, clock)
        times = steps_to_times(arrival_k[owner] + offset, knots_t, knots_k, max(clock.step_s(0, 0), 1e-6))
    done = np.zeros(n)
    releases = deltas < 0
    done[owner[releases]] = times[releases]
    order = np.argsort(times, kind="stable")
    times, deltas, model = times[order], deltas[order], model[order]
    return Timeline(times, np.cumsum(deltas), deltas, model, reqs.models, start_s, end_s, done)


def warmup_s(traffic: Mapping[str, ModelTraffic], profiles: Mapping[str, KVProfile],
             clock: StepTimeModel | None = None) -> float:
    """Longest a request can hold KV (on the step clock: its steps at four sequences per model): traffic
    that starts this early is in steady state at time 0."""
    hold = 0.0
    for name, t in traffic.items():
        prof = profiles[name]
        p, o = t.lengths.max_tokens(prof.max_model_len)
        if clock is None:
            hold = max(hold, float(prof.hold_s(p, o)))
        else:
            steps = -(-p // prof.prefill_chunk_tokens) + o
            hold = max(hold, steps * clock.step_s(len(traffic), 4 * len(traffic)))
    return hold


def _trials(traffic: Mapping[str, ModelTraffic], profiles: Mapping[str, KVProfile], horizon_s: float,
            trials: int, seed: int, burst: BurstProcess, clock: StepTimeModel | None,
            progress: Callable[[int], None] | None) -> Iterator[tuple[Requests, Timeline]]:
    if horizon_s <= 0:
        raise ValueError(f"horizon must be > 0 s, got {horizon_s}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    missing = set(traffic) - set(profiles)
    if missing:
        raise ValueError(f"no KV profile for models {sorted(missing)}")
    warm = warmup_s(traffic, profiles, clock)
    max_len = {n: profiles[n].max_model_len for n in traffic}
    for ss in np.random.SeedSequence(seed).spawn(trials):
        reqs = generate(traffic, max_len, -warm, horizon_s, np.random.default_rng(ss), burst)
        yield reqs, replay(reqs, profiles, 0.0, horizon_s, clock)
        if progress is not None:
            progress(1)


@dataclass(eq=False)
class DemandSamples:
    """Time-weighted KV demand (bytes) of independent trials: aggregate and per model."""

    aggregate: list[WeightedSample]
    per_model: dict[str, list[WeightedSample]]
    horizon_s: float
    num_requests: int                      # arriving inside the observed horizons, all trials
    peak_bytes: list[float]                # each trial's maximum aggregate demand


def simulate(traffic: Mapping[str, ModelTraffic], profiles: Mapping[str, KVProfile], horizon_s: float,
             trials: int, seed: int = 0, burst: BurstProcess = NO_BURSTS, clock: StepTimeModel | None = None,
             progress: Callable[[int], None] | None = None) -> DemandSamples:
    out = DemandSamples([], {n: [] for n in traffic}, horizon_s, 0, [])
    for reqs, tl in _trials(traffic, profiles, horizon_s, trials, seed, burst, clock, progress):
        out.aggregate.append(tl.sample())
        for name in traffic:
            out.per_model[name].append(tl.model_sample(name))
        out.num_requests += int((reqs.arrival_s >= 0).sum())
        out.peak_bytes.append(float(out.aggregate[-1].levels[-1]) if len(out.aggregate[-1].levels) else 0.0)
    return out


@dataclass(frozen=True, slots=True)
class OverflowStats:
    pool_bytes: int
    time_fraction: float                   # of time aggregate demand exceeds the pool
    episodes_per_hour: float               # times per hour demand rises above the pool
    requests_delayed_fraction: float       # requests alive during an overflow: upper bound on queued/preempted
    any_model_over_fraction: float         # of time some model exceeds its own reservation (if given)


def overflow_stats(traffic: Mapping[str, ModelTraffic], profiles: Mapping[str, KVProfile], pool_bytes: int,
                   horizon_s: float, trials: int, seed: int = 0, burst: BurstProcess = NO_BURSTS,
                   clock: StepTimeModel | None = None, reservations: Mapping[str, float] | None = None,
                   progress: Callable[[int], None] | None = None) -> OverflowStats:
    """Replay the trials of `simulate` (same seed) against a pool of `pool_bytes` and, when given,
    per-model reservations."""
    over_s = episodes = delayed = requests = any_over_s = 0.0
    for reqs, tl in _trials(traffic, profiles, horizon_s, trials, seed, burst, clock, progress):
        dur = tl.durations
        over = (tl.levels > pool_bytes) & (dur > 0)
        over_s += float(dur[over].sum())
        live = over[dur > 0]
        episodes += int(np.count_nonzero(live[1:] & ~live[:-1])) + int(live[:1].sum())
        # a request alive while the pool is over would have queued or been preempted
        cum = np.concatenate([[0.0], np.cumsum(np.where(over, dur, 0.0))])
        edges = np.append(np.clip(tl.times, 0.0, horizon_s), horizon_s)
        inside = (reqs.arrival_s >= 0) & (reqs.arrival_s < horizon_s)
        alive_over = np.interp(tl.release_s[inside], edges, cum) - np.interp(reqs.arrival_s[inside], edges, cum)
        delayed += float((alive_over > 0).sum())
        requests += float(inside.sum())
        if reservations:
            anyo = np.zeros(len(tl.times), bool)
            for name, cap in reservations.items():
                anyo |= tl.model_levels(name) > cap
            any_over_s += float(dur[anyo].sum())
    total_s = horizon_s * trials
    return OverflowStats(int(pool_bytes), over_s / total_s, episodes / (total_s / 3600),
                         delayed / requests if requests else 0.0, any_over_s / total_s)
