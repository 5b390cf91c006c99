"""`make lm-eval`: lm-evaluation-harness against our server, each answer checked against transformers.

    python tools/lm_eval_check.py [--model DIR] [--batch-size 4] [--tasks ...] [--replay]

Starts `python -m cleanvllm.serve MODEL` (default: CLEANVLLM_MODEL, else SmolLM2, else the tiny
checkpoint), then runs lm-eval's `local-completions` client on two tasks of ours that live in
benchmarks/lm_eval/ (local YAML + JSONL: nothing is downloaded):
  - cleanvllm_choice, multiple choice: lm-eval sends each question+choice as token ids with
    `echo: true, max_tokens: 1, logprobs: 1` and sums the choice's prompt logprobs (a loglikelihood
    task; the server answers from the engine's prompt_logprobs);
  - cleanvllm_answer, generate until a newline, `--batch-size` prompts per request.
Then it recomputes every loglikelihood with transformers in float64 on the CPU and every answer
with transformers' greedy generate, and prints both beside lm-eval's. Exit 1 on a mismatch.

lm-eval itself is not a dependency of the course: `make lm-eval` installs it (the `eval` extra,
network needed). `--replay` needs no lm-eval: it sends the choice task's requests as lm-eval's
`local-completions` builds them (its `_encode_pair` and `_create_payload(generate=False)`: one
request per question, its choices batched) and reads the replies as its `parse_logprobs` does.
"""

import argparse
import json
import os
import sys
import tempfile
from operator import itemgetter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "benchmarks" / "lm_eval"


