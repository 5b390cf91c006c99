"""The model runner (contract 5): one return contract for execute, KV sizing, the warm-up path,
the tensor-parallel group lifecycle and the worker protocol. CPU, tiny model."""

import json
import multiprocessing as mp
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


from cleanvllm.config import Config
from cleanvllm.context import get_context
from cleanvllm.input_batch import StepBatch, prepare_batch
from cleanvllm.model_runner import ModelRunner, free_port, run_worker
from cleanvllm.sampling_params import SamplingParams
from cleanvllm.sequence import Sequence
from conftest import hf_greedy

CHAPTERS = ("07",)  # `make check CH=07` runs this file (tools/check.py)

BS = 16


def config(tiny_model, **kw) -> Config:
    base = dict(kvcache_block_size=BS, max_num_seqs=4, max_num_batched_tokens=128, max_model_len=128,
                dtype="float32", device="cpu")
    return Config(tiny_model, **{**base, **kw})


@pytest.fixture(scope="module")
def runner(tiny_model):
    r = ModelRunner(config(tiny_model))
    yield r
    r.release()


@pytest.fixture
def external_group(tmp_path):
    """A process group this test made (not a runner): world of one rank, gloo, meeting in a file
    (a free port could be taken by another process before the group binds it)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", world_size=1, rank=0)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def decode(runner, prompts, params, steps, chunk=None):
    """Drive the runner like a scheduler: prefill (in chunks of `chunk` tokens), then decode.
    Blocks are assigned by hand, contiguous per sequence. Returns the completions."""
    per = -(-(max(map(len, prompts)) + steps) // runner.block_size)
    seqs = [Sequence(p, sp, block_size=runner.block_size) for p, sp in zip(prompts, params)]
    for i, s in enumerate(seqs):
        s.block_table = list(range(i * per, (i + 1) * per))
    while any(s.num_completion_tokens < steps for s in seqs):
        prefill = any(s.num_cached_tokens < len(s) - 1 or s.num_cached_tokens == 0 for s in seqs)
        for s in seqs:
            left = len(s) - s.num_cached_tokens
            s.num_scheduled_tokens = min(left, chunk or left) if prefill else 1
        tokens = runner.execute(prepare_batch(seqs, prefill, runner.block_size))
        assert isinstance(tokens, list) and len(tokens) == len(seqs)
        assert all(isinstance(t, int) for t in tokens)
        for s, t in zip(seqs, tokens):
            s.num_cached_tokens += s.num_scheduled_tokens
            if s.num_cached_tokens == len(s):  # a chunk that ends the prompt: its token counts
                s.append_token(t)
    return seqs


@pytest.mark.tasks("7.9", "7.10", "7.17", "7.18", "7.19")
def test_execute_returns_one_token_per_sequence_matching_transformers(runner, hf_model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 10000, (n,), generator=g).tolist() for n in (5, 37)]
    greedy = [SamplingParams(temperature=0, max_tokens=10)] * 2
    for chunk in (None, 16):  # one prefill step, or prefill in 16-token chunks
        seqs = decode(runner, prompts, greedy, 10, chunk)
        for s, p in zip(seqs, prompts):
            got = s.completion_token_ids  # (with chunks, the short prompt runs ahead a little)
            assert len(got) >= 10 and got == hf_greedy(hf_model, p, len(got)), f"chunk={chunk}"


@pytest.mark.tasks("7.10", "7.5", "7.30")
def test_seeded_tokens_ignore_chunking_and_neighbours_and_no_generator_is_attached(runner):
    g = torch.Generator().manual_seed(1)
    p, other = (torch.randint(0, 10000, (n,), generator=g).tolist() for n in (40, 9))
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=8)
    alone = decode(runner, [p], [sp], 8)
    chunked = decode(runner, [other, p], [SamplingParams(max_tokens=8), sp], 8, chunk=16)
    assert alone[0].completion_token_ids == chunked[1].completion_token_ids
    assert not any(hasattr(s, "generator") for s in alone + chunked), "no generator on Sequence"


@pytest.mark.tasks("7.6", "7.7")
def test_min_tokens_through_the_runner(runner, hf_model):
    p = torch.randint(0, 10000, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.inference_mode():
        top2 = hf_model(torch.tensor([p])).logits[0, -1].topk(2).indices.tolist()
    sp = SamplingParams(temperature=0, min_tokens=1, max_tokens=4, stop_token_ids=[top2[0]])
    assert decode(runner, [p], [sp], 1)[0].completion_token_ids == [top2[1]]


@pytest.mark.tasks("7.15", "7.22")
def test_kv_sizing_on_the_cpu_follows_the_budget_and_the_cap(tiny_model):
    raw = json.loads((Path(tiny_model) / "config.json").read_text())
    block = 2 * raw["num_hidden_layers"] * BS * raw["num_key_value_heads"] * raw["head_dim"] * 4  # float32
    r = ModelRunner(config(tiny_model, cpu_kvcache_bytes=20 * block + 5))
    assert r.block_bytes() == block and r.num_kvcache_blocks == 20  # the budget decides
    assert r.kv_cache.shape[2] == 20 and "20 blocks" in r.memory_budget
    r.release()
    r = ModelRunner(config(tiny_model))  # 1 GiB: the cap of max_num_seqs full sequences decides
    assert r.num_kvcache_blocks == 4 * (128 // BS)
    r.release()
    with pytest.raises(ValueError, match="cannot hold one sequence of max_model_len=128"):
        ModelRunner(config(tiny_model, num_kvcache_blocks=7))


@pytest.mark.tasks("7.20", "7.21")
def test_warmup_runs_the_configured_backend_on_a_paged_cache(tiny_model):
    """Issue 12 item 7: the warm-up used to run a cache-less PyTorch path whatever the backend."""
    runner = ModelRunner(config(tiny_model))  # its own: the warm-up replaces the KV cache
    seen = []

    def look(module, args):
        ctx = get_context()
        seen.append((module.backend, module.k_cache.numel() > 0, ctx.block_tables is not None, ctx.is_prefill))

    hooks = [layer.self_attn.attn.register_forward_pre_hook(look) for layer in runner.model.model.layers]
    try:
        runner._warmup()
    finally:
        for h in hooks:
            h.remove()
    assert seen and all(s == (runner.config.attention_backend, True, True, True) for s in seen), seen
    assert runner.kv_cache.shape[2] == 0  # the scratch cache is given back
    runner.release()


@pytest.mark.tasks("7.21", "7.30")
def test_a_decode_after_the_warmup_stages_its_own_table_not_a_scratch_one(tiny_model):
    """Found on an H100 (chapter 8, 2026-12-07): the graph capture's stand-in decode (sequence id
    -1, table [0]) found the row the warm-up's sequence -1 had left, with that sequence's table of
    scratch blocks, and wrote its key and value far past the end of a 16-block cache."""
    runner = ModelRunner(config(tiny_model, num_kvcache_blocks=8, max_model_len=64, max_num_batched_tokens=256))
    try:
        scratch = runner._largest_step()
        assert -1 in scratch.seq_ids and scratch.block_tables[-1][0] >= 8  # the case that faulted
        runner._set_kv_cache(0)
        runner._warmup()
        runner._set_kv_cache(8)
        dummy = StepBatch(False, [0], [0], [], [0, 1], [], [[0]], [SamplingParams()], [0], [-1])
        runner._stage(dummy, 1)
        runner._decode_slots(1)
        staged = runner.buffers.dev
        assert staged["block_tables"][0, 0].item() == 0  # the stand-in's own table
        assert staged["slot_mapping"][0].item() == 0  # its position 0 in block 0: inside the cache
    finally:
        runner.release()


@pytest.mark.tasks("7.11")
def test_tp_runner_refuses_when_torch_distributed_is_initialized(tiny_model, external_group):
    with pytest.raises(RuntimeError, match="One tensor-parallel engine per process"):
        ModelRunner(config(tiny_model, tensor_parallel_size=2), 0, free_port())
    assert dist.is_initialized(), "the refusal must leave the other group alone"


@pytest.mark.tasks("7.12")
def test_release_leaves_a_group_it_did_not_create(tiny_model, external_group):
    r = ModelRunner(config(tiny_model))
    r.release()
    assert dist.is_initialized()


def _protocol(cfg) -> list:
    ours, theirs = mp.Pipe()
    t = threading.Thread(target=run_worker, args=(cfg, 0, None, theirs))
    t.start()
    got = [ours.recv()]
    if got[0][0] == "ready":
        s = Sequence(list(range(1, 20)), block_size=BS)
        s.block_table, s.num_scheduled_tokens = [0, 1], len(s)
        ours.send(prepare_batch([s], True, BS))
        ours.send(None)
    t.join(60)
    assert not t.is_alive(), "the worker loop must end on None"
    return got


@pytest.mark.tasks("7.25")
def test_run_worker_protocol(tiny_model):
    assert _protocol(config(tiny_model)) == [("ready", None)]
    (kind, text), = _protocol(config(tiny_model, num_kvcache_blocks=2))
    assert kind == "error" and "ValueError" in text and "max_model_len" in text


@pytest.mark.tasks("7.11", "7.25")
def test_tensor_parallel_worker_matches_one_rank(tiny_model, hf_model):
    """TP=2 on gloo: rank 1 in a spawned process running run_worker, rank 0 here. Same greedy tokens
    as transformers; rank 0's release destroys the group it created, and only that."""
    cfg = config(tiny_model, tensor_parallel_size=2)
    port = free_port()
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    worker = ctx.Process(target=run_worker, args=(cfg, 1, port, theirs), daemon=True)
    worker.start()
    try:
        r0 = ModelRunner(cfg, 0, port)
        assert ours.poll(120) and ours.recv() == ("ready", None)
        p = torch.randint(0, 10000, (21,), generator=torch.Generator().manual_seed(4)).tolist()
        seq = Sequence(p, SamplingParams(temperature=0), block_size=BS)
        seq.block_table = [0, 1, 2]
        out = []
        for step in range(6):
            seq.num_scheduled_tokens = len(seq) - seq.num_cached_tokens
            batch = prepare_batch([seq], step == 0, BS)
            ours.send(batch)
            tokens = r0.execute(batch)
            seq.num_cached_tokens = len(seq)
            seq.append_token(tokens[0])
            out.append(tokens[0])
        assert out == hf_greedy(hf_model, p, 6)
        ours.send(None)
        worker.join(60)
        assert worker.exitcode == 0
        r0.release()
        assert not dist.is_initialized(), "rank 0 must destroy the group it created"
    finally:
        if worker.is_alive():
            worker.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.tasks("7.10")
