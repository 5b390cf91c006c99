"""Bad input, memory pressure, faults and long runs: nothing is lost, errors name the problem."""
import gc
import os
import random

import pytest
import torch

from cleanvllm.llm import LLM
from cleanvllm.sampling_params import SamplingParams
from conftest import pool_is_sound, hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model, device="cpu", kvcache_block_size=16, max_num_seqs=32, max_model_len=256) as engine:
        yield engine


@pytest.mark.parametrize("prompts,params,message", [
    ([[1, 2], []], GREEDY, r"prompt 1 is empty"),
    ([[1], [5] * 300], GREEDY, r"prompt 1 has 300 tokens.*max_model_len=256"),
    ([[1] * 250], SamplingParams(max_tokens=10), r"prompt 0 has 250 tokens; with max_tokens=10 .* 260 > max_model_len=256"),
    ([[1, 2, 999_999]], GREEDY, r"prompt 0 has token id 999999 at position 2, outside the vocabulary \[0, 151669\)"),
    ([[1, -3]], GREEDY, r"token id -3"),
    ([[1], [2]], [GREEDY], r"2 prompts but 1 sampling params"),
    ([[1]], ["greedy"], r"sampling_params for prompt 0 must be a SamplingParams"),
    ([3.5], GREEDY, r"prompt 0 must be a string, a list of token ids"),
    # issue 13 item 8: None, a bare int, booleans, bad dicts: ValueErrors naming the prompt
    (None, GREEDY, r"prompt 0 must be a string, a list of token ids"),
    (5, GREEDY, r"prompt 0 must be a string, a list of token ids"),
    ([[1, 2], None], GREEDY, r"prompt 1 must be"),
    ([[1, 2], [3, True]], GREEDY, r"prompt 1 must be"),
    ([{"prompt": 3}], GREEDY, r"prompt 0 must be"),
    ([[1], {"text": "hi"}], GREEDY, r"prompt 1 is a dict with keys \['text'\]"),
])
def test_bad_requests_fail_before_any_work_and_engine_stays_usable(llm, prompts, params, message):
    before = (len(llm.requests), llm.scheduler.block_manager.num_free_blocks, llm.scheduler.num_preemptions)
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, params, use_tqdm=False)
    assert (len(llm.requests), llm.scheduler.block_manager.num_free_blocks, llm.scheduler.num_preemptions) == before
    assert not llm.has_unfinished_requests()
    assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8


@pytest.mark.parametrize("kwargs,message", [
    (dict(gpu_memory_utilization=0), r"gpu_memory_utilization=0"),
    (dict(tensor_parallel_size=3), r"tensor_parallel_size=3 .*must divide"),
    (dict(attention_backend="flash"), r"attention_backend"),
    (dict(swap_space=4), r"unknown engine setting\(s\) \['swap_space'\]"),
    (dict(block_size=0), r"kvcache_block_size.*\(block_size is kvcache_block_size here\)"),  # vLLM's name
    (dict(max_model_len=4096, cpu_kvcache_bytes=1 << 20), r"cannot hold one sequence of max_model_len=4096.*cpu_kvcache_bytes"),
])
def test_bad_engine_settings_are_named(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_model, device="cpu", **kwargs)


def test_bad_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "missing"))


def test_memory_pressure_120_requests_match_a_large_cache(tiny_model):
    rng = random.Random(0)
    system = [rng.randint(0, 9999) for _ in range(40)]
    prompts = [(system if i % 3 == 0 else []) + [rng.randint(0, 9999) for _ in range(rng.randint(1, 90))]
               for i in range(120)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in prompts]
    kw = dict(device="cpu", kvcache_block_size=16, max_model_len=160, max_num_seqs=64)
    with LLM(tiny_model, num_kvcache_blocks=10 + 3, **kw) as small:  # one 160-token sequence needs 10 blocks
        tight = small.generate(prompts, params, use_tqdm=False)
        preempted = small.scheduler.num_preemptions
        assert small.scheduler.block_manager.num_free_blocks == 13
    with LLM(tiny_model, **kw) as big:
        roomy = big.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in tight] == [o.outputs[0].token_ids for o in roomy]
    assert [len(o.outputs[0].token_ids) for o in tight] == [p.max_tokens for p in params]
    print(f"preemptions under pressure: {preempted}")
    assert preempted > 0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def test_soak_waves_lose_nothing_and_leak_nothing(llm):
    rng = random.Random(1)
    usage = []
    for wave in range(5):
        ids = {}
        for _ in range(200):
            p = [rng.randint(0, 9999) for _ in range(rng.randint(1, 12))]
            ids[llm.add_request(p, SamplingParams(temperature=0.8, max_tokens=rng.randint(1, 3), ignore_eos=True))] = p
        done = {}
        while llm.has_unfinished_requests():
            for o in llm.step():
                if o.finished:
                    assert o.request_id not in done  # never finished twice
                    done[o.request_id] = o
        assert set(done) == set(ids)
        assert all(done[i].prompt_token_ids == p for i, p in ids.items())
        gc.collect()
        usage.append((len(llm.scheduler.block_manager.used_block_ids), len(llm.requests), len(gc.get_objects()), _open_fds()))
    assert all(u[0] == 0 and u[1] == 0 for u in usage)
    objs, fds = [u[2] for u in usage[1:]], [u[3] for u in usage[1:]]
    assert max(objs) - min(objs) < 2000, usage  # no growth of live Python objects between waves
    assert max(fds) == min(fds), usage


