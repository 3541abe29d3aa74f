"""The driver's console: per-epoch lines from the workers, the resources notice, Ctrl+C.

Rank 0 of every category puts one message per epoch on a Ray queue (worker.py); a driver thread
prints it as one line, instead of Ray's worker logs. A category whose workers have not started
after WAIT_NOTICE_S says what it waits for, but only while Ray really holds its worker group
back (a pending placement group), not while placed workers are still starting up.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray
import ray.exceptions
from ray.util.queue import Empty, Queue

from memkd_ray.config import DistributedConfig
from memkd_ray.distributed.cluster import needs, pending_worker_groups
from memkd_ray.engine import format_epoch

WAIT_NOTICE_S = 15.0
"""A category whose workers have not started after this long may say what it waits for."""


@ray.remote(num_cpus=0)
class StopFlag:
    """Set once by the driver on Ctrl+C; every worker polls it (worker.StopPolling)."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class Interruption:
    """SIGINT/SIGTERM while a run is under way: the first asks for a stop, a second forces it.

    The handlers only set events (no I/O: a handler may run while the main thread holds the
    logging lock); the waiting loop reports them.
    """

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.forced = threading.Event()
        self.signal = ""

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested.is_set():
            self.forced.set()
        else:
            self.signal = signal.Signals(signum).name
            self.requested.set()

    @contextmanager
    def handlers(self) -> Iterator[Interruption]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Progress:
    """Prints the workers' messages from a driver thread; `launched(category)` when its
    trainer starts, `started(category)` tells whether its workers run the training loop."""

    def __init__(self, d: DistributedConfig, say: Callable[[str], None]) -> None:
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._distributed, self._say = d, say
        self._launched: dict[str, float] = {}
        self._started: set[str] = set()
        self._noticed: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._print, daemon=True)
        self._thread.start()

    def launched(self, category: str) -> None:
        with self._lock:
            self._launched[category] = time.monotonic()

    def started(self, category: str) -> bool:
        with self._lock:
            return category in self._started

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        ray.kill(self.queue.actor)

    def _print(self) -> None:
        noticed = time.monotonic()
        while not (self._stop.is_set() and self._empty()):
            if time.monotonic() - noticed >= 1.0:  # however busy the queue is
                self._notice()
                noticed = time.monotonic()
            try:
                message = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except ray.exceptions.RayError as exc:
                # The queue's actor died (its node was lost): only the console lines are lost;
                # results come through Ray Train. No category is left looking unplaced.
                self._say(f"progress lines lost ({type(exc).__name__}); training goes on, "
                          "results at the end")
                with self._lock:
                    self._started |= set(self._launched)
                return
            self._show(message)

    def _empty(self) -> bool:
        try:
            return self.queue.empty()
        except ray.exceptions.RayError:
            return True

    def _show(self, message: dict[str, Any]) -> None:
        category = message["category"]
        if message["event"] == "started":
            with self._lock:
                self._started.add(category)
        elif message["event"] == "resumed":
            self._say(f"{category}: resumed from the checkpoint of epoch {message['epoch']}")
        else:
            self._say(format_epoch(category, message))

    def _notice(self) -> None:
        """Name the categories Ray holds back: only as many as there are pending placement
        groups of their shape, and only once each."""
        now = time.monotonic()
        with self._lock:
            unstarted = [c for c, t in self._launched.items() if c not in self._started]
            due = [c for c in unstarted if c not in self._noticed
                   and now - self._launched[c] >= WAIT_NOTICE_S]
        if not due:
            return
        pending = pending_worker_groups(self._distributed)
        if pending == 0:
            return  # placed: their workers are starting
        if pending < len(unstarted):
            self._say(f"{pending} of {', '.join(unstarted)}: waiting for resources: "
                      f"{needs(self._distributed)}")
            due = unstarted
        else:
            for category in due:
                self._say(f"{category}: waiting for resources: {needs(self._distributed)}")
        self._noticed.update(due)


def one_line_reason(exc: BaseException) -> str:
    """The innermost error's `Type: message` line, not Ray's wall of tracebacks."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line[:500]
    return (lines[-1] if lines else type(exc).__name__)[:500]
