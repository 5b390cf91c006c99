"""Interrupt safety of the block manager and the scheduler (issue 13, item 3).

A KeyboardInterrupt (Ctrl-C) is injected at every call boundary of a small scheduler run: every
method and property of BlockManager, Scheduler and Sequence, the block hash and the fake model's
step are patched in turn, so that their k-th call raises, either on entry or just after returning,
for every k. After each interruption the state must be sound (checked from the public state by
`check_invariants`, written here independently of the code), aborting every sequence (twice) must
give the whole pool back, and the same scheduler must then run the workload again with exactly the
outputs of an uninterrupted run (the fake model reads its history through the block tables, so a
corrupted table or prefix-cache entry would change them).
"""

from collections import Counter

import pytest

from cleanvllm import block_manager as bm_module
from cleanvllm.block_manager import BlockManager
from cleanvllm.sampling_params import SamplingParams
from cleanvllm.scheduler import Scheduler
from cleanvllm.sequence import Sequence
from cleanvllm.simulate import FakeModel, fake_next_token, simulate

BS, NUM_BLOCKS, MAX_SEQS, BUDGET = 4, 9, 4, 8
SYSTEM = list(range(1, 9))  # two full blocks shared by several prompts


def naive(prompt: list[int], n: int) -> list[int]:
    """The fake model applied token by token (no scheduler, no cache)."""
    toks = list(prompt)
    for _ in range(n):
        toks.append(fake_next_token(toks))
    return toks[len(prompt) :]


def workload() -> list[Sequence]:
    """Shared prefixes (cache hits), a prompt longer than the budget (chunked prefill), more
    blocks than the pool holds (preemption), and a stop token after min_tokens."""
    stop_prompt = SYSTEM + [41, 42, 43, 44, 45]
    stop_token = naive(stop_prompt, 4)[2]  # the 3rd generated token stops it (min_tokens=1)
    specs = [
        (SYSTEM + [11, 12, 13], SamplingParams(max_tokens=6, ignore_eos=True)),
        (SYSTEM + [21], SamplingParams(max_tokens=9, ignore_eos=True)),
        (list(range(31, 44)), SamplingParams(max_tokens=5, ignore_eos=True)),
        (stop_prompt, SamplingParams(max_tokens=8, min_tokens=1, stop_token_ids=[stop_token])),
        (SYSTEM + [11, 12, 13, 14], SamplingParams(max_tokens=7, ignore_eos=True)),
        ([51, 52], SamplingParams(max_tokens=7, ignore_eos=True)),
    ]
    return [Sequence(p, sp, block_size=BS) for p, sp in specs]


def outputs(seqs):
    return [(s.completion_token_ids, s.finish_reason) for s in seqs]


def expected_outputs():
    out = []
    for s in workload():
        sp, toks = s.sampling_params, naive(s.prompt_token_ids, s.sampling_params.max_tokens)
        for i, t in enumerate(toks):
            if i + 1 > sp.min_tokens and t in sp.stop_token_ids:
                out.append((toks[: i + 1], "stop"))
                break
        else:
            out.append((toks, "length"))
    return out


def fresh():
    bm = BlockManager(NUM_BLOCKS, BS)
    return bm, Scheduler(MAX_SEQS, BUDGET, bm), FakeModel(NUM_BLOCKS, BS)


def check_invariants(bm: BlockManager, sch: Scheduler, seqs: list[Sequence], model: FakeModel):
    """The state is sound: pool, reference counts, queues and prefix cache agree."""
    free = list(bm.free_block_ids)
    used = set(bm.used_block_ids)
    assert len(free) == len(set(free)), "a block is twice in the free list"
    assert not set(free) & used, f"blocks both free and used: {set(free) & used}"
    assert set(free) | used == set(range(NUM_BLOCKS)), "a block is neither free nor used"
    holders = Counter(b for s in seqs for b in s.block_table)
    for blk in bm.blocks:
        assert blk.ref_count >= 0, f"block {blk.block_id} has reference count {blk.ref_count}"
        assert blk.ref_count == holders[blk.block_id], (
            f"block {blk.block_id}: reference count {blk.ref_count}, held by "
            f"{holders[blk.block_id]} block table(s)"
        )
        assert (blk.ref_count > 0) == (blk.block_id in used), f"block {blk.block_id} misfiled"
    queued = [id(s) for s in sch.waiting] + [id(s) for s in sch.running]
    assert len(queued) == len(set(queued)), "a sequence is queued twice"
    assert set(queued) <= {id(s) for s in seqs}, "an unknown sequence is queued"
    for s in seqs:
        if s.block_table:
            assert id(s) in queued, f"orphan: {s} holds blocks but is in no queue"
        if id(s) in queued:
            assert not s.is_finished, f"{s} is finished but still queued"
        assert s.num_cached_tokens <= len(s.block_table) * BS, f"{s}: more cached than held"
    for h, b in bm.hash_to_block_id.items():  # the prefix cache only names computed blocks
        blk = bm.blocks[b]
        assert blk.hash == h and len(blk.token_ids) == BS, f"cache entry for block {b} is stale"
        assert model.kv[b] == blk.token_ids, f"block {b} is cached but its KV was not computed"