def test_keyboard_interrupt_leaves_the_engine_usable(llm, monkeypatch):
    calls = {"n": 0}
    real = llm.scheduler.postprocess
    def flaky(seqs, tokens):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(seqs, tokens)
    monkeypatch.setattr(llm.scheduler, "postprocess", flaky)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3]] * 5, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert not llm.has_unfinished_requests() and not llm.requests
    assert llm.scheduler.block_manager.num_free_blocks == llm.runner.num_kvcache_blocks
    assert len(llm.generate([[4, 5]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8


# ---- issue 13: request semantics and interrupt safety (engine side) -------------------------
def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 10000, (n,), generator=g).tolist() for n in lengths]  # no 0 (hf pad)


def test_interrupt_right_after_a_request_is_queued_leaves_no_orphans(llm, hf_model, monkeypatch):
    """Item 3: a KeyboardInterrupt just after scheduler.add (before generate's loop runs)."""
    ps = _prompts([4, 6, 8], seed=11)
    real, calls = llm.scheduler.add, {"n": 0}

    def add_then_interrupt(seq):
        real(seq)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(llm.scheduler, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(ps, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert not llm.requests and not llm.scheduler.waiting and not llm.scheduler.running
    assert llm.scheduler.block_manager.num_free_blocks == llm.runner.num_kvcache_blocks
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf_model, p, 8) for p in ps]


# (point, which call of it): the overlapped loop launches a step (schedule, launch), counts it
# (postprocess with PENDING tokens), launches the next, then collects and fills the first
POINTS = [("schedule", 2), ("prepare_batch", 2), ("launch", 1), ("launch", 3), ("collect", 1),
          ("collect", 4), ("postprocess:before", 4), ("postprocess:after", 4), ("fill:before", 3),
          ("fill:after", 3), ("update", 4)]


@pytest.mark.parametrize("point,nth", POINTS)
def test_interrupt_anywhere_in_a_step_loses_nothing(llm, hf_model, monkeypatch, point, nth):
    """Item 3: interrupt generate() at the nth call of each point of a step. Its own requests are
    aborted (twice: idempotent), a request added earlier with add_request survives with exact
    greedy tokens, the pool stays sound, and the next call's outputs are exact."""
    import cleanvllm.engine as engine_module

    ps, other = _prompts([5, 20, 9], seed=12), _prompts([13], seed=13)[0]
    other_id = llm.add_request(other, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    name, _, when = point.partition(":")
    owner = {"prepare_batch": engine_module, "fill": engine_module, "execute": llm.runner, "launch": llm.runner,
             "collect": llm.runner, "update": llm.outputs}.get(name, llm.scheduler)
    real, calls = getattr(owner, name), {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth and when == "before":
            raise KeyboardInterrupt
        result = real(*args, **kwargs)
        if calls["n"] == nth:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, name, interrupted)
    own = []
    real_enqueue = llm._enqueue
    monkeypatch.setattr(llm, "_enqueue", lambda req: own.append(real_enqueue(req)) or own[-1])
    with pytest.raises(KeyboardInterrupt):
        llm.generate(ps, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert calls["n"] >= nth
    for rid in own:
        llm.abort_request(rid)  # again: a no-op
        assert rid not in llm.requests
    pool_is_sound(llm)
    finished = {}
    while llm.has_unfinished_requests():
        finished.update({o.request_id: o for o in llm.step() if o.finished})
        pool_is_sound(llm)
    assert list(finished) == [other_id], "the earlier request was lost or a foreign one appeared"
    assert finished[other_id].outputs[0].token_ids == hf_greedy(hf_model, other, 12)
    assert llm.scheduler.block_manager.num_free_blocks == llm.runner.num_kvcache_blocks
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf_model, p, 8) for p in ps]


def _greedy_text(llm, prompt, n):
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                       use_tqdm=False)[0]
    return out.outputs[0].token_ids, out.outputs[0].text


