"""The package's layout rules (README, "How the code is laid out"): no import cycles, every module imports on its
own, and `import loratune` (what `loratune --help` needs) loads no torch, transformers or peft."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import loratune

PACKAGE = Path(loratune.__file__).parent


def module_names() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="loratune.") if m.name != "loratune.__main__")


def internal_imports(name: str) -> set[str]:
    """The loratune modules `name` imports, anywhere in its source (function-level imports count too)."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("loratune"):
                candidates = [f"{base}.{a.name}" for a in node.names] + [base]
                found.update(c for c in candidates if c in MODULES)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
    found.discard(name)
    return found


MODULES = set(module_names())


def test_no_import_cycles():
    graph = {m: internal_imports(m) - {"loratune"} for m in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_cycle_check_catches_a_cycle(monkeypatch):
    """The check above can fail: a made-up cycle between two modules is reported."""
    fake = {"loratune.a": {"loratune.b"}, "loratune.b": {"loratune.a"}}
    monkeypatch.setattr(sys.modules[__name__], "internal_imports", lambda m: fake[m])
    monkeypatch.setattr(sys.modules[__name__], "MODULES", set(fake))
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "loratune.a -> loratune.b -> loratune.a" in str(e)
    else:
        raise AssertionError("the cycle was not found")


def test_every_module_imports_on_its_own():
    """Each module imported with no other loratune module loaded (third-party libraries stay loaded, to keep this
    fast): an import that works only after another loratune module was imported, or a cycle, fails here."""
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    for loaded in [m for m in sys.modules if m == 'loratune' or m.startswith('loratune.')]:\n"
            "        del sys.modules[loaded]\n"
            "    importlib.import_module(name)\n")
    proc = subprocess.run([sys.executable, "-c", code, *sorted(MODULES)], capture_output=True, text=True,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_import_loratune_is_light():
    code = ("import sys, loratune, loratune.cli\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
            "print(','.join(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"import loratune loaded {proc.stdout.strip()}"


def test_public_api_names_resolve():
    for name in ("Config", "load_config", "train", "evaluate", "load", "generate"):
        assert callable(getattr(loratune, name))
    assert importlib.import_module("loratune.training.recipe").train is loratune.train


# Who may import whom (README, "How the code is laid out"): each stage imports only the stages below it.
SHARED = {"loratune", "loratune.config", "loratune.checks", "loratune.files", "loratune.device", "loratune.runs",
          "loratune.curves", "loratune.hub", "loratune.timing",
          "loratune.card", "loratune.logs", "loratune.yaml_file"}
ALLOWED = {
    "data": set(),
    "model": {"data"},
    "inference": {"data", "model"},
    "evaluation": {"data", "model", "inference"},
    "training": {"data", "model", "inference", "evaluation"},
    "plan": {"data", "model", "inference", "evaluation", "training"},
    "export": {"data", "model", "inference"},
    "serve": {"data", "model", "inference"},
}
EXCEPTIONS = {("loratune.data.doctor", "model")}  # the doctor command loads the tokenizer it checks the data with


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def test_stages_import_only_the_stages_below():
    wrong = []
    for m in sorted(MODULES):
        stage = stage_of(m)
        for dep in internal_imports(m):
            dep_stage = stage_of(dep)
            if dep in SHARED or dep_stage is None and m not in SHARED:
                continue
            if stage is None:  # a shared helper may import only config and other helpers
                if dep not in SHARED and m not in ("loratune.cli", "loratune.cli_tools"):
                    wrong.append(f"{m} -> {dep}")
                continue
            if dep_stage != stage and dep_stage not in ALLOWED[stage] and (m, dep_stage) not in EXCEPTIONS:
                wrong.append(f"{m} -> {dep}")
    assert not wrong, "imports against the layering: " + ", ".join(wrong)
