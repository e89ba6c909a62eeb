"""The README's set-up commands and CI agree."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python -m pytest tests -q -n auto"
    assert f"The test command is `{command}`" in readme
    assert f"&& {command}\n" in readme
    assert f"\n{command}\n" in ci
