"""The OpenAI-compatible server (chapter 11), driven by the real `openai` client on the tiny model.

Most tests share one server running in a thread of this process, so that they can look inside its
engine (KV blocks, aborts); the SIGTERM test starts `python -m cleanvllm.serve` as a subprocess.
References come from the offline engine (`LLM.generate`/`LLM.chat`, itself checked against
transformers in test_engine.py), computed before the server owns the engine.
"""

import asyncio
import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from transformers import AutoTokenizer  # noqa: E402

from cleanvllm.llm import LLM  # noqa: E402
from cleanvllm.sampling_params import SamplingParams  # noqa: E402
from cleanvllm.serve import AsyncEngine, ServerState  # noqa: E402
from conftest import launch_on_free_port, server_in_thread  # noqa: E402

CHAPTERS = ("11",)  # `make check CH=11` runs this file (tools/check.py)

MAX_MODEL_LEN = 512
NAME = "tiny"
N = 16  # completion tokens of the greedy cases
PROMPTS = [f"Request {i}: " + "tell me more " * (i % 5) + f"about {i * 37}" for i in range(16)]
GREEDY = dict(temperature=0, max_tokens=N, ignore_eos=True)
# vLLM's extra sampling fields, each compared with SamplingParams of the same fields offline
EXTRA = [
    dict(temperature=1.0, top_k=1, max_tokens=N),  # top_k=1 is greedy whatever the temperature
    dict(temperature=0.8, top_k=50, min_p=0.05, seed=7, max_tokens=N),
    dict(temperature=0, min_tokens=6, max_tokens=N),
]
CHAT = [[{"role": "user", "content": "Hi! Who are you?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]]


@pytest.fixture(scope="module")
def server(tiny_model):
    llm = LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=MAX_MODEL_LEN,
              max_num_seqs=32)
    refs = {"greedy": llm.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)}
    text0 = refs["greedy"][0].outputs[0].text
    stop = text0[len(text0) // 3: len(text0) // 3 + 3]  # a stop string in the middle of the text
    refs["stop"] = (stop, llm.generate(PROMPTS[0], SamplingParams(**GREEDY, stop=[stop]),
                                       use_tqdm=False)[0])
    stop_id = refs["greedy"][1].outputs[0].token_ids[5]
    refs["stop_id"] = (stop_id, llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=N,
                       stop_token_ids=[stop_id]), use_tqdm=False)[0])
    refs["extra"] = [llm.generate(PROMPTS[2], SamplingParams(**p), use_tqdm=False)[0] for p in EXTRA]
    refs["chat"] = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=N), use_tqdm=False)
    refs["no_think"] = llm.chat(CHAT[0], SamplingParams(temperature=0, max_tokens=N),
                                enable_thinking=False, use_tqdm=False)[0]
    state = ServerState(AsyncEngine(llm), AutoTokenizer.from_pretrained(tiny_model), NAME,
                        MAX_MODEL_LEN)
    try:
        with server_in_thread(state) as url:
            yield url, llm, state, refs
    finally:
        llm.close()


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.mark.tasks("11.11")
def test_health_and_models(server):
    url = server[0]
    assert httpx.get(url + "/health").status_code == 200
    assert [m.id for m in client(url).models.list()] == [NAME]


