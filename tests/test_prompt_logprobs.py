"""prompt_logprobs (vLLM's SamplingParams field) through the engine, against transformers' float64
log-softmax on the CPU: whole prompts, chunked prefills, a prompt whose prefix is in the prefix cache
(such a request does not read it), and bad values refused up front."""

import copy
import re

import pytest
import torch

from cleanvllm.llm import LLM
from cleanvllm.sampling_params import MAX_LOGPROBS, SamplingParams

CHAPTERS = ("08",)  # `make check CH=08` runs this file (tools/check.py)

G = torch.Generator().manual_seed(23)
PROMPTS = [torch.randint(0, 10000, (n,), generator=G).tolist() for n in (1, 7, 40, 70)]


@pytest.fixture(scope="module")
def hf64(hf_model):
    return copy.deepcopy(hf_model).double()


def engine(tiny_model, **kw) -> LLM:
    settings = dict(device="cpu", dtype="float32", kvcache_block_size=16, max_model_len=256, max_num_seqs=8)
    return LLM(tiny_model, **{**settings, **kw})


def reference(hf64, prompt: list[int]) -> torch.Tensor:
    """log P(. | prompt[:i+1]) for i = 0 .. len - 2, in float64: row i predicts prompt[i + 1]."""
    with torch.no_grad():
        logits = hf64(torch.tensor([prompt])).logits[0, :-1]
    return torch.log_softmax(logits, -1)


def assert_matches(out, hf64, k: int, atol: float = 1e-4) -> None:
    """vLLM's shape: None, then per prompt token {its id and the top k: Logprob}; values as float64."""
    prompt, plp = out.prompt_token_ids, out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    ref = reference(hf64, prompt)
    for i, (entry, t) in enumerate(zip(plp[1:], prompt[1:])):
        row = ref[i]
        top = row.topk(k)
        want_ids = {t, *top.indices.tolist()}
        assert set(entry) == want_ids, (i, sorted(entry), sorted(want_ids))
        assert abs(entry[t].logprob - row[t].item()) < atol, (i, entry[t], row[t].item())
        # the rank counts the tokens at least as likely; float32 may order near-ties differently
        lo, hi = int((row > row[t] + atol).sum()) + 1, int((row >= row[t] - atol).sum())
        assert lo <= entry[t].rank <= hi, (i, entry[t], lo, hi)
        for r, (tok, v) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
            if tok != t:  # the prompt token keeps its own rank when it is among the top k
                assert entry[tok].rank == r + 1 and abs(entry[tok].logprob - v) < atol, (i, tok, entry[tok])
        assert all(isinstance(x.decoded_token, str) for x in entry.values())


@pytest.mark.tasks("8.33", "8.9", "7.19", "7.29")
def test_prompt_logprobs_match_transformers_float64(tiny_model, hf64):
    with engine(tiny_model) as llm:
        params = [SamplingParams(max_tokens=2, prompt_logprobs=k) for k in (0, 3, 5, 1)]
        params.append(SamplingParams(max_tokens=2))  # a request that does not ask, in the same batch
        outs = llm.generate(PROMPTS + [PROMPTS[2]], params, use_tqdm=False)
    assert outs[0].prompt_logprobs == [None], "a one-token prompt: nothing predicts its token"
    for out, k in zip(outs[1:4], (3, 5, 1)):
        assert_matches(out, hf64, k)
    assert outs[4].prompt_logprobs is None, "not asked for: None, as vLLM"
    assert [list(d) for d in outs[1].prompt_logprobs[1:]] != [], "k=3 entries"


@pytest.mark.tasks("8.33")
def test_prompt_logprobs_zero_gives_the_prompt_token_alone(tiny_model, hf64):
    with engine(tiny_model) as llm:
        (out,) = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    assert [list(d) for d in out.prompt_logprobs[1:]] == [[t] for t in PROMPTS[1][1:]]
    assert_matches(out, hf64, 0)


