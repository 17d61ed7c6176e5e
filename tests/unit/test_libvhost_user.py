"""The libvhost-user binding: its layout check, how it is chosen and refused,
and a smoke test of the real library (built by scripts/setup.sh) over a
socketpair. The library must be there: these tests fail, never skip,
without it (CI builds it with the other setup steps)."""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from balloond.device.releaser import MemoryReleaser, ReleasableRegion
from balloond.engine.libvhost_user import abi
from balloond.services import config
from harness.paths import cache_dir

REPO = Path(__file__).resolve().parents[2]
PAGE = 4096


def built() -> Path:
    path = Path(os.environ.get("BALLOOND_LIBVHOST_USER") or cache_dir() / "libvhost-user-current")
    assert (path / "libvhost-user.so").is_file(), f"no libvhost-user build in {path}: run scripts/setup.sh"
    return path


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the built library and its layout.json, for the test to damage."""
    src = built()
    for name in ("libvhost-user.so", "layout.json"):
        shutil.copy(src / name, tmp_path / name)
    return tmp_path


def edit_layout(directory: Path, change: Any) -> None:
    path = directory / "layout.json"
    layout = json.loads(path.read_text())
    change(layout)
    path.write_text(json.dumps(layout))


# ------------------------------------------------------------ layout check


def test_built_layout_matches_the_binding():
    probed = json.loads((built() / "layout.json").read_text())
    assert probed == abi.own_layout()
    abi.check(str(built()))


@pytest.mark.parametrize("field", ["VuVirtq.last_avail_idx", "VuDev.regions", "VuVirtqElement.in_sg",
                                   "VhostUserMsg.fds", "VuDevIface.set_config"])
def test_an_offset_differing_is_refused_in_one_line(copy, field):
    edit_layout(copy, lambda layout: layout.__setitem__(field, layout[field] + 8))
    with pytest.raises(abi.LibraryError) as info:
        abi.check(str(copy))
    message = str(info.value)
    assert "\n" not in message
    assert f"offset of {field}" in message and "layout mismatch" in message


def test_a_size_differing_is_refused(copy):
    edit_layout(copy, lambda layout: layout.__setitem__("VuVirtq", layout["VuVirtq"] + 4))
    with pytest.raises(abi.LibraryError, match="size of VuVirtq is"):
        abi.check(str(copy))


def test_a_field_the_probe_does_not_report_is_refused(copy):
    edit_layout(copy, lambda layout: layout.pop("VuDev.backend_fd"))
    with pytest.raises(abi.LibraryError, match="does not report VuDev.backend_fd"):
        abi.check(str(copy))


def test_missing_library_and_layout_are_one_line_errors(copy, tmp_path):
    with pytest.raises(abi.LibraryError, match="libvhost-user not found"):
        abi.check(str(tmp_path / "nowhere"))
    (copy / "layout.json").unlink()
    with pytest.raises(abi.LibraryError, match="layout missing"):
        abi.check(str(copy))
    (copy / "layout.json").write_text("{not json")
    with pytest.raises(abi.LibraryError, match="layout unreadable"):
        abi.check(str(copy))


# ------------------------------------------------------- choosing the engine


def test_engine_is_chosen_per_vm_on_the_command_line_and_in_toml(tmp_path, monkeypatch):
    monkeypatch.setenv("BALLOOND_LIBVHOST_USER", str(built()))
    settings, _ = config.load(["--vm", "a=/run/a.sock", "--vm", "b=/run/b.sock,engine=libvhost-user"])
    assert [settings.engine_of(vm) for vm in settings.vms] == ["pure", "libvhost-user"]
    settings, _ = config.load(["--engine", "libvhost-user", "--vm", "a=/run/a.sock,engine=pure",
                               "--vm", "b=/run/b.sock"])
    assert [settings.engine_of(vm) for vm in settings.vms] == ["pure", "libvhost-user"]
    toml = tmp_path / "b.toml"
    toml.write_text('engine = "libvhost-user"\n[[vm]]\nname = "a"\nsocket = "/run/a.sock"\n'
                    '[[vm]]\nname = "b"\nsocket = "/run/b.sock"\nengine = "pure"\n')
    settings, _ = config.load(["--config", str(toml)])
    assert [settings.engine_of(vm) for vm in settings.vms] == ["libvhost-user", "pure"]


@pytest.mark.parametrize("argv, message", [
    (["--vm", "a=/run/a.sock,engine=dpdk"], "engine must be one of pure, libvhost-user, not 'dpdk'"),
    (["--vm", "a=qmp:/run/a.qmp,engine=libvhost-user"], "engine applies to a vhost-user socket"),
])
def test_bad_engine_choices_are_refused(argv, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(argv)


def test_toml_engine_of_the_wrong_type_is_refused(tmp_path):
    toml = tmp_path / "b.toml"
    toml.write_text('[[vm]]\nname = "a"\nsocket = "/run/a.sock"\nengine = 3\n')
    with pytest.raises(config.ConfigError, match="engine must be one of"):
        config.load(["--config", str(toml)])


def test_unusable_library_stops_the_daemon_at_start_with_exit_code_2(copy, tmp_path):
    """A VM on libvhost-user whose library is missing or laid out otherwise:
    one line on stderr, exit code 2, before any socket is opened."""
    edit_layout(copy, lambda layout: layout.__setitem__("VuDev.vq", 0))
    sock = tmp_path / "a.sock"
    env = {**os.environ, "BALLOOND_LIBVHOST_USER": str(copy), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "balloond", "--vm", f"a={sock}", "--engine", "libvhost-user"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "layout mismatch: offset of VuDev.vq" in lines[0] and lines[0].startswith("balloond: VM a:")
    assert not sock.exists()


# ------------------------------------------------------------- the library


class StubDevice:
    """The device seam, recording what the engine calls."""

    features = (1 << 32) | (1 << 1) | (1 << 29)  # VERSION_1, STATS_VQ, EVENT_IDX

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.config = bytearray(range(8))

    def attach(self, host: Any) -> None:
        self.calls.append("attach")

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(self.config[offset:offset + size])

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset:offset + len(data)] = data
        self.calls.append(("write_config", offset, data))

    def set_features(self, features: int) -> None:
        self.calls.append(("set_features", features))

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any) -> int:
            self.calls.append(name)
            return 0
        return record


def message(request: int, payload: bytes = b"", need_reply: bool = False) -> bytes:
    return struct.pack("<III", request, 1 | (8 if need_reply else 0), len(payload)) + payload


def reply(sock: socket.socket) -> tuple[int, bytes]:
    header = sock.recv(12, socket.MSG_WAITALL)
    request, _, size = struct.unpack("<III", header)
    return request, sock.recv(size, socket.MSG_WAITALL) if size else b""


def test_binding_smoke_over_a_socketpair():
    """The real library, driven from the event loop through the binding:
    features with VHOST_F_LOG_ALL (the VM can migrate), the config space
    both ways, and a hang-up closing the connection (the library would
    exit() for it)."""
    from balloond.engine.libvhost_user.connection import LibvhostUserConnection

    library = abi.load(str(built()))
    ours, theirs = socket.socketpair()
    device = StubDevice()

    async def run() -> tuple[str, list[Any], int, bytes]:
        conn = LibvhostUserConnection(ours, device, library=library)  # type: ignore[arg-type]
        serving = asyncio.ensure_future(conn.run())
        loop = asyncio.get_running_loop()
        theirs.setblocking(True)

        def talk() -> tuple[int, bytes]:
            theirs.sendall(message(1))  # GET_FEATURES
            _, features = reply(theirs)
            theirs.sendall(message(2, features))  # SET_FEATURES: all of them
            window = struct.pack("<III", 0, 8, 0) + bytes(8)
            theirs.sendall(message(24, window))  # GET_CONFIG
            _, config_reply = reply(theirs)
            theirs.sendall(message(25, struct.pack("<III", 2, 2, 0) + b"\xaa\xbb"))  # SET_CONFIG
            theirs.sendall(message(1))  # a round trip: SET_CONFIG was handled
            reply(theirs)
            theirs.close()
            return struct.unpack("<Q", features)[0], config_reply

        features, config_reply = await loop.run_in_executor(None, talk)
        reason = await asyncio.wait_for(serving, 10)
        return reason, device.calls, features, config_reply

    reason, calls, features, config_reply = asyncio.run(run())
    assert features & StubDevice.features == StubDevice.features
    assert features & (1 << 30)  # VHOST_USER_F_PROTOCOL_FEATURES
    assert features & (1 << 26)  # VHOST_F_LOG_ALL: the VM can migrate
    assert ("set_features", StubDevice.features) in calls
    assert config_reply[12:20] == bytes(range(8))
    assert ("write_config", 2, b"\xaa\xbb") in calls
    assert reason == "frontend closed the connection"
    assert "disconnected" in calls


def test_releaser_mapping_mode_discards_through_the_address():
    """Memory whose fd the library closed: MADV_REMOVE at the mapping frees
    the file's pages, with the same coalescing and the same measurement."""
    size = 4 << 20
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size)
    try:
        for off in range(0, size, PAGE):
            m[off] = 0xAB
        import ctypes

        address = ctypes.addressof(ctypes.c_char.from_buffer(m))
        region = ReleasableRegion(0, size, fd, 0, None, 0, address=address)
        assert not region.punch_supported
        releaser = MemoryReleaser([region])
        before = os.fstat(fd).st_blocks * 512
        result = releaser.release_frames(list(range(16, 48)) + list(range(100, 104)))
        assert result.calls == 2 and result.errors == 0
        assert result.freed_bytes == 36 * PAGE == before - os.fstat(fd).st_blocks * 512
        assert m[16 * PAGE] == 0 and m[47 * PAGE] == 0 and m[48 * PAGE] == 0xAB and m[15 * PAGE] == 0xAB
        del address
    finally:
        m.close()
        os.close(fd)
