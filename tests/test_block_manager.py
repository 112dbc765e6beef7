"""Block pool and KV cache manager on tiny pools: exact block ids, free-queue order, hits, swaps."""

import pytest

from jpaged.engine.block_manager import KVCacheManager
from jpaged.engine.block_pool import BlockPool, FreeKVCacheBlockQueue, KVCacheBlock, block_hash_seed, hash_block_tokens
from jpaged.engine.request import Request
from jpaged.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id, token_ids, **params):
    return Request(request_id, token_ids, SamplingParams(**params))


def free_ids(manager):
    return [b.block_id for b in manager.block_pool.free_block_queue.get_all_free_blocks()]


def table(manager, request):
    return manager.get_block_ids(request.request_id)


def admit(manager, request):
    """What the scheduler does for a waiting request that fits in full."""
    blocks, num_cached = manager.get_computed_blocks(request)
    new = manager.allocate_slots(request, request.num_tokens - num_cached, blocks)
    assert new is not None
    request.num_computed_tokens = request.num_tokens
    return num_cached


def test_hashes_chain_over_the_whole_prefix():
    a = hash_block_tokens(None, [1, 2, 3, 4])
    assert a == hash_block_tokens(None, [1, 2, 3, 4])
    assert a != hash_block_tokens(None, [1, 2, 3, 5])
    assert hash_block_tokens(a, [5, 6, 7, 8]) != hash_block_tokens(hash_block_tokens(None, [0, 2, 3, 4]), [5, 6, 7, 8])
    # Large token ids do not alias small ones.
    assert hash_block_tokens(None, [2**32 + 1]) != hash_block_tokens(None, [1])


def test_block_hash_seed_keeps_adapters_and_salts_apart():
    digest = bytes(range(32))
    assert block_hash_seed(None, None) is None and block_hash_seed(digest, None) == digest  # as before salts
    seeds = [block_hash_seed(d, salt) for d in (None, digest) for salt in ("tenant-a", "tenant-b")]
    assert len({None, digest, *seeds}) == 6
    assert block_hash_seed(digest, "tenant-a") == block_hash_seed(digest, "tenant-a")


def test_free_queue_is_a_linked_list_in_eviction_order():
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeKVCacheBlockQueue(blocks)
    queue.remove(blocks[2])
    queue.append(blocks[2])
    assert queue.popleft() is blocks[0]
    assert [b.block_id for b in queue.get_all_free_blocks()] == [1, 3, 4, 2]
    assert queue.num_free_blocks == 4
    for _ in range(4):
        queue.popleft()
    with pytest.raises(ValueError, match="No free KV cache blocks"):
        queue.popleft()


def test_null_block_is_never_handed_out():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3]
    with pytest.raises(ValueError, match="Cannot get 1 free blocks: only 0"):
        pool.get_new_blocks(1)
    pool.free_blocks(blocks)
    with pytest.raises(ValueError, match="Block 1 freed more often"):
        pool.free_blocks(blocks[:1])
    with pytest.raises(ValueError, match="num_blocks must be at least 2"):
        BlockPool(num_blocks=1, enable_caching=True)


def test_second_request_with_same_three_block_prefix_allocates_only_new_blocks():
    manager = KVCacheManager(num_blocks=11, block_size=BLOCK_SIZE)
    prefix = list(range(100, 112))  # 3 full blocks
    first = make_request("a", prefix + [1, 2])
    assert admit(manager, first) == 0
    assert table(manager, first) == [1, 2, 3, 4]
    assert free_ids(manager) == [5, 6, 7, 8, 9, 10]

    second = make_request("b", prefix + [7, 8, 9])
    assert admit(manager, second) == 12
    assert table(manager, second) == [1, 2, 3, 5]
    assert [manager.block_pool.blocks[i].ref_cnt for i in (1, 2, 3, 4, 5)] == [2, 2, 2, 1, 1]

    # Freeing puts an uncached block (the partial block 4) first in line for reuse, and a
    # table's cached blocks at the end, its tail first in line for eviction.
    manager.free(first)
    assert free_ids(manager) == [4, 6, 7, 8, 9, 10]
    manager.free(second)
    assert free_ids(manager) == [5, 4, 6, 7, 8, 9, 10, 3, 2, 1]
    third = make_request("c", prefix + [3, 4])
    assert admit(manager, third) == 12
    assert table(manager, third) == [1, 2, 3, 5]
    assert free_ids(manager) == [4, 6, 7, 8, 9, 10]


