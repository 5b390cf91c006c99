"""`echo` with `logprobs` on /v1/completions (the prompt's logprobs, from the engine's prompt_logprobs),
and `max_tokens: 0` with echo, checked against transformers' float64 log-softmax of the tiny
checkpoint. The first test sends exactly what lm-evaluation-harness's `local-completions` sends for
a loglikelihood (multiple-choice) request and reads the reply exactly as it does (its
`_create_payload(generate=False)` and `parse_logprobs`): a batch of token-id prompts, context +
continuation, `echo: true, max_tokens: 1, logprobs: 1, temperature: 0, seed: 1234`, the answer's score
`sum(token_logprobs[ctxlen:-1])` and `is_greedy` from `top_logprobs`."""

import copy
from operator import itemgetter

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from transformers import AutoTokenizer  # noqa: E402

from cleanvllm.llm import LLM  # noqa: E402
from cleanvllm.serve import AsyncEngine, ServerState  # noqa: E402
from conftest import prompts, server_in_thread  # noqa: E402

CHAPTERS = ("11",)  # `make check CH=11` runs this file (tools/check.py)

NAME = "tiny"
TOL = 1e-4  # the engine computes in float32, the reference in float64
CONTEXT = prompts([12], seed=8)[0]  # a "question"
CHOICES = prompts([1, 3, 5, 20], seed=9)  # its "answers": one token, a few, a long one past a block


@pytest.fixture(scope="module")
def server(tiny_model):
    llm = LLM(tiny_model, device="cpu", dtype="float32", kvcache_block_size=16, max_model_len=256,
              max_num_seqs=8)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    state = ServerState(AsyncEngine(llm), tok, NAME, 256)
    try:
        with server_in_thread(state) as url:
            yield url, tok
    finally:
        llm.close()


@pytest.fixture(scope="module")
def hf64(hf_model):
    return copy.deepcopy(hf_model).double()


def log_softmax64(hf64, ids: list[int]) -> torch.Tensor:
    """Row i: log P(. | ids[:i + 1]) in float64."""
    with torch.no_grad():
        return torch.log_softmax(hf64(torch.tensor([ids])).logits[0], -1)


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


