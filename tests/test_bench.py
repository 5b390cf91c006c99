"""The benchmark of chapter 9 (cleanvllm/bench.py), run tiny on the CPU.

References are independent of the code under test: nano-vLLM's workload drawn with the global
`random` module as its bench.py does, floors computed by hand, weight bytes counted from the
checkpoint file with safetensors.
"""

import json
import random

import pytest
import torch
from safetensors import safe_open

from cleanvllm.bench import (
    QWEN3_0_6B,
    decode_floor_seconds,
    kernel_kind,
    kv_bytes_per_token,
    main,
    standard_workload,
    step_bytes,
    weight_bytes,
)

CHAPTERS = ("09",)  # `make check CH=09` runs this file (tools/check.py)

TINY_ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=128, max_model_len=512, device="cpu")


def test_standard_workload_is_nano_vllms_draw_for_draw():
    state = random.getstate()
    try:
        random.seed(0)  # nano-vLLM's bench.py
        prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
        lens = [random.randint(100, 1024) for _ in range(256)]
    finally:
        random.setstate(state)
    ours, params = standard_workload()
    assert ours == prompts and [p.max_tokens for p in params] == lens
    assert sum(lens) == 133_966
    assert all(p.temperature == 0.6 and p.ignore_eos for p in params)


@pytest.mark.tasks('9.3', '9.6')
def test_floor_by_hand():
    # one sequence of 10 tokens decoding 2: weights 100 B, KV 1 B/token, 1 B/s
    assert decode_floor_seconds([10], [2], 100, 1, 1.0, 8) == (100 + 10) + (100 + 11)
    # two in one batch share the weight read; with a cap of 1 they run one after the other
    assert decode_floor_seconds([10, 10], [2, 2], 100, 1, 1.0, 2) == (100 + 20) + (100 + 22)
    assert decode_floor_seconds([10, 10], [2, 2], 100, 1, 1.0, 1) == 2 * ((100 + 10) + (100 + 11))
    # ragged: 5 tokens x 3 steps and 7 tokens x 1 step, batch 2
    assert decode_floor_seconds([5, 7], [3, 1], 10, 2, 2.0, 2) == ((10 + 24) + (10 + 12) + (10 + 14)) / 2
    assert step_bytes(1000, 3, [4, 5]) == 1000 + 27


@pytest.mark.tasks("9.5", "9.3")
def test_floor_tokens_per_s_by_hand():
    from cleanvllm.bench import decode_floor_tokens_per_s

    # 4 sequences of 25 tokens, 100 B of weights, 2 B of KV per token: 300 B a step; 4 tokens a step
    assert decode_floor_tokens_per_s(4, 25, 100, 2, 600.0) == pytest.approx(4 * 600.0 / 300)
    # Qwen3-0.6B in bf16 at batch 1, 512 tokens, 3 TB/s: one token per (weights + its KV) read
    w, kv = weight_bytes(QWEN3_0_6B), kv_bytes_per_token(QWEN3_0_6B)
    assert decode_floor_tokens_per_s(1, 512, w, kv, 3e12) == pytest.approx(3e12 / (w + 512 * kv))
    with pytest.raises(ValueError, match="batch"):
        decode_floor_tokens_per_s(0, 512, w, kv, 3e12)


@pytest.mark.tasks('9.1', '9.2')
def test_weight_and_kv_bytes_match_the_checkpoint_and_the_model_card(tiny_model):
    cfg = json.loads(open(f"{tiny_model}/config.json").read())
    with safe_open(f"{tiny_model}/model.safetensors", "pt") as f:
        on_disk = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert weight_bytes(cfg, dtype_bytes=2) == on_disk
    # Qwen3-0.6B: 0.6B parameters, 0.44B without the embedding (model card); 28 x 8 x 128 KV
    params = weight_bytes(QWEN3_0_6B, dtype_bytes=1)
    assert round(params / 1e9, 1) == 0.6
    assert round((params - 151936 * 1024) / 1e9, 2) == 0.44
    assert kv_bytes_per_token(QWEN3_0_6B) == 2 * 28 * 8 * 128 * 2


