"""``python -m supervisor`` is the `supervise` command."""

from supervisor.cli import main

raise SystemExit(main())
