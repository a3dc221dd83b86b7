"""Models: a manifest of files, each a blob."""
