"""The one-pass temperature sampler (`_gumbel_max_kernel`, chapter 7) against two variants, on a
GPU: a probe for issue 22, not part of the package. Written 2026-12-08 on a CPU machine; not yet run
on a GPU (no device was lent that day).

    python benchmarks/probes/sampler_logs.py

Why: at batch 256 the sampler took 139 us per decode step on an H100 (benchmarks/h100_profile.json,
fused b256: `_gumbel_max_kernel`), where reading its 78 MB of bf16 logits takes ~26 us. Compiled for
sm_90 on the CPU machine (Triton 3.9 there, 3.6 on the GPU machine;
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`, 4 warps), the kernel's two
`tl.log` calls per token are libdevice's exact `__nv_logf` (a branchy ~20-instruction routine) and
its `tl.join`/`tl.reshape` of the four Philox outputs goes through shared memory: 4,791 PTX lines.
  - "fast": the same kernel in base 2 with `lg2.approx` (libdevice's `fast_log2f`):
    argmax(x / T - ln(-ln u)) = argmax(x * log2(e) / T - log2(-log2 u)), a constant dropped; the
    temperature a multiply. 2,521 PTX lines.
  - "fast, no shuffle": the same, but each of the four Philox outputs scores its own tokens
    (4q + j takes u_j[q], the layout chapter 7 documents and its probes check) and the four are
    combined with elementwise maxima; 16 bytes of shared memory (4,096 before). 2,141 PTX lines.
Prediction: the sampler is bound by its instructions, not its bytes; "fast" takes about half the
time at 256 rows and "no shuffle" a little less. `tl.rand4x`'s ten Philox rounds are kept (fewer
rounds trade the noise's quality).

Printed: per batch size, microseconds per call (CUDA-graph replays, do_bench's median) of today's
kernel and the two variants, and the share of rows where each variant picks today's token from the
same noise (below 1.0000 from rounding, and from `lg2.approx`'s absolute error where u is near 1
and -log2(u) tiny: a row whose score becomes +inf there picks that token; the share says whether it
matters); then greedy rows (argmax exactly, a tie
to the smaller id) and the frequencies of 1,000,000 draws at T = 0.7 against the float64 softmax.
"""

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from cleanvllm.sampler import _gumbel_max_kernel, _pick_chunk_kernel

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)


