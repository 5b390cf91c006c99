# ruff: noqa: F821  (the blocks run inside the notebook, where these names are defined)
"""Solutions to chapter 5's exercises (notebooks/05_attention.ipynb). Try them first.

Each `# %% exercise N.M` block replaces the body of that exercise's stub cell.
"""


# %% exercise 5.1
def slot_mapping(
    block_table: list[int], num_cached: int, num_new: int, block_size: int
) -> list[int]:
    """Slots of tokens num_cached .. num_cached + num_new - 1 of a sequence with this block table."""
    positions = range(num_cached, num_cached + num_new)
    return [block_table[p // block_size] * block_size + p % block_size for p in positions]


# %% exercise 5.2
def merge_splits_torch(o_part: torch.Tensor, lse_part: torch.Tensor) -> torch.Tensor:
    """Combine per-split outputs into [B, heads, head_dim], weighting each by its softmax sum."""
    # softmax over the splits = exp(lse_s - max lse) / sum_s exp(lse_s - max lse); -inf weighs 0
    weights = torch.softmax(lse_part, dim=-1)
    return (weights[..., None] * o_part).sum(dim=-2)


# %% exercise 5.3
def decode_tiles_per_split(ctx_len: int, block_n: int, num_splits: int) -> list[int]:
    """Number of block_n-key tiles that each of the num_splits programs of one sequence walks."""
    tiles = -(-ctx_len // block_n)
    per_split = -(-tiles // num_splits)
    return [max(0, min(per_split, tiles - s * per_split)) for s in range(num_splits)]
