"""Reading back the TensorBoard events a run wrote, without TensorBoard itself."""
from __future__ import annotations

import struct

from tensorboardX.proto import event_pb2


def tb_scalars(tb_dir) -> dict:
    """{tag: [(step, value)]} from the TFRecord events files (length, crc, Event proto, crc)."""
    found = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        raw = path.read_bytes()
        i = 0
        while i < len(raw):
            (n,) = struct.unpack("<Q", raw[i:i + 8])
            ev = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                found.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return found
