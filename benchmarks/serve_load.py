"""Load test of `loratune serve`: N concurrent clients against the same requests sent one at a time.

Run (a run of the embedded model is trained first when none is given; about a minute on a CPU):
    python benchmarks/serve_load.py --out benchmarks/results/serve-load-cpu.json
    python benchmarks/serve_load.py runs/demo --requests 400 --concurrency 16

The server is a separate process, started as a user starts it; the clients are the official `openai` package,
streaming, so the time to the first token is measured as a client sees it. The requests are the demo's held-out
questions (chat, greedy, `--max-tokens` new tokens at most), sent alternately to the run and to the base model,
so the concurrent batches mix adapters. Greedy answers must be the same one at a time and under load: the
table says how many differ.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loratune.data.demo import demo_splits  # noqa: E402


def start_server(runs: list[str], max_batch: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "loratune", "serve", *runs, "--port", "0", "--max-batch",
                             str(max_batch)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    started = time.monotonic()
    for line in proc.stdout:
        print("  server:", line.rstrip())
        found = re.search(r"at (http://\S+/v1)", line)
        if found:
            print(f"  server up in {time.monotonic() - started:.1f} s")
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the pipe drained
            return proc, found.group(1)
    raise SystemExit("the server did not start")


def one(client: openai.OpenAI, model: str, question: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, pieces, usage = None, [], None
    try:
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                temperature=0, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                pieces.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
    except openai.APIError as e:
        return {"error": str(e)}
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "text": "".join(pieces),
            "tokens": usage.completion_tokens if usage else 0}


def run_load(url: str, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda job: one(client, *job, max_tokens), jobs))
    return results, time.perf_counter() - start


def summary(name: str, results: list[dict], wall: float) -> dict:
    ok = [r for r in results if "error" not in r]
    pct = lambda xs, q: statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))  # noqa: E731
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    return {"mode": name, "requests": len(results), "errors": len(results) - len(ok), "wall_s": wall,
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "p50_latency_s": pct(lat, 50), "p95_latency_s": pct(lat, 95), "p50_ttft_s": pct(ttft, 50),
            "p95_ttft_s": pct(ttft, 95)}


def demo_run(tmp: Path, steps: int, shape: str | None) -> str:
    """A run on the demo data, trained for a few steps (what serving needs is an adapter): of the embedded model,
    or of a random-init model of `shape` with a byte tokenizer (speed does not depend on the weights)."""
    out, model = tmp / "demo-run", []
    if shape:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from throughput import save_model

        model = [f"--model.name={save_model(shape, tmp / shape)}"]
    subprocess.run([sys.executable, "-m", "loratune", "train", f"--output_dir={out}", f"--train.max_steps={steps}",
                    *model], check=True, cwd=ROOT)
    return str(out)


def device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="runs to serve (default: a short demo run, trained first)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--alone", type=int, help="send only the first N requests one at a time (default: all); for "
                        "machines where the one-at-a-time pass would take too long")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--shape", help="serve a random-init model of this shape (e.g. smollm2-135m) instead of the "
                        "embedded one, where the embedded model's package is not installed")
    parser.add_argument("--out", help="write the table and settings as JSON here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    runs = args.runs or [demo_run(tmp, args.train_steps, args.shape)]
    proc, url = start_server(runs, args.max_batch)
    try:
        models = [m.id for m in openai.OpenAI(base_url=url, api_key="none").models.list()]
        questions = [r["messages"][0]["content"] for r in demo_splits()[1]]
        jobs = [(models[i % len(models)], questions[i % len(questions)]) for i in range(args.requests)]
        run_load(url, jobs[:4], 1, args.max_tokens)  # warm-up: first-call costs are not the steady state
        alone, alone_wall = run_load(url, jobs[:args.alone], 1, args.max_tokens)
        print(f"  one at a time: {len(alone)} requests in {alone_wall:.1f} s", flush=True)
        together, together_wall = run_load(url, jobs, args.concurrency, args.max_tokens)
        print(f"  {args.concurrency} concurrent: {len(together)} requests in {together_wall:.1f} s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    rows = [summary("one at a time", alone, alone_wall), summary(f"{args.concurrency} concurrent", together,
                                                                 together_wall)]
    differ = sum(a.get("text") != b.get("text") for a, b in zip(alone, together))
    print(f"\nloratune serve, {args.requests} chat requests (greedy, <= {args.max_tokens} new tokens), models "
          f"{', '.join(models)}{f' (random-init {args.shape})' if args.shape else ''}; {device()}")
    print("| mode | requests | errors | requests/s | tokens/s | p50 latency s | p95 latency s | p50 TTFT s | p95 TTFT s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['p50_latency_s']:.3f} | {r['p95_latency_s']:.3f} | {r['p50_ttft_s']:.3f} | {r['p95_ttft_s']:.3f} |")
    print(f"speed-up under load: {rows[1]['requests_per_s'] / rows[0]['requests_per_s']:.1f}x requests/s; "
          f"greedy answers that differ between the two: {differ} of {len(alone)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "models": models, "rows": rows, "differ": differ},
                                             indent=1))


if __name__ == "__main__":
    main()