def reference_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    """Sum of log P(cont[i] | ctx + cont[:i]) in float64: the independent number."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) request into token ids: trailing spaces of the
    context move to the continuation; the continuation is what the whole adds to the context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def replay_choice_task(url: str, tok, ref, atol: float) -> list[str]:
    """Without lm-eval: cleanvllm_choice's loglikelihood requests as local-completions sends them
    (the YAML's doc_to_text and target_delimiter "": each choice has its own leading space), each
    score checked."""
    import httpx

    bad, right, worst, docs = [], 0, 0.0, (TASKS / "choice.jsonl").read_text().splitlines()
    for doc in map(json.loads, docs):
        context = f"Question: {doc['question']}\nAnswer:"
        pairs = [encode_pair(tok, context, c) for c in doc["choices"]]
        payload = {"model": "model", "prompt": [c + x for c, x in pairs], "temperature": 0,
                   "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
        r = httpx.post(url + "/v1/completions", json=payload, timeout=300)
        if r.status_code != 200:
            return [f"{doc['question']!r}: HTTP {r.status_code} {r.text[:200]}"]
        scores = []
        for choice, (ctx, cont) in zip(sorted(r.json()["choices"], key=itemgetter("index")), pairs):
            ours = sum(choice["logprobs"]["token_logprobs"][len(ctx):-1])  # as parse_logprobs
            theirs = reference_loglikelihood(ref, ctx, cont)
            scores.append(ours)
            worst = max(worst, abs(ours - theirs))
            if abs(ours - theirs) > atol:
                bad.append(f"{context!r} + {cont}: server {ours:.5f}, transformers {theirs:.5f}")
        best = max(range(len(scores)), key=scores.__getitem__)
        right += best == doc["answer"]
        print(f"  {doc['question'][:40]:40s} " + " ".join(f"{x:8.3f}" for x in scores)
              + f"  picks {best}, answer {doc['answer']}")
    print(f"accuracy {right}/{len(docs)}; largest difference vs transformers float64 {worst:.2e} "
          f"(tolerance {atol:g}): {len(bad)} beyond it")
    return bad


def reference_answer(model, tok, prompt: str, max_new: int) -> str:
    """transformers' greedy answer, ended as a server ends a turn: at any EOS id of the checkpoint's
    configs or its tokenizer (SmolLM2's chat models end turns with <|im_end|>), special tokens not
    shown, cut at the task's stop string (a newline)."""
    eos = {tok.eos_token_id}
    for cfg in (model.config, model.generation_config):
        e = getattr(cfg, "eos_token_id", None)
        eos.update(e if isinstance(e, list) else [e])
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=sorted(i for i in eos if i is not None))
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local checkpoint directory (default: as `make demo`)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tasks", default="cleanvllm_choice,cleanvllm_answer", help="comma-separated,"
                    " of cleanvllm_choice (loglikelihood) and cleanvllm_answer (generate until)")
    ap.add_argument("--replay", action="store_true", help="no lm-eval: send the choice task's "
                    "requests as lm-eval's local-completions does, and check the scores")
    ap.add_argument("--atol", type=float, default=2e-3, help="loglikelihood tolerance vs float64")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("CLEANVLLM_THREADS", "1")))
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        if not args.replay:
            print("lm-eval is not installed: `make lm-eval` installs it (pip install -e '.[eval]'); "
                  "--replay sends its loglikelihood requests without it")
            return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cleanvllm.model_runner import free_port
    from cleanvllm.serve import launch, wait_ready
    from cleanvllm.smollm2 import default_chat_model

    model_dir, about = (args.model, "--model") if args.model else default_chat_model()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    server = launch(model_dir, port, "--served-model-name", "model", "--threads", "1", log=log)
    try:
        wait_ready(url, server, timeout=300)
        print(f"server: {model_dir} ({about}) at {url}", flush=True)
        if args.replay:
            tok = AutoTokenizer.from_pretrained(model_dir)
            ref = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64).eval()
            print("cleanvllm_choice, lm-eval's requests replayed: each choice's score")
            bad = replay_choice_task(url, tok, ref, args.atol)
            for b in bad:
                print("MISMATCH", b)
            return 1 if bad else 0
        os.chdir(ROOT)  # the tasks' data_files are relative to the repository
        res = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=dict(model="model", base_url=url + "/v1/completions", tokenizer=model_dir,
                            tokenizer_backend="huggingface", tokenized_requests=True,
                            num_concurrent=1, max_retries=1),
            tasks=args.tasks.split(","),
            task_manager=TaskManager(include_path=str(TASKS)),
            batch_size=args.batch_size,
            log_samples=True,
        )
    except BaseException:
        log.seek(0)
        print("server log (last 3000 characters):\n" + log.read()[-3000:], file=sys.stderr)
        raise
    finally:
        server.terminate()
        server.wait(30)

    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64).eval()
    worst, bad = 0.0, []
    print("\ncleanvllm_choice: loglikelihood of each choice, lm-eval via our server vs transformers float64")
    for s in res["samples"].get("cleanvllm_choice", []):
        for (context, cont), resp in zip((a.arguments for a in s["requests"]) if "requests" in s
                                         else s["arguments"], s["resps"]):
            whole, ctx = tok(context + cont).input_ids, tok(context).input_ids
            ours = float(resp[0][0])
            theirs = reference_loglikelihood(ref, ctx, whole[len(ctx):])
            worst = max(worst, abs(ours - theirs))
            if abs(ours - theirs) > args.atol:
                bad.append(f"{context!r} + {cont!r}: server {ours:.5f}, transformers {theirs:.5f}")
        print(f"  {s['doc']['question'][:40]:40s} choice {s['doc']['answer']} correct, "
              f"acc {s['acc']}")
    print("\ncleanvllm_answer: the server's answer vs transformers' greedy generate")
    for s in res["samples"].get("cleanvllm_answer", []):
        (prompt, kwargs), ours = s["arguments"][0], s["resps"][0][0]
        theirs = reference_answer(ref, tok, prompt, kwargs.get("max_gen_toks", 12))
        print(f"  {prompt.splitlines()[0][:40]:40s} -> {ours!r:24s} transformers {theirs!r}")
        if ours != theirs:
            bad.append(f"{prompt!r}: server {ours!r}, transformers {theirs!r}")
    print("\n" + lm_eval.utils.make_table(res))
    if "cleanvllm_choice" in res["samples"]:
        print(f"largest loglikelihood difference vs float64: {worst:.2e} (tolerance {args.atol:g})")
    for b in bad:
        print("MISMATCH", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
