"""The control API: HTTP/JSON on a Unix socket, in the style of Firecracker's.

    GET  /v1/vms                     summaries of every VM
    GET  /v1/vms/{name}              one VM
    PUT  /v1/vms/{name}/target       {"bytes": N}: the balloon size to reach
    PUT  /v1/vms/{name}/stats-interval  {"seconds": S}: how often to ask for stats
    GET  /v1/vms/{name}/pfns         {"count": N, "ranges": [[first_pfn, n], ...]}
    GET  /metrics                    Prometheus text format

Errors are JSON `{"error": "..."}` with 400 (bad request body), 404 (unknown
VM or path) or 405; a bug in a handler is a 500 with a log line, never a
dropped connection.
"""

from __future__ import annotations

import json
import os
from typing import Any

import structlog
from aiohttp import web

from ..vm import TargetError, VirtualMachine
from .metrics import render_metrics


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


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
    def __init__(self, vms: dict[str, VirtualMachine]) -> None:
        self.vms = vms
        self.app = web.Application(middlewares=[_errors])
        self.app.add_routes(
            [
                web.get("/v1/vms", self.list_vms),
                web.get("/v1/vms/{name}", self.get_vm),
                web.put("/v1/vms/{name}/target", self.put_target),
                web.put("/v1/vms/{name}/stats-interval", self.put_stats_interval),
                web.get("/v1/vms/{name}/pfns", self.get_pfns),
                web.get("/metrics", self.metrics),
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

    def _vm(self, request: web.Request) -> VirtualMachine:
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
        return web.json_response([vm.summary() for vm in self.vms.values()])

    async def get_vm(self, request: web.Request) -> web.Response:
        return web.json_response(self._vm(request).summary())

    async def put_target(self, request: web.Request) -> web.Response:
        vm = self._vm(request)
        value = await self._body(request, "bytes")
        try:
            vm.set_target_bytes(value)
        except TargetError as exc:
            return _error(400, str(exc))
        return web.json_response(vm.summary())

    async def put_stats_interval(self, request: web.Request) -> web.Response:
        vm = self._vm(request)
        value = await self._body(request, "seconds")
        try:
            vm.set_stats_interval(value)
        except TargetError as exc:
            return _error(400, str(exc))
        return web.json_response(vm.summary())

    async def get_pfns(self, request: web.Request) -> web.Response:
        return web.json_response(self._vm(request).pfn_ranges())

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = render_metrics(self.vms)
        return web.Response(body=body, headers={"Content-Type": content_type})
