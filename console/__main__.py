"""``python -m console run|console ...``: the same as the ``sluice`` entry point."""

from console.cli import main

raise SystemExit(main())
