"""The sampler against independent references (float64 distributions, hand examples), and the
request semantics it carries through the engine: seeded reproducibility (issue 13 item 4),
min_tokens (item 5), tiny temperatures (item 6)."""


import numpy as np
import pytest
import torch


from cleanvllm.sampler import mask_stop_tokens, sample, sample_temperature
from cleanvllm.sampling_params import SamplingParams
from conftest import hf_greedy

CHAPTERS = ("07",)  # `make check CH=07` runs this file (tools/check.py)


def reference_probs(logits: np.ndarray, sp: SamplingParams) -> np.ndarray:
    """vLLM's order: temperature, top-k, top-p (smallest set reaching p), min-p. Float64, numpy."""
    z = logits.astype(np.float64) / sp.temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros_like(z, dtype=bool)
    k = len(z) if sp.top_k == -1 else sp.top_k
    keep[order[:k]] = True
    p = np.exp(z - z.max()) * keep
    p /= p.sum()
    cum = 0.0
    for i in order:
        if not keep[i]:
            continue
        if cum >= sp.top_p:
            keep[i] = False
        cum += p[i]
    p = np.exp(z - z.max()) * keep
    p /= p.sum()
    p[p < sp.min_p * p.max()] = 0
    return p / p.sum()


CASES = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5), SamplingParams(temperature=2.0, top_k=3),
         SamplingParams(temperature=1.0, top_p=0.7), SamplingParams(temperature=0.8, top_k=4, top_p=0.9),
         SamplingParams(temperature=1.0, min_p=0.2), SamplingParams(temperature=1.0, top_p=0.9, seed=3)]


def within(freq: np.ndarray, ref: np.ndarray, n: int) -> bool:
    """Every frequency within 5 standard errors of its probability; impossible tokens never drawn."""
    return bool(np.all(np.abs(freq - ref) <= 5 * np.sqrt(ref * (1 - ref) / n) + 1e-12) and np.all(freq[ref == 0] == 0))


@pytest.mark.tasks("7.3", "7.4", "7.7")
@pytest.mark.parametrize("sp", CASES, ids=str)
def test_distribution_matches_reference(sp):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, generator=g) * 1.5
    n = 60_000
    # one row per draw; a seeded request varies its draws through the token index
    draws = sample(logits.repeat(n, 1), [sp] * n, list(range(n)) if sp.seed is not None else [0] * n)
    freq = np.bincount(draws.numpy(), minlength=8) / n
    ref = reference_probs(logits.numpy(), sp)
    assert within(freq, ref, n), (freq, ref)


@pytest.mark.tasks("7.1", "7.2")
def test_sample_temperature_matches_reference():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    n = 40_000
    draws = sample_temperature(logits.repeat(n, 1), torch.full((n,), 0.7))
    freq = np.bincount(draws.numpy(), minlength=4) / n
    assert within(freq, reference_probs(logits.numpy(), SamplingParams(temperature=0.7)), n)


@pytest.mark.tasks("7.7")
def test_greedy_rows_are_exact_argmax_in_a_mixed_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.5)] * 3
    out = sample(logits, params, [0] * 6)
    assert out[0::2].tolist() == logits[0::2].argmax(-1).tolist()


# ---- issue 13 item 6: tiny temperatures are greedy, no overflow --------------------------------
@pytest.mark.tasks("7.2", "7.7")
@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 1e-6, 0.0])
def test_tiny_temperatures_are_greedy(temperature):
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(4)) * 10
    logits[:, 0] = -50.0  # the overflow bug returned token 0: make it the least likely
    want = logits.argmax(-1).tolist()
    sp = SamplingParams(temperature=temperature)
    assert sample(logits, [sp] * 4, [0] * 4).tolist() == want
    assert sample(logits, [SamplingParams(temperature=temperature, top_p=0.9)] * 4, [0] * 4).tolist() == want
    assert sample_temperature(logits, torch.full((4,), temperature)).tolist() == want


@pytest.mark.tasks("7.7")
def test_small_temperature_above_epsilon_still_samples_finite():
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(5)) * 10
    out = sample(logits, [SamplingParams(temperature=2e-5)] * 2, [0, 0])
    assert out.tolist() == logits.argmax(-1).tolist()  # so sharp it is the argmax, but no NaN path


# ---- issue 13 item 5: min_tokens masks EOS and stop_token_ids ----------------------------------
@pytest.mark.tasks("7.6")
def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    logits = torch.zeros(1, 10)
    logits[0, 3], logits[0, 7], logits[0, 5] = 9.0, 8.0, 7.0  # EOS 3 best, stop token 7 second
    sp = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[7])
    assert sample(logits, [sp], [0], eos_ids=[3]).tolist() == [5]
    assert sample(logits, [sp], [1], eos_ids=[3]).tolist() == [5]
    assert sample(logits, [sp], [2], eos_ids=[3]).tolist() == [3]  # reached: EOS is allowed again
    ignore = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[7], ignore_eos=True)
    assert sample(logits, [ignore], [0], eos_ids=[3]).tolist() == [3]  # ignore_eos: EOS is ordinary
    # sampled rows: many draws, the banned tokens never come
    n = 5000
    flat = torch.zeros(n, 10)
    draws = sample(flat, [SamplingParams(min_tokens=1, stop_token_ids=[7])] * n, [0] * n, eos_ids=[3])
    counts = np.bincount(draws.numpy(), minlength=10)
    assert counts[3] == counts[7] == 0 and (counts[[0, 1, 2, 4, 5, 6, 8, 9]] > 0).all()


