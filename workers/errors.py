"""Errors a handler turns into an Outcome."""


class TaskError(Exception):
    """The task fails with this message as its `error` (a clear sentence for the user)."""


class StopRequested(Exception):
    """The task was asked to stop while preparing or uploading."""
