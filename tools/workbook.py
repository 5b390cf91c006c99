"""Generate the workbook: the reference chapters with every task's code replaced by a stub.

One source, two forms. notebooks/NN_*.ipynb is the reference: complete, executed by CI, the source
of the package. workbook/NN_*.ipynb is generated from it (never edit it by hand): the same prose,
figures and checks, but the code of each task is gone, and the learner writes it.

A task is marked in a reference chapter, inside an `#| export` cell, inside a function body:

    @add_to(BlockManager)
    def allocate(self, seq: Sequence) -> None:
        \"\"\"Give a waiting sequence its block table, reusing cached prefix blocks.\"\"\"
        #| task 3.4 BlockManager.allocate: look up the cached prefix, take free blocks, commit
        #| hint `_cached_prefix`, `_free_blocks_to_take` and `_assign` do the work
        ...the reference code...
        #| end task

The marker lines are comments at the indentation of the code they enclose. `#| task N.M NAME: HINT`
opens a task (N is the chapter; NAME says what the learner writes); `#| hint ...` lines right
after it say more; `#| end task` closes it. In the workbook the lines between become

        raise NotImplementedError("Task 3.4 (BlockManager.allocate) is not written yet")

so the signature, the docstring, the hints and every line outside the task stay. The exporter drops
the marker lines, so the package never sees them. Each task is followed at once by a cell with
`@check("3.4", ...)` (cleanvllm/course.py) that runs the learner's code against a reference.

Usage:
  python tools/workbook.py [NN ...]     write workbook/NN_*.ipynb (all chapters by default); a file
                                        holding your own work is not overwritten without --force
  python tools/workbook.py --check      exit 1 if workbook/ differs from a fresh generation (CI)
  python tools/workbook.py --stats      tasks and task lines per chapter, the engine-core share
"""

import argparse
import ast
import copy
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
TASK = re.compile(r"^(?P<indent>[ ]*)#\|\s*task\s+(?P<id>\d+\.\d+)\s+(?P<name>[^:]+?)\s*:\s*(?P<hint>\S.*?)\s*$")
HINT = re.compile(r"^[ ]*#\|\s*hint\b")
END = re.compile(r"^(?P<indent>[ ]*)#\|\s*end task\s*$")
ANY_MARKER = re.compile(r"^\s*#\|\s*(task|hint|end task)\b")
EXPORT = re.compile(r"^#\|[ \t]*export\b[ \t]*(\S*)")
DEFAULT_EXP = re.compile(r"^#\|\s*default_exp\s+(\S+)", re.M)
CHECK = re.compile(r"@check\(\s*[\"'](\d+\.\d+)[\"']")
MAX_TASK_LINES = 30
# The engine core: the package minus course plumbing, benchmarks, demo and model helpers.
NOT_CORE = {"course.py", "bench.py", "demo.py", "tiny.py", "smollm2.py", "__init__.py", "baseline.py",
            "simulate.py", "reference.py"}


class WorkbookError(ValueError):
    pass


@dataclass
class Task:
    id: str
    name: str
    hint: str
    cell: int  # index of the cell in the notebook
    first: int  # line index of the first code line (after the task and hint lines)
    end: int  # line index of the `#| end task` line
    indent: str
    module: str

    @property
    def key(self) -> tuple[int, int]:
        a, b = self.id.split(".")
        return int(a), int(b)


def code_lines(lines: list[str]) -> int:
    return sum(1 for x in lines if x.strip() and not x.strip().startswith("#"))


def stub_line(task: Task) -> str:
    return f"{task.indent}raise NotImplementedError({f'Task {task.id} ({task.name}) is not written yet'!r})"


def cell_module(source: str, default: str | None) -> str | None:
    m = EXPORT.match(source.lstrip())
    return None if m is None else (m.group(1) or default)