def test_step_batch_carries_what_the_sampler_needs():
    s = Sequence([1, 2, 3], SamplingParams(min_tokens=2, seed=5), block_size=BS)
    s.block_table, s.num_cached_tokens, s.num_scheduled_tokens = [4], 0, 3
    b = prepare_batch([s], True, BS)
    assert isinstance(b, StepBatch) and b.params[0].seed == 5 and b.num_generated == [0]
    assert b.slot_mapping == [64, 65, 66] and b.positions == [0, 1, 2] and b.cu_seqlens_q == [0, 3]
    s.append_token(9)
    s.append_token(8)
    s.num_cached_tokens, s.num_scheduled_tokens = 4, 1
    b = prepare_batch([s], False, BS)
    assert b.num_generated == [2] and b.positions == [4] and b.input_ids == [8]
    assert b.slot_mapping == b.context_lens == []  # a decode step's are computed on the device


@pytest.mark.tasks("7.9", "7.10")
def test_a_decode_batch_is_each_sequences_newest_token_at_its_slot():
    """prepare_batch's decode lists, and decode_slots' slots and context lengths on a padded step,
    against the general (prefill) path and the slot formula by hand, for positions on both sides
    of block boundaries and scattered block tables."""
    import random

    from cleanvllm.input_batch import decode_slots

    rng, seqs = random.Random(3), []
    for n in [1, 2, BS - 1, BS, BS + 1, 2 * BS, 2 * BS + 1, 37, 100]:
        s = Sequence([rng.randint(0, 999) for _ in range(n)], SamplingParams(seed=n), block_size=BS)
        for _ in range(n % 3):
            s.append_token(rng.randint(0, 999))
        s.block_table = rng.sample(range(50), -(-len(s) // BS))
        s.num_cached_tokens, s.num_scheduled_tokens = len(s) - 1, 1
        seqs.append(s)
    dec, general = prepare_batch(seqs, False, BS), prepare_batch(seqs, True, BS)
    assert not dec.is_prefill and general.is_prefill
    for field in ["input_ids", "positions", "cu_seqlens_q", "block_tables", "params", "num_generated"]:
        assert getattr(dec, field) == getattr(general, field), field
    assert dec.input_ids == [s.token_ids[-1] for s in seqs] and dec.num_seqs == len(seqs)
    assert dec.cu_seqlens_q == list(range(len(seqs) + 1)) and dec.max_seqlen_q == 1
    assert dec.num_generated == [len(s) - s.num_prompt_tokens for s in seqs]
    pad, width = 3, max(len(s.block_table) for s in seqs)
    tables = torch.full((len(seqs) + pad, width), 7)  # padding rows: stale blocks, position 0
    for i, s in enumerate(seqs):
        tables[i, : len(s.block_table)] = torch.tensor(s.block_table)
    slots, ctx = decode_slots(torch.tensor(dec.positions + [0] * pad), tables, torch.tensor([len(seqs)]), BS)
    by_hand = [s.block_table[(len(s) - 1) // BS] * BS + (len(s) - 1) % BS for s in seqs]
    assert slots.tolist() == by_hand + [-1] * pad and by_hand == general.slot_mapping
    assert ctx.tolist() == [len(s) for s in seqs] + [1] * pad == general.context_lens + [1] * pad


@pytest.mark.tasks("7.17", "7.30")
def test_the_persistent_batch_gives_every_sequence_its_whole_table():
    """Random steps of sequences that join, grow a block, leave, come back or are prefilled again
    (a new table): the rows a step gets always hold exactly the tables it was given, though a
    decode step writes only new blocks, and two sequences of a step never share a row."""
    import random
    from types import SimpleNamespace

    from cleanvllm.input_batch import InputBatch

    rng, pb, tables = random.Random(0), InputBatch(rows=4, width=8), {}
    for _ in range(400):
        prefill = rng.random() < 0.3 or not tables
        pool = range(10) if prefill else list(tables)
        ids = rng.sample(pool, min(len(pool), rng.randint(1, 4)))
        for i in ids:
            if prefill:
                tables[i] = [rng.randrange(100) for _ in range(rng.randint(1, 6))]
            elif len(tables[i]) < 8 and rng.random() < 0.3:
                tables[i] = tables[i] + [rng.randrange(100)]  # a decode step opened a block
        batch = SimpleNamespace(is_prefill=prefill, seq_ids=ids, block_tables=[tables[i] for i in ids],
                                params=[SamplingParams(temperature=i / 10) for i in ids])
        rows = pb.rows(batch)
        assert len(set(rows)) == len(rows), rows
        for r, i in zip(rows, ids):
            assert pb.block_tables[r, : len(tables[i])].tolist() == tables[i], (i, r)
            assert abs(pb.temperatures[r] - i / 10) < 1e-6
