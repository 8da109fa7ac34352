"""GGUF export of the demo run, checked by llama.cpp itself: file size, export time, and how many of the demo's
held-out questions llama.cpp answers exactly as `loratune generate` does (greedy both, same chat template).

Run (needs the `gguf` extra: pip install 'loratune[gguf]'; about 5 minutes on a 2-core CPU):
    loratune train                                   # -> runs/demo (or add --train.max_steps=20 for a quicker one)
    python benchmarks/gguf_export.py runs/demo --out benchmarks/results/gguf-export.json

Each export and the reference generation run as whole commands in their own processes, as a user waits for them.
llama.cpp (through llama-cpp-python) tokenizes the prompt text itself, from the GGUF file's own tokenizer, and
decodes greedily until the end-of-turn token or --max_new_tokens; the answers are compared as decoded text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loratune.config import load_config
from loratune.data.demo import demo_splits


def command(argv: list[str]) -> float:
    """Run `loratune ARGV` in a new process; its wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "loratune", *argv], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"loratune {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def llama_cpp_answers(path: Path, prompts: list[str], hf_ids: list[list[int]], max_new_tokens: int
                      ) -> tuple[list[str], float, int]:
    """(answers, seconds, prompts that llama.cpp tokenizes unlike transformers) for greedy decoding."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=os.cpu_count(), verbose=False)
    answers, other_tokens, start = [], 0, time.perf_counter()
    for text, want in zip(prompts, hf_ids):
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        other_tokens += ids != want
        out = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if llm.token_eos() == token or len(out) == max_new_tokens:
                break
            out.append(token)
        answers.append(llm.detokenize(out, special=False).decode("utf-8", errors="replace").strip())
    seconds = time.perf_counter() - start
    llm.close()
    return answers, seconds, other_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/demo")
    parser.add_argument("--max_new_tokens", type=int, default=24, help="as the demo config's eval.max_new_tokens")
    parser.add_argument("--out", help="write the results as JSON here too")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise SystemExit(f"{run_dir} is not a run; train the demo first: loratune train (or --train.max_steps=20)")
    cfg = load_config(run_dir / "config.yaml")
    questions = [r["messages"][0]["content"] for r in demo_splits(cfg.train.seed)[1]]

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in questions]
    hf_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "questions.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                                                     for q in questions))
        gen_s = command(["generate", str(run_dir), "--input", str(tmp / "questions.jsonl"), "--output",
                         str(tmp / "answers.jsonl"), "--max_new_tokens", str(args.max_new_tokens)])
        reference = [json.loads(line)["output"] for line in (tmp / "answers.jsonl").read_text().splitlines()]
        for qtype in ("f16", "q8_0"):
            path = tmp / f"demo-{qtype}.gguf"
            export_s = command(["export", str(run_dir), str(path), "--type", qtype])
            answers, cpp_s, other_tokens = llama_cpp_answers(path, prompts, hf_ids, args.max_new_tokens)
            same = sum(a == b for a, b in zip(answers, reference))
            rows.append({"type": qtype, "size_mib": path.stat().st_size / 2**20, "export_s": export_s,
                         "same_answers": same, "questions": len(questions), "llama_cpp_s": cpp_s,
                         "prompts_tokenized_differently": other_tokens,
                         "differing": [{"question": q, "loratune": b, "llama_cpp": a}
                                       for q, a, b in zip(questions, answers, reference) if a != b]})
    print(f"\nGGUF export of {run_dir} ({len(questions)} held-out demo questions, greedy, <= {args.max_new_tokens} "
          f"new tokens; loratune generate took {gen_s:.1f} s as a whole command)\n")
    print("| type | file MiB | `loratune export` s | llama.cpp answer = `loratune generate` | llama.cpp answering s "
          "| prompts tokenized differently |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['type']} | {r['size_mib']:.1f} | {r['export_s']:.1f} | {r['same_answers']}/{r['questions']} "
              f"({100 * r['same_answers'] / r['questions']:.0f}%) | {r['llama_cpp_s']:.1f} | "
              f"{r['prompts_tokenized_differently']} |")
    for r in rows:
        for d in r["differing"]:
            print(f"  {r['type']} differs on {d['question']!r}: loratune {d['loratune']!r} / "
                  f"llama.cpp {d['llama_cpp']!r}")
    if args.out:
        Path(args.out).write_text(json.dumps({"run_dir": str(run_dir), "generate_s": gen_s, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
