"""VhostUserListener: the Unix socket one VM's QEMU connects to.

QEMU is the client; the daemon listens, one socket per VM, created 0600 (or
0660 with a group), or handed over already listening (an inherited fd, as
libvirt and systemd socket activation do). One frontend at a time: a second
connection while one is active is refused, so two QEMUs can never share one
device's state. When the frontend goes away the socket keeps listening.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import os
import socket
import stat
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from ..logs import RateLimited

#: accept() failures that mean the listening socket itself is gone (closed
#: at shutdown): the only ones that end the accept loop. Every other one
#: (EMFILE, ENFILE, ECONNABORTED, ENOBUFS, ENOMEM: out of fds, memory or
#: buffers, or a peer that gave up before we took it) means "not now": the
#: loop sleeps ACCEPT_RETRY_SECONDS and accepts again. A local client holding
#: every fd of the daemon must not end a VM's listener for good.
FATAL_ACCEPT_ERRORS = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})
ACCEPT_RETRY_SECONDS = 0.1


class ListenerError(Exception):
    """The socket could not be set up (path in use, permissions, bad fd)."""


def open_listening_socket(path: str, *, group: str | None = None) -> socket.socket:
    """Bind a fresh Unix socket at `path`, replacing a stale one, mode 0600/0660."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ListenerError(f"{path}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a leftover of an earlier run
        else:
            raise ListenerError(f"{path} is in use by another running process")
        finally:
            probe.close()
    gid = None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ListenerError(f"unknown group {group!r}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177 if gid is None else 0o117)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    if gid is not None:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)
    sock.listen(4)
    sock.setblocking(False)
    return sock


def adopt_listening_socket(fd: int) -> socket.socket:
    """Use an inherited, already listening Unix socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenerError(f"fd {fd} is not a listening Unix socket ({exc.strerror})") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ListenerError(f"fd {fd} is not a listening Unix socket (wrong socket type)")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ListenerError(f"fd {fd} is not a listening Unix socket (not listening)")
    sock.setblocking(False)
    return sock


class VhostUserListener:
    def __init__(self, sock: socket.socket, *, path: str | None, log: Any = None) -> None:
        self.sock = sock
        self.path = path
        self.log = log or structlog.get_logger()
        self.limited = RateLimited(self.log)
        self.busy = False
        #: accept() calls that failed for want of a resource (retried).
        self.accept_errors = 0

    async def serve(self, serve_connection: Callable[[socket.socket], Coroutine[Any, Any, None]]) -> None:
        """Accept frontends forever, handing each to `serve_connection`."""
        loop = asyncio.get_running_loop()
        active: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    conn, _ = await loop.sock_accept(self.sock)
                except OSError as exc:
                    if exc.errno in FATAL_ACCEPT_ERRORS:
                        raise
                    self.accept_errors += 1
                    self.limited.warning("accept failed; trying again", error=os.strerror(exc.errno or 0),
                                         retry_seconds=ACCEPT_RETRY_SECONDS, times=self.accept_errors)
                    await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                    continue
                if active is not None and not active.done():
                    self.log.warning("refused a second frontend: this VM's device is in use")
                    conn.close()
                    continue
                active = asyncio.create_task(serve_connection(conn))
        finally:
            if active is not None and not active.done():
                active.cancel()
                try:
                    await active
                except (asyncio.CancelledError, Exception):
                    pass

    def close(self) -> None:
        self.sock.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