def targets():
    """(owner, attribute name) of every call boundary we can interrupt."""
    out = [(bm_module, "compute_block_hash"), (FakeModel, "execute")]
    for cls in (BlockManager, Scheduler, Sequence):
        for name, attr in vars(cls).items():
            if name in ("__init__", "__repr__") or (name.startswith("__") and name != "__len__"):
                continue
            if callable(attr) or isinstance(attr, property):
                out.append((cls, name))
    return out


class Interrupt:
    """Patch owner.name so that its k-th call raises KeyboardInterrupt, on entry or on return."""

    def __init__(self, owner, name, k=0, on_return=False):
        self.owner, self.name, self.k, self.on_return, self.calls = owner, name, k, on_return, 0

    def _wrap(self, fn):
        def wrapper(*args, **kwargs):
            self.calls += 1
            n = self.calls
            if n == self.k and not self.on_return:
                raise KeyboardInterrupt(f"{self.name}, call {n}, on entry")
            result = fn(*args, **kwargs)
            if n == self.k and self.on_return:
                raise KeyboardInterrupt(f"{self.name}, call {n}, on return")
            return result

        return wrapper

    def __enter__(self):
        self.real = vars(self.owner)[self.name]
        if isinstance(self.real, property):
            patched = property(self._wrap(self.real.fget))
        else:
            patched = self._wrap(self.real)
        setattr(self.owner, self.name, patched)
        return self

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.real)
        return False


def test_the_workload_exercises_every_path(monkeypatch):
    cached_at_admission, real_allocate = [], BlockManager.allocate

    def spy(self, seq):
        real_allocate(self, seq)
        cached_at_admission.append(seq.num_cached_tokens)

    monkeypatch.setattr(BlockManager, "allocate", spy)
    bm, sch, model = fresh()
    seqs = workload()
    trace = simulate(sch, seqs, model)
    assert outputs(seqs) == expected_outputs()
    assert sch.num_preemptions >= 2, "too few preemptions: the pool is too large"
    assert max(t["tokens"] for t in trace) == BUDGET, "no step uses the whole budget"
    assert any(t["prefill"] and t["seqs"] == 1 and t["tokens"] == BUDGET for t in trace)
    assert any(s.finish_reason == "stop" for s in seqs)
    assert max(cached_at_admission) > 0, "no prefix-cache hit"
    check_invariants(bm, sch, seqs, model)


def call_counts():
    counts = {}
    for owner, name in targets():
        bm, sch, model = fresh()
        with Interrupt(owner, name) as counter:  # k=0: never raises, only counts
            simulate(sch, workload(), model)
        counts[(owner, name)] = counter.calls
    return counts


