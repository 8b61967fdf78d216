"""A backend whose driver is missing or does not load is a one-line config error naming the extra.

Two ways a driver fails: it is not installed (ModuleNotFoundError, made here with
``sys.modules[name] = None``), or it is installed but cannot load (a plain ImportError, as psycopg
raises when it finds no libpq: "no pq wrapper available." and a list of attempts, over several lines).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from children.backends import BackendConfigError, open_backend
from supervisor.exits import EXIT_USAGE

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
PG_URL = "postgresql://app:hunter2@127.0.0.1:1/test"  # never reached: the import fails first

# psycopg's own words when it finds no libpq
NO_PQ = ("no pq wrapper available.\\nAttempts made:\\n"
         "- couldn't import psycopg 'c' implementation: No module named 'psycopg_c'\\n"
         "- couldn't import psycopg 'binary' implementation: No module named 'psycopg_binary'\\n"
         "- couldn't import psycopg 'python' implementation: libpq library not found")

# a meta path finder that makes ``import psycopg`` raise NO_PQ, whether psycopg is installed or not
FINDER = f"""
class NoPq:
    def find_spec(self, name, path=None, target=None):
        if name == "psycopg" or name.startswith("psycopg."):
            raise ImportError("{NO_PQ}")
"""


@pytest.fixture
def fresh_postgresql_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The next open of a postgresql:// URL imports the backend module again (the driver with it);
    monkeypatch puts the modules this test removed back afterwards."""
    for name in [n for n in sys.modules if n == "psycopg" or n.startswith("psycopg.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "children.backends.postgresql", raising=False)
    yield


def test_a_driver_not_installed_names_it_and_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                       fresh_postgresql_module: None) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what an absent package looks like to import
    with pytest.raises(BackendConfigError) as info:
        open_backend(PG_URL, "jobs")
    assert str(info.value) == ("queue.url = 'postgresql://app:***@127.0.0.1:1/test' needs the 'psycopg' "
                               "driver: pip install 'leasetree[postgresql]'")


def test_a_driver_that_does_not_load_is_one_line_naming_the_extra(
        monkeypatch: pytest.MonkeyPatch, fresh_postgresql_module: None) -> None:
    namespace: dict[str, type] = {}
    exec(FINDER, namespace)  # noqa: S102 - the finder the CLI test runs, here in this process
    monkeypatch.setattr(sys, "meta_path", [namespace["NoPq"](), *sys.meta_path])
    with pytest.raises(BackendConfigError) as info:
        open_backend(PG_URL, "jobs")
    message = str(info.value)
    assert "\n" not in message and "hunter2" not in message
    assert message == ("queue.url = 'postgresql://app:***@127.0.0.1:1/test' needs a driver that does "
                       "not import (no pq wrapper available.): pip install 'leasetree[postgresql]'")


def test_a_module_of_leasetree_missing_is_not_blamed_on_a_driver(monkeypatch: pytest.MonkeyPatch,
                                                                 fresh_postgresql_module: None) -> None:
    monkeypatch.setitem(sys.modules, "children.backends.postgresql", None)
    with pytest.raises(ModuleNotFoundError):
        open_backend(PG_URL, "jobs")


@pytest.mark.parametrize(("verb", "extra"), [(["queue", "stats"], []), (["enqueue"], ["payload"])])
def test_cli_on_a_config_whose_driver_does_not_load_exits_2_with_one_line(
        tmp_path: Path, verb: list[str], extra: list[str]) -> None:
    config = tmp_path / "tree.toml"
    config.write_text(f'[queue]\nurl = "{PG_URL}"\nname = "jobs"\n')
    # `python -c`: the finder goes in first, then the command line runs as `supervise VERB CONFIG ...`
    wrapper = ("import sys\n" + FINDER + "sys.meta_path.insert(0, NoPq())\n"
               "from supervisor.cli import main\nsys.exit(main())\n")
    result = subprocess.run([sys.executable, "-c", wrapper, *verb, str(config), *extra], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "supervise: queue.url = 'postgresql://app:***@127.0.0.1:1/test' needs a driver that does not "
        "import (no pq wrapper available.): pip install 'leasetree[postgresql]'"]
