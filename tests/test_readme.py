"""The README's Python snippets run as written (each in a fresh interpreter), and its two set-up
commands are the ones CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index: int) -> None:
    res = subprocess.run([sys.executable, "-c", SNIPPETS[index]], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"snippet {index} failed:\n{SNIPPETS[index]}\n{res.stderr[-3000:]}"


def test_two_setup_commands_and_ci_runs_the_test_one() -> None:
    setup = README.split("## Set up and run", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in setup.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: .*\n(\t.*\n)*\t.*autoglm-rt demo", makefile, flags=re.M)
