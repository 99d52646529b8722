"""The README documents every setting, and CI runs exactly the README's test command."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

import config

README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme_table():
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", README, flags=re.M))
    assert documented == {s.name for s in config.SETTINGS}


def test_settings_have_help_and_env_override(monkeypatch):
    monkeypatch.delenv("NTM_DNS_SERVER", raising=False)  # conftest's loopback resolver for tests, not a default
    for s in config.SETTINGS:
        assert s.help.strip()
        assert config.get(s.name) == s.default
    monkeypatch.setenv("NTM_BUFFER_SIZE", "1234")
    monkeypatch.setenv("NTM_EXCLUDE_OWN_TRAFFIC", "false")
    assert config.get("BUFFER_SIZE") == 1234 and config.get("EXCLUDE_OWN_TRAFFIC") is False


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```\n(.*?)\n```", README, flags=re.S)
    assert "./test.sh" in blocks and "./run.sh" in blocks
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "./test.sh" in [line.strip() for line in ci]


NAMED_TEST = re.compile(r"`(tests/test_\w+\.py)::(\w+)`")


def defined_tests(path) -> set[str]:
    """Names of the test functions defined in a test file, read from its syntax tree."""
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")}


def test_every_test_the_readme_names_exists():
    named = NAMED_TEST.findall(README)
    assert len(named) >= 20  # the Reliability section names its tests this way
    missing = [f"{f}::{name}" for f, name in named
               if not (ROOT / f).is_file() or name not in defined_tests(ROOT / f)]
    assert not missing, f"the README names tests that do not exist: {missing}"
    scripts = re.findall(r"`((?:benchmarks|fuzz|scripts)/[\w./-]+\.(?:py|sh))`", README)
    assert scripts and not [s for s in scripts if not (ROOT / s).is_file()]


def test_every_promise_names_its_test():
    section = README.split("## Reliability & security", 1)[1].split("### Not promised yet", 1)[0]
    promises = re.split(r"^- ", section, flags=re.M)[1:]
    assert len(promises) >= 10
    for promise in promises:
        assert NAMED_TEST.search(promise), f"a promise names no test: {promise[:80]!r}"
