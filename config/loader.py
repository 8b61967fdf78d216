"""Read a config file into a raw dict (``tomllib``); no validation happens here.

Every failure is a ConfigError naming the file: missing, unreadable, not UTF-8, or a TOML syntax
error with its line and column.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from config.errors import ConfigError

# tomllib (3.11) puts the position only in the message: "... (at line 3, column 7)".
_POSITION = re.compile(
    r"^(?P<what>.*?)\s*\(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$")


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML document at ``path``. Raises ConfigError (one line) on any failure."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(["no such file"], path) from None
    except IsADirectoryError:
        raise ConfigError(["is a directory, not a config file"], path) from None
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror or exc}"], path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError([f"line {line}: not UTF-8 text (TOML files are UTF-8)"], path) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_message(str(exc), text)], path) from None


def _syntax_message(message: str, text: str) -> str:
    match = _POSITION.match(message)
    if not match:
        return f"TOML syntax error: {message}"
    what = match["what"]
    if match["line"] is None:
        line = text.count("\n") + 1
        return f"line {line}: TOML syntax error at end of file: {what}"
    return f"line {match['line']}, column {match['col']}: TOML syntax error: {what}"
