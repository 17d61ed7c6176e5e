"""A minimal writer for the cpio "newc" format the kernel unpacks as initramfs.

Why in Python: the guest image is assembled per test (which modules, which
extra files), so building it in memory is faster and has fewer moving parts
than staging a directory tree and calling cpio(1).  Only what the kernel's
initramfs unpacker needs is implemented: directories, regular files and
symlinks, all owned by root.
"""

from __future__ import annotations

import io
import stat


class CpioWriter:
    """Accumulates entries and renders them as one newc archive."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = set()
        self._closed = False

    # -- entries ---------------------------------------------------------
    def add_dir(self, path: str, mode: int = 0o755) -> None:
        path = self._norm(path)
        if not path or path in self._dirs:
            return
        self._parents(path)
        self._dirs.add(path)
        self._entry(path, stat.S_IFDIR | mode, b"")

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = self._norm(path)
        self._parents(path)
        self._entry(path, stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        path = self._norm(path)
        self._parents(path)
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A character device node, e.g. /dev/console (5, 1), which the
        kernel opens as init's stdio before devtmpfs is mounted."""
        path = self._norm(path)
        self._parents(path)
        self._entry(path, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        """Append the trailer and return the archive."""
        if not self._closed:
            self._entry("TRAILER!!!", 0, b"", nlink=1)
            self._closed = True
        return self._buf.getvalue()

    # -- internals -------------------------------------------------------
    @staticmethod
    def _norm(path: str) -> str:
        return path.strip("/")

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.add_dir("/".join(parts[:i]))

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        nlink: int | None = None,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        if self._closed:
            raise ValueError("archive already finished")
        encoded = name.encode() + b"\0"
        if nlink is None:
            nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = [
            self._ino, mode, 0, 0, nlink, 0, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        ]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._write_padded(header + encoded)
        self._write_padded(data)

    def _write_padded(self, chunk: bytes) -> None:
        self._buf.write(chunk)
        pad = (-self._buf.tell()) % 4
        if pad:
            self._buf.write(b"\0" * pad)
