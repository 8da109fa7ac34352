import io
import math

import pytest
import torch

from loratune.config import ModelConfig
from loratune.evaluation.metrics import METRICS, normalize_answer
from loratune.inference.chat import chat_loop
from loratune.inference.generate import generate_batch
from loratune.model.load import load_base_model, load_tokenizer


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    cfg = ModelConfig(name=str(tiny_llama_dir))
    return load_base_model(cfg, torch.device("cpu")).eval(), load_tokenizer(cfg)


def test_batched_left_padded_generation_equals_one_by_one(llama):
    model, tok = llama
    prompts = [tok("a", add_special_tokens=False)["input_ids"], tok("hello there, friend", add_special_tokens=False)["input_ids"],
               tok("xyz!", add_special_tokens=False)["input_ids"]]
    together = generate_batch(model, tok, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate_batch(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert together == alone
    assert all(len(t) > 0 for t in together)


def test_chat_reads_stdin_without_tty_and_leaves_on_quit(llama):
    model, tok = llama
    out = io.StringIO()
    chat_loop(model, tok, max_new_tokens=4, stdin=io.StringIO("hello\n/reset\nsecond\nquit\nnever read\n"), stdout=out)
    text = out.getvalue()
    assert text.count("model> ") == 2 and "(history cleared)" in text


def test_chat_ends_at_end_of_input(llama):
    model, tok = llama
    out = io.StringIO()
    chat_loop(model, tok, max_new_tokens=2, stdin=io.StringIO("hi\n"), stdout=out)
    assert out.getvalue().count("model> ") == 1


def test_chat_truncates_history_to_context(llama):
    model, tok = llama
    out = io.StringIO()
    long_line = "word " * 60  # ~300 byte tokens per turn; the tiny model has 256 positions
    chat_loop(model, tok, max_new_tokens=4, stdin=io.StringIO(f"{long_line[:150]}\n{long_line[:150]}\n"), stdout=out)
    assert "(history truncated to fit the model's context)" in out.getvalue()


def test_merged_adapter_generates_what_the_separate_adapter_does(tiny_gpt2_dir, qa_file, tmp_path):
    from test_train import tiny_config

    from loratune.inference.load import load
    from loratune.training.recipe import train

    run_dir, _ = train(tiny_config(tiny_gpt2_dir, qa_file, tmp_path / "run", device="cpu"))
    (separate, tok), (merged, _) = load(run_dir, "cpu"), load(run_dir, "cpu", merge_adapter=True)
    assert type(merged).__name__ == "GPT2LMHeadModel"  # no peft wrapper, no adapter kernels left
    ids = torch.tensor([tok("What is two plus two?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, separate(ids).logits, rtol=1e-4, atol=1e-4)
        with separate.disable_adapter():
            base_logits = separate(ids).logits
        assert not torch.allclose(base_logits, separate(ids).logits)  # the adapter trained
    prompts = [ids[0].tolist(), tok("Name a colour.", add_special_tokens=False)["input_ids"]]
    assert generate_batch(merged, tok, prompts, 8) == generate_batch(separate, tok, prompts, 8)


def test_metric_registry():
    assert all(m.higher_is_better for name, m in METRICS.items() if name != "length_ratio")
    assert METRICS["length_ratio"].higher_is_better is None
    assert {"exact_match", "phrase_present", "bleu", "rouge1", "rouge2", "rougeL", "length_penalty"} <= set(METRICS)
    # length: 2 words against the closest reference (4 words, not 10): ratio 0.5, penalty exp(1 - 2)
    refs = [["one two three four", "a b c d e f g h i j"]]
    assert METRICS["length_ratio"].fn(["a b"], refs) == 0.5
    assert METRICS["length_penalty"].fn(["a b"], refs) == pytest.approx(0.36788, abs=1e-5)
    assert METRICS["length_penalty"].fn(["a b c d"], refs) == 1.0
    assert normalize_answer("  The Capital, is PARIS! ") == "capital is paris"
    em = METRICS["exact_match"].fn
    assert em(["the answer is 4.", "five"], [["Answer is 4"], ["4", "5"]]) == 0.5
    assert em(["5"], [["4", "5"]]) == 1.0  # several references: any one counts
    assert METRICS["phrase_present"].fn(["Sure. THE EAGLE has landed.", "no"], [["the eagle"], ["the eagle"]]) == 0.5
    assert METRICS["bleu"].fn(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    assert METRICS["bleu"].fn(["a b c d e"], [["v w x y z"]]) == pytest.approx(0.0)
    assert METRICS["bleu"].fn(["the cat sat on the mat", "hello world again today"],
                              [["the cat sat on the mat"], ["nope", "hello world again today"]]) == pytest.approx(100.0)
    assert METRICS["rougeL"].fn(["the cat sat"], [["a dog ran", "the cat sat"]]) == pytest.approx(100.0)
    assert 0 < METRICS["rouge1"].fn(["the cat sat"], [["the cat ran"]]) < 100


def test_sampling_settings_apply_to_every_batch_and_turn(llama):
    """Sampling must not silently fall back to greedy after the first batch or chat turn."""
    model, tok = llama
    prompt = tok("ab", add_special_tokens=False)["input_ids"]
    greedy = generate_batch(model, tok, [prompt] * 4, max_new_tokens=8, batch_size=1)
    torch.manual_seed(0)
    sampled = generate_batch(model, tok, [prompt] * 4, max_new_tokens=8, batch_size=1, do_sample=True, temperature=5.0)
    assert len(set(greedy)) == 1
    assert len(set(sampled[1:])) > 1 or sampled[1] != greedy[1]  # later batches sample too


def test_evaluate_reports_base_and_adapter_per_dataset(tiny_gpt2_dir, tmp_path, capsys):
    import json

    from conftest import QA, write_jsonl

    from loratune.config import Config, DataConfig, DatasetConfig, LoraConfig, TrainConfig
    from loratune.evaluation.compare import evaluate
    from loratune.training.recipe import train

    qa = write_jsonl(tmp_path / "qa.jsonl", QA)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"line {i} of plain text"} for i in range(12)])
    fields = {"prompt": "question", "response": "answer"}
    cfg = Config(model=ModelConfig(name=str(tiny_gpt2_dir)), lora=LoraConfig(r=4, dropout=0.0),
                 data=DataConfig(datasets=[DatasetConfig(path=str(qa), format="completion", fields=fields, eval_fraction=0.25),
                                           DatasetConfig(path=str(text), format="text", eval_fraction=0.25)],
                                 cache_dir=None),
                 train=TrainConfig(batch_size=4, max_steps=3, lr=1e-2), output_dir=str(tmp_path / "run"))
    run_dir, _ = train(cfg)
    results = evaluate(run_dir, device="cpu", samples=1)
    assert results["columns"] == ["base", str(run_dir)]
    for side in results["columns"]:
        assert set(results[side]["by_group"]) == {str(qa), str(text)}
        assert "exact_match" in results[side]["by_group"][str(qa)]  # completion: generated and scored
        assert set(results[side]["by_group"][str(text)]) == {"perplexity"}  # text: no prompt to generate from
        assert len(results[side]["predictions"]) == 6
    assert results["base"]["perplexity"] != results[str(run_dir)]["perplexity"]
    assert json.loads((run_dir / "eval.json").read_text())[str(run_dir)]["perplexity"] == results[str(run_dir)]["perplexity"]
    printed = capsys.readouterr().out
    assert f"{qa} / perplexity" in printed and "lower" in printed

    # A second run of the same base, on a file, side by side.
    cfg.output_dir, cfg.train.lr = str(tmp_path / "run2"), 3e-2
    run2, _ = train(cfg)
    both = evaluate([run_dir, run2], device="cpu", samples=0, file=qa)
    assert both["columns"] == ["base", str(run_dir), str(run2)] and both["data"] == str(qa)
    assert len(both["base"]["predictions"]) == len(QA)  # every record of the file
    assert (run_dir / "eval-qa.json").is_file()


def test_sliding_window_perplexity_scores_every_token_once():
    from loratune.data.examples import IGNORE, Example
    from loratune.evaluation.compare import windows

    example = Example(list(range(100, 110)), list(range(100, 110)), {})
    parts = windows(example, max_length=4, stride=2)
    assert [w.input_ids for w in parts] == [list(range(100, 104)), list(range(102, 106)), list(range(104, 108)),
                                            list(range(106, 110))]
    scored = [t for w in parts for t, label in zip(w.input_ids[1:], w.labels[1:]) if label != IGNORE]
    assert scored == list(range(101, 110))  # each predictable token exactly once, with context before it
    assert windows(example, max_length=20, stride=5) == [example]


def test_sliding_window_eval_on_a_long_document(tiny_gpt2_dir, tmp_path):
    from conftest import write_jsonl

    from loratune.config import Config, DataConfig, DatasetConfig, LoraConfig, TrainConfig
    from loratune.evaluation.compare import evaluate
    from loratune.training.recipe import train

    data = write_jsonl(tmp_path / "t.jsonl", [{"text": f"short line {i}"} for i in range(8)])
    cfg = Config(model=ModelConfig(name=str(tiny_gpt2_dir)), lora=LoraConfig(r=4), train=TrainConfig(max_steps=1, batch_size=4),
                 data=DataConfig(datasets=[DatasetConfig(path=str(data), format="text")], cache_dir=None),
                 output_dir=str(tmp_path / "run"))
    run_dir, _ = train(cfg)
    doc = tmp_path / "doc.txt"
    doc.write_text("a long document. " * 40)  # 680 bytes: longer than the tiny model's 256 positions
    results = evaluate(run_dir, device="cpu", file=doc, file_format="text", max_length=128, stride=64, samples=0)
    assert math.isfinite(results["base"]["perplexity"]) and results["base"]["perplexity"] > 1
