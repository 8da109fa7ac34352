"""Every local source kind, the `datasets` code path (with local files), mixing, caps and skipping bad records."""

import json

import pytest
from conftest import write_jsonl

from loratune.config import DataConfig, DatasetConfig, ModelConfig
from loratune.data.examples import DataError, load_data
from loratune.model.load import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_gpt2_dir):
    return load_tokenizer(ModelConfig(name=str(tiny_gpt2_dir)))


def texts(examples, tok):
    return sorted(tok.decode(e.input_ids, skip_special_tokens=True) for e in examples)


def load(tok, **ds):
    cfg = DataConfig(datasets=[DatasetConfig(**ds)], max_samples_per_dataset=None)
    return load_data(cfg, tok, seed=0)


def test_txt_lines_and_document(tmp_path, tok):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    train, _, _ = load(tok, path=str(tmp_path / "a.txt"), format="text")
    assert texts(train, tok) == ["first line", "second line"]
    train, _, _ = load(tok, path=str(tmp_path / "a.txt"), format="text", text_mode="document")
    assert texts(train, tok) == ["first line\n\nsecond line\n"]


def test_csv_tsv_json_and_parquet_read_the_same_records(tmp_path, tok):
    import pyarrow
    import pyarrow.parquet

    rows = [{"question": "2+2=", "answer": "4"}, {"question": "1+1=", "answer": "2"}]
    (tmp_path / "d.csv").write_text("question,answer\n2+2=,4\n1+1=,2\n")
    (tmp_path / "d.tsv").write_text("question\tanswer\n2+2=\t4\n1+1=\t2\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")
    fields = {"prompt": "question", "response": "answer"}
    for name in ("d.csv", "d.tsv", "d.json", "d.parquet"):
        train, _, _ = load(tok, path=str(tmp_path / name), format="completion", fields=fields)
        assert texts(train, tok) == ["1+1=2", "2+2=4"], name


def test_directory_and_glob(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "from a"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "from b"}])
    (tmp_path / "notes.md").write_text("ignored")
    for path in (str(tmp_path), str(tmp_path / "*.jsonl")):
        train, _, _ = load(tok, path=path, format="text")
        assert texts(train, tok) == ["from a", "from b"]
    with pytest.raises(DataError, match="no .jsonl/.json/.csv/.tsv/.txt/.parquet files found"):
        load(tok, path=str(tmp_path / "*.nothing"), format="text")


def test_csv_missing_column_names_line(tmp_path, tok):
    (tmp_path / "d.csv").write_text("question,answer\n2+2=,4\n1+1=\n")
    with pytest.raises(DataError, match=r"d.csv:3: field 'answer' should be a string, got NoneType"):
        load(tok, path=str(tmp_path / "d.csv"), format="completion", fields={"prompt": "question", "response": "answer"})


def test_datasets_library_path_with_a_local_json_file(qa_file, tok):
    """The same code path that loads hub datasets by name (`hub: squad`), fed a local file through the json builder."""
    train, held_out, report = load(tok, hub="json", data_files=[str(qa_file)], split="train", eval_fraction=0.25,
                                   format="completion", fields={"prompt": "question", "response": "answer"})
    assert (len(train), len(held_out)) == (18, 6)
    assert report[0].startswith("json: 18 train / 6 held-out")


def test_unreachable_hub_dataset_is_a_clear_error(tok, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hub='no-such-user/no-such-dataset'.*could not load.*local file"):
        load(tok, hub="no-such-user/no-such-dataset", format="text")


def test_weights_caps_and_report(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    cfg = DataConfig(datasets=[DatasetConfig(path=str(a), format="text", weight=2.5),
                               DatasetConfig(path=str(b), format="text", weight=0.5, max_samples=6)],
                     max_samples_per_dataset=8)
    train, _, report = load_data(cfg, tok, seed=0)
    names = [tok.decode(e.input_ids, skip_special_tokens=True)[0] for e in train]
    assert names.count("a") == 20 and names.count("b") == 3  # 2.5 x cap 8, 0.5 x its own cap 6
    assert "weight 2.5 -> 20 in the mix" in report[0] and "weight 0.5 -> 3 in the mix" in report[1]
    again, _, _ = load_data(cfg, tok, seed=0)
    assert [e.input_ids for e in again] == [e.input_ids for e in train]  # deterministic under the seed
    other, _, _ = load_data(cfg, tok, seed=1)
    assert sorted(map(tuple, (e.input_ids for e in other))) != sorted(map(tuple, (e.input_ids for e in train)))


def test_skip_bad_records_counts_them(tmp_path, tok):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp\n{"prompt": 1, "response": "x"}\n'
                     b'{"prompt": "\xff"}\n{"prompt": "c", "response": "d"}\n')
    cfg = DataConfig(datasets=[DatasetConfig(path=str(path), format="completion")], on_bad_record="skip")
    train, _, report = load_data(cfg, tok, seed=0)
    assert len(train) == 2
    assert "skipped 3 bad records" in report[0] and "mixed.jsonl:2: malformed JSON" in report[1]


def test_tokenized_cache_hits_on_second_run_and_misses_when_a_file_changes(tmp_path, tok, monkeypatch):
    import loratune.data.examples

    data = write_jsonl(tmp_path / "a.jsonl", [{"text": f"row {i}"} for i in range(5)])
    cfg = DataConfig(datasets=[DatasetConfig(path=str(data), format="text", eval_fraction=0.2)],
                     cache_dir=str(tmp_path / "cache"))
    first, held_first, report = load_data(cfg, tok, seed=0)
    assert "(tokenized cache)" not in report[0] and len(list((tmp_path / "cache").glob("*.json"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although nothing changed")

    monkeypatch.setattr(loratune.data.examples, "build_examples", no_tokenizing)
    second, held_second, report = load_data(cfg, tok, seed=0)
    assert "(tokenized cache)" in report[0]
    assert [(e.input_ids, e.labels, e.record) for e in second] == [(e.input_ids, e.labels, e.record) for e in first]
    assert [e.input_ids for e in held_second] == [e.input_ids for e in held_first]

    monkeypatch.undo()
    write_jsonl(data, [{"text": f"changed {i}"} for i in range(5)])
    changed, _, report = load_data(cfg, tok, seed=0)
    assert "(tokenized cache)" not in report[0]
    assert all(tok.decode(e.input_ids, skip_special_tokens=True).startswith("changed") for e in changed)
    cfg.max_length = 4  # another max_length is another key, not a stale hit
    short, _, _ = load_data(cfg, tok, seed=0)
    assert all(len(e.input_ids) <= 4 for e in short)


def test_streaming_through_the_datasets_code_path(qa_file, tok):
    train, held_out, _ = load(tok, hub="json", data_files=[str(qa_file)], streaming=True, max_samples=5,
                              format="completion", fields={"prompt": "question", "response": "answer"})
    assert len(train) == 5 and held_out == []
