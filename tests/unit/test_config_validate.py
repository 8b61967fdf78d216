"""config.validate: every error class, did-you-mean, defaults, inheritance, round-trips. Pure."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from config import ConfigError, validate
from config.render import effective_toml
from config.schema import KEYS, SECTIONS, TABLE, Config

pytestmark = pytest.mark.timeout(10)

PATH = Path("/etc/leasetree/tree.toml")


def errors_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(raw, PATH)
    assert info.value.path == PATH
    return info.value.errors


def only_error(raw: dict) -> str:
    errors = errors_of(raw)
    assert len(errors) == 1, errors
    return errors[0]


# -- defaults ----------------------------------------------------------------------------------

def test_empty_file_gives_every_default() -> None:
    cfg = validate({}, PATH)
    assert cfg.path == PATH and cfg.base_dir == PATH.parent
    for key in TABLE:
        value = getattr(getattr(cfg, key.section), key.name)
        if key.kind == "shutdown" and key.default is None:
            assert value == cfg.supervisor.shutdown_secs
        elif key.path == "queue.url":
            assert value == "sqlite:////etc/leasetree/tasks.db"
        else:
            assert value == key.default, key.path


def test_design_defaults() -> None:
    cfg = validate({}, PATH)
    assert cfg.leaser.lease_secs == 30 and cfg.leaser.max_lease_secs == 7200
    assert cfg.leaser.batch_wait_secs == 600 and cfg.leaser.idle_poll_secs == 2.0
    assert cfg.executors.command == ("/bin/cat",) and cfg.executors.timeout_secs == 3600
    assert cfg.reaper.batch_size == 100 and cfg.reaper.max_latency_ms == 20
    assert cfg.retry.max_attempts == 5 and cfg.retry.backoff_max_secs == 300
    assert cfg.supervisor.strategy == "one_for_one" and cfg.supervisor.intensity == 10
    assert cfg.supervisor.user == "" and cfg.supervisor.group == ""
    assert cfg.log.level == "info" and cfg.log.format == "text" and cfg.metrics.listen == ""
    for child in ("leaser", "executors", "reaper"):
        assert getattr(cfg, child).restart == "permanent"


def test_config_is_frozen() -> None:
    cfg = validate({}, PATH)
    with pytest.raises(AttributeError):
        cfg.leaser.lease_secs = 5  # type: ignore[misc]


def test_numbers_accept_ints_and_become_floats() -> None:
    cfg = validate({"leaser": {"lease_secs": 45}}, PATH)
    assert cfg.leaser.lease_secs == 45.0 and isinstance(cfg.leaser.lease_secs, float)


# -- per-child restart and shutdown_secs -------------------------------------------------------

def test_child_shutdown_inherits_the_supervisor_value() -> None:
    cfg = validate({"supervisor": {"shutdown_secs": 5}, "reaper": {"shutdown_secs": "brutal_kill"}}, PATH)
    assert cfg.leaser.shutdown_secs == 5.0 and cfg.executors.shutdown_secs == 5.0
    assert cfg.reaper.shutdown_secs == "brutal_kill"


def test_child_shutdown_infinity_and_restart_types() -> None:
    cfg = validate({"executors": {"shutdown_secs": "infinity", "restart": "transient"},
                    "leaser": {"restart": "temporary"}}, PATH)
    assert cfg.executors.shutdown_secs == "infinity" and cfg.executors.restart == "transient"
    assert cfg.leaser.restart == "temporary"


@pytest.mark.parametrize("value", [-1, "forever", True, [1]])
def test_bad_shutdown_secs(value: object) -> None:
    error = only_error({"leaser": {"shutdown_secs": value}})
    assert error.startswith("leaser.shutdown_secs = ")
    assert '"brutal_kill" or "infinity"' in error


def test_bad_restart_type() -> None:
    assert only_error({"reaper": {"restart": "always"}}) == (
        'reaper.restart = "always": must be one of "permanent", "transient", "temporary"')


# -- unknown names and did-you-mean ------------------------------------------------------------

def test_unknown_key_suggests_the_close_one() -> None:
    assert only_error({"executors": {"cout": 3}}) == (
        "executors.cout: unknown key; did you mean executors.count?")


def test_unknown_key_without_close_match_lists_the_section() -> None:
    error = only_error({"retry": {"zzz": 1}})
    assert error == "retry.zzz: unknown key; allowed: max_attempts, backoff_secs, backoff_max_secs"


def test_key_in_the_wrong_section_says_where_it_belongs() -> None:
    assert only_error({"executors": {"lease_secs": 10}}) == (
        "executors.lease_secs: unknown key; it belongs in [leaser]")


def test_unknown_section_suggests_the_close_one() -> None:
    assert only_error({"leasr": {"lease_secs": 10}}) == "[leasr]: unknown section; did you mean [leaser]?"


def test_unknown_section_without_close_match_lists_sections() -> None:
    error = only_error({"zzzz": {}})
    assert error == "[zzzz]: unknown section; allowed: " + ", ".join(SECTIONS)


def test_key_outside_any_section_points_at_its_section() -> None:
    assert only_error({"lease_secs": 10}) == (
        "lease_secs = 10: unknown key outside any section; did you mean leaser.lease_secs (under [leaser])?")


def test_misspelled_key_outside_any_section() -> None:
    error = only_error({"lease_sec": 10})
    assert "did you mean leaser.lease_secs" in error


def test_strange_names_are_quoted_so_the_error_stays_one_line() -> None:
    assert only_error({"a\nb": {}}).startswith('["a\\nb"]: unknown section')
    assert only_error({"log": {"x y": 1}}).startswith('log."x y": unknown key')


def test_section_that_is_not_a_table() -> None:
    assert only_error({"leaser": 5}) == "leaser = 5: must be a table ([leaser] with keys under it)"


# -- types and ranges --------------------------------------------------------------------------

@pytest.mark.parametrize(("section", "key", "value", "allowed"), [
    ("executors", "count", -1, "an integer >= 0"),
    ("executors", "count", 2.5, "an integer >= 0"),
    ("executors", "count", True, "an integer >= 0"),
    ("executors", "count", "4", "an integer >= 0"),
    ("executors", "slots", 0, "an integer >= 1"),
    ("leaser", "lease_secs", 0, "a number > 0"),
    ("leaser", "lease_secs", "30", "a number > 0"),
    ("leaser", "lease_secs", float("nan"), "a number > 0"),
    ("leaser", "lease_secs", float("inf"), "a number > 0"),
    ("leaser", "max_in_flight", -5, "an integer >= 0"),
    ("leaser", "requests_per_sec", -0.5, "a number >= 0"),
    ("leaser", "tag", 7, "a string"),
    ("reaper", "batch_size", 0, "an integer >= 1"),
    ("retry", "max_attempts", 0, "an integer >= 1"),
    ("supervisor", "period_secs", 0, "a number > 0"),
    ("supervisor", "intensity", -1, "an integer >= 0"),
    ("queue", "name", "", "a non-empty string"),
    ("queue", "name", "  ", "a non-empty string"),
])
def test_wrong_type_or_range(section: str, key: str, value: object, allowed: str) -> None:
    error = only_error({section: {key: value}})
    assert error.startswith(f"{section}.{key} = ")
    assert error.endswith(f": must be {allowed}")


def test_error_shows_the_value_as_toml() -> None:
    assert only_error({"leaser": {"lease_secs": "30"}}) == 'leaser.lease_secs = "30": must be a number > 0'


@pytest.mark.parametrize(("key", "value"), [
    ("strategy", "one_for_none"), ("strategy", "simple_one_for_one"), ("strategy", 1)])
def test_strategy(key: str, value: object) -> None:
    assert only_error({"supervisor": {key: value}}).endswith(
        'must be one of "one_for_one", "one_for_all", "rest_for_one"')


def test_log_level_and_format() -> None:
    errors = errors_of({"log": {"level": "verbose", "format": "xml"}})
    assert errors == ['log.level = "verbose": must be one of "debug", "info", "warning", "error"',
                      'log.format = "xml": must be one of "text", "json"']


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "0.0.0.0:1", "[::1]:9464", "localhost:65535", ""])
def test_metrics_listen_ok(listen: str) -> None:
    assert validate({"metrics": {"listen": listen}}, PATH).metrics.listen == listen


@pytest.mark.parametrize("listen", ["9464", ":9464", "host:", "host:0", "host:65536", "host:http", 9464])
def test_metrics_listen_bad(listen: object) -> None:
    assert only_error({"metrics": {"listen": listen}}).endswith(
        'must be a "host:port" string (port 1-65535), or "" for off')


@pytest.mark.parametrize("url", ["ftp://x/", "http://", "localhost/out", 5])
def test_output_url_bad(url: object) -> None:
    assert only_error({"executors": {"output_url": url}}).endswith(
        'must be an http:// or https:// URL, or ""')


def test_output_url_ok() -> None:
    assert validate({"executors": {"output_url": "https://h/out/"}}, PATH).executors.output_url == "https://h/out/"


# -- command and callable ----------------------------------------------------------------------

def test_command_string_is_split_like_a_shell() -> None:
    cfg = validate({"executors": {"command": "/usr/bin/convert -quiet 'a b'"}}, PATH)
    assert cfg.executors.command == ("/usr/bin/convert", "-quiet", "a b")


def test_command_array_is_kept() -> None:
    cfg = validate({"executors": {"command": ["/bin/sh", "-c", "x $1"]}}, PATH)
    assert cfg.executors.command == ("/bin/sh", "-c", "x $1")


@pytest.mark.parametrize("command", ["", "   ", [], [""], ["/bin/x", 3], 3, {"a": 1}])
def test_command_bad(command: object) -> None:
    error = only_error({"executors": {"command": command}})
    assert error.startswith("executors.command = ") and "non-empty array of strings" in error


def test_command_with_unclosed_quote() -> None:
    error = only_error({"executors": {"command": "/bin/x 'oops"}})
    assert "cannot be split into arguments" in error and "array of strings" in error


def test_callable_replaces_the_default_command() -> None:
    cfg = validate({"executors": {"callable": "mypkg.tasks:handle"}}, PATH)
    assert cfg.executors.callable == "mypkg.tasks:handle" and cfg.executors.command == ()


def test_command_and_callable_both_set() -> None:
    error = only_error({"executors": {"command": "/bin/cat", "callable": "m:f"}})
    assert error == ('executors.command = "/bin/cat": cannot be set together with '
                     'executors.callable = "m:f"; keep one of them')


def test_empty_callable_with_command_is_fine() -> None:
    cfg = validate({"executors": {"command": "/bin/true", "callable": ""}}, PATH)
    assert cfg.executors.command == ("/bin/true",)


@pytest.mark.parametrize("value", ["module", "mod:", ":func", "a..b:f", "pkg.mod:f-g", "1pkg:f", 5])
def test_callable_bad(value: object) -> None:
    assert only_error({"executors": {"callable": value}}).endswith(
        'must be a "package.module:function" string, or "" to use command')


def test_python_path_resolves_against_the_config_folder() -> None:
    cfg = validate({"executors": {"python_path": ["lib", "/opt/x"]}}, PATH)
    assert cfg.executors.python_path == ("/etc/leasetree/lib", "/opt/x")


@pytest.mark.parametrize("value", ["lib", [1], [""]])
def test_python_path_bad(value: object) -> None:
    assert only_error({"executors": {"python_path": value}}).endswith("must be an array of non-empty strings")


# -- queue.url ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "resolved"), [
    ("sqlite:///tasks.db", "sqlite:////etc/leasetree/tasks.db"),
    ("sqlite:///data/q.db", "sqlite:////etc/leasetree/data/q.db"),
    ("sqlite:////var/lib/q.db", "sqlite:////var/lib/q.db"),
    ("redis://:pw@localhost:6379/0", "redis://:pw@localhost:6379/0"),
    ("memory://", "memory://"),
])
def test_queue_url_resolution(url: str, resolved: str) -> None:
    assert validate({"queue": {"url": url}}, PATH).queue.url == resolved


def test_queue_url_unknown_scheme_lists_the_allowed_ones() -> None:
    error = only_error({"queue": {"url": "mysql://localhost/db"}})
    assert error.startswith('queue.url = "mysql://localhost/db": unknown scheme; allowed: ')
    assert "sqlite://" in error and "redis://" in error


@pytest.mark.parametrize("url", ["sqlite://tasks.db", "sqlite:///", "sqlite:///dir/", "sqlite:///t.db?x=1"])
def test_queue_url_bad_sqlite_shapes(url: str) -> None:
    assert only_error({"queue": {"url": url}}).endswith(
        'must be "sqlite:///relative/path.db" or "sqlite:////absolute/path.db"')


# -- rules across keys -------------------------------------------------------------------------

def test_max_lease_below_lease() -> None:
    assert only_error({"leaser": {"lease_secs": 60, "max_lease_secs": 30}}) == (
        "leaser.max_lease_secs = 30.0: must be >= leaser.lease_secs (60.0)")


def test_backoff_max_below_backoff() -> None:
    assert only_error({"retry": {"backoff_secs": 10, "backoff_max_secs": 5}}) == (
        "retry.backoff_max_secs = 5.0: must be >= retry.backoff_secs (10.0)")


def test_heartbeat_timeout_not_above_heartbeat() -> None:
    assert only_error({"supervisor": {"heartbeat_secs": 5, "heartbeat_timeout_secs": 5}}) == (
        "supervisor.heartbeat_timeout_secs = 5.0: must be > supervisor.heartbeat_secs (5.0)")


def test_a_bad_value_is_not_compared_with_its_default() -> None:
    assert only_error({"leaser": {"lease_secs": -5, "max_lease_secs": 10}}) == (
        "leaser.lease_secs = -5: must be a number > 0")


# -- all errors at once ------------------------------------------------------------------------

def test_every_error_is_reported_one_line_each() -> None:
    raw = {"leasr": {}, "executors": {"count": -1, "slotz": 2}, "log": {"level": "loud"}}
    errors = errors_of(raw)
    assert len(errors) == 4
    assert all("\n" not in e for e in errors)
    with pytest.raises(ConfigError) as info:
        validate(raw, PATH)
    assert info.value.lines() == [f"{PATH}: {e}" for e in errors]
    assert str(info.value) == "\n".join(info.value.lines())


# -- round trips -------------------------------------------------------------------------------

FULL = {
    "queue": {"url": "redis://u:secret@h:6379/0", "name": "q1"},
    "leaser": {"lease_secs": 12.5, "tag": "gpu", "restart": "transient", "shutdown_secs": 3},
    "executors": {"callable": "pkg.mod:run", "python_path": ["src"], "count": 3, "slots": 2},
    "reaper": {"shutdown_secs": "brutal_kill"},
    "supervisor": {"strategy": "rest_for_one", "user": "nobody", "group": "nogroup"},
    "metrics": {"listen": "127.0.0.1:9464"},
    "log": {"format": "json", "level": "debug"},
}


@pytest.mark.parametrize("raw", [{}, FULL, {"executors": {"command": "/bin/sh -c 'tr a-z A-Z'"}}])
def test_to_dict_from_dict_round_trip(raw: dict) -> None:
    cfg = validate(raw, PATH)
    data = cfg.to_dict()
    assert Config.from_dict(data) == cfg
    # plain data only: what msgpack and the multiprocess arguments carry
    assert set(data) == {"path", "base_dir", *SECTIONS}
    for section in SECTIONS:
        assert set(data[section]) == set(KEYS[section])
        for value in data[section].values():
            assert type(value) in (str, int, float, list)


@pytest.mark.parametrize("raw", [{}, FULL])
def test_effective_toml_loads_back_to_the_same_config(raw: dict) -> None:
    cfg = validate(raw, PATH)
    text = effective_toml(cfg)
    assert validate(tomllib.loads(text), PATH) == cfg


def test_effective_toml_redacts_urls() -> None:
    from children.backends import redact_url

    text = effective_toml(validate(FULL, PATH), redact=redact_url)
    assert "secret" not in text and 'url = "redis://u:***@h:6379/0"' in text
    assert "# command: not used, callable is set" in text
