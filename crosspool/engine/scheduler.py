"""Scheduler: per-model continuous batching with admission against KV blocks.

Each step it decides, for one model, which sequences run and how many new tokens each contributes:
running sequences first (a decode token, or the next chunk of a chunked prefill), then waiting ones in
arrival order while the token budget, the sequence limit and free KV blocks allow. When a running
sequence needs a block and none is free, the newest running sequence is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed later, its tokens kept.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from crosspool.config import EngineConfig
from crosspool.engine.block_manager import BlockManager
from crosspool.engine.sequence import SeqStatus, Sequence


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """After this step every token of the sequence is in the cache, so a new token is sampled."""
        return self.seq.num_computed + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:   # preempted earlier in this loop
                continue
            if seq.pending and seq.tokens_exhausted:  # async decode: done, its last token not read yet
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + n):
                continue
            out.append(ScheduledSeq(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens - seq.num_computed
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    break
                n = budget
            if not self.blocks.can_grow(seq, seq.num_computed + n):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, seq.num_computed + n)
            seq.status = SeqStatus.RUNNING
            if seq.metrics.first_scheduled_s is None:
                seq.metrics.first_scheduled_s = time.perf_counter()
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's blocks to num_tokens, preempting the newest running sequences if needed.
        False when seq itself had to be preempted."""
        while not self.blocks.can_grow(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def next_step_blocks(self) -> int:
        """Blocks to keep pre-mapped for the coming steps: each running sequence's next chunk (or decode
        token) plus one block of headroom, and the first chunk of the next waiting request. The headroom
        lets the background mapper run a step behind without the scheduler ever mapping."""
        budget = self.config.max_num_batched_tokens
        headroom = self.blocks.block_size
        need = 0
        for seq in self.running:
            n = min(seq.num_tokens - seq.num_computed, budget) or 1
            need += self.blocks.blocks_needed(seq, seq.num_computed + n + headroom)
        if self.waiting:
            seq = self.waiting[0]
            need += self.blocks.blocks_needed(seq, seq.num_computed + min(seq.num_tokens - seq.num_computed, budget))
        return need

    def finish(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.release(seq)
        elif seq in self.waiting:     # preempted while its last token was still on the device (async decode)
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
