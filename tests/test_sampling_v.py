"""vLLM's sampling fields (issue 23): penalties and logit bias against hand computations, logprobs
against transformers' logits in float64, every new field's bad values refused, and the plain path
(one fused pass, sampled inside the CUDA graph) kept for requests that use none of them."""

import copy
import math
import re

import numpy as np
import pytest
import torch

from cleanvllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from cleanvllm.sampler import apply_logit_bias, apply_penalties, compute_logprobs, is_plain, sample
from cleanvllm.sampling_params import MAX_LOGPROBS, SamplingParams

CHAPTERS = ("07",)  # `make check CH=07` runs this file (tools/check.py)


# ---- the reference: plain Python floats, one token at a time, from the definitions -------------
def penalized_by_hand(logits: list[float], sp: SamplingParams, prompt: list[int], completion: list[int]):
    """vLLM's order: logit bias, then repetition (prompt or completion), frequency and presence
    (completion only). Float64, a loop over the vocabulary."""
    out = []
    for t, x in enumerate(logits):
        x = float(x) + (sp.logit_bias or {}).get(t, 0.0)
        if t in prompt or t in completion:
            x = x / sp.repetition_penalty if x > 0 else x * sp.repetition_penalty
        c = completion.count(t)
        x -= sp.frequency_penalty * c + sp.presence_penalty * (c > 0)
        out.append(x)
    return out


CASES = [
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.7),
    SamplingParams(frequency_penalty=0.8),
    SamplingParams(presence_penalty=-1.5),
    SamplingParams(frequency_penalty=-0.3, presence_penalty=2.0, repetition_penalty=1.1),
    SamplingParams(logit_bias={3: 5.0, 0: -100.0}),
    SamplingParams(logit_bias={7: 2.5}, repetition_penalty=2.0, frequency_penalty=0.5),
    SamplingParams(),
]


@pytest.mark.tasks("7.7", "7.26", "7.27")
def test_penalties_and_bias_match_a_hand_computation_in_a_mixed_batch():
    g = torch.Generator().manual_seed(0)
    vocab = 12
    logits = torch.randn(len(CASES), vocab, generator=g) * 3
    logits[:, 5] = 0.0  # a zero logit: repetition leaves it at 0 either way
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (len(CASES),), generator=g)]
    completions = [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in torch.randint(0, 7, (len(CASES),), generator=g)]
    completions[0] = []  # nothing generated yet: repetition still sees the prompt
    tokens = [p + c for p, c in zip(prompts, completions)]
    generated = [len(c) for c in completions]
    got = apply_penalties(apply_logit_bias(logits, CASES), CASES, tokens, generated)
    want = [penalized_by_hand(row.tolist(), sp, p, c) for row, sp, p, c in zip(logits, CASES, prompts, completions)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[-1], logits[-1]), "a row without penalties or bias is untouched"


@pytest.mark.tasks("7.7", "7.27")
def test_penalties_leave_the_input_and_masked_tokens_alone():
    logits = torch.tensor([[1.0, -1.0, 2.0, float("-inf")]])
    before = logits.clone()
    sp = SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=1.0)
    out = apply_penalties(logits, [sp], [[0, 1, 3, 3]], [2])
    assert torch.equal(logits, before)
    assert out[0, 3] == float("-inf"), "a token masked by min_tokens stays masked"


@pytest.mark.tasks("7.7", "7.26", "7.27")
def test_greedy_follows_the_penalized_logits():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    sp = SamplingParams(temperature=0, repetition_penalty=2.0)  # token 0 in the prompt: 5 -> 2.5
    assert sample(logits, [sp], [0], token_ids=[[0]]).item() == 1
    sp = SamplingParams(temperature=0, frequency_penalty=2.0)  # token 0 generated twice: 5 -> 1
    assert sample(logits, [sp], [2], token_ids=[[3, 0, 0]]).item() == 1
    sp = SamplingParams(temperature=0, logit_bias={3: 6.0})
    assert sample(logits, [sp], [0]).item() == 3
    assert sample(logits, [SamplingParams(temperature=0)], [0], token_ids=[[0]]).item() == 0


