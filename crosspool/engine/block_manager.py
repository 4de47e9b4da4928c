"""Block manager: one model's KV blocks (drawn from the shared KV pool) and its sequences' block tables.

An optional per-model cap bounds how many blocks the model may hold at once (a quota; tests use it to
force preemption).
"""

from __future__ import annotations

from crosspool.engine.sequence import Sequence
from crosspool.pools.kv_pool import ModelKV


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, kv: ModelKV, max_blocks: int | None = None) -> None:
        self.kv = kv
        self.block_size = kv.block_size
        self.num_blocks = min(max_blocks or kv.max_blocks, kv.max_blocks)   # capacity
        self.num_used = 0

    @property
    def num_free(self) -> int:
        return min(self.kv.num_free_blocks(), self.num_blocks - self.num_used)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` tokens in total."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks_needed(seq, num_tokens)
        return need <= self.num_blocks - self.num_used and self.kv.can_alloc(need)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        need = self.blocks_needed(seq, num_tokens)
        if not self.can_grow(seq, num_tokens):
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free} free")
        seq.block_table.extend(self.kv.alloc(need))
        self.num_used += need

    def release(self, seq: Sequence) -> None:
        self.kv.free(seq.block_table)
        self.num_used -= len(seq.block_table)
        seq.block_table = []
