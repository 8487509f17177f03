"""Allow ``python -m proxy`` wherever the ``sluice`` script is not on PATH."""

from proxy.cli import main

raise SystemExit(main())
