"""Daemon settings from the command line and an optional TOML file.

The file and the flags name the same settings; a flag wins over the file.
Every problem is reported as one `ConfigError` line (the entry point turns it
into exit code 2), never as a traceback.

Example file:

    api = "/run/balloond/api.sock"
    stats_interval = 5
    log_format = "json"
    socket_group = "kvm"

    [[vm]]
    name = "web1"
    socket = "/run/balloond/web1.sock"     # or fd = 3 for an inherited socket
    qmp = "/run/qemu/web1.qmp"             # optional: run state, discard guard

    [[vm]]
    name = "legacy"
    qmp = "/run/qemu/legacy.qmp"           # only qmp: QEMU's built-in balloon

    [[vm]]
    name = "db1"
    libvirt = "qemu:///system"             # QEMU's built-in balloon, through libvirt
    domain = "db1"                         # optional: the domain's name (default: name)
"""

from __future__ import annotations

import argparse
import math
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from .policy import PolicyConfig, PolicyError, VmPolicySettings
from .sizes import parse_size

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(Exception):
    pass


@dataclass
class VmConfig:
    name: str
    socket: str | None = None
    fd: int | None = None
    qmp: str | None = None
    policy: VmPolicySettings = field(default_factory=VmPolicySettings)
    #: libvirt:URI/DOMAIN: QEMU's built-in balloon of a libvirt domain, through libvirt's API.
    libvirt: str | None = None
    domain: str | None = None
    #: The vhost-user engine serving this VM (ENGINES); None: the daemon's --engine.
    engine: str | None = None

    @property
    def uses_qemu_balloon(self) -> bool:
        """No socket of ours: the VM has QEMU's built-in balloon, steered over QMP."""
        return self.socket is None and self.fd is None and self.libvirt is None


@dataclass
class Settings:
    vms: list[VmConfig] = field(default_factory=list)
    api: str | None = None
    state_dir: str | None = None
    stats_interval: float = 5.0
    log_format: str = "console"
    log_level: str = "info"
    socket_group: str | None = None
    poll_us: float = 200.0
    discard_delay_ms: float = 250.0
    migrate_extension: bool = True
    deflate_on_oom: bool = True
    free_page_reporting: bool = True
    #: Besides root and the daemon's own uid, who may use the API (peer credentials).
    api_allow_uids: list[int] = field(default_factory=list)
    api_allow_gids: list[int] = field(default_factory=list)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    #: Test mode: the policy sees a pretend host of this many bytes (SimulatedHost).
    policy_simulate_host: int | None = None
    #: Seconds between the discard guard's looks over QMP (migrations also
    #: announce themselves by event; tests lengthen it to tell the two apart).
    guard_poll_interval: float = 1.0
    #: "process": each VM's socket served by a worker process of its own; "none": all in this process.
    vm_isolation: str = "process"
    #: Seconds without a word from a worker before it is killed and restarted.
    worker_timeout: float = 5.0
    #: The largest memory table a frontend may send (sum of its regions): the
    #: daemon's per-VM bookkeeping grows with guest RAM, so a hostile frontend
    #: must not be able to ask for terabytes of sparse memfd.
    max_guest_ram: int = 1 << 40
    #: The vhost-user engine of VMs that name none (ENGINES; per VM: engine = ... in [[vm]]).
    engine: str = "pure"

    def engine_of(self, vm: VmConfig) -> str:
        return vm.engine or self.engine


