"""n > 1 (parallel sampling, issue 23): n samples of one prompt are n requests that share the
prompt's full KV blocks through the prefix cache's reference counts, reported as one output.
References: n separate seeded requests (the issue's definition: sample i uses seed + i, as vLLM),
and transformers' greedy output. CPU, tiny model."""

import pytest

from cleanvllm.engine import LLMEngine
from cleanvllm.llm import LLM
from cleanvllm.sampling_params import SamplingParams
from conftest import hf_greedy

CHAPTERS = ("08",)  # `make check CH=08` runs this file (tools/check.py)

BS = 16
KW = dict(device="cpu", dtype="float32", kvcache_block_size=BS, num_kvcache_blocks=64, max_model_len=256)
PROMPT = list(range(200, 200 + 2 * BS + 3))  # two full blocks and a partial one
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=7, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    with LLMEngine(tiny_model, **KW) as e:
        yield e


def clean(e):
    while e.has_unfinished_requests():
        e.step()
    assert e.samples == {} and e.requests == {}


@pytest.mark.tasks("8.34", "8.35")
def test_n_samples_equal_n_seeded_requests_and_share_the_prompt_blocks(engine):
    alone = [engine.generate([PROMPT], SamplingParams(**{**vars(SEEDED), "seed": 11 + i}), use_tqdm=False)[0]
             for i in range(3)]
    clean(engine)
    bm = engine.scheduler.block_manager
    free_before = bm.num_free_blocks
    rid = engine.add_request(PROMPT, SamplingParams(**{**vars(SEEDED), "n": 3}))
    seen, used = [], []
    while engine.has_unfinished_requests():
        seen += engine.step()
        running = engine.scheduler.running
        if len(running) == 3:
            used.append(free_before - bm.num_free_blocks)
            # every sample's table starts with the same two physical blocks, each held three times
            assert len({tuple(s.block_table[:2]) for s in running}) == 1
            assert [bm.blocks[b].ref_count for b in running[0].block_table[:2]] == [3, 3]
    assert used, "the three samples never ran together"
    # 2 shared prompt blocks + one block of its own per sample (prompt tail + 7 tokens < 16 slots)
    assert max(used) == 2 + 3
    assert {o.request_id for o in seen} == {rid}  # the samples' own ids never come out
    last = seen[-1]
    assert last.finished and [c.index for c in last.outputs] == [0, 1, 2]
    assert [c.token_ids for c in last.outputs] == [a.outputs[0].token_ids for a in alone]
    assert [c.text for c in last.outputs] == [a.outputs[0].text for a in alone]
    assert last.prompt_token_ids == PROMPT
    assert bm.num_free_blocks == free_before  # everything given back


@pytest.mark.tasks("8.34", "8.35")
def test_greedy_samples_through_generate_and_chat_match_transformers(tiny_model, hf_model):
    with LLM(tiny_model, **KW) as llm:
        prompts = [PROMPT, PROMPT[:9]]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5, n=2, ignore_eos=True),
                            use_tqdm=False)
        for p, o in zip(prompts, outs):
            want = hf_greedy(hf_model, p, 5)
            assert [c.token_ids for c in o.outputs] == [want, want]
        (chat,) = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3, n=4),
                           use_tqdm=False)
        assert [c.index for c in chat.outputs] == [0, 1, 2, 3]
        assert all(len(c.token_ids) >= 1 and c.finish_reason for c in chat.outputs)


@pytest.mark.tasks("8.34")
def test_abort_ends_every_sample_and_frees_their_blocks(engine):
    clean(engine)
    free = engine.scheduler.block_manager.num_free_blocks
    rid = engine.add_request(PROMPT, SamplingParams(**{**vars(SEEDED), "n": 4, "max_tokens": 50}))
    for _ in range(3):  # sample 0's prefill, then the others start
        engine.step()
    assert len(engine.scheduler.running) == 4
    engine.abort_request(rid)
    engine.abort_request(rid)  # twice: a no-op
    assert not engine.has_unfinished_requests()
    assert engine.samples == {} and engine.requests == {}
    assert engine.scheduler.block_manager.num_free_blocks == free


@pytest.mark.tasks("8.34", "8.35")
def test_abort_during_generate_returns_every_sample_ended(engine):
    """Another thread aborts a request that a generate() call waits for: it gets the request's
    output with all its samples, each finished with 'abort'."""
    clean(engine)
    real_step = engine._step_sync if not engine.overlap else engine._step_overlapped
    calls = []

    def step_then_abort(outputs, quiet):
        calls.append(1)
        if len(calls) == 3:
            engine.abort_request(next(iter(engine.samples)))
        return real_step(outputs, quiet)

    name = "_step_overlapped" if engine.overlap else "_step_sync"
    setattr(engine, name, step_then_abort)
    try:
        (out,) = engine.generate([PROMPT], SamplingParams(**{**vars(SEEDED), "n": 3, "max_tokens": 60}),
                                 use_tqdm=False)
    finally:
        delattr(engine, name)
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort"] * 3
    clean(engine)


@pytest.mark.parametrize("n, why", [(0, "must be an integer >= 1"), (True, "must be an integer >= 1"),
                                    (2.0, "must be an integer >= 1"), (129, "at most 128")])
def test_bad_n_is_refused_naming_the_field(n, why):
    with pytest.raises(ValueError) as e:
        SamplingParams(n=n)
    assert "n" in str(e.value) and why in str(e.value)


def test_best_of_other_than_n_is_refused():
    SamplingParams(n=3, best_of=3)  # equal: accepted, as vLLM
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=2, best_of=4)
