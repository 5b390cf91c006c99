"""The course's plumbing (cleanvllm/course.py): what a learner sees when something is wrong."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from cleanvllm.course import CheckFailed, check, exercise, expect

ROOT = Path(__file__).resolve().parent.parent


def test_expect_names_what_was_compared_and_both_values():
    expect([0, 1, 2], [0, 1, 2], "block table")
    with pytest.raises(AssertionError, match=r"block table of a 9-token prompt: expected \[0, 1, 2\], got \[0, 1\]"):
        expect([0, 1], [0, 1, 2], "block table of a 9-token prompt")
    expect(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-7]), "rmsnorm")
    with pytest.raises(AssertionError, match=r"rmsnorm: expected .*1 / 2 values differ; the largest "
                       r"difference at index \(1,\): expected 2, got 2\.5$"):
        expect(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0]), "rmsnorm")
    # where a tensor differs, by index in each dimension, with both values there (a learner's
    # repeat() for repeat_interleave differed first at [1, 2, 3] of [2, 3, 4]; the first values agreed)
    want = torch.arange(24.0).reshape(2, 3, 4)
    got = want.clone()
    got[1, 2, 3], got[0, 0, 1] = 25.5, 1.001
    with pytest.raises(AssertionError, match=r"2 / 24 values differ; the largest difference at index "
                       r"\(1, 2, 3\): expected 23, got 25\.5$"):
        expect(got, want, "attention", atol=1e-5, rtol=0)
    masked = torch.tensor([float("-inf"), 1.0, 2.0])  # equal infinities are not the difference
    with pytest.raises(AssertionError, match=r"at index \(2,\): expected 2, got 3$"):
        expect(torch.tensor([float("-inf"), 1.0, 3.0]), masked, "masked logits")
    with pytest.raises(AssertionError, match=r"expected shape \(2,\), got \(3,\)"):
        expect(torch.zeros(3), torch.zeros(2), "logits")
    # a tensor against a hand-written list is compared as tensors; a list where a tensor belongs
    # is named as such (not "Boolean value of Tensor ... is ambiguous")
    expect(torch.tensor([3, 4]), [3, 4], "positions")
    with pytest.raises(AssertionError, match=r"positions: expected .*values=\[3, 5\].*got .*values=\[3, 4\]"):
        expect(torch.tensor([3, 4]), [3, 5], "positions")
    with pytest.raises(AssertionError, match=r"slots: expected a tensor tensor\(shape=\(2,\).*got list \[0, 1\]"):
        expect([0, 1], torch.tensor([0, 1]), "slots")
    expect(0.1 + 0.2, 0.3, "sum", atol=1e-12)
    with pytest.raises(AssertionError, match="sum: expected 0.3, got 0.31"):
        expect(0.31, 0.3, "sum", atol=1e-3)


def test_a_check_names_its_task_and_lets_a_stub_speak_for_itself(capsys):
    @check("9.1", "double")
    def _():
        expect(2 * 2, 4, "double(2)")

    assert "Task 9.1 (double): passed" in capsys.readouterr().out
    with pytest.raises(CheckFailed, match=r"^Task 9\.2 \(double\): double\(3\): expected 6, got 5$"):
        @check("9.2", "double")
        def _():
            expect(5, 6, "double(3)")
    with pytest.raises(NotImplementedError, match=r"^Task 9\.3 \(triple\) is not written yet$"):
        @check("9.3", "triple")
        def _():
            raise NotImplementedError("Task 9.3 (triple) is not written yet")
    with pytest.raises(NotImplementedError, match=r"^Task 9\.5 \(kernel\) is not written yet$"):
        @check("9.5", "kernel")
        def _():  # Triton's interpreter wraps what a kernel raises
            raise RuntimeError("InterpreterError('NotImplementedError(\"Task 9.5 (kernel) is not written yet\")')")
    with pytest.raises(CheckFailed, match=r"Task 9\.4: your code raised IndexError: list index out of range"):
        @check("9.4")
        def _():
            [][0]


def test_an_exercise_checked_before_its_cell_ran_is_not_attempted(capsys):
    @exercise("9.9")
    def _():
        return answer_not_defined_yet  # noqa: F821

    assert "Exercise 9.9: not attempted yet" in capsys.readouterr().out


def _kernel_run(cells: list[str], cwd: Path) -> str:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


def test_a_wrong_value_shows_one_line_and_a_crash_its_traceback(tmp_path):
    """In a kernel after setup(): a check that found a wrong value prints its message alone (no
    frames of course.py to read past); one whose code raised keeps the traceback of that code."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in [
        "from cleanvllm.course import check, expect, setup\nsetup()",
        '@check("9.1", "double")\ndef _():\n    expect(5, 6, "double(3)")',
        'def double(x):\n    return [x][1]\n@check("9.2", "double")\ndef _():\n    double(3)',
    ]]
    client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    wrong, crash = (c.outputs[-1] for c in nb.cells[1:])
    assert (wrong.ename, wrong.evalue) == ("CheckFailed", "Task 9.1 (double): double(3): expected 6, got 5")
    assert not any("course.py" in line for line in wrong.traceback), wrong.traceback
    assert crash.evalue == "Task 9.2 (double): your code raised IndexError: list index out of range"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(crash.traceback))  # without the colors
    assert "return [x][1]" in plain, "the learner's line should be shown"