#: "pure": the daemon's own vhost-user engine; "libvhost-user": QEMU's
#: library through ctypes (balloond/engine/libvhost_user), built by setup.
ENGINES = ("pure", "libvhost-user")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="balloond",
        description="virtio-balloon device backend for QEMU (vhost-user)",
    )
    p.add_argument("--vm", action="append", default=[], metavar="NAME=SOCKET",
                   help="serve a VM: NAME=PATH listens on PATH; NAME=fd:N uses inherited listening fd N; "
                        "append ,qmp=PATH for the VM's QMP socket; NAME=qmp:PATH manages a VM with QEMU's "
                        "built-in virtio-balloon over its QMP socket; NAME=libvirt:URI/DOMAIN steers a libvirt "
                        "domain's built-in virtio-balloon through libvirt's API (repeatable)")
    p.add_argument("--socket-path", help="vhost-user backend convention: one VM, named 'default', on PATH")
    p.add_argument("--fd", type=int, help="vhost-user backend convention: one VM, named 'default', on fd N")
    p.add_argument("--api", metavar="PATH", help="control API Unix socket")
    p.add_argument("--api-allow-uid", type=int, action="append", default=[], metavar="UID",
                   help="also serve API clients running as UID (root and the daemon's own uid always are; "
                        "repeatable)")
    p.add_argument("--api-allow-gid", type=int, action="append", default=[], metavar="GID",
                   help="also serve API clients whose primary group is GID (repeatable)")
    p.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep each VM's balloon (ballooned frames, target) here, so a restarted daemon "
                        "carries on where it stopped")
    p.add_argument("--stats-interval", type=float, metavar="SECONDS",
                   help="how often to ask guests for statistics (0 = never; default 5)")
    p.add_argument("--log-format", choices=("json", "console"))
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--socket-group", metavar="GROUP", help="make VM sockets 0660 and owned by GROUP")
    p.add_argument("--engine", choices=ENGINES,
                   help="vhost-user engine for VMs that name none: pure (default) or libvhost-user (QEMU's "
                        "library, built by scripts/setup.sh; no live migration)")
    p.add_argument("--poll-us", type=float, metavar="MICROSECONDS",
                   help="after a kick, keep polling the ring this long (default 200; 0 = off)")
    p.add_argument("--discard-delay-ms", type=float, metavar="MS",
                   help="let discards of inflated pages wait up to MS milliseconds so that many buffers' "
                        "pages are freed in few calls (default 250; 0 = before each buffer is returned)")
    p.add_argument("--no-migrate-extension", action="store_true",
                   help="do not offer balloond's migrate-queue extension")
    p.add_argument("--no-deflate-on-oom", action="store_true", help="do not offer DEFLATE_ON_OOM")
    p.add_argument("--no-free-page-reporting", action="store_true", help="do not offer free page reporting")
    p.add_argument("--policy", action="store_true",
                   help="let the balloon policy set targets (docs/policy.md; also [policy] enabled = true)")
    p.add_argument("--policy-interval", type=float, metavar="SECONDS", help="seconds between policy decisions (10)")
    p.add_argument("--host-reserve", type=_size_arg, metavar="SIZE",
                   help="host MemAvailable the policy keeps (default 1G)")
    p.add_argument("--policy-step", type=_size_arg, metavar="SIZE", help="largest change per VM per interval (100M)")
    p.add_argument("--policy-simulate-host", type=_size_arg, metavar="SIZE",
                   help="testing: the policy sees a host of SIZE whose used memory is the VMs' resident RAM")
    p.add_argument("--guard-poll-interval", type=float, metavar="SECONDS",
                   help="testing: seconds between the discard guard's looks over QMP (default 1)")
    p.add_argument("--vm-isolation", metavar="MODE",
                   help="process (default): serve each VM in a worker process of its own; none: all in one process")
    p.add_argument("--worker-timeout", type=float, metavar="SECONDS",
                   help="kill and restart a VM's worker silent for this long (5)")
    p.add_argument("--max-guest-ram", type=_size_arg, metavar="SIZE",
                   help="refuse a frontend whose guest RAM (its memory table) is larger (default 1T)")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the backend's capabilities as JSON and exit")
    p.add_argument("--version", action="version", version=f"balloond {__version__}")
    return p


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_vm_spec(spec: str) -> VmConfig:
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ConfigError(f"--vm {spec!r}: expected NAME=SOCKET_PATH")
    parts = rest.split(",")
    vm = _vm(name, parts[0])
    policy: dict[str, str] = {}
    for option in parts[1:]:
        key, sep, value = option.partition("=")
        if key == "qmp" and sep and value:
            if vm.libvirt is not None:
                raise ConfigError(f"--vm {spec!r}: a libvirt domain is reached through libvirt, not a QMP socket")
            if vm.qmp is not None:
                raise ConfigError(f"--vm {spec!r}: the QMP socket is given twice")
            vm.qmp = value
        elif key == "engine" and sep and value:
            vm.engine = value
        elif key in VmPolicySettings.FILE_KEYS and sep and value:
            policy[key] = value
        else:
            known = ", ".join(["qmp=PATH", "engine=ENGINE", *(f"{k}=..." for k in VmPolicySettings.FILE_KEYS)])
            raise ConfigError(f"--vm {spec!r}: unknown option {option!r} (known: {known})")
    try:
        vm.policy = VmPolicySettings.from_mapping(policy, where=f"--vm {name}")
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None
    return vm


