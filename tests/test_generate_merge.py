"""Batch generation (resumable, greedy/sampling/beam) and merging an adapter into a plain model."""

import json

import pytest
import torch
from test_train import tiny_config
from transformers import AutoModelForCausalLM

import loratune
from loratune.inference.batch import generate_file, plan
from loratune.inference.merge import merge


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def loaded(run):
    return loratune.load(run, device="cpu")


def gen(model, tok, prompts, out, chunk=256, settings=None, **kw):
    """plan + generate_file, as `loratune generate` runs them."""
    job = plan(prompts, out, settings or {"max_new_tokens": kw.get("max_new_tokens")}, sampling=kw.get("do_sample", False),
               chunk=chunk)
    return generate_file(model, tok, job, **kw)


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_generate_txt_is_resumable_from_a_torn_output(loaded, tmp_path, sampling):
    model, tok = loaded
    options = {"do_sample": True, "temperature": 1.5, "seed": 3} if sampling else {}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"question {i}?\n" for i in range(7)))
    full = tmp_path / "full.txt"
    assert gen(model, tok, prompts, full, max_new_tokens=5, batch_size=3, chunk=2, **options) == 7
    expected = full.read_text().splitlines()
    assert len(expected) == 7

    partial = tmp_path / "partial.txt"
    gen(model, tok, prompts, partial, max_new_tokens=5, batch_size=3, chunk=2, **options)
    partial.write_text("\n".join(expected[:5]) + "\nhalf a li")  # killed while writing the sixth line
    # Greedy outputs depend on nothing but their prompt: it goes on from prompt 5. Sampling restarts the seeded
    # chunk of prompts 4-5, so the numbers drawn are the uninterrupted run's.
    assert gen(model, tok, prompts, partial, max_new_tokens=5, batch_size=3, chunk=2, **options) == (3 if sampling else 2)
    assert partial.read_text().splitlines() == expected
    assert gen(model, tok, prompts, partial, max_new_tokens=5, batch_size=3, chunk=2, **options) == 0  # all done


def test_txt_outputs_with_line_breaks_inside_stay_one_line_each(loaded, tmp_path, monkeypatch):
    """An output holding \\r, \\n or other line separators must not shift the count (a re-run lost 89 of 600)."""
    import loratune.inference.batch as batch

    model, tok = loaded
    weird = ["a\rb", "c\nd", "e\r\nf", "g\u2028h", "back\\slash", "plain"]
    # Each prompt's output is fixed by its tokens, so a resumed chunk writes what the first run wrote.
    monkeypatch.setattr(batch, "generate_batch", lambda m, t, ids, *a, **k: [weird[sum(p) % 6] for p in ids])
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"q{i}\n" for i in range(12)))
    out = tmp_path / "o.txt"
    assert gen(model, tok, prompts, out, chunk=4) == 12
    data = out.read_bytes()
    assert data.count(b"\n") == 12
    escaped = {batch.escape_line(w) for w in weird}
    assert escaped == {"a\\rb", "c\\nd", "e\\r\\nf", "g\u2028h", "back\\\\slash", "plain"}
    assert set(data.decode().split("\n")[:12]) <= escaped
    out.write_bytes(b"\n".join(data.split(b"\n")[:9]) + b"\n")  # a run killed after 9 of them
    before = data
    assert gen(model, tok, prompts, out, chunk=4) == 3  # prompts 9-11
    assert out.read_bytes() == before
    assert gen(model, tok, prompts, out, chunk=4) == 0


def test_generate_jsonl_messages_and_raw_prompts(loaded, tmp_path):
    model, tok = loaded
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "id": 1}) + "\n"
                       + json.dumps({"prompt": "2+2=", "id": 2}) + "\n")
    out = tmp_path / "out.jsonl"
    gen(model, tok, prompts, out, max_new_tokens=4)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [1, 2] and all(isinstance(r["output"], str) for r in records)


def test_sampling_is_deterministic_under_the_seed_and_beam_search_runs(loaded, tmp_path):
    model, tok = loaded
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\n")
    outs = []
    for name in ("s1.txt", "s2.txt"):
        gen(model, tok, prompts, tmp_path / name, max_new_tokens=6, seed=7, do_sample=True, temperature=1.5)
        outs.append((tmp_path / name).read_text())
    assert outs[0] == outs[1]
    gen(model, tok, prompts, tmp_path / "beam.txt", max_new_tokens=6, num_beams=3)
    assert len((tmp_path / "beam.txt").read_text().splitlines()) == 3


