# ruff: noqa: F821  (the blocks run inside the notebook, where these names are defined)
"""Solutions to chapter 1's exercises (notebooks/01_why_vllm.ipynb). Try them first.

Each `# %% exercise N.M` block replaces the body of that exercise's stub cell.
"""

# %% exercise 1.1
def serve_static(gen, prompts, max_tokens, batch_size: int) -> BaselineStats:
    """Serve the requests in consecutive static batches of batch_size; add up their stats."""
    total = BaselineStats()
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        _, st = gen.generate(prompts[start:end], max_tokens[start:end])
        total.prefill_slots += st.prefill_slots
        total.prefill_useful += st.prefill_useful
        total.decode_slots += st.decode_slots
        total.decode_useful += st.decode_useful
        total.reserved_kv_tokens += st.reserved_kv_tokens
        total.used_kv_tokens += st.used_kv_tokens
        total.active_per_step += st.active_per_step
    return total


# %% exercise 1.2
def kv_bytes_per_token(hf_config, dtype_bytes: int) -> int:
    """Bytes of keys and values one token keeps in the KV cache, all layers together."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return 2 * hf_config.num_hidden_layers * kv_heads * head_dim * dtype_bytes  # 2: key and value
