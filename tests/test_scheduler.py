"""The scheduler with a fake model: preemption, chunking and stopping never change outputs."""
import random

import pytest

from cleanvllm.block_manager import BlockManager
from cleanvllm.sampling_params import SamplingParams
from cleanvllm.scheduler import Scheduler
from cleanvllm.simulate import fake_next_token, simulate
from cleanvllm.sequence import Sequence

CHAPTERS = ("04",)  # `make check CH=04` runs this file (tools/check.py)


def workload(seed, n=30, bs=16, max_prompt=200):
    rng = random.Random(seed)
    return [Sequence([rng.randint(0, 999) for _ in range(rng.randint(1, max_prompt))],
                     SamplingParams(max_tokens=rng.randint(1, 80), ignore_eos=True), block_size=bs) for _ in range(n)]


def expected_completion(seq: Sequence) -> list[int]:
    """What an unconstrained engine must produce: the fake model applied token by token."""
    toks = list(seq.prompt_token_ids)
    for _ in range(seq.sampling_params.max_tokens):
        toks.append(fake_next_token(toks))
    return toks[seq.num_prompt_tokens:]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("blocks,budget", [(16, 32), (30, 256), (4096, 4096)])
def test_outputs_independent_of_memory_and_budget(seed, blocks, budget):
    seqs = workload(seed)
    sch = Scheduler(max_num_seqs=8, max_num_batched_tokens=budget, block_manager=BlockManager(blocks, 16))
    trace = simulate(sch, seqs)
    for s in seqs:
        assert s.completion_token_ids == expected_completion(s)
        assert s.is_finished and s.finish_reason == "length" and not s.block_table
    assert sch.block_manager.num_free_blocks == blocks
    assert all(t["tokens"] <= budget for t in trace)
    assert all(t["running"] <= 8 for t in trace)
    if blocks == 16:
        assert sch.num_preemptions > 0


def test_no_request_lost_or_duplicated():
    seqs = workload(7, n=50)
    sch = Scheduler(max_num_seqs=6, max_num_batched_tokens=64, block_manager=BlockManager(20, 16))
    for s in seqs:
        sch.add(s)
    finished = []
    while not sch.is_finished():
        batch, _ = sch.schedule()
        assert len({id(s) for s in batch}) == len(batch)  # no sequence twice in a step
        live = list(sch.waiting) + list(sch.running)
        assert len({id(s) for s in live}) == len(live)
        finished += sch.postprocess(batch, [fake_next_token(s.token_ids) for s in batch])
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)


