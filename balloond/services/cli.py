"""balloonctl: the operator's command line for a running balloond.

    balloonctl [--api PATH] [--json] status [NAME]
    balloonctl [--api PATH] set NAME SIZE        e.g. 512M, 1G, 0
    balloonctl [--api PATH] pfns NAME
    balloonctl [--api PATH] policy [show|on|off|vm NAME ...]
    balloonctl [--api PATH] watch NAME [--interval S] [--count N]
    balloonctl [--api PATH] libvirt-xml NAME     the domain XML for a VM (docs/libvirt.md)

--api and --json may also follow the command (`balloonctl status --json`).

It speaks the control API over its Unix socket with the standard library only,
so it starts fast and works where the daemon's dependencies are not on the path.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
from typing import Any
from xml.sax.saxutils import quoteattr

from .policy import render_policy
from .sizes import format_size, parse_size

FALLBACK_API = "/run/balloond/api.sock"


def default_api() -> str:
    """$BALLOOND_API, read when balloonctl runs (not at import), or the packaged path."""
    return os.environ.get("BALLOOND_API") or FALLBACK_API


class CliError(Exception):
    """Something to tell the user in one line; exit code 1."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (the API is not on TCP)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def request(api: str, method: str, path: str, body: Any = None) -> Any:
    conn = UnixHTTPConnection(api)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
    except FileNotFoundError:
        raise CliError(f"balloond is not running (no API socket at {api}); start it or pass --api PATH") from None
    except ConnectionRefusedError:
        raise CliError(f"balloond is not running (nothing listens on {api})") from None
    except PermissionError:
        raise CliError(f"permission denied on {api}; run as the daemon's user or root") from None
    except (OSError, http.client.HTTPException) as exc:
        raise CliError(f"cannot talk to balloond at {api}: {exc}") from None
    finally:
        conn.close()
    try:
        decoded = json.loads(data) if data else None
    except json.JSONDecodeError:
        decoded = data.decode(errors="replace")
    if response.status >= 400:
        message = decoded.get("error") if isinstance(decoded, dict) else decoded
        raise CliError(str(message))
    return decoded


# --------------------------------------------------------------- rendering

_COLUMNS = [
    ("VM", lambda v: v["name"]),
    ("KIND", lambda v: v.get("kind") or "vhost-user"),
    ("CONN", lambda v: "yes" if v["connected"] else "no"),
    ("RAM", lambda v: format_size(v["guest_ram_bytes"])),
    ("TARGET", lambda v: format_size(v["target_bytes"])),
    ("ACTUAL", lambda v: format_size(v["actual_bytes"])),
    ("BALLOONED", lambda v: format_size(v["ballooned_bytes"])),
    ("HOST FREED", lambda v: format_size(v["host_freed_bytes"])),
    ("RESIDENT", lambda v: format_size(v["resident_bytes"])),
    ("MIGR", lambda v: "-" if v["migrations"] is None else str(v["migrations"])),
    ("WORKER", lambda v: _worker_cell(v.get("worker"))),
]


def _worker_cell(worker: dict[str, Any] | None) -> str:
    """A VM's worker process in one cell: its pid while running, and restarts if any."""
    if not worker:
        return "-"
    cell = str(worker["pid"]) if worker["state"] == "running" and worker.get("pid") else worker["state"]
    return cell + (f" ({worker['restarts']} restarts)" if worker.get("restarts") else "")


def render_table(vms: list[dict[str, Any]]) -> str:
    rows = [[title for title, _ in _COLUMNS]] + [[fn(vm) for _, fn in _COLUMNS] for vm in vms]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def render_detail(vm: dict[str, Any]) -> str:
    lines = [render_table([vm]), ""]
    if vm.get("qmp"):
        lines.append(f"qmp: {vm['qmp']} ({'connected' if vm.get('qmp_connected') else 'not connected'}"
                     + (f", {vm['run_state']}" if vm.get("run_state") else "") + ")")
    if vm.get("discard_inhibited"):
        lines.append(f"discards refused: {vm['discard_inhibited']}")
    worker = vm.get("worker")
    if worker:
        line = f"worker: {worker['state']}"
        if worker.get("pid"):
            line += f", pid {worker['pid']}"
        line += f", {worker['restarts']} restart(s)"
        if worker.get("last_exit"):
            line += f", last exit: {worker['last_exit']}"
        lines.append(line)
    counters = vm.get("counters") or {}
    if (vm.get("migration") or counters.get("migrations_in") or counters.get("migrations_out")
            or vm.get("migrated_from") or vm.get("migrated_to")):
        line = f"live migration: {vm.get('migration') or 'none now'}"
        line += f" ({counters.get('migrations_out', 0)} out, {counters.get('migrations_in', 0)} in)"
        lines.append(line)
    lines += _migration_peers(vm)
    if vm.get("last_error"):
        lines.append(f"problem: {vm['last_error']}")
    if vm.get("features"):
        lines.append("features: " + ", ".join(vm["features"]))
    if vm.get("stats"):
        age = ""
        if vm.get("stats_updated_at"):
            age = f" ({time.time() - vm['stats_updated_at']:.0f}s ago)"
        lines.append("guest stats" + age + ":")
        for key, value in sorted(vm["stats"].items()):
            shown = format_size(value) if key.endswith("memory") or key == "disk_caches" else str(value)
            lines.append(f"  {key:<22} {shown}")
    return "\n".join(lines)


