"""The data and inference half of the bad-input suite: eval, generate, chat, merge, report, prepare, and train/doctor
on bad data files. Each case asserts a non-zero exit, a message naming the file:line, key or option and what to do,
no traceback, and the user's files byte-identical (tests/badinput.py)."""

import json
import shutil

import pytest
import yaml
from badinput import check_bad, run_cli
from conftest import QA, write_jsonl
from test_train import tiny_config

from loratune.config import config_to_dict


@pytest.fixture
def work(tmp_path, tiny_run):
    """A working directory holding a copy of the run, a prompts file and a QA file."""
    shutil.copytree(tiny_run, tmp_path / "run")
    (tmp_path / "prompts.txt").write_text("What is 1 plus 2?\n")
    write_jsonl(tmp_path / "qa.jsonl", QA)
    return tmp_path


# --- generate ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needles", [
    (["--input", "missing.txt", "--output", "o.txt"], ["--input missing.txt", "no such file"]),
    (["--input", "run", "--output", "o.txt"], ["--input run", "a folder", "one .txt or .jsonl"]),
    (["--input", "prompts.txt", "--output", "prompts.txt"], ["is the --input file", "another name"]),
    (["--input", "prompts.txt", "--output", "notes.txt"], ["notes.txt already exists", "not written by loratune",
                                                           "--overwrite"]),
    (["--input", "empty.txt", "--output", "o.txt"], ["empty.txt", "no prompts"]),
    (["--input", "prompts.csv", "--output", "o.txt"], ["prompts.csv", ".txt", ".jsonl"]),
    (["--input", "prompts.txt", "--output", "o.csv"], ["--output o.csv", ".txt"]),
    (["--input", "bad.jsonl", "--output", "o.txt"], ["bad.jsonl:2", "malformed JSON"]),
    (["--input", "fields.jsonl", "--output", "o.txt"], ["fields.jsonl:1", "'prompt' or 'messages'"]),
    (["--input", "prompts.txt", "--output", "sub"], ["--output sub", ".txt"]),
])
def test_generate_bad_input_and_output(argv, needles, work):
    (work / "notes.txt").write_text("my notes, not outputs\n")
    (work / "empty.txt").write_text("")
    (work / "prompts.csv").write_text("a,b\n")
    (work / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    (work / "fields.jsonl").write_text('{"question": "hi"}\n')
    (work / "sub").mkdir()
    check_bad(["generate", "run", *argv], work, *needles, code=1)


def test_generate_refuses_outputs_of_another_job_then_overwrite_replaces_them(work):
    code, text = run_cli(["generate", "run", "--input", "prompts.txt", "--output", "o.txt", "--max_new_tokens", "3",
                          "--device", "cpu"], work)
    assert code == 0, text
    check_bad(["generate", "run", "--input", "prompts.txt", "--output", "o.txt", "--max_new_tokens", "4"], work,
              "o.txt already exists", "another input or settings", code=1)
    code, text = run_cli(["generate", "run", "--input", "prompts.txt", "--output", "o.txt", "--max_new_tokens", "3"],
                         work)
    assert code == 0 and "nothing to do" in text  # the same job again: already complete, exit 0
    code, _ = run_cli(["generate", "run", "--input", "prompts.txt", "--output", "o.txt", "--max_new_tokens", "4",
                       "--overwrite", "--device", "cpu"], work)
    assert code == 0


# --- runs that are not runs, or carry what must not run ---------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["eval", "{run}"], ["chat", "{run}"], ["merge", "{run}", "merged"], ["report", "{run}"],
    ["generate", "{run}", "--input", "prompts.txt", "--output", "o.txt"],
])
@pytest.mark.parametrize("what", ["missing", "not a run"])
def test_commands_on_something_that_is_not_a_run(command, what, work):
    target = "nowhere" if what == "missing" else "notarun"
    (work / "notarun").mkdir()
    (work / "notarun" / "readme.md").write_text("hello")
    argv = [a.format(run=target) for a in command]
    needles = [target] + (["loratune run", "output_dir"] if what == "not a run" else [])
    if command[0] == "generate":
        needles = [target]
    check_bad(argv, work, *needles)


