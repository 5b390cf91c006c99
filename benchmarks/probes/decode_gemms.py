"""A decode layer's four GEMMs of Qwen3-0.6B (y = x @ W.T) on a GPU: a probe for issue 22, not part
of the package. Results: benchmarks/RESULTS.md, sections "2026-12-07, 15:10-15:30 UTC" and
"2026-12-07, 17:31-18:17 UTC".

    python benchmarks/probes/decode_gemms.py tiles   # cuBLAS against the fastest Triton tiles
    python benchmarks/probes/decode_gemms.py chain   # the four as a dependent chain, with PDL
    python benchmarks/probes/decode_gemms.py persist # the chain as one persistent launch

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
launched differently), checked after every intermediate buffer was filled with NaN, so that a
kernel reading its input too early would show. (Until commit 4eb681b the buffers were not refilled:
a too-early read would have found the same values from the replay before, so the equalities
reported in RESULTS.md's 17:31-18:17 section do not rule out a race.)
`chain` also loads the first two tiles of W before the wait ("preload", signalled at the start or
after the loop). `persist`: the same chain as one launch of one program per SM, the GEMMs as phases
separated by a grid-wide barrier (an atomic counter), each program computing the same tiles as the
one-launch-per-GEMM chain (so the outputs must be equal bit for bit), with and without pulling the
next phase's weights into L2 before the barrier (a prefetch per 128-byte line, or Hopper's bulk
prefetch of each tile's block; this one has only been compiled for sm_90 on a CPU machine, never
run); a barrier that times out sets an error flag.
All use 28 distinct weight sets, so every launch reads its weights from HBM (one layer's 31 MB
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
         SPLIT: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr, PREFETCH: tl.constexpr,
         PRELOAD: tl.constexpr = False):  # fmt: skip
    """One [BM, BN] tile of y over K / SPLIT of the inputs; SPLIT > 1 adds into a float32 y."""
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(2) * (K // SPLIT) + tl.arange(0, BK)
    if PDL and EARLY:
        gdc_launch_dependents()
    if PREFETCH:  # one address per 128-byte line of this CTA's rows of W
        lines = tl.arange(0, 64)
        _prefetch_l2(tl.where(lines[None, :] < K // 64, w + rn[:, None] * swn + lines[None, :] * 64, w))
    xp = x + rm[:, None] * sxm + rk[None, :]
    wp = w + rn[None, :] * swn + rk[:, None]
    if PRELOAD:  # the first two tiles of W into registers while the kernel before still runs
        w0 = tl.load(wp)
        w1 = tl.load(wp + BK)
    if PDL:
        gdc_wait()  # x was written by the kernel before
    acc = tl.zeros([BM, BN], tl.float32)
    if PRELOAD:
        acc = tl.dot(tl.load(xp, mask=rm[:, None] < M, other=0.0), w0, acc)
        acc = tl.dot(tl.load(xp + BK, mask=rm[:, None] < M, other=0.0), w1, acc)
        xp += 2 * BK
        wp += 2 * BK
    for _ in range(2 * BK if PRELOAD else 0, K // SPLIT, BK):
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
    """y = x @ w.T with `tile` = (BM, BN, BK, warps, stages[, splits]); pdl: None, "start", "end",
    "prefetch" (signalled at the start, and the weights pulled into L2), or "preload-start" and
    "preload-end" (the first two tiles of W loaded before the wait; at least 2 tiles per split)."""
    (BM, BN, BK, warps, stages), split = tile[:5], (tile[5] if len(tile) > 5 else 1)
    (M, K), N = x.shape, w.shape[0]
    out = torch.zeros(M, N, device=x.device, dtype=torch.float32) if split > 1 else y
    gemm[(N // BN, triton.cdiv(M, BM), split)](
        x, w, out, M, N, K, x.stride(0), w.stride(0), out.stride(0), BM=BM, BN=BN, BK=BK,
        SPLIT=split, PDL=pdl is not None, EARLY=pdl not in ("end", "preload-end"), PREFETCH=pdl == "prefetch",
        PRELOAD=pdl in ("preload-start", "preload-end"),
        num_warps=warps, num_stages=stages, launch_pdl=pdl is not None,
    )  # fmt: skip
    if split > 1:
        y.copy_(out)  # the cast back is part of split-K's cost
    return y


@triton.jit
def _tiles(x, w, y, M, N: tl.constexpr, K: tl.constexpr, sxm, swn, sym, pid, G,
           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """One GEMM phase of `persistent`: program pid computes tiles pid, pid + G, ... of y = x @ w.T,
    each exactly as `gemm` computes it (the same loads and dots in the same order)."""
    n_n = N // BN
    for t in range(pid, tl.cdiv(M, BM) * n_n, G):
        rm = (t // n_n) * BM + tl.arange(0, BM)
        rn = (t % n_n) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], tl.float32)
        xp = x + rm[:, None] * sxm + rk[None, :]
        wp = w + rn[None, :] * swn + rk[:, None]
        for _ in range(0, K, BK):  # x was written by other programs: read it past L1 (.cg)
            xt = tl.load(xp, mask=rm[:, None] < M, other=0.0, cache_modifier=".cg")
            acc = tl.dot(xt, tl.load(wp), acc)
            xp += BK
            wp += BK
        tl.store(y + rm[:, None] * sym + rn[None, :], acc.to(y.dtype.element_ty), mask=rm[:, None] < M)


@triton.jit
def _prefetch_bulk(p, nbytes):
    """Hopper's bulk prefetch: nbytes (a multiple of 16) from p (16-byte aligned) into L2."""
    return tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r", [p, nbytes],
        dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _prefetch_tiles(w, M, N: tl.constexpr, K: tl.constexpr, swn: tl.constexpr, pid, G,
                    BM: tl.constexpr, BN: tl.constexpr, BULK: tl.constexpr):  # fmt: skip
    """Pull into L2 the rows of w that program pid's tiles of the next phase will read: one
    `prefetch.global.L2` per 128-byte line, or (BULK) the tile's BN x K block, contiguous, as 128
    bulk prefetches of BN * K / 128 elements each."""
    n_n = N // BN
    for t in range(pid, tl.cdiv(M, BM) * n_n, G):
        if BULK:
            chunk: tl.constexpr = BN * K // 128
            base = w + (t % n_n) * BN * swn
            _prefetch_bulk(base + tl.arange(0, 128) * chunk, tl.full([128], chunk * 2, tl.int32))
        else:
            rn = (t % n_n) * BN + tl.arange(0, BN)
            lines = tl.arange(0, 64)
            _prefetch_l2(tl.where(lines[None, :] < K // 64, w + rn[:, None] * swn + lines[None, :] * 64, w))


@triton.jit
def _grid_sync(bar, target, err, LIMIT: tl.constexpr):
    """Wait until the counter `bar` reaches target (every program arrived); after LIMIT polls, give
    up and set *err, so that a broken barrier ends in an error, not a hang."""
    tl.debug_barrier()  # every thread's stores of this phase before this program's arrival
    tl.atomic_add(bar, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(bar, 0, sem="acquire", scope="gpu")
    n = 0
    while (seen < target) & (n < LIMIT):
        seen = tl.atomic_add(bar, 0, sem="acquire", scope="gpu")
        n += 1
    if seen < target:
        tl.atomic_xchg(err, 1)
    tl.debug_barrier()


@triton.jit
def _phase(x, w, y, M, N: tl.constexpr, K: tl.constexpr, sxm, swn: tl.constexpr, sym: tl.constexpr,
           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, w2, N2: tl.constexpr, K2: tl.constexpr,
           swn2: tl.constexpr, BM2: tl.constexpr, BN2: tl.constexpr, pid, G, bar, target, err,
           LIMIT: tl.constexpr, PREFETCH: tl.constexpr):  # fmt: skip
    """One GEMM of `persistent` (this program's tiles), then, with PREFETCH, the next GEMM's weights
    (w2: N2 x K2) into L2, then the grid-wide barrier."""
    _tiles(x, w, y, M, N, K, sxm, swn, sym, pid, G, BM, BN, BK)
    if PREFETCH:  # 1: a prefetch per line, 2: bulk
        _prefetch_tiles(w2, M, N2, K2, swn2, pid, G, BM2, BN2, PREFETCH == 2)
    _grid_sync(bar, target, err, LIMIT)


@triton.jit
def persistent(h0, wq, wo, wg, wd, bq, bo, bg, bd, bar, err, M, LAYERS,
               QM: tl.constexpr, QN: tl.constexpr, QK: tl.constexpr, OM: tl.constexpr,
               ON: tl.constexpr, OK: tl.constexpr, GM: tl.constexpr, GN: tl.constexpr,
               GK: tl.constexpr, DM: tl.constexpr, DN: tl.constexpr, DK: tl.constexpr,
               LIMIT: tl.constexpr, PREFETCH: tl.constexpr):  # fmt: skip
    """The whole chain of `chain` in one launch of one program per SM: the four GEMMs of each layer
    as phases separated by a grid-wide barrier (the next phase reads what every program wrote).
    w*: [LAYERS, N, K] weights, b*: [LAYERS, M, N] outputs; with PREFETCH, each program pulls its
    next phase's weights into L2 before it waits at the barrier."""
    pid, G = tl.program_id(0), tl.num_programs(0)
    x = h0
    for i in range(LAYERS):
        q, o, g, d = bq + i * M * 4096, bo + i * M * 1024, bg + i * M * 6144, bd + i * M * 1024
        nxt = (i + 1) % LAYERS  # the next layer's q/k/v weights (the last layer: the first's, unused)
        s = 4 * i  # barriers passed before this layer
        _phase(x, wq + i * 4096 * 1024, q, M, 4096, 1024, 1024, 1024, 4096, QM, QN, QK,
               wo + i * 1024 * 2048, 1024, 2048, 2048, OM, ON, pid, G, bar, (s + 1) * G, err, LIMIT, PREFETCH)  # fmt: skip
        _phase(q, wo + i * 1024 * 2048, o, M, 1024, 2048, 4096, 2048, 1024, OM, ON, OK,
               wg + i * 6144 * 1024, 6144, 1024, 1024, GM, GN, pid, G, bar, (s + 2) * G, err, LIMIT, PREFETCH)  # fmt: skip
        _phase(o, wg + i * 6144 * 1024, g, M, 6144, 1024, 1024, 1024, 6144, GM, GN, GK,
               wd + i * 1024 * 3072, 1024, 3072, 3072, DM, DN, pid, G, bar, (s + 3) * G, err, LIMIT, PREFETCH)  # fmt: skip
        _phase(g, wd + i * 1024 * 3072, d, M, 1024, 3072, 6144, 3072, 1024, DM, DN, DK,
               wq + nxt * 4096 * 1024, 4096, 1024, 1024, QM, QN, pid, G, bar, (s + 4) * G, err, LIMIT, PREFETCH)  # fmt: skip
        x = d


def launch_persistent(h0, Ws, bufs, tiles, programs, prefetch=0, limit=1 << 20):
    """One launch of `persistent`; Ws / bufs: {name: [LAYERS, ...]}; tiles: {name: (BM, BN, BK,
    warps, stages)}; prefetch: 0, 1 (a prefetch per line) or 2 (bulk); returns (the last layer's
    output, the error flag)."""
    bar = torch.zeros(1, device=h0.device, dtype=torch.int32)
    err = torch.zeros(1, device=h0.device, dtype=torch.int32)
    t = {k: v[:3] for k, v in tiles.items()}
    persistent[(programs,)](
        h0, Ws["qkv"], Ws["o"], Ws["gate_up"], Ws["down"], bufs["qkv"], bufs["o"], bufs["gate_up"],
        bufs["down"], bar, err, h0.shape[0], Ws["qkv"].shape[0], *t["qkv"], *t["o"], *t["gate_up"],
        *t["down"], LIMIT=limit, PREFETCH=prefetch, num_warps=tiles["qkv"][3], num_stages=tiles["qkv"][4],
    )  # fmt: skip
    return bufs["down"][-1], err


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


def timed(M: int, way: str, run, outs: dict, bufs: dict) -> str:
    """Time `run` (L layers) per layer; then fill every intermediate buffer with NaN, run it once
    more, keep its output in outs[way] and compare it bit for bit with the plain Triton chain's
    (when that ran first). The NaNs make the comparison able to fail: a kernel that read its input
    before the kernel before had written it would read NaN, not the same values from a replay."""
    try:
        t = per_launch_us(run, L)
        for b in bufs.values():
            for x in b if isinstance(b, list) else [b]:
                x.fill_(float("nan"))
        outs[way] = run().clone()
        same = "" if way == "triton" or "triton" not in outs else f" equal to the plain chain: {torch.equal(outs[way], outs['triton'])}"
        print(f"M={M:4d} {way:26s} {t:6.2f} us per layer{same}", flush=True)
        return f"{t:.1f}"
    except Exception as e:
        print(f"M={M:4d} {way:26s} failed: {repr(e)[:300]}", flush=True)
        return "failed"


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
    ways = ("cublas", "triton", "start", "end", "prefetch", "preload-start", "preload-end")
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

            line.append(timed(M, way, run, outs, bufs))
        table.append(line)
    print("\nus per layer, four dependent GEMMs; PDL signalled at the kernel's start, after its loop, at the start with the L2 prefetch; the first two tiles of W loaded before the wait, signalled at the start or after the loop")
    print("| M | cuBLAS | Triton | PDL, start | PDL, after the loop | PDL + L2 prefetch | preload, start | preload, after the loop |")
    for line in table:
        print("| " + " | ".join(map(str, line)) + " |")


def persist() -> None:
    """`chain`'s four GEMMs x 28 layers as one persistent launch against one launch per GEMM (plain
    and PDL after the loop), the same tiles, so the outputs must be equal bit for bit."""
    Ws = {k: torch.stack(v) for k, v in weights().items()}
    best = json.load(open(os.path.join(HERE, "h100_gemm_tiles.json")))["best"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    table = []
    for M in MS:
        tiles = {k: best[f"{M}/{k}"][:5] for k in SHAPES}
        h0 = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(M))
        bufs = {k: torch.empty(L, M, n, device="cuda", dtype=torch.bfloat16) for k, (n, _) in SHAPES.items()}
        line, outs = [M], {}
        for way in ("triton", "end", "persistent", "persistent + L2 prefetch", "persistent + bulk L2 prefetch"):
            if way in ("triton", "end"):
                pdl = None if way == "triton" else "end"

                def run():
                    h = h0
                    for i in range(L):
                        q = launch(h, Ws["qkv"][i], bufs["qkv"][i], tiles["qkv"], pdl)
                        o = launch(q[:, :2048], Ws["o"][i], bufs["o"][i], tiles["o"], pdl)
                        g = launch(o, Ws["gate_up"][i], bufs["gate_up"][i], tiles["gate_up"], pdl)
                        h = launch(g[:, :3072], Ws["down"][i], bufs["down"][i], tiles["down"], pdl)
                    return h
            else:

                def run():
                    prefetch = {"persistent": 0, "persistent + L2 prefetch": 1}.get(way, 2)
                    out, err = launch_persistent(h0, Ws, bufs, tiles, sms, prefetch, 1 << 16)
                    if not torch.cuda.is_current_stream_capturing() and err.item():
                        raise RuntimeError("a grid barrier timed out (programs not all resident?)")
                    return out

            line.append(timed(M, way, run, outs, bufs))
        table.append(line)
    print(f"\nus per layer, four dependent GEMMs, {sms} programs for the persistent kernel")
    print("| M | Triton, a launch per GEMM | PDL after the loop | one persistent launch | persistent + L2 prefetch | persistent + bulk L2 prefetch |")
    for line in table:
        print("| " + " | ".join(map(str, line)) + " |")


if __name__ == "__main__":
    {"tiles": tiles, "chain": chain, "persist": persist}[sys.argv[1] if len(sys.argv) > 1 else "tiles"]()
