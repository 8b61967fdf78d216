"""The tree's config: ``load(path) -> Config``, raising ``ConfigError`` with every problem found.

``config/schema.py`` holds the one table of keys and defaults, ``config/loader.py`` reads TOML,
``config/validate.py`` checks values (pure), ``config/render.py`` prints a config back as TOML.
"""

from __future__ import annotations

import os
from pathlib import Path

from config.errors import ConfigError
from config.loader import read_toml
from config.schema import Config
from config.validate import validate

__all__ = ["Config", "ConfigError", "load", "validate"]


def load(path: str | os.PathLike[str]) -> Config:
    """Read, validate and return the config at ``path``; relative paths in it resolve against its folder.

    Raises ConfigError: missing or unreadable file, TOML syntax error (with line and column), or
    bad values (every one of them, one line each).
    """
    absolute = Path(os.path.abspath(path))
    return validate(read_toml(absolute), absolute)
