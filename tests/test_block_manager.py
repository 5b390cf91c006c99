"""The block manager (chapter 3): each task against a pool built by hand, then the pool's rules
under random operations (a hypothesis state machine: allocate with shared prefixes, chunked
computation and hash_blocks, decode with can_append / may_append, deallocate once or
twice, in a pool small enough to evict cached prefixes).

The tests run in task order and `make check CH=03` stops at the first failure, so a mistake is
named by the first test that meets it: the task tests come first, the random operations last.
"""

from collections import Counter

import numpy as np
import pytest
import xxhash
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cleanvllm.block_manager import BlockManager, compute_block_hash
from cleanvllm.sequence import Sequence

CHAPTERS = ("03",)  # `make check CH=03` runs this file (tools/check.py)

BS = 4
SYSTEM = list(range(100, 112))  # three full blocks


def hashes_by_hand(tokens: list[int], bs: int = BS) -> list[int]:
    """The chained hashes of the full blocks, from the bytes (not compute_block_hash)."""
    out, prev = [], b""
    for i in range(len(tokens) // bs):
        h = xxhash.xxh64(prev + np.array(tokens[i * bs : (i + 1) * bs], dtype=np.int64).tobytes())
        out.append(h.intdigest())
        prev = out[-1].to_bytes(8, "little")
    return out


def cache_by_hand(bm: BlockManager, tokens: list[int], block_ids: list[int]) -> None:
    """Register tokens' full blocks in these blocks, as a computed prompt would be."""
    for i, (h, b) in enumerate(zip(hashes_by_hand(tokens, bm.block_size), block_ids)):
        bm.blocks[b].hash = h
        bm.blocks[b].token_ids = tokens[i * bm.block_size : (i + 1) * bm.block_size]
        bm.hash_to_block_id[h] = b


def hold_by_hand(bm: BlockManager, seq: Sequence, block_ids) -> None:
    """Give seq these free blocks, as a commit would."""
    for b in block_ids:
        del bm.free_block_ids[b]
        bm.used_block_ids.add(b)
        bm.blocks[b].ref_count += 1
        seq.block_table.append(b)


def pool_problems(bm: BlockManager, live: list[Sequence]) -> list[str]:
    """The pool's rules, each broken one in words. live: every sequence that holds blocks."""
    held = Counter(b for s in live for b in s.block_table)
    free_list = list(bm.free_block_ids)
    free, used = set(free_list), set(bm.used_block_ids)
    problems = []
    if len(free_list) != len(free):
        problems.append("a block is twice in the free list")
    for blk in bm.blocks:
        b, n = blk.block_id, held[blk.block_id]
        if b in free and b in used:
            problems.append(f"block {b} is both free and used")
        elif b not in free and b not in used:
            problems.append(f"block {b} is neither free nor used")
        if n and b in free:
            problems.append(f"block {b} is in the free list although {n} block table(s) hold it "
                            "(a cache hit on a free block must take it out of the free list)")
        if blk.ref_count != n:
            problems.append(f"block {b} has ref_count {blk.ref_count} but {n} block table(s) hold it")
        if (blk.ref_count > 0) != (b in used):
            problems.append(f"block {b} has ref_count {blk.ref_count} and is "
                            f"{'' if b in used else 'not '}in used_block_ids")
    for h, b in bm.hash_to_block_id.items():
        blk = bm.blocks[b]
        if blk.hash != h or len(blk.token_ids) != bm.block_size:
            problems.append(f"the prefix cache names block {b}, which no longer holds that prefix")
    for s in live:
        for i in range(s.num_hashed_blocks):
            blk = bm.blocks[s.block_table[i]]
            if blk.token_ids != s.block(i):
                problems.append(f"{s} block {i}: its block {blk.block_id} holds other tokens")
    return problems


def assert_sound(bm: BlockManager, live: list[Sequence], after: str) -> None:
    problems = pool_problems(bm, live)
    assert not problems, f"after {after}: " + "; ".join(problems[:3])


def snapshot(bm: BlockManager):
    return (list(bm.free_block_ids), sorted(bm.used_block_ids), [b.ref_count for b in bm.blocks],
            dict(bm.hash_to_block_id))


# --- one task at a time -------------------------------------------------------------------------


@pytest.mark.tasks("3.1")
def test_the_block_hash_is_the_chain_written_out_from_the_bytes():
    tokens = [5, 9, 1, 0, 7, 7, 2, 3, 8, 6, 4, 1]
    prev, got = -1, []
    for i in range(3):
        prev = compute_block_hash(tokens[i * BS : (i + 1) * BS], prev)
        got.append(prev)
    assert got == hashes_by_hand(tokens), "compute_block_hash's chain differs from xxh64 by hand"
    assert compute_block_hash([5, 6, 7, 8], got[0]) != compute_block_hash([5, 6, 7, 8]), \
        "a block's hash must depend on the hash before it"


@pytest.mark.tasks("3.2")
def test_a_new_pool_is_all_free_in_id_order():
    bm = BlockManager(num_blocks=5, block_size=BS)
    assert [b.block_id for b in bm.blocks] == [0, 1, 2, 3, 4], "blocks[i] must be block i"
    assert list(bm.free_block_ids) == [0, 1, 2, 3, 4], f"free list {list(bm.free_block_ids)}"
    assert not bm.used_block_ids and not bm.hash_to_block_id and bm.num_free_blocks == 5
    del bm.free_block_ids[1]
    bm.free_block_ids[1] = None
    assert list(bm.free_block_ids) == [0, 2, 3, 4, 1], "free_block_ids must be an ordered set"
    assert_sound(BlockManager(7, BS), [], "BlockManager(7, 4)")


@pytest.mark.tasks("3.3")
def test_cached_prefix_chains_stops_at_a_miss_and_keeps_the_last_token_out():
    bm = BlockManager(num_blocks=8, block_size=BS)
    cache_by_hand(bm, SYSTEM, [6, 1, 3])
    for prompt, hits in [
        (SYSTEM + [9], [6, 1, 3]),
        (SYSTEM, [6, 1]),  # the block holding the last token is computed
        (SYSTEM[:4] + [0, 0, 0, 0] + SYSTEM[8:] + [9], [6]),  # a miss ends the prefix
        ([0] + SYSTEM[1:] + [9], []),  # block 0 differs: every later hash differs
        (SYSTEM[:4], []),
    ]:
        got = bm._cached_prefix(Sequence(prompt, block_size=BS))
        assert got == hits, f"_cached_prefix of {prompt}: expected {hits}, got {got}"
    assert list(bm.free_block_ids) == list(range(8)), "_cached_prefix must only look"


@pytest.mark.tasks("3.3")
def test_hash_collision_is_not_trusted():
    bm = BlockManager(6, BS)
    cache_by_hand(bm, SYSTEM, [2, 4, 0])
    bm.blocks[4].token_ids = [7, 7, 7, 7]  # another prefix with the same hash
    got = bm._cached_prefix(Sequence(SYSTEM + [1], block_size=BS))
    assert got == [2], f"a hit must compare the block's tokens: expected [2], got {got}"


@pytest.mark.tasks("3.4")
def test_free_blocks_to_take_oldest_first_skipping_keep():
    bm = BlockManager(num_blocks=6, block_size=BS)
    order = [4, 2, 0, 5, 1, 3]
    for b in order:
        del bm.free_block_ids[b]
        bm.free_block_ids[b] = None
    for n, keep in [(2, []), (3, [2, 5]), (9, [0]), (0, [])]:
        want = [b for b in order if b not in keep][:n]
        got = bm._free_blocks_to_take(n, keep)
        assert got == want, f"_free_blocks_to_take({n}, {keep}), free list {order}: {got}, not {want}"
    assert list(bm.free_block_ids) == order, "_free_blocks_to_take must only look"


@pytest.mark.tasks("3.5")
def test_assign_revives_a_freed_cached_block():
    """A hit on a block with ref_count 0 (freed, prefix kept) must leave the free list."""
    bm = BlockManager(num_blocks=6, block_size=BS)
    cache_by_hand(bm, SYSTEM, [3, 1, 4])  # all three free, still cached
    seq = Sequence(SYSTEM[:8] + [9], block_size=BS)
    bm._assign(seq, [3, 1], [0])
    assert 3 not in bm.free_block_ids and 1 not in bm.free_block_ids, (
        f"revived blocks 3 and 1 are still in the free list {list(bm.free_block_ids)}: "
        "_assign must take a hit with ref_count 0 out of the free list (and into used_block_ids)")
    assert_sound(bm, [seq], "_assign(seq, hits=[3, 1], fresh=[0]) on free cached blocks 3 and 1")
    assert seq.block_table == [3, 1, 0] and (seq.num_cached_tokens, seq.num_hashed_blocks) == (8, 2)
    # the revived blocks are never handed out again while seq holds them
    other = Sequence(list(range(20, 32)), block_size=BS)
    bm._assign(other, [], bm._free_blocks_to_take(3, keep=[]))
    assert_sound(bm, [seq, other], "a second sequence took 3 free blocks")


@pytest.mark.tasks("3.5")
def test_assign_counts_shared_hits_and_takes_fresh_blocks_clean():
    bm = BlockManager(num_blocks=8, block_size=BS)
    cache_by_hand(bm, SYSTEM, [5, 2, 6])
    first = Sequence(SYSTEM[:4] + [1], block_size=BS)
    hold_by_hand(bm, first, [5, 3])
    seq = Sequence(SYSTEM[:8] + [1, 2, 3], block_size=BS)
    bm._assign(seq, [5, 2], [6])
    assert_sound(bm, [first, seq], "_assign(seq, hits=[5, 2], fresh=[6])")
    refs = [b.ref_count for b in bm.blocks]
    assert refs == [0, 0, 1, 1, 0, 2, 1, 0], f"reference counts {refs}"
    assert list(bm.free_block_ids) == [0, 1, 4, 7], f"free list {list(bm.free_block_ids)}"
    assert bm.hash_to_block_id == dict(zip(hashes_by_hand(SYSTEM)[:2], [5, 2])), \
        "a fresh block's old prefix must leave the cache"
    assert (bm.blocks[6].hash, bm.blocks[6].token_ids) == (-1, [])


@pytest.mark.tasks("3.5")
def test_a_fresh_block_drops_its_cache_entry_only_if_the_entry_names_it():
    """Two prompts with the same first block, admitted before either was computed, each fill a
    block with it: both blocks carry its hash, and the cache names the one hashed last (block 1).
    When block 2, freed with its stale hash, is taken as a fresh block, the cache entry stays:
    it names block 1. (Deleting it whatever it names lost block 1's prefix silently; a learner
    trial's _assign did that and passed every other test.)"""
    bm = BlockManager(num_blocks=4, block_size=BS)
    h = hashes_by_hand(SYSTEM)[0]
    cache_by_hand(bm, SYSTEM[:4], [2])  # block 2 hashed first ...
    cache_by_hand(bm, SYSTEM[:4], [1])  # ... then block 1: the cache names block 1
    assert bm.hash_to_block_id == {h: 1} and bm.blocks[2].hash == h
    seq = Sequence(list(range(20, 25)), block_size=BS)
    bm._assign(seq, [], [2])
    assert bm.hash_to_block_id == {h: 1}, (
        f"_assign(seq, hits=[], fresh=[2]), block 2 free with the hash that the cache gives to "
        f"block 1: the cache is {bm.hash_to_block_id}, expected {{{h}: 1}} (a fresh block's old "
        f"entry goes only if it names that block)")
    assert (bm.blocks[2].hash, bm.blocks[2].token_ids, bm.blocks[2].ref_count) == (-1, [], 1)
    assert_sound(bm, [seq], "_assign(seq, hits=[], fresh=[2]) with a stale hash on block 2")


@pytest.mark.tasks("3.6")
def test_allocate_reuses_the_cached_prefix():
    bm = BlockManager(num_blocks=6, block_size=BS)
    cache_by_hand(bm, SYSTEM, [4, 1, 3])
    for b in [0, 2, 3, 5]:  # free list [1, 4, 0, 2, 3, 5]: the hits come first
        del bm.free_block_ids[b]
        bm.free_block_ids[b] = None
    seq = Sequence(SYSTEM[:8] + [7, 7], block_size=BS)
    bm.allocate(seq)
    assert seq.block_table == [4, 1, 0], f"block table {seq.block_table}, expected [4, 1, 0]"
    assert seq.num_cached_tokens == 8, f"cached tokens {seq.num_cached_tokens}, expected 8"
    assert_sound(bm, [seq], "allocate with two cached blocks that were free")


@pytest.mark.tasks("3.6")
def test_allocate_refuses_without_changing_anything():
    bm = BlockManager(num_blocks=4, block_size=BS)
    cache_by_hand(bm, SYSTEM, [1, 2, 3])
    big, before = Sequence(SYSTEM + [1, 2, 3, 4, 5], block_size=BS), snapshot(bm)
    with pytest.raises(RuntimeError):
        bm.allocate(big)
    assert snapshot(bm) == before and big.block_table == [], "a refused allocation changed the pool"


@pytest.mark.tasks("3.7")
def test_hash_blocks_registers_only_computed_full_blocks_in_chunks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = Sequence(SYSTEM + [1, 2, 3], block_size=BS)
    bm.allocate(seq)
    want = hashes_by_hand(SYSTEM)
    for computed, n in [(3, 0), (6, 1), (12, 3), (15, 3)]:
        seq.num_cached_tokens = computed
        bm.hash_blocks(seq)
        got = [bm.blocks[b].hash for b in seq.block_table]
        assert got == want[:n] + [-1] * (4 - n), (
            f"block hashes with {computed} of 15 tokens computed: expected the chain by hand "
            f"{want[:n]} then -1s, got {got} (the chain goes on from the last registered block)")
        assert bm.hash_to_block_id == dict(zip(want[:n], seq.block_table)), f"cache at {computed}"
        assert seq.num_hashed_blocks == n, f"num_hashed_blocks {seq.num_hashed_blocks}, not {n}"


@pytest.mark.tasks("3.8")
def test_deallocate_tail_first_keeps_the_prefix_and_is_safe_twice():
    bm = BlockManager(num_blocks=8, block_size=BS)
    x, y = Sequence(SYSTEM + [1], block_size=BS), Sequence(SYSTEM[:8] + [5], block_size=BS)
    for s in (x, y):
        bm.allocate(s)
        s.num_cached_tokens = len(s)
        bm.hash_blocks(s)
    assert x.block_table == [0, 1, 2, 3] and y.block_table == [0, 1, 4]
    bm.deallocate(x)
    assert (x.block_table, x.num_cached_tokens, x.num_hashed_blocks) == ([], 0, 0)
    assert_sound(bm, [y], "deallocate(x) while y shares its first two blocks")
    assert list(bm.free_block_ids) == [5, 6, 7, 3, 2], f"free list {list(bm.free_block_ids)}: tail first"
    assert sorted(bm.hash_to_block_id.values()) == [0, 1, 2], "freed blocks keep their prefix"
    before = snapshot(bm)
    bm.deallocate(x)
    assert snapshot(bm) == before, "a second deallocate must give nothing back"
    bm.deallocate(y)
    assert_sound(bm, [], "everyone left")
    assert list(bm.free_block_ids) == [5, 6, 7, 3, 2, 4, 1, 0], f"free list {list(bm.free_block_ids)}"


@pytest.mark.tasks("3.6", "3.7", "3.8")
def test_shared_prefix_is_reused_and_survives_free():
    bm = BlockManager(10, BS)
    a = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 9], block_size=BS)
    bm.allocate(a)
    a.num_cached_tokens = 9
    bm.hash_blocks(a)
    b = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 0, 0], block_size=BS)
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    bm.deallocate(a)
    bm.deallocate(b)
    c = Sequence([1, 2, 3, 4, 5, 6, 7, 8], block_size=BS)  # all cached: the last block is computed
    bm.allocate(c)
    assert c.num_cached_tokens == 4, f"cached tokens {c.num_cached_tokens}, expected 4"


