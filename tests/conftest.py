import contextlib
import os
import socket
import threading
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One CPU thread per test process: torch's default (a thread per core) collapses on a busy 2-core
# machine, and `make test` runs two test processes side by side.
torch.set_num_threads(int(os.environ.get("CLEANVLLM_THREADS", "1")))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Path of the tiny random Qwen3 checkpoint (tests never use CLEANVLLM_MODEL)."""
    from cleanvllm.tiny import tiny_model_dir

    return str(tiny_model_dir())


@pytest.fixture(scope="session")
def hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=hf.device)
    # An explicit mask: without it transformers takes token 0 in a prompt for padding (pad_token_id=0).
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert out.isfinite().all(), "output has NaN/inf"
    return ((out - ref).norm() / ref.norm()).item()


def in_threads(fn, size=2):
    """fn(rank) in one thread per rank; the results by rank (the first error is raised again)."""
    import threading

    results, errors = [None] * size, []

    def main(rank):
        try:
            results[rank] = fn(rank)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def prompts(lengths, seed=0):
    """Random prompts of these lengths (no token 0: transformers takes it for padding)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 10000, (n,), generator=g).tolist() for n in lengths]


def pool_is_sound(llm):
    """Block-pool invariants: every block free or used, never both; refs match the block tables."""
    bm = llm.scheduler.block_manager
    free, used = set(bm.free_block_ids), set(bm.used_block_ids)
    assert not free & used and free | used == set(range(len(bm.blocks)))
    refs = {}
    for seq in [*llm.scheduler.running, *llm.scheduler.waiting]:
        for b in seq.block_table:
            refs[b] = refs.get(b, 0) + 1
    assert all(bm.blocks[b].ref_count == refs.get(b, 0) for b in range(len(bm.blocks)))
    assert all(r.seq.seq_id in {s.seq_id for s in [*llm.scheduler.running, *llm.scheduler.waiting]}
               or r.seq.is_finished for r in llm.requests.values())


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "tasks(*ids): the workbook tasks a test exercises (tools/check.py names them)"
    )


@contextlib.contextmanager
def server_in_thread(state):
    """The server app of `state` run by uvicorn in a thread on a free port: yields its URL, then
    stops it and checks that the thread ended (the server tests share this)."""
    import uvicorn

    from cleanvllm.serve import build_app, wait_ready

    # The socket is bound here and handed to uvicorn: a port found free and bound later could be
    # taken by another process in between (seen in CI with the subprocess servers).
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(state), log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=60)
        yield url
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive(), "the server thread did not stop"


def launch_on_free_port(model: str, log_dir, *args: str, timeout: float = 120):
    """`python -m cleanvllm.serve MODEL *args` in a subprocess on a free port, once it answers:
    (process, url, log file). free_port() closes its socket before the server binds, so another
    process may take the port meanwhile (seen in CI: uvicorn exits 3, "address already in use"):
    then try another port; any other early exit fails at once."""
    from cleanvllm.model_runner import free_port
    from cleanvllm.serve import launch, wait_ready

    for attempt in range(3):
        port = free_port()
        log = open(Path(log_dir) / f"server-{port}.log", "w+")
        proc = launch(model, port, *args, log=log)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc, timeout=timeout)
            return proc, url, log
        except (RuntimeError, TimeoutError) as e:  # exited early, or never answered
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.seek(0)
            text = log.read()
            log.close()
            if attempt == 2 or "address already in use" not in text:
                raise RuntimeError(f"{e}; its log ends:\n{text[-3000:]}") from e
