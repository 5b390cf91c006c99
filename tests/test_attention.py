"""All attention backends and the KV store kernel against a float64 reference (fresh random inputs)."""
import random

import pytest
import torch


from cleanvllm import attention, config
from cleanvllm.attention import (Attention, paged_attention_torch, paged_decode_triton, paged_prefill_triton,
                                 store_kvcache, store_kvcache_torch, torch_no_cache, triton_no_cache)
from cleanvllm.context import Context, reset_context, set_context
from cleanvllm.reference import reference_paged_attention
from conftest import DEVICES, rel_err

CHAPTERS = ("05",)  # `make check CH=05` runs this file (tools/check.py)

# The interpreter evaluates log(0) for an empty decode split before tl.where discards it: harmless.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


# Triton needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (set in conftest without a GPU).
def triton_ok(device):
    return device == "cuda" or not torch.cuda.is_available()

# Triton under the CPU interpreter is slow: small shapes there, full shapes on the GPU.
SHAPES = [  # (heads, kv_heads, head_dim, block_size)
    (4, 4, 64, 16), (4, 2, 64, 16), (8, 1, 64, 16), (8, 4, 128, 16), (16, 2, 128, 256),
]
INTERPRETED = not torch.cuda.is_available()  # Triton's kernels run in its (slow) CPU interpreter


def interpreter_skips(shape, splits=1):
    """Under the interpreter (`make check CH=05` must stay under a minute) the Triton kernels skip the
    largest shape, and the default split count (up to 32 splits) runs on one GQA shape only."""
    return INTERPRETED and (shape == SHAPES[-1] or (splits is None and shape != SHAPES[2]))