@pytest.mark.tasks('9.10', '9.6', '9.1')
def test_bench_runs_small_on_cpu(tiny_model, tmp_path):
    out = tmp_path / "r.json"
    res = main(["--model", tiny_model, "--num-seqs", "4", "--max-input", "120", "--max-output", "110",
                "--peer-seqs", "0", "--engine", json.dumps(TINY_ENGINE), "--out", str(out)])
    assert res["cleanvllm"]["tokens"] == res["workload"]["output_tokens"] > 0
    saved = json.loads(out.read_text())
    assert saved["cleanvllm"]["tokens_per_s"] > 0 and 0 < saved["floor"]["fraction"]
    # the floor of the same run, by hand: float32 weights counted from the file, 3 layers x 2 KV
    # heads x 32 dims x K and V x 4 bytes per token, at the bandwidth the run measured
    with safe_open(f"{tiny_model}/model.safetensors", "pt") as f:
        weights = 4 * sum(f.get_tensor(k).numel() for k in f.keys())
    prompts, params = standard_workload(4, 120, 110)
    floor = decode_floor_seconds([len(p) for p in prompts], [p.max_tokens for p in params], weights,
                                 2 * 3 * 2 * 32 * 4, saved["bandwidth_GBps"] * 1e9, 256)
    assert saved["floor"]["seconds"] == pytest.approx(floor, rel=1e-9)


@pytest.mark.tasks('9.10', '9.9', '9.8', '9.6')
def test_sweep_counts_decode_steps_and_sets_each_beside_its_floor(tiny_model, tmp_path, capsys):
    out = tmp_path / "s.json"
    res = main(["--sweep", "--model", tiny_model, "--batch-sizes", "1,3", "--prompt-len", "8",
                "--new-tokens", "4", "--engine", json.dumps(TINY_ENGINE), "--out", str(out)])
    rows = json.loads(out.read_text())["sweep"]
    assert [r["batch"] for r in rows] == [1, 3]
    assert [r["tokens"] for r in rows] == [1 * 3, 3 * 3]  # the prefill makes token 1 of 4
    bw = res["bandwidth_GBps"] * 1e9
    with safe_open(f"{tiny_model}/model.safetensors", "pt") as f:
        weights = 4 * sum(f.get_tensor(k).numel() for k in f.keys())
    kv = 2 * 3 * 2 * 32 * 4
    floors = {}  # batch -> seconds of its 3 decode steps at the floor, by hand
    for r in rows:
        b = r["batch"]  # decode steps see contexts of 9, 10 and 11 tokens per sequence
        floor = floors[b] = sum(weights + kv * b * ctx for ctx in (9, 10, 11)) / bw
        assert r["floor_tokens_per_s"] == pytest.approx(3 * b / floor, rel=1e-9)
        assert r["fraction"] == pytest.approx(floor / r["seconds"], rel=1e-9)
        # the model runner's share of the same steps: a part of their time
        assert 0 < r["runner_seconds"] < r["seconds"]
    printed = capsys.readouterr().out
    header = "| of the floor | ms per step | above the floor, ms | runner's share, ms |"
    assert header in printed
    for r in rows:  # a step's time, its excess over the step's hand floor, and the runner's share,
        # in ms: 3 decode steps per sequence
        step, above = r["seconds"] / 3 * 1e3, (r["seconds"] - floors[r["batch"]]) / 3 * 1e3
        assert f"| {step:.2f} | {above:.2f} | {r['runner_seconds'] / 3 * 1e3:.2f} |" in printed
    assert printed.count("\n| 1 |") == 1 and printed.count("\n| 3 |") == 1


def test_sweep_refuses_a_batch_larger_than_max_num_seqs(tiny_model):
    from cleanvllm.bench import run_sweep

    with pytest.raises(ValueError, match="max_num_seqs"):
        run_sweep(tiny_model, [1, 8], 8, 4, **dict(TINY_ENGINE, max_num_seqs=4))


@pytest.mark.tasks('9.8')
def test_runner_timer_times_each_runner_call_and_gives_the_method_back(tiny_model):
    from cleanvllm.bench import runner_timer, timed_decode
    from cleanvllm.llm import LLM
    from cleanvllm.sampling_params import SamplingParams

    with LLM(tiny_model, **TINY_ENGINE) as llm:
        for prompt in ([1, 2, 3], [4, 5, 6, 7]):
            llm.add_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True))
        got = timed_decode(llm)
        assert got["tokens"] == 2 * 3 and 0 < got["runner_seconds"] < got["seconds"]
        assert not {"launch", "collect"} & set(vars(llm.runner))
        llm.add_request([1, 2], SamplingParams(max_tokens=3, ignore_eos=True))
        with pytest.raises(KeyError):
            with runner_timer(llm) as calls:
                while llm.has_unfinished_requests():
                    llm.step()
                raise KeyError("inside the block")
        assert not {"launch", "collect"} & set(vars(llm.runner)), "an exception must not leave the wrappers"
        # one prefill of 1 sequence, then 2 decode steps: as the scheduler ran them
        assert [(p, n) for p, n, _ in calls] == [(True, 1), (False, 1), (False, 1)]
        stand_in = llm.runner.launch = llm.runner.launch  # a caller's own launch on this runner
        with runner_timer(llm):
            assert llm.runner.launch is not stand_in
        assert vars(llm.runner)["launch"] is stand_in and "collect" not in vars(llm.runner)


