"""Loaded only by `make gpu-check`'s chapter runs (tools/gpu_check.py puts this folder on PYTHONPATH).

gpu-check executes several chapters at once on one GPU. The engine sizes its KV cache from
torch.cuda.mem_get_info() (gpu_memory_utilization x total - memory in use), so the first engine
would take 90 % of the card and the others would find none. With CLEANVLLM_GPU_MEM_BYTES=n set,
torch.cuda.mem_get_info() says the card has n bytes, of which free is what this process has not
reserved (never more than the card's real free memory). Nothing else changes. Without the variable
this file does nothing.
"""

import importlib.abc
import importlib.util
import os
import sys

_CONTEXT_BYTES = 768 << 20  # a CUDA context and cuBLAS' workspace, outside torch's allocator


def _patch(torch) -> None:
    real = torch.cuda.mem_get_info
    share_bytes = int(os.environ["CLEANVLLM_GPU_MEM_BYTES"])

    def mem_get_info(device=None):
        free, total = real(device)
        share = min(total, share_bytes)
        own = torch.cuda.memory_reserved(device) + _CONTEXT_BYTES
        return max(0, min(free, share - own)), share

    mem_get_info.__doc__ = real.__doc__
    torch.cuda.mem_get_info = mem_get_info


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Patch torch.cuda.mem_get_info right after `import torch` (torch is not imported here)."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("CLEANVLLM_GPU_MEM_BYTES", "").isdigit():
    sys.meta_path.insert(0, _AfterTorch())

# Another sitecustomize further along the path (the machine's own) still runs.
_here = os.path.dirname(os.path.abspath(__file__))
for _p in sys.path:
    _f = os.path.join(_p or ".", "sitecustomize.py")
    if os.path.abspath(_p or ".") != _here and os.path.isfile(_f):
        with open(_f) as _src:
            exec(compile(_src.read(), _f, "exec"), {"__name__": "sitecustomize", "__file__": _f})
        break
