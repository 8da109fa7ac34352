"""Each LoRA variant on the GPU fast path (packed rows, CUDA graphs, and compiled): does it train, which path did it
take, and what did it say? The tiny Llama of the tests (speed is not the question here), 8 steps per run.

    python benchmarks/probes/variants_fast_path.py
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import QA, save_tiny, write_jsonl  # noqa: E402
from test_train import tiny_config  # noqa: E402

import loratune  # noqa: E402

VARIANTS = {"plain": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}, "pissa": {"init": "pissa"},
            "olora": {"init": "olora"}, "modules_to_save": {"modules_to_save": ["lm_head"]}, "layers": {"layers": [1]},
            "rank_pattern": {"rank_pattern": {"q_proj": 2}}}


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    model, data = save_tiny("llama", tmp / "m"), write_jsonl(tmp / "qa.jsonl", QA)
    results = {}
    for compile_ in ("off", "on"):
        for name, lora in VARIANTS.items():
            handler = Lines()
            logging.getLogger("loratune").addHandler(handler)
            logging.getLogger("loratune").setLevel(logging.INFO)  # the path line is INFO
            cfg = tiny_config(model, data, tmp / f"{name}-{compile_}", report_to=[], max_steps=8, fast="on",
                              compile=compile_, log_every=1)
            for key, value in lora.items():
                setattr(cfg.lora, key, value)
            try:
                _, final = loratune.train(cfg)
                outcome = f"trained, loss {final['train_loss']:.3f}"
            except Exception as e:  # noqa: BLE001 - a probe reports what happened
                outcome = f"FAILED: {type(e).__name__}: {str(e)[:200]}"
            logging.getLogger("loratune").removeHandler(handler)
            said = [line for line in handler.lines if line.startswith("path:") or "graph" in line.lower()]
            results[f"{name} compile={compile_}"] = {"outcome": outcome, "said": said}
            print(f"{name:16s} compile={compile_:3s} {outcome} | {' / '.join(said)}", flush=True)
    Path(sys.argv[1] if len(sys.argv) > 1 else "variants.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
