"""DataParallelRouter: which engine replica of a data-parallel front gets a request.

Pure Python (no JAX), so the rule is unit-tested on its own. Per request, over the replicas
that are still serving:

- load(r): the sequences replica r holds unfinished, i.e. its running + waiting, counted from
  the moment the router dispatches a request (`dispatch` adds the request's n at once, `release`
  takes it back when its stream ends), so a burst of requests spreads before any engine thread
  has picked one up.
- least: the replica with the smallest load (the lowest index among ties).
- affine: the replica that most recently got a prompt sharing the longest prefix of full KV
  blocks with this one: the prompt's first blocks (up to `max_affinity_blocks`) are hashed the
  way the prefix cache hashes them (`hash_block_tokens`, chained, from a seed of the request's
  LoRA adapter and cache_salt, so prompts that cannot share blocks have no affinity), and a
  bounded LRU map (`max_prefixes` entries) remembers hash -> replica. A prompt shorter than one
  block has none.
- the choice: affine when there is one and load(affine) <= load(least) + affinity_slack, so a
  replica that may still hold the prefix in its KV cache gets the request unless that would make
  it more than `affinity_slack` sequences busier than the least-loaded replica; else least.

Every prefix level of the dispatched prompt then maps to the chosen replica (most recent wins).
"""

import collections
import hashlib
from collections.abc import Sequence

from jpaged.engine.block_pool import BlockHash, block_hash_seed, hash_block_tokens

# Prompt blocks hashed per request for affinity (512 tokens at block size 16): enough to tell
# system prompts and few-shot preambles apart, and bounded hashing work per request.
DEFAULT_MAX_AFFINITY_BLOCKS = 32
# Block hashes remembered: about 10 MiB of map at most.
DEFAULT_MAX_PREFIXES = 65536


class DataParallelRouter:
    """Least-loaded routing with prefix affinity over `num_replicas` replicas (see the module doc).

    Args:
      num_replicas: M. block_size: tokens per KV block (the engine's --block-size).
      affinity_slack: how many more unfinished sequences the affine replica may hold than the
        least-loaded one and still get the request. max_affinity_blocks: prompt blocks hashed
        (0 turns affinity off: plain least-loaded). max_prefixes: size of the LRU hash map.
    """

    def __init__(self, num_replicas: int, block_size: int, affinity_slack: int,
                 max_affinity_blocks: int = DEFAULT_MAX_AFFINITY_BLOCKS, max_prefixes: int = DEFAULT_MAX_PREFIXES):
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}.")
        self.block_size = block_size
        self.affinity_slack = affinity_slack
        self.max_affinity_blocks = max_affinity_blocks
        self.max_prefixes = max_prefixes
        self.loads = [0] * num_replicas  # unfinished sequences per replica (dispatched, not released)
        self._prefix_owner: collections.OrderedDict[BlockHash, int] = collections.OrderedDict()  # LRU order

    def dispatch(self, prompt_token_ids: Sequence[int], num_seqs: int = 1,
                 available: Sequence[bool] | None = None, seed: BlockHash | None = None) -> int:
        """Picks the replica for a prompt of `num_seqs` samples, counts them on it, and returns it.

        available[r] False skips replica r (stopped or failed); ValueError when none is left.
        seed: what the prompt's first block hash chains from (`prefix_seed`): prompts under another
        LoRA adapter or cache_salt share no blocks, so they have no affinity to each other.
        """
        candidates = [r for r in range(len(self.loads)) if available is None or available[r]]
        if not candidates:
            raise ValueError("no replica is available")
        least = min(candidates, key=lambda r: self.loads[r])
        hashes = self.prefix_hashes(prompt_token_ids, seed)
        affine = self.affine_replica(hashes, candidates)
        choice = least
        if affine is not None and self.loads[affine] <= self.loads[least] + self.affinity_slack:
            choice = affine
        for block_hash in hashes:
            self._prefix_owner[block_hash] = choice
            self._prefix_owner.move_to_end(block_hash)
        while len(self._prefix_owner) > self.max_prefixes:
            self._prefix_owner.popitem(last=False)
        self.loads[choice] += num_seqs
        return choice

    def release(self, replica: int, num_seqs: int = 1) -> None:
        """The request dispatched to `replica` with `num_seqs` samples has finished or left."""
        self.loads[replica] -= num_seqs

    def prefix_hashes(self, prompt_token_ids: Sequence[int], seed: BlockHash | None = None) -> list[BlockHash]:
        """Chained hashes of the prompt's first full blocks (at most max_affinity_blocks), the
        first chained from `seed`."""
        num_blocks = min(len(prompt_token_ids) // self.block_size, self.max_affinity_blocks)
        hashes: list[BlockHash] = []
        for i in range(num_blocks):
            block = prompt_token_ids[i * self.block_size:(i + 1) * self.block_size]
            hashes.append(hash_block_tokens(hashes[-1] if hashes else seed, list(block)))
        return hashes

    @staticmethod
    def prefix_seed(lora_name: str | None, cache_salt: str | None) -> BlockHash | None:
        """The router's first-block seed for a request's adapter (by name: every replica loads the
        same adapter under it) and cache_salt, as the prefix cache seeds its hashes."""
        adapter = None if lora_name is None else hashlib.sha256(lora_name.encode()).digest()
        return block_hash_seed(adapter, cache_salt)

    def affine_replica(self, hashes: list[BlockHash], candidates: Sequence[int]) -> int | None:
        """The candidate that last got the longest of these prefixes (None: no prefix was seen)."""
        for block_hash in reversed(hashes):
            owner = self._prefix_owner.get(block_hash)
            if owner is not None and owner in candidates:
                return owner
        return None
