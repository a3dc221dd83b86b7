"""Public API methods (server/public/registry.py): write."""

from __future__ import annotations
