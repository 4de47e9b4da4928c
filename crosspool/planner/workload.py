"""Traffic for the KV-cache planner: when requests arrive and how long they are.

Owns the traffic description and nothing about KV bytes or speeds:
- `LengthDist`: prompt/output lengths in tokens. Built-in ShareGPT-like and LongAlign-like
  distributions, fixed lengths (closed-form tests), or the empirical (prompt, output) pairs of a trace.
  Lengths are clipped to each model's context (`max_model_len`).
- `ModelTraffic`: one model's mean request rate and gamma burstiness (inter-arrival gaps are
  gamma-distributed with shape = burstiness and mean 1/rate, so 1 is Poisson and < 1 is burstier, as in
  vLLM's benchmark `--burstiness`).
- `BurstProcess`: an on/off Markov burst state that multiplies arrival rates, shared by all models
  (correlated bursts) or drawn per model; it keeps each model's mean rate unchanged.
- `Requests`: the common currency, plain arrays; `read_trace` / `write_trace` for JSONL trace files of
  {"model", "arrival_s", "prompt_tokens", "output_tokens"}.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BUILTIN_WORKLOADS = ("sharegpt", "longalign")


# ------------------------------------------------------------------------------------------------
# Lengths

@dataclass(frozen=True, slots=True)
class Lognormal:
    """Lognormal token count with the given mean (before clipping to [lo, hi])."""

    mean: float
    sigma: float
    lo: int
    hi: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = math.log(self.mean) - self.sigma**2 / 2
        return np.clip(np.rint(rng.lognormal(mu, self.sigma, n)), self.lo, self.hi).astype(np.int64)


@dataclass(frozen=True, slots=True)
class LogUniform:
    lo: int
    hi: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = np.exp(rng.uniform(math.log(self.lo), math.log(self.hi), n))
        return np.clip(np.rint(x), self.lo, self.hi).astype(np.int64)


@dataclass(frozen=True, slots=True)
class Fixed:
    tokens: int

    @property
    def hi(self) -> int:
        return self.tokens

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.tokens, dtype=np.int64)


TokenDist = Lognormal | LogUniform | Fixed


@dataclass(frozen=True, eq=False)
class LengthDist:
    """Prompt and output lengths: independent draws from `prompt` and `output`, or rows of `pairs`."""

    name: str
    prompt: TokenDist | None = None
    output: TokenDist | None = None
    pairs: np.ndarray | None = None        # [n, 2] (prompt, output) rows, drawn with replacement

    def sample(self, rng: np.random.Generator, n: int, max_model_len: int) -> tuple[np.ndarray, np.ndarray]:
        if self.pairs is not None:
            rows = self.pairs[rng.integers(0, len(self.pairs), n)]
            prompt, output = rows[:, 0].copy(), rows[:, 1].copy()
        else:
            assert self.prompt is not None and self.output is not None
            prompt, output = self.prompt.sample(rng, n), self.output.sample(rng, n)
        return clip_to_context(prompt, output, max_model_len)

    def max_tokens(self, max_model_len: int) -> tuple[int, int]:
        """Largest (prompt, output) a request can have: bounds the time a request holds KV."""
        if self.pairs is not None:
            p, o = int(self.pairs[:, 0].max()), int(self.pairs[:, 1].max())
        else:
            assert self.prompt is not None and self.output is not None
            p, o = self.prompt.hi, self.output.hi
        return min(p, max_model_len - 1), min(o, max_model_len - 1)


def clip_to_context(prompt: np.ndarray, output: np.ndarray, max_model_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts keep at most max_model_len - 1 tokens, outputs whatever context is left (>= 1)."""
    prompt = np.clip(prompt, 1, max_model_len - 1)
    return prompt, np.clip(output, 1, max_model_len - prompt)


SHAREGPT = LengthDist("sharegpt", prompt=Lognormal(250, 1.0, 4, 4096), output=Lognormal(200, 1.0, 1, 2048))
LONGALIGN = LengthDist("longalign", prompt=LogUniform(8192, 65536), output=Lognormal(100, 0.7, 1, 1024))


