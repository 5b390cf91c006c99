"""Chapter 11's tasks one at a time, without HTTP: the engine-thread bridge and the reply shapes.

The server tests (test_serve*.py) see these pieces only through HTTP, where a request left behind in
the engine can finish before anybody looks. Here the engine is asked directly, right after the
command, and the shapes are read by the `openai` package's own types.
"""

import asyncio

import pytest

openai = pytest.importorskip("openai")

from cleanvllm.llm import LLM  # noqa: E402
from cleanvllm.sampling_params import SamplingParams  # noqa: E402
from cleanvllm.serve import (  # noqa: E402
    AsyncEngine,
    Handle,
    allowed_hosts,
    chat_chunk,
    completion_chunk,
    load_json,
    summarize,
    usage,
)

CHAPTERS = ("11",)  # `make check CH=11` runs this file (tools/check.py)

LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)  # runs for a while on a CPU


@pytest.fixture(scope="module")
def llm(tiny_model):
    engine = LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=512)
    yield engine
    engine.close()


def add_group(eng: AsyncEngine, prompts: list) -> list:
    """Apply one add command for a group of prompts; what each handle received."""

    async def go() -> list:
        loop = asyncio.get_running_loop()
        handles = [Handle(loop) for _ in prompts]
        eng._add_group(handles, prompts, [LONG] * len(prompts))
        return [await asyncio.wait_for(h.queue.get(), 5) for h in handles]

    return asyncio.run(go())


@pytest.mark.tasks("11.2")
def test_a_refused_group_leaves_nothing_in_the_engine(llm):
    eng = AsyncEngine(llm)
    got = add_group(eng, [[1, 2, 3], [5, -1]])  # the second prompt holds an invalid token id
    assert [type(x).__name__ for x in got] == ["ValueError", "ValueError"], got
    assert "prompt 1" in str(got[0]), got[0]
    assert not llm.has_unfinished_requests(), "the group's first prompt stayed in the engine"
    assert not eng.live, eng.live


@pytest.mark.tasks("11.2", "11.3")
def test_an_abort_command_frees_the_blocks_of_a_running_request(llm):
    free = llm.scheduler.block_manager.num_free_blocks
    eng = AsyncEngine(llm)
    (rid,) = add_group(eng, [list(range(1, 40))])
    llm.step()  # the prefill: the request now holds blocks
    assert llm.scheduler.block_manager.num_free_blocks < free
    handle = eng.live[rid]
    eng.inbox.put(("abort", handle))
    eng._take_commands(block=False)
    assert not eng.live and not llm.has_unfinished_requests()
    assert llm.scheduler.block_manager.num_free_blocks == free, "the aborted request kept blocks"


@pytest.mark.tasks("11.15", "11.19", "11.23")
def test_usage_and_chunks_are_what_the_openai_package_reads():
    from openai.types import Completion, CompletionUsage
    from openai.types.chat import ChatCompletionChunk

    counted = CompletionUsage.model_validate(usage(7, 5, 3))
    assert (counted.prompt_tokens, counted.completion_tokens, counted.total_tokens) == (7, 5, 12)
    assert counted.prompt_tokens_details.cached_tokens == 3
    text = Completion.model_validate(completion_chunk("cmpl-1", "m", 0)("Hi", "length", 2))
    assert (text.choices[0].text, text.choices[0].index, text.choices[0].finish_reason) == (
        "Hi",
        2,
        "length",
    )
    chat = chat_chunk("chatcmpl-1", "m", 0)
    assert (
        ChatCompletionChunk.model_validate(chat(None, None, role="assistant")).choices[0].delta.role
        == "assistant"
    )
    assert ChatCompletionChunk.model_validate(chat("Hi", None)).choices[0].delta.content == "Hi"


@pytest.mark.tasks("11.32")
def test_summarize_by_hand():
    results = [
        {"ttft": 0.1, "itl": [0.02, 0.04], "latency": 0.5, "tokens": 3},
        {"ttft": 0.3, "itl": [0.06], "latency": 1.5, "tokens": 2},
    ]
    got = summarize(results, 2.0, 4.0)
    # Little's law: (0.5 + 1.5) s of requests over 2 s = 1 in flight; 5 tokens / 2 s
    assert (got["concurrency"], got["output_tok_s"]) == (1.0, 2.5), got
    assert (got["ttft_p50_ms"], got["itl_p50_ms"], got["itl_p99_ms"]) == (200.0, 40.0, 59.6), got


@pytest.mark.tasks("11.37")
def test_load_json_counts_the_values_inside_objects_and_lists():
    raw = b'[1, [2, 3], {"a": 4, "b": [5]}]'  # [] 1 [] 2 3 {} 4 [] 5: 9 values by hand
    assert load_json(raw, 9) == [1, [2, 3], {"a": 4, "b": [5]}]
    assert load_json(raw, 8) == "the body has more than 8 JSON values"
    assert load_json(b"[1, 2", 9).startswith("the body is not valid JSON")


@pytest.mark.tasks("11.40")
def test_allowed_hosts_by_hand():
    assert allowed_hosts("127.0.0.1", None) == ("127.0.0.1", "localhost", "::1")
    assert allowed_hosts("192.168.1.7", None) == ("192.168.1.7",)
    assert allowed_hosts("0.0.0.0", None) is None
    assert allowed_hosts("127.0.0.1", "*") is None
    assert allowed_hosts("0.0.0.0", "a.example,b.example") == ("a.example", "b.example")
