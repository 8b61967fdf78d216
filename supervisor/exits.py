"""The exit codes of `supervise`, by name (DESIGN §7)."""

from __future__ import annotations

EXIT_OK = 0  # clean stop, or a command that did what it was asked
EXIT_GAVE_UP = 1  # the root supervisor gave up (restart intensity), or a runtime failure
EXIT_USAGE = 2  # bad arguments, bad config, or a permanent backend/config fault the operator must fix
