"""The course's plumbing, written by hand (it is not a chapter of the engine).

Every chapter notebook uses four things from here:
  setup()          first code cell: one CPU thread, fixed seeds, Triton's interpreter without a GPU
  @add_to(Cls)     grow a class one method at a time across cells; `make export` writes the
                   methods back into the class body, so the module holds one ordinary class
  @exercise("4.1") run an exercise's check: "passed", "not attempted yet", or the failure
  export("04_scheduler.ipynb")   last cell: write this chapter's modules into the package
"""

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup(threads: int | None = None, seed: int = 0) -> str:
    """Prepare a chapter's kernel; return "cuda" or "cpu".

    Threads: torch's default (one per core) collapses when the machine is busy (chapter 10 once took
    937 s instead of 69 s on a loaded 2-core machine), so a chapter runs on one thread unless
    CLEANVLLM_THREADS or `threads` says otherwise.
    """
    if not _has_cuda():
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("call setup() before anything imports triton (restart the kernel)")
        # Without a GPU, Triton kernels run on the CPU through Triton's interpreter (slow, exact).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("CLEANVLLM_THREADS", threads or 1)))
    torch.manual_seed(seed)
    random.seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device} | torch {torch.__version__} | {torch.get_num_threads()} CPU thread(s)")
    return device


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def add_to(cls: type) -> Callable:
    """Decorator: attach the function below to `cls` as a method (or property, staticmethod...).

    In the notebook this lets a class grow one step at a time; the exporter moves each decorated
    function into the class body, so the generated module has one ordinary class. Methods added
    this way cannot use zero-argument `super()`: write `super(Cls, self)` instead.
    """

    def attach(fn):
        inner = fn
        while not hasattr(inner, "__name__"):  # property, staticmethod, classmethod
            inner = getattr(inner, "fget", None) or inner.__func__
        setattr(cls, inner.__name__, fn)
        return fn

    return attach


def exercise(name: str) -> Callable:
    """Decorator for an exercise's check: runs it at once and says how the learner's answer fared.

    A stub that still raises NotImplementedError counts as "not attempted yet"; a wrong answer
    raises the check's AssertionError, whose message says what is wrong.
    """

    def run(check: Callable[[], object]) -> Callable:
        try:
            check()
        except NotImplementedError:
            print(f"Exercise {name}: not attempted yet (a solution is in solutions/, try first)")
            return check
        print(f"Exercise {name}: passed")
        return check

    return run


def export(notebook: str | None = None) -> None:
    """Write the chapter's `#| export` cells into cleanvllm/ (all chapters when notebook is None).

    It reads the notebook file from disk: save the notebook first (Ctrl-S in JupyterLab).
    """
    cmd = [sys.executable, str(ROOT / "tools" / "export.py")]
    if notebook:
        cmd.append(str(ROOT / "notebooks" / Path(notebook).name))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"export failed:\n{out.stdout}{out.stderr}")
    print(out.stdout.strip() or "the package already matches this notebook: nothing to write")
