"""tests.fake_qmp.FakeQmp against the real qemu.qmp QMPClient (and a raw
socket, for what the client never sends): if the fake drifts from what the
client library accepts, daemon tests built on it would prove nothing."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.protocol import Runstate

from tests.fake_qmp import FakeQmp, QmpCommandError, until


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """asyncio.run, failing the test if anything (the fake's connection
    handlers included) raised into the event loop's exception handler."""
    problems: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: problems.append(ctx))
        await scenario()

    asyncio.run(main())
    assert problems == []


async def connected(path: str, fake: FakeQmp) -> QMPClient:
    before = fake.clients
    client = QMPClient("test")
    await client.connect(path)  # returns once qmp_capabilities has been answered
    assert fake.clients == before + 1
    return client



class Raw:
    """A bare QMP connection, for bytes QMPClient would never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: str) -> Raw:
        return cls(*await asyncio.open_unix_connection(path))

    async def line(self) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), 5)

    async def recv(self) -> dict[str, Any]:
        line = await self.line()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def test_qmpclient_negotiates_and_queries_status(sock):
    async def scenario() -> None:
        async with FakeQmp(sock) as fake:
            client = await connected(sock, fake)
            try:
                assert client.greeting is not None
                assert client.greeting.QMP.version["qemu"] == {"micro": 2, "minor": 2, "major": 10}
                assert await client.execute("query-status") == {
                    "status": "running",
                    "singlestep": False,
                    "running": True,
                }
                assert fake.clients == 1
            finally:
                await client.disconnect()
            await fake.wait_clients(0, timeout=5)
            assert fake.calls == [("qmp_capabilities", {}), ("query-status", {})]

    run(scenario)


def test_custom_commands_sync_and_async_get_their_arguments(sock):
    async def scenario() -> None:
        async with FakeQmp(sock) as fake:
            seen: list[dict[str, Any]] = []

            def balloon(args: dict[str, Any]) -> None:
                seen.append(args)  # None: QEMU's empty {} return

            async def slow_query(args: dict[str, Any]) -> dict[str, Any]:
                await asyncio.sleep(0.01)
                return {"actual": args["bytes"] // 2}

            fake.commands["balloon"] = balloon
            fake.commands["x-query-half"] = slow_query
            client = await connected(sock, fake)
            try:
                assert await client.execute("balloon", {"value": 268435456}) == {}
                assert await client.execute("x-query-half", {"bytes": 1024}) == {"actual": 512}
            finally:
                await client.disconnect()
            assert seen == [{"value": 268435456}]
            assert ("balloon", {"value": 268435456}) in fake.calls
            assert fake.calls[-1] == ("x-query-half", {"bytes": 1024})

    run(scenario)


def test_failing_and_unknown_commands_raise_execute_error(sock):
    async def scenario() -> None:
        async with FakeQmp(sock) as fake:

            def refuse(_args: dict[str, Any]) -> None:
                raise QmpCommandError("DeviceNotActive", "No balloon device has been activated")

            def broken(_args: dict[str, Any]) -> None:
                raise RuntimeError("bug in the test's handler")

            fake.commands["balloon"] = refuse
            fake.commands["x-broken"] = broken
            client = await connected(sock, fake)
            try:
                with pytest.raises(ExecuteError) as failed:
                    await client.execute("balloon", {"value": 1})
                assert failed.value.error_class == "DeviceNotActive"
                assert failed.value.error.error.desc == "No balloon device has been activated"

                with pytest.raises(ExecuteError) as unknown:
                    await client.execute("x-no-such-command")
                assert unknown.value.error_class == "CommandNotFound"
                assert unknown.value.error.error.desc == "The command x-no-such-command has not been found"

                with pytest.raises(ExecuteError) as bug:
                    await client.execute("x-broken")
                assert bug.value.error_class == "GenericError"
                assert [type(e) for e in fake.handler_errors] == [RuntimeError]

                # the session survives all three
                assert (await client.execute("query-status"))["running"] is True
            finally:
                await client.disconnect()
            assert [name for name, _ in fake.calls] == [
                "qmp_capabilities", "balloon", "x-no-such-command", "x-broken", "query-status",
            ]  # fmt: skip

    run(scenario)


def test_default_commands_look_like_an_idle_qemu(sock):
    async def scenario() -> None:
        async with FakeQmp(sock) as fake:
            fake.qom["/machine/peripheral"] = [{"name": "balloon0", "type": "child<virtio-balloon-pci>"}]
            client = await connected(sock, fake)
            try:
                assert await client.execute("query-migrate") == {}
                caps = await client.execute("query-migrate-capabilities")
                states = {c["capability"]: c["state"] for c in caps}
                assert {"events", "postcopy-ram", "background-snapshot"} <= states.keys()
                assert not any(states.values())
                await client.execute(
                    "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
                )
                caps = await client.execute("query-migrate-capabilities")
                assert {"capability": "events", "state": True} in caps
                assert await client.execute("query-memory-size-summary") == {"base-memory": 536870912}
                assert await client.execute("qom-list", {"path": "/machine/peripheral"}) == [
                    {"name": "balloon0", "type": "child<virtio-balloon-pci>"}
                ]
                assert await client.execute("qom-list", {"path": "/machine/peripheral-anon"}) == []
                with pytest.raises(ExecuteError) as missing:
                    await client.execute("qom-list", {"path": "/machine/nowhere"})
                assert missing.value.error_class == "DeviceNotFound"
                assert missing.value.error.error.desc == "Device '/machine/nowhere' not found"
            finally:
                await client.disconnect()

    run(scenario)


def test_emitted_events_reach_listeners(sock):
    async def scenario() -> None:
        async with FakeQmp(sock) as fake:
            client = await connected(sock, fake)
            listener = EventListener(names=["BALLOON_CHANGE", "STOP"])
            client.register_listener(listener)
            try:
                await fake.emit("BALLOON_CHANGE", {"actual": 268435456})
                await fake.emit("RESUME")  # filtered out by the listener's names
                await fake.emit("STOP")
                first = await asyncio.wait_for(listener.get(), 5)
                second = await asyncio.wait_for(listener.get(), 5)
            finally:
                client.remove_listener(listener)
                await client.disconnect()
            assert first["event"] == "BALLOON_CHANGE"
            assert first["data"] == {"actual": 268435456}
            assert set(first["timestamp"]) == {"seconds", "microseconds"}
            assert first["timestamp"]["seconds"] > 1_600_000_000
            assert 0 <= first["timestamp"]["microseconds"] < 1_000_000
            assert (second["event"], second["data"]) == ("STOP", {})

    run(scenario)


def test_client_reconnects_after_qemu_drops_it(sock):
    async def scenario() -> None:
        async with FakeQmp(sock) as fake:
            client = QMPClient("test")
            await client.connect(sock)
            await fake.wait_clients(1, timeout=5)
            fake.drop_clients()
            assert fake.clients == 0
            # the client notices the hangup on its own
            await until(lambda: client.runstate != Runstate.RUNNING)
            with pytest.raises(EOFError):  # qemu.qmp reports the hangup here
                await client.disconnect()
            assert client.runstate == Runstate.IDLE

            await client.connect(sock)
            try:
                await fake.wait_clients(1, timeout=5)
                assert (await client.execute("query-status"))["status"] == "running"
            finally:
                await client.disconnect()
            await fake.wait_clients(0, timeout=5)
            assert [name for name, _ in fake.calls] == ["qmp_capabilities", "qmp_capabilities", "query-status"]

    run(scenario)


def test_several_clients_at_once_all_get_events(sock):
    async def scenario() -> None:
        async with FakeQmp(sock) as fake:
            a, b = QMPClient("a"), QMPClient("b")
            await a.connect(sock)
            await b.connect(sock)
            try:
                await fake.wait_clients(2, timeout=5)
                la, lb = EventListener(names="SHUTDOWN"), EventListener(names="SHUTDOWN")
                a.register_listener(la)
                b.register_listener(lb)
                await fake.emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
                ea = await asyncio.wait_for(la.get(), 5)
                eb = await asyncio.wait_for(lb.get(), 5)
                assert ea["data"] == eb["data"] == {"guest": True, "reason": "guest-shutdown"}
            finally:
                await a.disconnect()
                await b.disconnect()

    run(scenario)


def test_wire_protocol_details_a_raw_socket_can_see(sock):
    async def scenario() -> None:
        async with FakeQmp(sock) as fake:
            raw = await Raw.open(sock)
            greeting = await raw.recv()
            assert greeting["QMP"]["version"]["qemu"] == {"micro": 2, "minor": 2, "major": 10}
            assert greeting["QMP"]["capabilities"] == []

            # commands before negotiation are refused, as QEMU does, id echoed
            await raw.send(b'{"execute": "query-status", "id": 7}\r\n')
            assert await raw.recv() == {
                "error": {
                    "class": "CommandNotFound",
                    "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
                },
                "id": 7,
            }
            assert fake.clients == 0
            await fake.emit("STOP")  # not negotiated: no events yet

            # no newline after a command, and one split across writes, both work
            await raw.send(b'{"execute": "qmp_capabilities", "id": "caps"}{"execute": "query-')
            assert await raw.recv() == {"return": {}, "id": "caps"}
            await raw.send(b'status", "id": {"n": 1}}')
            assert await raw.recv() == {
                "return": {"status": "running", "singlestep": False, "running": True},
                "id": {"n": 1},
            }
            assert fake.clients == 1

            await raw.send(b'{"execute": "qmp_capabilities"}')
            reply = await raw.recv()
            assert reply["error"]["class"] == "CommandNotFound"

            # malformed input gets a GenericError and the session goes on
            await raw.send(b'{"execute": "query-status", }\n')
            reply = await raw.recv()
            assert reply["error"]["class"] == "GenericError"
            assert reply["error"]["desc"].startswith("JSON parse error")
            await raw.send(b"garbage\n")
            assert (await raw.recv())["error"]["desc"].startswith("JSON parse error")
            await raw.send(b'["execute", "query-status"]')
            assert (await raw.recv())["error"] == {
                "class": "GenericError",
                "desc": "QMP input must be a JSON object",
            }
            await raw.send(b'{"exec": "query-status"}')
            assert (await raw.recv())["error"]["desc"] == "QMP input member 'exec' is unexpected"
            await raw.send(b'{"execute": "qom-list", "arguments": {"path": "/x}{"}}')
            assert (await raw.recv())["error"] == {"class": "DeviceNotFound", "desc": "Device '/x}{' not found"}

            await fake.emit("RESUME", {"x": 1})
            event = await raw.recv()
            assert (event["event"], event["data"]) == ("RESUME", {"x": 1})
            await raw.close()
            await fake.wait_clients(0, timeout=5)
            names = [name for name, _ in fake.calls]
            assert names == ["query-status", "qmp_capabilities", "query-status", "qmp_capabilities", "qom-list"]

    run(scenario)


def test_client_vanishing_mid_line_leaves_the_server_serving(sock):
    async def scenario() -> None:
        async with FakeQmp(sock) as fake:
            for cut in (b'{"execute": "qmp_capa', b'{"execute": "qmp_capabilities"}{"execute": "query-st'):
                raw = await Raw.open(sock)
                await raw.recv()
                await raw.send(cut)
                raw.writer.transport.abort()  # as a killed process would
            # nor does a byte that is not UTF-8
            raw = await Raw.open(sock)
            await raw.recv()
            await raw.send(b'{"execute": "\xff"}\n')
            assert (await raw.recv())["error"]["class"] == "CommandNotFound"
            await raw.close()
            await fake.wait_clients(0, timeout=5)

            client = await connected(sock, fake)
            try:
                assert (await client.execute("query-status"))["running"] is True
            finally:
                await client.disconnect()
            assert fake.handler_errors == []

    run(scenario)


def test_stop_hangs_up_on_clients_and_removes_the_socket(sock):
    async def scenario() -> None:
        fake = FakeQmp(sock)
        await fake.start()
        assert os.path.exists(sock)
        client = await connected(sock, fake)
        await fake.stop()
        assert fake.clients == 0
        assert not os.path.exists(sock)
        await until(lambda: client.runstate != Runstate.RUNNING)
        with pytest.raises(EOFError):
            await client.disconnect()
        with pytest.raises(OSError):
            await asyncio.open_unix_connection(sock)

    run(scenario)


def test_wait_clients_times_out_with_the_count(sock):
    async def scenario() -> None:
        async with FakeQmp(sock) as fake:
            with pytest.raises(TimeoutError, match="0 QMP client"):
                await fake.wait_clients(1, timeout=0.1)

    run(scenario)


async def events_until_marker(fake: FakeQmp, listener: EventListener) -> list[tuple[str, Any]]:
    """Every event the listener got before a STOP the fake sends now: events
    are sent in order, so what did not arrive before the marker was never sent."""
    await fake.emit("STOP")
    got = []
    while True:
        event = await asyncio.wait_for(listener.get(), 5)
        if event["event"] == "STOP":
            return got
        got.append((event["event"], event["data"]))


def test_migration_events_are_sent_only_while_the_events_capability_is_on(sock):
    async def scenario() -> None:
        async with FakeQmp(sock) as fake:
            client = await connected(sock, fake)
            listener = EventListener(names=["MIGRATION", "MIGRATION_PASS", "STOP"])
            client.register_listener(listener)
            events_on = {"capabilities": [{"capability": "events", "state": True}]}
            try:
                # off (QEMU's default): a migration runs its whole course unannounced
                assert await fake.emit("MIGRATION", {"status": "setup"}) is False
                assert await fake.emit("MIGRATION_PASS", {"pass": 1}) is False
                assert await client.execute("migrate", {"uri": "exec:cat > /dev/null"}) == {}
                assert await client.execute("query-migrate") == {"status": "active"}
                # ... and cannot be made to announce itself halfway
                with pytest.raises(ExecuteError) as busy:
                    await client.execute("migrate-set-capabilities", events_on)
                assert (busy.value.error_class, busy.value.error.error.desc) == (
                    "GenericError", "There's a migration process in progress")
                assert fake.migrate_capabilities["events"] is False
                assert await client.execute("migrate_cancel") == {}
                assert await client.execute("query-migrate") == {"status": "cancelled"}
                assert await events_until_marker(fake, listener) == []

                # on: every state change is announced, to every client
                assert await client.execute("migrate-set-capabilities", events_on) == {}
                assert {"capability": "events", "state": True} in await client.execute("query-migrate-capabilities")
                await client.execute("migrate", {"uri": "exec:cat > /dev/null"})
                assert await fake.emit("MIGRATION_PASS", {"pass": 2}) is True
                await client.execute("migrate_cancel")
                assert await fake.set_migration_status("failed") is True
                assert await events_until_marker(fake, listener) == [
                    ("MIGRATION", {"status": "setup"}), ("MIGRATION_PASS", {"pass": 1}),
                    ("MIGRATION", {"status": "active"}), ("MIGRATION_PASS", {"pass": 2}),
                    ("MIGRATION", {"status": "cancelling"}), ("MIGRATION", {"status": "cancelled"}),
                    ("MIGRATION", {"status": "failed"}),
                ]  # fmt: skip
            finally:
                client.remove_listener(listener)
                await client.disconnect()
            # the capability belongs to QEMU, not to the session: a new client finds it on
            client = await connected(sock, fake)
            try:
                assert {"capability": "events", "state": True} in await client.execute("query-migrate-capabilities")
                await client.execute("migrate-set-capabilities",
                                     {"capabilities": [{"capability": "events", "state": False}]})
                assert await fake.set_migration_status("setup") is False
            finally:
                await client.disconnect()

    run(scenario)


def test_migrate_and_migrate_cancel_refuse_what_qemu_refuses(sock):
    async def scenario() -> None:
        async with FakeQmp(sock) as fake:
            client = await connected(sock, fake)

            async def refusal(command: str, args: dict[str, Any] | None = None) -> str:
                with pytest.raises(ExecuteError) as refused:
                    await client.execute(command, args)
                assert refused.value.error_class == "GenericError"
                return str(refused.value.error.error.desc)

            try:
                assert await client.execute("migrate_cancel") == {}  # nothing to cancel: fine
                assert await client.execute("query-migrate") == {}
                assert await refusal("migrate") == "need either 'uri' or 'channels' argument"
                await client.execute("migrate", {"uri": "exec:cat > /dev/null"})
                assert await refusal("migrate", {"uri": "exec:cat > /dev/null"}) == (
                    "There's a migration process in progress")
                for status in ("postcopy-active", "postcopy-paused"):
                    await fake.set_migration_status(status)
                    assert await refusal("migrate_cancel") == "Postcopy migration in progress, cannot cancel."
                    assert await refusal("migrate-set-capabilities", {"capabilities": []}) == (
                        "There's a migration process in progress")
                for status in ("completed", "failed", "cancelled"):  # over: settable again
                    await fake.set_migration_status(status)
                    assert await client.execute("migrate-set-capabilities", {"capabilities": []}) == {}
                    assert await client.execute("query-migrate") == {"status": status}
            finally:
                await client.disconnect()
            assert fake.handler_errors == []

    run(scenario)
