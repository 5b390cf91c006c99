"""The building blocks of chapter 6, each against an independent reference: the slices the parallel
layers keep (and what they compute, two ranks as threads with their own gloo groups), RMSNorm,
SiLU-and-multiply and rotary in PyTorch (float64 formulas, transformers) and as Triton kernels (on
the CPU through the interpreter), and the loader's name mapping."""

import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from cleanvllm.layers import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm,
                              RotaryEmbedding, RowParallelLinear, SiluAndMul, TPGroup,
                              VocabParallelEmbedding, rmsnorm_triton, rope_inv_freq, rope_triton,
                              silu_mul_triton)
from cleanvllm.loader import route
from cleanvllm.models.qwen3 import PACKED_MODULES
from conftest import DEVICES, in_threads

CHAPTERS = ("06",)  # `make check CH=06` runs this file (tools/check.py)


def ranks(fn, size=2):
    """fn(tp) for each rank of a size-way group, one thread per rank with its own gloo group."""
    store = dist.HashStore()
    return in_threads(lambda r: fn(TPGroup(r, size, dist.ProcessGroupGloo(store, r, size, timedelta(seconds=60)))), size)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.tasks("6.1", "6.2")
def test_collectives_sum_on_every_rank_and_gather_on_the_first():
    def run(tp):
        x = torch.tensor([[tp.rank + 1.0, 10.0 * tp.rank]])
        return tp.all_reduce(x.clone()), tp.gather_to_first(x)

    for size in (2, 3):
        out = ranks(run, size)
        for rank, (summed, gathered) in enumerate(out):
            assert summed.tolist() == [[sum(range(1, size + 1)), 10.0 * sum(range(size))]], f"rank {rank}/{size}"
            want = [sum(([r + 1.0, 10.0 * r] for r in range(size)), [])] if rank == 0 else None
            assert (gathered.tolist() if gathered is not None else None) == want, f"rank {rank}/{size}"
    assert TPGroup().all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]