def test_time_generate_gives_the_prefills_share_and_the_method_back(tiny_model):
    """The runner is replaced by a stand-in that takes 0.2 s per prefill step and 0.05 s per decode
    step: of the run, the seconds from the prefill's launch to the next launch are the prefill's
    0.2 s (plus host work), the 4 decode steps' 0.2 s the rest; the runner keeps its launch (here
    the stand-in) after."""
    import time

    from cleanvllm.bench import time_generate
    from cleanvllm.llm import LLM
    from cleanvllm.model_runner import Launched
    from cleanvllm.sampling_params import SamplingParams

    with LLM(tiny_model, **TINY_ENGINE) as llm:

        def launch(batch):
            time.sleep(0.2 if batch.is_prefill else 0.05)
            ids = torch.full((batch.num_seqs,), 5)
            return Launched(ids, ids)

        llm.runner.launch = launch
        sp = SamplingParams(max_tokens=5, ignore_eos=True)
        got = time_generate(llm, [[1, 2, 3], [4, 5, 6, 7]], [sp, sp])
        assert got["tokens"] == 10 and vars(llm.runner)["launch"] is launch  # the stand-in kept
        assert 0.2 <= got["prefill_seconds"] < 0.35, got  # a decode step counted in: >= 0.25
        assert 0.2 <= got["seconds"] - got["prefill_seconds"] < 0.6, got


KINDS_BY_HAND = {  # names as torch's profiler prints them (H100 kernels, CPU operators)
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x64x64_warpgroupsize1x1x1_cublas": "GEMM",
    "nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT": "GEMM",
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(T1::Params)": "GEMM",
    "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false>": "GEMM",
    "_paged_decode_kernel": "attention",
    "_merge_splits_kernel": "attention",
    "pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4>>": "attention",
    "_rmsnorm_kernel": "norm/rotary/store",
    "_rope_kernel": "norm/rotary/store",
    "_store_kvcache_kernel": "norm/rotary/store",
    "_qk_norm_rope_store_kernel": "norm/rotary/store",  # the fused kernel of chapters 5-6
    "_gumbel_max_kernel": "sampler",  # the one-pass sampler of chapter 7 and its merge
    "_pick_chunk_kernel": "sampler",
    "void at::native::vectorized_elementwise_kernel<4, at::native::rsqrt_kernel_cuda(at::TensorIteratorBase&)>": "norm/rotary/store",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>": "sampler",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>>>": "sampler",
    "_silu_mul_kernel": "other",
    # PyTorch's elementwise kernels name their memory policy (StoreWithoutCast): not the KV store
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
    "::{lambda()#3}, at::native::memory::LoadWithoutCast, at::native::memory::StoreWithoutCast>": "other",
    "Memcpy HtoD (Pinned -> Device)": "other",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "other",
    "aten::linear": "GEMM",
    "aten::mm": "GEMM",
    "aten::scaled_dot_product_attention": "attention",
    "aten::exponential_": "sampler",
    "aten::embedding": "other",
}


@pytest.mark.parametrize("name", KINDS_BY_HAND)
@pytest.mark.tasks('9.11')
def test_kernel_kind_of_names_by_hand(name):
    from cleanvllm.bench import KERNEL_KINDS, kernel_kind

    assert kernel_kind(name) == KINDS_BY_HAND[name]
    assert set(KERNEL_KINDS) == {"GEMM", "attention", "norm/rotary/store", "sampler"}


