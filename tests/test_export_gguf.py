"""`loratune export RUN_DIR OUT.gguf`: the file is checked two independent ways against the merged model loratune
runs itself: transformers reads it back (`gguf_file=`), and llama.cpp (llama-cpp-python, when installed) runs it.

The tiny models here use a byte-level BPE tokenizer with merges (llama.cpp's BPE needs merges; conftest's byte
tokenizer has none) and are trained for 20 steps, so that the adapter changes the logits well beyond f16 rounding.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from badinput import check_bad, run_cli
from conftest import QA, write_jsonl
from test_train import tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import loratune
from loratune.export.gguf import MARK, export, plan, write_model
from loratune.export.gguf_lora import export_lora
from loratune.inference.generate import greedy_decode
from loratune.inference.load import load
from loratune.model.load import load_base_model
from loratune.model.shapes import CHATML, model_config

PROMPTS = ["What is 3 plus 2? ", "What is 5 plus 0? ", "What is 1 plus 3? ", "What is 4 plus 1? "]
NEW_TOKENS = 8


def bpe_tokenizer(chatml: bool) -> PreTrainedTokenizerFast:
    """Byte-level BPE learned on the QA text (about 60 merges), with the specials of conftest's byte tokenizer."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>"] if chatml else ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([f"{r['question']} {r['answer']}" for r in QA] * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=specials[-1])
    if chatml:
        tok.bos_token, tok.pad_token, tok.chat_template = "<|im_start|>", "<|im_end|>", CHATML
    return tok


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox"])
def trained(request, tmp_path_factory) -> tuple[str, Path]:
    """(arch, run_dir): a seeded tiny model of the architecture with a LoRA adapter trained 20 steps on QA."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"gguf-{arch}")
    torch.manual_seed(1234)
    tok = bpe_tokenizer(chatml=arch == "llama")
    cfg = model_config(f"tiny-{arch}", len(tok))
    if arch == "gpt2":  # transformers reads a GPT-2 GGUF's context length into n_ctx, not n_positions: keep both 1024
        cfg.n_positions = 1024
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    run_dir, _ = loratune.train(tiny_config(root / "base", write_jsonl(root / "qa.jsonl", QA), root / "run",
                                            report_to=[], max_steps=20))
    return arch, run_dir


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def greedy(model, ids: list[int]) -> list[int]:
    """loratune's own greedy decoding (the one `generate` and `eval` use), never stopping early."""
    out = greedy_decode(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), NEW_TOKENS, -1, 0)
    return out[0].tolist()


def prompt_ids(tok) -> list[list[int]]:
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def test_transformers_reads_back_the_merged_model(trained, tmp_path):
    """f16: logits within f16 rounding of the merged model's (and far from the base's: the adapter is in there);
    q8_0: the same greedy continuation of every prompt."""
    arch, run_dir = trained
    if arch == "gpt_neox":
        pytest.skip("transformers has no GGUF reader for gptneox; llama.cpp checks that export below")
    merged, tok = load(run_dir, device="cpu", merge_adapter=True)
    base = load_base_model(loratune.load_config(run_dir / "config.yaml").model, torch.device("cpu")).eval()
    export(run_dir, tmp_path / "f16.gguf", "f16")
    export(run_dir, tmp_path / "q8.gguf", "q8_0")
    f16 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f16.gguf", dtype=torch.float32).eval()
    q8 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", dtype=torch.float32).eval()
    for ids in prompt_ids(tok):
        want = logits(merged, ids)
        assert (logits(f16, ids) - want).abs().max() < 5e-3
        assert (logits(base, ids) - want).abs().max() > 0.1
        assert greedy(q8, ids) == greedy(merged, ids)
    assert (tmp_path / "q8.gguf").stat().st_size < 0.8 * (tmp_path / "f16.gguf").stat().st_size


# --- llama.cpp itself ----------------------------------------------------------------------------------------------

