"""`n` on both endpoints (issue 23): choice i * n + j is sample j of prompt i, each equal to a
request of its own with seed + j (vLLM's rule), streamed chunks joining to the same text, usage
counting each prompt once. The real `openai` client, the tiny checkpoint, CPU."""

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from transformers import AutoTokenizer  # noqa: E402

from cleanvllm.llm import LLM  # noqa: E402
from cleanvllm.serve import AsyncEngine, ServerState  # noqa: E402
from conftest import server_in_thread  # noqa: E402

CHAPTERS = ("11",)  # `make check CH=11` runs this file (tools/check.py)

NAME = "tiny"
PROMPTS = [list(range(300, 340)), list(range(500, 509))]
SAMPLE = dict(temperature=1.0, top_p=0.95, max_tokens=6, seed=5)


@pytest.fixture(scope="module")
def url(tiny_model):
    llm = LLM(tiny_model, device="cpu", dtype="float32", kvcache_block_size=16, max_model_len=256,
              max_num_seqs=8)
    state = ServerState(AsyncEngine(llm), AutoTokenizer.from_pretrained(tiny_model), NAME, 256)
    try:
        with server_in_thread(state) as u:
            yield u
    finally:
        llm.close()


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def alone(c, prompt, seed) -> str:
    (choice,) = c.completions.create(model=NAME, prompt=prompt, **{**SAMPLE, "seed": seed}).choices
    return choice.text


@pytest.mark.tasks("11.21", "8.34", "8.35")
def test_completions_n_per_prompt_equal_seeded_requests_and_count_each_prompt_once(url):
    c = client(url)
    r = c.completions.create(model=NAME, prompt=PROMPTS, n=3, **SAMPLE)
    assert [ch.index for ch in sorted(r.choices, key=lambda ch: ch.index)] == list(range(6))
    got = {ch.index: ch.text for ch in r.choices}
    want = {i * 3 + j: alone(c, p, SAMPLE["seed"] + j) for i, p in enumerate(PROMPTS) for j in range(3)}
    assert got == want
    assert r.usage.prompt_tokens == sum(map(len, PROMPTS))  # once per prompt, not per sample
    assert r.usage.completion_tokens == 6 * SAMPLE["max_tokens"]


@pytest.mark.tasks("11.17", "11.21")
def test_streamed_n_choices_join_to_the_same_texts(url):
    c = client(url)
    whole = c.completions.create(model=NAME, prompt=PROMPTS[0], n=2, **SAMPLE)
    texts, finished = {}, {}
    for chunk in c.completions.create(model=NAME, prompt=PROMPTS[0], n=2, stream=True,
                                      stream_options={"include_usage": True}, **SAMPLE):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                assert ch.index not in finished  # each choice ends once
                finished[ch.index] = ch.finish_reason
        if chunk.usage:
            usage = chunk.usage
    assert texts == {ch.index: ch.text for ch in whole.choices}
    assert finished == {0: "length", 1: "length"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPTS[0]), 2 * SAMPLE["max_tokens"])


@pytest.mark.tasks("11.25")
def test_chat_n_gives_n_messages(url):
    c = client(url)
    messages = [{"role": "user", "content": "Name a colour."}]
    r = c.chat.completions.create(model=NAME, messages=messages, n=3, **SAMPLE)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    for j, ch in enumerate(r.choices):
        (one,) = c.chat.completions.create(model=NAME, messages=messages,
                                           **{**SAMPLE, "seed": SAMPLE["seed"] + j}).choices
        assert ch.message.content == one.message.content
    assert r.usage.completion_tokens == 3 * SAMPLE["max_tokens"]


@pytest.mark.parametrize("n", [0, 129, True])
def test_bad_n_is_a_400_naming_n(url, n):
    with pytest.raises(openai.BadRequestError) as e:
        client(url).completions.create(model=NAME, prompt="hi", max_tokens=2, extra_body={"n": n})
    assert "n" in str(e.value)
