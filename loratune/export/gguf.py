"""`loratune export RUN_DIR OUT.gguf`: the merged model (or with --lora-only the adapter alone) as a GGUF file for
llama.cpp and the tools built on it (Ollama, LM Studio, llm).

Written with the `gguf` package's writer and tensor name maps, following llama.cpp's convert_hf_to_gguf.py and
convert_lora_to_gguf.py for the architectures loratune trains: Llama/SmolLM, GPT-2 and GPT-NeoX. A model whose base
came from a GGUF file (the embedded default) keeps that file's tokenizer and general metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from .. import __version__
from ..config import Config
from ..files import umask, with_suppressed_unlink
from ..model.load import EMBEDDED_ALIASES, resolve_source
from ..runs import RunError, check_weights, load_run_config
from ..timing import phases

# transformers' model_type -> llama.cpp's architecture
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2, "gpt_neox": gguf.MODEL_ARCH.GPTNEOX}
GGUF_TO_MODEL_TYPE = {gguf.MODEL_ARCH_NAMES[a]: t for t, a in ARCHS.items()}
TYPES = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
         "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
         "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
# Every file loratune writes carries this key: --overwrite replaces only such files, never one from elsewhere.
MARK = "loratune.version"
# GPT-2's Conv1D layers store weights as (in, out); llama.cpp wants nn.Linear's (out, in).
GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
# llama.cpp's byte-level BPE pre-tokenizers, by the tokenizer.json pre_tokenizer they stand for.
PRE_TOKENIZERS = {"gpt-2": [("ByteLevel", True)], "smollm": [("Digits", True), ("ByteLevel", True)]}


@dataclasses.dataclass
class Plan:
    """What an export will do, settled (and every argument checked) before the model loads."""
    run_dir: Path
    """The run (or PEFT adapter folder) exported."""
    out: Path
    """The .gguf file written."""
    qtype: str
    """f32, f16 or q8_0: the type of the 2-D weights (norms, biases and other 1-D tensors stay f32)."""
    cfg: Config
    """The run's config."""
    hf_config: object
    """The base model's transformers config (architecture and shapes)."""
    source_gguf: Path | None
    """The GGUF file the base came from, whose tokenizer and general metadata the export keeps; None otherwise."""


def plan(run_dir: str | Path, out: str | Path, qtype: str = "f16", lora_only: bool = False, overwrite: bool = False,
         trust_remote_code: bool = False, base: str | None = None) -> Plan:
    """Check everything that can be checked without loading the model; raise RunError/ValueError saying what to fix."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: the output file name must end in .gguf")
    if qtype not in TYPES or (lora_only and qtype == "q8_0"):
        why = " (with --lora-only: a LoRA file is small, and q8_0 blocks don't fit its rank-sized rows)"
        raise ValueError(f"--type {qtype}: use {'f32, f16' if lora_only else ', '.join(TYPES)}"
                         f"{why if lora_only and qtype in TYPES else ''}")
    check_target(out, overwrite)
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, trust_remote_code, base)
    check_weights(run_dir)
    if lora_only or cfg.method != "full":
        if not (run_dir / "adapter_model.safetensors").is_file():
            raise RunError(f"{run_dir} has no adapter_model.safetensors (the run did not finish, or it is a full "
                           f"fine-tune); finish it with loratune train --resume {run_dir}")
    elif not (run_dir / "model.safetensors").is_file() and not any(run_dir.glob("model-*.safetensors")):
        raise RunError(f"{run_dir} has no final weights yet; finish it with loratune train --resume {run_dir}")
    if lora_only and cfg.method == "full":
        raise RunError(f"{run_dir} is a full fine-tune: it has no adapter to export; leave out --lora-only")
    source_gguf = gguf_source(cfg)
    hf_config = base_config(cfg, source_gguf)
    if hf_config.model_type not in ARCHS:
        raise RunError(f"{run_dir}: its base is a '{hf_config.model_type}' model; GGUF export supports "
                       f"{', '.join(ARCHS)} (Llama/SmolLM, GPT-2, GPT-NeoX/Pythia)")
    check_rope(hf_config)
    return Plan(run_dir, out, qtype, cfg, hf_config, source_gguf)


def check_target(out: Path, overwrite: bool) -> None:
    """OUT must be new, or (with --overwrite) a GGUF file loratune wrote earlier: nothing else is replaced."""
    if not out.parent.is_dir():
        raise ValueError(f"{out.parent}: no such folder; create it first or write elsewhere")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; choose a new name, or pass --overwrite to replace a file "
                              "loratune exported")
    if out.is_symlink() or not out.is_file() or MARK not in _fields(out):
        raise FileExistsError(f"{out} is not a GGUF file loratune exported; it is not replaced, even with "
                              "--overwrite. Move it, or write elsewhere")


def _fields(path: Path) -> dict:
    try:
        return gguf.GGUFReader(path).fields
    except (ValueError, OSError, IndexError, KeyError):  # not a GGUF file (or a damaged one)
        return {}


def gguf_source(cfg: Config) -> Path | None:
    """The GGUF file the run's base is read from (the embedded default, or a .gguf path), else None."""
    if not (cfg.model.name in EMBEDDED_ALIASES or cfg.model.name.endswith(".gguf")):
        return None
    folder, kwargs = resolve_source(cfg.model.name)  # without a cache folder: the GGUF file itself
    return Path(folder) / kwargs["gguf_file"]


