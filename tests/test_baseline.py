"""Chapter 1: the static-batching baseline and the tiny checkpoint it runs on."""

import functools
import json
import warnings

import pytest
import torch
from conftest import hf_greedy

from cleanvllm.baseline import NaiveGenerator

CHAPTERS = ("01",)  # `make check CH=01` runs this file (tools/check.py)


@pytest.mark.tasks('1.1', '1.3', '1.4', '1.5')
def test_baseline_counts_by_hand(hf_model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    outs, st = NaiveGenerator(hf_model).generate(prompts, [2, 5, 1])
    assert [len(o) for o in outs] == [2, 5, 1]
    assert st.prefill_slots == 15 and st.prefill_useful == 9  # 3 rows x longest prompt 5
    assert st.decode_slots == 3 * 4 and st.decode_useful == (2 - 1) + (5 - 1) + 0
    assert st.reserved_kv_tokens == 3 * (5 + 5) and st.used_kv_tokens == 9 + 8
    assert st.active_per_step == [3, 2, 1, 1, 1]
    assert st.wasted_slots == (15 - 9) + (12 - 5)  # padding, then finished rows still stepped


# issue 13 item 14: the current cache API, no deprecated `past_key_values`, same tokens as HF
@pytest.mark.tasks('1.2', '1.5')
def test_naive_generator_matches_transformers_generate_without_deprecations(hf_model):
    prompts = [[5, 900, 77, 1234, 6], [42], [3000, 17, 17, 9, 250, 8000, 11, 2], [151643, 1]]
    max_tokens = [7, 12, 3, 9]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecation warnings
        warnings.simplefilter("error", DeprecationWarning)
        outs, _ = NaiveGenerator(hf_model).generate(prompts, max_tokens)
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o == hf_greedy(hf_model, p, m), f"prompt {p}"


@pytest.mark.tasks('1.5')
def test_every_forward_gets_one_transformers_cache(hf_model, monkeypatch):
    from transformers import Cache

    seen = []
    forward = hf_model.forward

    @functools.wraps(forward)  # keeps the signature the generator reads
    def spy(*args, **kwargs):
        seen.append(kwargs.get("cache", kwargs.get("past_key_values")))
        return forward(*args, **kwargs)

    monkeypatch.setattr(hf_model, "forward", spy)
    NaiveGenerator(hf_model).generate([[1, 2, 3], [4]], [3, 2])
    assert len(seen) == 3 and all(isinstance(c, Cache) for c in seen)
    assert all(c is seen[0] for c in seen), "one cache object, grown in place"


@pytest.mark.tasks('1.5', '1.4')
def test_eos_stops_a_row_when_not_ignored(hf_model):
    prompt = [1, 2, 3]
    free = hf_greedy(hf_model, prompt, 6)
    eos = free[2]  # pretend the third greedy token is EOS
    outs, st = NaiveGenerator(hf_model, eos_token_id=eos).generate([prompt], [6], ignore_eos=False)
    assert outs[0] == free[: free.index(eos) + 1] and len(st.active_per_step) == len(outs[0])


def test_generate_refuses_mismatched_inputs(hf_model):
    with pytest.raises(ValueError, match="one max_tokens per prompt"):
        NaiveGenerator(hf_model).generate([[1], [2]], [3])
    with pytest.raises(ValueError):
        NaiveGenerator(hf_model).generate([], [])


# issue 13 item 15: transformers 5.0-5.17 warn "incorrect regex pattern" for a local config
# without transformers_version (they take it for an old Mistral checkpoint); ours declares it
def test_tiny_config_declares_its_format_so_no_mistral_warning(tiny_model):
    from packaging import version

    cfg = json.loads(open(f"{tiny_model}/config.json").read())
    assert cfg["model_type"] == "qwen3"
    # the test transformers 5.17 runs before warning: a version that parses, and model_type not Mistral's
    assert version.parse(cfg["transformers_version"]) >= version.parse("4.51.0")


def test_tiny_tokenizer_equals_the_tokenizers_library(tiny_model):
    """transformers' tokenizer for the tiny checkpoint tokenizes as tokenizer.json says."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    texts = ["Hello, world!", "I'm sure they'd've known; isn't it?", "def f(x):\n    return x**2\n",
             "12345678901234567890 3.14", "我喜欢机器学习。", "日本語 한국어", "Emoji 😀👍🏽 👨‍👩‍👧",
             "spaces     and\ttabs\n\n\n", "MixedCASEWords123abc", "it’s ‘quoted’ “double”"]
    hf = AutoTokenizer.from_pretrained(tiny_model)
    raw = Tokenizer.from_file(f"{tiny_model}/tokenizer.json")
    for t in texts:
        assert hf.encode(t) == raw.encode(t, add_special_tokens=False).ids, t


def test_tiny_checkpoint_is_deterministic(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from cleanvllm.tiny import write_tiny_checkpoint

    fresh = load_file(write_tiny_checkpoint(tmp_path) / "model.safetensors")
    cached = load_file(f"{tiny_model}/model.safetensors")
    assert fresh.keys() == cached.keys()
    assert all(torch.equal(fresh[k], cached[k]) for k in fresh)


def test_prepared_checkpoint_keeps_the_first_complete_copy(tmp_path, monkeypatch):
    """Two processes preparing the cache at once (parallel tests): the one that finishes second
    must not delete the copy the first one finished (and someone may already be reading)."""
    import itertools

    from cleanvllm import tiny

    monkeypatch.setenv("CLEANVLLM_CACHE", str(tmp_path))
    pids = itertools.count(1000)
    monkeypatch.setattr(tiny.os, "getpid", lambda: next(pids))

    def writer(label, during=None):
        def write(p):
            p.mkdir(parents=True)
            (p / "model.safetensors").write_text(label)
            if during:
                during()  # the other process runs to completion meanwhile
        return write

    first_done = lambda: tiny.prepared_checkpoint("ckpt", writer("first"))  # noqa: E731
    path = tiny.prepared_checkpoint("ckpt", writer("second", during=first_done))
    assert (path / "model.safetensors").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no temporary folder left behind"
