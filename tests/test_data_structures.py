"""Chapter 2: every invalid value is rejected with a message naming the field and the value."""
import pytest

from cleanvllm.config import Config
from cleanvllm.context import get_context, reset_context, set_context
from cleanvllm.sampling_params import SamplingParams
from cleanvllm.sequence import Sequence, SequenceStatus


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", "hot"), ("top_k", 0), ("top_k", -2), ("top_p", 0.0),
    ("top_p", 1.01), ("min_p", -0.1), ("min_p", 1.5), ("max_tokens", 0), ("seed", 1.5), ("stop", [""]),
    ("stop_token_ids", [-1]),
])
def test_sampling_params_rejects(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}={value!r}".replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match=r"min_tokens=9 .*max_tokens=8"):
        SamplingParams(max_tokens=8, min_tokens=9)


def test_sampling_params_normalises_stop():
    sp = SamplingParams(stop="\n")
    assert sp.stop == ["\n"] and SamplingParams().stop == [] and SamplingParams(temperature=0).greedy


def test_sequence_blocks_and_split():
    s = Sequence([1, 2, 3, 4, 5], block_size=2)
    assert s.status == SequenceStatus.WAITING and s.num_blocks == 3 and s.block(2) == [5]
    s.append_token(6)
    assert s.prompt_token_ids == [1, 2, 3, 4, 5] and s.completion_token_ids == [6] and s.last_block_num_tokens == 2
    with pytest.raises(IndexError):
        s.block(3)
    with pytest.raises(ValueError):
        Sequence([])


@pytest.mark.parametrize("field,value", [
    ("max_num_seqs", 0), ("max_num_batched_tokens", -1), ("max_model_len", 0), ("kvcache_block_size", 0),
    ("gpu_memory_utilization", 0.0), ("gpu_memory_utilization", 1.2), ("num_kvcache_blocks", 0),
    ("tensor_parallel_size", 3), ("device", "tpu"), ("dtype", "int8"), ("attention_backend", "magic"),
])
def test_config_rejects(tiny_model, field, value):
    with pytest.raises(ValueError, match=rf"Config\.{field}={value!r}"):
        Config(tiny_model, **{field: value})


def test_config_backend_block_size_rules(tiny_model):
    with pytest.raises(ValueError, match="flash and triton need device='cuda'"):
        Config(tiny_model, device="cpu", attention_backend="triton")
    cfg = Config(tiny_model, device="cpu", max_model_len=10**6)
    assert cfg.attention_backend == "torch" and cfg.dtype == "float32"
    assert cfg.max_model_len == cfg.hf_config.max_position_embeddings  # capped by the model


def test_config_rejects_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Config(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Config(str(tmp_path))
    (tmp_path / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"]}')
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Config(str(tmp_path))


def test_context_round_trip():
    set_context(is_prefill=True, max_seqlen_q=7)
    assert get_context().is_prefill and get_context().max_seqlen_q == 7
    reset_context()
    assert not get_context().is_prefill and get_context().slot_mapping is None
