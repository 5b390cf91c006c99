"""Check one chapter: run its invariant tests against the package (or a chapter notebook's code).

A test file belongs to a chapter through a line `CHAPTERS = ("03",)` at its top; a test names the
tasks it exercises with `@pytest.mark.tasks("3.4", "3.6")`. A failure is reported with its tasks,
so a learner reads "Task 3.4 (…) breaks test_free_and_used_partition_the_pool", not a traceback.

Usage:
  python tools/check.py 03                      the package as it is (`make check CH=03`)
  python tools/check.py 03 --notebook FILE      that notebook's code, exported to a temporary copy
                                                of the package (the notebook's `check()` does this)
  python tools/check.py 03 --first 3.5          the tests of task 3.5 first (the seeded-mistake tests)
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWNER = re.compile(r"^CHAPTERS = \(([^)]*)\)", re.M)


def test_files(chapter: str) -> list[Path]:
    found = []
    for f in sorted((ROOT / "tests").glob("test_*.py")):
        m = OWNER.search(f.read_text())
        if m and chapter in re.findall(r"\d\d", m.group(1)):
            found.append(f)
    return found


def changed_chapters(before: str) -> list[str]:
    """Chapters before `before` whose modules in the package differ from the reference export."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import export as exporter
    finally:
        sys.path.pop(0)
    out = []
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        if nb.name[:2] >= before:
            continue
        files = exporter.export(ROOT, [nb.resolve()])
        if any(not p.exists() or p.read_text() != text for p, text in files.items()):
            out.append(nb.name[:2])
    return out


PLUGIN = '''
import pytest
FAILED = []
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        tasks = [a for m in item.iter_markers("tasks") for a in m.args]
        msg = str(call.excinfo.value).strip().splitlines()[0][:300] if call.excinfo else rep.longreprtext[-300:]
        FAILED.append((item.name, tasks, msg))
def pytest_collection_modifyitems(config, items):
    import os
    first = set(filter(None, os.environ.get("CLEANVLLM_CHECK_FIRST", "").split(",")))
    if first:  # these tasks' tests first (stable otherwise): with -x a failure there ends the run
        items.sort(key=lambda it: not any(a in first for m in it.iter_markers("tasks") for a in m.args))
def pytest_sessionfinish(session):
    import json, os
    with open(os.environ["CLEANVLLM_CHECK_REPORT"], "w") as f:
        json.dump(FAILED, f)
'''


def run(chapter: str, notebook: Path | None, quiet: bool, first: str = "") -> int:
    chapter = f"{int(chapter):02d}"
    files = test_files(chapter)
    if not files:
        print(f"chapter {chapter}: no invariant tests (its task checks in the notebook are the check)")
        return 0
    with tempfile.TemporaryDirectory(prefix="cleanvllm-check-") as tmp:
        # tmp holds the report plugin and, with --notebook, the package copy: it comes first.
        path = [tmp, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), str(ROOT)]
        env = dict(os.environ, CLEANVLLM_CHECK_REPORT=str(Path(tmp) / "report.json"),
                   PYTHONPATH=os.pathsep.join(path), CLEANVLLM_CHECK_FIRST=first)
        Path(tmp, "cleanvllm_check_plugin.py").write_text(PLUGIN)
        if notebook is not None:
            # the notebook's saved code, exported into a copy of the package
            shutil.copytree(ROOT / "cleanvllm", Path(tmp) / "cleanvllm",
                            ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copytree(ROOT / "notebooks", Path(tmp) / "notebooks")
            shutil.copytree(ROOT / "tools", Path(tmp) / "tools", ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy(ROOT / "pyproject.toml", Path(tmp) / "pyproject.toml")
            out = subprocess.run([sys.executable, str(Path(tmp) / "tools" / "export.py"), str(notebook.resolve())],
                                 capture_output=True, text=True, cwd=tmp)
            if out.returncode != 0:
                print(f"chapter {chapter}: the notebook does not export: {out.stdout}{out.stderr}")
                return 1
        start = time.perf_counter()
        # -P: `python -m` would put the current folder first and hide the package under test
        cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--color=no", "-p",
               "cleanvllm_check_plugin", "--no-header", "-o", "addopts=", *map(str, files)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        seconds = time.perf_counter() - start
        report = Path(tmp) / "report.json"
        failed = __import__("json").loads(report.read_text()) if report.exists() else []
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode == 0:
        print(f"chapter {chapter}: {summary} ({seconds:.0f} s): every invariant holds")
        return 0
    print(f"chapter {chapter}: FAILED ({seconds:.0f} s)")
    for name, tasks, msg in failed:
        who = ", ".join(f"Task {t}" for t in tasks) or "the chapter's code"
        print(f"  {who} breaks {name}: {msg}")
    if not failed or not quiet:
        print(out.stdout[-3000:] + out.stderr[-2000:])
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("chapter", help="chapter number, e.g. 03")
    ap.add_argument("--notebook", type=Path, help="check this notebook's code instead of the package")
    ap.add_argument("--quiet", action="store_true", help="only the summary")
    ap.add_argument("--first", default="", metavar="TASKS",
                    help="run the tests of these tasks (3.4,3.6) first: a failure there ends the check sooner")
    args = ap.parse_args(argv)
    return run(args.chapter, args.notebook, args.quiet, args.first)


if __name__ == "__main__":
    sys.exit(main())