@pytest.mark.tasks("7.7", "7.26", "7.27")
def test_sampled_distribution_uses_penalized_logits_before_temperature():
    logits = torch.tensor([1.0, 0.5, -0.5, 2.0, 0.0])
    sp = SamplingParams(temperature=0.7, repetition_penalty=1.8, presence_penalty=0.4, logit_bias={4: 1.0})
    prompt, completion = [0, 2], [3]
    z = np.array(penalized_by_hand(logits.tolist(), sp, prompt, completion)) / sp.temperature
    ref = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    n = 40_000
    draws = sample(logits.repeat(n, 1), [sp] * n, [1] * n, token_ids=[prompt + completion] * n)
    freq = np.bincount(draws.numpy(), minlength=5) / n
    assert np.all(np.abs(freq - ref) <= 5 * np.sqrt(ref * (1 - ref) / n)), (freq, ref)


def test_a_penalty_without_the_tokens_is_an_error():
    with pytest.raises(ValueError, match="token_ids"):
        sample(torch.zeros(1, 4), [SamplingParams(presence_penalty=1.0)], [0])


# ---- logprobs: raw model output, against transformers in float64 --------------------------------
@pytest.mark.tasks("7.28")
def test_logprobs_match_transformers_float64(hf_model):
    prompt = [[5, 17, 300, 2, 99, 1024, 7], [8, 8, 8, 400]]
    hf64 = copy.deepcopy(hf_model).double()
    for ids in prompt:
        x = torch.tensor([ids])
        with torch.no_grad():
            logits32 = hf_model(x).logits[0]  # [positions, vocab], float32: what the engine sees
            ref = torch.log_softmax(hf64(x).logits[0], -1)  # float64 all the way
        drawn = torch.tensor([int(r.argsort(descending=True)[i % 9]) for i, r in enumerate(ref)])
        top_ids, top, own, rank = compute_logprobs(logits32, drawn, 5)
        ref_top, ref_ids = ref.topk(5, -1)
        assert torch.equal(top_ids, ref_ids)
        torch.testing.assert_close(top.double(), ref_top, atol=1e-4, rtol=0)
        torch.testing.assert_close(own.double(), ref.gather(-1, drawn[:, None])[:, 0], atol=1e-4, rtol=0)
        want_rank = [(r >= r[t]).sum().item() for r, t in zip(ref, drawn)]
        assert rank.tolist() == want_rank == [i % 9 + 1 for i in range(len(ids))]


@pytest.mark.tasks("7.28")
def test_logprobs_are_of_the_raw_logits_in_float32_from_bfloat16():
    logits = (torch.randn(3, 1000, generator=torch.Generator().manual_seed(1)) * 8).bfloat16()
    ref = torch.log_softmax(logits.double(), -1)
    top_ids, top, own, rank = compute_logprobs(logits, ref.argmax(-1), 2)
    assert top.dtype == torch.float32
    torch.testing.assert_close(top.double(), ref.topk(2, -1).values, atol=1e-5, rtol=0)
    assert rank.tolist() == [1, 1, 1]


@pytest.mark.tasks("7.28")
def test_logprobs_zero_gives_only_the_sampled_token():
    top_ids, top, own, rank = compute_logprobs(torch.randn(2, 10), torch.tensor([3, 4]), 0)
    assert top_ids.shape == (2, 0) and own.shape == (2,) and rank.shape == (2,)


# ---- no cost when unused: which requests stay on the plain (fused, in-graph) path ---------------
@pytest.mark.parametrize("kw,plain", [
    (dict(), True), (dict(temperature=0), True), (dict(temperature=0.8, max_tokens=5), True),
    (dict(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0, logit_bias={}), True),
    (dict(skip_special_tokens=False, include_stop_str_in_output=True, stop=["x"]), True),
    (dict(logprobs=0), True), (dict(logprobs=5), True), (dict(repetition_penalty=1.1), False),
    (dict(presence_penalty=0.5), False), (dict(frequency_penalty=-0.5), False),
    (dict(logit_bias={1: 0.0}), False), (dict(top_k=0), True), (dict(top_k=3), False),
])
def test_plain_requests(kw, plain):
    sp = SamplingParams(**kw)
    assert is_plain(sp, 5) is plain and sp.simple is plain


