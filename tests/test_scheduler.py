"""The scheduler with a fake model: preemption, chunking and stopping never change outputs.

The first tests each exercise one task of chapter 4 on a small case worked out by hand, so a
failure names that task; the later ones run whole workloads and check the invariants of every step.
"""

import random

import pytest


from cleanvllm.block_manager import BlockManager  # noqa: E402
from cleanvllm.sampling_params import SamplingParams  # noqa: E402
from cleanvllm.scheduler import Scheduler  # noqa: E402
from cleanvllm.sequence import Sequence, SequenceStatus  # noqa: E402
from cleanvllm.simulate import fake_next_token, simulate  # noqa: E402

CHAPTERS = ("04",)  # `make check CH=04` runs this file (tools/check.py)
SCHEDULING = ("4.1", "4.2", "4.3", "4.4", "4.5", "4.6", "4.7", "4.8")


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


def running(sch: Scheduler, *prompts: list[int], max_tokens: int = 8, sampled: bool = True) -> list[Sequence]:
    """Sequences put in `running` by hand (the block manager's allocate): prompts computed and,
    with `sampled`, a first output token (0) appended, so that the next step decodes them."""
    out = []
    for p in prompts:
        seq = Sequence(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True), block_size=sch.block_manager.block_size)
        sch.block_manager.allocate(seq)
        seq.num_cached_tokens, seq.status = len(seq), SequenceStatus.RUNNING
        if sampled:
            seq.append_token(0)
        sch.running.append(seq)
        out.append(seq)
    return out


def ids(seqs) -> list[int]:
    return [s.seq_id for s in seqs]


@pytest.mark.tasks("4.1")
def test_part_way_prompts_get_their_next_chunk_oldest_first():
    sch = Scheduler(8, 100, BlockManager(64, 4))
    toks = [(30, 5), (12, 11), (40, 0), (9, 9), (25, 20)]  # (tokens, computed): 11/12 is decoding
    seqs = [Sequence(list(range(n)), block_size=4) for n, _ in toks]
    for s, (_, c) in zip(seqs, toks):
        s.num_cached_tokens, s.status = c, SequenceStatus.RUNNING
        sch.running.append(s)
    got = sch._continue_chunks(50)
    assert [s.num_scheduled_tokens for s in seqs] == [25, 0, 25, 0, 0]  # 25 + 25 = the budget
    assert ids(got) == ids([seqs[0], seqs[2]])
    for s in seqs:
        s.num_scheduled_tokens = 0
    got = sch._continue_chunks(1000)
    assert [s.num_scheduled_tokens for s in seqs] == [25, 0, 40, 0, 5]


@pytest.mark.tasks("4.2")
@pytest.mark.parametrize("seats,budget,held,want", [
    (2, 100, 0, 2), (1, 100, 0, 1), (9, 100, 0, 3), (9, 13, 0, 3), (9, 12, 0, 2),
    (9, 100, 15, 2), (9, 100, 16, 2), (9, 100, 17, 1)])
def test_admission_is_limited_by_seats_budget_and_blocks_in_order(seats, budget, held, want):
    """Three 6-token prompts (2 blocks each), a 60-token one (15 blocks), a 1-token one; a pool of 20
    blocks of which `held` are taken. The 60-token prompt never fits after the three, so nobody
    behind it is admitted (no overtaking)."""
    sch = Scheduler(seats, budget, BlockManager(20, 4))
    if held:
        sch.block_manager.allocate(Sequence(list(range(4 * held)), block_size=4))
    seqs = [Sequence(list(range(100 * i, 100 * i + 6)), block_size=4) for i in range(3)]
    seqs += [Sequence(list(range(500, 560)), block_size=4), Sequence([1], block_size=4)]
    for s in seqs:
        sch.add(s)
    got = sch._admit(budget)
    assert ids(got) == ids(seqs[:want])  # the first `want`, in order
    assert ids(sch.running) == ids(seqs[:want]) and ids(sch.waiting) == ids(seqs[want:])
    assert all(s.status == SequenceStatus.RUNNING and len(s.block_table) == 2 for s in got)
    assert sum(s.num_scheduled_tokens for s in got) == min(6 * want, budget)
    assert sch.block_manager.num_free_blocks == 20 - held - 2 * want


