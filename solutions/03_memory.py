# Solutions to chapter 3's exercises (notebooks/03_memory.ipynb). Each block replaces the body of
# the exercise's stub cell when tests/test_notebooks.py runs the chapter with solutions.

# %% exercise 3.1
class UnhashedFirst(BlockManager):
    def _free_blocks_to_take(self, n: int, keep: list[int]) -> list[int]:
        free = [b for b in self.free_block_ids if b not in keep]  # oldest freed first
        unhashed = [b for b in free if self.blocks[b].hash == -1]
        cached = [b for b in free if self.blocks[b].hash != -1]
        return (unhashed + cached)[:n]

# %% exercise 3.2
def wasted_slots(lengths: list[int], block_size: int) -> int:
    return sum(-(-n // block_size) * block_size - n for n in lengths)