def parse_tasks(path: Path, nb=None) -> list[Task]:
    """The tasks of one reference chapter, validated (WorkbookError names the cell and the line)."""
    nb = nb or nbformat.read(path, as_version=4)
    chapter = int(path.name[:2])
    m = DEFAULT_EXP.search("\n".join(c.source for c in nb.cells if c.cell_type == "code"))
    default = m.group(1) if m else None
    tasks: list[Task] = []
    for ci, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        lines = cell.source.splitlines()
        module = cell_module(cell.source, default)
        open_task = None
        for li, line in enumerate(lines):
            where = f"{path.name} cell {ci} line {li + 1}"
            if (t := TASK.match(line)) is not None:
                if module is None:
                    raise WorkbookError(f"{where}: a task marker outside an `#| export` cell")
                if open_task is not None:
                    raise WorkbookError(f"{where}: task {t['id']} opens inside task {open_task.id}")
                if int(t["id"].split(".")[0]) != chapter:
                    raise WorkbookError(f"{where}: task {t['id']} in chapter {chapter}")
                first = li + 1
                while first < len(lines) and HINT.match(lines[first]):
                    first += 1
                open_task = Task(t["id"], t["name"], t["hint"], ci, first, -1, t["indent"], module)
            elif (e := END.match(line)) is not None:
                if open_task is None:
                    raise WorkbookError(f"{where}: `#| end task` without a task")
                if e["indent"] != open_task.indent:
                    raise WorkbookError(f"{where}: `#| end task` indented unlike task {open_task.id}")
                open_task.end = li
                body = lines[open_task.first : li]
                if code_lines(body) == 0:
                    raise WorkbookError(f"{where}: task {open_task.id} holds no code")
                if any(x.strip() and not x.startswith(open_task.indent) for x in body):
                    raise WorkbookError(f"{where}: task {open_task.id} has a line left of its marker")
                tasks.append(open_task)
                open_task = None
            elif ANY_MARKER.match(line) and not HINT.match(line):
                raise WorkbookError(f"{where}: a malformed marker: {line.strip()!r}")
        if open_task is not None:
            raise WorkbookError(f"{path.name} cell {ci}: task {open_task.id} has no `#| end task`")
        _inside_functions(path, ci, cell.source, [t for t in tasks if t.cell == ci])
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        raise WorkbookError(f"{path.name}: task ids repeat: {sorted(i for i in ids if ids.count(i) > 1)}")
    return tasks


def _inside_functions(path: Path, ci: int, source: str, tasks: list[Task]) -> None:
    """A stub raises when called, never when its cell runs: every task lies in a function body."""
    if not tasks:
        return
    tree = ast.parse(source)
    funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for t in tasks:
        lo, hi = t.first + 1, t.end  # 1-based lines of the body
        inner = [f for f in funcs if f.body[0].lineno <= lo and f.end_lineno >= hi]
        if not inner:
            raise WorkbookError(f"{path.name} cell {ci}: task {t.id} is not inside a function body")


def stub_source(source: str, tasks: list[Task], only: set[str] | None = None) -> str:
    """The cell's source with these tasks' code replaced by their stubs."""
    lines = source.splitlines()
    for t in sorted(tasks, key=lambda t: t.first, reverse=True):
        if only is None or t.id in only:
            lines[t.first : t.end] = [stub_line(t)]
    return "\n".join(lines)


def banner(path: Path) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_markdown_cell(
        f"> **Workbook.** You write this chapter. Each *Task N.M* below is a stub: replace its\n"
        f"> `raise NotImplementedError(...)` with your code, run the cell, then run the check right\n"
        f"> after it. The hints sit in the `#| hint` lines. The complete chapter is\n"
        f"> `notebooks/{path.name}` (look there when you are stuck, not before). This file is\n"
        f"> generated by `make workbook` from that chapter: edit it freely, it is yours."
    )
    cell.metadata["workbook"] = "banner"
    return cell


def generate(path: Path) -> nbformat.NotebookNode:
    """The workbook form of one reference chapter."""
    nb = nbformat.read(path, as_version=4)
    tasks = parse_tasks(path, nb)
    wb = copy.deepcopy(nb)
    for ci in {t.cell for t in tasks}:
        wb.cells[ci].source = stub_source(nb.cells[ci].source, [t for t in tasks if t.cell == ci])
        ast.parse(wb.cells[ci].source)  # a stub must leave valid Python
    wb.cells.insert(1, banner(path))
    return clean(wb)


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """What the git filter (nbstripout) commits: no outputs, no run counts, cell ids 0, 1, 2, ...
    Generating it so makes the committed workbook equal a fresh generation."""
    for i, cell in enumerate(nb.cells):
        cell.id = str(i)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        for key in ("collapsed", "scrolled", "ExecuteTime", "execution"):
            cell.metadata.pop(key, None)
    for key in ("language_info", "widgets"):
        nb.metadata.pop(key, None)
    return nb


def restore(wb: nbformat.NotebookNode, ref_path: Path) -> nbformat.NotebookNode:
    """Put the reference's task bodies back into a workbook: gives the reference again."""
    ref = nbformat.read(ref_path, as_version=4)
    bodies = {t.id: ref.cells[t.cell].source.splitlines()[t.first : t.end] for t in parse_tasks(ref_path, ref)}
    out = copy.deepcopy(wb)
    out.cells = [c for c in out.cells if c.get("metadata", {}).get("workbook") != "banner"]
    for cell in out.cells:
        if cell.cell_type != "code" or "#|" not in cell.source:
            continue
        lines, i, result = cell.source.splitlines(), 0, []
        while i < len(lines):
            result.append(lines[i])
            if (t := TASK.match(lines[i])) is not None:
                i += 1
                while i < len(lines) and HINT.match(lines[i]):
                    result.append(lines[i])
                    i += 1
                while i < len(lines) and not END.match(lines[i]):
                    i += 1  # the stub (or the learner's code)
                result += bodies[t["id"]]
                continue
            i += 1
        cell.source = "\n".join(result)
    return clean(out)


