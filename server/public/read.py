"""Public API methods (server/public/registry.py): read."""

from __future__ import annotations
