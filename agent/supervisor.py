"""Supervisor process (`sly-agent: supervisor`): the loop over signals, slots and GPUs, children.

The main thread only waits (children's sentinels, a self-pipe for signals, a wake pipe from the
two threads) and runs `loop_once(now)`. Its parts, one module each:
- agent/spawner.py: fork, signals to children, heartbeats and the clock (injected; tests fake it);
- agent/restarts.py: telemetry and log-shipper: start grace, BACKOFF, FATAL, planned restarts;
- agent/escalation.py: heartbeat deadlines and the ask -> grace -> SIGKILL escalation;
- agent/admission.py: which pending tasks start, on which GPUs (pure logic);
- agent/poller.py, agent/jobs.py: the `poller` (long-poll) and `jobs` (blocking work) threads;
- agent/disk_guard.py: no new task while short of disk;
- agent/reports.py: final states of dead task processes, tasks handed back while draining, and
  FATAL reports (jobs thread);
- workers/engine.py: the Docker and disk questions (the one workers module the supervisor imports).
Children are forked from the main thread with the "fork" context; see docs/architecture.md for
why that cannot hang (and the stress test that shows it).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time

from agent import admission
from agent.disk_guard import DiskGuard
from agent.escalation import HUNG_KILL_AFTER_S, Escalation, escalate, silent_for
from agent.exitcodes import EXIT_FATAL, EXIT_OK, describe_exit
from agent.gpus import gpu_pool
from agent.jobs import Jobs
from agent.log_shipper import LogShipper, ShipNowPipe
from agent.poller import Poller, Snapshot
from agent.proctitle import set_title
from agent.reports import hand_back, report_fatal, report_final
from agent.restarts import Helper, Helpers, RestartPolicy
from agent.spawner import Spawner
from agent.states import SLOT_EDGES, SlotState, change_state
from agent.task_process import HANDLER_ENV, TaskProcess, run_task_process
from agent.telemetry import Telemetry
from node import tasklog
from node.config import Config, ConfigError, check_default_task_gpus, load_config
from protocol.tasks import CONTAINER_TYPES
from workers import engine as docker_engine  # the one workers module the supervisor asks

__all__ = ["Supervisor", "Slot", "RestartPolicy", "describe_exit"]

log = logging.getLogger("agent.supervisor")

MAX_RESPAWNS = 3  # task processes re-spawned to re-attach to one task's container
STOP_KILL_AFTER_S = 15.0  # after stop_grace_s: task processes still alive are killed (agent stop)
FATAL_REPORT_WAIT_S = 10.0  # a FATAL log-shipper: the agent exits once reported, or after this long
HELPER_ORDER = ("telemetry", "log-shipper")  # shutdown order: the log-shipper last, it drains
BUSY = (SlotState.RUNNING, SlotState.STOPPING, SlotState.FINALIZING)


class Slot:
    """One task as the supervisor sees it."""

    def __init__(self, task: dict, adopt: bool):
        self.task = task
        self.task_id = int(task["id"])
        self.type = str(task.get("type", "?"))
        self.adopt = adopt
        self.state = SlotState.PENDING
        self.child = None  # spawner.Child of its task process
        self.stop_w: int | None = None
        self.gpus: list[int] = []
        self.held_gpus: tuple[int, ...] | None = None  # adopted: the GPUs its container was given
        self.spawns = 0
        self.stop_requested = False
        self.stop_at = 0.0
        self.escalation: Escalation | None = None  # asked to go (stop, hung): SIGKILL when due
        self.hung = ""  # why its task process was found hung
        self.final: tuple[str, str] | None = None  # FINALIZING: (state, error)
        self.final_sent = False

    def change(self, new: SlotState) -> None:
        self.state = change_state(self.state, new, SLOT_EDGES)

    @property
    def gpus_wanted(self) -> admission.Want:
        if self.held_gpus is not None:
            return self.held_gpus
        return admission.gpus_wanted(self.task)


class Supervisor:
    def __init__(self, config: Config, api, connect_answer: dict | None = None, *, spawner=None, engine=None):
        self.config = config
        self.api = api
        self.connect_answer = connect_answer or {}
        self.spawner = spawner or Spawner()
        self.engine = engine or docker_engine
        self.gpu_pool = gpu_pool(config.gpus)
        self.slots: dict[int, Slot] = {}
        self.handing_back: set[int] = set()  # task ids whose release (jobs thread) is not through yet
        self.draining = False  # SIGTERM: no new tasks
        self.stopping = False  # second SIGTERM / SIGINT: stop tasks
        self.exit_code: int | None = None
        self.fatal_exit_at: float | None = None  # the log-shipper is FATAL: exit by then at the latest
        self.first_poll_done = False
        self.free_slots_shared = multiprocessing.get_context("fork").RawValue(
            "i", config.max_tasks
        )  # telemetry reads it
        self.ship_now = ShipNowPipe()  # task processes -> log-shipper: "ship now" (a lock-free pipe)
        self.helpers = Helpers(
            self.spawner,
            [
                Helper(
                    "log-shipper",
                    lambda: LogShipper(self.config, self.ship_now),
                    RestartPolicy(config.restart_max, config.restart_window_s),
                ),
                Helper(
                    "telemetry",
                    lambda: Telemetry(self.config, self.free_slots_shared),
                    RestartPolicy(config.restart_max, config.restart_window_s),
                ),
            ],
            on_fatal=self.helper_fatal,
        )
        self._signals: list[int] = []
        self._sig_r, self._sig_w = os.pipe()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._sig_r, self._sig_w, self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._threads_stop = threading.Event()
        self.poller = Poller(api, lambda: self.config, self._wake, self._threads_stop)
        self.jobs = Jobs(self._wake)
        self.disk = DiskGuard(self.engine)

    @property
    def disk_refusal(self) -> str:
        """Why no task is taken now (short of disk); "" when there is room."""
        return self.disk.refusal

    @property
    def refusal(self) -> str:
        """Why no task is taken now, sent on each poll (the server shows it); "" when tasks are welcome."""
        return "draining" if self.draining else self.disk.refusal

    # ------------------------------------------------------------------ setup / run
    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, lambda s, f: None)  # wakes the wait via the wakeup fd
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)

    def _on_signal(self, signum, frame) -> None:
        self._signals.append(signum)  # only enqueue; loop_once dispatches

    def preimport(self) -> None:
        """Import, in the main thread and before any thread starts, every module the threads and
        the children use. A module imported for the first time by a thread while the main thread
        forks leaves its import lock taken in the child, which then hangs on that import."""
        import importlib

        import workers

        workers.preload()
        names = ["node.api"]
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
        self.start_helpers(self.spawner.now())
        threading.Thread(target=self.poller.run, name="poller", daemon=True).start()
        threading.Thread(target=self.jobs.run, name="jobs", daemon=True).start()
        log.info(
            "supervisor running: max_tasks=%s gpus=%s identity=%s",
            self.config.max_tasks,
            self.gpu_pool,
            self.config.identity,
        )
        while self.exit_code is None:
            self.wait(self.next_timeout(self.spawner.now()))
            self.loop_once(self.spawner.now())
        self._threads_stop.set()
        log.info("supervisor exits with code %s", self.exit_code)
        return self.exit_code

    def start_helpers(self, now: float) -> None:
        for h in self.helpers:
            self.helpers.spawn(h, now)

    def children(self):
        for h in self.helpers:
            if h.child is not None:
                yield h.child
        for s in self.slots.values():
            if s.child is not None:
                yield s.child

    def wait(self, timeout: float) -> None:
        objs = [self._sig_r, self._wake_r] + [self.spawner.sentinel(c) for c in self.children()]
        ready = multiprocessing.connection.wait(objs, timeout=max(0.0, timeout))
        for fd in (self._sig_r, self._wake_r):
            if fd in ready:
                try:
                    while os.read(fd, 4096):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass

    def next_timeout(self, now: float) -> float:
        deadlines = list(self.helpers.deadlines())
        deadlines += [
            s.escalation.deadline for s in self.slots.values() if s.escalation is not None and not s.escalation.killed
        ]
        if self.fatal_exit_at is not None:
            deadlines.append(self.fatal_exit_at)
        t = min([1.0] + [d - now for d in deadlines])
        if any(s.state == SlotState.FINALIZING for s in self.slots.values()):
            t = min(t, 0.1)
        return t

    # ------------------------------------------------------------------ the loop
    def loop_once(self, now: float) -> None:
        """One iteration: signals, poll answers, job results, deaths, hangs, restarts, admissions, exit."""
        while self._signals:
            self.dispatch_signal(self._signals.pop(0), now)
        self.handle_answers(now)
        self.jobs.run_callbacks()
        self.helpers.reap(now)
        self.reap_tasks(now)
        self.helpers.check_hung(now, self.config.helper_hung_s)
        self.check_hung_tasks(now)
        self.check_disk(now)
        self.helpers.restart_due(now)
        self.finalize_slots()
        self.admit_pending(now)
        self.escalate(now)
        self.update_snapshot()
        self.check_exit(now)

    # --- signals
    def dispatch_signal(self, signum: int, now: float) -> None:
        name = signal.Signals(signum).name
        handler = getattr(self, f"handle_{name.lower()}", None)
        if handler:
            handler(now)

    def handle_sigterm(self, now: float) -> None:
        if self.draining:
            self.handle_sigint(now)
            return
        log.info(
            "SIGTERM: draining (no new tasks; %d running finish first)",
            sum(1 for s in self.slots.values() if s.state in BUSY),
        )
        self.start_draining()

    def handle_sigint(self, now: float) -> None:
        if self.stopping:
            return
        log.info("stopping: asking %d task(s) to stop", self.active_count())
        self.start_draining()
        self.stopping = True
        for slot in list(self.slots.values()):
            self.stop_task(slot, now)

    def handle_sighup(self, now: float) -> None:
        try:
            new = load_config()
        except ConfigError as e:
            log.error("SIGHUP: config not reloaded: %s", e)
            return
        self.config = new
        self.gpu_pool = gpu_pool(new.gpus)
        logging.getLogger().setLevel(getattr(logging, new.log_level.upper(), logging.INFO))
        for h in self.helpers:
            h.policy.max_deaths, h.policy.window_s = new.restart_max, new.restart_window_s
            self.helpers.stop(h, now)  # a planned restart: it comes back with the new settings
        self.disk.next_at = now  # the guard looks again at once (MIN_FREE_DISK_MB may have changed)
        log.info(
            "SIGHUP: config reloaded (max_tasks=%s, poll_wait_s=%s, gpus=%s)",
            new.max_tasks,
            new.poll_wait_s,
            self.gpu_pool,
        )

    def start_draining(self) -> None:
        """No new task from now on: tasks leased but not started yet are handed back."""
        if self.draining:
            return
        self.draining = True
        for slot in list(self.slots.values()):
            if slot.state == SlotState.PENDING and not slot.adopt:
                self.release(slot, SlotState.DONE)
                self.hand_back(slot.task_id, "leased but not started")

    def hand_back(self, task_id: int, why: str) -> None:
        """Return a task this draining agent will not run to the server (`POST .../release`, in the
        jobs thread): it is queued again for this node's next run. It never gets a slot here."""
        if task_id in self.handing_back:
            return
        log.info("task %s (%s): draining, so it is handed back to the server, never run", task_id, why)
        self.handing_back.add(task_id)

        def job():
            hand_back(self.api, task_id, self._threads_stop)
            return lambda: self.handing_back.discard(task_id)

        self.jobs.submit(job)

    # --- helpers (telemetry, log-shipper)
    def helper_fatal(self, h: Helper, message: str, now: float) -> None:
        """Log and report a FATAL helper without blocking the loop (the report runs in the jobs thread)."""
        log.critical(message)
        fatal = {"process": h.name, "reason": message, "ts": time.time()}
        config, free = self.config, self.free_slots()
        then = None
        if h.name == "log-shipper":
            # Without it no task can report a final state; a restarted agent re-adopts the tasks.
            log.critical("the log-shipper is FATAL: the agent exits (code %d) so that it can be restarted", EXIT_FATAL)
            self.fatal_exit_at = now + FATAL_REPORT_WAIT_S
            then = self._exit_fatal

        def job():
            from agent.telemetry import sample

            report_fatal(self.api, lambda: {**sample(config, free), "fatal": fatal})
            return then

        self.jobs.submit(job)

    def _exit_fatal(self) -> None:
        self.exit_code = EXIT_FATAL

    # --- tasks
    def active_count(self) -> int:
        return sum(1 for s in self.slots.values() if s.state != SlotState.DONE)

    def free_slots(self) -> int:
        refusing = self.draining or bool(self.disk.refusal) or self.fatal_exit_at is not None
        return admission.free_slots(self.config.max_tasks, self.active_count(), refusing)

    def used_gpus(self) -> set[int]:
        return {g for s in self.slots.values() if s.state != SlotState.DONE for g in s.gpus}

    def free_gpus(self) -> list[int]:
        return admission.free_gpus(self.gpu_pool, self.used_gpus())

    def check_disk(self, now: float) -> None:
        if not self.disk.due(now):
            return
        config, idle = self.config, self.active_count() == 0

        def job():
            status = self.disk.check(config, evict=idle)
            return lambda: self._apply_disk(status)

        self.jobs.submit(job)

    def _apply_disk(self, status: dict) -> None:
        if self.disk.apply(status):
            self.update_snapshot()
            self._wake()

    def update_snapshot(self) -> None:
        running = sorted(s.task_id for s in self.slots.values() if s.state != SlotState.DONE)
        snap = Snapshot(self.free_slots(), self.free_gpus(), running, self.refusal)
        self.poller.publish(snap)
        self.free_slots_shared.value = snap.free_slots

    def handle_answers(self, now: float) -> None:
        while (answer := self.poller.next_answer()) is not None:
            try:
                self.handle_answer(answer, now)
            finally:
                self.update_snapshot()
                self.poller.answered()

    def handle_answer(self, answer: dict, now: float) -> None:
        first = not self.first_poll_done
        self.first_poll_done = True
        for task in answer.get("tasks") or []:
            tid = int(task["id"])
            slot = self.slots.get(tid)
            if slot is not None and slot.state != SlotState.DONE:
                continue  # already ours (the answer crossed our running list)
            # A task that already has a durable log here was started by an earlier task process
            # or agent run: its new task process adopts (re-attaches to) it.
            adopt = tasklog.find_log_file(self.config, tid) is not None
            if self.draining and not adopt:
                # A poll sent before the SIGTERM (free slots offered) answered after it. A task
                # with a durable log here was begun on this node already: it is re-attached
                # and finishes like the running ones.
                self.hand_back(tid, "arrived after SIGTERM")
                continue
            if tasklog.is_closed(self.config, tid):
                log.warning("task %s handed out again but its final state was already reported", tid)
            slot = self.slots[tid] = Slot(task, adopt)
            if adopt:
                # Its container keeps the GPUs it was created with, whatever is free now.
                slot.held_gpus = docker_engine.recorded_gpus(self.config, tid)
            log.info("task %s (%s) leased%s", tid, task.get("type"), " (adopt)" if adopt else "")
        for tid in answer.get("stop") or []:
            slot = self.slots.get(int(tid))
            if slot is None:
                log.warning("stop request for task %s, which this agent does not run", tid)
                continue
            self.stop_task(slot, now)
        if first:
            config, keep = self.config, [int(t["id"]) for t in answer.get("tasks") or []]
            self.jobs.submit(lambda: self.engine.reap_orphans(config, keep))

    def admit_pending(self, now: float) -> None:
        if self.stopping or self.fatal_exit_at is not None:
            return
        pending = [(s.task_id, s.gpus_wanted) for s in self.slots.values() if s.state == SlotState.PENDING]
        if not pending:
            return
        busy = sum(1 for s in self.slots.values() if s.state in BUSY)
        decided = admission.admit(
            pending,
            busy,
            self.config.max_tasks,
            self.gpu_pool,
            self.used_gpus(),
            check_default_task_gpus(self.config.default_task_gpus),
        )
        for tid, reason in decided.refuse:
            slot = self.slots[tid]
            slot.final = ("failed", reason)
            slot.change(SlotState.FINALIZING)
        for tid, gpus in decided.start:
            slot = self.slots[tid]
            slot.gpus = gpus
            self.spawn_task(slot, now)

    def spawn_task(self, slot: Slot, now: float) -> None:
        if slot.stop_w is not None:
            os.close(slot.stop_w)
            slot.stop_w = None
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            role = TaskProcess(self.config, slot.task, slot.gpus, slot.adopt, r, self.ship_now)
            slot.child = self.spawner.spawn(f"task-{slot.task_id}", role, run_task_process, (role,))
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        slot.stop_w = w
        slot.spawns += 1
        slot.escalation, slot.hung = None, ""
        slot.change(SlotState.RUNNING)
        if slot.stop_requested:
            self._write_stop(slot)
            if self.stopping:
                slot.escalation = self.stop_escalation(now)
        log.info(
            "task %s: task process %s started (gpus %s%s)",
            slot.task_id,
            slot.child.pid,
            slot.gpus,
            ", adopting" if slot.adopt else "",
        )

    def stop_escalation(self, since: float) -> Escalation:
        return Escalation(since, self.config.stop_grace_s + STOP_KILL_AFTER_S, "its stop request")

    def stop_task(self, slot: Slot, now: float) -> None:
        """Ask a task to stop: through its stop pipe (the handler stops the container and reports
        `stopped`). While the agent itself stops, a task process that outlives
        stop_grace_s + STOP_KILL_AFTER_S is killed."""
        if slot.state == SlotState.PENDING:
            slot.stop_requested = True
            slot.final = ("stopped", "stopped before it started")
            slot.change(SlotState.FINALIZING)
            return
        if slot.state == SlotState.RUNNING:
            slot.stop_requested = True
            slot.stop_at = now
            slot.change(SlotState.STOPPING)
            self._write_stop(slot)
            log.info("task %s: stop requested", slot.task_id)
        if self.stopping and slot.stop_requested and slot.child is not None and slot.escalation is None:
            slot.escalation = self.stop_escalation(slot.stop_at)

    def _write_stop(self, slot: Slot) -> None:
        try:
            os.write(slot.stop_w, b"s")
        except OSError:
            pass

    def check_hung_tasks(self, now: float) -> None:
        """A task process beats from its `watch` thread; silent past the deadline it is asked to go
        (it ignores SIGTERM by design, so in effect it is killed after the grace) and its death
        takes the usual path: replaced to re-attach to a running container, else failed."""
        limit = self.config.helper_hung_s
        for slot in self.slots.values():
            if slot.child is None:
                continue
            if slot.hung and not slot.escalation.killed and self.spawner.last_beat(slot.child) > slot.escalation.since:
                # It beats again (it ignores SIGTERM): it was only frozen (e.g. the whole agent
                # was paused); killing it now would only make its replacement re-attach.
                log.info("task %s: task process beats again; not killing it", slot.task_id)
                slot.escalation, slot.hung = None, ""
                if self.stopping and slot.stop_requested:
                    slot.escalation = self.stop_escalation(slot.stop_at)
            if slot.escalation is not None:
                continue
            silent = silent_for(self.spawner, slot.child, now)
            if silent > limit:
                slot.hung = f"hung: no heartbeat for {silent:.0f}s"
                log.warning(
                    "task %s: task process (pid %s) sent no heartbeat for %.0fs: hung; stopping it",
                    slot.task_id,
                    slot.child.pid,
                    silent,
                )
                slot.escalation = Escalation(now, HUNG_KILL_AFTER_S, "SIGTERM for a missed heartbeat")
                self.spawner.terminate(slot.child)

    def reap_tasks(self, now: float) -> None:
        for slot in list(self.slots.values()):
            if slot.child is None:
                continue
            code = self.spawner.exitcode(slot.child)
            if code is None:
                continue
            self.spawner.reap(slot.child)
            slot.child, slot.escalation = None, None
            if code == 0 or tasklog.is_closed(self.config, slot.task_id):
                self.release(slot, SlotState.DONE)
                log.info("task %s: task process done", slot.task_id)
                continue
            reason = f"task process {describe_exit(code)}" + (f" ({slot.hung})" if slot.hung else "")
            log.warning("task %s: %s", slot.task_id, reason)
            if (
                slot.spawns <= MAX_RESPAWNS
                and slot.type in CONTAINER_TYPES
                and self.engine.container_running(self.config, slot.task_id)
            ):
                log.info("task %s: its container still runs; a new task process re-attaches", slot.task_id)
                slot.adopt = True
                self.spawn_task(slot, now)
                continue
            slot.final = ("stopped" if slot.stop_requested and code == -signal.SIGKILL else "failed", reason)
            slot.change(SlotState.FINALIZING)

    def finalize_slots(self) -> None:
        """Report the final state of dead task processes once their log is fully acked."""
        for slot in self.slots.values():
            if slot.state != SlotState.FINALIZING or slot.final_sent:
                continue
            if not tasklog.fully_acked(self.config, slot.task_id):
                continue
            slot.final_sent = True
            self.jobs.submit(lambda slot=slot: self._report_final(slot))

    def _report_final(self, slot: Slot):
        """Jobs thread: post the final state (retrying), mark the log closed; the slot is freed in main."""
        state, error = slot.final
        report_final(self.api, slot.task_id, state, error, self._threads_stop)
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

    def escalate(self, now: float) -> None:
        self.helpers.escalate(now)
        for slot in self.slots.values():
            escalate(self.spawner, slot.child, slot.escalation, now, log, f"task {slot.task_id}: task process")

    def check_exit(self, now: float) -> None:
        if self.exit_code is not None:
            return
        if self.fatal_exit_at is not None:
            if now >= self.fatal_exit_at:
                log.error("FATAL not reported within %.0fs; exiting anyway", FATAL_REPORT_WAIT_S)
                self.exit_code = EXIT_FATAL
            return
        if not self.draining or self.handing_back or any(s.state in BUSY for s in self.slots.values()):
            return
        # Tasks first, then telemetry, the log-shipper last (it drains).
        if not self.helpers.shutting_down:
            self.helpers.shutting_down = True
            log.info("no task runs: stopping telemetry, then the log-shipper")
        if self.helpers.stop_in_order(HELPER_ORDER, now):
            self.exit_code = EXIT_OK

    # ------------------------------------------------------------------ threads
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass
