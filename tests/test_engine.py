"""The engine end to end on the tiny checkpoint (CPU), against Hugging Face transformers."""
import random

import pytest

from cleanvllm.block_manager import BlockManager
from cleanvllm.engine import fill
from cleanvllm.llm import LLM
from cleanvllm.model_runner import PENDING
from cleanvllm.sampling_params import SamplingParams
from cleanvllm.scheduler import Scheduler
from cleanvllm.sequence import Sequence, SequenceStatus
from cleanvllm.simulate import FakeModel, simulate
from conftest import hf_greedy, prompts

CHAPTERS = ("08",)  # `make check CH=08` runs this file (tools/check.py)

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model, device="cpu", kvcache_block_size=16, max_num_seqs=16, max_model_len=512) as engine:
        yield engine


@pytest.mark.tasks("8.15", "8.19", "8.24")
def test_greedy_matches_transformers(llm, hf_model):
    ps = prompts([1, 5, 17, 33, 64, 100])
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf_model, p, 32)
        assert o.outputs[0].finish_reason == "length" and o.prompt_token_ids == p
    assert llm.scheduler.block_manager.num_free_blocks == llm.runner.num_kvcache_blocks


@pytest.mark.tasks("8.13", "8.15", "8.19")
def test_prefix_cache_hits_keep_outputs(llm, hf_model):
    shared = prompts([48])[0]  # three full blocks of 16
    ps = [shared + tail for tail in prompts([5, 20, 1], seed=1)] + [shared]
    llm.generate([shared + [7]], GREEDY, use_tqdm=False)  # fill the prefix cache
    seqs = []
    for p in ps:
        rid = llm.add_request(p, GREEDY)
        seqs.append(llm.requests[rid].seq)
    outs = {}
    cached = {}
    while llm.has_unfinished_requests():
        for s in seqs:
            if s.seq_id not in cached and s.block_table:
                cached[s.seq_id] = s.num_cached_tokens
        for o in llm.step():
            outs[o.request_id] = o
    assert all(c >= 32 for c in cached.values())  # the shared blocks were hits
    for s, p in zip(seqs, ps):
        assert outs[str(s.seq_id)].outputs[0].token_ids == hf_greedy(hf_model, p, 32)


@pytest.mark.tasks("8.15", "8.19", "8.24")
def test_preemption_and_chunking_keep_outputs(tiny_model, hf_model):
    ps = prompts([30, 70, 12, 90, 45, 60, 8, 100])
    with LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=160, num_kvcache_blocks=12,
             max_num_batched_tokens=64) as small:
        outs = small.generate(ps, GREEDY, use_tqdm=False)
        assert small.scheduler.num_preemptions > 0
        assert small.scheduler.block_manager.num_free_blocks == 12
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf_model, p, 32)


@pytest.mark.tasks("8.24")
def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    p = prompts([10])[0]
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    mixed = llm.generate(prompts([7, 30], seed=5) + [p], [others, others, sp], use_tqdm=False)[2].outputs[0].token_ids
    assert alone == mixed
    other_seed = llm.generate([p], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20,
                                                 ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


@pytest.mark.tasks("8.10", "8.17", "8.19")
def test_stop_token_ids_and_min_tokens(llm, hf_model):
    p = prompts([12], seed=3)[0]
    ref = hf_greedy(hf_model, p, 32)
    stop_tok = ref[5]
    first = ref.index(stop_tok)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[stop_tok]),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref[:first + 1] and out.outputs[0].finish_reason == "stop"
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=32, min_tokens=first + 1,
                                           stop_token_ids=[stop_tok]), use_tqdm=False)[0]
    # vLLM: before min_tokens the stop token is masked out of sampling (the greedy choice there
    # becomes the runner-up); the same prefix, then no stop token among the first min_tokens
    assert out.outputs[0].token_ids[:first] == ref[:first] and out.outputs[0].token_ids[first] != stop_tok
    assert stop_tok not in out.outputs[0].token_ids[: first + 1]
    if out.outputs[0].finish_reason == "stop":
        assert out.outputs[0].token_ids[-1] == stop_tok and len(out.outputs[0].token_ids) > first + 1
    else:
        assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 32


