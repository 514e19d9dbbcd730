"""Scheduler + BlockAllocator driven by a fake runner that checks every step against the engine's contract.

The fake runner keeps a token-level mirror of the latent cache: before a chunk is computed, every earlier position
of the sequence must already hold the right token in the slots its block table names (so prefix hits, preemption
and chunking can never serve wrong latents), and a step may only write blocks it owns alone and that are not in the
prefix cache. Its "model" is a fixed function of the context, so outputs must not depend on how steps were cut.
"""
import random

import pytest

from dsv2.engine.kv_cache import BlockAllocator
from dsv2.engine.sampling_params import SamplingParams
from dsv2.engine.scheduler import Scheduler, SchedulerConfig
from dsv2.engine.sequence import Sequence, SequenceStatus


def next_token(tokens):
    return 100 + (sum(tokens[-3:]) * 7 + len(tokens)) % 50


def reference_output(prompt, max_tokens):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


class FakeEngine:
    def __init__(self, num_blocks, block_size, max_num_seqs=256, budget=2048, prefix_caching=True):
        self.bs = block_size
        self.alloc = BlockAllocator(num_blocks, block_size, prefix_caching)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len=10**6), self.alloc)
        self.cache = [[None] * block_size for _ in range(num_blocks)]
        self.seqs = []
        self.empty_steps = 0

    def add(self, prompt, max_tokens=4, request_id=None, **kw):
        seq = Sequence(prompt, SamplingParams(max_tokens=max_tokens, **kw), request_id=request_id)
        self.sched.add(seq)
        self.seqs.append(seq)
        return seq

    def step(self):
        sched, alloc, cfg = self.sched, self.alloc, self.sched.config
        idle = not sched.has_unfinished
        out = sched.schedule()
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert sched.num_running <= cfg.max_num_seqs
        flags = [s.is_decode for s in out.scheduled]
        assert flags == sorted(flags, reverse=True), "decodes must come first"
        assert len({s.seq.seq_id for s in out.scheduled}) == len(out.scheduled)
        for victim in out.preempted:
            assert victim.status == SequenceStatus.WAITING and victim.num_computed_tokens == 0
            assert not victim.block_table and all(s.seq_id < victim.seq_id for s in sched.running)
        for s in out.scheduled:
            seq, end = s.seq, s.start + s.num_new_tokens
            assert seq.status == SequenceStatus.RUNNING and s.num_new_tokens >= 1
            assert s.start == seq.num_computed_tokens and end <= seq.num_tokens and s.sample == (end == seq.num_tokens)
            assert len(seq.block_table) * self.bs >= end
            tokens = seq.token_ids
            for p in range(end):
                block, offset = seq.block_table[p // self.bs], p % self.bs
                if p < s.start:
                    assert self.cache[block][offset] == tokens[p], f"{seq}: wrong latent at position {p}"
                else:
                    assert alloc.ref_count[block] == 1 and alloc.hash_of[block] is None, "write to a shared block"
                    self.cache[block][offset] = tokens[p]
        self.empty_steps = 0 if out.scheduled or out.failed or idle else self.empty_steps + 1
        assert self.empty_steps < 2, "two steps in a row without progress"
        for s in out.scheduled:
            if s.sample:
                s.seq.append_token(next_token(s.seq.token_ids))
        sched.postprocess(out)
        for s in out.scheduled:
            if s.sample and s.seq.num_output_tokens >= s.seq.params.max_tokens:
                sched.finish(s.seq, "length")
        alloc.check_invariants([s for s in self.seqs if not s.is_finished])
        return out

    def run(self, max_steps=10_000):
        for _ in range(max_steps):
            if not self.sched.has_unfinished:
                return
            self.step()
        raise AssertionError("did not finish: deadlock or livelock")

    def assert_all_free(self):
        assert not self.sched.has_unfinished
        assert self.alloc.num_free_blocks == self.alloc.num_blocks and not any(self.alloc.ref_count)
        self.alloc.check_invariants([])


def test_continuous_batching_new_request_joins_next_step():
    eng = FakeEngine(64, 4)
    a = eng.add([1, 2, 3], max_tokens=5)
    eng.step()
    b = eng.add([4, 5, 6, 7], max_tokens=2)
    out = eng.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 4)]
    eng.run()
    assert a.output_token_ids == reference_output([1, 2, 3], 5) and a.finish_reason == "length"
    assert b.output_token_ids == reference_output([4, 5, 6, 7], 2)
    eng.assert_all_free()


def test_chunked_prefill_spans_steps_and_samples_only_at_the_end():
    eng = FakeEngine(64, 16, budget=32)
    prompt = list(range(100))
    seq = eng.add(prompt, max_tokens=3)
    chunks = [(s.start, s.num_new_tokens, s.sample) for _ in range(4) for s in eng.step().scheduled]
    assert chunks == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True)]
    assert seq.num_output_tokens == 1
    eng.run()
    assert seq.output_token_ids == reference_output(prompt, 3)
    eng.assert_all_free()


