"""The agent's own log across processes, and why it does not use multiprocessing-logging.

Both tests run in a fresh interpreter (they install root logging handlers and fork).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.support.server import REPO

CHATTY_ROUNDS = """
import logging, multiprocessing as mp, os, re, signal, sys, time
ctx = mp.get_context("fork")

def chatty():
    while True:
        logging.info("x" * 200)

def marker(text):
    logging.info(text)

def rounds(n):
    for i in range(n):
        ps = [ctx.Process(target=chatty) for _ in range(3)]
        for p in ps: p.start()
        time.sleep(0.05)
        for p in ps: os.kill(p.pid, signal.SIGKILL)
        for p in ps: p.join()
        c = ctx.Process(target=marker, args=(f"marker {i}",)); c.start(); c.join(5)
        if c.exitcode is None:
            c.kill()
            return i
    return None
"""


def run_py(code: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_agent_log_survives_children_killed_mid_record(tmp_path):
    """Children killed with SIGKILL while logging never stop the others: every later child logs and exits."""
    r = run_py(
        CHATTY_ROUNDS
        + f"""
from agent.agentlog import setup_logging
from node.config import load_config
from node.masking import Masker
c = load_config({{"SERVER_ADDRESS": "http://x", "ACCESS_TOKEN": "A" * 32, "AGENT_HOST_DIR": {str(tmp_path)!r}}})
path = setup_logging(c, Masker(c.access_token))
hung = rounds(20)
logging.info("parent done")
text = path.read_text()
bad = [l for l in text.splitlines() if not re.match(r"^\\d{{4}}-\\d\\d-\\d\\d \\d\\d:\\d\\d:\\d\\d,\\d+ INFO ", l)]
print("hung", hung, "markers", sum(f"marker {{i}}" in text for i in range(20)), "bad", len(bad),
      "parent", "parent done" in text)
"""
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["hung", "None", "markers", "20", "bad", "0", "parent", "True"], r.stdout


@pytest.mark.slow
def test_multiprocessing_logging_hangs_a_child_after_a_kill():
    """The evidence for not using multiprocessing-logging: a child killed while it holds the shared
    queue's write lock makes the next child that logs hang at exit (its feeder thread waits forever)."""
    r = run_py(
        CHATTY_ROUNDS
        + """
import multiprocessing_logging
logging.basicConfig(filename=os.devnull, level=logging.INFO)
multiprocessing_logging.install_mp_handler()
print("hung", rounds(20))
os._exit(0)
"""
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0] == "hung" and r.stdout.split()[1] != "None", r.stdout


FORK_WHILE_THREADS_LOG = """
import logging, multiprocessing as mp, os, threading, time
ctx = mp.get_context("fork")
stop = False
def spam():
    while not stop:
        logging.info("thread spam " + "y" * 100)
def child(i):
    logging.info("child %d", i)
def fork_many(n, wait):
    for _ in range(2):
        threading.Thread(target=spam, daemon=True).start()
    for i in range(n):
        p = ctx.Process(target=child, args=(i,)); p.start(); p.join(wait)
        if p.exitcode is None:
            p.kill(); p.join()
            return i
    return None
"""


@pytest.mark.slow
def test_fork_while_threads_log_never_hangs_a_child(tmp_path):
    """The supervisor forks while its threads log: with the agent's logging no child hangs."""
    r = run_py(
        FORK_WHILE_THREADS_LOG
        + f"""
from agent.agentlog import setup_logging
from node.config import load_config
from node.masking import Masker
c = load_config({{"SERVER_ADDRESS": "http://x", "ACCESS_TOKEN": "A" * 32, "AGENT_HOST_DIR": {str(tmp_path)!r}}})
setup_logging(c, Masker(c.access_token))
print("hung", fork_many(300, 10))
os._exit(0)
"""
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["hung", "None"], r.stdout


@pytest.mark.slow
def test_plain_logging_hangs_a_child_forked_mid_write(tmp_path):
    """The evidence for the fork hook: the same with plain logging handlers hangs a child."""
    r = run_py(
        FORK_WHILE_THREADS_LOG
        + f"""
logging.basicConfig(filename={str(tmp_path / "plain.log")!r}, level=logging.INFO)
print("hung", fork_many(100, 2))
os._exit(0)
"""
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0] == "hung" and r.stdout.split()[1] != "None", r.stdout
