"""The scheduler's view of the KV cache: a budget of fixed-size blocks and each sequence's block table.

The engine allocates blocks here before a step (a sequence needs ceil(tokens / block_size) blocks) and frees them
when a request finishes or is preempted; the runner only writes and reads the slots the tables name
(runner.PagedRunner). Low block ids are handed out first, so the runner's pool grows only as far as the load needs.
"""

from __future__ import annotations

import heapq


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks))  # a heap: lowest id first
        self._tables: dict[int, list[int]] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def missing(self, seq_id: int, tokens: int) -> int:
        """Blocks seq_id still needs to hold `tokens` tokens."""
        return max(0, self.blocks_for(tokens) - len(self._tables.get(seq_id, ())))

    def grow(self, seq_id: int, tokens: int) -> bool:
        """Give seq_id enough blocks for `tokens` tokens; False (and nothing allocated) if too few are free."""
        missing = self.missing(seq_id, tokens)
        if missing > len(self._free):
            return False
        table = self._tables.setdefault(seq_id, [])
        table.extend(heapq.heappop(self._free) for _ in range(missing))
        return True

    def table(self, seq_id: int) -> list[int]:
        return list(self._tables.get(seq_id, ()))

    def holds(self, seq_id: int) -> bool:
        return bool(self._tables.get(seq_id))

    def free(self, seq_id: int) -> None:
        for block in self._tables.pop(seq_id, ()):
            heapq.heappush(self._free, block)
