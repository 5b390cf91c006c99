"""The course's plumbing, written by hand (it is not a chapter of the engine).

Every chapter notebook uses these:
  setup("04")      first code cell: one CPU thread, fixed seeds, Triton's interpreter without a GPU;
                   checks that the package's earlier chapters pass their checks
  @add_to(Cls)     grow a class one method at a time across cells; `make export` writes the
                   methods back into the class body, so the module holds one ordinary class
  @check("4.2")    run a task's check at once: "passed", or which task failed on which input,
                   what was expected and what came out
  expect(...)      one comparison inside a check, with a message a learner can act on
  check()          the chapter's invariant tests against this notebook's code (`make check CH=04`)
  @exercise("4.1") run an exercise's check: "passed", "not attempted yet", or the failure
  export("04_scheduler.ipynb")   last cell: write this chapter's modules into the package
"""

import hashlib
import importlib.util
import math
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_chapter: str | None = None  # set by setup("NN")
_passed: set[str] = set()  # task ids whose check passed in this kernel
_failed: set[str] = set()
_checked: dict[str, str] = {}  # chapter -> fingerprint of the code its last passing check() ran
_ran: dict[str, str] = {}  # JupyterLab cell id -> the source this kernel last ran for it
_current: list[str | None] = [None]  # the id of the cell running now (JupyterLab sends it)


def setup(chapter: str | None = None, threads: int | None = None, seed: int = 0) -> str:
    """Prepare a chapter's kernel; return "cuda" or "cpu".

    Threads: torch's default (one per core) collapses when the machine is busy (chapter 10 once took
    937 s instead of 69 s on a loaded 2-core machine), so a chapter runs on one thread unless
    CLEANVLLM_THREADS or `threads` says otherwise. With `chapter`, the package's earlier chapters
    are checked first: a mistake exported from chapter 3 is named here, not as a strange failure
    deep in chapter 6.
    """
    global _chapter
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
    _track_cells()
    if chapter is not None:
        _chapter = f"{int(chapter):02d}"
        _check_earlier_chapters(_chapter)
    return device


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _ipython():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _track_cells() -> None:
    """Remember the source each cell last ran with (JupyterLab sends cell ids), for export()."""
    ip = _ipython()
    if ip is None or getattr(ip, "_cleanvllm_tracking", False):
        return

    def record(info) -> None:
        _current[0] = getattr(info, "cell_id", None)
        if _current[0]:
            _ran[_current[0]] = info.raw_cell

    ip.events.register("pre_run_cell", record)
    ip.set_custom_exc((CheckFailed,), _show_check_failed)
    ip._cleanvllm_tracking = True


def _show_check_failed(shell, etype, value, tb, tb_offset=None):
    """A wrong value is shown as its one-line message (task, input, expected, actual), without the
    frames of this module; when the learner's code raised, its traceback is shown in full."""
    shell.showtraceback((etype, value, tb), tb_offset=tb_offset, exception_only=value.__cause__ is None)


def _tool(name: str):
    """Import tools/<name>.py of this checkout (the course's scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"_cleanvllm_tools_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_earlier_chapters(chapter: str) -> None:
    """Every earlier chapter's module is the reference, or passes that chapter's checks."""
    if not (ROOT / "tools" / "check.py").exists():
        return
    changed = _tool("check").changed_chapters(before=chapter)
    if not changed:
        return
    for ch in changed:
        out = subprocess.run([sys.executable, str(ROOT / "tools" / "check.py"), ch, "--quiet"],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(
                f"chapter {ch}'s code in the package fails its checks:\n{out.stdout.strip()}\n"
                f"Revisit chapter {ch} (then export it again), or `make reset CH={ch}` to put the "
                "reference version back."
            )
    print(f"your exported chapter(s) {', '.join(changed)}: their checks pass")


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


_STUB = re.compile(r"Task \d+\.\d+ \([^)]*\) is not written yet")


class CheckFailed(AssertionError):
    """A task's check found a wrong value: the message names the task, the input and both values."""


