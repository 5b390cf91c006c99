"""What the server now takes from the engine (issue 23): logprobs in OpenAI's two shapes, streamed and
not, checked against transformers' float64 log-softmax of the tiny checkpoint's logits; penalties,
logit_bias, skip_special_tokens and include_stop_str_in_output compared with `LLM.generate` given the
same SamplingParams; vLLM's stop_reason; usage.prompt_tokens_details.cached_tokens against the engine's
num_cached_tokens.

One server runs in a thread of this process, driven by the real `openai` client. Engine references
are computed before the server owns the engine; the logprob references come from transformers alone.
"""

import copy

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from transformers import AutoTokenizer  # noqa: E402

from cleanvllm.llm import LLM  # noqa: E402
from cleanvllm.sampling_params import SamplingParams  # noqa: E402
from cleanvllm.serve import AsyncEngine, ServerState  # noqa: E402
from conftest import hf_greedy, prompts, server_in_thread  # noqa: E402

CHAPTERS = ("11",)  # `make check CH=11` runs this file (tools/check.py)

NAME = "tiny"
BLOCK = 16
N = 10  # completion tokens
TOL = 1e-4  # the engine computes in float32, the reference in float64
P = prompts([7], seed=5)[0]  # a prompt as token ids
SAMPLED = dict(temperature=0.8, seed=3, max_tokens=N, ignore_eos=True, repetition_penalty=1.3)
CHAT = [{"role": "user", "content": "Hi! Who are you?"}]
# penalties and a bias, each sent to the server and given to LLM.generate as SamplingParams
PENALTIES = [dict(repetition_penalty=1.8), dict(frequency_penalty=1.5, presence_penalty=0.5),
             dict(presence_penalty=-2.0)]
LONG, FRESH = prompts([48, 48], seed=40)  # 3 blocks of 16: the last one is always computed


@pytest.fixture(scope="module")
def server(tiny_model, hf_model):
    llm = LLM(tiny_model, device="cpu", dtype="float32", kvcache_block_size=BLOCK,
              max_model_len=256, max_num_seqs=8)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    greedy = dict(temperature=0, max_tokens=N, ignore_eos=True)

    def run(prompt, **kw):
        return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0].outputs[0]

    refs = {"plain": run(P, **greedy), "sampled": run(P, **SAMPLED),
            "penalties": [run(P, **greedy, **kw) for kw in PENALTIES]}
    favourite = hf_greedy(hf_model, P, 1)[0]
    refs["bias"] = (favourite, run(P, **greedy, logit_bias={favourite: -100}))
    eos = llm.config.eos_token_ids[0]
    refs["eos"] = (eos, run(P, **greedy, logit_bias={eos: 100}, skip_special_tokens=False))
    text = refs["plain"].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    refs["stop"] = (stop, run(P, **greedy, stop=[stop]),
                    run(P, **greedy, stop=[stop], include_stop_str_in_output=True))
    stop_id = refs["plain"].token_ids[4]
    refs["stop_id"] = (stop_id, run(P, **greedy, stop_token_ids=[stop_id]))
    refs["chat"] = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=N), use_tqdm=False)[0]
    refs["chat_sampled"] = llm.chat(CHAT, SamplingParams(temperature=1.5, seed=4, max_tokens=N),
                                    use_tqdm=False)[0]
    other = [llm.generate([LONG], SamplingParams(max_tokens=1), use_tqdm=False)[0] for _ in range(2)]
    refs["cached"] = [o.num_cached_tokens for o in other]  # the engine's count, cold then warm
    state = ServerState(AsyncEngine(llm), tok, NAME, 256)
    try:
        with server_in_thread(state) as url:
            yield url, tok, refs
    finally:
        llm.close()


@pytest.fixture(scope="module")
def hf64(hf_model):
    return copy.deepcopy(hf_model).double()


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


def log_softmax64(hf64, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """transformers' float64 log-softmax at each position that produced a completion token."""
    with torch.no_grad():
        logits = hf64(torch.tensor([prompt + completion])).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1 : -1], -1)