@pytest.mark.tasks("3.9")
def test_can_append_counts_slots_and_free_blocks():
    for n, held, free, room in [(8, 2, 0, True), (9, 2, 0, False), (9, 2, 1, True),
                                (5, 2, 0, True), (4, 1, 0, True), (5, 1, 0, False)]:
        bm = BlockManager(num_blocks=held + free, block_size=BS)
        seq = Sequence(list(range(n)), block_size=BS)
        hold_by_hand(bm, seq, range(held))
        got = bm.can_append(seq)
        assert got == room, f"can_append: {n} tokens, {held} blocks of 4, {free} free: {got}, not {room}"


@pytest.mark.tasks("3.9", "3.10")
def test_decode_opens_a_block_exactly_when_a_token_starts_one():
    """can_append / may_append against counting by hand: after n tokens a sequence holds
    ceil(n / block_size) blocks, and only a token that starts a block needs a free one. The pool
    holds exactly what the sequence will need, so the last steps run with no free block."""
    for bs in (1, 3, 4, 16):
        for prompt_len in {1, max(bs - 1, 1), bs, bs + 1, 2 * bs}:
            final = prompt_len + 40
            pool = -(-final // bs)
            bm = BlockManager(num_blocks=pool, block_size=bs)
            seq = Sequence(list(range(prompt_len)), block_size=bs)
            bm.allocate(seq)
            seq.num_cached_tokens = len(seq)
            bm.hash_blocks(seq)
            for n in range(prompt_len + 1, final + 1):
                seq.append_token(n)  # the sequence now holds n tokens
                starts_block = (n - 1) % bs == 0  # token n (1-based) is the first of a block
                free_before = bm.num_free_blocks
                assert bm.can_append(seq), (bs, prompt_len, n, free_before)
                bm.may_append(seq)
                assert len(seq.block_table) == -(-n // bs), (
                    f"block size {bs}: {n} tokens hold {len(seq.block_table)} blocks, not {-(-n // bs)}")
                assert bm.num_free_blocks == free_before - starts_block, (
                    f"block size {bs}: token {n} {'starts' if starts_block else 'does not start'} "
                    f"a block, yet free blocks went {free_before} -> {bm.num_free_blocks}")
                seq.num_cached_tokens = n
                bm.hash_blocks(seq)
            assert bm.num_free_blocks == 0
            seq.append_token(0)  # it fits only if the last block has room
            assert bm.can_append(seq) == (final % bs != 0), (bs, prompt_len)
            bm.deallocate(seq)
            assert bm.num_free_blocks == pool


@pytest.mark.tasks("3.10")
def test_may_append_without_a_free_block_raises():
    bm = BlockManager(num_blocks=1, block_size=BS)
    seq = Sequence([1, 2, 3, 4], block_size=BS)
    bm.allocate(seq)
    seq.append_token(5)
    with pytest.raises(RuntimeError):
        bm.may_append(seq)
    assert seq.block_table == [0], "may_append without a free block must leave the table alone"


# --- random operations: the pool's rules hold after every one -----------------------------------

PREFIXES = [[], SYSTEM[:4], SYSTEM[:8], SYSTEM, [1, 2, 3, 0, 1, 2]]


class Pool(RuleBasedStateMachine):
    """Requests arrive with shared prefixes or go on from requests that left, are computed in
    chunks, decode and leave (once or twice), in a pool small enough that
    allocations evict cached prefixes."""

    def __init__(self):
        super().__init__()
        self.bm: BlockManager | None = None
        self.live: list[Sequence] = []
        self.gone: list[list[int]] = []  # the tokens of sequences that left: follow-ups reuse them

    @initialize(num_blocks=st.integers(3, 14))
    def pool(self, num_blocks):
        self.bm = BlockManager(num_blocks, BS)

    def _add(self, tokens: list[int], prefill: bool) -> None:
        seq = Sequence(tokens, block_size=BS)
        if not self.bm.can_allocate(seq):
            return
        self.bm.allocate(seq)
        self.live.append(seq)
        assert len(seq.block_table) == seq.num_blocks, f"allocate gave {seq} the wrong number of blocks"
        assert seq.num_cached_tokens < len(seq), f"allocate left {seq} nothing to compute"
        for i in range(seq.num_cached_tokens // BS):
            assert self.bm.blocks[seq.block_table[i]].token_ids == seq.block(i), \
                f"allocate gave {seq} a cached block {i} holding other tokens"
        if prefill:  # the whole prompt computed in one step
            seq.num_cached_tokens = len(seq)
            self.bm.hash_blocks(seq)

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 3), min_size=1, max_size=6),
          prefill=st.booleans())
    def add(self, prefix, tail, prefill):
        self._add(prefix + tail, prefill)

    @rule(data=st.data(), tail=st.lists(st.integers(0, 3), min_size=1, max_size=3),
          prefill=st.booleans())
    def follow_up(self, data, tail, prefill):
        """A request that goes on from one that left (a chat's next turn): its cached blocks are
        free, and a hit revives them."""
        if self.gone:
            self._add(data.draw(st.sampled_from(self.gone)) + tail, prefill)

    @rule(data=st.data())
    def compute(self, data):
        todo = [s for s in self.live if s.num_cached_tokens < len(s)]
        if todo:
            seq = data.draw(st.sampled_from(todo))
            seq.num_cached_tokens = data.draw(st.integers(seq.num_cached_tokens + 1, len(seq)))
            self.bm.hash_blocks(seq)

    @rule(data=st.data(), token=st.integers(0, 3))
    def decode(self, data, token):
        done = [s for s in self.live if s.num_cached_tokens == len(s)]
        if done:
            seq = data.draw(st.sampled_from(done))
            seq.append_token(token)
            if self.bm.can_append(seq):
                self.bm.may_append(seq)
                assert len(seq.block_table) * BS >= len(seq), f"may_append left {seq} no slot"
            else:  # preempted: it gives its blocks back
                self.bm.deallocate(seq)
                self.live.remove(seq)

    @rule(data=st.data(), twice=st.booleans())
    def free(self, data, twice):
        if self.live:
            seq = data.draw(st.sampled_from(self.live))
            self.bm.deallocate(seq)
            if twice:
                self.bm.deallocate(seq)
            self.live.remove(seq)
            self.gone = [list(seq.token_ids), *self.gone[:3]]

    @invariant()
    def the_pool_is_sound(self):
        if self.bm is not None:
            problems = pool_problems(self.bm, self.live)
            assert not problems, "; ".join(problems[:3])
            for s in self.live:
                assert s.num_blocks == len(s.block_table), \
                    f"{s} holds {len(s.block_table)} blocks for {len(s)} tokens"


# No shrinking: a learner's mistake is reported in seconds (the message says which rule broke,
# the steps that led there are printed below it), not after minutes of searching a shorter example.
Pool.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                  phases=[Phase.explicit, Phase.reuse, Phase.generate])
TestPoolUnderRandomOperations = pytest.mark.tasks(
    "3.2", "3.3", "3.4", "3.5", "3.6", "3.7", "3.8", "3.9", "3.10"
)(Pool.TestCase)
