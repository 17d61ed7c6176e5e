#!/usr/bin/env python3
"""Reproducer: a guest whose used ring aliases its avail ring stalls the daemon.

The guest sets its inflate queue's used ring address equal to its avail ring
address (the addresses are the guest's to choose). Every chain the device
returns then bumps the avail index it reads next, so the ring never looks
empty. Found by fuzz/fuzz_rings.py as an endless loop in
BalloonDevice._pop_all (bounded to one queue's worth per pass since); this
script checks the engine around it: the poll loop after a kick
(VhostUserConnection._kicked with --poll-us > 0) and `_sleep`, which must
hand control back to the event loop so that other VMs' connections (here a
bystander on the same loop) are served.

    [REPRO_PFNS=1024] [REPRO_HEADS=128] python fuzz/repro_ring_alias.py [poll_us]

Prints how long the kick callback kept the event loop; exits 1 if a
bystander request waited more than a second (SIGALRM aborts a real hang
after 20 s).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from balloond.device.balloon import BalloonDevice, DeviceSettings  # noqa: E402
from balloond.engine.connection import VhostUserConnection  # noqa: E402
from fuzz.common import CapturingLog  # noqa: E402
from fuzz.vhost import GOOD_REGIONS, RAM_SIZE, UADDR_BASE, Bystander, send_message  # noqa: E402
from protocol import vhost_user as vu  # noqa: E402
from protocol.balloon import Feature  # noqa: E402
from protocol.vhost_user import Request, VringAddr, VringState  # noqa: E402
from protocol.virtqueue import DESC  # noqa: E402

NUM = 128


async def main(poll_us: float) -> int:
    loop = asyncio.get_running_loop()
    bystander = Bystander()
    await bystander.start()
    fd = os.memfd_create("alias-ram", 0)
    os.ftruncate(fd, RAM_SIZE)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    device = BalloonDevice(DeviceSettings(stats_interval=0, discard_max_delay=0), log=CapturingLog())
    conn = VhostUserConnection(theirs, device, log=CapturingLog(), poll_seconds=poll_us / 1e6)
    task = loop.create_task(conn.run())
    # The guest: one inflate chain at head 0 (4 PFNs), avail idx 1, used ring == avail ring.
    desc, avail = 0x10000, 0x11000
    npfns = int(os.environ.get("REPRO_PFNS", "4"))  # PFNs per buffer (1024 = the 4 KiB maximum)
    os.pwrite(fd, DESC.pack(0x20000, 4 * npfns, 0, 0), desc)
    nheads = int(os.environ.get("REPRO_HEADS", "1"))  # chains made available at once (up to 128)
    os.pwrite(fd, struct.pack("<HH", 0, nheads) + bytes(2 * NUM + 2), avail)
    os.pwrite(fd, struct.pack(f"<{npfns}I", *(0x40 + i % 64 for i in range(npfns))), 0x20000)

    async def send(req: int, payload: bytes = b"", fds: list[int] = ()) -> None:  # type: ignore[assignment]
        await send_message(ours, vu.encode_message(req, payload), list(fds))

    await send(Request.SET_FEATURES, vu.encode_u64((1 << Feature.VERSION_1) | (1 << vu.F_PROTOCOL_FEATURES)))
    dup = os.dup(fd)
    await send(Request.SET_MEM_TABLE, vu.encode_mem_table(list(GOOD_REGIONS[0])), [dup])
    os.close(dup)
    kicks = []
    for q in (0, 1):
        a = UADDR_BASE + avail + q * 0x2000
        d = UADDR_BASE + desc + q * 0x2000
        await send(Request.SET_VRING_NUM, VringState(q, NUM).encode())
        await send(Request.SET_VRING_ADDR, VringAddr(q, 0, d, a, a, 0).encode())  # used == avail
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        await send(Request.SET_VRING_KICK, vu.encode_vring_file(q, True), [kick])
        kicks.append(kick)
        await send(Request.SET_VRING_ENABLE, VringState(q, 1).encode())
    settle = time.monotonic() + 0.05
    while time.monotonic() < settle:
        await asyncio.sleep(0.001)
    # Ring 0 may have been looked at when it went live; kick it now and see
    # how long the bystander waits for its GET_FEATURES reply.
    start = time.monotonic()
    os.eventfd_write(kicks[0], 1)
    await asyncio.sleep(0)
    await bystander.request(Request.GET_FEATURES)
    waited = time.monotonic() - start
    print(f"poll_us={poll_us}: bystander waited {waited * 1000:.1f} ms; "
          f"inflate queue chains served {conn.vrings[0].counters.chains}, guest errors {device.counters.guest_errors}")
    ours.close()
    await asyncio.wait_for(task, 5)
    return 1 if waited > 1.0 else 0


if __name__ == "__main__":
    signal.signal(signal.SIGALRM, lambda *a: (print("HANG: the event loop never came back (20 s)"), os._exit(2)))
    signal.alarm(20)
    sys.exit(asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 200.0)))
