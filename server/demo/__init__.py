"""Tools for the one-command demo and for tests: local task images, sample data."""
