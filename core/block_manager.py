"""The paged KV cache's bookkeeping: fixed-size blocks, handed out on demand and shared by prefix.

Blocks are ref-counted. A full block gets a content hash chained to its parent's, so two requests that
share a prompt prefix map it to the same blocks. A block whose last owner leaves goes to the back of the
free queue but keeps its hash: it is evicted from the prefix cache only when the queue hands it out
again, so the least recently freed cached blocks go first.

Where every layer of the model slides over a window, a running sequence's blocks that fall entirely
behind it are released as it advances: no query will read them again. The sequence's block table keeps
their ids (positions stay where they are); the attention kernels never read keys outside the window, so
another sequence may meanwhile own and write them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from paged.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


def chain_hash(parent: int | None, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None) -> None:
        """`window`: the sliding window of every layer, where all of them slide."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.window = window
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        # Prefix-cache counters in tokens, as vLLM's metrics count them.
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, request: Request, num_tokens: int) -> None:
        """Extend request.block_hashes over the full blocks among its first num_tokens tokens.

        A block holding a token not yet known (a negative placeholder for one still being sampled) is
        not hashed until it is: its content is not settled.
        """
        size = self.block_size
        for i in range(len(request.block_hashes), num_tokens // size):
            tokens = request.token_ids[i * size : (i + 1) * size]
            if min(tokens) < 0:
                break
            parent = request.block_hashes[-1] if request.block_hashes else None
            request.block_hashes.append(chain_hash(parent, tokens))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids holding the longest cached prefix of the request's tokens.

        At least one token is always left to compute: the step needs it to produce logits.
        """
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._update_hashes(request, max_blocks * self.block_size)
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits

    def _new_blocks_needed(self, request: Request, num_new_tokens: int, cached: list[int]) -> int:
        """Blocks to take from the free queue: new ones, plus cached ones that sit there unowned."""
        total = request.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        fresh = self.blocks_needed(total) - len(request.block_ids) - len(cached)
        return max(fresh, 0) + sum(1 for b in cached if self.blocks[b].ref_count == 0)

    def can_allocate(self, request: Request, num_new_tokens: int, cached: list[int] = ()) -> bool:
        return self._new_blocks_needed(request, num_new_tokens, cached) <= self.num_free_blocks

    def allocate(self, request: Request, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Give the request blocks for num_new_tokens more tokens (after adopting cached prefix blocks).

        Returns False, changing nothing, when the pool is too small. Blocks that this step fills are
        registered in the prefix cache at once: the step writes their K/V before any layer reads them.
        """
        total = request.num_computed_tokens + num_new_tokens
        if self.window is not None:
            self._release_behind_window(request)
        known = min(total, request.num_tokens)  # past it: draft tokens, whose blocks are never offered
        if not cached and total <= len(request.block_ids) * self.block_size:
            # The common decode case: the tokens fit in blocks the request already holds.
            if self.enable_prefix_caching and known // self.block_size > request.num_registered_blocks:
                self._cache_full_blocks(request, known)
            return True
        if self._new_blocks_needed(request, num_new_tokens, cached) > self.num_free_blocks:
            return False
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            request.block_ids.append(block_id)
        request.num_computed_tokens += len(cached) * self.block_size
        if self.window is not None:
            self._release_behind_window(request)
        total = request.num_computed_tokens + num_new_tokens
        for _ in range(self.blocks_needed(total) - len(request.block_ids)):
            request.block_ids.append(self._pop_free())
        known = min(total, request.num_tokens)
        if self.enable_prefix_caching and known // self.block_size > request.num_registered_blocks:
            self._cache_full_blocks(request, known)
        return True

    def trim(self, request: Request) -> bool:
        """Hand back the blocks past the request's tokens (taken for draft tokens that were refused); whether
        there were any."""
        keep = max(self.blocks_needed(request.num_tokens), request.num_released_blocks)
        if len(request.block_ids) <= keep:
            return False
        for block_id in reversed(request.block_ids[keep:]):
            self._unref(block_id)
        del request.block_ids[keep:]
        return True

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        self._update_hashes(request, num_tokens)
        hashed = min(num_tokens // self.block_size, len(request.block_hashes))
        for i in range(request.num_registered_blocks, hashed):
            block, block_hash = self.blocks[request.block_ids[i]], request.block_hashes[i]
            if block.block_hash is None and block_hash not in self.cached:
                block.block_hash = block_hash
                self.cached[block_hash] = block.block_id
        request.num_registered_blocks = max(request.num_registered_blocks, hashed)

    def _release_behind_window(self, request: Request) -> None:
        """Hand back the blocks wholly before the window of the first token this step computes: every query
        from there on sees only keys from num_computed_tokens - window + 1."""
        behind = max(0, request.num_computed_tokens - self.window + 1) // self.block_size
        for block_id in request.block_ids[request.num_released_blocks : behind]:
            self._unref(block_id)
        request.num_released_blocks = max(request.num_released_blocks, behind)

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None
            if block.block_hash is None:  # nothing to reuse: hand it out before any cached block
                self.free_queue.move_to_end(block_id, last=False)

    def free(self, request: Request) -> None:
        """Release the request's blocks, last first, so a prefix's tail is evicted before its head."""
        for block_id in reversed(request.block_ids[request.num_released_blocks :]):
            self._unref(block_id)
        request.block_ids.clear()
        request.num_computed_tokens = 0
        request.num_registered_blocks = 0
        request.num_released_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block_hash, block_id in list(self.cached.items()):
            self.blocks[block_id].block_hash = None
        self.cached.clear()
