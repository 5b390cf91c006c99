"""A decode layer's four GEMMs of Qwen3-0.6B (y = x @ W.T) on a GPU: a probe for issue 22, not part
of the package. Results: benchmarks/RESULTS.md, section "2026-12-07, 15:10-15:30 UTC".

    python benchmarks/probes/decode_gemms.py tiles   # cuBLAS against the fastest Triton tiles
    python benchmarks/probes/decode_gemms.py chain   # the four as a dependent chain, with PDL

`tiles`: for every batch size M and each projection (q/k/v 1,024 -> 4,096, o 2,048 -> 1,024,
gate/up 1,024 -> 6,144, down 3,072 -> 1,024) it tries a grid of tiles (and split-K for the two of
1,024 outputs at M <= 64), checks each against float64, keeps the fastest and writes them to
$OUT/gemm_tiles.json (an H100's: h100_gemm_tiles.json beside this file).
`chain`: q/k/v -> o on its first 2,048 columns -> gate/up -> down on its first 3,072 -> the next
layer, with the tiles of h100_gemm_tiles.json: cuBLAS; Triton; Triton launched with programmatic
dependent launch (PDL: a kernel may start once the one before signals, and waits for its data
before reading it), signalled at the kernel's start or after its loop; and PDL with each CTA
pulling its slice of the weights into L2 before it waits (weights never depend on the kernel
before). A PDL chain must give the plain Triton chain's output bit for bit (the same arithmetic,
launched differently): a race would show there.
Both use 28 distinct weight sets, so every launch reads its weights from HBM (one layer's 31 MB
would fit in the 50 MB L2), and time CUDA-graph replays (do_bench's median), per launch or layer.
"""

import json
import os
import sys
import time

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

L = 28
SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
MS = [int(m) for m in os.environ.get("MS", "1,4,16,64,128,256").split(",")]
HERE = os.path.dirname(os.path.abspath(__file__))


