"""Exit codes of the agent's processes, in one place (standard library only).

`python -m agent` (the supervisor) tells its service manager what to do next:

| code | name | restart? |
|---|---|---|
| 0 | EXIT_OK | no: drained or stopped as asked |
| 2 | EXIT_CONFIG | no: a setting is missing or malformed, or the storage dir is unusable; fix the config |
| 3 | EXIT_AUTH | no: the server refused the token; fix the token |
| 4 | EXIT_UNREACHABLE | yes, after a delay: the server was unreachable (or failed connect) at start |
| 5 | EXIT_FATAL | yes: the log-shipper went FATAL; a restarted agent re-adopts its tasks |

For systemd: `RestartPreventExitStatus=2 3` (`DO_NOT_RESTART`).

The supervisor's children:
- 0: a helper stopped as asked; a task process whose final state is reported.
- `CHILD_ORPHANED` (70): a task process whose supervisor went away; its container is left
  running for the next agent to adopt.
- `CHILD_CONFIG` (78, sysexits EX_CONFIG): a child found its settings unusable. The supervisor
  gives a helper that exits with it up at once (FATAL) instead of restarting it into the same
  error (gunicorn's WORKER_BOOT_ERROR).
- anything else, or a signal: a death; helpers back off and restart, task processes are
  replaced (their container still runs) or their task is failed.
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_AUTH = 3
EXIT_UNREACHABLE = 4
EXIT_FATAL = 5
DO_NOT_RESTART = frozenset({EXIT_CONFIG, EXIT_AUTH})

CHILD_OK = 0
CHILD_ORPHANED = 70
CHILD_CONFIG = 78


def describe_exit(code: int | None) -> str:
    """`killed by SIGKILL` / `exited with code 3`."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
