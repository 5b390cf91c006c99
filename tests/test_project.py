"""Project hygiene: environment files agree, notebooks are clean, the tiny checkpoint is sound."""
import hashlib
import json
import re
import subprocess
import tomllib
from pathlib import Path

import nbformat
import torch

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in py["dependencies"]}
    for extra, reqs in py["optional-dependencies"].items():
        if extra not in ("flash", "eval"):  # optional: a CUDA build; lm-eval, installed by make lm-eval
            wanted |= {_name(r) for r in reqs}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("  - pip:")
    pip_reqs = {_name(line.strip()[2:]) for line in lines[start + 1:] if line.strip().startswith("- ")
                and not line.strip().startswith("- -e")}
    assert pip_reqs == wanted
    assert any(line.strip() == "- -e ." for line in lines)


def committed(path: Path) -> str:
    """The file as committed (HEAD): JupyterLab may keep outputs in the working copy."""
    out = subprocess.run(["git", "show", f"HEAD:{path.relative_to(ROOT).as_posix()}"], cwd=ROOT,
                         capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else path.read_text()


def test_notebooks_are_committed_clean_and_numbered():
    nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert [p.name[:2] for p in nbs] == [f"{i:02d}" for i in range(1, len(nbs) + 1)]
    for p in nbs:
        nb = nbformat.reads(committed(p), as_version=4)
        for c in nb.cells:
            if c.cell_type == "code":
                assert not c.outputs and c.execution_count is None, f"{p.name}: run `make strip`"
        assert "widgets" not in nb.metadata, p.name


def test_tiny_checkpoint_is_deterministic_and_loads_in_transformers(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cleanvllm.tiny import write_tiny_checkpoint

    a, b = write_tiny_checkpoint(tmp_path / "a"), write_tiny_checkpoint(tmp_path / "b")
    digest = lambda p: {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.iterdir())}  # noqa: E731
    assert digest(a) == digest(b)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["head_dim"] != cfg["hidden_size"] // cfg["num_attention_heads"] and cfg["tie_word_embeddings"]
    tok = AutoTokenizer.from_pretrained(a)
    assert len(tok) == 151_669 and tok.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "hi"}]
    assert "<think>" in tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    model = AutoModelForCausalLM.from_pretrained(a)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, cfg["vocab_size"])