def _short(x: object, limit: int = 300) -> str:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            head = x.detach().flatten()[:8].tolist()
            more = ", ..." if x.numel() > 8 else ""
            return f"tensor(shape={tuple(x.shape)}, dtype={x.dtype}, values={head}{more})"
    except ImportError:
        pass
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 5] + " ...]"


def expect(actual: object, expected: object, what: str, *, atol: float | None = None,
           rtol: float | None = None) -> None:
    """Compare one result with the reference; on a mismatch say what, the expected and the actual.

    Tensors are compared with torch.testing.assert_close (give atol/rtol for low precision); floats
    with math.isclose when a tolerance is given; everything else with ==.
    """
    __tracebackhide__ = True  # pytest: a mismatch points at the check's line, not in here
    try:
        import torch
    except ImportError:  # pragma: no cover - the course always has torch
        torch = None
    tensors = torch is not None and (isinstance(actual, torch.Tensor) or isinstance(expected, torch.Tensor))
    if tensors and not isinstance(actual, torch.Tensor):  # a list where a tensor belongs: say so
        raise AssertionError(f"{what}: expected a tensor {_short(expected)}, got "
                             f"{type(actual).__name__} {_short(actual)}")
    if tensors:
        if not isinstance(expected, torch.Tensor):  # a hand-written reference, e.g. a list
            expected = torch.as_tensor(expected)
        if actual.shape != expected.shape:
            raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}")
        try:
            torch.testing.assert_close(actual.to(expected.device), expected, atol=atol, rtol=rtol,
                                       check_dtype=False)
        except AssertionError as e:
            a, x = actual.double().to(expected.device), expected.double()
            diff = (a - x).abs().nan_to_num(float("inf"))  # a NaN on one side is the worst
            diff[(a == x) | (a.isnan() & x.isnan())] = 0  # equal infinities, NaN for NaN: no gap
            worst = torch.unravel_index(diff.flatten().argmax(), diff.shape)
            at = tuple(int(i) for i in worst)
            count = re.search(r"Mismatched elements: (\d+ / \d+)", str(e))
            raise AssertionError(
                f"{what}: expected {_short(expected)}, got {_short(actual)}; "
                + (f"{count.group(1)} values differ; " if count else "")
                + f"the largest difference at index {at}: expected {x[at].item():.6g}, "
                f"got {a[at].item():.6g}"
            ) from None
        return
    if atol is not None or rtol is not None:
        ok = isinstance(actual, int | float) and math.isclose(actual, expected, abs_tol=atol or 0.0,
                                                              rel_tol=rtol or 1e-9)
    else:
        ok = actual == expected
    if not ok:
        raise AssertionError(f"{what}: expected {_short(expected)}, got {_short(actual)}")


def check(task: str | None = None, title: str | None = None):
    """`@check("3.4", "BlockManager._assign")` runs a task's check now; `check()` runs the chapter's.

    As a decorator: the function below is run at once. A stub that is not written yet stops here
    with its own message ("Task 3.4 (...) is not written yet"); a wrong value raises CheckFailed
    naming the task; a pass is remembered, so export() knows the chapter's checks have passed.
    Without arguments: the chapter's invariant tests (tests/ marked with this chapter) run against
    this notebook's saved code, as `make check CH=NN` runs them against the package.
    """
    if task is None:
        return check_chapter()
    label = f"Task {task}" + (f" ({title})" if title else "")

    def run(fn: Callable[[], object]) -> Callable:
        _passed.discard(task)
        try:
            fn()
        except NotImplementedError as e:
            _failed.add(task)
            if str(e).startswith("Task "):
                raise  # a stub: its message names the task that is not written yet
            raise CheckFailed(f"{label}: NotImplementedError: {e}") from e
        except AssertionError as e:
            _failed.add(task)
            raise CheckFailed(f"{label}: {e}") from None
        except Exception as e:
            _failed.add(task)
            stub = _STUB.search(str(e))
            if stub:  # a stub inside a Triton kernel: the interpreter wraps its message
                raise NotImplementedError(stub.group(0)) from None
            raise CheckFailed(f"{label}: your code raised {type(e).__name__}: {e}") from e
        _failed.discard(task)
        _passed.add(task)
        print(f"{label}: passed")
        return fn

    return run


