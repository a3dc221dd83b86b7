"""`python -m client ...`: the CLI."""

from client.cli import main

raise SystemExit(main())
