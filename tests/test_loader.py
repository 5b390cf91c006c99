"""The strict loader (chapter 6): every refusal names the tensor (or the file); wrong float dtypes too."""


import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from cleanvllm.loader import load_model
from cleanvllm.models.qwen3 import Qwen3ForCausalLM

CHAPTERS = ("06",)  # `make check CH=06` runs this file (tools/check.py)


@pytest.fixture
def ckpt_copy(tiny_model, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_model, dst)
    return dst


def _load(path):
    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(path), max_position=64)
    load_model(model, path)
    return model


def _edit(path, fn):
    t = load_file(path / "model.safetensors")
    fn(t)
    save_file(t, path / "model.safetensors")


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.tasks("6.29", "6.30")
def test_loader_rejects_a_missing_tensor(ckpt_copy):
    _edit(ckpt_copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv_proj\.weight \[k\]"):
        _load(ckpt_copy)


@pytest.mark.tasks("6.29", "6.30")
def test_loader_rejects_an_unexpected_tensor(ckpt_copy):
    _edit(ckpt_copy, lambda t: t.__setitem__("model.layers.9.mlp.extra.weight", torch.zeros(2, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.extra\.weight"):
        _load(ckpt_copy)


@pytest.mark.tasks("6.29", "6.30")
def test_loader_rejects_a_wrong_shape(ckpt_copy):
    _edit(ckpt_copy, lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight", torch.zeros(64, 100, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match=r"down_proj\.weight.*\(64, 100\)"):
        _load(ckpt_copy)


@pytest.mark.tasks("6.29", "6.30")
def test_loader_rejects_an_integer_tensor(ckpt_copy):
    _edit(ckpt_copy, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*int32"):
        _load(ckpt_copy)


@pytest.mark.parametrize("name, dtype", [("model.layers.2.mlp.down_proj.weight", torch.float16),
                                         ("model.layers.0.self_attn.k_proj.weight", torch.float64),
                                         ("model.norm.weight", torch.float8_e4m3fn)])
@pytest.mark.tasks("6.29", "6.30")
def test_loader_rejects_a_float_tensor_of_another_dtype(ckpt_copy, dtype, name):
    """Issue 13 item 11: one float16/float64/float8 tensor in a bfloat16 checkpoint loaded silently."""
    _edit(ckpt_copy, lambda t: t.__setitem__(name, t[name].to(dtype)))
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*{str(dtype).removeprefix('torch.')}.*bfloat16"):
        _load(ckpt_copy)


@pytest.mark.tasks("6.29", "6.30")
def test_loader_rejects_weights_that_contradict_the_declared_dtype(ckpt_copy):
    _edit_config(ckpt_copy, lambda c: c.__setitem__("torch_dtype", "float32"))  # the files hold bfloat16
    with pytest.raises(ValueError, match=r"bfloat16.*float32"):
        _load(ckpt_copy)


@pytest.mark.tasks("6.29", "6.30")
def test_without_a_declared_dtype_the_tensors_must_agree(ckpt_copy):
    _edit_config(ckpt_copy, lambda c: c.pop("torch_dtype"))
    ref = load_file(ckpt_copy / "model.safetensors")
    model = _load(ckpt_copy)  # all bfloat16: accepted, and cast to the model's float32
    assert model.model.norm.weight.dtype == torch.float32
    assert torch.equal(model.model.norm.weight, ref["model.norm.weight"].float())
    _edit(ckpt_copy, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].half()))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*float16"):
        _load(ckpt_copy)


@pytest.mark.tasks("6.29", "6.30")
def test_a_float32_checkpoint_declared_float32_loads(ckpt_copy):
    _edit(ckpt_copy, lambda t: t.update({k: v.float() for k, v in t.items()}))
    _edit_config(ckpt_copy, lambda c: c.__setitem__("torch_dtype", "float32"))
    ref = load_file(ckpt_copy / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(_load(ckpt_copy).model.layers[1].mlp.down_proj.weight, ref)


@pytest.mark.tasks("6.29", "6.30")
def test_loader_names_a_corrupt_config_json(tiny_model, ckpt_copy):
    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(tiny_model), max_position=64)
    (ckpt_copy / "config.json").write_text('{"torch_dtype": "bfloat16",')
    with pytest.raises(ValueError, match="config.json"):
        load_model(model, ckpt_copy)


@pytest.mark.tasks("6.29", "6.30")
def test_loader_rejects_a_truncated_file(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        _load(ckpt_copy)


def test_unsupported_architecture_is_rejected_by_name(ckpt_copy):
    from cleanvllm.config import Config
    _edit_config(ckpt_copy, lambda c: c.__setitem__("architectures", ["MambaForCausalLM"]))
    with pytest.raises(ValueError, match="MambaForCausalLM"):
        Config(str(ckpt_copy))
