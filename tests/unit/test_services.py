"""Settings, sizes and CLI rendering: operator-facing edges."""

import json
import subprocess
import sys

import pytest

from balloond.services import config
from balloond.services.sizes import format_size, parse_size


@pytest.mark.parametrize("text, value", [("4096", 4096), ("256M", 256 << 20), ("1G", 1 << 30), ("1.5GiB", 3 << 29),
                                         ("0", 0), ("64k", 64 << 10), ("2 MB", 2 << 20)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-5", "1X", "M", "0.3K"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(256 << 20) == "256.0 MiB"
    assert format_size(None) == "-"


def test_vm_specs():
    vm = config.parse_vm_spec("web1=/run/b/web1.sock,qmp=/run/q.sock")
    assert (vm.name, vm.socket, vm.qmp) == ("web1", "/run/b/web1.sock", "/run/q.sock")
    assert config.parse_vm_spec("x=fd:3").fd == 3
    for bad in ("noequals", "a=", "bad name=/x", "a=fd:x", "a=/x,foo=1"):
        with pytest.raises(config.ConfigError):
            config.parse_vm_spec(bad)


def test_config_file_and_flags(tmp_path):
    f = tmp_path / "b.toml"
    f.write_text('api = "/tmp/api.sock"\nstats_interval = 2\n[[vm]]\nname = "a"\nsocket = "/tmp/a.sock"\n')
    settings, _ = config.load(["--config", str(f), "--stats-interval", "7", "--vm", "b=/tmp/b.sock"])
    assert [v.name for v in settings.vms] == ["a", "b"]
    assert settings.stats_interval == 7 and settings.api == "/tmp/api.sock"


@pytest.mark.parametrize("text, message", [
    ("api = 5", "wrong type"),
    ("bogus = 1", "unknown setting"),
    ("[[vm]]\nsocket = '/x'", "needs a name"),
    ("[[vm]]\nname = 'a'", "give socket or fd \\(our balloon\\), or only qmp"),
    ("[[vm]]\nname = 'a'\nsocket = '/x'\nfd = 3", "socket or fd, not both"),
    ("this is not toml", "config file"),
])
def test_config_file_errors_are_one_line(tmp_path, text, message):
    f = tmp_path / "b.toml"
    f.write_text(text)
    with pytest.raises(config.ConfigError, match=message):
        config.load(["--config", str(f)])


def test_duplicate_vms_refused():
    with pytest.raises(config.ConfigError, match="unique"):
        config.load(["--vm", "a=/x", "--vm", "a=/y"])


def run(*args):
    return subprocess.run([sys.executable, "-m", "balloond", *args], capture_output=True, text=True, timeout=30)


def test_bad_arguments_exit_2_with_one_line():
    for args in ([], ["--vm", "x"], ["--vm", "a=/x", "--stats-interval", "-1"], ["--frobnicate"],
                 ["--config", "/nonexistent.toml"]):
        p = run(*args)
        assert p.returncode == 2, args
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("balloond: "), p.stderr
        assert "Traceback" not in p.stderr


def test_print_capabilities_is_json():
    p = run("--print-capabilities")
    assert p.returncode == 0
    caps = json.loads(p.stdout)
    assert caps["type"] == "balloon" and "migrate-extension" in caps["features"]


def test_socket_path_in_use_is_a_clear_error(tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("x")
    p = run("--vm", f"a={path}")
    assert p.returncode == 1 and "not a socket" in p.stderr and "Traceback" not in p.stderr


def test_balloonctl_without_daemon(tmp_path):
    p = subprocess.run([sys.executable, "-m", "balloond.services.cli", "--api", str(tmp_path / "none"), "status"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "not running" in p.stderr


def test_balloonctl_bad_size(tmp_path):
    p = subprocess.run([sys.executable, "-m", "balloond.services.cli", "--api", str(tmp_path / "x"), "set", "a", "lots"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "not a size" in p.stderr