def test_a_stop_string_before_min_tokens_does_not_cut_the_text(llm):
    """Item 5: stop=[s] where s appears only in the first tokens' text, min_tokens=30."""
    for prompt in _prompts([6, 7, 8, 9, 10], seed=14):
        ids, full = _greedy_text(llm, prompt, 40)
        early = llm.tokenizer.decode(ids[:4], skip_special_tokens=True)
        stops = [early[i:i + 3] for i in range(len(early) - 2)]
        stops = [s for s in stops if s.strip() and "\ufffd" not in s and full.count(s) == 1]
        if stops:
            break
    assert stops, "no usable stop string in these prompts' outputs"
    sp = SamplingParams(temperature=0, max_tokens=40, min_tokens=30, ignore_eos=True, stop=stops[:1])
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert out.outputs[0].text == full and out.outputs[0].finish_reason == "length" and out.outputs[0].token_ids == ids
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                stop=stops[:1]), use_tqdm=False)[0]
    assert cut.outputs[0].text == full[: full.find(stops[0])] and cut.outputs[0].finish_reason == "stop"  # without min


def test_a_stop_string_completed_by_the_last_allowed_token_is_a_stop(llm):
    """Item 5: the max_tokens-th token completes the stop string: finish_reason "stop"."""
    n = 20
    for prompt in _prompts([5, 6, 7, 8, 9, 10, 11], seed=15):
        ids, full = _greedy_text(llm, prompt, n)
        before = llm.tokenizer.decode(ids[: n - 1], skip_special_tokens=True)
        if full.startswith(before) and len(full) > len(before) and len(before) >= 1:
            stop = full[len(before) - 1 :]  # spans the last two tokens
            if "\ufffd" not in stop and full.find(stop) == len(before) - 1:
                break
    else:
        pytest.fail("no prompt whose last token completes a unique stop string")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                                stop=[stop]), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].token_ids == ids
    assert out.outputs[0].text == full[: len(before) - 1]


def test_dict_prompts_have_vllms_meaning(llm):
    """Item 8: {"prompt": text} and {"prompt_token_ids": ids}, alone or in a list."""
    ids = _prompts([6], seed=16)[0]
    plain = llm.generate(["Hello there", ids], GREEDY, use_tqdm=False)
    dicts = llm.generate([{"prompt": "Hello there"}, {"prompt_token_ids": ids}], GREEDY,
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in dicts] == [o.outputs[0].token_ids for o in plain]
    assert dicts[0].prompt == "Hello there" and dicts[1].prompt is None
    assert dicts[0].prompt_token_ids == llm.tokenizer.encode("Hello there")
    (single,) = llm.generate({"prompt": "Hello there"}, GREEDY, use_tqdm=False)
    assert single.prompt == "Hello there" and single.outputs[0].token_ids == plain[0].outputs[0].token_ids