@pytest.mark.tasks("8.7", "8.8", "8.10", "8.11")
def test_stop_strings_end_text_before_the_stop(llm, hf_model):
    p = prompts([9], seed=4)[0]
    ref = hf_greedy(hf_model, p, 32)
    full = llm.tokenizer.decode(ref, skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=32, stop=stop), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].text == full[: full.find(stop)]
    assert out.outputs[0].token_ids == ref[: len(out.outputs[0].token_ids)] and len(out.outputs[0].token_ids) < 32


@pytest.mark.tasks("8.2", "8.23", "8.25")
def test_string_prompts_and_chat(llm):
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=4), use_tqdm=False)
    assert [o.prompt for o in outs] == ["Hello", "The capital of France is"]
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("Hello")
    chat = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=3), enable_thinking=False,
                    use_tqdm=False)
    tmpl = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
    assert chat[0].prompt == tmpl and "<think>" in tmpl  # Qwen3 writes an empty think block when off


def _stream(llm, requests):
    """Add (prompt, params) requests, step to the end; return {request_id: [outputs in order]}."""
    ids = [llm.add_request(p, sp) for p, sp in requests]
    seen = {i: [] for i in ids}
    while llm.has_unfinished_requests():
        for o in llm.step():
            seen[o.request_id].append(o)
    return ids, seen


@pytest.mark.tasks("8.6", "8.12", "8.15", "8.19", "8.22")
def test_step_reports_every_token_once_and_finishes_once(tiny_model, hf_model):
    ps = prompts([40, 3, 25], seed=7)
    lens = [5, 9, 2]
    # 32-token budget: the 40-token prompt is prefilled in two chunks, the first gives no token
    with LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=256,
             max_num_batched_tokens=32) as llm:
        ids, seen = _stream(llm, [(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
                                  for p, n in zip(ps, lens)])
        assert llm.step() == [] and not llm.has_unfinished_requests()
        assert llm.scheduler.block_manager.num_free_blocks == llm.runner.num_kvcache_blocks
    for rid, p, n in zip(ids, ps, lens):
        outs = seen[rid]
        ref = hf_greedy(hf_model, p, n)
        assert [o.outputs[0].token_ids for o in outs] == [ref[:k] for k in range(1, n + 1)]  # one per token
        assert [o.finished for o in outs] == [False] * (n - 1) + [True]
        assert [o.outputs[0].finish_reason for o in outs] == [None] * (n - 1) + ["length"]
        final = outs[-1].outputs[0].text
        assert final == hf_model_tokenizer_decode(tiny_model, ref)
        for o in outs:  # streamed text only grows, never shows half a character
            assert final.startswith(o.outputs[0].text) and not o.outputs[0].text.endswith("\ufffd")


def hf_model_tokenizer_decode(model_dir, ids):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).decode(ids, skip_special_tokens=True)