def test_export_refuses_unchecked_or_unsaved_notebooks(tmp_path):
    export_cell = "#| export\ndef f():\n    return 1"
    check_cell = 'try:\n    @check("1.1")\n    def _():\n        expect(f(), 2, "f()")\nexcept CheckFailed as e:\n    print(e)'
    saved = nbformat.v4.new_notebook()
    saved.cells = [nbformat.v4.new_code_cell(c) for c in ("#| default_exp nothing", export_cell, check_cell)]
    nbformat.write(saved, tmp_path / "01_x.ipynb")
    head = "from cleanvllm.course import CheckFailed, check, expect, export, setup\nsetup()"
    attempt = 'try:\n    export("01_x.ipynb")\nexcept RuntimeError as e:\n    print("REFUSED", e)'
    out = _kernel_run([head, export_cell, check_cell, attempt], tmp_path)
    assert "Task 1.1: f(): expected 2, got 1" in out
    assert "REFUSED" in out and "task(s) 1.1 have not passed" in out, out
    # the kernel ran a cell that is not what the saved file holds (edited, not saved)
    edited = export_cell.replace("return 1", "return 2")
    out = _kernel_run([head, edited, check_cell, attempt], tmp_path)
    assert "Task 1.1: passed" in out and "REFUSED" in out and "cell 1: not run in this kernel" in out, out


def test_setup_names_an_earlier_chapter_whose_exported_code_fails_its_checks(tmp_path):
    for d in ("cleanvllm", "notebooks", "tools", "tests"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    module = tmp_path / "cleanvllm" / "block_manager.py"
    # a learner's chapter-3 export whose allocate is wrong (any mistake the chapter's tests catch)
    module.write_text(module.read_text() + "\n\nBlockManager.allocate = lambda self, seq: None\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", "from cleanvllm.course import setup; setup('04')"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode != 0 and "chapter 03's code in the package fails its checks" in out.stderr, out.stderr[-3000:]
    assert "make reset CH=03" in out.stderr


def test_check_rerun_with_nothing_saved_answers_at_once_and_reruns_after_a_save(tmp_path, monkeypatch, capsys):
    """check() twice on the same saved code runs the chapter's tests once; a save runs them again,
    and a failure is never remembered as a pass."""
    import cleanvllm.course as course

    runs = []

    def fake_run(cmd, **kw):
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, 1 if "FAIL" in nb.read_text() else 0, "chapter 03: ok", "")

    monkeypatch.setattr(course.subprocess, "run", fake_run)
    monkeypatch.setattr(course, "_checked", {})
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)  # run from a Jupyter kernel too
    nb = tmp_path / "03_memory.ipynb"
    nb.write_text("{}")
    course.check_chapter("03", str(nb))
    course.check_chapter("03", str(nb))
    assert len(runs) == 1, f"the second check() re-ran the tests: {len(runs)} runs"
    assert "passed already" in capsys.readouterr().out
    nb.write_text('{"saved": 1}')  # the learner saves a change
    course.check_chapter("03", str(nb))
    assert len(runs) == 2, "a saved change must run the tests again"
    nb.write_text('{"FAIL": 1}')
    for _ in range(2):
        with pytest.raises(CheckFailed):
            course.check_chapter("03", str(nb))
    assert len(runs) == 4, "a failing check is run again every time"


def test_check_and_export_use_the_kernels_own_notebook_and_never_guess(tmp_path, monkeypatch):
    """A copy of a chapter beside it (JupyterLab's Duplicate: 05_attention-Copy1.ipynb, which sorts
    first) was checked in place of the notebook the learner ran. Now: the kernel's own notebook
    (Jupyter's JPY_SESSION_NAME) when it is of that chapter; else the only NN_*.ipynb in the folder;
    several and no way to tell, an error naming them; none, the package (and check says so)."""
    import cleanvllm.course as course

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert course._notebook_of("05") is None
    (tmp_path / "05_attention.ipynb").write_text("{}")
    assert course._notebook_of("05") == tmp_path / "05_attention.ipynb"
    (tmp_path / "05_attention-Copy1.ipynb").write_text("{}")
    with pytest.raises(ValueError, match=r"05_attention-Copy1.ipynb, 05_attention.ipynb"):
        course._notebook_of("05")
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "05_attention.ipynb"))
    assert course._notebook_of("05") == tmp_path / "05_attention.ipynb"
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "05_attention-Copy1.ipynb"))
    assert course._notebook_of("05") == tmp_path / "05_attention-Copy1.ipynb"
    # the chapter's last cell says export("05_attention.ipynb"): the copy exports itself
    assert course._notebook_path("05_attention.ipynb") == tmp_path / "05_attention-Copy1.ipynb"
    # a path with a folder is used as given
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "05_attention.ipynb").write_text("{}")
    assert course._notebook_path("ref/05_attention.ipynb") == (tmp_path / "ref" / "05_attention.ipynb")
    # another chapter's notebook is found as before, not replaced by this kernel's
    (tmp_path / "06_qwen3.ipynb").write_text("{}")
    assert course._notebook_of("06") == tmp_path / "06_qwen3.ipynb"
    assert course._notebook_path("06_qwen3.ipynb") == tmp_path / "06_qwen3.ipynb"
