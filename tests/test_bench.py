"""The benchmark of chapter 9 (cleanvllm/bench.py), run tiny on the CPU.

References are independent of the code under test: nano-vLLM's workload drawn with the global
`random` module as its bench.py does, floors computed by hand, weight bytes counted from the
checkpoint file with safetensors.
"""

import json
import random

import pytest
from safetensors import safe_open

from cleanvllm.bench import (
    QWEN3_0_6B,
    decode_floor_seconds,
    kv_bytes_per_token,
    main,
    standard_workload,
    step_bytes,
    weight_bytes,
)

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


def test_floor_by_hand():
    # one sequence of 10 tokens decoding 2: weights 100 B, KV 1 B/token, 1 B/s
    assert decode_floor_seconds([10], [2], 100, 1, 1.0, 8) == (100 + 10) + (100 + 11)
    # two in one batch share the weight read; with a cap of 1 they run one after the other
    assert decode_floor_seconds([10, 10], [2, 2], 100, 1, 1.0, 2) == (100 + 20) + (100 + 22)
    assert decode_floor_seconds([10, 10], [2, 2], 100, 1, 1.0, 1) == 2 * ((100 + 10) + (100 + 11))
    # ragged: 5 tokens x 3 steps and 7 tokens x 1 step, batch 2
    assert decode_floor_seconds([5, 7], [3, 1], 10, 2, 2.0, 2) == ((10 + 24) + (10 + 12) + (10 + 14)) / 2
    assert step_bytes(1000, 3, [4, 5]) == 1000 + 27


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
    for r in rows:
        b = r["batch"]  # decode steps see contexts of 9, 10 and 11 tokens per sequence
        floor = sum(weights + kv * b * ctx for ctx in (9, 10, 11)) / bw
        assert r["floor_tokens_per_s"] == pytest.approx(3 * b / floor, rel=1e-9)
        assert r["fraction"] == pytest.approx(floor / r["seconds"], rel=1e-9)
    printed = capsys.readouterr().out
    assert "| batch | decode tok/s | floor tok/s | of the floor |" in printed
    assert printed.count("\n| 1 |") == 1 and printed.count("\n| 3 |") == 1


def test_sweep_refuses_a_batch_larger_than_max_num_seqs(tiny_model):
    from cleanvllm.bench import run_sweep

    with pytest.raises(ValueError, match="max_num_seqs"):
        run_sweep(tiny_model, [1, 8], 8, 4, **dict(TINY_ENGINE, max_num_seqs=4))



def test_profile_lists_the_models_matmuls_and_leaves_the_engine_idle(tiny_model, tmp_path):
    res = main(["--profile", "--model", tiny_model, "--batch-sizes", "2", "--prompt-len", "8",
                "--engine", json.dumps(TINY_ENGINE), "--out", str(tmp_path / "p.json")])
    (prof,) = res["profile"]
    assert prof["batch"] == 2 and prof["kernels_per_step"] is None  # kernels are counted on a GPU
    assert "aten::mm" in prof["table"]  # the projections and the output head
