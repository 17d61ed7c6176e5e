"""Who may use the control API: the peer's credentials (SO_PEERCRED).

The API socket is created 0600, so the file system already keeps most users
out; this check holds even where the socket's mode or directory is looser
(a group-writable run directory, a socket handed over by a service manager,
an operator's chmod). When a connection is accepted the kernel is asked who is at the
other end of the Unix socket - the pid, uid and gid recorded when that
process connected - and the connection is served only if:

* the uid is 0 (root), or
* the uid is the daemon's own, or
* the uid is in `allowed_uids`, or
* the peer's primary gid (the gid SO_PEERCRED reports: the effective gid at
  connect time) is in `allowed_gids`.

Supplementary groups are deliberately not consulted: SO_PEERCRED does not
carry them, and reading them from /proc/<pid>/status would race with the
pid being reused. To admit a group, make it the clients' primary group (or
run them with `sg`/`newgrp`), or list their uids.

The check is made when a connection is accepted, before a byte of HTTP is
parsed (api.py): a peer that may not use the API cannot make the daemon
parse anything or keep a connection slot. It is answered with a fixed 403
`{"error": "..."}` (`refusal_response`) and closed, and one warning line
names its pid, uid and gid (rate-limited, so a client retrying in a loop
cannot flood the log; the line has no method or path, as nothing was read).
The per-request middleware stays as a second check for a transport whose
socket cannot be seen: a request whose peer cannot be identified (not a
Unix socket) is refused too, with 403: the check fails closed.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from ..logs import RateLimited

#: struct ucred: pid_t pid, uid_t uid, gid_t gid.
UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: Any) -> PeerCredentials | None:
    """The credentials of a connected Unix socket's peer, or None if there are none."""
    if sock is None:
        return None
    try:
        if sock.family != socket.AF_UNIX:
            return None
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
    except (OSError, AttributeError):
        return None
    pid, uid, gid = UCRED.unpack(raw)
    return PeerCredentials(pid, uid & 0xFFFF_FFFF, gid & 0xFFFF_FFFF)


def request_credentials(request: web.BaseRequest) -> PeerCredentials | None:
    transport = request.transport
    if transport is None:
        return None
    return peer_credentials(transport.get_extra_info("socket"))


class AccessPolicy:
    """Root, the daemon's own uid, and the uids and primary gids listed."""

    def __init__(
        self,
        allowed_uids: Iterable[int] = (),
        allowed_gids: Iterable[int] = (),
        *,
        own_uid: int | None = None,
    ) -> None:
        self.own_uid = os.getuid() if own_uid is None else own_uid
        self.allowed_uids = frozenset(int(u) for u in allowed_uids)
        self.allowed_gids = frozenset(int(g) for g in allowed_gids)
        for value in self.allowed_uids | self.allowed_gids:
            if not 0 <= value <= 0xFFFF_FFFE:
                raise ValueError(f"not a valid uid/gid: {value}")
        self.uids = frozenset({0, self.own_uid}) | self.allowed_uids

    def allows(self, creds: PeerCredentials | None) -> bool:
        if creds is None:
            return False
        return creds.uid in self.uids or creds.gid in self.allowed_gids

    def describe(self) -> dict[str, list[int]]:
        return {"uids": sorted(self.uids), "gids": sorted(self.allowed_gids)}


def refusal_message(creds: PeerCredentials | None) -> str:
    if creds is None:
        return "permission denied: the API only serves local clients it can identify"
    return f"permission denied for uid {creds.uid} (gid {creds.gid})"


def refusal_response(creds: PeerCredentials | None) -> bytes:
    """The whole HTTP answer to a peer refused at accept: written without
    reading its request, so nothing it sent is ever parsed."""
    body = json.dumps({"error": refusal_message(creds)}).encode()
    head = (f"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def access_middleware(policy: AccessPolicy, log: Any = None) -> Any:
    """An aiohttp middleware that serves only peers `policy` allows."""
    limited = RateLimited(log or structlog.get_logger())

    @web.middleware
    async def check_peer(request: web.Request, handler: Any) -> web.StreamResponse:
        creds = request_credentials(request)
        if policy.allows(creds):
            return await handler(request)
        message = refusal_message(creds)
        if creds is None:
            limited.warning("API request refused: peer unknown", method=request.method, path=request.path)
        else:
            limited.warning(
                "API request refused",
                pid=creds.pid,
                uid=creds.uid,
                gid=creds.gid,
                method=request.method,
                path=request.path,
            )
        return web.json_response({"error": message}, status=403)

    return check_peer
