"""The fused GPU kernels of chapters 6 and 7 (Triton; on the CPU through the interpreter, small shapes):
q/k RMSNorm + rotary + KV store in one kernel, and the one-pass (Gumbel-max) sampler."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from cleanvllm.attention import Attention, store_kvcache
from cleanvllm.context import reset_context, set_context
from cleanvllm.layers import RMSNorm, RotaryEmbedding, qk_norm_rope_store, rmsnorm_triton, rope_triton
from cleanvllm.sampler import sample_temperature_triton
from conftest import DEVICES

CHAPTERS = ("06",)  # `make check CH=06` runs this file (tools/check.py)


def triton_ok(device):
    return device == "cuda" or not torch.cuda.is_available()


def rope64(x, pos, theta):
    """Rotate-half rotary embedding in float64, from its definition."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def rms64(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


# (heads, kv_heads, head_dim, with q/k norm): Qwen3-like, odd head counts, a head size that is not a
# power of two (masked halves), and Llama/Qwen2 without the norms
CASES = [(4, 2, 16, True), (6, 3, 24, True), (3, 1, 32, False)]


@pytest.mark.tasks("6.18")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads,d,norm", CASES)
def test_fused_qk_norm_rope_store_matches_float64_steps(device, heads, kv_heads, d, norm):
    if not triton_ok(device):
        pytest.skip("Triton needs CUDA or the interpreter")
    g = torch.Generator().manual_seed(heads * 100 + d)
    n, blocks, bs, theta, eps = 9, 5, 4, 10000.0, 1e-6
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d, generator=g)
    pos = torch.randint(0, 100, (n,), generator=g)
    slots = torch.randperm(blocks * bs, generator=g)[:n]
    slots[[1, 5]] = -1
    wq, wk = torch.randn(d, generator=g), torch.randn(d, generator=g)
    rope = RotaryEmbedding(d, 128, theta).to(device)
    norms = (None, None)
    if norm:
        norms = RMSNorm(d, eps).to(device), RMSNorm(d, eps).to(device)
        norms[0].weight.data, norms[1].weight.data = wq.to(device), wk.to(device)
    kc = torch.full((blocks, bs, kv_heads, d), float("nan"), device=device)
    vc = kc.clone()
    q = qk_norm_rope_store(qkv.to(device), pos.to(device), rope, *norms, kc, vc, slots.to(device))

    x = qkv.double()
    q64, k64, v64 = (t.reshape(n, -1, d) for t in x.split([heads * d, kv_heads * d, kv_heads * d], -1))
    if norm:
        q64, k64 = rms64(q64, wq.double(), eps), rms64(k64, wk.double(), eps)
    q64, k64 = rope64(q64, pos, theta), rope64(k64, pos, theta)
    assert (q.cpu().double() - q64).abs().max() < 1e-5
    kflat, vflat = kc.cpu().view(-1, kv_heads, d).double(), vc.cpu().view(-1, kv_heads, d).double()
    keep = slots >= 0
    assert (kflat[slots[keep]] - k64[keep]).abs().max() < 1e-5
    assert torch.equal(vflat[slots[keep]], v64[keep])
    untouched = torch.ones(blocks * bs, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert kflat[untouched].isnan().all() and vflat[untouched].isnan().all()


@pytest.mark.tasks("6.15", "6.17", "6.18")
@pytest.mark.parametrize("device", DEVICES)
def test_fused_kernel_rounds_like_the_separate_kernels_in_bf16(device):
    """It rounds where rmsnorm_triton, rope_triton and store_kvcache round (full Qwen3 shape on a GPU):
    equal within one bf16 rounding (its sum of squares runs in another order), values copied exactly."""
    if not triton_ok(device):
        pytest.skip("Triton needs CUDA or the interpreter")
    heads, kvh, d, n = (16, 8, 128, 300) if device == "cuda" else (4, 2, 32, 5)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(n, (heads + 2 * kvh) * d, generator=g).to(torch.bfloat16).to(device)
    pos = torch.randint(0, 4000, (n,), generator=g).to(device)
    slots = torch.randperm(4 * n, generator=g)[:n].to(device)
    rope = RotaryEmbedding(d, 4096, 1e6).to(device)
    qn, kn = RMSNorm(d).to(device).bfloat16(), RMSNorm(d).to(device).bfloat16()
    qn.weight.data, kn.weight.data = (torch.randn(d, generator=g).bfloat16().to(device) for _ in range(2))
    caches = torch.zeros(4, 2 * n, 2, kvh, d, dtype=torch.bfloat16, device=device)  # 2 * n blocks of 2
    q = qk_norm_rope_store(qkv, pos, rope, qn, kn, caches[0], caches[1], slots)
    q2, k2, v2 = qkv.split([heads * d, kvh * d, kvh * d], -1)
    q2 = rmsnorm_triton(q2.reshape(n, heads, d), qn.weight, qn.eps)
    k2 = rmsnorm_triton(k2.reshape(n, kvh, d), kn.weight, kn.eps)
    q2, k2 = rope_triton(pos, q2, k2, rope.cos_sin)
    store_kvcache(k2, v2.reshape(n, kvh, d).contiguous(), caches[2], caches[3], slots)
    for a, b in ((q, q2), (caches[0], caches[2])):
        a, b = a.float(), b.float()
        # a normalised value one bf16 step apart moves each rotary product by one step of its own
        # size (up to the largest value), and the difference of two products keeps that error
        assert (a - b).abs().max() <= 2**-6 * b.abs().max()
    assert torch.equal(caches[1], caches[3])


def test_attention_without_k_and_v_needs_a_cache_and_both_or_neither():
    layer = Attention(2, 8, 0.3, 1, "torch")
    set_context(is_prefill=True, cu_seqlens_q=torch.tensor([0, 2]), max_seqlen_q=2)
    try:
        with pytest.raises(ValueError, match="before the KV cache exists"):
            layer(torch.randn(2, 16))
        with pytest.raises(ValueError, match="both k and v, or neither"):
            layer(torch.randn(2, 16), torch.randn(2, 8))
    finally:
        reset_context()


@triton.jit
def _rand_probe(SEED, OUT, vocab, CHUNK: tl.constexpr, SPLITS: tl.constexpr):
    """The sampler's noise, written out: token 4q + j of a chunk gets the j-th of counter q's four."""
    row, split = tl.program_id(0), tl.program_id(1)
    q = tl.arange(0, CHUNK // 4)
    u0, u1, u2, u3 = tl.rand4x(tl.load(SEED), (row * SPLITS + split) * (CHUNK // 4) + q)
    offs = split * CHUNK + 4 * q
    tl.store(OUT + row * vocab + offs, u0, mask=offs < vocab)
    tl.store(OUT + row * vocab + offs + 1, u1, mask=offs + 1 < vocab)
    tl.store(OUT + row * vocab + offs + 2, u2, mask=offs + 2 < vocab)
    tl.store(OUT + row * vocab + offs + 3, u3, mask=offs + 3 < vocab)


@pytest.mark.parametrize("device", DEVICES)
def test_one_pass_sampler_is_the_gumbel_max_of_its_noise(device):
    if not triton_ok(device):
        pytest.skip("Triton needs CUDA or the interpreter")
    rows, vocab, chunk = 5, 2500, 512
    g = torch.Generator().manual_seed(11)
    seed = torch.tensor([987654321], device=device)
    lg = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2
    temps = torch.tensor([0.5, 1.0, 2.0, 0.9, 0.05])
    got = sample_temperature_triton(lg.float().to(device), temps.to(device), seed, chunk).cpu()
    u = torch.empty(rows, vocab, device=device)
    _rand_probe[(rows, triton.cdiv(vocab, chunk))](seed, u, vocab, chunk, triton.cdiv(vocab, chunk))
    u = u.cpu().double().numpy()
    assert u.min() >= 0 and u.max() < 1
    hist = np.histogram(u, bins=8, range=(0, 1))[0] / u.size
    assert np.all(np.abs(hist - 1 / 8) < 5 * np.sqrt((1 / 8) * (7 / 8) / u.size))
    want = np.argmax(lg.numpy() / temps.double().numpy()[:, None] - np.log(-np.log(u)), axis=1)
    assert got.tolist() == want.tolist()
    other = sample_temperature_triton(lg.float().to(device), temps.to(device), seed + 7, chunk).cpu()
    assert not torch.equal(got, other)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_sampler_greedy_rows_are_argmax(device, dtype):
    if not triton_ok(device):
        pytest.skip("Triton needs CUDA or the interpreter")
    rows, vocab, chunk = (256, 151_936, 4096) if device == "cuda" else (4, 3000, 1024)
    g = torch.Generator().manual_seed(3)
    lg = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    lg[0, [7, vocab - 3]] = 100.0  # a tie in two chunks: the smaller id, as torch.argmax
    temps = torch.zeros(rows)
    temps[1::2] = 1e-5 / 2  # below vLLM's epsilon: greedy too
    got = sample_temperature_triton(lg.to(device), temps.to(device), torch.tensor([1], device=device), chunk)
    assert torch.equal(got.cpu(), lg.float().argmax(-1)) and got[0].item() == 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (1M rows)")
def test_one_pass_sampler_distribution_on_gpu():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -3.0])
    n, t = 1_000_000, 0.7
    ids = sample_temperature_triton(logits.repeat(n, 1).cuda(), torch.full((n,), t, device="cuda"),
                                    torch.tensor([42], device="cuda"))
    freq = np.bincount(ids.cpu().numpy(), minlength=6) / n
    ref = torch.softmax(logits.double() / t, 0).numpy()
    assert np.all(np.abs(freq - ref) <= 5 * np.sqrt(ref * (1 - ref) / n) + 1e-9), (freq, ref)


@pytest.mark.tasks("7.9")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,real", [(1, 1), (8, 3), (300, 230)])
def test_decode_slots_kernel_writes_each_rows_slot_and_context(device, rows, real):
    """The one-kernel decode_slots of the runner's GPU path, against the slot formula row by row in
    Python: real rows write block_tables[i, p // bs] * bs + p % bs and attend to p + 1 keys, padding
    rows write -1 and attend to one key; every element of both outputs is written (poisoned first).
    The tables are a view of a wider buffer, as the runner's are."""
    from cleanvllm.input_batch import decode_slots_triton

    if not triton_ok(device):
        pytest.skip("Triton needs CUDA or the interpreter")
    bs, width, rng = 16, 8, np.random.default_rng(rows)
    wide = rng.permutation(50_000)[: rows * (width + 3)].reshape(rows, width + 3)
    pos = rng.integers(0, width * bs, rows)
    want_slots = [int(wide[i, p // bs]) * bs + int(p) % bs if i < real else -1 for i, p in enumerate(pos)]
    want_ctx = [int(p) + 1 if i < real else 1 for i, p in enumerate(pos)]
    tables = torch.tensor(wide, device=device)[:, :width]
    slots = torch.full((rows,), -7, dtype=torch.int64, device=device)
    ctx = torch.full((rows,), -7, dtype=torch.int64, device=device)
    decode_slots_triton(torch.tensor(pos, device=device), tables, torch.tensor([real], device=device), bs, slots, ctx)
    assert slots.tolist() == want_slots
    assert ctx.tolist() == want_ctx
