"""DataParallelRouter alone: least-loaded choice, dispatch counted at once, prefix affinity, the
slack threshold, unavailable replicas and the bounded prefix map."""

import pytest

from jpaged.dp_router import DataParallelRouter
from jpaged.engine.block_pool import hash_block_tokens

BLOCK = 4


def prompt(prefix: int, length: int) -> list[int]:
    """Token ids whose blocks are determined by `prefix` (equal prefixes give equal blocks)."""
    return [prefix * 1000 + i for i in range(length)]


def test_least_loaded_counts_dispatched_requests_at_once():
    router = DataParallelRouter(3, BLOCK, affinity_slack=0)
    # No prompt has a full block: pure least-loaded, lowest index among ties.
    assert [router.dispatch([7, 8]) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert router.loads == [2, 2, 2]
    router.release(1)
    router.release(1)
    assert router.dispatch([1]) == 1
    # n samples count as n sequences.
    assert router.dispatch([1], num_seqs=5) == 1
    assert router.loads == [2, 6, 2]
    assert [router.dispatch([1]) for _ in range(3)] == [0, 2, 0]
    assert router.loads == [4, 6, 3]


def test_affinity_follows_the_longest_seen_prefix():
    router = DataParallelRouter(2, BLOCK, affinity_slack=2)
    assert router.dispatch(prompt(1, 9)) == 0  # 2 full blocks of prefix 1 -> replica 0
    assert router.dispatch(prompt(2, 8)) == 1  # least loaded
    # Same first block as prefix 2's, then different: affine to 1, though the tie-break says 0.
    assert router.loads == [1, 1]
    assert router.dispatch(prompt(2, 4) + [5, 5, 5, 5, 5]) == 1
    assert router.loads == [1, 2]
    # Shorter than a block: no affinity, least loaded.
    assert router.dispatch(prompt(2, 3)) == 0
    # Prefix 3's two blocks go to X; then its first block alone to the other replica, Y.
    x = router.dispatch(prompt(3, 8))
    y = router.dispatch(prompt(3, 4), available=[r != x for r in range(2)])
    assert x != y
    # A longer prompt matches one block on Y and two on X: the longest match wins.
    assert router.affine_replica(router.prefix_hashes(prompt(3, 12)), [0, 1]) == x
    assert router.dispatch(prompt(3, 12)) == x


def test_affinity_gives_way_past_the_slack():
    router = DataParallelRouter(2, BLOCK, affinity_slack=2)
    shared = prompt(9, 8)
    assert router.dispatch(shared) == 0
    # Affine replica 0 may be up to 2 sequences busier than replica 1.
    assert router.dispatch(shared) == 0  # loads 1 vs 0: within the slack
    assert router.dispatch(shared) == 0  # loads 2 vs 0: within the slack
    assert router.loads == [3, 0]
    assert router.dispatch(shared) == 1  # 3 > 0 + 2: least loaded wins
    # The prefix was last sent to replica 1, so it is affine there now.
    assert router.dispatch(shared) == 1
    assert router.loads == [3, 2]


def test_unavailable_replicas_are_skipped():
    router = DataParallelRouter(3, BLOCK, affinity_slack=10)
    assert router.dispatch(prompt(1, 8)) == 0
    assert router.dispatch(prompt(1, 8), available=[False, True, True]) == 1  # affine replica 0 is down
    assert router.dispatch(prompt(2, 8), available=[False, False, True]) == 2
    with pytest.raises(ValueError, match="no replica"):
        router.dispatch(prompt(1, 8), available=[False, False, False])


def test_affinity_off_and_bounded_prefix_map():
    router = DataParallelRouter(2, BLOCK, affinity_slack=100, max_affinity_blocks=0)
    assert [router.dispatch(prompt(1, 8)) for _ in range(4)] == [0, 1, 0, 1]
    router = DataParallelRouter(2, BLOCK, affinity_slack=100, max_affinity_blocks=2, max_prefixes=3)
    assert len(router.prefix_hashes(prompt(1, 40))) == 2  # only the first 2 blocks are hashed
    router.dispatch(prompt(1, 8))  # 2 hashes
    router.dispatch(prompt(2, 8))  # 2 more: the oldest (prefix 1, block 0) is evicted
    assert len(router._prefix_owner) == 3
    assert router.prefix_hashes(prompt(1, 8))[0] not in router._prefix_owner


def test_prefix_hashes_are_the_prefix_cache_hashes():
    router = DataParallelRouter(1, BLOCK, affinity_slack=0)
    tokens = prompt(4, 10)
    first = hash_block_tokens(None, tokens[:4])
    assert router.prefix_hashes(tokens) == [first, hash_block_tokens(first, tokens[4:8])]


def test_prompts_under_another_salt_or_adapter_have_no_affinity():
    """The prefix cache never shares blocks across cache_salts or LoRA adapters, so the same prompt
    under another salt or adapter goes to the least-loaded replica, and under the same one back
    to its replica."""
    router = DataParallelRouter(2, BLOCK, affinity_slack=4)
    tokens = prompt(5, 8)
    tenant_a = router.prefix_seed(None, "tenant-a")
    assert router.dispatch(tokens, seed=tenant_a) == 0
    assert router.dispatch(tokens, seed=router.prefix_seed(None, "tenant-b")) == 1  # no affinity: least loaded
    assert router.dispatch(tokens) == 0  # unsalted: least loaded (tie)
    assert router.dispatch(tokens, seed=router.prefix_seed("sql-adapter", None)) == 1
    assert router.loads == [2, 2]
    assert router.dispatch(tokens, seed=tenant_a) == 0
    assert router.dispatch(tokens, seed=router.prefix_seed(None, "tenant-b")) == 1
    assert router.prefix_seed(None, None) is None
    assert len({router.prefix_seed(*key) for key in (("x", None), ("y", None), ("x", "s"), (None, "s"))}) == 4
