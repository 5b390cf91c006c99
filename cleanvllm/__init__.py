"""cleanvllm: a vLLM-style LLM inference engine, built chapter by chapter in notebooks/.

Every other module in this package is generated from a notebook by `make export`.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # Lazy, so that `import cleanvllm.sequence` does not pull in the whole engine.
    if name in ("LLM", "LLMEngine"):
        from cleanvllm import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from cleanvllm.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from cleanvllm import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'cleanvllm' has no attribute {name!r}")
