"""tools/gpu_check.py's 'solutions' way, on the CPU: `execute NB --solutions` puts every solution
where its exercise is and fails when an exercise's check does not say passed."""

import importlib.util
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_every_exercise_cell_gets_its_own_solution_block(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    stubs = [
        c.source for c in nb.cells if c.cell_type == "code" and c.source.startswith("#| exercise")
    ]
    names = gpu_check.with_solutions(nb, str(nb_path))
    assert len(names) == len(stubs) >= 2
    text = (ROOT / "solutions" / f"{nb_path.stem}.py").read_text()
    for name in names:
        cell = next(
            c
            for c in nb.cells
            if c.cell_type == "code" and c.source.startswith(f"#| exercise {name}\n")
        )
        body = cell.source.split("\n", 1)[1]
        block = text.split(f"# %% exercise {name}\n", 1)[1].split("# %% exercise ", 1)[0]
        assert body.strip() == block.strip() and "NotImplementedError" not in body, name


def test_an_exercise_without_a_solution_is_named():
    nb_path = ROOT / "notebooks" / "02_data_structures.ipynb"
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("#| exercise 2.9\nraise NotImplementedError"))
    with pytest.raises(ValueError, match=r"exercise 2\.9 .* has no solution"):
        gpu_check.with_solutions(nb, str(nb_path))


def test_a_wrong_solution_fails_the_run(tmp_path, monkeypatch, capsys):
    """Chapter 2 executed with its solutions, one of them broken: the run fails and says which."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "solutions").mkdir()
    shutil.copy(ROOT / "notebooks" / "02_data_structures.ipynb", tmp_path / "notebooks")
    good = (ROOT / "solutions" / "02_data_structures.py").read_text()
    # exercise 2.1 off by one slot per sequence: its check must fail
    bad = good.replace("* block_size for n in lengths)", "* block_size + 1 for n in lengths)")
    assert bad != good
    (tmp_path / "solutions" / "02_data_structures.py").write_text(bad)
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    monkeypatch.setenv("CLEANVLLM_THREADS", "1")
    assert (
        gpu_check.execute(str(tmp_path / "notebooks" / "02_data_structures.ipynb"), solutions=True)
        == 1
    )
    said = capsys.readouterr().out
    assert "AssertionError" in said and "slots, expected" in said, said[-2000:]  # check 2.1's words
    # the FAILED line itself names the error (what the table's "why" shows), not a fragment of the cell
    failed = [ln for ln in said.splitlines() if ln.startswith("FAILED ")]
    assert failed and "AssertionError" in failed[0] and "slots, expected" in failed[0], failed
    assert said.rstrip().endswith("with solutions to ['2.1', '2.2']: FAILED"), said[-2000:]
