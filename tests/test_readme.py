"""The README's Python examples run as written, so the documentation cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert python_blocks()


def test_readme_python_examples_run():
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})


def test_readme_quickstart_is_two_commands_that_exist():
    text = README.read_text()
    quick = text.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    for cmd in commands:
        assert (README.parent / cmd.split()[1]).is_file()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci
