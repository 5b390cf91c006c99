# Solutions to chapter 8's exercises. Each block replaces the body of the exercise's stub cell.

# %% exercise 8.1
class CharBudget(OutputProcessor):
    max_chars = 20

    def update(self, req, quiet=False):
        seq = req.seq
        if not seq.is_finished:
            self._detokenize(req)  # generate() leaves its own requests' text for the end
            if len(req.text) >= self.max_chars:
                self.scheduler.finish(seq, "length")
        out = super().update(req, quiet)
        if out is not None and out.finished:
            out.outputs[0].text = out.outputs[0].text[: self.max_chars]
        return out

# %% exercise 8.2
def count_steps(max_num_seqs: int) -> tuple[int, float]:
    """(steps, seconds) to run 16 requests of 8 prompt tokens and 12 output tokens."""
    eng = LLMEngine(
        path,
        device=device,
        dtype="float32",
        kvcache_block_size=BLOCK_SIZE,
        max_model_len=128,
        max_num_seqs=max_num_seqs,
    )
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i in range(16):
        eng.add_request(list(range(10 + 8 * i, 18 + 8 * i)), sp)
    steps, t = 0, time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    seconds = time.perf_counter() - t
    eng.close()
    return steps, seconds