# ---- /v1/completions: the legacy shape --------------------------------------------------------------

def check_legacy(lp, ids: list[int], ref: torch.Tensor, tok, k: int) -> None:
    """OpenAI's legacy logprobs of the tokens `ids`, against the reference log-softmax `ref`."""
    texts = [tok.decode([t]) for t in ids]
    assert lp.tokens == texts
    assert lp.text_offset == [sum(map(len, texts[:j])) for j in range(len(ids))]
    for j, t in enumerate(ids):
        assert abs(lp.token_logprobs[j] - ref[j, t].item()) < TOL, (j, lp.token_logprobs[j])
        vals, top = ref[j].topk(k)
        want = {tok.decode([i]): v for i, v in zip(top.tolist(), vals.tolist())}
        want.setdefault(texts[j], ref[j, t].item())  # the sampled token's own, as vLLM adds it
        got = lp.top_logprobs[j]
        assert got.keys() == want.keys(), (j, got, want)
        assert all(abs(got[s] - want[s]) < TOL for s in want), (j, got, want)


@pytest.mark.tasks("11.21", "11.26")
def test_completion_logprobs_are_transformers_float64_log_softmax(server, hf64):
    url, tok, refs = server
    c = client(url)
    out = c.completions.create(model=NAME, prompt=P, temperature=0, max_tokens=N, logprobs=3,
                               extra_body={"ignore_eos": True})
    ids = refs["plain"].token_ids
    assert out.choices[0].text == refs["plain"].text
    check_legacy(out.choices[0].logprobs, ids, log_softmax64(hf64, P, ids), tok, 3)
    # sampled with a temperature and a penalty: the logprobs stay those of the raw model output
    kw = {k: v for k, v in SAMPLED.items() if k not in ("ignore_eos", "repetition_penalty")}
    out = c.completions.create(model=NAME, prompt=P, logprobs=2, **kw,
                               extra_body={"ignore_eos": True, "repetition_penalty": 1.3})
    ids = refs["sampled"].token_ids
    assert out.choices[0].text == refs["sampled"].text and ids != refs["plain"].token_ids
    check_legacy(out.choices[0].logprobs, ids, log_softmax64(hf64, P, ids), tok, 2)
    # logprobs: 0 lists the sampled token alone
    out = c.completions.create(model=NAME, prompt=P, temperature=0, max_tokens=3, logprobs=0)
    lp = out.choices[0].logprobs
    assert [list(d) for d in lp.top_logprobs] == [[t] for t in lp.tokens]


