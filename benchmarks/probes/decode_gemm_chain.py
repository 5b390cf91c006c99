"""A decode layer's four GEMMs as a dependent chain (28 layers, distinct weights), timed as one
CUDA-graph replay per variant: cuBLAS; a Triton tile kernel; the same launched with programmatic
dependent launch (PDL: the next kernel may start once this one signals, and waits for its data),
signalled at the kernel's start or after its loop; PDL and each CTA pulling its weight slice into
L2 before it waits (weights never depend on the kernel before).

A probe for issue 22, not part of the package: `python benchmarks/probes/decode_gemm_chain.py` on a
Hopper GPU. Each kernel's tiles are the fastest decode_gemm_tiles.py found on an H100
(h100_gemm_tiles.json). A PDL variant must give the plain Triton chain's output bit for bit (the
same arithmetic, launched differently): a race would show there. Results: benchmarks/RESULTS.md,
"2026-12-07, 15:10-15:30 UTC"."""
import json
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait, gdc_launch_dependents


@triton.jit
def _prefetch_l2(p):
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [p],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def gemm(x, w, y, M, N, K, sxm, swn, sym, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
         PDL: tl.constexpr, PREFETCH: tl.constexpr, EARLY: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    if PDL and EARLY:
        gdc_launch_dependents()
    if PREFETCH:  # one address per 128-byte line of this CTA's rows of W
        lines = tl.arange(0, 64)
        pp = w + rn[:, None] * swn + lines[None, :] * 64
        _prefetch_l2(tl.where(lines[None, :] < K // 64, pp, w))
    if PDL:
        gdc_wait()  # x was written by the kernel before
    acc = tl.zeros([BM, BN], tl.float32)
    xp = x + rm[:, None] * sxm + rk[None, :]
    wp = w + rn[None, :] * swn + rk[:, None]
    for _ in range(0, K, BK):
        a = tl.load(xp, mask=rm[:, None] < M, other=0.0)
        b = tl.load(wp)
        acc = tl.dot(a, b, acc)
        xp += BK
        wp += BK
    if PDL and not EARLY:  # the next kernel may launch now, while this one writes
        gdc_launch_dependents()
    tl.store(y + rm[:, None] * sym + rn[None, :], acc.to(y.dtype.element_ty), mask=rm[:, None] < M)


L = 28
SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
best = json.load(open(os.path.join(os.path.dirname(__file__), "h100_gemm_tiles.json")))["best"]
dev = "cuda"
torch.manual_seed(0)
W = {k: [torch.randn(n, kk, device=dev, dtype=torch.bfloat16) * 0.03 for _ in range(L)] for k, (n, kk) in SHAPES.items()}


def make_chain(M, how):
    h0 = torch.randn(M, 1024, device=dev, dtype=torch.bfloat16, generator=torch.Generator(dev).manual_seed(M))
    bufs = {k: [torch.empty(M, n, device=dev, dtype=torch.bfloat16) for _ in range(L)] for k, (n, _) in SHAPES.items()}

    def mm(x, name, i):
        y = bufs[name][i]
        if how == "cublas":
            torch.matmul(x, W[name][i].t(), out=y)
            return y
        BM, BN, BK, nw, ns = best[f"{M}/{name}"][:5]
        N, K = SHAPES[name]
        gemm[(N // BN, triton.cdiv(M, BM))](
            x, W[name][i], y, M, N, K, x.stride(0), W[name][i].stride(0), y.stride(0), BM=BM, BN=BN, BK=BK,
            PDL=how != "triton", PREFETCH=how == "pdl+prefetch", EARLY=how != "pdl-end", num_warps=nw, num_stages=ns,
            launch_pdl=how != "triton")
        return y

    def run():
        h = h0
        for i in range(L):
            q = mm(h, "qkv", i)
            o = mm(q[:, :2048], "o", i)
            g = mm(o, "gate_up", i)
            h = mm(g[:, :3072], "down", i)
        return h
    return run


def graph_time(fn):
    fn(); torch.cuda.synchronize()
    g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()
        with torch.cuda.graph(g, stream=s):
            out = fn()
    torch.cuda.synchronize()
    g.replay(); torch.cuda.synchronize()
    res = out.clone()
    t = triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median") * 1000 / L
    g.replay(); torch.cuda.synchronize()
    again = out.clone()
    return t, res, again


rows = []
for M in [int(m) for m in os.environ.get("MS", "1,4,16,64,128,256").split(",")]:
    got = {}
    line = [M]
    for how in ("cublas", "triton", "pdl", "pdl-end", "pdl+prefetch"):
        try:
            t, res, again = graph_time(make_chain(M, how))
            got[how] = res
            ok = torch.equal(res, again) and bool(torch.isfinite(res).all())
            same = torch.equal(res, got["triton"]) if how.startswith("pdl") else None
            err = ((res.float() - got["cublas"].float()).norm() / got["cublas"].float().norm()).item()
            line.append(f"{t:.1f}")
            print(f"M={M:4d} {how:13s} {t:6.2f} us/layer  repeatable={ok} equal-to-triton={same} rel-vs-cublas={err:.1e}", flush=True)
        except Exception as e:
            line.append("fail")
            print(f"M={M:4d} {how:13s} failed: {repr(e)[:300]}", flush=True)
    rows.append(line)
print("\nus per layer (4 dependent GEMMs); PDL: the next kernel signalled at the start, or after the loop")
print("| M | cuBLAS | Triton | Triton+PDL, start | Triton+PDL, after the loop | Triton+PDL+L2 prefetch |")
for r in rows:
    print("| " + " | ".join(map(str, r)) + " |")
