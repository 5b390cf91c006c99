# ruff: noqa: F821  (the blocks run inside the notebook, where these names are defined)
"""Solutions to chapter 2's exercises (notebooks/02_data_structures.ipynb). Try them first.

Each `# %% exercise N.M` block replaces the body of that exercise's stub cell.
"""

# %% exercise 2.1
def slots_reserved(lengths: list[int], block_size: int) -> int:
    """KV slots (tokens) reserved when each sequence holds num_blocks whole blocks."""
    return sum(Sequence([0] * n, block_size=block_size).num_blocks * block_size for n in lengths)


# %% exercise 2.2
def check_fits(prompt_len: int, params: SamplingParams, config: Config) -> None:
    """Raise ValueError if prompt_len + params.max_tokens > config.max_model_len."""
    total = prompt_len + params.max_tokens
    if total > config.max_model_len:
        raise ValueError(
            f"a prompt of {prompt_len} tokens with max_tokens={params.max_tokens} needs "
            f"{total} > max_model_len={config.max_model_len} tokens; shorten the prompt or lower "
            "max_tokens"
        )
