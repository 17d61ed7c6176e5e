"""A stand-in for QEMU's QMP monitor, for tests of balloond's QMP client code.

balloond talks to QEMU through qemu.qmp's QMPClient. Booting a real QEMU for
every test of that code would be slow and would need KVM, and it would make
the interesting cases -- an error reply, an event at a chosen moment, QEMU
vanishing mid-session -- hard to trigger on purpose. This module serves the
QMP wire protocol on a Unix socket the way QEMU 10.2 does (greeting,
capabilities negotiation, command dispatch, events), with a command table a
test can change, so those cases become one line each and the real client
library is still the one on the other end of the socket.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import inspect
import json
import os
import time
from collections.abc import Callable
from typing import Any

from harness.loop_thread import LoopThread

#: QEMU's guest-stats names, and what it shows for a statistic never sent.
_QEMU_STAT_NAMES = tuple(f"stat-{n}" for n in (
    "swap-in", "swap-out", "major-faults", "minor-faults", "free-memory", "total-memory", "available-memory",
    "disk-caches", "htlb-pgalloc", "htlb-pgfail", "oom-kills", "alloc-stalls", "async-scans", "direct-scans",
    "async-reclaims", "direct-reclaims"))  # fmt: skip
_QEMU_STAT_UNSET = (1 << 64) - 1

GREETING: dict[str, Any] = {
    "QMP": {"version": {"qemu": {"micro": 2, "minor": 2, "major": 10}, "package": ""}, "capabilities": []}
}

#: MigrationCapability values the project's QEMU 10.2 build reports, in its
#: order (the deprecated zero-blocks included).
MIGRATION_CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram", "x-colo", "release-ram",
    "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
    "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot", "zero-copy-send",
    "postcopy-preempt", "switchover-ack", "dirty-limit", "mapped-ram",
    "skip-file-holes",  # qemu-patches/0004
)  # fmt: skip

#: Events QEMU sends only while the "events" migration capability is on
#: (migration.c migrate_generate_event, ram.c migration_bitmap_sync).
MIGRATION_EVENTS = frozenset({"MIGRATION", "MIGRATION_PASS"})
#: Statuses for which QEMU's migration_is_running() is true: while in one,
#: migrate-set-capabilities and a second migrate are refused.
MIGRATION_RUNNING = frozenset({
    "active", "postcopy-device", "postcopy-active", "postcopy-paused", "postcopy-recover-setup",
    "postcopy-recover", "setup", "pre-switchover", "device", "wait-unplug", "cancelling", "colo",
})  # fmt: skip
MIGRATION_ACTIVE_ERROR = "There's a migration process in progress"


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    """Wait (on the running loop) until `predicate()` is truthy; fail after `timeout` s."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


