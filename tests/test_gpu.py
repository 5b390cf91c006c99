"""GPU-only checks (run by `make gpu-check` on a CUDA machine; skipped, and reported so, on CPU)."""
import pytest
import torch

from cleanvllm.llm import LLM
from cleanvllm.sampling_params import SamplingParams
from conftest import gpu_only

pytestmark = gpu_only


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 10000, (n,), generator=g).tolist() for n in lengths]


def test_cuda_graphs_give_the_same_tokens_as_eager(tiny_model):
    ps = _prompts([3, 17, 40, 9, 64, 5, 33])
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    outs = {}
    for eager in (False, True):
        with LLM(tiny_model, enforce_eager=eager, max_model_len=1024, dtype="float32") as llm:
            assert bool(llm.runner.graphs) != eager
            outs[eager] = [o.outputs[0].token_ids for o in llm.generate(ps, sp, use_tqdm=False)]
    assert outs[False] == outs[True]


def test_fused_kernels_give_the_same_tokens_as_one_kernel_per_operation(tiny_model):
    """float32: the fused q/k-norm + rotary + store kernel computes what the separate kernels
    compute (to float32 rounding) and the one-pass sampler's greedy rows are argmax: same tokens."""
    ps = _prompts([3, 17, 40, 9, 64, 5, 33, 250])
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    outs = {}
    for fuse in (False, True):
        with LLM(tiny_model, fuse_kernels=fuse, max_model_len=1024, dtype="float32") as llm:
            assert llm.runner.graphs and llm.runner.model.model.layers[0].self_attn.kernels.fused == fuse
            outs[fuse] = [o.outputs[0].token_ids for o in llm.generate(ps, sp, use_tqdm=False)]
    assert outs[True] == outs[False]


def test_async_scheduling_gives_the_same_tokens_on_gpu(tiny_model):
    """The overlapped loop on CUDA graphs (PENDING input ids read on the device from the step
    before) gives the tokens of the plain loop: greedy rows, a seeded row (eager sampler on graph
    logits), a row that ends early on a stop token (its row in the next step dropped)."""
    ps = _prompts([3, 17, 40, 9, 64, 5, 33, 250])
    outs = {}
    for on in (False, True):
        with LLM(tiny_model, async_scheduling=on, max_model_len=1024, dtype="float32") as llm:
            first = llm.generate([ps[0]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
            sps = [SamplingParams(temperature=0, max_tokens=40 + 3 * i, ignore_eos=True) for i in range(len(ps))]
            sps[1] = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[first.outputs[0].token_ids[5]])
            sps[2] = SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True)
            outs[on] = [o.outputs[0].token_ids for o in llm.generate(ps, sps, use_tqdm=False)]
            assert all(s.is_finished for step in llm.in_flight for s in step.seqs)
    assert outs[True] == outs[False]


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_parity_with_transformers_on_gpu(tiny_model, dtype, fuse):
    """bf16: identical for the first 16 tokens, or each divergence explained by a small HF margin."""
    from transformers import AutoModelForCausalLM

    tdtype = getattr(torch, dtype)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=tdtype).cuda().eval()
    ps = _prompts([1, 5, 17, 33, 64, 100, 250])
    with LLM(tiny_model, max_model_len=1024, dtype=dtype, fuse_kernels=fuse) as llm:
        assert llm.runner.graphs and llm.config.attention_backend in ("triton", "flash")
        outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    report = []
    for p, o in zip(ps, outs):
        r = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=16, do_sample=False, eos_token_id=None,
                        pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        ref = r.sequences[0, len(p):].tolist()
        if o.outputs[0].token_ids == ref:
            continue
        i = next(i for i, (a, b) in enumerate(zip(o.outputs[0].token_ids, ref)) if a != b)
        top2 = r.scores[i][0].float().topk(2).values
        margin = (top2[0] - top2[1]).item()
        report.append((len(p), i, margin))
        assert dtype == "bfloat16" and margin < 0.15, f"prompt of {len(p)}: diverged at {i} with margin {margin}"
    print("divergences (prompt length, position, HF top-2 margin):", report)