def _migration_peers(vm: dict[str, Any]) -> list[str]:
    """Where the VM came from and where its state went (docs/migration.md)."""
    lines = []
    came = vm.get("migrated_from")
    if came:
        lines.append(f"  migrated in from VM {came['vm']} on "
                     + (f"host {came['host']}" if came.get("host") else "an unknown host")
                     + f" (migration {came['id'][:8]})")
    went = vm.get("migrated_to")
    if went:
        where = (f"VM {went['vm']}" + (f" on host {went['host']}" if went.get("host") else "")
                 if went.get("vm") else "another daemon (VM and host not known here)")
        lines.append(f"  migrated out to {where} (migration {went['id'][:8]})")
    return lines


def render_pfns(data: dict[str, Any], limit: int = 50) -> str:
    lines = [f"{data['count']} pages ballooned in {len(data['ranges'])} ranges"]
    for first, count in data["ranges"][:limit]:
        lines.append(f"  {first:#x}-{first + count - 1:#x}  ({count} pages)")
    if len(data["ranges"]) > limit:
        lines.append(f"  ... {len(data['ranges']) - limit} more ranges (use --json for all)")
    return "\n".join(lines)


def _progress(vm: dict[str, Any], width: int = 40) -> str:
    target, actual = vm["target_bytes"], vm["actual_bytes"]
    scale = max(target, actual, 1)
    filled = int(width * actual / scale)
    mark = int(width * target / scale)
    bar = "".join("#" if i < filled else ("|" if i == mark else ".") for i in range(width))
    return f"[{bar}] {format_size(actual)} of {format_size(target)}"


QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"


def _qemu_opt(value: str) -> str:
    """A value inside a QEMU option list: a comma is written twice."""
    return value.replace(",", ",,")


