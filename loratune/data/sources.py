"""Sources: where raw records come from. Every record travels with its location ("file.csv:12"),
so a bad one can be reported by file, line and field."""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path
from typing import Callable, Iterator

from .. import hub
from ..config import DatasetConfig

Located = tuple[str, dict]  # (where it came from, the record)
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")
BUILDERS = ("json", "csv", "parquet", "text")  # `datasets` builders that read local data_files


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


def raise_error(error: DataError) -> None:
    """The `bad` callback for callers that stop at the first bad record."""
    raise error


def local_files(pattern: str) -> list[Path]:
    """A file, a directory (its files with known suffixes), or a glob, in sorted order."""
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
    elif any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).suffix in SUFFIXES)
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise DataError(f"dataset path {pattern}: no {'/'.join(SUFFIXES)} files found there")
    return files


def read_file(path: Path, text_mode: str, bad: Callable[[DataError], None]) -> Iterator[Located]:
    """Records of one file. Line-based files (.jsonl, .txt lines) hand a bad line to `bad`, which raises or counts it."""
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    if path.suffix == ".parquet":
        import pyarrow.parquet

        for i, row in enumerate(pyarrow.parquet.read_table(path).to_pylist()):
            yield f"{path} row {i}", row
        return
    if path.suffix == ".jsonl" or (path.suffix == ".txt" and text_mode == "lines"):
        for lineno, line in decoded_lines(path, bad):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", _json_object(line, f"{path}:{lineno}") if path.suffix == ".jsonl" else {"text": line}
            except DataError as e:
                bad(e)
        return
    text = _read_utf8(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a JSON list of objects")
        yield from ((f"{path} record {i}", r) for i, r in enumerate(data))
    elif path.suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ",")
        for row in reader:
            yield f"{path}:{reader.line_num}", row
    else:  # .txt, text_mode: document
        yield str(path), {"text": text}


def decoded_lines(path: Path, bad: Callable[[DataError], None]) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line; a line that is not UTF-8 goes to `bad`, which raises or counts it."""
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:  # a byte-order mark (Windows editors write one) starts the first line; it is not part of the text
            yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            bad(DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line); re-save the file as UTF-8"))


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None


def _json_object(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON: {e.msg}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def read_hub(ds: DatasetConfig, split: str, limit: int | None) -> Iterator[Located]:
    """A dataset through `datasets.load_dataset`: a hub name, or a builder (json, csv, parquet) with data_files."""
    import datasets

    if ds.hub not in BUILDERS and not hub.offline_mode() and (problem := hub.unreachable()) is not None:
        raise DataError(f"dataset hub={ds.hub!r}: the Hugging Face hub can't be reached from here ({problem}). Use a "
                        "local file as path (or a preset with hub: json and data_files), or HF_DATASETS_OFFLINE=1 for "
                        "datasets already in your cache")
    try:
        loaded = datasets.load_dataset(ds.hub, ds.subset, split=split, streaming=ds.streaming,
                                       data_files=ds.data_files or None)
    except Exception as e:  # datasets raises many types; all mean "could not load this"
        raise DataError(f"dataset hub={ds.hub!r} subset={ds.subset!r} split={split!r}: could not load "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Offline? Use a local file as path, "
                        "or HF_DATASETS_OFFLINE=1 for datasets already in your cache") from None
    for i, row in enumerate(loaded):
        if limit is not None and i >= limit:
            break
        yield f"{ds.hub}[{split}] row {i}", row