def cpp_model(path: Path, lora: Path | None = None):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), lora_path=str(lora) if lora else None, n_ctx=256, logits_all=True,
                           n_threads=2, verbose=False)


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def cpp_greedy(llm, ids: list[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    new = []
    for _ in range(NEW_TOKENS):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(new[-1:])
    return new


def test_llama_cpp_runs_the_export(trained, tmp_path):
    """llama.cpp tokenizes the prompts as transformers does, its logits of the f16 file are the merged model's, and
    its greedy tokens (f16 and q8_0) are loratune's."""
    pytest.importorskip("llama_cpp")
    _, run_dir = trained
    merged, tok = load(run_dir, device="cpu", merge_adapter=True)
    models = {t: cpp_model(export(run_dir, tmp_path / f"{t}.gguf", t)) for t in ("f16", "q8_0")}
    try:
        for prompt, ids in zip(PROMPTS, prompt_ids(tok)):
            assert models["f16"].tokenize(prompt.encode(), add_bos=False, special=True) == ids
            assert np.abs(cpp_logits(models["f16"], ids) - logits(merged, ids).numpy()).max() < 5e-3
            want = greedy(merged, ids)
            assert cpp_greedy(models["f16"], ids) == want and cpp_greedy(models["q8_0"], ids) == want
    finally:
        for llm in models.values():
            llm.close()


def test_llama_cpp_lora_file_on_the_base_equals_the_merged_export(trained, tmp_path):
    pytest.importorskip("llama_cpp")
    _, run_dir = trained
    _, tok = load(run_dir, device="cpu")
    cfg = loratune.load_config(run_dir / "config.yaml")
    base_plan = dataclasses.replace(plan(run_dir, tmp_path / "base.gguf", "f32"), out=tmp_path / "base.gguf")
    write_model(base_plan, load_base_model(cfg.model, torch.device("cpu")), tok)
    export(run_dir, tmp_path / "merged.gguf", "f32")
    export_lora(run_dir, tmp_path / "lora.gguf", "f32")
    llms = [cpp_model(tmp_path / "merged.gguf"), cpp_model(tmp_path / "base.gguf", lora=tmp_path / "lora.gguf"),
            cpp_model(tmp_path / "base.gguf")]
    try:
        for ids in prompt_ids(tok):
            merged, with_lora, bare = (cpp_logits(llm, ids) for llm in llms)
            assert np.abs(with_lora - merged).max() < 2e-3
            assert np.abs(bare - merged).max() > 0.1  # the adapter file did something
            assert cpp_greedy(llms[1], ids) == cpp_greedy(llms[0], ids)
    finally:
        for llm in llms:
            llm.close()


# --- the command: arguments, files ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf-cli")
    tok = bpe_tokenizer(chatml=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config("tiny-llama", len(tok))).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    run_dir, _ = loratune.train(tiny_config(root / "base", write_jsonl(root / "qa.jsonl", QA), root / "run",
                                            report_to=[], max_steps=2))
    return run_dir


@pytest.mark.parametrize("argv, needles", [
    (["export", "{run}", "out.bin"], ["out.bin", ".gguf"]),
    (["export", "{run}", "out.gguf", "--type", "q4_0"], ["--type", "q4_0"]),
    (["export", "{run}", "out.gguf", "--type", "q8_0", "--lora-only"], ["--type q8_0", "f32, f16"]),
    (["export", "nowhere", "out.gguf"], ["nowhere", "no such run directory"]),
    (["export", "{run}", "no/such/dir/out.gguf"], ["no/such/dir", "no such folder"]),
    (["export", "{run}", "notes.gguf"], ["notes.gguf already exists", "--overwrite"]),
    (["export", "{run}", "notes.gguf", "--overwrite"], ["notes.gguf is not a GGUF file loratune exported"]),
])
def test_bad_arguments_fail_before_the_model_loads(llama_run, tmp_path, argv, needles):
    (tmp_path / "notes.gguf").write_text("the user's own file\n")
    check_bad([a.replace("{run}", str(llama_run)) for a in argv], tmp_path, *needles)


def test_an_architecture_llama_cpp_export_does_not_know_is_named(tmp_path):
    from transformers import OPTConfig

    OPTConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
              word_embed_proj_dim=16).save_pretrained(tmp_path / "opt")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "base_model_name_or_path": "%s"}' % (tmp_path / "opt"))
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    check_bad(["export", "adapter", "out.gguf"], tmp_path, "'opt' model", "llama, gpt2, gpt_neox")


def test_overwrite_replaces_only_an_earlier_export(llama_run, tmp_path):
    out = tmp_path / "model.gguf"
    code, text = run_cli(["export", str(llama_run), str(out), "--type", "q8_0"], tmp_path)
    assert code == 0 and "time:" in text, text
    first = out.read_bytes()
    check_bad(["export", str(llama_run), str(out)], tmp_path, "already exists")
    code, text = run_cli(["export", str(llama_run), str(out), "--overwrite"], tmp_path)
    assert code == 0, text
    assert out.read_bytes() != first and MARK.encode() in out.read_bytes()[:4096]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary file left behind


def test_a_tokenizer_llama_cpp_cannot_run_fails_and_leaves_nothing(tiny_run, tmp_path):
    """conftest's byte tokenizer has no BPE merges: llama.cpp would refuse the file, so export refuses to write it."""
    check_bad(["export", str(tiny_run), "out.gguf"], tmp_path, "merges", "byte-level BPE")
    assert list(tmp_path.iterdir()) == []


