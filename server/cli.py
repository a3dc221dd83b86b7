"""`python -m server.cli` runs the CLI, which lives in client/ (client.cli)."""
from client.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