@pytest.mark.tasks("4.2")
def test_admission_computes_only_what_the_prefix_cache_lacks():
    bm = BlockManager(10, 4)
    first = Sequence(list(range(13)), block_size=4)
    bm.allocate(first)
    first.num_cached_tokens = 13
    bm.hash_blocks(first)  # blocks 0-2 (tokens 0-11) enter the prefix cache
    bm.deallocate(first)
    sch = Scheduler(4, 64, bm)
    seq = Sequence(list(range(12)) + [77, 78], block_size=4)
    sch.add(seq)
    assert ids(sch._admit(64)) == ids([seq])
    assert (seq.num_cached_tokens, seq.num_scheduled_tokens) == (12, 2)


@pytest.mark.tasks("4.3")
def test_preempt_gives_the_blocks_back_and_waits_first():
    sch = Scheduler(4, 64, BlockManager(8, 4))
    a, b = running(sch, list(range(9)), list(range(20, 26)))  # 3 and 2 blocks
    waiting = Sequence([5, 6], block_size=4)
    sch.add(waiting)
    sch.preempt(a)
    assert a.block_table == [] and sch.block_manager.num_free_blocks == 6
    assert ids(sch.running) == ids([b]) and ids(sch.waiting) == ids([a, waiting])
    assert a.status == SequenceStatus.WAITING and a.num_cached_tokens == 0 and a.num_scheduled_tokens == 0
    assert a.token_ids == list(range(9)) + [0]  # nothing it generated is lost
    assert a.num_preemptions == 1 and sch.num_preemptions == 1
    assert all(blk.ref_count == 0 for blk in sch.block_manager.blocks if blk.block_id not in b.block_table)


@pytest.mark.tasks("4.4")
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
    assert [len(s.block_table) for s in seqs] == [2, 2, 0, 0]
    assert [a.num_scheduled_tokens, b.num_scheduled_tokens] == [1, 1]


@pytest.mark.tasks("4.4")
def test_decode_takes_a_block_only_to_start_one():
    sch = Scheduler(4, 64, BlockManager(6, 4))
    a, b, c = running(sch, [1, 2], [3, 4, 5, 6, 7, 8, 9], [10, 11, 12])  # 3, 8 and 4 tokens
    batch = sch._schedule_decode()
    assert ids(batch) == ids([a, b, c]) and all(s.num_scheduled_tokens == 1 for s in batch)
    assert [len(s.block_table) for s in (a, b, c)] == [1, 2, 1] and sch.num_preemptions == 0
    for s in batch:  # the step computes the token, then samples the next one
        s.num_cached_tokens += 1
        s.append_token(0)
    sch._schedule_decode()
    assert [len(s.block_table) for s in (a, b, c)] == [1, 3, 2]  # b (9 tokens) and c (5) open one


@pytest.mark.tasks("4.5")
def test_schedule_prefills_first_then_decodes():
    sch = Scheduler(2, 8, BlockManager(6, 4))
    assert sch.schedule() == ([], False)
    a, b, c = seqs = [Sequence(list(range(10 * i, 10 * i + 6)), block_size=4) for i in range(3)]
    for s in seqs:
        sch.add(s)
    steps = []
    for _ in range(3):
        batch, prefill = sch.schedule()
        steps.append((ids(batch), prefill))
        for s in batch:
            s.num_cached_tokens += s.num_scheduled_tokens
            if s.num_cached_tokens == len(s):
                s.append_token(0)
    assert steps == [(ids([a, b]), True), (ids([b]), True), (ids([a, b]), False)]


@pytest.mark.tasks("4.5")
def test_idle_scheduler_returns_an_empty_batch():
    sch = Scheduler(4, 64, BlockManager(4, 4))
    assert sch.schedule() == ([], False)
    seq = Sequence([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), block_size=4)
    simulate(sch, [seq])
    assert seq.is_finished and sch.schedule() == ([], False)


