"""The overlapped loop (chapter 8, step 5b) on the CPU: the same code path as on a GPU (launch the
next step, reading its PENDING input ids on the device, then collect the one before), so its
bookkeeping is checked here against the plain loop."""
import pytest

from cleanvllm.llm import LLM
from cleanvllm.sampling_params import SamplingParams
from conftest import pool_is_sound, prompts


@pytest.fixture(scope="module")
def engines(tiny_model):
    kw = dict(device="cpu", kvcache_block_size=16, max_num_seqs=8, max_model_len=256)
    with LLM(tiny_model, async_scheduling=True, **kw) as on, LLM(tiny_model, async_scheduling=False, **kw) as off:
        yield on, off


def test_same_outputs_with_every_kind_of_request(engines):
    """Greedy, seeded sampling with top-p, min_tokens against a stop token, a stop string, and lengths
    that end on different steps: async on and off give the same tokens, texts and reasons."""
    on, off = engines
    ps = prompts([3, 40, 17, 9, 64, 25])
    greedy = off.generate(ps[:1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    sps = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.8, seed=11, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, min_tokens=6, stop_token_ids=[greedy.outputs[0].token_ids[2]]),
        SamplingParams(temperature=0, max_tokens=40, stop=[greedy.outputs[0].text[5:8]], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=5, min_p=0.05, max_tokens=33, ignore_eos=True),
    ]
    ps[3] = ps[0]  # the stop string comes from this prompt's own greedy text
    got = {}
    for llm in (on, off):
        outs = llm.generate(ps, sps, use_tqdm=False)
        got[llm is on] = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]
        assert llm.scheduler.block_manager.num_free_blocks == llm.runner.num_kvcache_blocks
        pool_is_sound(llm)
    assert got[True] == got[False]
    assert got[True][3][2] == "stop" and got[True][4][0] and len(got[True][4][0]) == 1


def test_adding_and_aborting_while_a_step_is_pending(engines):
    """step() by hand: abort one request while a step in flight holds it, add another; the
    others' tokens equal the plain loop's, the aborted one ends 'abort', no block is lost."""
    on, off = engines
    ps = prompts([12, 30, 7, 20], seed=3)
    sp = SamplingParams(temperature=0, max_tokens=18, ignore_eos=True)
    runs = {}
    for llm in (on, off):
        ids = [llm.add_request(p, sp) for p in ps[:3]]
        done, pending_seen = {}, False
        for step in range(40):
            if not llm.has_unfinished_requests():
                break
            for o in llm.step():
                if o.finished:
                    done[o.request_id] = (o.outputs[0].token_ids, o.outputs[0].finish_reason)
            pending_seen |= bool(llm.in_flight)
            if step == 4:
                llm.abort_request(ids[1])
                ids.append(llm.add_request(ps[3], sp))
            pool_is_sound(llm)
        assert not llm.has_unfinished_requests()
        assert pending_seen == (llm is on)
        runs[llm is on] = [done.get(i, ("aborted", None)) for i in ids]
        assert llm.scheduler.block_manager.num_free_blocks == llm.runner.num_kvcache_blocks
    assert runs[True][0] == runs[False][0] and runs[True][2:] == runs[False][2:]
    assert all(len(t) == 18 for t, _ in [runs[True][0], *runs[True][2:]])


def test_a_pending_step_whose_sequences_all_ended_is_drained(engines):
    """The last step launched may hold only sequences that then stopped on a stop token: the next
    step() waits for it, drops its tokens, and does the next real work (or reports nothing)."""
    on, _ = engines
    p = prompts([10], seed=7)[0]
    first = on.generate([p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    out = on.generate([p], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[first.outputs[0].token_ids[3]]),
                      use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].token_ids == first.outputs[0].token_ids[:4]
    assert all(s.is_finished for step in on.in_flight for s in step.seqs)
    assert on.step() == [] and not on.in_flight
    assert on.scheduler.block_manager.num_free_blocks == on.runner.num_kvcache_blocks
    nxt = on.generate([p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert nxt.outputs[0].token_ids == first.outputs[0].token_ids


def test_each_call_returns_the_tokens_of_one_step(engines):
    """A request alone: the prefill gives its first token, each decode step one more, and each
    step() call returns exactly one new token in both loops (max_tokens calls in all)."""
    on, off = engines
    for llm in (on, off):
        for n, p in zip((1, 5, 9), prompts([6, 21, 14], seed=4)):
            rid = llm.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            got = []
            while llm.has_unfinished_requests():
                (out,) = [o for o in llm.step() if o.request_id == rid]
                got.append((len(out.outputs[0].token_ids), out.finished))
            assert got == [(k, k == n) for k in range(1, n + 1)], (llm is on, got)
            assert not llm.in_flight


def generate_aborted_at_call(engines, max_tokens: int, call: int = 4):
    """One greedy request through generate() on the overlapped engine, aborted at the start of the
    call-th step (the 4th: the 4th token was counted at the end of the 3rd and is still on the
    device). Returns (its output, (newest token, finish reason) of each sequence in flight at the
    abort, the plain loop's output of the same request)."""
    on, off = engines
    (p,) = prompts([14], seed=9)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    (full,) = off.generate([p], sp, use_tqdm=False)
    real_step, calls, held = on._step_overlapped, [], []

    def step_then_abort(outputs, quiet):
        calls.append(1)
        if len(calls) == call:
            held.extend((s.token_ids[-1], s.finish_reason) for step in on.in_flight for s in step.seqs)
            on.abort_request(next(iter(on._generating)))
        return real_step(outputs, quiet)

    on._step_overlapped = step_then_abort
    try:
        (out,) = on.generate([p], sp, use_tqdm=False)
    finally:
        del on._step_overlapped
    return out.outputs[0], held, full.outputs[0]


@pytest.mark.tasks("8.5")
def test_an_abort_while_a_token_is_in_flight_reports_only_the_tokens_known(engines):
    """generate() waits for a request that is aborted while a step in flight holds its newest token
    (PENDING): its output ends 'abort' with the tokens known so far, a prefix of the plain loop's
    tokens, and never the placeholder."""
    out, held, full = generate_aborted_at_call(engines, max_tokens=30)
    assert held == [(-1, None)], held  # the abort came while the newest token was on the device
    assert out.finish_reason == "abort" and 0 < len(out.token_ids) < 30, (out.finish_reason, out.token_ids)
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    on = engines[0]
    assert not on.has_unfinished_requests() and on.step() == []
    assert on.scheduler.block_manager.num_free_blocks == on.runner.num_kvcache_blocks


@pytest.mark.tasks("8.5")
def test_an_abort_after_the_last_token_was_counted_ends_abort_without_it(engines):
    """A request that reached max_tokens when its last token was counted (still on the device) and
    is then aborted: generate() gets the tokens known, a prefix of the plain loop's, ending 'abort'
    (not 'length' with a token short), and the engine is idle at once."""
    out, held, full = generate_aborted_at_call(engines, max_tokens=4)
    assert held == [(-1, "length")], held
    assert (out.token_ids, out.finish_reason) == (full.token_ids[:3], "abort")
    on = engines[0]
    assert not on.has_unfinished_requests() and on.step() == []
    assert on.scheduler.block_manager.num_free_blocks == on.runner.num_kvcache_blocks
