"""README's promises to a newcomer stay true: CI runs exactly the test command README gives."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _fenced_commands(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    command = next(c for c in _fenced_commands(readme) if "pytest" in c)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_readme_demo_command_names_a_module_that_exists():
    readme = (ROOT / "README.md").read_text()
    command = next(c for c in _fenced_commands(readme) if "examples.demo" in c)
    module = command.split("python -m ", 2)[-1].split()[0]
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
