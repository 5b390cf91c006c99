"""vLLM's interface in the server (issue 23): /version, /tokenize, /detokenize, /metrics, prompt lists,
echo, continuous usage, and every field it does not implement refused with a 400 that names it.

One server runs in a thread of this process (its engine is visible). References come from the offline
engine (`LLM.generate`, checked against transformers in test_engine.py) and the tokenizer, computed
before the server owns the engine; /metrics' counts are compared with counts made by hand from the
requests sent.
"""

import asyncio
import json

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import cleanvllm  # noqa: E402
from cleanvllm.llm import LLM  # noqa: E402
from cleanvllm.sampling_params import SamplingParams  # noqa: E402
from cleanvllm.serve import AsyncEngine, Metrics, ServerState  # noqa: E402
from conftest import server_in_thread  # noqa: E402

CHAPTERS = ("11",)  # `make check CH=11` runs this file (tools/check.py)

MAX_MODEL_LEN = 512
BLOCK = 16
NAME = "tiny"
N = 6  # completion tokens of the greedy cases
GREEDY = dict(temperature=0, max_tokens=N, ignore_eos=True)
G = dict(temperature=0, max_tokens=N, extra_body={"ignore_eos": True})  # GREEDY for the openai client
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]
IDS40 = [(7 * i + 11) % 5000 + 100 for i in range(40)]  # 40 token ids: 2 full 16-token blocks + 8
FRESH40 = [(13 * i + 7) % 5000 + 5200 for i in range(40)]  # 40 others, never run before the test
CHAT = [{"role": "user", "content": "Hi! Who are you?"}]


@pytest.fixture(scope="module")
def server(tiny_model):
    llm = LLM(tiny_model, device="cpu", kvcache_block_size=BLOCK, max_model_len=MAX_MODEL_LEN,
              max_num_seqs=32)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    refs = {"greedy": llm.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False),
            "ids40": llm.generate([IDS40], SamplingParams(**GREEDY), use_tqdm=False)[0],
            "chat": llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=N), use_tqdm=False)[0]}
    stop_id = refs["ids40"].outputs[0].token_ids[2]
    refs["stop"] = (stop_id, llm.generate([IDS40], SamplingParams(temperature=0, max_tokens=N,
                    stop_token_ids=[stop_id]), use_tqdm=False)[0])
    state = ServerState(AsyncEngine(llm), tok, NAME, MAX_MODEL_LEN)
    try:
        with server_in_thread(state) as url:
            yield url, llm, tok, refs
    finally:
        llm.close()


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


def scrape(url) -> dict:
    """/metrics parsed by prometheus_client's parser: {(sample name, finished_reason): value}."""
    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.get("model_name") == NAME, s
            out[(s.name, s.labels.get("finished_reason"))] = s.value
    return out


def delta(before, after, name, reason=None):
    key = ("cleanvllm:" + name, reason)
    return after.get(key, 0) - before.get(key, 0)


# ---- /version, /tokenize, /detokenize ----------------------------------------------------------

def test_version(server):
    assert httpx.get(server[0] + "/version").json() == {"version": cleanvllm.__version__}


@pytest.mark.tasks("11.29", "11.30")
def test_tokenize_and_detokenize(server):
    url, _, tok, refs = server
    r = httpx.post(url + "/tokenize", json={"model": NAME, "prompt": PROMPTS[0]}).json()
    want = tok.encode(PROMPTS[0])
    assert r == {"count": len(want), "max_model_len": MAX_MODEL_LEN, "tokens": want, "token_strs": None}
    r = httpx.post(url + "/tokenize", json={"prompt": PROMPTS[1], "return_token_strs": True}).json()
    assert r["token_strs"] == tok.convert_ids_to_tokens(tok.encode(PROMPTS[1]))
    r = httpx.post(url + "/tokenize", json={"messages": CHAT}).json()
    assert r["tokens"] == refs["chat"].prompt_token_ids, "the chat endpoint's prompt tokens"
    r = httpx.post(url + "/detokenize", json={"model": NAME, "tokens": want}).json()
    assert r == {"prompt": PROMPTS[0]}
    for path, body, word in [
        ("/tokenize", {"prompt": "hi", "messages": CHAT}, "either"),
        ("/tokenize", {}, "either"),
        ("/tokenize", {"prompt": "hi", "model": "gpt-9"}, "gpt-9"),
        ("/tokenize", {"prompt": "hi", "add_generation_promt": True}, "add_generation_promt"),
        ("/detokenize", {"tokens": [1, len(tok) + 5]}, str(len(tok) + 5)),
        ("/detokenize", {"tokens": [True]}, "tokens"),
        ("/detokenize", {"tokens": [1] * (MAX_MODEL_LEN + 1)}, "max_model_len"),
    ]:
        r = httpx.post(url + path, json=body)
        assert r.status_code in (400, 404) and word in r.json()["error"]["message"], (body, r.text)



