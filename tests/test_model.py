"""Model parity with transformers (Qwen3, Qwen2, Llama with llama3 rope scaling), and tensor
parallelism that depends only on the TPGroup a model is built with (the loader: test_loader.py)."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from cleanvllm.context import reset_context, set_context
from cleanvllm.layers import TPGroup
from cleanvllm.loader import load_model
from cleanvllm.models.qwen3 import Qwen3ForCausalLM
from conftest import in_threads, rel_err

CHAPTERS = ("06",)  # `make check CH=06` runs this file (tools/check.py)


def ours_vs_hf(path, prompts, chunk=None, bs=16):
    """Last-token logits from our model (no cache, or through a paged cache in two chunks) and HF."""
    cfg = AutoConfig.from_pretrained(path)
    model = Qwen3ForCausalLM(cfg, max_position=512).float().eval()
    load_model(model, path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in prompts])
        if chunk is None:
            cu = torch.tensor([0] + [len(p) for p in prompts]).cumsum(0)
            set_context(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=max(map(len, prompts)))
            pos = torch.cat([torch.arange(len(p)) for p in prompts])
            out = model.compute_logits(model(torch.tensor(sum(prompts, [])), pos)[cu[1:] - 1])
            reset_context()
            return out, ref
        nblk = sum(-(-len(p) // bs) for p in prompts) + 1
        perm = torch.randperm(nblk, generator=torch.Generator().manual_seed(0)).tolist()
        tables, i = [], 0
        for p in prompts:
            n = -(-len(p) // bs); tables.append(perm[i:i + n]); i += n
        for layer in model.model.layers:
            attn = layer.self_attn.attn  # its own KV head count and head size
            attn.k_cache = torch.zeros(nblk, bs, attn.num_kv_heads, attn.head_dim)
            attn.v_cache = torch.zeros(nblk, bs, attn.num_kv_heads, attn.head_dim)
        width = max(map(len, tables))
        bt = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
        for starts, ends in [([0] * len(prompts), [min(chunk, len(p) - 1) for p in prompts]),
                             ([min(chunk, len(p) - 1) for p in prompts], [len(p) for p in prompts])]:
            ids, pos, slots, cu = [], [], [], [0]
            for p, t, s, e in zip(prompts, tables, starts, ends):
                ids += p[s:e]; pos += range(s, e); slots += [t[j // bs] * bs + j % bs for j in range(s, e)]
                cu.append(cu[-1] + e - s)
            set_context(is_prefill=True, cu_seqlens_q=torch.tensor(cu), max_seqlen_q=max(e - s for s, e in zip(starts, ends)),
                        slot_mapping=torch.tensor(slots), context_lens=torch.tensor(ends), block_tables=bt)
            out = model.compute_logits(model(torch.tensor(ids), torch.tensor(pos))[torch.tensor(cu[1:]) - 1])
            reset_context()
        return out, ref


PROMPTS = [[int(x) for x in torch.randint(0, 10000, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (23, 7, 41, 1)]


@pytest.mark.tasks("6.5", "6.19", "6.20", "6.21", "6.22", "6.23", "6.24", "6.25", "6.26", "6.27", "6.29", "6.30")
def test_qwen3_logits_match_transformers(tiny_model):
    out, ref = ours_vs_hf(tiny_model, PROMPTS)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.tasks("6.5", "6.19", "6.20", "6.21", "6.22", "6.23", "6.24", "6.25", "6.26", "6.27", "6.29", "6.30")
def test_prefix_cached_and_chunked_logits_match(tiny_model):
    out, ref = ours_vs_hf(tiny_model, PROMPTS, chunk=16)
    assert rel_err(out, ref) < 1e-4


def _save_hf_random(tmp_path, cfg_cls, model_cls, **kw):
    cfg = cfg_cls(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **kw)
    torch.manual_seed(0)
    model = model_cls(cfg)
    with torch.no_grad():
        for p in model.parameters():  # break the default init's symmetries (biases start at zero)
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.tasks("6.5", "6.19", "6.20", "6.21", "6.22", "6.23", "6.24", "6.25", "6.26", "6.27", "6.29", "6.30")
def test_qwen2_with_qkv_bias_matches_transformers(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    path = _save_hf_random(tmp_path, Qwen2Config, Qwen2ForCausalLM, tie_word_embeddings=False)
    assert any("q_proj.bias" in k for k in load_file(f"{path}/model.safetensors"))
    prompts = [[p % 512 for p in q] for q in PROMPTS]
    out, ref = ours_vs_hf(path, prompts)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.tasks("6.12", "6.5", "6.19", "6.20", "6.21", "6.22", "6.23", "6.24", "6.25", "6.26", "6.27", "6.29", "6.30")
def test_llama_with_llama3_rope_scaling_matches_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    path = _save_hf_random(tmp_path, LlamaConfig, LlamaForCausalLM, rope_scaling=scaling, tie_word_embeddings=True)
    prompts = [[p % 512 for p in q] + list(range(100)) for q in PROMPTS]  # long enough for scaling to matter
    out, ref = ours_vs_hf(path, prompts, chunk=32)
    assert rel_err(out, ref) < 1e-4


def _last_logits(model, prompts):
    """Last-token logits of each prompt, the prompts run as one flat batch (context set by the caller)."""
    pos = torch.cat([torch.arange(len(p)) for p in prompts])
    cu = torch.tensor([0] + [len(p) for p in prompts]).cumsum(0)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(sum(prompts, [])), pos)[cu[1:] - 1])


def _flat_context(prompts):
    cu = torch.tensor([0] + [len(p) for p in prompts]).cumsum(0)
    set_context(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=max(map(len, prompts)))


@pytest.fixture(scope="module")
def hf_last_logits(tiny_model):
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in PROMPTS])


@pytest.mark.tasks("6.1", "6.2", "6.7", "6.9", "6.5", "6.19", "6.20", "6.21", "6.22", "6.23", "6.24", "6.25", "6.26", "6.27", "6.29", "6.30")
def test_a_tp1_model_never_reads_torch_distributed_global_state(tiny_model, hf_last_logits, monkeypatch):
    """Issue 13 item 1's root cause: the layers asked torch.distributed for the world size at run
    time, so a TP=1 model in a process whose default group has 2 ranks thought it was sharded."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model used torch.distributed's default group")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    for name in ("all_reduce", "gather", "all_gather", "broadcast"):
        monkeypatch.setattr(dist, name, refuse)
    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(tiny_model), max_position=512).eval()
    load_model(model, tiny_model)
    _flat_context(PROMPTS)
    try:
        out = _last_logits(model, PROMPTS)
    finally:
        reset_context()
    assert rel_err(out, hf_last_logits) < 1e-4


