"""The harness of the bad-input suite: run a loratune command on a user mistake and check that it fails the way a
user can act on. Each case asserts the exit code, that the message names what is wrong (file and line, or the config
key) and says what to do, that no traceback reached the user, and that every file that existed before is
byte-identical after (nothing of the user's lost, nothing half-written)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

from loratune.cli import main


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], cwd: Path, stdin: str | bytes = "") -> tuple[int, str]:
    """`loratune ARGV` in this process (a new process per case would cost seconds of imports each): the exit code
    and everything printed. An exception that escapes main() is what a user would see as a traceback."""
    out = io.StringIO()
    raw = stdin.encode() if isinstance(stdin, str) else stdin
    fake_stdin = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")
    old_cwd, old_stdin = os.getcwd(), sys.stdin
    os.chdir(cwd)
    sys.stdin = fake_stdin
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's own usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old_cwd)
        sys.stdin = old_stdin
    return code, out.getvalue()


def run_cli_process(argv: list[str], cwd: Path, stdin: bytes = b"", timeout: float = 300) -> tuple[int, str]:
    """The same as a separate process, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "loratune", *argv], cwd=cwd, input=stdin, capture_output=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def check_bad(argv: list[str], cwd: Path, *needles: str, code: int | None = None, stdin: str | bytes = "",
              process: bool = False) -> str:
    """Run a bad command and check the four promises; return the output for further asserts.
    `needles`: text the message must contain (case-insensitive), e.g. the key, the file:line, the fix."""
    before = snapshot(cwd)
    if process:
        got, text = run_cli_process(argv, cwd, stdin if isinstance(stdin, bytes) else stdin.encode())
    else:
        got, text = run_cli(argv, cwd, stdin)
    assert got != 0, f"exit 0 on bad input {argv}:\n{text}"
    if code is not None:
        assert got == code, f"exit {got}, expected {code}:\n{text}"
    assert "Traceback" not in text, f"traceback shown for {argv}:\n{text}"
    for needle in needles:
        assert needle.lower() in text.lower(), f"message lacks {needle!r} for {argv}:\n{text}"
    after = snapshot(cwd)
    changed = [p for p in before if after.get(p) != before[p]]
    assert not changed, f"{argv} changed or removed the user's files {changed}:\n{text}"
    return text