def test_graph_path_sampling_semantics(tiny_model):
    """On the CUDA-graph path: temperature 1e-38 is greedy (the graph's own sampler), a seeded
    request ignores its neighbours, and min_tokens keeps a stop token out (issue 13 items 4-6)."""
    p = _prompts([30])[0]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=16, ignore_eos=True)
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    with LLM(tiny_model, max_model_len=1024, dtype="float32") as llm:
        assert llm.runner.graphs and "GiB" in llm.runner.memory_budget
        want = llm.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids
        tiny = llm.generate([p], SamplingParams(temperature=1e-38, max_tokens=16, ignore_eos=True), use_tqdm=False)
        alone = llm.generate([p], seeded, use_tqdm=False)[0].outputs[0].token_ids
        crowd = llm.generate(_prompts([5, 40, 12], 1) + [p], [others] * 3 + [seeded], use_tqdm=False)[3].outputs[0].token_ids
        stop = SamplingParams(temperature=0, min_tokens=4, max_tokens=8, stop_token_ids=[want[0]])
        masked = llm.generate([p], stop, use_tqdm=False)[0].outputs[0].token_ids
    assert tiny[0].outputs[0].token_ids == want
    assert alone == crowd
    assert want[0] not in masked[:4]


def test_warmup_measures_activations_on_the_configured_backend(tiny_model):
    from cleanvllm.config import Config
    from cleanvllm.model_runner import ModelRunner

    r = ModelRunner(Config(tiny_model, max_model_len=1024, max_num_batched_tokens=1024, dtype="float32"))
    try:
        seen = []
        hooks = [layer.self_attn.attn.register_forward_pre_hook(lambda m, a: seen.append(m.backend))
                 for layer in r.model.model.layers]
        workspace = r._warmup()
        for h in hooks:
            h.remove()
        assert workspace > 0 and set(seen) == {r.config.attention_backend} != {"torch"}
    finally:
        r.release()


def test_logprobs_through_the_decode_graphs_match_eager_and_transformers(tiny_model, hf_model):
    """A request with logprobs is sampled inside the decode graph (it is `simple`), its logprobs
    computed from the logits the graph keeps: the same tokens and logprobs as with enforce_eager,
    and the sampled token's logprob equal to transformers' float32 log-softmax. Each step's
    logprobs come back in pinned host tensors, copied behind the step (queue_to_host), so that
    reading them never waits for the step launched after it."""
    ps = _prompts([5, 23])
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    outs, launched = {}, []
    for eager in (False, True):
        with LLM(tiny_model, enforce_eager=eager, max_model_len=256, dtype="float32") as llm:
            assert bool(llm.runner.graphs) != eager
            real = llm.runner.launch
            llm.runner.launch = lambda b, real=real: launched.append(real(b)) or launched[-1]
            outs[eager] = llm.generate(ps, sp, use_tqdm=False)
    with_lp = [t for step in launched if step.logprobs for t in step.logprobs]
    assert with_lp and all(t.device.type == "cpu" and t.is_pinned() for t in with_lp)
    for graph, eager, p in zip(outs[False], outs[True], ps):
        g, e = graph.outputs[0], eager.outputs[0]
        assert g.token_ids == e.token_ids
        for a, b in zip(g.logprobs, e.logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
        ids = torch.tensor([p + g.token_ids[:-1]])
        with torch.no_grad():
            ref = torch.log_softmax(hf_model(ids).logits[0].float(), -1)[len(p) - 1 :]
        want = ref.gather(1, torch.tensor(g.token_ids)[:, None])[:, 0].tolist()
        got = [entry[t].logprob for entry, t in zip(g.logprobs, g.token_ids)]
        assert max(abs(x - y) for x, y in zip(got, want)) < 1e-3
