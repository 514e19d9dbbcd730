"""The paged latent cache and its block allocator.

MLA caches one latent per token and layer, [c_kv | k_pe] = kv_lora_rank + qk_rope_head_dim = 576 wide, shared by
all heads: 576 values in the plan's cache dtype (kv_cache_dtype="auto"), or 656 bytes in DeepSeek's FP8 layout
(kv_cache_dtype="fp8", model.mla.Fp8Latent), so the same memory holds 1.76x the tokens of bf16. The cache is cut
into blocks of block_size tokens; a sequence's block_table lists its blocks in order, so token i lives in slot
block_table[i // block_size] * block_size + i % block_size.

Prefix caching: once a block is full and computed, it is registered under a hash of its whole prefix (a chain over
the previous block's hash and this block's tokens). A new sequence whose leading tokens match reuses those blocks
instead of recomputing them. Freed blocks keep their hash and stay findable until the allocator needs the memory,
then the least recently freed goes first.

Shape legend: NB num_blocks, BS block_size, D the row of one token: latent_dim values, or Fp8Latent.bytes uint8.
"""
from __future__ import annotations

import collections
import hashlib
import os
from array import array
from dataclasses import dataclass

import torch

from ..capability import InferencePlan
from ..config import ModelConfig
from ..model.mla import Fp8Latent
from .config import EngineConfig
from .sequence import Sequence


def cache_row(cfg: ModelConfig, cache_dtype: torch.dtype, kv_cache_dtype: str = "auto") -> tuple[int, torch.dtype]:
    """(D, dtype) of one token's row in one layer's cache: latent_dim values of cache_dtype, or for "fp8" the
    Fp8Latent layout's bytes."""
    if kv_cache_dtype == "fp8":
        return Fp8Latent.for_config(cfg).bytes, torch.uint8
    return cfg.latent_dim, cache_dtype


def latent_bytes_per_token(cfg: ModelConfig, cache_dtype: torch.dtype = torch.bfloat16,
                           kv_cache_dtype: str = "auto") -> int:
    """Bytes one token takes in the latent cache, all layers (V2-Lite: 31,104 in bf16, 17,712 in fp8)."""
    width, dtype = cache_row(cfg, cache_dtype, kv_cache_dtype)
    return cfg.num_hidden_layers * width * dtype.itemsize


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, width: int,
                      dtype: torch.dtype, device: torch.device | str) -> list[torch.Tensor]:
    """One zeroed [NB, BS, D] latent cache per layer."""
    return [torch.zeros(num_blocks, block_size, width, dtype=dtype, device=device) for _ in range(num_layers)]


