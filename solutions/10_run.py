# Solutions to chapter 10's exercises. Each block replaces the body of its exercise cell.

# %% exercise 10.1
def preemptions_with(num_blocks: int) -> int:
    _, preemptions = pool_run(num_blocks)
    return preemptions


# %% exercise 10.2
def haikus(seeds: list[int]) -> list[str]:
    question = [{"role": "user", "content": "Write a haiku about a GPU."}]
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=s, max_tokens=24) for s in seeds]
    with LLM(model_path, **small_kv) as llm:
        outs = llm.chat([question] * len(seeds), params, use_tqdm=False)
    return [o.outputs[0].text for o in outs]