def test_max_model_len_prompt_completes_with_chunked_prefill():
    max_len, bs = 1024, 16
    seq = Sequence(list(range(max_len - 1)), SamplingParams(max_tokens=1, ignore_eos=True), block_size=bs)
    sch = Scheduler(max_num_seqs=4, max_num_batched_tokens=100, block_manager=BlockManager(max_len // bs, bs))
    trace = simulate(sch, [seq])
    assert len(seq) == max_len and seq.num_completion_tokens == 1
    assert sum(t["tokens"] for t in trace if t["prefill"]) == max_len - 1
    assert max(t["tokens"] for t in trace) == 100


def test_eos_stop_tokens_and_min_tokens():
    eos = 5
    def run(sp):
        seq = Sequence([1, 2, 3], sp, block_size=4)
        sch = Scheduler(4, 64, BlockManager(8, 4), eos_token_ids=[eos])
        sch.add(seq)
        outs = iter([9, eos, 7, eos, 8, 6, 6, 6])
        while not sch.is_finished():
            batch, _ = sch.schedule()
            sch.postprocess(batch, [next(outs) for _ in batch])
        return seq
    s = run(SamplingParams(max_tokens=8))
    assert s.completion_token_ids == [9, eos] and s.finish_reason == "stop"
    s = run(SamplingParams(max_tokens=8, min_tokens=2))  # the first two tokens cannot stop it
    assert s.completion_token_ids == [9, eos, 7, eos] and s.finish_reason == "stop"
    s = run(SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=[8]))
    assert s.completion_token_ids == [9, eos, 7, eos, 8]
    s = run(SamplingParams(max_tokens=3, ignore_eos=True))
    assert s.completion_token_ids == [9, eos, 7] and s.finish_reason == "length"


def test_sequence_larger_than_the_cache_is_rejected():
    sch = Scheduler(4, 64, BlockManager(2, 4))
    with pytest.raises(ValueError, match="needs 3 blocks"):
        sch.add(Sequence(list(range(9)), block_size=4))


def test_idle_scheduler_returns_an_empty_batch():
    sch = Scheduler(4, 64, BlockManager(4, 4))
    assert sch.schedule() == ([], False)
    seq = Sequence([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), block_size=4)
    simulate(sch, [seq])
    assert seq.is_finished and sch.schedule() == ([], False)


def test_a_corrupted_block_table_changes_the_fake_models_output(monkeypatch):
    """simulate's fake model reads its history through the block tables, so it can catch a bug."""
    def run():
        sp = SamplingParams(max_tokens=6, ignore_eos=True)
        seqs = [Sequence(list(range(12)) + [i], sp, block_size=4) for i in (50, 60)]
        simulate(Scheduler(1, 64, BlockManager(10, 4)), seqs)
        return [s.completion_token_ids for s in seqs]

    good = run()
    assert good == [expected_completion(s) for s in
                    [Sequence(list(range(12)) + [i], SamplingParams(max_tokens=6), block_size=4) for i in (50, 60)]]
    real = BlockManager.allocate

    def wrong_hit(self, seq):
        real(self, seq)
        if seq.num_cached_tokens:
            seq.block_table[0] = len(self.blocks) - 1  # a block that never held this prefix

    monkeypatch.setattr(BlockManager, "allocate", wrong_hit)
    bad = run()
    assert bad[0] == good[0] and bad[1] != good[1]


def test_blocks_filled_by_decode_enter_the_prefix_cache_once_each(monkeypatch):
    """postprocess registers a block when decoding fills it (a later prompt that repeats the text
    hits it), and calls hash_blocks only at those steps, not once per token."""
    bs, prompt = 4, [1, 2, 3, 4, 5]
    calls, real = [], BlockManager.hash_blocks

    def counting(self, seq):
        calls.append(seq.num_cached_tokens)
        real(self, seq)

    monkeypatch.setattr(BlockManager, "hash_blocks", counting)
    bm = BlockManager(16, bs)
    sch = Scheduler(4, 64, bm)
    seq = Sequence(prompt, SamplingParams(max_tokens=20, ignore_eos=True), block_size=bs)
    sch.add(seq)
    for step in range(9):  # one prefill step, then 8 decode steps: 14 tokens, 13 computed
        batch, _ = sch.schedule()
        sch.postprocess(batch, [100 + step])
    assert len(seq) == 14 and seq.num_cached_tokens == 13
    # by hand: blocks fill when 4, 8 and 12 tokens are computed; the prefill computed 5 at once
    assert calls == [5, 8, 12]
    assert seq.num_hashed_blocks == 3
    again = Sequence(seq.token_ids[:12] + [7], block_size=bs)
    assert bm.can_allocate(again)
    bm.allocate(again)
    assert again.num_cached_tokens == 12 and again.block_table[:3] == seq.block_table[:3]


def test_preemption_candidates_are_the_running_sequences_not_yet_scheduled(monkeypatch):
    """Four 4-token prompts fill a block each in a pool of 5; their first decode token each needs
    a new block. By hand: a takes the free block; b finds none, the candidates are [b, c, d] and d
    (the newest) is preempted; b takes d's block; c finds none, the only candidate is c itself."""
    seen, real = [], Scheduler._pick_victim

    def spy(self, candidates):
        seen.append(list(candidates))
        return real(self, candidates)

    monkeypatch.setattr(Scheduler, "_pick_victim", spy)
    sch = Scheduler(4, 64, BlockManager(5, 4))
    a, b, c, d = seqs = [Sequence([10 * i + j for j in range(4)], SamplingParams(max_tokens=5, ignore_eos=True),
                                  block_size=4) for i in range(4)]
    for s in seqs:
        sch.add(s)
    batch, prefill = sch.schedule()
    assert prefill and batch == seqs
    sch.postprocess(batch, [1, 2, 3, 4])
    batch, prefill = sch.schedule()
    assert not prefill and batch == [a, b]
    assert seen == [[b, c, d], [c]]
    assert list(sch.waiting) == [c, d] and sch.num_preemptions == 2
