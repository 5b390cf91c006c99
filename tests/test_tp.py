"""Tensor parallelism on CPU (gloo, tiny model, 2 ranks): right tokens, engines that coexist in one
process, Ctrl-C, and workers that die (issue 13 items 1, 2 and 10). A TP=2 engine costs seconds to
start, so the tests share one, in this order; the last one kills its worker."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cleanvllm.llm import LLM
from cleanvllm.sampling_params import SamplingParams
from conftest import hf_greedy, prompts

KW = dict(device="cpu", kvcache_block_size=16, max_model_len=256)
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def tp(tiny_model):
    engine = LLM(tiny_model, tensor_parallel_size=2, **KW)
    yield engine
    engine.close()


@pytest.fixture
def slow_steps(tp, monkeypatch):
    """Each step takes at least 20 ms, so that a timer lands in the middle of a generate()."""
    real = tp.runner.execute

    def execute(batch):
        out = real(batch)
        time.sleep(0.02)
        return out

    monkeypatch.setattr(tp.runner, "execute", execute)


def test_tp2_is_exact_and_other_engines_never_corrupt_it(tp, tiny_model, hf_model):
    """Item 1: the issue's sequence. A second TP engine is refused before it touches anything; a
    TP=1 engine generates and closes; the TP=2 engine's outputs still equal transformers'."""
    ps = prompts([7, 25, 40])
    refs = [hf_greedy(hf_model, p, 16) for p in ps]
    assert [o.outputs[0].token_ids for o in tp.generate(ps, GREEDY, use_tqdm=False)] == refs
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="already initialized"):
        LLM(tiny_model, tensor_parallel_size=2, **KW)
    assert time.monotonic() - t < 30  # refused at once, not after a rendezvous timeout
    one = LLM(tiny_model, **KW)
    assert [o.outputs[0].token_ids for o in one.generate(ps, GREEDY, use_tqdm=False)] == refs
    one.close()
    assert torch.distributed.is_initialized()  # the TP=1 engine left the TP group alone
    assert tp.workers.procs[0].is_alive()
    assert [o.outputs[0].token_ids for o in tp.generate(ps, GREEDY, use_tqdm=False)] == refs


def test_ctrl_c_during_a_tp_generate_then_the_next_call_is_right(tp, hf_model, slow_steps):
    """Item 2: SIGINT, as a terminal sends it (to rank 0 and the worker), mid-generate."""
    ps = prompts([5, 9, 13], seed=1)

    def ctrl_c():
        os.kill(tp.workers.procs[0].pid, signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(0.5, ctrl_c)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            tp.generate(ps, LONG, use_tqdm=False)  # >= 200 steps of >= 20 ms: still running
    finally:
        timer.join()
    assert not tp.closed and tp.workers.procs[0].is_alive()
    assert not tp.has_unfinished_requests()
    assert tp.scheduler.block_manager.num_free_blocks == tp.runner.num_kvcache_blocks
    outs = tp.generate(ps, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf_model, p, 16) for p in ps]


def test_a_worker_killed_mid_generate_is_named_and_the_engine_closes(tp, slow_steps):
    """Item 10: an error naming the rank (not a bare EOFError), and a closed engine."""
    worker = tp.workers.procs[0]
    timer = threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL))
    timer.start()
    t = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="worker rank 1"):
            tp.generate(prompts([6], seed=2), LONG, use_tqdm=False)
    finally:
        timer.join()
    assert time.monotonic() - t < 30
    assert tp.closed and not worker.is_alive() and not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="closed"):
        tp.step()


def test_a_worker_that_dies_at_start_up_fails_fast_naming_the_cause(tmp_path, tiny_model):
    """Item 10: a script without a __main__ guard; its worker dies importing it again."""
    script = tmp_path / "no_guard.py"
    script.write_text(
        "from cleanvllm.llm import LLM\n"
        f"llm = LLM({tiny_model!r}, device='cpu', tensor_parallel_size=2, max_model_len=128)\n"
        "print('started')\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    t = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=150, env=env
    )
    took = time.monotonic() - t
    assert out.returncode != 0 and "started" not in out.stdout, out.stdout + out.stderr
    assert "worker rank 1 exited" in out.stderr and '__name__ == "__main__"' in out.stderr
    assert took < 60, f"took {took:.0f} s"


def test_a_worker_runs_with_rank_0s_cpu_threads(tiny_model):
    """Found on an H100 machine (16 cores, 12 notebooks side by side): a spawned worker took every
    core while rank 0 ran on one, ran many times slower on the busy machine, and the watchdog killed
    it as hung. Workers hand run_worker rank 0's thread count, which it sets first."""
    import multiprocessing as mp

    from cleanvllm.config import Config
    from cleanvllm.model_runner import run_worker

    before, handler = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    ours, theirs = mp.Pipe()
    try:  # a rank that cannot join its group fails at once, after setting its threads
        run_worker(Config(tiny_model, tensor_parallel_size=2, **KW), 1, None, theirs, before + 2)
        assert torch.get_num_threads() == before + 2
        kind, text = ours.recv()
        assert kind == "error" and "dist_port" in text
    finally:  # run_worker ignores Ctrl-C (rank 0's to handle): give pytest its handler back
        torch.set_num_threads(before)
        signal.signal(signal.SIGINT, handler)