@pytest.mark.parametrize("on_return", [False, True], ids=["on-entry", "on-return"])
def test_interrupt_at_every_call_boundary(on_return):
    expected = expected_outputs()
    counts = call_counts()
    assert counts[(BlockManager, "allocate")] > 0 and counts[(Scheduler, "preempt")] > 0
    tried = 0
    for (owner, name), n in counts.items():
        for k in range(1, n + 1):
            where = f"{getattr(owner, '__name__', owner)}.{name} call {k} " + (
                "on return" if on_return else "on entry"
            )
            bm, sch, model = fresh()
            seqs = workload()
            with Interrupt(owner, name, k, on_return):
                with pytest.raises(KeyboardInterrupt):
                    simulate(sch, seqs, model)
            try:
                check_invariants(bm, sch, seqs, model)
                for s, want in zip(seqs, expected):  # what finished before the interrupt is right
                    if s.finish_reason in ("stop", "length"):
                        assert (s.completion_token_ids, s.finish_reason) == want
                for s in seqs + seqs:  # abort everything, twice
                    sch.abort(s)
                check_invariants(bm, sch, seqs, model)
                assert sch.is_finished() and bm.num_free_blocks == NUM_BLOCKS, "pool not whole"
                assert all(s.is_finished for s in seqs)
                again = workload()
                simulate(sch, again, model)
                assert outputs(again) == expected, "the next run's outputs differ"
                check_invariants(bm, sch, again, model)
                assert bm.num_free_blocks == NUM_BLOCKS
            except AssertionError as e:
                raise AssertionError(f"interrupted at {where}: {e}") from None
            tried += 1
    assert tried > 200  # every boundary of a run with prefix hits, chunks and preemptions


@pytest.mark.parametrize("target", ["BlockManager.deallocate", "Scheduler.abort"])
def test_an_interrupted_clean_up_can_run_again(target):
    """Ctrl-C during the clean-up itself: aborting again still gives the whole pool back."""
    owner, name = (
        {"BlockManager": BlockManager, "Scheduler": Scheduler}[target.split(".")[0]],
        target.split(".")[1],
    )
    expected, tried = expected_outputs(), 0
    for on_return in (False, True):
        for k in range(1, 100):
            bm, sch, model = fresh()
            seqs = workload()
            with Interrupt(BlockManager, "may_append", 12), pytest.raises(KeyboardInterrupt):
                simulate(sch, seqs, model)
            assert sum(bool(s.block_table) for s in seqs) >= 2, "too little in flight to clean up"
            with Interrupt(owner, name, k, on_return):
                try:
                    for s in seqs:
                        sch.abort(s)
                    interrupted = False
                except KeyboardInterrupt:
                    interrupted = True
            check_invariants(bm, sch, seqs, model)
            for s in seqs:
                sch.abort(s)
            assert sch.is_finished() and bm.num_free_blocks == NUM_BLOCKS
            assert all(blk.ref_count == 0 for blk in bm.blocks)
            again = workload()
            simulate(sch, again, model)
            assert outputs(again) == expected
            if not interrupted:
                break
            tried += 1
    assert tried >= 4


def test_abort_is_idempotent_wherever_the_sequence_is():
    bm, sch, model = fresh()
    running, waiting, done = (
        Sequence(
            list(range(10 * i, 10 * i + 5)), SamplingParams(max_tokens=2, ignore_eos=True), block_size=BS
        )
        for i in range(3)
    )
    never_added = Sequence([1, 2, 3], block_size=BS)
    simulate(sch, [done], model)
    assert done.finish_reason == "length"
    sch.add(running)
    batch, _ = sch.schedule()
    sch.postprocess(batch, model.execute(batch))
    sch.add(waiting)
    assert running in sch.running and waiting in sch.waiting and running.block_table
    for _ in range(2):
        for s in (running, waiting, done, never_added):
            sch.abort(s)
        assert sch.is_finished() and bm.num_free_blocks == NUM_BLOCKS
        assert all(b.ref_count == 0 for b in bm.blocks)
        assert [s.finish_reason for s in (running, waiting, done, never_added)] == [
            "abort",
            "abort",
            "length",
            "abort",
        ]
        assert all(s.is_finished and not s.block_table for s in (running, waiting, done, never_added))
    assert sch.schedule() == ([], False)


def test_deallocate_twice_releases_once():
    bm = BlockManager(6, BS)
    a, b = Sequence(SYSTEM + [1], block_size=BS), Sequence(SYSTEM + [2], block_size=BS)
    bm.allocate(a)
    a.num_cached_tokens = len(a)
    bm.hash_blocks(a)
    bm.allocate(b)  # shares a's two system-prompt blocks
    assert b.block_table[:2] == a.block_table[:2]
    bm.deallocate(a)
    bm.deallocate(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    bm.deallocate(b)
    bm.deallocate(b)
    assert bm.num_free_blocks == 6 and all(blk.ref_count == 0 for blk in bm.blocks)