def num_blocks_for_memory(memory_bytes: int, num_layers: int, block_size: int, width: int,
                          dtype: torch.dtype) -> int:
    """How many blocks (of all layers together) fit in memory_bytes."""
    bytes_per_block = num_layers * block_size * width * dtype.itemsize
    return max(0, int(memory_bytes) // bytes_per_block)


def chunk_activation_bytes(cfg: ModelConfig, tokens: int, context: int, dtype: torch.dtype) -> int:
    """A generous estimate of the memory one engine step's activations take: a prefill chunk of `tokens` tokens
    attending to `context` positions (decompressed keys and values are per position, so they grow with the
    context), every intermediate at once, fp32 where the model upcasts, and logits for every row (prompt
    logprobs). Twice that, for the temporaries the estimate does not name."""
    b = torch.tensor([], dtype=dtype).element_size()
    H, n, Dq, Dv = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    per_token = (8 * H + 3 * n * max(Dq, Dv) + (cfg.q_lora_rank or 0) + cfg.latent_dim) * 4
    if cfg.n_routed_experts:
        K, I = cfg.num_experts_per_tok, cfg.moe_intermediate_size
        per_token += (K * (3 * I + 2 * H) + 3 * I * (cfg.n_shared_experts or 0) + cfg.n_routed_experts) * 4
    per_token += 3 * cfg.intermediate_size * 4 + cfg.vocab_size * 4
    per_position = n * (cfg.qk_nope_head_dim + Dv + 2 * max(Dq, Dv)) * b + cfg.latent_dim * 4
    return 2 * (tokens * per_token + context * per_position)


def default_kv_cache_memory(device: torch.device | str, activation_bytes: int = 0,
                            gpu_memory_utilization: float | None = None, ranks_on_host: int = 1) -> int:
    """Bytes to give the latent cache when the user does not say, once the model is loaded and `activation_bytes`
    (one step's peak activations: measured by a profile forward on CUDA, estimated on CPU) are set aside.

    CUDA: 90% (or gpu_memory_utilization) of the memory still free, minus the activations; the rest is headroom
    for the allocator's fragmentation. CPU: a quarter of the available RAM after the activations, at most 8 GiB --
    the cache is allocated up front and zeroed, so taking most of the machine would push everything else into swap,
    and 8 GiB already holds ~275k tokens of V2-Lite (27 layers, bf16). The ranks_on_host processes of a
    tensor-parallel group on one CPU host share that quarter: each keeps a whole copy of the latent cache.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * (gpu_memory_utilization or 0.9)) - activation_bytes
    return min((_available_ram() - ranks_on_host * activation_bytes) // 4, 8 << 30) // ranks_on_host


@dataclass(frozen=True)
class CacheLayout:
    num_blocks: int
    block_size: int
    max_model_len: int
    bytes: int
    activation_bytes: int  # what was set aside for one step's activations before sizing
    bytes_per_token: int  # all layers, as stored (kv_cache_dtype)


def size_kv_cache(cfg: ModelConfig, plan: InferencePlan, engine: EngineConfig,
                  measured_activations: int | None = None, ranks_on_host: int = 1) -> CacheLayout:
    """How many cache blocks to allocate and the longest sequence they allow. The activations of the largest step
    (measured by a profile forward where possible, else estimated) are set aside before free memory is shared out.
    The layout is per process: every rank of a tensor-parallel group allocates one (see default_kv_cache_memory)."""
    width, row_dtype = cache_row(cfg, plan.cache_dtype, engine.kv_cache_dtype)
    bytes_per_token = latent_bytes_per_token(cfg, plan.cache_dtype, engine.kv_cache_dtype)
    bs = engine.block_size
    max_len = engine.max_model_len or cfg.max_position_embeddings
    chunk = min(engine.max_num_batched_tokens, max_len)
    estimate = chunk_activation_bytes(cfg, chunk, max_len, plan.compute_dtype)
    activations = estimate if measured_activations is None else \
        measured_activations + chunk_activation_bytes(cfg, 0, max(0, max_len - chunk), plan.compute_dtype)
    if engine.kv_cache_memory is None:
        mem = default_kv_cache_memory(plan.device, activations, engine.gpu_memory_utilization, ranks_on_host)
        if mem <= 0:
            raise ValueError(f"no memory is left for the latent cache once the model and one step's activations "
                             f"({activations / 2**20:,.0f} MiB for {chunk} tokens) are in place; lower "
                             "max_num_batched_tokens or max_model_len, or use a smaller dtype or quantization")
        mem = min(mem, bytes_per_token * engine.max_num_seqs * (max_len + bs))
    else:
        mem = engine.kv_cache_memory
    num_blocks = num_blocks_for_memory(mem, cfg.num_hidden_layers, bs, width, row_dtype)
    capacity = num_blocks * bs
    fp8_hint = " (kv_cache_dtype='fp8' holds ~1.75x the tokens)" if engine.kv_cache_dtype == "auto" else ""
    if capacity < bs * 2:
        raise ValueError(f"kv_cache_memory={mem} bytes holds only {capacity} tokens "
                         f"({bytes_per_token} bytes per token); give the cache more memory{fp8_hint}")
    if engine.max_model_len is None:
        max_model_len = min(cfg.max_position_embeddings, capacity)
    elif engine.max_model_len > capacity:
        raise ValueError(f"max_model_len={engine.max_model_len} needs {engine.max_model_len * bytes_per_token:,} bytes "
                         f"of latent cache but kv_cache_memory holds {capacity} tokens; raise kv_cache_memory or "
                         f"lower max_model_len{fp8_hint}")
    else:
        max_model_len = engine.max_model_len
    return CacheLayout(num_blocks, bs, max_model_len, num_blocks * bs * bytes_per_token, activations, bytes_per_token)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30  # no way to ask (e.g. macOS lacks SC_AVPHYS_PAGES): assume a small machine


def block_hash(prev: bytes, tokens: list[int]) -> bytes:
    # A cryptographic chain, not Python's hash(): a collision would silently attach a different prefix's latents,
    # and with a chain a collision anywhere earlier cannot be caught by comparing this block's tokens alone.
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockAllocator:
    """Reference-counted blocks with prefix caching by content hash. Pure bookkeeping: never touches the tensors.

    A block is in exactly one state: referenced (refcount > 0, in some block tables), free and never hashed, or
    free and cached (hashed, evictable in LRU order). New blocks come from the never-hashed pool first.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks  # checked on every hit
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.free_plain: collections.deque[int] = collections.deque(range(num_blocks))
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest freed first
        self.prefix_cache_hits = 0  # tokens
        self.prefix_cache_queries = 0  # tokens

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_plain) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def can_allocate(self, n_blocks: int) -> bool:
        return n_blocks <= self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hash_blocks(self, seq: Sequence, num_full: int) -> list[bytes]:
        # seq.block_hashes depends only on the (append-only) tokens, so it survives preemption and grows lazily.
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_full):
            prev = seq.block_hashes[-1] if seq.block_hashes else b""
            seq.block_hashes.append(block_hash(prev, seq.token_range(i * bs, (i + 1) * bs)))
        return seq.block_hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading tokens. Never all of them: the last token must be computed to get
        logits. Skipped for prompt_logprobs requests, which need the logits of every prompt position."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        bs = self.block_size
        hits = []
        num_full = (seq.num_tokens - 1) // bs
        hashes = self._hash_blocks(seq, num_full)
        for i in range(num_full):
            block = self.cached.get(hashes[i])
            if block is None or self.tokens_of[block] != tuple(seq.token_range(i * bs, (i + 1) * bs)):
                break
            hits.append(block)
        return hits

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq.block_table to cover num_tokens tokens. A sequence without blocks first takes its cached prefix
        (and num_computed_tokens jumps past it). Returns False and changes nothing when memory is short."""
        hits = self.match_prefix(seq) if not seq.block_table else []
        num_new = self.blocks_needed(num_tokens) - len(seq.block_table) - len(hits)
        num_revived = sum(self.ref_count[b] == 0 for b in hits)  # cached but free: they leave the free pool too
        if max(num_new, 0) + num_revived > self.num_free_blocks:
            return False
        if not seq.block_table and self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += len(hits) * self.block_size
            seq.num_computed_tokens = len(hits) * self.block_size
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            seq.num_committed_blocks = len(hits)
        for block in hits:  # claim the hits before taking new blocks, so eviction cannot take them
            if self.ref_count[block] == 0:
                del self.evictable[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
        for _ in range(num_new):
            seq.block_table.append(self._take_free())
        return True

    def _take_free(self) -> int:
        if self.free_plain:
            block = self.free_plain.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of[block]]
            self.hash_of[block] = self.tokens_of[block] = None
        self.ref_count[block] = 1
        return block

    def commit(self, seq: Sequence) -> None:
        """Register the blocks of seq that are full and computed, so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        hashes = self._hash_blocks(seq, num_full)
        for i in range(seq.num_committed_blocks, num_full):
            block, h = seq.block_table[i], hashes[i]
            if self.hash_of[block] is None and h not in self.cached:  # else another block holds this content: keep it
                self.cached[h] = block
                self.hash_of[block] = h
                self.tokens_of[block] = tuple(seq.token_range(i * bs, (i + 1) * bs))
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Drop seq's references. Tail blocks are released first, so LRU eviction eats a prefix from its end."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            assert self.ref_count[block] >= 0, f"block {block} freed twice"
            if self.ref_count[block] == 0:
                if self.hash_of[block] is None:
                    self.free_plain.append(block)
                else:
                    self.evictable[block] = None
        seq.block_table = []
        seq.num_committed_blocks = 0

    def check_invariants(self, seqs: list[Sequence] | None = None) -> None:
        """For tests: every block in exactly one state; refcounts match the block tables of seqs (all live ones)."""
        free_plain, evictable = set(self.free_plain), set(self.evictable)
        assert len(free_plain) == len(self.free_plain), "a block is twice in the free pool"
        assert not free_plain & evictable, "a block is in both free pools"
        for b in range(self.num_blocks):
            in_use = self.ref_count[b] > 0
            assert in_use + (b in free_plain) + (b in evictable) == 1, f"block {b} is in {in_use=} and free"
            assert (b in free_plain) <= (self.hash_of[b] is None), f"free block {b} keeps a hash"
            assert (b in evictable) <= (self.hash_of[b] is not None), f"evictable block {b} has no hash"
        for h, b in self.cached.items():
            assert self.hash_of[b] == h, f"hash map points at block {b} with another hash"
        assert sum(h is not None for h in self.hash_of) == len(self.cached), "hashed blocks missing from the map"
        if seqs is not None:
            refs = collections.Counter(b for s in seqs for b in s.block_table)
            for s in seqs:
                assert len(set(s.block_table)) == len(s.block_table), f"{s} holds a block twice"
            for b in range(self.num_blocks):
                assert self.ref_count[b] == refs[b], f"block {b}: refcount {self.ref_count[b]} != {refs[b]} tables"
