"""Supervisely projects: checks, storage, items, annotation stats."""