def _vm(name: str, where: str) -> VmConfig:
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"VM name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    if where.startswith("qmp:"):
        if not where[4:]:
            raise ConfigError(f"VM {name}: {where!r} is not qmp:PATH")
        return VmConfig(name, qmp=where[4:])
    if where.startswith("libvirt:"):
        from .libvirt_balloon import parse_target  # only a libvirt VM needs that module

        try:
            uri, domain = parse_target(where[len("libvirt:"):])
        except ValueError as exc:
            raise ConfigError(f"VM {name}: libvirt:{exc}") from None
        return VmConfig(name, libvirt=uri, domain=domain)
    if where.startswith("fd:"):
        try:
            return VmConfig(name, fd=int(where[3:]))
        except ValueError:
            raise ConfigError(f"VM {name}: {where!r} is not fd:NUMBER") from None
    return VmConfig(name, socket=where)


def _libvirt_entry(path: str, entry: dict[str, Any]) -> VmConfig:
    """A [[vm]] with libvirt = URI (and domain, default: its name)."""
    name = str(entry["name"])
    others = sorted({"socket", "fd", "qmp"} & set(entry))
    if others:
        raise ConfigError(f"{path}: [[vm]] {name}: a libvirt domain takes no {', '.join(others)} "
                          "(libvirt owns its QEMU's monitor)")
    uri, domain = entry.get("libvirt"), entry.get("domain", name)
    if not isinstance(uri, str) or not uri:
        raise ConfigError(f"{path}: [[vm]] {name}: libvirt must be a connection URI (e.g. qemu:///system)")
    if not isinstance(domain, str) or not domain or "/" in domain:
        raise ConfigError(f"{path}: [[vm]] {name}: domain must be a libvirt domain name")
    vm = _vm(name, f"libvirt:{uri}/{domain}")
    try:
        vm.policy = VmPolicySettings.from_mapping(entry, where=f"{path}: [[vm]] {name}")
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None
    return vm


def _from_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


_FILE_KEYS = {
    "api": str,
    "state_dir": str,
    "stats_interval": (int, float),
    "log_format": str,
    "log_level": str,
    "socket_group": str,
    "poll_us": (int, float),
    "discard_delay_ms": (int, float),
    "migrate_extension": bool,
    "deflate_on_oom": bool,
    "free_page_reporting": bool,
    "api_allow_uids": list,
    "api_allow_gids": list,
    "vm_isolation": str,
    "worker_timeout": (int, float),
    "engine": str,
}


