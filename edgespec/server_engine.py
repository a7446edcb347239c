"""The server's engine: a bounded FIFO of requests (``Job``) served one at a time by one worker thread that
drives each ``Generation`` and hands its text to the event loop."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from edgespec.models.drafting.prediction import PredictionDrafter
from edgespec.options import Request
from edgespec.runtime import ClosedError, Runtime


class QueueFull(RuntimeError):
    """More requests than ``--max-queue`` wait for the model."""


class RequestTimeout(RuntimeError):
    """The request ran past ``--request-timeout``."""


class Ticket:
    """A request's place in the engine, from admission (before its prompt is tokenized) to its end."""

    def __init__(self, engine: Engine):
        self.engine, self.held = engine, True

    def release(self) -> None:
        """Give the place back (once; later calls do nothing)."""
        self.engine._release(self)


@dataclass
class Job:
    """One request on its way through the queue. The worker reports ``("start", queued_s)``,
    ``("chunk", text)``, ``("done", Generation)`` or ``("error", exc)`` on ``events`` (thread-safe)."""

    tokens: list[int]
    req: Request
    loop: asyncio.AbstractEventLoop
    drafter: PredictionDrafter | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    ticket: Ticket | None = None  # released when the job ends or leaves the queue
    deadline: float | None = None  # time.monotonic() after which the request is cut (--request-timeout)
    reason: str | None = None  # why the server cut the request: "shutdown", "timeout" or "superseded"
    # text is handed to the event loop at most once per ``interval`` seconds (the first piece at once; inf:
    # only with the end): each hand-over wakes the loop and the client, and on a 2-core machine every wake-up
    # takes a core from the decoding threads
    interval: float = 0.0
    _text: list[str] = field(default_factory=list)
    _scheduled: bool = False
    _last: float = -math.inf
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def stopped(self) -> bool:
        """The request's ``cancel``: the client left, the server stops, or the deadline has passed."""
        if self.cancel.is_set():
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.cut("timeout")
            return True
        return False

    def cut(self, reason: str) -> None:
        """The server stops the request (the client is told why)."""
        if self.reason is None:
            self.reason = reason
        self.cancel.set()

    def error(self) -> Exception:
        """What the client is told about a request that stopped early."""
        if self.reason == "timeout":
            return RequestTimeout("the request took longer than the server's --request-timeout")
        if self.reason == "superseded":
            return ClosedError("the request was replaced by a newer one from the same client")
        return ClosedError("the server is shutting down" if self.reason == "shutdown" else "the request was cancelled")

    async def next_event(self) -> tuple[str, object]:
        """In the event loop: the next event. Past the deadline the request is cut, and leaves the queue if it
        still waits there: its error event follows (from the queue, or from the worker at its next step)."""
        while True:
            left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            try:
                return await asyncio.wait_for(self.events.get(), left)
            except asyncio.TimeoutError:
                self.deadline = None  # cut once
                self.cut("timeout")
                if self.ticket is not None:
                    self.ticket.engine.remove(self)

    def emit(self, kind: str, value=None) -> None:
        if kind == "chunk" and self.interval > 0:
            with self._lock:
                self._text.append(value)
                if self._scheduled or self.interval == math.inf:
                    return
                self._scheduled = True
                delay = self._last + self.interval - time.perf_counter()
            if delay > 0:
                self._call(self.loop.call_later, delay, self._flush)
            else:
                self._call(self._flush)
            return
        text = self._take()  # the end (or an error) comes after all the text before it
        if text:
            self._call(self.events.put_nowait, ("chunk", text))
        self._call(self.events.put_nowait, (kind, value))

    def _take(self) -> str:
        with self._lock:
            text, self._text = "".join(self._text), []
            return text

    def _flush(self) -> None:
        """In the event loop: hand over the text gathered since the last hand-over."""
        with self._lock:
            self._scheduled = False
            self._last = time.perf_counter()
        text = self._take()
        if text:
            self.events.put_nowait(("chunk", text))

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


class Engine:
    """A bounded FIFO of requests served one at a time by one worker thread."""

    def __init__(self, rt: Runtime, max_queue: int, on_done=None):
        self.rt = rt
        self.max_queue = max_queue  # requests that may wait besides the running one
        self.on_done = on_done  # called in the worker with (job, generation) after each request
        self.current: Job | None = None
        self.generated = 0  # tokens generated so far, counted at every step (live)
        self.mean_s = 1.0  # running mean of a request's time, for Retry-After
        self._jobs: deque[Job] = deque()
        self._admitted = 0  # requests being prepared, waiting or running
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgespec-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def admit(self) -> Ticket:
        """A place for a new request, taken before it is prepared: ``QueueFull`` when ``max_queue`` requests
        besides the running one are already admitted (counted from the first, even while the worker idles)."""
        with self._cond:
            if self._stopping:
                raise ClosedError("the server is shutting down")
            if self._admitted > self.max_queue:
                raise QueueFull(f"{self._admitted - 1} requests are waiting (--max-queue {self.max_queue})")
            self._admitted += 1
            return Ticket(self)

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.held:
                ticket.held = False
                self._admitted -= 1

    def submit(self, job: Job) -> None:
        """Queue an admitted job (its ``ticket``)."""
        with self._cond:
            if self._stopping:
                raise ClosedError("the server is shutting down")
            self._jobs.append(job)
            self._cond.notify_all()

    def remove(self, job: Job) -> None:
        """Take a job out of the queue if it still waits there (its client left) and give its place back; its
        handler, if it still waits for events, gets an error."""
        with self._cond:
            if job not in self._jobs:
                return
            self._jobs.remove(job)
            if job.ticket is not None:
                job.ticket.release()
        job.cancel.set()
        job.emit("error", job.error())

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil(self.mean_s * (len(self._jobs) + 1))))

    def cancel_all(self) -> None:
        """Stop the running request and everything queued (shutdown)."""
        with self._cond:
            self._stopping = True
            for job in list(self._jobs) + ([self.current] if self.current else []):
                job.cut("shutdown")
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        self.cancel_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self.current = self._jobs.popleft()
            try:
                self._serve(job)
            finally:
                with self._cond:
                    self.current = None
                if job.ticket is not None:
                    job.ticket.release()

    def _serve(self, job: Job) -> None:
        if job.stopped():  # the client left, the server stops, or the time ran out while it waited
            job.emit("error", job.error())
            return
        t0 = time.perf_counter()
        job.emit("start", t0 - job.submitted)
        counted = 0
        gen = None
        try:
            gen = self.rt.start(job.tokens, job.req, drafter=job.drafter)
            for chunk in gen:
                n = len(gen.tokens)
                self.generated += n - counted
                counted = n
                job.emit("chunk", chunk)
            self.generated += len(gen.tokens) - counted
            if self.on_done is not None:
                self.on_done(job, gen)
            # cut by the server (shutdown, timeout): an error, so that the answer never looks complete
            if gen.stats.finish_reason == "cancelled" and job.reason:
                job.emit("error", job.error())
            else:
                job.emit("done", gen)
        except Exception as e:  # reported to the client; the server goes on
            job.emit("error", e)
        finally:
            if gen is not None:
                gen.close()
            self.mean_s = 0.8 * self.mean_s + 0.2 * (time.perf_counter() - t0)
