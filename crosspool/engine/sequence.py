"""Sequence: one request's state as it moves through the scheduler, plus its timing."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from crosspool.engine.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class RequestMetrics:
    arrival_s: float
    first_scheduled_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    tbt_s: list[float] = field(default_factory=list)   # gaps between consecutive tokens, kept as they come
    finished_s: float | None = None
    num_preemptions: int = 0

    def add_token(self, now: float) -> None:
        if self.token_times_s:
            self.tbt_s.append(now - self.token_times_s[-1])
        self.token_times_s.append(now)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def queue_s(self) -> float | None:
        return None if self.first_scheduled_s is None else self.first_scheduled_s - self.arrival_s


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    model: str
    prompt: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0                    # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    logprobs: list = field(default_factory=list)   # TokenLogprob per output token, when asked for
    # incremental detokenization (crosspool.engine.output): text of output_token_ids[:read_offset], and the
    # window start whose decode gives that text's tail its context (spacing, merged bytes)
    decoded: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    # tokens sampled on the device by a launched step whose results the host has not read yet (async decode:
    # the next step reads them from the device); they count in num_tokens but not in output_token_ids
    pending: int = 0
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, pos: int) -> int:
        """Token at position pos (prompt or output) without building the whole list."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[pos] if pos < n else self.output_token_ids[pos - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.pending

    @property
    def tokens_exhausted(self) -> bool:
        """Its last token is already sampled (max_tokens reached, counting pending ones): nothing left to
        compute; it finishes once the host reads that token."""
        return len(self.output_token_ids) + self.pending >= self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