@pytest.mark.tasks("8.33", "8.15", "8.18")
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlapped"])
def test_chunked_prefill_accumulates_each_chunks_logprobs(tiny_model, hf64, overlap):
    """max_num_batched_tokens=24: the 70-token prompt runs in chunks of at most 24 tokens (some
    shared with the other prompts), and every chunk adds its positions' entries."""
    with engine(tiny_model, max_num_batched_tokens=24, async_scheduling=overlap) as llm:
        outs = llm.generate(PROMPTS[1:], SamplingParams(max_tokens=3, prompt_logprobs=2, temperature=0),
                            use_tqdm=False)
    for out in outs:
        assert_matches(out, hf64, 2)


@pytest.mark.tasks("8.33")
def test_a_request_asking_prompt_logprobs_does_not_read_the_prefix_cache(tiny_model, hf64):
    """The 70-token prompt is computed once (its 4 full blocks cached); the same prompt, and one that
    shares its first 48 tokens, then ask for prompt logprobs: they read no cached block (cached
    positions have no logits here), and their logprobs are the model's. A request that does not
    ask still reads the cache."""
    shared = PROMPTS[3][:48] + PROMPTS[2][:10]
    with engine(tiny_model) as llm:
        llm.generate([PROMPTS[3]], SamplingParams(max_tokens=1), use_tqdm=False)
        asked = llm.generate([PROMPTS[3], shared], SamplingParams(max_tokens=1, prompt_logprobs=1),
                             use_tqdm=False)
        plain = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert [o.num_cached_tokens for o in asked] == [0, 0]
    assert plain.num_cached_tokens == 64, "without prompt_logprobs the prefix cache is read"
    for out in asked:
        assert_matches(out, hf64, 1)


@pytest.mark.tasks("8.33", "8.21")
def test_a_preempted_request_keeps_one_entry_per_prompt_token(tiny_model, hf64):
    """A KV pool too small for all: requests are preempted and recomputed; each prompt token still
    has exactly one entry, equal to transformers'."""
    with engine(tiny_model, num_kvcache_blocks=12, max_model_len=160) as llm:
        outs = llm.generate([PROMPTS[3], PROMPTS[2], PROMPTS[3][::-1]],
                            SamplingParams(max_tokens=60, ignore_eos=True, prompt_logprobs=2, temperature=0),
                            use_tqdm=False)
        assert sum(o.metrics.num_preemptions for o in outs) > 0, "the test needs a preemption"
    for out in outs:
        assert_matches(out, hf64, 2)


BAD = [-1, -2, MAX_LOGPROBS + 1, True, 1.0, "5"]


@pytest.mark.parametrize("value", BAD, ids=[repr(v) for v in BAD])
def test_bad_prompt_logprobs_are_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"SamplingParams\.prompt_logprobs=" + re.escape(repr(value))):
        SamplingParams(prompt_logprobs=value)


def test_minus_one_says_it_is_not_supported():
    with pytest.raises(ValueError, match="whole vocabulary.*not supported"):
        SamplingParams(prompt_logprobs=-1)
    assert SamplingParams(prompt_logprobs=MAX_LOGPROBS).prompt_logprobs == MAX_LOGPROBS


@pytest.mark.tasks("7.19", "7.29")
def test_prompt_logits_computed_a_few_rows_at_a_time_join_up(tiny_model, hf64, monkeypatch):
    """The runner computes prompt logits PROMPT_LOGITS_ROWS positions at a time: at 16, two prompts
    of 40 and 70 tokens span several pieces, one of them across the two prompts."""
    import cleanvllm.model_runner as mr

    monkeypatch.setattr(mr, "PROMPT_LOGITS_ROWS", 16)
    with engine(tiny_model) as llm:
        outs = llm.generate(PROMPTS[2:], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)
    for out in outs:
        assert_matches(out, hf64, 2)


@pytest.mark.tasks("8.33")
def test_a_cached_prefix_read_anyway_is_an_error_not_a_silent_gap(tiny_model):
    """Without PromptLogprobBlocks' exception the request would start at the cached positions, whose
    logits do not exist: the engine says so rather than return a shorter list."""
    from cleanvllm.block_manager import BlockManager

    with engine(tiny_model) as llm:
        llm.generate([PROMPTS[3]], SamplingParams(max_tokens=1), use_tqdm=False)
        llm.scheduler.block_manager.__class__ = BlockManager  # chapter 3's, which reads the cache
        with pytest.raises(RuntimeError, match=r"no prompt logprobs for tokens 1-64"):
            llm.generate([PROMPTS[3]], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
