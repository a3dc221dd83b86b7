"""Public API methods (server/public/registry.py): files."""

from __future__ import annotations
