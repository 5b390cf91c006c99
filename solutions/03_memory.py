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
def fork(bm: BlockManager, parent: Sequence) -> Sequence:
    child = Sequence(parent.token_ids, block_size=bm.block_size)
    full = len(parent) // bm.block_size  # full blocks: shared; a partly filled last one: fresh
    fresh = bm._free_blocks_to_take(len(parent.block_table) - full, keep=[])
    bm._assign(child, parent.block_table[:full], fresh)
    return child