@pytest.mark.tasks("11.17", "11.28")
def test_completion_stream_lists_each_token_once_with_its_text(server):
    """With a stop string: the stream's chunks list the tokens of the text they carry, the last one
    lists the rest (those of the stop string, cut from the text); joined, they are the non-streamed
    lists, one entry per generated token."""
    url, _, refs = server
    stop, ref, _ = refs["stop"]
    c = client(url)
    kw = dict(model=NAME, prompt=P, temperature=0, max_tokens=N, stop=[stop], logprobs=2,
              extra_body={"ignore_eos": True})
    whole = c.completions.create(**kw).choices[0]
    assert (whole.text, whole.finish_reason, whole.stop_reason) == (ref.text, "stop", stop)
    assert len(whole.logprobs.tokens) == len(ref.token_ids) > 0
    assert whole.logprobs.text_offset[-1] >= len(whole.text), "the stop string's tokens come last"
    chunks = [ch.choices[0] for ch in c.completions.create(**kw, stream=True)]
    joined = {key: [x for ch in chunks for x in getattr(ch.logprobs, key)]
              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined == whole.logprobs.model_dump()
    assert "".join(ch.text for ch in chunks) == whole.text
    text, listed = "", ""
    for ch in chunks[:-1]:  # every chunk but the last: the tokens listed so far are in the text sent
        text, listed = text + ch.text, listed + "".join(ch.logprobs.tokens)
        assert text.startswith(listed), (text, listed)
    assert listed and len(chunks[-1].logprobs.tokens) < len(joined["tokens"]), "not all at the end"
    assert [ch.stop_reason for ch in chunks] == [None] * (len(chunks) - 1) + [stop]


# ---- /v1/chat/completions: the content shape ---------------------------------------------------------

def check_content(content, ids: list[int], ref: torch.Tensor, tok, k: int) -> None:
    """OpenAI's chat logprobs of the tokens `ids`: the top k by the reference, best first."""
    assert [e.token for e in content] == [tok.decode([t]) for t in ids]
    for j, (e, t) in enumerate(zip(content, ids)):
        assert abs(e.logprob - ref[j, t].item()) < TOL and e.bytes == list(e.token.encode())
        vals, top = ref[j].topk(k)
        assert [x.token for x in e.top_logprobs] == [tok.decode([i]) for i in top.tolist()], j
        assert all(abs(x.logprob - v) < TOL for x, v in zip(e.top_logprobs, vals.tolist()))
        assert [x.bytes for x in e.top_logprobs] == [list(x.token.encode()) for x in e.top_logprobs]


@pytest.mark.tasks("11.25", "11.27")
def test_chat_logprobs_are_transformers_float64_log_softmax(server, hf64):
    url, tok, refs = server
    c = client(url)
    kw = dict(model=NAME, messages=CHAT, temperature=0, max_tokens=N, logprobs=True, top_logprobs=3)
    for ref_out, sampling in [(refs["chat"], {}), (refs["chat_sampled"], dict(temperature=1.5, seed=4))]:
        ids = ref_out.outputs[0].token_ids
        ref = log_softmax64(hf64, ref_out.prompt_token_ids, ids)
        whole = c.chat.completions.create(**{**kw, **sampling}).choices[0]
        assert whole.message.content == ref_out.outputs[0].text
        check_content(whole.logprobs.content, ids, ref, tok, 3)
    ranks = [int((ref[j] > ref[j, t]).sum()) for j, t in enumerate(ids)]
    assert max(ranks) >= 3, "every sampled token is among the top 3: a weak case"
    content = c.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [ch.choices[0] for ch in c.chat.completions.create(**kw, stream=True)]
    joined = [x.model_dump() for ch in streamed if ch.logprobs for x in ch.logprobs.content]
    assert joined == [x.model_dump() for x in content], "streamed = non-streamed"
    plain = c.chat.completions.create(**{**kw, "top_logprobs": None}).choices[0]
    tops = [e.top_logprobs for e in plain.logprobs.content]
    assert tops and tops == [[]] * len(tops), "logprobs alone: each token's, no top list"
    off = c.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None}).choices[0]
    assert off.logprobs is None


@pytest.mark.tasks("11.9")
def test_logprob_fields_that_cannot_work_are_400s_naming_them(server):
    url = server[0]
    for path, body, words in [
        ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 1, "stream": True}, ["prompt_logprobs", "stream"]),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, ["logprobs", "20"]),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, ["top_logprobs", "logprobs: true"]),
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": False, "top_logprobs": 2}, ["top_logprobs"]),
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": -1}, ["top_logprobs"]),
        ("/v1/chat/completions", {"messages": CHAT, "prompt_logprobs": 21}, ["prompt_logprobs"]),
        ("/v1/chat/completions", {"messages": CHAT, "prompt_logprobs": 1, "stream": True}, ["prompt_logprobs", "stream"]),
    ]:
        r = httpx.post(url + path, json={"model": NAME, "max_tokens": 2, **body})
        assert r.status_code == 400, (body, r.text)
        assert all(w in r.json()["error"]["message"] for w in words), (body, r.text)


# ---- penalties, bias, special tokens, stop strings: as LLM.generate does them ------------------------

