"""Strategy files are untrusted input: alias bombs, recursive anchors, deep nesting, odd tags and
values no actuator can carry out all end in a ConfigError naming file and line, fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm_rt.cli import main
from autoglm_rt.constants import UNLIMITED_BYTES
from autoglm_rt.policy import ConfigError, Strategy
from autoglm_rt.policy.strategy_values import MAX_CPU_THREADS, MAX_REPLICA_STEP
from autoglm_rt.untrusted_yaml import MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_NODES

HEAD = "strategy:\n  name: s\n  actions: [{trim_pool: true}]\n"


def alias_bomb(levels: int, fan_out: int = 9) -> str:
    """Each level's ``any:`` group lists the previous level ``fan_out`` times through an alias:
    a few hundred bytes that expand into fan_out**levels conditions."""
    text = HEAD + "  trigger:\n    any:\n      - &g0 {gpu_utilization: '>80%'}\n"
    for i in range(1, levels + 1):
        text += f"      - &g{i} {{any: [" + ", ".join([f"*g{i - 1}"] * fan_out) + "]}\n"
    return text


def test_an_alias_bomb_is_refused_without_expanding_it() -> None:
    text = alias_bomb(7)  # 9**7 = 4.8M conditions once expanded
    assert len(text) < 1000
    with pytest.raises(ConfigError, match=f"expands to more than {MAX_NODES} values") as info:
        Strategy.from_yaml(text)
    assert info.value.line is not None and 5 <= info.value.line <= 13


def test_a_few_aliases_that_expand_to_little_are_fine() -> None:
    strategy = Strategy.from_yaml(alias_bomb(2, fan_out=3))  # 13 conditions in all
    groups = strategy.rules[0].trigger.any_of
    assert len(groups) == 3 and len(groups[2].any_of) == 3 and len(groups[2].any_of[0].any_of) == 3


def test_a_recursive_anchor_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "rec.yaml"
    path.write_text("strategy: &s\n  name: r\n  trigger: {any: [*s]}\n  actions: [{trim_pool: true}]\n")
    with pytest.raises(ConfigError, match="a cycle") as info:
        Strategy.from_yaml(path)
    assert str(info.value).startswith(f"{path}:1: ")


def test_an_anchor_without_alias_is_harmless() -> None:
    strategy = Strategy.from_yaml(HEAD + "  trigger: &t {gpu_utilization: '>80%'}\n")
    assert strategy.rules[0].trigger.conditions[0].threshold == pytest.approx(0.8)


def test_deep_nesting_through_aliases_is_refused() -> None:
    text = HEAD + "  trigger: {gpu_utilization: '>80%'}\n  description:\n    - &d0 []\n"
    for i in range(1, 2 * MAX_DEPTH):
        text += f"    - &d{i} [*d{i - 1}]\n"
    with pytest.raises(ConfigError, match=f"nested more than {MAX_DEPTH} levels deep"):
        Strategy.from_yaml(text)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5000])
def test_deep_nesting_is_refused_with_a_line(depth: int) -> None:
    text = HEAD + "  trigger: {gpu_utilization: '>80%'}\n  description: " + "[" * depth + "]" * depth + "\n"
    with pytest.raises(ConfigError, match=f"nested more than {MAX_DEPTH} levels") as info:
        Strategy.from_yaml(text)
    assert info.value.line == 5


def test_a_huge_document_is_refused_before_parsing() -> None:
    text = HEAD + "  trigger: {gpu_utilization: '>80%'}\n" + "# padding\n" * (MAX_DOCUMENT_BYTES // 10 + 1)
    with pytest.raises(ConfigError, match="at most"):
        Strategy.from_yaml(text)


@pytest.mark.parametrize(
    "value",
    [
        "!!python/object:os.system x",
        "!!python/name:os.system ''",
        "!!binary 'not base64 ***'",
        "!!timestamp not-a-date",
        "!!int twelve",
        "!!float x",
        "!!bool maybe",
        "!!str [1]",
        "!!seq x",
        "!!omap x",
        "!!pairs x",
        "!!set x",
        "!!unknown x",
    ],
)
def test_bad_tags_end_in_config_error_with_a_line(value: str) -> None:
    text = "strategy:\n  name: " + value + "\n  trigger: {gpu_utilization: '>80%'}\n  actions: [{trim_pool: true}]\n"
    with pytest.raises(ConfigError) as info:
        Strategy.from_yaml(text)
    assert info.value.line == 2


@pytest.mark.parametrize(
    ("action", "words"),
    [
        ("adjust_gpu_memory_limit: '99999999999999999999Ti'", "below"),
        (f"adjust_gpu_memory_limit: {UNLIMITED_BYTES}", "below"),
        (f"adjust_gpu_memory_limit: '{UNLIMITED_BYTES >> 40}Ti'", "below"),
        (f"adjust_cpu_threads: {MAX_CPU_THREADS + 1}", f"1..{MAX_CPU_THREADS}"),
        ("adjust_cpu_threads: 99999999999", f"1..{MAX_CPU_THREADS}"),
        (f"scale_up_replicas: {MAX_REPLICA_STEP + 1}", f"1..{MAX_REPLICA_STEP}"),
        ("scale_down_replicas: 0", f"1..{MAX_REPLICA_STEP}"),
    ],
)
def test_action_values_outside_what_the_actuators_accept_are_refused(action: str, words: str) -> None:
    text = f"strategy:\n  name: s\n  trigger: {{gpu_utilization: '>80%'}}\n  actions:\n    - {action}\n"
    with pytest.raises(ConfigError, match=words) as info:
        Strategy.from_yaml(text)
    assert info.value.line == 5


def test_the_largest_accepted_values_load() -> None:
    text = (
        "strategy:\n  name: s\n  trigger: {gpu_utilization: '>80%'}\n  actions:\n"
        f"    - adjust_gpu_memory_limit: {UNLIMITED_BYTES - 1}\n"
        f"    - adjust_cpu_threads: {MAX_CPU_THREADS}\n"
        f"    - scale_up_replicas: {MAX_REPLICA_STEP}\n"
    )
    values = [a.value for a in Strategy.from_yaml(text).rules[0].actions]
    assert values == [UNLIMITED_BYTES - 1, MAX_CPU_THREADS, MAX_REPLICA_STEP]


def test_strategy_check_on_the_cli_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(7))
    assert main(["strategy", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"autoglm-rt: error: {path}:")
    assert "expands to more than" in err
