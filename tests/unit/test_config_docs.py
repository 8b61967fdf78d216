"""The committed docs/configuration.md and config/example.toml agree with the schema."""

from __future__ import annotations

from pathlib import Path

import pytest

import config
from config.render import markdown_reference
from config.schema import TABLE

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]


def test_imports_are_this_projects_packages() -> None:
    # `config` and `supervisor` are common top-level names (supervisord is `supervisor` on PyPI).
    import supervisor

    assert Path(config.__file__).resolve().parent == ROOT / "config"
    assert Path(supervisor.__file__).resolve().parent == ROOT / "supervisor"


def test_committed_reference_matches_the_schema() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == markdown_reference(), "run: python scripts/gen_config_docs.py"


def test_reference_lists_every_key_with_its_seed_flag() -> None:
    text = markdown_reference()
    for key in TABLE:
        assert f"| `{key.name}` |" in text
        if key.seed:
            assert f"`--{key.seed}`" in text


def test_example_config_is_valid() -> None:
    cfg = config.load(ROOT / "config" / "example.toml")
    assert cfg.queue.url == f"sqlite:///{ROOT / 'config' / 'example-tasks.db'}"
    assert cfg.executors.count == 2 and cfg.executors.command[0] == "/bin/sh"
