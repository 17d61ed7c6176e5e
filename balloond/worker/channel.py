"""The channel between the supervisor and one VM's worker: typed messages,
each a dataclass sent as a 4-byte big-endian length and a JSON object with
a "type" tag.

JSON and not pickle: a worker maps guest memory and parses what a hostile
QEMU sends, so it may be compromised; unpickling its bytes would give it the
supervisor. Decoding checks every field against the dataclass's annotations,
so the supervisor only ever holds well-typed values, and anything else is a
`ChannelError` (the supervisor then kills and restarts that worker).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import struct
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

from ..status import ServingStatus

#: A frame larger than this is refused (the pfn list of a 4 TiB guest, fragmented, fits).
MAX_FRAME = 256 << 20
_LENGTH = struct.Struct(">I")


class ChannelError(Exception):
    """The peer sent something that is not one of the expected messages."""


# ------------------------------------------------------------ supervisor → worker
#
# A command (SetTarget, SetStatsInterval, SetDiscardInhibit) carries `seq`,
# numbered by the supervisor from 1 up for the life of the VM; every Status
# says the highest seq applied so far. A report whose `applied` is below the
# last seq sent predates a command, and the supervisor then asks afresh
# (see WorkerVm.refresh): the API reads its own writes without asking every
# worker on every read.


@dataclass
class SetTarget:
    pages: int
    seq: int = 0


@dataclass
class SetStatsInterval:
    seconds: float
    seq: int = 0


@dataclass
class SetDiscardInhibit:
    """The discard guard's verdict (None: discards allowed)."""

    reason: str | None
    seq: int = 0


@dataclass
class GetPfns:
    id: int


@dataclass
class GetStatus:
    """Report now (answered by a Status with this id): an API read sees
    everything the worker did before it, not a report up to one report interval old."""

    id: int


@dataclass
class Stop:
    """Finish: close the connection, leave the listening socket to the supervisor."""


# ------------------------------------------------------------ worker → supervisor


@dataclass
class Status:
    """The worker's report: on a change, every report interval
    (WorkerSpec.report_interval, the heartbeat), or as an answer to GetStatus."""

    serving: ServingStatus
    #: The GetStatus answered; 0 for a report of the worker's own.
    id: int = 0
    #: The highest command seq applied before this report was made.
    applied: int = 0


@dataclass
class Waiting:
    """A heartbeat from a worker that does not serve yet (another process
    holds its VM's journal lock): alive, but nothing to report, so the
    supervisor must not take anything from it (a first report's target)."""

    reason: str


@dataclass
class Pfns:
    id: int
    count: int
    ranges: list[list[int]]


TO_WORKER: dict[str, type] = {c.__name__: c for c in (SetTarget, SetStatsInterval, SetDiscardInhibit, GetPfns, GetStatus, Stop)}
TO_SUPERVISOR: dict[str, type] = {c.__name__: c for c in (Status, Waiting, Pfns)}


def encode(message: Any) -> bytes:
    body = json.dumps({"type": type(message).__name__, **dataclasses.asdict(message)},
                      separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


def decode(body: bytes, allowed: dict[str, type]) -> Any:
    """One message body → its dataclass, every field checked; ChannelError otherwise."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChannelError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ChannelError("a message must be a JSON object")
    kind = data.pop("type", None)
    cls = allowed.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ChannelError(f"unexpected message type {kind!r}")
    return _build(cls, data, kind)


@functools.cache
def _fields(tp: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """A dataclass's field types and names, worked out once per class: the
    supervisor decodes every worker's reports, and resolving annotations was
    most of the cost (measured: a Status decoded in 440 us, 110 us with this)."""
    return typing.get_type_hints(tp), frozenset(f.name for f in dataclasses.fields(tp))


def _build(tp: Any, value: Any, where: str) -> Any:
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ChannelError(f"{where}: expected an object")
        hints, names = _fields(tp)
        unknown = set(value) - names
        if unknown:
            raise ChannelError(f"{where}: unknown fields {sorted(unknown)}")
        kwargs = {}
        for name in names:
            if name not in value:
                raise ChannelError(f"{where}: missing field {name!r}")
            kwargs[name] = _build(hints[name], value[name], f"{where}.{name}")
        return tp(**kwargs)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _build(option, value, where)
            except ChannelError:
                continue
        raise ChannelError(f"{where}: {value!r} is none of {tp}")
    if tp is type(None):
        if value is not None:
            raise ChannelError(f"{where}: expected null")
        return None
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ChannelError(f"{where}: expected a list")
        return [_build(item, v, where) for v in value]
    if origin is dict:
        key, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ChannelError(f"{where}: expected an object")
        return {_build(key, k, where): _build(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ChannelError(f"{where}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ChannelError(f"{where}: expected a whole number")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ChannelError(f"{where}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ChannelError(f"{where}: expected a string")
        return value
    raise ChannelError(f"{where}: cannot decode {tp}")  # a message type this module cannot check


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next message's body, undecoded, or None at end of stream; ChannelError for a bad frame."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ChannelError("stream ended inside a frame header") from None
        return None
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise ChannelError(f"frame of {length} bytes is over the {MAX_FRAME}-byte limit")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ChannelError("stream ended inside a frame") from None


async def read_message(reader: asyncio.StreamReader, allowed: dict[str, type]) -> Any:
    """The next message, or None at end of stream; ChannelError for a bad one."""
    body = await read_frame(reader)
    return None if body is None else decode(body, allowed)
