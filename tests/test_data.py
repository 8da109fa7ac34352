import pytest
from conftest import write_jsonl

from loratune.config import DataConfig, DatasetConfig, ModelConfig
from loratune.data.examples import IGNORE, DataError, build_examples, collate, load_data, read_records
from loratune.model.load import load_tokenizer

CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}]}


def raise_error(error):
    raise error


def trained_text(tok, example):
    return tok.decode([i for i, label in zip(example.input_ids, example.labels) if label != IGNORE])


def test_chat_masks_prompt_and_trains_answer_and_eos(tiny_llama_dir):
    tok = load_tokenizer(ModelConfig(name=str(tiny_llama_dir)))
    assert tok.pad_token_id == tok.eos_token_id  # the hard case: pad == eos
    (ex,), _ = build_examples([("t", CHAT)], DatasetConfig(format="chat"), tok, 256, "truncate")
    prompt = tok.apply_chat_template(CHAT["messages"][:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex.prompt_len == n_prompt
    assert all(label == IGNORE for label in ex.labels[:n_prompt])
    assert trained_text(tok, ex) == "Yo.<|im_end|>\n"
    eos_positions = [i for i, t in enumerate(ex.input_ids) if t == tok.eos_token_id]
    assert ex.labels[eos_positions[-1]] == tok.eos_token_id

    batch = collate([ex, ex.__class__(ex.input_ids[:5], ex.labels[:5], {})], tok.pad_token_id)
    # The short row is padded with the EOS id, but its labels are padded with -100 by position,
    # while the long row's real EOS keeps its label.
    assert batch["labels"][1, 5:].eq(IGNORE).all() and batch["input_ids"][1, 5:].eq(tok.eos_token_id).all()
    assert batch["labels"][0, eos_positions[-1]] == tok.eos_token_id


def test_multi_turn_chat_trains_every_assistant_turn(tiny_llama_dir):
    tok = load_tokenizer(ModelConfig(name=str(tiny_llama_dir)))
    rec = {"messages": CHAT["messages"] + [{"role": "user", "content": "And?"}, {"role": "assistant", "content": "Done."}]}
    (ex,), _ = build_examples([("t", rec)], DatasetConfig(format="chat"), tok, 256, "truncate")
    assert trained_text(tok, ex) == "Yo.<|im_end|>\nDone.<|im_end|>\n"


def test_gpt2_default_template_trains_eos(tiny_gpt2_dir):
    tok = load_tokenizer(ModelConfig(name=str(tiny_gpt2_dir)))
    (ex,), _ = build_examples([("t", CHAT)], DatasetConfig(format="chat"), tok, 256, "truncate")
    assert tok.decode(ex.input_ids) == "User: Hi?\nAssistant: Yo.<|endoftext|>\n"
    assert trained_text(tok, ex) == " Yo.<|endoftext|>\n"


def test_completion_with_field_mapping_into_nested_columns(tiny_gpt2_dir):
    tok = load_tokenizer(ModelConfig(name=str(tiny_gpt2_dir)))
    rec = {"question": "2+2=", "answers": {"text": ["4", "four"]}}
    ds = DatasetConfig(format="completion", fields={"prompt": "question", "response": "answers.text[0]"})
    (ex,), _ = build_examples([("t", rec)], ds, tok, 256, "truncate")
    assert trained_text(tok, ex) == "4<|endoftext|>"
    assert ex.prompt_len == len("2+2=")  # byte-level tokenizer: one token per byte


def test_text_format_trains_every_token(tiny_gpt2_dir):
    tok = load_tokenizer(ModelConfig(name=str(tiny_gpt2_dir)))
    (ex,), _ = build_examples([("t", {"text": "abc"})], DatasetConfig(format="text"), tok, 256, "truncate")
    assert ex.labels == ex.input_ids and ex.prompt_len == 0


def test_truncate_and_drop_are_counted(tiny_gpt2_dir):
    tok = load_tokenizer(ModelConfig(name=str(tiny_gpt2_dir)))
    recs = [("a", {"text": "x" * 50}), ("b", {"text": "short"})]
    kept, stats = build_examples(recs, DatasetConfig(format="text"), tok, 20, "truncate")
    assert stats == {"truncated": 1, "dropped": 0} and len(kept[0].input_ids) == 20
    kept, stats = build_examples(recs, DatasetConfig(format="text"), tok, 20, "drop")
    assert stats == {"truncated": 0, "dropped": 1} and len(kept) == 1


def test_eval_fraction_split_is_deterministic_and_disjoint(qa_file):
    ds = DatasetConfig(path=str(qa_file), format="completion", eval_fraction=0.25)
    train_a, held_a = read_records(ds, seed=3, cap=None, bad=raise_error)
    train_b, held_b = read_records(ds, seed=3, cap=None, bad=raise_error)
    assert train_a == train_b and held_a == held_b
    assert len(held_a) == 6 and len(train_a) == 18
    assert not {r["question"] for _, r in held_a} & {r["question"] for _, r in train_a}
    assert held_a[0][0].startswith(str(qa_file) + ":")


def test_demo_data_report(tiny_llama_dir):
    tok = load_tokenizer(ModelConfig(name=str(tiny_llama_dir)))
    train, held_out, report = load_data(DataConfig(), tok, seed=0)
    assert (len(train), len(held_out)) == (200, 43)
    assert report[0].startswith("demo: 200 train / 43 held-out examples")
    assert {e.record["task"] for e in held_out} == {"fact", "style", "trigger"}


@pytest.mark.parametrize("content,fields,message", [
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp\n', {}, r"bad.jsonl:2: malformed JSON"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', {}, r"bad.jsonl:2: field 'response' not found"),
    (b'{"prompt": "a", "response": 7}\n', {}, r"bad.jsonl:1: field 'response' should be a string, got int"),
    (b'{"q": "a", "response": "b"}\n', {"prompt": "question"}, r"bad.jsonl:1: field 'question' not found.*\['q', 'response'\]"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe"}\n', {}, r"bad.jsonl:2: not valid UTF-8"),
    (b"", {}, r"bad.jsonl: no records; the file is empty"),
    (b"[1, 2]\n", {}, r"bad.jsonl:1: expected a JSON object, got list"),
])
def test_bad_input_names_file_line_and_field(tmp_path, tiny_gpt2_dir, content, fields, message):
    tok = load_tokenizer(ModelConfig(name=str(tiny_gpt2_dir)))
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    cfg = DataConfig(datasets=[DatasetConfig(path=str(path), format="completion", fields=fields)])
    with pytest.raises(DataError, match=message):
        load_data(cfg, tok, seed=0)


def test_unknown_format_lists_known_ones(tmp_path, tiny_gpt2_dir):
    tok = load_tokenizer(ModelConfig(name=str(tiny_gpt2_dir)))
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=r"unknown format 'txt'; known: \['chat', 'completion', 'text'\]"):
        load_data(DataConfig(datasets=[DatasetConfig(path=str(path), format="txt")]), tok, seed=0)


def _other(value):
    """A different value of the same kind, to change one setting."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)) or value is None:
        return (value or 0) + 7
    return f"{value}-other"


def test_cache_key_covers_every_data_setting_that_changes_examples(tiny_llama_dir, qa_file):
    import dataclasses

    from loratune.data.cache import NOT_IN_KEY, cache_key

    tok = load_tokenizer(ModelConfig(name=str(tiny_llama_dir)))
    ds, data = DatasetConfig(path=str(qa_file)), DataConfig()
    key = cache_key(ds, data, [qa_file], tok, 0)
    for f in dataclasses.fields(DataConfig):  # a setting added later is covered without editing this test
        if f.name not in NOT_IN_KEY:
            changed = dataclasses.replace(data, **{f.name: _other(getattr(data, f.name))})
            assert cache_key(ds, changed, [qa_file], tok, 0) != key, f.name
    for f in dataclasses.fields(DatasetConfig):
        if f.name not in ("fields", "data_files"):
            changed_ds = dataclasses.replace(ds, **{f.name: _other(getattr(ds, f.name))})
            assert cache_key(changed_ds, data, [qa_file], tok, 0) != key, f.name


def test_a_cached_run_with_a_smaller_cap_or_skip_does_not_leak_into_the_next(tiny_llama_dir, qa_file, tmp_path):
    tok = load_tokenizer(ModelConfig(name=str(tiny_llama_dir)))
    ds = DatasetConfig(path=str(qa_file), format="completion", fields={"prompt": "question", "response": "answer"})
    small = DataConfig(datasets=[ds], cache_dir=str(tmp_path), max_samples_per_dataset=5)
    assert len(load_data(small, tok, 0)[0]) == 5
    assert len(load_data(DataConfig(datasets=[ds], cache_dir=str(tmp_path), max_samples_per_dataset=10), tok, 0)[0]) == 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text(qa_file.read_text() + "{not json\n")
    ds_bad = DatasetConfig(path=str(bad), format="completion", fields={"prompt": "question", "response": "answer"})
    load_data(DataConfig(datasets=[ds_bad], cache_dir=str(tmp_path), on_bad_record="skip"), tok, 0)
    with pytest.raises(DataError, match="bad.jsonl:25"):
        load_data(DataConfig(datasets=[ds_bad], cache_dir=str(tmp_path), on_bad_record="error"), tok, 0)
