"""Decode GEMMs of Qwen3-0.6B (y = x @ W.T): cuBLAS against a plain Triton tile kernel, per layer.

A probe for issue 22, not part of the package: run on a GPU, `python benchmarks/probes/decode_gemm_tiles.py`
(OUT=dir for the JSON). For every batch size M and each of a layer's four projections it tries a
grid of tiles (and split-K for the two of 1,024 outputs), checks each against float64, and keeps
the fastest. 28 distinct weight sets, so that every launch reads its weights from HBM (a layer's
31 MB would fit in the 50 MB L2), timed as CUDA-graph replays and reported per launch.
Results: benchmarks/RESULTS.md, "2026-12-07, 15:10-15:30 UTC"."""
import json
import os
import time

import torch, triton, triton.language as tl

@triton.jit
def skinny(x, w, y, M, N, K, sxm, swn, sym, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    xp = x + rm[:, None] * sxm + rk[None, :]
    wp = w + rn[None, :] * swn + rk[:, None]
    for _ in range(0, K, BK):
        a = tl.load(xp, mask=rm[:, None] < M, other=0.0)
        b = tl.load(wp)
        acc = tl.dot(a, b, acc)
        xp += BK
        wp += BK
    tl.store(y + rm[:, None] * sym + rn[None, :], acc.to(y.dtype.element_ty), mask=rm[:, None] < M)

@triton.jit
def skinny_split(x, w, y, M, N, K, sxm, swn, sym, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * (K // SPLIT) + tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    xp = x + rm[:, None] * sxm + rk[None, :]
    wp = w + rn[None, :] * swn + rk[:, None]
    for _ in range(0, K // SPLIT, BK):
        a = tl.load(xp, mask=rm[:, None] < M, other=0.0)
        b = tl.load(wp)
        acc = tl.dot(a, b, acc)
        xp += BK
        wp += BK
    tl.atomic_add(y + rm[:, None] * sym + rn[None, :], acc, mask=rm[:, None] < M, sem="relaxed")

def launch(x, w, y, cfg):
    if len(cfg) == 6:  # split-K into fp32 (zeroed), then cast: the whole cost (not repeatable beyond 2 splits)
        BM, BN, BK, nw, ns, S = cfg
        M, K = x.shape
        N = w.shape[0]
        acc = torch.zeros(M, N, device=x.device, dtype=torch.float32)
        skinny_split[(N // BN, triton.cdiv(M, BM), S)](x, w, acc, M, N, K, x.stride(0), w.stride(0), acc.stride(0),
                                                  BM=BM, BN=BN, BK=BK, SPLIT=S, num_warps=nw, num_stages=ns)
        y.copy_(acc)
        return
    BM, BN, BK, nw, ns = cfg
    M, K = x.shape
    N = w.shape[0]
    skinny[(N // BN, triton.cdiv(M, BM))](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
                                         BM=BM, BN=BN, BK=BK, num_warps=nw, num_stages=ns)

L = 28
SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
dev = "cuda"
torch.manual_seed(0)
W = {k: [torch.randn(n, kk, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(L)] for k, (n, kk) in SHAPES.items()}

def graph_time(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()
        with torch.cuda.graph(g, stream=s):
            fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(g.replay, warmup=20, rep=60, return_mode="median") * 1000 / L

rows = []
best = {}
MS = [int(m) for m in os.environ.get("MS", "1,4,16,64,128,256").split(",")]
t0 = time.time()
for M in MS:
    for name, (N, K) in SHAPES.items():
        xs = [torch.randn(M, K, device=dev, dtype=torch.bfloat16) for _ in range(L)]
        ys = [torch.empty(M, N, device=dev, dtype=torch.bfloat16) for _ in range(L)]
        cub = graph_time(lambda: [torch.matmul(xs[i], W[name][i].t(), out=ys[i]) for i in range(L)])
        ref = (xs[0].double() @ W[name][0].double().t())
        bms = [16] if M <= 16 else ([32, 64] if M <= 64 else [64, 128])
        cfgs = [(bm, bn, bk, nw, ns) for bm in bms for bn in (16, 32, 64, 128) for bk in (64, 128, 256)
                for nw in (4,) for ns in (3, 4) if N // bn >= 8]
        if N <= 1024 and M <= 64:
            cfgs += [(bms[-1], bn, bk, 4, 3, sp) for bn in (32, 64) for bk in (64, 128) for sp in (2, 4)]
        res = []
        for cfg in cfgs:
            try:
                y0 = torch.full((M, N), float("nan"), device=dev, dtype=torch.bfloat16)
                launch(xs[0], W[name][0], y0, cfg)
                err = ((y0.double() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    res.append((float("inf"), cfg, err)); continue
                t = graph_time(lambda: [launch(xs[i], W[name][i], ys[i], cfg) for i in range(L)])
                res.append((t, cfg, err))
            except Exception as e:  # out of shared memory etc.
                res.append((float("inf"), cfg, repr(e)[:60]))
        res.sort(key=lambda r: r[0])
        t, cfg, err = res[0]
        byte_us = (N * K + M * K + M * N) * 2 / 3.0e12 * 1e6
        rows.append((M, name, cub, t, cfg, err, byte_us))
        best[f"{M}/{name}"] = cfg
        print(f"M={M:4d} {name:8s} cublas {cub:6.2f} us  triton {t:6.2f} us {cfg} err {err:.1e} bytes@3TB/s {byte_us:5.2f}  [{time.time()-t0:.0f}s]", flush=True)

print("\n| M | cuBLAS per layer (us) | Triton best per layer (us) | bytes at 3 TB/s (us) |")
for M in MS:
    c = sum(r[2] for r in rows if r[0] == M); t = sum(r[3] for r in rows if r[0] == M); b = sum(r[6] for r in rows if r[0] == M)
    print(f"| {M} | {c:.1f} | {t:.1f} | {b:.1f} |")
out = os.environ.get("OUT", ".")
json.dump({"rows": rows, "best": best, "device": torch.cuda.get_device_name()}, open(f"{out}/gemm_probe.json", "w"), default=str)
