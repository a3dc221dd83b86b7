"""Task-type handlers. One module per type; each runs inside a task process (see workers/base.py).

Importing the package loads nothing heavy: the handler contract (`workers.base`) needs neither
docker, inotify nor requests. The supervisor calls `preload()` itself (see there).
"""

from protocol.tasks import TASK_TYPES


def preload() -> None:
    """Import every handler (and the docker SDK) now, in the calling thread.

    The supervisor calls this in its main thread before it starts any thread or forks: a task
    process, forked later, then finds the handlers in sys.modules. That saves their import time on
    every pickup, and a task process never imports a module that a supervisor thread was importing
    when it forked (a module's import lock held at fork time is never released in the child: the
    task process hung).
    """
    import importlib

    for name in TASK_TYPES + ("docker_task", "engine"):
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ImportError:  # no docker SDK here (e.g. a server-only install): loaded on use
            pass
