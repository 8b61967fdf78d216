"""config.load / loader.read_toml: file problems and TOML syntax errors become one-line ConfigErrors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import config
from config import ConfigError

pytestmark = pytest.mark.timeout(10)


def load_error(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert all("\n" not in line for line in info.value.lines())
    return info.value.lines()


def test_load_resolves_paths_against_the_config_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tree.toml").write_text('[queue]\nurl = "sqlite:///q.db"\n')
    monkeypatch.chdir(tmp_path)
    cfg = config.load("tree.toml")  # relative path to the file: made absolute
    assert cfg.path == tmp_path / "tree.toml" and cfg.base_dir == tmp_path
    assert cfg.queue.url == f"sqlite:///{tmp_path}/q.db"


def test_missing_file(tmp_path: Path) -> None:
    assert load_error(tmp_path / "nope.toml") == [f"{tmp_path / 'nope.toml'}: no such file"]


def test_directory(tmp_path: Path) -> None:
    assert load_error(tmp_path) == [f"{tmp_path}: is a directory, not a config file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text("")
    path.chmod(0)
    assert load_error(path) == [f"{path}: cannot read: Permission denied"]


def test_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[queue]\nname = "q"\n[leaser\nlease_secs = 3\n')
    [line] = load_error(path)
    assert line.startswith(f"{path}: line 3, column 8: TOML syntax error: ")


def test_syntax_error_at_end_of_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[queue]\nname =')
    [line] = load_error(path)
    assert line.startswith(f"{path}: line 2: TOML syntax error at end of file")


def test_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.toml"
    path.write_text("[executors]\ncount = 1\ncount = 2\n")
    [line] = load_error(path)
    assert "line 3" in line and "TOML syntax error" in line


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[queue]\nname = "caf\xe9"\n')
    assert load_error(path) == [f"{path}: line 2: not UTF-8 text (TOML files are UTF-8)"]


def test_validation_errors_carry_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tree.toml"
    path.write_text("[executors]\ncount = -1\n")
    assert load_error(path) == [f"{path}: executors.count = -1: must be an integer >= 0"]