def check_chapter(chapter: str | None = None, notebook: str | None = None) -> None:
    """Run the chapter's invariant tests against the code saved in this chapter's notebook."""
    chapter = chapter or _chapter
    if chapter is None:
        raise ValueError("which chapter? call setup('NN') first, or check_chapter('NN')")
    cmd = [sys.executable, str(ROOT / "tools" / "check.py"), chapter]
    path = _notebook_path(notebook) if notebook else _notebook_of(chapter)
    if path is not None:
        cmd += ["--notebook", str(path)]
        print(f"chapter {chapter}'s tests against the code in {_shown(path)}")
    else:
        here = Path.cwd()
        print(f"chapter {chapter}'s tests against the package (no {chapter}_*.ipynb in {here})")
    seen = _fingerprint(path)
    if _checked.get(chapter) == seen:  # a re-run with nothing saved since: the same answer, at once
        print(f"chapter {chapter}: passed already for this very code (nothing saved or exported since)")
        return
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    print(out.stdout.strip())
    if out.returncode != 0:
        raise CheckFailed(f"chapter {chapter}'s checks failed (above){out.stderr[-2000:]}")
    _checked[chapter] = seen


def _fingerprint(notebook: Path | None) -> str:
    """What a chapter check depends on: the saved notebook, the package, the tests and the checker."""
    h = hashlib.sha256()
    files = [*sorted((ROOT / "cleanvllm").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py")),
             ROOT / "tools" / "check.py", *([notebook] if notebook is not None else [])]
    for f in files:
        h.update(str(f).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _shown(path: Path) -> str:
    """A path as a learner reads it: from the repository's root when it is inside it."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def _own_notebook() -> Path | None:
    """The notebook this kernel runs, when Jupyter says: JupyterLab and Notebook set JPY_SESSION_NAME
    to its path when they start the kernel (a rename after that is not seen)."""
    name = os.environ.get("JPY_SESSION_NAME", "")
    if not name.endswith(".ipynb"):
        return None
    for p in (Path(name), Path.cwd() / Path(name).name):
        if p.is_file():
            return p.resolve()
    return None


def _notebook_of(chapter: str) -> Path | None:
    """The chapter's notebook: this kernel's own, else the only NN_*.ipynb in the kernel's folder
    (notebooks/ or workbook/); None if there is none. Several (a copy beside the chapter) and no
    way to tell which one runs here: an error that names them."""
    own = _own_notebook()
    if own is not None and own.name.startswith(f"{chapter}_"):
        return own
    found = sorted(Path.cwd().glob(f"{chapter}_*.ipynb"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"chapter {chapter} has several notebooks in {Path.cwd()} ({names}); "
                         "say which to check: `from cleanvllm.course import check_chapter`, "
                         f"then check_chapter({chapter!r}, {found[-1].name!r})")
    return found[0] if found else None


def exercise(name: str) -> Callable:
    """Decorator for an exercise's check: runs it at once and says how the learner's answer fared.

    A stub that still raises NotImplementedError counts as "not attempted yet", and so does a check
    run before the exercise's cell; a wrong answer raises the check's AssertionError, whose message
    says what is wrong.
    """

    def run(check_fn: Callable[[], object]) -> Callable:
        try:
            check_fn()
        except NotImplementedError:
            print(f"Exercise {name}: not attempted yet (a solution is in solutions/, try first)")
            return check_fn
        except NameError as e:
            print(f"Exercise {name}: not attempted yet ({e}: run the exercise's cell above first)")
            return check_fn
        print(f"Exercise {name}: passed")
        return check_fn

    return run


def _notebook_path(notebook: str) -> Path:
    """A chapter file: for a bare name, this kernel's own notebook when it is of that chapter (a
    renamed copy exports itself); else as given, else in the kernel's folder, else the reference
    in notebooks/."""
    p, own = Path(notebook), _own_notebook()
    bare = p.parent == Path(".")  # "05_attention.ipynb", as the chapters' cells write it
    if bare and own is not None and own.name[:3] == p.name[:3] and re.match(r"\d\d_", p.name):
        return own
    for candidate in (p, Path.cwd() / p.name, ROOT / "notebooks" / p.name):
        if candidate.exists():
            return candidate.resolve()
    raise FileNotFoundError(f"no notebook {notebook} here ({Path.cwd()}) or in notebooks/")


def _export_problems(path: Path) -> list[str]:
    """Why exporting this notebook now would write something other than what was checked."""
    import nbformat

    ip = _ipython()
    if ip is None:
        return []  # a script or a terminal: nothing ran here to compare with
    nb = nbformat.read(path, as_version=4)
    history = list(ip.user_ns.get("In", []))
    ran_sources = {h.strip() for h in history} | {r.strip() for r in _ran.values()}
    # Only what comes before the cell calling export() must be run and checked: a chapter may
    # export in its middle (chapter 6 does, so that its model module imports the new layers).
    until = _calling_cell(nb, history[-1] if history else "")
    problems = []
    for i, cell in enumerate(nb.cells[:until]):
        if cell.cell_type != "code" or not re.match(r"#\|\s*export\b", cell.source.lstrip()):
            continue
        ran = _ran.get(cell.get("id"))
        if ran is not None and ran.strip() != cell.source.strip():
            problems.append(f"cell {i}: the saved cell is not the code this kernel ran (save the "
                            "notebook with Ctrl-S, or run the cell again)")
        elif ran is None and cell.source.strip() not in ran_sources:
            problems.append(f"cell {i}: not run in this kernel (or changed since it ran); run it")
    tasks = sorted(set(re.findall(r"@check\(\s*[\"'](\d+\.\d+)[\"']", "\n".join(
        c.source for c in nb.cells[:until] if c.cell_type == "code"))),
        key=lambda t: tuple(map(int, t.split("."))))
    missing = [t for t in tasks if t not in _passed]
    if missing:
        problems.append(f"the checks of task(s) {', '.join(missing)} have not passed in this kernel")
    return problems


def _calling_cell(nb, running: str) -> int:
    """Index of the cell that is running export() now (by its id, else its source); else the end."""
    for i, cell in enumerate(nb.cells):
        if _current[0] and cell.get("id") == _current[0]:
            return i
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and running.strip() and cell.source.strip() == running.strip():
            return i
    return len(nb.cells)


def export(notebook: str | None = None, force: bool = False) -> None:
    """Write the chapter's `#| export` cells into cleanvllm/ (all reference chapters when None).

    It reads the notebook file from disk, so it refuses when the saved file is not the code this
    kernel ran (save with Ctrl-S first), and when the chapter's task checks have not all passed in
    this kernel; `force=True` exports anyway (later chapters will then run that code).
    """
    cmd = [sys.executable, str(ROOT / "tools" / "export.py")]
    if notebook:
        path = _notebook_path(notebook)
        problems = [] if force else _export_problems(path)
        if problems:
            raise RuntimeError(f"not exported ({path.name}):\n  - " + "\n  - ".join(problems)
                               + "\nexport(..., force=True) exports anyway.")
        cmd.append(str(path))
        print(f"exporting {_shown(path)}")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"export failed:\n{out.stdout}{out.stderr}")
    print(out.stdout.strip() or "the package already matches this notebook: nothing to write")