@pytest.mark.tasks("8.15", "8.19", "8.22")
def test_last_step_stats(llm):
    ps = prompts([11, 6], seed=8)
    for p in ps:
        llm.add_request(p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    stats = []
    while llm.has_unfinished_requests():
        llm.step()
        s = llm.last_step
        stats.append((s.is_prefill, s.num_tokens, s.num_seqs))
    assert stats == [(True, 17, 2), (False, 2, 2), (False, 2, 2)]


@pytest.mark.tasks("8.6")
def test_incremental_text_never_splits_a_character(llm):
    from cleanvllm.input_processor import Request
    from cleanvllm.sequence import Sequence

    text = "Snow \u2744 and \u96ea fall \U0001f389 done"
    ids = llm.tokenizer.encode(text)
    assert len(ids) > len(text.split())  # some characters take several byte tokens
    req = Request(Sequence([0], GREEDY, 16), None)
    shown = []
    for t in ids:
        req.seq.append_token(t)
        llm.outputs._detokenize(req)
        shown.append(req.text)
    assert req.text == text
    assert all(text.startswith(s) and not s.endswith("\ufffd") for s in shown)


@pytest.mark.tasks("8.7", "8.11")
def test_streamed_text_never_shows_what_a_stop_string_takes_back(llm, hf_model):
    p = prompts([9], seed=4)[0]
    ref = hf_greedy(hf_model, p, 32)
    full = llm.tokenizer.decode(ref, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    _, seen = _stream(llm, [(p, SamplingParams(temperature=0, max_tokens=32, stop=[stop]))])
    (outs,) = seen.values()
    final = outs[-1]
    assert final.finished and final.outputs[0].finish_reason == "stop"
    assert final.outputs[0].text == full[: full.find(stop)]
    assert all(final.outputs[0].text.startswith(o.outputs[0].text) for o in outs)  # nothing shown is taken back


@pytest.mark.tasks("8.7", "8.8")
def test_stop_matcher_is_right_and_its_cost_per_character_ignores_the_stop_set():
    """The engine thread runs the stop-string automaton on every new character of a request with
    stop strings; its cost must not grow with the number or length of the stop strings (issue 21)."""
    import random
    import time

    from cleanvllm.stop_strings import StopMatcher

    rng = random.Random(0)
    for _ in range(300):  # against the definitions, text fed in pieces as tokens arrive
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(3)]
        m, text, state, start = StopMatcher(stops), "", 0, 0
        for _ in range(4):
            text += "".join(rng.choice("abc") for _ in range(rng.randint(0, 3)))
            held = max((k for s in stops for k in range(1, len(s)) if k <= len(text)
                        and text.endswith(s[:k])), default=0)
            hits = [i for s in stops for i in range(len(text)) if text.startswith(s, i)
                    and i + len(s) > start]
            state, hit = m.feed(state, text, start)
            assert (m.hold[state], hit) == (held, min(hits, default=None)), (text, stops, start)
            start = len(text)
    text = "".join(rng.choice("abcdefgh ") for _ in range(20_000))

    def cost(n, length):  # seconds per character, best of 5
        m = StopMatcher(["".join(rng.choice("abcdefgh ") for _ in range(length)) for _ in range(n)])
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            m.feed(0, text, 0)
            runs.append(time.perf_counter() - t0)
        return min(runs)

    small, big = cost(1, 8), cost(128, 64)
    # a cost linear in the stop set would be ~1000x (8,192 characters against 8); the automaton's
    # bigger tables cost a few times more per character (cache misses), measured 1.5-3.6x on a busy
    # 2-core machine
    assert big < 10 * small, f"128 stops of 64 chars cost {big / small:.1f}x one stop string"


@pytest.mark.tasks("8.10", "8.11", "8.24")
def test_generate_text_is_the_streamed_text_with_and_without_stop_strings(llm, hf_model):
    """generate() skips the text of its own running requests until they finish (quiet); the final
    text must still be what step() streams, and a full decode of the tokens when nothing stops it."""
    ps = prompts([7, 12, 5], seed=11)
    refs = [hf_greedy(hf_model, p, 24) for p in ps]
    fulls = [llm.tokenizer.decode(r, skip_special_tokens=True) for r in refs]
    stop = fulls[1][len(fulls[1]) // 2 : len(fulls[1]) // 2 + 3]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=["\x00never"])]
    outs = llm.generate(ps, params, use_tqdm=False)
    _, seen = _stream(llm, list(zip(ps, params)))
    streamed = [o[-1] for o in seen.values()]
    for out, st in zip(outs, streamed):
        assert (out.outputs[0].text, out.outputs[0].token_ids, out.outputs[0].finish_reason) == (st.outputs[0].text, st.outputs[0].token_ids, st.outputs[0].finish_reason)
    assert outs[0].outputs[0].text == fulls[0] and outs[2].outputs[0].text == fulls[2]  # by the tokenizer, at once
    assert outs[1].outputs[0].finish_reason == "stop" and outs[1].outputs[0].text == fulls[1][: fulls[1].find(stop)]


@pytest.mark.tasks("8.24")
def test_generate_leaves_the_outputs_of_earlier_requests_to_step(llm, hf_model):
    """generate() consumes only its own outputs: a request added before it, which finishes during
    the call, is still reported by the next step()."""
    p = prompts([6], seed=11)[0]
    rid = llm.add_request(p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    mine = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.generate(prompts([4], seed=12), mine, use_tqdm=False)
    done = []
    while llm.has_unfinished_requests():
        done += [o for o in llm.step() if o.finished]
    assert [o.request_id for o in done] == [rid], "generate() swallowed an earlier request's output"
    assert done[0].outputs[0].token_ids == hf_greedy(hf_model, p, 3)


@pytest.mark.tasks("8.6")
def test_fast_decode_gives_what_the_tokenizer_gives(tiny_model):
    """fast_decode calls the Rust backend directly; its text must be the tokenizer's own decode for
    any ids (special tokens, byte pieces of a character, both skip settings), and a tokenizer that
    asks for its spaces cleaned up keeps transformers' decode, which decides whether to."""
    import random

    from transformers import AutoTokenizer

    from cleanvllm.output_processor import fast_decode
    from cleanvllm.smollm2 import smollm2_dir

    dirs = [tiny_model] + ([str(smollm2_dir())] if smollm2_dir().exists() else [])
    rng = random.Random(0)
    for d in dirs:
        tok = AutoTokenizer.from_pretrained(d)
        decode = fast_decode(tok)
        special = sorted(tok.all_special_ids)
        text = tok.encode("Snow ❄ and 雪 fall, " * 3)
        for _ in range(300):
            ids = [rng.choice([rng.randrange(len(tok)), rng.choice(special), rng.choice(text)])
                   for _ in range(rng.randrange(1, 12))]  # fmt: skip
            for skip in (True, False):
                assert decode(ids, skip) == tok.decode(ids, skip_special_tokens=skip), (d, ids, skip)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.clean_up_tokenization_spaces = True  # (transformers decides whether a BPE tokenizer obeys)
    ids = tok.encode("Hello , world .")
    assert fast_decode(tok)(ids, True) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.tasks("8.14")
def test_token_texts_are_batch_decode_of_each_id_alone_and_remembered(tiny_model):
    """A logprob's decoded_token is its id's text alone, as tokenizer.batch_decode([[id], ...])
    gives it (special tokens kept, a byte piece of a character as the tokenizer shows it); the
    texts are remembered, so an id is decoded once however often logprobs name it."""
    import random

    from transformers import AutoTokenizer

    from cleanvllm.output_processor import OutputProcessor

    tok = AutoTokenizer.from_pretrained(tiny_model)
    out = OutputProcessor(tok, scheduler=None, requests={})
    calls = []
    decode = out.decode
    out.decode = lambda ids, skip: calls.append(ids) or decode(ids, skip)
    rng = random.Random(1)
    pieces = tok.encode("Snow ❄ and 雪 fall, ") + sorted(tok.all_special_ids)
    ids = [rng.choice([rng.randrange(len(tok)), rng.choice(pieces)]) for _ in range(400)]
    assert out.token_texts(ids) == tok.batch_decode([[t] for t in ids])
    assert sorted(c[0] for c in calls) == sorted(set(ids)) and all(len(c) == 1 for c in calls)
    assert out.token_texts(ids[::-1]) == tok.batch_decode([[t] for t in ids[::-1]])
    assert len(calls) == len(set(ids))  # the second time: no decode at all


@pytest.mark.tasks("8.24")
def test_the_progress_bar_shows_each_kind_of_steps_rate_over_the_call(tiny_model, monkeypatch):
    """generate's bar shows prefill and decode tokens over the time spent in such steps so far. With
    the overlapped loop a step whose tokens were ready when asked takes ~0 s; shown alone, its rate
    was absurd (10,374 decode tok/s for the tiny model on this CPU). A stand-in step and clock: a
    prefill of 10 tokens in 1 s, a decode of 4 in 1 s, a decode of 4 in 1 us: decode 8 / 1.000001 s."""
    import time
    from types import SimpleNamespace

    import cleanvllm.engine as engine_module
    from cleanvllm.engine import StepStats

    ticks = iter([0.0, 1.0, 1.0, 2.0, 2.0, 2.000001])
    clock = {k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    steps = iter([(True, 10, False), (False, 4, False), (False, 4, True)])

    def step(quiet):
        is_prefill, n, done = next(steps)
        llm.last_step = StepStats(is_prefill, n, 1)
        return [SimpleNamespace(request_id=rid, finished=True) for rid in quiet] if done else []

    shown = []

    class Bar:
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n):
            pass

        def set_postfix(self, ordered_dict=None, **kw):
            shown.append(dict(ordered_dict or {}, **kw))

        def close(self):
            pass

    with LLM(tiny_model, device="cpu", kvcache_block_size=16, max_num_seqs=4, max_model_len=64) as llm:
        with monkeypatch.context() as m:  # its own engine: the request is left unrun
            m.setattr(engine_module, "time", SimpleNamespace(**dict(clock, perf_counter=lambda: next(ticks))))
            m.setattr(engine_module, "tqdm", Bar)
            m.setattr(llm, "_step", step)
            llm.generate(["Hello"], SamplingParams(max_tokens=3))
    assert shown[-1] == {"prefill": "10 tok/s", "decode": "8 tok/s"}, shown
    assert shown[1]["decode"] == "4 tok/s", shown


@pytest.mark.tasks("8.36")
def test_fill_keeps_what_ended_a_sequence_before_its_value_came():
    """By hand: four sequences counted with PENDING tokens, then each gets the stop token 7. One was
    finished by max_tokens when counted, one aborted and one preempted since; one still runs."""
    sch = Scheduler(4, 64, BlockManager(8, 4))
    seqs = [Sequence([1, 2], SamplingParams(max_tokens=n, stop_token_ids=[7]), block_size=4) for n in (1, 3, 3, 3)]
    for s in seqs:
        sch.add(s)
    step, _ = sch.schedule()
    sch.postprocess(step, [PENDING] * len(step))
    by_length, aborted, preempted, running = step
    sch.abort(aborted)
    sch.preempt(preempted)
    assert fill(sch, step, [7, 7, 7, 7]) == step
    assert [s.finish_reason for s in step] == ["length", "abort", "stop", "stop"]
    assert [s.completion_token_ids for s in step] == [[7]] * 4
    assert not sch.running and not sch.waiting and sch.block_manager.num_free_blocks == 8
    assert fill(sch, step, [1, 1, 1, 1]) == [], "a second fill changes nothing"


def _stop_workload(seed, n=24, bs=8):
    rng = random.Random(seed)
    seqs = []
    for _ in range(n):
        m = rng.randint(1, 30)
        sp = SamplingParams(max_tokens=m, stop_token_ids=[rng.randint(0, 49)], min_tokens=rng.randint(0, min(m, 3)))
        seqs.append(Sequence([rng.randint(0, 49) for _ in range(rng.randint(1, 40))], sp, block_size=bs))
    return seqs


def _overlapped(sch: Scheduler, seqs: list[Sequence], model: FakeModel) -> None:
    """The overlapped loop on chapter 4's fake model: a step is scheduled and run before the one
    before it is filled; it is counted with PENDING tokens, and filled one step later."""
    for s in seqs:
        sch.add(s)
    in_flight = None  # (sequences, their sampled tokens): run, not yet filled
    while not sch.is_finished() or in_flight:
        batch = sch.schedule()[0] if not sch.is_finished() else []
        sampled = dict(zip(map(id, in_flight[0]), in_flight[1])) if in_flight else {}
        pending = [s for s in batch if s.token_ids[-1] == PENDING]
        for s in pending:  # the device reads the value the step before sampled; the host does not
            s.token_ids[-1] = sampled[id(s)]
        out = model.execute(batch)
        for s in pending:
            s.token_ids[-1] = PENDING
        if in_flight:
            fill(sch, *in_flight)
        live = [s for s in batch if s.status == SequenceStatus.RUNNING]
        sch.postprocess(live, [PENDING] * len(live))
        in_flight = (batch, out) if batch else None


@pytest.mark.tasks("4.8", "8.36")
@pytest.mark.parametrize("seed", range(3))
def test_counting_pending_tokens_then_filling_them_changes_no_output(seed):
    """Stop tokens, min_tokens, max_tokens, chunked prefill and preemption in a small pool: the
    overlapped loop (count with PENDING, fill a step later) gives the plain loop's tokens and
    reasons, and leaves every block free."""
    runs = []
    for overlap in (False, True):
        sch, seqs = Scheduler(6, 32, BlockManager(24, 8)), _stop_workload(seed)
        model = FakeModel(24, 8, vocab=50)
        _overlapped(sch, seqs, model) if overlap else simulate(sch, seqs, model)
        runs.append([(s.completion_token_ids, s.finish_reason) for s in seqs])
        assert sch.block_manager.num_free_blocks == 24 and sch.is_finished()
        assert all(PENDING not in s.token_ids for s in seqs)
    assert runs[1] == runs[0]
    assert {r for _, r in runs[0]} == {"stop", "length"}, "the workload should end both ways"