# ------------------------------------------------------------------------------------------------
# Arrivals

@dataclass(frozen=True, slots=True)
class BurstProcess:
    """On/off Markov burst state: arrival rates are multiplied by `factor` while on and by the off
    multiplier that keeps the mean rate unchanged while off. On and off periods are exponential."""

    factor: float = 1.0                    # rate multiplier while bursting (1: no bursts)
    on_s: float = 10.0                     # mean burst length
    off_s: float = 90.0                    # mean time between bursts
    correlated: bool = True                # one state for all models (True) or one per model

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"burst factor must be >= 1, got {self.factor}")
        if self.on_s <= 0 or self.off_s <= 0:
            raise ValueError(f"burst on/off times must be > 0, got {self.on_s} / {self.off_s}")
        if self.factor * self.on_fraction >= 1:
            raise ValueError(
                f"burst factor {self.factor} x on fraction {self.on_fraction:.3f} must be < 1 to keep the mean "
                f"rate (lower --burst-factor or --burst-on-s, or raise --burst-off-s)"
            )

    @property
    def active(self) -> bool:
        return self.factor > 1

    @property
    def on_fraction(self) -> float:
        return self.on_s / (self.on_s + self.off_s)

    @property
    def off_multiplier(self) -> float:
        f = self.on_fraction
        return (1 - f * self.factor) / (1 - f)

    def intensity(self, rng: np.random.Generator, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        """(knot times, cumulative intensity at the knots) of one path over [t0, t1]: the integral of the
        rate multiplier, piecewise linear. The state starts from its stationary distribution."""
        on0 = bool(rng.random() < self.on_fraction)
        knots, on = [t0], on0
        while knots[-1] < t1:
            knots.append(min(knots[-1] + rng.exponential(self.on_s if on else self.off_s), t1))
            on = not on
        times = np.array(knots)
        seg_on = (np.arange(len(times) - 1) % 2 == 0) == on0       # segments alternate from the first state
        mult = np.where(seg_on, self.factor, self.off_multiplier)
        return times, np.concatenate([[0.0], np.cumsum(mult * np.diff(times))])


NO_BURSTS = BurstProcess()


@dataclass(frozen=True, slots=True)
class ModelTraffic:
    rate_rps: float
    burstiness: float = 1.0                # gamma shape of inter-arrival gaps (1 = Poisson)
    lengths: LengthDist = SHAREGPT

    def __post_init__(self) -> None:
        if not (self.rate_rps >= 0 and math.isfinite(self.rate_rps)):
            raise ValueError(f"rate must be a finite number >= 0 requests/s, got {self.rate_rps}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness (gamma shape) must be > 0, got {self.burstiness}")


def gamma_arrivals(rng: np.random.Generator, rate: float, shape: float, t0: float, t1: float,
                   intensity: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Arrival times in [t0, t1): a gamma renewal process of the given rate, run in the operational
    time of `intensity` (the burst state's cumulative multiplier) when given."""
    span = (t1 - t0) if intensity is None else float(intensity[1][-1])
    if rate <= 0 or span <= 0:
        return np.empty(0)
    mean_n = rate * span
    gaps = rng.gamma(shape, 1.0 / (rate * shape), int(mean_n + 6 * math.sqrt(mean_n / shape) + 16))
    tau = np.cumsum(gaps)
    while tau[-1] < span:                  # rare: extend until past the end
        tau = np.concatenate([tau, tau[-1] + np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), len(gaps)))])
    tau = tau[tau < span]
    if intensity is None:
        return t0 + tau
    times, cum = intensity
    return np.interp(tau, cum, times)