def render_libvirt_xml(name: str, socket_path: str, qmp: str | None, *,
                       device: str = "vhost-user-test-device-pci", config_cache: bool = True) -> str:
    """What a libvirt domain needs for balloond's device (docs/libvirt.md): shared
    memfd RAM, no balloon of libvirt's own, and through libvirt's QEMU
    namespace the chardev to the VM's socket, the device and, when the VM
    has one configured, balloond's own QMP monitor beside libvirt's."""
    args = ["-chardev", f"socket,id=balloond0,path={_qemu_opt(socket_path)}",
            "-device", f"{device},chardev=balloond0,virtio-id=5,num_vqs=5,config_size=16"
            + (",config-cache=on" if config_cache else "")]
    if qmp:
        args += ["-qmp", f"unix:{_qemu_opt(qmp)},server=on,wait=off"]
    lines = [
        f"<!-- balloond's balloon for VM {name}: merge into its libvirt domain (virsh edit).",
        f"     The <domain> element must declare xmlns:qemu='{QEMU_NAMESPACE}'. -->",
        "<memoryBacking>",
        "  <source type='memfd'/>",
        "  <access mode='shared'/>",
        "</memoryBacking>",
        "<devices>",
        "  <memballoon model='none'/>",
        "</devices>",
        "<qemu:commandline>",
        *(f"  <qemu:arg value={quoteattr(a)}/>" for a in args),
        "</qemu:commandline>",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------- commands


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except CliError as exc:
        print(f"balloonctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The parser; --api and --json are accepted before and after the command.

    Operators type `balloonctl status --json` as often as `balloonctl --json
    status`, so every subcommand shares a parent parser with the two options.
    Its defaults are SUPPRESS: an option not given after the command leaves
    the value parsed before it (or the top-level default) alone.
    """
    api = default_api()
    parser = argparse.ArgumentParser(prog="balloonctl", description="control a running balloond")
    parser.add_argument("--api", default=api, help=f"API socket (default {api}; $BALLOOND_API sets it)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api", default=argparse.SUPPRESS, help="API socket (as before the command)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", parents=[common], help="show VMs and their balloons")
    p.add_argument("name", nargs="?")
    p = sub.add_parser("set", parents=[common], help="set a VM's balloon size")
    p.add_argument("name")
    p.add_argument("size", help="bytes or 256M, 1G, ...")
    p = sub.add_parser("pfns", parents=[common], help="list the ballooned page frames of a VM")
    p.add_argument("name")
    p = sub.add_parser("policy", parents=[common],
                       help="show the balloon policy's last decision, turn it on or off, tune a VM")
    p.add_argument("action", nargs="?", choices=("show", "on", "off", "vm"), default="show")
    p.add_argument("name", nargs="?", help="with 'vm': the VM to change")
    p.add_argument("--enable", dest="vm_enabled", action="store_true", default=None, help="vm: policy on for it")
    p.add_argument("--disable", dest="vm_enabled", action="store_false", help="vm: leave it alone")
    p.add_argument("--min-memory", help="vm: never leave the guest less than SIZE")
    p.add_argument("--max-balloon", help="vm: never take more than SIZE ('none': no cap)")
    p.add_argument("--shares", type=float, help="vm: weight (default 1)")
    p = sub.add_parser("watch", parents=[common], help="follow a VM's balloon live")
    p.add_argument("name")
    p.add_argument("--interval", type=_positive_seconds, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--count", type=_count, default=0, help="stop after N refreshes (0 = until Ctrl-C)")
    p = sub.add_parser("libvirt-xml", parents=[common],
                       help="print the libvirt domain XML that attaches a VM to balloond (docs/libvirt.md)")
    p.add_argument("name")
    p.add_argument("--socket", help="the VM's socket (default: as the daemon serves it)")
    p.add_argument("--qmp", help="balloond's QMP socket for the VM (default: as the daemon has it; "
                                 "'none': no monitor)")
    p.add_argument("--device", default="vhost-user-test-device-pci",
                   help="QEMU's generic vhost-user device (default vhost-user-test-device-pci)")
    p.add_argument("--no-config-cache", dest="config_cache", action="store_false",
                   help="for a QEMU without the project's config-cache patch")
    return parser


def _positive_seconds(text: str) -> float:
    """watch --interval: a positive number, refused as a usage error (one line, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0 and at most 3600")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _run(args: argparse.Namespace) -> int:
    out = sys.stdout
    if args.command == "status":
        # One VM: its worker is asked (a one-off look should show everything it did).
        data = request(args.api, "GET", f"/v1/vms/{args.name}?fresh=1" if args.name else "/v1/vms")
        if args.json:
            print(json.dumps(data, indent=2), file=out)
        elif args.name:
            print(render_detail(data), file=out)
        else:
            print(render_table(data), file=out)
        return 0
    if args.command == "set":
        try:
            size = parse_size(args.size)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        data = request(args.api, "PUT", f"/v1/vms/{args.name}/target", {"bytes": size})
        if args.json:
            print(json.dumps(data, indent=2), file=out)
        else:
            print(f"{args.name}: balloon target set to {format_size(data['target_bytes'])}", file=out)
        return 0
    if args.command == "pfns":
        data = request(args.api, "GET", f"/v1/vms/{args.name}/pfns")
        print(json.dumps(data) if args.json else render_pfns(data), file=out)
        return 0
    if args.command == "policy":
        if args.action in ("on", "off"):
            data = request(args.api, "PUT", "/v1/policy", {"enabled": args.action == "on"})
        elif args.action == "vm":
            if not args.name:
                raise CliError("policy vm NAME [--enable|--disable] [--min-memory SIZE] [--max-balloon SIZE] "
                               "[--shares N]")
            changes: dict[str, Any] = {}
            try:
                if args.vm_enabled is not None:
                    changes["enabled"] = args.vm_enabled
                if args.min_memory is not None:
                    changes["min_bytes"] = parse_size(args.min_memory)
                if args.max_balloon is not None:
                    changes["max_bytes"] = None if args.max_balloon == "none" else parse_size(args.max_balloon)
            except ValueError as exc:
                raise CliError(str(exc)) from None
            if args.shares is not None:
                changes["shares"] = args.shares
            data = request(args.api, "PUT", f"/v1/vms/{args.name}/policy", changes)
            print(json.dumps(data, indent=2) if args.json else
                  f"{args.name}: " + ", ".join(f"{k}={v}" for k, v in data.items()), file=out)
            return 0
        else:
            data = request(args.api, "GET", "/v1/policy")
        print(json.dumps(data, indent=2) if args.json else render_policy(data), file=out)
        return 0
    if args.command == "watch":
        n = 0
        while True:
            vm = request(args.api, "GET", f"/v1/vms/{args.name}")
            if args.json:
                print(json.dumps(vm), file=out, flush=True)
            else:
                if out.isatty():
                    out.write("\x1b[H\x1b[2J")
                print(render_table([vm]), file=out)
                print(_progress(vm), file=out, flush=True)
            n += 1
            if args.count and n >= args.count:
                return 0
            time.sleep(args.interval)
    if args.command == "libvirt-xml":
        socket_path, qmp = args.socket, args.qmp
        if socket_path is None:
            vm = request(args.api, "GET", f"/v1/vms/{args.name}")
            if (vm.get("kind") or "vhost-user") != "vhost-user":
                raise CliError(f"VM {args.name} keeps QEMU's built-in balloon ({vm['kind']}): "
                               "its domain needs nothing from balloond")
            socket_path = vm.get("socket")
            if qmp is None:
                qmp = vm.get("qmp")
        if not socket_path or socket_path.startswith("fd:"):
            raise CliError(f"VM {args.name} has no socket path QEMU could connect to ({socket_path}); "
                           "give --socket PATH")
        print(render_libvirt_xml(args.name, socket_path, None if qmp == "none" else qmp,
                                 device=args.device, config_cache=args.config_cache), file=out)
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
