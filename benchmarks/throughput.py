"""Training throughput on one GPU: loratune's own train() vs the stock transformers + peft stack, same data.

Run (on a CUDA machine; each --shapes group takes a few minutes on an H100):
    python benchmarks/throughput.py --shapes gpt2 smollm2-135m --out benchmarks/results-a.json
    python benchmarks/throughput.py --shapes gpt2-medium --peers naive --out benchmarks/results-b.json

Models are random-init at their real shapes (speed does not depend on weight values), trained with LoRA r=8 in
bf16: c_attn + c_proj for GPT-2, q/k/v/o for the Llama shape. Example lengths are log-normal (median 180, max
1024). tokens/s counts real (non-pad) tokens, measured after warm-up steps (compilation excluded). MFU uses
6 x parameters x tokens/s over the H100's 989 TFLOP/s dense bf16 peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loratune.config import Config, DataConfig, DatasetConfig, LoraConfig, ModelConfig, TrainConfig  # noqa: E402
from loratune.model.shapes import byte_tokenizer, model_config  # noqa: E402
from loratune.training.recipe import train  # noqa: E402

TARGETS = {"gpt2": ["c_attn", "c_proj"], "gpt2-medium": ["c_attn", "c_proj"], "gpt2-large": ["c_attn", "c_proj"],
           "smollm2-135m": ["q_proj", "k_proj", "v_proj", "o_proj"]}
PEAK_FLOPS = 989e12


def example_lengths(n: int, seed: int = 0, median: int = 180, sigma: float = 0.6, max_len: int = 1024) -> list[int]:
    rng = random.Random(seed)
    return [max(16, min(max_len, int(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def write_texts(path: Path, lengths: list[int], seed: int = 0) -> list[str]:
    """Random-letter texts: with the byte tokenizer, n - 1 letters + EOS are exactly n tokens."""
    rng = random.Random(seed)
    texts = ["".join(rng.choices(string.ascii_lowercase, k=n - 1)) for n in lengths]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def save_model(shape: str, path: Path) -> Path:
    tok = byte_tokenizer(chatml=False)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(model_config(shape)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def cleanup() -> None:
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peft_model(model_dir: Path, shape: str, dtype: torch.dtype):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda()
    return get_peft_model(model, PeftLoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS[shape],
                                                task_type="CAUSAL_LM"))


def run_stock_trainer(model_dir: Path, shape: str, token_ids: list[list[int]], batch_size: int, steps: int, warmup: int) -> dict:
    """What most users run today: fp32 weights, Trainer(bf16=True), padded batches, HF loss on full logits."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cleanup()
    model = peft_model(model_dir, shape, torch.float32)
    batch_tokens: list[int] = []

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = labels[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
        batch_tokens.append(int(mask.sum()))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warmup, steps):
                torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps, bf16=True,
                                 learning_rate=2e-4, logging_steps=10**6, save_strategy="no", report_to=[],
                                 dataloader_num_workers=0, remove_unused_columns=False, seed=0)
        Trainer(model=model, args=args, train_dataset=[{"input_ids": t} for t in token_ids], data_collator=collate,
                callbacks=[Clock()]).train()
    tokens = sum(batch_tokens[warmup:steps])
    return {"tokens_per_s": tokens / (marks[steps] - marks[warmup]), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def run_naive_packed(model_dir: Path, shape: str, token_ids: list[list[int]], steps: int, warmup: int,
                     rows: int = 16, row_len: int = 1024) -> dict:
    """A fast hand loop: examples concatenated into 16 x 1024 rows (they attend to each other:
    contaminated), bf16 weights, torch.compile, HF loss on full logits."""
    cleanup()
    model = peft_model(model_dir, shape, torch.bfloat16)
    stream = torch.tensor([t for ids in token_ids for t in ids])
    n_batches = len(stream) // (rows * row_len)
    batches = stream[: n_batches * rows * row_len].view(n_batches, rows, row_len)
    compiled = torch.compile(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    start = 0.0
    for step in range(steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        ids = batches[step % n_batches].cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": (steps - warmup) * rows * row_len / elapsed, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def loratune_config(model_dir: Path, data_file: Path, shape: str, out: Path, **train_kw) -> Config:
    return Config(model=ModelConfig(name=str(model_dir)),
                  lora=LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=TARGETS[shape]),
                  data=DataConfig(datasets=[DatasetConfig(path=str(data_file), format="text")], max_length=1024),
                  train=TrainConfig(**{"batch_size": 16, "lr": 2e-4, "seed": 0, "log_every": 10, "fast": "on",
                                       "compile": "on", **train_kw}),
                  output_dir=str(out))


def run_loratune(model_dir: Path, data_file: Path, shape: str, steps: int, warmup: int, **train_kw) -> dict:
    """loratune's own train(): packed rows without contamination, compiled, replayed as a CUDA graph."""
    cleanup()
    with tempfile.TemporaryDirectory() as out:
        train(loratune_config(model_dir, data_file, shape, Path(out) / "run", max_steps=steps, **train_kw))
        log = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = log[warmup - 1], log[-1]  # the loss syncs every 10 steps, so elapsed_s is exact at those
    return {"tokens_per_s": (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"]),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "final_loss": last["loss"]}


def equal_quality_check(model_dir: Path, tmp: Path, shape: str) -> dict:
    """Every example longer than half a row, so each packed row holds one example and both paths see the
    same batches: the fast path's loss curve must follow the plain path's."""
    data = tmp / "long.jsonl"
    write_texts(data, [random.Random(i).randint(520, 1024) for i in range(400)], seed=1)
    curves = {}
    for fast in ("off", "on"):
        cleanup()
        run = tmp / f"guard-{fast}"
        train(loratune_config(model_dir, data, shape, run, max_steps=40, batch_size=8, lr=1e-3, fast=fast, log_every=1))
        curves[fast] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    rel = max(abs(a - b) / abs(a) for a, b in zip(curves["off"], curves["on"]))
    return {"plain_losses": curves["off"], "fast_losses": curves["on"], "max_rel_diff": rel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["gpt2", "smollm2-135m"])
    parser.add_argument("--peers", nargs="+", default=["trainer8", "trainer32", "naive"])
    parser.add_argument("--guard", action="store_true", help="also run the equal-quality check (GPT-2 shape)")
    parser.add_argument("--out", default="benchmarks/results.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    data_file = tmp / "data.jsonl"
    texts = write_texts(data_file, example_lengths(8000))
    tok = byte_tokenizer(chatml=False)
    token_ids = [tok(t + tok.eos_token)["input_ids"] for t in texts]
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for shape in args.shapes:
        model_dir = save_model(shape, tmp / shape)
        runs = {}
        if "trainer8" in args.peers:
            runs["stock Trainer + peft, padded b8"] = run_stock_trainer(model_dir, shape, token_ids, 8, 40, 10)
        if "trainer32" in args.peers:
            runs["stock Trainer + peft, padded b32"] = run_stock_trainer(model_dir, shape, token_ids, 32, 30, 10)
        if "naive" in args.peers:
            runs["hand loop, naive packing 16x1024, compile"] = run_naive_packed(model_dir, shape, token_ids, 50, 15)
        runs["loratune (packed, no contamination)"] = run_loratune(model_dir, data_file, shape, 80, 20)
        ours = runs["loratune (packed, no contamination)"]["tokens_per_s"]
        for name, r in runs.items():
            results["rows"].append({"shape": shape, "setup": name, **r, "loratune_ratio": ours / r["tokens_per_s"]})
        Path(args.out).write_text(json.dumps(results, indent=2))  # after every shape: a timeout keeps what finished
        print(format_table(results), flush=True)
    if args.guard:
        results["equal_quality"] = equal_quality_check(save_model("gpt2", tmp / "guard-model"), tmp, "gpt2")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(format_table(results))


def format_table(results: dict) -> str:
    lines = [f"device: {results['device']}, torch {results['torch']}", "",
             "| shape | setup | tokens/s | MFU | peak GiB | loratune ÷ setup |", "|---|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        mfu = 6 * PARAMS[r["shape"]] * r["tokens_per_s"] / PEAK_FLOPS
        lines.append(f"| {r['shape']} | {r['setup']} | {r['tokens_per_s']:,.0f} | {100 * mfu:.1f}% | "
                     f"{r['peak_gib']:.1f} | {r['loratune_ratio']:.2f}x |")
    if "equal_quality" in results:
        q = results["equal_quality"]
        lines += ["", f"equal-quality check (GPT-2 shape, 40 steps, same batches): max relative loss difference "
                      f"fast vs plain = {q['max_rel_diff']:.4f}; final loss plain {q['plain_losses'][-1]:.4f}, "
                      f"fast {q['fast_losses'][-1]:.4f}"]
    return "\n".join(lines)


PARAMS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "smollm2-135m": 134_515_008}  # base parameters

if __name__ == "__main__":
    main()
