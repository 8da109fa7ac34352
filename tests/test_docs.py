from pathlib import Path

from loratune.cli import config_reference

ROOT = Path(__file__).parents[1]


def test_readme_config_reference_matches_the_dataclasses():
    assert "\n".join(config_reference()) in (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme.split("---")[0]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
