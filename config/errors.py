"""The one error the config package raises."""

from __future__ import annotations

from pathlib import Path


class ConfigError(Exception):
    """The config file is missing, unreadable, not TOML, or has bad values.

    ``errors`` holds every problem found, one line each, e.g.
    ``executors.count = -1: must be an integer >= 0``; ``path`` is the file they were found in (None
    when validating a dict that came from nowhere). ``str()`` gives one line per error, each
    prefixed with the file, so a CLI can print it as is.
    """

    def __init__(self, errors: list[str], path: Path | None = None) -> None:
        self.errors = list(errors)
        self.path = path
        super().__init__(self.__str__())

    def lines(self) -> list[str]:
        """One line per error, prefixed with the file when there is one."""
        prefix = f"{self.path}: " if self.path is not None else ""
        return [prefix + e for e in self.errors]

    def __str__(self) -> str:
        return "\n".join(self.lines())