def base_config(cfg: Config, source_gguf: Path | None):
    """The base's transformers config, read without loading weights (for a GGUF base: from its metadata)."""
    from transformers import AutoConfig

    if source_gguf is not None:
        return AutoConfig.from_pretrained(source_gguf.parent, gguf_file=source_gguf.name)
    source, kwargs = resolve_source(cfg.model.name, cfg.model.gguf_cache_dir)
    return AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                      trust_remote_code=cfg.model.trust_remote_code, **kwargs)


def rope(hf_config) -> dict:
    """transformers 5 keeps the rope settings in rope_parameters; older versions as separate attributes."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", getattr(hf_config, "rotary_emb_base", 10000.0)))
    params.setdefault("partial_rotary_factor", getattr(hf_config, "rotary_pct", 1.0))
    return params


def check_rope(hf_config) -> None:
    kind = rope(hf_config).get("rope_type", rope(hf_config).get("type", "default"))
    if kind not in ("default", "linear"):
        raise RunError(f"the base uses '{kind}' rope scaling, which loratune's GGUF export does not write yet; "
                       "convert the merged model (loratune merge) with llama.cpp's convert_hf_to_gguf.py")


def write_atomic(out: Path, fill) -> Path:
    """Write through a temporary file beside OUT, renamed over it once whole; `fill(writer)` adds KV and tensors."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    os.close(fd)
    try:
        writer = fill(tmp)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, out)
    except BaseException:
        with_suppressed_unlink(tmp)
        raise
    return out


def new_writer(path: str, plan: Plan, kind: str) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCHS[plan.hf_config.model_type]])
    writer.add_type(kind)
    writer.add_string(MARK, __version__)
    return writer


def export(run_dir: str | Path, out: str | Path, qtype: str = "f16", overwrite: bool = False,
           trust_remote_code: bool = False, base: str | None = None) -> Path:
    """Write the merged model (base + the run's adapter) as a GGUF file and return its path."""
    from ..inference.load import load

    with phases("checks"):
        p = plan(run_dir, out, qtype, False, overwrite, trust_remote_code, base)
    with phases("model"):
        model, tok = load(p.run_dir, device="cpu", merge_adapter=True, trust_remote_code=trust_remote_code, base=base)
    with phases("export"):
        return write_model(p, model, tok)


