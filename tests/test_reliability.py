"""Bad input, memory pressure, faults and long runs: nothing is lost, errors name the problem."""
import gc
import os
import random
import signal
import time

import pytest
import torch

from cleanvllm.engine import LLM
from cleanvllm.sampling_params import SamplingParams

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
    ([3.5], GREEDY, r"prompt 0 must be a string or a list of token ids"),
])
def test_bad_requests_fail_before_any_work_and_engine_stays_usable(llm, prompts, params, message):
    before = (len(llm.requests), llm.block_manager.num_free_blocks, llm.scheduler.num_preemptions)
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, params, use_tqdm=False)
    assert (len(llm.requests), llm.block_manager.num_free_blocks, llm.scheduler.num_preemptions) == before
    assert llm.is_finished()
    assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].token_ids) == 8


@pytest.mark.parametrize("kwargs,message", [
    (dict(gpu_memory_utilization=0), r"gpu_memory_utilization=0"),
    (dict(tensor_parallel_size=3), r"tensor_parallel_size=3 .*must divide"),
    (dict(attention_backend="flash"), r"attention_backend"),
    (dict(block_size=16), r"unknown engine setting\(s\) \['block_size'\]"),
    (dict(max_model_len=4096, cpu_kvcache_bytes=1 << 20), r"cannot hold one sequence of max_model_len=4096.*cpu_kvcache_bytes"),
])
def test_bad_engine_settings_are_named(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_model, device="cpu", **kwargs)


def test_bad_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "missing"))


def test_memory_pressure_200_requests_match_a_large_cache(tiny_model):
    rng = random.Random(0)
    system = [rng.randint(0, 9999) for _ in range(40)]
    prompts = [(system if i % 3 == 0 else []) + [rng.randint(0, 9999) for _ in range(rng.randint(1, 90))]
               for i in range(200)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in prompts]
    kw = dict(device="cpu", kvcache_block_size=16, max_model_len=160, max_num_seqs=64)
    with LLM(tiny_model, num_kvcache_blocks=10 + 3, **kw) as small:  # one 160-token sequence needs 10 blocks
        tight = small.generate(prompts, params, use_tqdm=False)
        preempted = small.scheduler.num_preemptions
        assert small.block_manager.num_free_blocks == 13
    with LLM(tiny_model, **kw) as big:
        roomy = big.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    assert [len(o.token_ids) for o in tight] == [p.max_tokens for p in params]
    print(f"preemptions under pressure: {preempted}")
    assert preempted > 0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def test_soak_waves_lose_nothing_and_leak_nothing(llm):
    rng = random.Random(1)
    usage = []
    for wave in range(6):
        ids = {}
        for _ in range(500):
            p = [rng.randint(0, 9999) for _ in range(rng.randint(1, 12))]
            ids[llm.add_request(p, SamplingParams(temperature=0.8, max_tokens=rng.randint(1, 3), ignore_eos=True))] = p
        done = {}
        while not llm.is_finished():
            for o in llm.step()[0]:
                assert o.request_id not in done  # never finished twice
                done[o.request_id] = o
        assert set(done) == set(ids)
        assert all(done[i].prompt_token_ids == p for i, p in ids.items())
        gc.collect()
        usage.append((len(llm.block_manager.used_block_ids), len(llm.requests), len(gc.get_objects()), _open_fds()))
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
    assert llm.is_finished() and not llm.requests
    assert llm.block_manager.num_free_blocks == llm.runner.num_kvcache_blocks
    assert len(llm.generate([[4, 5]], GREEDY, use_tqdm=False)[0].token_ids) == 8


def test_a_killed_worker_is_reported_by_rank_and_leaves_nothing(tiny_model):
    llm = LLM(tiny_model, device="cpu", kvcache_block_size=16, max_model_len=128, tensor_parallel_size=2)
    worker = llm.workers[0]
    llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="worker rank 1"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    assert time.perf_counter() - t < 60
    assert llm.closed and not worker.is_alive() and not torch.distributed.is_initialized()