@pytest.mark.tasks("4.6")
@pytest.mark.parametrize("output,params,want", [
    ([3], dict(max_tokens=1), "length"),
    ([3, 4], dict(max_tokens=5), None),
    ([3, 99], dict(max_tokens=5), "stop"),
    ([3, 99], dict(max_tokens=5, ignore_eos=True), None),
    ([99], dict(max_tokens=5, min_tokens=1), None),
    ([3, 99], dict(max_tokens=5, min_tokens=1), "stop"),
    ([3, 42], dict(max_tokens=5, ignore_eos=True, stop_token_ids=[42]), "stop"),
    ([3, 42], dict(max_tokens=5, min_tokens=2, stop_token_ids=[42]), None),
    ([3, 42, 42], dict(max_tokens=5, min_tokens=2, stop_token_ids=[42]), "stop"),
    ([3, 4, 5], dict(max_tokens=3, ignore_eos=True), "length"),
])
def test_finish_reason(output, params, want):
    sch = Scheduler(4, 64, BlockManager(8, 4), eos_token_ids=[99])
    seq = Sequence([7, 8], SamplingParams(**params), block_size=4)
    for t in output:
        seq.append_token(t)
    assert sch.finish_reason(seq, output[-1]) == want


@pytest.mark.tasks("4.7")
def test_finish_frees_the_blocks_and_leaves_its_queue():
    sch = Scheduler(4, 64, BlockManager(8, 4))
    a, b = running(sch, list(range(9)), list(range(20, 26)))
    sch.finish(b, "stop")
    assert b.status == SequenceStatus.FINISHED and b.finish_reason == "stop" and b.block_table == []
    assert ids(sch.running) == ids([a]) and sch.block_manager.num_free_blocks == 5
    assert b.completion_token_ids == [0]
    sch.preempt(a)  # a waits, holding nothing: finish takes it out of waiting too
    sch.finish(a, "stop")
    assert not sch.waiting and not sch.running and a.finish_reason == "stop"
    assert sch.block_manager.num_free_blocks == 8


@pytest.mark.tasks("4.8")
def test_postprocess_records_one_step_by_hand():
    sch = Scheduler(4, 64, BlockManager(16, 4))
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    chunk, whole = Sequence(list(range(11)), sp, block_size=4), Sequence(list(range(30, 36)), sp, block_size=4)
    for s, n in [(chunk, 8), (whole, 6)]:
        sch.block_manager.allocate(s)
        s.status, s.num_scheduled_tokens = SequenceStatus.RUNNING, n
        sch.running.append(s)
    (last,) = running(sch, list(range(60, 69)), max_tokens=2)  # 9 + 1 tokens; its 2nd token ends it
    last.num_scheduled_tokens = 1
    done = sch.postprocess([chunk, whole, last], [-1, 5, 6])
    assert done == [last] and last.finish_reason == "length" and last.block_table == []
    assert (chunk.num_cached_tokens, chunk.num_scheduled_tokens, len(chunk)) == (8, 0, 11)
    assert (whole.num_cached_tokens, whole.completion_token_ids) == (6, [5])
    assert (chunk.num_hashed_blocks, whole.num_hashed_blocks) == (2, 1)
    assert len(sch.block_manager.hash_to_block_id) == 2 + 1 + 2  # `last` filled its 2nd block
    assert ids(sch.running) == ids([chunk, whole])


@pytest.mark.tasks("4.6", "4.8")
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


@pytest.mark.tasks("4.8")
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


@pytest.mark.tasks("4.10")
def test_preempt_all_empties_running_newest_first_and_frees_every_block():
    """Three decoding sequences preempted at once: waiting holds them oldest first (the newest is
    preempted first, each goes to the front), nothing holds a block, nothing is scheduled."""
    sch = Scheduler(4, 64, BlockManager(8, 4))
    seqs = running(sch, [1, 2, 3], [4, 5, 6, 7, 8], [9])
    sch.preempt_all()
    assert list(sch.running) == [] and ids(sch.waiting) == ids(seqs)
    assert sch.block_manager.num_free_blocks == 8
    assert [(s.block_table, s.num_scheduled_tokens) for s in seqs] == [([], 0)] * 3


