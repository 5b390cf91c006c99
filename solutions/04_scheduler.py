# Solutions to chapter 4's exercises (notebooks/04_scheduler.ipynb). Each block replaces the body of
# the exercise's stub cell when tests/test_notebooks.py runs the chapter with solutions.

# %% exercise 4.1
class MostBlocksFirst(Scheduler):
    def _pick_victim(self, candidates: list[Sequence]) -> Sequence:
        most = max(len(s.block_table) for s in candidates)
        return [s for s in candidates if len(s.block_table) == most][-1]

# %% exercise 4.2
def prefill_steps(prompt_len: int, budget: int) -> int:
    # Chunks of `budget` while more than one prompt token is left; a last single token is
    # computed by the first decode step. A prompt that fits the budget takes one step.
    return max(1, -(-(prompt_len - 1) // budget))
