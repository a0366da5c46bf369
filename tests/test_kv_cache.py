"""The KV cache's bookkeeping: slots, room checks and positions under left padding."""
from __future__ import annotations

import pytest
import torch

from trimtab.backend.kv_cache import KVCache


def new_cache(max_len: int = 6, batch: int = 2) -> KVCache:
    return KVCache(num_layers=1, batch_size=batch, num_kv_heads=1, head_dim=4, max_len=max_len, dtype=torch.float32)


def test_slots_follow_the_length_and_stop_at_the_end():
    cache = new_cache()
    assert cache.slots(4).tolist() == [0, 1, 2, 3]
    cache.advance(4)
    assert cache.slots(2).tolist() == [4, 5]
    with pytest.raises(ValueError, match="KV cache full: 4 \\+ 3 tokens > 6 slots"):
        cache.slots(3)


def test_ensure_room_checks_without_changing_anything():
    cache = new_cache()
    cache.advance(5)
    cache.ensure_room(1)                       # the last slot is free
    with pytest.raises(ValueError, match="KV cache full: 5 \\+ 2 tokens > 6 slots"):
        cache.ensure_room(2)
    assert cache.length == 5


def test_positions_skip_each_rows_padding():
    cache = new_cache()
    cache.pad.copy_(torch.tensor([0, 2]))
    assert cache.positions(3).tolist() == [[0, 1, 2], [0, 0, 0]]
    cache.advance(3)
    assert cache.positions(2).tolist() == [[3, 4], [1, 2]]


def test_truncate_rewinds_and_refuses_to_grow():
    cache = new_cache()
    cache.advance(5)
    cache.truncate(2)
    assert cache.length == 2 and cache.slots(3).tolist() == [2, 3, 4]
    for bad in (3, -1):
        with pytest.raises(ValueError, match=f"cannot truncate a KV cache of 2 slots to {bad}"):
            cache.truncate(bad)