@pytest.mark.tasks("11.22", "11.24")
def test_content_parts_join_with_newlines_and_an_image_is_refused(server):
    url, _, tok, _ = server
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "a block table?"}]
    r = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": parts}]}).json()
    text = tok.apply_chat_template([{"role": "user", "content": "What is\na block table?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert r["tokens"] == tok.encode(text, add_special_tokens=False), "parts joined with a newline"
    image = {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}
    for path in ("/tokenize", "/v1/chat/completions"):
        extra = {"model": NAME, "max_tokens": 2} if "chat" in path else {}
        r = httpx.post(url + path, json={"messages": [{"role": "user", "content": [parts[0], image]}],
                                         **extra})
        assert r.status_code == 400 and "'image_url'" in r.json()["error"]["message"], r.text
        assert "messages.0, content part 1" in r.json()["error"]["message"], r.text


@pytest.mark.tasks("11.24")
def test_continue_final_message_and_add_generation_prompt(server):
    url, _, tok, _ = server
    conv = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    for turn in ({"add_generation_prompt": False}, {"add_generation_prompt": False, "continue_final_message": True}):
        r = httpx.post(url + "/tokenize", json={"messages": conv, **turn}).json()
        text = tok.apply_chat_template(conv, tokenize=False, **turn)
        assert r["tokens"] == tok.encode(text, add_special_tokens=False), turn
    cont = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    assert cont.rstrip().endswith("The colour is"), "the reference leaves the last message open"
    r = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": conv, "max_tokens": 2,
                                                      "add_generation_prompt": False, "continue_final_message": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(cont, add_special_tokens=False))
    for body, word in [({"continue_final_message": True}, "continue_final_message=True"),
                       ({"chat_template_kwargs": {"add_generation_prompt": False}}, "add_generation_prompt")]:
        r = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": conv, "max_tokens": 2, **body})
        assert r.status_code == 400 and word in r.json()["error"]["message"], r.text
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2,
                                                 "continue_final_message": True})
    assert r.status_code == 400 and "continue_final_message" in r.json()["error"]["message"], r.text

# ---- /metrics ----------------------------------------------------------------------------------

