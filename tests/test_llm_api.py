"""vLLM's front door on the tiny checkpoint (CPU): LLM's settings, get_tokenizer() and chat()'s
options. Every chat prompt is compared with the tokenizer's own apply_chat_template (loaded
separately with transformers), every refusal by its message."""
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from cleanvllm.llm import LLM
from cleanvllm.sampling_params import SamplingParams
from conftest import prompts

CHAPTERS = ("08",)  # `make check CH=08` runs this file (tools/check.py)

KW = dict(device="cpu", dtype="float32", num_kvcache_blocks=64, max_model_len=512)
SHORT = SamplingParams(temperature=0, max_tokens=2)
USER = {"role": "user", "content": "What is 2+2?"}
CONV = [{"role": "system", "content": "Answer briefly."}, USER]
PARTIAL = [USER, {"role": "assistant", "content": "The answer is"}]  # a reply to continue
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
          "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]


@pytest.fixture(scope="module")
def llm(tiny_model):
    # vLLM's names for settings we honour: the model's own tokenizer, prefix caching on, no remote code
    with LLM(tiny_model, tokenizer=tiny_model, trust_remote_code=True, enable_prefix_caching=True,
             block_size=16, **KW) as engine:
        yield engine


@pytest.fixture(scope="module")
def ref(tiny_model):
    """The reference: the checkpoint's tokenizer, loaded and called directly."""
    return AutoTokenizer.from_pretrained(tiny_model)


def rendered(ref, conv, **options) -> tuple[str, list[int]]:
    text = ref.apply_chat_template(conv, tokenize=False, **options)
    ids = ref.apply_chat_template(conv, tokenize=True, **options)
    return text, list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.tasks("8.25", "8.31")
@pytest.mark.parametrize("chat_kwargs, template_kwargs, conv", [
    ({}, dict(add_generation_prompt=True), CONV),
    (dict(enable_thinking=False), dict(add_generation_prompt=True, enable_thinking=False), CONV),
    (dict(chat_template_kwargs={"enable_thinking": False}),
     dict(add_generation_prompt=True, enable_thinking=False), CONV),
    (dict(add_generation_prompt=False), dict(add_generation_prompt=False), CONV),
    (dict(add_generation_prompt=False, continue_final_message=True),
     dict(add_generation_prompt=False, continue_final_message=True), PARTIAL),
    (dict(chat_template="{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"),
     dict(chat_template="{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"), CONV),
    (dict(tools=TOOLS), dict(add_generation_prompt=True, tools=TOOLS), CONV),
], ids=["default", "enable_thinking", "chat_template_kwargs", "no_generation_prompt",
        "continue_final_message", "chat_template", "tools"])
def test_chat_prompt_is_apply_chat_template(llm, ref, chat_kwargs, template_kwargs, conv):
    (out,) = llm.chat(conv, SHORT, use_tqdm=False, **chat_kwargs)
    text, ids = rendered(ref, conv, **template_kwargs)
    assert out.prompt == text
    assert out.prompt_token_ids == ids
    assert len(out.outputs[0].token_ids) == 2


@pytest.mark.tasks("8.25", "8.29")
def test_chat_several_conversations_in_order(llm, ref):
    convs = [CONV, [USER], PARTIAL]
    outs = llm.chat(convs, SHORT, use_tqdm=False, enable_thinking=False)
    assert [o.prompt for o in outs] == [
        rendered(ref, c, add_generation_prompt=True, enable_thinking=False)[0] for c in convs]


PARTS_TEMPLATE = ("{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}"
                  "{% for p in m.content %}<{{ p.type }}:{{ p.text }}>{% endfor %}{% endif %}{% endfor %}")


@pytest.mark.tasks("8.30")
def test_content_as_a_list_of_parts(llm, ref):
    parts = [{"type": "text", "text": "What is"}, "2+2", {"type": "input_text", "text": "?"}]
    conv = [CONV[0], {"role": "user", "content": parts}]
    (out,) = llm.chat(conv, SHORT, use_tqdm=False)
    joined = [CONV[0], {"role": "user", "content": "What is\n2+2\n?"}]  # vLLM joins text parts by lines
    assert out.prompt == rendered(ref, joined, add_generation_prompt=True)[0]
    # "openai" keeps the parts (text parts only) for a template that iterates over them
    (out,) = llm.chat(conv, SHORT, use_tqdm=False, chat_template_content_format="openai",
                      chat_template=PARTS_TEMPLATE)
    as_parts = [{"type": "text", "text": t} for t in ("What is", "2+2", "?")]
    want = rendered(ref, [CONV[0], {"role": "user", "content": as_parts}], chat_template=PARTS_TEMPLATE)
    assert out.prompt == want[0] and "<text:2+2>" in want[0]


def test_get_tokenizer(llm, ref):
    tok = llm.get_tokenizer()
    text = "Snow ❄ and 雪 fall"
    assert tok.encode(text) == ref.encode(text) and tok.decode(ref.encode(text)) == text
    assert llm.generate(text, SHORT, use_tqdm=False)[0].prompt_token_ids == ref.encode(text)