@pytest.mark.tasks("6.1", "6.2", "6.4", "6.6", "6.7", "6.8", "6.9", "6.5", "6.19", "6.20", "6.21", "6.22", "6.23", "6.24", "6.25", "6.26", "6.27", "6.29", "6.30")
def test_tp2_and_tp1_models_in_one_process_do_not_affect_each_other(tiny_model, hf_last_logits):
    """A TP=2 model (two ranks as threads, each with its own gloo group, no default group) gives
    transformers' logits on rank 0, before and after a TP=1 model is built and run beside it and a
    default process group is created and destroyed (what closing another engine did)."""
    cfg, store = AutoConfig.from_pretrained(tiny_model), dist.HashStore()

    def build(rank):
        group = dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=60))
        shard = Qwen3ForCausalLM(cfg, max_position=512, tp=TPGroup(rank, 2, group)).eval()
        load_model(shard, tiny_model)
        return shard

    def rank_logits(rank):
        _flat_context(PROMPTS)  # the context is per thread (chapter 2): each rank sets its own
        try:
            return _last_logits(shards[rank], PROMPTS)
        finally:
            reset_context()

    def run_tp2():
        return in_threads(rank_logits)

    shards = in_threads(build)
    assert shards[0].model.embed_tokens.weight.shape[0] == -(-cfg.vocab_size // 2)  # really split
    first, none = run_tp2()
    assert rel_err(first, hf_last_logits) < 1e-4 and none is None
    single = Qwen3ForCausalLM(cfg, max_position=512).eval()
    load_model(single, tiny_model)
    created = not dist.is_initialized()
    if created:  # a default group, as a TP=1 engine's neighbour had
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _flat_context(PROMPTS)
        try:
            alone = _last_logits(single, PROMPTS)
        finally:
            reset_context()
    finally:
        if created:  # what closing that engine did
            dist.destroy_process_group()
    assert rel_err(alone, hf_last_logits) < 1e-4
    again, none = run_tp2()
    assert torch.equal(again, first) and none is None


def test_tp_group_is_frozen_and_checked():
    tp = TPGroup()
    assert (tp.rank, tp.size, tp.group) == (0, 1, None)
    with pytest.raises(AttributeError):
        tp.rank = 1
    with pytest.raises(ValueError, match="rank"):
        TPGroup(rank=2, size=2)
    with pytest.raises(RuntimeError, match="process group"):
        TPGroup(0, 2).all_reduce(torch.ones(1))


@pytest.mark.tasks("6.27")
@pytest.mark.parametrize("fused", [True, False])
def test_the_kernel_choice_is_made_once_and_reaches_every_layer(tiny_model, fused):
    """fuse_kernels becomes one Kernels value on the model, and every layer that has a fused path
    (norms, SiLU, rotary, attention) reads that same value; on a CPU none of them runs Triton."""
    from cleanvllm.layers import Kernels, RMSNorm, RotaryEmbedding, SiluAndMul
    from cleanvllm.models.qwen3 import Qwen3Attention

    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(tiny_model), max_position=64, fuse_kernels=fused)
    kinds = (RMSNorm, SiluAndMul, RotaryEmbedding, Qwen3Attention)
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    assert {type(m) for m in layers} == set(kinds)
    assert model.kernels == Kernels(fused) and all(m.kernels is model.kernels for m in layers)
    assert not model.kernels.triton(torch.zeros(1))  # a CPU tensor: PyTorch, whatever was asked