def test_generate_leaves_requests_added_earlier_to_step(llm, hf_model):
    """Item 9: a request added with add_request before generate() is still reported by step()."""
    early = _prompts([10], seed=17)[0]
    rid = llm.add_request(early, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    outs = llm.generate(_prompts([4, 5], seed=18), GREEDY, use_tqdm=False)
    assert len(outs) == 2 and rid not in [o.request_id for o in outs]
    finished = []
    while llm.has_unfinished_requests():
        finished += [o for o in llm.step() if o.finished]
    assert [o.request_id for o in finished] == [rid]
    assert finished[0].outputs[0].token_ids == hf_greedy(hf_model, early, 30)


def test_an_earlier_request_that_finishes_inside_generate_is_kept_for_step(llm, hf_model):
    """Item 9: the earlier request finishes while generate() runs (3 tokens against generate's 8):
    its final output must wait for step(), not be consumed by generate()."""
    early = _prompts([7], seed=19)[0]
    rid = llm.add_request(early, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    outs = llm.generate(_prompts([4, 5], seed=20), GREEDY, use_tqdm=False)
    assert rid not in [o.request_id for o in outs]
    assert llm.has_unfinished_requests(), "the earlier request's output was dropped"
    finished = []
    while llm.has_unfinished_requests():
        finished += [o for o in llm.step() if o.finished]
    assert [o.request_id for o in finished] == [rid]
    assert finished[0].outputs[0].token_ids == hf_greedy(hf_model, early, 3)
    assert finished[0].outputs[0].finish_reason == "length"


def test_an_interrupted_abort_request_can_be_repeated(llm, hf_model, monkeypatch):
    """Item 3: Ctrl-C inside abort_request (here: as the block manager starts freeing) must leave
    the id known, so that aborting it again frees everything. It used to forget the id first: the
    sequence stayed in the scheduler holding its blocks, and every later generate() failed."""
    rid = llm.add_request(_prompts([40], seed=21)[0], GREEDY)
    llm.step()  # prefill: the request holds its blocks
    real = llm.scheduler.block_manager.deallocate

    def interrupted(seq):
        monkeypatch.setattr(llm.scheduler.block_manager, "deallocate", real)  # once
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.scheduler.block_manager, "deallocate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.abort_request(rid)
    monkeypatch.undo()
    llm.abort_request(rid)
    llm.abort_request(rid)
    pool_is_sound(llm)
    assert not llm.scheduler.running and not llm.scheduler.waiting and not llm.requests
    assert llm.scheduler.block_manager.num_free_blocks == llm.runner.num_kvcache_blocks
    assert llm.step() == [] and not llm.has_unfinished_requests()
    p = _prompts([6], seed=22)[0]
    assert llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == hf_greedy(hf_model, p, 8)


def test_abort_of_unknown_or_finished_ids_and_an_idle_step(llm):
    """Item 12: abort_request of an unknown or finished id is a no-op; an idle step returns []."""
    llm.abort_request("123456789")  # request ids are strings, as vLLM's
    out = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]
    llm.abort_request(out.request_id)
    assert llm.step() == [] and not llm.has_unfinished_requests()
    rid = llm.add_request([4, 5, 6], GREEDY)
    llm.abort_request(rid)
    llm.abort_request(rid)
    assert llm.step() == [] and llm.scheduler.block_manager.num_free_blocks == llm.runner.num_kvcache_blocks


def test_stop_strings_decode_each_token_a_bounded_number_of_times(llm, monkeypatch):
    """Item 13: with a stop string, decoding work grows linearly with the completion's length
    (it was quadratic: the whole completion was decoded at every step)."""
    real, work = llm.outputs.decode, {"tokens": 0}  # what the detokenizer calls (fast_decode)

    def counting(ids, skip):
        work["tokens"] += len(ids)
        return real(ids, skip)

    monkeypatch.setattr(llm.outputs, "decode", counting)

    def cost(n):
        work["tokens"] = 0
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, stop=["\x00never"])
        out = llm.generate([[7, 8, 9]], sp, use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == n and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)
        return work["tokens"]

    short, long = cost(50), cost(240)
    print(f"decoded tokens: {short} for 50, {long} for 240")
    assert long <= 12 * 240, "more than 12 decoded tokens per generated token"
    assert long < 1.5 * (240 / 50) * short, "decoding work grows faster than linearly"


def test_a_second_ctrl_c_during_generates_clean_up_waits_for_it(llm, monkeypatch):
    """Ctrl-C twice: the second one lands while generate() aborts its requests. It is held until
    the clean-up is done, so every request is aborted and the pool is whole (a real SIGINT)."""
    import signal

    calls = {"post": 0, "abort": 0}
    real_post, real_abort = llm.scheduler.postprocess, llm.scheduler.abort

    def first_ctrl_c(seqs, tokens):
        calls["post"] += 1
        if calls["post"] == 3:
            raise KeyboardInterrupt
        return real_post(seqs, tokens)

    def second_ctrl_c(seq):
        calls["abort"] += 1
        if calls["abort"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # delivered at the next bytecode boundary
        return real_abort(seq)

    monkeypatch.setattr(llm.scheduler, "postprocess", first_ctrl_c)
    monkeypatch.setattr(llm.scheduler, "abort", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(_prompts([5, 9, 17, 33]), GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert calls["abort"] == 4, "the clean-up was cut short: not every request was aborted"
    pool_is_sound(llm)
    assert not llm.requests and llm.scheduler.block_manager.num_free_blocks == llm.runner.num_kvcache_blocks
    assert len(llm.generate([[4, 5]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8
