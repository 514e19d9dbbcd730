"""Block allocator: refcounts, prefix caching by content hash, LRU eviction of freed cached blocks."""
import pytest
import torch

from dsv2.engine import kv_cache
from dsv2.engine.kv_cache import BlockAllocator, allocate_kv_cache, default_kv_cache_memory, num_blocks_for_memory
from dsv2.engine.sampling_params import SamplingParams
from dsv2.engine.sequence import Sequence

BS = 4


def computed(alloc, seq):
    """Play a finished prefill: blocks for every token, all computed, then commit."""
    assert alloc.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    alloc.commit(seq)


def test_cache_tensors_and_sizing():
    caches = allocate_kv_cache(3, 10, BS, 576, torch.bfloat16, "cpu")
    assert len(caches) == 3 and all(c.shape == (10, BS, 576) and c.dtype == torch.bfloat16 for c in caches)
    assert all(not c.any() for c in caches)
    per_block = 3 * BS * 576 * 2
    assert num_blocks_for_memory(per_block * 7 + 5, 3, BS, 576, torch.bfloat16) == 7
    assert num_blocks_for_memory(per_block * 7, 3, BS, 576, torch.float32) == 3
    assert 0 < default_kv_cache_memory("cpu") <= 8 << 30


def test_cache_sizing_leaves_room_for_one_steps_activations(monkeypatch):
    """The default cache is sized from the memory left once the largest step's activations are set aside (a
    profile forward measures them on CUDA; on CPU they are estimated), and a machine too small for them gets an
    error that says what to lower instead of an engine that dies at its first long prefill."""
    from dsv2.capability import inference_plan
    from dsv2.config import ModelConfig
    from dsv2.engine.config import EngineConfig
    from dsv2.engine.kv_cache import size_kv_cache
    from conftest import REFERENCE
    cfg = ModelConfig.from_pretrained(f"{REFERENCE}/configs/DeepSeek-V2-Lite")
    plan = inference_plan("cpu", "bfloat16", cpu_weight_packing=False)
    engine = EngineConfig(max_num_batched_tokens=2048, max_model_len=32768)
    act = kv_cache.chunk_activation_bytes(cfg, 2048, 32768, torch.bfloat16)
    assert act > 2048 * cfg.vocab_size * 4  # at least the logits of a chunk that scores every row
    ram = 16 << 30
    monkeypatch.setattr(kv_cache, "_available_ram", lambda: ram)
    layout = size_kv_cache(cfg, plan, engine)
    assert layout.activation_bytes == act
    assert layout.bytes <= (ram - act) // 4 and layout.bytes > (ram - act) // 4 - 27 * 16 * 576 * 2 * 2
    monkeypatch.setattr(kv_cache, "_available_ram", lambda: act // 2)
    with pytest.raises(ValueError, match="max_num_batched_tokens or max_model_len"):
        size_kv_cache(cfg, plan, engine)
    # a measured profile replaces the estimate of the chunk itself
    layout = size_kv_cache(cfg, plan, EngineConfig(max_num_batched_tokens=2048, max_model_len=2048),
                           measured_activations=1 << 20)
    assert layout.activation_bytes == 1 << 20


def test_allocate_free_and_failure_changes_nothing():
    alloc = BlockAllocator(4, BS)
    a, b = Sequence(list(range(10))), Sequence(list(range(100, 107)))
    assert alloc.allocate(a, 10) and len(a.block_table) == 3
    assert alloc.num_free_blocks == 1 and alloc.num_used_blocks == 3 and alloc.usage == 0.75
    assert not alloc.allocate(b, 7)
    assert b.block_table == [] and b.num_computed_tokens == 0 and alloc.num_free_blocks == 1
    assert alloc.allocate(a, 12) and len(a.block_table) == 3  # already covered
    assert alloc.allocate(a, 13) and len(a.block_table) == 4 and not alloc.can_allocate(1)
    alloc.check_invariants([a, b])
    alloc.free(a)
    assert a.block_table == [] and alloc.num_free_blocks == 4
    alloc.check_invariants([a, b])


def test_prefix_hit_shares_blocks_and_never_covers_all_tokens():
    alloc = BlockAllocator(16, BS)
    a = Sequence(list(range(10)))  # 2 full blocks + 2 tokens
    computed(alloc, a)
    b = Sequence(list(range(9)) + [99])
    assert alloc.allocate(b, b.num_tokens)
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert alloc.ref_count[a.block_table[0]] == 2
    c = Sequence(list(range(8)))  # exactly the two cached blocks: the last one must be recomputed
    assert alloc.allocate(c, c.num_tokens)
    assert c.num_computed_tokens == 4 and c.block_table[0] == a.block_table[0]
    assert c.block_table[1] != a.block_table[1]
    assert alloc.prefix_cache_queries == 28 and alloc.prefix_cache_hits == 12
    alloc.check_invariants([a, b, c])
    for s in (a, b, c):
        alloc.free(s)
    alloc.check_invariants([])
    assert alloc.num_free_blocks == 16


def test_freed_blocks_stay_findable_and_are_evicted_last_and_tail_first():
    alloc = BlockAllocator(7, BS)
    a = Sequence(list(range(12)) + [50])
    computed(alloc, a)  # 4 blocks, the first 3 full and hashed
    full = a.block_table[:3]
    alloc.free(a)
    assert alloc.num_free_blocks == 7 and len(alloc.cached) == 3
    b = Sequence(list(range(12)) + [60])
    assert alloc.allocate(b, b.num_tokens) and b.num_cached_tokens == 12  # revived from the evictable pool
    assert b.block_table[:3] == full
    alloc.free(b)
    # 5 blocks: the 4 never-hashed ones first, then the least recently freed cached one -- the prefix's tail.
    c = Sequence(list(range(200, 220)))
    assert alloc.allocate(c, 20) and c.num_cached_tokens == 0 and full[2] in c.block_table
    assert sorted(alloc.cached.values()) == sorted(full[:2])
    d = Sequence(list(range(4)) + [7])
    assert alloc.allocate(d, d.num_tokens) and d.num_cached_tokens == 4 and d.block_table[0] == full[0]
    alloc.check_invariants([c, d])


def test_block_hashes_chain_the_prefix():
    alloc = BlockAllocator(8, BS)
    a = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 9])
    computed(alloc, a)
    b = Sequence([0, 0, 0, 0, 5, 6, 7, 8, 9])  # same second block, different first: no hit at all
    assert alloc.allocate(b, b.num_tokens) and b.num_cached_tokens == 0