@triton.jit
def _prefetch_l2(p):
    return tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def gemm(x, w, y, M, N, K, sxm, swn, sym, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
         SPLIT: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr, PREFETCH: tl.constexpr):  # fmt: skip
    """One [BM, BN] tile of y over K / SPLIT of the inputs; SPLIT > 1 adds into a float32 y."""
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(2) * (K // SPLIT) + tl.arange(0, BK)
    if PDL and EARLY:
        gdc_launch_dependents()
    if PREFETCH:  # one address per 128-byte line of this CTA's rows of W
        lines = tl.arange(0, 64)
        _prefetch_l2(tl.where(lines[None, :] < K // 64, w + rn[:, None] * swn + lines[None, :] * 64, w))
    if PDL:
        gdc_wait()  # x was written by the kernel before
    acc = tl.zeros([BM, BN], tl.float32)
    xp = x + rm[:, None] * sxm + rk[None, :]
    wp = w + rn[None, :] * swn + rk[:, None]
    for _ in range(0, K // SPLIT, BK):
        acc = tl.dot(tl.load(xp, mask=rm[:, None] < M, other=0.0), tl.load(wp), acc)
        xp += BK
        wp += BK
    if PDL and not EARLY:  # the next kernel may start while this one writes
        gdc_launch_dependents()
    out = y + rm[:, None] * sym + rn[None, :]
    if SPLIT == 1:
        tl.store(out, acc.to(y.dtype.element_ty), mask=rm[:, None] < M)
    else:  # float32 additions in any order: repeatable for 2 splits only
        tl.atomic_add(out, acc, mask=rm[:, None] < M, sem="relaxed")


def launch(x, w, y, tile, pdl=None):
    """y = x @ w.T with `tile` = (BM, BN, BK, warps, stages[, splits]); pdl: None, "start", "end"
    or "prefetch" (signalled at the start, and the weights pulled into L2)."""
    (BM, BN, BK, warps, stages), split = tile[:5], (tile[5] if len(tile) > 5 else 1)
    (M, K), N = x.shape, w.shape[0]
    out = torch.zeros(M, N, device=x.device, dtype=torch.float32) if split > 1 else y
    gemm[(N // BN, triton.cdiv(M, BM), split)](
        x, w, out, M, N, K, x.stride(0), w.stride(0), out.stride(0), BM=BM, BN=BN, BK=BK,
        SPLIT=split, PDL=pdl is not None, EARLY=pdl != "end", PREFETCH=pdl == "prefetch",
        num_warps=warps, num_stages=stages, launch_pdl=pdl is not None,
    )  # fmt: skip
    if split > 1:
        y.copy_(out)  # the cast back is part of split-K's cost
    return y


def per_launch_us(fn, launches: int) -> float:
    """Median time of one replay of fn's launches captured in a CUDA graph, per launch."""
    fn()
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1e3 / launches


def weights() -> dict:
    torch.manual_seed(0)
    return {k: [torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * 0.03 for _ in range(L)]
            for k, (n, kk) in SHAPES.items()}  # fmt: skip


def tiles() -> None:
    W, rows, best, t0 = weights(), [], {}, time.time()
    for M in MS:
        for name, (N, K) in SHAPES.items():
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
            ys = [torch.empty(M, N, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
            cublas = per_launch_us(lambda: [torch.matmul(xs[i], W[name][i].t(), out=ys[i]) for i in range(L)], L)
            ref = xs[0].double() @ W[name][0].double().t()
            bms = [16] if M <= 16 else ([32, 64] if M <= 64 else [64, 128])
            cands = [(bm, bn, bk, 4, st) for bm in bms for bn in (16, 32, 64, 128) for bk in (64, 128, 256)
                     for st in (3, 4) if N // bn >= 8]  # fmt: skip
            if N <= 1024 and M <= 64:
                cands += [(bms[-1], bn, bk, 4, 3, s) for bn in (32, 64) for bk in (64, 128) for s in (2, 4)]
            found = []
            for tile in cands:
                try:
                    y0 = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                    err = ((launch(xs[0], W[name][0], y0, tile).double() - ref).norm() / ref.norm()).item()
                    if err < 1e-2:  # NaN (an element never written) fails too
                        t = per_launch_us(lambda: [launch(xs[i], W[name][i], ys[i], tile) for i in range(L)], L)
                        found.append((t, tile, err))
                except Exception as e:  # a tile too large for shared memory, say
                    print(f"  {tile}: {repr(e)[:80]}")
            t, tile, err = min(found)
            bytes_us = (N * K + M * K + M * N) * 2 / 3.0e12 * 1e6
            rows.append((M, name, cublas, t, bytes_us))
            best[f"{M}/{name}"] = tile
            print(f"M={M:4d} {name:8s} cublas {cublas:6.2f} us  triton {t:6.2f} us {tile} err {err:.1e} "
                  f"bytes at 3 TB/s {bytes_us:5.2f}  [{time.time() - t0:.0f} s]", flush=True)  # fmt: skip
    print("\n| M | cuBLAS per layer (us) | Triton, fastest tiles | the bytes at 3 TB/s |")
    for M in MS:
        c, t, b = (sum(r[i] for r in rows if r[0] == M) for i in (2, 3, 4))
        print(f"| {M} | {c:.1f} | {t:.1f} | {b:.1f} |")
    with open(os.path.join(os.environ.get("OUT", "."), "gemm_tiles.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "best": best, "rows": rows}, f)


def chain() -> None:
    W = weights()
    best = json.load(open(os.path.join(HERE, "h100_gemm_tiles.json")))["best"]
    ways = ("cublas", "triton", "start", "end", "prefetch")
    table = []
    for M in MS:
        h0 = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(M))
        bufs = {k: [torch.empty(M, n, device="cuda", dtype=torch.bfloat16) for _ in range(L)] for k, (n, _) in SHAPES.items()}
        outs, line = {}, [M]
        for way in ways:

            def mm(x, name, i):
                if way == "cublas":
                    return torch.matmul(x, W[name][i].t(), out=bufs[name][i])
                pdl = None if way == "triton" else way
                return launch(x, W[name][i], bufs[name][i], best[f"{M}/{name}"][:5], pdl)

            def run():
                h = h0
                for i in range(L):
                    h = mm(mm(mm(mm(h, "qkv", i)[:, :2048], "o", i), "gate_up", i)[:, :3072], "down", i)
                return h

            try:
                t = per_launch_us(run, L)
                outs[way] = run().clone()
                same = "" if way in ("cublas", "triton") else f" equal to the plain chain: {torch.equal(outs[way], outs['triton'])}"
                line.append(f"{t:.1f}")
                print(f"M={M:4d} {way:8s} {t:6.2f} us per layer{same}", flush=True)
            except Exception as e:
                line.append("failed")
                print(f"M={M:4d} {way:8s} failed: {repr(e)[:300]}", flush=True)
        table.append(line)
    print("\nus per layer, four dependent GEMMs; PDL signalled at the kernel's start, after its loop, or at the start with the L2 prefetch")
    print("| M | cuBLAS | Triton | PDL, start | PDL, after the loop | PDL + L2 prefetch |")
    for line in table:
        print("| " + " | ".join(map(str, line)) + " |")


if __name__ == "__main__":
    {"tiles": tiles, "chain": chain}[sys.argv[1] if len(sys.argv) > 1 else "tiles"]()
