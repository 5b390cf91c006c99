"""`make host-bench`: the engine's own Python per decode step, with the model taken out.

    python tools/host_bench.py [--batch 256] [--tokens 100] [--stream] [--logprobs K] [--profile]

At a large batch a GPU finishes a decode step in a few milliseconds, and the engine must schedule,
record and report every sequence in less time than that, or the GPU waits for it (the overlapped loop
of chapter 8 only hides host work shorter than a step). This times exactly that host work: the tiny
checkpoint's engine with its model runner's `launch` replaced by a stand-in that returns random
tokens at once, then `generate` of `--batch` requests of 200 prompt tokens and `--tokens` new
tokens each, as the benchmark runs them. It prints the median time from one decode step's launch to
the next one's (all sequences running), per step and per sequence; `--stream` drives the engine with
`step()` instead, as a server does, so that every running request's text and `RequestOutput` are
made at every step (`generate` makes them once, at the end); `--logprobs K`: every request asks
for K logprobs per token (the stand-in returns random ones), whose K + 1 token texts the engine
records at every step; `--profile` adds cProfile's top functions. The runner's own host work (staging the batch, launching
a CUDA graph) is not included: the GPU profile (`bench --profile`) reports it as `runner_us_per_step`.
"""

import argparse
import cProfile
import pstats
import statistics
import sys
import time

import torch


def host_us_per_step(
    batch: int, tokens: int, profile: bool = False, stream: bool = False, logprobs: int | None = None
) -> dict:
    """Microseconds of the engine's Python per decode step of `batch` sequences (model stubbed)."""
    from cleanvllm.llm import LLM
    from cleanvllm.model_runner import Launched
    from cleanvllm.sampling_params import SamplingParams
    from cleanvllm.tiny import tiny_model_dir

    if batch < 1 or tokens < 2:
        raise ValueError(f"need batch >= 1 and tokens >= 2, got {batch} and {tokens}")
    llm = LLM(str(tiny_model_dir()), device="cpu", dtype="float32", kvcache_block_size=256,
              max_num_seqs=batch, max_model_len=1024, num_kvcache_blocks=batch * 2 + 8)  # fmt: skip
    vocab, gaps, last = 5000, [], [None]  # last: when the previous decode step was launched
    noise = torch.Generator().manual_seed(0)

    def launch(step_batch):  # the GPU's part, done at once: only the host's part is timed
        now = time.perf_counter()
        if not step_batch.is_prefill and step_batch.num_seqs == batch and last[0] is not None:
            gaps.append(now - last[0])  # one whole decode step of host work, launch to launch
        last[0] = None if step_batch.is_prefill else now
        n = step_batch.num_seqs
        ids = torch.randint(vocab, (n,), generator=noise)
        if logprobs is None:
            return Launched(ids, ids)
        lp = (torch.randint(vocab, (n, logprobs), generator=noise), -torch.rand(n, logprobs, generator=noise),
              -torch.rand(n, generator=noise), torch.randint(1, 9, (n,), generator=noise))  # fmt: skip
        return Launched(ids, ids, None, lp)

    llm.runner.launch = launch
    sp = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=tokens, logprobs=logprobs)
    prompts = [[(7 * i + j) % vocab for j in range(200)] for i in range(batch)]
    llm.generate(prompts[:2], sp, use_tqdm=False)  # warm-up
    gaps.clear()
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    if stream:  # a server's loop: every request's output at every step
        ids, done = [llm.add_request(p, sp) for p in prompts], {}
        while llm.has_unfinished_requests():
            done.update((o.request_id, o) for o in llm.step() if o.finished)
        outs = [done[i] for i in ids]
    else:
        outs = llm.generate(prompts, sp, use_tqdm=False)
    if prof:
        prof.disable()
    llm.close()
    got = sum(len(o.outputs[0].token_ids) for o in outs)
    if got != batch * tokens:
        raise RuntimeError(f"generated {got} tokens, expected {batch} x {tokens}")
    if logprobs and any(len(o.outputs[0].logprobs or []) != tokens for o in outs):
        raise RuntimeError(f"a request asked for logprobs={logprobs} at each of {tokens} tokens and lacks some")
    if prof:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(15)
    per_step = statistics.median(gaps) * 1e6
    return {
        "batch": batch,
        "steps": len(gaps),
        "us_per_step": per_step,
        "us_per_seq": per_step / batch,
        "path": ("step()" if stream else "generate()") + (f", logprobs={logprobs}" if logprobs else ""),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--stream", action="store_true", help="step() as a server drives it")
    ap.add_argument("--logprobs", type=int, help="every request asks for K logprobs per token")
    ap.add_argument("--profile", action="store_true", help="cProfile's top functions (slower)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the engine's Python is what is measured; one thread, as the tests
    r = host_us_per_step(args.batch, args.tokens, args.profile, args.stream, args.logprobs)
    print(f"host work per decode step at batch {r['batch']}, {r['path']}: {r['us_per_step']:,.0f} us "
          f"({r['us_per_seq']:.1f} us per sequence; median of {r['steps']} steps)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