def test_a_fully_cached_prompt_recomputes_its_last_block():
    manager = KVCacheManager(num_blocks=11, block_size=BLOCK_SIZE)
    prompt = list(range(8))
    admit(manager, make_request("a", prompt))
    again = make_request("b", prompt)
    blocks, num_cached = manager.get_computed_blocks(again)
    assert [b.block_id for b in blocks] == [1] and num_cached == 4


def test_a_hit_never_leaves_one_token_to_compute():
    """A prompt of 4k + 1 tokens whose 4k are cached recomputes 5: its last token alone would
    get other bits than in the chunk that computed it first."""
    manager = KVCacheManager(num_blocks=11, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", list(range(10))))  # blocks of 0-3 and 4-7 cached
    blocks, num_cached = manager.get_computed_blocks(make_request("b", list(range(9))))
    assert [b.block_id for b in blocks] == [1] and num_cached == 4
    blocks, num_cached = manager.get_computed_blocks(make_request("c", list(range(10))))
    assert [b.block_id for b in blocks] == [1, 2] and num_cached == 8
    assert manager.get_computed_blocks(make_request("d", [0])) == ([], 0)


def test_prompt_logprobs_requests_skip_the_cache_and_disabled_caching_never_hits():
    manager = KVCacheManager(num_blocks=11, block_size=BLOCK_SIZE)
    prompt = list(range(9))
    admit(manager, make_request("a", prompt))
    assert manager.get_computed_blocks(make_request("b", prompt, prompt_logprobs=1)) == ([], 0)

    uncached = KVCacheManager(num_blocks=11, block_size=BLOCK_SIZE, enable_caching=False)
    admit(uncached, make_request("a", prompt))
    assert uncached.get_computed_blocks(make_request("b", prompt)) == ([], 0)
    assert not uncached.block_pool.cached_block_hash_to_block


def test_lru_eviction_drops_the_least_recently_freed_cached_block_first():
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    prompt = list(range(8))
    first = make_request("a", prompt + [99])
    admit(manager, first)  # [1, 2, 3]; blocks 1 and 2 cached
    manager.free(first)
    assert free_ids(manager) == [3, 4, 2, 1]  # the uncached block 3 first in line for reuse
    for request_id in ("x", "y", "z"):  # one fresh block each: 3, 4, then 2 (evicting its hash)
        admit(manager, make_request(request_id, [50 + len(request_id)]))
    assert free_ids(manager) == [1]
    blocks, num_cached = manager.get_computed_blocks(make_request("b", prompt + [99]))
    assert [b.block_id for b in blocks] == [1] and num_cached == 4
    assert len(manager.block_pool.cached_block_hash_to_block) == 1


def test_failed_allocation_changes_nothing_and_counts_revived_hits():
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    prompt = list(range(8))
    first = make_request("a", prompt + [7])
    admit(manager, first)
    manager.free(first)
    admit(manager, make_request("hog", [60]))  # takes block 3 (uncached, first in line)
    assert free_ids(manager) == [4, 2, 1]
    # 13 tokens need 4 blocks: 2 cached hits (both free) + 2 new, but only 1 block stays free.
    longer = make_request("b", prompt + list(range(20, 25)))
    blocks, num_cached = manager.get_computed_blocks(longer)
    assert [b.block_id for b in blocks] == [1, 2] and num_cached == 8
    assert manager.allocate_slots(longer, longer.num_tokens - num_cached, blocks) is None
    assert free_ids(manager) == [4, 2, 1]
    assert [b.ref_cnt for b in manager.block_pool.blocks] == [0, 0, 0, 1, 0]
    assert table(manager, longer) == []


def test_growing_a_request_appends_blocks_only_at_block_boundaries():
    manager = KVCacheManager(num_blocks=11, block_size=BLOCK_SIZE)
    request = make_request("a", [1, 2, 3])
    admit(manager, request)
    assert table(manager, request) == [1]
    for token in (4, 5):
        request.append_output_token(token, now=0.0)
        new = manager.allocate_slots(request, 1)
        request.num_computed_tokens += 1
        assert [b.block_id for b in new] == ([] if token == 4 else [2])
    assert table(manager, request) == [1, 2]
    # The first block became full when token 4 was computed: it is cached now.
    assert manager.block_pool.blocks[1].block_hash == request.block_hashes[0]


def test_trim_to_computed_undoes_a_steps_allocation():
    """The priority scheduler may preempt a request already scheduled in the step: the block its
    decode token fills was indexed when scheduled but will not be written, so it is no hit, and a
    block taken for that token alone is given back (a swap-out would copy it to a host slot)."""
    manager = KVCacheManager(num_blocks=11, block_size=BLOCK_SIZE)
    filling = make_request("a", [1, 2, 3, 4, 5, 6, 7])
    admit(manager, filling)  # block 1 full and cached, block 2 holds 3 tokens
    filling.append_output_token(8, now=0.0)
    manager.allocate_slots(filling, 1)  # token 8 will fill block 2: indexed now
    assert manager.block_pool.blocks[2].block_hash == filling.block_hashes[1]
    manager.trim_to_computed(filling)
    assert table(manager, filling) == [1, 2]
    assert manager.block_pool.blocks[2].block_hash is None
    assert manager.block_pool.get_cached_block(filling.block_hashes[1]) is None
    assert manager.block_pool.blocks[1].block_hash == filling.block_hashes[0]

    opening = make_request("b", [11, 12, 13, 14])
    admit(manager, opening)
    opening.append_output_token(15, now=0.0)
    assert [b.block_id for b in manager.allocate_slots(opening, 1)] == [4]  # token 15 opens block 4
    manager.trim_to_computed(opening)
    assert table(manager, opening) == [3] and free_ids(manager)[0] == 4
    assert manager.block_pool.blocks[3].block_hash == opening.block_hashes[0]
    manager.free(filling)
    manager.free(opening)
    assert free_ids(manager) == [2, 4, *range(5, 11), 1, 3]  # uncached blocks are reused first
    assert manager.get_computed_blocks(make_request("c", filling.all_token_ids + [9, 10]))[1] == BLOCK_SIZE


def test_swap_out_and_in_move_whole_tables_through_host_slots():
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE, enable_caching=False, num_swap_blocks=3)
    request = make_request("a", list(range(10)))
    admit(manager, request)
    assert table(manager, request) == [1, 2, 3]
    assert manager.swap_out(request) == [(1, 0), (2, 1), (3, 2)]
    assert table(manager, request) == [] and manager.num_free_host_slots == 0
    assert free_ids(manager) == [1, 2, 3, 4, 5]  # uncached blocks are reused first
    other = make_request("b", [1])
    admit(manager, other)
    assert manager.swap_out(other) is None  # no host slot left: the caller recomputes instead
    assert table(manager, other) == [1]

    request.append_output_token(42, now=0.0)
    assert manager.swap_in(request, 1) == [(0, 2), (1, 3), (2, 4)]
    assert table(manager, request) == [2, 3, 4]
    assert manager.num_free_host_slots == 3
    manager.free(request)
    manager.free(other)
    assert manager.block_pool.get_num_free_blocks() == 5


def test_swap_in_fails_cleanly_when_the_pool_is_full():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE, num_swap_blocks=4)
    request = make_request("a", list(range(8)))
    admit(manager, request)
    manager.swap_out(request)
    hog = make_request("hog", list(range(50, 59)))
    admit(manager, hog)  # takes all 3 blocks
    assert manager.swap_in(request, 1) is None
    assert manager.num_free_host_slots == 2
    manager.free(request)  # aborting a swapped request returns its host slots
    assert manager.num_free_host_slots == 4
