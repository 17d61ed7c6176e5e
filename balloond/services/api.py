"""The control API: HTTP/JSON on a Unix socket, in the style of Firecracker's.

    GET  /v1/vms                     summaries of every VM
    GET  /v1/vms/{name}              one VM
    PUT  /v1/vms/{name}/target       {"bytes": N}: the balloon size to reach
    PUT  /v1/vms/{name}/stats-interval  {"seconds": S}: how often to ask for stats
    GET  /v1/vms/{name}/pfns         {"count": N, "ranges": [[first_pfn, n], ...]}
    GET  /metrics                    Prometheus text format

Only root, the daemon's own uid and the uids/gids it is told to allow are
served (peer credentials, see access.py); anyone else gets 403.

Errors are JSON `{"error": "..."}` with 400 (bad request body), 403 (peer not
allowed), 404 (unknown VM or path), 405, 409 (not something this kind of
VM can do: the frames held by QEMU's built-in balloon) or 503 (the VM's
worker process is restarting, for what only it knows: its frames); a bug in a handler is a 500 with a
log line, never a dropped connection.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
from collections.abc import Iterable
from typing import Any

import structlog
from aiohttp import web

from ..worker.supervisor import WorkerVm
from ..vm import ManagedVm, NotSupported, TargetError, VmUnavailable
from .access import AccessPolicy, access_middleware
from .metrics import render_metrics
from .policy import PolicyError
from .policy_loop import PolicyLoop


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _refresh(*vms: ManagedVm) -> None:
    """VMs served by a worker process report afresh before their status is read."""
    await asyncio.gather(*(vm.report_now() for vm in vms if isinstance(vm, WorkerVm)))


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
        self.app = web.Application(middlewares=[access_middleware(self.access), _errors])
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

    async def start(self, path: str) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        if os.path.exists(path):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            await web.UnixSite(self._runner, path).start()
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

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
        return web.json_response([vm.status().to_json() for vm in self.vms.values()])

    async def get_vm(self, request: web.Request) -> web.Response:
        vm = self._vm(request)
        await _refresh(vm)
        return web.json_response(vm.status().to_json())

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
        await _refresh(vm)
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
