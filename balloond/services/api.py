"""The control API: HTTP/JSON on a Unix socket, in the style of Firecracker's.

    GET  /v1/vms                     summaries of every VM
    GET  /v1/vms/{name}              one VM
    PUT  /v1/vms/{name}/target       {"bytes": N}: the balloon size to reach
    PUT  /v1/vms/{name}/stats-interval  {"seconds": S}: how often to ask for stats
    GET  /v1/vms/{name}/pfns         {"count": N, "ranges": [[first_pfn, n], ...]}
    GET  /metrics                    Prometheus text format

Only root, the daemon's own uid and the uids/gids it is told to allow are
served (peer credentials, see access.py). The check is made at accept,
before any HTTP is parsed: anyone else gets a fixed 403 and is closed.

Any local process that can reach the socket could otherwise hold the
daemon's fds and the API with idle or half-sent connections, so:

* at most MAX_CONNECTIONS are open at once; one more closes the one idle
  longest (a connection inside a request is never closed for this), or, if
  all are inside a request, is itself closed at once (one rate-limited line);
* a connection that sends no complete request head within IDLE_TIMEOUT
  (a silent one, or a partial header), or stays silent that long after a
  response, is closed; a request not answered within REQUEST_TIMEOUT (a
  body that never ends) gets 408 and its connection closed;
* a refused peer's connection is held at most REFUSED_LINGER (so that it
  can read its 403 rather than a broken pipe), and at most
  MAX_CONNECTIONS of those at once;
* accept() failing for want of fds or memory is retried every
  ACCEPT_RETRY_SECONDS with a rate-limited line, never the end of the API.

Errors are JSON `{"error": "..."}` with 400 (bad request body), 403 (peer not
allowed), 404 (unknown VM or path), 405, 409 (not something this kind of
VM can do: the frames held by QEMU's built-in balloon) or 503 (the VM's
worker process is restarting, for what only it knows: its frames); a bug in a handler is a 500 with a
log line, never a dropped connection.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
import os
import socket
from collections.abc import Iterable
from typing import Any

import structlog
from aiohttp import web

from ..logs import RateLimited
from ..worker.supervisor import WorkerVm
from ..vm import ManagedVm, NotSupported, TargetError, VmUnavailable
from .access import AccessPolicy, PeerCredentials, access_middleware, peer_credentials, refusal_response
from .metrics import render_metrics
from .policy import PolicyError
from .policy_loop import PolicyLoop


#: Connections served at once (a client of the API makes one at a time).
MAX_CONNECTIONS = 64
#: Seconds a connection may take to send a request head, or stay idle after a response.
IDLE_TIMEOUT = 10.0
#: Seconds from a request's head to its response (body included).
REQUEST_TIMEOUT = 10.0
#: Seconds a refused peer's connection is kept open to let it read its 403.
REFUSED_LINGER = 1.0
ACCEPT_RETRY_SECONDS = 0.1
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Connection(asyncio.Protocol):
    """One admitted API connection: aiohttp's protocol inside, with what the
    connection cap needs to know (is a request in progress, since when idle)."""

    def __init__(self, api: "ControlApi", inner: Any) -> None:
        self.api = api
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.busy = 0
        self.idle_since = asyncio.get_running_loop().time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.api._open[self] = None
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.api._open.pop(self, None)
        self.inner.connection_lost(exc)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _json_body(body: bytes) -> web.Response:
    """A JSON document already encoded (VMs' status bodies are kept between reads)."""
    return web.Response(body=body, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _refresh(*vms: ManagedVm) -> None:
    """Before a read of many VMs (a list, the metrics): a VM's worker whose
    last report predates a command the API accepted is asked afresh; the
    others are not asked at all (their reports follow guest-driven changes
    by themselves, within a bounded delay), so a read of many busy VMs
    waits for none of them. The contract is docs/api.md's "Freshness"."""
    stale = [vm.refresh() for vm in vms if isinstance(vm, WorkerVm) and vm.stale]
    if stale:
        await asyncio.gather(*stale)


async def _refresh_one(vm: ManagedVm) -> None:
    """Before a read of one VM: its worker reports afresh (it alone is waited
    for), so the read shows everything the worker did before it."""
    if isinstance(vm, WorkerVm):
        await vm.refresh(always=True)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return _error(exc.status, exc.reason or "error")
        raise
    except Exception:
        structlog.get_logger().exception("API handler failed", path=request.path)
        return _error(500, "internal error; see the daemon's log")


class ControlApi:
    """`allowed_uids`/`allowed_gids`: who besides root and the daemon's own uid
    may call the API (peer credentials; see access.py)."""

    def __init__(
        self,
        vms: dict[str, ManagedVm],
        *,
        allowed_uids: Iterable[int] = (),
        allowed_gids: Iterable[int] = (),
        policy: PolicyLoop | None = None,
    ) -> None:
        self.vms = vms
        self.policy = policy
        self.access = AccessPolicy(allowed_uids, allowed_gids)
        self.app = web.Application(middlewares=[access_middleware(self.access), self._in_request, _errors])
        self.app.add_routes(
            [
                web.get("/v1/vms", self.list_vms),
                web.get("/v1/vms/{name}", self.get_vm),
                web.put("/v1/vms/{name}/target", self.put_target),
                web.put("/v1/vms/{name}/stats-interval", self.put_stats_interval),
                web.get("/v1/vms/{name}/pfns", self.get_pfns),
                web.get("/metrics", self.metrics),
                web.get("/v1/policy", self.get_policy),
                web.put("/v1/policy", self.put_policy),
                web.put("/v1/vms/{name}/policy", self.put_vm_policy),
            ]
        )
        self._runner: web.AppRunner | None = None
        self._listen: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        #: Admitted connections, oldest first.
        self._open: dict[_Connection, None] = {}
        self._lingering: set[asyncio.Task[None]] = set()
        log = structlog.get_logger()
        self._refusals = RateLimited(log)
        self._limit_log = RateLimited(log, burst=1)
        self._accept_log = RateLimited(log, burst=1)

    async def start(self, path: str) -> None:
        # keepalive_timeout: aiohttp closes a connection that has no complete
        # request head this long after it opened or after its last response.
        self._runner = web.AppRunner(self.app, access_log=None, keepalive_timeout=IDLE_TIMEOUT)
        await self._runner.setup()
        if os.path.exists(path):
            os.unlink(path)
        listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listen.bind(path)
        except BaseException:
            listen.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        listen.listen(128)
        listen.setblocking(False)
        self._listen = listen
        self._accepting = asyncio.create_task(self._accept_loop(listen), name="balloond-api-accept")

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._listen is not None:
            self._listen.close()
        for task in list(self._lingering):
            task.cancel()
        await asyncio.gather(*self._lingering, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()  # closes the connections still open
        for conn in list(self._open):
            conn.close()

    # ------------------------------------------------------------ connections

    async def _accept_loop(self, listen: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listen)
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EINTR, errno.EAGAIN):
                    continue
                # Out of fds (a flood of connections) or memory: the API must
                # come back once they are released, so wait and accept again.
                self._accept_log.warning("API accept failed; retrying", error=os.strerror(exc.errno or 0),
                                         retry_seconds=ACCEPT_RETRY_SECONDS)
                await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            try:
                await self._admit(sock)
            except OSError as exc:  # the peer left while being admitted
                sock.close()
                self._accept_log.warning("API connection dropped at accept", error=str(exc))

    async def _admit(self, sock: socket.socket) -> None:
        """Serve `sock` or close it, before reading a byte of it."""
        sock.setblocking(False)
        creds = peer_credentials(sock)
        if not self.access.allows(creds):
            self._refuse(sock, creds)
            return
        if len(self._open) >= MAX_CONNECTIONS:
            idle = [c for c in self._open if not c.busy]
            if not idle:
                self._limit_log.warning("API connection limit reached; new connection closed",
                                        limit=MAX_CONNECTIONS)
                sock.close()
                return
            victim = min(idle, key=lambda c: c.idle_since)
            self._limit_log.warning("API connection limit reached; closing the connection idle longest",
                                    limit=MAX_CONNECTIONS)
            self._open.pop(victim, None)
            victim.close()
        assert self._runner is not None and self._runner.server is not None
        server = self._runner.server
        await asyncio.get_running_loop().connect_accepted_socket(lambda: _Connection(self, server()), sock)

    def _refuse(self, sock: socket.socket, creds: PeerCredentials | None) -> None:
        if creds is None:
            self._refusals.warning("API request refused: peer unknown")
        else:
            self._refusals.warning("API request refused", pid=creds.pid, uid=creds.uid, gid=creds.gid)
        try:
            sock.send(refusal_response(creds))  # a fresh socket's buffer has room for it
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        if len(self._lingering) >= MAX_CONNECTIONS:
            sock.close()
            return
        task = asyncio.create_task(self._linger(sock))
        self._lingering.add(task)
        task.add_done_callback(self._lingering.discard)

    async def _linger(self, sock: socket.socket) -> None:
        """Discard what a refused peer sends, until it closes or REFUSED_LINGER:
        closing at once would turn its request into a broken pipe."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(REFUSED_LINGER):
                while await loop.sock_recv(sock, 4096):
                    pass
        except (TimeoutError, OSError):
            pass
        finally:
            sock.close()

    @web.middleware
    async def _in_request(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Mark the connection busy (the cap never closes it) and bound the
        request's time: a body that never ends cannot hold a slot."""
        transport = request.transport
        conn = transport.get_protocol() if transport is not None else None
        if not isinstance(conn, _Connection):
            conn = None
        if conn is not None:
            conn.busy += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await handler(request)
        except TimeoutError:
            if conn is not None:
                asyncio.get_running_loop().call_soon(conn.close)
            return _error(408, f"request not completed within {REQUEST_TIMEOUT:.0f} s")
        finally:
            if conn is not None:
                conn.busy -= 1
                conn.idle_since = asyncio.get_running_loop().time()

    def _vm(self, request: web.Request) -> ManagedVm:
        name = request.match_info["name"]
        vm = self.vms.get(name)
        if vm is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": f"no VM named {name!r}; known: {sorted(self.vms)}"}),
                content_type="application/json",
            )
        return vm

    async def _body(self, request: web.Request, key: str) -> Any:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "body is not valid JSON"}), content_type="application/json"
            ) from None
        if not isinstance(body, dict) or key not in body:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": f'body must be a JSON object with "{key}"'}),
                content_type="application/json",
            )
        return body[key]

    async def list_vms(self, request: web.Request) -> web.Response:
        await _refresh(*self.vms.values())
        return _json_body(b"[" + b", ".join(vm.status_body() for vm in self.vms.values()) + b"]")

    async def get_vm(self, request: web.Request) -> web.Response:
        """One VM, from its worker's last report like a list (docs/api.md,
        "Freshness"); `?fresh=1` asks the worker and waits for it."""
        vm = self._vm(request)
        fresh = request.query.get("fresh", "0")
        if fresh not in ("0", "1"):
            return _error(400, f"fresh must be 0 or 1, not {fresh!r}")
        if fresh == "1":
            await _refresh_one(vm)
        else:
            await _refresh(vm)
        return _json_body(vm.status_body())

    async def put_target(self, request: web.Request) -> web.Response:
        return await self._put_setting(request, "bytes", lambda vm, value: vm.set_target_bytes(value))

    async def put_stats_interval(self, request: web.Request) -> web.Response:
        return await self._put_setting(request, "seconds", lambda vm, value: vm.set_stats_interval(value))

    async def _put_setting(self, request: web.Request, key: str, apply: Any) -> web.Response:
        """PUT {key: value} to one VM: 400 with the reason when the VM refuses it."""
        vm = self._vm(request)
        value = await self._body(request, key)
        try:
            apply(vm, value)
        except TargetError as exc:
            return _error(400, str(exc))
        await _refresh_one(vm)
        return web.json_response(vm.status().to_json())

    async def get_pfns(self, request: web.Request) -> web.Response:
        try:
            ranges = self._vm(request).pfn_ranges()
            if inspect.isawaitable(ranges):  # a worker's VM: asked over its channel
                ranges = await ranges
            return web.json_response(ranges)
        except NotSupported as exc:
            return _error(409, str(exc))
        except VmUnavailable as exc:
            return _error(503, str(exc))

    def _policy(self) -> PolicyLoop:
        if self.policy is None:
            raise web.HTTPNotFound(text=json.dumps({"error": "this daemon has no policy loop"}),
                                   content_type="application/json")
        return self.policy

    async def get_policy(self, request: web.Request) -> web.Response:
        return web.json_response(self._policy().snapshot())

    async def put_policy(self, request: web.Request) -> web.Response:
        policy = self._policy()
        value = await self._body(request, "enabled")
        try:
            policy.set_enabled(value)
        except PolicyError as exc:
            return _error(400, str(exc))
        return web.json_response(policy.snapshot())

    async def put_vm_policy(self, request: web.Request) -> web.Response:
        vm, policy = self._vm(request), self._policy()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object of policy settings")
        try:
            settings = policy.update_vm_settings(vm.name, body)
        except PolicyError as exc:
            return _error(400, str(exc))
        return web.json_response(vars(settings))

    async def metrics(self, request: web.Request) -> web.Response:
        await _refresh(*self.vms.values())
        body, content_type = render_metrics(self.vms, self.policy)
        return web.Response(body=body, headers={"Content-Type": content_type})
