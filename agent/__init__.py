"""sly-agent: the node agent (supervisor process tree)."""

from node import __version__  # noqa: F401 - one version for the agent and its workers
