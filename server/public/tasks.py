"""Public API methods (server/public/registry.py): tasks."""

from __future__ import annotations