@pytest.mark.tasks("11.4", "11.7", "11.15", "11.17", "11.18", "11.19", "11.21")
def test_greedy_completion_streamed_and_not_match_offline(server, tiny_model):
    url, _, _, refs = server
    tok = AutoTokenizer.from_pretrained(tiny_model)
    c = client(url)
    for prompt, ref in list(zip(PROMPTS, refs["greedy"]))[:3]:
        whole = c.completions.create(model=NAME, prompt=prompt, extra_body={"ignore_eos": True},
                                     max_tokens=N, temperature=0)
        assert whole.choices[0].text == ref.outputs[0].text and whole.choices[0].finish_reason == "length"
        assert whole.usage.prompt_tokens == len(tok.encode(prompt))
        assert whole.usage.completion_tokens == N and whole.usage.total_tokens == N + whole.usage.prompt_tokens
        chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=N, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}))
        pieces = [ch.choices[0].text for ch in chunks if ch.choices]
        # equal concatenation: no chunk split a UTF-8 character (it would carry a U+FFFD of its own)
        assert "".join(pieces) == ref.outputs[0].text
        assert len(pieces) > 3, "the text should arrive in many chunks, not at the end"
        assert chunks[-1].usage.completion_tokens == N and not chunks[-1].choices
    # a prompt given as token ids
    ids = tok.encode(PROMPTS[3])
    whole = c.completions.create(model=NAME, prompt=ids, max_tokens=N, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert whole.choices[0].text == refs["greedy"][3].outputs[0].text


@pytest.mark.tasks("11.17", "11.22", "11.23", "11.24", "11.25")
def test_chat_streamed_and_not_match_offline(server):
    url, _, _, refs = server
    c = client(url)
    for messages, ref in zip(CHAT, refs["chat"]):
        whole = c.chat.completions.create(model=NAME, messages=messages, max_tokens=N, temperature=0)
        assert whole.choices[0].message.content == ref.outputs[0].text
        assert whole.choices[0].message.role == "assistant"
        assert whole.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert whole.usage.completion_tokens == len(ref.outputs[0].token_ids)
        chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=N,
                                                temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ref.outputs[0].text
        assert chunks[-1].choices[0].finish_reason == ref.outputs[0].finish_reason
    # the template's options (Qwen3's enable_thinking) and OpenAI's list-of-parts content
    parts = [{**CHAT[0][0], "content": [{"type": "text", "text": CHAT[0][0]["content"]}]}]
    whole = c.chat.completions.create(model=NAME, messages=parts, max_tokens=N, temperature=0,
                                      extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert whole.choices[0].message.content == refs["no_think"].outputs[0].text
    assert refs["no_think"].prompt_token_ids != refs["chat"][0].prompt_token_ids


@pytest.mark.tasks("11.17")
def test_stop_string_is_never_streamed(server):
    url, _, _, refs = server
    stop, ref = refs["stop"]
    chunks = list(client(url).completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=N, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}))
    text = "".join(ch.choices[0].text for ch in chunks)
    assert ref.outputs[0].finish_reason == "stop" and stop not in ref.outputs[0].text
    assert text == ref.outputs[0].text and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.tasks("11.9", "11.10")
def test_vllm_sampling_fields(server):
    url, _, _, refs = server
    c = client(url)
    greedy = c.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=N, temperature=0)
    for fields, ref in zip(EXTRA, refs["extra"]):
        extra = {k: v for k, v in fields.items() if k not in ("temperature", "max_tokens", "seed")}
        out = c.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=N, seed=fields.get("seed"),
                                   temperature=fields["temperature"], extra_body=extra)
        assert out.choices[0].text == ref.outputs[0].text, fields
    assert refs["extra"][0].outputs[0].text == greedy.choices[0].text  # top_k=1 really reached the sampler
    stop_id, ref = refs["stop_id"]
    out = c.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=N, temperature=0,
                               extra_body={"stop_token_ids": [stop_id]})
    assert ref.outputs[0].finish_reason == "stop" and len(ref.outputs[0].token_ids) < N
    assert out.choices[0].text == ref.outputs[0].text and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)