def write_model(p: Plan, model: torch.nn.Module, tok) -> Path:
    """`model` (a plain transformers model: merged, or a base) and its tokenizer as a GGUF model file at p.out."""
    state = model.state_dict()
    tensors = list(tqdm(gguf_tensors(state, p), desc="tensors", unit=" tensor", total=len(state)))

    def fill(path: str) -> gguf.GGUFWriter:
        writer = new_writer(path, p, gguf.GGUFType.MODEL)
        add_hparams(writer, p.hf_config, model.config.vocab_size)
        writer.add_file_type(TYPES[p.qtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if p.source_gguf is not None:
            copy_metadata(writer, p.source_gguf, tok.chat_template)
        else:
            writer.add_name(p.run_dir.resolve().name)
            add_tokenizer(writer, tok, model.config.vocab_size)
        for name, data, raw in tensors:
            writer.add_tensor(name, data, raw_dtype=raw)
        return writer

    return write_atomic(p.out, fill)


def gguf_tensors(state: dict[str, torch.Tensor], p: Plan) -> Iterator[tuple[str, np.ndarray, object]]:
    """(GGUF name, data, ggml type) for each weight, in llama.cpp's layout."""
    cfg, model_type = p.hf_config, p.hf_config.model_type
    names = gguf.get_tensor_name_map(ARCHS[model_type], num_layers(cfg))
    tied = getattr(cfg, "tie_word_embeddings", False) and model_type != "gpt_neox"  # llama.cpp's NeoX needs output
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd.weight, as convert_hf_to_gguf leaves it
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RunError(f"{p.run_dir}: the merged model has a tensor '{hf_name}' that llama.cpp's "
                           f"{model_type} layout has no place for; it can't be exported to GGUF")
        yield (name, *encode(name, to_llama_cpp_layout(hf_name, tensor.detach().float(), cfg), p.qtype))


def num_layers(cfg) -> int:
    return getattr(cfg, "num_hidden_layers", None) or cfg.n_layer


def to_llama_cpp_layout(hf_name: str, t: torch.Tensor, cfg) -> torch.Tensor:
    """The few weights whose layout differs between transformers and llama.cpp (the same rows moves apply to a LoRA
    B matrix, whose rows are the weight's rows)."""
    if cfg.model_type == "gpt2" and hf_name.endswith(GPT2_CONV1D):
        return t.T.contiguous()
    if cfg.model_type == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
        # llama.cpp rotates adjacent pairs, transformers the two halves of each head: reorder rows per head
        heads = cfg.num_attention_heads if ".q_proj." in hf_name else cfg.num_key_value_heads
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
    if cfg.model_type == "gpt_neox" and ".query_key_value." in hf_name:
        # transformers interleaves q, k, v per head; llama.cpp wants all q rows, then k, then v
        heads = cfg.num_attention_heads
        return t.reshape(heads, 3, t.shape[0] // heads // 3, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return t


def encode(name: str, t: torch.Tensor, qtype: str) -> tuple[np.ndarray, object]:
    """As convert_hf_to_gguf: 1-D tensors, biases and position embeddings stay f32; q8_0 falls back to f16 for a
    matrix whose rows don't split into 32-value blocks."""
    data = t.numpy()
    if data.ndim < 2 or not name.endswith(".weight") or name.startswith("position_embd"):
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    raw = TYPES[qtype][0]
    if raw == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[raw][0]:
        raw = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, raw), raw


def add_hparams(writer: gguf.GGUFWriter, cfg, vocab_size: int) -> None:
    """The architecture's hyperparameters under the keys llama.cpp reads (as convert_hf_to_gguf writes them)."""
    if cfg.model_type == "gpt2":
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_rope_freq_base(float(rope(cfg)["rope_theta"]))
    if cfg.model_type == "gpt_neox":
        writer.add_rope_dimension_count(int(rope(cfg)["partial_rotary_factor"] * head_dim))
        writer.add_parallel_residual(getattr(cfg, "use_parallel_residual", True))
        writer.add_layer_norm_eps(cfg.layer_norm_eps)
        return
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if rope(cfg).get("rope_type", rope(cfg).get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope(cfg)["factor"])


def copy_metadata(writer: gguf.GGUFWriter, source: Path, chat_template: str | None) -> None:
    """The source file's general and tokenizer fields as they are (the tensors and their types are new); its chat
    template replaced by the run's where the run trained with another."""
    skip = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.TYPE, gguf.Keys.General.FILE_TYPE,
            gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.Tokenizer.CHAT_TEMPLATE}
    fields = gguf.GGUFReader(source).fields
    for key, field in fields.items():
        if key in skip or not key.startswith(("general.", "tokenizer.")):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    template = fields.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    if chat_template or template:
        writer.add_chat_template(chat_template or template.contents())


def add_tokenizer(writer: gguf.GGUFWriter, tok, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (GPT-2, Pythia, SmolLM) as llama.cpp's `gpt2` tokenizer model."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or not spec["model"].get("merges"):
        raise RunError(f"the run's tokenizer is {spec['model']['type']} with {len(spec['model'].get('merges') or [])} "
                       "merges; loratune's GGUF export writes byte-level BPE tokenizers with merges (GPT-2, Pythia, "
                       "SmolLM), the kind llama.cpp's gpt2 tokenizer runs")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(spec.get("pre_tokenizer")))
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # rows of an embedding padded beyond the tokenizer (as convert_hf_to_gguf names them)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tok, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    writer.add_add_bos_token(adds_bos)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: it splits text before BPE, and a wrong one changes tokens."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    found = [(s.get("type"), s.get("use_regex", True) if s.get("type") == "ByteLevel" else s.get("individual_digits"))
             for s in steps]
    prefix = any(s.get("add_prefix_space") for s in steps)
    for name, known in PRE_TOKENIZERS.items():
        if found == known and not prefix:
            return name
    raise RunError(f"the run's tokenizer pre-tokenizes with {[s.get('type') for s in steps]}; loratune's GGUF export "
                   f"knows those of GPT-2/Pythia (byte-level) and SmolLM (digits, then byte-level) only")
