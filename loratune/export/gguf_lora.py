"""`loratune export RUN_DIR OUT.gguf --lora-only`: the adapter alone as a GGUF LoRA file for llama.cpp's `--lora`
(on the base exported by itself), laid out as llama.cpp's convert_lora_to_gguf.py writes it: `<weight>.lora_a` and
`<weight>.lora_b` per adapted weight, general.type "adapter", adapter.type "lora", adapter.lora.alpha."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
from safetensors.torch import load_file
from tqdm import tqdm

from ..runs import RunError
from ..timing import phases
from .gguf import ARCHS, TYPES, Plan, new_writer, num_layers, plan, to_llama_cpp_layout, write_atomic


def export_lora(run_dir: str | Path, out: str | Path, qtype: str = "f16", overwrite: bool = False,
                trust_remote_code: bool = False, base: str | None = None) -> Path:
    """Write the run's adapter alone as a GGUF LoRA file and return its path (no model loads: only its config)."""
    with phases("checks"):
        p = plan(run_dir, out, qtype, True, overwrite, trust_remote_code, base)
    with phases("export"):
        return write_lora(p)


def lora_pairs(p: Plan) -> tuple[float, dict[str, tuple]]:
    """(alpha, {base weight name: (A, B)}) of the adapter, refused with a reason where llama.cpp's LoRA can't
    express it (DoRA's magnitudes, whole modules saved beside the adapter, per-module alphas)."""
    path = p.run_dir / "adapter_config.json"
    saved = json.loads(path.read_text())
    refused = [(saved.get("use_dora"), "use_dora: DoRA"),
               (saved.get("alpha_pattern"), "alpha_pattern: per-module alphas"),
               (saved.get("modules_to_save"), "modules_to_save: whole modules")]
    for value, what in refused:
        if value:
            raise RunError(f"{path}: {what} can't be written as a llama.cpp LoRA file; export the merged model "
                           "instead (leave out --lora-only)")
    pairs: dict[str, list] = {}
    for key, tensor in load_file(p.run_dir / "adapter_model.safetensors").items():
        part = "A" if ".lora_A.weight" in key else "B" if ".lora_B.weight" in key else None
        if part is None:
            raise RunError(f"{p.run_dir / 'adapter_model.safetensors'}: '{key}' is not a LoRA A or B matrix; export "
                           "the merged model instead (leave out --lora-only)")
        base = key.removeprefix("base_model.model.").replace(f".lora_{part}.weight", ".weight")
        pairs.setdefault(base, [None, None])[part == "B"] = tensor.float()
    return float(saved["lora_alpha"]), {k: tuple(v) for k, v in pairs.items()}


def write_lora(p: Plan) -> Path:
    alpha, pairs = lora_pairs(p)
    rslora = json.loads((p.run_dir / "adapter_config.json").read_text()).get("use_rslora", False)
    cfg = p.hf_config
    names = gguf.get_tensor_name_map(ARCHS[cfg.model_type], num_layers(cfg))
    raw = TYPES[p.qtype][0]
    tensors = []
    for base, (a, b) in tqdm(pairs.items(), desc="LoRA tensors", unit=" pair"):
        name = names.get_name(base, try_suffixes=(".weight",))
        if name is None or a is None or b is None:
            raise RunError(f"{p.run_dir}: the adapter's '{base}' has no place in llama.cpp's {cfg.model_type} layout "
                           "(or lacks its A or B matrix); export the merged model instead (leave out --lora-only)")
        rank = a.shape[0]
        # llama.cpp scales every pair by alpha / rank; peft by alpha / rank (or alpha / sqrt(rank) with rsLoRA).
        # The difference is folded into B so that one alpha serves every rank (rank_pattern) and rsLoRA.
        b = b * ((alpha / math.sqrt(rank) if rslora else alpha / rank) / (alpha / rank))
        if cfg.model_type != "gpt2":  # B's rows are the weight's rows; GPT-2's A and B are nn.Linear-shaped already
            b = to_llama_cpp_layout(base, b, cfg)
        tensors += [(f"{name}.lora_a", gguf.quants.quantize(a.numpy(), raw)),
                    (f"{name}.lora_b", gguf.quants.quantize(b.contiguous().numpy(), raw))]

    def fill(path: str) -> gguf.GGUFWriter:
        writer = new_writer(path, p, gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_file_type(TYPES[p.qtype][1])
        for tensor_name, data in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
        return writer

    return write_atomic(p.out, fill)