@pytest.mark.tasks('9.12', '9.13')
def test_split_steps_and_step_stats_by_hand():
    from cleanvllm.bench import split_steps, step_stats, step_timeline

    ops = [dict(name="early", start_us=5.0, dur_us=1.0),  # before the first step: nobody's
           dict(name="gemm_x", start_us=10.0, dur_us=4.0), dict(name="_rmsnorm_kernel", start_us=16.0, dur_us=1.0),
           dict(name="gemm_x", start_us=30.0, dur_us=6.0), dict(name="gemm_x", start_us=37.0, dur_us=2.0),
           dict(name="_rmsnorm_kernel", start_us=40.0, dur_us=3.0)]
    steps = split_steps(ops, [8.0, 30.0])
    assert steps == [ops[1:3], ops[3:]]
    s = step_stats(steps)
    assert s["kernels_per_step"] == 2.5
    assert s["kernel_us_per_step"] == (4 + 1 + 6 + 2 + 3) / 2
    assert s["span_us_per_step"] == ((17 - 10) + (43 - 30)) / 2
    assert [(t["name"], t["per_step"], t["us_per_step"], t["kind"]) for t in s["top"]] == [
        ("gemm_x", 1.5, 6.0, "GEMM"), ("_rmsnorm_kernel", 1.0, 2.0, "norm/rotary/store")]
    line = step_timeline(steps[1])
    assert [(t["start_us"], t["dur_us"], t["kind"]) for t in line] == [
        (0.0, 6.0, "GEMM"), (7.0, 2.0, "GEMM"), (10.0, 3.0, "norm/rotary/store")]
    with pytest.raises(ValueError):
        step_stats([ops[1:3], []])  # a step without a kernel: the profile is broken


def _event(name, device, start, end, annotation=False, parent=None, thread=1):
    from types import SimpleNamespace

    return SimpleNamespace(name=name, device_type=SimpleNamespace(name=device), is_user_annotation=annotation,
                           time_range=SimpleNamespace(start=start, elapsed_us=lambda: end - start),
                           cpu_parent=parent, thread=thread)


def test_profiled_ops_keeps_gpu_kernels_and_outermost_cpu_operators():
    from types import SimpleNamespace

    from cleanvllm.bench import STEP_MARK, profiled_ops

    mark = _event(STEP_MARK, "CPU", 0, 100, annotation=True)
    linear = _event("aten::linear", "CPU", 10, 30, parent=mark)
    events = [
        mark, linear, _event("aten::mm", "CPU", 12, 28, parent=linear),  # inside linear: not outermost
        _event("aten::mul", "CPU", 40, 45, parent=mark), _event("aten::add", "CPU", 50, 52, thread=2),
        _event("cudaGraphLaunch", "CPU", 31, 35, parent=mark),  # a runtime call, not an operator
        _event(STEP_MARK, "CUDA", 20, 90, annotation=True),  # the range, mirrored on the GPU
        _event("_rmsnorm_kernel", "CUDA", 60, 62), _event("nvjet_tst_splitK", "CUDA", 40, 55),
    ]
    prof = SimpleNamespace(events=lambda: events)
    gpu = profiled_ops(prof, cuda=True)
    assert [(o["name"], o["start_us"], o["dur_us"]) for o in gpu] == [
        ("nvjet_tst_splitK", 40, 15), ("_rmsnorm_kernel", 60, 2)]
    cpu = profiled_ops(prof, cuda=False)  # thread 1 has two outermost operators, thread 2 one
    assert [(o["name"], o["start_us"], o["dur_us"]) for o in cpu] == [("aten::linear", 10, 20), ("aten::mul", 40, 5)]


@pytest.mark.tasks('9.10', '9.3')
def test_profile_json_on_cpu(tiny_model, tmp_path, capsys):
    out = tmp_path / "p.json"
    main(["--profile", "--model", tiny_model, "--batch-sizes", "1,2", "--prompt-len", "8", "--steps", "2",
          "--engine", json.dumps(TINY_ENGINE), "--out", str(out)])
    res = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "commit", "date", "bandwidth_GBps", "weight_bytes", "runs"):
        assert key in res, key
    assert res["device"].startswith("cpu") and res["torch"] == torch.__version__
    assert [r["fuse_kernels"] for r in res["runs"]] == [False, True]  # one engine each, same run
    cfg = json.loads(open(f"{tiny_model}/config.json").read())
    layers = cfg["num_hidden_layers"]
    with safe_open(f"{tiny_model}/model.safetensors", "pt") as f:
        weights = 4 * sum(f.get_tensor(k).numel() for k in f.keys())  # float32 on the CPU
    assert res["weight_bytes"] == weights
    kv = 2 * layers * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
    context = 8 + 3 * 2 // 2 + 2  # the middle of the profiled steps
    for run in res["runs"]:
        assert [p["batch"] for p in run["profile"]] == [1, 2]
        for p in run["profile"]:
            top = {t["name"]: t for t in p["top"]}
            # one aten::linear per projection (qkv, o, gate_up, down) per layer, plus the output head
            assert top["aten::linear"]["per_step"] == 4 * layers + 1
            assert top["aten::linear"]["kind"] == "GEMM"
            # (with async scheduling a step's runner time straddles two step() calls: no order)
            assert p["runner_us_per_step"] > 0 and p["wall_us_per_step"] > 0
            assert p["kernel_us_per_step"] <= p["span_us_per_step"] + 1e-6
            floor = (weights + kv * context * p["batch"]) / (res["bandwidth_GBps"] * 1e9) * 1e6
            assert p["floor_us_per_step"] == pytest.approx(floor, rel=1e-9)
        assert "timeline" in run["profile"][0] and "timeline" not in run["profile"][1]  # smallest only
        line = run["profile"][0]["timeline"]
        assert line[0]["start_us"] == 0 and len(line) > 4 * layers
        for a, b in zip(line, line[1:]):  # in time order, and on one CPU thread never overlapping
            assert a["start_us"] + a["dur_us"] <= b["start_us"] + 1e-3
        assert all(t["kind"] == kernel_kind(t["name"]) for t in line)
        assert sum(t["name"] == "aten::scaled_dot_product_attention" for t in line) == layers
    printed = capsys.readouterr().out
    assert "fuse_kernels=False batch 1:" in printed and "fuse_kernels=True batch 2:" in printed


