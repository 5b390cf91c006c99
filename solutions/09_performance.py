# Solutions to chapter 9's exercises. Each block replaces the body of its exercise cell.

# %% exercise 9.1
import math


def crossover_batch(shape: dict, context_len: int) -> int:
    # KV bytes of a step: batch x context_len x kv_bytes_per_token; the weights: weight_bytes.
    per_sequence = context_len * kv_bytes_per_token(shape)
    return max(1, math.ceil(weight_bytes(shape) / per_sequence))


# %% exercise 9.2
def throughput_at(cap: int) -> float:
    with LLM(model_path, max_num_seqs=cap, **tiny_kw) as llm:
        return time_generate(llm, decode_prompts, decode_params)["tokens_per_s"]


# %% exercise 9.3
def sweep_by_block_size() -> dict:
    got = {}
    for block_size in (16, 128):
        blocks = 8 * -(-44 // block_size)  # 8 sequences of 32 + 12 tokens, rounded up to blocks
        kw = dict(kvcache_block_size=block_size, num_kvcache_blocks=blocks, max_model_len=44)
        with LLM(model_path, max_num_seqs=8, **kw) as llm:
            w, kvt = engine_bytes(llm)
            rows = decode_sweep(llm, [1, 8], 32, 12, device_bw, w, kvt)
        got[block_size] = [r["tokens_per_s"] for r in rows]
    return got
