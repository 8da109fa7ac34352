"""End to end, a small job shaped like our users': train a LoRA adapter on short prompt -> answer pairs, then
answer held-out prompts greedily. loratune against a hand-written fp32 peft loop with HF `generate`.

Run (on a CUDA machine; the peer takes a few minutes on an H100):
    python benchmarks/end_to_end.py --out benchmarks/results/end-to-end.json
As a user runs it, each command a separate process (`loratune train cfg.yaml`, then `loratune generate ...`), with
the `time:` line each command prints at its end:
    python benchmarks/end_to_end.py --cli --out benchmarks/results/end-to-end-cli.json

The job: 4,700 pairs of ~24 prompt + ~22 answer tokens ("Reverse the order of these words: ..."), 2 epochs,
LoRA r=8 on q/k/v/o, then greedy answers of up to 60 tokens for 630 held-out prompts. Both sides use the same
examples (tokenized once by loratune), the same LoRA, learning rate, schedule and gradient clipping; they differ
in what each does best: the peer trains in fp32 on padded batches of 16 and generates with `generate` in
batches of 16; loratune trains bf16 packed rows (2 x 256 tokens, about 11 examples: 886 smaller steps against the
peer's 586, since a replayed step costs little) with its defaults (on this short job: a CUDA graph, no
compilation), and decodes all prompts in one batch with the adapter merged.
The final eval loss is measured the same way for both: fp32 weights, unmerged adapter, mean NLL per answer token
of the 630 held-out pairs. Times are wall-clock and include loading the model and saving (training) or loading
(loratune's generation) the adapter. A GGUF model (the embedded default) is dequantized into loratune's cache once,
before the runs, and that one-time cost is reported apart; the peer loads the GGUF file directly every time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loratune.config import (Config, DataConfig, DatasetConfig, LoraConfig, ModelConfig, TrainConfig,  # noqa: E402
                             save_config)
from loratune.data.examples import Example, collate, load_data  # noqa: E402
from loratune.device import pick_device  # noqa: E402
from loratune.evaluation.compare import nll_and_count  # noqa: E402
from loratune.evaluation.metrics import METRICS, reference_of  # noqa: E402
from loratune.inference.generate import generate_batch  # noqa: E402
from loratune.inference.load import load  # noqa: E402
from loratune.model.load import load_adapter, load_base_model, load_tokenizer, resolve_source  # noqa: E402
from loratune.training.options import lr_lambda  # noqa: E402
from loratune.training.recipe import train  # noqa: E402

WORDS = ("apple river stone cloud garden window candle forest silver basket mirror ladder island pencil rocket "
         "blanket castle violin dragon meadow harbor lantern pepper tiger velvet wagon anchor bridge copper desert "
         "falcon glacier hammer jungle kettle lemon marble needle orchard parrot quartz ribbon saddle thunder umbrella "
         "valley walnut yellow zebra acorn bottle cactus dolphin engine feather giraffe helmet iguana jacket kitten "
         "lizard magnet napkin ocean pillow rabbit spider tomato unicorn volcano whistle button carpet donkey eagle "
         "fossil goblet hornet igloo jigsaw koala lobster mango nutmeg otter panda raven salmon tulip").split()


def write_pairs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(8, 12))
        lines.append(json.dumps({"prompt": "Reverse the order of these words: " + " ".join(words) + "\nReversed:",
                                 "response": " " + ", ".join(reversed(words))}))
    path.write_text("\n".join(lines) + "\n")
    return path


VARIANTS = {"auto": ({}, "loratune's defaults: this job is too short to compile, so packed rows replayed as a CUDA graph"),
            "compiled": ({"compile": "on"}, "packed rows, compiled, replayed as a CUDA graph"),
            "eager": ({"cuda_graphs": "off"}, "packed rows, plain kernel launches")}


def job_config(model: str, data_file: Path, out: Path, targets: list[str], lr: float, epochs: float,
               rows: int, row_len: int) -> Config:
    return Config(model=ModelConfig(name=model),
                  lora=LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=targets),
                  data=DataConfig(datasets=[DatasetConfig(path=str(data_file), format="completion")], max_length=row_len,
                                  max_samples_per_dataset=None, cache_dir=None, packing=True),
                  train=TrainConfig(batch_size=rows, lr=lr, num_epochs=epochs, warmup_ratio=0.03, report_to=[],
                                    log_every=50),
                  output_dir=str(out))


def eval_loss(model: torch.nn.Module, held_out: list[Example], pad_id: int) -> float:
    """Mean NLL per answer token, fp32, no autocast: the same measurement for every side."""
    total, count = nll_and_count(model.float().eval(), held_out, pad_id, batch_size=64)
    return total / count


def exact_match(predictions: list[str], held_out: list[Example], tok) -> float:
    return METRICS["exact_match"].fn(predictions, [[reference_of(e, tok)] for e in held_out])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_peer(cfg: Config, train_set: list[Example], held_out: list[Example], tok, device: torch.device,
             out: Path, max_new_tokens: int, batch_size: int = 16) -> dict:
    """The hand-written loop most tutorials show: fp32, padded batches, HF loss, `generate` in batches of 16."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    src, kwargs = resolve_source(cfg.model.name)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs).to(device)
    model = get_peft_model(model, PeftLoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=cfg.lora.target_modules))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    per_epoch = len(train_set) // batch_size
    steps = int(per_epoch * cfg.train.num_epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train, steps))
    model.train()
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(train_set), generator=generator).tolist()
        batch = collate([train_set[i] for i in order[(step % per_epoch) * batch_size:][:batch_size]], tok.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(out)
    synchronize(device)
    train_s = time.perf_counter() - start

    model.eval()
    tok.padding_side = "left"
    prompts = [tok.decode(e.input_ids[: e.prompt_len]) for e in held_out]
    start = time.perf_counter()
    predictions = []
    with torch.no_grad():
        for first in range(0, len(prompts), batch_size):
            enc = tok(prompts[first : first + batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(device)
            generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            predictions += tok.batch_decode(generated[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    synchronize(device)
    generate_s = time.perf_counter() - start
    predictions = [p.strip() for p in predictions]
    return {"train_s": train_s, "generate_s": generate_s, "steps": steps, "eval_loss": eval_loss(model, held_out, tok.pad_token_id),
            "exact_match": exact_match(predictions, held_out, tok), "peak_gib": peak_gib(device)}


def run_loratune(cfg: Config, held_out: list[Example], tok, device: torch.device, max_new_tokens: int,
                 gen_batch: int) -> dict:
    start = time.perf_counter()
    run_dir, final = train(cfg)
    synchronize(device)
    train_s = time.perf_counter() - start
    train_peak = peak_gib(device)

    start = time.perf_counter()
    model, run_tok = load(run_dir, device=device.type, merge_adapter=True)
    predictions = generate_batch(model, run_tok, [e.input_ids[: e.prompt_len] for e in held_out], max_new_tokens,
                                 batch_size=gen_batch)
    synchronize(device)
    generate_s = time.perf_counter() - start
    fp32_model = load_adapter(load_base_model(dataclasses.replace(cfg.model, dtype="float32"), device), run_dir)
    return {"train_s": train_s, "generate_s": generate_s, "steps": final["steps"], "tokens_per_s": final["tokens"] / final["train_seconds"],
            "eval_loss": eval_loss(fp32_model, held_out, tok.pad_token_id),
            "exact_match": exact_match(predictions, held_out, tok), "peak_gib": train_peak}


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `loratune ARGV` as a new process, as a user types it; its wall time and its own `time:` line."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "loratune", *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {}),
                               "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
    wall = time.perf_counter() - start
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"loratune {' '.join(argv)} failed ({proc.returncode}); its output is in {log}")
    line = next((x for x in reversed(proc.stderr.splitlines()) if x.startswith("time: ")), "time: ?")
    return {"command": "loratune " + " ".join(argv), "wall_s": wall, "phases": line.removeprefix("time: ")}


def run_cli(args, cfg: Config, tmp: Path, held_file: Path, runs: dict, record) -> None:
    """The job as two commands: train, then generate for the held-out prompts. First a 1-step train into an empty
    GGUF cache: what a machine's first command pays once (conversion included), reported apart. The config keeps
    loratune's default tokenized cache (in `tmp`), as a user's would. `record()` after every command.
    `--cli-config defaults`: loratune's defaults but for the data and the epochs (as the issue measured); `job`: the
    in-process job's settings (2 rows per step, r=8 on q/k/v/o, lr 5e-4)."""
    if args.cli_config == "defaults":
        cfg = Config(model=cfg.model, data=DataConfig(datasets=cfg.data.datasets),
                     train=TrainConfig(num_epochs=cfg.train.num_epochs), output_dir=cfg.output_dir)
    save_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=str(tmp / "tokenized"))),
                tmp / "cfg.yaml")
    gguf = f"--model.gguf_cache_dir={args.cli_gguf_cache or tmp / 'gguf'}"
    record()  # names tmp (the commands' logs) before anything can fail
    runs["first train on a machine (1 step, empty GGUF cache)"] = timed(
        ["train", str(tmp / "cfg.yaml"), gguf, f"--output_dir={tmp / 'first'}", "--train.max_steps=1"], tmp / "first.log")
    record()
    for i in range(args.repeats):
        run = tmp / f"run{i}"
        runs[f"train #{i + 1}"] = timed(["train", str(tmp / "cfg.yaml"), gguf, f"--output_dir={run}"], tmp / f"train{i}.log")
        record()
        out = tmp / f"out{i}.jsonl"
        runs[f"generate #{i + 1}"] = timed(["generate", str(run), "--input", str(held_file), "--output", str(out),
                                            "--max_new_tokens", str(args.max_new_tokens),
                                            *(["--batch_size", str(args.cli_batch_size)] if args.cli_batch_size else [])],
                                           tmp / f"generate{i}.log")
        outputs = [json.loads(line) for line in out.read_text().splitlines()]
        runs[f"generate #{i + 1}"]["exact_match"] = sum(
            o["output"].strip() == o["response"].strip() for o in outputs) / len(outputs)
        record()
    if args.compile_twice:  # the same compiled run twice: the second finds the first's compiled graphs in the caches
        env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"), "TRITON_CACHE_DIR": str(tmp / "triton")}
        for which in ("cold", "warm"):
            runs[f"compiled train, {which} compiler caches (20 steps)"] = timed(
                ["train", str(tmp / "cfg.yaml"), gguf, f"--output_dir={tmp / which}", "--train.compile='on'",
                 "--train.max_steps=20"], tmp / f"compile-{which}.log", env)
            record()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model.name (default: the embedded model)")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--pairs", type=int, default=4700)
    parser.add_argument("--held-out", type=int, default=630)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--rows", type=int, default=2, help="loratune's packed rows of 256 tokens per step")
    parser.add_argument("--gen-batch", type=int, default=1024, help="loratune's generation batch size")
    parser.add_argument("--variants", nargs="+", default=["auto"], choices=sorted(VARIANTS),
                        help="loratune runs: " + "; ".join(f"{k}: {v[1]}" for k, v in VARIANTS.items()))
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--cli", action="store_true", help="time the CLI commands as separate processes instead")
    parser.add_argument("--repeats", type=int, default=1, help="--cli: train + generate this many times")
    parser.add_argument("--cli-config", choices=["defaults", "job"], default="defaults", help="--cli: see run_cli")
    parser.add_argument("--cli-gguf-cache", help="--cli: the GGUF cache folder (default: an empty one in the temp dir)")
    parser.add_argument("--cli-batch-size", type=int, help="--cli: pass --batch_size to generate (default: its own pick)")
    parser.add_argument("--compile-twice", action="store_true", help="--cli: also a compiled run, cold then warm caches")
    parser.add_argument("--out", default="benchmarks/results/end-to-end.json")
    args = parser.parse_args()

    device = pick_device("auto")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # shows the training path and any CUDA-graph fallback
    tmp = Path(tempfile.mkdtemp())
    train_file, held_file = write_pairs(tmp / "train.jsonl", args.pairs, 0), write_pairs(tmp / "held.jsonl", args.held_out, 1)
    cfg = job_config(args.model, train_file, tmp / "run", args.targets, args.lr, args.epochs, rows=args.rows, row_len=256)
    if args.cli:
        runs: dict = {}
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

        def save() -> None:  # after every command: a timeout keeps what finished
            Path(args.out).write_text(json.dumps({"device": device_name, "torch": torch.__version__, "tmp": str(tmp),
                                                  "runs": runs}, indent=2))
        run_cli(args, cfg, tmp, held_file, runs, save)
        print("| command | wall s | the command's own time line |\n|---|---:|---|")
        for name, r in runs.items():
            em = f" (exact match {r['exact_match']:.3f})" if "exact_match" in r else ""
            print(f"| {name}: `{r['command'].replace(str(tmp), '$TMP')}` | {r['wall_s']:.1f} | {r['phases']}{em} |")
        return
    start = time.perf_counter()
    resolve_source(cfg.model.name, cfg.model.gguf_cache_dir)  # a GGUF model is dequantized once, before the runs
    conversion_s = time.perf_counter() - start  # about 0 when an earlier run made the copy
    tok = load_tokenizer(cfg.model)
    train_set = load_data(cfg.data, tok, 0)[0]
    held_out = load_data(dataclasses.replace(cfg.data, datasets=[DatasetConfig(path=str(held_file), format="completion")]),
                         tok, 0)[0]
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                     "pairs": len(train_set), "held_out": len(held_out), "lr": args.lr, "epochs": args.epochs,
                     "mean_tokens": sum(len(e.input_ids) for e in train_set) / len(train_set), "rows": args.rows,
                     "gguf_conversion_s": conversion_s, "runs": {}}

    def record(name: str, result: dict) -> None:
        results["runs"][name] = result
        print(name, json.dumps(result), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))  # after every run: a timeout keeps what finished

    for variant in args.variants:
        variant_cfg = dataclasses.replace(cfg, output_dir=str(tmp / f"run-{variant}"),
                                          train=dataclasses.replace(cfg.train, **VARIANTS[variant][0]))
        record(f"loratune ({variant})", run_loratune(variant_cfg, held_out, tok, device, args.max_new_tokens, args.gen_batch))
    if not args.no_peer:
        record("peer: fp32 peft loop + generate b16", run_peer(cfg, train_set, held_out, tok, device, tmp / "peer",
                                                             args.max_new_tokens))
    print(format_table(results))


def format_table(results: dict) -> str:
    lines = [f"device: {results['device']}, torch {results['torch']}; {results['pairs']} pairs x {results['epochs']:g} "
             f"epochs (mean {results['mean_tokens']:.0f} tokens), {results['held_out']} held-out prompts; loratune "
             f"{results['rows']} x 256 rows per step; one-time GGUF conversion {results['gguf_conversion_s']:.1f} s", "",
             "| setup | steps | train s | generate s | total s | eval loss | exact match | peak GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["runs"].items():
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {name} | {r['steps']} | {r['train_s']:.1f} | {r['generate_s']:.1f} | "
                     f"{r['train_s'] + r['generate_s']:.1f} | {r['eval_loss']:.4f} | {r['exact_match']:.3f} | {peak} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