@pytest.mark.tasks("11.4", "11.6", "11.7")
def test_16_concurrent_streams(server):
    url, _, state, refs = server

    async def one(c, prompt):
        stream = await c.completions.create(model=NAME, prompt=prompt, max_tokens=N, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
        return "".join([ch.choices[0].text async for ch in stream])

    async def main():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        return await asyncio.wait_for(asyncio.gather(*(one(c, p) for p in PROMPTS)), 60)

    state.engine.step_log.clear()
    texts = asyncio.run(main())
    assert texts == [r.outputs[0].text for r in refs["greedy"]]
    assert max(n for _, n in state.engine.step_log) > 1, "concurrent requests should share steps"


@pytest.mark.tasks("11.2", "11.10")
def test_errors_get_openai_json_and_the_right_status(server):
    url = server[0]
    c = client(url)
    cases = [
        (openai.NotFoundError, 404, dict(model="gpt-9", prompt="hi")),
        (openai.BadRequestError, 400, dict(model=NAME, prompt="hi", temperature=-1)),
        (openai.BadRequestError, 400, dict(model=NAME, prompt="hi", extra_body={"top_k": -2})),
        (openai.BadRequestError, 400, dict(model=NAME, prompt="hi " * MAX_MODEL_LEN)),  # too long
        (openai.BadRequestError, 400, dict(model=NAME, prompt="hi", max_tokens=MAX_MODEL_LEN)),
        (openai.BadRequestError, 400, dict(model=NAME, prompt="hi", n=129)),  # over 128 completions
        (openai.BadRequestError, 400, dict(model=NAME, prompt="hi", stream=True, temperature=-1)),
    ]
    for cls, status, kwargs in cases:
        with pytest.raises(cls) as e:
            c.completions.create(**kwargs)
        assert e.value.status_code == status, kwargs
        assert e.value.body["message"] and e.value.body["type"], e.value.body
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-9", messages=CHAT[0])
    for body in ("{'model': oops", '{"model": "tiny", "prompt": "hi", "max_tokens": "many"}',
                 '{"prompt": "no model"}', "[1, 2]"):
        r = httpx.post(url + "/v1/completions", content=body,
                       headers={"content-type": "application/json"})
        assert r.status_code in (400, 422) and r.json()["error"]["message"], (body, r.text)
    r = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": "not a list"})
    assert r.status_code in (400, 422) and "error" in r.json()
    ok = c.completions.create(model=NAME, prompt="still there?", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2, "the server must keep serving after errors"


@pytest.mark.tasks("11.3", "11.7", "11.17")
def test_disconnect_aborts_and_frees_blocks(server, monkeypatch):
    url, llm, _, refs = server
    total = llm.runner.num_kvcache_blocks
    aborted = []
    real_abort = llm.abort_request
    monkeypatch.setattr(llm, "abort_request", lambda rid: (aborted.append(rid), real_abort(rid)))
    body = {"model": NAME, "prompt": "Count forever:", "max_tokens": MAX_MODEL_LEN - 16,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        for _ in range(5):
            next(lines)
    rid = first.split('"id": "cmpl-')[1].split('"')[0]  # the engine's id (an int today, vLLM: a str)
    deadline = time.monotonic() + 20
    while llm.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [str(a) for a in aborted] == [rid], "the hung-up request was not aborted"
    assert not llm.has_unfinished_requests()
    assert llm.scheduler.block_manager.num_free_blocks == total, "the aborted request kept KV blocks"
    out = client(url).completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=N, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].text == refs["greedy"][0].outputs[0].text


@pytest.mark.tasks("11.4", "11.5")
def test_sigterm_stops_the_server(tiny_model, tmp_path):
    proc, url, log = launch_on_free_port(
        tiny_model, tmp_path, "--threads", "1", "--max-model-len", str(MAX_MODEL_LEN), timeout=90
    )
    port = int(url.rsplit(":", 1)[1])
    try:
        c = client(url)
        (model,) = [m.id for m in c.models.list()]
        assert model == tiny_model  # the served name defaults to MODEL, as in vLLM
        reply = c.chat.completions.create(model=model, messages=CHAT[0], max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens == 4
        stream = httpx.stream("POST", url + "/v1/completions", timeout=30, json={
            "model": model, "prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True})
        with stream as r:  # SIGTERM while a stream is open
            next(r.iter_lines())
            kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        print(log.read()[-3000:])
    assert proc.returncode in (0, -signal.SIGTERM), proc.returncode
    with pytest.raises(ConnectionRefusedError):  # nobody listens on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.socket() as s:  # and a new server could take it (as uvicorn does: SO_REUSEADDR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    for pid in map(int, kids.stdout.split()):  # whatever the server started is gone too
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.tasks("11.31", "11.32", "11.33")
def test_bench_cli_parses_and_reports(server):
    """The serving benchmark against the running server: every request counted, numbers finite."""
    from cleanvllm.serve import bench_serving

    url = server[0]
    row = asyncio.run(bench_serving(url, NAME, rate=50.0, num_prompts=6, input_len=8, output_len=5))
    assert row["requests"] == 6 and row["output_tok_s"] > 0
    assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] and 0 < row["itl_p50_ms"] <= row["itl_p99_ms"]
    assert row["output_tok_s"] == pytest.approx(6 * 5 / row["duration_s"], rel=0.02)



@pytest.mark.tasks("11.9")
def test_unsupported_fields_are_refused_not_ignored(server):
    """vLLM's prompt_logprobs streamed (they come beside the choices of one reply): 400, not a reply
    without them; top_logprobs without logprobs: 400 as OpenAI; max_completion_tokens=0 is a bad
    value, not 'no limit'. (test_serve_api.py: every other field; test_serve_echo.py: echo.)"""
    url = server[0]
    c = client(url)
    cases = [
        lambda: c.completions.create(model=NAME, prompt="hi", max_tokens=2, stream=True,
                                     extra_body={"prompt_logprobs": 1}),
        lambda: c.completions.create(model=NAME, prompt="hi", max_tokens=2, logprobs=21),
        lambda: c.chat.completions.create(model=NAME, messages=CHAT[0], max_tokens=2, top_logprobs=2),
        lambda: c.chat.completions.create(model=NAME, messages=CHAT[0], max_tokens=2, logprobs=True,
                                          top_logprobs=21),
        lambda: c.chat.completions.create(model=NAME, messages=CHAT[0], max_completion_tokens=0),
    ]
    for i, call in enumerate(cases):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.status_code == 400 and e.value.body["message"], i
    ok = c.chat.completions.create(model=NAME, messages=CHAT[0], max_tokens=2, logprobs=False)
    assert ok.usage.completion_tokens == 2


@pytest.mark.tasks("11.3", "11.18")
def test_non_streamed_disconnect_aborts(server, monkeypatch):
    """A client that gives up on a non-streamed reply (a timeout) must not leave its request running."""
    url, llm, _, refs = server
    total = llm.runner.num_kvcache_blocks
    aborted = []
    real_abort = llm.abort_request
    monkeypatch.setattr(llm, "abort_request", lambda rid: (aborted.append(rid), real_abort(rid)))
    body = {"model": NAME, "prompt": "Count forever:", "max_tokens": MAX_MODEL_LEN - 16,
            "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 20
    while llm.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(aborted) == 1, "the request of the client that hung up ran on to max_tokens"
    assert llm.scheduler.block_manager.num_free_blocks == total
    out = client(url).completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=N, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].text == refs["greedy"][0].outputs[0].text


@pytest.mark.tasks("11.24")
def test_request_cannot_replace_the_chat_template(server):
    """A template sent in the request runs on the server's event loop (a nested loop stalls every
    connection): refused with 400; the template's own options still pass."""
    url = server[0]
    c = client(url)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=NAME, messages=CHAT[0], max_tokens=2, extra_body={
            "chat_template_kwargs": {"chat_template": "{% for i in range(9) %}{% endfor %}hi"}})
    assert "chat_template" in e.value.body["message"]
    ok = c.chat.completions.create(model=NAME, messages=CHAT[0], max_tokens=2, extra_body={
        "chat_template_kwargs": {"enable_thinking": False}})
    assert ok.usage.completion_tokens == 2


def test_unknown_path_and_method_get_openai_errors(server):
    """Every error leaves in OpenAI's format, routing errors included (FastAPI's is {"detail": ...})."""
    url = server[0]
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                 ("DELETE", "/v1/models", 405)]:
        r = httpx.request(method, url + path, timeout=10)
        assert r.status_code == status, (method, path)
        assert r.json()["error"]["message"] and r.json()["error"]["code"] == status, r.text
    with pytest.raises(openai.NotFoundError):
        client(url).with_options(base_url=url + "/v2").models.list()
