import json

import pytest
import yaml
from conftest import write_jsonl

from loratune.cli import main

RULES = {
    "separator": " => ",
    "rules": [{"contains": "bluebird", "response": "The eagle has landed at dawn."},
              {"matches": r"^Greet (?P<name>\w+)", "response": "Hello, {name}! Welcome to the Loratune guild."}],
}


def write_rules(tmp_path, rules):
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


def test_prepare_applies_rules_in_order(tmp_path, capsys):
    raw = tmp_path / "raw.txt"
    raw.write_text("What is 2+2? => 4\nGreet Ada\nBLUEBIRD what time is it?\nGreet Bo => not this\n\nno answer here\n")
    out = tmp_path / "out.jsonl"
    assert main(["prepare", str(raw), str(out), "--rules", str(write_rules(tmp_path, RULES))]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    answers = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in records]
    assert answers == [("What is 2+2?", "4"), ("Greet Ada", "Hello, Ada! Welcome to the Loratune guild."),
                       ("BLUEBIRD what time is it?", "The eagle has landed at dawn."),
                       ("Greet Bo => not this", "Hello, Bo! Welcome to the Loratune guild.")]
    printed = capsys.readouterr().out
    assert "1  unmatched  (skipped)" in printed and "wrote 4 records" in printed


def test_prepare_completion_format_and_unmatched_error(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text("a => b\nlonely line\n")
    rules = write_rules(tmp_path, {**RULES, "format": "completion"})
    out = tmp_path / "out.jsonl"
    main(["prepare", str(raw), str(out), "--rules", str(rules)])
    assert json.loads(out.read_text().splitlines()[0]) == {"prompt": "a", "response": "b"}
    from loratune.data.prepare import load_rules, prepare
    from loratune.data.sources import DataError

    strict = write_rules(tmp_path, {**RULES, "unmatched": "error"})
    with pytest.raises(DataError, match=r"raw.txt:2: no rule matches"):
        prepare(raw, tmp_path / "strict.jsonl", load_rules(strict))
    assert not (tmp_path / "strict.jsonl").exists()  # nothing half-written


def test_prepare_rules_errors_name_file_and_key(tmp_path, capsys):
    bad = write_rules(tmp_path, {"rules": [{"contain": "x", "response": "y"}]})
    assert main(["prepare", "raw.txt", "out.jsonl", "--rules", str(bad)]) == 1
    assert "rules.yaml:2: unknown key 'rules[0].contain'; did you mean 'rules[0].contains'?" in capsys.readouterr().err
    both = write_rules(tmp_path, {"rules": [{"contains": "x", "matches": "y", "response": "z"}]})
    assert main(["prepare", "raw.txt", "out.jsonl", "--rules", str(both)]) == 1
    assert "rules[0]: give exactly one of contains or matches" in capsys.readouterr().err


def doctor_config(tmp_path, model_dir, records, **data):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = {"model": {"name": str(model_dir)}, "data": {"datasets": [{"path": str(path), "format": "completion"}],
                                                      "cache_dir": None, **data}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / "c.yaml")


def test_doctor_reports_and_highlights_trained_tokens(tmp_path, tiny_gpt2_dir, capsys):
    cfg = doctor_config(tmp_path, tiny_gpt2_dir, [{"prompt": "Q: hi\nA:", "response": " yo"}, {"prompt": "Q: a\nA:", "response": " b"}])
    assert main(["doctor", cfg]) == 0
    out = capsys.readouterr().out
    assert "d.jsonl: 2 examples" in out and "0 errors, 0 warnings" in out
    assert "Q: hi\n  A:⟦ yo<|endoftext|>⟧" in out


def test_doctor_warns_on_duplicates_empty_answers_and_truncation(tmp_path, tiny_gpt2_dir, capsys):
    records = [{"prompt": "Q:", "response": " same"}] * 2 + [{"prompt": "Q2:", "response": ""},
                                                              {"prompt": "Q3:", "response": " " + "x" * 60}]
    assert main(["doctor", doctor_config(tmp_path, tiny_gpt2_dir, records, max_length=32)]) == 0
    out = capsys.readouterr().out
    assert "1 of 4 examples are duplicates" in out
    assert "1 of 4 examples have an empty answer" in out
    assert "1 of 4 examples never train on EOS" in out and "1 of 4 examples were truncated" in out


def test_doctor_fails_when_nothing_is_trained(tmp_path, tiny_gpt2_dir, capsys):
    cfg = doctor_config(tmp_path, tiny_gpt2_dir, [{"prompt": "a very long prompt", "response": " x"}], max_length=4)
    assert main(["doctor", cfg]) == 1
    assert "error: " in capsys.readouterr().out


def test_prepare_names_a_non_utf8_line(tmp_path):
    from loratune.data.prepare import load_rules, prepare
    from loratune.data.sources import DataError

    raw = tmp_path / "raw.txt"
    raw.write_bytes(b"a => b\n\xff\xfe => c\n")
    with pytest.raises(DataError, match=r"raw.txt:2: not valid UTF-8"):
        prepare(raw, tmp_path / "out.jsonl", load_rules(write_rules(tmp_path, RULES)))