@pytest.mark.tasks("8.29", "8.30", "8.31")
@pytest.mark.parametrize("call, message", [
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "content part 0: a part of type 'image_url' is not supported"),
    (dict(messages=[USER, {"role": "user", "content": ["ok", {"type": "input_audio"}]}]),
     "message 1, content part 1: a part of type 'input_audio'"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
     "its 'text' must be a string"),
    (dict(messages=PARTIAL, continue_final_message=True), "pass add_generation_prompt=False"),
    (dict(messages=CONV, chat_template_kwargs={"tokenize": True}), "may not hold ['tokenize']"),
    (dict(messages=CONV, chat_template_kwargs={"add_generation_prompt": False}),
     "may not hold ['add_generation_prompt']"),
    (dict(messages=CONV, enable_thinking=True, chat_template_kwargs={"enable_thinking": False}),
     "differ"),
    (dict(messages=CONV, chat_template_content_format="html"), "must be 'auto', 'string' or 'openai'"),
    (dict(messages=[{"role": "user", "content": ["ok", "\ud800"]}]),
     "conversation 0 is not valid Unicode text"),
    (dict(messages=[]), "non-empty list"),
    (dict(messages=[{"content": "no role"}]), "message 0 must be a dict with a 'role' string"),
    (dict(messages=CONV, chat_template="{% for m in messages %}{{ m.content + 1 }}{% endfor %}"),
     "conversation 0: the chat template cannot render it"),
], ids=["image", "audio", "text_not_str", "continue_and_generation_prompt", "tokenize_kwarg",
        "own_argument_kwarg", "enable_thinking_conflict", "content_format", "lone_surrogate", "empty", "no_role",
        "template_error"])
def test_chat_refusals(llm, call, message):
    with pytest.raises(ValueError) as e:
        llm.chat(sampling_params=SHORT, use_tqdm=False, **call)
    assert message in str(e.value)
    assert not llm.has_unfinished_requests()
    assert llm.chat([USER], SHORT, use_tqdm=False)[0].finished  # the engine still serves


@pytest.mark.tasks("8.28")
@pytest.mark.parametrize("settings, error, message", [
    (dict(model="Qwen/Qwen3-0.6B"), ValueError, "huggingface-cli download Qwen/Qwen3-0.6B --local-dir"),
    (dict(model="Qwen/Qwen3-0.6B"), ValueError, "local directories only"),
    (dict(model="Qwen/Qwen3-0.6B"), ValueError, "CLEANVLLM_MODEL"),
    (dict(tokenizer="Qwen/Qwen3-0.6B"), ValueError, "tokenizer 'Qwen/Qwen3-0.6B' looks like a Hugging Face hub id"),
    (dict(tokenizer="PARENT"), ValueError, "is not supported: the engine loads the tokenizer from the model"),
    (dict(tokenizer="/no/such/tokenizer/dir"), FileNotFoundError, "is not a directory"),
    (dict(enable_prefix_caching=False), ValueError, "prefix caching is always on"),
    (dict(enable_prefix_caching="yes"), ValueError, "must be True or False"),
    (dict(block_size=16, kvcache_block_size=16), ValueError, "give only one of them"),
    (dict(block_size=0), ValueError, "(block_size is kvcache_block_size here)"),
    (dict(seed=-1), ValueError, "LLM(seed=-1) is invalid"),
    (dict(seed=1.5), ValueError, "LLM(seed=1.5) is invalid"),
    (dict(seed=True), ValueError, "LLM(seed=True) is invalid"),
    (dict(trust_remote_code="yes"), ValueError, "must be True or False"),
    (dict(swap_space=4), ValueError, "unknown engine setting(s) ['swap_space']; allowed:"),
])
def test_setting_refusals(tiny_model, settings, error, message):
    settings = {"model": tiny_model, **KW, **settings}
    if settings.get("tokenizer") == "PARENT":
        settings["tokenizer"] = str(Path(tiny_model).parent)  # a directory, but not the model's
    with pytest.raises(error) as e:
        LLM(**settings)
    assert message in str(e.value)


@pytest.mark.tasks("8.28")
def test_unknown_setting_lists_vllm_names(tiny_model):
    with pytest.raises(ValueError) as e:
        LLM(tiny_model, swap_space=4)
    for name in ("block_size", "seed", "tokenizer", "enable_prefix_caching", "kvcache_block_size"):
        assert repr(name) in str(e.value)


@pytest.mark.tasks("8.28")
def test_block_size_is_kvcache_block_size(tiny_model, llm):
    # llm was built with block_size=16; this one with kvcache_block_size=16
    with LLM(tiny_model, kvcache_block_size=16, **KW) as other:
        p = prompts([40])[0]
        for engine in (llm, other):
            assert engine.config.kvcache_block_size == 16
            rid = engine.add_request(p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            seq = engine.requests[rid].seq
            engine.step()
            blocks = len(seq.block_table)
            while engine.has_unfinished_requests():
                engine.step()
            assert blocks == 3  # ceil(40 / 16) blocks of 16 tokens, by hand
        a = llm.generate([p], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        b = other.generate([p], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


@pytest.mark.tasks("8.28")
def test_dtype_auto_is_the_default(tiny_model):
    with LLM(tiny_model, device="cpu", dtype="auto", num_kvcache_blocks=8, max_model_len=64) as e:
        assert e.config.dtype == "float32"  # on a CPU, as dtype=None


def sampled(tiny_model, seed, sp=None):
    sp = sp or SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    with LLM(tiny_model, seed=seed, block_size=16, **KW) as e:
        return [o.outputs[0].token_ids for o in e.generate(prompts([3, 9, 20]), sp, use_tqdm=False)]


def test_seed_makes_unseeded_requests_repeatable(tiny_model):
    first = sampled(tiny_model, seed=7)
    torch.rand(1000)  # other code drawing in between: the engine's seed resets the generator
    assert sampled(tiny_model, seed=7) == first
    assert sampled(tiny_model, seed=8) != first  # the seed matters (8 tokens x 3 requests)


def test_seeded_requests_ignore_the_engine_seed(tiny_model):
    sp = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=3)
    assert sampled(tiny_model, seed=7, sp=sp) == sampled(tiny_model, seed=8, sp=sp)