def load(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    settings = Settings()
    if args.config:
        data = _from_file(args.config)
        for key, value in data.items():
            if key == "vm":
                if not isinstance(value, list):
                    raise ConfigError(f"{args.config}: 'vm' must be an array of tables ([[vm]])")
                for entry in value:
                    if not isinstance(entry, dict) or "name" not in entry:
                        raise ConfigError(f"{args.config}: each [[vm]] needs a name")
                    unknown = set(entry) - {"name", "socket", "fd", "qmp", "libvirt", "domain", "engine",
                                            *VmPolicySettings.FILE_KEYS}
                    if unknown:
                        raise ConfigError(f"{args.config}: [[vm]] {entry['name']}: unknown keys {sorted(unknown)}")
                    if "socket" in entry and "fd" in entry:
                        raise ConfigError(f"{args.config}: [[vm]] {entry['name']}: give socket or fd, not both")
                    if "libvirt" in entry or "domain" in entry:
                        settings.vms.append(_libvirt_entry(args.config, entry))
                        continue
                    if "socket" not in entry and "fd" not in entry and "qmp" not in entry:
                        raise ConfigError(f"{args.config}: [[vm]] {entry['name']}: give socket or fd (our "
                                          "balloon), or only qmp (QEMU's built-in balloon)")
                    if "fd" in entry:
                        where = f"fd:{entry['fd']}"
                    elif "socket" in entry:
                        where = str(entry["socket"])
                    else:
                        where = f"qmp:{entry['qmp']}"
                    qmp = entry.get("qmp")
                    if qmp is not None and (not isinstance(qmp, str) or not qmp):
                        raise ConfigError(f"{args.config}: [[vm]] {entry['name']}: qmp must be a socket path")
                    vm = _vm(str(entry["name"]), where)
                    vm.qmp = qmp
                    engine = entry.get("engine")
                    if engine is not None and not isinstance(engine, str):
                        raise ConfigError(f"{args.config}: [[vm]] {vm.name}: engine must be one of {', '.join(ENGINES)}")
                    vm.engine = engine
                    try:
                        vm.policy = VmPolicySettings.from_mapping(entry, where=f"{args.config}: [[vm]] {vm.name}")
                    except PolicyError as exc:
                        raise ConfigError(str(exc)) from None
                    settings.vms.append(vm)
                continue
            if key == "policy":
                if not isinstance(value, dict):
                    raise ConfigError(f"{args.config}: 'policy' must be a table ([policy])")
                try:
                    settings.policy = PolicyConfig.from_mapping(value, where=f"{args.config}: [policy]")
                except PolicyError as exc:
                    raise ConfigError(str(exc)) from None
                continue
            expected = _FILE_KEYS.get(key)
            if expected is None:
                raise ConfigError(f"{args.config}: unknown setting {key!r}")
            if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                raise ConfigError(f"{args.config}: {key} has the wrong type ({type(value).__name__})")
            setattr(settings, key, value)
    for spec in args.vm:
        settings.vms.append(parse_vm_spec(spec))
    if args.socket_path:
        settings.vms.append(VmConfig("default", socket=args.socket_path))
    if args.fd is not None:
        settings.vms.append(VmConfig("default", fd=args.fd))
    for key in ("api", "state_dir", "stats_interval", "log_format", "log_level", "socket_group", "poll_us",
                "discard_delay_ms", "vm_isolation", "worker_timeout", "engine"):
        value = getattr(args, key)
        if value is not None:
            setattr(settings, key, value)
    settings.api_allow_uids += args.api_allow_uid
    settings.api_allow_gids += args.api_allow_gid
    if args.no_migrate_extension:
        settings.migrate_extension = False
    if args.no_deflate_on_oom:
        settings.deflate_on_oom = False
    if args.no_free_page_reporting:
        settings.free_page_reporting = False
    changes = {"enabled": True if args.policy else None, "interval": args.policy_interval,
               "reserve_bytes": args.host_reserve, "step_bytes": args.policy_step}
    try:
        for key, value in changes.items():
            if value is not None:
                setattr(settings.policy, key, value)
        settings.policy.validate()
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None
    if args.policy_simulate_host is not None:
        settings.policy_simulate_host = args.policy_simulate_host
    if args.guard_poll_interval is not None:
        settings.guard_poll_interval = args.guard_poll_interval
    if args.max_guest_ram is not None:
        settings.max_guest_ram = args.max_guest_ram
    validate(settings, args)
    return settings, args


def validate_engines(settings: Settings) -> None:
    """Engines are known, and libvhost-user, if any VM uses it, is built and
    laid out as the binding expects: a missing library or a layout mismatch
    is a one-line error at start (exit code 2), not a VM that never serves."""
    if settings.engine not in ENGINES:
        raise ConfigError(f"engine / --engine must be one of {', '.join(ENGINES)}, not {settings.engine!r}")
    users = []
    for vm in settings.vms:
        if vm.engine is not None and vm.engine not in ENGINES:
            raise ConfigError(f"VM {vm.name}: engine must be one of {', '.join(ENGINES)}, not {vm.engine!r}")
        if vm.engine is not None and (vm.libvirt is not None or vm.uses_qemu_balloon):
            raise ConfigError(f"VM {vm.name}: engine applies to a vhost-user socket, not QEMU's built-in balloon")
        if settings.engine_of(vm) == "libvhost-user" and not (vm.libvirt is not None or vm.uses_qemu_balloon):
            users.append(vm.name)
    if users and settings.vm_isolation == "none":
        # An assertion inside the library aborts the process serving the VM:
        # that must be the VM's own worker, or one frontend ends every VM.
        raise ConfigError(f"VM {users[0]}: engine libvhost-user needs --vm-isolation process (an abort inside "
                          "the library would end every VM's service)")
    if users:
        from ..engine.libvhost_user import abi  # only a libvhost-user VM needs the binding

        try:
            abi.check()
        except abi.LibraryError as exc:
            raise ConfigError(f"VM {users[0]}: {exc}") from None


def validate(settings: Settings, args: argparse.Namespace) -> None:
    if args.print_capabilities:
        return
    if not settings.vms:
        raise ConfigError("no VM to serve: give --vm NAME=SOCKET_PATH (or a config file with [[vm]])")
    names = [vm.name for vm in settings.vms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"VM names must be unique; repeated: {', '.join(dupes)}")
    paths = [vm.socket for vm in settings.vms if vm.socket]
    if len(paths) != len(set(paths)):
        raise ConfigError("two VMs cannot share one socket path")
    domains = [(vm.libvirt, vm.domain) for vm in settings.vms if vm.libvirt is not None]
    if len(domains) != len(set(domains)):
        raise ConfigError("two VMs cannot steer one libvirt domain")
    qmps = [vm.qmp for vm in settings.vms if vm.qmp]
    if len(qmps) != len(set(qmps)):
        raise ConfigError("two VMs cannot share one QMP socket (QEMU serves one client per -qmp socket)")
    # Written as "not low <= x <= high" so that NaN, which every comparison
    # rejects, is refused too instead of reaching the timers.
    if not 0 <= settings.stats_interval < math.inf:
        raise ConfigError("--stats-interval must be a number of seconds, 0 or more (0 = never)")
    if not 0 < settings.guard_poll_interval < math.inf:
        raise ConfigError("--guard-poll-interval must be a number of seconds above 0")
    if settings.vm_isolation not in ("process", "none"):
        raise ConfigError(f"vm_isolation / --vm-isolation must be process or none, not {settings.vm_isolation!r}")
    if not 0 < settings.worker_timeout <= 3600:
        raise ConfigError("--worker-timeout must be a number of seconds above 0 (at most 3600)")
    if not 1 << 20 <= settings.max_guest_ram <= 1 << 48:
        raise ConfigError("--max-guest-ram must be a size from 1M to 256T")
    if not 0 <= settings.poll_us <= 100_000:
        raise ConfigError("--poll-us must be between 0 and 100000")
    if not 0 <= settings.discard_delay_ms <= 10_000:
        raise ConfigError("--discard-delay-ms must be between 0 and 10000")
    validate_engines(settings)
    for what, ids in (("uid", settings.api_allow_uids), ("gid", settings.api_allow_gids)):
        for value in ids:
            # bool is an int to Python but `true` is no uid; 2^32-1 is the kernel's "no id"
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF_FFFE:
                raise ConfigError(f"api_allow_{what}s / --api-allow-{what}: {value!r} is not a {what} "
                                  "(a whole number from 0 to 4294967294)")
    if settings.log_format not in ("json", "console"):
        raise ConfigError(f"log_format must be json or console, not {settings.log_format!r}")
    if settings.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level must be debug, info, warning or error, not {settings.log_level!r}")
