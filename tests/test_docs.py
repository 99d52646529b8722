"""The README documents every setting, and CI runs exactly the README's test command."""

from __future__ import annotations

import re

from conftest import ROOT

import config

README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme_table():
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", README, flags=re.M))
    assert documented == {s.name for s in config.SETTINGS}


def test_settings_have_help_and_env_override(monkeypatch):
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