class QmpCommandError(Exception):
    """Raised by a command handler to make the command fail the way QEMU's do:
    the reply is ``{"error": {"class": error_class, "desc": desc}}``."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class _JsonStream:
    """Cuts a character stream into JSON texts the way QEMU's streamer does:
    by bracket depth, not by line. QMPClient sends its commands without a
    newline, so line framing would wait forever."""

    def __init__(self) -> None:
        self.buf: list[str] = []
        self.junk: list[str] = []
        self.depth = 0
        self.in_string = False
        self.escape = False

    def feed(self, text: str) -> list[tuple[Any, str | None]]:
        """Return (value, None) per complete JSON text, (None, error) per bad one."""
        out: list[tuple[Any, str | None]] = []
        for ch in text:
            if self.depth == 0:
                if ch in "{[":
                    self._flush_junk(out)
                    self.buf, self.depth = [ch], 1
                elif ch == "\n":
                    self._flush_junk(out)
                elif not ch.isspace() or self.junk:
                    self.junk.append(ch)
                continue
            self.buf.append(ch)
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    out.append(self._parse("".join(self.buf)))
                    self.buf = []
        return out

    def _flush_junk(self, out: list[tuple[Any, str | None]]) -> None:
        junk = "".join(self.junk).strip()
        self.junk = []
        if junk:
            out.append(self._parse(junk))

    @staticmethod
    def _parse(text: str) -> tuple[Any, str | None]:
        try:
            return json.loads(text), None
        except ValueError as exc:
            return None, f"JSON parse error, {exc}"


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False
        self.closed = False

    def send(self, msg: dict[str, Any]) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(json.dumps(msg).encode() + b"\r\n")

    async def flush(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.drain()

    def close(self) -> None:
        self.closed = True
        self.writer.close()


class FakeQmp:
    """A QMP server on the Unix socket `path`, answering like an idle QEMU 10.2.

    ``commands`` maps a command name to a handler taking the ``arguments``
    dict and returning the "return" value (sync or async; None means {}), or
    raising QmpCommandError. ``qom`` is the tree behind ``qom-list``;
    ``migrate_capabilities`` the state behind ``query-migrate-capabilities``
    and ``migrate-set-capabilities``; ``migration_status`` the outgoing
    migration's state behind ``query-migrate`` (QEMU's MigrationStatus:
    "none" until a first ``migrate``). Change it with `set_migration_status`,
    which announces it as QEMU does: a MIGRATION event only while the
    "events" capability is on, and `emit` drops MIGRATION and MIGRATION_PASS
    likewise, so a test cannot show a client an event no QEMU would send.
    ``calls`` records every command received, as (name, arguments). A handler
    that raises anything other than QmpCommandError gets a GenericError reply
    and lands in ``handler_errors``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.handler_errors: list[BaseException] = []
        self.qom: dict[str, list[dict[str, Any]]] = {"/machine/peripheral": [], "/machine/peripheral-anon": []}
        self.migrate_capabilities: dict[str, bool] = dict.fromkeys(MIGRATION_CAPABILITIES, False)
        self.migration_status = "none"
        self.commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "qmp_capabilities": self._qmp_capabilities,
            "query-status": lambda _args: {"status": "running", "singlestep": False, "running": True},
            "query-migrate": self._query_migrate,
            "query-migrate-capabilities": self._query_migrate_capabilities,
            "migrate-set-capabilities": self._migrate_set_capabilities,
            "migrate": self._migrate,
            "migrate_cancel": self._migrate_cancel,
            "qom-list": self._qom_list,
            "query-memory-size-summary": lambda _args: {"base-memory": 536870912},
        }
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop_clients()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def __aenter__(self) -> FakeQmp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- what tests drive ------------------------------------------------

    @property
    def clients(self) -> int:
        """Clients connected now that have finished capabilities negotiation."""
        return sum(1 for c in self._clients if c.negotiated)

    async def wait_clients(self, n: int, timeout: float = 5.0) -> None:
        """Wait until exactly `n` negotiated clients are connected."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.clients != n:
            changed = self._changed
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{self.clients} QMP client(s) connected after {timeout}s, wanted {n}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    def drop_clients(self) -> None:
        """Hang up on every client, as when QEMU exits; the socket keeps listening."""
        for client in list(self._clients):
            client.close()
        self._clients.clear()
        self._notify()

    async def emit(self, event: str, data: dict[str, Any] | None = None) -> bool:
        """Send an event to every negotiated client; False if QEMU would not
        send it (a migration event while the "events" capability is off)."""
        if event in MIGRATION_EVENTS and not self.migrate_capabilities["events"]:
            return False
        now = time.time()
        seconds = int(now)
        msg = {
            "event": event,
            "data": data or {},
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
        }
        targets = [c for c in self._clients if c.negotiated]
        for client in targets:
            client.send(msg)
        for client in targets:
            await client.flush()
        return True

    async def set_migration_status(self, status: str) -> bool:
        """The outgoing migration moves to `status`, as QEMU's
        migrate_set_state does: query-migrate shows it at once and a MIGRATION
        event announces it only if the "events" capability is on. Returns
        whether the event was sent."""
        self.migration_status = status
        return await self.emit("MIGRATION", {"status": status})

    # -- the protocol ----------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        client = _Client(writer)
        self._clients.add(client)
        stream = _JsonStream()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            client.send(GREETING)
            await client.flush()
            while not client.closed:
                chunk = await reader.read(65536)
                if not chunk:
                    break  # EOF, maybe mid-message: the partial text dies with the connection
                for value, error in stream.feed(decoder.decode(chunk)):
                    if client.closed:
                        break
                    if error is not None:
                        client.send({"error": {"class": "GenericError", "desc": error}})
                    else:
                        await self._dispatch(client, value)
                    await client.flush()
        except (ConnectionError, OSError):
            pass
        finally:
            self._clients.discard(client)
            client.closed = True
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._notify()
            if task is not None:
                self._tasks.discard(task)

    async def _dispatch(self, client: _Client, request: Any) -> None:
        if not isinstance(request, dict):
            client.send({"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}})
            return
        reply: dict[str, Any]
        try:
            name, args = self._check_request(request)
            self.calls.append((name, args))
            reply = {"return": await self._run(client, name, args)}
        except QmpCommandError as exc:
            reply = {"error": {"class": exc.error_class, "desc": exc.desc}}
        if "id" in request:
            reply["id"] = request["id"]
        client.send(reply)

    @staticmethod
    def _check_request(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        # The checks and wording of QEMU's qmp_dispatch_check_obj().
        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise QmpCommandError("GenericError", "QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QmpCommandError("GenericError", "QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QmpCommandError("GenericError", f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            raise QmpCommandError("GenericError", "QMP input lacks member 'execute'")
        return request["execute"], dict(request.get("arguments", {}))

    async def _run(self, client: _Client, name: str, args: dict[str, Any]) -> Any:
        if not client.negotiated and name != "qmp_capabilities":
            raise QmpCommandError("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
        if client.negotiated and name == "qmp_capabilities":
            raise QmpCommandError("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
        handler = self.commands.get(name)
        if handler is None:
            raise QmpCommandError("CommandNotFound", f"The command {name} has not been found")
        try:
            result = handler(args)
            if inspect.isawaitable(result):
                result = await result
        except QmpCommandError:
            raise
        except Exception as exc:
            self.handler_errors.append(exc)
            raise QmpCommandError("GenericError", f"fake QMP handler for {name} failed: {exc!r}") from exc
        if name == "qmp_capabilities":
            client.negotiated = True
            self._notify()
        return {} if result is None else result

    # -- default commands ------------------------------------------------

    @staticmethod
    def _qmp_capabilities(args: dict[str, Any]) -> dict[str, Any]:
        for cap in args.get("enable", []):
            raise QmpCommandError("GenericError", f"Capability '{cap}' not available")
        return {}

    def _query_migrate(self, _args: dict[str, Any]) -> dict[str, Any]:
        # QEMU leaves "status" out until a migration has happened.
        return {} if self.migration_status == "none" else {"status": self.migration_status}

    def _query_migrate_capabilities(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"capability": name, "state": state} for name, state in self.migrate_capabilities.items()]

    def _migrate_set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        if "capabilities" not in args:
            raise QmpCommandError("GenericError", "Parameter 'capabilities' is missing")
        if self.migration_status in MIGRATION_RUNNING:  # checked before the list, as QEMU does
            raise QmpCommandError("GenericError", MIGRATION_ACTIVE_ERROR)
        for item in args["capabilities"]:
            name = item.get("capability")
            if name not in self.migrate_capabilities:
                raise QmpCommandError("GenericError", f"Parameter 'capability' does not accept value '{name}'")
        for item in args["capabilities"]:
            self.migrate_capabilities[item["capability"]] = bool(item.get("state"))
        return {}

    async def _migrate(self, args: dict[str, Any]) -> None:
        """A migration that starts and stays active (as one over a slow link
        does) until `set_migration_status` or migrate_cancel ends it."""
        if "uri" not in args and "channels" not in args:
            raise QmpCommandError("GenericError", "need either 'uri' or 'channels' argument")
        if self.migration_status in MIGRATION_RUNNING:
            raise QmpCommandError("GenericError", MIGRATION_ACTIVE_ERROR)
        await self.set_migration_status("setup")
        await self.emit("MIGRATION_PASS", {"pass": 1})  # the first dirty-bitmap sync, before "active"
        await self.set_migration_status("active")

    async def _migrate_cancel(self, _args: dict[str, Any]) -> None:
        if self.migration_status.startswith("postcopy"):
            raise QmpCommandError("GenericError", "Postcopy migration in progress, cannot cancel.")
        if self.migration_status in MIGRATION_RUNNING:  # otherwise nothing to cancel: no error
            await self.set_migration_status("cancelling")
            await self.set_migration_status("cancelled")

    def _qom_list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        if "path" not in args:
            raise QmpCommandError("GenericError", "Parameter 'path' is missing")
        path = args["path"]
        if path not in self.qom:
            raise QmpCommandError("DeviceNotFound", f"Device '{path}' not found")
        return [dict(entry) for entry in self.qom[path]]


class FakeQmpThread:
    """A FakeQmp on an event loop of its own thread, for tests whose client
    is another process (a real daemon): the test's thread stays free to
    drive the frontend and poll the API.

        with FakeQmpThread(path) as monitor:
            monitor.run(lambda fake: fake.qom["/machine/peripheral"].append(...))
            monitor.set_migration_status("active")  # and MIGRATION, if "events" is on
    """

    def __init__(self, path: str) -> None:
        self.thread = LoopThread(f"fake-qmp-{path}")
        self.fake: FakeQmp = self.thread.call(self._make(path))

    @staticmethod
    async def _make(path: str) -> FakeQmp:
        fake = FakeQmp(path)
        await fake.start()
        return fake

    def run(self, fn: Callable[[FakeQmp], Any]) -> Any:
        """Call fn(fake) on the fake's loop (the safe way to change its state)."""
        return self.thread.run(fn, self.fake)

    def emit(self, event: str, data: dict[str, Any] | None = None) -> bool:
        return self.thread.call(self.fake.emit(event, data))

    def set_migration_status(self, status: str) -> bool:
        return self.thread.call(self.fake.set_migration_status(status))

    def wait_clients(self, n: int, timeout: float = 10.0) -> None:
        self.thread.call(self.fake.wait_clients(n, timeout), timeout + 1)

    def drop_clients(self) -> None:
        self.run(lambda fake: fake.drop_clients())

    def go_away(self) -> None:
        """QEMU's monitor disappears: clients dropped, connections refused."""

        async def close() -> None:
            assert self.fake._server is not None
            self.fake._server.close()
            self.fake.drop_clients()

        self.thread.call(close())

    def come_back(self) -> None:
        self.thread.call(self.fake.start())

    def calls(self, name: str) -> list[dict[str, Any]]:
        return self.run(lambda fake: [args for cmd, args in fake.calls if cmd == name])

    def close(self) -> None:
        if self.thread.loop.is_closed():
            return
        self.thread.call(self.fake.stop())
        self.thread.close()

    def __enter__(self) -> FakeQmpThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QemuBalloon:
    """The QMP side of QEMU 10.2's virtio-balloon, installed into a FakeQmp.

    `logical` is what query-balloon calls "actual": the guest's size, RAM
    minus the balloon. `balloon` sets it at once (a guest that obeys
    instantly). `stats`/`last_update` are what qom-get guest-stats returns.
    """

    def __init__(self, fake: FakeQmp, *, ram: int = 512 << 20, logical: int | None = None, active: bool = True,
                 container: str = "/machine/peripheral", name: str = "balloon0",
                 kind: str = "virtio-balloon-pci") -> None:
        self.ram = ram
        self.logical = ram if logical is None else logical
        self.active = active
        self.path = f"{container}/{name}"
        self.polling = 0
        self.stats: dict[str, int] = dict.fromkeys(_QEMU_STAT_NAMES, _QEMU_STAT_UNSET)
        self.last_update = 0
        fake.qom = {"/machine/peripheral": [{"name": "type", "type": "string"}],
                    "/machine/peripheral-anon": [{"name": "type", "type": "string"}]}
        fake.qom[container].append({"name": name, "type": f"child<{kind}>"})
        fake.commands.update({
            "query-memory-size-summary": lambda _a: {"base-memory": self.ram, "plugged-memory": 0},
            "query-balloon": self.query_balloon,
            "balloon": self.balloon,
            "qom-set": self.qom_set,
            "qom-get": self.qom_get,
        })

    def report(self, **stats: int) -> None:
        """The guest sends statistics (QEMU's names without "stat-", e.g. free_memory=...)."""
        self.stats.update({f"stat-{k.replace('_', '-')}": v for k, v in stats.items()})
        self.last_update = int(time.time())

    def query_balloon(self, _args: dict[str, Any]) -> dict[str, Any]:
        if not self.active:
            raise QmpCommandError("DeviceNotActive", "No balloon device has been activated")
        return {"actual": self.logical}

    def balloon(self, args: dict[str, Any]) -> None:
        value = args.get("value")
        if not isinstance(value, int) or value <= 0:
            raise QmpCommandError("GenericError", "Parameter 'value' expects a size")
        if not self.active:
            raise QmpCommandError("DeviceNotActive", "No balloon device has been activated")
        self.logical = min(value, self.ram)

    def _check(self, args: dict[str, Any]) -> str:
        if args.get("path") != self.path:
            raise QmpCommandError("DeviceNotFound", f"Device '{args.get('path')}' not found")
        return str(args.get("property"))

    def qom_set(self, args: dict[str, Any]) -> None:
        if self._check(args) != "guest-stats-polling-interval":
            raise QmpCommandError("GenericError", "Property not settable")
        self.polling = args["value"]

    def qom_get(self, args: dict[str, Any]) -> Any:
        prop = self._check(args)
        if prop == "guest-stats":
            return {"stats": dict(self.stats), "last-update": self.last_update}
        if prop == "guest-stats-polling-interval":
            return self.polling
        raise QmpCommandError("GenericError", f"Property '{prop}' not found")