@pytest.mark.tasks("11.21", "11.26", "8.33")
def test_lm_eval_loglikelihood_request_as_local_completions_sends_it(server, hf64):
    url, _ = server
    batch = [CONTEXT + c for c in CHOICES]
    payload = {"model": NAME, "prompt": batch, "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True}
    r = httpx.post(url + "/v1/completions", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    ctxlen = len(CONTEXT)
    choices = sorted(out["choices"], key=itemgetter("index"))
    assert len(choices) == len(batch)
    for choice, ids, cont in zip(choices, batch, CHOICES):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1, "the prompt's tokens, then the one generated"
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        # lm-eval's parse_logprobs, as it reads the reply
        score = sum(lp["token_logprobs"][ctxlen:-1])
        is_greedy = all(t == max(top.values()) for t, top in
                        zip(lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]))
        ref = log_softmax64(hf64, ids)
        want = sum(ref[ctxlen - 1 + i, t].item() for i, t in enumerate(cont))
        greedy = all(ref[ctxlen - 1 + i].argmax().item() == t for i, t in enumerate(cont))
        assert abs(score - want) < TOL * len(cont), (len(cont), score, want)
        assert is_greedy == greedy
        for i in range(1, len(ids)):  # every prompt token, not only the continuation's
            assert abs(lp["token_logprobs"][i] - ref[i - 1, ids[i]].item()) < TOL, i
    assert out["usage"]["prompt_tokens"] == sum(map(len, batch))


@pytest.mark.tasks("11.21", "11.26", "8.33")
def test_echo_with_max_tokens_0_returns_the_prompt_and_its_logprobs(server, hf64):
    url, tok = server
    text = "The block table maps logical blocks to physical ones."
    ids = tok.encode(text)
    done = client(url).completions.create(model=NAME, prompt=text, echo=True, logprobs=2,
                                          max_tokens=0)
    c = done.choices[0]
    assert c.text == text and c.finish_reason == "length"
    assert done.usage.completion_tokens == 0 and done.usage.prompt_tokens == len(ids)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens == [tok.decode([t]) for t in ids]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    ref = log_softmax64(hf64, ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) < TOL, i
        top = ref[i - 1].topk(2)
        want = {tok.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
        want.setdefault(tok.decode([ids[i]]), ref[i - 1, ids[i]].item())
        assert lp.top_logprobs[i].keys() == want.keys(), i
        assert all(abs(lp.top_logprobs[i][k] - v) < TOL for k, v in want.items()), i


@pytest.mark.tasks("11.21", "11.26")
def test_echo_with_a_completion_lists_prompt_then_completion(server, hf64):
    url, tok = server
    c = client(url)
    kw = dict(model=NAME, prompt=CONTEXT, max_tokens=4, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    plain = c.completions.create(**kw).choices[0]
    echoed = c.completions.create(**kw, echo=True).choices[0]
    prompt_text = tok.decode(CONTEXT)
    assert echoed.text == prompt_text + plain.text
    n = len(CONTEXT)
    assert echoed.logprobs.tokens[n:] == plain.logprobs.tokens
    assert echoed.logprobs.token_logprobs[n:] == plain.logprobs.token_logprobs
    prompt_chars = sum(len(t) for t in echoed.logprobs.tokens[:n])
    assert echoed.logprobs.text_offset[n:] == [prompt_chars + o for o in plain.logprobs.text_offset]
    ref = log_softmax64(hf64, CONTEXT)
    assert all(abs(echoed.logprobs.token_logprobs[i] - ref[i - 1, CONTEXT[i]].item()) < TOL for i in range(1, n))


@pytest.mark.tasks("11.9", "11.10")
def test_what_echo_cannot_do_is_refused_naming_it(server):
    url, _ = server
    for body, words in [
        ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, ["prompt_logprobs", "stream"]),
        ({"prompt": "hi", "prompt_logprobs": -1}, ["prompt_logprobs"]),
        ({"prompt": "hi", "echo": True, "max_tokens": 0, "stream": True}, ["max_tokens=0", "stream"]),
        ({"prompt": "hi", "max_tokens": 0}, ["max_tokens"]),  # no echo: nothing to return
        ({"prompt": "hi", "echo": True, "logprobs": 21}, ["logprobs", "20"]),
    ]:
        r = httpx.post(url + "/v1/completions", json={"model": NAME, **body})
        assert r.status_code == 400, (body, r.text)
        assert all(w in r.json()["error"]["message"] for w in words), (body, r.text)


@pytest.mark.tasks("11.17", "11.28")
def test_echo_with_logprobs_streamed_lists_what_the_whole_reply_lists(server):
    url, tok = server
    c = client(url)
    kw = dict(model=NAME, prompt=[CONTEXT, CHOICES[3]], max_tokens=5, temperature=0, logprobs=2, echo=True,
              extra_body={"ignore_eos": True})
    whole = sorted(c.completions.create(**kw).choices, key=lambda ch: ch.index)
    events = [e for e in c.completions.create(**kw, stream=True) if e.choices]
    for i, want in enumerate(whole):
        mine = [e.choices[0] for e in events if e.choices[0].index == i]
        assert "".join(ch.text for ch in mine) == want.text
        assert mine[0].logprobs.token_logprobs[0] is None  # the prompt's first token, in the first event
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            got = [x for ch in mine if ch.logprobs for x in getattr(ch.logprobs, key)]
            assert got == getattr(want.logprobs, key), (i, key)
        assert want.logprobs.text_offset[-5:] == sorted(want.logprobs.text_offset[-5:])


def vllm_entries_match(entries, ref, ids: list[int], k: int):
    """vLLM's prompt_logprobs as JSON vs the float64 reference: None first, then the prompt token's
    own logprob and rank and the k most likely."""
    assert entries[0] is None and len(entries) == len(ids)
    for i in range(1, len(ids)):
        row, own = ref[i - 1], str(ids[i])
        best = row.topk(k).indices.tolist()
        assert set(entries[i]) == {str(t) for t in best} | {own}, i
        for t, e in entries[i].items():
            assert abs(e["logprob"] - row[int(t)].item()) < TOL, (i, t)
            x = row[int(t)]  # its rank: 1 + the tokens more likely (float32 may order near ties apart)
            assert 1 + (row > x + TOL).sum() <= e["rank"] <= 1 + (row > x - TOL).sum(), (i, t)
        assert entries[i][own]["decoded_token"] == tok_decode(ids[i])


def tok_decode(t: int) -> str:
    return TOK.decode([t])


TOK = None


@pytest.mark.tasks("11.9", "11.21", "11.25")
def test_vllm_prompt_logprobs_field_on_both_endpoints(server, hf64):
    global TOK
    url, TOK = server
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": [CONTEXT, CHOICES[3]],
                                                  "max_tokens": 2, "prompt_logprobs": 3}, timeout=60)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=itemgetter("index"))
    for ids, choice in zip([CONTEXT, CHOICES[3]], choices):
        vllm_entries_match(choice["prompt_logprobs"], log_softmax64(hf64, ids), ids, 3)
        assert choice["logprobs"] is None  # not the completion's logprobs: those are not asked
    chat = [{"role": "user", "content": "Name a colour."}]
    ids = httpx.post(url + "/tokenize", json={"model": NAME, "messages": chat}).json()["tokens"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": chat, "max_tokens": 1,
                                                       "prompt_logprobs": 0}, timeout=60)
    assert r.status_code == 200, r.text
    vllm_entries_match(r.json()["prompt_logprobs"], log_softmax64(hf64, ids), ids, 0)


def test_echo_without_logprobs_still_streams(server):
    url, tok = server
    events = list(client(url).completions.create(model=NAME, prompt="Hello", echo=True, max_tokens=2,
                                                 temperature=0, stream=True))
    assert "".join(e.choices[0].text for e in events if e.choices).startswith("Hello")