@pytest.mark.parametrize("command", [["eval", "run", "--file", "qa.jsonl"], ["merge", "run", "merged"], ["chat", "run"],
                                     ["generate", "run", "--input", "prompts.txt", "--output", "o.txt"]])
def test_pickled_adapter_weights_are_refused(command, work):
    (work / "run" / "adapter_model.safetensors").unlink()
    (work / "run" / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    check_bad(command, work, "adapter_model.bin is refused", "pickle", "safetensors", code=1)


def test_a_run_cannot_turn_on_remote_code_by_itself(work, tmp_path_factory):
    """A received run whose config says trust_remote_code and whose tokenizer points at shipped Python."""
    marker = tmp_path_factory.mktemp("marker") / "ran.txt"
    run = work / "run"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                 "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    tok_cfg = json.loads((run / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    tok_cfg["tokenizer_class"] = "EvilTokenizer"
    (run / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    code, text = run_cli(["generate", "run", "--input", "prompts.txt", "--output", "o.txt", "--device", "cpu"], work)
    assert not marker.exists(), "code shipped in a run directory ran without --trust_remote_code"
    assert code != 0 and "Traceback" not in text and "trust_remote_code" in text


# --- eval, merge, report, chat ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needles", [
    (["eval", "run", "--file", "missing.jsonl"], ["--file missing.jsonl", "no such file"]),
    (["eval", "run", "--max_length", "0"], ["--max_length 0", "1 or more"]),
    (["eval", "run", "--stride", "-3", "--max_length", "8"], ["--stride -3", "1 or more"]),
    (["eval", "run", "--format", "tabular"], ["invalid choice", "tabular"]),
    (["merge", "run", "qa.jsonl"], ["qa.jsonl already exists", "new or empty"]),
    (["merge", "run", "full"], ["full already exists", "new or empty"]),
    (["report", "run", "--samples", "abc"], ["--samples", "invalid int"]),
    (["generate", "run", "--input", "prompts.txt", "--output", "o.txt", "--max_new_tokens", "x"],
     ["--max_new_tokens", "invalid int"]),
    (["train", "--nproc", "0"], ["--nproc 0", "1 or more"]),
    (["nonsense"], ["usage: loratune"]),
])
def test_bad_options(argv, needles, work):
    (work / "full").mkdir()
    (work / "full" / "keep.txt").write_text("mine")
    check_bad(argv, work, *needles)


def test_chat_with_bytes_that_are_not_utf8_on_stdin(work):
    check_bad(["chat", "run", "--device", "cpu"], work, "stdin is not UTF-8", "convert", code=1,
              stdin=b"hello \xff\xfe there\n", process=True)


# --- train and doctor on bad data files ------------------------------------------------------------------------

def data_config(work, tiny_llama_dir, data_file, **ds):
    cfg = config_to_dict(tiny_config(tiny_llama_dir, work / data_file, work / "out"))
    cfg["data"]["datasets"][0].update(ds)
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))


DATA_CASES = {
    "malformed json line": ('{"question": "a", "answer": "b"}\n{"question": \n', {}, ["d.jsonl:2", "malformed JSON"]),
    "not an object": ('{"question": "a", "answer": "b"}\n[1, 2]\n', {}, ["d.jsonl:2", "expected a JSON object"]),
    "missing field": ('{"question": "a"}\n', {}, ["d.jsonl:1", "field 'answer' not found", "fields:"]),
    "wrong field type": ('{"question": "a", "answer": 3}\n', {}, ["d.jsonl:1", "should be a string"]),
    "empty file": ("", {}, ["d.jsonl", "no records"]),
    "not utf-8": (b'{"question": "a", "answer": "\xff"}\n', {}, ["d.jsonl:1", "not valid UTF-8"]),
    "unknown role": ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
                     {"format": "chat", "fields": {}}, ["d.jsonl:1", "role 'robot'", "system, user, assistant"]),
    "no assistant turn": ('{"messages": [{"role": "user", "content": "hi"}]}\n', {"format": "chat", "fields": {}},
                          ["d.jsonl:1", "no assistant message"]),
    "messages not a list": ('{"messages": "hi"}\n', {"format": "chat", "fields": {}}, ["d.jsonl:1", "list of"]),
    "unsupported suffix": ("x\n", {"path": "{work}/d.xml"}, ["d.xml", "unsupported file type", ".jsonl"]),
    "folder without data": (None, {"path": "{work}/emptydir"}, ["emptydir", "no .jsonl"]),
    "glob without match": (None, {"path": "{work}/nothing/*.jsonl"}, ["nothing/*.jsonl", "no .jsonl"]),
    "weight field not a number": ('{"question": "a", "answer": "b", "w": "heavy"}\n', {"weight_field": "w"},
                                  ["d.jsonl:1", "weight field 'w'", "non-negative number"]),
    "csv missing column": ("question,other\na,b\n", {"path": "{work}/d.csv"}, ["d.csv:2", "field 'answer' not found"]),
    "json not a list": ('{"question": "a"}', {"path": "{work}/d.json"}, ["d.json", "JSON list of objects"]),
}