@pytest.mark.tasks("11.13", "11.14")
def test_metrics_count_what_was_sent(server):
    """Four requests one after another on 40-token prompts: three run to max_tokens, one stops at a
    stop token id. Counted by hand: 4 first tokens, 3N + 3 generated tokens, 3(N-1) + 2 gaps between
    tokens, 160 prompt tokens looked up in the prefix cache, of which 0 + 32 + 32 + 32 found: the
    fresh prompt finds nothing; IDS40 finds its first two full blocks, cached by the offline run of the
    fixture (the block holding a prompt's last token is always computed)."""
    url, _, _, refs = server
    stop_id, ref_stop = refs["stop"]
    assert ref_stop.outputs[0].finish_reason == "stop" and len(ref_stop.outputs[0].token_ids) == 3
    c = client(url)
    before = scrape(url)
    c.completions.create(model=NAME, prompt=FRESH40, **G)
    a = c.completions.create(model=NAME, prompt=IDS40, **G)
    b = c.completions.create(model=NAME, prompt=IDS40, stream=True, **G)
    assert "".join(ch.choices[0].text for ch in b) == a.choices[0].text == refs["ids40"].outputs[0].text
    s = c.completions.create(model=NAME, prompt=IDS40, temperature=0, max_tokens=N,
                             extra_body={"stop_token_ids": [stop_id]})
    assert s.choices[0].finish_reason == "stop"
    after = scrape(url)
    got = {name: delta(before, after, name) for name in [
        "time_to_first_token_seconds_count", "e2e_request_latency_seconds_count",
        "inter_token_latency_seconds_count", "generation_tokens_total", "prompt_tokens_total",
        "prefix_cache_queries_total", "prefix_cache_hits_total"]}
    got["success{length}"] = delta(before, after, "request_success_total", "length")
    got["success{stop}"] = delta(before, after, "request_success_total", "stop")
    assert got == {"time_to_first_token_seconds_count": 4, "e2e_request_latency_seconds_count": 4,
                   "inter_token_latency_seconds_count": (N - 1) * 3 + 2,
                   "generation_tokens_total": 3 * N + 3, "prompt_tokens_total": 160,
                   "prefix_cache_queries_total": 160, "prefix_cache_hits_total": 96,
                   "success{length}": 3, "success{stop}": 1}
    # the latencies are real durations: their sums are positive and below the test's own time
    assert 0 < delta(before, after, "e2e_request_latency_seconds_sum") < 60
    assert after[("cleanvllm:num_requests_running", None)] == 0