@triton.jit
def _fast_kernel(
    LOGITS, stride, TEMPS, SEED, BEST, BEST_ID, vocab, GREEDY_EPS: tl.constexpr,
    CHUNK: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    row, split = tl.program_id(0), tl.program_id(1)
    counter = (row * SPLITS + split) * (CHUNK // 4) + tl.arange(0, CHUNK // 4)
    u0, u1, u2, u3 = tl.rand4x(tl.load(SEED), counter)
    u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (CHUNK,))
    t = tl.load(TEMPS + row)
    greedy = t < GREEDY_EPS
    offs = split * CHUNK + tl.arange(0, CHUNK)
    inside = offs < vocab
    x = tl.load(LOGITS + row * stride + offs, mask=inside, other=float("-inf")).to(tl.float32)
    scale = tl.where(greedy, 1.0, LOG2E / t)
    score = tl.where(greedy, x, x * scale - libdevice.fast_log2f(-libdevice.fast_log2f(u)))
    score = tl.where(inside, score, float("-inf"))
    tl.store(BEST + row * SPLITS + split, tl.max(score, 0))
    tl.store(BEST_ID + row * SPLITS + split, split * CHUNK + tl.argmax(score, 0))


@triton.jit
def _score(LOGITS, row, stride, offs, vocab, scale, greedy, u):
    inside = offs < vocab
    x = tl.load(LOGITS + row * stride + offs, mask=inside, other=float("-inf")).to(tl.float32)
    s = tl.where(greedy, x, x * scale - libdevice.fast_log2f(-libdevice.fast_log2f(u)))
    return tl.where(inside, s, float("-inf"))


@triton.jit
def _fast_no_shuffle_kernel(
    LOGITS, stride, TEMPS, SEED, BEST, BEST_ID, vocab, GREEDY_EPS: tl.constexpr,
    CHUNK: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    row, split = tl.program_id(0), tl.program_id(1)
    q = tl.arange(0, CHUNK // 4)
    u0, u1, u2, u3 = tl.rand4x(tl.load(SEED), (row * SPLITS + split) * (CHUNK // 4) + q)
    t = tl.load(TEMPS + row)
    greedy = t < GREEDY_EPS
    scale = tl.where(greedy, 1.0, LOG2E / t)
    offs = split * CHUNK + 4 * q
    s0 = _score(LOGITS, row, stride, offs, vocab, scale, greedy, u0)
    s1 = _score(LOGITS, row, stride, offs + 1, vocab, scale, greedy, u1)
    s2 = _score(LOGITS, row, stride, offs + 2, vocab, scale, greedy, u2)
    s3 = _score(LOGITS, row, stride, offs + 3, vocab, scale, greedy, u3)
    m = tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3))
    best = tl.max(m, 0)
    # the first j holding the maximum: of equal scores, the smaller token id
    j = tl.where(s0 == m, 0, tl.where(s1 == m, 1, tl.where(s2 == m, 2, 3)))
    tok = tl.where(m == best, offs + j, 2147483647)
    tl.store(BEST + row * SPLITS + split, best)
    tl.store(BEST_ID + row * SPLITS + split, tl.min(tok, 0))


KERNELS = {"now": _gumbel_max_kernel, "fast": _fast_kernel, "no shuffle": _fast_no_shuffle_kernel}


def sampler(kernel, logits, temps, seed, chunk=4096):
    """A replayable call of `kernel` and `_pick_chunk_kernel` on fixed buffers, and its output."""
    rows, vocab = logits.shape
    splits = triton.cdiv(vocab, chunk)
    best = torch.empty(rows, splits, dtype=torch.float32, device="cuda")
    best_id = torch.empty(rows, splits, dtype=torch.int64, device="cuda")
    out = torch.empty(rows, dtype=torch.int64, device="cuda")

    def call():
        kernel[(rows, splits)](
            logits, logits.stride(0), temps, seed, best, best_id, vocab,
            GREEDY_EPS=1e-5, CHUNK=chunk, SPLITS=splits,
        )  # fmt: skip
        _pick_chunk_kernel[(rows,)](best, best_id, out, splits, triton.next_power_of_2(splits))

    return call, out


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    table = []
    for rows in (1, 16, 64, 128, 256):
        g = torch.Generator(device="cuda").manual_seed(rows)
        logits = (torch.randn(rows, 151_936, device="cuda", generator=g) * 3).to(torch.bfloat16)
        temps, seed = torch.full((rows,), 0.6, device="cuda"), torch.tensor([12345], device="cuda")
        line, ref = {"rows": rows}, None
        for name, kernel in KERNELS.items():
            call, out = sampler(kernel, logits, temps, seed)
            call()
            torch.cuda.synchronize()
            ref = out.clone() if ref is None else ref
            line[name] = (
                triton.testing.do_bench_cudagraph(call, rep=200, return_mode="median") * 1000,
                (out == ref).float().mean().item(),
            )
        table.append(line)
        print(line, flush=True)
    for name in ("fast", "no shuffle"):
        lg = (torch.randn(256, 151_936, device="cuda") * 4).to(torch.bfloat16)
        lg[0, [7, 151_933]] = 100.0
        call, out = sampler(
            KERNELS[name], lg, torch.zeros(256, device="cuda"), torch.tensor([1], device="cuda")
        )
        call()
        print(
            name,
            "greedy rows are argmax:",
            torch.equal(out, lg.float().argmax(-1)) and out[0].item() == 7,
        )
        five = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -3.0], device="cuda")
        n = 1_000_000
        call, out = sampler(
            KERNELS[name],
            five.repeat(n, 1),
            torch.full((n,), 0.7, device="cuda"),
            torch.tensor([42], device="cuda"),
        )
        call()
        freq = np.bincount(out.cpu().numpy(), minlength=6) / n
        want = torch.softmax(five.double().cpu() / 0.7, 0).numpy()
        ok = np.all(np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / n))
        print(name, "1M draws at T = 0.7 match softmax:", bool(ok), freq.round(4), want.round(4))
    print(
        "| rows | "
        + " | ".join(f"{k}, us" for k in KERNELS)
        + " | fast, same token | no shuffle, same token |"
    )
    for line in table:
        us = " | ".join(f"{line[k][0]:.1f}" for k in KERNELS)
        print(f"| {line['rows']} | {us} | {line['fast'][1]:.4f} | {line['no shuffle'][1]:.4f} |")


if __name__ == "__main__":
    main()
