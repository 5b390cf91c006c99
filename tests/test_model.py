"""Model parity with transformers (Qwen3, Qwen2, Llama with llama3 rope scaling) and a strict loader."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from cleanvllm.context import reset_context, set_context
from cleanvllm.loader import load_model
from cleanvllm.models.qwen3 import Qwen3ForCausalLM
from conftest import rel_err


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
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        nblk = sum(-(-len(p) // bs) for p in prompts) + 1
        perm = torch.randperm(nblk, generator=torch.Generator().manual_seed(0)).tolist()
        tables, i = [], 0
        for p in prompts:
            n = -(-len(p) // bs); tables.append(perm[i:i + n]); i += n
        for layer in model.model.layers:
            layer.self_attn.attn.k_cache = torch.zeros(nblk, bs, cfg.num_key_value_heads, head_dim)
            layer.self_attn.attn.v_cache = torch.zeros(nblk, bs, cfg.num_key_value_heads, head_dim)
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


def test_qwen3_logits_match_transformers(tiny_model):
    out, ref = ours_vs_hf(tiny_model, PROMPTS)
    assert rel_err(out, ref) < 1e-4


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


def test_qwen2_with_qkv_bias_matches_transformers(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    path = _save_hf_random(tmp_path, Qwen2Config, Qwen2ForCausalLM, tie_word_embeddings=False)
    assert any("q_proj.bias" in k for k in load_file(f"{path}/model.safetensors"))
    prompts = [[p % 512 for p in q] for q in PROMPTS]
    out, ref = ours_vs_hf(path, prompts)
    assert rel_err(out, ref) < 1e-4


def test_llama_with_llama3_rope_scaling_matches_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    path = _save_hf_random(tmp_path, LlamaConfig, LlamaForCausalLM, rope_scaling=scaling, tie_word_embeddings=True)
    prompts = [[p % 512 for p in q] + list(range(100)) for q in PROMPTS]  # long enough for scaling to matter
    out, ref = ours_vs_hf(path, prompts, chunk=32)
    assert rel_err(out, ref) < 1e-4


@pytest.fixture
def ckpt_copy(tiny_model, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_model, dst)
    return dst


def _load(path):
    cfg = AutoConfig.from_pretrained(path)
    load_model(Qwen3ForCausalLM(cfg, max_position=64), path)


def _edit(path, fn):
    t = load_file(path / "model.safetensors")
    fn(t)
    save_file(t, path / "model.safetensors")


def test_loader_rejects_a_missing_tensor(ckpt_copy):
    _edit(ckpt_copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv_proj\.weight \[k\]"):
        _load(ckpt_copy)


def test_loader_rejects_an_unexpected_tensor(ckpt_copy):
    _edit(ckpt_copy, lambda t: t.__setitem__("model.layers.9.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.extra\.weight"):
        _load(ckpt_copy)


def test_loader_rejects_a_wrong_shape(ckpt_copy):
    _edit(ckpt_copy, lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight", torch.zeros(64, 100)))
    with pytest.raises(ValueError, match=r"down_proj\.weight.*\(64, 100\)"):
        _load(ckpt_copy)


def test_loader_rejects_a_wrong_dtype(ckpt_copy):
    _edit(ckpt_copy, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*int32"):
        _load(ckpt_copy)


def test_loader_rejects_a_truncated_file(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        _load(ckpt_copy)


def test_unsupported_architecture_is_rejected_by_name(ckpt_copy):
    from cleanvllm.config import Config
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MambaForCausalLM"):
        Config(str(ckpt_copy))
