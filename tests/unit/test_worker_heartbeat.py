"""When the supervisor calls a worker hung (balloond/worker/heartbeat.py):
silence for the timeout, on time; never because the supervisor itself did
not run. The rule alone (`judge`), then the supervisor's reading of a real
socketpair with the test as the worker; a loop blocked with time.sleep is
a supervisor that was stopped."""

from __future__ import annotations

import asyncio
import time

import pytest

from balloond.worker.heartbeat import LATE_GRACE, Heartbeat, Verdict, judge
from tests.unit.test_worker_freshness import running_vm

TIMEOUT = 0.3


@pytest.mark.parametrize(("now", "due", "last_heard", "verdict"), [
    (5.0, 5.0, 0.0, Verdict.SILENT),  # on time, nothing since
    (5.0 + LATE_GRACE, 5.0, 0.0, Verdict.SILENT),  # late, but within the grace
    (5.01 + LATE_GRACE, 5.0, 0.0, Verdict.AWAY),  # the supervisor did not run at the deadline
    (60.0, 5.0, 0.0, Verdict.AWAY),  # a host suspended for a minute
    (5.0, 5.0, 0.5, Verdict.HEARD),  # a message after the timer was set
    (60.0, 5.0, 56.0, Verdict.HEARD),  # heard after a long absence: alive
])
def test_judge(now, due, last_heard, verdict):
    assert judge(now, due, last_heard, timeout=5.0) is verdict


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_a_silent_worker_is_hung_after_the_timeout_and_beats_keep_it_alive():
    async def go():
        loop = asyncio.get_running_loop()
        heartbeat = Heartbeat(loop, TIMEOUT)
        start = loop.time()
        for _ in range(6):  # 0.6 s of beats every 0.1 s
            await asyncio.sleep(0.1)
            heartbeat.beat()
        assert not heartbeat.hung.done()
        await asyncio.wait_for(heartbeat.hung, 2)
        took = loop.time() - start
        assert 0.6 + TIMEOUT <= took < 0.6 + TIMEOUT + 0.5, took
        assert heartbeat.away == 0
    run(go())


def test_a_supervisor_that_did_not_run_does_not_call_its_worker_hung():
    """Stopped for three timeouts (the worker stopped with it, as on a
    suspended host): a full timeout from when it runs again, then the
    silence counts."""
    async def go():
        loop = asyncio.get_running_loop()
        aways: list[float] = []
        heartbeat = Heartbeat(loop, TIMEOUT, on_away=aways.append)
        time.sleep(3 * TIMEOUT)  # the loop does not run
        resumed = loop.time()
        await asyncio.sleep(TIMEOUT * 0.8)
        assert not heartbeat.hung.done(), "killed for a silence the supervisor was not there to hear"
        assert heartbeat.away == 1 and len(aways) == 1 and aways[0] > LATE_GRACE - 0.01
        await asyncio.wait_for(heartbeat.hung, 2)
        assert loop.time() - resumed >= TIMEOUT
    run(go())


def test_a_closed_heartbeat_never_calls_hung():
    async def go():
        heartbeat = Heartbeat(asyncio.get_running_loop(), 0.05)
        heartbeat.close()
        await asyncio.sleep(0.2)
        assert not heartbeat.hung.done()
    run(go())


def test_the_supervisor_keeps_a_worker_whose_reports_waited_unread():
    """The supervisor alone was stopped past the deadline while its worker
    went on reporting: the reports waited in the channel. The worker lives
    on, and the supervisor takes what it sent."""
    async def go():
        vm, worker, reading = await running_vm(timeout=TIMEOUT)
        stopped_until = time.monotonic() + 4 * TIMEOUT
        while time.monotonic() < stopped_until:  # the loop does not run; the worker reports
            worker.report(0, connected=True)
            time.sleep(0.1)
        await asyncio.sleep(TIMEOUT / 2)
        assert not reading.done(), reading.result()
        assert vm.serving.connected
        # and silence on time still ends it
        assert await asyncio.wait_for(reading, 2) == f"no heartbeat for {TIMEOUT:.1f} s"
    run(go())


def test_a_report_read_in_the_turn_the_deadline_fires_counts():
    """The supervisor was held up until just past the deadline (within
    LATE_GRACE), and the worker's report came meanwhile: the timer and the
    socket are ready in the same turn of the loop, the timer runs first,
    and the report must still count."""
    async def go():
        vm, worker, reading = await running_vm(timeout=TIMEOUT)
        await asyncio.sleep(0)  # _read's task is reading
        time.sleep(TIMEOUT / 2)
        worker.report(0, connected=True)  # written to the socket now; read when the loop runs
        time.sleep(TIMEOUT / 2 + 0.1)  # past the deadline, well within the grace
        await asyncio.sleep(TIMEOUT / 2)
        assert not reading.done(), reading.result()
        assert vm.serving.connected
        reading.cancel()
    run(go())
