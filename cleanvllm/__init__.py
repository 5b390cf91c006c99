"""cleanvllm: a vLLM-style LLM inference engine, built chapter by chapter in notebooks/.

Every other module in this package is generated from a notebook by `make export`.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # Lazy, so that `import cleanvllm.sequence` does not pull in the whole engine.
    if name == "LLM":
        from cleanvllm.llm import LLM

        return LLM
    if name == "LLMEngine":
        from cleanvllm.engine import LLMEngine

        return LLMEngine
    if name == "SamplingParams":
        from cleanvllm.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from cleanvllm import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'cleanvllm' has no attribute {name!r}")
