"""The one-command demo (`./run.sh demo`, `python -m tools.demo`) and its task script."""
