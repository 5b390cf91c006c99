"""The course's own rules, checked on every chapter notebook.

- a chapter's checks run the chapter's own code: with its export cells blanked, it fails;
- export cells are small steps (at most 50 lines);
- every chapter has exercises, and the solutions in solutions/ pass their checks;
- every cell runs twice in a row, and each task's check fails when that task alone is a stub;
- an edit in an earlier chapter, exported, is what a later chapter runs.
"""

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
EXERCISE = re.compile(r"^#\|\s*exercise\s+(\S+)\s*$", re.M)
MAX_EXPORT_LINES = 50


def is_export(cell) -> bool:
    return cell.cell_type == "code" and re.match(r"#\|\s*export\b", cell.source.lstrip()) is not None


def run(nb, cwd: Path, timeout: int = 300) -> str:
    """Execute nb in cwd; return everything its cells printed."""
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def solutions(nb_path: Path) -> dict[str, str]:
    """{exercise name: solution code} from solutions/NN_name.py (blocks headed `# %% exercise N.M`)."""
    path = ROOT / "solutions" / f"{nb_path.stem}.py"
    assert path.exists(), f"{path.relative_to(ROOT)} is missing"
    blocks = re.split(r"^# %% exercise (\S+)\s*$", path.read_text(), flags=re.M)
    return {name: code.strip("\n") for name, code in zip(blocks[1::2], blocks[2::2])}


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_export_cells_are_small_steps(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    sizes = [len(c.source.strip().splitlines()) for c in nb.cells if is_export(c)]
    assert sizes, f"{nb_path.name} exports nothing"
    assert max(sizes) <= MAX_EXPORT_LINES, f"{nb_path.name}: an export cell of {max(sizes)} lines"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_chapter_runs_its_own_code(nb_path):
    """Blank every export cell: if the chapter still runs, its checks test a stale installed copy."""
    nb = nbformat.read(nb_path, as_version=4)
    for c in nb.cells:
        if is_export(c):
            c.source = c.source.splitlines()[0] + "\npass"
    with pytest.raises(CellExecutionError):
        run(nb, nb_path.parent)


def _texts(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_each_cell_twice_each_task_alone_and_the_solutions(nb_path):
    """One execution of the chapter, in one kernel, that checks three rules at once:

    - every cell runs twice in a row (a learner re-runs cells);
    - each task's own check fails when that task alone is a stub (no check passes without its task),
      and names the task;
    - each exercise as committed (its stub) is "not attempted yet" at its check, and its solution
      (solutions/NN_name.py) passes that check.
    This is the chapter's whole execution in CI (`make test-nb` runs the notebooks once as they are).
    """
    nb = nbformat.read(nb_path, as_version=4)
    stubs = {m.group(1): c for c in nb.cells if c.cell_type == "code" and (m := EXERCISE.match(c.source))}
    assert len(stubs) >= 2, f"{nb_path.name} has {len(stubs)} exercise(s); a chapter has 2-3"
    sols = solutions(nb_path)
    assert set(sols) == set(stubs), f"solutions {sorted(sols)} vs exercises {sorted(stubs)}"
    as_committed = {id(cell): (name, cell.source) for name, cell in stubs.items()}
    for name, cell in stubs.items():
        cell.source = f"#| exercise {name}\n{sols[name]}"
    tasks = workbook.parse_tasks(nb_path, nb)
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(nb_path.parent)}})
    printed, unchecked = [], []
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if id(cell) in as_committed:  # the exercise's stub first: its check says "not attempted yet"
                name, stub_source = as_committed[id(cell)]
                check_at = next(j for j in range(i + 1, len(nb.cells)) if nb.cells[j].cell_type == "code"
                                and f'@exercise("{name}")' in nb.cells[j].source)
                said = []
                for j, source in [(i, stub_source)] + [(j, nb.cells[j].source) for j in range(i + 1, check_at + 1)
                                                         if nb.cells[j].cell_type == "code"]:
                    probe = nbformat.v4.new_code_cell(source)
                    client.execute_cell(probe, j)
                    said.append(_texts(probe))
                assert f"Exercise {name}: not attempted yet" in "".join(said), \
                    f"exercise {name} as committed: its check did not say 'not attempted yet': {said[-1][-500:]}"
            here = [t for t in tasks if t.cell == i]
            for t in here:
                check_at = next(j for j in range(i + 1, len(nb.cells)) if nb.cells[j].cell_type == "code"
                                and t.id in workbook.CHECK.findall(nb.cells[j].source))
                stub = nbformat.v4.new_code_cell(workbook.stub_source(cell.source, here, only={t.id}))
                client.execute_cell(stub, i)
                try:
                    for j in range(i + 1, check_at + 1):
                        if nb.cells[j].cell_type == "code":
                            client.execute_cell(nbformat.v4.new_code_cell(nb.cells[j].source), j)
                    unchecked.append(f"task {t.id}: its check passed with the task as a stub")
                except CellExecutionError as e:
                    if f"Task {t.id}" not in str(e):
                        unchecked.append(f"task {t.id}: the stub failed elsewhere: {str(e)[-600:]}")
            for attempt in ("first", "second"):
                try:
                    client.execute_cell(cell, i)
                except CellExecutionError as e:
                    raise AssertionError(f"{nb_path.name} cell {i} failed on its {attempt} run:\n"
                                         f"{str(e)[-1500:]}") from None
                printed.append(_texts(cell))
    assert not unchecked, "\n".join(unchecked)
    for name in stubs:
        assert f"Exercise {name}: passed" in "".join(printed), f"exercise {name}'s solution did not pass its check"


def test_an_exported_edit_in_chapter_3_is_what_chapter_4_runs(tmp_path, monkeypatch):
    for d in ("notebooks", "tools", "cleanvllm"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    ch3, ch4 = (next((tmp_path / "notebooks").glob(f"{n}_*.ipynb")) for n in ("03", "04"))
    nb3 = nbformat.read(ch3, as_version=4)
    last_export = max(i for i, c in enumerate(nb3.cells) if is_export(c))
    # What a learner does: change a method in chapter 3, save, export.
    edit = '#| export\n@add_to(BlockManager)\ndef __init__(self, *args, **kwargs):\n    raise RuntimeError("the learner\'s chapter-3 edit ran")'
    nb3.cells.insert(last_export + 1, nbformat.v4.new_code_cell(edit))
    nbformat.write(nb3, ch3)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the kernel imports the copy's package
    out = subprocess.run([sys.executable, str(tmp_path / "tools" / "export.py"), str(ch3)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "block_manager.py" in out.stdout, out.stdout + out.stderr
    assert "the learner's chapter-3 edit ran" in (tmp_path / "cleanvllm" / "block_manager.py").read_text()
    with pytest.raises(CellExecutionError, match="the learner's chapter-3 edit ran"):
        run(nbformat.read(ch4, as_version=4), ch4.parent)
