"""Each preset, fed a small local fixture in that dataset's own column layout through the datasets code path."""

import pytest
from conftest import write_jsonl

from loratune.config import DataConfig, DatasetConfig, ModelConfig
from loratune.data.examples import IGNORE, DataError, load_data, resolve_preset
from loratune.data.presets import PRESETS
from loratune.model.load import load_tokenizer

FIXTURES = {  # preset: (row in the hub dataset's columns, text that must be trained, text that must be in the prompt)
    "wikitext-103": ({"text": " = Valkyria Chronicles III = \n"}, "Valkyria Chronicles III", None),
    "tinystories": ({"text": "Once upon a time, a cat sat."}, "Once upon a time", None),
    "ag_news": ({"text": "Stocks rallied on Friday.", "label": 2}, " Business", "Stocks rallied"),
    "yelp_review_full": ({"text": "Great tacos!", "label": 4}, " 5 stars", "Great tacos"),
    "imdb": ({"text": "A dull film.", "label": 0}, " negative", "A dull film"),
    "cnn_dailymail": ({"article": "The mayor opened a bridge.", "highlights": "Bridge opened.", "id": "x"},
                      " Bridge opened.", "The mayor opened"),
    "xsum": ({"document": "Rain fell all week in Leeds.", "summary": "Leeds had a wet week.", "id": "1"},
             " Leeds had a wet week.", "Rain fell"),
    "squad": ({"id": "1", "title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
               "answers": {"text": ["France"], "answer_start": [9]}}, " France", "Question: Where is Paris?"),
    "common_gen": ({"concept_set_idx": 0, "concepts": ["dog", "frisbee", "catch"], "target": "A dog catches a frisbee."},
                   " A dog catches a frisbee.", "dog, frisbee, catch"),
    "bool_q": ({"question": "is the sky blue", "answer": True, "passage": "The sky is blue."}, " yes", "is the sky blue?"),
    "e2e_nlg": ({"meaning_representation": "name[The Eagle], food[French]", "human_reference": "The Eagle serves French food."},
                " The Eagle serves French food.", "name[The Eagle]"),
}


def test_every_preset_has_a_fixture():
    assert set(FIXTURES) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_preset_reads_its_column_layout(name, tmp_path, tiny_gpt2_dir):
    row, trained, in_prompt = FIXTURES[name]
    tok = load_tokenizer(ModelConfig(name=str(tiny_gpt2_dir)))
    data = write_jsonl(tmp_path / f"{name}.jsonl", [row, row])
    cfg = DataConfig(datasets=[DatasetConfig(preset=name, hub="json", data_files=[str(data)], eval_fraction=0.5)])
    train, held_out, report = load_data(cfg, tok, seed=0)
    assert len(train) == 1 and len(held_out) == 1 and report[0].startswith(f"{name}: 1 train / 1 held-out")
    example = train[0]
    trained_text = tok.decode([i for i, label in zip(example.input_ids, example.labels) if label != IGNORE])
    assert trained in trained_text and trained_text.endswith("<|endoftext|>")
    if in_prompt:
        assert in_prompt in tok.decode(example.input_ids[: example.prompt_len])
    assert held_out[0].record["dataset"] == name


def test_preset_fills_hub_and_splits_but_explicit_keys_win():
    ds, build = resolve_preset(DatasetConfig(preset="squad"))
    assert (ds.hub, ds.split, ds.eval_split, ds.format) == ("rajpurkar/squad", "train", "validation", "completion")
    ds, _ = resolve_preset(DatasetConfig(preset="wikitext-103", split="train[:1000]"))
    assert (ds.hub, ds.subset, ds.split, ds.format) == ("Salesforce/wikitext", "wikitext-103-raw-v1", "train[:1000]", "text")
    with pytest.raises(DataError, match="unknown preset 'sqaud'; known: .*squad"):
        resolve_preset(DatasetConfig(preset="sqaud"))


def test_preset_on_a_row_of_the_wrong_layout_names_row_and_columns(tmp_path, tiny_gpt2_dir):
    tok = load_tokenizer(ModelConfig(name=str(tiny_gpt2_dir)))
    data = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    cfg = DataConfig(datasets=[DatasetConfig(preset="squad", hub="json", data_files=[str(data)])])
    with pytest.raises(DataError, match=r"json\[train\] row 0: preset 'squad' could not read this row.*\['question'\]"):
        load_data(cfg, tok, seed=0)


def test_per_example_weights_oversample_rare_examples(tmp_path, tiny_gpt2_dir):
    tok = load_tokenizer(ModelConfig(name=str(tiny_gpt2_dir)))
    rows = [{"text": "common", "w": 1}] * 9 + [{"text": "rare", "w": 9}] + [{"text": "never", "w": 0}]
    data = write_jsonl(tmp_path / "w.jsonl", rows)
    cfg = DataConfig(datasets=[DatasetConfig(path=str(data), format="text", weight_field="w", weight=20)])
    train, _, _ = load_data(cfg, tok, seed=0)
    texts = [tok.decode(e.input_ids, skip_special_tokens=True) for e in train]
    assert len(texts) == 220 and "never" not in texts
    assert 70 < texts.count("rare") < 150  # expected 110: half the weight mass
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "w": "heavy"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: weight field 'w' should be a non-negative number, got 'heavy'"):
        load_data(DataConfig(datasets=[DatasetConfig(path=str(bad), format="text", weight_field="w")]), tok, seed=0)
