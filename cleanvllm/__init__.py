"""cleanvllm: a vLLM-style LLM inference engine, built chapter by chapter in notebooks/.

Every other module in this package is generated from a notebook by `make export`.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams"]


def __getattr__(name: str):
    # Lazy, so that `import cleanvllm.sequence` does not pull in the whole engine.
    if name in ("LLM", "LLMEngine"):
        from cleanvllm import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from cleanvllm.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'cleanvllm' has no attribute {name!r}")