def test_budget_goes_to_decodes_first_then_prefill_chunks():
    eng = FakeEngine(64, 4, budget=8)
    olds = [eng.add([i, i + 1], max_tokens=10) for i in range(3)]
    eng.step()  # three prefills of 2 tokens
    late = eng.add(list(range(50, 70)), max_tokens=2)
    out = eng.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(o, 1) for o in olds] + [(late, 5)]
    out = eng.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(o, 1) for o in olds] + [(late, 5)]
    eng.run()
    eng.assert_all_free()


def test_max_num_seqs_and_fcfs_admission():
    eng = FakeEngine(64, 4, max_num_seqs=2)
    seqs = [eng.add([i] * 3, max_tokens=2 + i) for i in range(5)]
    admitted = []
    while eng.sched.has_unfinished:
        out = eng.step()
        assert eng.sched.num_running <= 2
        admitted += [s.seq for s in out.scheduled if s.start == 0]
    assert admitted == seqs
    eng.assert_all_free()


def test_strict_fcfs_does_not_skip_a_request_that_does_not_fit():
    eng = FakeEngine(4, 4, prefix_caching=False)
    a = eng.add(list(range(10)), max_tokens=2)  # 3 blocks
    eng.step()
    b = eng.add(list(range(20, 28)), max_tokens=1)  # 2 blocks: does not fit while a runs
    c = eng.add([30], max_tokens=1)  # 1 block would fit, but it arrived after b
    out = eng.step()
    assert [s.seq for s in out.scheduled] == [a] and eng.sched.num_waiting == 2
    assert a.is_finished
    out = eng.step()
    assert {s.seq for s in out.scheduled} == {b, c}  # c's one-token prompt is listed first, as a decode
    eng.run()
    eng.assert_all_free()


def test_preemption_frees_the_latest_arrival_which_later_reprefills_prompt_and_outputs():
    eng = FakeEngine(6, 2)
    a = eng.add([1, 2, 3, 4], max_tokens=8)
    b = eng.add([5, 6, 7, 8], max_tokens=8)
    preempted_at = None
    for step in range(40):
        out = eng.step()
        if out.preempted:
            assert out.preempted == [b] and eng.sched.waiting[0] is b and b.num_output_tokens > 0
            assert [s.seq for s in out.scheduled] == [a]
            preempted_at = b.num_tokens
            break
    assert preempted_at is not None
    first = None
    while first is None:
        first = next((s for s in eng.step().scheduled if s.seq is b), None)
    assert first.start == b.num_cached_tokens and first.start + first.num_new_tokens == preempted_at > 4
    assert first.sample
    eng.run()
    assert a.output_token_ids == reference_output([1, 2, 3, 4], 8)
    assert b.output_token_ids == reference_output([5, 6, 7, 8], 8)
    eng.assert_all_free()


def test_a_running_sequence_preempts_itself_when_it_is_the_latest():
    eng = FakeEngine(4, 2, prefix_caching=False)
    a = eng.add([1], max_tokens=6)
    eng.step()
    b = eng.add([4, 5, 6], max_tokens=4)
    eng.step()  # a decodes position 1, b prefills 3 tokens: 3 blocks
    eng.step()  # a crosses into its second block: the cache is full
    out = eng.step()  # b's decode crosses a block boundary first, and b is the latest arrival
    assert out.preempted == [b] and [s.seq for s in out.scheduled] == [a] and eng.sched.waiting[0] is b
    eng.run()
    assert a.output_token_ids == reference_output([1], 6) and b.output_token_ids == reference_output([4, 5, 6], 4)
    eng.assert_all_free()


def test_a_victim_already_scheduled_this_step_is_taken_back_out():
    eng = FakeEngine(3, 4, budget=5)
    a = Sequence(list(range(10)), SamplingParams(max_tokens=1))  # older, but queued second
    b = Sequence([7], SamplingParams(max_tokens=3))
    for seq in (b, a):
        eng.sched.add(seq)
        eng.seqs.append(seq)
    eng.step()  # b's prompt + a[0:4]
    eng.step()  # b decodes + a[4:8]: the cache is full
    out = eng.step()  # b's decode is scheduled first, then a's last chunk needs a block: b is the latest arrival
    assert out.preempted == [b] and [(s.seq, s.start, s.num_new_tokens) for s in out.scheduled] == [(a, 8, 2)]
    eng.run()
    assert b.output_token_ids == reference_output([7], 3)
    eng.assert_all_free()


