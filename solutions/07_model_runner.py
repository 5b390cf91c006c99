# ruff: noqa: F821  (the blocks run inside the notebook, where these names are defined)
"""Solutions to chapter 7's exercises (notebooks/07_model_runner.ipynb). Try them first.

Each `# %% exercise N.M` block replaces the body of that exercise's stub cell.
"""

# %% exercise 7.1
def apply_repetition_penalty(logits: torch.Tensor, seen: list[list[int]], penalty: float) -> torch.Tensor:
    """Row i: the logits of the tokens in seen[i] are divided by penalty if > 0, else multiplied."""
    out = logits.clone()
    for row, tokens in enumerate(seen):
        if tokens:
            idx = torch.tensor(sorted(set(tokens)), device=logits.device)
            x = out[row, idx]
            out[row, idx] = torch.where(x > 0, x / penalty, x * penalty)
    return out


# %% exercise 7.2
def top_k_fast(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of every row, set the others to -inf, without sorting the rows."""
    kth = logits.topk(k, dim=-1).values[:, -1:]  # the k-th largest value of each row
    return logits.masked_fill(logits < kth, float("-inf"))


# %% exercise 7.3
def predicted_blocks(config: Config) -> int:
    """The number of KV blocks a CPU runner takes for config (num_kvcache_blocks not set)."""
    raw = json.loads((Path(config.model) / "config.json").read_text())
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    block = 2 * raw["num_hidden_layers"] * config.kvcache_block_size * kv_heads * head_dim
    block *= config.torch_dtype.itemsize
    cap = config.max_num_seqs * -(-config.max_model_len // config.kvcache_block_size)
    return min(config.cpu_kvcache_bytes // block, cap)
