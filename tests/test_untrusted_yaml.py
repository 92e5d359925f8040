"""autoglm_rt.untrusted_yaml against hostile documents, and the jobs file loader that uses it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from autoglm_rt.jobqueue import QueueSpecError, load_queue_spec
from autoglm_rt.untrusted_yaml import MAX_DEPTH, MAX_NODES, UntrustedYAMLError, load_untrusted


def alias_bomb(levels: int) -> str:
    """Each level is a list of ten aliases to the level below: 10**levels values once expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_small_documents_load_like_safe_load() -> None:
    text = "base: &b {slots: 2}\njobs: [{name: a, command: [sleep, '1']}]\nother: *b\n"
    assert load_untrusted(text) == yaml.safe_load(text)
    assert load_untrusted("") is None


def test_an_alias_bomb_is_refused_quickly() -> None:
    start = time.perf_counter()
    with pytest.raises(UntrustedYAMLError, match=f"more than {MAX_NODES} values"):
        load_untrusted(alias_bomb(9))
    assert time.perf_counter() - start < 5  # the bound is checked on the graph, not by expanding it


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: &x [*x]\n", "cycle|undefined|found undefined alias"),
        ("[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n", "nested"),
        ("a: !!python/object:os.system ls\n", "invalid YAML"),
        ("a: [1, 2\n", "invalid YAML"),
    ],
)
def test_hostile_documents_name_their_problem(text: str, match: str) -> None:
    with pytest.raises(UntrustedYAMLError, match=match):
        load_untrusted(text)


def test_the_jobs_file_loader_refuses_an_alias_bomb_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text(alias_bomb(9))
    with pytest.raises(QueueSpecError, match=rf"{path}:\d+: not a valid queue file: expands to more than"):
        load_queue_spec(path)
