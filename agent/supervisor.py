"""Supervisor process (`sly-agent: supervisor`): signals, slots and GPUs, the long-poll, children.

The main thread only waits (children's sentinels, a self-pipe for signals, a wake pipe from the
two helper threads) and runs `loop_once(now)`. HTTP happens in two threads: the poller
(long-poll) and the jobs thread (final states of dead task processes, FATAL reports, orphan
container reaping). Children are forked from the main thread with the "fork" context; see
docs/architecture.md for why that cannot hang (and the stress test that shows it).
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import random
import signal
import threading
import time

import workers
from agent.gpus import gpu_pool
from agent.log_shipper import LogShipper, Nudges
from agent.proctitle import set_title
from agent.states import CHILD_EDGES, SLOT_EDGES, ChildState, SlotState, change_state
from agent.task_process import HANDLER_ENV, TaskProcess, run_task_process
from agent.telemetry import Telemetry
from node import tasklog
from node.config import Config, ConfigError, load_config
from workers import engine

log = logging.getLogger("agent.supervisor")
MP = multiprocessing.get_context("fork")

EXIT_OK = 0
EXIT_FATAL = 5            # the log-shipper went FATAL: restart the agent (its tasks are re-adopted)
START_GRACE_S = 1.0       # a helper alive this long is RUNNING
MAX_RESPAWNS = 3          # task processes re-spawned to re-attach to one task's container
STOP_KILL_AFTER_S = 15.0
DISK_CHECK_S = 5.0        # how often the free-disk guard looks


class RestartPolicy:
    """Exponential backoff with jitter; FATAL after `max_deaths` deaths within `window_s`."""

    def __init__(self, max_deaths: int, window_s: float, base_s: float = 0.1, cap_s: float = 10.0):
        self.max_deaths, self.window_s, self.base_s, self.cap_s = max_deaths, window_s, base_s, cap_s
        self.deaths: collections.deque[float] = collections.deque()

    def record_death(self, now: float) -> float | None:
        """Delay before the next start, or None: give up (FATAL)."""
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - self.window_s:
            self.deaths.popleft()
        n = len(self.deaths)
        if n >= self.max_deaths:
            return None
        return min(self.cap_s, self.base_s * 2 ** (n - 1)) * random.uniform(0.5, 1.5)


class Helper:
    """A long-lived child (telemetry, log-shipper) and its state."""

    def __init__(self, name: str, factory, policy: RestartPolicy):
        self.name, self.factory, self.policy = name, factory, policy
        self.state = ChildState.STOPPED
        self.proc: multiprocessing.Process | None = None
        self.started_at = 0.0
        self.start_at = 0.0       # BACKOFF: when to start again
        self.heartbeat = None     # RawValue("d"): the child's last CLOCK_MONOTONIC beat
        self.restarts = 0

    def change(self, new: ChildState) -> None:
        self.state = change_state(self.state, new, CHILD_EDGES)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


class Slot:
    """One task as the supervisor sees it."""

    def __init__(self, task: dict, adopt: bool):
        self.task = task
        self.task_id = int(task["id"])
        self.type = str(task.get("type", "?"))
        self.adopt = adopt
        self.state = SlotState.PENDING
        self.proc: multiprocessing.Process | None = None
        self.stop_w: int | None = None
        self.gpus: list[int] = []
        self.spawns = 0
        self.stop_requested = False
        self.stop_at = 0.0
        self.final: tuple[str, str] | None = None   # FINALIZING: (state, error)
        self.final_sent = False

    def change(self, new: SlotState) -> None:
        self.state = change_state(self.state, new, SLOT_EDGES)

    @property
    def gpus_wanted(self) -> int:
        g = (self.task.get("resources") or {}).get("gpus") or 0
        return len(g) if isinstance(g, list) else int(g)


class Supervisor:
    def __init__(self, config: Config, api, connect_answer: dict | None = None):
        self.config = config
        self.api = api
        self.connect_answer = connect_answer or {}
        self.gpu_pool = gpu_pool(config.gpus)
        self.slots: dict[int, Slot] = {}
        self.draining = False       # SIGTERM: no new tasks
        self.stopping = False       # second SIGTERM / SIGINT: stop tasks
        self.stop_started = 0.0
        self.exit_code: int | None = None
        self.first_poll_done = False
        self.free_slots_shared = MP.RawValue("i", config.max_tasks)   # read by telemetry, lock-free
        self.nudges = Nudges()      # task processes -> log-shipper wake-ups (a lock-free pipe)
        self.helpers = {
            "log-shipper": Helper("log-shipper", lambda: LogShipper(self.config, self.nudges),
                                  RestartPolicy(config.restart_max, config.restart_window_s)),
            "telemetry": Helper("telemetry", lambda: Telemetry(self.config, self.free_slots_shared),
                                RestartPolicy(config.restart_max, config.restart_window_s)),
        }
        self._signals: list[int] = []
        self._sig_r, self._sig_w = os.pipe()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._sig_r, self._sig_w, self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._answers: queue.Queue = queue.Queue()   # poller -> main
        self._answer_done = threading.Event()
        self._jobs: queue.Queue = queue.Queue()      # main -> jobs thread (callables)
        self._done: queue.Queue = queue.Queue()      # jobs thread -> main (callbacks)
        self._snapshot_lock = threading.Lock()
        self._snapshot = (0, [], [], "")
        self._threads_stop = threading.Event()
        self.stopping_helpers_phase = False     # shutdown reached the helpers: no more restarts
        self.disk_refusal = ""      # why no task is taken now (short of disk), shown on the server
        self._disk_next = 0.0
        self._disk_job_pending = False

    # ------------------------------------------------------------------ setup / run
    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, lambda s, f: None)   # wakes the wait via the wakeup fd
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)

    def _on_signal(self, signum, frame) -> None:
        self._signals.append(signum)       # only enqueue; loop_once dispatches

    def preimport(self) -> None:
        """Import, in the main thread and before any thread starts, every module the threads and
        the children use. A module imported for the first time by a thread while the main thread
        forks leaves its import lock taken in the child, which then hangs on that import."""
        import importlib
        workers.preload()
        names = []
        spec = os.environ.get(HANDLER_ENV)
        if spec:
            names.append(spec.partition(":")[0])
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - a missing type fails its tasks clearly later
                log.debug("preimport %s: %s", name, e)

    def run(self) -> int:
        set_title("supervisor")
        self.preimport()
        self.install_signals()
        self.update_snapshot()
        for h in self.helpers.values():
            self.spawn_helper(h, time.monotonic())
        threading.Thread(target=self._poll_loop, name="poller", daemon=True).start()
        threading.Thread(target=self._jobs_loop, name="jobs", daemon=True).start()
        log.info("supervisor running: max_tasks=%s gpus=%s identity=%s", self.config.max_tasks, self.gpu_pool,
                 self.config.identity)
        while self.exit_code is None:
            self.wait(self.next_timeout(time.monotonic()))
            self.loop_once(time.monotonic())
        self._threads_stop.set()
        log.info("supervisor exits with code %s", self.exit_code)
        return self.exit_code

    def wait(self, timeout: float) -> None:
        objs = [self._sig_r, self._wake_r]
        objs += [h.proc.sentinel for h in self.helpers.values() if h.proc is not None]
        objs += [s.proc.sentinel for s in self.slots.values() if s.proc is not None]
        ready = multiprocessing.connection.wait(objs, timeout=max(0.0, timeout))
        for fd in (self._sig_r, self._wake_r):
            if fd in ready:
                try:
                    while os.read(fd, 4096):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass

    def next_timeout(self, now: float) -> float:
        t = 1.0
        for h in self.helpers.values():
            if h.state == ChildState.BACKOFF:
                t = min(t, h.start_at - now)
            elif h.state == ChildState.STARTING:
                t = min(t, h.started_at + START_GRACE_S - now)
        if any(s.state == SlotState.FINALIZING for s in self.slots.values()):
            t = min(t, 0.1)
        return t

    # ------------------------------------------------------------------ the loop
    def loop_once(self, now: float) -> None:
        """One iteration: signals, poll answers, job results, deaths, restarts, admissions, exit."""
        while self._signals:
            self.dispatch_signal(self._signals.pop(0))
        self.handle_answers()
        while True:
            try:
                callback = self._done.get_nowait()
            except queue.Empty:
                break
            callback()
        self.reap_helpers(now)
        self.reap_tasks(now)
        self.check_disk(now)
        self.restart_helpers(now)
        self.finalize_slots()
        self.admit_pending()
        self.escalate_stop(now)
        self.update_snapshot()
        self.check_exit(now)

    # --- signals
    def dispatch_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        handler = getattr(self, f"handle_{name.lower()}", None)
        if handler:
            handler()

    def handle_sigterm(self) -> None:
        if self.draining:
            self.handle_sigint()
            return
        log.info("SIGTERM: draining (no new tasks; %d running finish first)", self.active_count())
        self.draining = True

    def handle_sigint(self) -> None:
        if self.stopping:
            return
        log.info("stopping: asking %d task(s) to stop", self.active_count())
        self.draining = self.stopping = True
        self.stop_started = time.monotonic()
        for slot in self.slots.values():
            self.stop_task(slot)

    def handle_sighup(self) -> None:
        try:
            new = load_config()
        except ConfigError as e:
            log.error("SIGHUP: config not reloaded: %s", e)
            return
        self.config = new
        self.gpu_pool = gpu_pool(new.gpus)
        logging.getLogger().setLevel(getattr(logging, new.log_level.upper(), logging.INFO))
        for h in self.helpers.values():
            h.policy.max_deaths, h.policy.window_s = new.restart_max, new.restart_window_s
            # planned restart so the helper picks up the new settings
            if h.state in (ChildState.STARTING, ChildState.RUNNING):
                h.change(ChildState.STOPPING)
                h.proc.terminate()
        log.info("SIGHUP: config reloaded (max_tasks=%s, poll_wait_s=%s, gpus=%s)", new.max_tasks,
                 new.poll_wait_s, self.gpu_pool)

    # --- helpers (telemetry, log-shipper)
    def spawn_helper(self, h: Helper, now: float) -> None:
        role = h.factory()
        role.heartbeat = h.heartbeat = MP.RawValue("d", time.monotonic())
        h.proc = MP.Process(target=role.run, name=h.name, daemon=False)
        h.proc.start()
        h.started_at = now
        h.change(ChildState.STARTING)
        log.info("%s started (pid %s)", h.name, h.proc.pid)

    def reap_helpers(self, now: float) -> None:
        for h in self.helpers.values():
            if h.proc is None or h.proc.exitcode is None:
                if h.state == ChildState.STARTING and now - h.started_at >= START_GRACE_S:
                    h.change(ChildState.RUNNING)
                self.kill_if_hung(h, now)
                continue
            code = describe_exit(h.proc.exitcode)
            h.proc.join(0)
            h.proc.close()
            h.proc = None
            if h.state == ChildState.STOPPING:
                h.change(ChildState.STOPPED)
                if not self.helpers_stopping():
                    self.spawn_helper(h, now)     # planned restart (SIGHUP)
                continue
            delay = h.policy.record_death(now)
            if delay is None:
                h.change(ChildState.FATAL)
                self.helper_fatal(h, code)
                continue
            h.change(ChildState.BACKOFF)
            h.start_at = now + delay
            h.restarts += 1
            log.warning("%s died (%s); restarting in %.2fs", h.name, code, delay)

    def kill_if_hung(self, h: Helper, now: float) -> None:
        """Dead and hung are different: no heartbeat for config.helper_hung_s -> SIGKILL (then a
        normal death and restart). Heartbeats use CLOCK_MONOTONIC, which all processes share."""
        if h.proc is None or h.state not in (ChildState.STARTING, ChildState.RUNNING) or h.heartbeat is None:
            return
        if time.monotonic() - h.heartbeat.value > self.config.helper_hung_s:
            log.warning("%s (pid %s) sent no heartbeat for %.0fs: hung; killing it", h.name, h.proc.pid,
                        self.config.helper_hung_s)
            h.heartbeat = None
            h.proc.kill()

    def restart_helpers(self, now: float) -> None:
        for h in self.helpers.values():
            if h.state == ChildState.BACKOFF and now >= h.start_at:
                if self.helpers_stopping():
                    h.change(ChildState.STOPPED)
                else:
                    self.spawn_helper(h, now)

    def helper_fatal(self, h: Helper, code: str) -> None:
        msg = (f"{h.name} died {h.policy.max_deaths} times within {h.policy.window_s:g}s "
               f"(last: {code}); given up (FATAL)")
        log.critical(msg)
        fatal = {"fatal": {"process": h.name, "reason": msg, "ts": time.time()}}
        reported = threading.Event()
        self._jobs.put(lambda: self._report_fatal(fatal, reported))
        if h.name == "log-shipper":
            # Without it no task can report a final state; a restarted agent re-adopts the tasks.
            log.critical("the log-shipper is FATAL: the agent exits (code %d) so that it can be restarted", EXIT_FATAL)
            reported.wait(10)
            self.exit_code = EXIT_FATAL

    def _report_fatal(self, body: dict, reported: threading.Event) -> None:
        from agent.telemetry import sample
        try:
            self.api.telemetry({**sample(self.config, self.free_slots()), **body})
        except Exception as e:  # noqa: BLE001
            log.error("could not report FATAL to the server: %s", e)
        finally:
            reported.set()

    def helpers_stopping(self) -> bool:
        return self.stopping_helpers_phase

    # --- tasks
    def active_count(self) -> int:
        return sum(1 for s in self.slots.values() if s.state != SlotState.DONE)

    def free_slots(self) -> int:
        if self.draining or self.disk_refusal:
            return 0
        return max(0, self.config.max_tasks - self.active_count())

    def free_gpus(self) -> list[int]:
        used = {g for s in self.slots.values() if s.state != SlotState.DONE for g in s.gpus}
        return [g for g in self.gpu_pool if g not in used]

    # --- free-disk guard
    def check_disk(self, now: float) -> None:
        """Every DISK_CHECK_S: evict the LRU cache when short (only while no task could be using it),
        and refuse new tasks, with the reason sent on each poll, while still short."""
        if self._disk_job_pending or now < self._disk_next:
            return
        self._disk_job_pending = True
        self._disk_next = now + DISK_CHECK_S
        idle = self.active_count() == 0
        config = self.config
        self._jobs.put(lambda: self._disk_job(config, idle))

    def _disk_job(self, config: Config, evict: bool):
        status = engine.disk_status(config)
        if not status["ok"] and evict:
            try:
                freed = engine.ensure_space(config)
                if freed.get("evicted"):
                    log.warning("disk short: evicted %s cache entries (%.0f MB)", freed["evicted"],
                                freed.get("freed_bytes", 0) / 2**20)
            except engine.DiskError:
                pass
            status = engine.disk_status(config)
        return lambda: self._set_disk(status)

    def _set_disk(self, status: dict) -> None:
        self._disk_job_pending = False
        reason = "" if status["ok"] else status["reason"]
        if reason != self.disk_refusal:
            if reason:
                log.warning("refusing new tasks: %s", reason)
            else:
                log.info("disk space is back (%.0f MB free): taking tasks again", status["free_mb"])
            self.disk_refusal = reason
            self.update_snapshot()
            self._wake()

    def update_snapshot(self) -> None:
        running = sorted(s.task_id for s in self.slots.values() if s.state != SlotState.DONE)
        with self._snapshot_lock:
            self._snapshot = (self.free_slots(), self.free_gpus(), running, self.disk_refusal)
        self.free_slots_shared.value = self._snapshot[0]

    def handle_answers(self) -> None:
        while True:
            try:
                answer = self._answers.get_nowait()
            except queue.Empty:
                return
            try:
                self.handle_answer(answer)
            finally:
                self.update_snapshot()
                self._answer_done.set()

    def handle_answer(self, answer: dict) -> None:
        first = not self.first_poll_done
        self.first_poll_done = True
        for task in answer.get("tasks") or []:
            tid = int(task["id"])
            slot = self.slots.get(tid)
            if slot is not None and slot.state != SlotState.DONE:
                continue      # already ours (the answer crossed our running list)
            # A task that already has a durable log here was started by an earlier task process
            # or agent run: its new task process adopts (re-attaches to) it.
            adopt = tasklog.find_log_file(self.config, tid) is not None
            if tasklog.is_closed(self.config, tid):
                log.warning("task %s handed out again but its final state was already reported", tid)
            self.slots[tid] = Slot(task, adopt)
            log.info("task %s (%s) leased%s", tid, task.get("type"), " (adopt)" if adopt else "")
        for tid in answer.get("stop") or []:
            slot = self.slots.get(int(tid))
            if slot is None:
                log.warning("stop request for task %s, which this agent does not run", tid)
                continue
            self.stop_task(slot)
        if first:
            keep = [int(t["id"]) for t in answer.get("tasks") or []]
            self._jobs.put(lambda: engine.reap_orphans(self.config, keep))

    def admit_pending(self) -> None:
        if self.stopping:
            return
        for slot in sorted(self.slots.values(), key=lambda s: s.task_id):
            if slot.state != SlotState.PENDING:
                continue
            running = sum(1 for s in self.slots.values() if s.state in (SlotState.RUNNING, SlotState.STOPPING, SlotState.FINALIZING))
            if running >= self.config.max_tasks:
                return
            want = slot.gpus_wanted
            if want > len(self.gpu_pool):
                slot.final = ("failed", f"the task needs {want} GPU(s); this agent has {len(self.gpu_pool)}")
                slot.change(SlotState.FINALIZING)
                continue
            free = self.free_gpus()
            if want > len(free):
                continue
            slot.gpus = free[:want]
            self.spawn_task(slot)

    def spawn_task(self, slot: Slot) -> None:
        if slot.stop_w is not None:
            os.close(slot.stop_w)
        r, w = os.pipe()
        os.set_blocking(w, False)
        role = TaskProcess(self.config, slot.task, slot.gpus, slot.adopt, r, self.nudges)
        proc = MP.Process(target=run_task_process, args=(role,), name=f"task-{slot.task_id}", daemon=False)
        proc.start()
        os.close(r)
        slot.proc, slot.stop_w = proc, w
        slot.spawns += 1
        slot.change(SlotState.RUNNING)
        if slot.stop_requested:
            self._write_stop(slot)
        log.info("task %s: task process %s started (gpus %s%s)", slot.task_id, proc.pid, slot.gpus,
                 ", adopting" if slot.adopt else "")

    def stop_task(self, slot: Slot) -> None:
        if slot.state == SlotState.PENDING:
            slot.stop_requested = True
            slot.final = ("stopped", "stopped before it started")
            slot.change(SlotState.FINALIZING)
            return
        if slot.state != SlotState.RUNNING:
            return
        slot.stop_requested = True
        slot.stop_at = time.monotonic()
        slot.change(SlotState.STOPPING)
        self._write_stop(slot)
        log.info("task %s: stop requested", slot.task_id)

    def _write_stop(self, slot: Slot) -> None:
        try:
            os.write(slot.stop_w, b"s")
        except OSError:
            pass

    def reap_tasks(self, now: float) -> None:
        for slot in list(self.slots.values()):
            if slot.proc is None or slot.proc.exitcode is None:
                continue
            code = slot.proc.exitcode
            slot.proc.join(0)
            slot.proc.close()
            slot.proc = None
            if code == 0 or tasklog.is_closed(self.config, slot.task_id):
                self.release(slot, SlotState.DONE)
                log.info("task %s: task process done", slot.task_id)
                continue
            reason = f"task process {describe_exit(code)}"
            log.warning("task %s: %s", slot.task_id, reason)
            if slot.spawns <= MAX_RESPAWNS and slot.type != "cleanup" and engine.container_running(self.config, slot.task_id):
                log.info("task %s: its container still runs; a new task process re-attaches", slot.task_id)
                slot.adopt = True
                self.spawn_task(slot)
                continue
            slot.final = ("stopped" if slot.stop_requested and code == -signal.SIGKILL else "failed", reason)
            slot.change(SlotState.FINALIZING)

    def finalize_slots(self) -> None:
        """Report failed for dead task processes once their log is fully acked."""
        for slot in self.slots.values():
            if slot.state != SlotState.FINALIZING or slot.final_sent:
                continue
            if not tasklog.fully_acked(self.config, slot.task_id):
                continue
            slot.final_sent = True
            self._jobs.put(lambda slot=slot: self._report_final(slot))

    def _report_final(self, slot: Slot):
        from protocol.errors import APIError
        state, error = slot.final
        failures = 0
        while not self._threads_stop.is_set():
            try:
                self.api.set_state(slot.task_id, state, error=error)
                break
            except APIError as e:
                if e.status is not None and 400 <= e.status < 500:
                    log.warning("task %s: server refused %s: %s", slot.task_id, state, e)
                    break
                failures += 1
                time.sleep(min(5.0, 0.2 * 2 ** failures) * random.uniform(0.5, 1.5))
        tasklog.mark_closed(self.config, slot.task_id, state)
        log.info("task %s: reported %s (%s)", slot.task_id, state, error)
        return lambda: self.release(slot, SlotState.DONE)

    def release(self, slot: Slot, new: SlotState) -> None:
        slot.change(new)
        slot.gpus = []
        if slot.stop_w is not None:
            os.close(slot.stop_w)
            slot.stop_w = None
        del self.slots[slot.task_id]

    def escalate_stop(self, now: float) -> None:
        if not self.stopping:
            return
        limit = self.config.stop_grace_s + STOP_KILL_AFTER_S
        for slot in self.slots.values():
            if slot.proc is not None and slot.stop_requested and now - slot.stop_at > limit:
                log.warning("task %s: task process did not stop within %.0fs; killing it", slot.task_id, limit)
                slot.proc.kill()

    def check_exit(self, now: float) -> None:
        if self.exit_code is not None or not self.draining:
            return
        if any(s.state in (SlotState.RUNNING, SlotState.STOPPING, SlotState.FINALIZING) for s in self.slots.values()):
            return
        # Tasks first, then telemetry, the log-shipper last (it drains).
        if not self.stopping_helpers_phase:
            self.stopping_helpers_phase = True
            log.info("no task runs: stopping telemetry, then the log-shipper")
        for name in ("telemetry", "log-shipper"):
            h = self.helpers[name]
            if h.state in (ChildState.STARTING, ChildState.RUNNING):
                h.change(ChildState.STOPPING)
                h.proc.terminate()
                h.stop_deadline = now + 15
                return
            if h.state == ChildState.STOPPING:
                if now > getattr(h, "stop_deadline", now + 1):
                    h.proc.kill()
                return
            if h.state == ChildState.BACKOFF:
                h.change(ChildState.STOPPED)
        self.exit_code = EXIT_OK

    # ------------------------------------------------------------------ threads
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass

    def _poll_loop(self) -> None:
        from protocol.errors import APIError, AuthError
        failures = 0
        while not self._threads_stop.is_set():
            with self._snapshot_lock:
                free_slots, free_gpus, running, refusing = self._snapshot
            wait = self.config.poll_wait_s if free_slots > 0 else min(self.config.poll_wait_s, 1.0)
            try:
                answer = self.api.poll(free_slots, free_gpus, running, wait=wait, refusing=refusing)
            except APIError as e:
                failures += 1
                delay = min(30.0, 0.5 * 2 ** failures) * random.uniform(0.5, 1.5)
                if failures == 1 or isinstance(e, AuthError):
                    log.error("poll failed: %s; retrying in %.1fs", e, delay)
                self._threads_stop.wait(delay)
                continue
            if failures:
                log.info("poll works again after %d failures", failures)
            failures = 0
            self._answer_done.clear()
            self._answers.put(answer)
            self._wake()
            # The next poll must carry the running list this answer produced.
            while not self._answer_done.wait(0.5):
                if self._threads_stop.is_set():
                    return

    def _jobs_loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                callback = job()
            except Exception:  # noqa: BLE001
                log.exception("background job failed")
                callback = None
            if callback is not None:
                self._done.put(callback)
                self._wake()


def describe_exit(code: int) -> str:
    """`killed by SIGKILL` / `exited with code 3`."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