@pytest.mark.tasks("6.3")
@pytest.mark.parametrize("size", [1, 2, 3])
def test_column_parallel_rank_keeps_its_rows(size):
    w, b = rand(6, 5), rand(6, seed=1)
    for r in range(size):
        layer = ColumnParallelLinear(5, 6, bias=True, tp=TPGroup(r, size))
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        rows = slice(r * 6 // size, (r + 1) * 6 // size)
        assert torch.equal(layer.weight.data, w[rows]) and torch.equal(layer.bias.data, b[rows]), f"rank {r}/{size}"


@pytest.mark.tasks("6.4", "6.5")
@pytest.mark.parametrize("size", [1, 2])
def test_packed_qkv_rank_keeps_its_heads_of_every_part(size):
    hidden, hd, heads, kv = 8, 2, 4, 2
    parts = {"q": rand(heads * hd, hidden, seed=2), "k": rand(kv * hd, hidden, seed=3), "v": rand(kv * hd, hidden, seed=4)}
    for r in range(size):
        layer = QKVParallelLinear(hidden, hd, heads, kv, tp=TPGroup(r, size))
        for name in "vqk":  # any order
            layer.weight.weight_loader(layer.weight, parts[name], name)
        mine = [p[r * len(p) // size:(r + 1) * len(p) // size] for p in parts.values()]
        assert torch.equal(layer.weight.data, torch.cat(mine)), f"rank {r}/{size}: [its q; its k; its v]"


@pytest.mark.tasks("6.6")
def test_row_parallel_rank_keeps_its_columns_and_the_whole_bias():
    w, b = rand(4, 6), rand(4, seed=1)
    for r in range(2):
        layer = RowParallelLinear(6, 4, bias=True, tp=TPGroup(r, 2))
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        assert torch.equal(layer.weight.data, w[:, 3 * r:3 * r + 3]) and torch.equal(layer.bias.data, b)


@pytest.mark.tasks("6.6", "6.7")
def test_row_parallel_sums_the_ranks_and_adds_the_bias_once():
    w, b, x = rand(4, 6), rand(4, seed=1), rand(3, 6, seed=2)

    def run(tp):
        layer = RowParallelLinear(6, 4, bias=True, tp=tp)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        return layer(x.chunk(2, -1)[tp.rank])

    ref = x.double() @ w.double().T + b.double()
    for y in ranks(run):
        assert (y.double() - ref).abs().max() < 1e-5


@pytest.mark.tasks("6.8")
@pytest.mark.parametrize("vocab,size", [(11, 2), (10, 4), (8, 2), (7, 1)])
def test_vocab_ranges_cover_the_vocabulary_once(vocab, size):
    layers = [VocabParallelEmbedding(vocab, 3, TPGroup(r, size)) for r in range(size)]
    per = math.ceil(vocab / size)
    assert [(e.start, e.end) for e in layers] == [(min(r * per, vocab), min(r * per + per, vocab)) for r in range(size)]
    assert all(e.weight.shape == (per, 3) for e in layers)


@pytest.mark.tasks("6.8", "6.9")
def test_vocab_parallel_embedding_and_head_on_two_ranks():
    emb_w, ids, h = rand(11, 4), torch.tensor([0, 5, 6, 10, 3, 5]), rand(2, 4, seed=1)

    def run(tp):
        emb, head = VocabParallelEmbedding(11, 4, tp), ParallelLMHead(11, 4, tp)
        emb.weight.weight_loader(emb.weight, emb_w)
        head.weight.weight_loader(head.weight, emb_w)
        return emb(ids), head(h)

    (e0, l0), (e1, l1) = ranks(run)
    assert torch.equal(e0, emb_w[ids]) and torch.equal(e1, emb_w[ids])
    assert (l0.double() - h.double() @ emb_w.double().T).abs().max() < 1e-5 and l1 is None


def rms64(x, w, eps):
    return x / (x * x).mean(-1, keepdim=True).add(eps).sqrt() * w


@pytest.mark.tasks("6.10")
@pytest.mark.parametrize("scale", [1.0, 1e-3])  # at 1e-3, mean(x^2) is as small as eps
def test_rmsnorm_matches_the_float64_formula(scale):
    x, r, w = rand(5, 64, dtype=torch.float64) * scale, rand(5, 64, seed=1, dtype=torch.float64) * scale, rand(64, seed=2)
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = w
    assert (norm.forward_native(x.float()).double() - rms64(x, w.double(), 1e-6)).abs().max() < 1e-5
    y, s = norm.forward_native(x.float(), r.float())
    assert torch.equal(s, x.float() + r.float())
    assert (y.double() - rms64(x + r, w.double(), 1e-6)).abs().max() < 1e-5


@pytest.mark.tasks("6.10")
def test_rmsnorm_in_bf16_rounds_like_transformers():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    x, w = rand(7, 64).bfloat16(), rand(64, seed=1).bfloat16()
    ours, theirs = RMSNorm(64).bfloat16(), Qwen3RMSNorm(64).bfloat16()
    ours.weight.data = theirs.weight.data = w
    assert torch.equal(ours.forward_native(x), theirs(x))


@pytest.mark.tasks("6.11")
def test_silu_and_mul():
    x = rand(4, 2 * 16, dtype=torch.float64)
    gate, up = x[:, :16], x[:, 16:]
    assert (SiluAndMul().forward_native(x.float()).double() - gate / (1 + (-gate).exp()) * up).abs().max() < 1e-6


@pytest.mark.tasks("6.12")
def test_rope_inv_freq_default_and_llama3():
    d, theta = 64, 500000.0
    plain = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    assert torch.allclose(rope_inv_freq(d, theta).double(), plain, rtol=1e-6, atol=0)
    scaling = {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=d * 4, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=scaling)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    assert torch.allclose(rope_inv_freq(d, theta, scaling), ref, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="yarn"):
        rope_inv_freq(d, theta, {"rope_type": "yarn"})


@pytest.mark.tasks("6.13")
def test_rotary_table_is_cos_then_sin_of_position_times_frequency():
    d, theta = 32, 10000.0
    table = RotaryEmbedding(d, 50, theta).cos_sin
    ang = torch.arange(50, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    assert table.shape == (50, d)
    assert (table.double() - torch.cat([ang.cos(), ang.sin()], -1)).abs().max() < 1e-5


def rope64(x, pos, theta):
    """Rotate-half rotary embedding in float64, pair by pair from its definition."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        t = pos.double()[:, None] * theta ** (-2 * i / d)
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i], out[..., i + d // 2] = a * t.cos() - b * t.sin(), b * t.cos() + a * t.sin()
    return out


@pytest.mark.tasks("6.13", "6.14")
def test_rotary_rotates_pairs_i_and_i_plus_half():
    d, theta, pos = 16, 10000.0, torch.tensor([0, 1, 5, 33])
    q, k = rand(4, 3, d, dtype=torch.float64), rand(4, 1, d, seed=1, dtype=torch.float64)
    q2, k2 = RotaryEmbedding(d, 64, theta).forward_native(pos, q.float(), k.float())
    assert (q2.double() - rope64(q, pos, theta)).abs().max() < 1e-5
    assert (k2.double() - rope64(k, pos, theta)).abs().max() < 1e-5


def triton_ok(device):
    return device == "cuda" or not torch.cuda.is_available()


@pytest.mark.tasks("6.15")
@pytest.mark.parametrize("device", DEVICES)
def test_rmsnorm_kernel_matches_the_pytorch_path(device):
    if not triton_ok(device):
        pytest.skip("Triton needs CUDA or the interpreter")
    x, r, w = rand(3, 40), rand(3, 40, seed=1), rand(40, seed=2)  # 40: a padded row
    norm = RMSNorm(40)
    norm.weight.data = w
    y, s = rmsnorm_triton(x.to(device), w.to(device), 1e-6, r.to(device))
    y_ref, s_ref = norm.forward_native(x, r)
    assert (y.cpu() - y_ref).abs().max() < 1e-5 and torch.equal(s.cpu(), s_ref)
    heads = rand(3, 2, 40, seed=3)
    assert (rmsnorm_triton(heads.to(device), w.to(device), 1e-6).cpu() - norm.forward_native(heads)).abs().max() < 1e-5


@pytest.mark.tasks("6.16")
@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul_kernel_matches_the_pytorch_path(device):
    if not triton_ok(device):
        pytest.skip("Triton needs CUDA or the interpreter")
    x = rand(3, 2 * 40)
    for block in (16, 64):
        assert (silu_mul_triton(x.to(device), block=block).cpu() - F.silu(x[:, :40]) * x[:, 40:]).abs().max() < 1e-6


@pytest.mark.tasks("6.17")
@pytest.mark.parametrize("device", DEVICES)
def test_rope_kernel_matches_the_float64_definition(device):
    if not triton_ok(device):
        pytest.skip("Triton needs CUDA or the interpreter")
    d, theta, pos = 24, 10000.0, torch.tensor([0, 1, 5, 33])  # 3 heads, half 12: both padded
    q, k = rand(4, 3, d), rand(4, 1, d, seed=1)
    q2, k2 = rope_triton(pos.to(device), q.clone().to(device), k.clone().to(device),
                         RotaryEmbedding(d, 64, theta).cos_sin.to(device))
    assert (q2.cpu().double() - rope64(q.double(), pos, theta)).abs().max() < 1e-5
    assert (k2.cpu().double() - rope64(k.double(), pos, theta)).abs().max() < 1e-5


@pytest.mark.tasks("6.28")
def test_route_renames_the_packed_projections_only():
    assert route("model.layers.3.self_attn.v_proj.weight", PACKED_MODULES) == ("model.layers.3.self_attn.qkv_proj.weight", "v")
    assert route("model.layers.0.self_attn.q_proj.bias", PACKED_MODULES) == ("model.layers.0.self_attn.qkv_proj.bias", "q")
    assert route("model.layers.1.mlp.gate_proj.weight", PACKED_MODULES) == ("model.layers.1.mlp.gate_up_proj.weight", 0)
    assert route("model.layers.1.mlp.up_proj.weight", PACKED_MODULES) == ("model.layers.1.mlp.gate_up_proj.weight", 1)
    for name in ("model.norm.weight", "model.layers.0.self_attn.o_proj.weight", "lm_head.weight"):
        assert route(name, PACKED_MODULES) == (name, None)