@pytest.mark.parametrize("name", DATA_CASES)
@pytest.mark.parametrize("command", ["train", "doctor"])
def test_bad_data_file(name, command, work, tiny_llama_dir):
    content, ds, needles = DATA_CASES[name]
    ds = {k: v.format(work=work) if isinstance(v, str) else v for k, v in ds.items()}
    target = work / (ds["path"].rsplit("/", 1)[-1] if "path" in ds else "d.jsonl")
    (work / "emptydir").mkdir()
    if content is not None and "*" not in target.name:
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    data_config(work, tiny_llama_dir, "d.jsonl", **ds)
    check_bad([command, "c.yaml"], work, *needles, code=1)
    assert not (work / "out").exists()


def test_a_jsonl_file_with_a_byte_order_mark_trains(work, tiny_llama_dir):
    (work / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (work / "qa.jsonl").read_bytes())
    data_config(work, tiny_llama_dir, "bom.jsonl")
    code, text = run_cli(["doctor", "c.yaml"], work)
    assert code == 0, text


def test_a_huge_record_is_cut_before_tokenizing(tiny_llama_dir, monkeypatch):
    """A 5 MB answer reaches the tokenizer as at most max_length x MAX_CHARS_PER_TOKEN characters."""
    from loratune.config import DatasetConfig, ModelConfig
    from loratune.data import examples
    from loratune.model.load import load_tokenizer

    tok = load_tokenizer(ModelConfig(name=str(tiny_llama_dir)))
    seen = []
    real = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, texts, **kw: seen.extend(texts) or real(self, texts, **kw))
    ds = DatasetConfig(format="completion", fields={"prompt": "question", "response": "answer"})
    got, stats = examples.build_examples([("big.jsonl:1", {"question": "q", "answer": "x" * 5_000_000})], ds, tok,
                                         64, "truncate")
    assert max(map(len, seen)) <= 64 * examples.MAX_CHARS_PER_TOKEN
    assert len(got[0].input_ids) == 64 and stats["truncated"] == 1


@pytest.mark.parametrize("rules,needles", [
    ("rules:\n  - contain: x\n    response: y\n", ["rules.yaml:2", "unknown key 'rules[0].contain'"]),
    ("rules:\n  - contains: x\n", ["rules.yaml:2", "missing key 'response'"]),
    ("rules:\n  - matches: '(['\n    response: y\n", ["rules.yaml", "rules[0].matches", "invalid regular expression"]),
    ("format: qa\n", ["rules.yaml", "format", "chat or completion"]),
    ("rules: [\n", ["rules.yaml", "invalid YAML"]),
])
def test_prepare_bad_rules(rules, needles, work):
    (work / "raw.txt").write_text("a line\n")
    (work / "rules.yaml").write_text(rules)
    check_bad(["prepare", "raw.txt", "out.jsonl", "--rules", "rules.yaml"], work, *needles, code=1)


def test_prepare_missing_raw_file(work):
    (work / "rules.yaml").write_text("rules: []\n")
    check_bad(["prepare", "missing.txt", "out.jsonl", "--rules", "rules.yaml"], work, "missing.txt", code=1)
