"""sly-agent: the node agent (supervisor process tree)."""
__version__ = "0.1.0"