@pytest.mark.tasks("11.12", "11.13")
def test_metrics_gauges_during_a_stream(server):
    url, llm, _, _ = server
    total = llm.runner.num_kvcache_blocks
    body = {"model": NAME, "prompt": IDS40, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(8):
            next(line for line in lines if line.startswith("data: {"))
        during = scrape(url)
    assert during[("cleanvllm:num_requests_running", None)] == 1
    assert during[("cleanvllm:num_requests_waiting", None)] == 0
    used = during[("cleanvllm:kv_cache_usage_perc", None)]
    # 40 prompt tokens + 8 to 440 generated: 3 to 28 blocks of 16 tokens in use
    assert 3 / total <= used <= 28 / total, (used, total)


@pytest.mark.tasks("11.14")
def test_two_servers_in_one_process_count_apart():
    a, b = Metrics("m"), Metrics("m")  # the global registry would refuse the second
    a.generation_tokens.inc(5)
    assert b.generation_tokens._value.get() == 0


# ---- prompt lists, echo, continuous usage --------------------------------------------------------

@pytest.mark.tasks("11.16", "11.20", "11.21")
def test_a_list_of_prompts_is_one_request_per_prompt(server):
    url, _, tok, refs = server
    c = client(url)
    out = c.completions.create(model=NAME, prompt=PROMPTS, **G)
    assert [ch.index for ch in out.choices] == [0, 1, 2]
    assert [ch.text for ch in out.choices] == [r.outputs[0].text for r in refs["greedy"]]
    assert out.usage.prompt_tokens == sum(len(tok.encode(p)) for p in PROMPTS)
    assert out.usage.completion_tokens == 3 * N
    ids = [tok.encode(p) for p in PROMPTS]  # the same prompts as token-id lists
    out = c.completions.create(model=NAME, prompt=ids[::-1], **G)
    assert [ch.text for ch in out.choices] == [r.outputs[0].text for r in refs["greedy"][::-1]]
    chunks = list(c.completions.create(model=NAME, prompt=PROMPTS, stream=True, **G,
                                       stream_options={"include_usage": True}))
    texts = ["", "", ""]
    for ch in chunks[:-1]:
        (choice,) = ch.choices
        texts[choice.index] += choice.text
    assert texts == [r.outputs[0].text for r in refs["greedy"]]
    assert chunks[-1].usage.completion_tokens == 3 * N and not chunks[-1].choices
    assert len({ch.id for ch in chunks}) == 1, "one request: one id"


@pytest.mark.tasks("11.2", "11.6")
def test_one_bad_prompt_refuses_the_whole_request_before_anything_runs(server):
    url, llm, _, _ = server
    before = scrape(url)
    for prompt, word in [([PROMPTS[0], "hi " * MAX_MODEL_LEN], "prompt 1"),
                         ([[1, 2, 3], [5, -1]], "prompt 1"),
                         ([PROMPTS[0], "\ud800"], "prompt 1"),
                         ([PROMPTS[0]] * 1025, "1024"),
                         ([], "prompt")]:
        # as JSON text: lone surrogates stay escaped, as a client in any language may send them
        r = httpx.post(url + "/v1/completions", content=json.dumps({"model": NAME, "prompt": prompt,
                       "max_tokens": N}), headers={"content-type": "application/json"})
        assert r.status_code == 400 and word in r.json()["error"]["message"], (prompt[:2], r.text)
    after = scrape(url)
    assert delta(before, after, "prompt_tokens_total") == 0, "a prompt of a refused request ran"
    assert delta(before, after, "generation_tokens_total") == 0
    assert not llm.has_unfinished_requests()


@pytest.mark.tasks("11.21")
def test_echo(server):
    url, _, tok, refs = server
    c = client(url)
    out = c.completions.create(model=NAME, prompt=PROMPTS[:2], echo=True, **G)
    assert [ch.text for ch in out.choices] == [p + r.outputs[0].text for p, r in zip(PROMPTS[:2], refs["greedy"])]
    ids = tok.encode(PROMPTS[2])
    out = c.completions.create(model=NAME, prompt=ids, echo=True, **G)
    assert out.choices[0].text == tok.decode(ids) + refs["greedy"][2].outputs[0].text
    chunks = list(c.completions.create(model=NAME, prompt=PROMPTS[0], echo=True, stream=True, **G))
    assert chunks[0].choices[0].text.startswith(PROMPTS[0])
    assert "".join(ch.choices[0].text for ch in chunks) == PROMPTS[0] + refs["greedy"][0].outputs[0].text


@pytest.mark.tasks("11.15", "11.17")
def test_continuous_usage_stats(server):
    url, _, tok, refs = server
    n_prompt = len(tok.encode(PROMPTS[0]))
    chunks = list(client(url).completions.create(
        model=NAME, prompt=PROMPTS[0], stream=True, **G,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [ch.usage.completion_tokens for ch in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == N, counts
    assert all(ch.usage.prompt_tokens == n_prompt for ch in chunks)
    assert all(ch.usage.total_tokens == n_prompt + ch.usage.completion_tokens for ch in chunks)
    # as vLLM: stream_options given means include_usage unless it says false
    alone = list(client(url).completions.create(model=NAME, prompt=PROMPTS[0], stream=True, **G,
                                                stream_options={"continuous_usage_stats": True}))
    assert all(ch.usage is not None for ch in alone) and not alone[-1].choices
    off = list(client(url).completions.create(model=NAME, prompt=PROMPTS[0], stream=True, **G,
                                              stream_options={"include_usage": False}))
    assert all(ch.usage is None and ch.choices for ch in off)
    chat = list(client(url).chat.completions.create(
        model=NAME, messages=CHAT, stream=True, temperature=0, max_tokens=N,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(ch.usage is not None for ch in chat)
    assert chat[-1].usage.completion_tokens == len(refs["chat"].outputs[0].token_ids)


# ---- fields the server does not implement ----------------------------------------------------

COMPLETION_REFUSED = [
    ("n", 129), ("best_of", 3), ("prompt_logprobs", -1), ("prompt_logprobs", 21), ("suffix", "the end"),
    ("response_format", {"type": "json_object"}), ("guided_json", {"type": "object"}),
    ("guided_regex", "[0-9]+"), ("guided_choice", ["a", "b"]), ("guided_grammar", "root ::= 'a'"),
    ("structured_outputs", {"regex": "a+"}), ("allowed_token_ids", [1]), ("truncate_prompt_tokens", 5),
    ("use_beam_search", True), ("n", True), ("max_tokenz", 3), ("top_logprobs", 2),
    # fields the engine implements, with values it refuses: the 400 still names the field
    ("logprobs", 21), ("logprobs", -1), ("logprobs", True), ("presence_penalty", 2.5),
    ("frequency_penalty", "1"), ("repetition_penalty", 0), ("logit_bias", {"x": 1}),
    ("logit_bias", {"5": 101}), ("logit_bias", {"99999999": 1}), ("skip_special_tokens", "no"),
    ("include_stop_str_in_output", 1),
]
CHAT_REFUSED = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"), ("functions", [{"name": "f"}]), ("top_logprobs", 2),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
    ("echo", True), ("continue_final_message", True),  # (with add_generation_prompt: true, the default)
    ("chat_template", "{{ 'hi' }}"), ("reasoning_effort", "high"), ("n", 129),
    ("documents", [{"title": "a", "text": "b"}]), ("include_reasoning", False),
    ("structural_tag", "{}"), ("add_special_tokens", True), ("prompt_logprobs", -1),
    ("logprobs", 1), ("presence_penalty", -3), ("logit_bias", {"-1": 5}),
]


@pytest.mark.parametrize("field,value", COMPLETION_REFUSED)
@pytest.mark.tasks("11.9")
def test_completion_fields_not_implemented_are_400s(server, field, value):
    r = httpx.post(server[0] + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2,
                                                       field: value})
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("field,value", CHAT_REFUSED)
@pytest.mark.tasks("11.9")
def test_chat_fields_not_implemented_are_400s(server, field, value):
    r = httpx.post(server[0] + "/v1/chat/completions", json={"model": NAME, "messages": CHAT,
                                                            "max_tokens": 2, field: value})
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


@pytest.mark.tasks("11.9")
def test_neutral_values_and_bookkeeping_fields_are_accepted(server):
    url, _, _, refs = server
    c = client(url)
    out = c.completions.create(model=NAME, prompt=PROMPTS[0], n=1, best_of=1, logprobs=None,
                               presence_penalty=0, frequency_penalty=0.0, logit_bias={}, user="me",
                               suffix=None, temperature=0, max_tokens=N,
                               extra_body={"repetition_penalty": 1, "ignore_eos": True})
    assert out.choices[0].text == refs["greedy"][0].outputs[0].text
    out = c.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=N, n=1,
                                    logprobs=False, tools=[], response_format={"type": "text"},
                                    metadata={"a": "b"}, store=False, parallel_tool_calls=True,
                                    tool_choice="auto")
    assert out.choices[0].message.content == refs["chat"].outputs[0].text


def test_bodies_that_are_not_requests(server):
    """Not JSON, nested too deep for the parser, or more JSON values than any request has: 400s."""
    url = server[0]
    for raw, word in [(b"{'model': oops", "not valid JSON"), (b"[" * 100_000, "not valid JSON"),
                      (json.dumps([[]] * 200_000).encode(), "JSON values"),
                      (json.dumps({"model": NAME, "prompt": "hi", "metadata": [0] * 200_000}).encode(),
                       "JSON values")]:
        r = httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"},
                       timeout=120)
        assert r.status_code == 400 and word in r.json()["error"]["message"], (raw[:30], r.text[:300])


@pytest.mark.tasks("11.9")
def test_stream_options_need_stream(server):
    url = server[0]
    for extra, word in [({"stream_options": {"include_usage": True}}, "stream"),
                        ({"stream": True, "stream_options": {"include_usag": True}}, "include_usag")]:
        r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "hi", **extra})
        assert r.status_code == 400 and word in r.json()["error"]["message"], r.text


@pytest.mark.tasks("11.16", "11.20", "11.21")
def test_the_async_client_with_a_list_of_prompts(server):
    """Several prompts per request from several clients at once: each gets its own choices back."""
    url, _, _, refs = server

    async def main():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        return await asyncio.gather(*(c.completions.create(model=NAME, prompt=PROMPTS[i:] + PROMPTS[:i],
                                                           **G) for i in range(3)))

    for i, out in enumerate(asyncio.run(main())):
        want = [r.outputs[0].text for r in refs["greedy"][i:] + refs["greedy"][:i]]
        assert [ch.text for ch in out.choices] == want
