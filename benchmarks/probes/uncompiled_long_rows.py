"""Probe (H100, 2026-11-23): throughput.py's loratune run, uncompiled (CUDA graphs only), GPT-2 and SmolLM2-135M shapes
at 16 x 1024 rows: what `train.compile` buys on long rows (sets COMPILE_MIN_TOKENS). Results:
benchmarks/results/h100-2026-11-23c-probe-uncompiled-long-rows.json. Run: python benchmarks/probes/uncompiled_long_rows.py.
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from throughput import example_lengths, run_loratune, save_model, write_texts

tmp = Path(tempfile.mkdtemp()); data = tmp / "d.jsonl"; write_texts(data, example_lengths(8000))
out = {}
for shape in ("smollm2-135m", "gpt2"):
    m = save_model(shape, tmp / shape)
    r = run_loratune(m, data, shape, 80, 20, compile="off", cuda_graphs="on")
    out[shape] = r; print(shape, r, flush=True)
import os; Path(os.environ.get("OUT", ".")).joinpath("probe4.json").write_text(json.dumps(out, indent=1))
