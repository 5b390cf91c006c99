"""BlockManager invariants under random allocate / compute / append / free, with shared prefixes."""
from hypothesis import given, settings
from hypothesis import strategies as st

from cleanvllm.block_manager import BlockManager, compute_block_hash
from cleanvllm.sequence import Sequence

CHAPTERS = ("03",)  # `make check CH=03` runs this file (tools/check.py)

BS = 4


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    n = len(bm.blocks)
    free, used = set(bm.free_block_ids), bm.used_block_ids
    assert not free & used and len(free) + len(used) == n and len(free) == len(bm.free_block_ids)
    refs = [0] * n
    for s in live:
        for b in s.block_table:
            refs[b] += 1
    for b in bm.blocks:
        assert b.ref_count == refs[b.block_id]
        assert (b.ref_count > 0) == (b.block_id in used)
    for h, bid in bm.hash_to_block_id.items():  # every entry names a block holding exactly those tokens
        blk = bm.blocks[bid]
        assert blk.hash == h and len(blk.token_ids) == BS
    for s in live:
        assert s.num_cached_tokens <= len(s)
        assert len(s.block_table) == s.num_blocks


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_workloads_keep_invariants(data):
    bm = BlockManager(num_blocks=data.draw(st.integers(8, 40)), block_size=BS)
    prefixes = [data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=12)) for _ in range(3)]
    live: list[Sequence] = []
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["add", "add", "step", "step", "free"]))
        if op == "add":
            tokens = data.draw(st.sampled_from(prefixes)) + data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=10))
            seq = Sequence(tokens, block_size=BS)
            if bm.can_allocate(seq):
                bm.allocate(seq)
                assert seq.num_cached_tokens < len(seq)  # never a zero-length query
                # every cached block holds exactly the sequence's tokens
                for i in range(seq.num_cached_tokens // BS):
                    assert bm.blocks[seq.block_table[i]].token_ids == seq.block(i)
                seq.num_cached_tokens = len(seq)  # the prefill computed the rest
                bm.hash_blocks(seq)
                live.append(seq)
        elif op == "step" and live:
            seq = data.draw(st.sampled_from(live))
            seq.append_token(data.draw(st.integers(0, 5)))
            if bm.can_append(seq):
                bm.may_append(seq)
                seq.num_cached_tokens = len(seq)
                bm.hash_blocks(seq)
            else:
                bm.deallocate(seq)
                live.remove(seq)
        elif op == "free" and live:
            seq = data.draw(st.sampled_from(live))
            bm.deallocate(seq)
            live.remove(seq)
        check_invariants(bm, live)
    for s in live:
        bm.deallocate(s)
    check_invariants(bm, [])
    assert bm.num_free_blocks == len(bm.blocks)


def test_chained_hash_depends_on_prefix_and_tokens():
    a = compute_block_hash([1, 2, 3, 4])
    assert a == compute_block_hash([1, 2, 3, 4])
    assert compute_block_hash([1, 2, 3, 5]) != a
    assert compute_block_hash([5, 6, 7, 8], a) != compute_block_hash([5, 6, 7, 8])


def test_shared_prefix_is_reused_and_survives_free():
    bm = BlockManager(10, BS)
    a = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 9], block_size=BS)
    bm.allocate(a); a.num_cached_tokens = 9; bm.hash_blocks(a)
    b = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 0, 0], block_size=BS)
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    bm.deallocate(a); bm.deallocate(b)
    c = Sequence([1, 2, 3, 4, 5, 6, 7, 8], block_size=BS)  # entirely cached: last block recomputed
    bm.allocate(c)
    assert c.num_cached_tokens == 4


def test_hash_collision_is_not_trusted():
    bm = BlockManager(6, BS)
    a = Sequence([1, 2, 3, 4, 9], block_size=BS)
    bm.allocate(a); a.num_cached_tokens = 5; bm.hash_blocks(a)
    bm.blocks[a.block_table[0]].token_ids = [7, 7, 7, 7]  # pretend another prefix hashed the same
    b = Sequence([1, 2, 3, 4, 9], block_size=BS)
    bm.allocate(b)
    assert b.num_cached_tokens == 0


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
                assert len(seq.block_table) == -(-n // bs), (bs, prompt_len, n)
                assert bm.num_free_blocks == free_before - starts_block, (bs, prompt_len, n)
                seq.num_cached_tokens = n
                bm.hash_blocks(seq)
            assert bm.num_free_blocks == 0
            seq.append_token(0)  # it fits only if the last block has room
            assert bm.can_append(seq) == (final % bs != 0), (bs, prompt_len)
            bm.deallocate(seq)
            assert bm.num_free_blocks == pool


def test_can_append_with_an_empty_pool():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = Sequence(list(range(8)), block_size=4)  # fills both blocks exactly
    bm.allocate(seq)
    assert bm.num_free_blocks == 0
    seq.num_cached_tokens = 7
    assert bm.can_append(seq)  # its 8th token has a slot in the 2nd block
    seq.num_cached_tokens = 8
    seq.append_token(9)  # the 9th token starts a 3rd block: none is free
    assert not bm.can_append(seq)
    other = Sequence(list(range(5)), block_size=4)  # 5 tokens in 2 blocks: its 5th fits
    other.block_table = [0, 1]
    assert bm.can_append(other)
