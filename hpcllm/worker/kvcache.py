"""The scheduler's view of the KV cache: a budget of fixed-size blocks and each sequence's block table.

The engine allocates blocks here before a step (a sequence needs ceil(tokens / block_size) blocks) and frees them
when a request finishes or is preempted; the runner only writes and reads the slots the tables name
(runner.PagedRunner). Blocks without content are handed out lowest id first, so the runner's pool grows only as
far as the load needs.

Prefix caching (vLLM's automatic prefix caching): a full block whose keys/values have been computed is registered
under the hash of every token up to its end (a chain: the previous block's hash plus this block's tokens). A new
request first looks up its prompt's full blocks and shares the ones found (reference counts), so a common system
prompt is prefilled once. A chain starts from a salt: sequences whose keys/values differ for the same tokens (another
LoRA adapter) never share blocks. A freed block keeps its content and registration until its memory is needed again
(blocks without content are used first, then the least recently freed cached ones).
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._empty = list(range(num_blocks))  # a heap of free blocks without cached content: lowest id first
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free blocks with content: least recent first
        self._refs = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._hash_of: dict[int, bytes] = {}  # block -> hash of its content (registered blocks)
        self._block_of: dict[bytes, int] = {}
        self._registered: dict[int, tuple[int, bytes]] = {}  # seq -> (blocks registered, hash of the last one)

    @property
    def free_blocks(self) -> int:
        return len(self._empty) + len(self._cached_free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def missing(self, seq_id: int, tokens: int) -> int:
        """Blocks seq_id still needs to hold `tokens` tokens."""
        return max(0, self.blocks_for(tokens) - len(self._tables.get(seq_id, ())))

    def grow(self, seq_id: int, tokens: int) -> bool:
        """Give seq_id enough blocks for `tokens` tokens; False (and nothing allocated) if too few are free."""
        missing = self.missing(seq_id, tokens)
        if missing > self.free_blocks:
            return False
        table = self._tables.setdefault(seq_id, [])
        table.extend(self._take() for _ in range(missing))
        return True

    def table(self, seq_id: int) -> list[int]:
        return list(self._tables.get(seq_id, ()))

    def holds(self, seq_id: int) -> bool:
        return bool(self._tables.get(seq_id))

    def free(self, seq_id: int) -> None:
        self._registered.pop(seq_id, None)
        for block in self._tables.pop(seq_id, ()):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._cached_free[block] = None
                else:
                    heapq.heappush(self._empty, block)

    # ---- prefix caching ------------------------------------------------------------------------------------------

    def share_prefix(self, seq_id: int, token_ids: list[int], salt: bytes = b"") -> int:
        """Give a new sequence the cached blocks of its longest registered prefix under `salt` (register's); the
        tokens they hold. At least the last token is left to compute (its logits are needed)."""
        if not self.prefix_caching or seq_id in self._tables:
            return 0
        blocks: list[int] = []
        parent = salt
        for index in range((len(token_ids) - 1) // self.block_size):
            parent = self._hash(parent, token_ids, index)
            block = self._block_of.get(parent)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            if self._refs[block] == 0:
                del self._cached_free[block]
            self._refs[block] += 1
        if blocks:
            self._tables[seq_id] = blocks
            self._registered[seq_id] = (len(blocks), parent)
        return len(blocks) * self.block_size

    def register(self, seq_id: int, token_ids: list[int], computed: int, salt: bytes = b"") -> None:
        """Register seq_id's full blocks whose keys/values are computed (its first `computed` tokens); salt: what
        else than the tokens the keys/values depend on (the LoRA adapter), b"" for the base model."""
        if not self.prefix_caching:
            return
        done, parent = self._registered.get(seq_id, (0, salt))
        table = self._tables.get(seq_id, [])
        full = min(computed // self.block_size, len(table))
        for index in range(done, full):
            parent = self._hash(parent, token_ids, index)
            block = table[index]
            if parent not in self._block_of and block not in self._hash_of:
                self._block_of[parent] = block
                self._hash_of[block] = parent
        if full > done:
            self._registered[seq_id] = (full, parent)

    def _hash(self, parent: bytes, token_ids: list[int], index: int) -> bytes:
        tokens = token_ids[index * self.block_size:(index + 1) * self.block_size]
        return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()

    def _take(self) -> int:
        if self._empty:
            block = heapq.heappop(self._empty)
        else:  # evict the least recently freed cached block
            block, _ = self._cached_free.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block
