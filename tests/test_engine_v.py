"""vLLM's interface through the engine (issue 23): RequestOutput/CompletionOutput, logprobs against
transformers in float64, penalties and logit bias against a hand loop over transformers' logits,
stop_reason, include_stop_str_in_output, skip_special_tokens, and the requests refused up front."""

import copy

import pytest
import torch

from cleanvllm.llm import LLM
from cleanvllm.outputs import CompletionOutput, RequestOutput
from cleanvllm.sampling_params import SamplingParams
from conftest import hf_greedy, prompts

CHAPTERS = ("08",)  # `make check CH=08` runs this file (tools/check.py)


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model, device="cpu", dtype="float32", kvcache_block_size=16, max_model_len=256,
             max_num_seqs=8) as engine:
        yield engine


@pytest.fixture(scope="module")
def hf64(hf_model):
    return copy.deepcopy(hf_model).double()


def ref_logprobs(hf64, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """float64 log-softmax of transformers' logits at each position that produced a completion token."""
    with torch.no_grad():
        logits = hf64(torch.tensor([prompt + completion])).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1 : -1], -1)


@pytest.mark.tasks("8.9", "8.24")
def test_the_usual_vllm_line_works(llm):
    outs = llm.generate(["Hello", [5, 6, 7]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert all(isinstance(o, RequestOutput) and isinstance(o.outputs[0], CompletionOutput) for o in outs)
    assert isinstance(outs[0].outputs[0].text, str) and len(outs[1].outputs[0].token_ids) <= 3
    assert [len(o.outputs) for o in outs] == [1, 1] and [o.outputs[0].index for o in outs] == [0, 0]
    assert all(isinstance(o.request_id, str) for o in outs) and outs[0].request_id != outs[1].request_id
    assert outs[1].prompt is None and outs[1].prompt_token_ids == [5, 6, 7] and outs[1].prompt_logprobs is None
    c = outs[1].outputs[0]
    assert c.logprobs is None and c.cumulative_logprob is None  # not asked for
    m = outs[1].metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time and m.num_preemptions == 0


@pytest.mark.tasks("8.4", "8.5", "8.22")
def test_add_request_returns_a_string_id_that_step_and_abort_use(llm):
    rid = llm.add_request([3, 4, 5], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    assert isinstance(rid, str) and rid in llm.requests
    first = llm.step()
    assert [o.request_id for o in first] == [rid]
    llm.abort_request(rid)
    assert not llm.has_unfinished_requests() or llm.step() == []
    with pytest.raises(ValueError, match="string"):
        llm.abort_request(int(rid))


@pytest.mark.tasks("8.13", "8.14")
def test_logprobs_are_transformers_float64_log_softmax_of_the_raw_logits(llm, hf64):
    ps = prompts([6, 11], seed=21)
    # temperature, a penalty and a bias change the draw, never the logprobs (raw model output)
    sp = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True, logprobs=3,
                        repetition_penalty=1.3, logit_bias={7: 2.0})
    outs = llm.generate(ps, sp, use_tqdm=False)
    for p, o in zip(ps, outs):
        c = o.outputs[0]
        ref = ref_logprobs(hf64, p, c.token_ids)
        assert len(c.logprobs) == len(c.token_ids) == 6
        for t, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
            vals, ids = ref[t].topk(3)
            assert set(lp) == set(ids.tolist()) | {tok}
            for rank, (i, v) in enumerate(zip(ids.tolist(), vals.tolist()), start=1):
                assert lp[i].rank == rank and abs(lp[i].logprob - v) < 1e-4, (t, i, lp[i], v)
                assert lp[i].decoded_token == llm.tokenizer.decode([i])
            assert abs(lp[tok].logprob - ref[t, tok].item()) < 1e-4
            # the rank counts tokens at least as likely; float32 vs float64 may swap near-ties
            v = ref[t, tok].item()
            assert int((ref[t] > v + 1e-4).sum()) < lp[tok].rank <= int((ref[t] >= v - 1e-4).sum())
        want = sum(ref[t, tok].item() for t, tok in enumerate(c.token_ids))
        assert abs(c.cumulative_logprob - want) < 1e-3


@pytest.mark.tasks("8.13", "8.14")
def test_logprobs_zero_gives_the_sampled_token_only(llm, hf64):
    p = prompts([9], seed=2)[0]
    c = llm.generate([p], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0),
                     use_tqdm=False)[0].outputs[0]
    assert [list(d) for d in c.logprobs] == [[t] for t in c.token_ids]
    assert [d[t].rank for d, t in zip(c.logprobs, c.token_ids)] == [1, 1, 1, 1]  # greedy: the best


def penalized_greedy(hf64, prompt: list[int], sp: SamplingParams, n: int) -> list[int]:
    """Greedy decoding with vLLM's bias and penalties applied by hand to transformers' float64 logits."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf64(torch.tensor([prompt + out])).logits[0, -1].tolist()
        best, best_x = None, None
        for tok, x in enumerate(logits):
            x += (sp.logit_bias or {}).get(tok, 0.0)
            if tok in prompt or tok in out:
                x = x / sp.repetition_penalty if x > 0 else x * sp.repetition_penalty
            c = out.count(tok)
            x -= sp.frequency_penalty * c + sp.presence_penalty * (c > 0)
            if best_x is None or x > best_x:
                best, best_x = tok, x
        out.append(best)
    return out


@pytest.mark.tasks("8.13", "8.19")
def test_penalties_and_bias_through_the_engine_match_a_hand_loop(llm, hf64, hf_model):
    ps = prompts([5, 9, 4], seed=8)
    favourite = hf_greedy(hf_model, ps[2], 1)[0]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.8),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, frequency_penalty=1.5,
                             presence_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logit_bias={favourite: -100})]
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    # beside plain requests, with the engine's overlapped loop (async_scheduling) on
    outs = llm.generate(ps + ps, params + [plain] * 3, use_tqdm=False)
    for p, sp, o in zip(ps, params, outs[:3]):
        assert o.outputs[0].token_ids == penalized_greedy(hf64, p, sp, 10), sp
    for p, o in zip(ps, outs[3:]):
        assert o.outputs[0].token_ids == hf_greedy(hf_model, p, 10)
    assert favourite not in outs[2].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids != outs[3].outputs[0].token_ids  # the penalty changed something


@pytest.mark.tasks("8.9", "8.10", "8.11")
def test_stop_reason_and_include_stop_str_in_output(llm, hf_model):
    p = prompts([12], seed=3)[0]
    ref = hf_greedy(hf_model, p, 24)
    full = llm.tokenizer.decode(ref, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    base = dict(temperature=0, max_tokens=24, ignore_eos=True)
    c = llm.generate([p], SamplingParams(**base, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", stop, full[: full.find(stop)])
    c = llm.generate([p], SamplingParams(**base, stop=[stop], include_stop_str_in_output=True),
                     use_tqdm=False)[0].outputs[0]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.text == full[: full.find(stop) + len(stop)]
    tok = ref[7]
    c = llm.generate([p], SamplingParams(**base, stop_token_ids=[tok]), use_tqdm=False)[0].outputs[0]
    k = ref.index(tok)
    assert (c.finish_reason, c.stop_reason, c.token_ids) == ("stop", tok, ref[: k + 1])
    # vLLM leaves the stop token's text out, unless include_stop_str_in_output
    assert c.text == llm.tokenizer.decode(ref[:k], skip_special_tokens=True)
    c = llm.generate([p], SamplingParams(**base, stop_token_ids=[tok], include_stop_str_in_output=True),
                     use_tqdm=False)[0].outputs[0]
    assert c.text == llm.tokenizer.decode(ref[: k + 1], skip_special_tokens=True)
    c = llm.generate([p], SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    assert (c.finish_reason, c.stop_reason) == ("length", None)


@pytest.mark.tasks("8.6", "8.10")
def test_skip_special_tokens(llm):
    eos = llm.config.eos_token_ids[0]
    assert eos in llm.tokenizer.all_special_ids
    forced = dict(temperature=0, max_tokens=3, ignore_eos=True, logit_bias={eos: 100.0})
    kept = llm.generate([[5, 6]], SamplingParams(**forced, skip_special_tokens=False), use_tqdm=False)
    skipped = llm.generate([[5, 6]], SamplingParams(**forced), use_tqdm=False)
    assert kept[0].outputs[0].token_ids == skipped[0].outputs[0].token_ids == [eos] * 3
    special = llm.tokenizer.convert_ids_to_tokens(eos)
    assert kept[0].outputs[0].text == special * 3 and skipped[0].outputs[0].text == ""


@pytest.mark.tasks("8.9", "8.13")
def test_num_cached_tokens_counts_prefix_cache_hits(llm):
    p = prompts([40], seed=30)[0]
    sp = SamplingParams(temperature=0, max_tokens=2)
    first = llm.generate([p], sp, use_tqdm=False)[0]
    again = llm.generate([p], sp, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 32  # two full blocks of 16


@pytest.mark.tasks("8.2", "8.23")
@pytest.mark.parametrize("kw,match", [
    (dict(stop_token_ids=[10**6]), "stop_token_ids.*1000000"),
    (dict(logit_bias={10**6: 1.0}), "logit_bias.*1000000"),
])
def test_ids_outside_the_vocabulary_are_refused_up_front(llm, kw, match):
    before = len(llm.requests)
    with pytest.raises(ValueError, match=match):
        llm.generate([[1, 2], [3, 4]], [SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, **kw)],
                     use_tqdm=False)
    assert len(llm.requests) == before and not llm.has_unfinished_requests()
