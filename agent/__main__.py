"""`python -m agent`: load the settings, prepare storage, connect, check the node (agent/doctor.py),
run the supervisor. `python -m agent doctor`: the checks alone.

Exit codes (agent/exitcodes.py): 0 ok (drained), 2 config error, 3 token refused, 4 server
unreachable at start, 5 the log-shipper went FATAL. Start-up errors are one line on stderr.
"""

from __future__ import annotations

import logging
import os
import sys

from agent.exitcodes import EXIT_AUTH, EXIT_CONFIG, EXIT_OK, EXIT_UNREACHABLE


def fail(code: int, message: str) -> int:
    print(f"sly-agent: {message}", file=sys.stderr, flush=True)
    return code


class _StoppedBeforeStart(BaseException):  # not Exception: no library may swallow it
    """SIGTERM/SIGINT arrived before the supervisor took over the signals."""


def _stop_before_start(signum, frame):
    # Until the supervisor installs its own handlers no child exists and nothing needs draining,
    # so unwinding from here is safe and answers `docker stop` during start-up at once.
    raise _StoppedBeforeStart(signum)


def main() -> int:
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_before_start)
    try:
        return _main()
    except _StoppedBeforeStart:
        print("sly-agent: stopped during start-up", file=sys.stderr, flush=True)
        return EXIT_OK


def _main() -> int:
    from agent.proctitle import set_title
    from node.api import AgentAPI
    from node.config import ConfigError, load_config
    from protocol.errors import APIError, AuthError

    set_title("supervisor")

    try:
        config = load_config()
    except ConfigError as e:
        return fail(EXIT_CONFIG, f"config error: {e}")

    from agent.agentlog import open_stderr, setup_logging
    from node import storage
    from node.masking import Masker

    try:
        storage.ensure_layout(config)
        storage.wipe_tmp(config)
    except OSError as e:
        return fail(EXIT_CONFIG, f"config error: cannot prepare the storage dir {config.agent_dir}: {e.strerror}")
    log_path = setup_logging(config, Masker(*config.secrets))
    log = logging.getLogger("agent")
    log.info("sly-agent starting: server %s, storage %s, log %s", config.server_address, config.agent_dir, log_path)

    from agent.telemetry import system_info

    api = AgentAPI(config.server_address, config.access_token, timeout=15, retries=2)
    try:
        answer = api.connect(system_info(config))
    except AuthError:
        log.error("the server refused the token")
        return fail(EXIT_AUTH, f"the server at {config.server_address} refused the access token (401)")
    except APIError as e:
        if e.status is None:
            log.error("server unreachable: %s", e)
            return fail(EXIT_UNREACHABLE, f"the server at {config.server_address} is unreachable ({e.detail})")
        log.error("connect failed: %s", e)
        return fail(
            EXIT_UNREACHABLE, f"the server at {config.server_address} answered connect with {e.status} {e.code}"
        )
    open_stderr()
    agent_info = answer.get("agent") or {}
    log.info(
        "connected as agent %s (%s); allowed task types %s",
        agent_info.get("id"),
        agent_info.get("name"),
        agent_info.get("allowed_task_types"),
    )
    from agent.doctor import log_checks

    log_checks(config, log)  # the preflight checks of `python -m agent doctor`, one log line each

    from agent.supervisor import Supervisor

    return Supervisor(config, api, answer).run()


def run() -> None:
    """`python -m agent` and the `sly-agent` console script; `python -m agent doctor` checks the node."""
    if sys.argv[1:2] == ["doctor"]:
        from agent.doctor import main as doctor

        code = doctor(sys.argv[2:])
    else:
        code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: multiprocessing's atexit would join children that are waiting for us to go away.
    os._exit(code)


if __name__ == "__main__":
    run()
