"""The engine end to end on the tiny checkpoint (CPU), against Hugging Face transformers."""
import multiprocessing as mp
import os

import pytest
import torch

from cleanvllm.engine import LLM
from cleanvllm.sampling_params import SamplingParams
from conftest import hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 10000, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model, device="cpu", kvcache_block_size=16, max_num_seqs=16, max_model_len=512) as engine:
        yield engine


def test_greedy_matches_transformers(llm, hf_model):
    ps = prompts([1, 5, 17, 33, 64, 100])
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf_model, p, 32)
        assert o.finish_reason == "length" and o.prompt_token_ids == p
    assert llm.block_manager.num_free_blocks == llm.runner.num_kvcache_blocks


def test_prefix_cache_hits_keep_outputs(llm, hf_model):
    shared = prompts([48])[0]  # three full blocks of 16
    ps = [shared + tail for tail in prompts([5, 20, 1], seed=1)] + [shared]
    llm.generate([shared + [7]], GREEDY, use_tqdm=False)  # fill the prefix cache
    seqs = []
    for p in ps:
        rid = llm.add_request(p, GREEDY)
        seqs.append(llm.requests[rid][0])
    outs = {}
    cached = {}
    while not llm.is_finished():
        for s in seqs:
            if s.seq_id not in cached and s.block_table:
                cached[s.seq_id] = s.num_cached_tokens
        for o in llm.step()[0]:
            outs[o.request_id] = o
    assert all(c >= 32 for c in cached.values())  # the shared blocks were hits
    for s, p in zip(seqs, ps):
        assert outs[s.seq_id].token_ids == hf_greedy(hf_model, p, 32)


def test_preemption_and_chunking_keep_outputs(tiny_model, hf_model):
    ps = prompts([30, 70, 12, 90, 45, 60, 8, 100])
    with LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=160, num_kvcache_blocks=12,
             max_num_batched_tokens=64) as small:
        outs = small.generate(ps, GREEDY, use_tqdm=False)
        assert small.scheduler.num_preemptions > 0
        assert small.block_manager.num_free_blocks == 12
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf_model, p, 32)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    p = prompts([10])[0]
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([p], sp, use_tqdm=False)[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    mixed = llm.generate(prompts([7, 30], seed=5) + [p], [others, others, sp], use_tqdm=False)[2].token_ids
    assert alone == mixed
    other_seed = llm.generate([p], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20,
                                                 ignore_eos=True), use_tqdm=False)[0].token_ids
    assert other_seed != alone


def test_stop_token_ids_and_min_tokens(llm, hf_model):
    p = prompts([12], seed=3)[0]
    ref = hf_greedy(hf_model, p, 32)
    stop_tok = ref[5]
    first = ref.index(stop_tok)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[stop_tok]),
                       use_tqdm=False)[0]
    assert out.token_ids == ref[:first + 1] and out.finish_reason == "stop"
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=32, min_tokens=first + 1,
                                           stop_token_ids=[stop_tok]), use_tqdm=False)[0]
    later = [i for i, t in enumerate(ref) if t == stop_tok and i >= first + 1]
    assert out.token_ids == (ref[:later[0] + 1] if later else ref)


def test_stop_strings_end_text_before_the_stop(llm, hf_model):
    p = prompts([9], seed=4)[0]
    ref = hf_greedy(hf_model, p, 32)
    full = llm.tokenizer.decode(ref, skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=32, stop=stop), use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.find(stop)]
    assert out.token_ids == ref[: len(out.token_ids)] and len(out.token_ids) < 32


def test_string_prompts_and_chat(llm):
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=4), use_tqdm=False)
    assert [o.prompt for o in outs] == ["Hello", "The capital of France is"]
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("Hello")
    chat = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=3), enable_thinking=False,
                    use_tqdm=False)
    tmpl = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
    assert chat[0].prompt == tmpl and "<think>" in tmpl  # Qwen3 writes an empty think block when off


def _children():
    return [p for p in mp.active_children()]


def test_tensor_parallel_2_on_gloo_matches_tp1(tiny_model, hf_model):
    ps = prompts([7, 25, 40])
    with LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=256, tensor_parallel_size=2) as tp:
        assert len(tp.workers) == 1 and tp.workers[0].is_alive()
        outs = tp.generate(ps, GREEDY, use_tqdm=False)
        worker = tp.workers[0]
    assert not worker.is_alive()
    assert not torch.distributed.is_initialized()
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf_model, p, 32)
    # a second TP engine in the same process, with a fresh rendezvous port
    with LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=256, tensor_parallel_size=2) as tp2:
        assert tp2.generate(ps[:1], GREEDY, use_tqdm=False)[0].token_ids == outs[0].token_ids
    assert not _children()
    assert not [f for f in os.listdir("/dev/shm") if "cleanvllm" in f] if os.path.isdir("/dev/shm") else True
