"""`python -m launcher` is the `hypersd` command."""

from launcher.cli import main

raise SystemExit(main())
