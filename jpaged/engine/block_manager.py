"""Per-request KV blocks: block tables, prefix-cache lookups, and swapping to host slots.

Invariants (checked by tests/test_block_manager.py and tests/test_scheduler.py):
- A request's block table is append-only while it runs and covers at least its computed tokens.
- A request writes KV only at positions >= its num_computed_tokens, i.e. only into blocks it
  allocated itself: prefix-cache hits are full blocks that are never written again.
- Blocks are cached (indexed by hash) as soon as the step that computes them is scheduled, so a
  request scheduled later in the same step may already share them. This relies on the runner's
  order inside each layer: every token's KV is written before attention reads the pool.
- Freeing a request returns every block it referenced and every host slot it held; its full
  blocks of computed tokens stay indexed (free cached blocks, reused until evicted).
"""

from jpaged.engine.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from jpaged.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates blocks to requests from a BlockPool; swaps whole block tables to host slots."""

    def __init__(self, *, num_blocks: int, block_size: int, enable_caching: bool = True, num_swap_blocks: int = 0):
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_to_block_ids: dict[str, list[int]] = {}  # the same tables as block ids
        self._num_cached_blocks: dict[str, int] = {}  # leading blocks of a request already indexed
        self.num_swap_blocks = num_swap_blocks
        self._free_host_slots = list(range(num_swap_blocks - 1, -1, -1))  # pop() gives slot 0 first
        self.req_to_host_slots: dict[str, list[int]] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.block_pool.num_blocks - 1

    @property
    def num_free_host_slots(self) -> int:
        return len(self._free_host_slots)

    def _update_block_hashes(self, request: Request) -> list[bytes]:
        hashes = request.block_hashes
        tokens = request.all_token_ids
        for i in range(len(hashes), request.num_tokens // self.block_size):
            parent = hashes[-1] if hashes else request.block_hash_seed
            hashes.append(hash_block_tokens(parent, tokens[i * self.block_size : (i + 1) * self.block_size]))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of `request`'s full blocks and its length in tokens.

        At least the last two tokens are left to compute: the last one's logits are sampled, and
        a lone token would be computed with decode arithmetic, other bits than the same token
        got in the chunk that cached it (docs/kernels_cpu.md, "Batch invariance"). So a prompt
        that hits in full recomputes its last block, and one of 16k + 1 tokens its last two
        blocks' tokens. Requests with skip_reading_prefix_cache (by default those with
        prompt_logprobs) find nothing.
        """
        params = request.sampling_params
        if not self.enable_caching or params.skip_reading_prefix_cache or params.prompt_logprobs is not None:
            return [], 0
        hashes = self._update_block_hashes(request)
        max_hit_blocks = max(request.num_tokens - 2, 0) // self.block_size
        blocks = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[KVCacheBlock] = ()
    ) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        `new_computed_blocks` (from get_computed_blocks, for a request with no blocks yet) are
        shared, then fresh blocks are appended. Returns the fresh blocks, or None (and changes
        nothing) when the pool has too few free blocks.
        """
        request_id = request.request_id
        num_blocks = len(self.req_to_blocks.get(request_id, ()))
        num_computed_tokens = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = cdiv(num_computed_tokens + num_new_tokens, self.block_size)
        num_new_blocks = max(num_required - num_blocks - len(new_computed_blocks), 0)
        new_blocks = []
        if num_new_blocks or new_computed_blocks:
            # Hits on free cached blocks take them out of the free queue too.
            num_revived = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
            if num_new_blocks > self.block_pool.get_num_free_blocks() - num_revived:
                return None
            self.block_pool.touch(new_computed_blocks)
            new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
            added = [*new_computed_blocks, *new_blocks]
            self.req_to_blocks.setdefault(request_id, []).extend(added)
            self.req_to_block_ids.setdefault(request_id, []).extend(block.block_id for block in added)
        # Only known tokens are hashed: a multi-step decode allocates for tokens not sampled yet,
        # whose blocks are indexed by a later call.
        self._cache_full_blocks(request, min(num_computed_tokens + num_new_tokens, request.num_tokens))
        return new_blocks

    def _cache_full_blocks(self, request: Request, num_tokens_after_step: int) -> None:
        """Index the request's blocks that are full once this step's tokens are computed."""
        start = self._num_cached_blocks.get(request.request_id, 0)
        num_full = num_tokens_after_step // self.block_size
        if not self.enable_caching or num_full <= start:
            return
        blocks = self.req_to_blocks[request.request_id]
        hashes = self._update_block_hashes(request)
        for i in range(start, num_full):
            self.block_pool.cache_full_block(blocks[i], hashes[i])
        self._num_cached_blocks[request.request_id] = num_full

    def trim_to_computed(self, request: Request) -> None:
        """Undo what allocate_slots did for tokens the request has not computed (it is preempted
        after its step was scheduled, so that step will not write them): blocks indexed for such
        tokens leave the prefix-cache index, and blocks holding none of its computed tokens are
        freed. Nobody shares them: hits come only from admissions, later in the step."""
        request_id = request.request_id
        blocks, block_ids = self.req_to_blocks[request_id], self.req_to_block_ids[request_id]
        num_full_blocks = request.num_computed_tokens // self.block_size
        num_cached_blocks = self._num_cached_blocks.get(request_id, 0)
        for block in blocks[num_full_blocks:num_cached_blocks]:
            self.block_pool.uncache_block(block)
        self._num_cached_blocks[request_id] = min(num_cached_blocks, num_full_blocks)
        num_kept = cdiv(request.num_computed_tokens, self.block_size)
        self.block_pool.free_blocks(list(reversed(blocks[num_kept:])))
        del blocks[num_kept:], block_ids[num_kept:]

    def get_block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table."""
        return list(self.req_to_block_ids.get(request_id, ()))

    def free(self, request: Request) -> None:
        """Return all of the request's blocks (tail first, so its prefix stays cached longest)
        and host slots. Full blocks of computed tokens not indexed yet are indexed first: those a
        multi-step decode filled past the tokens known when it was allocated."""
        if request.request_id in self.req_to_blocks:
            self._cache_full_blocks(request, request.num_computed_tokens)
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.req_to_block_ids.pop(request.request_id, None)
        self.block_pool.free_blocks(list(reversed(blocks)))
        self._num_cached_blocks.pop(request.request_id, None)
        self._free_host_slots.extend(reversed(self.req_to_host_slots.pop(request.request_id, [])))

    def swap_out(self, request: Request) -> list[tuple[int, int]] | None:
        """Move the request's blocks to host slots: returns (device block id, host slot) pairs
        to copy before the step's forward, or None when the host slots are too few."""
        blocks = self.req_to_blocks.get(request.request_id, [])
        if len(blocks) > len(self._free_host_slots):
            return None
        slots = [self._free_host_slots.pop() for _ in blocks]
        mapping = [(block.block_id, slot) for block, slot in zip(blocks, slots)]
        self.free(request)
        self.req_to_host_slots[request.request_id] = slots
        return mapping

    def swap_in(self, request: Request, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Bring a swapped request back into fresh blocks with room for `num_new_tokens` more:
        returns (host slot, device block id) pairs to copy before the forward, or None (and
        changes nothing) when the pool has too few free blocks."""
        slots = self.req_to_host_slots[request.request_id]
        num_required = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        if num_required > self.block_pool.get_num_free_blocks():
            return None
        blocks = self.block_pool.get_new_blocks(num_required)
        self.req_to_blocks[request.request_id] = blocks
        self.req_to_block_ids[request.request_id] = [block.block_id for block in blocks]
        del self.req_to_host_slots[request.request_id]
        self._free_host_slots.extend(reversed(slots))
        self._cache_full_blocks(request, request.num_computed_tokens + num_new_tokens)
        return [(slot, block.block_id) for slot, block in zip(slots, blocks)]