def chapters(selected: list[str] | None = None) -> list[Path]:
    refs = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if selected:
        want = {f"{int(s):02d}" for s in selected}
        refs = [p for p in refs if p.name[:2] in want]
    return refs


def text(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def holds_learner_work(path: Path) -> bool:
    """True when the file differs from what git has committed (the learner wrote in it)."""
    out = subprocess.run(["git", "diff", "--quiet", "--", str(path)], cwd=ROOT, capture_output=True)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=ROOT,
                             capture_output=True).returncode == 0
    return not tracked or out.returncode != 0


def write(selected: list[str] | None, force: bool) -> int:
    out_dir = ROOT / "workbook"
    out_dir.mkdir(exist_ok=True)
    kept = []
    for ref in chapters(selected):
        dest, new = out_dir / ref.name, text(generate(ref))
        if dest.exists() and dest.read_text() == new:
            continue
        if dest.exists() and not force and holds_learner_work(dest):
            kept.append(dest.relative_to(ROOT).as_posix())
            continue
        dest.write_text(new)
        print(f"wrote {dest.relative_to(ROOT)}")
    for k in kept:
        print(f"kept {k}: it holds your work (FORCE=1 regenerates it and loses that work)")
    return 0


def committed(path: Path) -> str | None:
    """The file as committed (HEAD) in a git checkout, else as on disk: a learner's working copy
    (their own code, outputs) is theirs, and is not what this check is about."""
    rel = path.relative_to(ROOT).as_posix()
    out = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0:
        return out.stdout
    return path.read_text() if path.exists() else None


def check() -> int:
    bad = []
    refs = chapters()
    for ref in refs:
        dest = ROOT / "workbook" / ref.name
        have = committed(dest)
        if have is None or nbformat.reads(have, as_version=4) != generate(ref):
            bad.append(dest.relative_to(ROOT).as_posix())
    extra = {p.name for p in (ROOT / "workbook").glob("*.ipynb")} - {r.name for r in refs}
    for b in bad:
        print(f"out of date: {b} (run `make workbook`)")
    for e in sorted(extra):
        print(f"no reference chapter for workbook/{e}")
    return 1 if bad or extra else 0


def core_lines() -> dict[str, int]:
    """Code lines (not blank, not comments) of each engine-core module."""
    out = {}
    for f in sorted((ROOT / "cleanvllm").rglob("*.py")):
        if f.name not in NOT_CORE:
            rel = f.relative_to(ROOT / "cleanvllm").with_suffix("").as_posix().replace("/", ".")
            out[rel] = code_lines(f.read_text().splitlines())
    return out


def stats() -> int:
    core = core_lines()
    total_core, total_task_core, total_task = sum(core.values()), 0, 0
    print(f"{'chapter':22} {'tasks':>5} {'task lines':>10} {'export lines':>12} {'share':>6} "
          f"{'median cell':>11} {'diagrams':>8}")
    for ref in chapters():
        nb = nbformat.read(ref, as_version=4)
        tasks = parse_tasks(ref, nb)
        lines = [(t, code_lines(nb.cells[t.cell].source.splitlines()[t.first : t.end])) for t in tasks]
        task_lines = sum(n for _, n in lines)
        total_task += task_lines
        total_task_core += sum(n for t, n in lines if t.module in core)
        export_lines = sum(code_lines(c.source.splitlines()) for c in nb.cells
                           if c.cell_type == "code" and EXPORT.match(c.source.lstrip()))
        sizes = [len([x for x in c.source.splitlines() if x.strip()]) for c in nb.cells if c.cell_type == "code"]
        diagrams = sum(1 for c in nb.cells if c.cell_type == "code" and c.source.startswith("# Diagram"))
        share = task_lines / export_lines if export_lines else 0
        print(f"{ref.stem:22} {len(tasks):5} {task_lines:10} {export_lines:12} {share:6.0%} "
              f"{statistics.median(sizes):11.0f} {diagrams:8}")
    print(f"engine core: tasks hold {total_task_core} of its {total_core} code lines "
          f"({total_task_core / total_core:.0%}); all tasks, the benchmark's and harness's too: "
          f"{total_task} lines")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("chapters", nargs="*", help="chapter numbers (default: all)")
    ap.add_argument("--check", action="store_true", help="exit 1 if workbook/ is out of date")
    ap.add_argument("--force", action="store_true", help="overwrite workbook files holding your work")
    ap.add_argument("--stats", action="store_true", help="tasks and their share of the code")
    args = ap.parse_args(argv)
    try:
        if args.check:
            return check()
        if args.stats:
            return stats()
        return write(args.chapters, args.force)
    except WorkbookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
