"""Task-type handlers. One module per type; each runs inside a task process (see workers/base.py)."""
TASK_TYPES = ("train", "inference", "custom", "cleanup")


def _preload() -> None:
    # The supervisor imports this package in its main thread before it starts any thread or fork:
    # loading the handlers (and the docker SDK) here means a task process, forked later, finds them
    # in sys.modules. That saves their import time on every pickup, and a task process never
    # imports a module that a supervisor thread was importing when it forked (a module's import
    # lock held at fork time is never released in the child: the task process hung).
    import importlib
    for name in TASK_TYPES + ("docker_task",):
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ImportError:     # no docker SDK here (e.g. a server-only install): loaded on use
            pass


_preload()