@pytest.mark.tasks("11.9")
def test_penalties_and_bias_change_the_output_as_the_engine_does(server):
    url, tok, refs = server
    c = client(url)
    plain = refs["plain"]
    for kw, ref in zip(PENALTIES, refs["penalties"]):
        extra = {"ignore_eos": True, **({"repetition_penalty": kw["repetition_penalty"]}
                                        if "repetition_penalty" in kw else {})}
        openai_kw = {k: v for k, v in kw.items() if k != "repetition_penalty"}
        out = c.completions.create(model=NAME, prompt=P, temperature=0, max_tokens=N, **openai_kw,
                                   extra_body=extra).choices[0]
        assert out.text == ref.text, kw
        assert ref.token_ids != plain.token_ids, f"{kw} changes nothing here: a useless case"
    favourite, ref = refs["bias"]
    out = c.completions.create(model=NAME, prompt=P, temperature=0, max_tokens=N,
                               logit_bias={str(favourite): -100}, extra_body={"ignore_eos": True})
    assert out.choices[0].text == ref.text != plain.text and favourite not in ref.token_ids


@pytest.mark.tasks("11.9")
def test_skip_special_tokens_and_include_stop_str_in_output(server):
    url, tok, refs = server
    c = client(url)
    eos, ref = refs["eos"]
    kw = dict(model=NAME, prompt=P, temperature=0, max_tokens=N, logit_bias={str(eos): 100})
    kept = c.completions.create(**kw, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    skipped = c.completions.create(**kw, extra_body={"ignore_eos": True})
    assert kept.choices[0].text == ref.text == tok.convert_ids_to_tokens(eos) * N
    assert skipped.choices[0].text == ""
    stop, cut, kept_ref = refs["stop"]
    out = c.completions.create(model=NAME, prompt=P, temperature=0, max_tokens=N, stop=[stop],
                               extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert out.choices[0].text == kept_ref.text == cut.text + stop
    assert out.choices[0].stop_reason == stop


@pytest.mark.tasks("11.19", "11.23")
def test_stop_reason_is_the_stop_token_id_or_null(server):
    url, _, refs = server
    c = client(url)
    stop_id, ref = refs["stop_id"]
    out = c.completions.create(model=NAME, prompt=P, temperature=0, max_tokens=N,
                               extra_body={"stop_token_ids": [stop_id]}).choices[0]
    assert (out.finish_reason, out.stop_reason, out.text) == ("stop", stop_id, ref.text)
    out = c.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=3)
    assert (out.choices[0].finish_reason, out.choices[0].stop_reason) == ("length", None)
    chunks = list(c.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=3,
                                            stream=True))
    assert all(ch.choices[0].stop_reason is None for ch in chunks)


# ---- usage.prompt_tokens_details.cached_tokens -----------------------------------------------------

@pytest.mark.tasks("11.12", "11.15")
def test_cached_tokens_are_the_engines_num_cached_tokens(server):
    """A fresh 48-token prompt twice: nothing cached, then its two full blocks (the block holding the
    last prompt token is always computed): (48 - 1) // 16 * 16 = 32, as the engine counted for another
    48-token prompt run twice offline."""
    url, _, refs = server
    assert refs["cached"] == [0, (48 - 1) // BLOCK * BLOCK]
    c = client(url)
    first = c.completions.create(model=NAME, prompt=FRESH, max_tokens=2)
    again = c.completions.create(model=NAME, prompt=FRESH, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == refs["cached"][1]
    chunks = list(c.completions.create(model=NAME, prompt=FRESH, max_tokens=2, stream=True,
                                       stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == refs["cached"][1]
    two = c.completions.create(model=NAME, prompt=[FRESH, FRESH[:20]], max_tokens=2)
    assert two.usage.prompt_tokens_details.cached_tokens == refs["cached"][1] + BLOCK  # summed
    chat = c.chat.completions.create(model=NAME, messages=CHAT, max_tokens=2)  # run offline before
    want = (len(refs["chat"].prompt_token_ids) - 1) // BLOCK * BLOCK
    assert chat.usage.prompt_tokens_details.cached_tokens == want
