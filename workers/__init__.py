"""Task-type handlers. One module per type; each runs inside a task process (see workers/base.py)."""
TASK_TYPES = ("train", "inference", "custom", "cleanup")
