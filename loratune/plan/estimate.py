"""`loratune estimate`: parameters, memory and time of a run, from the model's config alone (no weight is loaded).

The model is built on PyTorch's meta device: every tensor has its shape and dtype and no storage, so parameter
counts are exact (peft adds the adapter as it will in training) and a forward pass costs nothing. Activation
memory is what that forward pass saves for backward, counted by a saved-tensors hook: the model's own code decides
what is kept, so a new architecture needs no formula. Attention is counted as the fused kernels the GPU runs (FlashAttention or flex attention keep the inputs, the output and one row of
log-sum-exp, never the L x L scores); the loss keeps float32 log-probabilities, and two gradients of their size are
alive with everything else when backward starts: that is the peak. Checked against measured peaks on an H100 and
on the CPU (BENCHMARKS.md, benchmarks/estimate_check.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..config import Config, validate
from ..device import pick_device
from ..model.load import add_lora, gguf_copy, pick_dtype, resolve_source
from ..training.options import use_fast_path

GIB = 2**30
log = logging.getLogger("loratune")
ATTENTION = "loratune_estimate"


@dataclass
class Estimate:
    """Bytes per GPU (or of CPU memory) for one training process."""

    device: str
    dtype: str
    total_params: int
    trainable_params: int
    adapter_bytes: int
    """The adapter's safetensors file (the whole model's for method: full)."""
    weights: int
    gradients: int
    optimizer: int
    """AdamW's two moments per trainable parameter."""
    activations: int
    """Saved for backward by one micro-batch, as configured (gradient checkpointing on or off)."""
    activations_checkpointed: int
    activations_full: int
    loss: int
    """The gradients of the float32 log-probabilities and logits, alive with every saved activation when backward
    starts."""
    rows: int
    row_len: int

    resident_gradients: bool
    """The gradients stay allocated between steps (a replayed CUDA graph adds into the same tensors); otherwise they
    are freed after each step, and backward builds them up as it frees the activations."""

    @property
    def peak(self) -> int:
        """When backward starts every activation is alive, and the gradients only if they stay between steps; when it
        ends all gradients are. The optimizer's moments live throughout from the second step."""
        during = self.activations + self.loss + (self.gradients if self.resident_gradients else 0)
        return self.weights + self.optimizer + max(during, self.gradients)

    def largest_micro_batch(self, memory: int) -> int:
        """Rows per micro-batch that fit `memory` bytes (0: not even one)."""
        fixed = self.weights + self.optimizer + (self.gradients if self.resident_gradients else 0)
        return max(0, int((memory - fixed) // ((self.activations + self.loss) / self.rows)))


def estimate(cfg: Config, device: torch.device, rows: int | None = None, row_len: int | None = None) -> Estimate:
    """The estimate for `cfg` training on `device` (a CUDA device need not be present: nothing runs on it), for
    micro-batches of `rows` x `row_len` tokens (default: batch_size x max_length, the most a micro-batch holds)."""
    dtype = pick_dtype(cfg.model.dtype, device)
    compute = torch.bfloat16 if device.type == "cuda" and cfg.train.precision in ("auto", "bf16") else \
        torch.float16 if cfg.train.precision == "fp16" else dtype
    model = meta_model(cfg, model_config(cfg), dtype)
    if compute != dtype and cfg.method == "lora":
        model.to(dtype)  # the full model in its own dtype; adapters stay float32, as peft keeps them
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    trained = sum(p.numel() * p.element_size() for p in trainable)
    rows, row_len = rows or cfg.train.batch_size, row_len or cfg.data.max_length
    full, outside, layers = saved_bytes(model, compute, rows, row_len)
    per_layer = (full - outside) / max(1, layers)
    hidden = model.config.get_text_config().hidden_size * rows * row_len * _size(compute)
    checkpointed = int(outside + layers * hidden + per_layer)  # every layer's input, and one layer recomputed
    vocab = model.config.get_text_config().vocab_size
    packed = use_fast_path(cfg.train, device) or cfg.data.packing
    # log_softmax's backward holds the gradient of the log-probabilities and of the logits, both float32 and as
    # large as the logits, while every activation is still saved. Packed rows take the loss over every position at
    # once; padded batches a chunk of 2,048 trained tokens at a time.
    loss = 2 * (rows * row_len if packed else min(rows * row_len, 2048)) * vocab * 4
    graphs = (packed and device.type == "cuda" and cfg.train.cuda_graphs != "off" and cfg.train.precision != "fp16"
              and not cfg.train.gradient_checkpointing)
    return Estimate(device=device.type, dtype=str(dtype).removeprefix("torch."), total_params=sum(p.numel() for p in params),
                    trainable_params=sum(p.numel() for p in trainable), adapter_bytes=trained, weights=weights,
                    gradients=trained, optimizer=2 * trained,
                    activations=checkpointed if cfg.train.gradient_checkpointing else full,
                    activations_checkpointed=checkpointed, activations_full=full, loss=loss, rows=rows,
                    row_len=row_len, resident_gradients=graphs)


def model_config(cfg: Config) -> PretrainedConfig:
    """The base's config.json (or a GGUF file's metadata): a few kilobytes, never the weights. A GGUF model's
    dequantized copy has it as a file; parsing the GGUF header itself takes seconds (its vocabulary)."""
    source, kwargs = resolve_source(cfg.model.name)
    if "gguf_file" in kwargs and cfg.model.gguf_cache_dir:
        copy = gguf_copy(Path(source) / kwargs["gguf_file"], Path(cfg.model.gguf_cache_dir).expanduser())
        if (copy / "config.json").is_file():
            source, kwargs = str(copy), {}
    return AutoConfig.from_pretrained(source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
                                      **kwargs)


def meta_model(cfg: Config, config: PretrainedConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The model as training builds it, with no storage: the adapter from the run's LoRA settings (an init that reads
    the weights, like PiSSA, gives the same shapes as the default init)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.method == "full":
        return model.requires_grad_(True)
    quiet = logging.getLogger("loratune")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # add_lora's line is for the run itself
    try:
        return add_lora(model, dataclasses.replace(cfg.lora, init="default"))
    finally:
        quiet.setLevel(level)


def saved_bytes(model: torch.nn.Module, compute: torch.dtype, rows: int, length: int) -> tuple[int, int, int]:
    """(bytes saved for backward by a forward + loss of rows x length tokens, the part saved outside the decoder
    layers, the number of layers). Each storage counts once, the parameters not at all."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    layers = decoder_layers(model)
    inside = [0]
    saved: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), inside[0] > 0)
        return t

    hooks = [h for layer in layers for h in (
        layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, inside[0] + 1)),
        layer.register_forward_hook(lambda *_: inside.__setitem__(0, inside[0] - 1)))]
    previous = model.config._attn_implementation
    AttentionInterface.register(ATTENTION, fused_attention)
    model.set_attn_implementation(ATTENTION)
    ids = torch.zeros(rows, length, dtype=torch.long, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Autocast(compute):
            logits = model(input_ids=ids, use_cache=False).logits
            F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    finally:
        for h in hooks:
            h.remove()
        model.set_attn_implementation(previous)
    return (sum(n for n, _ in saved.values()), sum(n for n, layer in saved.values() if not layer), len(layers))


class Autocast(TorchFunctionMode):
    """torch.autocast's casts, for meta tensors (which it does not see): matmuls and attention take their inputs in
    the low precision, and the ops autocast keeps in float32 take theirs in float32. Each cast is a new tensor, and
    what a matmul saves for backward is its cast input, as under the real autocast (a float32 adapter saves a bf16
    copy of its input beside the one the frozen layer saves)."""

    LOW = frozenset({F.linear, torch.matmul, torch.Tensor.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
           F.scaled_dot_product_attention})
    HIGH = frozenset({F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.cross_entropy, F.nll_loss, torch.pow,
            torch.Tensor.pow, torch.exp, torch.log, torch.rsqrt, torch.cumsum, torch.logsumexp})

    def __init__(self, low: torch.dtype):
        super().__init__()
        self.low = low

    def __torch_function__(self, func, types, args=(), kwargs=None):
        to = self.low if func in self.LOW else torch.float32 if func in self.HIGH and self.low != torch.float32 else None
        if to is not None:
            args = tuple(a.to(to) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != to else a
                         for a in args)
        return func(*args, **(kwargs or {}))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks: the longest ModuleList in the model."""
    return max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)


class _Fused(torch.autograd.Function):
    """What a fused attention kernel keeps for backward: q, k, v, the output and the log-sum-exp per query."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: the estimate runs no backward
        raise NotImplementedError


def fused_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention function for transformers' AttentionInterface: (batch, heads, L, dim) in, (batch, L, heads, dim) out."""
    return _Fused.apply(query, key, value).transpose(1, 2), None


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 2 else f"{n / 2**20:.1f} MiB"


def parse_memory(text: str) -> int:
    """`24GiB`, `24GB`, `80G`, `512MiB` -> bytes (GB and G read as GiB, as GPU makers' '80 GB' means)."""
    units = {"gib": GIB, "gb": GIB, "g": GIB, "mib": 2**20, "mb": 2**20, "m": 2**20}
    number = text.strip().lower().rstrip("b") + "b" if text.strip().lower().endswith(("g", "m")) else text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if number.endswith(unit):
            try:
                return int(float(number[: -len(unit)]) * units[unit])
            except ValueError:
                break
    raise ValueError(f"--memory {text}: give a size like 24GiB or 512MiB")


def steps_summary(cfg: Config, examples: list, packed: bool) -> dict:
    """Tokens per step and steps of the run, from its tokenized examples (as train counts them)."""
    from ..data.batches import epoch_batches, token_counts
    from ..training.options import total_steps

    batches = epoch_batches(examples, cfg.train.batch_size, cfg.data.max_length if packed else None, cfg.train.seed, 0)
    tokens = sum(token_counts(b, packed)[1] for b in batches)
    per_epoch = len(batches)
    return {"steps_per_epoch": math.ceil(per_epoch / cfg.train.grad_accum), "steps": total_steps(cfg.train, per_epoch),
            "tokens_per_step": tokens / max(1, per_epoch) * cfg.train.grad_accum, "examples": len(examples),
            "longest": max((len(e.input_ids) for e in examples), default=0)}


def free_memory(device: torch.device) -> int | None:
    """Bytes free now on the GPU, or available RAM on the CPU (None where it can't be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            found = [line for line in f if line.startswith("MemAvailable:")]
    except OSError:
        return None
    return int(found[0].split()[1]) * 1024 if found else None


def summary_line(e: Estimate, free: int | None) -> str:
    fits = "" if free is None else f" of {gib(free)} free"
    return (f"estimate: peak {gib(e.peak)}{fits} ({e.rows} x {e.row_len} tokens per micro-batch: weights "
            f"{gib(e.weights)}, gradients + AdamW {gib(e.gradients + e.optimizer)}, activations {gib(e.activations)}, "
            f"loss {gib(e.loss)}); loratune estimate for more")


def table(cfg: Config, e: Estimate, memory: int | None, data: dict | None, probe: dict | None) -> str:
    unit = "GPU" if e.device == "cuda" else "process (CPU memory)"
    share = 100 * e.trainable_params / e.total_params
    lines = [f"model: {cfg.model.name} ({cfg.method}), on {e.device} in {e.dtype}",
             (f"parameters: {e.total_params:,} total, {e.trainable_params:,} trainable ({share:.2f}%); "
             f"{'adapter' if cfg.method == 'lora' else 'model'} file {gib(e.adapter_bytes)}"),
             f"memory per {unit}, {e.rows} x {e.row_len} tokens per micro-batch:",
             f"  weights                 {gib(e.weights):>10}",
             f"  gradients               {gib(e.gradients):>10}",
             f"  optimizer (AdamW)       {gib(e.optimizer):>10}",
             (f"  activations             {gib(e.activations):>10}   (gradient checkpointing "
             f"{'on' if cfg.train.gradient_checkpointing else 'off'}; "
             f"{'off' if cfg.train.gradient_checkpointing else 'on'}: "
             f"{gib(e.activations_full if cfg.train.gradient_checkpointing else e.activations_checkpointed)})"),
             f"  loss (logit gradients)  {gib(e.loss):>10}",
             f"  peak                    {gib(e.peak):>10}"]
    if memory:
        rows = e.largest_micro_batch(memory)
        other = dataclasses.replace(e, activations=e.activations_checkpointed)
        lines.append(f"largest micro-batch in {gib(memory)}: {rows} rows of {e.row_len} tokens"
                     + ("" if cfg.train.gradient_checkpointing else
                        f" ({other.largest_micro_batch(memory)} with train.gradient_checkpointing=true)"))
    if data:
        lines.append(f"data: {data['examples']:,} examples; {data['steps']:,} steps ({data['steps_per_epoch']:,} per "
                     f"epoch), about {data['tokens_per_step']:,.0f} tokens per step")
    if probe:
        lines.append(f"time: {probe['tokens_per_s']:,.0f} tokens/s measured over {probe['steps']} real steps -> about "
                     f"{_seconds(probe['estimate_s'])} for the run ({_seconds(probe['first_step_s'])} to its first "
                     f"step, then {_seconds(probe['loop_s'])} of steps)")
        if probe["peak_gib"] is not None:  # the one number the estimate can't model for a compiled run
            lines.append(f"measured peak of the probe: {probe['peak_gib']:.2f} GiB"
                         + (" (compiled: the graphs keep less than eager, so the peak above is an upper bound)"
                            if probe["compiled"] else ""))
    return "\n".join(lines)


def data_summary(cfg: Config, packed: bool) -> dict:
    """Examples, steps and tokens per step, from the data tokenized as train tokenizes it (and caches it: the train
    that follows reads the same cache)."""
    from ..data.examples import load_data
    from ..model.load import load_tokenizer, use_chat_template

    tok = load_tokenizer(cfg.model)
    use_chat_template(tok, cfg.data.chat_template)
    examples, _, _ = load_data(cfg.data, tok, cfg.train.seed)
    return steps_summary(cfg, examples, packed)


def probe(cfg: Config, steps: int, data: dict, packed: bool) -> dict:
    """Train `steps` real steps in a scratch directory, as the run would (the same compile decision), and extend
    the measured rate to the run's tokens: the probe's own wall time covers the fixed costs."""
    from ..training.options import worth_compiling
    from ..training.recipe import train

    if device_of(cfg).type == "cuda":
        steps = max(steps, 2 * cfg.train.log_every)
    slots = cfg.train.batch_size * cfg.data.max_length * data["steps"]
    compile_ = "on" if packed and worth_compiling(cfg.train, slots) else "off"
    scratch = Path(tempfile.mkdtemp(prefix="loratune-probe-"))
    tc = dataclasses.replace(cfg.train, max_steps=steps, eval_every=0, generate_every_evals=0, save_every=0,
                             save_every_minutes=0, report_to=[], resume="never", compile=compile_)
    try:
        start = time.perf_counter()
        train(dataclasses.replace(cfg, train=tc, output_dir=str(scratch / "run")))
        wall = time.perf_counter() - start
        metrics = [json.loads(line) for line in (scratch / "run" / "metrics.jsonl").read_text().splitlines()]
        peak = json.loads((scratch / "run" / "final_metrics.json").read_text()).get("peak_gpu_gib")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # The first steps capture, compile and warm up; and on the GPU a step's time is known only where the loss came
    # to the host (every log_every steps): the rate is taken between such steps in the second half.
    synced = [m for m in metrics if m["step"] % cfg.train.log_every == 0] if device_of(cfg).type == "cuda" else metrics
    warm = next((m for m in synced if m["step"] >= len(metrics) // 2), metrics[0])
    rate = (metrics[-1]["tokens"] - warm["tokens"]) / max(1e-9, metrics[-1]["elapsed_s"] - warm["elapsed_s"])
    left = max(0.0, data["tokens_per_step"] * data["steps"] - metrics[-1]["tokens"])
    first = wall - (metrics[-1]["elapsed_s"] - metrics[0]["elapsed_s"])
    return {"steps": len(metrics), "tokens_per_s": rate, "estimate_s": wall + left / rate, "first_step_s": first,
            "loop_s": (data["tokens_per_step"] * data["steps"]) / rate, "probe_wall_s": wall,
            "peak_gib": peak, "compiled": compile_ == "on"}


def device_of(cfg: Config) -> torch.device:
    return pick_device(cfg.train.device)


def run_estimate(cfg: Config, memory: int | None, probe_steps: int = 0, read_data: bool = True) -> str:
    """`loratune estimate`: the table, with the data's steps and a measured time when asked."""
    validate(cfg)
    device = device_of(cfg)
    packed = use_fast_path(cfg.train, device) or cfg.data.packing
    data = data_summary(cfg, packed) if read_data or probe_steps else None
    # Padded batches are as wide as their longest example: the widest holds the data's longest.
    e = estimate(cfg, device, row_len=None if packed or not data else min(cfg.data.max_length, data["longest"]))
    measured = probe(cfg, probe_steps, data, packed) if probe_steps else None
    return table(cfg, e, memory, data, measured)


def check_fits(cfg: Config) -> None:
    """`loratune train`'s first line: the estimate in one line, and a warning before anything loads when the run
    will not fit the memory free now. Never stops the run: an estimate is not a reason to refuse."""
    device = device_of(cfg)
    try:
        e = estimate(cfg, device)
    except Exception as err:  # noqa: BLE001 - a model the estimate can't build still trains
        log.info("estimate: not available for this model (%s)", str(err).splitlines()[0][:200])
        return
    free = free_memory(device)
    log.info(summary_line(e, free))
    if free is not None and e.peak > free:
        log.warning("this run needs about %s and %s has %s free: it will likely run out of memory. Lower "
                    "train.batch_size or data.max_length, or set train.gradient_checkpointing=true "
                    "(`loratune estimate CONFIG --memory SIZE` says what fits)", gib(e.peak), device, gib(free))


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:,.0f} s"  # a tiny run is not "about 0 s"
