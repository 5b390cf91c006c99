# ruff: noqa: F821  (the blocks run inside the notebook, where these names are defined)
"""Solutions to chapter 6's exercises (notebooks/06_qwen3.ipynb). Try them first.

Each `# %% exercise N.M` block replaces the body of that exercise's stub cell.
"""

# %% exercise 6.1
def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """[(0, chunk), (chunk, 2 * chunk), ..., (last start, n)]: tokens 0..n-1 in chunks of <= chunk."""
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


# %% exercise 6.2
def params_per_rank(hf, tp_size: int) -> int:
    """Parameters one rank holds when the model is split tp_size ways (a tied matrix counts once)."""
    heads, kv_heads, head_dim = attention_shape(hf)
    h, inter = hf.hidden_size, hf.intermediate_size
    vocab_rows = -(-hf.vocab_size // tp_size)  # each rank's vocabulary range, padded
    embedding = vocab_rows * h * (1 if hf.tie_word_embeddings else 2)  # + an untied LM head
    qkv = (heads + 2 * kv_heads) * head_dim * h // tp_size  # column-parallel: split
    o = h * heads * head_dim // tp_size  # row-parallel: split
    mlp = 3 * h * inter // tp_size  # gate, up (column) and down (row): split
    qk_norms = 2 * head_dim if hf.model_type == "qwen3" else 0  # per head, shared: every rank
    norms = 2 * h  # input and post-attention norms: every rank
    return embedding + hf.num_hidden_layers * (qkv + o + mlp + qk_norms + norms) + h
