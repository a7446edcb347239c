"""Background work that never takes a core from a request: one idle-priority worker thread per process.

Online adaptation and state saving run here, never on a request's thread. Three rules keep them out of the
user's way on a 2-core machine, where llama.cpp's two threads collapse when anything else takes CPU:

* **A process-wide activity signal.** ``ACTIVITY`` counts the requests decoding in this process (every
  runtime's ``Generation`` enters it when it starts and leaves it when it ends). The worker runs a step only
  while the count is zero, so adaptation for one runtime also waits for every other runtime's requests.
* **Short steps.** A job is an iterator; each ``next()`` is one short step (an optimizer step of a few ms).
  The worker checks the signal between steps, so a request that starts mid-update waits at most one step.
* **The lowest OS priority.** The worker thread runs under ``SCHED_IDLE`` on Linux (it gets a core only when
  nothing else wants one) and the background QoS class on macOS (efficiency cores). torch is held to the
  calling thread (``torch.set_num_threads(1)``, set by the job), so no spinning pool threads are left.

At interpreter exit the worker is stopped after its current step (before Python tears down the threads a
native library may hold), and every registered ``at_exit`` callback (saving adapted state) runs once.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator


class Activity:
    """How many requests are decoding in this process; background steps run only while it is zero."""

    def __init__(self):
        self._cond = threading.Condition()
        self._count = 0
        self.waiting = 0  # threads blocked in wait_idle by a request (tests watch it)

    def enter(self) -> None:
        with self._cond:
            self._count += 1

    def leave(self) -> None:
        with self._cond:
            self._count = max(self._count - 1, 0)
            self._cond.notify_all()

    def busy(self) -> bool:
        return self._count > 0

    def wait_idle(self, timeout: float | None = None, abort: Callable[[], bool] = lambda: False) -> bool:
        """Block until no request decodes (True), or ``timeout`` seconds pass or ``abort()`` holds after a
        ``wake`` (False)."""
        with self._cond:
            if self._count == 0:
                return True
            self.waiting += 1
            try:
                self._cond.wait_for(lambda: self._count == 0 or abort(), timeout)
                return self._count == 0
            finally:
                self.waiting -= 1

    def wake(self) -> None:
        """Make waiters look at their ``abort`` condition again."""
        with self._cond:
            self._cond.notify_all()


ACTIVITY = Activity()

QOS_CLASS_BACKGROUND = 0x09  # macOS <sys/qos.h>


def lower_priority() -> str:
    """Put the calling thread at the lowest scheduling priority the OS offers; returns what was applied."""
    if sys.platform.startswith("linux"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # pid 0: this thread (a Linux task)
            return "SCHED_IDLE"
        except (OSError, AttributeError):
            pass
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 19)  # on Linux this too applies to the calling thread only
            return "nice 19"
        except OSError:
            return "normal"
    if sys.platform == "darwin":
        try:
            libc = ctypes.CDLL("/usr/lib/libSystem.dylib")
            if libc.pthread_set_qos_class_self_np(QOS_CLASS_BACKGROUND, 0) == 0:
                return "QOS_CLASS_BACKGROUND"
        except (OSError, AttributeError):
            pass
    return "normal"


class Worker:
    """One daemon thread that runs jobs step by step while ``activity`` is idle. A job is keyed: submitting
    a key that is already queued or running does nothing (one update per adapter at a time)."""

    def __init__(self, activity: Activity = ACTIVITY):
        self.activity = activity
        self._cond = threading.Condition()
        self._jobs: list[tuple[object, Iterator]] = []
        self._running: object | None = None
        self._in_step = False  # the running job is inside a step (not waiting for idle time)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.priority = ""  # what lower_priority applied to the thread
        self.steps = 0  # steps run, in all

    def submit(self, key: object, job: Iterator) -> bool:
        """Queue ``job`` (an iterator of steps) under ``key``; False if that key is already queued or running,
        or the worker is stopping."""
        with self._cond:
            if self._stopping or key == self._running or any(k == key for k, _ in self._jobs):
                return False
            self._jobs.append((key, job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="edgespec-background", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return True

    def pending(self, key: object | None = None) -> bool:
        """Is a job (with ``key``, or any) queued or running?"""
        with self._cond:
            keys = [k for k, _ in self._jobs] + ([self._running] if self._running is not None else [])
            return bool(keys) if key is None else key in keys

    def cancel(self, key: object) -> None:
        """Drop ``key``'s job and wait until its running step (if any) is over; the job takes no further step."""
        with self._cond:
            self._jobs = [(k, j) for k, j in self._jobs if k != key]
            self._cond.wait_for(lambda: not (self._running == key and self._in_step))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every job has finished (True) or ``timeout`` passes (False). Jobs still need idle time:
        call it while no request decodes."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and self._running is None, timeout)

    def stop(self) -> None:
        """Finish the running step, drop the rest and end the thread (at exit, or in tests)."""
        with self._cond:
            self._stopping = True
            self._jobs.clear()
            self._cond.notify_all()
            thread = self._thread
        self.activity.wake()  # a worker waiting for a request that will never end (an open stream at exit)
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _loop(self) -> None:
        self.priority = lower_priority()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._stopping)
                if self._stopping:
                    return
                key, job = self._jobs[0]
                self._running = key
            try:
                while True:
                    self.activity.wait_idle(abort=lambda: self._stopping)  # a request decodes: wait for its end
                    with self._cond:
                        if self._stopping or not any(k == key for k, _ in self._jobs):
                            break  # stopped, or cancelled
                        self._in_step = True
                    try:
                        next(job)
                    except StopIteration:
                        break
                    except Exception as e:  # a failing job is dropped; the request path never sees it
                        print(f"edgespec: background job failed: {type(e).__name__}: {e}", file=sys.stderr)
                        break
                    finally:
                        with self._cond:
                            self._in_step = False
                            self._cond.notify_all()
                    self.steps += 1
            finally:
                with self._cond:
                    self._jobs = [(k, j) for k, j in self._jobs if k != key]
                    self._running = None
                    self._cond.notify_all()


WORKER = Worker()
_EXIT_CALLBACKS: dict[int, Callable[[], None]] = {}


def at_exit(owner: object, fn: Callable[[], None]) -> None:
    """Run ``fn`` once at interpreter exit, after the worker has stopped (``forget(owner)`` cancels it)."""
    _EXIT_CALLBACKS[id(owner)] = fn


def forget(owner: object) -> None:
    _EXIT_CALLBACKS.pop(id(owner), None)


@atexit.register
def _shutdown() -> None:
    WORKER.stop()
    for fn in list(_EXIT_CALLBACKS.values()):
        try:
            fn()
        except Exception as e:
            print(f"edgespec: at exit: {type(e).__name__}: {e}", file=sys.stderr)
    _EXIT_CALLBACKS.clear()


def timed_wait(worker: Worker = WORKER) -> float:
    """Wait for the worker to finish its jobs; the seconds it took (the benches report it)."""
    t0 = time.perf_counter()
    worker.wait()
    return time.perf_counter() - t0