def test_prefix_cache_shares_blocks_of_a_common_prompt_prefix():
    eng = FakeEngine(32, 4)
    prefix = list(range(20))
    a = eng.add(prefix + [1], max_tokens=2)
    eng.step()
    a_blocks = list(a.block_table)
    eng.run()
    b = eng.add(prefix + [2], max_tokens=5)
    out = eng.step()
    assert b.num_cached_tokens == 20 and b.block_table[:5] == a_blocks[:5]
    assert [(s.start, s.num_new_tokens) for s in out.scheduled] == [(20, 1)]
    c = eng.add(prefix + [3], max_tokens=2)  # while b still holds them: shared, refcount 2
    eng.step()
    assert c.block_table[:5] == b.block_table[:5] and eng.alloc.ref_count[b.block_table[0]] == 2
    d = eng.add(list(prefix), max_tokens=1)  # exactly the cached blocks: the last one is recomputed
    out = eng.step()
    assert d.num_cached_tokens == 16 and [(s.start, s.num_new_tokens) for s in out.scheduled if s.seq is d] == [(16, 4)]
    eng.run()
    for s in (a, b, c, d):
        assert s.output_token_ids == reference_output(s.prompt_token_ids, s.params.max_tokens)
    assert eng.alloc.prefix_cache_hits == 20 + 20 + 16
    eng.assert_all_free()


def test_cached_blocks_are_evicted_when_memory_is_needed():
    eng = FakeEngine(8, 4)
    a = eng.add(list(range(20)), max_tokens=4)  # 6 blocks, 5 full ones cached after it finishes
    eng.run()
    assert len(eng.alloc.cached) >= 5 and eng.alloc.num_free_blocks == 8
    b = eng.add(list(range(100, 128)), max_tokens=2)  # needs 8 blocks: must evict everything cached
    eng.run()
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 2) and a.is_finished
    c = eng.add(list(range(20)), max_tokens=1)
    eng.step()
    assert c.num_cached_tokens == 0
    eng.run()
    eng.assert_all_free()


def test_a_request_larger_than_the_cache_fails_instead_of_spinning():
    eng = FakeEngine(2, 4)
    big = eng.add(list(range(9)), max_tokens=1)
    ok = eng.add([1, 2], max_tokens=2)
    out = eng.step()
    assert out.failed == [big] and big.finish_reason == "abort" and big.is_finished
    assert [s.seq for s in out.scheduled] == [ok]
    eng.run()
    eng.assert_all_free()


def test_abort_running_and_waiting_frees_blocks_at_once():
    eng = FakeEngine(16, 2, max_num_seqs=2)
    r0 = eng.add([1, 2, 3], max_tokens=50, request_id="r", n=2)
    r1 = eng.add([1, 2, 3], max_tokens=50, request_id="r", n=2)
    other = eng.add([4, 5], max_tokens=5)
    eng.step()
    assert r0.status == r1.status == SequenceStatus.RUNNING and other.status == SequenceStatus.WAITING
    used = eng.alloc.num_used_blocks
    assert set(eng.sched.abort("r")) == {r0, r1} and r0.finish_reason == "abort"
    assert eng.alloc.num_used_blocks < used and eng.sched.num_running == 0
    eng.alloc.check_invariants([other])
    out = eng.sched.schedule()  # abort in the middle of a step: postprocess skips it
    assert eng.sched.abort(other.request_id) == [other]
    eng.sched.postprocess(out)
    assert other.num_computed_tokens == 0 and eng.sched.abort("nope") == []
    eng.assert_all_free()


@pytest.mark.parametrize("seed", range(120))
def test_random_workloads_finish_with_correct_outputs_and_no_leaks(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8, 16])
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(1, 30))] for _ in range(3)]
    requests = []
    for _ in range(rng.randrange(1, 14)):
        prompt = rng.choice(prefixes)[:rng.randrange(1, 30)] if rng.random() < 0.5 else []
        prompt = prompt + [rng.randrange(1000) for _ in range(rng.randrange(0 if prompt else 1, 25))]
        requests.append((rng.randrange(6), prompt, rng.randrange(1, 20)))  # (arrival step, prompt, max_tokens)
    need = max(-(-(len(p) + m - 1) // block_size) for _, p, m in requests)
    eng = FakeEngine(rng.randrange(need, 2 * need + 2), block_size, max_num_seqs=rng.randrange(1, 9),
                     budget=rng.choice([1, 3, 8, 32, 2048]), prefix_caching=rng.random() < 0.8)
    aborted = set()
    for step in range(5000):
        for arrival, prompt, max_tokens in requests:
            if arrival == step:
                eng.add(prompt, max_tokens)
        if step > 5 and not eng.sched.has_unfinished:
            break
        if rng.random() < 0.03 and eng.seqs:
            victim = rng.choice(eng.seqs)
            aborted.update(id(s) for s in eng.sched.abort(victim.request_id))
        eng.step()
    else:
        raise AssertionError("workload did not finish")
    for seq in eng.seqs:
        assert seq.is_finished
        if id(seq) not in aborted:
            assert seq.finish_reason == "length"
            assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.params.max_tokens)
    eng.assert_all_free()
