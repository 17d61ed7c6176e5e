"""The supervisor decodes what a possibly compromised worker sends: every
malformed frame must be a ChannelError (the worker is then restarted),
never another exception escaping into the supervisor's loop."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct

import pytest

from balloond.status import EngineCounters, ServingStatus
from balloond.worker.channel import MAX_FRAME, TO_SUPERVISOR, ChannelError, Pfns, Status, decode, encode, read_message


def read(data: bytes):
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_message(reader, TO_SUPERVISOR)
    return asyncio.run(go())


def frame(obj) -> bytes:
    body = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    return struct.pack(">I", len(body)) + body


def test_a_status_round_trips_with_its_engine_counters():
    msg = Status(ServingStatus(connected=True, engine=EngineCounters(calls_skipped=3, backend_full=1)), 7)
    assert read(encode(msg)) == msg


@pytest.mark.parametrize("data, why", [
    (struct.pack(">I", MAX_FRAME + 1), "over the"),
    (struct.pack(">I", 100) + b"{}", "inside a frame"),
    (b"\0\0", "frame header"),
    (frame(b"\xff\xfe not json"), "not JSON"),
    (frame([1, 2]), "JSON object"),
    (frame({"type": "Exec", "cmd": "sh"}), "unexpected message type"),
    (frame({"type": 5}), "unexpected message type"),
    (frame({"type": "Pfns", "id": "1", "count": 0, "ranges": []}), "whole number"),
    (frame({"type": "Pfns", "id": True, "count": 0, "ranges": []}), "whole number"),
    (frame({"type": "Pfns", "id": 1, "count": 0, "ranges": [[1, "x"]]}), "whole number"),
    (frame({"type": "Pfns", "id": 1, "count": 0}), "missing field"),
    (frame({"type": "Pfns", "id": 1, "count": 0, "ranges": [], "extra": 1}), "unknown fields"),
    (frame({"type": "Status", "id": 0, "applied": 0, "serving": {"connected": "yes"}}), "serving"),
    (frame({"type": "Status", "id": 0, "applied": "1", "serving": dataclasses.asdict(ServingStatus())}), "whole number"),
    (frame({"type": "Waiting", "reason": 3}), "expected a string"),
    (frame({"type": "Status", "id": 0, "applied": 0, "serving": []}), "expected an object"),
])
def test_malformed_frames_are_channel_errors(data, why):
    with pytest.raises(ChannelError) as info:
        read(data)
    assert why in str(info.value)


def test_a_supervisor_message_is_refused_from_a_worker():
    with pytest.raises(ChannelError):
        decode(json.dumps({"type": "SetTarget", "pages": 1}).encode(), TO_SUPERVISOR)


def test_end_of_stream_between_frames_is_none():
    assert read(b"") is None
    assert read(encode(Pfns(1, 0, []))) == Pfns(1, 0, [])