@pytest.mark.tasks("4.10")
def test_preempt_all_frees_a_waiting_sequence_whose_admission_was_cut_short():
    """An admission interrupted between taking a sequence's blocks and moving it to running (a
    Ctrl-C inside schedule) leaves a waiting sequence that holds blocks and scheduled tokens;
    preempt_all, which the engine's recovery calls, must free them too. (A learner trial's
    preempt_all that only preempted the running passed every other test.)"""
    sch = Scheduler(4, 64, BlockManager(8, 4))
    (r,) = running(sch, [1, 2, 3])
    w = Sequence(list(range(10, 19)), block_size=4)
    sch.add(w)
    sch.block_manager.allocate(w)  # what admission does before it moves w to running
    w.num_scheduled_tokens = 9
    assert len(w.block_table) == 3 and w in sch.waiting
    sch.preempt_all()
    assert (w.block_table, w.num_scheduled_tokens) == ([], 0), (
        f"waiting sequence with 3 blocks and 9 scheduled tokens after preempt_all: table "
        f"{w.block_table}, scheduled {w.num_scheduled_tokens}; expected ([], 0)")
    assert sch.block_manager.num_free_blocks == 8 and ids(sch.waiting) == ids([r, w])


@pytest.mark.tasks("4.9")
def test_abort_anywhere_twice_frees_everything_and_keeps_a_finished_reason():
    sch = Scheduler(4, 64, BlockManager(8, 4))
    a, b = running(sch, list(range(9)), list(range(20, 26)))
    w = Sequence([1, 2, 3, 4, 5], block_size=4)
    sch.add(w)
    sch.finish(a, "length")
    for s in (w, b, a, b, w, a):
        sch.abort(s)
    assert sch.is_finished() and sch.block_manager.num_free_blocks == 8
    assert [s.finish_reason for s in (a, b, w)] == ["length", "abort", "abort"]
    assert all(s.status == SequenceStatus.FINISHED and not s.block_table for s in (a, b, w))
    assert all(blk.ref_count == 0 for blk in sch.block_manager.blocks)


@pytest.mark.tasks(*SCHEDULING)
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


@pytest.mark.tasks(*SCHEDULING)
def test_every_step_keeps_the_limits_and_loses_no_request():
    seqs = workload(7, n=50)
    sch = Scheduler(max_num_seqs=6, max_num_batched_tokens=64, block_manager=BlockManager(20, 16))
    for s in seqs:
        sch.add(s)
    finished, order = [], ids(seqs)
    while not sch.is_finished():
        batch, prefill = sch.schedule()
        assert len({id(s) for s in batch}) == len(batch)  # no sequence twice in a step
        live = list(sch.waiting) + list(sch.running)
        assert len({id(s) for s in live}) == len(live)
        assert len(sch.running) <= 6 and sum(s.num_scheduled_tokens for s in batch) <= 64
        assert all(s.num_scheduled_tokens >= 1 and s.status == SequenceStatus.RUNNING for s in batch)
        assert all(s.num_cached_tokens + s.num_scheduled_tokens <= len(s) <= len(s.block_table) * 16
                   for s in batch)
        if not prefill:
            assert all(s.num_scheduled_tokens == 1 for s in batch)
        never_ran = [s.seq_id for s in sch.waiting if s.seq_id in order and not s.num_preemptions]
        assert never_ran == sorted(never_ran)  # first come, first served: nobody overtakes
        finished += sch.postprocess(batch, [fake_next_token(s.token_ids) for s in batch])
    assert sorted(s.seq_id for s in finished) == sorted(order)


@pytest.mark.tasks("4.1", "4.2", "4.5", "4.8")
def test_max_model_len_prompt_completes_with_chunked_prefill():
    max_len, bs = 1024, 16
    seq = Sequence(list(range(max_len - 1)), SamplingParams(max_tokens=1, ignore_eos=True), block_size=bs)
    sch = Scheduler(max_num_seqs=4, max_num_batched_tokens=100, block_manager=BlockManager(max_len // bs, bs))
    trace = simulate(sch, [seq])
    assert len(seq) == max_len and seq.num_completion_tokens == 1
    assert sum(t["tokens"] for t in trace if t["prefill"]) == max_len - 1
    assert max(t["tokens"] for t in trace) == 100


def test_sequence_larger_than_the_cache_is_rejected():
    sch = Scheduler(4, 64, BlockManager(2, 4))
    with pytest.raises(ValueError, match="needs 3 blocks"):
        sch.add(Sequence(list(range(9)), block_size=4))


@pytest.mark.tasks("4.2", "4.8")
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
