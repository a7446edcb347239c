"""The server's engine: a bounded FIFO of requests (``Job``) served one at a time by one worker thread that
drives each ``Generation`` and hands its text to the event loop."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from edgespec.models.prediction import PredictionDrafter
from edgespec.runtime import ClosedError, Request, Runtime


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
    # text is handed to the event loop at most once per ``interval`` seconds (the first piece at once; inf:
    # only with the end): each hand-over wakes the loop and the client, and on a 2-core machine every wake-up
    # takes a core from the decoding threads
    interval: float = 0.0
    _text: list[str] = field(default_factory=list)
    _scheduled: bool = False
    _last: float = -math.inf
    _lock: threading.Lock = field(default_factory=threading.Lock)

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


class QueueFull(RuntimeError):
    pass


class Engine:
    """A bounded FIFO of requests served one at a time by one worker thread."""

    def __init__(self, rt: Runtime, max_queue: int, on_done=None):
        self.rt = rt
        self.max_queue = max_queue
        self.on_done = on_done  # called in the worker with (job, generation) after each request
        self.current: Job | None = None
        self.generated = 0  # tokens generated so far, counted at every step (live)
        self.mean_s = 1.0  # running mean of a request's time, for Retry-After
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgespec-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ClosedError("the server is shutting down")
            if self.current is not None and len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are waiting (--max-queue {self.max_queue})")
            self._jobs.append(job)
            self._cond.notify_all()

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil(self.mean_s * (len(self._jobs) + 1))))

    def cancel_all(self) -> None:
        """Stop the running request and everything queued (shutdown)."""
        with self._cond:
            self._stopping = True
            for job in list(self._jobs) + ([self.current] if self.current else []):
                job.cancel.set()
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

    def _serve(self, job: Job) -> None:
        if job.cancel.is_set():  # the client left (or the server stops) while it waited
            job.emit("error", ClosedError("cancelled before it started"))
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
            job.emit("done", gen)
        except Exception as e:  # reported to the client; the server goes on
            job.emit("error", e)
        finally:
            if gen is not None:
                gen.close()
            self.mean_s = 0.8 * self.mean_s + 0.2 * (time.perf_counter() - t0)
