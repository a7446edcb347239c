"""Background work yields the cores: idle priority, only while no request decodes in the process (a signal
shared by every runtime), paused within one step when a request starts, stopped cleanly at exit."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import QWEN, SMALL

import edgespec
from edgespec import background
from edgespec.background import Activity, Worker


def until(cond, limit: float = 30.0) -> None:
    """Wait for ``cond()`` (a deadline against a hung test, not a timing assertion)."""
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def blocked_on(act: Activity) -> bool:
    return act.waiting > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_worker_thread_runs_at_idle_priority():
    w, seen = Worker(Activity()), []

    def job():
        seen.append(os.sched_getscheduler(0))
        yield

    w.submit("k", job())
    assert w.wait(30)
    w.stop()
    assert seen == [os.SCHED_IDLE] and w.priority == "SCHED_IDLE"


def test_a_request_started_mid_update_stops_it_within_one_step():
    act = Activity()
    w, log = Worker(act), []

    def job():
        for i in range(5):
            log.append(i)
            if i == 1:
                act.enter()  # a request starts while step 1 runs
            yield

    w.submit("adapt", job())
    until(lambda: blocked_on(act))
    assert log == [0, 1]  # step 1 finished; step 2 waits for the request
    act.leave()
    assert w.wait(30)
    assert log == [0, 1, 2, 3, 4]
    w.stop()


def test_one_job_per_key_and_cancel_drops_the_rest():
    act = Activity()
    w, log = Worker(act), []
    act.enter()  # busy: nothing runs yet

    def job(tag):
        for i in range(3):
            log.append((tag, i))
            yield

    assert w.submit("a", job("a"))
    assert not w.submit("a", job("a2"))  # already queued
    assert w.submit("b", job("b"))
    until(lambda: blocked_on(act))
    w.cancel("a")
    act.leave()
    assert w.wait(30)
    assert log == [("b", 0), ("b", 1), ("b", 2)]
    w.stop()
    assert not w.submit("c", job("c"))  # stopped


def test_two_runtimes_share_the_signal(smol_path):
    """A request on one runtime holds back background work queued by any runtime in the process."""
    # by id: a .gguf path is checked twice per load (its header read in a child each time), and what is shared
    # here does not depend on how the model is named
    a = edgespec.load(SMALL, n_ctx=256, draft="none", adapt=False)
    b = edgespec.load(SMALL, n_ctx=256, draft="none", adapt=False)
    try:
        gen = b.stream("Once upon a time", max_tokens=8)
        next(gen)  # runtime b is decoding
        ran = threading.Event()

        def job():  # as runtime a's adaptation would be
            ran.set()
            yield

        background.WORKER.submit(("test", id(a)), job())
        until(lambda: blocked_on(background.ACTIVITY))
        assert not ran.is_set()
        gen.close()  # the request ends: the job runs
        assert background.WORKER.wait(30) and ran.is_set()
        assert not background.ACTIVITY.busy()
    finally:
        a.close()
        b.close()


def test_exit_with_open_runtimes_and_adaptation_running(tmp_path, qwen_path):
    """No close(), an adaptation update queued or running, a stream half read: the process exits cleanly."""
    from edgespec import drafters

    if drafters.redrafter_weights(QWEN) is None or not drafters.trainer_available():
        pytest.skip("needs the shipped head and torch")
    script = textwrap.dedent(f"""
        import edgespec
        from edgespec import background
        rt = edgespec.load({QWEN!r}, n_ctx=512, draft="redrafter", adapt=True)
        other = edgespec.load({SMALL!r}, n_ctx=256, draft="none", adapt=False)
        rt.generate("def quicksort(xs):", max_tokens=48)
        assert rt.adapter is not None and background.WORKER.pending(rt.adapter), "no update queued"
        background.WORKER.activity.wait_idle()
        half = other.stream("Once upon a time", max_tokens=32)
        next(half)
        print("exiting", flush=True)
    """)
    (tmp_path / "models").symlink_to(os.path.dirname(str(qwen_path)))  # the models, but a fresh adapted state
    env = {**os.environ, "EDGESPEC_HOME": str(tmp_path), "EDGESPEC_HUGE_PAGES": "0"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exiting" in r.stdout
    assert "terminate called" not in r.stderr and "Traceback" not in r.stderr
