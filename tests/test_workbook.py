"""The workbook: generated from the reference chapters, every task checked by its own check.

- task markers are well formed, each task is small and followed by its check;
- the generator is lossless: the workbook with the reference's task bodies put back is the reference;
- every workbook chapter, executed, stops at its first task with that task's message;
- no notebook keeps a bare `assert` (a learner would see an AssertionError that says nothing);
- `make check CH=NN` names the task when a task holds a plausible mistake (tests/mistakes/chNN.json).
The per-task form of the own-code rule (stubbing one task makes its own check fail) runs in
tests/test_notebooks.py, inside the one execution of each chapter.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import workbook  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
WITH_TASKS = [p for p in NOTEBOOKS if workbook.parse_tasks(p)]
MISTAKES = [(f.stem[2:], i, m) for f in sorted((ROOT / "tests" / "mistakes").glob("ch*.json"))
            for i, m in enumerate(json.loads(f.read_text()))]


def _id(p: Path) -> str:
    return p.stem[:2]


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=_id)
def test_tasks_are_small_and_each_is_followed_by_its_check(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    tasks = workbook.parse_tasks(nb_path, nb)
    task_cells = sorted({t.cell for t in tasks})
    for t in tasks:
        body = nb.cells[t.cell].source.splitlines()[t.first : t.end]
        n = workbook.code_lines(body)
        assert n <= workbook.MAX_TASK_LINES, f"task {t.id} has {n} code lines (at most {workbook.MAX_TASK_LINES})"
        # the workbook drops a task's lines: an import there is lost to the code after the task
        # (task 2.24 imported AutoConfig inside; a learner's code then failed once exported)
        imports = [line.strip() for line in body if re.match(r"\s*(import|from)\s+\S+", line)]
        assert not imports, f"task {t.id} ({t.name}) imports inside its code: {imports}; import before it"
        later = [c for c in task_cells if c > t.cell]
        until = later[0] if later else len(nb.cells)
        checks = [i for i in range(t.cell + 1, until) if nb.cells[i].cell_type == "code"
                  and t.id in workbook.CHECK.findall(nb.cells[i].source)]
        assert checks, (f"task {t.id} ({t.name}) has no `@check(\"{t.id}\", ...)` cell before the "
                        "next task's cell")


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=_id)
def test_the_generator_is_lossless(nb_path):
    wb = workbook.generate(nb_path)
    # equal to the reference as the git filter commits it (outputs stripped, cell ids 0, 1, ...)
    assert workbook.restore(wb, nb_path) == workbook.clean(nbformat.read(nb_path, as_version=4))
    tasks = workbook.parse_tasks(nb_path)
    stubs = "\n".join(c.source for c in wb.cells if c.cell_type == "code")
    for t in tasks:
        assert f"Task {t.id} ({t.name}) is not written yet" in stubs


def test_the_committed_workbook_is_generated_from_the_reference():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "workbook.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_markers_are_refused_when_malformed(tmp_path):
    def chapter(src: str) -> Path:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell("#| default_exp x"), nbformat.v4.new_code_cell(src)]
        p = tmp_path / "03_x.ipynb"
        nbformat.write(nb, p)
        return p

    good = "#| export\ndef f(x):\n    #| task 3.1 f: double it\n    return 2 * x\n    #| end task"
    assert [t.id for t in workbook.parse_tasks(chapter(good))] == ["3.1"]
    for bad, why in [
        (good.replace("    #| end task", ""), "no `#| end task`"),
        (good.replace("3.1", "4.1"), "in chapter 3"),
        ("#| export\n#| task 3.1 f: x\ny = 1\n#| end task", "not inside a function"),
        (good.replace("    return 2 * x\n", ""), "holds no code"),
        (good.replace("#| export\n", ""), "outside an `#| export` cell"),
    ]:
        with pytest.raises(workbook.WorkbookError, match=re.escape(why)):
            workbook.parse_tasks(chapter(bad))


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=_id)
def test_no_bare_asserts_in_notebooks(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    bare = []
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        code = "\n".join(x for x in c.source.splitlines() if not x.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Assert) and node.msg is None:
                bare.append(f"cell {i} line {node.lineno}")
    assert not bare, f"{nb_path.name}: asserts without a message at {bare}"


@pytest.mark.parametrize("nb_path", WITH_TASKS, ids=_id)
def test_a_workbook_chapter_stops_at_its_first_task(nb_path, tmp_path):
    first = min(workbook.parse_tasks(nb_path), key=lambda t: (t.cell, t.first))
    wb = workbook.generate(nb_path)
    # run it beside the workbook's folder layout: the cwd is where a learner's kernel starts
    with pytest.raises(CellExecutionError) as err:
        NotebookClient(wb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "workbook")}}).execute()
    assert f"Task {first.id} ({first.name}) is not written yet" in str(err.value), str(err.value)[-2000:]


@pytest.mark.parametrize("chapter,index,mistake", MISTAKES,
                         ids=[f"{c}-{i}" for c, i, _ in MISTAKES])
def test_make_check_names_the_task_of_a_seeded_mistake(chapter, index, mistake, tmp_path):
    shutil.copytree(ROOT / "cleanvllm", tmp_path / "cleanvllm", ignore=shutil.ignore_patterns("__pycache__"))
    module = tmp_path / mistake["module"]
    source = module.read_text()
    assert source.count(mistake["find"]) == 1, f"{mistake['module']}: `find` must occur exactly once"
    module.write_text(source.replace(mistake["find"], mistake["replace"]))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    # the mistake's task first: the whole check still runs until a test fails, but that comes sooner
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "check.py"), chapter, "--quiet",
                          "--first", mistake["task"]],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode != 0, f"make check CH={chapter} passed with this mistake: {mistake['why']}"
    assert f"Task {mistake['task']}" in out.stdout, out.stdout[-3000:]


def test_make_workbook_keeps_a_learners_work_unless_forced(tmp_path):
    """A workbook chapter the learner wrote in is not overwritten when its reference changes;
    --force (FORCE=1) regenerates it."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    mine = clone / "workbook" / "03_memory.ipynb"
    nb = nbformat.read(mine, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("my_answer = 42  # the learner's own cell"))
    nbformat.write(nb, mine)
    ref = clone / "notebooks" / "03_memory.ipynb"  # the reference changes too: a new last cell
    nb = nbformat.read(ref, as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("A note added to the reference."))
    nbformat.write(nb, ref)
    run = [sys.executable, "tools/workbook.py", "03"]
    out = subprocess.run(run, cwd=clone, capture_output=True, text=True, check=True).stdout
    assert "kept workbook/03_memory.ipynb: it holds your work" in out, out
    assert "my_answer = 42" in mine.read_text(), "the learner's cell should still be there"
    out = subprocess.run(run + ["--force"], cwd=clone, capture_output=True, text=True, check=True).stdout
    assert "wrote workbook/03_memory.ipynb" in out, out
    text = mine.read_text()
    assert "my_answer = 42" not in text and "A note added to the reference." in text, (
        "--force should regenerate the chapter from the changed reference"
    )
