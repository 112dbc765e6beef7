"""Paged-attention kernels: pure functions on arrays. Never imports jpaged.

Every implementation shares one signature (see `reference.ragged_paged_attention`) and one KV pool
layout (see `reference.get_kv_cache_shape`).
"""