def test_lora_only_refuses_what_llama_cpp_lora_cannot_express(llama_run, tmp_path):
    import shutil

    dora = shutil.copytree(llama_run, tmp_path / "dora", ignore=shutil.ignore_patterns("checkpoint*"))
    saved = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**saved, "use_dora": True}))
    check_bad(["export", "dora", "out.gguf", "--lora-only"], tmp_path, "use_dora", "leave out --lora-only")


# --- the embedded model (a GGUF base): its own file's tokenizer and metadata are kept ---------------------------

@pytest.mark.slow
def test_embedded_model_export_keeps_its_source_and_matches(tmp_path):
    """A PEFT adapter (seeded, not trained: its B matrices are random and small) on the embedded SmolLM2, with a
    tokenizer of its own whose chat template differs: the export keeps the source GGUF's tokenizer and general
    fields, takes the adapter's template, and transformers and llama.cpp read it back as the merged model."""
    import gguf
    from peft import LoraConfig, get_peft_model

    from loratune.config import ModelConfig
    from loratune.model.load import CHATML_TEMPLATE, embedded_gguf, load_tokenizer

    adapter = tmp_path / "adapter"
    model_cfg = ModelConfig(name="smollm2-135m-instruct")
    torch.manual_seed(0)
    peft_model = get_peft_model(load_base_model(model_cfg, torch.device("cpu")), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    peft_model.save_pretrained(adapter)
    saved = json.loads((adapter / "adapter_config.json").read_text())  # peft wrote the dequantized copy's path
    (adapter / "adapter_config.json").write_text(json.dumps({**saved, "base_model_name_or_path": model_cfg.name}))
    tok = load_tokenizer(model_cfg)
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(adapter)

    export(adapter, tmp_path / "f16.gguf", "f16")
    export(adapter, tmp_path / "q8.gguf", "q8_0")
    got, source = gguf.GGUFReader(tmp_path / "f16.gguf").fields, gguf.GGUFReader(embedded_gguf(model_cfg.name)).fields
    for key in ("general.name", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert got[key].contents() == source[key].contents(), key
    assert got["tokenizer.chat_template"].contents() == CHATML_TEMPLATE != source["tokenizer.chat_template"].contents()

    merged, tok = load(adapter, device="cpu", merge_adapter=True)
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"]
               for q in ("What is the capital of France?", "What is the capital of Japan?")]
    want = [greedy(merged, ids) for ids in prompts]
    f16 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f16.gguf", dtype=torch.float32).eval()
    for ids in prompts:  # logits reach about 40 here: f16 weights through 30 layers move them by about 0.05
        assert (logits(f16, ids) - logits(merged, ids)).abs().max() < 0.2
    del f16
    # q8_0 moves these logits by up to about 3: questions with one clear answer keep their greedy tokens, an open
    # one ("Write a haiku about the sea.") was seen to flip a near-tie at its second token
    q8 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", dtype=torch.float32).eval()
    assert [greedy(q8, ids) for ids in prompts] == want
    del q8
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return
    llm = cpp_model(tmp_path / "f16.gguf")
    try:
        assert [cpp_greedy(llm, ids) for ids in prompts] == want
        assert np.abs(cpp_logits(llm, prompts[0]) - logits(merged, prompts[0]).numpy()).max() < 0.2
    finally:
        llm.close()


def test_llama_cpp_lora_file_with_rslora_and_a_rank_pattern(llama_run, tmp_path):
    """rsLoRA scales by alpha/sqrt(r) and a rank pattern gives modules other ranks; llama.cpp scales every pair by
    alpha/rank, so the export folds the difference into B: the file on the base must still equal the merged model."""
    pytest.importorskip("llama_cpp")
    cfg = loratune.load_config(llama_run / "config.yaml")
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "run"), train=dataclasses.replace(cfg.train, max_steps=10),
                              lora=dataclasses.replace(cfg.lora, use_rslora=True, rank_pattern={"q_proj": 2}))
    run_dir, _ = loratune.train(cfg)
    _, tok = load(run_dir, device="cpu")
    write_model(dataclasses.replace(plan(run_dir, tmp_path / "base.gguf", "f32"), out=tmp_path / "base.gguf"),
                load_base_model(cfg.model, torch.device("cpu")), tok)
    export(run_dir, tmp_path / "merged.gguf", "f32")
    export_lora(run_dir, tmp_path / "lora.gguf", "f32")
    llms = [cpp_model(tmp_path / "merged.gguf"), cpp_model(tmp_path / "base.gguf", lora=tmp_path / "lora.gguf")]
    try:
        for ids in prompt_ids(tok):
            merged, with_lora = (cpp_logits(llm, ids) for llm in llms)
            assert np.abs(with_lora - merged).max() < 2e-3
    finally:
        for llm in llms:
            llm.close()
