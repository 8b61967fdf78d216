"""Property tests: whatever TOML-shaped data comes in, validate() returns a Config or raises ConfigError.

Nothing else may escape (no TypeError from a surprising type, no AttributeError from a list where a
table was expected), every error is one line naming a key path, and a valid config survives every
round trip (to_dict/from_dict, and the `check` output loaded back).
"""

from __future__ import annotations

import datetime
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import Config, ConfigError, validate
from config.render import effective_toml
from config.schema import KEYS, SECTIONS, TABLE

pytestmark = pytest.mark.timeout(60)

PATH = Path("/srv/tree/tree.toml")

# Values of every TOML type, with the interesting ones (defaults, choices, boundaries) over-weighted.
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "0", "brutal_kill", "infinity", "one_for_all", "debug", "json", "transient",
                     "m:f", "pkg.mod:fn", "/bin/cat", "sqlite:///t.db", "sqlite:////a/b.db",
                     "memory://", "redis://:pw@h/0", "http://h/", "127.0.0.1:9464", "h:0"]),
    st.sampled_from([0, 1, -1, 0.0, 0.5, 30, 7200, 1e308]),
    st.datetimes(), st.dates(), st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
key_names = st.one_of(st.sampled_from(sorted({k.name for k in TABLE})), st.text(min_size=1, max_size=12))
section_names = st.one_of(st.sampled_from(SECTIONS), st.text(min_size=1, max_size=10))
tables = st.dictionaries(key_names, values, max_size=6)
raw_configs = st.dictionaries(section_names, st.one_of(tables, values), max_size=5)

# Only values that might be valid, to reach the success path often.
def _good_value(key):  # noqa: ANN001, ANN202 - a strategy factory for one schema key
    if key.kind == "int":
        return st.integers(min_value=int(key.minimum or 0), max_value=1000)
    if key.kind == "number":
        return st.floats(min_value=(key.above or 0) + 0.001, max_value=1e6)
    if key.kind == "choice":
        return st.sampled_from(key.choices)
    if key.kind == "shutdown":
        return st.one_of(st.sampled_from(["brutal_kill", "infinity"]), st.floats(0, 1e5))
    if key.kind == "strings":
        return st.lists(st.text(min_size=1, max_size=8), max_size=3)
    if key.kind == "command":
        return st.one_of(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3),
                         st.just("/bin/sh -c 'echo hi'"))
    if key.kind == "str":
        return st.text(max_size=10)
    return st.just(key.default if key.default is not None else 1.0)


plausible = st.fixed_dictionaries({}, optional={
    section: st.fixed_dictionaries({}, optional={name: _good_value(key) for name, key in KEYS[section].items()
                                                 if key.kind != "callable"})
    for section in SECTIONS
})


def _check_outcome(raw: dict) -> Config | None:
    try:
        cfg = validate(raw, PATH)
    except ConfigError as exc:
        assert exc.errors
        for error in exc.errors:
            assert error and "\n" not in error
        return None
    return cfg


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_configs)
def test_anything_is_a_config_or_a_config_error(raw: dict) -> None:
    _check_outcome(raw)


@settings(max_examples=100, deadline=None, database=None)
@given(plausible)
def test_valid_configs_round_trip(raw: dict) -> None:
    cfg = _check_outcome(raw)
    if cfg is None:
        return
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert validate(tomllib.loads(effective_toml(cfg)), PATH) == cfg


@settings(database=None)
@given(st.datetimes())
def test_a_datetime_where_a_number_belongs_is_named(value: datetime.datetime) -> None:
    with pytest.raises(ConfigError) as info:
        validate({"leaser": {"lease_secs": value}}, PATH)
    assert info.value.errors == [f"leaser.lease_secs = {value.isoformat()}: must be a number > 0"]