def test_hash_collision_is_not_a_hit(monkeypatch):
    monkeypatch.setattr(kv_cache, "block_hash", lambda prev, tokens: b"same")
    alloc = BlockAllocator(8, BS)
    computed(alloc, Sequence([1, 2, 3, 4, 5]))
    b = Sequence([9, 9, 9, 9, 5])
    assert alloc.allocate(b, b.num_tokens) and b.num_cached_tokens == 0
    alloc.check_invariants()


def test_commit_keeps_existing_mapping_for_duplicate_content():
    alloc = BlockAllocator(8, BS)
    a, b = Sequence([1, 2, 3, 4, 5]), Sequence([1, 2, 3, 4, 6])
    assert alloc.allocate(a, 5) and alloc.allocate(b, 5)  # admitted together: no hit for b yet
    for s in (a, b):
        s.num_computed_tokens = 5
        alloc.commit(s)
    h = a.block_hashes[0]
    assert alloc.cached[h] == a.block_table[0] and alloc.hash_of[b.block_table[0]] is None
    alloc.free(a)  # b's copy is still usable by b; a's stays findable
    c = Sequence([1, 2, 3, 4, 7])
    assert alloc.allocate(c, 5) and c.block_table[0] == alloc.cached[h]
    alloc.check_invariants([b, c])


def test_prefix_caching_off_and_prompt_logprobs_skip_hits():
    for alloc, params in ((BlockAllocator(8, BS, enable_prefix_caching=False), SamplingParams()),
                          (BlockAllocator(8, BS), SamplingParams(prompt_logprobs=1))):
        computed(alloc, Sequence([1, 2, 3, 4, 5]))
        b = Sequence([1, 2, 3, 4, 5], params)
        assert alloc.allocate(b, 5) and b.num_computed_tokens == 0


def test_invariant_checker_catches_a_leak():
    alloc = BlockAllocator(4, BS)
    a = Sequence([1, 2, 3])
    alloc.allocate(a, 3)
    with pytest.raises(AssertionError):
        alloc.check_invariants([])