# ---- SamplingParams: vLLM's names and defaults, every bad value refused ------------------------
def test_vllm_defaults():
    sp = SamplingParams()
    assert (sp.n, sp.best_of, sp.max_tokens, sp.logprobs, sp.prompt_logprobs) == (1, None, 16, None, None)
    assert (sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (sp.skip_special_tokens, sp.include_stop_str_in_output, sp.logit_bias) == (True, False, None)
    assert SamplingParams(n=1, best_of=1).best_of == 1 and SamplingParams(logprobs=MAX_LOGPROBS).logprobs == 20


def test_logit_bias_keys_from_json_become_ints():
    assert SamplingParams(logit_bias={"42": 3, 7: -100}).logit_bias == {42: 3.0, 7: -100.0}


BAD = [
    ("n", 0), ("n", True), ("n", 1.0), ("n", 129), ("best_of", 2), ("best_of", True), ("best_of", 0),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", True), ("logprobs", 2.0), ("logprobs", "5"),
    ("prompt_logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", True), ("prompt_logprobs", 2.0),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("repetition_penalty", math.nan), ("repetition_penalty", True), ("repetition_penalty", "1.2"),
    ("presence_penalty", 2.01), ("presence_penalty", -2.5), ("presence_penalty", math.nan), ("presence_penalty", False),
    ("frequency_penalty", 3), ("frequency_penalty", -math.inf), ("frequency_penalty", True),
    ("logit_bias", {5: 100.5}), ("logit_bias", {5: -101}), ("logit_bias", {-1: 1.0}), ("logit_bias", {"x": 1.0}),
    ("logit_bias", {True: 1.0}), ("logit_bias", {5: math.nan}), ("logit_bias", {5: True}), ("logit_bias", [(5, 1.0)]),
    ("logit_bias", {2.0: 1.0}), ("logit_bias", {i: 1.0 for i in range(1025)}),
    ("skip_special_tokens", 1), ("skip_special_tokens", None), ("include_stop_str_in_output", "yes"),
    ("top_k", -2),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r:.30}" for f, v in BAD])
def test_bad_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=" + re.escape(f"{value!r:.200}")):
        SamplingParams(**{field: value})


def test_unsupported_fields_say_so():
    with pytest.raises(ValueError, match="must be at most 128"):
        SamplingParams(n=129)
    with pytest.raises(ValueError, match="-1, the whole vocabulary at every prompt position, is not supported"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=1, best_of=4)


# ---- the output types ---------------------------------------------------------------------------
def test_output_shape_is_vllms():
    lp = [{7: Logprob(-0.1, 1, "a")}, {9: Logprob(-2.0, 3, "b"), 4: Logprob(-0.5, 1, "c")}]
    c = CompletionOutput(0, "ab", [7, 9], -2.1, lp, "length", None)
    out = [RequestOutput("req-1", "p", [1, 2], None, [c], True, 0, RequestMetrics(num_preemptions=2))]
    assert out[0].outputs[0].text == "ab" and out[0].outputs[0].token_ids == [7, 9]
    assert out[0].outputs[0].finished() and not CompletionOutput(0, "", []).finished()
    assert out[0].metrics.num_preemptions == 2 and out[0].metrics.arrival_time > 0
    assert [f for f in CompletionOutput.__dataclass_fields__] == [
        "index", "text", "token_ids", "cumulative_logprob", "logprobs", "finish_reason", "stop_reason"]
    assert [f for f in RequestOutput.__dataclass_fields__] == [
        "request_id", "prompt", "prompt_token_ids", "prompt_logprobs", "outputs", "finished",
        "num_cached_tokens", "metrics"]


def test_simple_is_kept_but_follows_a_changed_field():
    sp = SamplingParams(temperature=0.7)
    assert sp.simple and is_plain(sp, 0)
    for field, value in [("presence_penalty", 0.5), ("logit_bias", {3: 1.0}), ("top_p", 0.9)]:
        sp = SamplingParams(temperature=0.7)
        assert sp.simple
        setattr(sp, field, value)
        assert not sp.simple and not is_plain(sp, 0), field
    import copy as _copy
    sp = SamplingParams(temperature=0.7)
    assert sp.simple and _copy.copy(sp).simple and not _copy.copy(SamplingParams(seed=1)).simple