def make_case(q_lens, prefix_lens, heads, kv_heads, hd, bs, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    ctx = [q + p for q, p in zip(q_lens, prefix_lens)]
    need = [-(-c // bs) for c in ctx]
    nblocks = sum(need) + 2
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, i = [], 0
    for n in need:
        tables.append(perm[i:i + n]); i += n
    width = max(need)
    kc = torch.randn(nblocks, bs, kv_heads, hd, generator=g).to(dtype)
    vc = torch.randn(nblocks, bs, kv_heads, hd, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), heads, hd, generator=g).to(dtype)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    bt = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
    dev = dict(cu=torch.tensor(cu, device=device), ctx=torch.tensor(ctx, device=device), bt=bt.to(device),
               q=q.to(device), kc=kc.to(device), vc=vc.to(device))
    return q, kc, vc, cu, ctx, tables, dev


def tol(dtype):
    return {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]


def dtypes(device):
    return [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.tasks("5.3", "5.4", "5.5", "5.6", "5.11", "5.12")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_backends(device, shape):
    heads, kvh, hd, bs = shape
    rng = random.Random(hash(shape))
    for dtype in dtypes(device):
        # fresh prompt, prefix-cached prompt (prefix a multiple of the block size), mid-prompt chunk
        q_lens = [rng.randint(1, 40), rng.randint(1, 20), rng.randint(2, 30)]
        prefix = [0, bs * rng.randint(1, 2), rng.randint(1, 50)]
        q, kc, vc, cu, ctx, tables, d = make_case(q_lens, prefix, heads, kvh, hd, bs, dtype, device, rng.randint(0, 10**6))
        ref = reference_paged_attention(q, kc, vc, cu, ctx, tables, hd ** -0.5)
        out = paged_attention_torch(d["q"], d["kc"], d["vc"], d["cu"], d["ctx"], d["bt"], hd ** -0.5)
        assert rel_err(out, ref) < tol(dtype)
        if not triton_ok(device) or interpreter_skips(shape):
            continue
        out = paged_prefill_triton(d["q"], d["kc"], d["vc"], d["cu"], d["ctx"], d["bt"], max(q_lens), hd ** -0.5)
        assert rel_err(out, ref) < tol(dtype)


@pytest.mark.tasks("5.3", "5.4", "5.5", "5.6", "5.7", "5.8", "5.9", "5.10", "5.17")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_decode_backends(device, shape, splits):
    heads, kvh, hd, bs = shape
    rng = random.Random(hash((shape, splits)))
    for dtype in dtypes(device):
        ctx_lens = [1, rng.randint(2, 40), rng.randint(40, 300), bs]
        q, kc, vc, cu, ctx, tables, d = make_case([1] * 4, [c - 1 for c in ctx_lens], heads, kvh, hd, bs,
                                                  dtype, device, rng.randint(0, 10**6))
        ref = reference_paged_attention(q, kc, vc, cu, ctx, tables, hd ** -0.5)
        out = paged_attention_torch(d["q"], d["kc"], d["vc"], d["cu"], d["ctx"], d["bt"], hd ** -0.5)
        assert rel_err(out, ref) < tol(dtype)
        if not triton_ok(device) or interpreter_skips(shape, splits):
            continue
        out = paged_decode_triton(d["q"], d["kc"], d["vc"], d["ctx"], d["bt"], hd ** -0.5, num_splits=splits)
        assert rel_err(out, ref) < tol(dtype)


@pytest.mark.tasks("5.3", "5.4", "5.5")
def test_torch_backend_without_cache_is_causal_attention():
    """The warm-up path (no cache) equals plain causal attention per sequence."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(15, h, 32, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 6, 15])
    out = paged_attention_torch(q, k, v, cu, None, None, 0.2)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk, vv = k[s:e].repeat_interleave(2, 1), v[s:e].repeat_interleave(2, 1)
        sc = torch.einsum("qhd,khd->hqk", q[s:e].double(), kk.double()) * 0.2
        sc = sc.masked_fill(torch.ones(e - s, e - s).triu(1).bool(), float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", sc.softmax(-1), vv.double())
        assert rel_err(out[s:e], ref) < 1e-6


@pytest.mark.tasks("5.3", "5.5", "5.6", "5.11", "5.12")
def test_nan_in_unused_cache_rows_never_leaks():
    """Stale NaNs beyond a sequence's context must not reach its output (all backends)."""
    q, kc, vc, cu, ctx, tables, d = make_case([3, 1], [5, 7], 4, 2, 64, 16, torch.float32, "cpu", 3)
    ref = reference_paged_attention(q, kc, vc, cu, ctx, tables, 0.125)
    for t, c in zip(tables, ctx):  # poison every row after the context in each sequence's last block
        kc[t[-1], c % 16 or 16:] = float("nan")
        vc[t[-1], c % 16 or 16:] = float("nan")
    out = paged_attention_torch(q, kc, vc, torch.tensor(cu), torch.tensor(ctx), d["bt"], 0.125)
    assert rel_err(out, ref) < 1e-5
    if triton_ok("cpu"):
        out = paged_prefill_triton(q, kc, vc, torch.tensor(cu), torch.tensor(ctx), d["bt"], 3, 0.125)
        assert rel_err(out, ref) < 1e-4


@pytest.mark.tasks("5.1", "5.2")
@pytest.mark.parametrize("device", ["cuda" if torch.cuda.is_available() else "cpu"])
def test_store_kvcache_matches_reference(device):
    g = torch.Generator().manual_seed(1)
    for kvh, hd in [(2, 64), (3, 64), (8, 128)]:  # 3*64 = 192 is not a power of two
        n = 9
        k, v = torch.randn(n, kvh, hd, generator=g), torch.randn(n, kvh, hd, generator=g)
        slots = torch.randperm(40, generator=g)[:n]
        slots[[2, 5]] = -1
        kc = torch.full((5, 8, kvh, hd), float("nan"))
        vc = kc.clone()
        kc2, vc2 = kc.clone().to(device), vc.clone().to(device)
        store_kvcache(k.to(device), v.to(device), kc2, vc2, slots.to(device))
        flat_k, flat_v = kc2.cpu().view(-1, kvh, hd), vc2.cpu().view(-1, kvh, hd)
        for i, s in enumerate(slots.tolist()):  # independent check, token by token
            if s >= 0:
                assert torch.equal(flat_k[s], k[i]) and torch.equal(flat_v[s], v[i])
        written = {s for s in slots.tolist() if s >= 0}
        untouched = [i for i in range(40) if i not in written]
        assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()
        store_kvcache_torch(k, v, kc, vc, slots)
        assert torch.equal(kc.nan_to_num(0), kc2.cpu().nan_to_num(0))


@pytest.mark.tasks("5.6", "5.8", "5.9", "5.10", "5.17")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_n,splits", [(16, 1), (16, 8), (32, 4), (64, 2)])
def test_decode_tile_size_and_splits_keep_the_result(device, block_n, splits):
    """BLOCK_N and the number of splits change the order of the additions, not the result."""
    if not triton_ok(device):
        pytest.skip("Triton needs CUDA or the interpreter")
    q, kc, vc, cu, ctx, tables, d = make_case([1] * 3, [0, 63, 200], 4, 2, 32, 64, torch.float32, device, block_n)
    ref = reference_paged_attention(q, kc, vc, cu, ctx, tables, 0.2)
    out = paged_decode_triton(d["q"], d["kc"], d["vc"], d["ctx"], d["bt"], 0.2, num_splits=splits, block_n=block_n)
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match="block_n"):  # a tile that straddles two blocks is refused
        paged_decode_triton(d["q"], d["kc"], d["vc"], d["ctx"], d["bt"], 0.2, block_n=128)
    with pytest.raises(ValueError, match="num_splits"):  # the merge kernel needs a power of two
        paged_decode_triton(d["q"], d["kc"], d["vc"], d["ctx"], d["bt"], 0.2, num_splits=3)


@pytest.mark.tasks("5.6", "5.9", "5.12")
def test_online_softmax_is_written_once():
    """Issue 12 item 7: the prefill and decode kernels share one @triton.jit online-softmax loop."""
    import inspect

    kernels = [attention._paged_decode_kernel, attention._paged_prefill_kernel]
    for k in kernels:
        src = inspect.getsource(k.fn)
        assert "_attend_tiles(" in src and "tl.exp(" not in src and " for " not in src, k.fn.__name__
    assert inspect.getsource(attention._attend_tiles.fn).count("tl.exp(") == 2


@pytest.mark.tasks("5.5", "5.11", "5.12", "5.13")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_cache_path_is_causal_attention_on_every_backend(backend):
    """Before the KV cache exists (the warm-up forward) each backend runs its own kernels."""
    if backend == "triton" and not triton_ok("cpu"):
        pytest.skip("Triton needs CUDA or the interpreter")
    g = torch.Generator().manual_seed(4)
    lens = [7, 33, 1]
    q, k, v = (torch.randn(sum(lens), h, 32, generator=g) for h in (8, 2, 2))
    cu = torch.tensor([0, 7, 40, 41])
    ctx = Context(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=max(lens))
    out = {"torch": torch_no_cache, "triton": triton_no_cache}[backend](q, k, v, ctx, 0.3)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk, vv = k[s:e].repeat_interleave(4, 1).double(), v[s:e].repeat_interleave(4, 1).double()
        sc = torch.einsum("qhd,khd->hqk", q[s:e].double(), kk) * 0.3
        sc = sc.masked_fill(torch.ones(e - s, e - s).triu(1).bool(), float("-inf"))
        assert rel_err(out[s:e], torch.einsum("hqk,khd->qhd", sc.softmax(-1), vv)) < 1e-5


@pytest.mark.tasks("2.23", "5.15", "5.16")
def test_backend_is_resolved_once_at_construction(monkeypatch):
    """'auto' -> torch on the CPU; unknown names fail at construction; forward never re-chooses."""
    assert Attention(4, 32, 0.2, 2, "auto").backend == "torch"
    with pytest.raises(ValueError, match="attention_backend"):
        Attention(4, 32, 0.2, 2, "magic")
    monkeypatch.setattr(config, "flash_attn_available", lambda: True)
    assert config.pick_attention_backend("auto", "cuda") == "flash"
    monkeypatch.setattr(config, "flash_attn_available", lambda: False)
    assert config.pick_attention_backend("auto", "cuda") == "triton"
    layer = Attention(4, 32, 0.2, 2, "torch")

    def boom(*args):
        raise AssertionError("the backend was chosen again during forward")

    monkeypatch.setattr(attention, "pick_attention_backend", boom)
    set_context(is_prefill=True, cu_seqlens_q=torch.tensor([0, 5]), max_seqlen_q=5)
    try:
        assert layer(torch.randn(5, 128), torch.randn(5, 64), torch.randn(5, 64)).shape == (5, 128)
    finally:
        reset_context()


@pytest.mark.tasks("5.1", "5.2", "5.15", "5.16")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_layer_prefill_then_decode_matches_reference(backend):
    """The layer stores through slot_mapping and attends through block tables, step after step."""
    if backend == "triton" and not triton_ok("cpu"):
        pytest.skip("Triton needs CUDA or the interpreter")
    g = torch.Generator().manual_seed(7)
    heads, kvh, hd, bs = 4, 2, 32, 16
    tables = [[5, 1, 3], [0, 4]]  # room for 48 and 32 tokens
    layer = Attention(heads, hd, hd ** -0.5, kvh, backend)
    layer.k_cache, layer.v_cache = torch.full((2, 6, bs, kvh, hd), float("nan")).unbind(0)
    keys, values = torch.zeros(6 * bs, kvh, hd), torch.zeros(6 * bs, kvh, hd)  # independent copy
    done = [0, 0]
    for step, new in enumerate([[40, 20], [1, 1], [1, 1]]):
        ctx = [d + n for d, n in zip(done, new)]
        slots = [tables[b][p // bs] * bs + p % bs for b in range(2) for p in range(done[b], ctx[b])]
        q = torch.randn(sum(new), heads * hd, generator=g)
        k, v = torch.randn(sum(new), kvh * hd, generator=g), torch.randn(sum(new), kvh * hd, generator=g)
        keys[slots], values[slots] = k.view(-1, kvh, hd), v.view(-1, kvh, hd)
        cu = [0, new[0], sum(new)]
        set_context(is_prefill=step == 0, cu_seqlens_q=torch.tensor(cu), max_seqlen_q=max(new),
                    slot_mapping=torch.tensor(slots), context_lens=torch.tensor(ctx),
                    block_tables=torch.tensor([tables[0], tables[1] + [-1]]))
        try:
            out = layer(q, k, v)
        finally:
            reset_context()
        ref = reference_paged_attention(q.view(-1, heads, hd), keys.view(6, bs, kvh, hd),
                                        values.view(6, bs, kvh, hd), cu, ctx, tables, hd ** -0.5)
        assert rel_err(out.view(-1, heads, hd), ref) < 1e-5, f"step {step}"
        done = ctx


def test_each_backend_says_what_the_runner_needs_to_know():
    """The runner never names a backend: it asks for the backend's extra Context fields and whether
    its decode can be captured. flash-attn's varlen prefill wants cu_seqlens_k, the running sum of
    the context lengths (by hand: 0, 5, 5 + 17, 5 + 17 + 1); nothing else wants anything more."""
    from cleanvllm.attention import BACKENDS

    cpu = torch.device("cpu")
    got = BACKENDS["flash"].metadata(True, [5, 17, 1], cpu)
    assert list(got) == ["cu_seqlens_k"] and got["cu_seqlens_k"].tolist() == [0, 5, 22, 23]
    assert got["cu_seqlens_k"].dtype == torch.int32  # flash-attn's index type
    assert BACKENDS["flash"].metadata(False, [], cpu) == {}
    assert all(BACKENDS[n].metadata(True, [5], cpu) == {} for n in ("torch", "triton"))
    assert {n: b.capturable for n, b in BACKENDS.items()} == {"torch": False, "triton": True, "flash": True}
