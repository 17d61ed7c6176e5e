"""Configuring VMs with a QMP socket: `--vm NAME=qmp:PATH` and [[vm]] with only
qmp (QEMU's built-in balloon), `,qmp=PATH` next to our socket (run state and
discard guard), and what the daemon builds for each."""

from __future__ import annotations

import pytest

from balloond.services import config
from balloond.services.daemon import Daemon
from balloond.services.discard_guard import NOT_CONNECTED, DiscardGuard
from balloond.services.qemu_balloon import QemuBalloonVm
from balloond.services.qmp_link import QmpLink
from balloond.vm import VirtualMachine
from balloond.worker.supervisor import WorkerVm


def test_vm_with_only_a_qmp_socket_uses_qemus_balloon():
    settings, _ = config.load(["--vm", "a=qmp:/run/qemu/a.qmp", "--vm", "b=/run/b.sock,qmp=/run/qemu/b.qmp"])
    a, b = settings.vms
    assert (a.name, a.socket, a.fd, a.qmp) == ("a", None, None, "/run/qemu/a.qmp")
    assert a.uses_qemu_balloon is True
    assert (b.socket, b.qmp) == ("/run/b.sock", "/run/qemu/b.qmp") and b.uses_qemu_balloon is False
    fd_vm = config.parse_vm_spec("c=fd:3,qmp=/q")
    assert fd_vm.fd == 3 and fd_vm.qmp == "/q" and fd_vm.uses_qemu_balloon is False
    with_policy = config.parse_vm_spec("d=qmp:/d.qmp,min_memory=1G")
    assert with_policy.uses_qemu_balloon and with_policy.policy.min_bytes == 1 << 30


def test_toml_vm_with_name_and_qmp_only(tmp_path):
    f = tmp_path / "balloond.toml"
    f.write_text('[[vm]]\nname = "legacy"\nqmp = "/run/qemu/legacy.qmp"\n\n'
                 '[[vm]]\nname = "web1"\nsocket = "/run/web1.sock"\nqmp = "/run/qemu/web1.qmp"\n')
    settings, _ = config.load(["--config", str(f)])
    legacy, web1 = settings.vms
    assert legacy.uses_qemu_balloon and legacy.qmp == "/run/qemu/legacy.qmp" and legacy.socket is None
    assert not web1.uses_qemu_balloon and web1.qmp == "/run/qemu/web1.qmp" and web1.socket == "/run/web1.sock"


@pytest.mark.parametrize("argv,message", [
    (["--vm", "a=qmp:"], "'qmp:' is not qmp:PATH"),
    (["--vm", "a=qmp:/p", "--vm", "b=qmp:/p"], "cannot share one QMP socket"),
    (["--vm", "a=qmp:/p", "--vm", "b=/b.sock,qmp=/p"], "cannot share one QMP socket"),
    (["--vm", "a=/a.sock,qmp=/x,qmp=/y"], "QMP socket is given twice"),
    (["--vm", "a=qmp:/x,qmp=/y"], "QMP socket is given twice"),
    (["--vm", "a=/a.sock,qmp="], "unknown option 'qmp='"),
])
def test_qmp_configuration_errors(argv, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(argv)


def test_toml_shared_qmp_path_is_refused(tmp_path):
    f = tmp_path / "balloond.toml"
    f.write_text('[[vm]]\nname = "a"\nqmp = "/q"\n\n[[vm]]\nname = "b"\nsocket = "/b.sock"\nqmp = "/q"\n')
    with pytest.raises(config.ConfigError, match="cannot share one QMP socket"):
        config.load(["--config", str(f)])


@pytest.mark.parametrize("isolation, vhost_user_vm", [("process", WorkerVm), ("none", VirtualMachine)])
def test_daemon_builds_a_qemu_balloon_vm_and_a_guarded_virtual_machine(tmp_path, isolation, vhost_user_vm):
    settings, _ = config.load([
        "--vm", f"a=qmp:{tmp_path}/a.qmp",
        "--vm", f"b={tmp_path}/b.sock,qmp={tmp_path}/b.qmp",
        "--vm", f"c={tmp_path}/c.sock",
        "--stats-interval", "2.5",
        "--vm-isolation", isolation,
    ])
    d = Daemon(settings)
    d.open_sockets()
    try:
        a, b, c = d.vms["a"], d.vms["b"], d.vms["c"]
        # a: QEMU's balloon over QMP; no socket, no listener, no discard guard.
        assert isinstance(a, QemuBalloonVm)
        assert isinstance(a.qmp, QmpLink) and a.qmp.path == f"{tmp_path}/a.qmp" and a in a.qmp.watches
        assert a.stats_interval == 2.5
        s = a.summary()
        assert s["kind"] == "qemu" and s["connected"] is False and s["socket"] is None
        assert s["qmp"] == f"{tmp_path}/a.qmp" and s["discard_guard"] is None
        assert not (tmp_path / "a.qmp").exists()  # the daemon connects to QMP, it does not listen
        # b: our device, with a link carrying a discard guard that starts closed.
        assert isinstance(b, vhost_user_vm) and b.kind == "vhost-user"
        assert isinstance(b.qmp, QmpLink) and b.qmp.path == f"{tmp_path}/b.qmp"
        assert isinstance(b.discard_guard, DiscardGuard) and b.discard_guard in b.qmp.watches
        assert b.discard_inhibit == NOT_CONNECTED == b.discard_guard.reason
        s = b.summary()
        assert s["kind"] == "vhost-user" and s["qmp"] == f"{tmp_path}/b.qmp"
        assert s["discard_inhibited"] == NOT_CONNECTED and s["discard_guard"]["discard_inhibited"] == NOT_CONNECTED
        # c: no QMP, no guard, discards allowed.
        assert isinstance(c, vhost_user_vm) and c.qmp is None and c.discard_guard is None
        assert c.discard_inhibit is None and c.summary()["discard_guard"] is None
        assert [listener.path for listener in d.listeners] == [f"{tmp_path}/b.sock", f"{tmp_path}/c.sock"]
    finally:
        for listener in d.listeners:
            listener.close()
