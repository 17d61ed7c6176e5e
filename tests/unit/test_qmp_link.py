"""QmpLink against a fake QMP server (asyncio, Unix socket), and the policy
leaving a VM alone whose QEMU is not running."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from balloond.services.policy import MiB
from balloond.services.qmp_link import QmpLink
from tests.unit.test_policy_loop import FakeVm, make_loop


class FakeQmp:
    """Enough of QEMU's QMP: greeting, qmp_capabilities, query-status, stop/cont
    (each sending its STOP/RESUME event), and a way to drop the client."""

    def __init__(self, path: str, status: str = "running") -> None:
        self.path = path
        self.status = status
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.commands: list[str] = []
        self.clients = 0

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, self.path)

    async def close(self) -> None:
        await self.drop()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    async def drop(self) -> None:
        for w in self.writers:
            w.close()
        self.writers.clear()

    def _send(self, w: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        w.write(json.dumps(msg).encode() + b"\r\n")

    async def event(self, name: str, status: str) -> None:
        self.status = status
        for w in self.writers:
            self._send(w, {"event": name, "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}})
            await w.drain()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.clients += 1
        self.writers.append(w)
        self._send(w, {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 10}, "package": ""},
                               "capabilities": []}})
        decoder, buf = json.JSONDecoder(), ""
        try:
            while chunk := await r.read(4096):
                buf += chunk.decode()
                msgs = []
                while buf.strip():  # QMP messages are not newline-framed: decode the stream
                    try:
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    msgs.append(msg)
                    buf = buf.lstrip()[end:]
                for msg in msgs:
                    await self._answer(w, msg)
        except ConnectionError:
            pass
        finally:
            w.close()

    async def _answer(self, w: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        cmd = msg["execute"]
        self.commands.append(cmd)
        ret: Any = {}
        if cmd == "query-status":
            ret = {"running": self.status == "running", "status": self.status, "singlestep": False}
        reply = {"return": ret}
        if "id" in msg:
            reply["id"] = msg["id"]
        self._send(w, reply)
        await w.drain()


async def until(pred, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_link_retries_until_qemu_is_there_and_tracks_the_run_state(tmp_path):
    async def main() -> None:
        path = str(tmp_path / "qmp.sock")
        link = QmpLink(path, backoff_initial=0.02, backoff_max=0.1)
        link.start()
        await asyncio.sleep(0.2)  # no socket yet: retrying, nothing known
        assert (link.connected, link.running, link.status) == (False, None, None)
        assert link.last_error is not None
        qemu = FakeQmp(path, status="prelaunch")
        await qemu.start()
        try:
            await until(lambda: link.connected)
            assert (link.running, link.status) == (False, "prelaunch")
            assert qemu.commands[:2] == ["qmp_capabilities", "query-status"]
            await qemu.event("RESUME", "running")
            await until(lambda: link.status == "running")
            assert link.running is True
            await qemu.event("STOP", "paused")
            await until(lambda: link.status == "paused")
            assert link.running is False and link.summary() == {"qmp_connected": True, "run_state": "paused"}
            # QEMU restarts: the link forgets, then reconnects and asks again
            await qemu.close()
            await until(lambda: not link.connected)
            assert link.status is None
            qemu = FakeQmp(path, status="inmigrate")
            await qemu.start()
            await until(lambda: link.connected and link.status == "inmigrate")
            assert link.connects == 2
        finally:
            await link.stop()
            await qemu.close()

    asyncio.run(main())


def test_policy_leaves_a_paused_vm_alone_and_says_why():
    class QmpVm(FakeVm):
        run_state: str | None = "running"

        def summary(self):
            return {**super().summary(), "run_state": self.run_state}

    a, b = QmpVm("a", used=512 * MiB), QmpVm("b", used=512 * MiB)
    loop = make_loop([a, b], available=256 * MiB)  # host short: reclaim
    b.run_state = "paused"
    d = loop.tick()
    by = {v.name: v for v in d.vms}
    assert by["a"].action == "inflate" and a.target > 0
    assert by["b"].action == "skip" and by["b"].reason == "VM paused (QMP)" and b.calls == []
    for state in ("inmigrate", "postmigrate", "finish-migrate", "suspended"):
        b.run_state = state
        by = {v.name: v for v in loop.tick().vms}
        assert by["b"].action == "skip" and by["b"].reason == f"VM {state} (QMP)"
    assert b.calls == []
    b.run_state = "running"
    by = {v.name: v for v in loop.tick().vms}
    assert by["b"].action == "inflate" and b.calls
    # no QMP (run_state None): managed as before
    b.run_state = None
    assert {v.name: v for v in loop.tick().vms}["b"].action != "skip"


def test_virtual_machine_summary_carries_the_qmp_state(tmp_path):
    from balloond.device.balloon import DeviceSettings
    from balloond.vm import VirtualMachine

    vm = VirtualMachine("g", str(tmp_path / "g.sock"), DeviceSettings())
    s = vm.summary()
    assert s["qmp_connected"] is False and s["run_state"] is None
    link = QmpLink(str(tmp_path / "q.sock"))
    link.connected, link.status, link.running = True, "paused", False
    vm.qmp = link
    s = vm.summary()
    assert s["qmp_connected"] is True and s["run_state"] == "paused"


def test_daemon_wires_a_link_for_vms_with_qmp(tmp_path):
    from balloond.services import config
    from balloond.services.daemon import Daemon

    settings, _ = config.load(["--vm", f"a={tmp_path}/a.sock,qmp={tmp_path}/a.qmp", "--vm", f"b={tmp_path}/b.sock"])
    d = Daemon(settings)
    d.open_sockets()
    try:
        assert isinstance(d.vms["a"].qmp, QmpLink) and d.vms["a"].qmp.path == f"{tmp_path}/a.qmp"
        assert d.vms["b"].qmp is None
    finally:
        for listener in d.listeners:
            listener.close()