def test_merged_model_loads_with_plain_transformers_and_matches_the_adapter(run, loaded, tmp_path):
    model, tok = loaded
    with torch.no_grad():  # make the adapter matter (B starts at zero; 3 steps move it only a little)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        model.save_pretrained(run)
    ids = torch.tensor([tok("hello there", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = loratune.load(run, device="cpu")[0](ids).logits
    out = merge(run, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=1e-4)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert oct(out.stat().st_mode & 0o777) != "0o700"  # a merged model is for sharing, not private
    with pytest.raises(FileExistsError, match="already exists and is not an empty folder"):
        merge(run, out)


def test_report_is_one_self_contained_page(run, tmp_path):
    import shutil

    from loratune.evaluation.compare import evaluate
    from loratune.evaluation.report import write_report

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    page = write_report(copy).read_text()
    assert "No evaluation yet: run <code>loratune eval" in page  # says what to do, doesn't fail
    assert 'src="data:image/png;base64,' in page  # curves inlined: the file can be mailed as is

    cfg_path = copy / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("eval_fraction: 0.0", "eval_fraction: 0.25"))
    evaluate(copy, device="cpu", samples=0)
    page = write_report(copy, samples=3).read_text()
    assert "<th>metric (held-out split)</th><th>base</th><th>run</th>" in page
    assert page.count("<td><span class=") == 3 * 2  # 3 samples x (base, run)
    assert "<summary>config.yaml</summary>" in page and "qa.jsonl: " in page  # config and data mix


@pytest.mark.parametrize("check_every", [1, 4])  # finished rows leave the batch at once, or 4 tokens later
@pytest.mark.parametrize("arch_dir", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_greedy_decode_matches_generate_with_left_padding_and_early_stop(arch_dir, check_every, request):
    from loratune.data.examples import Example, collate
    from loratune.inference.generate import greedy_decode

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(arch_dir)).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]  # unequal lengths: left padding matters
    batch = collate([Example(p, p, {}) for p in prompts], pad_id=0, pad_left=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
    eos = int(first[1, -1])  # row 1 stops at once: finished rows must continue with pad
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                              pad_token_id=0, eos_token_id=eos)[:, ids.shape[1]:]
    got = greedy_decode(model, ids, mask, max_new_tokens=12, eos_id=eos, pad_id=0, check_every=check_every)
    assert got[:, : expected.shape[1]].tolist() == expected.tolist()
    assert (got[:, expected.shape[1]:] == 0).all()  # decoding past the common end only adds pad
    assert got[1, 0] == eos and (got[1, 1:] == 0).all()


@pytest.mark.parametrize("arch_dir", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_a_prefix_every_prompt_shares_runs_once_and_changes_no_token(arch_dir, request):
    from loratune.data.examples import Example, collate
    from loratune.inference.generate import common_prefix_len, greedy_decode

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(arch_dir)).eval()
    system = [21, 22, 23, 24, 25, 26]
    prompts = [system + [5, 6, 7, 8, 9], system + [11], system + [13, 14, 15]]
    assert common_prefix_len(prompts) == len(system)
    assert common_prefix_len([system + [5], system[:3] + [9, 9, 9]]) == 0  # 3 shared tokens: not worth a forward
    assert common_prefix_len([system + [5]]) == 0
    full = collate([Example(p, p, {}) for p in prompts], pad_id=0, pad_left=True)
    expected = model.generate(input_ids=full["input_ids"], attention_mask=full["attention_mask"], max_new_tokens=10,
                              do_sample=False, pad_token_id=0, eos_token_id=-1)[:, full["input_ids"].shape[1]:]
    rest = collate([Example(p[len(system):], p[len(system):], {}) for p in prompts], pad_id=0, pad_left=True)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    got = greedy_decode(model, rest["input_ids"], rest["attention_mask"], max_new_tokens=10, eos_id=-1, pad_id=0,
                        prefix=torch.tensor(system))
    assert got.tolist() == expected.tolist()
    assert seen[:2] == [len(system), rest["input_ids"].numel()]  # the prefix once, then the rows' own tokens


def test_merge_writes_the_dtype_asked_for_or_the_bases(run, tmp_path):
    from safetensors import safe_open

    def dtypes(folder):
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {f.get_tensor(k).dtype for k in f.keys()}

    assert dtypes(merge(run, tmp_path / "bf16", dtype="bfloat16")) == {torch.bfloat16}
    assert dtypes(merge(run, tmp_path / "auto")) == {torch.float32}  # the tiny base declares float32
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert plain.dtype == torch.bfloat16


def test_an_adapter_names_its_base_as_the_user_did_and_loads_in_plain_peft_elsewhere(tiny_llama_dir, tmp_path,
                                                                                      monkeypatch):
    """adapter_config.json names the base as given (here a relative path), so AutoPeftModelForCausalLM finds a base
    of that name on another machine (here: another working directory with its own copy)."""
    import shutil

    from conftest import QA, write_jsonl
    from peft import AutoPeftModelForCausalLM

    from loratune.model.load import portable_base_name

    first, second = tmp_path / "machine1", tmp_path / "machine2"
    for machine in (first, second):
        shutil.copytree(tiny_llama_dir, machine / "base")
    monkeypatch.chdir(first)
    cfg = tiny_config("base", write_jsonl(first / "qa.jsonl", QA), first / "run", report_to=[], max_steps=2)
    run_dir, _ = loratune.train(cfg)
    assert json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    shutil.copytree(run_dir, second / "run")
    monkeypatch.chdir(second)
    shutil.rmtree(first)
    model = AutoPeftModelForCausalLM.from_pretrained("run")
    assert model.peft_config["default"].base_model_name_or_path == "base"
    assert portable_base_name("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_an_adapter_never_names_loratunes_cache_folder_as_its_base(tiny_llama_dir, tmp_path, monkeypatch):
    """A name loratune resolves to a folder of its own (as the embedded GGUF model resolves to its dequantized copy)
    is written as the name, not the folder."""
    from conftest import QA, write_jsonl

    import loratune.model.load as model_load

    real = model_load.resolve_source
    monkeypatch.setattr(model_load, "resolve_source",
                        lambda name, cache=None: (str(tiny_llama_dir), {}) if name == "some-alias" else real(name, cache))
    cfg = tiny_config("some-alias", write_jsonl(tmp_path / "qa.jsonl", QA), tmp_path / "run", report_to=[], max_steps=1)
    run_dir, _ = loratune.train(cfg)
    assert json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "some-alias"