@dataclass(eq=False)
class Requests:
    """Requests as arrays; `model` indexes `models`."""

    models: list[str]
    model: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    arrival_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    prompt_tokens: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    output_tokens: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def __len__(self) -> int:
        return len(self.arrival_s)

    def of(self, name: str) -> Requests:
        keep = self.model == self.models.index(name)
        return Requests(self.models, self.model[keep], self.arrival_s[keep], self.prompt_tokens[keep],
                        self.output_tokens[keep])

    def sorted(self) -> Requests:
        order = np.argsort(self.arrival_s, kind="stable")
        return Requests(self.models, self.model[order], self.arrival_s[order], self.prompt_tokens[order],
                        self.output_tokens[order])


def generate(traffic: Mapping[str, ModelTraffic], max_model_len: Mapping[str, int], t0: float, t1: float,
             rng: np.random.Generator, burst: BurstProcess = NO_BURSTS) -> Requests:
    """Requests of every model arriving in [t0, t1), sorted by arrival."""
    names = list(traffic)
    shared = burst.intensity(rng, t0, t1) if burst.active and burst.correlated else None
    parts = []
    for i, name in enumerate(names):
        t = traffic[name]
        path = shared if shared is not None or not burst.active else burst.intensity(rng, t0, t1)
        arrivals = gamma_arrivals(rng, t.rate_rps, t.burstiness, t0, t1, path)
        prompt, output = t.lengths.sample(rng, len(arrivals), max_model_len[name])
        parts.append((np.full(len(arrivals), i, np.int64), arrivals, prompt, output))
    cols = [np.concatenate([p[k] for p in parts]) for k in range(4)] if parts else []
    return Requests(names, *cols).sorted()


# ------------------------------------------------------------------------------------------------
# Trace files

def read_trace(path: str | os.PathLike[str]) -> Requests:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"workload trace {str(p)!r} not found (expected sharegpt, longalign or a JSONL file)")
    models: list[str] = []
    cols: list[list[float]] = [[], [], [], []]
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            name, arrival = str(rec["model"]), float(rec["arrival_s"])
            prompt, output = int(rec["prompt_tokens"]), int(rec["output_tokens"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{p}:{lineno}: expected a JSON object with model, arrival_s, prompt_tokens, output_tokens ({exc})"
            ) from exc
        if prompt < 1 or output < 1 or arrival < 0:
            raise ValueError(f"{p}:{lineno}: prompt_tokens and output_tokens must be >= 1 and arrival_s >= 0")
        if name not in models:
            models.append(name)
        for col, v in zip(cols, (models.index(name), arrival, prompt, output), strict=True):
            col.append(v)
    if not cols[0]:
        raise ValueError(f"{p}: trace holds no requests")
    return Requests(models, np.array(cols[0], np.int64), np.array(cols[1]), np.array(cols[2], np.int64),
                    np.array(cols[3], np.int64)).sorted()


def write_trace(requests: Requests, path: str | os.PathLike[str]) -> None:
    with open(path, "w") as f:
        for m, a, p, o in zip(requests.model, requests.arrival_s, requests.prompt_tokens, requests.output_tokens,
                              strict=True):
            f.write(json.dumps({"model": requests.models[m], "arrival_s": round(float(a), 6),
                                "prompt_tokens": int(p), "output_tokens": int(o)}) + "\n")


def trace_traffic(trace: Requests, name: str) -> tuple[float, float, LengthDist]:
    """(rate, gamma shape fitted from the gaps' coefficient of variation, empirical lengths) of one
    model in a trace."""
    if name not in trace.models:
        raise ValueError(f"trace has no requests for model {name!r} (it has {trace.models})")
    own = trace.of(name)
    span = float(trace.arrival_s.max() - trace.arrival_s.min()) or 1.0
    rate = len(own) / span
    gaps = np.diff(own.arrival_s)
    cv2 = float(gaps.var() / gaps.mean() ** 2) if len(gaps) > 2 and gaps.mean() > 0 else 1.0
    shape = 1.0 / cv2 if cv2 > 0 else 1.0
    pairs = np.stack([own.prompt_tokens, own.output_tokens], axis=1)
    return rate, shape, LengthDist(f"trace:{name}", pairs=pairs)