def test_profile_leaves_the_engine_idle_and_the_runner_unwrapped(tiny_model):
    from cleanvllm.bench import profile_decode
    from cleanvllm.llm import LLM

    with LLM(tiny_model, **TINY_ENGINE) as llm:
        p = profile_decode(llm, batch=3, prompt_len=8, steps=2)
        assert not llm.has_unfinished_requests() and not {"launch", "collect"} & set(vars(llm.runner))
        assert p["batch"] == 3 and p["ops"] == "CPU operators" and "timeline" not in p
        p = profile_decode(llm, batch=1, prompt_len=8, steps=2, timeline=True)  # the engine is reusable
        assert p["timeline"][0]["start_us"] == 0


def test_about_names_this_checkout(monkeypatch):
    import datetime
    import subprocess
    from pathlib import Path

    from cleanvllm.bench import about

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    got = about("cpu")
    head = subprocess.run(["git", "log", "-1", "--format=%h"], capture_output=True, text=True).stdout.strip()
    assert got["commit"].split("+")[0] == head
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(got["date"])
    assert abs(age.total_seconds()) < 60
    assert got["torch"] == torch.__version__ and got["device"].startswith("cpu")


@pytest.mark.tasks("9.7")
def test_copy_rate_by_hand():
    from cleanvllm.bench import copy_rate

    # 4 bytes read and 4 written per copy; warm copies of 2, 4 and 8 s: the median is 4 s
    assert copy_rate(4, [100.0, 100.0, 8.0, 2.0, 4.0]) == 2 * 4 / 4.0
    with pytest.raises(ValueError, match="3 timed copies"):
        copy_rate(4, [1.0, 1.0])


@pytest.mark.tasks("9.4")
def test_decode_step_flops_by_hand():
    from cleanvllm.bench import decode_step_flops

    # Qwen3-0.6B, batch 1, nothing cached: 2 FLOPs per weight, and in bf16 2 bytes per weight
    params = weight_bytes(QWEN3_0_6B, dtype_bytes=1)
    assert decode_step_flops(QWEN3_0_6B, 1, 0, params) == 2 * params
    # each cached token adds a dot product with its key and a weighted sum of its value per head
    one_token = decode_step_flops(QWEN3_0_6B, 3, 1, 0)
    assert one_token == 3 * 4 * 28 * 16 * 128


def test_host_bench_times_each_full_decode_step_with_the_model_stubbed():
    """`make host-bench` (tools/host_bench.py): 8 requests of 6 new tokens give 5 decode steps of all
    8 (the first token comes from the prefill), hence 4 launch-to-launch gaps; the stand-in runner
    must have produced every token the requests asked for (it raises otherwise)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "host_bench.py"
    spec = importlib.util.spec_from_file_location("host_bench", path)
    host_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_bench)
    for stream in (False, True):  # generate(), then step() as a server drives it
        r = host_bench.host_us_per_step(batch=8, tokens=6, stream=stream)
        assert (r["batch"], r["steps"], r["path"]) == (8, 4, "step()" if stream else "generate()")
        assert 0 < r["us_per_step"] < 1e6 and r["us_per_seq"] == pytest.approx(r["us_per_step"] / 8)
    r = host_bench.host_us_per_step(batch=8, tokens=6, logprobs=2)  # each token's 3 texts recorded
    assert (r["steps"], r["path"]) == (4, "generate(), logprobs=2")
    with pytest.raises(ValueError, match="tokens >= 2"):
        host_bench.host_us_per_step(batch=8, tokens=1)