@pytest.mark.tasks("7.6")
def test_mask_ignores_stop_ids_outside_the_vocabulary():
    sp = SamplingParams(min_tokens=1, stop_token_ids=[2, 10_000])
    out = mask_stop_tokens(torch.zeros(1, 4), [sp], [0], eos_ids=[3])
    assert out.isinf().nonzero()[:, 1].tolist() == [2, 3]


# ---- issue 13 item 4: seeded requests depend only on seed and token index -----------------------
@pytest.mark.tasks("7.5", "7.7")
def test_seeded_rows_depend_only_on_seed_and_token_index():
    target = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    sp = SamplingParams(temperature=1.0, seed=7)

    def draw(rows, row, k):
        params = [SamplingParams(temperature=1.0)] * rows
        params[row] = sp
        lg = torch.randn(rows, 1000)
        lg[row] = target
        steps = [int(x) for x in torch.randint(0, 50, (rows,))]
        steps[row] = k
        return sample(lg, params, steps)[row].item()

    tokens = [draw(1, 0, k) for k in range(6)]
    assert tokens == [draw(5, 3, k) for k in range(6)] == [draw(2, 1, k) for k in reversed(range(6))][::-1]
    assert len(set(tokens)) > 1  # each token index has its own randomness
    firsts = {sample(target[None], [SamplingParams(seed=s)], [0]).item() for s in range(20)}
    assert len(firsts) > 1  # the seed matters


@pytest.fixture(scope="module")
def llm_kw():
    return dict(device="cpu", dtype="float32", kvcache_block_size=16, max_model_len=128, max_num_seqs=8)


def _prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 10000, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.tasks("7.5", "7.7")
def test_seeded_request_is_reproducible_through_the_engine(tiny_model, llm_kw):
    """Same prompt, params and model: same tokens whatever the chunking, the neighbours, the prefix
    cache or preemption do (issue 13 item 4). The old per-request generator, drawn at every step,
    changed with each of these."""
    from cleanvllm.llm import LLM

    p = _prompts([40], 0)[0]
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    others = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    neighbours = _prompts([30, 7, 45], 1)
    with LLM(tiny_model, **llm_kw) as llm:
        base = llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids
        warm = llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids  # its prefix blocks are cached now
        crowd = llm.generate(neighbours + [p], [others] * 3 + [sp], use_tqdm=False)[3].outputs[0].token_ids
    with LLM(tiny_model, max_num_batched_tokens=16, **llm_kw) as llm:  # prefill in 16-token chunks
        chunked = llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids
    with LLM(tiny_model, num_kvcache_blocks=9, **llm_kw) as llm:  # 4 x 64 tokens do not fit: preemption
        outs = llm.generate(neighbours + [p], [others] * 3 + [sp], use_tqdm=False)
        assert sum(o.metrics.num_preemptions for o in outs) > 0, "the scenario must preempt"
        preempted = outs[3].outputs[0].token_ids
    assert len(base) == 24 and len(set(base)) > 1
    assert warm == base, "a warm prefix cache changed the seeded tokens"
    assert crowd == base, "batch neighbours changed the seeded tokens"
    assert chunked == base, "chunked prefill changed the seeded tokens"
    assert preempted == base, "preemption changed the seeded tokens"


@pytest.mark.tasks("7.6", "7.7")
def test_min_tokens_keeps_stop_tokens_out_through_the_engine(tiny_model, hf_model, llm_kw):
    """The greedy first token, made a stop token with min_tokens=3, must not appear in the first 3
    tokens; the first token is then the model's second choice (transformers, float32)."""
    from cleanvllm.llm import LLM

    p = _prompts([20], 2)[0]
    with torch.inference_mode():
        top2 = hf_model(torch.tensor([p])).logits[0, -1].topk(2).indices.tolist()
    sp = SamplingParams(temperature=0, min_tokens=3, max_tokens=6, stop_token_ids=[top2[0]])
    with LLM(tiny_model, **llm_kw) as llm:
        out = llm.generate([p], sp, use_tqdm=False)[0]
        tiny = llm.generate([p], SamplingParams(temperature=1e-38, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert out.outputs[0].token_ids[0] == top2[1], (out.outputs[0].token_ids, top2)
    assert top2[0] not in out.outputs[0].token_ids[:3], out.outputs[0].token_ids
    assert tiny[0].outputs[0].token_ids == hf_greedy(hf_model, p, 8), "temperature 1e-38 must decode greedily"
